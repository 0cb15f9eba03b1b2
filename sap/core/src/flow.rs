//! Flow tracking at an endpoint. Kubernetes policies are stateful: when policy lets a pod open a
//! connection, the replies come back whatever the other direction's rules say. Each endpoint keeps
//! the flows that policy allowed (in either direction) so that packets of the reverse direction are
//! admitted as replies.
//!
//! A forward packet is always checked against the current policy (a revoked rule stops new
//! requests at once); only the reverse direction rides on the table. Entries expire when idle.
//! The table is bounded, and a peer cannot fill it (every cost per packet is constant):
//! - a TCP flow gets the long timeout only once the other side answered within it (a handshake);
//!   segments of no connection (ACKs a peer makes up) get a short one, and a RST ends a flow;
//! - one remote peer may open at most a quarter of the table ([`FlowTable::over_quota`]);
//! - a full table evicts the oldest flow never answered, else the oldest idle one, looking at a
//!   bounded number of candidates ([`FlowTable::evictions`]);
//! - only when none is found is a new flow not tracked (its replies are then dropped, failing
//!   closed), counted by [`FlowTable::overflows`].
//!
//! A [`FlowWatcher`] is told of every flow the table starts tracking, before the packet that
//! opened it goes on: how a kernel fast path that judges flows' first packets itself knows which
//! flows the engine holds (`keyway_sap::io::fastpath`).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    /// The flow `a` opened to `b`.
    pub fn new(a: IpAddr, port_a: u16, b: IpAddr, port_b: u16, proto: u8) -> FlowKey {
        FlowKey {
            a,
            b,
            proto,
            port_a,
            port_b,
        }
    }

    /// Who opened the flow, and from which port (an echo's identifier for an echo).
    pub fn opener(&self) -> (IpAddr, u16) {
        (self.a, self.port_a)
    }

    /// To whom the flow was opened, and to which port.
    pub fn peer(&self) -> (IpAddr, u16) {
        (self.b, self.port_b)
    }

    /// The flow's IP protocol number.
    pub fn proto(&self) -> u8 {
        self.proto
    }

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

/// Idle timeouts: long for TCP connections that completed a handshake (idle between
/// keepalives), short for a TCP flow the other side never answered, medium for everything else.
#[derive(Debug, Clone, Copy)]
pub struct FlowTimeouts {
    pub tcp_ms: u64,
    /// A TCP flow not (yet) answered: a SYN waiting, or segments of no connection.
    pub embryonic_ms: u64,
    pub other_ms: u64,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        FlowTimeouts {
            tcp_ms: 7_440_000,
            embryonic_ms: 60_000,
            other_ms: 180_000,
        }
    }
}

/// How long past its timeout [`FlowTable::forget_untracked`] still counts a flow as held.
pub const FORGET_MARGIN_MS: u64 = 10_000;

/// How many queued candidates one insertion into a full table looks at, at most: the work per
/// packet stays constant however full the table is.
const EVICTION_BUDGET: usize = 32;

#[derive(Debug, Clone, Copy)]
struct Entry {
    seen: u64,
    /// The other side answered within the flow.
    answered: bool,
    /// The remote peer that opened the flow, whose quota it counts against.
    opener: Option<IpAddr>,
    /// Which insertion this is, to tell a queued key's current entry from an earlier one.
    generation: u64,
}

/// Told of the flows a [`FlowTable`] tracks (see the module's documentation).
pub trait FlowWatcher: Send + Sync {
    /// The table tracks `key` from now on. Called with the table locked: keep it short, and
    /// never call back into the table.
    fn tracked(&self, key: &FlowKey);
}

#[derive(Default)]
struct Inner {
    flows: FastMap<FlowKey, Entry>,
    /// Every insertion, oldest first: where idle entries are looked for.
    order: VecDeque<(FlowKey, u64)>,
    /// Insertions of flows not yet answered, oldest first: evicted before anything else.
    unanswered: VecDeque<(FlowKey, u64)>,
    /// Live flows per remote opener.
    per_peer: FastMap<IpAddr, u32>,
    generation: u64,
    watcher: Option<std::sync::Arc<dyn FlowWatcher>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("flows", &self.flows.len())
            .field("generation", &self.generation)
            .field("watched", &self.watcher.is_some())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn current(&self, key: &FlowKey, generation: u64) -> Option<&Entry> {
        self.flows.get(key).filter(|e| e.generation == generation)
    }

    fn remove(&mut self, key: &FlowKey) {
        if let Some(e) = self.flows.remove(key)
            && let Some(peer) = e.opener
            && let Some(n) = self.per_peer.get_mut(&peer)
        {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&peer);
            }
        }
    }

    /// Drops queued keys whose entries are gone, once the queues hold twice the table: the
    /// cost is paid by the insertions that made them, so each stays O(1) on average.
    fn compact(&mut self, capacity: usize) {
        let limit = 2 * capacity + 64;
        if self.order.len() > limit {
            let flows = &self.flows;
            self.order
                .retain(|(k, g)| flows.get(k).is_some_and(|e| e.generation == *g));
        }
        if self.unanswered.len() > limit {
            let flows = &self.flows;
            self.unanswered.retain(|(k, g)| {
                flows
                    .get(k)
                    .is_some_and(|e| e.generation == *g && !e.answered)
            });
        }
    }
}

/// What flow tables did under pressure, shared by the tables of a whole agent for its metrics.
#[derive(Debug, Default)]
pub struct FlowCounters {
    /// Flows not tracked: the table was full of answered, live flows.
    pub overflows: AtomicU64,
    /// Flows not tracked: their remote opener had its quota.
    pub over_quota: AtomicU64,
    /// Flows evicted (never answered, or idle) to make room for a new one.
    pub evictions: AtomicU64,
}

/// The flows of one endpoint.
#[derive(Debug)]
pub struct FlowTable {
    inner: Mutex<Inner>,
    capacity: usize,
    /// How many live flows one remote peer may have opened.
    peer_quota: u32,
    timeouts: FlowTimeouts,
    counters: Arc<FlowCounters>,
}

impl FlowTable {
    /// A table of `capacity` flows, of which one remote peer may open a quarter.
    pub fn new(capacity: usize, timeouts: FlowTimeouts) -> Self {
        Self::counted(capacity, timeouts, Arc::default())
    }

    /// The same, counting into `counters`.
    pub fn counted(capacity: usize, timeouts: FlowTimeouts, counters: Arc<FlowCounters>) -> Self {
        FlowTable {
            inner: Mutex::new(Inner::default()),
            capacity,
            peer_quota: (capacity / 4).max(1) as u32,
            timeouts,
            counters,
        }
    }

    fn timeout(&self, key: &FlowKey, e: &Entry) -> u64 {
        match (key.proto == PROTO_TCP, e.answered) {
            (true, true) => self.timeouts.tcp_ms,
            (true, false) => self.timeouts.embryonic_ms,
            (false, _) => self.timeouts.other_ms,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data: still consistent enough to serve.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records (or refreshes) the flow that `c`, allowed by policy and sent by this endpoint,
    /// belongs to.
    pub fn track(&self, c: &Classified, now_ms: u64) {
        if let Some(key) = FlowKey::forward(c) {
            self.forward(&mut self.lock(), key, c, None, now_ms);
        }
    }

    /// The forward direction of a flow: refreshed if tracked (ended by a RST), else tracked.
    fn forward(
        &self,
        inner: &mut Inner,
        key: FlowKey,
        c: &Classified,
        opener: Option<IpAddr>,
        now_ms: u64,
    ) {
        if let Some(e) = inner.flows.get_mut(&key) {
            // An expired entry comes back to life: to a watcher, a flow tracked anew (it may
            // have forgotten it meanwhile).
            let revived = now_ms.saturating_sub(e.seen) >= self.timeout(&key, e);
            e.seen = now_ms;
            if c.resets_flow {
                inner.remove(&key);
            } else if let (true, Some(w)) = (revived, &inner.watcher) {
                w.tracked(&key);
            }
            return;
        }
        if !c.resets_flow {
            self.insert(inner, key, opener, now_ms);
        }
    }

    fn insert(&self, inner: &mut Inner, key: FlowKey, opener: Option<IpAddr>, now_ms: u64) {
        if let Some(peer) = opener
            && inner.per_peer.get(&peer).copied().unwrap_or(0) >= self.peer_quota
        {
            self.counters.over_quota.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if inner.flows.len() >= self.capacity && !self.evict_one(inner, now_ms) {
            self.counters.overflows.fetch_add(1, Ordering::Relaxed);
            return;
        }
        inner.generation += 1;
        let generation = inner.generation;
        inner.flows.insert(
            key,
            Entry {
                seen: now_ms,
                answered: false,
                opener,
                generation,
            },
        );
        if let Some(peer) = opener {
            *inner.per_peer.entry(peer).or_default() += 1;
        }
        if let Some(w) = &inner.watcher {
            w.tracked(&key);
        }
        inner.order.push_back((key, generation));
        inner.unanswered.push_back((key, generation));
        inner.compact(self.capacity);
    }

    /// Makes room in a full table, looking at a bounded number of candidates: the oldest flow
    /// never answered, else the oldest idle one. Whether it made room.
    fn evict_one(&self, inner: &mut Inner, now_ms: u64) -> bool {
        for _ in 0..EVICTION_BUDGET {
            let Some((key, generation)) = inner.unanswered.pop_front() else {
                break;
            };
            if inner.current(&key, generation).is_some_and(|e| !e.answered) {
                inner.remove(&key);
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        for _ in 0..EVICTION_BUDGET {
            let Some((key, generation)) = inner.order.pop_front() else {
                break;
            };
            let Some(e) = inner.current(&key, generation).copied() else {
                continue;
            };
            if now_ms.saturating_sub(e.seen) >= self.timeout(&key, &e) {
                inner.remove(&key);
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            // Live: back of the queue, to be looked at again after the others.
            inner.order.push_back((key, generation));
        }
        false
    }

    /// A live tracked flow that `c` replies within, refreshed (answered from now on, or ended
    /// by a RST); expired entries go on sight.
    fn live_reverse(&self, inner: &mut Inner, c: &Classified, now_ms: u64) -> bool {
        // A packet that opens a flow (a TCP SYN, an echo request) is never a reply.
        if c.opens_flow {
            return false;
        }
        let Some(key) = FlowKey::reverse(c) else {
            return false;
        };
        // One lookup for the common case, a live reply refreshed in place; removal (expired,
        // or ended by a RST) is the rare one.
        let live = match inner.flows.get_mut(&key) {
            None => return false,
            Some(e) => {
                let live = now_ms.saturating_sub(e.seen) < self.timeout(&key, e);
                if live && !c.resets_flow {
                    e.seen = now_ms;
                    e.answered = true;
                    return true;
                }
                live
            }
        };
        inner.remove(&key);
        live
    }

    /// Whether `c` is a reply within a live tracked flow; refreshes the flow if so.
    pub fn is_reply(&self, c: &Classified, now_ms: u64) -> bool {
        self.live_reverse(&mut self.lock(), c, now_ms)
    }

    /// Whether `c` may pass, `allowed` being the current policy's verdict on it: a reply within a
    /// live tracked flow passes; otherwise an allowed packet passes and its flow is tracked.
    /// `inbound`: `c` came from the remote peer (an ingress check), whose quota a flow it opens
    /// counts against.
    ///
    /// The reply test comes first so that a reply is never tracked as a flow of its own: if it
    /// were, the peer could later reuse the same ports and pass as a "reply to the reply" after
    /// policy stopped allowing it (a UDP or SCTP client whose source port repeats would).
    pub fn admit(&self, c: &Classified, allowed: bool, inbound: bool, now_ms: u64) -> bool {
        let mut inner = self.lock();
        if self.live_reverse(&mut inner, c, now_ms) {
            return true;
        }
        if !allowed {
            return false;
        }
        if let Some(key) = FlowKey::forward(c) {
            let opener = inbound.then_some(c.src);
            self.forward(&mut inner, key, c, opener, now_ms);
        }
        true
    }

    /// Whether [`admit`](Self::admit) would let `c` pass now, changing nothing: a reply within a
    /// live tracked flow, or an allowed packet.
    pub fn would_admit(&self, c: &Classified, allowed: bool, now_ms: u64) -> bool {
        if allowed {
            return true;
        }
        if c.opens_flow {
            return false;
        }
        let Some(key) = FlowKey::reverse(c) else {
            return false;
        };
        self.lock()
            .flows
            .get(&key)
            .is_some_and(|e| now_ms.saturating_sub(e.seen) < self.timeout(&key, e))
    }

    pub fn len(&self) -> usize {
        self.lock().flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flows that could not be tracked because the table was full of answered, live flows.
    pub fn overflows(&self) -> u64 {
        self.counters.overflows.load(Ordering::Relaxed)
    }

    /// Flows that could not be tracked because their remote opener had its quota.
    pub fn over_quota(&self) -> u64 {
        self.counters.over_quota.load(Ordering::Relaxed)
    }

    /// Flows evicted (never answered, or idle) to make room for a new one.
    pub fn evictions(&self) -> u64 {
        self.counters.evictions.load(Ordering::Relaxed)
    }

    /// Tells `watcher` of every flow the table tracks from now on, and, first, of every flow it
    /// holds now (live or not: a watcher may know more than the table holds, never less).
    /// Replaces an earlier watcher; called again with the same one, tells it everything again.
    pub fn watch(&self, watcher: std::sync::Arc<dyn FlowWatcher>) {
        let mut inner = self.lock();
        for key in inner.flows.keys() {
            watcher.tracked(key);
        }
        inner.watcher = Some(watcher);
    }

    /// Calls `forget` for each of `keys` the table holds no live flow of, with the table
    /// locked, so that no flow of them is tracked between the test and the call. A flow counts
    /// as held for [`FORGET_MARGIN_MS`] past its timeout: a packet judged with a clock read a
    /// little earlier may yet revive it, which a watcher is told of only when the flow had
    /// expired by that packet's clock.
    pub fn forget_untracked(
        &self,
        keys: impl IntoIterator<Item = FlowKey>,
        now_ms: u64,
        mut forget: impl FnMut(&FlowKey),
    ) {
        let inner = self.lock();
        for key in keys {
            let live = inner.flows.get(&key).is_some_and(|e| {
                now_ms.saturating_sub(e.seen) < self.timeout(&key, e) + FORGET_MARGIN_MS
            });
            if !live {
                forget(&key);
            }
        }
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
    fn judging_a_packet_changes_nothing() {
        let t = FlowTable::new(16, FlowTimeouts::default());
        let out = c(build::tcp4([1, 0, 0, 1], 1000, [1, 0, 0, 2], 80));
        let back = c(build::tcp4([1, 0, 0, 2], 80, [1, 0, 0, 1], 1000));
        assert!(!t.would_admit(&back, false, 1), "no flow yet");
        assert!(t.would_admit(&out, true, 1), "allowed");
        assert!(t.is_empty(), "and still nothing tracked");
        assert!(t.admit(&out, true, false, 1));
        assert!(t.would_admit(&back, false, 2), "a reply within the flow");
        let timeout = FlowTimeouts::default().embryonic_ms;
        assert!(
            !t.would_admit(&back, false, 1 + timeout),
            "judging did not refresh the flow (nor answer it): it expires on time"
        );
    }

    #[test]
    fn idle_flows_expire() {
        let t = FlowTable::new(
            16,
            FlowTimeouts {
                tcp_ms: 100,
                embryonic_ms: 100,
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

    const SHORT: FlowTimeouts = FlowTimeouts {
        tcp_ms: 1000,
        embryonic_ms: 100,
        other_ms: 100,
    };

    /// Opens and answers a TCP flow from `a`'s port to `b`'s 80.
    fn handshake(t: &FlowTable, port: u16, now: u64) {
        assert!(t.admit(
            &c(build::syn4([1, 0, 0, 1], port, [1, 0, 0, 2], 80)),
            true,
            false,
            now
        ));
        assert!(t.admit(
            &c(build::tcp4([1, 0, 0, 2], 80, [1, 0, 0, 1], port)),
            false,
            true,
            now
        ));
    }

    #[test]
    fn a_full_table_evicts_the_unanswered_then_the_idle_then_refuses() {
        let t = FlowTable::new(2, SHORT);
        handshake(&t, 1, 0);
        t.track(&c(build::tcp4([1, 0, 0, 1], 2, [1, 0, 0, 2], 80)), 0);
        // Full: the flow never answered makes room, the answered one stays.
        t.track(&c(build::tcp4([1, 0, 0, 1], 3, [1, 0, 0, 2], 80)), 10);
        assert_eq!((t.len(), t.evictions(), t.overflows()), (2, 1, 0));
        assert!(t.is_reply(&c(build::tcp4([1, 0, 0, 2], 80, [1, 0, 0, 1], 1)), 11));
        assert!(!t.is_reply(&c(build::tcp4([1, 0, 0, 2], 80, [1, 0, 0, 1], 2)), 11));
        // Both answered and live: nothing to evict, refused.
        assert!(t.is_reply(&c(build::tcp4([1, 0, 0, 2], 80, [1, 0, 0, 1], 3)), 12));
        t.track(&c(build::tcp4([1, 0, 0, 1], 4, [1, 0, 0, 2], 80)), 13);
        assert_eq!((t.len(), t.overflows()), (2, 1));
        // Once they are idle past their timeout, the oldest makes room.
        t.track(&c(build::tcp4([1, 0, 0, 1], 4, [1, 0, 0, 2], 80)), 2000);
        assert_eq!((t.len(), t.evictions(), t.overflows()), (2, 2, 1));
    }

    #[test]
    fn an_unanswered_tcp_flow_gets_the_short_timeout_an_answered_one_the_long() {
        let t = FlowTable::new(16, SHORT);
        handshake(&t, 1, 0);
        // A segment of no connection from a peer: tracked, but only briefly.
        let made_up = c(build::tcp4([1, 0, 0, 3], 5000, [1, 0, 0, 1], 80));
        assert!(t.admit(&made_up, true, true, 0));
        let answer = |p| c(build::tcp4([1, 0, 0, 1], 80, [1, 0, 0, 3], p));
        assert!(
            !t.is_reply(&answer(5000), 150),
            "unanswered: gone after 100 ms"
        );
        assert!(t.is_reply(&c(build::tcp4([1, 0, 0, 2], 80, [1, 0, 0, 1], 1)), 500));
    }

    #[test]
    fn a_reset_ends_the_flow_and_is_never_tracked() {
        let t = FlowTable::new(16, SHORT);
        // A peer's made-up ACK, answered by the pod's RST: nothing is left.
        assert!(t.admit(
            &c(build::tcp4([1, 0, 0, 3], 5000, [1, 0, 0, 1], 80)),
            true,
            true,
            0
        ));
        let rst = c(build::rst4([1, 0, 0, 1], 80, [1, 0, 0, 3], 5000));
        assert!(t.admit(&rst, false, false, 1), "the RST passes as a reply");
        assert!(t.is_empty(), "and ends the flow");
        assert!(t.admit(&rst, true, false, 2));
        assert!(t.is_empty(), "a RST opens nothing");
    }

    #[test]
    fn one_peer_cannot_take_more_than_its_quota() {
        let t = FlowTable::new(8, SHORT);
        for port in 0..8 {
            t.admit(
                &c(build::tcp4([1, 0, 0, 3], port, [1, 0, 0, 1], 80)),
                true,
                true,
                0,
            );
        }
        assert_eq!((t.len(), t.over_quota()), (2, 6), "a quarter of 8");
        // The pod's own flows and another peer's are not held back.
        for port in 0..4 {
            t.track(&c(build::tcp4([1, 0, 0, 1], port, [1, 0, 0, 3], 443)), 1);
        }
        t.admit(
            &c(build::tcp4([1, 0, 0, 4], 1, [1, 0, 0, 1], 80)),
            true,
            true,
            1,
        );
        assert_eq!(t.len(), 7);
    }

    #[test]
    fn the_queues_stay_bounded_when_flows_come_and_go() {
        let t = FlowTable::new(4, SHORT);
        for i in 0..10_000u64 {
            let port = (i % 60_000) as u16;
            t.track(
                &c(build::tcp4([1, 0, 0, 1], port, [1, 0, 0, 2], 80)),
                i * 1000,
            );
            t.is_reply(
                &c(build::rst4([1, 0, 0, 2], 80, [1, 0, 0, 1], port)),
                i * 1000,
            );
        }
        let inner = t.lock();
        assert!(inner.order.len() <= 2 * 4 + 64 + 1 && inner.unanswered.len() <= 2 * 4 + 64 + 1);
    }

    #[derive(Default)]
    struct Seen(Mutex<Vec<FlowKey>>);

    impl FlowWatcher for Seen {
        fn tracked(&self, key: &FlowKey) {
            self.0.lock().unwrap().push(*key);
        }
    }

    #[test]
    fn a_watcher_learns_every_flow_held_and_tracked_and_none_answered() {
        let t = FlowTable::new(16, SHORT);
        let (a, b) = ([1, 0, 0, 1], [1, 0, 0, 2]);
        t.track(&c(build::tcp4(a, 1000, b, 80)), 0);
        let seen = Arc::new(Seen::default());
        t.watch(seen.clone());
        let held = FlowKey::new(a.into(), 1000, b.into(), 80, PROTO_TCP);
        assert_eq!(*seen.0.lock().unwrap(), vec![held], "what it held");
        // b opens one (allowed), a answers it: one flow, b's.
        let udp = |s, sp, d, dp| {
            c(build::ipv4(
                s,
                d,
                PROTO_UDP,
                &build::ports(PROTO_UDP, sp, dp, b""),
            ))
        };
        assert!(t.admit(&udp(b.into(), 53, a.into(), 4000), true, true, 1));
        assert!(t.admit(&udp(a.into(), 4000, b.into(), 53), false, false, 2));
        let opened = FlowKey::new(b.into(), 53, a.into(), 4000, PROTO_UDP);
        assert_eq!(*seen.0.lock().unwrap(), vec![held, opened]);
        // Watching again tells it all again.
        t.watch(seen.clone());
        assert_eq!(seen.0.lock().unwrap().len(), 4);
    }

    #[test]
    fn only_keys_of_no_live_flow_are_forgotten() {
        let t = FlowTable::new(16, SHORT);
        let (a, b) = ([1, 0, 0, 1], [1, 0, 0, 2]);
        t.track(&c(build::tcp4(a, 1000, b, 80)), 0);
        t.track(&c(build::tcp4(a, 1001, b, 80)), 950);
        let key = |port| FlowKey::new(a.into(), port, b.into(), 80, PROTO_TCP);
        let mut forgotten = Vec::new();
        // At 1000 + the margin, the first (embryonic: 100 ms) has expired for longer than the
        // margin, the second not yet; the third was never.
        t.forget_untracked(
            [key(1000), key(1001), key(1002)],
            1000 + FORGET_MARGIN_MS,
            |k| forgotten.push(*k),
        );
        assert_eq!(forgotten, vec![key(1000), key(1002)]);
    }

    #[test]
    fn a_watcher_is_told_of_an_expired_flow_that_comes_back() {
        let t = FlowTable::new(16, SHORT);
        let seen = Arc::new(Seen::default());
        t.watch(seen.clone());
        let udp = |now| {
            t.track(
                &c(build::ipv4(
                    [1, 0, 0, 1].into(),
                    [1, 0, 0, 2].into(),
                    PROTO_UDP,
                    &build::ports(PROTO_UDP, 53, 53, b""),
                )),
                now,
            )
        };
        udp(0);
        udp(50);
        assert_eq!(
            seen.0.lock().unwrap().len(),
            1,
            "tracked once while it lives"
        );
        udp(500);
        assert_eq!(
            seen.0.lock().unwrap().len(),
            2,
            "and again once it had expired"
        );
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
        assert!(t.admit(&udp(b, 40000, a, 80), true, true, 0));
        assert!(
            t.admit(&udp(a, 80, b, 40000), true, false, 1),
            "the reply passes"
        );
        // Policy now denies b -> a: the same request from the same port must not pass as a
        // reply to a's answer.
        assert!(!t.admit(&udp(b, 40000, a, 80), false, true, 2));
        // a's own answers still pass within b's flow while it lives.
        assert!(t.admit(&udp(a, 80, b, 40000), false, false, 3));
    }

    #[test]
    fn a_packet_that_opens_a_flow_is_never_a_reply() {
        let t = FlowTable::new(16, FlowTimeouts::default());
        // a opened a flow from port 80 to b's port 40000 ...
        t.track(&c(build::tcp4([1, 0, 0, 1], 80, [1, 0, 0, 2], 40000)), 0);
        // ... which does not let b open a connection on the reversed ports.
        let syn = c(build::syn4([1, 0, 0, 2], 40000, [1, 0, 0, 1], 80));
        assert!(!t.is_reply(&syn, 1));
        assert!(!t.admit(&syn, false, true, 1));
        let ack = c(build::tcp4([1, 0, 0, 2], 40000, [1, 0, 0, 1], 80));
        assert!(
            t.admit(&ack, false, true, 2),
            "a segment within it is a reply"
        );
    }
}
