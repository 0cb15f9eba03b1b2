//! The loops that move packets: an endpoint's egress (TUN → engine → UDP) and ingress (UDP → engine
//! → TUN), and a SaP's forwarding (UDP → engine → UDP).
//!
//! Threading model: each loop is a tokio task; an endpoint is one ingress task plus one egress task
//! per overlay device, and a multi-threaded runtime with one worker per core runs them all. What
//! makes it fast is not threads but batching at both ends: the TUN device is attached with
//! `IFF_VNET_HDR` and TSO/USO offloads, so one read returns a 64 KiB TCP aggregate that is split
//! into MTU-sized packets in user space; those become one UDP GSO send per destination; on receive,
//! UDP GRO hands over many datagrams per call, and the inner packets are re-coalesced (GRO) into
//! aggregates for a single TUN write. Per-packet work is the engine's, a few hash lookups.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tun_rs::{AsyncDevice, GROTable, VIRTIO_NET_HDR_LEN};

use keyway_core::counters::{Counters, Stage};
use keyway_core::engine::{self, DropReason};
use keyway_core::flow::FlowTable;
use keyway_core::gue;
use keyway_core::tables::{SharedLocal, SharedTables};

use super::fastpath::NodeFastSlot;

/// Packets handled per batch at each end.
pub const BATCH: usize = 64;
/// The largest datagram or inner packet handled (a full IPv4/IPv6 packet).
const MAX_PACKET: usize = 65535;

/// A GUE socket with GSO/GRO, usable from tasks.
#[derive(Debug)]
pub struct GueSocket {
    sock: UdpSocket,
    state: UdpSocketState,
}

impl GueSocket {
    /// Wraps a bound, non-blocking socket. Must be called inside a tokio runtime.
    pub fn new(sock: std::net::UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new((&sock).into())?;
        Ok(GueSocket {
            sock: UdpSocket::from_std(sock)?,
            state,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    fn max_segments(&self) -> usize {
        self.state.max_gso_segments().clamp(1, 64)
    }

    fn gro_segments(&self) -> usize {
        self.state.gro_segments().clamp(1, 64)
    }

    /// Sends one datagram, or several equal-sized ones in one GSO call when `segment` is given.
    pub async fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let t = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        loop {
            self.sock.writable().await?;
            match self.sock.try_io(Interest::WRITABLE, || {
                self.state.try_send((&self.sock).into(), &t)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    /// Sends without waiting; `WouldBlock` when the socket's buffer is full.
    pub fn try_send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let t = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        self.sock.try_io(Interest::WRITABLE, || {
            self.state.try_send((&self.sock).into(), &t)
        })
    }

    async fn recv(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        loop {
            self.sock.readable().await?;
            match self.sock.try_io(Interest::READABLE, || {
                self.state.recv((&self.sock).into(), bufs, meta)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

/// Gathers datagrams for one destination into a single GSO send: equal sizes, the last one may be
/// shorter and then closes the batch.
#[derive(Debug)]
struct GsoBatch {
    to: Option<SocketAddr>,
    buf: Vec<u8>,
    segment: usize,
    count: usize,
    closed: bool,
    max: usize,
}

impl GsoBatch {
    fn new(max: usize) -> Self {
        GsoBatch {
            to: None,
            buf: Vec::with_capacity(64 * 1024),
            segment: 0,
            count: 0,
            closed: false,
            max,
        }
    }

    fn fits(&self, to: SocketAddr, len: usize) -> bool {
        self.to == Some(to)
            && !self.closed
            && self.count < self.max
            && len <= self.segment
            && self.buf.len() + len <= MAX_PACKET
    }

    fn push(&mut self, to: SocketAddr, datagram: &[u8]) {
        if self.count == 0 {
            self.to = Some(to);
            self.segment = datagram.len();
        } else if datagram.len() < self.segment {
            self.closed = true;
        }
        self.buf.extend_from_slice(datagram);
        self.count += 1;
    }

    async fn flush(&mut self, sock: &GueSocket) {
        let Some(to) = self.to.take() else { return };
        let segment = (self.count > 1).then_some(self.segment);
        if let Err(e) = sock.send(to, &self.buf, segment).await {
            // ICMP errors surface here (port unreachable, no route): the packet is lost, as it
            // would be on the wire; the loop goes on.
            tracing::debug!(%to, error = %e, "GUE send failed");
        }
        self.buf.clear();
        self.count = 0;
        self.closed = false;
    }

    async fn add(&mut self, sock: &GueSocket, to: SocketAddr, datagram: &[u8]) {
        if self.count > 0 && !self.fits(to, datagram.len()) {
            self.flush(sock).await;
        }
        self.push(to, datagram);
    }
}

/// How often at most a kind of suspicious drop is logged.
const DROP_LOG_INTERVAL_MS: u64 = 10_000;
const STAGES: usize = Stage::ALL.len();
const REASONS: usize = DropReason::ALL.len();

/// Logs drops that can be an attack — a wrong key or MAC, a missing MAC, a forged source — at
/// most once per [`DROP_LOG_INTERVAL_MS`] per stage and reason, with how many went unlogged in
/// between: a flood of forged datagrams costs a counter increment each, never a log line each.
struct DropLog {
    next: [[AtomicU64; REASONS]; STAGES],
    quiet: [[AtomicU64; REASONS]; STAGES],
}

impl DropLog {
    const fn new() -> Self {
        DropLog {
            next: [const { [const { AtomicU64::new(0) }; REASONS] }; STAGES],
            quiet: [const { [const { AtomicU64::new(0) }; REASONS] }; STAGES],
        }
    }

    fn suspicious(reason: DropReason) -> bool {
        matches!(
            reason,
            DropReason::BadKey
                | DropReason::BadMac
                | DropReason::Unauthenticated
                | DropReason::SpoofedSource
        )
    }

    /// `Some(unlogged since the last line)` when this drop is to be logged now.
    fn due(&self, stage: Stage, reason: DropReason, now_ms: u64) -> Option<u64> {
        if !Self::suspicious(reason) {
            return None;
        }
        let (next, quiet) = (
            &self.next[stage as usize][reason.index()],
            &self.quiet[stage as usize][reason.index()],
        );
        let due = next.load(Ordering::Relaxed);
        let won = now_ms >= due
            && next
                .compare_exchange(
                    due,
                    now_ms + DROP_LOG_INTERVAL_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if won {
            Some(quiet.swap(0, Ordering::Relaxed))
        } else {
            quiet.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

static DROP_LOG: DropLog = DropLog::new();

/// Counts a datagram's drop, and logs it when it looks like an attack (rate-limited).
fn refused(counters: &Counters, stage: Stage, reason: DropReason, from: SocketAddr, now_ms: u64) {
    counters.dropped(stage, reason);
    if let Some(unlogged) = DROP_LOG.due(stage, reason, now_ms) {
        tracing::warn!(
            stage = stage.as_str(),
            reason = reason.as_str(),
            %from,
            unlogged,
            "GUE datagram refused (at most one line per stage and reason every 10 s; every one \
             is counted in keyway_datapath_drops_total)"
        );
    }
}

/// What an endpoint's loops share.
#[derive(Debug)]
pub struct EndpointContext {
    pub tables: Arc<SharedTables>,
    pub local: Arc<SharedLocal>,
    pub flows: FlowTable,
    pub counters: Arc<Counters>,
    /// The kernel fast path, once it carries this endpoint's established flows (set after the
    /// loops start: they serve the endpoint meanwhile).
    pub fast: std::sync::OnceLock<super::fastpath::FastPath>,
}

/// Buffers the loops work in between two awaits: one set per worker thread, not per endpoint,
/// so a hundred idle pods cost a hundred sockets and devices, not a hundred sets of 64 KiB buffers
/// and GRO tables.
struct ThreadBuffers {
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    batch: GsoBatch,
    rx: Vec<Vec<u8>>,
    meta: [RecvMeta; 2],
    /// Inner packets for each device of the endpoint being served.
    out: Vec<Vec<Vec<u8>>>,
    gro: GROTable,
}

impl ThreadBuffers {
    fn new() -> Self {
        ThreadBuffers {
            original: vec![0u8; VIRTIO_NET_HDR_LEN + MAX_PACKET],
            bufs: Vec::new(),
            sizes: vec![0usize; BATCH],
            batch: GsoBatch::new(64),
            rx: vec![vec![0u8; RX_BUFFER]; 2],
            meta: [RecvMeta::default(); 2],
            out: Vec::new(),
            gro: GROTable::default(),
        }
    }

    /// Egress buffers sized for a device's MTU (they grow, never shrink).
    fn egress_bufs(&mut self, mtu: usize) {
        let want = gue::HEADROOM + mtu;
        if self.bufs.len() < BATCH || self.bufs[0].len() < want {
            self.bufs = vec![vec![0u8; want]; BATCH];
        }
    }
}

thread_local! {
    static BUFFERS: std::cell::RefCell<ThreadBuffers> = std::cell::RefCell::new(ThreadBuffers::new());
}

/// Largest GRO aggregate received at once.
const RX_BUFFER: usize = 64 * 1500;

/// Sends what the batch holds without waiting; what the socket cannot take now is kept in
/// `overflow` for the caller to send after an await.
fn flush_now(
    batch: &mut GsoBatch,
    sock: &GueSocket,
    overflow: &mut Vec<(SocketAddr, Vec<u8>, Option<usize>)>,
) {
    let Some(to) = batch.to.take() else { return };
    let segment = (batch.count > 1).then_some(batch.segment);
    match sock.try_send(to, &batch.buf, segment) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            overflow.push((to, batch.buf.clone(), segment))
        }
        // ICMP errors surface here (port unreachable, no route): the packets are lost, as on the
        // wire; the loop goes on.
        Err(e) => tracing::debug!(%to, error = %e, "GUE send failed"),
    }
    batch.buf.clear();
    batch.count = 0;
    batch.closed = false;
}

/// The TUN → GUE loop of one overlay device. Returns when the device goes away.
pub async fn endpoint_egress(
    ctx: Arc<EndpointContext>,
    tun: Arc<AsyncDevice>,
    sock: Arc<GueSocket>,
) -> io::Result<()> {
    let mtu = usize::from(tun.mtu().unwrap_or(1500)).max(1280);
    let max_segments = sock.max_segments();
    let mut overflow = Vec::new();
    loop {
        if let Err(e) = tun.readable().await {
            return if device_gone(&e) { Ok(()) } else { Err(e) };
        }
        let mut learned = Vec::new();
        let mut generation = 0;
        let gone = BUFFERS.with_borrow_mut(|b| -> bool {
            b.egress_bufs(mtu);
            b.batch.max = max_segments;
            let ThreadBuffers {
                original,
                bufs,
                sizes,
                batch,
                ..
            } = b;
            let n = match tun.try_recv_multiple(original, bufs, sizes, gue::HEADROOM) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if device_gone(&e) => return true,
                Err(e) => {
                    tracing::debug!(error = %e, "TUN read failed");
                    return false;
                }
            };
            let tables = ctx.tables.load();
            let local = ctx.local.load();
            let now = super::now_ms();
            generation = tables.generation;
            for (buf, &size) in bufs.iter_mut().zip(sizes.iter()).take(n) {
                let buf = &mut buf[..gue::HEADROOM + size];
                let mut verdict = engine::endpoint_egress(&tables, &local, &ctx.flows, buf, now);
                if let Some(f) = ctx.fast.get() {
                    // A reply within a connection the kernel opened, before the engine knew it.
                    if verdict == Err(engine::DropReason::DeniedByPolicy)
                        && f.hand_over(&ctx, &buf[gue::HEADROOM..], now)
                    {
                        verdict = engine::endpoint_egress(&tables, &local, &ctx.flows, buf, now);
                    }
                    // (Whatever the verdict: the engine may have ended the flow before a later
                    // check refused the packet.)
                    f.forget_reset(&buf[gue::HEADROOM..]);
                }
                match verdict {
                    Ok(send) => {
                        let datagram = &buf[send.start..];
                        if let Some(c) = ctx.fast.get().and_then(|f| {
                            f.egress_candidate(&buf[gue::HEADROOM..], datagram, send.to)
                        }) && learned.last() != Some(&c)
                        {
                            learned.push(c);
                        }
                        ctx.counters.forwarded(Stage::Egress, size);
                        if send.hop == engine::Hop::LocalSap {
                            // This node's SaP decided too: count it with the SaP's own forwards.
                            ctx.counters.forwarded(Stage::Sap, datagram.len());
                        }
                        if batch.count > 0 && !batch.fits(send.to, datagram.len()) {
                            flush_now(batch, &sock, &mut overflow);
                        }
                        batch.push(send.to, datagram);
                    }
                    Err(reason) => ctx.counters.dropped(Stage::Egress, reason),
                }
            }
            flush_now(batch, &sock, &mut overflow);
            false
        });
        if gone {
            return Ok(());
        }
        for (to, data, segment) in overflow.drain(..) {
            if let Err(e) = sock.send(to, &data, segment).await {
                tracing::debug!(%to, error = %e, "GUE send failed");
            }
        }
        // Only now, with the packets sent, may the kernel carry their flows' next ones.
        if let (Some(fast), false) = (ctx.fast.get(), learned.is_empty()) {
            fast.learn_egress(&learned, generation);
        }
    }
}

fn device_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD) | Some(libc::ENODEV) | Some(libc::EIO)
    )
}

/// The inner destination address, for picking the device (the engine has already checked it).
fn inner_dst(inner: &[u8]) -> Option<IpAddr> {
    match inner.first()? >> 4 {
        4 if inner.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&inner[16..20]).ok()?)),
        6 if inner.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&inner[24..40]).ok()?)),
        _ => None,
    }
}

/// Writes inner packets (each after room for its offload header) to a TUN device, coalescing
/// what can be (GRO).
fn write_batch(
    tun: &tun_rs::DeviceImpl,
    gro: &mut GROTable,
    packets: &mut [Vec<u8>],
) -> io::Result<()> {
    if packets.is_empty() {
        return Ok(());
    }
    tun.send_multiple(gro, packets, VIRTIO_NET_HDR_LEN)
        .map(drop)
}

/// The offload header (`struct virtio_net_hdr`, native byte order) that hands a TCP packet
/// (IPv4, or IPv6 without extension headers) longer than the device's MTU to the kernel as the
/// GSO packet it is: its checksum still to be completed, its segments of the MSS the MTU allows.
/// `None` for anything else.
fn whole_tcp_header(inner: &[u8], mtu: usize) -> Option<[u8; VIRTIO_NET_HDR_LEN]> {
    const NEEDS_CSUM: u8 = 1;
    const GSO_TCPV4: u8 = 1;
    const GSO_TCPV6: u8 = 4;
    let c = keyway_core::packet::classify(inner).ok()?;
    if c.proto != keyway_core::packet::PROTO_TCP {
        return None;
    }
    let (gso, ip_len) = match inner[0] >> 4 {
        4 => (GSO_TCPV4, usize::from(inner[0] & 0x0f) * 4),
        // The transport header right after the fixed header (no extension headers).
        6 if inner.get(6) == Some(&keyway_core::packet::PROTO_TCP) => (GSO_TCPV6, 40),
        _ => return None,
    };
    let doff = usize::from(*inner.get(ip_len + 12)? >> 4) * 4;
    let headers = ip_len + doff;
    if doff < 20 || inner.len() <= headers || mtu <= headers {
        return None;
    }
    let mut h = [0u8; VIRTIO_NET_HDR_LEN];
    h[0] = NEEDS_CSUM;
    h[1] = gso;
    h[2..4].copy_from_slice(&(headers as u16).to_ne_bytes());
    h[4..6].copy_from_slice(&((mtu - headers) as u16).to_ne_bytes());
    h[6..8].copy_from_slice(&(ip_len as u16).to_ne_bytes());
    h[8..10].copy_from_slice(&16u16.to_ne_bytes());
    Some(h)
}

/// One overlay device of an endpoint, by the overlay IP it carries.
#[derive(Clone)]
pub struct OverlayDevice {
    pub ip: IpAddr,
    pub tun: Arc<AsyncDevice>,
}

impl std::fmt::Debug for OverlayDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayDevice")
            .field("ip", &self.ip)
            .finish_non_exhaustive()
    }
}

/// The device an inner packet for `ip` (one of the endpoint's own addresses) is written to: the
/// one that carries `ip`; for the pod IP, the one of its family (where the pod's steering sends
/// that family), or the first.
fn device_for(devices: &[OverlayDevice], ip: IpAddr) -> Option<usize> {
    devices
        .iter()
        .position(|x| x.ip == ip)
        .or_else(|| devices.iter().position(|x| x.ip.is_ipv4() == ip.is_ipv4()))
        .or((!devices.is_empty()).then_some(0))
}

/// The GUE → TUN loop of an endpoint (all its devices). Runs until the socket fails.
pub async fn endpoint_ingress(
    ctx: Arc<EndpointContext>,
    devices: Vec<OverlayDevice>,
    sock: Arc<GueSocket>,
) -> io::Result<()> {
    let mut learned = Vec::new();
    let mtus: Vec<usize> = devices
        .iter()
        .map(|d| usize::from(d.tun.mtu().unwrap_or(1500)))
        .collect();
    loop {
        sock.sock.readable().await?;
        let mut generation = 0;
        let gone = BUFFERS.with_borrow_mut(|b| -> bool {
            let ThreadBuffers {
                rx, meta, out, gro, ..
            } = b;
            let n = {
                let mut iov: Vec<IoSliceMut<'_>> =
                    rx.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                match sock.sock.try_io(Interest::READABLE, || {
                    sock.state.recv((&sock.sock).into(), &mut iov, meta)
                }) {
                    Ok(n) => n,
                    // Errors queued by ICMP (refused, unreachable) belong to earlier sends.
                    Err(_) => return false,
                }
            };
            let tables = ctx.tables.load();
            let local = ctx.local.load();
            let now = super::now_ms();
            generation = tables.generation;
            if out.len() < devices.len() {
                out.resize_with(devices.len(), Vec::new);
            }
            let mut used = vec![0usize; devices.len()];
            for (m, buf) in meta.iter().zip(rx.iter()).take(n) {
                let stride = if m.stride == 0 { m.len } else { m.stride };
                for datagram in buf[..m.len].chunks(stride) {
                    let judge = || {
                        engine::endpoint_ingress(&tables, &local, &ctx.flows, datagram, m.addr, now)
                    };
                    let mut verdict = judge();
                    if let Some(f) = ctx.fast.get() {
                        let inner = gue::decode(datagram)
                            .ok()
                            .and_then(|h| datagram.get(h.payload_offset..))
                            .unwrap_or_default();
                        // A reply within a connection the kernel opened, before the engine knew
                        // it.
                        if verdict == Err(engine::DropReason::DeniedByPolicy)
                            && f.hand_over(&ctx, inner, now)
                        {
                            verdict = judge();
                        }
                        f.forget_reset(inner);
                    }
                    let range = match verdict {
                        Ok(r) => r,
                        Err(reason) => {
                            refused(&ctx.counters, Stage::Ingress, reason, m.addr, now);
                            continue;
                        }
                    };
                    let inner = &datagram[range];
                    let Some(d) = inner_dst(inner).and_then(|ip| device_for(&devices, ip)) else {
                        ctx.counters
                            .dropped(Stage::Ingress, engine::DropReason::WrongDestination);
                        continue;
                    };
                    if let Some(f) = ctx
                        .fast
                        .get()
                        .and_then(|f| f.ingress_candidate(datagram, inner, m.addr))
                        && learned.last() != Some(&f)
                    {
                        learned.push(f);
                    }
                    ctx.counters.forwarded(Stage::Ingress, inner.len());
                    if inner.len() > mtus[d] {
                        // A GSO packet that a fast-path sender's kernel kept whole: written as
                        // one, after what came before it, with the offload header that says so.
                        let Some(hdr) = whole_tcp_header(inner, mtus[d]) else {
                            ctx.counters
                                .dropped(Stage::Ingress, engine::DropReason::Malformed);
                            continue;
                        };
                        let sync: &tun_rs::DeviceImpl = &devices[d].tun;
                        let mut r = write_batch(sync, gro, &mut out[d][..used[d]]);
                        used[d] = 0;
                        if r.is_ok() {
                            r = devices[d]
                                .tun
                                .try_send_vectored(&[
                                    io::IoSlice::new(&hdr),
                                    io::IoSlice::new(inner),
                                ])
                                .map(drop);
                        }
                        match r {
                            Err(e) if device_gone(&e) => return true,
                            Err(e) => tracing::debug!(error = %e, "TUN write failed"),
                            Ok(()) => {}
                        }
                        continue;
                    }
                    let slot = &mut out[d];
                    if slot.len() <= used[d] {
                        // GRO appends the flow's next segments to its first packet's buffer, and
                        // only when that buffer can hold a whole aggregate without reallocating.
                        slot.push(Vec::with_capacity(2 * VIRTIO_NET_HDR_LEN + MAX_PACKET));
                    }
                    let o = &mut slot[used[d]];
                    o.clear();
                    o.resize(VIRTIO_NET_HDR_LEN, 0);
                    o.extend_from_slice(inner);
                    // From a fast-path sender's kernel, a checksum may be the offload's half.
                    keyway_core::packet::complete_partial_checksum(&mut o[VIRTIO_NET_HDR_LEN..]);
                    used[d] += 1;
                }
            }
            for (d, dev) in devices.iter().enumerate() {
                // TUN writes do not block: the kernel takes the packet or drops it. So they are
                // made here, synchronously, with this thread's GRO table.
                if let Err(e) = write_batch(&dev.tun, gro, &mut out[d][..used[d]]) {
                    if device_gone(&e) {
                        return true;
                    }
                    tracing::debug!(error = %e, "TUN write failed");
                }
            }
            for slot in out.iter_mut() {
                slot.truncate(BATCH);
            }
            false
        });
        if gone {
            return Ok(());
        }
        // Only now, with the packets delivered, may the kernel carry their flows' next ones.
        if let (Some(fast), false) = (ctx.fast.get(), learned.is_empty()) {
            fast.learn_ingress(&learned, generation);
            learned.clear();
        }
    }
}

/// A gateway's loop: packets from off the overlay, read from the gateway device, checked and
/// carried to their destination's endpoint from the SaP's socket. Returns when the device goes.
///
/// `node`: the node's fast path once loaded, which the loop teaches each flow it carried (after
/// the packet went) so that the kernel gateway carries the flow's next ones.
pub async fn gateway(
    tables: Arc<SharedTables>,
    counters: Arc<Counters>,
    tun: Arc<AsyncDevice>,
    sock: Arc<GueSocket>,
    node: NodeFastSlot,
) -> io::Result<()> {
    let mut buf = vec![0u8; gue::HEADROOM + MAX_PACKET];
    loop {
        let n = match tun.recv(&mut buf[gue::HEADROOM..]).await {
            Ok(n) => n,
            Err(e) if device_gone(&e) => return Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "gateway read failed");
                continue;
            }
        };
        let packet = &mut buf[..gue::HEADROOM + n];
        let t = tables.load();
        match engine::gateway_ingress(&t, packet, super::now_ms()) {
            Ok(send) => {
                counters.forwarded(Stage::Gateway, n);
                let datagram = &packet[send.start..];
                if let Err(e) = sock.send(send.to, datagram, None).await {
                    tracing::debug!(to = %send.to, error = %e, "gateway send failed");
                    continue;
                }
                // Only now, with the packet sent, may the kernel carry the flow's next ones.
                let fast = node.get().and_then(Option::as_ref);
                if let Some((fast, f)) =
                    fast.and_then(|f| Some((f, f.gateway_candidate(datagram, send.to)?)))
                {
                    fast.learn_gateway(&[f], t.generation);
                }
            }
            Err(reason) => counters.dropped(Stage::Gateway, reason),
        }
    }
}

/// A SaP's loop: datagrams in, checked, forwarded unchanged. Runs until the socket fails.
///
/// `node`: the node's fast path once loaded, which the loop teaches each flow it forwarded (after
/// the datagram went) so that the kernel SaP forwards the flow's next ones. `mtu`: the largest IP
/// packet the SaP sends. A fast-path sender's kernel sends a TCP flow's GSO packets whole, and
/// one reaching this loop (before the kernel SaP knows its flow, or with no kernel SaP) arrives
/// as one datagram longer than that: it is sent on as the datagrams the sender's kernel would
/// have made of it, each with the same GUE header. A fast-path sender also leaves checksums for
/// an offload to finish; they are completed here, as a user-space receiver does.
pub async fn sap(
    tables: Arc<SharedTables>,
    counters: Arc<Counters>,
    sock: Arc<GueSocket>,
    node: NodeFastSlot,
    mtu: usize,
) -> io::Result<()> {
    let segs = sock.gro_segments();
    let mut rx = vec![vec![0u8; (segs * 1500).clamp(MAX_PACKET, 128 * 1024)]; 4];
    let mut meta = [RecvMeta::default(); 4];
    let mut batch = GsoBatch::new(sock.max_segments());
    let mut learned = Vec::new();
    let mut pieces: Vec<Vec<u8>> = Vec::new();
    // The most a datagram may hold: the IP packet less its IPv4 and UDP headers.
    let max_datagram = mtu.saturating_sub(28).max(576);
    loop {
        let n = {
            let mut iov: Vec<IoSliceMut<'_>> = rx.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            match sock.recv(&mut iov, &mut meta).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::trace!(error = %e, "SaP receive error");
                    continue;
                }
            }
        };
        let t = tables.load();
        let now = super::now_ms();
        let fast = node.get().and_then(Option::as_ref);
        for (m, buf) in meta.iter().zip(rx.iter_mut()).take(n) {
            let stride = if m.stride == 0 { m.len } else { m.stride };
            for datagram in buf[..m.len].chunks_mut(stride) {
                let to = match engine::sap_forward(&t, datagram, m.addr, now) {
                    Ok(to) => to,
                    Err(reason) => {
                        refused(&counters, Stage::Sap, reason, m.addr, now);
                        continue;
                    }
                };
                counters.forwarded(Stage::Sap, datagram.len());
                if let Some(f) = fast.and_then(|f| f.sap_candidate(datagram, m.addr, to))
                    && learned.last() != Some(&f)
                {
                    learned.push(f);
                }
                // Without a MAC (one covers the bytes as sent) the inner packet may be a fast
                // sender's: whole, or with a half-done checksum.
                if super::fastpath::plain_key(datagram).is_none() {
                    batch.add(&sock, to, datagram).await;
                    continue;
                }
                let (header, inner) = datagram.split_at_mut(gue::HEADER_LEN);
                if header.len() + inner.len() > max_datagram {
                    pieces.clear();
                    let whole = keyway_core::packet::segment_tcp(
                        inner,
                        max_datagram - gue::HEADER_LEN,
                        |seg| {
                            let mut d = Vec::with_capacity(gue::HEADER_LEN + seg.len());
                            d.extend_from_slice(header);
                            d.extend_from_slice(seg);
                            pieces.push(d);
                        },
                    );
                    if whole.is_some() {
                        for d in &pieces {
                            batch.add(&sock, to, d).await;
                        }
                        continue;
                    }
                } else {
                    keyway_core::packet::complete_partial_checksum(inner);
                }
                batch.add(&sock, to, datagram).await;
            }
        }
        batch.flush(&sock).await;
        // Only now, with the datagrams sent, may the kernel forward their flows' next ones.
        if let (Some(fast), false) = (fast, learned.is_empty()) {
            fast.learn_sap(&learned, t.generation);
            learned.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inner_destination_of_both_families() {
        let v4 = keyway_core::packet::build::tcp4([1, 1, 1, 1], 1, [2, 2, 2, 2], 2);
        assert_eq!(inner_dst(&v4), Some("2.2.2.2".parse().unwrap()));
        let v6 = keyway_core::packet::build::ipv6(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            17,
            &[0; 8],
        );
        assert_eq!(inner_dst(&v6), Some("fd00::2".parse().unwrap()));
        assert_eq!(inner_dst(&[0x45, 0, 0]), None);
    }

    #[test]
    fn a_whole_tcp_packet_gets_the_offload_header_of_its_segments() {
        use keyway_core::packet::build;
        let mut p = build::ipv4(
            [1, 0, 0, 1].into(),
            [1, 0, 0, 2].into(),
            6,
            &build::ports(6, 1000, 80, &[0u8; 4000]),
        );
        let h = whole_tcp_header(&p, 1456).unwrap();
        assert_eq!((h[0], h[1]), (1, 1), "checksum to complete, TCPv4 GSO");
        let word = |i: usize| u16::from_ne_bytes([h[i], h[i + 1]]);
        assert_eq!(word(2), 40, "header length");
        assert_eq!(word(4), 1416, "segments of MTU less headers");
        assert_eq!((word(6), word(8)), (20, 16), "checksum at TCP's");
        p[9] = 17;
        assert_eq!(whole_tcp_header(&p, 1456), None, "not TCP");
        let v6 = build::ipv6(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            6,
            &build::ports(6, 1000, 80, &[0u8; 4000]),
        );
        let h = whole_tcp_header(&v6, 1456).unwrap();
        assert_eq!((h[0], h[1]), (1, 4), "checksum to complete, TCPv6 GSO");
        let word = |i: usize| u16::from_ne_bytes([h[i], h[i + 1]]);
        assert_eq!(
            (word(2), word(4)),
            (60, 1396),
            "headers, and segments of MTU less them"
        );
        assert_eq!((word(6), word(8)), (40, 16), "checksum at TCP's");
    }

    #[test]
    fn suspicious_drops_are_logged_once_per_interval_with_the_rest_counted() {
        let log = DropLog::new();
        let t = 1_000_000;
        assert_eq!(log.due(Stage::Ingress, DropReason::BadMac, t), Some(0));
        for i in 1..=5 {
            assert_eq!(log.due(Stage::Ingress, DropReason::BadMac, t + i), None);
        }
        assert_eq!(
            log.due(Stage::Sap, DropReason::BadMac, t),
            Some(0),
            "each stage has its own budget"
        );
        assert_eq!(log.due(Stage::Ingress, DropReason::BadKey, t), Some(0));
        assert_eq!(
            log.due(Stage::Ingress, DropReason::DeniedByPolicy, t),
            None,
            "policy drops are not suspicious: counted only"
        );
        let later = t + DROP_LOG_INTERVAL_MS;
        assert_eq!(
            log.due(Stage::Ingress, DropReason::BadMac, later),
            Some(5),
            "the next line says how many went unlogged"
        );
    }

    #[test]
    fn gso_batches_hold_equal_segments_and_a_short_tail() {
        let to: SocketAddr = "10.0.0.1:6080".parse().unwrap();
        let other: SocketAddr = "10.0.0.2:6080".parse().unwrap();
        let mut b = GsoBatch::new(3);
        b.push(to, &[0; 100]);
        assert!(b.fits(to, 100));
        assert!(!b.fits(other, 100), "one destination per batch");
        assert!(!b.fits(to, 101), "no segment larger than the first");
        b.push(to, &[0; 60]);
        assert!(!b.fits(to, 60), "a short segment ends the batch");
        let mut b = GsoBatch::new(2);
        b.push(to, &[0; 10]);
        b.push(to, &[0; 10]);
        assert!(!b.fits(to, 10), "segment limit");
    }
}
