//! keyway-install: puts keyway's plugin into the node's existing CNI chain (Calico, Flannel,
//! bridge, istio-cni…), keeps it there when the primary rewrites its configuration, and takes it
//! out again leaving the primary's files as they were. The decisions live here, as functions over
//! a directory, so that tests drive them on real files; `main.rs` only wires them to a loop.
#![forbid(unsafe_code)]

pub mod binary;
pub mod confdir;
pub mod conflist;
pub mod intent;
pub mod kubeconfig;
