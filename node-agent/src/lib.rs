//! keyway's node agent as a library: the cluster model and its `file` source, the policy compiler,
//! overlay IPAM, the handoff server, per-pod endpoints, the node's SaP, metrics and admin.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod compile;
pub mod config;
pub mod crds;
pub mod endpoints;
pub mod ipam;
pub mod kube_claims;
pub mod kube_node;
pub mod kube_source;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod records;
pub mod server;
pub mod source;
