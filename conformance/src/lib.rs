//! keyway's test harness: running CNI chains as a runtime does, agents in node namespaces, and
//! (with the lab) simulated clusters.
#![forbid(unsafe_code)]

pub mod ambient;
pub mod attack;
pub mod cni_exec;
pub mod containerd;
pub mod cri;
pub mod harness;
pub mod images;
pub mod lab;
pub mod netpol;
pub mod proc;
pub mod topology;
