//! Flow tracking at an endpoint. Kubernetes policies are stateful: when policy lets a pod open a
//! connection, the replies come back whatever the other direction's rules say. Each endpoint keeps
//! the flows that policy allowed (in either direction) so that packets of the reverse direction are
//! admitted as replies.
//!
//! A forward packet is always checked against the current policy (a revoked rule stops new
//! requests at once); only the reverse direction rides on the table. Entries expire when idle.
//! The table is bounded: when full of live flows, a new flow is not tracked (its replies are then
//! dropped, failing closed) and [`FlowTable::overflows`] counts it.

use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::acl::FastMap;
use crate::packet::{Classified, PROTO_TCP, Transport};

/// The flow a packet belongs to, seen from its originator (`a` opened it to `b`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    a: IpAddr,
    b: IpAddr,
    proto: u8,
    port_a: u16,
    port_b: u16,
}

impl FlowKey {
    /// The key of the flow `c` would open; `None` for later fragments, which cannot be matched.
    pub fn forward(c: &Classified) -> Option<FlowKey> {
        let (port_a, port_b) = match c.transport {
            Transport::Ports { src, dst } => (src, dst),
            Transport::Echo { id, .. } => (id, id),
            Transport::NoPorts => (0, 0),
            Transport::LaterFragment => return None,
        };
        Some(FlowKey {
            a: c.src,
            b: c.dst,
            proto: c.proto,
            port_a,
            port_b,
        })
    }

    /// The key of the flow `c` would be a reply within.
    pub fn reverse(c: &Classified) -> Option<FlowKey> {
        let k = Self::forward(c)?;
        Some(FlowKey {
            a: k.b,
            b: k.a,
            proto: k.proto,
            port_a: k.port_b,
            port_b: k.port_a,
        })
    }
}

/// Idle timeouts: long for TCP (connections idle between keepalives), short for everything else.
#[derive(Debug, Clone, Copy)]
pub struct FlowTimeouts {
    pub tcp_ms: u64,
    pub other_ms: u64,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        FlowTimeouts {
            tcp_ms: 7_440_000,
            other_ms: 180_000,
        }
    }
}

#[derive(Debug)]
struct Inner {
    flows: FastMap<FlowKey, u64>,
}

/// The flows of one endpoint.
#[derive(Debug)]
pub struct FlowTable {
    inner: Mutex<Inner>,
    capacity: usize,
    timeouts: FlowTimeouts,
    overflows: AtomicU64,
}

impl FlowTable {
    pub fn new(capacity: usize, timeouts: FlowTimeouts) -> Self {
        FlowTable {
            inner: Mutex::new(Inner {
                flows: FastMap::default(),
            }),
            capacity,
            timeouts,
            overflows: AtomicU64::new(0),
        }
    }

    fn timeout(&self, key: &FlowKey) -> u64 {
        if key.proto == PROTO_TCP {
            self.timeouts.tcp_ms
        } else {
            self.timeouts.other_ms
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a map of plain timestamps: still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records (or refreshes) the flow that `c`, allowed by policy, belongs to.
    pub fn track(&self, c: &Classified, now_ms: u64) {
        if let Some(key) = FlowKey::forward(c) {
            self.insert(&mut self.lock(), key, now_ms);
        }
    }

    fn insert(&self, inner: &mut Inner, key: FlowKey, now_ms: u64) {
        if let Some(seen) = inner.flows.get_mut(&key) {
            *seen = now_ms;
            return;
        }
        if inner.flows.len() >= self.capacity {
            inner
                .flows
                .retain(|k, seen| now_ms.saturating_sub(*seen) < self.timeout(k));
            if inner.flows.len() >= self.capacity {
                self.overflows.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        inner.flows.insert(key, now_ms);
    }

    /// A live tracked flow that `c` replies within, refreshed; expired entries go on sight.
    fn live_reverse(&self, inner: &mut Inner, c: &Classified, now_ms: u64) -> bool {
        // A packet that opens a flow (a TCP SYN, an echo request) is never a reply.
        if c.opens_flow {
            return false;
        }
        let Some(key) = FlowKey::reverse(c) else {
            return false;
        };
        let timeout = self.timeout(&key);
        match inner.flows.get_mut(&key) {
            Some(seen) if now_ms.saturating_sub(*seen) < timeout => {
                *seen = now_ms;
                true
            }
            Some(_) => {
                inner.flows.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Whether `c` is a reply within a live tracked flow; refreshes the flow if so.
    pub fn is_reply(&self, c: &Classified, now_ms: u64) -> bool {
        self.live_reverse(&mut self.lock(), c, now_ms)
    }

    /// Whether `c` may pass, `allowed` being the current policy's verdict on it: a reply within a
    /// live tracked flow passes; otherwise an allowed packet passes and its flow is tracked.
    ///
    /// The reply test comes first so that a reply is never tracked as a flow of its own: if it
    /// were, the peer could later reuse the same ports and pass as a "reply to the reply" after
    /// policy stopped allowing it (a UDP or SCTP client whose source port repeats would).
    pub fn admit(&self, c: &Classified, allowed: bool, now_ms: u64) -> bool {
        let mut inner = self.lock();
        if self.live_reverse(&mut inner, c, now_ms) {
            return true;
        }
        if !allowed {
            return false;
        }
        if let Some(key) = FlowKey::forward(c) {
            self.insert(&mut inner, key, now_ms);
        }
        true
    }

    pub fn len(&self) -> usize {
        self.lock().flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flows that could not be tracked because the table was full of live flows.
    pub fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{PROTO_ICMP, PROTO_UDP, build, classify};

    fn c(p: Vec<u8>) -> Classified {
        classify(&p).unwrap()
    }

    #[test]
    fn replies_match_tracked_flows_only() {
        let t = FlowTable::new(16, FlowTimeouts::default());
        let req = c(build::tcp4([1, 0, 0, 1], 40000, [1, 0, 0, 2], 80));
        let reply = c(build::tcp4([1, 0, 0, 2], 80, [1, 0, 0, 1], 40000));
        let other = c(build::tcp4([1, 0, 0, 2], 81, [1, 0, 0, 1], 40000));
        assert!(!t.is_reply(&reply, 0));
        t.track(&req, 0);
        assert!(t.is_reply(&reply, 1));
        assert!(!t.is_reply(&other, 1));
        assert!(
            !t.is_reply(&req, 1),
            "the forward direction is not a reply to itself"
        );
    }

    #[test]
    fn echo_replies_match_by_identifier() {
        let t = FlowTable::new(16, FlowTimeouts::default());
        let a = [1, 0, 0, 1].into();
        let b = [1, 0, 0, 2].into();
        t.track(
            &c(build::ipv4(
                a,
                b,
                PROTO_ICMP,
                &build::echo(false, false, 5, 1),
            )),
            0,
        );
        assert!(t.is_reply(
            &c(build::ipv4(
                b,
                a,
                PROTO_ICMP,
                &build::echo(false, true, 5, 1)
            )),
            1
        ));
        assert!(!t.is_reply(
            &c(build::ipv4(
                b,
                a,
                PROTO_ICMP,
                &build::echo(false, true, 6, 1)
            )),
            1
        ));
    }

    #[test]
    fn idle_flows_expire() {
        let t = FlowTable::new(
            16,
            FlowTimeouts {
                tcp_ms: 100,
                other_ms: 10,
            },
        );
        let a = [1, 0, 0, 1].into();
        let b = [1, 0, 0, 2].into();
        let req = c(build::ipv4(
            a,
            b,
            PROTO_UDP,
            &build::ports(PROTO_UDP, 5, 53, b""),
        ));
        let reply = c(build::ipv4(
            b,
            a,
            PROTO_UDP,
            &build::ports(PROTO_UDP, 53, 5, b""),
        ));
        t.track(&req, 0);
        assert!(t.is_reply(&reply, 9));
        assert!(t.is_reply(&reply, 18), "refreshed at 9");
        assert!(!t.is_reply(&reply, 40));
        assert_eq!(t.len(), 0, "expired entry removed on sight");
    }

    #[test]
    fn a_full_table_sweeps_then_refuses() {
        let t = FlowTable::new(
            2,
            FlowTimeouts {
                tcp_ms: 100,
                other_ms: 100,
            },
        );
        for port in 1..=2 {
            t.track(&c(build::tcp4([1, 0, 0, 1], port, [1, 0, 0, 2], 80)), 0);
        }
        t.track(&c(build::tcp4([1, 0, 0, 1], 3, [1, 0, 0, 2], 80)), 50);
        assert_eq!(t.overflows(), 1);
        assert_eq!(t.len(), 2);
        // After the first two expire, the sweep makes room.
        t.track(&c(build::tcp4([1, 0, 0, 1], 3, [1, 0, 0, 2], 80)), 150);
        assert_eq!(t.len(), 1);
        assert!(t.is_reply(&c(build::tcp4([1, 0, 0, 2], 80, [1, 0, 0, 1], 3)), 151));
    }

    #[test]
    fn a_reply_is_not_tracked_as_a_flow_of_its_own() {
        let t = FlowTable::new(16, FlowTimeouts::default());
        let (a, b) = ([1, 0, 0, 1].into(), [1, 0, 0, 2].into());
        let udp = |s, sp, d, dp| {
            c(build::ipv4(
                s,
                d,
                PROTO_UDP,
                &build::ports(PROTO_UDP, sp, dp, b""),
            ))
        };
        // b asks a (policy allows it then); a answers.
        assert!(t.admit(&udp(b, 40000, a, 80), true, 0));
        assert!(t.admit(&udp(a, 80, b, 40000), true, 1), "the reply passes");
        // Policy now denies b -> a: the same request from the same port must not pass as a
        // reply to a's answer.
        assert!(!t.admit(&udp(b, 40000, a, 80), false, 2));
        // a's own answers still pass within b's flow while it lives.
        assert!(t.admit(&udp(a, 80, b, 40000), false, 3));
    }

    #[test]
    fn a_packet_that_opens_a_flow_is_never_a_reply() {
        let t = FlowTable::new(16, FlowTimeouts::default());
        // a opened a flow from port 80 to b's port 40000 ...
        t.track(&c(build::tcp4([1, 0, 0, 1], 80, [1, 0, 0, 2], 40000)), 0);
        // ... which does not let b open a connection on the reversed ports.
        let syn = c(build::syn4([1, 0, 0, 2], 40000, [1, 0, 0, 1], 80));
        assert!(!t.is_reply(&syn, 1));
        assert!(!t.admit(&syn, false, 1));
        let ack = c(build::tcp4([1, 0, 0, 2], 40000, [1, 0, 0, 1], 80));
        assert!(t.admit(&ack, false, 2), "a segment within it is a reply");
    }
}
