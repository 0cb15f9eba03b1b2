//! keyway's node agent as a library. Its modules, from the bottom up:
//! - the cluster: [`policy`] (selectors, protocols, validation), [`model`] (the one model of the
//!   cluster), [`source`] (where it comes from: files or the API server), [`compile`] (the model
//!   into the data plane's tables);
//! - the node: [`ipam`] and [`claims`] (overlay addresses), `state` (attachments, as pure
//!   transitions that return effects), [`records`] (the state on disk), `endpoints` (the L3
//!   endpoints run for pods), [`agent`] (which drives them all), [`server`] (the plugin's socket);
//! - the cluster again, in the background: [`cluster`] (publications, taint, reclaims,
//!   EndpointSlices), `slices`, [`kube_node`], [`crds`];
//! - the operator: [`config`], [`metrics`], [`admin`];
//! - [`fuzzing`]: the check the file source's fuzz target makes on arbitrary input.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod claims;
pub mod cluster;
pub mod compile;
pub mod config;
pub mod crds;
mod endpoints;
pub mod fuzzing;
pub mod gateway;
pub mod ipam;
pub mod kube_node;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod records;
pub mod server;
mod slices;
pub mod source;
mod state;
