//! The kernel fast path of one endpoint, from the user-space side: the programs of
//! [`super::bpf`] attached to the pod's devices, and the work that keeps their maps true to the
//! engine.
//!
//! A TCP connection's and a UDP flow's first packets (IPv4 inside, no MAC) the programs judge
//! themselves, by the node's compiled policy ([`compile_sap_policy`], in maps the pods' programs
//! share with the node's): an opening policy allows, and the replies within a connection the
//! kernel opened (`endpoint.bpf.c` says why only those). A UDP datagram is an opening only when
//! it replies within none of the engine's flows, which the kernel knows from its copy of them
//! ([`EngineFlows`], kept by a watcher on the endpoint's flow table from the first sync on). The
//! engine learns each connection the kernel opened from [`FastPath::sync`] (before the flows
//! that answer it are re-derived), or at once ([`FastPath::hand_over`]) when one of its packets
//! reaches the user-space path first; a RST there ends the kernel's record too
//! ([`FastPath::forget_reset`]).
//!
//! Every other flow's first packets the user-space path decides, as always;
//! once the engine has admitted a packet of a plain TCP or UDP flow (or an ICMP echo's), IPv4
//! or IPv6, without a MAC,
//! to or from the other endpoint or a SaP, the endpoint's loops (and the SaP's: see
//! [`NodeFastPath`]) tell the kernel ([`FastPath::learn_egress`], [`FastPath::learn_ingress`],
//! after the packet itself has been sent or delivered, so a flow's packets stay in order), and the
//! kernel carries the flow's next packets by itself. [`FastPath::sync`], every second and after
//! every compile:
//! - re-derives every cached decision through the engine with the tables and keys now in force,
//!   and removes those the engine no longer makes (a policy withdrawn, a peer gone) or updates
//!   them (a new key, a new next hop). A flow the kernel carried packets of since the last
//!   periodic sync goes through as one of those packets would have ([`Admission::Track`]: the
//!   engine's flow table sees it alive); any other is only judged ([`Admission::Judge`]: nothing
//!   changes), so no packet that never flowed can refresh or answer a flow;
//! - hands back to the engine the flows the kernel has not carried for a period, so its own idle
//!   timeouts decide their fate as on the user-space path;
//! - gives the programs the keys the pod accepts now, and a lease: a program whose lease has run
//!   out (its agent gone for good) carries nothing, and every packet falls to the user-space path,
//!   which fails closed without an agent;
//! - adds what the kernel carried to the endpoint's [`Counters`], so `/metrics` and
//!   `keyway-lab paths` count every packet once, whichever path handled it.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use keyway_core::acl::Identity;
use keyway_core::counters::Stage;
use keyway_core::engine::{self, Admission, PacketAuth};
use keyway_core::gue;
use keyway_core::key::Key;
#[cfg(test)]
use keyway_core::packet::PROTO_TCP;

use super::bpf::{
    BpfError, Carried, Conn, EgressFlow, EndpointConfig, EndpointPrograms, EngineFlows,
    FILTER_PRIORITY, Flow, Flow4, FlowMaps, IngressFlow, NodePod, SapFlow, SapNextHop, SapPair,
    SapRoute, SharedMaps,
};
use super::datapath::EndpointContext;
use super::netlink::{self, NetlinkError};
use crate::sys::{Netns, NetnsError};

/// How long programs go on carrying flows without a sync: longer than an agent's restart, short
/// enough that decisions no agent re-derives do not outlive it by much.
pub const LEASE_NS: u64 = 5_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("no device in the pod's namespace holds its pod IP {0}")]
    NoPrimary(Ipv4Addr),
    #[error("the overlay device {0} is not in the pod's namespace")]
    NoOverlay(String),
    #[error("the pod has no overlay device the fast path can serve")]
    NoOverlays,
}

/// Set once a pod's load could not be handed the node's maps: said once, not for every pod.
static SHARING_REFUSED: AtomicBool = AtomicBool::new(false);

/// When the agent that gave programs the lease `lease_ns` last synced them (it renews the lease
/// for [`LEASE_NS`] at every sync); `None` for no lease.
fn synced_at(lease_ns: u64) -> Option<u64> {
    lease_ns.checked_sub(LEASE_NS).filter(|t| *t > 0)
}

/// The clock `bpf_ktime_get_ns` reads (CLOCK_MONOTONIC), in ns.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// What one sync found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Flows the engine still admits, kept (updated where its key or next hop changed).
    pub kept: usize,
    /// Flows the kernel had not carried since the last sync, handed back to the engine.
    pub idle: usize,
    /// Flows the engine no longer admits, removed.
    pub refused: usize,
    /// What the kernel carried since the last sync (added to the endpoint's counters).
    pub carried: Carried,
}

/// An endpoint's fast path: its programs, attached, and their maps.
#[derive(Debug)]
pub struct FastPath {
    programs: Mutex<EndpointPrograms>,
    maps: Mutex<Maps>,
    base: EndpointConfig,
    /// The devices the programs are attached to, in the pod's namespace: the overlay devices
    /// (IPv4's, IPv6's) and the one that holds the pod IP.
    tuns: Vec<String>,
    eth: String,
    /// Whether the programs carry flows now (off while packet authentication is on: the kernel
    /// neither seals nor verifies a MAC).
    carrying: AtomicBool,
    last_sync_ns: AtomicU64,
    /// What the kernel had carried at the last count.
    counted: Mutex<Carried>,
    adopted: bool,
    /// Taken over from an earlier agent and not synced yet: when that agent last synced
    /// (CLOCK_MONOTONIC ns). The flows its kernel carried since are the live ones.
    warm_since: Mutex<Option<u64>>,
    /// The kernel's copy of the UDP flows the engine holds, watching the endpoint's flow table
    /// from the first sync on (`mirrored`).
    engine_flows: std::sync::Arc<EngineFlows>,
    mirrored: AtomicBool,
}

#[derive(Debug)]
struct Maps {
    flows: FlowMaps,
    /// Flows told to the kernel since the last sync: one map update per flow, not per packet.
    egress: HashSet<Flow>,
    ingress: HashSet<IngressFlow>,
    /// The tables generation the last re-derivation used: a flow learned from an older
    /// snapshot after it would escape it, so it is not taken.
    generation: u64,
}

impl FastPath {
    /// Attaches the fast path in `netns`: `kw_egress` to the pod's overlay devices `overlays`
    /// (name and overlay address: the first IPv4 one and the first IPv6 one; the underlay is
    /// IPv4), `kw_ingress` to the device that holds the pod IP `infra`. The programs and maps an
    /// earlier agent left there are taken over as they are, carrying on
    /// ([`FastPath::adopted`]), when they are this build's and this pod's; otherwise new ones are
    /// loaded and replace them, and carry nothing until the first [`sync`](Self::sync). Blocking.
    ///
    /// `node`: the node's maps (its compiled policy), which the programs judge a TCP
    /// connection's and a UDP flow's first packets by, and a writable directory a load may use
    /// to be handed them ([`EndpointPrograms::load`]); without, or when they cannot be handed
    /// over (logged), the programs carry only the flows the engine admitted.
    pub fn open(
        netns: &Netns,
        overlays: &[(String, IpAddr)],
        infra: Ipv4Addr,
        gue_port: u16,
        node: Option<(SharedMaps, &std::path::Path)>,
    ) -> Result<FastPath, FastPathError> {
        // The pod's first IPv4 overlay device and its first IPv6 one, in that order.
        let devices: Vec<(String, IpAddr)> = [false, true]
            .into_iter()
            .filter_map(|v6| overlays.iter().find(|(_, ip)| ip.is_ipv6() == v6).cloned())
            .collect();
        if devices.is_empty() {
            return Err(FastPathError::NoOverlays);
        }
        let names: Vec<String> = devices.iter().map(|(d, _)| d.clone()).collect();
        let (eth, links, left) = netlink::in_netns(netns, async move |nl| {
            let eth = nl.link_of_address(IpAddr::V4(infra)).await?;
            let mut links = Vec::with_capacity(names.len());
            for name in &names {
                links.push(nl.link(name).await?);
            }
            // The programs keyway's filters run: on each overlay device's egress, then eth0's
            // ingress.
            let mut left = Vec::with_capacity(names.len() + 1);
            for link in links.iter().flatten() {
                left.push(
                    nl.bpf_filter_program(link.index, true, FILTER_PRIORITY)
                        .await?,
                );
            }
            if let Some(e) = &eth {
                left.push(
                    nl.bpf_filter_program(e.index, false, FILTER_PRIORITY)
                        .await?,
                );
            }
            Ok((eth, links, left))
        })?;
        let eth = eth.ok_or(FastPathError::NoPrimary(infra))?;
        let mut base = EndpointConfig {
            infra: Some(infra),
            gue_port,
            eth_ifindex: eth.index,
            ..EndpointConfig::default()
        };
        for ((name, ip), link) in devices.iter().zip(&links) {
            let index = link
                .as_ref()
                .ok_or_else(|| FastPathError::NoOverlay(name.clone()))?
                .index;
            match ip {
                IpAddr::V4(a) => (base.overlay, base.tun_ifindex) = (Some(*a), index),
                IpAddr::V6(a) => (base.overlay6, base.tun6_ifindex) = (Some(*a), index),
            }
        }
        // Taken over only when every overlay device runs one egress program, eth0 the ingress
        // program of the same load, and they were configured for this pod.
        let (egress, ingress) = left.split_at(devices.len());
        let adopted = match (egress, ingress) {
            ([Some(first), rest @ ..], [Some(ingress)])
                if rest.iter().all(|p| *p == Some(*first)) =>
            {
                match EndpointPrograms::adopt(*first, *ingress, node.map(|(n, _)| n)) {
                    Ok(Some(p)) => match p.configured() {
                        Ok(c)
                            if c.overlay == base.overlay
                                && c.infra == base.infra
                                && c.overlay6 == base.overlay6 =>
                        {
                            Some((p, c.lease_ns))
                        }
                        _ => None,
                    },
                    Ok(None) => None,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot take over the fast path an earlier agent left: loading a new one");
                        None
                    }
                }
            }
            _ => None,
        };
        let is_adopted = adopted.is_some();
        let (mut programs, warm_since, counted) = match adopted {
            // Left configured and attached: it goes on carrying under its lease until the
            // first sync renews it.
            Some((p, lease)) => {
                let counted = p.carried().unwrap_or_default();
                (p, synced_at(lease), counted)
            }
            None => {
                let mut p = match node {
                    Some(node) => EndpointPrograms::load(Some(node)).or_else(|e| {
                        if !SHARING_REFUSED.swap(true, Ordering::Relaxed) {
                            tracing::warn!(error = %e, "the pods' programs cannot be handed the node's compiled policy: a flow's first packets take the user-space path");
                        }
                        EndpointPrograms::load(None)
                    })?,
                    None => EndpointPrograms::load(None)?,
                };
                p.configure(&base)?;
                let tuns: Vec<&str> = devices.iter().map(|(d, _)| d.as_str()).collect();
                netns.run(|| p.attach(&tuns, &eth.name))??;
                (p, None, Carried::default())
            }
        };
        let flows = programs.take_flows()?;
        let engine_flows = programs.take_engine_flows()?;
        Ok(FastPath {
            programs: Mutex::new(programs),
            maps: Mutex::new(Maps {
                flows,
                egress: HashSet::new(),
                ingress: HashSet::new(),
                generation: 0,
            }),
            base,
            tuns: devices.into_iter().map(|(d, _)| d).collect(),
            eth: eth.name.clone(),
            carrying: AtomicBool::new(false),
            last_sync_ns: AtomicU64::new(monotonic_ns()),
            counted: Mutex::new(counted),
            adopted: is_adopted,
            warm_since: Mutex::new(warm_since),
            engine_flows,
            mirrored: AtomicBool::new(false),
        })
    }

    /// Whether this fast path took over the programs and maps an earlier agent left, with the
    /// flows they were carrying.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The programs' ids, `kw_egress`'s and `kw_ingress`'s (as `tc filter show` prints them).
    pub fn program_ids(&self) -> [u32; 2] {
        self.programs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ids()
    }

    /// Removes the programs from the pod's devices (the pod leaves keyway). Blocking.
    pub fn detach(&self, netns: &Netns) {
        let _ = netns.run(|| {
            for tun in &self.tuns {
                super::bpf::detach(tun, true);
            }
            super::bpf::detach(&self.eth, false);
        });
    }

    /// Removes whatever programs an earlier agent attached to a pod's devices: its overlay
    /// devices and the device that holds its pod IP `infra`. Blocking; finding none is fine.
    pub fn detach_all(netns: &Netns, overlay_devices: &[String], infra: IpAddr) {
        let eth = netlink::in_netns(netns, async move |nl| nl.link_of_address(infra).await)
            .ok()
            .flatten();
        let _ = netns.run(|| {
            for d in overlay_devices {
                super::bpf::detach(d, true);
            }
            if let Some(eth) = &eth {
                super::bpf::detach(&eth.name, false);
            }
        });
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The flow an egress packet the engine just admitted belongs to, and how it was sent, when
    /// the kernel can carry the flow's next packets: `inner` the packet, `datagram` what the
    /// engine made of it, `to` where it went (the other endpoint, or a SaP).
    pub fn egress_candidate(
        &self,
        inner: &[u8],
        datagram: &[u8],
        to: SocketAddr,
    ) -> Option<(Flow, EgressFlow)> {
        if !self.carrying.load(Ordering::Relaxed) {
            return None;
        }
        let f = Flow::of_packet(inner)?;
        // Through a SaP too: the kernel SaP forwards what the sender's kernel sends whole, and
        // a user-space SaP sends it on as the datagrams it would have been.
        let (SocketAddr::V4(to), Some(key)) = (to, plain_key(datagram)) else {
            return None;
        };
        // From the pod's own addresses: its overlay addresses, or its pod IP (traffic to pod IPs
        // and cluster IPs, which keyway routes into the overlay).
        let own = self.own(f.src());
        own.then_some((
            f,
            EgressFlow {
                to,
                key,
                seen_ns: 0,
            },
        ))
    }

    /// The flow an arriving datagram the engine just admitted belongs to, when the kernel can
    /// carry the flow's next datagrams from the same outer source.
    pub fn ingress_candidate(
        &self,
        datagram: &[u8],
        inner: &[u8],
        from: SocketAddr,
    ) -> Option<IngressFlow> {
        if !self.carrying.load(Ordering::Relaxed) {
            return None;
        }
        let f = Flow::of_packet(inner)?;
        let (SocketAddr::V4(from), Some(_)) = (from, plain_key(datagram)) else {
            return None;
        };
        // What the program delivers into the overlay device of its family, as the user-space
        // path does: to the pod's overlay addresses or its pod IP.
        let own = self.own(f.dst());
        own.then_some(IngressFlow {
            outer_src: *from.ip(),
            inner: f,
        })
    }

    /// Whether `ip` is one of the pod's own addresses the programs know.
    fn own(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => Some(a) == self.base.overlay || Some(a) == self.base.infra,
            IpAddr::V6(a) => Some(a) == self.base.overlay6,
        }
    }

    /// Tells the kernel about egress flows the engine admitted with tables of `generation`,
    /// after their packets were sent.
    pub fn learn_egress(&self, flows: &[(Flow, EgressFlow)], generation: u64) {
        let mut m = self.maps();
        if generation < m.generation {
            return;
        }
        for (f, e) in flows {
            if m.egress.insert(*f) {
                // Not carried yet (0): the kernel stamps it when it carries a packet.
                let e = EgressFlow { seen_ns: 0, ..*e };
                if let Err(err) = m.flows.insert_egress(f, &e) {
                    tracing::debug!(error = %err, "cannot add an egress flow to the fast path");
                }
            }
        }
    }

    /// Tells the kernel about ingress flows the engine admitted with tables of `generation`,
    /// after their packets were delivered.
    pub fn learn_ingress(&self, flows: &[IngressFlow], generation: u64) {
        let mut m = self.maps();
        if generation < m.generation {
            return;
        }
        for f in flows {
            if m.ingress.insert(*f) && m.flows.insert_ingress(f, 0).is_err() {
                tracing::debug!("cannot add an ingress flow to the fast path");
            }
        }
    }

    /// Hands the engine, now, the connection the kernel opened by the compiled policy that
    /// `inner` (an IPv4 packet the engine has just refused, either way) replies within or
    /// belongs to. A packet of one can reach the user-space path before the next sync hands the
    /// connection over: one the kernel does not carry (a RST, a packet with IP options, a batch
    /// of UDP datagrams from a user-space sender). Returns whether one was handed over: the
    /// packet is then worth judging again.
    pub fn hand_over(&self, ctx: &EndpointContext, inner: &[u8], now_ms: u64) -> bool {
        let Some(f) = conn_flow(inner).map(|(f, _)| f) else {
            return false;
        };
        let tables = ctx.tables.load();
        let local = ctx.local.load();
        let mut m = self.maps();
        let mut handed = false;
        for k in [f.reversed(), f] {
            if let Some(conn) = m.flows.conn(&k) {
                let kept = hand_conn(
                    (&tables, &local, &ctx.flows),
                    self.base.gue_port,
                    &k,
                    &conn,
                    Admission::Track,
                    now_ms,
                );
                if !kept {
                    m.flows.remove_conn(&k);
                }
                handed |= kept;
            }
        }
        handed
    }

    /// After the engine has judged `inner` (admitted or not: it may have ended the flow before a
    /// later check refused the packet), a TCP segment that resets its connection: the kernel's
    /// own record of the connection goes too, either way, so the kernel admits nothing more as
    /// its reply, as the engine does not.
    pub fn forget_reset(&self, inner: &[u8]) {
        if let Some((f, true)) = conn_flow(inner).map(|(f, c)| (f, c.resets_flow)) {
            let mut m = self.maps();
            m.flows.remove_conn(&f);
            m.flows.remove_conn(&f.reversed());
        }
    }

    /// Brings the programs in line with the engine (see the module's documentation). `periodic`:
    /// also hand back to the engine the flows the kernel has not carried since the last periodic
    /// sync. Blocking (map system calls), short.
    pub fn sync(&self, ctx: &EndpointContext, now_ms: u64, periodic: bool) -> SyncReport {
        let tables = ctx.tables.load();
        let local = ctx.local.load();
        let carrying = tables.packet_auth == PacketAuth::Disabled;
        let now_ns = monotonic_ns();
        let mut config = self.base.clone();
        config.keys = local.keys.accepted_at(now_ms);
        config.keys.truncate(3);
        config.fast = carrying;
        let lease = now_ns + LEASE_NS;
        let carried;
        {
            let mut p = self.programs.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = p.configure_with_lease(&config, lease) {
                tracing::warn!(error = %e, "cannot update the fast path's configuration");
            }
            carried = self.count(&p, ctx);
        }
        self.carrying.store(carrying, Ordering::Relaxed);
        if !self.mirrored.swap(true, Ordering::Relaxed) {
            self.engine_flows.mirror(&ctx.flows);
        } else if periodic {
            self.engine_flows.prune(&ctx.flows, now_ms);
        }

        let mut report = SyncReport {
            carried,
            ..SyncReport::default()
        };
        let mut m = self.maps();
        m.generation = tables.generation;
        let port = self.base.gue_port;
        let key = local.keys.key_at(now_ms);
        // The egress flow `f` as the engine sends it now (`how`: tracked or only judged).
        let egress = |f: &Flow, how: Admission, seen_ns: u64| -> Option<EgressFlow> {
            let mut buf = vec![0u8; gue::HEADROOM];
            buf.extend_from_slice(&f.packet());
            let send =
                engine::endpoint_egress_as(&tables, &local, &ctx.flows, how, &mut buf, now_ms)
                    .ok()?;
            let SocketAddr::V4(to) = send.to else {
                return None;
            };
            Some(EgressFlow {
                to,
                key: plain_key(&buf[send.start..])?,
                seen_ns,
            })
        };
        // Whether the engine delivers the ingress flow `f` now.
        let ingress = |f: &IngressFlow, how: Admission| -> bool {
            key.is_some_and(|key| {
                let datagram = datagram_of(key, &f.inner.packet());
                let from = SocketAddr::V4(SocketAddrV4::new(f.outer_src, port));
                engine::endpoint_ingress_as(
                    &tables, &local, &ctx.flows, how, &datagram, from, now_ms,
                )
                .is_ok()
            })
        };
        // Taken over from an earlier agent: this engine has not seen the flows that agent's
        // kernel carried. Each live one goes through it as a packet first, both ways, so that
        // the engine tracks them as the earlier agent's did and a reply's flow finds what it
        // answers whichever way it runs; then they are re-derived as at any periodic sync.
        let warm = self
            .warm_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let periodic = periodic || warm.is_some();
        if let (Some(since), true) = (warm, carrying) {
            for (f, e) in m.flows.egress() {
                if e.seen_ns >= since {
                    egress(&f, Admission::Track, e.seen_ns);
                }
            }
            for (f, seen_ns) in m.flows.ingress() {
                if seen_ns >= since {
                    ingress(&f, Admission::Track);
                }
            }
        }
        let last_sync = match warm {
            Some(since) => {
                self.last_sync_ns.store(now_ns, Ordering::Relaxed);
                since
            }
            None if periodic => self.last_sync_ns.swap(now_ns, Ordering::Relaxed),
            None => self.last_sync_ns.load(Ordering::Relaxed),
        };
        // What to do with a flow, by when the kernel last carried one of its packets (0: never
        // since it was learned). Only a flow the kernel carried since the last periodic sync is
        // run through the engine as a packet (tracked: its flow refreshed, as those packets would
        // have done on the user-space path); one not carried yet is judged, changing nothing;
        // one idle for a period goes back to the engine.
        let fate = |seen_ns: u64, learned: bool| -> Option<Admission> {
            if !carrying {
                None
            } else if seen_ns >= last_sync && periodic {
                Some(Admission::Track)
            } else if seen_ns >= last_sync || (seen_ns == 0 && learned) || !periodic {
                Some(Admission::Judge)
            } else {
                None
            }
        };
        // The connections the kernel opened by the compiled policy, first: the flows that
        // answer them need the engine to know them. One opened or used since the last periodic
        // sync goes through the engine as its opening (tracked, at any sync: the
        // engine's flow table then holds it as the kernel's does, and the kernel's last use
        // too); an older one is judged at a sync after a change, and removed when the engine
        // would no longer admit that opening, or at a periodic sync (the engine holds
        // it from then on, and its own timeouts decide).
        for (f, conn) in m.flows.conns() {
            let how = if conn.seen_ns >= last_sync && carrying {
                Some(Admission::Track)
            } else if fate(conn.seen_ns, false) == Some(Admission::Judge) {
                Some(Admission::Judge)
            } else {
                None
            };
            let kept = how.is_some_and(|how| {
                hand_conn((&tables, &local, &ctx.flows), port, &f, &conn, how, now_ms)
            });
            if !kept {
                m.flows.remove_conn(&f);
            }
        }
        for (f, e) in m.flows.egress() {
            let Some(how) = fate(e.seen_ns, m.egress.contains(&f)) else {
                report.idle += usize::from(carrying);
                m.flows.remove_egress(&f);
                continue;
            };
            match egress(&f, how, e.seen_ns) {
                Some(now) if now == e => report.kept += 1,
                Some(now) => {
                    report.kept += 1;
                    let _ = m.flows.insert_egress(&f, &now);
                }
                None => {
                    report.refused += 1;
                    m.flows.remove_egress(&f);
                }
            }
        }
        for (f, seen_ns) in m.flows.ingress() {
            let Some(how) = fate(seen_ns, m.ingress.contains(&f)) else {
                report.idle += usize::from(carrying);
                m.flows.remove_ingress(&f);
                continue;
            };
            if ingress(&f, how) {
                report.kept += 1;
            } else {
                report.refused += 1;
                m.flows.remove_ingress(&f);
            }
        }
        if periodic {
            m.egress.clear();
            m.ingress.clear();
        }
        report
    }

    /// Adds what the kernel carried since the last count to the endpoint's counters, and
    /// returns it. (It drops nothing: what fails its checks goes on to the user-space path,
    /// which counts the drop.)
    fn count(&self, p: &EndpointPrograms, ctx: &EndpointContext) -> Carried {
        let Ok(carried) = p.carried() else {
            return Carried::default();
        };
        let mut c = self.counted.lock().unwrap_or_else(|e| e.into_inner());
        let since = Carried {
            egress_packets: carried.egress_packets - c.egress_packets,
            egress_bytes: carried.egress_bytes - c.egress_bytes,
            ingress_packets: carried.ingress_packets - c.ingress_packets,
            ingress_bytes: carried.ingress_bytes - c.ingress_bytes,
            compiled: carried.compiled - c.compiled,
        };
        let counters = &ctx.counters;
        counters.forwarded_n(Stage::Egress, since.egress_packets, since.egress_bytes);
        counters.forwarded_n(Stage::Ingress, since.ingress_packets, since.ingress_bytes);
        *c = carried;
        since
    }

    /// What the kernel has carried for this endpoint.
    pub fn carried(&self) -> Carried {
        self.programs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .carried()
            .unwrap_or_default()
    }
}

/// The connection of an IPv4 TCP or UDP packet or echo as the kernel keys its connections, with
/// the engine's classification of it (IP options or not).
fn conn_flow(inner: &[u8]) -> Option<(Flow4, keyway_core::packet::Classified)> {
    let c = keyway_core::packet::classify(inner).ok()?;
    Some((Flow4::of_classified(&c)?, c))
}

/// What the engine judges a packet by: its tables, the endpoint, and its flow table.
type EngineState<'a> = (
    &'a engine::Tables,
    &'a engine::LocalEndpoint,
    &'a keyway_core::flow::FlowTable,
);

/// Runs the connection `conn`, opened by the kernel as `f`, through the engine as its opening
/// would go (`how`): the packet it was opened by (a TCP SYN, a UDP datagram or an echo request
/// of the connection's identifier), as an egress
/// packet or as one arriving from the conn's outer source. Returns whether the engine admits it
/// as an opening: one the engine takes for a reply within a flow of its own the other way is not
/// the kernel's connection to keep (the engine would not let the peer's packets in as replies to
/// it).
fn hand_conn(
    (tables, local, flows): EngineState<'_>,
    port: u16,
    f: &Flow4,
    conn: &Conn,
    how: Admission,
    now_ms: u64,
) -> bool {
    use keyway_core::packet::{PROTO_ICMP, PROTO_UDP, build};
    // (A UDP datagram of the flow is the one its cached decisions are re-judged on.)
    let packet = match f.proto {
        PROTO_UDP => f.packet(),
        PROTO_ICMP => build::ipv4(
            f.src,
            f.dst,
            PROTO_ICMP,
            &build::echo(false, false, f.sport, 0),
        ),
        _ => build::syn4(f.src.octets(), f.sport, f.dst.octets(), f.dport),
    };
    let reply =
        keyway_core::packet::classify(&packet).is_ok_and(|c| flows.would_admit(&c, false, now_ms));
    if reply {
        return false;
    }
    if conn.inbound {
        let Some(key) = local.keys.key_at(now_ms) else {
            return false;
        };
        let datagram = datagram_of(key, &packet);
        let from = SocketAddr::V4(SocketAddrV4::new(conn.outer_src, port));
        engine::endpoint_ingress_as(tables, local, flows, how, &datagram, from, now_ms).is_ok()
    } else {
        let mut buf = vec![0u8; gue::HEADROOM];
        buf.extend_from_slice(&packet);
        engine::endpoint_egress_as(tables, local, flows, how, &mut buf, now_ms).is_ok()
    }
}

/// The key of a datagram without a MAC (GUE Hlen 1), as the engine wrote or read it.
pub(super) fn plain_key(datagram: &[u8]) -> Option<Key> {
    (datagram.len() >= gue::HEADER_LEN && datagram[0] & 0x1f == 1).then(|| {
        Key(u32::from_be_bytes([
            datagram[4],
            datagram[5],
            datagram[6],
            datagram[7],
        ]))
    })
}

fn datagram_of(key: Key, inner: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; gue::HEADER_LEN + inner.len()];
    let n = gue::encapsulate(key, inner, &mut out).unwrap_or(0);
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel connection is the kernel's to keep only when the engine takes its opening for
    /// one: not when the engine holds a flow the other way that it replies within. One it keeps,
    /// an echo's too, the engine holds from then on, as the kernel keyed it.
    #[test]
    fn a_kernel_connection_goes_to_the_engine_as_its_opening_unless_that_is_a_reply() {
        use keyway_core::acl::{Acl, Isolation};
        use keyway_core::fib::{Fib, Route};
        use keyway_core::flow::{FlowTable, FlowTimeouts};
        use keyway_core::key::KeyRing;
        use keyway_core::packet::{PROTO_UDP, build};
        // a (10.0.0.1) and b (10.0.0.2, this endpoint), neither isolated: policy allows all.
        let mut acl = Acl::builder();
        let mut fib = Fib::builder();
        for (net, key, infra) in [
            ("100.64.0.1/32", 1, "10.0.0.1:6080"),
            ("100.64.0.2/32", 2, "10.0.0.2:6080"),
        ] {
            let identity = acl.identity(Isolation::default());
            fib.insert(
                net.parse().unwrap(),
                Route {
                    entity: "x".into(),
                    identity,
                    keys: KeyRing::Static(Key(key)),
                    infra: infra.parse().unwrap(),
                    sap: None,
                    outside: false,
                },
            )
            .unwrap();
        }
        let tables = engine::Tables {
            fib: fib.build(),
            acl: acl.build(),
            ..Default::default()
        };
        let local = engine::LocalEndpoint {
            entity: "b".into(),
            overlay_ips: vec!["100.64.0.2".parse().unwrap()],
            infra: "10.0.0.2:6080".parse().unwrap(),
            keys: KeyRing::Static(Key(2)),
            local_sap: None,
        };
        let flows = FlowTable::new(64, FlowTimeouts::default());
        let (a, b) = (Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2));
        // a opens a UDP flow to b on the user-space path.
        let query = build::ipv4(a, b, PROTO_UDP, &build::ports(PROTO_UDP, 53, 4000, b"q"));
        let from = "10.0.0.1:6080".parse().unwrap();
        assert!(
            engine::endpoint_ingress(
                &tables,
                &local,
                &flows,
                &datagram_of(Key(2), &query),
                from,
                0
            )
            .is_ok()
        );
        let outbound = Conn {
            seen_ns: 1,
            inbound: false,
            outer_src: Ipv4Addr::UNSPECIFIED,
        };
        let udp = |src, sport, dst, dport| Flow4 {
            src,
            dst,
            proto: PROTO_UDP,
            sport,
            dport,
        };
        let judge = (&tables, &local, &flows);
        // The kernel opened b -> a on the same ports: to the engine, a reply within a's flow.
        assert!(!hand_conn(
            judge,
            6080,
            &udp(b, 4000, a, 53),
            &outbound,
            Admission::Track,
            1
        ));
        // On other ports, an opening it then holds; a TCP connection, whatever it holds.
        assert!(hand_conn(
            judge,
            6080,
            &udp(b, 4001, a, 53),
            &outbound,
            Admission::Track,
            1
        ));
        let reply = build::ipv4(a, b, PROTO_UDP, &build::ports(PROTO_UDP, 53, 4001, b"r"));
        assert!(flows.is_reply(&keyway_core::packet::classify(&reply).unwrap(), 2));
        let tcp = Flow4 {
            proto: PROTO_TCP,
            ..udp(b, 4000, a, 53)
        };
        assert!(hand_conn(judge, 6080, &tcp, &outbound, Admission::Track, 1));
        // An echo the kernel opened, keyed as it keys one (its identifier both ways): the
        // engine then takes the answer for the reply it is, and another identifier's for none.
        use keyway_core::packet::{PROTO_ICMP, classify};
        let request = build::ipv4(b, a, PROTO_ICMP, &build::echo(false, false, 77, 1));
        let conn = conn_flow(&request).unwrap().0;
        assert_eq!((conn.sport, conn.dport), (77, 77));
        let answer = build::ipv4(a, b, PROTO_ICMP, &build::echo(false, true, 77, 1));
        assert_eq!(conn_flow(&answer).unwrap().0, conn.reversed());
        assert!(!flows.is_reply(&classify(&answer).unwrap(), 2));
        assert!(hand_conn(
            judge,
            6080,
            &conn,
            &outbound,
            Admission::Track,
            1
        ));
        assert!(flows.is_reply(&classify(&answer).unwrap(), 2));
        let other = build::ipv4(a, b, PROTO_ICMP, &build::echo(false, true, 78, 1));
        assert!(!flows.is_reply(&classify(&other).unwrap(), 2));
    }

    #[test]
    fn a_flows_packet_is_a_plain_segment_of_it() {
        let f = Flow4 {
            src: Ipv4Addr::new(100, 64, 0, 2),
            dst: Ipv4Addr::new(100, 64, 1, 3),
            proto: PROTO_TCP,
            sport: 40000,
            dport: 80,
        };
        let p = f.packet();
        assert_eq!(Flow4::of_packet(&p), Some(f));
        let c = keyway_core::packet::classify(&p).unwrap();
        assert!(!c.opens_flow && !c.resets_flow, "an established segment");
        let d = datagram_of(Key(0x0102_0304), &p);
        assert_eq!(plain_key(&d), Some(Key(0x0102_0304)));
        let mut with_mac = d.clone();
        with_mac[0] = (with_mac[0] & !0x1f) | 3;
        assert_eq!(plain_key(&with_mac), None, "a datagram with a MAC");
    }

    #[test]
    fn an_ipv6_flows_packets_are_rebuilt_as_themselves() {
        use keyway_core::packet::{PROTO_ICMPV6, build};
        let (a, b) = ("fd00::2".parse().unwrap(), "fd00:1::3".parse().unwrap());
        let tcp = build::ipv6(a, b, PROTO_TCP, &build::ports(PROTO_TCP, 40000, 80, b"x"));
        let request = build::ipv6(a, b, PROTO_ICMPV6, &build::echo(true, false, 77, 5));
        let reply = build::ipv6(b, a, PROTO_ICMPV6, &build::echo(true, true, 77, 5));
        for (p, opens) in [(tcp, true), (request, true), (reply, false)] {
            let f = Flow::of_packet(&p).expect("a flow");
            assert!(matches!(f, Flow::V6(_)));
            let again = f.packet();
            assert_eq!(Flow::of_packet(&again), Some(f));
            let c = keyway_core::packet::classify(&again).unwrap();
            // A TCP flow's packet is an established segment; an echo's, the echo itself.
            assert_eq!(c.opens_flow, opens && c.proto == PROTO_ICMPV6);
        }
        // Behind an extension header, or an ICMPv6 error: not the kernel's.
        let hop = build::ipv6(a, b, 0, &[PROTO_TCP, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Flow::of_packet(&hop), None);
        let error = build::ipv6(a, b, PROTO_ICMPV6, &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Flow::of_packet(&error), None);
    }

    #[test]
    fn an_echo_request_and_its_reply_are_two_flows_each_rebuilt_as_itself() {
        use keyway_core::packet::{PROTO_ICMP, build};
        let (a, b) = (Ipv4Addr::new(100, 64, 0, 2), Ipv4Addr::new(100, 64, 1, 3));
        let request = build::ipv4(a, b, PROTO_ICMP, &build::echo(false, false, 77, 5));
        let reply = build::ipv4(b, a, PROTO_ICMP, &build::echo(false, true, 77, 5));
        let f = Flow4::of_packet(&request).expect("an echo request is a flow");
        let r = Flow4::of_packet(&reply).expect("an echo reply is a flow");
        // The reply's flow turned around is not the request's: a reply admitted never admits a
        // request from the same peer.
        assert_ne!(
            Flow4 {
                src: r.dst,
                dst: r.src,
                ..r
            },
            f
        );
        for flow in [f, r] {
            let p = flow.packet();
            assert_eq!(Flow4::of_packet(&p), Some(flow));
            let c = keyway_core::packet::classify(&p).unwrap();
            assert_eq!(c.opens_flow, flow == f, "only the request opens a flow");
        }
    }
}

/// Where the node's fast path is, once loaded (`None` inside: the kernel refused it), shared
/// by the pods' fast-path jobs that load it and the SaP's loop that teaches it flows.
pub type NodeFastSlot = std::sync::Arc<std::sync::OnceLock<Option<std::sync::Arc<NodeFastPath>>>>;

/// The node's part of the fast path (`sap/bpf/node.bpf.c` says why each part is there):
/// - GUE the node routes to one of its pods goes from the primary CNI's bridge straight to the
///   pod's veth, whole. Pods whose veth is not a bridge port (routed veths) need nothing: their
///   veth takes the packet whole already.
/// - The node's SaP in the kernel: a flow the user-space SaP has forwarded is told to the kernel
///   ([`NodeFastPath::learn_sap`], after the datagram went), which forwards the flow's next
///   datagrams itself, to the node's pods, while [`NodeFastPath::sync`] re-derives each such
///   decision through `engine::sap_forward` at every change and every second. The SaP keeps no
///   per-flow state, so the kernel's flows are only judged, never tracked.
#[derive(Debug)]
pub struct NodeFastPath {
    programs: Mutex<super::bpf::NodePrograms>,
    gue_port: u16,
    /// The SaP's address, when the kernel SaP is attached to the device that holds it.
    sap: Option<Ipv4Addr>,
    adopted: bool,
    /// The bridges the program is attached to, by name.
    bridges: Mutex<HashSet<String>>,
    sap_state: Mutex<Cached<SapFlow>>,
    /// The gateway device, where the kernel gateway goes once the device is there (it sends
    /// from the SaP's address, so only with a kernel SaP).
    gateway: Option<String>,
    gateway_attached: AtomicBool,
    gateway_state: Mutex<Cached<Flow4>>,
    compiled: Mutex<SapPolicy>,
}

/// The kernel SaP's compiled policy as this agent last wrote it to the maps; kept true to the
/// tables by [`SapPolicy::sync`].
#[derive(Debug, Default)]
pub struct SapPolicy {
    /// The tables generation it was compiled from (0: none in force).
    tables_generation: u64,
    /// What the kernel had forwarded by the compiled policy at the last count.
    counted: u64,
    routes: HashMap<(IpAddr, u8), SapRoute>,
    pairs: HashMap<(u32, u32), SapPair>,
    /// Whether the pods' programs may judge by it ([`CompiledPolicy::complete`]).
    complete: bool,
}

/// The most routes (the FIB's prefixes of each IP version) and identity pairs the kernel SaP's
/// maps hold (`kw_sap_routes`, `kw_sap_routes6`, `kw_sap_pairs`). A FIB with more prefixes of a
/// version is not compiled at all (a route left out could make a shorter prefix match instead);
/// pairs beyond the limit are left to the user-space SaP.
pub const SAP_POLICY_MAX: usize = 65536;

/// The node's compiled policy from `tables` (generation `generation` of the maps), for the SaP
/// at `sap`: every prefix of the FIB ([`compile_sap_routes`]), and for each identity this
/// SaP fronts, what policy allows it from every identity and to every identity (the reply check
/// needs the other way), and which of those pairs are direct. `None` when the FIB has more
/// prefixes than the map holds.
pub fn compile_sap_policy(
    tables: &engine::Tables,
    sap: SocketAddrV4,
    generation: u32,
    now_ms: u64,
) -> Option<CompiledPolicy> {
    let routes = compile_sap_routes(tables, sap, generation, now_ms)?;
    let fronted: std::collections::BTreeSet<u32> = routes
        .values()
        .filter(|r| r.fronted && !r.unusable)
        .map(|r| r.identity)
        .collect();
    // Only identities with a route can be a datagram's inner source or destination.
    let routed: std::collections::BTreeSet<u32> = routes.values().map(|r| r.identity).collect();
    let acl = &tables.acl;
    let mut pairs = HashMap::new();
    // Bounded work as well as a bounded map: a compile never costs more than this many pairs.
    let mut budget = SAP_POLICY_MAX;
    let mut complete = true;
    'fronted: for &d in &fronted {
        for &s in &routed {
            for (a, b) in [(s, d), (d, s)] {
                if budget == 0 {
                    complete = false;
                    break 'fronted;
                }
                budget -= 1;
                let (a, b) = (Identity(a), Identity(b));
                let policy = acl.pair_policy(a, b);
                if let Some(p) = SapPair::of(generation, policy.as_ref(), acl.is_direct(a, b)) {
                    pairs.insert((a.0, b.0), p);
                }
            }
        }
    }
    Some(CompiledPolicy {
        routes,
        pairs,
        complete,
    })
}

/// What [`compile_sap_policy`] makes of the tables: the maps' routes and pairs, and whether the
/// pairs are all there (a compile cut short by its budget is not: the kernel SaP uses what there
/// is, the pods' programs use none of it).
#[derive(Debug, Clone, Default)]
pub struct CompiledPolicy {
    pub routes: HashMap<(IpAddr, u8), SapRoute>,
    pub pairs: HashMap<(u32, u32), SapPair>,
    pub complete: bool,
}

/// The routes of [`compile_sap_policy`]: every prefix of the FIB (IPv4 and IPv6: an inner
/// packet's addresses) with the keys its entity accepts from `now_ms` until the lease runs out.
pub fn compile_sap_routes(
    tables: &engine::Tables,
    sap: SocketAddrV4,
    generation: u32,
    now_ms: u64,
) -> Option<HashMap<(IpAddr, u8), SapRoute>> {
    let lease_end = now_ms + LEASE_NS / 1_000_000;
    let mut routes = HashMap::new();
    let v4 = tables
        .fib
        .prefixes_v4()
        .map(|(a, l, r)| (IpAddr::V4(a), l, r));
    let v6 = tables
        .fib
        .prefixes_v6()
        .map(|(a, l, r)| (IpAddr::V6(a), l, r));
    let (mut n4, mut n6) = (0, 0);
    for (addr, len, r) in v4.chain(v6) {
        let n = if addr.is_ipv4() { &mut n4 } else { &mut n6 };
        if *n == SAP_POLICY_MAX {
            return None;
        }
        *n += 1;
        let infra = match r.infra {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        };
        let sap_v4 = match r.sap {
            Some(SocketAddr::V4(a)) => Some(a),
            _ => None,
        };
        // An entity behind an IPv6 SaP is one too: the kernel sends only over IPv4.
        let unusable = r.infra.is_ipv6() || r.sap.is_some_and(|s| s.is_ipv6());
        let is_fronted = !r.outside && sap_v4 == Some(sap);
        // Only keys the engine accepts from now until the lease runs out: a key the kernel
        // holds is never one the engine refuses meanwhile.
        let later = r.keys.accepted_at(lease_end);
        let keys: Vec<Key> = r
            .keys
            .accepted_at(now_ms)
            .into_iter()
            .filter(|k| later.contains(k))
            .collect();
        let send_key = r.keys.key_at(now_ms).filter(|k| keys.contains(k));
        let route = SapRoute {
            generation,
            identity: r.identity.0,
            infra,
            sap: sap_v4,
            outside: r.outside,
            to_sap: tables.saps.contains(&r.infra.ip()),
            fronted: is_fronted,
            unusable,
            keys,
            send_key,
        };
        routes.insert((addr, len), route);
    }
    Some(routes)
}

/// What the node keeps about the flows one of its programs carries by itself.
#[derive(Debug)]
struct Cached<F> {
    /// Flows told to the kernel since the last periodic sync (one map update per flow).
    learned: HashSet<F>,
    /// The tables generation of the last re-derivation (see [`Maps::generation`]).
    generation: u64,
    last_sync_ns: u64,
    /// What the program had carried at the last count: packets, bytes.
    counted: (u64, u64),
}

impl<F: std::hash::Hash + Eq> Cached<F> {
    fn since(last_sync_ns: u64, counted: (u64, u64)) -> Cached<F> {
        Cached {
            learned: HashSet::new(),
            generation: 0,
            last_sync_ns,
            counted,
        }
    }

    /// Adds what the program has carried since the last count (`total`, as its counters read
    /// now) to `stage`'s counters; returns how many packets that was.
    fn count(
        &mut self,
        total: (u64, u64),
        counters: &keyway_core::counters::Counters,
        stage: Stage,
    ) -> u64 {
        let packets = total.0 - self.counted.0;
        counters.forwarded_n(stage, packets, total.1 - self.counted.1);
        self.counted = total;
        packets
    }

    /// The start of the period a flow must have been carried in to stay, at a sync at `now_ns`
    /// (`periodic`: a new period starts).
    fn period(&mut self, now_ns: u64, periodic: bool) -> u64 {
        if periodic {
            std::mem::replace(&mut self.last_sync_ns, now_ns)
        } else {
            self.last_sync_ns
        }
    }
}

impl NodeFastPath {
    /// Loads the node's programs in this thread's namespace (the node's): the bridge program
    /// is attached when a pod behind a bridge comes; the kernel SaP now, to the device that
    /// holds `sap` (IPv4), when there is one; with it, the kernel gateway to the device
    /// `gateway`, now or at a sync once the device is there. Blocking.
    pub fn load(
        gue_port: u16,
        sap: Option<SocketAddr>,
        gateway: Option<&str>,
    ) -> Result<NodeFastPath, FastPathError> {
        let sap_link = match sap {
            Some(SocketAddr::V4(a)) if a.port() == gue_port => {
                let ip = *a.ip();
                let node = Netns::current()?;
                let link = netlink::in_netns(&node, async move |nl| {
                    let Some(l) = nl.link_of_address(IpAddr::V4(ip)).await? else {
                        return Ok(None);
                    };
                    let left = nl
                        .bpf_filter_program(l.index, false, FILTER_PRIORITY)
                        .await?;
                    Ok(Some((l, left)))
                })?;
                if link.is_none() {
                    tracing::warn!(sap = %ip, "no device holds the SaP's address: the SaP stays in user space");
                }
                link.map(|(l, left)| (ip, l, left))
            }
            _ => None,
        };
        // The kernel SaP an earlier agent left, with the node's maps, goes on as it is.
        let adopted = match &sap_link {
            Some((_, _, Some(id))) => match super::bpf::NodePrograms::adopt(*id) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot take over the node's fast path an earlier agent left: loading a new one");
                    None
                }
            },
            _ => None,
        };
        let sap = sap_link.as_ref().map(|(ip, _, _)| *ip);
        let (programs, adopted, last_sync_ns, sap_counted, gateway_counted) = match adopted {
            // Left configured and attached: the earlier agent's lease holds until the first
            // sync has judged the SaP's and the gateway's flows again.
            Some(p) => {
                let since = p.lease().ok().and_then(synced_at);
                let sap_counted = p.sap_carried().unwrap_or_default();
                let gateway_counted = p.gateway_carried().unwrap_or_default();
                let since = since.unwrap_or_else(monotonic_ns);
                (p, true, since, sap_counted, gateway_counted)
            }
            None => {
                let mut p = super::bpf::NodePrograms::load()?;
                if let Some((ip, link, _)) = &sap_link {
                    p.configure(gue_port, Some(*ip), 0)?;
                    p.attach_sap(&link.name)?;
                }
                p.configure(gue_port, sap, monotonic_ns() + LEASE_NS)?;
                (p, false, monotonic_ns(), (0, 0), (0, 0))
            }
        };
        let policy = SapPolicy {
            counted: programs.sap_compiled().unwrap_or_default(),
            ..SapPolicy::default()
        };
        let node = NodeFastPath {
            programs: Mutex::new(programs),
            gue_port,
            sap,
            adopted,
            bridges: Mutex::default(),
            sap_state: Mutex::new(Cached::since(last_sync_ns, sap_counted)),
            gateway: gateway.filter(|_| sap.is_some()).map(str::to_string),
            gateway_attached: AtomicBool::new(false),
            gateway_state: Mutex::new(Cached::since(last_sync_ns, gateway_counted)),
            compiled: Mutex::new(policy),
        };
        node.attach_gateway();
        Ok(node)
    }

    /// Puts the kernel gateway on the gateway device, unless it is there: this agent's program
    /// (taken over with the maps), or the device not yet made. Blocking.
    fn attach_gateway(&self) {
        let Some(device) = &self.gateway else { return };
        if self.gateway_attached.load(Ordering::Relaxed) {
            return;
        }
        let name = device.clone();
        let found = Netns::current()
            .map_err(FastPathError::from)
            .and_then(|node| {
                Ok(netlink::in_netns(&node, async move |nl| {
                    let Some(l) = nl.link(&name).await? else {
                        return Ok(None);
                    };
                    let on = nl
                        .bpf_filter_program(l.index, true, FILTER_PRIORITY)
                        .await?;
                    Ok(Some(on))
                })?)
            });
        let on = match found {
            Ok(Some(on)) => on,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, device, "cannot look at the gateway device");
                return;
            }
        };
        let mut p = self.programs();
        if on == Some(p.gateway_id()) {
            self.gateway_attached.store(true, Ordering::Relaxed);
            return;
        }
        match p.attach_gateway(device) {
            Ok(()) => {
                self.gateway_attached.store(true, Ordering::Relaxed);
                tracing::info!(device, "the kernel gateway is attached");
            }
            Err(e) => {
                tracing::warn!(error = %e, device, "cannot attach the kernel gateway: traffic from off the overlay stays in user space")
            }
        }
    }

    /// Whether the node's programs and maps were taken over from an earlier agent.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The kernel SaP's program id (as `tc filter show` prints it).
    pub fn sap_program_id(&self) -> u32 {
        self.programs().sap_id()
    }

    /// Removes the node's programs from every device of this thread's namespace (the node's),
    /// whichever agent attached them: what an uninstall does (an agent's exit leaves them, so
    /// that traffic goes on while it restarts). Returns the devices they were on. Blocking.
    pub fn detach_all() -> Result<Vec<String>, FastPathError> {
        let node = Netns::current()?;
        let links = netlink::in_netns(&node, async move |nl| nl.links().await)?;
        Ok(links
            .into_iter()
            .filter(|l| super::bpf::detach_node(&l.name))
            .map(|l| l.name)
            .collect())
    }

    /// The node's maps the pods' programs share (its compiled policy).
    pub fn shared_maps(&self) -> Option<SharedMaps> {
        self.programs().shared_maps()
    }

    fn programs(&self) -> std::sync::MutexGuard<'_, super::bpf::NodePrograms> {
        self.programs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sap_state(&self) -> std::sync::MutexGuard<'_, Cached<SapFlow>> {
        self.sap_state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn gateway_state(&self) -> std::sync::MutexGuard<'_, Cached<Flow4>> {
        self.gateway_state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a pod: its pod IP `infra`, held by a veth in `netns` whose node side is a bridge
    /// port in this thread's namespace (the node's). A pod on a routed veth is left alone
    /// (`Ok(false)`). Blocking.
    pub fn add_pod(&self, netns: &Netns, infra: Ipv4Addr) -> Result<bool, FastPathError> {
        let pod_link = netlink::in_netns(netns, async move |nl| {
            nl.link_of_address(IpAddr::V4(infra)).await
        })?
        .ok_or(FastPathError::NoPrimary(infra))?;
        let (Some(peer), Some(pod_mac)) = (pod_link.peer, pod_link.mac) else {
            return Ok(false);
        };
        let node = Netns::current()?;
        let (veth, bridge) = netlink::in_netns(&node, async move |nl| {
            let Some(veth) = nl.link_by_index(peer).await? else {
                return Ok((None, None));
            };
            let bridge = match veth.master {
                Some(m) => {
                    let bridges = nl.bridges().await?;
                    let master = nl.link_by_index(m).await?;
                    master.filter(|l| bridges.iter().any(|b| b.name == l.name))
                }
                None => None,
            };
            Ok((Some(veth), bridge))
        })?;
        let (Some(veth), Some(bridge)) = (veth, bridge) else {
            return Ok(false);
        };
        let Some(bridge_mac) = bridge.mac else {
            return Ok(false);
        };
        let mut p = self.programs();
        {
            let mut attached = self.bridges.lock().unwrap_or_else(|e| e.into_inner());
            if !attached.contains(&bridge.name) {
                p.attach_bridge(&bridge.name)?;
                attached.insert(bridge.name);
            }
        }
        p.set_pod(
            infra,
            &NodePod {
                veth_ifindex: veth.index,
                pod_mac,
                bridge_mac,
            },
        )?;
        Ok(true)
    }

    pub fn remove_pod(&self, infra: Ipv4Addr) {
        self.programs().remove_pod(infra);
    }

    /// The flow of a datagram the user-space SaP just forwarded from `from` to `to`, when the
    /// kernel SaP can forward the flow's next ones: plain GUE (no MAC) over IPv4 with a plain
    /// TCP or UDP packet inside.
    pub fn sap_candidate(
        &self,
        datagram: &[u8],
        from: SocketAddr,
        to: SocketAddr,
    ) -> Option<(SapFlow, SapNextHop)> {
        self.sap?;
        let (SocketAddr::V4(from), SocketAddr::V4(to), Some(key)) = (from, to, plain_key(datagram))
        else {
            return None;
        };
        let inner = Flow::of_packet(datagram.get(gue::HEADER_LEN..)?)?;
        Some((
            SapFlow {
                outer_src: *from.ip(),
                key,
                inner,
            },
            SapNextHop { to, seen_ns: 0 },
        ))
    }

    /// Tells the kernel SaP about flows the user-space SaP forwarded with tables of
    /// `generation`, after their datagrams went.
    pub fn learn_sap(&self, flows: &[(SapFlow, SapNextHop)], generation: u64) {
        let mut st = self.sap_state();
        if generation < st.generation {
            return;
        }
        let mut p = self.programs();
        for (f, hop) in flows {
            if st.learned.insert(*f) && p.insert_sap(f, hop).is_err() {
                tracing::debug!("cannot add a SaP flow to the fast path");
            }
        }
    }

    /// The flow of a packet the user-space gateway just carried, as `datagram` to `to`, when
    /// the kernel gateway can carry the flow's next ones: plain GUE (no MAC) over IPv4 with a
    /// plain TCP or UDP packet (or an echo) inside.
    pub fn gateway_candidate(
        &self,
        datagram: &[u8],
        to: SocketAddr,
    ) -> Option<(Flow4, EgressFlow)> {
        if !self.gateway_attached.load(Ordering::Relaxed) {
            return None;
        }
        let (SocketAddr::V4(to), Some(key)) = (to, plain_key(datagram)) else {
            return None;
        };
        let inner = Flow4::of_packet(datagram.get(gue::HEADER_LEN..)?)?;
        Some((
            inner,
            EgressFlow {
                to,
                key,
                seen_ns: 0,
            },
        ))
    }

    /// Tells the kernel gateway about flows the user-space gateway carried with tables of
    /// `generation`, after their packets went.
    pub fn learn_gateway(&self, flows: &[(Flow4, EgressFlow)], generation: u64) {
        let mut st = self.gateway_state();
        if generation < st.generation {
            return;
        }
        let mut p = self.programs();
        for (f, to) in flows {
            if st.learned.insert(*f) && p.insert_gateway(f, to).is_err() {
                tracing::debug!("cannot add a gateway flow to the fast path");
            }
        }
    }

    /// Renews the lease, adds what the kernel SaP and gateway carried to `counters` (when
    /// `periodic`), and re-derives every flow they hold through the engine with the tables now
    /// in force: removes those the engine no longer forwards (or forwards elsewhere, or with
    /// another key: rewritten), and, when `periodic`, those the kernel has not carried since
    /// the last periodic sync (the LRU maps need no more: neither keeps per-flow state to hand
    /// back). Blocking, short.
    pub fn sync(
        &self,
        tables: &keyway_core::tables::SharedTables,
        counters: &keyway_core::counters::Counters,
        now_ms: u64,
        periodic: bool,
    ) -> NodeSyncReport {
        let tables = tables.load();
        let carrying = tables.packet_auth == PacketAuth::Disabled;
        let now_ns = monotonic_ns();
        let mut out = NodeSyncReport::default();
        if periodic {
            self.attach_gateway();
        }
        // In the order the learning takes them: a flow's state, then the programs.
        let mut gw = self.gateway_state();
        let mut st = self.sap_state();
        let mut p = self.programs();
        let sap = self.sap.filter(|_| carrying);
        if let Err(e) = p.configure(self.gue_port, sap, now_ns + LEASE_NS) {
            tracing::warn!(error = %e, "cannot renew the node fast path's lease");
        }
        // Counted at periodic syncs only, so that each count is reported once, by the caller
        // that reports them.
        if let (true, Ok(total)) = (periodic, p.gateway_carried()) {
            out.gateway_forwarded = gw.count(total, counters, Stage::Gateway);
        }
        if let (true, Ok(total)) = (periodic, p.sap_carried()) {
            out.forwarded = st.count(total, counters, Stage::Sap);
        }
        if self.sap.is_none() {
            return out;
        }
        out.policy = self
            .compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sync(
                &mut p,
                &tables,
                sap.map(|a| SocketAddrV4::new(a, self.gue_port)),
                now_ms,
                periodic,
            );
        gw.generation = tables.generation;
        let last_sync = gw.period(now_ns, periodic);
        let report = &mut out.gateway;
        for (f, to) in p.gateway_flows() {
            let fresh = to.seen_ns >= last_sync || (to.seen_ns == 0 && gw.learned.contains(&f));
            if !carrying || (periodic && !fresh) {
                report.idle += usize::from(carrying);
                p.remove_gateway(&f);
                continue;
            }
            let mut buf = vec![0u8; gue::HEADROOM];
            buf.extend_from_slice(&f.packet());
            let now = engine::gateway_ingress(&tables, &mut buf, now_ms)
                .ok()
                .and_then(|send| Some((send.to, plain_key(&buf[send.start..])?)));
            match now {
                Some((SocketAddr::V4(dest), key)) => {
                    report.kept += 1;
                    if (dest, key) != (to.to, to.key) {
                        let _ = p.insert_gateway(
                            &f,
                            &EgressFlow {
                                to: dest,
                                key,
                                ..to
                            },
                        );
                    }
                }
                _ => {
                    report.refused += 1;
                    p.remove_gateway(&f);
                }
            }
        }
        if periodic {
            gw.learned.clear();
        }
        drop(gw);
        let report = &mut out.flows;
        st.generation = tables.generation;
        let last_sync = st.period(now_ns, periodic);
        for (f, hop) in p.sap_flows() {
            let fresh = hop.seen_ns >= last_sync || (hop.seen_ns == 0 && st.learned.contains(&f));
            if !carrying || (periodic && !fresh) {
                report.idle += usize::from(carrying);
                p.remove_sap(&f);
                continue;
            }
            let datagram = datagram_of(f.key, &f.inner.packet());
            let from = SocketAddr::V4(SocketAddrV4::new(f.outer_src, self.gue_port));
            match engine::sap_forward(&tables, &datagram, from, now_ms) {
                Ok(SocketAddr::V4(to)) if to == hop.to => report.kept += 1,
                Ok(SocketAddr::V4(to)) => {
                    report.kept += 1;
                    let _ = p.insert_sap(&f, &SapNextHop { to, ..hop });
                }
                _ => {
                    report.refused += 1;
                    p.remove_sap(&f);
                }
            }
        }
        if periodic {
            st.learned.clear();
        }
        out
    }
}

impl SapPolicy {
    /// Keeps the kernel SaP's compiled policy (in `p`'s maps) true to `tables`: at a new tables
    /// generation, a whole new compilation (written beside the one in force, then put in force
    /// at once, then the old one's leftovers removed, so that the kernel never judges by a mix
    /// of two); at a periodic sync, the routes' keys. Off (generation 0) without a kernel SaP
    /// (`sap`, `None` while packet authentication is on) or when the FIB does not fit. Returns
    /// the pairs and routes in force.
    pub fn sync(
        &mut self,
        p: &mut super::bpf::NodePrograms,
        tables: &engine::Tables,
        sap: Option<SocketAddrV4>,
        now_ms: u64,
        periodic: bool,
    ) -> PolicyReport {
        let c = self;
        // Counted at periodic syncs only, as the SaP's other counts.
        let mut forwarded = 0;
        if let (true, Ok(total)) = (periodic, p.sap_compiled()) {
            forwarded = total.saturating_sub(c.counted);
            c.counted = total;
        }
        let off = |p: &mut super::bpf::NodePrograms, c: &mut SapPolicy| {
            if p.policy_generation() != 0 {
                let _ = p.set_policy_generation(0, false);
            }
            // Emptied too, so that a later compilation has the whole of the maps' room.
            for k in p.route_prefixes() {
                p.remove_route(k);
            }
            for (a, b) in p.pairs() {
                p.remove_pair(a, b);
            }
            *c = SapPolicy {
                counted: c.counted,
                ..SapPolicy::default()
            };
            PolicyReport {
                forwarded,
                ..PolicyReport::default()
            }
        };
        let Some(sap) = sap else { return off(p, c) };
        let fresh = c.tables_generation != tables.generation || p.policy_generation() == 0;
        if !fresh && !periodic {
            return PolicyReport {
                routes: c.routes.len(),
                pairs: c.pairs.len(),
                forwarded,
            };
        }
        let generation = if fresh {
            p.policy_generation().wrapping_add(1).max(1)
        } else {
            p.policy_generation()
        };
        let compiled = if fresh {
            compile_sap_policy(tables, sap, generation, now_ms)
        } else {
            // The same compilation: only the keys move with time.
            compile_sap_routes(tables, sap, generation, now_ms).map(|routes| CompiledPolicy {
                routes,
                pairs: std::mem::take(&mut c.pairs),
                complete: c.complete,
            })
        };
        let Some(CompiledPolicy {
            routes,
            pairs,
            mut complete,
        }) = compiled
        else {
            tracing::warn!(
                max = SAP_POLICY_MAX,
                "the FIB has more prefixes of an IP version than the kernel SaP's policy holds: its first datagrams go through the user-space SaP"
            );
            return off(p, c);
        };
        let mut written = true;
        for (k, r) in &routes {
            if c.routes.get(k) != Some(r) || fresh {
                written &= p.insert_route(*k, r).is_ok();
            }
        }
        if fresh {
            for (&(a, b), pair) in &pairs {
                // A pair that does not fit is left to the user-space SaP; the pods' programs,
                // which take a missing pair for one allowed nothing, then judge by none.
                complete &= p.insert_pair(a, b, pair).is_ok();
            }
            if !complete {
                tracing::info!(
                    max = SAP_POLICY_MAX,
                    "the compiled policy holds only some identity pairs: the pods' first packets go through the user-space path"
                );
            }
        }
        if !written {
            tracing::warn!("cannot write the kernel SaP's routes: its policy is off");
            return off(p, c);
        }
        if fresh {
            if let Err(e) = p.set_policy_generation(generation, complete) {
                tracing::warn!(error = %e, "cannot put the kernel SaP's policy in force");
                return off(p, c);
            }
            // What the kernel holds beyond this compilation (the last one's, or a predecessor
            // agent's) is of another generation, unused: removed now.
            for k in p.route_prefixes() {
                if !routes.contains_key(&k) {
                    p.remove_route(k);
                }
            }
            for (a, b) in p.pairs() {
                if !pairs.contains_key(&(a, b)) {
                    p.remove_pair(a, b);
                }
            }
        }
        *c = SapPolicy {
            tables_generation: tables.generation,
            counted: c.counted,
            routes,
            pairs,
            complete,
        };
        PolicyReport {
            routes: c.routes.len(),
            pairs: c.pairs.len(),
            forwarded,
        }
    }
}

/// The kernel SaP's compiled policy in force: how many routes and identity pairs; and the
/// datagrams it let through since the last periodic sync (counted at those).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyReport {
    pub routes: usize,
    pub pairs: usize,
    pub forwarded: u64,
}

/// What one sync of the node's fast path found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeSyncReport {
    /// The kernel SaP's flows.
    pub flows: SyncReport,
    /// Datagrams the kernel SaP forwarded since the last periodic sync (counted at those).
    pub forwarded: u64,
    /// The kernel gateway's flows.
    pub gateway: SyncReport,
    /// Packets the kernel gateway carried since the last periodic sync (counted at those).
    pub gateway_forwarded: u64,
    /// The kernel SaP's compiled policy.
    pub policy: PolicyReport,
}
