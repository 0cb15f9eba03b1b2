//! Two endpoints in two network namespaces joined by a veth pair, each on a real TUN device: ping
//! and TCP between the overlay IPs work with the right keys and policy, and each way of failing is
//! dropped and counted under its reason. A capture of the veth shows the GUE header on the wire.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use keyway_core::acl::{Acl, Isolation, PortRange};
use keyway_core::counters::{Counters, Stage};
use keyway_core::engine::{DropReason, LocalEndpoint, Tables};
use keyway_core::fib::{Fib, Route};
use keyway_core::flow::{FlowTable, FlowTimeouts};
use keyway_core::key::{ClusterSecret, Key, KeyRing, Rotation};
use keyway_core::packet::PROTO_TCP;
use keyway_core::tables::{SharedLocal, SharedTables};
use keyway_sap::io::datapath::EndpointContext;
use keyway_sap::io::endpoint::{self, DeviceSpec, Running};
use keyway_sap::io::fastpath::FastPath;
use keyway_testing::{TestNetns, privileged, veth};

const A_OVERLAY: &str = "100.64.1.1";
const B_OVERLAY: &str = "100.64.2.1";
const A_OVERLAY6: &str = "fd6b:7779::1:1";
const B_OVERLAY6: &str = "fd6b:7779::2:1";
const A_INFRA: &str = "10.9.0.1";
const B_INFRA: &str = "10.9.0.2";

fn secret() -> ClusterSecret {
    ClusterSecret::new(b"a test cluster secret, 32 bytes!".to_vec()).unwrap()
}

fn ring(entity: &str) -> KeyRing {
    KeyRing::derive(
        &secret(),
        entity,
        Rotation::default(),
        keyway_sap::io::now_ms(),
    )
}

fn sock(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), 6080)
}

/// What varies between scenarios: the policy and the key A uses for B.
#[derive(Clone, Copy)]
struct Policy {
    /// Allow A → B on TCP 7000 only (isolating both), instead of no policy at all.
    tcp_7000_only: bool,
    /// The key A's FIB holds for B.
    wrong_key_for_b: bool,
    /// Leave B out of A's FIB.
    b_unknown: bool,
}

const OPEN: Policy = Policy {
    tcp_7000_only: false,
    wrong_key_for_b: false,
    b_unknown: false,
};

fn tables(p: Policy) -> Tables {
    let mut acl = Acl::builder();
    let iso = Isolation {
        ingress: p.tcp_7000_only,
        egress: p.tcp_7000_only,
    };
    let ia = acl.identity(iso);
    let ib = acl.identity(iso);
    if p.tcp_7000_only {
        acl.egress(ia, ib)
            .allow(PROTO_TCP, Some(PortRange::single(7000)));
        acl.ingress(ia, ib)
            .allow(PROTO_TCP, Some(PortRange::single(7000)));
    }
    let mut fib = Fib::builder();
    // Each pod on both overlays: an IPv4 address and an IPv6 one.
    for prefix in [format!("{A_OVERLAY}/32"), format!("{A_OVERLAY6}/128")] {
        fib.insert(
            prefix.parse().unwrap(),
            Route {
                entity: "t/a".into(),
                identity: ia,
                keys: ring("t/a"),
                infra: sock(A_INFRA),
                sap: None,
                outside: false,
            },
        )
        .unwrap();
    }
    if !p.b_unknown {
        let keys = if p.wrong_key_for_b {
            KeyRing::Static(Key(0x0bad_0bad))
        } else {
            ring("t/b")
        };
        for prefix in [format!("{B_OVERLAY}/32"), format!("{B_OVERLAY6}/128")] {
            fib.insert(
                prefix.parse().unwrap(),
                Route {
                    entity: "t/b".into(),
                    identity: ib,
                    keys,
                    infra: sock(B_INFRA),
                    sap: None,
                    outside: false,
                },
            )
            .unwrap();
        }
    }
    Tables {
        fib: fib.build(),
        acl: acl.build(),
        saps: Default::default(),
        generation: 1,
        packet_auth: Default::default(),
    }
}

struct Pod {
    ns: TestNetns,
    tables: Arc<SharedTables>,
    counters: Arc<Counters>,
    ctx: Arc<EndpointContext>,
    _running: Running,
    _sync: Option<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Pod {
    fn carried(&self) -> keyway_sap::io::bpf::Carried {
        self.ctx.fast.get().expect("a fast pod").carried()
    }

    /// What the agent does after a compile: re-derive the kernel's flows now.
    fn resync(&self) {
        let fast = self.ctx.fast.get().expect("a fast pod");
        fast.sync(&self.ctx, keyway_sap::io::now_ms(), false);
    }
}

/// A pod on an IPv4 overlay (`kw0`) and an IPv6 one (`kw1`), on the user-space path (`fast`
/// false) or with the kernel fast path attached and kept in step every second, as the agent does.
async fn pod(
    ns: TestNetns,
    entity: &str,
    (overlay, overlay6): (&str, &str),
    infra: &str,
    tables: Tables,
    fast: bool,
) -> Pod {
    let mtu = (1500 - keyway_core::gue::MTU_RESERVE_IPV4) as u16;
    let specs = [
        DeviceSpec {
            name: "kw0".into(),
            mtu,
            address: format!("{overlay}/32").parse().unwrap(),
            routes: vec!["100.64.0.0/10".parse().unwrap()],
        },
        DeviceSpec {
            name: "kw1".into(),
            mtu,
            address: format!("{overlay6}/128").parse().unwrap(),
            routes: vec!["fd6b:7779::/48".parse().unwrap()],
        },
    ];
    let overlay_ips: Vec<IpAddr> = vec![overlay.parse().unwrap(), overlay6.parse().unwrap()];
    let devices: Vec<(String, IpAddr)> = specs
        .iter()
        .map(|s| s.name.clone())
        .zip(overlay_ips.iter().copied())
        .collect();
    let listen = sock(infra);
    let netns = ns.netns().try_clone().unwrap();
    let (opened, fast) = tokio::task::spawn_blocking(move || {
        for spec in &specs {
            endpoint::provision(&netns, spec).unwrap();
        }
        let opened = endpoint::open(&netns, &devices, listen, None).unwrap();
        let fast = fast.then(|| {
            let IpAddr::V4(i) = listen.ip() else {
                unreachable!("an IPv4 underlay")
            };
            FastPath::open(&netns, &devices, i, 6080, None).expect("the fast path attaches")
        });
        (opened, fast)
    })
    .await
    .unwrap();
    let tables = SharedTables::new(tables);
    let counters = Arc::new(Counters::new());
    let ctx = Arc::new(EndpointContext {
        tables: tables.clone(),
        local: SharedLocal::new(LocalEndpoint {
            entity: entity.into(),
            overlay_ips,
            infra: listen,
            keys: ring(entity),
            local_sap: None,
        }),
        flows: FlowTable::new(1024, FlowTimeouts::default()),
        counters: counters.clone(),
        fast: Default::default(),
    });
    if let Some(f) = fast {
        f.sync(&ctx, keyway_sap::io::now_ms(), false);
        ctx.fast.set(f).expect("set once");
    }
    let sync = ctx.fast.get().is_some().then(|| {
        let ctx = ctx.clone();
        AbortOnDrop(tokio::spawn(async move {
            loop {
                if let Some(f) = ctx.fast.get() {
                    f.sync(&ctx, keyway_sap::io::now_ms(), true);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }))
    });
    let running = endpoint::spawn(ctx.clone(), opened).unwrap();
    Pod {
        ns,
        tables,
        counters,
        ctx,
        _running: running,
        _sync: sync,
    }
}

async fn pair(test: &str) -> (Pod, Pod) {
    pair_on(test, false).await
}

async fn pair_on(test: &str, fast: bool) -> (Pod, Pod) {
    mixed_pair(test, fast, fast).await
}

/// A and B, each on the fast path or the user-space path.
async fn mixed_pair(test: &str, fast_a: bool, fast_b: bool) -> (Pod, Pod) {
    let na = TestNetns::new(test, "a");
    let nb = TestNetns::new(test, "b");
    veth(
        &na,
        "eth0",
        &format!("{A_INFRA}/24"),
        &nb,
        "eth0",
        &format!("{B_INFRA}/24"),
    );
    let a = pod(
        na,
        "t/a",
        (A_OVERLAY, A_OVERLAY6),
        A_INFRA,
        tables(OPEN),
        fast_a,
    )
    .await;
    let b = pod(
        nb,
        "t/b",
        (B_OVERLAY, B_OVERLAY6),
        B_INFRA,
        tables(OPEN),
        fast_b,
    )
    .await;
    (a, b)
}

async fn ping(from: &Pod, to: &str, extra: &[&str]) -> bool {
    let mut args = vec!["ping", "-c", "2", "-i", "0.2", "-W", "1"];
    args.extend_from_slice(extra);
    args.push(to);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let name = from.ns.name.clone();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        std::process::Command::new("ip")
            .args(["netns", "exec", &name])
            .args(&refs)
            .output()
            .unwrap()
            .status
            .success()
    })
    .await
    .unwrap()
}

/// A TCP exchange: B listens on `port`, A connects, sends a line, reads the echo.
async fn tcp_exchange(a: &Pod, b: &Pod, port: u16) -> Result<(), String> {
    let bns = b.ns.netns().try_clone().unwrap();
    let ans = a.ns.netns().try_clone().unwrap();
    tokio::task::spawn_blocking(move || {
        let listener = bns
            .run(|| TcpListener::bind((B_OVERLAY.parse::<IpAddr>().unwrap(), port)))
            .unwrap()
            .map_err(|e| e.to_string())?;
        let server = std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).unwrap_or(0);
                let _ = s.write_all(&buf[..n]);
            }
        });
        let result = ans
            .run(|| {
                TcpStream::connect_timeout(
                    &SocketAddr::new(B_OVERLAY.parse().unwrap(), port),
                    Duration::from_secs(2),
                )
            })
            .unwrap()
            .map_err(|e| e.to_string())
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                s.write_all(b"keyway\n").map_err(|e| e.to_string())?;
                let mut buf = [0u8; 7];
                s.read_exact(&mut buf).map_err(|e| e.to_string())?;
                if &buf == b"keyway\n" {
                    Ok(())
                } else {
                    Err(format!("echo mismatch: {buf:?}"))
                }
            });
        if result.is_err() {
            // Unblock the server's accept so the thread can finish.
            let _ = bns.run(|| TcpStream::connect((B_OVERLAY.parse::<IpAddr>().unwrap(), port)));
        }
        let _ = server.join();
        result
    })
    .await
    .unwrap()
}

/// Neither endpoint dropped anything, for any reason.
fn assert_no_drops(a: &Pod, b: &Pod) {
    for r in DropReason::ALL {
        assert_eq!(
            a.counters.drops_total(r) + b.counters.drops_total(r),
            0,
            "unexpected {r} drops"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_tcp_flow_with_the_right_keys() {
    if !privileged("ping_and_tcp_flow_with_the_right_keys") {
        return;
    }
    let (a, b) = pair("eprt").await;
    assert!(ping(&a, B_OVERLAY, &[]).await, "A pings B over the overlay");
    assert!(ping(&b, A_OVERLAY, &[]).await, "B pings A over the overlay");
    tcp_exchange(&a, &b, 7000).await.expect("TCP exchange");
    assert!(a.counters.packets(Stage::Egress) >= 4);
    assert!(b.counters.packets(Stage::Ingress) >= 4);
    assert_no_drops(&a, &b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_dropped_at_the_destination() {
    if !privileged("a_wrong_key_is_dropped_at_the_destination") {
        return;
    }
    let (a, b) = pair("epkey").await;
    a.tables.publish(tables(Policy {
        wrong_key_for_b: true,
        ..OPEN
    }));
    assert!(!ping(&a, B_OVERLAY, &[]).await);
    assert!(b.counters.drops(Stage::Ingress, DropReason::BadKey) >= 2);
    // Restoring the right key restores traffic: nothing else was changed.
    a.tables.publish(tables(OPEN));
    assert!(ping(&a, B_OVERLAY, &[]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_overlay_source_is_dropped_at_the_source() {
    if !privileged("a_spoofed_overlay_source_is_dropped_at_the_source") {
        return;
    }
    let (a, _b) = pair("epspoof").await;
    // A second address on A's overlay device that A does not own in keyway's eyes.
    a.ns.sh(&["ip", "addr", "add", "100.64.1.99/32", "dev", "kw0"]);
    assert!(!ping(&a, B_OVERLAY, &["-I", "100.64.1.99"]).await);
    assert!(a.counters.drops(Stage::Egress, DropReason::SpoofedSource) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_outer_source_is_dropped_at_the_destination() {
    if !privileged("a_forged_outer_source_is_dropped_at_the_destination") {
        return;
    }
    let (a, b) = pair("epouter").await;
    // Someone on the underlay at another address crafts a GUE packet with A's overlay source and
    // B's valid key: the outer source is not A's infrastructure address, nor a SaP's.
    a.ns.sh(&["ip", "addr", "add", "10.9.0.77/24", "dev", "eth0"]);
    let inner = keyway_core::packet::build::tcp4([100, 64, 1, 1], 1234, [100, 64, 2, 1], 7000);
    let mut datagram = vec![0u8; inner.len() + 8];
    keyway_core::gue::encapsulate(
        ring("t/b").key_at(keyway_sap::io::now_ms()).unwrap(),
        &inner,
        &mut datagram,
    )
    .unwrap();
    let ans = a.ns.netns().try_clone().unwrap();
    tokio::task::spawn_blocking(move || {
        ans.run(|| {
            let s = std::net::UdpSocket::bind("10.9.0.77:0").unwrap();
            for _ in 0..3 {
                s.send_to(&datagram, "10.9.0.2:6080").unwrap();
            }
        })
        .unwrap()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        b.counters.drops(Stage::Ingress, DropReason::SpoofedSource),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fib_entry_is_dropped_as_no_route() {
    if !privileged("no_fib_entry_is_dropped_as_no_route") {
        return;
    }
    let (a, _b) = pair("epnoroute").await;
    a.tables.publish(tables(Policy {
        b_unknown: true,
        ..OPEN
    }));
    assert!(!ping(&a, B_OVERLAY, &[]).await);
    assert!(!ping(&a, "100.64.3.3", &[]).await);
    assert!(a.counters.drops(Stage::Egress, DropReason::NoRoute) >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_deny_is_dropped_and_allowed_ports_still_work() {
    if !privileged("an_acl_deny_is_dropped_and_allowed_ports_still_work") {
        return;
    }
    let (a, b) = pair("epacl").await;
    let strict = tables(Policy {
        tcp_7000_only: true,
        ..OPEN
    });
    a.tables.publish(strict.clone());
    b.tables.publish(strict);
    assert!(!ping(&a, B_OVERLAY, &[]).await, "ICMP is not allowed");
    assert!(a.counters.drops(Stage::Egress, DropReason::DeniedByPolicy) >= 2);
    assert!(
        tcp_exchange(&a, &b, 7001).await.is_err(),
        "port 7001 is not allowed"
    );
    tcp_exchange(&a, &b, 7000)
        .await
        .expect("TCP 7000 is allowed, replies included");

    // B's view denies what A's view allows: now the destination drops it on ingress.
    a.tables.publish(tables(OPEN));
    let before = b.counters.drops(Stage::Ingress, DropReason::DeniedByPolicy);
    assert!(!ping(&a, B_OVERLAY, &[]).await);
    assert!(b.counters.drops(Stage::Ingress, DropReason::DeniedByPolicy) >= before + 2);
}

/// One GUE datagram as captured on the wire.
struct Captured {
    outer_src: String,
    ip_len: usize,
    payload: Vec<u8>,
}

/// Captures `count` GUE datagrams matching `filter` on A's eth0 while `traffic` runs.
async fn capture_gue(
    a: &Pod,
    count: usize,
    filter: &[&str],
    traffic: impl std::future::Future<Output = ()>,
) -> Vec<Captured> {
    let pcap = std::env::temp_dir().join(format!(
        "keyway-gue-{}-{}.pcap",
        std::process::id(),
        a.ns.name
    ));
    let pcap_s = pcap.to_string_lossy().into_owned();
    let count_s = count.to_string();
    let mut args = vec![
        "netns", "exec", &a.ns.name, "tcpdump", "-i", "eth0", "-U", "-n", "-c", &count_s, "-w",
        &pcap_s,
    ];
    args.extend_from_slice(filter);
    let mut dump = std::process::Command::new("ip")
        .args(&args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tcpdump (Debian package tcpdump) must be installed");
    tokio::time::sleep(Duration::from_millis(700)).await;
    traffic.await;
    let status = tokio::task::spawn_blocking(move || dump.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let out = std::process::Command::new("tshark")
        .args([
            "-r",
            &pcap_s,
            "-T",
            "fields",
            "-E",
            "separator=,",
            "-e",
            "ip.src",
            "-e",
            "ip.len",
            "-e",
            "udp.dstport",
            "-e",
            "udp.srcport",
            "-e",
            "udp.payload",
        ])
        .output()
        .expect("tshark (Debian package tshark) must be installed");
    let _ = std::fs::remove_file(&pcap);
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Captured> = text
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            assert_eq!(f.len(), 5, "{line}");
            assert_eq!((f[2], f[3]), ("6080", "6080"), "{line}");
            Captured {
                outer_src: f[0].to_string(),
                ip_len: f[1].parse().unwrap(),
                payload: (0..f[4].len() / 2)
                    .map(|i| u8::from_str_radix(&f[4][2 * i..2 * i + 2], 16).unwrap())
                    .collect(),
            }
        })
        .collect();
    assert_eq!(rows.len(), count, "{text}");
    rows
}

/// The GUE header the engine writes, the destination's key, and 36 bytes over an inner packet
/// of `inner_len`.
fn assert_gue(c: &Captured, inner_len: usize) {
    let key_b = ring("t/b").key_at(keyway_sap::io::now_ms()).unwrap();
    let key_a = ring("t/a").key_at(keyway_sap::io::now_ms()).unwrap();
    // Version 0, C 0, Hlen 1 | proto 4 (IPv4) | flags: G | the destination's key
    assert_eq!(&c.payload[..4], &[0x01, 0x04, 0x80, 0x00]);
    let key = u32::from_be_bytes(c.payload[4..8].try_into().unwrap());
    let expected = if c.outer_src == A_INFRA { key_b } else { key_a };
    assert_eq!(key, expected.0, "from {}", c.outer_src);
    assert_eq!(c.payload.len() - 8, inner_len);
    assert_eq!(c.ip_len - inner_len, 36, "outer IPv4 + UDP + GUE");
    eprintln!(
        "captured: {} -> udp/6080, GUE {:02x?}, outer {} B = inner {inner_len} B + 36",
        c.outer_src,
        &c.payload[..8],
        c.ip_len
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wire_carries_gue_with_the_key_and_36_bytes_of_overhead() {
    if !privileged("the_wire_carries_gue_with_the_key_and_36_bytes_of_overhead") {
        return;
    }
    let (a, _b) = pair("epwire").await;
    // 100 bytes of ICMP payload: inner packet 20 + 8 + 100 = 128 bytes.
    let rows = capture_gue(&a, 4, &["udp", "port", "6080"], async {
        assert!(ping(&a, B_OVERLAY, &["-s", "100"]).await);
    })
    .await;
    for c in &rows {
        assert_gue(c, 128);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_puts_the_same_gue_bytes_on_the_wire() {
    if !privileged("the_fast_path_puts_the_same_gue_bytes_on_the_wire") {
        return;
    }
    let (a, _b) = pair_on("epwirefast", true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = a.carried().egress_packets;
    // Five UDP datagrams of one flow, 100 bytes each (inner 128): the first goes through the
    // user-space path, which teaches A's kernel the flow; the kernel sends the rest.
    let ans = a.ns.netns().try_clone().unwrap();
    let rows = capture_gue(
        &a,
        5,
        &["udp", "port", "6080", "and", "src", "host", A_INFRA],
        async move {
            tokio::task::spawn_blocking(move || {
                let s = ans
                    .run(|| std::net::UdpSocket::bind((A_OVERLAY, 0)))
                    .unwrap()
                    .unwrap();
                for _ in 0..5 {
                    s.send_to(&[7u8; 100], (B_OVERLAY, 7777)).unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .await
            .unwrap();
        },
    )
    .await;
    for c in &rows {
        assert_gue(c, 128);
    }
    let by_kernel = a.carried().egress_packets - before;
    assert!(
        by_kernel >= 3,
        "the kernel sent {by_kernel} of the 5: the capture must hold both paths' datagrams"
    );
    assert!(
        rows.windows(2)
            .all(|w| w[0].payload[..8] == w[1].payload[..8]),
        "one GUE header, byte for byte, whichever path sent it"
    );
}

/// A one-way TCP transfer of `bytes` from `a` to `b`'s IPv4 overlay address on `port`: how many
/// arrived.
async fn tcp_bulk(a: &Pod, b: &Pod, port: u16, bytes: usize) -> usize {
    tcp_bulk_to(a, b, 0, port, bytes).await
}

/// The same to `b`'s overlay address number `overlay` (0: IPv4, 1: IPv6).
async fn tcp_bulk_to(a: &Pod, b: &Pod, overlay: usize, port: u16, bytes: usize) -> usize {
    let bns = b.ns.netns().try_clone().unwrap();
    let ans = a.ns.netns().try_clone().unwrap();
    let to = b.ctx.local.load().overlay_ips[overlay];
    tokio::task::spawn_blocking(move || {
        let listener = bns.run(|| TcpListener::bind((to, port))).unwrap().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let mut got = 0;
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got += n;
            }
            got
        });
        let mut s = ans
            .run(|| TcpStream::connect_timeout(&SocketAddr::new(to, port), Duration::from_secs(2)))
            .unwrap()
            .unwrap();
        let chunk = vec![0x5au8; 1 << 16];
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            s.write_all(&chunk[..n]).unwrap();
            sent += n;
        }
        drop(s);
        server.join().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_carries_established_flows_in_the_kernel() {
    if !privileged("the_fast_path_carries_established_flows_in_the_kernel") {
        return;
    }
    let (a, b) = pair_on("epfast", true).await;
    // The programs carry nothing before their first sync gives them keys and a lease.
    tokio::time::sleep(Duration::from_millis(200)).await;
    const BYTES: usize = 64 << 20;
    assert_eq!(
        tcp_bulk(&a, &b, 7000, BYTES).await,
        BYTES,
        "every byte arrives"
    );
    let (ca, cb) = (a.carried(), b.carried());
    eprintln!("A carried {ca:?}\nB carried {cb:?}");
    eprintln!(
        "user space + kernel: A egress {} packets, B ingress {} packets",
        a.counters.packets(Stage::Egress),
        b.counters.packets(Stage::Ingress)
    );
    assert!(
        ca.egress_bytes as usize >= BYTES * 9 / 10,
        "A's kernel sent {} of {BYTES} bytes",
        ca.egress_bytes
    );
    assert!(
        cb.ingress_bytes as usize >= BYTES * 9 / 10,
        "B's kernel delivered {} of {BYTES} bytes",
        cb.ingress_bytes
    );
    // The replies (B's ACKs) are carried by B's and A's kernels too.
    assert!(cb.egress_packets > 0 && ca.ingress_packets > 0);
    // The counters count every packet once, whichever path carried it (the kernel's are added
    // at each sync).
    a.resync();
    assert!(a.counters.bytes(Stage::Egress) >= ca.egress_bytes);
    assert_no_drops(&a, &b);
    // ICMP stays on the user-space path, and works.
    assert!(ping(&a, B_OVERLAY, &[]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_policy_stops_a_fast_flow_at_the_next_compile() {
    if !privileged("a_withdrawn_policy_stops_a_fast_flow_at_the_next_compile") {
        return;
    }
    let (a, b) = pair_on("epfastpol", true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bns = b.ns.netns().try_clone().unwrap();
    let ans = a.ns.netns().try_clone().unwrap();
    let listener = bns
        .run(|| TcpListener::bind((B_OVERLAY.parse::<IpAddr>().unwrap(), 7001)))
        .unwrap()
        .unwrap();
    let mut client = ans
        .run(|| TcpStream::connect((B_OVERLAY.parse::<IpAddr>().unwrap(), 7001)))
        .unwrap()
        .unwrap();
    let (mut server, _) = listener.accept().unwrap();
    server
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut buf = [0u8; 4096];
    for _ in 0..20 {
        client.write_all(&[1u8; 1000]).unwrap();
        let mut got = 0;
        while got < 1000 {
            got += server.read(&mut buf).unwrap();
        }
    }
    assert!(
        a.carried().egress_packets > 0,
        "the flow is on the fast path"
    );
    // Port 7001 is no longer allowed: the agent publishes and re-derives the kernel's flows.
    let strict = tables(Policy {
        tcp_7000_only: true,
        ..OPEN
    });
    a.tables.publish(strict.clone());
    b.tables.publish(strict);
    a.resync();
    b.resync();
    let carried = a.carried().egress_packets;
    client.write_all(&[2u8; 1000]).unwrap();
    let r = server.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing more arrives on the withdrawn flow: {r:?}"
    );
    assert_eq!(
        a.carried().egress_packets,
        carried,
        "nor does the kernel carry it"
    );
    assert!(a.counters.drops(Stage::Egress, DropReason::DeniedByPolicy) >= 1);
    // What is still allowed still works, on the fast path.
    assert_eq!(tcp_bulk(&a, &b, 7000, 1 << 20).await, 1 << 20);
    assert!(a.carried().egress_packets > carried);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_path_endpoint_and_a_user_space_endpoint_interoperate() {
    if !privileged("a_fast_path_endpoint_and_a_user_space_endpoint_interoperate") {
        return;
    }
    // A's kernel sends whole GSO packets; B's user-space path must take them as they come.
    let (a, b) = mixed_pair("epmixed", true, false).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    const BYTES: usize = 16 << 20;
    assert_eq!(
        tcp_bulk(&a, &b, 7000, BYTES).await,
        BYTES,
        "fast to user space"
    );
    assert!(a.carried().egress_bytes as usize >= BYTES * 9 / 10);
    // B's user-space path sends UDP GSO batches (many datagrams behind one header): A's kernel
    // leaves those to A's socket and user-space path, and carries A's replies.
    let before = a.carried();
    assert_eq!(
        tcp_bulk(&b, &a, 7000, BYTES).await,
        BYTES,
        "user space to fast"
    );
    assert!(a.carried().egress_packets > before.egress_packets);
    assert!(ping(&a, B_OVERLAY, &[]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_carries_ipv6_flows_in_the_kernel() {
    if !privileged("the_fast_path_carries_ipv6_flows_in_the_kernel") {
        return;
    }
    let (a, b) = pair_on("epfast6", true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    const BYTES: usize = 64 << 20;
    assert_eq!(
        tcp_bulk_to(&a, &b, 1, 7000, BYTES).await,
        BYTES,
        "every byte arrives over the IPv6 overlay"
    );
    let (ca, cb) = (a.carried(), b.carried());
    eprintln!("A carried {ca:?}\nB carried {cb:?}");
    assert!(
        ca.egress_bytes as usize >= BYTES * 9 / 10,
        "A's kernel sent {} of {BYTES} bytes",
        ca.egress_bytes
    );
    assert!(
        cb.ingress_bytes as usize >= BYTES * 9 / 10,
        "B's kernel delivered {} of {BYTES} bytes",
        cb.ingress_bytes
    );
    assert!(
        cb.egress_packets > 0 && ca.ingress_packets > 0,
        "the replies too"
    );
    // An echo's flow: its requests are judged on the user-space path, its replies carried.
    let before = a.carried();
    assert!(
        ping(&a, B_OVERLAY6, &["-c", "6"]).await,
        "A pings B over IPv6"
    );
    assert!(
        a.carried().ingress_packets > before.ingress_packets,
        "the kernel carried echo replies"
    );
    assert_no_drops(&a, &b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_fast_path_endpoint_and_a_user_space_endpoint_interoperate() {
    if !privileged("an_ipv6_fast_path_endpoint_and_a_user_space_endpoint_interoperate") {
        return;
    }
    // A's kernel sends whole GSO packets with half-done checksums; B's user-space path writes
    // them to its IPv6 device as what they are, and completes what it must.
    let (a, b) = mixed_pair("epmixed6", true, false).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    const BYTES: usize = 16 << 20;
    assert_eq!(
        tcp_bulk_to(&a, &b, 1, 7000, BYTES).await,
        BYTES,
        "fast to user space"
    );
    assert!(a.carried().egress_bytes as usize >= BYTES * 9 / 10);
    let before = a.carried();
    assert_eq!(
        tcp_bulk_to(&b, &a, 1, 7000, BYTES).await,
        BYTES,
        "user space to fast"
    );
    assert!(a.carried().egress_packets > before.egress_packets);
    assert!(ping(&a, B_OVERLAY6, &[]).await);
}
