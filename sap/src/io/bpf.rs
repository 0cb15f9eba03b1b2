//! keyway's eBPF programs (`sap/bpf/endpoint.bpf.c`, compiled by `build.rs` with clang's BPF target
//! and embedded here) and their loader, through aya: pure Rust, no libbpf on the node.
//!
//! One [`EndpointPrograms`] per pod: `kw_ingress` on its `eth0`, `kw_egress` on its overlay
//! devices (IPv4, and IPv6 where it has one), sharing the pod's maps — its configuration, the flows the user-space engine admitted
//! (which the kernel then carries by itself), and per-CPU counters. `keyway_sap::io::fastpath`
//! keeps the maps in step with the engine; this module only knows their layout and the kernel.
//!
//! The programs are attached through tc's `clsact` qdisc (netlink), not tcx links: a tc filter
//! belongs to the device, not to the process that attached it, so a pod's fast path keeps working
//! while its agent restarts with nothing pinned in bpffs, and goes with the pod's namespace. The
//! filter holds its program and the program its maps, so a new agent of the same build takes them
//! over by id ([`EndpointPrograms::adopt`], [`NodePrograms::adopt`]), flows and all; one of
//! another build replaces the filters (same priority and handle) atomically with its own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfError, EbpfLoader, TestRun, TestRunOptions};
use keyway_core::engine::DropReason;
use keyway_core::flow::{FlowKey, FlowTable, FlowWatcher};
use keyway_core::key::Key;
use keyway_core::packet::{Classified, Transport};

/// The endpoint programs' object, as `build.rs` compiled it.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/endpoint.bpf.o"));

const INGRESS_PROGRAM: &str = "kw_ingress";
const EGRESS_PROGRAM: &str = "kw_egress";
const CONFIG: &str = "kw_config";
const INGRESS_VERDICTS: &str = "kw_ingress_verdicts";
const CARRIED: &str = "kw_carried";
const EGRESS_FLOWS: &str = "kw_egress_flows";
const INGRESS_FLOWS: &str = "kw_ingress_flows";
const EGRESS_FLOWS6: &str = "kw_egress6";
const INGRESS_FLOWS6: &str = "kw_ingress6";
const CONNS: &str = "kw_conns";
const ENGINE_FLOWS: &str = "kw_engine_flows";

/// The tc filter's priority and handle: keyway's on every device it attaches to, so that a new
/// agent's attach replaces its predecessor's filter instead of adding a second one.
pub const FILTER_PRIORITY: u16 = 0x4b57; // "KW"
const FILTER_HANDLE: u32 = 1;

/// tc's verdict for a packet that goes on (`TC_ACT_OK`).
pub const TC_ACT_OK: u32 = 0;
/// tc's verdict for a packet a program redirected (`TC_ACT_REDIRECT`).
pub const TC_ACT_REDIRECT: u32 = 7;

/// What the ingress program decided about a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Through the kernel's checks: on to the user-space path, or delivered by the fast path.
    Pass,
    /// Failed a check, for the engine's reason: never carried, left to the user-space path,
    /// which drops and counts it.
    Drop(DropReason),
}

/// The program's verdict counters, by index (`enum verdict` in `endpoint.bpf.c`).
pub const INGRESS_VERDICTS_BY_INDEX: [Verdict; 4] = [
    Verdict::Pass,
    Verdict::Drop(DropReason::Malformed),
    Verdict::Drop(DropReason::BadKey),
    Verdict::Drop(DropReason::WrongDestination),
];

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("cannot load keyway's eBPF object: {0}")]
    Object(#[source] Box<EbpfError>),
    #[error("the object has no {0}")]
    Missing(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("attaching {name} to {device}: {source}")]
    Attach {
        name: &'static str,
        device: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("the clsact qdisc on {device}: {source}")]
    Qdisc {
        device: String,
        #[source]
        source: Box<tc::TcError>,
    },
    #[error("cannot pin the node's maps for a pod's programs at {0}: {1}")]
    Pin(std::path::PathBuf, #[source] std::io::Error),
    #[error("the pod accepts {0} keys; the program holds at most 3")]
    TooManyKeys(usize),
    #[error("one run of the program counted several verdicts: {0:?}")]
    Counted(Vec<Verdict>),
}

/// What the programs know of their pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointConfig {
    pub overlay: Option<Ipv4Addr>,
    pub infra: Option<Ipv4Addr>,
    pub gue_port: u16,
    /// The keys the pod accepts now ([`keyway_core::key::KeyRing::accepted_at`]).
    pub keys: Vec<Key>,
    /// The IPv4 overlay device (in the pod's namespace), where the fast path delivers IPv4.
    pub tun_ifindex: u32,
    /// The pod's IPv6 overlay address, and its device, where the fast path delivers IPv6.
    pub overlay6: Option<Ipv6Addr>,
    pub tun6_ifindex: u32,
    /// The pod's `eth0`, where the fast path sends.
    pub eth_ifindex: u32,
    /// Whether the programs carry the flows in their maps; off, they only check.
    pub fast: bool,
}

impl EndpointConfig {
    /// `struct endpoint_config` as the programs read it: addresses and port in network order,
    /// the number of keys and the keys in host order (as GUE's group identifier is read), the
    /// two devices' indices, the flags, the lease (CLOCK_MONOTONIC ns, low word first), then the
    /// IPv6 overlay address (its bytes) and its device's index.
    fn words(&self, lease_ns: u64) -> Result<[u32; CONFIG_WORDS], BpfError> {
        if self.keys.len() > 3 {
            return Err(BpfError::TooManyKeys(self.keys.len()));
        }
        let mut w = [
            net_v4(self.overlay),
            net_v4(self.infra),
            net_port(self.gue_port),
            self.keys.len() as u32,
            0,
            0,
            0,
            self.tun_ifindex,
            self.eth_ifindex,
            u32::from(self.fast),
            lease_ns as u32,
            (lease_ns >> 32) as u32,
            0,
            0,
            0,
            0,
            self.tun6_ifindex,
        ];
        for (slot, k) in w[4..7].iter_mut().zip(&self.keys) {
            *slot = k.0;
        }
        if let Some(o) = self.overlay6 {
            for (slot, b) in w[12..16].iter_mut().zip(o.octets().chunks_exact(4)) {
                *slot = u32::from_ne_bytes(b.try_into().expect("4 bytes"));
            }
        }
        Ok(w)
    }
}

/// `struct endpoint_config`'s size in 32-bit words.
const CONFIG_WORDS: usize = 17;

/// An address as the program compares it: its bytes in network order, read natively.
fn net_v4(ip: Option<Ipv4Addr>) -> u32 {
    ip.map_or(0, |a| u32::from_ne_bytes(a.octets()))
}

fn net_port(port: u16) -> u32 {
    u32::from(u16::from_ne_bytes(port.to_be_bytes()))
}

/// An IPv4 flow as the programs key it (`struct flow4`): the engine's five-tuple. For an ICMP
/// echo, `sport` is its identifier and `dport` its type and code (`type << 8 | code`): a request
/// and its reply are two flows, so that a flow the engine admitted as a reply never carries a
/// request (which policy judges).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// ICMP's echo reply and echo request types.
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

impl Flow4 {
    /// The flow of an inner IPv4 packet, when the fast path may carry packets of it: no IP
    /// options, not a fragment, TCP, UDP or an ICMP echo (the same test the programs make, less
    /// TCP's flags: the first packet of a flow is what teaches the kernel the flow).
    pub fn of_packet(p: &[u8]) -> Option<Flow4> {
        use keyway_core::packet::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
        if p.len() < 20 || p[0] != 0x45 || u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 {
            return None;
        }
        let proto = p[9];
        let need = match proto {
            PROTO_TCP => 20,
            PROTO_UDP | PROTO_ICMP => 8,
            _ => return None,
        };
        if p.len() < 20 + need {
            return None;
        }
        let (sport, dport) = match proto {
            PROTO_ICMP if p[20] == ICMP_ECHO_REQUEST || p[20] == ICMP_ECHO_REPLY => (
                u16::from_be_bytes([p[24], p[25]]),
                u16::from_be_bytes([p[20], p[21]]),
            ),
            PROTO_ICMP => return None,
            _ => (
                u16::from_be_bytes([p[20], p[21]]),
                u16::from_be_bytes([p[22], p[23]]),
            ),
        };
        Some(Flow4 {
            src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
            dst: Ipv4Addr::new(p[16], p[17], p[18], p[19]),
            proto,
            sport,
            dport,
        })
    }

    /// A packet of the flow past its first, as the engine re-judges a cached decision on: a TCP
    /// segment that neither opens nor resets, a UDP datagram, or an echo of its identifier.
    pub fn packet(&self) -> Vec<u8> {
        use keyway_core::packet::{PROTO_ICMP, build};
        let l4 = if self.proto == PROTO_ICMP {
            let [kind, code] = self.dport.to_be_bytes();
            let mut echo = build::echo(false, kind == ICMP_ECHO_REPLY, self.sport, 0);
            echo[1] = code;
            echo
        } else {
            build::ports(self.proto, self.sport, self.dport, b"")
        };
        build::ipv4(self.src, self.dst, self.proto, &l4)
    }

    /// The connection of a TCP or UDP packet or an ICMP echo between IPv4 addresses as the
    /// engine classified it (its IP options, if any, make no difference), as the kernel keys its
    /// connections (`kw_conns`): as the engine's flow table does, an echo's identifier stands for
    /// both its ports, so that a request and its reply key the same connection, each its way.
    pub fn of_classified(c: &Classified) -> Option<Flow4> {
        use keyway_core::packet::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (c.src, c.dst) else {
            return None;
        };
        let (sport, dport) = match c.transport {
            Transport::Ports { src, dst } if c.proto == PROTO_TCP || c.proto == PROTO_UDP => {
                (src, dst)
            }
            Transport::Echo { id, .. } if c.proto == PROTO_ICMP => (id, id),
            _ => return None,
        };
        Some(Flow4 {
            src,
            dst,
            proto: c.proto,
            sport,
            dport,
        })
    }

    /// The engine's flow `k`, when it is one of two ports between IPv4 addresses.
    pub fn of_key(k: &FlowKey) -> Option<Flow4> {
        use keyway_core::packet::{PROTO_TCP, PROTO_UDP};
        match (k.opener(), k.peer(), k.proto()) {
            ((IpAddr::V4(src), sport), (IpAddr::V4(dst), dport), proto)
                if proto == PROTO_TCP || proto == PROTO_UDP =>
            {
                Some(Flow4 {
                    src,
                    dst,
                    proto,
                    sport,
                    dport,
                })
            }
            _ => None,
        }
    }

    /// The engine's key of this flow (its opener being `src`).
    pub fn key(&self) -> FlowKey {
        FlowKey::new(
            self.src.into(),
            self.sport,
            self.dst.into(),
            self.dport,
            self.proto,
        )
    }

    /// The flow of the other way: what a reply to this flow's packets belongs to.
    pub fn reversed(&self) -> Flow4 {
        Flow4 {
            src: self.dst,
            dst: self.src,
            proto: self.proto,
            sport: self.dport,
            dport: self.sport,
        }
    }

    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.src.octets());
        b[4..8].copy_from_slice(&self.dst.octets());
        b[8..10].copy_from_slice(&self.sport.to_be_bytes());
        b[10..12].copy_from_slice(&self.dport.to_be_bytes());
        b[12] = self.proto;
        b
    }

    fn from_bytes(b: &[u8]) -> Flow4 {
        Flow4 {
            src: Ipv4Addr::new(b[0], b[1], b[2], b[3]),
            dst: Ipv4Addr::new(b[4], b[5], b[6], b[7]),
            sport: u16::from_be_bytes([b[8], b[9]]),
            dport: u16::from_be_bytes([b[10], b[11]]),
            proto: b[12],
        }
    }
}

/// An IPv6 flow as the programs key it (`struct flow6`), as [`Flow4`]: for an ICMPv6 echo,
/// `sport` is its identifier and `dport` its type and code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// ICMPv6's echo request and echo reply types.
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

impl Flow6 {
    /// The flow of an inner IPv6 packet, when the fast path may carry packets of it: the
    /// transport header right after the fixed header (no extension headers, so no fragment),
    /// TCP, UDP or an ICMPv6 echo.
    pub fn of_packet(p: &[u8]) -> Option<Flow6> {
        use keyway_core::packet::{PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
        if p.len() < 40 || p[0] >> 4 != 6 {
            return None;
        }
        let proto = p[6];
        let need = match proto {
            PROTO_TCP => 20,
            PROTO_UDP | PROTO_ICMPV6 => 8,
            _ => return None,
        };
        if p.len() < 40 + need {
            return None;
        }
        let (sport, dport) = match proto {
            PROTO_ICMPV6 if p[40] == ICMPV6_ECHO_REQUEST || p[40] == ICMPV6_ECHO_REPLY => (
                u16::from_be_bytes([p[44], p[45]]),
                u16::from_be_bytes([p[40], p[41]]),
            ),
            PROTO_ICMPV6 => return None,
            _ => (
                u16::from_be_bytes([p[40], p[41]]),
                u16::from_be_bytes([p[42], p[43]]),
            ),
        };
        Some(Flow6 {
            src: v6_at(p, 8),
            dst: v6_at(p, 24),
            proto,
            sport,
            dport,
        })
    }

    /// A packet of the flow past its first (see [`Flow4::packet`]).
    pub fn packet(&self) -> Vec<u8> {
        use keyway_core::packet::{PROTO_ICMPV6, build};
        let l4 = if self.proto == PROTO_ICMPV6 {
            let [kind, code] = self.dport.to_be_bytes();
            let mut echo = build::echo(true, kind == ICMPV6_ECHO_REPLY, self.sport, 0);
            echo[1] = code;
            echo
        } else {
            build::ports(self.proto, self.sport, self.dport, b"")
        };
        build::ipv6(self.src, self.dst, self.proto, &l4)
    }

    fn bytes(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[0..16].copy_from_slice(&self.src.octets());
        b[16..32].copy_from_slice(&self.dst.octets());
        b[32..34].copy_from_slice(&self.sport.to_be_bytes());
        b[34..36].copy_from_slice(&self.dport.to_be_bytes());
        b[36] = self.proto;
        b
    }

    fn from_bytes(b: &[u8]) -> Flow6 {
        Flow6 {
            src: v6_at(b, 0),
            dst: v6_at(b, 16),
            sport: u16::from_be_bytes([b[32], b[33]]),
            dport: u16::from_be_bytes([b[34], b[35]]),
            proto: b[36],
        }
    }
}

/// The IPv6 address at `at` in `b` (which holds it).
fn v6_at(b: &[u8], at: usize) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&b[at..at + 16]).expect("16 bytes"))
}

/// A flow of a pod's, of either family: the kernel keeps each family's in maps of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Flow {
    V4(Flow4),
    V6(Flow6),
}

impl Flow {
    /// The flow of an inner packet, when the fast path may carry packets of it.
    pub fn of_packet(p: &[u8]) -> Option<Flow> {
        match p.first()? >> 4 {
            4 => Flow4::of_packet(p).map(Flow::V4),
            6 => Flow6::of_packet(p).map(Flow::V6),
            _ => None,
        }
    }

    /// A packet of the flow past its first, as the engine re-judges a cached decision on.
    pub fn packet(&self) -> Vec<u8> {
        match self {
            Flow::V4(f) => f.packet(),
            Flow::V6(f) => f.packet(),
        }
    }

    pub fn src(&self) -> IpAddr {
        match self {
            Flow::V4(f) => IpAddr::V4(f.src),
            Flow::V6(f) => IpAddr::V6(f.src),
        }
    }

    pub fn dst(&self) -> IpAddr {
        match self {
            Flow::V4(f) => IpAddr::V4(f.dst),
            Flow::V6(f) => IpAddr::V6(f.dst),
        }
    }
}

/// A flow the engine admitted on egress straight to the destination's endpoint (`struct
/// egress_flow`): where it sent the flow's packet and with which key, and when the kernel last
/// carried one (CLOCK_MONOTONIC, ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressFlow {
    pub to: SocketAddrV4,
    pub key: Key,
    pub seen_ns: u64,
}

impl EgressFlow {
    fn bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(&self.to.ip().octets());
        b[4..6].copy_from_slice(&self.to.port().to_be_bytes());
        b[8..12].copy_from_slice(&self.key.0.to_ne_bytes());
        b[16..24].copy_from_slice(&self.seen_ns.to_ne_bytes());
        b
    }

    fn from_bytes(b: &[u8; 24]) -> EgressFlow {
        let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
        let port = u16::from_be_bytes([b[4], b[5]]);
        EgressFlow {
            to: SocketAddrV4::new(ip, port),
            key: Key(u32::from_ne_bytes([b[8], b[9], b[10], b[11]])),
            seen_ns: u64::from_ne_bytes(b[16..24].try_into().expect("8 bytes")),
        }
    }
}

/// A flow the engine admitted on ingress from one outer source (`struct ingress_flow_key`, or
/// `struct ingress_flow_key6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IngressFlow {
    pub outer_src: Ipv4Addr,
    pub inner: Flow,
}

/// What a pod's programs were configured with, as [`EndpointPrograms::configured`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Configured {
    pub overlay: Option<Ipv4Addr>,
    pub infra: Option<Ipv4Addr>,
    pub overlay6: Option<Ipv6Addr>,
    pub lease_ns: u64,
}

/// What the fast path carried (`enum carried`), summed over CPUs: packets (a GSO packet counts
/// as its segments) and inner bytes, each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    pub egress_packets: u64,
    pub egress_bytes: u64,
    pub ingress_packets: u64,
    pub ingress_bytes: u64,
    /// Of those packets, both ways, the ones the compiled policy admitted (not a flow the
    /// engine had admitted first).
    pub compiled: u64,
}

impl std::ops::AddAssign for Carried {
    fn add_assign(&mut self, o: Carried) {
        self.egress_packets += o.egress_packets;
        self.egress_bytes += o.egress_bytes;
        self.ingress_packets += o.ingress_packets;
        self.ingress_bytes += o.ingress_bytes;
        self.compiled += o.compiled;
    }
}

/// One pod's programs and maps, in the kernel: loaded by this agent, or adopted from the agent
/// before it ([`EndpointPrograms::adopt`]).
pub struct EndpointPrograms {
    egress: SchedClassifier,
    ingress: SchedClassifier,
    config: Array<MapData, [u32; CONFIG_WORDS]>,
    verdicts: PerCpuArray<MapData, u64>,
    carried: PerCpuArray<MapData, u64>,
    flows: Option<FlowMaps>,
    engine_flows: Option<HashMap<MapData, [u8; 16], u32>>,
    shared: Option<SharedMaps>,
}

impl EndpointPrograms {
    /// Loads both programs and their maps: needs CAP_BPF (or root) and a kernel with BPF. With
    /// `node`, they read the node's compiled policy from the node's own maps (handed over as
    /// [`loaded`] says, through a writable directory given with them); without, from maps of
    /// their own that nothing fills (they judge nothing by policy).
    pub fn load(
        node: Option<(SharedMaps, &std::path::Path)>,
    ) -> Result<EndpointPrograms, BpfError> {
        let parts = loaded(
            OBJECT,
            [EGRESS_PROGRAM, INGRESS_PROGRAM],
            &ENDPOINT_TAGS,
            node,
        )?;
        EndpointPrograms::from_parts(parts)
    }

    /// The node's maps these programs read, by id.
    pub fn shared_maps(&self) -> Option<SharedMaps> {
        self.shared
    }

    /// Takes over the programs an earlier agent attached to a pod's devices, with their maps
    /// (the flows they carry, their configuration and lease, their counters), when they are
    /// this build's programs: `egress` and `ingress` are the programs' ids, as the devices' tc
    /// filters name them ([`super::netlink::Netlink::bpf_filter_program`]). `Ok(None)`: they
    /// are another build's, or do not share their maps as one load does; load new ones.
    ///
    /// Programs that read another node's maps than `node` (an earlier agent's, which this one
    /// replaced) are not taken over either: nothing would keep their policy true.
    pub fn adopt(
        egress: u32,
        ingress: u32,
        node: Option<SharedMaps>,
    ) -> Result<Option<EndpointPrograms>, BpfError> {
        let own = own_tags(&ENDPOINT_TAGS, || EndpointPrograms::load(None).map(drop))?;
        let ids = [(egress, EGRESS_PROGRAM), (ingress, INGRESS_PROGRAM)];
        match adopted(&ids, &own)? {
            Some(parts) => match unless_missing(EndpointPrograms::from_parts(parts))? {
                Some(p) if node.is_none() || p.shared == node => Ok(Some(p)),
                _ => Ok(None),
            },
            None => Ok(None),
        }
    }

    fn from_parts(parts: Parts<2>) -> Result<EndpointPrograms, BpfError> {
        let Parts {
            programs: [egress, ingress],
            mut maps,
        } = parts;
        let shared = SharedMaps::of(&maps);
        Ok(EndpointPrograms {
            shared,
            config: maps.typed(CONFIG)?,
            verdicts: maps.typed(INGRESS_VERDICTS)?,
            carried: maps.typed(CARRIED)?,
            flows: Some(FlowMaps {
                egress: maps.typed(EGRESS_FLOWS)?,
                ingress: maps.typed(INGRESS_FLOWS)?,
                egress6: maps.typed(EGRESS_FLOWS6)?,
                ingress6: maps.typed(INGRESS_FLOWS6)?,
                conns: maps.typed(CONNS)?,
            }),
            engine_flows: Some(maps.typed(ENGINE_FLOWS)?),
            egress,
            ingress,
        })
    }

    /// Tells the programs about their pod (replacing what they knew), with no lease: the flow
    /// maps are not used.
    pub fn configure(&mut self, c: &EndpointConfig) -> Result<(), BpfError> {
        self.configure_with_lease(c, 0)
    }

    /// Tells the programs about their pod, and lets them use the flow maps until `lease_ns`
    /// (CLOCK_MONOTONIC) when `c.fast` says so.
    pub fn configure_with_lease(
        &mut self,
        c: &EndpointConfig,
        lease_ns: u64,
    ) -> Result<(), BpfError> {
        let words = c.words(lease_ns)?;
        self.config
            .set(0, words, 0)
            .map_err(|e| map_error(CONFIG, e))
    }

    /// What the programs know now: their pod's addresses (its IPv4 overlay address, its pod
    /// IP, its IPv6 overlay address), and their lease (CLOCK_MONOTONIC ns; 0: none).
    pub fn configured(&self) -> Result<Configured, BpfError> {
        let w = self.config.get(&0, 0).map_err(|e| map_error(CONFIG, e))?;
        let v4 = |w: u32| (w != 0).then(|| Ipv4Addr::from(w.to_ne_bytes()));
        let mut v6 = [0u8; 16];
        for (b, w) in v6.chunks_exact_mut(4).zip(&w[12..16]) {
            b.copy_from_slice(&w.to_ne_bytes());
        }
        Ok(Configured {
            overlay: v4(w[0]),
            infra: v4(w[1]),
            overlay6: (v6 != [0; 16]).then(|| Ipv6Addr::from(v6)),
            lease_ns: u64::from(w[10]) | u64::from(w[11]) << 32,
        })
    }

    /// The ingress verdicts so far, summed over CPUs, in [`INGRESS_VERDICTS_BY_INDEX`] order.
    pub fn verdicts(&self) -> Result<[u64; 4], BpfError> {
        per_cpu_sums(&self.verdicts, INGRESS_VERDICTS)
    }

    /// What the fast path has carried so far.
    pub fn carried(&self) -> Result<Carried, BpfError> {
        let c = per_cpu_sums::<5>(&self.carried, CARRIED)?;
        Ok(Carried {
            egress_packets: c[0],
            egress_bytes: c[1],
            ingress_packets: c[2],
            ingress_bytes: c[3],
            compiled: c[4],
        })
    }

    /// The programs' ids: `kw_egress`'s, `kw_ingress`'s.
    pub fn ids(&self) -> [u32; 2] {
        [&self.egress, &self.ingress].map(|p| p.info().map(|i| i.id()).unwrap_or_default())
    }

    /// Attaches `kw_egress` to the overlay devices `tuns` and `kw_ingress` to `eth`, replacing a
    /// predecessor's programs there. Call inside the pod's network namespace. The filters stay
    /// when this process exits (see the module's documentation); [`detach`] removes them.
    pub fn attach(&mut self, tuns: &[&str], eth: &str) -> Result<(), BpfError> {
        for tun in tuns {
            self.attach_egress(tun)?;
        }
        attach_filter(
            &mut self.ingress,
            INGRESS_PROGRAM,
            eth,
            TcAttachType::Ingress,
        )
    }

    /// Attaches `kw_egress` to the overlay device `tun` (as [`EndpointPrograms::attach`]).
    pub fn attach_egress(&mut self, tun: &str) -> Result<(), BpfError> {
        attach_filter(&mut self.egress, EGRESS_PROGRAM, tun, TcAttachType::Egress)
    }

    /// The flow maps, taken out (the programs keep using them).
    pub fn take_flows(&mut self) -> Result<FlowMaps, BpfError> {
        self.flows.take().ok_or(BpfError::Missing(EGRESS_FLOWS))
    }

    /// The kernel's copy of the engine's UDP flows, taken out, and not whole until
    /// [`EngineFlows::mirror`] makes it so: until then the programs open no UDP flow.
    pub fn take_engine_flows(&mut self) -> Result<std::sync::Arc<EngineFlows>, BpfError> {
        let mut map = self
            .engine_flows
            .take()
            .ok_or(BpfError::Missing(ENGINE_FLOWS))?;
        // (An earlier agent's copy: of flows this agent's engine may not hold, which is safe,
        // but not of all it holds.)
        let _ = map.remove(&WHOLE);
        Ok(std::sync::Arc::new(EngineFlows {
            inner: std::sync::Mutex::new(EngineFlowsInner { map, whole: false }),
        }))
    }

    /// Runs `kw_ingress` once on `frame` (Ethernet, as it arrives on the pod's eth0) through
    /// `BPF_PROG_TEST_RUN`, and says what it decided: the tc action and the verdict it counted.
    pub fn run_ingress(&mut self, frame: &[u8]) -> Result<(u32, Verdict), BpfError> {
        let before = self.verdicts()?;
        let result = self
            .ingress
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..TestRunOptions::default()
            })
            .map_err(|e| program_error(INGRESS_PROGRAM, e))?;
        let after = self.verdicts()?;
        let counted: Vec<Verdict> = INGRESS_VERDICTS_BY_INDEX
            .iter()
            .zip(before.iter().zip(after))
            .filter(|(_, (b, a))| a > *b)
            .map(|(v, _)| *v)
            .collect();
        // A frame that is not GUE to the pod is left alone without a count: it passed.
        let verdict = match counted.as_slice() {
            [] | [Verdict::Pass] => Verdict::Pass,
            [v] => *v,
            more => return Err(BpfError::Counted(more.to_vec())),
        };
        Ok((result.return_value, verdict))
    }

    /// Runs `kw_egress` once on `packet` (an IP packet, as the pod's stack sends it into its
    /// overlay device) through `BPF_PROG_TEST_RUN`, and returns the tc action and the packet as
    /// the program left it. The kernel test-runs a tc program only on a frame whose first 14
    /// bytes it takes for an Ethernet header, though the program sees the frame from its start:
    /// the packet's bytes 12 and 13 (the first half of its source address) become the skb's
    /// protocol (IPv4 for a source in 8.0.0.0/16), and the program puts an encapsulated
    /// packet's headers over the packet's first 14 bytes, so only the rest of it follows them
    /// in what is returned.
    pub fn run_egress(&mut self, packet: &[u8]) -> Result<(u32, Vec<u8>), BpfError> {
        let mut out = vec![0u8; packet.len() + 128];
        let result = self
            .egress
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .map_err(|e| program_error(EGRESS_PROGRAM, e))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }
}

impl std::fmt::Debug for EndpointPrograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointPrograms")
            .field("ids", &self.ids())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for NodePrograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodePrograms")
            .field("bridge", &self.bridge_id())
            .field("sap", &self.sap_id())
            .finish_non_exhaustive()
    }
}

/// The tags (the kernel's hash of a program's instructions, map references left out) of this
/// build's `kw_egress` and `kw_ingress`, once loaded: what tells a predecessor's programs that
/// this agent may take over from one it must replace.
static ENDPOINT_TAGS: std::sync::OnceLock<[u64; 2]> = std::sync::OnceLock::new();
/// The same for `kw_bridge_egress`, `kw_sap` and `kw_gateway`.
static NODE_TAGS: std::sync::OnceLock<[u64; 3]> = std::sync::OnceLock::new();

/// The tags `tags` holds, after `load` has loaded the object once if nothing had yet.
fn own_tags<const N: usize>(
    tags: &std::sync::OnceLock<[u64; N]>,
    load: impl FnOnce() -> Result<(), BpfError>,
) -> Result<[u64; N], BpfError> {
    if tags.get().is_none() {
        load()?;
    }
    tags.get()
        .copied()
        .ok_or(BpfError::Missing("the programs' tags"))
}

/// The key that says the kernel's copy of the engine's UDP flows is whole (`kw_engine_flows`).
const WHOLE: [u8; 16] = [0; 16];

/// The kernel's copy of the UDP flows the engine holds (`kw_engine_flows`), which tells a pod's
/// programs when a UDP datagram may be a reply only the engine knows of (`endpoint.bpf.c`).
///
/// It watches the endpoint's flow table, so every UDP flow the engine tracks is added before
/// the packet that opened it goes on. It may hold flows the engine no longer does (removed at
/// [`EngineFlows::prune`]); it holds every one the engine does while it is whole. When the map
/// cannot take one, it stops being whole (the programs then open no UDP flow) until a prune
/// has made room and added them all again.
pub struct EngineFlows {
    inner: std::sync::Mutex<EngineFlowsInner>,
}

struct EngineFlowsInner {
    map: HashMap<MapData, [u8; 16], u32>,
    whole: bool,
}

impl std::fmt::Debug for EngineFlows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineFlows")
            .field("whole", &self.lock().whole)
            .finish_non_exhaustive()
    }
}

impl FlowWatcher for EngineFlows {
    fn tracked(&self, key: &FlowKey) {
        let Some(f) = Flow4::of_key(key).filter(|f| f.proto == keyway_core::packet::PROTO_UDP)
        else {
            return;
        };
        let mut m = self.lock();
        if let Err(e) = m.map.insert(f.bytes(), 1, 0) {
            if m.whole {
                tracing::debug!(error = %e, "the kernel's copy of the engine's UDP flows is full: UDP's first packets take the user-space path until the next sync");
            }
            m.whole = false;
            let _ = m.map.remove(&WHOLE);
        }
    }
}

impl EngineFlows {
    fn lock(&self) -> std::sync::MutexGuard<'_, EngineFlowsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches `flows` (adding every UDP flow it holds now), and says the copy is whole when
    /// every one could be added.
    pub fn mirror(self: &std::sync::Arc<Self>, flows: &FlowTable) {
        self.lock().whole = true;
        flows.watch(self.clone());
        let mut m = self.lock();
        if m.whole && m.map.insert(WHOLE, 1, 0).is_err() {
            m.whole = false;
        }
    }

    /// Removes the flows `flows` no longer holds, live, at `now_ms`; when the copy was not
    /// whole, adds all it holds again.
    pub fn prune(self: &std::sync::Arc<Self>, flows: &FlowTable, now_ms: u64) {
        let whole = self.whole();
        let keys = self.flows().into_iter().map(|f| f.key());
        flows.forget_untracked(keys, now_ms, |k| {
            if let Some(f) = Flow4::of_key(k) {
                let _ = self.lock().map.remove(&f.bytes());
            }
        });
        if !whole {
            self.mirror(flows);
        }
    }

    /// Whether the copy is whole (the programs open UDP flows).
    pub fn whole(&self) -> bool {
        self.lock().whole
    }

    /// The flows the copy holds.
    pub fn flows(&self) -> Vec<Flow4> {
        self.lock()
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| *k != WHOLE)
            .map(|k| Flow4::from_bytes(&k))
            .collect()
    }
}

/// An object's programs, loaded or taken over, and its maps by name.
struct Parts<const N: usize> {
    programs: [SchedClassifier; N],
    maps: NamedMaps,
}

struct NamedMaps(Vec<(&'static str, Map)>);

impl NamedMaps {
    /// Map `name`, as its typed handle.
    fn typed<T>(&mut self, name: &'static str) -> Result<T, BpfError>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        let at = self
            .0
            .iter()
            .position(|(n, _)| *n == name)
            .ok_or(BpfError::Missing(name))?;
        T::try_from(self.0.swap_remove(at).1).map_err(|e| map_error(name, e))
    }
}

/// A taken-over object that lacks one of its maps is not one to take over.
fn unless_missing<T>(built: Result<T, BpfError>) -> Result<Option<T>, BpfError> {
    match built {
        Ok(t) => Ok(Some(t)),
        Err(BpfError::Missing(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Loads `object` (no kernel BTF: the programs use no CO-RE relocations, and parsing the
/// kernel's BTF, which `Ebpf::load` does twice, costs tens of milliseconds and megabytes) and
/// its programs `names` into the kernel, records their tags in `tags`, and returns handles of
/// their own on the programs, with the maps.
///
/// With `shared`, the object's maps of those names are the node's, not new ones. aya takes an
/// existing map only as a pinned one, so they are pinned for the load alone ([`PinnedForLoad`]):
/// nothing is left pinned on the node.
fn loaded<const N: usize>(
    object: &[u8],
    names: [&'static str; N],
    tags: &std::sync::OnceLock<[u64; N]>,
    shared: Option<(SharedMaps, &std::path::Path)>,
) -> Result<Parts<N>, BpfError> {
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    let pins = match shared {
        Some((s, scratch)) => Some(PinnedForLoad::pin(&s.by_name(), scratch)?),
        None => None,
    };
    if let Some(p) = &pins {
        for (name, path) in p.paths() {
            loader.map_pin_path(name, path);
        }
    }
    let mut ebpf = loader
        .load(object)
        .map_err(|e| BpfError::Object(Box::new(e)))?;
    drop(pins);
    let mut programs = Vec::with_capacity(N);
    let mut own = [0u64; N];
    for (slot, name) in own.iter_mut().zip(names) {
        let program = classifier_mut(&mut ebpf, name)?;
        program.load().map_err(|e| program_error(name, e))?;
        let info = program.info().map_err(|e| program_error(name, e))?;
        *slot = info.tag();
        programs.push(
            SchedClassifier::from_program_info(info, name.into())
                .map_err(|e| program_error(name, e))?,
        );
    }
    let _ = tags.set(own);
    let maps = ebpf
        .maps_mut()
        .map(|(n, _)| n.to_string())
        .collect::<Vec<_>>()
        .into_iter()
        .filter_map(|n| map_name(&n).zip(ebpf.take_map(&n)))
        .collect();
    Ok(Parts {
        programs: programs
            .try_into()
            .map_err(|_| BpfError::Missing("a program"))?,
        maps: NamedMaps(maps),
    })
}

/// The programs of `ids` (each with the name it must have) and their maps, when every one is
/// this build's (its tag among `own`, in the same order) and they share their maps as one load
/// of the object does (one map per name across them). `Ok(None)` otherwise, or when a program
/// has gone meanwhile.
fn adopted<const N: usize>(
    ids: &[(u32, &'static str); N],
    own: &[u64],
) -> Result<Option<Parts<N>>, BpfError> {
    let mut infos = Vec::with_capacity(N);
    for (id, _) in ids {
        // Program ids come in increasing order: stop at the one wanted.
        let found = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .take_while(|p| p.id() <= *id)
            .find(|p| p.id() == *id);
        match found {
            Some(info) => infos.push(info),
            None => return Ok(None),
        }
    }
    if infos.iter().zip(own).any(|(i, tag)| i.tag() != *tag) {
        return Ok(None);
    }
    let mut by_name: Vec<(&'static str, u32)> = Vec::new();
    for (info, (_, program)) in infos.iter().zip(ids) {
        let map_ids = info
            .map_ids()
            .map_err(|e| program_error(program, e))?
            .unwrap_or_default();
        for map_id in map_ids {
            let Ok(map_info) = aya::maps::MapInfo::from_id(map_id) else {
                return Ok(None);
            };
            let Some(name) = map_info.name_as_str().and_then(map_name) else {
                continue;
            };
            match by_name.iter().find(|(n, _)| *n == name) {
                Some((_, other)) if *other != map_id => return Ok(None),
                Some(_) => {}
                None => by_name.push((name, map_id)),
            }
        }
    }
    let mut maps = Vec::with_capacity(by_name.len());
    for (name, id) in by_name {
        let data = MapData::from_id(id).map_err(|e| map_error(name, e))?;
        maps.push((
            name,
            Map::from_map_data(data).map_err(|e| map_error(name, e))?,
        ));
    }
    let mut programs = Vec::with_capacity(N);
    for (info, (_, name)) in infos.into_iter().zip(ids) {
        programs.push(
            SchedClassifier::from_program_info(info, (*name).into())
                .map_err(|e| program_error(name, e))?,
        );
    }
    Ok(Some(Parts {
        programs: programs
            .try_into()
            .map_err(|_| BpfError::Missing("a program"))?,
        maps: NamedMaps(maps),
    }))
}

/// keyway's map of name `kernel`: as the object names it, or cut to 15 bytes, as the kernel
/// keeps it.
fn map_name(kernel: &str) -> Option<&'static str> {
    [
        CONFIG,
        INGRESS_VERDICTS,
        CARRIED,
        EGRESS_FLOWS,
        INGRESS_FLOWS,
        EGRESS_FLOWS6,
        INGRESS_FLOWS6,
        CONNS,
        ENGINE_FLOWS,
        NODE_CONFIG,
        NODE_PODS,
        SAP_FLOWS,
        SAP_FLOWS6,
        SAP_CARRIED,
        SAP_ROUTES,
        SAP_ROUTES6,
        SAP_PAIRS,
        GATEWAY_FLOWS,
        GATEWAY_CARRIED,
    ]
    .into_iter()
    .find(|n| *n == kernel || &n[..n.len().min(15)] == kernel)
}

/// The first `N` slots of per-CPU counter array `name`, each summed over CPUs.
fn per_cpu_sums<const N: usize>(
    counters: &PerCpuArray<MapData, u64>,
    name: &'static str,
) -> Result<[u64; N], BpfError> {
    let mut out = [0u64; N];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = counters
            .get(&(i as u32), 0)
            .map_err(|e| map_error(name, e))?
            .iter()
            .sum();
    }
    Ok(out)
}

/// Removes keyway's filter from a pod's device (inside its namespace): `kw_egress` from an
/// overlay device, `kw_ingress` from the primary one. A device or filter that is not there is
/// not an error.
pub fn detach(device: &str, overlay: bool) {
    let (name, at) = if overlay {
        (EGRESS_PROGRAM, TcAttachType::Egress)
    } else {
        (INGRESS_PROGRAM, TcAttachType::Ingress)
    };
    let _ = tc::qdisc_detach_program(device, at, name);
}

/// Attaches `program` (named `name`) to `device` through clsact, in this thread's namespace,
/// replacing keyway's filter there if there is one (same priority and handle), and leaves it
/// attached when `program` goes (the filter is the device's).
fn attach_filter(
    program: &mut SchedClassifier,
    name: &'static str,
    device: &str,
    at: TcAttachType,
) -> Result<(), BpfError> {
    if let Err(e) = tc::qdisc_add_clsact(device) {
        let exists =
            matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST));
        if !exists {
            return Err(BpfError::Qdisc {
                device: device.to_string(),
                source: Box::new(e),
            });
        }
    }
    let attach_error = |source| BpfError::Attach {
        name,
        device: device.to_string(),
        source: Box::new(source),
    };
    let handle = TcHandle::new(0, FILTER_HANDLE as u16);
    let id = match program.attach_with_options(
        device,
        at,
        TcAttachOptions::Netlink(NlOptions {
            priority: FILTER_PRIORITY,
            handle,
            ..NlOptions::default()
        }),
    ) {
        Ok(id) => id,
        // A predecessor's filter: replace it in place, so no packet meets no program.
        Err(e) if is_exists(&e) => {
            let link = SchedClassifierLink::attached(device, at, FILTER_PRIORITY, handle, None)
                .map_err(|e| attach_error(ProgramError::IOError(e)))?;
            program.attach_to_link(link).map_err(attach_error)?
        }
        Err(e) => return Err(attach_error(e)),
    };
    // Dropping the link would detach it; the filter is the device's to keep.
    let link = program.take_link(id).map_err(attach_error)?;
    std::mem::forget(link);
    Ok(())
}

fn is_exists(e: &ProgramError) -> bool {
    matches!(e, ProgramError::TcError(tc::TcError::NetlinkError(n)) if n.raw_os_error() == Some(libc::EEXIST))
}

/// A pod's flow maps: egress and ingress, for each family.
#[derive(Debug)]
pub struct FlowMaps {
    egress: HashMap<MapData, [u8; 16], [u8; 24]>,
    ingress: HashMap<MapData, [u8; 20], [u8; 8]>,
    egress6: HashMap<MapData, [u8; 40], [u8; 24]>,
    ingress6: HashMap<MapData, [u8; 44], [u8; 8]>,
    conns: HashMap<MapData, [u8; 16], [u8; 16]>,
}

impl FlowMaps {
    pub fn insert_egress(&mut self, f: &Flow, e: &EgressFlow) -> Result<(), BpfError> {
        match f {
            Flow::V4(f) => self.egress.insert(f.bytes(), e.bytes(), 0),
            Flow::V6(f) => self.egress6.insert(f.bytes(), e.bytes(), 0),
        }
        .map_err(|e| map_error(EGRESS_FLOWS, e))
    }

    pub fn remove_egress(&mut self, f: &Flow) {
        let _ = match f {
            Flow::V4(f) => self.egress.remove(&f.bytes()),
            Flow::V6(f) => self.egress6.remove(&f.bytes()),
        };
    }

    /// Every egress flow the kernel holds.
    pub fn egress(&self) -> Vec<(Flow, EgressFlow)> {
        let v4 = self
            .egress
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Flow::V4(Flow4::from_bytes(&k)), EgressFlow::from_bytes(&v)));
        let v6 = self
            .egress6
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Flow::V6(Flow6::from_bytes(&k)), EgressFlow::from_bytes(&v)));
        v4.chain(v6).collect()
    }

    pub fn insert_ingress(&mut self, f: &IngressFlow, seen_ns: u64) -> Result<(), BpfError> {
        let seen = seen_ns.to_ne_bytes();
        let from = f.outer_src.octets();
        match &f.inner {
            Flow::V4(inner) => self.ingress.insert(keyed(from, inner.bytes()), seen, 0),
            Flow::V6(inner) => self.ingress6.insert(keyed(from, inner.bytes()), seen, 0),
        }
        .map_err(|e| map_error(INGRESS_FLOWS, e))
    }

    pub fn remove_ingress(&mut self, f: &IngressFlow) {
        let from = f.outer_src.octets();
        let _ = match &f.inner {
            Flow::V4(inner) => self.ingress.remove(&keyed(from, inner.bytes())),
            Flow::V6(inner) => self.ingress6.remove(&keyed(from, inner.bytes())),
        };
    }

    /// The connection the kernel opened as `f` (its opener's packets), if it holds one.
    pub fn conn(&self, f: &Flow4) -> Option<Conn> {
        self.conns
            .get(&f.bytes(), 0)
            .ok()
            .map(|v| Conn::from_bytes(&v))
    }

    /// Every connection the kernel opened and holds, by its opener's flow.
    pub fn conns(&self) -> Vec<(Flow4, Conn)> {
        self.conns
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Flow4::from_bytes(&k), Conn::from_bytes(&v)))
            .collect()
    }

    pub fn remove_conn(&mut self, f: &Flow4) {
        let _ = self.conns.remove(&f.bytes());
    }

    /// Every ingress flow the kernel holds, with when it last carried one of its packets.
    pub fn ingress(&self) -> Vec<(IngressFlow, u64)> {
        let flow = |k: &[u8], inner: Flow, v: [u8; 8]| {
            let outer_src = Ipv4Addr::new(k[0], k[1], k[2], k[3]);
            (IngressFlow { outer_src, inner }, u64::from_ne_bytes(v))
        };
        let v4 = self
            .ingress
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| flow(&k, Flow::V4(Flow4::from_bytes(&k[4..])), v));
        let v6 = self
            .ingress6
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| flow(&k, Flow::V6(Flow6::from_bytes(&k[4..])), v));
        v4.chain(v6).collect()
    }
}

/// A connection the kernel opened by the compiled policy (`struct conn` in `endpoint.bpf.c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    /// When the kernel last admitted one of its packets, either way (CLOCK_MONOTONIC, ns).
    pub seen_ns: u64,
    /// The peer opened it: its first datagram came from `outer_src`.
    pub inbound: bool,
    pub outer_src: Ipv4Addr,
}

impl Conn {
    fn from_bytes(b: &[u8; 16]) -> Conn {
        let flags = u32::from_ne_bytes([b[12], b[13], b[14], b[15]]);
        Conn {
            seen_ns: u64::from_ne_bytes(b[0..8].try_into().expect("8 bytes")),
            outer_src: Ipv4Addr::new(b[8], b[9], b[10], b[11]),
            inbound: flags & 1 != 0,
        }
    }
}

/// An ingress flow's key: the outer source, then the inner flow.
fn keyed<const N: usize, const M: usize>(from: [u8; 4], inner: [u8; N]) -> [u8; M] {
    let mut b = [0u8; M];
    b[..4].copy_from_slice(&from);
    b[4..].copy_from_slice(&inner);
    b
}

/// The node's programs (`sap/bpf/node.bpf.c`): GUE the node routes to one of its pods, handed
/// from the primary CNI's bridge straight to the pod's veth, whole; the node's SaP for the
/// flows the user-space SaP has already forwarded; and the node's gateway for the flows the
/// user-space gateway has already carried.
static NODE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/node.bpf.o"));
const BRIDGE_PROGRAM: &str = "kw_bridge_egress";
const SAP_PROGRAM: &str = "kw_sap";
const NODE_CONFIG: &str = "kw_node_config";
const NODE_PODS: &str = "kw_node_pods";
const SAP_FLOWS: &str = "kw_sap_flows";
const SAP_FLOWS6: &str = "kw_sap_flows6";
const SAP_CARRIED: &str = "kw_sap_carried";
const SAP_ROUTES: &str = "kw_sap_routes";
const SAP_ROUTES6: &str = "kw_sap_routes6";
const SAP_PAIRS: &str = "kw_sap_pairs";
const GATEWAY_PROGRAM: &str = "kw_gateway";
const GATEWAY_FLOWS: &str = "kw_gw_flows";
const GATEWAY_CARRIED: &str = "kw_gw_carried";

/// The node's maps a pod's programs share (`policy.h`): its configuration, the compiled policy's
/// IPv4 routes and pairs, by id. (The IPv6 routes, `kw_sap_routes6`, are the node's SaP's
/// alone: a pod's programs judge no IPv6 packet by the compiled policy.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedMaps {
    config: u32,
    routes: u32,
    pairs: u32,
}

impl SharedMaps {
    /// The ids of the shared maps among `maps` (a load's, or a taken-over program's).
    fn of(maps: &NamedMaps) -> Option<SharedMaps> {
        let id = |name: &str| {
            maps.0.iter().find(|(n, _)| *n == name).and_then(|(_, m)| {
                let data = match m {
                    Map::Array(d) | Map::HashMap(d) | Map::LpmTrie(d) => d,
                    _ => return None,
                };
                data.info().ok().map(|i| i.id())
            })
        };
        Some(SharedMaps {
            config: id(NODE_CONFIG)?,
            routes: id(SAP_ROUTES)?,
            pairs: id(SAP_PAIRS)?,
        })
    }

    fn by_name(&self) -> [(&'static str, u32); 3] {
        [
            (NODE_CONFIG, self.config),
            (SAP_ROUTES, self.routes),
            (SAP_PAIRS, self.pairs),
        ]
    }
}

/// Maps pinned for one load (see [`loaded`]), in a directory of its own: in the node's bpffs at
/// `/sys/fs/bpf` when there is one (a DaemonSet mounts it from the host, as most nodes have it),
/// else in a bpffs mounted for the load under a writable `scratch` directory (where the node
/// has none, as on the lab's machines). Unpinned on drop (the programs that use the maps keep
/// them), and the directory and any mount removed.
struct PinnedForLoad {
    dir: std::path::PathBuf,
    mounted: bool,
    maps: Vec<(&'static str, std::path::PathBuf)>,
}

/// The node's own bpffs, when mounted where systemd and Kubernetes' DaemonSets put it.
const NODE_BPFFS: &str = "/sys/fs/bpf";

impl PinnedForLoad {
    fn pin(
        maps: &[(&'static str, u32)],
        scratch: &std::path::Path,
    ) -> Result<PinnedForLoad, BpfError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("keyway-load-{}-{n}", std::process::id());
        let node_bpffs = nix::sys::statfs::statfs(NODE_BPFFS)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
        let mut pinned = PinnedForLoad {
            dir: if node_bpffs {
                std::path::Path::new(NODE_BPFFS).join(&name)
            } else {
                scratch.join(name)
            },
            mounted: false,
            maps: Vec::new(),
        };
        std::fs::create_dir_all(&pinned.dir).map_err(|e| BpfError::Pin(pinned.dir.clone(), e))?;
        if !node_bpffs {
            let flags = nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC;
            nix::mount::mount(Some("bpf"), &pinned.dir, Some("bpf"), flags, None::<&str>)
                .map_err(|e| BpfError::Pin(pinned.dir.clone(), e.into()))?;
            pinned.mounted = true;
        }
        for (name, id) in maps {
            let path = pinned.dir.join(name);
            MapData::from_id(*id)
                .map_err(|e| map_error(name, e))?
                .pin(&path)
                .map_err(|e| BpfError::Pin(path.clone(), std::io::Error::other(e)))?;
            pinned.maps.push((name, path));
        }
        Ok(pinned)
    }

    fn paths(&self) -> impl Iterator<Item = (&'static str, std::path::PathBuf)> + '_ {
        self.maps.iter().map(|(n, p)| (*n, p.clone()))
    }
}

impl Drop for PinnedForLoad {
    fn drop(&mut self) {
        for (_, path) in &self.maps {
            let _ = std::fs::remove_file(path);
        }
        if self.mounted {
            let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// One of the node's pods behind a bridge (`struct node_pod`): the node side of its veth, and
/// the Ethernet header the node's routing would give a datagram for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePod {
    pub veth_ifindex: u32,
    pub pod_mac: [u8; 6],
    pub bridge_mac: [u8; 6],
}

impl NodePod {
    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.veth_ifindex.to_ne_bytes());
        b[4..10].copy_from_slice(&self.pod_mac);
        b[10..16].copy_from_slice(&self.bridge_mac);
        b
    }
}

/// A flow the user-space SaP forwarded (`struct sap_flow_key`, or `struct sap_flow_key6` for an
/// inner IPv6 flow): the outer source it came from, the key it carried, its inner five-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SapFlow {
    pub outer_src: Ipv4Addr,
    pub key: Key,
    pub inner: Flow,
}

impl SapFlow {
    /// The key's bytes: the outer source (network order), the key (host order), then `inner`.
    fn bytes_with<const N: usize, const M: usize>(&self, inner: [u8; N]) -> [u8; M] {
        let mut b = [0u8; M];
        b[0..4].copy_from_slice(&self.outer_src.octets());
        b[4..8].copy_from_slice(&self.key.0.to_ne_bytes());
        b[8..].copy_from_slice(&inner);
        b
    }

    fn from_bytes(b: &[u8], inner: Flow) -> SapFlow {
        SapFlow {
            outer_src: Ipv4Addr::new(b[0], b[1], b[2], b[3]),
            key: Key(u32::from_ne_bytes([b[4], b[5], b[6], b[7]])),
            inner,
        }
    }
}

/// Where the SaP sends a flow's datagrams (`struct sap_flow`), and when the kernel last
/// forwarded one (CLOCK_MONOTONIC, ns; 0: not yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SapNextHop {
    pub to: SocketAddrV4,
    pub seen_ns: u64,
}

impl SapNextHop {
    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.to.ip().octets());
        b[4..6].copy_from_slice(&self.to.port().to_be_bytes());
        b[8..16].copy_from_slice(&self.seen_ns.to_ne_bytes());
        b
    }

    fn from_bytes(b: &[u8; 16]) -> SapNextHop {
        SapNextHop {
            to: SocketAddrV4::new(
                Ipv4Addr::new(b[0], b[1], b[2], b[3]),
                u16::from_be_bytes([b[4], b[5]]),
            ),
            seen_ns: u64::from_ne_bytes(b[8..16].try_into().expect("8 bytes")),
        }
    }
}

/// A route of the kernel SaP's compiled policy (`struct sap_route`): one prefix of the engine's
/// FIB, as the kernel's check needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SapRoute {
    /// The compilation it belongs to: the kernel uses it only while the node's configuration
    /// says that one is in force, so that it never judges by half of two compilations.
    pub generation: u32,
    pub identity: u32,
    pub infra: SocketAddrV4,
    /// The SaP that fronts it (`Route::sap`).
    pub sap: Option<SocketAddrV4>,
    /// Off the overlay (`Route::outside`).
    pub outside: bool,
    /// Its endpoint is a SaP's address: the engine refuses it as a destination (a loop).
    pub to_sap: bool,
    /// This SaP fronts it: the kernel may forward to it.
    pub fronted: bool,
    /// The kernel cannot judge it: any datagram from or to it goes to user space.
    pub unusable: bool,
    /// The keys it accepts throughout the agent's lease (at most 3).
    pub keys: Vec<Key>,
    /// The key a sender puts on what it sends it now (the engine's `KeyRing::key_at`), when it
    /// is among `keys`; else the pods' programs send it nothing by policy.
    pub send_key: Option<Key>,
}

impl SapRoute {
    fn bytes(&self) -> [u8; 48] {
        let flags = u32::from(self.outside)
            | u32::from(self.to_sap) << 1
            | u32::from(self.fronted) << 2
            | u32::from(self.unusable) << 3;
        let keys = &self.keys[..self.keys.len().min(3)];
        let mut w = [0u32; 12];
        w[0] = self.generation;
        w[1] = self.identity;
        w[2] = net_v4(Some(*self.infra.ip()));
        w[3] = net_port(self.infra.port());
        w[4] = net_v4(self.sap.map(|s| *s.ip()));
        w[5] = flags;
        w[6] = keys.len() as u32;
        for (slot, k) in w[7..10].iter_mut().zip(keys) {
            *slot = k.0;
        }
        w[10] = self.sap.map_or(0, |s| net_port(s.port()));
        w[11] = self.send_key.map_or(0, |k| k.0);
        words_bytes(w)
    }
}

/// Destination port ranges a pair of the compiled policy holds per protocol (`PAIR_RANGES`).
pub const PAIR_RANGES: usize = 8;

/// What policy allows from one identity to another, in the compiled policy's map (`struct
/// sap_pair`, from `keyway_core::acl::PairPolicy`), and whether the pair is direct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SapPair {
    /// `struct sap_pair` as the kernel reads it (its generation first).
    bytes: [u8; 80],
}

impl SapPair {
    /// The pair's entry (`p`: what policy allows it, `None` for nothing), or `None` when policy
    /// allows it nothing and it is not direct: no entry says the same, at no cost. A pair whose
    /// policy needs more ranges than fit is marked so, and user space judges it.
    pub fn of(
        generation: u32,
        p: Option<&keyway_core::acl::PairPolicy>,
        direct: bool,
    ) -> Option<SapPair> {
        let nothing = keyway_core::acl::PairPolicy::default();
        let p = p.unwrap_or(&nothing);
        let unknown = p.tcp.len() > PAIR_RANGES || p.udp.len() > PAIR_RANGES;
        let allows = p.everything || p.hbone || !p.tcp.is_empty() || !p.udp.is_empty();
        if !allows && !direct {
            return None;
        }
        let flags = u32::from(p.everything)
            | u32::from(p.mesh) << 1
            | u32::from(p.hbone) << 2
            | u32::from(direct) << 3
            | u32::from(unknown) << 4;
        let (tcp, udp) = if unknown {
            (&[][..], &[][..])
        } else {
            (&p.tcp[..], &p.udp[..])
        };
        let mut b = [0u8; 80];
        for (i, w) in [generation, flags, tcp.len() as u32, udp.len() as u32]
            .iter()
            .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        for (base, ranges) in [(16, tcp), (48, udp)] {
            for (i, r) in ranges.iter().enumerate() {
                let at = base + i * 4;
                b[at..at + 2].copy_from_slice(&r.start.to_ne_bytes());
                b[at + 2..at + 4].copy_from_slice(&r.end.to_ne_bytes());
            }
        }
        Some(SapPair { bytes: b })
    }
}

fn words_bytes<const N: usize, const M: usize>(w: [u32; N]) -> [u8; M] {
    let mut b = [0u8; M];
    for (chunk, w) in b.chunks_exact_mut(4).zip(w) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    b
}

/// The node's programs and maps, in the kernel: loaded by this agent, or adopted from the agent
/// before it ([`NodePrograms::adopt`]).
pub struct NodePrograms {
    bridge: SchedClassifier,
    sap: SchedClassifier,
    gateway: SchedClassifier,
    config: Array<MapData, [u32; 6]>,
    /// What this agent last wrote to `config`.
    words: [u32; 6],
    shared: Option<SharedMaps>,
    pods: HashMap<MapData, [u8; 4], [u8; 16]>,
    sap_flows: HashMap<MapData, [u8; 24], [u8; 16]>,
    sap_flows6: HashMap<MapData, [u8; 48], [u8; 16]>,
    sap_carried: PerCpuArray<MapData, u64>,
    sap_routes: LpmTrie<MapData, [u8; 4], [u8; 48]>,
    sap_routes6: LpmTrie<MapData, [u8; 16], [u8; 48]>,
    sap_pairs: HashMap<MapData, [u8; 8], [u8; 80]>,
    /// Valued by `struct egress_flow` (`flow.h`), as the pods' egress flows: [`EgressFlow`].
    gateway_flows: HashMap<MapData, [u8; 16], [u8; 24]>,
    gateway_carried: PerCpuArray<MapData, u64>,
}

impl NodePrograms {
    pub fn load() -> Result<NodePrograms, BpfError> {
        let parts = loaded(
            NODE_OBJECT,
            [BRIDGE_PROGRAM, SAP_PROGRAM, GATEWAY_PROGRAM],
            &NODE_TAGS,
            None,
        )?;
        NodePrograms::from_parts(parts)
    }

    /// Takes over the kernel SaP an earlier agent attached (`sap`, its program's id, as the
    /// device's tc filter names it), with the node's maps (the SaP's and the gateway's flows,
    /// the pods, the lease, the counters) and the bridge and gateway programs that share them,
    /// when they are this build's. `Ok(None)`: load new ones.
    pub fn adopt(sap: u32) -> Result<Option<NodePrograms>, BpfError> {
        let own = own_tags(&NODE_TAGS, || NodePrograms::load().map(drop))?;
        let Some(Parts { maps, .. }) = adopted(&[(sap, SAP_PROGRAM)], &own[1..2])? else {
            return Ok(None);
        };
        // The other programs share the maps: the ones of this build whose maps these are, if
        // they are still loaded, else a new load of them would have maps of their own. Found by
        // the config map they use.
        let Some(config_id) = maps.0.iter().find_map(|(n, m)| match m {
            Map::Array(d) if *n == NODE_CONFIG => d.info().ok().map(|i| i.id()),
            _ => None,
        }) else {
            return Ok(None);
        };
        let sharing = |tag: u64| {
            aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .filter(|p| p.tag() == tag)
                .find(|p| {
                    p.map_ids()
                        .ok()
                        .flatten()
                        .is_some_and(|ids| ids.contains(&config_id))
                })
                .map(|p| p.id())
        };
        let (Some(bridge), Some(gateway)) = (sharing(own[0]), sharing(own[2])) else {
            return Ok(None);
        };
        // All three, with every map any of them uses.
        let ids = [
            (bridge, BRIDGE_PROGRAM),
            (sap, SAP_PROGRAM),
            (gateway, GATEWAY_PROGRAM),
        ];
        match adopted(&ids, &own)? {
            Some(parts) => unless_missing(NodePrograms::from_parts(parts)),
            None => Ok(None),
        }
    }

    fn from_parts(parts: Parts<3>) -> Result<NodePrograms, BpfError> {
        let Parts {
            programs: [bridge, sap, gateway],
            mut maps,
        } = parts;
        let shared = SharedMaps::of(&maps);
        let config: Array<MapData, [u32; 6]> = maps.typed(NODE_CONFIG)?;
        let words = config.get(&0, 0).map_err(|e| map_error(NODE_CONFIG, e))?;
        Ok(NodePrograms {
            config,
            words,
            shared,
            sap_routes: maps.typed(SAP_ROUTES)?,
            sap_routes6: maps.typed(SAP_ROUTES6)?,
            sap_pairs: maps.typed(SAP_PAIRS)?,
            pods: maps.typed(NODE_PODS)?,
            sap_flows: maps.typed(SAP_FLOWS)?,
            sap_flows6: maps.typed(SAP_FLOWS6)?,
            sap_carried: maps.typed(SAP_CARRIED)?,
            gateway_flows: maps.typed(GATEWAY_FLOWS)?,
            gateway_carried: maps.typed(GATEWAY_CARRIED)?,
            bridge,
            sap,
            gateway,
        })
    }

    /// The GUE port, the SaP's address (none: no kernel SaP), and until when (CLOCK_MONOTONIC
    /// ns) the programs may use their maps.
    pub fn configure(
        &mut self,
        gue_port: u16,
        sap: Option<Ipv4Addr>,
        lease_ns: u64,
    ) -> Result<(), BpfError> {
        let mut words = self.words;
        words[..4].copy_from_slice(&[
            net_port(gue_port),
            lease_ns as u32,
            (lease_ns >> 32) as u32,
            net_v4(sap),
        ]);
        self.write_config(words)
    }

    fn write_config(&mut self, words: [u32; 6]) -> Result<(), BpfError> {
        self.config
            .set(0, words, 0)
            .map_err(|e| map_error(NODE_CONFIG, e))?;
        self.words = words;
        Ok(())
    }

    /// The lease the programs hold now (CLOCK_MONOTONIC ns; 0: none).
    pub fn lease(&self) -> Result<u64, BpfError> {
        let w = self
            .config
            .get(&0, 0)
            .map_err(|e| map_error(NODE_CONFIG, e))?;
        Ok(u64::from(w[1]) | u64::from(w[2]) << 32)
    }

    /// Puts compilation `generation` of the compiled policy in force (0: none; the kernel SaP
    /// then forwards only the flows in its flow maps, and the pods' programs carry only theirs).
    /// Routes and pairs of any other generation are not used. `complete`: its pairs hold every
    /// pair with one side this SaP fronts that policy allows anything or that is direct, so
    /// the pods' programs may judge by it too.
    pub fn set_policy_generation(
        &mut self,
        generation: u32,
        complete: bool,
    ) -> Result<(), BpfError> {
        let mut words = self.words;
        words[4] = generation;
        words[5] = u32::from(complete && generation != 0);
        self.write_config(words)
    }

    /// The node's maps the pods' programs share.
    pub fn shared_maps(&self) -> Option<SharedMaps> {
        self.shared
    }

    /// The compiled policy's generation in force (0: none).
    pub fn policy_generation(&self) -> u32 {
        self.words[4]
    }

    pub fn insert_route(&mut self, prefix: (IpAddr, u8), r: &SapRoute) -> Result<(), BpfError> {
        let len = u32::from(prefix.1);
        match prefix.0 {
            IpAddr::V4(a) => self
                .sap_routes
                .insert(&LpmKey::new(len, a.octets()), r.bytes(), 0)
                .map_err(|e| map_error(SAP_ROUTES, e)),
            IpAddr::V6(a) => self
                .sap_routes6
                .insert(&LpmKey::new(len, a.octets()), r.bytes(), 0)
                .map_err(|e| map_error(SAP_ROUTES6, e)),
        }
    }

    pub fn remove_route(&mut self, prefix: (IpAddr, u8)) {
        let len = u32::from(prefix.1);
        let _ = match prefix.0 {
            IpAddr::V4(a) => self.sap_routes.remove(&LpmKey::new(len, a.octets())),
            IpAddr::V6(a) => self.sap_routes6.remove(&LpmKey::new(len, a.octets())),
        };
    }

    /// The prefixes the compiled policy's routes have, IPv4 and IPv6.
    pub fn route_prefixes(&self) -> Vec<(IpAddr, u8)> {
        let v4 = self
            .sap_routes
            .keys()
            .filter_map(Result::ok)
            .map(|k| (IpAddr::from(k.data()), k.prefix_len() as u8));
        let v6 = self
            .sap_routes6
            .keys()
            .filter_map(Result::ok)
            .map(|k| (IpAddr::from(k.data()), k.prefix_len() as u8));
        v4.chain(v6).collect()
    }

    pub fn insert_pair(&mut self, src: u32, dst: u32, p: &SapPair) -> Result<(), BpfError> {
        self.sap_pairs
            .insert(pair_key(src, dst), p.bytes, 0)
            .map_err(|e| map_error(SAP_PAIRS, e))
    }

    pub fn remove_pair(&mut self, src: u32, dst: u32) {
        let _ = self.sap_pairs.remove(&pair_key(src, dst));
    }

    /// The (source, destination) identity pairs the compiled policy holds.
    pub fn pairs(&self) -> Vec<(u32, u32)> {
        self.sap_pairs
            .keys()
            .filter_map(Result::ok)
            .map(|k| {
                let w = |i: usize| u32::from_ne_bytes(k[i..i + 4].try_into().expect("4 bytes"));
                (w(0), w(4))
            })
            .collect()
    }

    /// The kernel SaP's program id.
    pub fn sap_id(&self) -> u32 {
        self.sap.info().map(|i| i.id()).unwrap_or_default()
    }

    /// The bridge program's id.
    pub fn bridge_id(&self) -> u32 {
        self.bridge.info().map(|i| i.id()).unwrap_or_default()
    }

    /// The kernel gateway's program id.
    pub fn gateway_id(&self) -> u32 {
        self.gateway.info().map(|i| i.id()).unwrap_or_default()
    }

    /// Attaches to the egress of `bridge` (in this thread's namespace), replacing a
    /// predecessor's program there.
    pub fn attach_bridge(&mut self, bridge: &str) -> Result<(), BpfError> {
        attach_filter(
            &mut self.bridge,
            BRIDGE_PROGRAM,
            bridge,
            TcAttachType::Egress,
        )
    }

    /// Attaches the kernel SaP to the ingress of `device`, the one that holds the SaP's
    /// address (in this thread's namespace), replacing a predecessor's.
    pub fn attach_sap(&mut self, device: &str) -> Result<(), BpfError> {
        attach_filter(&mut self.sap, SAP_PROGRAM, device, TcAttachType::Ingress)
    }

    /// Attaches the kernel gateway to the egress of `device`, the gateway device (in this
    /// thread's namespace), replacing a predecessor's.
    pub fn attach_gateway(&mut self, device: &str) -> Result<(), BpfError> {
        attach_filter(
            &mut self.gateway,
            GATEWAY_PROGRAM,
            device,
            TcAttachType::Egress,
        )
    }

    /// GUE to `pod_ip` goes to the pod's veth, with the pod's Ethernet header.
    pub fn set_pod(&mut self, pod_ip: Ipv4Addr, pod: &NodePod) -> Result<(), BpfError> {
        self.pods
            .insert(pod_ip.octets(), pod.bytes(), 0)
            .map_err(|e| map_error(NODE_PODS, e))
    }

    pub fn remove_pod(&mut self, pod_ip: Ipv4Addr) {
        let _ = self.pods.remove(&pod_ip.octets());
    }

    pub fn insert_sap(&mut self, f: &SapFlow, hop: &SapNextHop) -> Result<(), BpfError> {
        match &f.inner {
            Flow::V4(inner) => self
                .sap_flows
                .insert(f.bytes_with(inner.bytes()), hop.bytes(), 0),
            Flow::V6(inner) => self
                .sap_flows6
                .insert(f.bytes_with(inner.bytes()), hop.bytes(), 0),
        }
        .map_err(|e| map_error(SAP_FLOWS, e))
    }

    pub fn remove_sap(&mut self, f: &SapFlow) {
        let _ = match &f.inner {
            Flow::V4(inner) => self.sap_flows.remove(&f.bytes_with(inner.bytes())),
            Flow::V6(inner) => self.sap_flows6.remove(&f.bytes_with(inner.bytes())),
        };
    }

    /// Every flow the kernel SaP holds.
    pub fn sap_flows(&self) -> Vec<(SapFlow, SapNextHop)> {
        let v4 = self.sap_flows.iter().filter_map(Result::ok).map(|(k, v)| {
            let inner = Flow::V4(Flow4::from_bytes(&k[8..]));
            (SapFlow::from_bytes(&k, inner), SapNextHop::from_bytes(&v))
        });
        let v6 = self.sap_flows6.iter().filter_map(Result::ok).map(|(k, v)| {
            let inner = Flow::V6(Flow6::from_bytes(&k[8..]));
            (SapFlow::from_bytes(&k, inner), SapNextHop::from_bytes(&v))
        });
        v4.chain(v6).collect()
    }

    /// The kernel gateway carries `f`'s next packets to `to` with its key.
    pub fn insert_gateway(&mut self, f: &Flow4, to: &EgressFlow) -> Result<(), BpfError> {
        self.gateway_flows
            .insert(f.bytes(), to.bytes(), 0)
            .map_err(|e| map_error(GATEWAY_FLOWS, e))
    }

    pub fn remove_gateway(&mut self, f: &Flow4) {
        let _ = self.gateway_flows.remove(&f.bytes());
    }

    /// Every flow the kernel gateway holds.
    pub fn gateway_flows(&self) -> Vec<(Flow4, EgressFlow)> {
        self.gateway_flows
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Flow4::from_bytes(&k), EgressFlow::from_bytes(&v)))
            .collect()
    }

    /// Runs `kw_sap` once on `frame` (Ethernet, as it arrives at the SaP's device) through
    /// `BPF_PROG_TEST_RUN`: the tc action, and the frame as the program left it.
    pub fn run_sap(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), BpfError> {
        self.run_sap_marked(frame, 0)
            .map(|(ret, out, _)| (ret, out))
    }

    /// [`NodePrograms::run_sap`] on a frame that carries the packet mark `mark`; also returns
    /// the mark the program left on it.
    pub fn run_sap_marked(
        &mut self,
        frame: &[u8],
        mark: u32,
    ) -> Result<(u32, Vec<u8>, u32), BpfError> {
        // Where `struct __sk_buff` holds the mark (after len and pkt_type, which the kernel
        // fills in, so 0 here), and its size: the whole of it comes back (the kernel refuses a
        // shorter buffer).
        const MARK: std::ops::Range<usize> = 8..12;
        const SK_BUFF_LEN: usize = 192;
        let mut out = vec![0u8; frame.len() + 256];
        let mut ctx = [0u8; MARK.end];
        ctx[MARK].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; SK_BUFF_LEN];
        let result = self
            .sap
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::default()
            })
            .map_err(|e| program_error(SAP_PROGRAM, e))?;
        out.truncate(result.data_size_out as usize);
        let mark = u32::from_ne_bytes(ctx_out[MARK].try_into().expect("four bytes"));
        Ok((result.return_value, out, mark))
    }

    /// What the kernel gateway carried so far: packets (a GSO packet as its segments) and their
    /// bytes, summed over CPUs.
    pub fn gateway_carried(&self) -> Result<(u64, u64), BpfError> {
        let c = per_cpu_sums::<2>(&self.gateway_carried, GATEWAY_CARRIED)?;
        Ok((c[0], c[1]))
    }

    /// What the kernel SaP forwarded so far: datagrams (a GSO packet as its segments) and their
    /// bytes, summed over CPUs.
    pub fn sap_carried(&self) -> Result<(u64, u64), BpfError> {
        let c = per_cpu_sums::<2>(&self.sap_carried, SAP_CARRIED)?;
        Ok((c[0], c[1]))
    }

    /// Of those datagrams, how many the compiled policy let through (not a flow in the flow
    /// maps).
    pub fn sap_compiled(&self) -> Result<u64, BpfError> {
        Ok(per_cpu_sums::<3>(&self.sap_carried, SAP_CARRIED)?[2])
    }
}

fn pair_key(src: u32, dst: u32) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&src.to_ne_bytes());
    k[4..].copy_from_slice(&dst.to_ne_bytes());
    k
}

/// Removes the node's programs from `device` (in this thread's namespace): `kw_bridge_egress`
/// and `kw_gateway` from its egress, `kw_sap` from its ingress. Returns whether there was one;
/// not being there is not an error.
pub fn detach_node(device: &str) -> bool {
    let bridge = tc::qdisc_detach_program(device, TcAttachType::Egress, BRIDGE_PROGRAM).is_ok();
    let gateway = tc::qdisc_detach_program(device, TcAttachType::Egress, GATEWAY_PROGRAM).is_ok();
    let sap = tc::qdisc_detach_program(device, TcAttachType::Ingress, SAP_PROGRAM).is_ok();
    bridge || gateway || sap
}

/// Whether this kernel (and these privileges) load keyway's programs: what a node reports before
/// it relies on them.
pub fn probe() -> Result<(), BpfError> {
    EndpointPrograms::load(None)?;
    NodePrograms::load().map(drop)
}

fn classifier_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, BpfError> {
    ebpf.program_mut(name)
        .ok_or(BpfError::Missing(name))?
        .try_into()
        .map_err(|e| program_error(name, e))
}

fn program_error(name: &'static str, e: ProgramError) -> BpfError {
    BpfError::Program {
        name,
        source: Box::new(e),
    }
}

fn map_error(name: &'static str, e: MapError) -> BpfError {
    BpfError::Map {
        name,
        source: Box::new(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_round_trip_through_the_programs_layout() {
        let f = Flow4 {
            src: Ipv4Addr::new(100, 64, 0, 2),
            dst: Ipv4Addr::new(100, 64, 1, 3),
            proto: 6,
            sport: 40000,
            dport: 80,
        };
        // struct flow4: addresses and ports in network order, then the protocol and padding.
        assert_eq!(
            f.bytes(),
            [100, 64, 0, 2, 100, 64, 1, 3, 0x9c, 0x40, 0, 80, 6, 0, 0, 0]
        );
        assert_eq!(Flow4::from_bytes(&f.bytes()), f);
        let e = EgressFlow {
            to: SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 5), 6080),
            key: Key(0xdead_beef),
            seen_ns: 123_456_789,
        };
        let b = e.bytes();
        assert_eq!(&b[0..6], &[10, 244, 1, 5, 0x17, 0xc0]);
        assert_eq!(EgressFlow::from_bytes(&b), e);
        let f6 = Flow6 {
            src: "fd00::2".parse().unwrap(),
            dst: "fd00:1::3".parse().unwrap(),
            proto: 6,
            sport: 40000,
            dport: 80,
        };
        // struct flow6: the addresses' 16 bytes each, the ports, the protocol and padding.
        let b6 = f6.bytes();
        assert_eq!(&b6[0..2], &[0xfd, 0]);
        assert_eq!(&b6[15..18], &[2, 0xfd, 0]);
        assert_eq!(&b6[32..40], &[0x9c, 0x40, 0, 80, 6, 0, 0, 0]);
        assert_eq!(Flow6::from_bytes(&b6), f6);
        // struct ingress_flow_key(6): the outer source, then the flow.
        let key: [u8; 20] = keyed([10, 244, 2, 1], f.bytes());
        assert_eq!(
            (&key[..4], &key[4..]),
            (&[10, 244, 2, 1][..], &f.bytes()[..])
        );
        let key6: [u8; 44] = keyed([10, 244, 2, 1], b6);
        assert_eq!(&key6[4..], &b6[..]);
    }

    #[test]
    fn only_plain_tcp_udp_and_echoes_over_ipv4_are_fast_flows() {
        use keyway_core::packet::build;
        let tcp = build::tcp4([1, 0, 0, 1], 1000, [1, 0, 0, 2], 80);
        assert_eq!(
            Flow4::of_packet(&tcp).map(|f| (f.proto, f.sport, f.dport)),
            Some((6, 1000, 80))
        );
        let udp = build::ipv4(
            [1, 0, 0, 1].into(),
            [1, 0, 0, 2].into(),
            17,
            &build::ports(17, 5, 53, b"q"),
        );
        assert!(Flow4::of_packet(&udp).is_some());
        let echo = build::ipv4(
            [1, 0, 0, 1].into(),
            [1, 0, 0, 2].into(),
            1,
            &build::echo(false, false, 1, 1),
        );
        assert_eq!(
            Flow4::of_packet(&echo).map(|f| (f.proto, f.sport, f.dport)),
            Some((1, 1, 8 << 8)),
            "an echo: its identifier and its type"
        );
        let unreachable = build::ipv4(
            [1, 0, 0, 1].into(),
            [1, 0, 0, 2].into(),
            1,
            &[3, 1, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(
            Flow4::of_packet(&unreachable),
            None,
            "other ICMP: the user-space path"
        );
        let mut fragment = tcp.clone();
        fragment[7] = 1;
        assert_eq!(Flow4::of_packet(&fragment), None, "a fragment");
        let mut options = tcp.clone();
        options[0] = 0x46;
        assert_eq!(Flow4::of_packet(&options), None, "IP options");
        assert_eq!(Flow4::of_packet(&tcp[..30]), None, "cut short");
    }

    #[test]
    fn the_configuration_is_laid_out_as_the_programs_read_it() {
        let c = EndpointConfig {
            overlay: Some(Ipv4Addr::new(100, 64, 0, 2)),
            infra: Some(Ipv4Addr::new(10, 244, 1, 2)),
            gue_port: 6080,
            keys: vec![Key(7), Key(9)],
            tun_ifindex: 3,
            eth_ifindex: 2,
            overlay6: Some("fd00::1:2".parse().unwrap()),
            tun6_ifindex: 4,
            fast: true,
        };
        let w = c.words(0x1_0000_0002).unwrap();
        assert_eq!(w[0].to_ne_bytes(), [100, 64, 0, 2]);
        assert_eq!((w[2] as u16).to_ne_bytes(), 6080u16.to_be_bytes());
        assert_eq!(&w[3..12], &[2, 7, 9, 0, 3, 2, 1, 2, 1]);
        assert_eq!(w[12].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(w[15].to_ne_bytes(), [0, 1, 0, 2]);
        assert_eq!(w[16], 4);
        let too_many = EndpointConfig {
            keys: vec![Key(1); 4],
            ..c
        };
        assert!(matches!(too_many.words(0), Err(BpfError::TooManyKeys(4))));
    }

    #[test]
    fn the_sap_flows_and_node_pods_are_laid_out_as_the_programs_read_them() {
        let f = SapFlow {
            outer_src: Ipv4Addr::new(192, 168, 1, 11),
            key: Key(0x0a0b_0c0d),
            inner: Flow::V4(Flow4 {
                src: Ipv4Addr::new(100, 64, 0, 2),
                dst: Ipv4Addr::new(100, 64, 1, 3),
                proto: 6,
                sport: 40000,
                dport: 80,
            }),
        };
        let Flow::V4(inner) = f.inner else {
            unreachable!()
        };
        let b: [u8; 24] = f.bytes_with(inner.bytes());
        assert_eq!(&b[0..4], &[192, 168, 1, 11], "outer source, network order");
        assert_eq!(
            u32::from_ne_bytes(b[4..8].try_into().unwrap()),
            0x0a0b_0c0d,
            "the key in host order, as the program reads GUE's group id"
        );
        assert_eq!(&b[8..24], &inner.bytes());
        assert_eq!(SapFlow::from_bytes(&b, f.inner), f);
        // struct sap_flow_key6: the same, with struct flow6.
        let inner6 = Flow6 {
            src: "fd00::2".parse().unwrap(),
            dst: "fd00:1::3".parse().unwrap(),
            proto: 17,
            sport: 5353,
            dport: 53,
        };
        let b6: [u8; 48] = f.bytes_with(inner6.bytes());
        assert_eq!((&b6[..8], &b6[8..]), (&b[..8], &inner6.bytes()[..]));
        let hop = SapNextHop {
            to: "10.244.2.5:6080".parse().unwrap(),
            seen_ns: 42,
        };
        let h = hop.bytes();
        assert_eq!(&h[0..4], &[10, 244, 2, 5]);
        assert_eq!(&h[4..6], &6080u16.to_be_bytes());
        assert_eq!(SapNextHop::from_bytes(&h), hop);
        let pod = NodePod {
            veth_ifindex: 7,
            pod_mac: [2, 0, 0, 0, 0, 1],
            bridge_mac: [2, 0, 0, 0, 0, 2],
        };
        let p = pod.bytes();
        assert_eq!(u32::from_ne_bytes(p[0..4].try_into().unwrap()), 7);
        assert_eq!(
            (&p[4..10], &p[10..16]),
            (&pod.pod_mac[..], &pod.bridge_mac[..])
        );
    }
}
