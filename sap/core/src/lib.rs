//! keyway's data-plane core: the paper's L3 endpoint and SaP as pure functions.
//!
//! Nothing here does I/O or depends on an async runtime, netlink or TUN: every function works on
//! caller-provided buffers and is given the time, so the core is unit-tested, fuzzed and
//! benchmarked without privileges. The Linux I/O layer (`keyway-sap`) moves the bytes.
//!
//! - [`gue`]: the wire format (GUE variant 0 with the 32-bit key in the group-identifier field);
//! - [`packet`]: classification of inner packets, and the transport protocols' names;
//! - [`fib`], [`acl`], [`key`], [`flow`]: the tables the control plane compiles;
//! - [`engine`]: endpoint egress and ingress, SaP forwarding; every drop has a reason;
//! - [`tables`], [`counters`]: lock-free publication of compiled tables, and the drop counters;
//! - [`fuzzing`]: the checks the fuzz targets make on arbitrary input.
#![forbid(unsafe_code)]

pub mod acl;
pub mod counters;
pub mod engine;
pub mod fib;
pub mod flow;
pub mod fuzzing;
pub mod gue;
pub mod key;
pub mod packet;
pub mod tables;

pub use acl::{Acl, Identity, Isolation, PortRange};
pub use engine::{DropReason, LocalEndpoint, Tables};
pub use fib::{Fib, Route};
pub use key::{ClusterSecret, Epoch, Key, KeyRing, Rotation};
