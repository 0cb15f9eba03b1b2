//! The forwarding engines, as pure functions over buffers that return what to do with a packet:
//! the endpoint's egress (TUN → GUE), its ingress (GUE → TUN), and the SaP's forwarding. They read
//! a published [`Tables`] snapshot, an endpoint's [`LocalEndpoint`] facts and its [`FlowTable`];
//! time is passed in. The Linux I/O layer ([`crate::io`]) moves the bytes.
//!
//! The checks, in order (each failure is a [`DropReason`]):
//! - egress: the packet parses → its source is one of the endpoint's own addresses (its overlay
//!   IPs, or its pod IP: traffic a pod sends to another protected pod's pod IP is steered into
//!   its overlay device and carried like overlay traffic) → the FIB knows the destination →
//!   policy allows it (or it replies to a tracked flow) → the destination has a current key →
//!   encapsulate with the *destination's* key, send to the SaP that fronts it (or straight to it
//!   for a direct pair). When that SaP is this node's own, its checks run here, in process, and
//!   the datagram goes straight to the destination.
//! - ingress: GUE parses → the key is the endpoint's own (current epoch, or a neighbour within the
//!   grace window) → the inner destination is one of the endpoint's own addresses → the outer
//!   source is the infrastructure address the FIB holds for the inner source, or a known SaP →
//!   packet authentication holds → policy allows it (or it replies to a tracked flow).
//! - SaP: GUE and inner packet parse → the outer source matches the inner source (or is a SaP) →
//!   the FIB knows the destination → the key is the destination's → policy allows the pair in
//!   one direction or the other → packet authentication holds → forward the datagram unchanged
//!   to the destination.
//!
//! Packet authentication ([`PacketAuth`]): a sender seals each datagram with a MAC keyed by the
//! destination and epoch; a receiver (endpoint or SaP) checks a MAC whenever one is present,
//! whatever the mode, and in strict mode refuses a datagram without one. So a 32-bit key seen on
//! the wire lets no one send: the MAC key is never on the wire and never in a pod.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;

use crate::acl::{Acl, FastSet};
use crate::fib::{Fib, Route};
use crate::flow::FlowTable;
use crate::gue;
use crate::key::{Key, KeyRing};
use crate::packet::{Classified, classify};

/// Why a packet was dropped. Every variant has a counter ([`crate::counters::DropCounters`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The FIB has no entry for the destination.
    NoRoute,
    /// Policy does not allow the packet, and it is not a reply to an allowed flow.
    DeniedByPolicy,
    /// The key is not the destination's (for any accepted epoch), or no current key is known.
    BadKey,
    /// The inner source is not the sender's: not the pod's own overlay IP at egress; at ingress or
    /// a SaP, not an entity the FIB knows at the outer source's address.
    SpoofedSource,
    /// The inner destination is not one of this endpoint's own addresses.
    WrongDestination,
    /// The GUE header or the inner packet does not parse.
    Malformed,
    /// A protected entity's address arrived off the overlay (at a gateway): a workload getting
    /// around its overlay device, or a forged source.
    OffOverlay,
    /// The next hop would be a SaP again (a destination whose infrastructure address is a
    /// node's): a SaP forwards only to endpoints, so no datagram goes around twice.
    Loop,
    /// The datagram's MAC is not the one its destination's MAC key gives (forged, altered, or
    /// sealed for another destination or epoch).
    BadMac,
    /// Packet authentication is strict and the datagram carries no MAC.
    Unauthenticated,
}

/// Packet authentication, a cluster-wide switch, turned on in two steps so that no node ever
/// refuses what another still sends: every node first seals (`Permissive`), then every node
/// requires (`Strict`). A MAC that is present is checked in every mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PacketAuth {
    /// Datagrams are sent without a MAC.
    #[default]
    Disabled,
    /// Datagrams are sealed; datagrams without a MAC are still accepted (the step between).
    Permissive,
    /// Datagrams are sealed, and those without a MAC are dropped ([`DropReason::Unauthenticated`]).
    Strict,
}

impl PacketAuth {
    pub const ALL: [PacketAuth; 3] = [
        PacketAuth::Disabled,
        PacketAuth::Permissive,
        PacketAuth::Strict,
    ];

    pub fn seals(self) -> bool {
        self != PacketAuth::Disabled
    }

    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PacketAuth::Disabled => "disabled",
            PacketAuth::Permissive => "permissive",
            PacketAuth::Strict => "strict",
        }
    }
}

impl DropReason {
    pub const ALL: [DropReason; 10] = [
        DropReason::NoRoute,
        DropReason::DeniedByPolicy,
        DropReason::BadKey,
        DropReason::SpoofedSource,
        DropReason::WrongDestination,
        DropReason::Malformed,
        DropReason::OffOverlay,
        DropReason::Loop,
        DropReason::BadMac,
        DropReason::Unauthenticated,
    ];

    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::DeniedByPolicy => "denied_by_policy",
            DropReason::BadKey => "bad_key",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::WrongDestination => "wrong_destination",
            DropReason::Malformed => "malformed",
            DropReason::OffOverlay => "off_overlay",
            DropReason::Loop => "loop",
            DropReason::BadMac => "bad_mac",
            DropReason::Unauthenticated => "unauthenticated",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One consistent snapshot of what the control plane compiled: replaced whole, never edited.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    pub fib: Fib,
    pub acl: Acl,
    /// Underlay addresses of every SaP (node agents and gateways): datagrams from them carry inner
    /// sources that are not their own.
    pub saps: FastSet<IpAddr>,
    /// Increases with each compilation: tells which policy a packet was judged by.
    pub generation: u64,
    pub packet_auth: PacketAuth,
}

/// What an endpoint knows about itself.
#[derive(Debug, Clone)]
pub struct LocalEndpoint {
    pub entity: Arc<str>,
    /// The pod's overlay IPs (one per overlay network).
    pub overlay_ips: Vec<IpAddr>,
    /// The pod's own GUE socket address: its infrastructure IP (the pod IP Kubernetes reports),
    /// port 6080. The pod IP is one of the endpoint's own addresses too.
    pub infra: SocketAddr,
    /// The pod's own keys, for checking what arrives.
    pub keys: KeyRing,
    /// This node's SaP, whose checks run in process instead of costing a hop.
    pub local_sap: Option<SocketAddr>,
}

impl LocalEndpoint {
    /// Whether `ip` is one of the endpoint's own addresses: an overlay IP, or its pod IP.
    pub fn owns(&self, ip: IpAddr) -> bool {
        self.overlay_ips.contains(&ip) || self.infra.ip() == ip
    }
}

/// Which way a packet leaves an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Straight to the destination: a direct pair, or no SaP is known for it.
    Direct,
    /// To the SaP that fronts the destination, which checks and forwards it.
    Sap,
    /// This node's SaP checked it here, in process; it goes straight to the destination.
    LocalSap,
}

/// Where an encapsulated packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Send {
    pub to: SocketAddr,
    pub hop: Hop,
    /// Where the datagram starts in the buffer (the header is longer with a MAC).
    pub start: usize,
}

/// Encapsulates the packet at `buf[gue::HEADROOM..]` with `key`, sealed with its MAC key from
/// `keys` when packet authentication is on; returns where the datagram starts.
fn seal(tables: &Tables, keys: &KeyRing, key: Key, buf: &mut [u8]) -> Result<usize, DropReason> {
    let mac = if tables.packet_auth.seals() {
        keys.mac_for(key)
    } else {
        None
    };
    gue::seal(key, mac, buf).map_err(|_| DropReason::Malformed)
}

/// Packet authentication at a receiver holding `keys` (the destination's), for a datagram whose
/// key they accept.
fn authenticated(
    tables: &Tables,
    keys: &KeyRing,
    datagram: &[u8],
    header: &gue::Header,
) -> Result<(), DropReason> {
    match header.mac {
        Some(_) => keys
            .mac_for(header.key)
            .filter(|m| gue::authentic(datagram, header, m))
            .map(|_| ())
            .ok_or(DropReason::BadMac),
        None if tables.packet_auth == PacketAuth::Strict => Err(DropReason::Unauthenticated),
        None => Ok(()),
    }
}

/// Whether a datagram's outer source may speak for the inner source: the entity itself (its
/// infrastructure address), the SaP it sends through (its node's, or its gateway's: a
/// masquerading primary makes a pod's GUE leave from its node's address), or `this_sap`, the
/// SaP that serves the receiving endpoint (it forwards what reaches its endpoints, and its
/// gateway carries outside traffic in). Any other SaP may not: a node does not speak for
/// another node's pods.
fn outer_source_ok(src: &Route, outer: SocketAddr, this_sap: Option<SocketAddr>) -> bool {
    let ip = outer.ip();
    (!src.outside && src.infra.ip() == ip)
        || src.sap.is_some_and(|s| s.ip() == ip)
        || this_sap.is_some_and(|s| s.ip() == ip)
}

/// What a flow check does with the flow table: a real packet is admitted and tracked (its flow
/// opened or refreshed); a judged one only asks whether it would be, changing nothing (the kernel
/// fast path's cached decisions are judged again this way when the tables change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Track,
    Judge,
}

fn admitted(
    flows: &FlowTable,
    how: Admission,
    c: &Classified,
    allowed: bool,
    inbound: bool,
    now_ms: u64,
) -> bool {
    match how {
        Admission::Track => flows.admit(c, allowed, inbound, now_ms),
        Admission::Judge => flows.would_admit(c, allowed, now_ms),
    }
}

/// Endpoint egress. `buf[gue::HEADROOM..]` holds the packet read from the TUN device; on success
/// the header has been written in front of it, so `buf[send.start..]` is the datagram to send.
pub fn endpoint_egress(
    tables: &Tables,
    local: &LocalEndpoint,
    flows: &FlowTable,
    buf: &mut [u8],
    now_ms: u64,
) -> Result<Send, DropReason> {
    endpoint_egress_as(tables, local, flows, Admission::Track, buf, now_ms)
}

/// [`endpoint_egress`], with the flow table used as `how` says.
pub fn endpoint_egress_as(
    tables: &Tables,
    local: &LocalEndpoint,
    flows: &FlowTable,
    how: Admission,
    buf: &mut [u8],
    now_ms: u64,
) -> Result<Send, DropReason> {
    let inner = buf.get(gue::HEADROOM..).ok_or(DropReason::Malformed)?;
    let c = classify(inner).map_err(|_| DropReason::Malformed)?;
    if !local.owns(c.src) {
        return Err(DropReason::SpoofedSource);
    }
    let src = tables.fib.lookup(c.src).ok_or(DropReason::NoRoute)?;
    let dst = overlay_route(tables, c.dst)?;
    let allowed = tables.acl.allows(src.identity, dst.identity, &c);
    if !admitted(flows, how, &c, allowed, false, now_ms) {
        return Err(DropReason::DeniedByPolicy);
    }
    let key = dst.keys.key_at(now_ms).ok_or(DropReason::BadKey)?;
    let start = seal(tables, &dst.keys, key, buf)?;
    let direct = tables.acl.is_direct(src.identity, dst.identity);
    let (to, hop) = match dst.sap {
        // This node's SaP: run its checks now and skip the hop.
        Some(sap) if !direct && Some(sap) == local.local_sap => (
            sap_checks(tables, &c, key, src, dst, local.infra, now_ms)?,
            Hop::LocalSap,
        ),
        Some(sap) if !direct => (sap, Hop::Sap),
        _ => (dst.infra, Hop::Direct),
    };
    Ok(Send { to, hop, start })
}

/// Endpoint ingress: returns the range of `datagram` holding the inner packet to write to the TUN.
pub fn endpoint_ingress(
    tables: &Tables,
    local: &LocalEndpoint,
    flows: &FlowTable,
    datagram: &[u8],
    outer_src: SocketAddr,
    now_ms: u64,
) -> Result<Range<usize>, DropReason> {
    endpoint_ingress_as(
        tables,
        local,
        flows,
        Admission::Track,
        datagram,
        outer_src,
        now_ms,
    )
}

/// [`endpoint_ingress`], with the flow table used as `how` says.
pub fn endpoint_ingress_as(
    tables: &Tables,
    local: &LocalEndpoint,
    flows: &FlowTable,
    how: Admission,
    datagram: &[u8],
    outer_src: SocketAddr,
    now_ms: u64,
) -> Result<Range<usize>, DropReason> {
    let header = gue::decode(datagram).map_err(|_| DropReason::Malformed)?;
    let inner = &datagram[header.payload_offset..];
    let c = classify(inner).map_err(|_| DropReason::Malformed)?;
    if !local.keys.accepts(header.key, now_ms) {
        return Err(DropReason::BadKey);
    }
    if !local.owns(c.dst) {
        return Err(DropReason::WrongDestination);
    }
    let src = tables.fib.lookup(c.src).ok_or(DropReason::SpoofedSource)?;
    if !outer_source_ok(src, outer_src, local.local_sap) {
        return Err(DropReason::SpoofedSource);
    }
    // Before policy: a datagram that is not authentic must not open or refresh a flow.
    authenticated(tables, &local.keys, datagram, &header)?;
    let dst = tables.fib.lookup(c.dst).ok_or(DropReason::NoRoute)?;
    let allowed = tables.acl.allows(src.identity, dst.identity, &c);
    if !admitted(flows, how, &c, allowed, true, now_ms) {
        return Err(DropReason::DeniedByPolicy);
    }
    Ok(header.payload_offset..datagram.len())
}

/// SaP forwarding: returns where to send `datagram`, unchanged (a SaP never rewrites the key).
pub fn sap_forward(
    tables: &Tables,
    datagram: &[u8],
    outer_src: SocketAddr,
    now_ms: u64,
) -> Result<SocketAddr, DropReason> {
    let header = gue::decode(datagram).map_err(|_| DropReason::Malformed)?;
    let c = classify(&datagram[header.payload_offset..]).map_err(|_| DropReason::Malformed)?;
    let src = tables.fib.lookup(c.src).ok_or(DropReason::SpoofedSource)?;
    let dst = overlay_route(tables, c.dst)?;
    let to = sap_checks(tables, &c, header.key, src, dst, outer_src, now_ms)?;
    authenticated(tables, &dst.keys, datagram, &header)?;
    Ok(to)
}

/// The route of an overlay destination: one with an endpoint (an outside address has none).
fn overlay_route(tables: &Tables, dst: IpAddr) -> Result<&Route, DropReason> {
    tables
        .fib
        .lookup(dst)
        .filter(|r| !r.outside)
        .ok_or(DropReason::NoRoute)
}

/// The node's gateway: a packet from off the overlay (read from the gateway device, where the
/// node routes what is not GUE for a local protected pod), at `buf[gue::HEADROOM..]`. Its source
/// must be an outside address — one of a protected entity arriving here got around its overlay
/// device — and policy must admit it from the identity the FIB gives that address; it is then
/// encapsulated with the destination's key, as its SaP would send it, and goes to the destination
/// endpoint. Replies do not come back this way: the destination answers natively.
pub fn gateway_ingress(tables: &Tables, buf: &mut [u8], now_ms: u64) -> Result<Send, DropReason> {
    let inner = buf.get(gue::HEADROOM..).ok_or(DropReason::Malformed)?;
    let c = classify(inner).map_err(|_| DropReason::Malformed)?;
    let src = tables.fib.lookup(c.src).ok_or(DropReason::NoRoute)?;
    if !src.outside {
        return Err(DropReason::OffOverlay);
    }
    let dst = overlay_route(tables, c.dst)?;
    if !tables.acl.allows(src.identity, dst.identity, &c) {
        return Err(DropReason::DeniedByPolicy);
    }
    if tables.saps.contains(&dst.infra.ip()) {
        return Err(DropReason::Loop);
    }
    let key = dst.keys.key_at(now_ms).ok_or(DropReason::BadKey)?;
    let start = seal(tables, &dst.keys, key, buf)?;
    Ok(Send {
        to: dst.infra,
        hop: Hop::Direct,
        start,
    })
}

fn sap_checks(
    tables: &Tables,
    c: &Classified,
    key: Key,
    src: &Route,
    dst: &Route,
    outer_src: SocketAddr,
    now_ms: u64,
) -> Result<SocketAddr, DropReason> {
    if !outer_source_ok(src, outer_src, None) {
        return Err(DropReason::SpoofedSource);
    }
    if !dst.keys.accepts(key, now_ms) {
        return Err(DropReason::BadKey);
    }
    let acl = &tables.acl;
    if !acl.allows(src.identity, dst.identity, c)
        && !acl.allows_as_reply(src.identity, dst.identity, c)
    {
        return Err(DropReason::DeniedByPolicy);
    }
    // A SaP hands a datagram to its destination's endpoint, never to a SaP: one hop, no loop.
    if tables.saps.contains(&dst.infra.ip()) {
        return Err(DropReason::Loop);
    }
    Ok(dst.infra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{Identity, Isolation, PortRange};
    use crate::flow::FlowTimeouts;
    use crate::key::{ClusterSecret, Key, Rotation};
    use crate::packet::{PROTO_ICMP, PROTO_TCP, build};

    const NOW: u64 = 1_000_000_000;
    const A_IP: [u8; 4] = [100, 64, 1, 1];
    const B_IP: [u8; 4] = [100, 64, 2, 1];
    const C_IP: [u8; 4] = [100, 64, 2, 2];

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    struct World {
        tables: Tables,
        a: LocalEndpoint,
        b: LocalEndpoint,
        secret: ClusterSecret,
        rot: Rotation,
    }

    /// a (node-1) may reach b on TCP 80 only; c is b's neighbour that nobody may reach; SaPs are
    /// node-1 (10.0.0.1) and node-2 (10.0.0.2); pods' infra IPs are 10.1.x.y.
    fn world(direct: bool) -> World {
        let secret = ClusterSecret::new(vec![7u8; 32]).unwrap();
        let rot = Rotation::new(60_000, 5_000).unwrap();
        let mut acl = crate::acl::Acl::builder();
        let ia = acl.identity(Isolation {
            ingress: true,
            egress: true,
        });
        let ib = acl.identity(Isolation {
            ingress: true,
            egress: true,
        });
        let ic = acl.identity(Isolation {
            ingress: true,
            egress: true,
        });
        acl.egress(ia, ib)
            .allow(PROTO_TCP, Some(PortRange::single(80)));
        acl.ingress(ia, ib)
            .allow(PROTO_TCP, Some(PortRange::single(80)));
        if direct {
            acl.direct(ia, ib);
        }
        let mut fib = Fib::builder();
        let route = |name: &str, id: Identity, infra: &str, sap: &str| Route {
            entity: name.into(),
            identity: id,
            keys: KeyRing::derive(&secret, name, rot, NOW),
            infra: addr(infra),
            sap: Some(addr(sap)),
            outside: false,
        };
        fib.insert(
            "100.64.1.1/32".parse().unwrap(),
            route("ns/a", ia, "10.1.1.1:6080", "10.0.0.1:6080"),
        )
        .unwrap();
        fib.insert(
            "100.64.2.1/32".parse().unwrap(),
            route("ns/b", ib, "10.1.2.1:6080", "10.0.0.2:6080"),
        )
        .unwrap();
        fib.insert(
            "100.64.2.2/32".parse().unwrap(),
            route("ns/c", ic, "10.1.2.2:6080", "10.0.0.2:6080"),
        )
        .unwrap();
        let mut saps = FastSet::default();
        saps.insert("10.0.0.1".parse().unwrap());
        saps.insert("10.0.0.2".parse().unwrap());
        let tables = Tables {
            fib: fib.build(),
            acl: acl.build(),
            saps,
            generation: 1,
            packet_auth: PacketAuth::Disabled,
        };
        let local = |name: &str, ip: [u8; 4], infra: &str, sap: &str| LocalEndpoint {
            entity: name.into(),
            overlay_ips: vec![IpAddr::V4(ip.into())],
            infra: addr(infra),
            keys: KeyRing::derive(&secret, name, rot, NOW),
            local_sap: Some(addr(sap)),
        };
        World {
            a: local("ns/a", A_IP, "10.1.1.1:6080", "10.0.0.1:6080"),
            b: local("ns/b", B_IP, "10.1.2.1:6080", "10.0.0.2:6080"),
            tables,
            secret,
            rot,
        }
    }

    fn flows() -> FlowTable {
        FlowTable::new(64, FlowTimeouts::default())
    }

    fn with_headroom(pkt: Vec<u8>) -> Vec<u8> {
        let mut b = vec![0u8; gue::HEADROOM];
        b.extend_from_slice(&pkt);
        b
    }

    /// [`endpoint_egress`], leaving in `buf` the datagram alone.
    fn egress(
        tables: &Tables,
        local: &LocalEndpoint,
        flows: &FlowTable,
        buf: &mut Vec<u8>,
        now_ms: u64,
    ) -> Result<Send, DropReason> {
        let send = endpoint_egress(tables, local, flows, buf, now_ms)?;
        buf.drain(..send.start);
        Ok(send)
    }

    /// Seals the packet at `buf[gue::HEADROOM..]` with `key` and no MAC, leaving the datagram.
    fn seal_plain(key: Key, buf: &mut Vec<u8>) {
        let start = gue::seal(key, None, buf).unwrap();
        buf.drain(..start);
    }

    fn key_of(w: &World, entity: &str) -> Key {
        KeyRing::derive(&w.secret, entity, w.rot, NOW)
            .key_at(NOW)
            .unwrap()
    }

    #[test]
    fn a_node_speaks_only_for_its_own_pods() {
        let mut w = world(false);
        w.tables.saps.insert("10.0.0.3".parse().unwrap());
        let datagram = |src: [u8; 4]| {
            let mut buf = with_headroom(build::syn4(src, 40000, B_IP, 80));
            seal_plain(key_of(&w, "ns/b"), &mut buf);
            buf
        };
        let ingress = |buf: &[u8], outer: &str| {
            endpoint_ingress(&w.tables, &w.b, &flows(), buf, addr(outer), NOW)
        };
        // a's own address, a's node (a masquerading primary), b's own SaP: may speak for a.
        for outer in ["10.1.1.1:6080", "10.0.0.1:6080", "10.0.0.2:6080"] {
            assert!(ingress(&datagram(A_IP), outer).is_ok(), "{outer}");
        }
        // Another node's address may not, whoever it claims.
        assert_eq!(
            ingress(&datagram(A_IP), "10.0.0.3:6080"),
            Err(DropReason::SpoofedSource)
        );
        assert_eq!(
            ingress(&datagram(C_IP), "10.0.0.1:6080"),
            Err(DropReason::SpoofedSource),
            "node-1 does not speak for c, a pod of node-2"
        );
        // At a SaP: the source itself or its node.
        let buf = datagram(A_IP);
        assert!(sap_forward(&w.tables, &buf, addr("10.0.0.1:6080"), NOW).is_ok());
        assert_eq!(
            sap_forward(&w.tables, &buf, addr("10.0.0.3:6080"), NOW),
            Err(DropReason::SpoofedSource)
        );
    }

    #[test]
    fn packet_authentication_makes_a_known_key_worth_nothing() {
        let mut w = world(false);
        w.tables.packet_auth = PacketAuth::Permissive;
        let pkt = build::tcp4(A_IP, 40000, B_IP, 80);
        let mut sealed = with_headroom(pkt.clone());
        let send = egress(&w.tables, &w.a, &flows(), &mut sealed, NOW).unwrap();
        assert_eq!(send.start, 0, "the header grew by the MAC");
        let h = gue::decode(&sealed).unwrap();
        assert!(h.mac.is_some() && h.key == key_of(&w, "ns/b"));
        let from_a = addr("10.1.1.1:6080");
        let from_sap = addr("10.0.0.2:6080");
        assert!(sap_forward(&w.tables, &sealed, from_a, NOW).is_ok());
        let range = endpoint_ingress(&w.tables, &w.b, &flows(), &sealed, from_sap, NOW).unwrap();
        assert_eq!(&sealed[range], &pkt[..]);

        // An attacker who saw b's key on the wire: the key is right, the MAC cannot be.
        let mut forged = with_headroom(build::tcp4(A_IP, 40001, B_IP, 80));
        let start = gue::seal(
            key_of(&w, "ns/b"),
            Some(&crate::key::MacKey::from_bytes([0x5a; 16])),
            &mut forged,
        )
        .unwrap();
        let forged = &forged[start..];
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        for (what, d) in [("forged", forged), ("altered", &altered[..])] {
            assert_eq!(
                sap_forward(&w.tables, d, from_a, NOW),
                Err(DropReason::BadMac),
                "{what}, at the SaP"
            );
            assert_eq!(
                endpoint_ingress(&w.tables, &w.b, &flows(), d, from_sap, NOW),
                Err(DropReason::BadMac),
                "{what}, at b"
            );
        }
        // Sealed for c (a key and MAC key of its own): not b's.
        let mut for_c = with_headroom(pkt.clone());
        let kc = key_of(&w, "ns/c");
        let rc = KeyRing::derive(&w.secret, "ns/c", w.rot, NOW);
        let start = gue::seal(kc, rc.mac_for(kc), &mut for_c).unwrap();
        assert_eq!(
            endpoint_ingress(&w.tables, &w.b, &flows(), &for_c[start..], from_sap, NOW),
            Err(DropReason::BadKey)
        );

        // Without a MAC: accepted while permissive (nodes still turning it on), refused when strict.
        let plain = encapsulated(key_of(&w, "ns/b"), pkt.clone());
        assert!(endpoint_ingress(&w.tables, &w.b, &flows(), &plain, from_sap, NOW).is_ok());
        w.tables.packet_auth = PacketAuth::Strict;
        assert_eq!(
            endpoint_ingress(&w.tables, &w.b, &flows(), &plain, from_sap, NOW),
            Err(DropReason::Unauthenticated)
        );
        assert_eq!(
            sap_forward(&w.tables, &plain, from_a, NOW),
            Err(DropReason::Unauthenticated)
        );
        assert!(endpoint_ingress(&w.tables, &w.b, &flows(), &sealed, from_sap, NOW).is_ok());
        // A MAC is checked even where sealing is off.
        w.tables.packet_auth = PacketAuth::Disabled;
        assert_eq!(
            endpoint_ingress(&w.tables, &w.b, &flows(), &altered, from_sap, NOW),
            Err(DropReason::BadMac)
        );
        assert!(endpoint_ingress(&w.tables, &w.b, &flows(), &sealed, from_sap, NOW).is_ok());
    }

    #[test]
    fn sealed_datagrams_survive_key_rotation_within_grace() {
        let mut w = world(false);
        w.tables.packet_auth = PacketAuth::Strict;
        // Sealed with the epoch before NOW's, arriving within the grace window after the boundary.
        let boundary = w.rot.start_of(w.rot.epoch_at(NOW));
        let before = boundary - 1;
        let old = KeyRing::derive(&w.secret, "ns/b", w.rot, before);
        let k = old.key_at(before).unwrap();
        let mut buf = with_headroom(build::tcp4(A_IP, 1, B_IP, 80));
        let start = gue::seal(k, old.mac_for(k), &mut buf).unwrap();
        let d = &buf[start..];
        let from_sap = addr("10.0.0.2:6080");
        assert!(endpoint_ingress(&w.tables, &w.b, &flows(), d, from_sap, boundary + 1).is_ok());
        assert!(sap_forward(&w.tables, d, addr("10.1.1.1:6080"), boundary + 1).is_ok());
    }

    #[test]
    fn a_sap_never_hands_a_datagram_to_a_sap() {
        // b's infrastructure address rewritten to node-2's own: the SaP would send to itself.
        let mut w = world(false);
        let mut fib = Fib::builder();
        for r in w.tables.fib.routes() {
            let mut r = r.clone();
            if &*r.entity == "ns/b" {
                r.infra = addr("10.0.0.2:6080");
            }
            let overlay = match &*r.entity {
                "ns/a" => A_IP,
                "ns/b" => B_IP,
                _ => C_IP,
            };
            fib.insert(IpAddr::V4(overlay.into()).into(), r).unwrap();
        }
        w.tables.fib = fib.build();
        let mut buf = with_headroom(build::syn4(A_IP, 40000, B_IP, 80));
        egress(&w.tables, &w.a, &flows(), &mut buf, NOW).unwrap();
        assert_eq!(
            sap_forward(&w.tables, &buf, addr("10.1.1.1:6080"), NOW),
            Err(DropReason::Loop)
        );
    }

    #[test]
    fn allowed_flow_goes_through_the_destination_sap_with_the_destination_key() {
        let w = world(false);
        let mut buf = with_headroom(build::tcp4(A_IP, 40000, B_IP, 80));
        let send = egress(&w.tables, &w.a, &flows(), &mut buf, NOW).unwrap();
        assert_eq!(
            send,
            Send {
                to: addr("10.0.0.2:6080"),
                hop: Hop::Sap,
                start: gue::HEADROOM - gue::HEADER_LEN
            }
        );
        assert_eq!(gue::decode(&buf).unwrap().key, key_of(&w, "ns/b"));

        // The SaP on node-2 forwards it unchanged to b.
        let to = sap_forward(&w.tables, &buf, addr("10.1.1.1:6080"), NOW).unwrap();
        assert_eq!(to, addr("10.1.2.1:6080"));

        // b accepts it from its SaP, and the reply goes back.
        let fb = flows();
        let range =
            endpoint_ingress(&w.tables, &w.b, &fb, &buf, addr("10.0.0.2:6080"), NOW).unwrap();
        assert_eq!(&buf[range], &build::tcp4(A_IP, 40000, B_IP, 80)[..]);
        let mut reply = with_headroom(build::tcp4(B_IP, 80, A_IP, 40000));
        let send = egress(&w.tables, &w.b, &fb, &mut reply, NOW).unwrap();
        assert_eq!(
            send.to,
            addr("10.0.0.1:6080"),
            "the reply goes through a's SaP, on node-1"
        );
    }

    #[test]
    fn reply_is_admitted_by_the_tracked_flow_and_by_the_sap_reflexively() {
        let w = world(false);
        let fa = flows();
        let mut req = with_headroom(build::tcp4(A_IP, 40000, B_IP, 80));
        egress(&w.tables, &w.a, &fa, &mut req, NOW).unwrap();
        let fb = flows();
        endpoint_ingress(&w.tables, &w.b, &fb, &req, addr("10.0.0.2:6080"), NOW).unwrap();

        let mut reply = with_headroom(build::tcp4(B_IP, 80, A_IP, 40000));
        egress(&w.tables, &w.b, &fb, &mut reply, NOW).unwrap();
        sap_forward(&w.tables, &reply, addr("10.1.2.1:6080"), NOW).unwrap();
        endpoint_ingress(&w.tables, &w.a, &fa, &reply, addr("10.0.0.1:6080"), NOW).unwrap();

        // Unsolicited traffic from b to a on the same ports is refused by a's own flow table.
        let unsolicited = with_headroom(build::tcp4(B_IP, 80, A_IP, 40001));
        let mut enc = unsolicited.clone();
        seal_plain(key_of(&w, "ns/a"), &mut enc);
        assert_eq!(
            endpoint_ingress(&w.tables, &w.a, &fa, &enc, addr("10.0.0.1:6080"), NOW),
            Err(DropReason::DeniedByPolicy)
        );
        let mut enc = unsolicited;
        assert_eq!(
            egress(&w.tables, &w.b, &fb, &mut enc, NOW),
            Err(DropReason::DeniedByPolicy)
        );
    }

    #[test]
    fn direct_pairs_skip_the_sap() {
        let w = world(true);
        let mut buf = with_headroom(build::tcp4(A_IP, 40000, B_IP, 80));
        let send = egress(&w.tables, &w.a, &flows(), &mut buf, NOW).unwrap();
        assert_eq!(
            send,
            Send {
                to: addr("10.1.2.1:6080"),
                hop: Hop::Direct,
                start: gue::HEADROOM - gue::HEADER_LEN
            }
        );
        endpoint_ingress(&w.tables, &w.b, &flows(), &buf, addr("10.1.1.1:6080"), NOW).unwrap();
    }

    #[test]
    fn pod_ips_travel_the_overlay_like_overlay_addresses() {
        // The compiler routes each protected pod's pod IP like its overlay IP: same entity,
        // identity, keys and SaP.
        let mut w = world(false);
        let mut fib = Fib::builder();
        for r in w.tables.fib.routes() {
            let infra = match r.infra.ip() {
                IpAddr::V4(ip) => ip,
                IpAddr::V6(_) => unreachable!(),
            };
            let overlay = match &*r.entity {
                "ns/a" => A_IP,
                "ns/b" => B_IP,
                _ => C_IP,
            };
            fib.insert(IpAddr::V4(overlay.into()).into(), r.clone())
                .unwrap();
            fib.insert(IpAddr::V4(infra).into(), r.clone()).unwrap();
        }
        w.tables.fib = fib.build();
        let (a_pod, b_pod, c_pod) = ([10, 1, 1, 1], [10, 1, 2, 1], [10, 1, 2, 2]);
        let fa = flows();
        let mut buf = with_headroom(build::tcp4(a_pod, 40000, b_pod, 80));
        let send = egress(&w.tables, &w.a, &fa, &mut buf, NOW).unwrap();
        assert_eq!(
            send.to,
            addr("10.0.0.2:6080"),
            "through b's SaP, as by overlay address"
        );
        assert_eq!(gue::decode(&buf).unwrap().key, key_of(&w, "ns/b"));
        sap_forward(&w.tables, &buf, addr("10.1.1.1:6080"), NOW).unwrap();
        let fb = flows();
        let range =
            endpoint_ingress(&w.tables, &w.b, &fb, &buf, addr("10.0.0.2:6080"), NOW).unwrap();
        assert_eq!(&buf[range], &build::tcp4(a_pod, 40000, b_pod, 80)[..]);
        let mut reply = with_headroom(build::tcp4(b_pod, 80, a_pod, 40000));
        egress(&w.tables, &w.b, &fb, &mut reply, NOW).unwrap();
        // Policy is the same: c is reachable by no one, by pod IP either.
        let mut denied = with_headroom(build::tcp4(a_pod, 40000, c_pod, 80));
        assert_eq!(
            egress(&w.tables, &w.a, &flows(), &mut denied, NOW),
            Err(DropReason::DeniedByPolicy)
        );
        // A pod may not send as another pod's pod IP.
        let mut spoofed = with_headroom(build::tcp4(c_pod, 40000, b_pod, 80));
        assert_eq!(
            egress(&w.tables, &w.a, &flows(), &mut spoofed, NOW),
            Err(DropReason::SpoofedSource)
        );
    }

    #[test]
    fn local_sap_runs_in_process() {
        let mut w = world(false);
        // Put b's SaP on a's node: the egress resolves the SaP hop itself.
        w.a.local_sap = Some(addr("10.0.0.2:6080"));
        let mut buf = with_headroom(build::tcp4(A_IP, 40000, B_IP, 80));
        let send = egress(&w.tables, &w.a, &flows(), &mut buf, NOW).unwrap();
        assert_eq!(
            send,
            Send {
                to: addr("10.1.2.1:6080"),
                hop: Hop::LocalSap,
                start: gue::HEADROOM - gue::HEADER_LEN
            }
        );
        // b sees a's own infra address as the outer source: accepted.
        endpoint_ingress(&w.tables, &w.b, &flows(), &buf, addr("10.1.1.1:6080"), NOW).unwrap();
    }

    #[test]
    fn egress_drops_each_with_its_reason() {
        let w = world(false);
        let f = flows();
        let mut spoofed = with_headroom(build::tcp4([100, 64, 9, 9], 1, B_IP, 80));
        assert_eq!(
            egress(&w.tables, &w.a, &f, &mut spoofed, NOW),
            Err(DropReason::SpoofedSource)
        );
        let mut nowhere = with_headroom(build::tcp4(A_IP, 1, [100, 64, 7, 7], 80));
        assert_eq!(
            egress(&w.tables, &w.a, &f, &mut nowhere, NOW),
            Err(DropReason::NoRoute)
        );
        let mut denied = with_headroom(build::tcp4(A_IP, 1, B_IP, 81));
        assert_eq!(
            egress(&w.tables, &w.a, &f, &mut denied, NOW),
            Err(DropReason::DeniedByPolicy)
        );
        let mut to_c = with_headroom(build::tcp4(A_IP, 1, C_IP, 80));
        assert_eq!(
            egress(&w.tables, &w.a, &f, &mut to_c, NOW),
            Err(DropReason::DeniedByPolicy)
        );
        let mut garbage = with_headroom(vec![0x45, 0, 0]);
        assert_eq!(
            egress(&w.tables, &w.a, &f, &mut garbage, NOW),
            Err(DropReason::Malformed)
        );
        // A ring far out of date has no key for now: fail closed.
        let mut stale = with_headroom(build::tcp4(A_IP, 1, B_IP, 80));
        assert_eq!(
            egress(&w.tables, &w.a, &f, &mut stale, NOW + 10 * 60_000),
            Err(DropReason::BadKey)
        );
    }

    fn encapsulated(key: Key, pkt: Vec<u8>) -> Vec<u8> {
        let mut b = with_headroom(pkt);
        seal_plain(key, &mut b);
        b
    }

    #[test]
    fn ingress_drops_each_with_its_reason() {
        let w = world(false);
        let f = flows();
        let kb = key_of(&w, "ns/b");
        let from_sap = addr("10.0.0.2:6080");
        let good = encapsulated(kb, build::tcp4(A_IP, 1, B_IP, 80));
        assert!(endpoint_ingress(&w.tables, &w.b, &f, &good, from_sap, NOW).is_ok());

        let wrong_key = encapsulated(Key(kb.0 ^ 1), build::tcp4(A_IP, 1, B_IP, 80));
        assert_eq!(
            endpoint_ingress(&w.tables, &w.b, &f, &wrong_key, from_sap, NOW),
            Err(DropReason::BadKey)
        );
        let other_pods_key = encapsulated(key_of(&w, "ns/c"), build::tcp4(A_IP, 1, B_IP, 80));
        assert_eq!(
            endpoint_ingress(&w.tables, &w.b, &f, &other_pods_key, from_sap, NOW),
            Err(DropReason::BadKey)
        );
        let not_mine = encapsulated(kb, build::tcp4(A_IP, 1, C_IP, 80));
        assert_eq!(
            endpoint_ingress(&w.tables, &w.b, &f, &not_mine, from_sap, NOW),
            Err(DropReason::WrongDestination)
        );
        // Claims to be a, but comes from c's infra address, which is neither a's nor a SaP.
        assert_eq!(
            endpoint_ingress(&w.tables, &w.b, &f, &good, addr("10.1.2.2:6080"), NOW),
            Err(DropReason::SpoofedSource)
        );
        let unknown_src = encapsulated(kb, build::tcp4([100, 64, 9, 9], 1, B_IP, 80));
        assert_eq!(
            endpoint_ingress(&w.tables, &w.b, &f, &unknown_src, from_sap, NOW),
            Err(DropReason::SpoofedSource)
        );
        let denied = encapsulated(kb, build::tcp4(A_IP, 1, B_IP, 81));
        assert_eq!(
            endpoint_ingress(&w.tables, &w.b, &f, &denied, from_sap, NOW),
            Err(DropReason::DeniedByPolicy)
        );
        let ping = encapsulated(
            kb,
            build::ipv4(
                A_IP.into(),
                B_IP.into(),
                PROTO_ICMP,
                &build::echo(false, false, 1, 1),
            ),
        );
        assert_eq!(
            endpoint_ingress(&w.tables, &w.b, &f, &ping, from_sap, NOW),
            Err(DropReason::DeniedByPolicy)
        );
        assert_eq!(
            endpoint_ingress(&w.tables, &w.b, &f, &[1, 2, 3], from_sap, NOW),
            Err(DropReason::Malformed)
        );
        let mut bad_inner = good.clone();
        bad_inner.truncate(gue::HEADER_LEN + 10);
        assert_eq!(
            endpoint_ingress(&w.tables, &w.b, &f, &bad_inner, from_sap, NOW),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn sap_drops_each_with_its_reason() {
        let w = world(false);
        let kb = key_of(&w, "ns/b");
        let from_a = addr("10.1.1.1:6080");
        let good = encapsulated(kb, build::tcp4(A_IP, 1, B_IP, 80));
        assert!(sap_forward(&w.tables, &good, from_a, NOW).is_ok());
        assert_eq!(
            sap_forward(&w.tables, &good, addr("10.9.9.9:6080"), NOW),
            Err(DropReason::SpoofedSource)
        );
        let wrong_key = encapsulated(Key(1), build::tcp4(A_IP, 1, B_IP, 80));
        assert_eq!(
            sap_forward(&w.tables, &wrong_key, from_a, NOW),
            Err(DropReason::BadKey)
        );
        let nowhere = encapsulated(kb, build::tcp4(A_IP, 1, [100, 64, 7, 7], 80));
        assert_eq!(
            sap_forward(&w.tables, &nowhere, from_a, NOW),
            Err(DropReason::NoRoute)
        );
        let denied = encapsulated(key_of(&w, "ns/c"), build::tcp4(A_IP, 1, C_IP, 80));
        assert_eq!(
            sap_forward(&w.tables, &denied, from_a, NOW),
            Err(DropReason::DeniedByPolicy)
        );
        assert_eq!(
            sap_forward(&w.tables, &[0xff; 20], from_a, NOW),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn key_rotation_loses_nothing_within_grace() {
        let w = world(false);
        let f = flows();
        // Sent with the old epoch's key just after the boundary: still accepted.
        let boundary = w.rot.start_of(w.rot.epoch_at(NOW)) + w.rot.period_ms();
        let old = encapsulated(key_of(&w, "ns/b"), build::tcp4(A_IP, 1, B_IP, 80));
        assert!(
            endpoint_ingress(
                &w.tables,
                &w.b,
                &f,
                &old,
                addr("10.0.0.2:6080"),
                boundary + 100
            )
            .is_ok()
        );
        assert_eq!(
            endpoint_ingress(
                &w.tables,
                &w.b,
                &f,
                &old,
                addr("10.0.0.2:6080"),
                boundary + 10_000
            ),
            Err(DropReason::BadKey)
        );
    }

    #[test]
    fn ipv6_overlay_over_ipv4_underlay() {
        let secret = ClusterSecret::new(vec![1u8; 32]).unwrap();
        let rot = Rotation::default();
        let mut acl = crate::acl::Acl::builder();
        let i = acl.identity(Isolation::default());
        let mut fib = Fib::builder();
        let x: IpAddr = "fd6b::1".parse().unwrap();
        let y: IpAddr = "fd6b::2".parse().unwrap();
        for (ip, name, infra) in [(x, "ns/x", "10.1.1.1:6080"), (y, "ns/y", "10.1.1.2:6080")] {
            fib.insert(
                ipnetwork::IpNetwork::new(ip, 128).unwrap(),
                Route {
                    entity: name.into(),
                    identity: i,
                    keys: KeyRing::derive(&secret, name, rot, NOW),
                    infra: addr(infra),
                    sap: None,
                    outside: false,
                },
            )
            .unwrap();
        }
        let tables = Tables {
            fib: fib.build(),
            acl: acl.build(),
            ..Default::default()
        };
        let local = LocalEndpoint {
            entity: "ns/x".into(),
            overlay_ips: vec![x],
            infra: addr("10.1.1.1:6080"),
            keys: KeyRing::derive(&secret, "ns/x", rot, NOW),
            local_sap: None,
        };
        let IpAddr::V6(xs) = x else { unreachable!() };
        let IpAddr::V6(ys) = y else { unreachable!() };
        let pkt = build::ipv6(xs, ys, PROTO_TCP, &build::ports(PROTO_TCP, 1, 2, b""));
        let mut buf = with_headroom(pkt);
        let send = egress(&tables, &local, &flows(), &mut buf, NOW).unwrap();
        assert_eq!(send.to, addr("10.1.1.2:6080"));
        assert_eq!(buf[1], gue::PROTO_IPV6);
    }

    /// The world, with b's pod IP routed and the rest of the address space outside: one region
    /// (203.0.113.0/24) that policy lets reach b on TCP 80, the remainder that it does not.
    fn gateway_world() -> World {
        let mut w = world(false);
        let mut acl = crate::acl::Acl::builder();
        let open = Isolation {
            ingress: false,
            egress: false,
        };
        let (ia, ib, ic) = (
            acl.identity(open),
            acl.identity(Isolation {
                ingress: true,
                egress: true,
            }),
            acl.identity(open),
        );
        let (admitted, rest) = (acl.identity(open), acl.identity(open));
        acl.ingress(admitted, ib)
            .allow(PROTO_TCP, Some(PortRange::single(80)));
        let mut fib = Fib::builder();
        for r in w.tables.fib.routes() {
            let id = match &*r.entity {
                "ns/a" => ia,
                "ns/b" => ib,
                _ => ic,
            };
            let overlay = match &*r.entity {
                "ns/a" => A_IP,
                "ns/b" => B_IP,
                _ => C_IP,
            };
            let route = Route {
                identity: id,
                ..r.clone()
            };
            fib.insert(IpAddr::V4(overlay.into()).into(), route.clone())
                .unwrap();
            fib.insert(
                IpAddr::V4(match route.infra.ip() {
                    IpAddr::V4(ip) => ip,
                    IpAddr::V6(_) => unreachable!(),
                })
                .into(),
                route,
            )
            .unwrap();
        }
        let outside = |name: &str, id| Route {
            entity: name.into(),
            identity: id,
            keys: KeyRing::derive(&w.secret, name, w.rot, NOW),
            infra: addr("10.0.0.2:6080"),
            sap: None,
            outside: true,
        };
        fib.insert(
            "203.0.113.0/24".parse().unwrap(),
            outside("outside/admitted", admitted),
        )
        .unwrap();
        fib.insert("0.0.0.0/0".parse().unwrap(), outside("outside/rest", rest))
            .unwrap();
        w.tables.fib = fib.build();
        w.tables.acl = acl.build();
        w
    }

    #[test]
    fn the_gateway_carries_outside_traffic_that_policy_admits_and_nothing_else() {
        let w = gateway_world();
        let b_pod = [10, 1, 2, 1];
        // An admitted outside address reaches b's pod IP on TCP 80, with b's key, straight to b.
        let pkt = build::tcp4([203, 0, 113, 5], 40000, b_pod, 80);
        let mut buf = with_headroom(pkt.clone());
        let send = gateway_ingress(&w.tables, &mut buf, NOW).unwrap();
        buf.drain(..send.start);
        assert_eq!(send.to, addr("10.1.2.1:6080"));
        assert_eq!(gue::decode(&buf).unwrap().key, key_of(&w, "ns/b"));
        // b takes it from the gateway (a SaP), and checks policy again.
        let fb = flows();
        let mut b = w.b.clone();
        b.infra = addr("10.1.2.1:6080");
        let range = endpoint_ingress(&w.tables, &b, &fb, &buf, addr("10.0.0.2:6080"), NOW).unwrap();
        assert_eq!(&buf[range], &pkt[..]);
        // The same datagram from the outside address itself is not vouched for by any SaP.
        assert_eq!(
            endpoint_ingress(&w.tables, &b, &flows(), &buf, addr("203.0.113.5:6080"), NOW),
            Err(DropReason::SpoofedSource)
        );

        let gate = |src: [u8; 4], dst: [u8; 4], port: u16| {
            let mut buf = with_headroom(build::tcp4(src, 40000, dst, port));
            gateway_ingress(&w.tables, &mut buf, NOW).map(|s| s.to)
        };
        assert_eq!(
            gate([203, 0, 113, 5], b_pod, 81),
            Err(DropReason::DeniedByPolicy)
        );
        assert_eq!(
            gate([198, 51, 100, 7], b_pod, 80),
            Err(DropReason::DeniedByPolicy)
        );
        // A protected pod's own address arriving off the overlay got around its device.
        assert_eq!(gate(A_IP, b_pod, 80), Err(DropReason::OffOverlay));
        assert_eq!(gate([10, 1, 1, 1], b_pod, 80), Err(DropReason::OffOverlay));
        // Nothing goes to an outside address over the overlay.
        assert_eq!(
            gate([203, 0, 113, 5], [203, 0, 113, 9], 80),
            Err(DropReason::NoRoute)
        );
        let mut out = with_headroom(build::tcp4(A_IP, 40000, [203, 0, 113, 9], 80));
        assert_eq!(
            egress(&w.tables, &w.a, &flows(), &mut out, NOW),
            Err(DropReason::NoRoute)
        );
    }
}
