//! keyway's data plane: the paper's L3 component and SaP as a library.
//!
//! The core ([`gue`], [`packet`], [`fib`], [`acl`], [`key`], [`flow`], [`engine`]) does no I/O:
//! pure functions over caller-provided buffers, unit-tested, fuzzed and benchmarked without
//! privileges. [`io`] wraps it for Linux: TUN devices, UDP sockets, network namespaces, the loops
//! that run an endpoint and a SaP. All `unsafe` code of the workspace lives in [`sys`].

pub mod acl;
pub mod config;
pub mod counters;
pub mod engine;
pub mod fib;
pub mod flow;
pub mod gue;
pub mod key;
pub mod packet;

pub mod io;
pub mod sys;
pub mod tables;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use acl::{Acl, Identity, Isolation, PortRange};
pub use engine::{DropReason, LocalEndpoint, Tables};
pub use fib::{Fib, Route};
pub use key::{ClusterSecret, Epoch, Key, KeyRing, Rotation};
