//! Policy tables: identities (sets of overlay endpoints that policy cannot tell apart) and, per
//! ordered pair of identities, the set of protocols and ports allowed. A packet's check is at most
//! two hash lookups and one constant-time port test, whatever the number of rules or pods: the
//! policy compiler does the work once, the packet path never iterates rules — except for rules
//! whose peers are many identities ([`PeerGroup`]): those are kept once per rule and selected
//! identity, not once per identity pair, so that compiled state grows with rules × selected
//! identities and never with identities²; a packet then costs one bit test per such rule of its
//! two identities.
//!
//! Semantics are Kubernetes NetworkPolicy's, per direction: a packet from `s` to `d` is allowed iff
//! (`s` is not egress-isolated, or `s`'s egress allow set for `d` admits it) and (`d` is not
//! ingress-isolated, or `d`'s ingress allow set for `s` admits it). Unknown identities are denied.
//!
//! Istio ambient: between two identities enrolled in the mesh, ztunnel carries every TCP
//! connection as HBONE to the destination's port [`HBONE_PORT`], whatever the application's port.
//! So HBONE between them is allowed when the pair allows some TCP port; the application's real
//! port is checked where ztunnel hands the connection to the application, in the destination
//! pod's table, from [`Acl::tcp_ports`].

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use crate::packet::{Classified, PROTO_SCTP, PROTO_TCP, PROTO_UDP, Transport};

/// An identity: the compiler's number for a set of endpoints with the same policy-relevant facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(pub u32);

/// A multiplicative hasher for the fixed-width keys of the packet path (identity pairs, masked
/// addresses). The keys come from the control plane, never from packets, so hash flooding is not a
/// concern and SipHash's cost is not worth paying per packet.
#[derive(Default, Clone, Copy, Debug)]
pub struct FastHasher(u64);

const FAST_HASH_K: u64 = 0x517c_c1b7_2722_0a95;

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(FAST_HASH_K);
    }
    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
    fn finish(&self) -> u64 {
        // Fold the high bits down: hashbrown takes its bucket index from the low bits.
        self.0 ^ (self.0 >> 32)
    }
}

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
pub type FastSet<K> = HashSet<K, BuildHasherDefault<FastHasher>>;

/// ztunnel's HBONE port: mTLS-tunnelled TCP between meshed workloads.
pub const HBONE_PORT: u16 = 15008;

/// Every port.
const ALL_PORTS: PortRange = PortRange {
    start: 0,
    end: u16::MAX,
};

fn pair(src: Identity, dst: Identity) -> u64 {
    (u64::from(src.0) << 32) | u64::from(dst.0)
}

/// An inclusive range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        PortRange {
            start: port,
            end: port,
        }
    }
    pub fn new(start: u16, end: u16) -> Self {
        PortRange {
            start: start.min(end),
            end: start.max(end),
        }
    }
}

/// Up to this many disjoint ranges are stored inline, with no pointer to chase.
const INLINE_RANGES: usize = 3;
/// Above this many disjoint ranges a port set becomes a 64 Ki-bit bitmap (8 KiB), so the check
/// stays constant-time however many ports rules name.
const MAX_RANGES_BEFORE_BITMAP: usize = 8;

/// The ports allowed for one protocol.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub enum PortSet {
    #[default]
    Nothing,
    Every,
    /// Sorted, disjoint, non-adjacent ranges, at most [`INLINE_RANGES`], stored inline; unused
    /// slots repeat the last range.
    Few([PortRange; INLINE_RANGES]),
    /// Sorted, disjoint, non-adjacent ranges; at most [`MAX_RANGES_BEFORE_BITMAP`].
    Ranges(Box<[PortRange]>),
    Bitmap(Box<[u64; 1024]>),
}

impl std::fmt::Debug for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortSet::Nothing => write!(f, "Nothing"),
            PortSet::Every => write!(f, "Every"),
            PortSet::Few(r) => {
                let mut list = r.to_vec();
                list.dedup();
                f.debug_list().entries(list.iter()).finish()
            }
            PortSet::Ranges(r) => f.debug_list().entries(r.iter()).finish(),
            PortSet::Bitmap(b) => write!(
                f,
                "Bitmap({} ports)",
                b.iter().map(|w| w.count_ones()).sum::<u32>()
            ),
        }
    }
}

impl PortSet {
    /// Builds the set from ranges in any order, overlapping or not.
    pub fn from_ranges(ranges: Vec<PortRange>) -> Self {
        let merged = normalise(ranges);
        if merged.is_empty() {
            return PortSet::Nothing;
        }
        if merged == [ALL_PORTS] {
            return PortSet::Every;
        }
        if merged.len() <= INLINE_RANGES {
            let last = *merged.last().expect("not empty");
            let mut few = [last; INLINE_RANGES];
            few[..merged.len()].copy_from_slice(&merged);
            return PortSet::Few(few);
        }
        if merged.len() <= MAX_RANGES_BEFORE_BITMAP {
            return PortSet::Ranges(merged.into_boxed_slice());
        }
        let mut bits = Box::new([0u64; 1024]);
        for r in merged {
            for p in r.start..=r.end {
                bits[usize::from(p) / 64] |= 1 << (p % 64);
            }
        }
        PortSet::Bitmap(bits)
    }

    pub fn contains(&self, port: u16) -> bool {
        match self {
            PortSet::Nothing => false,
            PortSet::Every => true,
            PortSet::Few(r) => r.iter().any(|r| r.start <= port && port <= r.end),
            PortSet::Ranges(r) => r.iter().any(|r| r.start <= port && port <= r.end),
            PortSet::Bitmap(b) => b[usize::from(port) / 64] & (1 << (port % 64)) != 0,
        }
    }

    pub fn is_every(&self) -> bool {
        matches!(self, PortSet::Every)
    }

    /// The set as sorted, disjoint, non-adjacent ranges.
    pub fn ranges(&self) -> Vec<PortRange> {
        match self {
            PortSet::Nothing => Vec::new(),
            PortSet::Every => vec![ALL_PORTS],
            PortSet::Few(r) => {
                let mut v = r.to_vec();
                v.dedup();
                v
            }
            PortSet::Ranges(r) => r.to_vec(),
            PortSet::Bitmap(_) => {
                let ports = (0..=u16::MAX).filter(|p| self.contains(*p));
                normalise(ports.map(PortRange::single).collect())
            }
        }
    }
}

/// Sorted, disjoint, non-adjacent ranges covering the same ports as `ranges`.
fn normalise(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort_unstable();
    let mut merged: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(r.start) <= u32::from(last.end) + 1 => {
                last.end = last.end.max(r.end);
            }
            _ => merged.push(r),
        }
    }
    merged
}

/// The ports in both of two normalised range lists.
fn intersect(a: &[PortRange], b: &[PortRange]) -> Vec<PortRange> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let start = a[i].start.max(b[j].start);
        let end = a[i].end.min(b[j].end);
        if start <= end {
            out.push(PortRange { start, end });
        }
        if a[i].end < b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// What one direction's rules allow between one ordered pair of identities.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct AllowSet {
    /// Every protocol, every port (a rule with no `ports`).
    pub everything: bool,
    pub tcp: PortSet,
    pub udp: PortSet,
    pub sctp: PortSet,
}

impl AllowSet {
    pub fn everything() -> Self {
        AllowSet {
            everything: true,
            ..Default::default()
        }
    }

    /// Whether a packet of protocol `proto` with `transport` is admitted.
    pub fn admits(&self, proto: u8, transport: &Transport) -> bool {
        if self.everything {
            return true;
        }
        let ports = match proto {
            PROTO_TCP => &self.tcp,
            PROTO_UDP => &self.udp,
            PROTO_SCTP => &self.sctp,
            _ => return false,
        };
        match transport {
            Transport::Ports { dst, .. } => ports.contains(*dst),
            // No port to check: only "every port of this protocol" can admit it.
            _ => ports.is_every(),
        }
    }

    /// Whether some TCP connection is admitted (what HBONE between meshed identities needs).
    pub fn admits_some_tcp(&self) -> bool {
        self.everything || self.tcp != PortSet::Nothing
    }

    /// The TCP ports admitted, normalised.
    pub fn tcp_ranges(&self) -> Vec<PortRange> {
        if self.everything {
            return vec![ALL_PORTS];
        }
        self.tcp.ranges()
    }
}

/// Accumulates the rules for one pair before they are normalised into an [`AllowSet`].
#[derive(Debug, Clone, Default)]
pub struct AllowSetBuilder {
    everything: bool,
    tcp: Vec<PortRange>,
    udp: Vec<PortRange>,
    sctp: Vec<PortRange>,
}

impl AllowSetBuilder {
    pub fn allow_everything(&mut self) -> &mut Self {
        self.everything = true;
        self
    }

    /// Allows `proto` (TCP, UDP or SCTP) on `ports` (every port when `None`). Other protocols
    /// cannot be named by a port rule and are ignored.
    pub fn allow(&mut self, proto: u8, ports: Option<PortRange>) -> &mut Self {
        let range = ports.unwrap_or(PortRange::new(0, u16::MAX));
        match proto {
            PROTO_TCP => self.tcp.push(range),
            PROTO_UDP => self.udp.push(range),
            PROTO_SCTP => self.sctp.push(range),
            _ => {}
        }
        self
    }

    pub fn build(self) -> AllowSet {
        if self.everything {
            return AllowSet::everything();
        }
        AllowSet {
            everything: false,
            tcp: PortSet::from_ranges(self.tcp),
            udp: PortSet::from_ranges(self.udp),
            sctp: PortSet::from_ranges(self.sctp),
        }
    }
}

/// Whether an identity is isolated in each direction (selected by a policy of that type, or by
/// strict mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Isolation {
    pub ingress: bool,
    pub egress: bool,
}

/// No allow set for this direction.
const NONE: u32 = u32::MAX;

/// Everything policy says about one ordered pair, found with one probe.
#[derive(Debug, Clone, Copy)]
struct PairEntry {
    /// The source's egress allow set for the destination, or [`NONE`].
    egress: u32,
    /// The destination's ingress allow set for the source, or [`NONE`].
    ingress: u32,
    direct: bool,
}

/// What one identity allows whoever the peer (a rule without peers): its egress to any
/// destination, its ingress from any source. Kept per identity rather than per pair, so that
/// such rules cost one entry per selected identity, not one per identity pair.
#[derive(Debug, Clone, Copy)]
struct AnyPeer {
    egress: u32,
    ingress: u32,
}

/// A set of identities a rule names as its peers, interned by membership: one bitmap shared by
/// every rule and identity that names the same peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerGroup(u32);

/// One rule of one identity whose peers are a [`PeerGroup`].
#[derive(Debug, Clone, Copy)]
struct GroupRule {
    group: u32,
    set: u32,
}

/// Identity numbers as a bitmap.
#[derive(Debug, Clone)]
struct Members(Box<[u64]>);

impl Members {
    fn contains(&self, id: Identity) -> bool {
        let i = id.0 as usize;
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// The compiled policy of a cluster, immutable once built; replaced whole on change.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    isolation: Vec<Isolation>,
    pairs: FastMap<u64, PairEntry>,
    /// By identity.
    any: Vec<AnyPeer>,
    /// By identity: its egress rules towards peer groups, and its ingress rules from them.
    egress_groups: Vec<Box<[GroupRule]>>,
    ingress_groups: Vec<Box<[GroupRule]>>,
    groups: Vec<Members>,
    sets: Vec<AllowSet>,
    /// By identity: enrolled in the mesh (Istio ambient), so its TCP travels as HBONE.
    mesh: Vec<bool>,
}

/// A direction of policy: the source's egress rules, or the destination's ingress rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Egress,
    Ingress,
}

impl Acl {
    pub fn builder() -> AclBuilder {
        AclBuilder::default()
    }

    pub fn identity_count(&self) -> usize {
        self.isolation.len()
    }

    pub fn isolation(&self, id: Identity) -> Option<Isolation> {
        self.isolation.get(id.0 as usize).copied()
    }

    /// The allow sets that may admit traffic from `src` to `dst` in `dir`: the rule set of the
    /// identity whose rules they are for any peer, for the pair, and for each group that holds
    /// the peer.
    fn candidates<'a>(
        &'a self,
        dir: Direction,
        src: Identity,
        dst: Identity,
        entry: Option<&'a PairEntry>,
    ) -> impl Iterator<Item = &'a AllowSet> + 'a {
        let (own, peer) = match dir {
            Direction::Egress => (src, dst),
            Direction::Ingress => (dst, src),
        };
        let any = self.any.get(own.0 as usize).map(|a| match dir {
            Direction::Egress => a.egress,
            Direction::Ingress => a.ingress,
        });
        let paired = entry.map(|e| match dir {
            Direction::Egress => e.egress,
            Direction::Ingress => e.ingress,
        });
        let groups = match dir {
            Direction::Egress => &self.egress_groups,
            Direction::Ingress => &self.ingress_groups,
        };
        let grouped = groups
            .get(own.0 as usize)
            .into_iter()
            .flat_map(|rules| rules.iter())
            .filter(move |r| self.groups[r.group as usize].contains(peer))
            .map(|r| r.set);
        any.into_iter()
            .chain(paired)
            .chain(grouped)
            .filter(|&set| set != NONE)
            .map(|set| &self.sets[set as usize])
    }

    /// Whether both directions' rules (where isolated) admit what `admits` says of a set. The
    /// packet path: the same sets as [`Acl::candidates`], written out so that it stays a few
    /// nanoseconds (the iterator chain costs half as much again).
    #[inline]
    fn decide(&self, src: Identity, dst: Identity, admits: impl Fn(&AllowSet) -> bool) -> bool {
        let (Some(s), Some(d)) = (self.isolation(src), self.isolation(dst)) else {
            return false;
        };
        if !s.egress && !d.ingress {
            return true;
        }
        let e = self.pairs.get(&pair(src, dst));
        let ok = |set: u32| set != NONE && admits(&self.sets[set as usize]);
        let by_group = |rules: Option<&Box<[GroupRule]>>, peer: Identity| {
            rules
                .into_iter()
                .flat_map(|r| r.iter())
                .any(|r| self.groups[r.group as usize].contains(peer) && ok(r.set))
        };
        let any = |id: Identity| self.any.get(id.0 as usize);
        let egress = || {
            any(src).is_some_and(|a| ok(a.egress))
                || e.is_some_and(|e| ok(e.egress))
                || by_group(self.egress_groups.get(src.0 as usize), dst)
        };
        let ingress = || {
            any(dst).is_some_and(|a| ok(a.ingress))
                || e.is_some_and(|e| ok(e.ingress))
                || by_group(self.ingress_groups.get(dst.0 as usize), src)
        };
        (!s.egress || egress()) && (!d.ingress || ingress())
    }

    /// Whether the identity is enrolled in the mesh.
    pub fn is_mesh(&self, id: Identity) -> bool {
        self.mesh.get(id.0 as usize).copied().unwrap_or(false)
    }

    /// Whether `c` is HBONE between two meshed identities.
    fn is_hbone(&self, src: Identity, dst: Identity, c: &Classified) -> bool {
        c.proto == PROTO_TCP
            && matches!(
                c.transport,
                Transport::Ports {
                    dst: HBONE_PORT,
                    ..
                }
            )
            && self.is_mesh(src)
            && self.is_mesh(dst)
    }

    /// Whether policy allows `c` from `src` to `dst`. HBONE between meshed identities is allowed
    /// when some TCP port is: the real port is checked at the destination's last hop.
    #[inline]
    pub fn allows(&self, src: Identity, dst: Identity, c: &Classified) -> bool {
        if self.is_hbone(src, dst, c) {
            return self.decide(src, dst, AllowSet::admits_some_tcp);
        }
        self.decide(src, dst, |set| set.admits(c.proto, &c.transport))
    }

    /// The TCP ports policy allows from `src` to `dst`, as sorted disjoint ranges: what the
    /// destination's table checks where ztunnel hands a meshed connection to the application.
    pub fn tcp_ports(&self, src: Identity, dst: Identity) -> Vec<PortRange> {
        self.pair_policy(src, dst).map_or_else(Vec::new, |p| p.tcp)
    }

    /// Everything policy allows from `src` to `dst`, flattened into what a check that keeps no
    /// rules needs (the kernel SaP's per-pair map): [`PairPolicy::admits`] says what
    /// [`Acl::allows`] says of every packet with its transport header. `None` when either
    /// identity is unknown (nothing is allowed).
    pub fn pair_policy(&self, src: Identity, dst: Identity) -> Option<PairPolicy> {
        let (s, d) = (self.isolation(src)?, self.isolation(dst)?);
        let entry = self.pairs.get(&pair(src, dst));
        // One direction's rules, where that side is isolated: the union of what its candidate
        // sets admit (a packet is admitted by a side when one of its sets admits it).
        let side = |isolated: bool, dir: Direction| {
            let mut out = Side::default();
            if !isolated {
                out.everything = true;
                out.some_tcp = true;
                for ports in &mut out.ports {
                    *ports = vec![ALL_PORTS];
                }
                return out;
            }
            let mut ranges: [Vec<PortRange>; 3] = Default::default();
            for set in self.candidates(dir, src, dst, entry) {
                out.everything |= set.everything;
                out.some_tcp |= set.admits_some_tcp();
                for (all, ports) in ranges.iter_mut().zip([&set.tcp, &set.udp, &set.sctp]) {
                    all.extend(if set.everything {
                        vec![ALL_PORTS]
                    } else {
                        ports.ranges()
                    });
                }
            }
            for (out, all) in out.ports.iter_mut().zip(ranges) {
                *out = normalise(all);
            }
            out
        };
        let (e, i) = (
            side(s.egress, Direction::Egress),
            side(d.ingress, Direction::Ingress),
        );
        let [tcp, udp, sctp] = std::array::from_fn(|p| intersect(&e.ports[p], &i.ports[p]));
        let mesh = self.is_mesh(src) && self.is_mesh(dst);
        Some(PairPolicy {
            everything: e.everything && i.everything,
            tcp,
            udp,
            sctp,
            mesh,
            hbone: mesh && e.some_tcp && i.some_tcp,
        })
    }

    /// Whether `c` from `src` to `dst` could be a reply within a flow that policy allows from
    /// `dst` to `src` (the stateless, reflexive check a SaP makes: it keeps no flow state). A
    /// packet that opens a flow (TCP SYN, echo request) is never a reply. For UDP and other
    /// connectionless traffic a stateless check cannot tell more; endpoints track flows.
    pub fn allows_as_reply(&self, src: Identity, dst: Identity, c: &Classified) -> bool {
        if c.opens_flow {
            return false;
        }
        let reversed = Classified {
            src: c.dst,
            dst: c.src,
            proto: c.proto,
            transport: match c.transport {
                Transport::Ports { src, dst } => Transport::Ports { src: dst, dst: src },
                Transport::Echo { id, reply } => Transport::Echo { id, reply: !reply },
                other => other,
            },
            opens_flow: false,
            resets_flow: c.resets_flow,
        };
        self.allows(dst, src, &reversed)
    }

    /// Whether the pair bypasses SaPs (a direct pair, relying on keys alone).
    pub fn is_direct(&self, src: Identity, dst: Identity) -> bool {
        self.pairs.get(&pair(src, dst)).is_some_and(|e| e.direct)
    }

    /// Number of distinct allow sets after interning (how much policy compiled down to).
    pub fn allow_set_count(&self) -> usize {
        self.sets.len()
    }

    /// Number of identity pairs policy names (what grows when rules name a few peers).
    pub fn pair_count(&self) -> usize {
        self.pairs.len()
    }

    /// Number of rules kept per identity with a peer group, and of distinct peer groups.
    pub fn group_rule_count(&self) -> (usize, usize) {
        let rules = self.egress_groups.iter().chain(&self.ingress_groups);
        (rules.map(|r| r.len()).sum(), self.groups.len())
    }
}

/// What one side (the source's egress or the destination's ingress rules) admits between a pair.
#[derive(Debug, Default)]
struct Side {
    everything: bool,
    some_tcp: bool,
    /// TCP, UDP, SCTP.
    ports: [Vec<PortRange>; 3],
}

/// What policy allows from one identity to another, flattened: see [`Acl::pair_policy`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PairPolicy {
    /// Every protocol and port (what an ICMP echo, or a protocol without ports, needs).
    pub everything: bool,
    /// The destination ports allowed, sorted, disjoint and non-adjacent.
    pub tcp: Vec<PortRange>,
    pub udp: Vec<PortRange>,
    pub sctp: Vec<PortRange>,
    /// Both identities are enrolled in the mesh: TCP to [`HBONE_PORT`] is judged by `hbone`.
    pub mesh: bool,
    /// Whether HBONE between them is allowed (both sides allow some TCP port).
    pub hbone: bool,
}

impl PairPolicy {
    /// Whether policy admits `c`, as [`Acl::allows`] does, for a packet with its transport
    /// header (not a later fragment, nor a first one cut before its ports).
    pub fn admits(&self, c: &Classified) -> bool {
        let Transport::Ports { dst, .. } = c.transport else {
            return self.everything;
        };
        let ranges = match c.proto {
            PROTO_TCP if self.mesh && dst == HBONE_PORT => return self.hbone,
            PROTO_TCP => &self.tcp,
            PROTO_UDP => &self.udp,
            PROTO_SCTP => &self.sctp,
            _ => return self.everything,
        };
        self.everything || ranges.iter().any(|r| r.start <= dst && dst <= r.end)
    }
}

/// Builds an [`Acl`]; identical allow sets are stored once.
#[derive(Debug, Default)]
pub struct AclBuilder {
    isolation: Vec<Isolation>,
    ingress: FastMap<u64, AllowSetBuilder>,
    egress: FastMap<u64, AllowSetBuilder>,
    ingress_any: FastMap<u32, AllowSetBuilder>,
    egress_any: FastMap<u32, AllowSetBuilder>,
    /// Keyed by identity and group.
    ingress_group: FastMap<u64, AllowSetBuilder>,
    egress_group: FastMap<u64, AllowSetBuilder>,
    groups: Vec<Vec<u32>>,
    interned_groups: HashMap<Vec<u32>, u32>,
    direct: FastSet<u64>,
    mesh: FastSet<u32>,
}

impl AclBuilder {
    pub fn identity(&mut self, isolation: Isolation) -> Identity {
        self.isolation.push(isolation);
        Identity((self.isolation.len() - 1) as u32)
    }

    pub fn set_isolation(&mut self, id: Identity, isolation: Isolation) {
        self.isolation[id.0 as usize] = isolation;
    }

    /// The ingress rules of `dst` admitting traffic from `src`.
    pub fn ingress(&mut self, src: Identity, dst: Identity) -> &mut AllowSetBuilder {
        self.ingress.entry(pair(src, dst)).or_default()
    }

    /// The egress rules of `src` admitting traffic to `dst`.
    pub fn egress(&mut self, src: Identity, dst: Identity) -> &mut AllowSetBuilder {
        self.egress.entry(pair(src, dst)).or_default()
    }

    /// The ingress rules of `dst` admitting traffic from any source (a rule without `from`).
    pub fn ingress_from_any(&mut self, dst: Identity) -> &mut AllowSetBuilder {
        self.ingress_any.entry(dst.0).or_default()
    }

    /// The egress rules of `src` admitting traffic to any destination (a rule without `to`).
    pub fn egress_to_any(&mut self, src: Identity) -> &mut AllowSetBuilder {
        self.egress_any.entry(src.0).or_default()
    }

    /// The group of `members` (in any order, repeats allowed), the same group for the same set.
    pub fn peer_group(&mut self, members: &[Identity]) -> PeerGroup {
        let mut key: Vec<u32> = members.iter().map(|i| i.0).collect();
        key.sort_unstable();
        key.dedup();
        let next = self.groups.len() as u32;
        let id = *self.interned_groups.entry(key.clone()).or_insert(next);
        if id == next {
            self.groups.push(key);
        }
        PeerGroup(id)
    }

    /// The ingress rules of `dst` admitting traffic from every member of `from`.
    pub fn ingress_from_group(&mut self, from: PeerGroup, dst: Identity) -> &mut AllowSetBuilder {
        self.ingress_group
            .entry(pair(dst, Identity(from.0)))
            .or_default()
    }

    /// The egress rules of `src` admitting traffic to every member of `to`.
    pub fn egress_to_group(&mut self, src: Identity, to: PeerGroup) -> &mut AllowSetBuilder {
        self.egress_group
            .entry(pair(src, Identity(to.0)))
            .or_default()
    }

    /// Marks the identity enrolled in the mesh (its TCP travels as HBONE).
    pub fn mesh(&mut self, id: Identity) {
        self.mesh.insert(id.0);
    }

    /// Marks the pair direct in both directions.
    pub fn direct(&mut self, a: Identity, b: Identity) {
        self.direct.insert(pair(a, b));
        self.direct.insert(pair(b, a));
    }

    pub fn build(self) -> Acl {
        let mut sets: Vec<AllowSet> = Vec::new();
        let mut interned: HashMap<AllowSet, u32> = HashMap::new();
        let mut intern = |b: AllowSetBuilder| -> u32 {
            let set = b.build();
            *interned.entry(set.clone()).or_insert_with(|| {
                sets.push(set);
                (sets.len() - 1) as u32
            })
        };
        let mut pairs: FastMap<u64, PairEntry> = FastMap::default();
        let blank = PairEntry {
            egress: NONE,
            ingress: NONE,
            direct: false,
        };
        for (k, b) in self.egress {
            pairs.entry(k).or_insert(blank).egress = intern(b);
        }
        for (k, b) in self.ingress {
            pairs.entry(k).or_insert(blank).ingress = intern(b);
        }
        for k in self.direct {
            pairs.entry(k).or_insert(blank).direct = true;
        }
        let mut any = vec![
            AnyPeer {
                egress: NONE,
                ingress: NONE,
            };
            self.isolation.len()
        ];
        for (id, b) in self.egress_any {
            if let Some(a) = any.get_mut(id as usize) {
                a.egress = intern(b);
            }
        }
        for (id, b) in self.ingress_any {
            if let Some(a) = any.get_mut(id as usize) {
                a.ingress = intern(b);
            }
        }
        let n = self.isolation.len();
        let groups: Vec<Members> = self
            .groups
            .iter()
            .map(|ids| {
                let mut bits = vec![0u64; n.div_ceil(64)];
                for &i in ids.iter().filter(|&&i| (i as usize) < n) {
                    bits[i as usize / 64] |= 1 << (i % 64);
                }
                Members(bits.into_boxed_slice())
            })
            .collect();
        let mut by_identity = |rules: FastMap<u64, AllowSetBuilder>| {
            let mut v: Vec<Vec<GroupRule>> = vec![Vec::new(); n];
            for (k, b) in rules {
                let (id, group) = ((k >> 32) as usize, k as u32);
                if let Some(list) = v.get_mut(id) {
                    list.push(GroupRule {
                        group,
                        set: intern(b),
                    });
                }
            }
            v.into_iter()
                .map(|mut l| {
                    l.sort_unstable_by_key(|r| (r.group, r.set));
                    l.into_boxed_slice()
                })
                .collect::<Vec<_>>()
        };
        let egress_groups = by_identity(self.egress_group);
        let ingress_groups = by_identity(self.ingress_group);
        let mesh = (0..n as u32).map(|i| self.mesh.contains(&i)).collect();
        Acl {
            isolation: self.isolation,
            pairs,
            any,
            egress_groups,
            ingress_groups,
            groups,
            sets,
            mesh,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{PROTO_ICMP, build};
    use proptest::prelude::*;

    fn tcp(dport: u16) -> Classified {
        crate::packet::classify(&build::tcp4([1, 1, 1, 1], 40000, [2, 2, 2, 2], dport)).unwrap()
    }
    fn udp(dport: u16) -> Classified {
        let p = build::ipv4(
            [1, 1, 1, 1].into(),
            [2, 2, 2, 2].into(),
            PROTO_UDP,
            &build::ports(PROTO_UDP, 1, dport, b""),
        );
        crate::packet::classify(&p).unwrap()
    }
    fn ping() -> Classified {
        let p = build::ipv4(
            [1, 1, 1, 1].into(),
            [2, 2, 2, 2].into(),
            PROTO_ICMP,
            &build::echo(false, false, 1, 1),
        );
        crate::packet::classify(&p).unwrap()
    }

    const ISOLATED: Isolation = Isolation {
        ingress: true,
        egress: true,
    };
    const OPEN: Isolation = Isolation {
        ingress: false,
        egress: false,
    };

    #[test]
    fn a_rule_without_peers_is_kept_per_identity_and_adds_to_pair_rules() {
        let mut b = Acl::builder();
        let server = b.identity(ISOLATED);
        let clients: Vec<Identity> = (0..100).map(|_| b.identity(OPEN)).collect();
        b.ingress_from_any(server)
            .allow(PROTO_TCP, Some(PortRange::single(80)));
        b.ingress(clients[0], server)
            .allow(PROTO_TCP, Some(PortRange::single(443)));
        b.egress_to_any(server)
            .allow(PROTO_UDP, Some(PortRange::single(53)));
        let acl = b.build();
        assert_eq!(acl.pair_count(), 1, "no pair for the any-peer rule");
        for c in &clients {
            assert!(acl.allows(*c, server, &tcp(80)));
            assert!(acl.allows(server, *c, &udp(53)));
            assert!(!acl.allows(server, *c, &tcp(53)));
        }
        assert!(acl.allows(clients[0], server, &tcp(443)), "pair rules add");
        assert!(!acl.allows(clients[1], server, &tcp(443)));
    }

    #[test]
    fn a_rule_with_a_peer_group_is_kept_per_identity_and_admits_only_members() {
        let mut b = Acl::builder();
        let ids: Vec<Identity> = (0..200).map(|_| b.identity(ISOLATED)).collect();
        let (evens, odds): (Vec<Identity>, Vec<Identity>) = ids.iter().partition(|i| i.0 % 2 == 0);
        let g = b.peer_group(&evens);
        let mut shuffled = evens.clone();
        shuffled.reverse();
        shuffled.push(evens[0]);
        assert_eq!(b.peer_group(&shuffled), g, "interned by membership");
        for &x in &ids {
            b.ingress_from_group(g, x)
                .allow(PROTO_TCP, Some(PortRange::single(80)));
            b.egress_to_group(x, g)
                .allow(PROTO_TCP, Some(PortRange::single(80)));
        }
        let acl = b.build();
        assert_eq!(acl.pair_count(), 0);
        assert_eq!(acl.group_rule_count(), (400, 1));
        assert!(acl.allows(evens[3], evens[7], &tcp(80)));
        assert!(
            !acl.allows(evens[3], odds[7], &tcp(80)),
            "egress names only members as destinations"
        );
        assert!(!acl.allows(odds[3], evens[7], &tcp(80)), "not a member");
        assert!(
            !acl.allows(evens[3], evens[7], &tcp(81)),
            "ports still count"
        );
        assert!(!acl.allows(evens[3], Identity(9999), &tcp(80)));
    }

    #[test]
    fn unisolated_identities_allow_everything() {
        let mut b = Acl::builder();
        let a = b.identity(OPEN);
        let c = b.identity(OPEN);
        let acl = b.build();
        assert!(acl.allows(a, c, &tcp(80)));
        assert!(acl.allows(a, c, &ping()));
    }

    #[test]
    fn default_deny_when_isolated_and_both_directions_must_agree() {
        let mut b = Acl::builder();
        let client = b.identity(Isolation {
            ingress: false,
            egress: true,
        });
        let server = b.identity(Isolation {
            ingress: true,
            egress: false,
        });
        b.egress(client, server)
            .allow(PROTO_TCP, Some(PortRange::new(80, 81)));
        let acl = b.build();
        // Egress allows, but the server's ingress has no rule for the client.
        assert!(!acl.allows(client, server, &tcp(80)));

        let mut b = Acl::builder();
        let client = b.identity(Isolation {
            ingress: false,
            egress: true,
        });
        let server = b.identity(Isolation {
            ingress: true,
            egress: false,
        });
        b.egress(client, server)
            .allow(PROTO_TCP, Some(PortRange::new(80, 81)));
        b.ingress(client, server)
            .allow(PROTO_TCP, Some(PortRange::single(80)));
        let acl = b.build();
        assert!(acl.allows(client, server, &tcp(80)));
        assert!(
            !acl.allows(client, server, &tcp(81)),
            "ingress allows only 80"
        );
        assert!(!acl.allows(client, server, &udp(80)), "protocol matters");
        assert!(
            !acl.allows(client, server, &ping()),
            "ICMP needs an everything rule"
        );
        // The other direction is judged by the other isolation: neither is isolated there.
        assert!(acl.allows(server, client, &tcp(80)));
    }

    #[test]
    fn unknown_identities_are_denied() {
        let mut b = Acl::builder();
        let a = b.identity(OPEN);
        let acl = b.build();
        assert!(!acl.allows(a, Identity(99), &tcp(80)));
        assert!(!acl.allows(Identity(99), a, &tcp(80)));
    }

    #[test]
    fn replies_are_allowed_reflexively() {
        let mut b = Acl::builder();
        let client = b.identity(ISOLATED);
        let server = b.identity(ISOLATED);
        b.egress(client, server)
            .allow(PROTO_TCP, Some(PortRange::single(80)));
        b.ingress(client, server)
            .allow(PROTO_TCP, Some(PortRange::single(80)));
        let acl = b.build();
        let reply =
            crate::packet::classify(&build::tcp4([2, 2, 2, 2], 80, [1, 1, 1, 1], 40000)).unwrap();
        assert!(!acl.allows(server, client, &reply));
        assert!(acl.allows_as_reply(server, client, &reply));
        let not_reply =
            crate::packet::classify(&build::tcp4([2, 2, 2, 2], 81, [1, 1, 1, 1], 40000)).unwrap();
        assert!(!acl.allows_as_reply(server, client, &not_reply));
        // A SYN from the server's port 80 opens a new connection: never a reply.
        let syn =
            crate::packet::classify(&build::syn4([2, 2, 2, 2], 80, [1, 1, 1, 1], 40000)).unwrap();
        assert!(!acl.allows_as_reply(server, client, &syn));
    }

    #[test]
    fn port_sets_merge_and_switch_to_bitmaps() {
        let s = PortSet::from_ranges(vec![
            PortRange::new(10, 20),
            PortRange::new(15, 30),
            PortRange::single(31),
        ]);
        assert_eq!(s, PortSet::Few([PortRange::new(10, 31); 3]));
        assert!(s.contains(10) && s.contains(31) && !s.contains(32) && !s.contains(9));
        assert_eq!(
            PortSet::from_ranges(vec![PortRange::new(0, 65535)]),
            PortSet::Every
        );
        let many: Vec<_> = (0..100u16).map(|i| PortRange::single(i * 3)).collect();
        let s = PortSet::from_ranges(many);
        assert!(matches!(s, PortSet::Bitmap(_)));
        assert!(s.contains(0) && s.contains(297) && !s.contains(1) && !s.contains(300));
    }

    #[test]
    fn later_fragments_need_every_port() {
        let mut all = AllowSetBuilder::default();
        all.allow(PROTO_UDP, None);
        let mut some = AllowSetBuilder::default();
        some.allow(PROTO_UDP, Some(PortRange::single(53)));
        assert!(all.build().admits(PROTO_UDP, &Transport::LaterFragment));
        assert!(!some.build().admits(PROTO_UDP, &Transport::LaterFragment));
    }

    #[test]
    fn identical_allow_sets_are_interned() {
        let mut b = Acl::builder();
        let ids: Vec<_> = (0..10).map(|_| b.identity(ISOLATED)).collect();
        for &s in &ids {
            for &d in &ids {
                b.ingress(s, d)
                    .allow(PROTO_TCP, Some(PortRange::single(80)));
            }
        }
        let acl = b.build();
        assert_eq!(acl.allow_set_count(), 1);
    }

    #[test]
    fn hbone_between_meshed_identities_needs_some_allowed_tcp_port() {
        let mut b = Acl::builder();
        let client = b.identity(ISOLATED);
        let server = b.identity(ISOLATED);
        let udp_only = b.identity(ISOLATED);
        let outsider = b.identity(ISOLATED);
        for id in [client, server, udp_only] {
            b.mesh(id);
        }
        for (s, d) in [(client, server), (outsider, server)] {
            b.egress(s, d).allow(PROTO_TCP, Some(PortRange::single(80)));
            b.ingress(s, d)
                .allow(PROTO_TCP, Some(PortRange::single(80)));
        }
        b.egress(udp_only, server)
            .allow(PROTO_UDP, Some(PortRange::single(53)));
        b.ingress(udp_only, server)
            .allow(PROTO_UDP, Some(PortRange::single(53)));
        let acl = b.build();
        assert!(acl.allows(client, server, &tcp(80)));
        assert!(
            acl.allows(client, server, &tcp(HBONE_PORT)),
            "HBONE carries the allowed port 80"
        );
        assert!(
            !acl.allows(client, server, &tcp(81)),
            "plaintext keeps its port"
        );
        assert!(
            !acl.allows(udp_only, server, &tcp(HBONE_PORT)),
            "no TCP port allowed: no HBONE"
        );
        assert!(
            !acl.allows(outsider, server, &tcp(HBONE_PORT)),
            "a client outside the mesh gets only what policy says of 15008"
        );
        assert!(
            !acl.allows(server, client, &tcp(HBONE_PORT)),
            "not that way"
        );
        let reply =
            crate::packet::classify(&build::tcp4([2, 2, 2, 2], HBONE_PORT, [1, 1, 1, 1], 40000))
                .unwrap();
        assert!(acl.allows_as_reply(server, client, &reply));
    }

    #[test]
    fn tcp_ports_are_what_both_directions_allow() {
        let mut b = Acl::builder();
        let client = b.identity(ISOLATED);
        let server = b.identity(Isolation {
            ingress: true,
            egress: false,
        });
        let open = b.identity(OPEN);
        let stranger = b.identity(ISOLATED);
        b.egress(client, server)
            .allow(PROTO_TCP, Some(PortRange::new(80, 90)));
        b.egress_to_any(client)
            .allow(PROTO_TCP, Some(PortRange::single(443)));
        b.ingress_from_any(server)
            .allow(PROTO_TCP, Some(PortRange::new(85, 443)))
            .allow(PROTO_UDP, None);
        let g = b.peer_group(&[client, open]);
        b.ingress_from_group(g, server)
            .allow(PROTO_TCP, Some(PortRange::single(22)));
        let acl = b.build();
        assert_eq!(
            acl.tcp_ports(client, server),
            vec![PortRange::new(85, 90), PortRange::single(443)]
        );
        assert_eq!(
            acl.tcp_ports(open, server),
            vec![PortRange::single(22), PortRange::new(85, 443)]
        );
        assert_eq!(
            acl.tcp_ports(server, open),
            vec![ALL_PORTS],
            "neither isolated"
        );
        assert_eq!(acl.tcp_ports(stranger, server), Vec::new());
        assert_eq!(acl.tcp_ports(client, Identity(99)), Vec::new());
        for p in [80u16, 85, 90, 91, 443, 22] {
            let expected = acl
                .tcp_ports(client, server)
                .iter()
                .any(|r| r.start <= p && p <= r.end);
            assert_eq!(acl.allows(client, server, &tcp(p)), expected, "port {p}");
        }
    }

    /// One rule of a generated policy: whose, towards which peers, what.
    #[derive(Debug, Clone)]
    enum Peers {
        Pair(u32, u32),
        Any(u32),
        Group(Vec<u32>, u32),
    }

    /// What a rule allows: everything (`None`), or a protocol on every port or a range.
    type Allowed = Option<(u8, Option<(u16, u16)>)>;

    fn arb_rule(n: u32) -> impl Strategy<Value = (bool, Peers, Allowed)> {
        let peers = prop_oneof![
            (0..n, 0..n).prop_map(|(a, b)| Peers::Pair(a, b)),
            (0..n).prop_map(Peers::Any),
            (proptest::collection::vec(0..n, 0..3), 0..n).prop_map(|(g, o)| Peers::Group(g, o)),
        ];
        let port = prop_oneof![
            Just(80u16),
            Just(HBONE_PORT),
            Just(53),
            0..200u16,
            any::<u16>()
        ];
        let what = proptest::option::of((
            prop_oneof![Just(PROTO_TCP), Just(PROTO_UDP), Just(PROTO_SCTP)],
            proptest::option::of((port.clone(), 0..40u16)),
        ))
        .prop_map(|w| w.map(|(proto, r)| (proto, r.map(|(s, len)| (s, s.saturating_add(len))))));
        (any::<bool>(), peers, what)
    }

    proptest! {
        /// The flattened pair policy the kernel SaP holds says what the rules say, for every
        /// kind of rule (per pair, any peer, peer groups), isolation, mesh and packet.
        #[test]
        fn a_pair_policy_admits_what_the_rules_admit(
            isolation in proptest::collection::vec((any::<bool>(), any::<bool>(), any::<bool>()), 1..6),
            rules in proptest::collection::vec(arb_rule(6), 0..12),
            ports in proptest::collection::vec(
                prop_oneof![Just(80u16), Just(HBONE_PORT), Just(53), 0..240u16, any::<u16>()], 1..8),
        ) {
            let mut b = Acl::builder();
            let ids: Vec<Identity> = isolation
                .iter()
                .map(|&(ingress, egress, mesh)| {
                    let id = b.identity(Isolation { ingress, egress });
                    if mesh {
                        b.mesh(id);
                    }
                    id
                })
                .collect();
            let n = ids.len() as u32;
            for (egress, peers, what) in rules {
                let set = match peers {
                    Peers::Pair(a, c) if a < n && c < n => {
                        let (a, c) = (ids[a as usize], ids[c as usize]);
                        if egress { b.egress(a, c) } else { b.ingress(a, c) }
                    }
                    Peers::Any(a) if a < n => {
                        let a = ids[a as usize];
                        if egress { b.egress_to_any(a) } else { b.ingress_from_any(a) }
                    }
                    Peers::Group(members, own) if own < n => {
                        let members: Vec<Identity> =
                            members.iter().filter(|&&m| m < n).map(|&m| ids[m as usize]).collect();
                        let g = b.peer_group(&members);
                        let own = ids[own as usize];
                        if egress { b.egress_to_group(own, g) } else { b.ingress_from_group(g, own) }
                    }
                    _ => continue,
                };
                match what {
                    None => set.allow_everything(),
                    Some((proto, r)) => set.allow(proto, r.map(|(s, e)| PortRange::new(s, e))),
                };
            }
            let acl = b.build();
            let packet = |proto: u8, transport: Transport| Classified {
                src: [1, 1, 1, 1].into(),
                dst: [2, 2, 2, 2].into(),
                proto,
                transport,
                opens_flow: false,
                resets_flow: false,
            };
            let mut packets = vec![
                packet(PROTO_ICMP, Transport::Echo { id: 7, reply: false }),
                packet(PROTO_ICMP, Transport::NoPorts),
                packet(47, Transport::NoPorts),
            ];
            for &p in &ports {
                for proto in [PROTO_TCP, PROTO_UDP, PROTO_SCTP] {
                    packets.push(packet(proto, Transport::Ports { src: 40000, dst: p }));
                }
            }
            for &s in &ids {
                for &d in &ids {
                    let policy = acl.pair_policy(s, d).unwrap();
                    for c in &packets {
                        prop_assert_eq!(policy.admits(c), acl.allows(s, d, c), "{:?} -> {:?}: {:?}, {:?}", s, d, c, policy);
                    }
                }
                prop_assert!(acl.pair_policy(s, Identity(n)).is_none());
            }
        }
    }

    #[test]
    fn port_sets_give_back_their_ranges() {
        let ranges = vec![PortRange::new(10, 20), PortRange::single(22)];
        assert_eq!(PortSet::from_ranges(ranges.clone()).ranges(), ranges);
        let many: Vec<_> = (0..100u16).map(|i| PortRange::single(i * 3)).collect();
        assert_eq!(PortSet::from_ranges(many.clone()).ranges(), many);
        assert_eq!(PortSet::Every.ranges(), vec![ALL_PORTS]);
        assert!(PortSet::Nothing.ranges().is_empty());
        assert_eq!(
            intersect(
                &[PortRange::new(0, 10), PortRange::new(20, 30)],
                &[PortRange::new(5, 25)]
            ),
            vec![PortRange::new(5, 10), PortRange::new(20, 25)]
        );
    }

    #[test]
    fn direct_pairs_are_symmetric() {
        let mut b = Acl::builder();
        let x = b.identity(OPEN);
        let y = b.identity(OPEN);
        let z = b.identity(OPEN);
        b.direct(x, y);
        let acl = b.build();
        assert!(acl.is_direct(x, y) && acl.is_direct(y, x));
        assert!(!acl.is_direct(x, z));
    }
}
