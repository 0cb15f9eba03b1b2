//! keyway's Linux I/O layer around the data-plane core (`keyway-core`): TUN devices with
//! offloads, GUE sockets with GSO/GRO, links, addresses and routes (rtnetlink), nftables, files
//! written atomically, and the loops that run an L3 endpoint and a SaP. Also the `keyway-sap`
//! binary's configuration: a standalone endpoint or gateway SaP for what lives outside the cluster.
//!
//! All `unsafe` code of the workspace lives in [`sys`].

pub mod config;
pub mod io;
pub mod sys;
