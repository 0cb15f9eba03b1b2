//! keyway's chained CNI plugin as a library: the CNI spec's types, the plugin's configuration, the
//! handoff protocol it shares with the agent, the pod's nftables table, and the verbs.
#![forbid(unsafe_code)]

pub mod config;
pub mod firewall;
pub mod handoff;
pub mod plugin;
pub mod spec;
