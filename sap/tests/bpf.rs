//! The kernel's ingress checks (`kw_ingress` in `sap/bpf/endpoint.bpf.c`) against the user-space engine's
//! (`keyway_core::engine::endpoint_ingress`), over the same datagrams: hand-made ones for every
//! check, then tens of thousands of mutations of them by the workspace's seeded fuzzer. Run in the kernel through
//! `BPF_PROG_TEST_RUN` (root). Every drop in the kernel must be the engine's drop with the same
//! reason; every datagram the kernel fully parses (GUE, inner IPv4 or IPv6) and passes on must be
//! one the engine does not drop for those reasons; only an inner IPv6 packet with extension
//! headers is left to the engine whole.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use keyway_core::engine::{DropReason, LocalEndpoint, Tables, endpoint_ingress};
use keyway_core::flow::{FlowTable, FlowTimeouts};
use keyway_core::gue::{self, InnerProto};
use keyway_core::key::{ClusterSecret, Epoch, Key, KeyRing, Rotation};
use keyway_core::packet::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, build, classify};
use keyway_sap::io::bpf::{EndpointConfig, EndpointPrograms, TC_ACT_OK, Verdict};
use keyway_testing::privileged;

const OVERLAY: [u8; 4] = [100, 64, 0, 2];
const INFRA: [u8; 4] = [10, 244, 1, 2];
const PEER: [u8; 4] = [100, 64, 0, 1];
const OUTER_SRC: [u8; 4] = [10, 244, 1, 1];
const OVERLAY6: &str = "fd6b:7779::2";
const PEER6: &str = "fd6b:7779::1";
/// One second into an epoch of 10 s with 4 s of grace: the previous epoch's key is accepted too.
const NOW: u64 = 1_000_000_000 + 1_000;

/// An Ethernet frame carrying `datagram` in UDP from `OUTER_SRC` to the pod's GUE port.
fn frame(datagram: &[u8], port: u16) -> Vec<u8> {
    udp_frame(OUTER_SRC, INFRA, port, datagram, false)
}

fn gue(key: Key, inner: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; gue::HEADER_LEN + inner.len()];
    let n = gue::encapsulate(key, inner, &mut out).unwrap();
    out.truncate(n);
    out
}

/// The hand-made datagrams: each check's pass and fail.
fn vectors(mine: Key, previous: Key, next: Key, other: Key) -> Vec<(&'static str, Vec<u8>)> {
    let tcp = |dst: [u8; 4]| build::tcp4(PEER, 40000, dst, 80);
    let v4 = |proto: u8, l4: &[u8]| build::ipv4(PEER.into(), OVERLAY.into(), proto, l4);
    let mut with_mac = gue(mine, &tcp(OVERLAY));
    with_mac[0] = (with_mac[0] & !0x1f) | 3;
    with_mac.splice(gue::HEADER_LEN..gue::HEADER_LEN, [0xa5u8; 8]);
    let v6 = |dst: &str, next: u8, l4: &[u8]| {
        build::ipv6(PEER6.parse().unwrap(), dst.parse().unwrap(), next, l4)
    };
    let tcp6 = |dst: &str| v6(dst, PROTO_TCP, &build::ports(PROTO_TCP, 40000, 80, b""));
    let mut beyond6 = tcp6(OVERLAY6);
    beyond6[4..6].copy_from_slice(&1000u16.to_be_bytes());
    let mut v = vec![
        ("IPv6 good", gue(mine, &tcp6(OVERLAY6))),
        ("IPv6, another pod's key", gue(other, &tcp6(OVERLAY6))),
        ("IPv6, not the pod", gue(mine, &tcp6("fd6b:7779::3"))),
        (
            "IPv6 echo",
            gue(
                mine,
                &v6(OVERLAY6, PROTO_ICMPV6, &build::echo(true, false, 1, 1)),
            ),
        ),
        (
            "IPv6 echo cut short",
            gue(mine, &v6(OVERLAY6, PROTO_ICMPV6, &[128, 0, 0, 0, 0])),
        ),
        ("IPv6 payload beyond the datagram", gue(mine, &beyond6)),
        (
            "IPv6 hop-by-hop header",
            gue(mine, &v6(OVERLAY6, 0, &[PROTO_TCP, 0, 1, 4, 0, 0, 0, 0])),
        ),
        ("good", gue(mine, &tcp(OVERLAY))),
        ("to the pod IP", gue(mine, &tcp(INFRA))),
        (
            "previous epoch's key in its grace",
            gue(previous, &tcp(OVERLAY)),
        ),
        ("next epoch's key, too early", gue(next, &tcp(OVERLAY))),
        ("another pod's key", gue(other, &tcp(OVERLAY))),
        ("key 0", gue(Key(0), &tcp(OVERLAY))),
        ("not the pod", gue(mine, &tcp([100, 64, 0, 3]))),
        ("to 0.0.0.0", gue(mine, &tcp([0, 0, 0, 0]))),
        ("with a MAC", with_mac),
        (
            "echo",
            gue(mine, &v4(PROTO_ICMP, &build::echo(false, false, 1, 1))),
        ),
        (
            "echo cut short",
            gue(mine, &v4(PROTO_ICMP, &[8, 0, 0, 0, 0])),
        ),
        (
            "ICMP unreachable, 4 bytes",
            gue(mine, &v4(PROTO_ICMP, &[3, 1, 0, 0])),
        ),
        (
            "ICMPv6 echo in IPv4 cut short",
            gue(mine, &v4(PROTO_ICMPV6, &[128, 0, 0, 0, 0])),
        ),
        ("UDP with 3 bytes", gue(mine, &v4(PROTO_UDP, &[0, 1, 0]))),
        ("protocol 200", gue(mine, &v4(200, &[]))),
        (
            "IPv6 inside",
            gue(
                mine,
                &build::ipv6(
                    Ipv6Addr::LOCALHOST,
                    Ipv6Addr::LOCALHOST,
                    PROTO_TCP,
                    &build::ports(PROTO_TCP, 1, 80, b""),
                ),
            ),
        ),
        ("three bytes", vec![0, 4, 0x80]),
        (
            "header only",
            gue(mine, &tcp(OVERLAY))[..gue::HEADER_LEN].to_vec(),
        ),
    ];
    let good = gue(mine, &tcp(OVERLAY));
    let mut edit = |name: &'static str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut d = good.clone();
        f(&mut d);
        v.push((name, d));
    };
    edit("GUE version 1", &|d| d[0] |= 0x40);
    edit("control message", &|d| d[0] |= 0x20);
    edit("Hlen 2", &|d| d[0] = (d[0] & !0x1f) | 2);
    edit("another flag", &|d| d[3] |= 1);
    edit("no key flag", &|d| d[2] = 0);
    edit("protocol 17", &|d| d[1] = 17);
    edit("protocol says IPv6", &|d| d[1] = 41);
    edit("inner IHL 4", &|d| d[8] = 0x44);
    edit("inner IHL 15", &|d| d[8] = 0x4f);
    edit("inner total below IHL", &|d| {
        d[8 + 2..8 + 4].copy_from_slice(&[0, 10])
    });
    edit("inner total beyond the datagram", &|d| {
        d[8 + 2..8 + 4].copy_from_slice(&[0x05, 0xdc])
    });
    edit("later fragment", &|d| {
        d[8 + 6..8 + 8].copy_from_slice(&[0, 1])
    });
    edit("trailing bytes", &|d| d.extend_from_slice(&[0; 7]));
    v
}

#[test]
fn the_kernels_ingress_checks_drop_exactly_what_the_engine_drops_for_the_same_reasons() {
    if !privileged("the_kernels_ingress_checks_drop_exactly_what_the_engine_drops") {
        return;
    }
    let secret = ClusterSecret::new(vec![7u8; 32]).unwrap();
    let rotation = Rotation::new(10_000, 4_000).unwrap();
    let ring = KeyRing::derive(&secret, "ns/b", rotation, NOW);
    let epoch = rotation.epoch_at(NOW);
    let key = |e: u64| secret.derive("ns/b", Epoch(e));
    let (mine, previous, next) = (key(epoch.0), key(epoch.0 - 1), key(epoch.0 + 1));
    let other = secret.derive("ns/c", epoch);
    let local = LocalEndpoint {
        entity: Arc::from("ns/b"),
        overlay_ips: vec![IpAddr::from(OVERLAY), OVERLAY6.parse().unwrap()],
        infra: SocketAddr::new(IpAddr::from(INFRA), 6080),
        keys: ring,
        local_sap: None,
    };
    let tables = Tables::default();
    let flows = FlowTable::new(1024, FlowTimeouts::default());
    let outer = SocketAddr::new(IpAddr::from(OUTER_SRC), 6080);

    let mut bpf = EndpointPrograms::load(None).expect("the kernel loads keyway's programs");
    bpf.configure(&EndpointConfig {
        overlay: Some(Ipv4Addr::from(OVERLAY)),
        infra: Some(Ipv4Addr::from(INFRA)),
        gue_port: 6080,
        keys: ring.accepted_at(NOW),
        overlay6: Some(OVERLAY6.parse().unwrap()),
        ..EndpointConfig::default()
    })
    .unwrap();

    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let judge = |bpf: &mut EndpointPrograms,
                 tally: &mut BTreeMap<String, usize>,
                 name: &str,
                 d: &[u8]|
     -> Verdict {
        let engine = endpoint_ingress(&tables, &local, &flows, d, outer, NOW);
        let (action, verdict) = bpf.run_ingress(&frame(d, 6080)).unwrap();
        // Parsed whole by the kernel: all but an IPv6 packet with extension headers.
        let whole = match gue::decode(d) {
            Err(_) => true,
            Ok(h) => {
                h.proto == InnerProto::Ipv4
                    || d.get(h.payload_offset + 6)
                        .is_none_or(|n| ![0, 43, 44, 60].contains(n))
            }
        };
        match verdict {
            Verdict::Drop(reason) => {
                // Never carried: left to the user-space path, which drops and counts it.
                assert_eq!(action, TC_ACT_OK, "{name}: {d:02x?}");
                assert_eq!(
                    engine,
                    Err(reason),
                    "{name}: the kernel dropped it as {reason}, the engine said {engine:?}: {d:02x?}"
                );
            }
            Verdict::Pass => {
                assert_eq!(action, TC_ACT_OK, "{name}: {d:02x?}");
                if whole {
                    assert!(
                        !matches!(
                            engine,
                            Err(DropReason::Malformed
                                | DropReason::BadKey
                                | DropReason::WrongDestination)
                        ),
                        "{name}: the kernel passed it on, the engine dropped it: {engine:?}: {d:02x?}"
                    );
                }
            }
        }
        *tally.entry(format!("{verdict:?}")).or_default() += 1;
        verdict
    };

    let hand_made = vectors(mine, previous, next, other);
    let expect: &[(&str, Verdict)] = &[
        ("good", Verdict::Pass),
        ("to the pod IP", Verdict::Pass),
        ("previous epoch's key in its grace", Verdict::Pass),
        (
            "next epoch's key, too early",
            Verdict::Drop(DropReason::BadKey),
        ),
        ("another pod's key", Verdict::Drop(DropReason::BadKey)),
        ("not the pod", Verdict::Drop(DropReason::WrongDestination)),
        ("with a MAC", Verdict::Pass),
        ("echo cut short", Verdict::Drop(DropReason::Malformed)),
        ("IPv6 inside", Verdict::Drop(DropReason::WrongDestination)),
        ("IPv6 good", Verdict::Pass),
        ("IPv6, another pod's key", Verdict::Drop(DropReason::BadKey)),
        (
            "IPv6, not the pod",
            Verdict::Drop(DropReason::WrongDestination),
        ),
        ("IPv6 echo", Verdict::Pass),
        ("IPv6 echo cut short", Verdict::Drop(DropReason::Malformed)),
        (
            "IPv6 payload beyond the datagram",
            Verdict::Drop(DropReason::Malformed),
        ),
        ("IPv6 hop-by-hop header", Verdict::Pass),
        ("GUE version 1", Verdict::Drop(DropReason::Malformed)),
        (
            "inner total beyond the datagram",
            Verdict::Drop(DropReason::Malformed),
        ),
        ("later fragment", Verdict::Pass),
    ];
    for (name, d) in &hand_made {
        let got = judge(&mut bpf, &mut tally, name, d);
        if let Some((_, want)) = expect.iter().find(|(n, _)| n == name) {
            assert_eq!(got, *want, "{name}");
        }
    }
    // Not GUE to the pod's port: not the program's to judge, and not counted.
    let before = bpf.verdicts().unwrap();
    let (action, _) = bpf.run_ingress(&frame(&hand_made[0].1, 6081)).unwrap();
    assert_eq!(action, TC_ACT_OK);
    assert_eq!(
        bpf.verdicts().unwrap(),
        before,
        "another port is not counted"
    );

    // Mutations of them by the workspace's seeded fuzzer (a failure names the input in hex).
    let seeds: Vec<&[u8]> = hand_made.iter().map(|(_, d)| d.as_slice()).collect();
    let state = RefCell::new((bpf, tally));
    keyway_testing::fuzz::run("bpf_ingress", &seeds, hand_made.len() * 1500, |d| {
        let (bpf, tally) = &mut *state.borrow_mut();
        judge(bpf, tally, "mutated", d);
    });
    let (_, tally) = state.into_inner();
    eprintln!("verdicts: {tally:?}");
    for v in [
        "Pass",
        "Drop(Malformed)",
        "Drop(BadKey)",
        "Drop(WrongDestination)",
    ] {
        assert!(
            tally.get(v).copied().unwrap_or(0) >= 20,
            "too few {v} among the vectors: {tally:?}"
        );
    }
}

/// An Ethernet frame carrying `datagram` in UDP from `src`:6080 to `dst`:`port`, with a full UDP
/// checksum when `udp_checksum` (a user-space sender's) or none (0, a kernel fast path's).
fn udp_frame(
    src: [u8; 4],
    dst: [u8; 4],
    port: u16,
    datagram: &[u8],
    udp_checksum: bool,
) -> Vec<u8> {
    let udp_len = 8 + datagram.len();
    let mut f = vec![0u8; 14 + 20 + udp_len];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xaa]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xbb]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    {
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = PROTO_UDP;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        let c = keyway_core::packet::checksum(ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
    f[34..36].copy_from_slice(&6080u16.to_be_bytes());
    f[36..38].copy_from_slice(&port.to_be_bytes());
    f[38..40].copy_from_slice(&(udp_len as u16).to_be_bytes());
    f[42..].copy_from_slice(datagram);
    if udp_checksum {
        let c = udp_checksum_of(&f);
        f[40..42].copy_from_slice(&c.to_be_bytes());
    }
    f
}

/// The UDP checksum `frame`'s datagram should carry (its field taken as 0).
fn udp_checksum_of(frame: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&frame[26..34]);
    pseudo.extend_from_slice(&[0, PROTO_UDP]);
    pseudo.extend_from_slice(&frame[38..40]);
    let mut udp = frame[34..].to_vec();
    udp[6..8].fill(0);
    pseudo.extend_from_slice(&udp);
    match keyway_core::packet::checksum(&pseudo, 0) {
        0 => 0xffff,
        c => c,
    }
}

#[test]
fn the_kernel_sap_forwards_exactly_the_flows_it_was_given_unchanged_from_the_saps_address() {
    use keyway_sap::io::bpf::{Flow, NodePod, NodePrograms, SapFlow, SapNextHop};
    if !privileged("the_kernel_sap_forwards_exactly_the_flows_it_was_given") {
        return;
    }
    const SAP: [u8; 4] = [192, 168, 9, 12];
    const SENDER: [u8; 4] = [10, 244, 1, 7];
    const DEST: [u8; 4] = [10, 244, 2, 9];
    let key = Key(0x1234_5678);
    let inner = build::tcp4(PEER, 40000, OVERLAY, 80);
    let datagram = gue(key, &inner);
    let mut p = NodePrograms::load().expect("the node's programs load");
    let lease = keyway_sap::io::fastpath::monotonic_ns() + 60_000_000_000;
    p.configure(6080, Some(SAP.into()), lease).unwrap();
    let pod = NodePod {
        veth_ifindex: 4242,
        pod_mac: [0x02, 1, 2, 3, 4, 5],
        bridge_mac: [0x02, 6, 7, 8, 9, 10],
    };
    p.set_pod(DEST.into(), &pod).unwrap();
    let flow = SapFlow {
        outer_src: SENDER.into(),
        key,
        inner: Flow::of_packet(&inner).unwrap(),
    };
    let to = SapNextHop {
        to: std::net::SocketAddrV4::new(DEST.into(), 6080),
        seen_ns: 0,
    };

    let sent = udp_frame(SENDER, SAP, 6080, &datagram, true);
    let (ret, out) = p.run_sap(&sent).unwrap();
    assert_eq!(
        (ret, &out),
        (TC_ACT_OK, &sent),
        "a flow not given: untouched"
    );

    p.insert_sap(&flow, &to).unwrap();
    for udp_checksum in [true, false] {
        let sent = udp_frame(SENDER, SAP, 6080, &datagram, udp_checksum);
        let (ret, out) = p.run_sap(&sent).unwrap();
        assert_eq!(ret, keyway_sap::io::bpf::TC_ACT_REDIRECT, "forwarded");
        assert_eq!(&out[0..6], &pod.pod_mac, "to the pod's address");
        assert_eq!(&out[6..12], &pod.bridge_mac, "from the bridge's");
        assert_eq!(&out[26..30], &SAP, "from the SaP's address");
        assert_eq!(&out[30..34], &DEST, "to the destination endpoint");
        assert_eq!(&out[34..38], &sent[34..38], "GUE port to GUE port");
        assert_eq!(
            keyway_core::packet::checksum(&out[14..34], 0),
            0,
            "a valid IP header"
        );
        let stored = u16::from_be_bytes([out[40], out[41]]);
        if udp_checksum {
            assert_eq!(stored, udp_checksum_of(&out), "a valid UDP checksum");
        } else {
            assert_eq!(stored, 0, "no UDP checksum stays none");
        }
        assert_eq!(&out[42..], &datagram[..], "the datagram itself unchanged");
    }
    // Into the pod's namespace, the node's packet mark does not go along (a veth's crossing
    // clears it too).
    let (ret, _, mark) = p
        .run_sap_marked(&udp_frame(SENDER, SAP, 6080, &datagram, true), 0x4000)
        .unwrap();
    assert_eq!(
        (ret, mark),
        (keyway_sap::io::bpf::TC_ACT_REDIRECT, 0),
        "forwarded to the pod, unmarked"
    );
    let (packets, bytes) = p.sap_carried().unwrap();
    assert_eq!(packets, 3);
    assert_eq!(
        bytes,
        3 * datagram.len() as u64,
        "counted as the user-space SaP counts"
    );
    let seen = p.sap_flows();
    assert!(
        seen.iter().any(|(f, h)| *f == flow && h.seen_ns > 0),
        "the flow stamped as carried: {seen:?}"
    );

    // Everything that is not exactly that flow goes on to the user-space SaP, untouched.
    let syn = build::syn4(PEER, 40000, OVERLAY, 80);
    let mut with_mac = datagram.clone();
    with_mac[0] = (with_mac[0] & !0x1f) | 3;
    with_mac.splice(gue::HEADER_LEN..gue::HEADER_LEN, [0xa5u8; 8]);
    let mut batch = udp_frame(SENDER, SAP, 6080, &datagram, false);
    batch[38..40].copy_from_slice(&((8 + datagram.len() / 2) as u16).to_be_bytes());
    let other_port = build::tcp4(PEER, 40001, OVERLAY, 80);
    let misses: Vec<(&str, Vec<u8>)> = vec![
        (
            "another key",
            udp_frame(SENDER, SAP, 6080, &gue(Key(7), &inner), false),
        ),
        (
            "another outer source",
            udp_frame([10, 244, 1, 8], SAP, 6080, &datagram, false),
        ),
        (
            "another flow",
            udp_frame(SENDER, SAP, 6080, &gue(key, &other_port), false),
        ),
        (
            "a SYN",
            udp_frame(SENDER, SAP, 6080, &gue(key, &syn), false),
        ),
        ("a MAC", udp_frame(SENDER, SAP, 6080, &with_mac, false)),
        (
            "not to the SaP",
            udp_frame(SENDER, [192, 168, 9, 13], 6080, &datagram, false),
        ),
        ("a UDP length that is not the packet's (a GSO batch)", batch),
    ];
    for (what, f) in &misses {
        let (ret, out) = p.run_sap(f).unwrap();
        assert_eq!((ret, &out), (TC_ACT_OK, f), "{what}: untouched");
    }

    // An ICMP echo is the flow of its identifier and type, in the kernel as in Flow4: given a
    // ping's requests, the kernel forwards each of them and nothing that only shares the
    // identifier (the reply's type, another identifier, an ICMP error).
    let echo = |reply: bool, id: u16, seq: u16| {
        build::ipv4(
            PEER.into(),
            OVERLAY.into(),
            PROTO_ICMP,
            &build::echo(false, reply, id, seq),
        )
    };
    let pings = SapFlow {
        outer_src: SENDER.into(),
        key,
        inner: Flow::of_packet(&echo(false, 77, 1)).expect("an echo is a flow"),
    };
    p.insert_sap(&pings, &to).unwrap();
    for seq in [1, 2, 3] {
        let sent = udp_frame(SENDER, SAP, 6080, &gue(key, &echo(false, 77, seq)), false);
        let (ret, out) = p.run_sap(&sent).unwrap();
        assert_eq!(
            ret,
            keyway_sap::io::bpf::TC_ACT_REDIRECT,
            "echo request {seq}"
        );
        assert_eq!(&out[30..34], &DEST, "to the destination endpoint");
    }
    let unreachable = build::ipv4(
        PEER.into(),
        OVERLAY.into(),
        PROTO_ICMP,
        &[3, 1, 0, 0, 0, 0, 0, 0],
    );
    for (what, inner) in [
        ("an echo reply of the same identifier", echo(true, 77, 1)),
        ("an echo request of another identifier", echo(false, 78, 1)),
        ("an ICMP error", unreachable),
    ] {
        let f = udp_frame(SENDER, SAP, 6080, &gue(key, &inner), false);
        let (ret, out) = p.run_sap(&f).unwrap();
        assert_eq!((ret, &out), (TC_ACT_OK, &f), "{what}: untouched");
    }
    p.remove_sap(&pings);

    // An IPv6 flow inside (GUE protocol 41), from its own map, forwarded just the same.
    let tcp6 = |sport: u16| {
        build::ipv6(
            PEER6.parse().unwrap(),
            OVERLAY6.parse().unwrap(),
            PROTO_TCP,
            &build::ports(PROTO_TCP, sport, 80, b"over IPv6"),
        )
    };
    let datagram6 = gue(key, &tcp6(40000));
    assert_eq!(datagram6[1], 41, "IPv6 inside");
    let sent6 = udp_frame(SENDER, SAP, 6080, &datagram6, false);
    let (ret, out) = p.run_sap(&sent6).unwrap();
    assert_eq!((ret, &out), (TC_ACT_OK, &sent6), "an IPv6 flow not given");
    let flow6 = SapFlow {
        outer_src: SENDER.into(),
        key,
        inner: Flow::of_packet(&tcp6(40000)).expect("an IPv6 TCP flow"),
    };
    // The IPv4 flow of the same ports and key stays given: a flow of either family is its own.
    p.insert_sap(&flow6, &to).unwrap();
    let (before, bytes_before) = p.sap_carried().unwrap();
    let (ret, out) = p.run_sap(&sent6).unwrap();
    assert_eq!(
        ret,
        keyway_sap::io::bpf::TC_ACT_REDIRECT,
        "the IPv6 flow forwarded"
    );
    assert_eq!(&out[26..30], &SAP, "from the SaP's address");
    assert_eq!(&out[30..34], &DEST, "to the destination endpoint");
    assert_eq!(&out[42..], &datagram6[..], "the datagram itself unchanged");
    assert_eq!(
        p.sap_carried().unwrap(),
        (before + 1, bytes_before + datagram6.len() as u64)
    );
    let other6 = udp_frame(SENDER, SAP, 6080, &gue(key, &tcp6(40001)), false);
    let (ret, out) = p.run_sap(&other6).unwrap();
    assert_eq!(
        (ret, &out),
        (TC_ACT_OK, &other6),
        "another IPv6 flow: untouched"
    );
    p.remove_sap(&flow6);
    let (ret, _) = p.run_sap(&sent6).unwrap();
    assert_eq!(ret, TC_ACT_OK, "the IPv6 flow removed");
    let (ret, _) = p.run_sap(&sent).unwrap();
    assert_eq!(
        ret,
        keyway_sap::io::bpf::TC_ACT_REDIRECT,
        "the IPv4 one still given"
    );

    // GUE from the underlay that is not for the SaP nor for one of the node's pods is the
    // node's to route (a direct datagram for one of its pods: the next test).
    for (what, frame) in [
        (
            "not to GUE's port",
            udp_frame(SENDER, DEST, 6081, &datagram, false),
        ),
        (
            "to no pod of the node's",
            udp_frame(SENDER, [10, 244, 2, 10], 6080, &datagram, false),
        ),
    ] {
        let (ret, out) = p.run_sap(&frame).unwrap();
        assert_eq!((ret, &out), (TC_ACT_OK, &frame), "{what}: the node's");
    }

    p.remove_pod(DEST.into());
    let (ret, _) = p.run_sap(&sent).unwrap();
    assert_eq!(ret, TC_ACT_OK, "a destination that is not the node's pod");
    p.set_pod(DEST.into(), &pod).unwrap();
    p.configure(6080, Some(SAP.into()), 1).unwrap();
    let (ret, _) = p.run_sap(&sent).unwrap();
    assert_eq!(ret, TC_ACT_OK, "a lease run out: nothing forwarded");
}

/// A direct datagram from a pod on another node, GUE from the underlay to one of the node's pods
/// behind a bridge: the kernel SaP hands it into the pod at the node's device, on real
/// devices (the reverse-path check needs the node's routes). The node's forward hook drops GUE
/// here, so what the pod receives only the handover delivered.
#[test]
fn a_direct_datagram_from_the_underlay_goes_straight_into_the_pod_from_sources_the_underlay_leads_to()
 {
    if !privileged("a_direct_datagram_from_the_underlay_goes_straight_into_the_pod") {
        return;
    }
    let (node, sender, pod, mut p, lease) = node_on_an_underlay(
        "bpf-direct",
        ("kwt-pod", "10.244.2.1/24"),
        ("pod", "10.244.2.9/24"),
    );
    node.sh(&["nft", "add", "table", "ip", "kwt"]);
    node.sh(&[
        "nft",
        "add chain ip kwt relay { type filter hook forward priority filter; }",
    ]);
    node.sh(&["nft", "add rule ip kwt relay udp dport 6080 drop"]);
    // And what the node side of the pod's veth transmits is counted (with IPv6 off there, so
    // that nothing else is): the handover goes into the pod's namespace (a peer redirect), not
    // out of that device.
    node.sh(&["sysctl", "-qw", "net.ipv6.conf.kwt-pod.disable_ipv6=1"]);
    let transmitted = || {
        let n = node.sh(&["cat", "/sys/class/net/kwt-pod/statistics/tx_packets"]);
        n.trim().parse::<u64>().unwrap()
    };
    sender.sh(&["ip", "route", "add", "10.244.2.0/24", "via", "192.168.9.12"]);
    // Addresses the sender has no right to (the node's own, one of the node's pods'), to claim
    // as outer sources.
    for a in ["10.244.2.1/32", "10.244.2.77/32"] {
        sender.sh(&["ip", "addr", "add", a, "dev", "eth0"]);
    }
    let dest = pod_behind(&node, "kwt-pod", &pod);
    p.set_pod([10, 244, 2, 9].into(), &dest).unwrap();
    let endpoint = udp_in(&pod, "10.244.2.9:6080");
    let datagram = gue(Key(0x5eed_0001), &build::tcp4(PEER, 40000, OVERLAY, 80));
    let send_from = |src: &str| {
        udp_in(&sender, &format!("{src}:6080"))
            .send_to(&datagram, "10.244.2.9:6080")
            .unwrap();
        let mut buf = [0u8; 2048];
        endpoint
            .recv_from(&mut buf)
            .ok()
            .map(|(n, from)| (buf[..n].to_vec(), from))
    };

    let before = transmitted();
    let (got, from) = send_from("192.168.9.20").expect("handed to the pod");
    assert_eq!(got, datagram, "the datagram itself unchanged");
    assert_eq!(from, SocketAddr::from(([192, 168, 9, 20], 6080)));
    assert_eq!(
        transmitted(),
        before,
        "received by the pod's eth0, never sent by the node's veth"
    );
    for (what, src) in [
        ("the node's own address", "10.244.2.1"),
        ("an address of the node's pods", "10.244.2.77"),
    ] {
        assert_eq!(
            send_from(src),
            None,
            "{what} as the outer source, from the underlay: the node's to decide"
        );
    }

    p.remove_pod([10, 244, 2, 9].into());
    assert_eq!(send_from("192.168.9.20"), None, "a pod no longer listed");
    p.set_pod([10, 244, 2, 9].into(), &dest).unwrap();
    p.configure(6080, Some(UNDERLAY_SAP.into()), 1).unwrap();
    assert_eq!(send_from("192.168.9.20"), None, "a lease run out");
    p.configure(6080, Some(UNDERLAY_SAP.into()), lease).unwrap();
    assert!(
        send_from("192.168.9.20").is_some(),
        "and handed on again under a lease"
    );
}

/// The SaP's address in [`node_on_an_underlay`]: the node's own on the underlay.
const UNDERLAY_SAP: [u8; 4] = [192, 168, 9, 12];

/// A node (forwarding on) with the kernel SaP on its underlay device `kwt-up` (192.168.9.12,
/// the SaP's address, leased), a sender on that underlay at 192.168.9.20, and a third namespace
/// (`role`, address) behind the node's device (name, address): the namespaces, the node's
/// programs and their lease.
fn node_on_an_underlay(
    test: &str,
    (dev, dev_addr): (&str, &str),
    (role, addr): (&str, &str),
) -> (
    keyway_testing::TestNetns,
    keyway_testing::TestNetns,
    keyway_testing::TestNetns,
    keyway_sap::io::bpf::NodePrograms,
    u64,
) {
    use keyway_testing::{TestNetns, veth};
    let node = TestNetns::new(test, "node");
    let sender = TestNetns::new(test, "sender");
    let other = TestNetns::new(test, role);
    veth(
        &node,
        "kwt-up",
        "192.168.9.12/24",
        &sender,
        "eth0",
        "192.168.9.20/24",
    );
    veth(&node, dev, dev_addr, &other, "eth0", addr);
    node.sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let mut p = node
        .netns()
        .run(|| {
            let mut p =
                keyway_sap::io::bpf::NodePrograms::load().expect("the node's programs load");
            p.attach_sap("kwt-up").unwrap();
            p
        })
        .unwrap();
    let lease = keyway_sap::io::fastpath::monotonic_ns() + 60_000_000_000;
    p.configure(6080, Some(UNDERLAY_SAP.into()), lease).unwrap();
    (node, sender, other, p, lease)
}

/// The node's entry for the pod in `pod` whose `eth0` is the peer of the node's veth `dev`: as
/// the agent lists a pod behind a bridge, with `dev`'s address standing for the bridge's.
fn pod_behind(
    node: &keyway_testing::TestNetns,
    dev: &str,
    pod: &keyway_testing::TestNetns,
) -> keyway_sap::io::bpf::NodePod {
    let mac = |ns: &keyway_testing::TestNetns, dev: &str| -> [u8; 6] {
        let text = ns.sh(&["cat", &format!("/sys/class/net/{dev}/address")]);
        let bytes: Vec<u8> = text
            .trim()
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        bytes.try_into().unwrap()
    };
    keyway_sap::io::bpf::NodePod {
        veth_ifindex: node
            .sh(&["cat", &format!("/sys/class/net/{dev}/ifindex")])
            .trim()
            .parse()
            .unwrap(),
        pod_mac: mac(pod, "eth0"),
        bridge_mac: mac(node, dev),
    }
}

/// A UDP socket bound to `addr` in `ns`, whose reads give up after 300 ms (what was not
/// carried by then was not carried).
fn udp_in(ns: &keyway_testing::TestNetns, addr: &str) -> std::net::UdpSocket {
    let s = ns
        .netns()
        .run(|| std::net::UdpSocket::bind(addr).unwrap())
        .unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    s
}

/// `BPF_PROG_TEST_RUN` gives a tc program an Ethernet frame, and `kw_gateway` runs on a device
/// without a link-layer header: so it runs here where it runs on a node, on a TUN device's
/// egress, with no process reading the device (as while an agent restarts).
#[test]
fn the_kernel_gateway_puts_exactly_the_flows_it_was_given_into_the_engines_gue_from_the_saps_address()
 {
    use keyway_sap::io::bpf::{EgressFlow, Flow4, NodePrograms};
    use keyway_testing::{TestNetns, veth};
    if !privileged("the_kernel_gateway_puts_exactly_the_flows_it_was_given") {
        return;
    }
    const SAP: [u8; 4] = [192, 168, 9, 12];
    const OUTSIDE: [u8; 4] = [192, 168, 50, 3];
    const DEST: [u8; 4] = [10, 244, 2, 9];
    let key = Key(0x1234_5678);
    let node = TestNetns::new("bpf-gateway", "node");
    let pod = TestNetns::new("bpf-gateway", "pod");
    // The node routes what it marks for the pod into its gateway device, as the gateway's
    // table and rule do; unmarked, the pod IP is reached over its veth.
    node.sh(&["ip", "tuntap", "add", "kwt-gw", "mode", "tun"]);
    node.sh(&["ip", "link", "set", "kwt-gw", "up"]);
    node.sh(&["ip", "link", "set", "lo", "up"]);
    node.sh(&["ip", "addr", "add", "192.168.50.3/32", "dev", "lo"]);
    node.sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    veth(
        &node,
        "kwt-pod",
        "10.244.2.1/24",
        &pod,
        "eth0",
        "10.244.2.9/24",
    );
    node.sh(&[
        "ip",
        "route",
        "add",
        "10.244.2.9/32",
        "dev",
        "kwt-gw",
        "table",
        "6081",
    ]);
    node.sh(&["ip", "rule", "add", "fwmark", "0x200000", "lookup", "6081"]);
    node.sh(&["nft", "add", "table", "ip", "kwt"]);
    node.sh(&[
        "nft",
        "add chain ip kwt out { type route hook output priority mangle; }",
    ]);
    node.sh(&[
        "nft",
        "add rule ip kwt out ip daddr 10.244.2.9 udp dport 80 meta mark set 0x200000",
    ]);
    let dest_pod = pod_behind(&node, "kwt-pod", &pod);
    let mut p = node
        .netns()
        .run(|| {
            let mut p = NodePrograms::load().expect("the node's programs load");
            p.attach_gateway("kwt-gw").unwrap();
            p
        })
        .unwrap();
    let lease = keyway_sap::io::fastpath::monotonic_ns() + 60_000_000_000;
    p.configure(6080, Some(SAP.into()), lease).unwrap();
    p.set_pod(DEST.into(), &dest_pod).unwrap();
    let endpoint = udp_in(&pod, "10.244.2.9:6080");
    let outside = udp_in(&node, "192.168.50.3:40000");
    let payload = b"through the gateway";
    let send = || {
        outside.send_to(payload, "10.244.2.9:80").unwrap();
    };
    let received = || {
        let mut buf = [0u8; 2048];
        endpoint
            .recv_from(&mut buf)
            .ok()
            .map(|(n, from)| (buf[..n].to_vec(), from))
    };

    send();
    assert_eq!(
        received(),
        None,
        "a flow not given: into the device, which no one reads"
    );
    let flow = Flow4 {
        src: OUTSIDE.into(),
        dst: DEST.into(),
        proto: PROTO_UDP,
        sport: 40000,
        dport: 80,
    };
    let to = EgressFlow {
        to: std::net::SocketAddrV4::new(DEST.into(), 6080),
        key,
        seen_ns: 0,
    };
    p.insert_gateway(&flow, &to).unwrap();
    for n in 0..2 {
        send();
        let (datagram, from) = received().unwrap_or_else(|| panic!("carried ({n})"));
        assert_eq!(
            from,
            SocketAddr::from((SAP, 6080)),
            "from the SaP's address and port"
        );
        let inner = &datagram[gue::HEADER_LEN..];
        assert_eq!(
            datagram,
            gue(key, inner),
            "the engine's GUE header, with the destination's key"
        );
        assert_eq!(Flow4::of_packet(inner), Some(flow), "the packet inside");
        assert_eq!(&inner[28..], payload);
        assert_eq!(keyway_core::packet::checksum(&inner[..20], 0), 0);
    }
    let (packets, bytes) = p.gateway_carried().unwrap();
    assert_eq!(
        (packets, bytes),
        (2, 2 * (28 + payload.len()) as u64),
        "counted as the user-space gateway counts: the packet before encapsulation"
    );
    assert!(
        p.gateway_flows()
            .iter()
            .any(|(f, h)| *f == flow && h.seen_ns > 0 && h.to == to.to && h.key == key),
        "the flow stamped as carried"
    );

    // Anything but that flow goes into the device, and a flow goes only while it may.
    let other = udp_in(&node, "192.168.50.3:40001");
    other.send_to(payload, "10.244.2.9:80").unwrap();
    assert_eq!(received(), None, "another flow: not carried");
    // A pod the node does not list behind a bridge (a routed veth): where the node's own routes
    // (unmarked) and neighbours send it, once the neighbour is known.
    p.remove_pod(DEST.into());
    node.sh(&["ip", "neigh", "flush", "dev", "kwt-pod"]);
    send();
    assert_eq!(received(), None, "no neighbour yet: into the device");
    node.sh(&["ping", "-c", "1", "-W", "1", "10.244.2.9"]);
    send();
    let (datagram, from) = received().expect("carried by the node's routes");
    assert_eq!(from, SocketAddr::from((SAP, 6080)));
    assert_eq!(datagram, gue(key, &datagram[gue::HEADER_LEN..]));
    p.set_pod(DEST.into(), &dest_pod).unwrap();
    p.configure(6080, None, lease).unwrap();
    send();
    assert_eq!(
        received(),
        None,
        "no kernel SaP: no SaP address to send from"
    );
    p.configure(6080, Some(SAP.into()), 1).unwrap();
    send();
    assert_eq!(received(), None, "a lease run out: nothing carried");
    p.configure(6080, Some(SAP.into()), lease).unwrap();
    send();
    assert!(received().is_some(), "and carried again under a lease");
}

/// A destination that is not one of the node's pods behind a bridge (another node's pod, an
/// external entity whose gateway this node is): the kernel SaP sends the datagram where the
/// node's routing and neighbours say, on real devices (the route lookup needs them).
#[test]
fn the_kernel_sap_forwards_to_destinations_off_the_node_by_the_nodes_routes() {
    use keyway_sap::io::bpf::{Flow, NodePrograms, SapFlow, SapNextHop};
    if !privileged("the_kernel_sap_forwards_to_destinations_off_the_node") {
        return;
    }
    const SAP: [u8; 4] = UNDERLAY_SAP;
    const SENDER: [u8; 4] = [192, 168, 9, 20];
    const DEST: [u8; 4] = [192, 168, 10, 30];
    let key = Key(0x0bad_cafe);
    let (node, sender, dest, mut p, _) = node_on_an_underlay(
        "bpf-sap-route",
        ("kwt-dn", "192.168.10.1/24"),
        ("dest", "192.168.10.30/24"),
    );
    let inner = build::ipv4(
        PEER.into(),
        OVERLAY.into(),
        PROTO_UDP,
        &build::ports(PROTO_UDP, 40000, 80, b"to another node"),
    );
    let datagram = gue(key, &inner);
    let flow = SapFlow {
        outer_src: SENDER.into(),
        key,
        inner: Flow::of_packet(&inner).unwrap(),
    };
    p.insert_sap(
        &flow,
        &SapNextHop {
            to: std::net::SocketAddrV4::new(DEST.into(), 6080),
            seen_ns: 0,
        },
    )
    .unwrap();
    let endpoint = udp_in(&dest, "192.168.10.30:6080");
    let from = udp_in(&sender, "192.168.9.20:6080");
    let received = || {
        let mut buf = [0u8; 2048];
        endpoint
            .recv_from(&mut buf)
            .ok()
            .map(|(n, from)| (buf[..n].to_vec(), from))
    };
    let carried = |p: &NodePrograms| p.sap_carried().unwrap().0;

    // The node has not resolved the destination's neighbour yet: the user-space SaP (none
    // here) gets the datagram, and its send resolves the neighbour (here, a ping).
    from.send_to(&datagram, "192.168.9.12:6080").unwrap();
    assert_eq!(received(), None, "no neighbour yet: left to user space");
    assert_eq!(carried(&p), 0);
    node.sh(&["ping", "-c", "1", "-W", "1", "192.168.10.30"]);
    for n in 0..2 {
        from.send_to(&datagram, "192.168.9.12:6080").unwrap();
        let (got, by) = received().unwrap_or_else(|| panic!("forwarded ({n})"));
        assert_eq!(got, datagram, "the datagram itself unchanged");
        assert_eq!(by, SocketAddr::from((SAP, 6080)), "from the SaP's address");
    }
    assert_eq!(carried(&p), 2, "counted as forwarded by the kernel");

    // Out of the device it came in by: the underlay leads to the other nodes and external
    // entities too (here, an external entity on the sender's host answering through its SaP).
    sender.sh(&["ip", "addr", "add", "192.168.9.31/24", "dev", "eth0"]);
    let external = udp_in(&sender, "192.168.9.31:6080");
    p.insert_sap(
        &flow,
        &SapNextHop {
            to: std::net::SocketAddrV4::new([192, 168, 9, 31].into(), 6080),
            seen_ns: 0,
        },
    )
    .unwrap();
    node.sh(&["ping", "-c", "1", "-W", "1", "192.168.9.31"]);
    from.send_to(&datagram, "192.168.9.12:6080").unwrap();
    let mut buf = [0u8; 2048];
    let (n, by) = external
        .recv_from(&mut buf)
        .expect("forwarded out of the device it came in by");
    assert_eq!(&buf[..n], &datagram[..]);
    assert_eq!(by, SocketAddr::from((SAP, 6080)));
    assert_eq!(carried(&p), 3);

    // No route to the destination: left to user space.
    p.insert_sap(
        &flow,
        &SapNextHop {
            to: std::net::SocketAddrV4::new(DEST.into(), 6080),
            seen_ns: 0,
        },
    )
    .unwrap();
    node.sh(&["ip", "link", "set", "kwt-dn", "down"]);
    from.send_to(&datagram, "192.168.9.12:6080").unwrap();
    assert_eq!(received(), None);
    assert_eq!(carried(&p), 3, "no route: not carried");
}

#[test]
fn an_uninstall_removes_the_node_programs_an_agent_left_on_every_device() {
    use keyway_sap::io::bpf::NodePrograms;
    use keyway_sap::io::fastpath::NodeFastPath;
    use keyway_testing::TestNetns;
    if !privileged("an_uninstall_removes_the_node_programs") {
        return;
    }
    let node = TestNetns::new("bpf-uninstall", "node");
    node.sh(&["ip", "link", "add", "kwt-br", "type", "bridge"]);
    node.sh(&[
        "ip", "link", "add", "kwt-up", "type", "veth", "peer", "name", "kwt-peer",
    ]);
    node.sh(&["ip", "tuntap", "add", "kwt-gw", "mode", "tun"]);
    for dev in ["kwt-br", "kwt-up", "kwt-peer", "kwt-gw"] {
        node.sh(&["ip", "link", "set", dev, "up"]);
    }
    let filters = |dev: &str, at: &str| {
        String::from_utf8_lossy(&node.exec(&["tc", "filter", "show", "dev", dev, at]).stdout)
            .into_owned()
    };
    node.netns()
        .run(|| {
            let mut p = NodePrograms::load().expect("the node's programs load");
            p.attach_bridge("kwt-br").unwrap();
            p.attach_sap("kwt-up").unwrap();
            p.attach_gateway("kwt-gw").unwrap();
            // The agent exits: its filters stay, for its successor.
        })
        .unwrap();
    assert!(filters("kwt-br", "egress").contains("kw_bridge_egress"));
    assert!(filters("kwt-up", "ingress").contains("kw_sap"));
    assert!(filters("kwt-gw", "egress").contains("kw_gateway"));
    let mut removed = node.netns().run(NodeFastPath::detach_all).unwrap().unwrap();
    removed.sort();
    assert_eq!(removed, ["kwt-br", "kwt-gw", "kwt-up"]);
    assert!(
        !filters("kwt-gw", "egress").contains("kw_"),
        "{}",
        filters("kwt-gw", "egress")
    );
    assert!(
        !filters("kwt-br", "egress").contains("kw_"),
        "{}",
        filters("kwt-br", "egress")
    );
    assert!(
        !filters("kwt-up", "ingress").contains("kw_"),
        "{}",
        filters("kwt-up", "ingress")
    );
    let again = node.netns().run(NodeFastPath::detach_all).unwrap().unwrap();
    assert!(
        again.is_empty(),
        "a second uninstall finds nothing: {again:?}"
    );
}

#[test]
fn only_this_builds_programs_that_share_one_loads_maps_are_taken_over() {
    use keyway_sap::io::bpf::NodePrograms;
    if !privileged("only_this_builds_programs_that_share_one_loads_maps_are_taken_over") {
        return;
    }
    // What a restarted agent finds on a pod's devices: the two programs of one load.
    let mut first = EndpointPrograms::load(None).expect("the kernel loads keyway's programs");
    let other = EndpointPrograms::load(None).unwrap();
    let [egress, ingress] = first.ids();
    let [other_egress, other_ingress] = other.ids();
    let adopted = EndpointPrograms::adopt(egress, ingress, None)
        .unwrap()
        .expect("one load's two programs are taken over");
    assert_eq!(adopted.ids(), [egress, ingress], "the same programs");
    // With the same maps: what one side writes, the other reads.
    let pod = EndpointConfig {
        overlay: Some(OVERLAY.into()),
        infra: Some(INFRA.into()),
        overlay6: Some(OVERLAY6.parse().unwrap()),
        gue_port: 6080,
        ..EndpointConfig::default()
    };
    first.configure_with_lease(&pod, 42).unwrap();
    let c = adopted.configured().unwrap();
    assert_eq!(
        (c.overlay, c.infra, c.overlay6, c.lease_ns),
        (pod.overlay, pod.infra, pod.overlay6, 42)
    );
    // Anything else is loaded anew, never taken over.
    let refused = |e, i, why: &str| {
        assert!(
            EndpointPrograms::adopt(e, i, None).unwrap().is_none(),
            "taken over: {why}"
        );
    };
    refused(
        egress,
        other_ingress,
        "programs of two loads, whose maps differ",
    );
    refused(
        other_egress,
        ingress,
        "programs of two loads, whose maps differ",
    );
    refused(ingress, egress, "each program in the other's place");
    refused(egress, u32::MAX, "a program that is not loaded");

    // The node's: the kernel SaP, and the bridge program that shares its maps.
    let node = NodePrograms::load().expect("the node's programs load");
    let _other_node = NodePrograms::load().unwrap();
    let taken = NodePrograms::adopt(node.sap_id())
        .unwrap()
        .expect("the node's kernel SaP is taken over");
    assert_eq!(
        (taken.sap_id(), taken.bridge_id(), taken.gateway_id()),
        (node.sap_id(), node.bridge_id(), node.gateway_id()),
        "with the bridge and gateway programs of the same load, not another load's"
    );
    assert!(
        NodePrograms::adopt(node.gateway_id()).unwrap().is_none(),
        "the gateway program in the SaP's place"
    );
    assert!(
        NodePrograms::adopt(node.bridge_id()).unwrap().is_none(),
        "the bridge program in the SaP's place"
    );
    assert!(
        NodePrograms::adopt(egress).unwrap().is_none(),
        "an endpoint program in the SaP's place"
    );
}

/// An entity of the compiled-policy tests: its FIB prefix, an address in it to send from or to,
/// its endpoint, the SaP that fronts it (none: none), whether it is off the overlay, whether it
/// is in the mesh.
struct Entity {
    name: &'static str,
    prefix: &'static str,
    probe: [u8; 4],
    infra: [u8; 4],
    sap: Option<[u8; 4]>,
    outside: bool,
    mesh: bool,
}

fn entity(
    name: &'static str,
    prefix: &'static str,
    probe: [u8; 4],
    infra: [u8; 4],
    sap: Option<[u8; 4]>,
    outside: bool,
    mesh: bool,
) -> Entity {
    Entity {
        name,
        prefix,
        probe,
        infra,
        sap,
        outside,
        mesh,
    }
}

/// The SaPs of the compiled-policy tests: this node's, and another's.
const SAP: [u8; 4] = [192, 168, 9, 12];
const OTHER_SAP: [u8; 4] = [192, 168, 9, 11];

/// The IPv6 twin of an entity's IPv4 overlay address in the compiled-policy tests (its bytes
/// behind fd6b::/96): the FIB routes both to the entity.
fn v6_twin(a: [u8; 4]) -> Ipv6Addr {
    Ipv6Addr::from(0xfd6b_u128 << 112 | u128::from(u32::from_be_bytes(a)))
}

fn gue_sock(ip: [u8; 4]) -> SocketAddr {
    SocketAddr::new(IpAddr::from(ip), 6080)
}

/// Tables of generation `generation` with a random policy over the identities of `entities`
/// (one each: isolation, rules per pair, for any peer and for peer groups, on `ports`, some with
/// more port ranges than the kernel holds, the mesh; with `direct`, now and then a direct pair
/// with the first entity) and their FIB (each entity's prefix and its IPv6 twin), keyed by
/// `keys`; and the identities.
fn random_tables(
    rng: &mut keyway_testing::fuzz::Rng,
    entities: &[Entity],
    ports: &[u16],
    keys: (&ClusterSecret, Rotation),
    generation: u64,
    direct: bool,
) -> (Tables, Vec<keyway_core::acl::Identity>) {
    use keyway_core::acl::{Acl, Identity, Isolation, PortRange};
    use keyway_core::fib::{Fib, Route};
    let mut b = Acl::builder();
    let ids: Vec<Identity> = entities
        .iter()
        .map(|ent| {
            let id = b.identity(Isolation {
                ingress: rng.below(3) > 0,
                egress: rng.below(3) == 0,
            });
            if ent.mesh {
                b.mesh(id);
            }
            id
        })
        .collect();
    if direct && rng.below(3) == 0 {
        b.direct(ids[0], rng.pick(&ids[1..]));
    }
    for _ in 0..rng.below(14) {
        let (x, y) = (rng.pick(&ids), rng.pick(&ids));
        let egress = rng.below(2) == 0;
        let set = match rng.below(3) {
            0 if egress => b.egress(x, y),
            0 => b.ingress(x, y),
            1 if egress => b.egress_to_any(x),
            1 => b.ingress_from_any(x),
            _ => {
                let members: Vec<Identity> = (0..rng.below(4)).map(|_| rng.pick(&ids)).collect();
                let g = b.peer_group(&members);
                if egress {
                    b.egress_to_group(x, g)
                } else {
                    b.ingress_from_group(g, x)
                }
            }
        };
        match rng.below(5) {
            0 => {
                set.allow_everything();
            }
            1 => {
                set.allow(PROTO_UDP, Some(PortRange::single(rng.pick(ports))));
            }
            2 => {
                let start = rng.pick(ports);
                set.allow(
                    PROTO_TCP,
                    Some(PortRange::new(start, start + rng.below(8) as u16)),
                );
            }
            3 => {
                set.allow(PROTO_TCP, None);
            }
            _ => {
                // More ranges than the kernel holds: left to user space.
                for i in 0..10u16 {
                    set.allow(PROTO_TCP, Some(PortRange::single(9000 + 2 * i)));
                }
            }
        }
    }
    let (secret, rotation) = keys;
    let now = NOW;
    let mut fib = Fib::builder();
    for (ent, id) in entities.iter().zip(&ids) {
        let route = Route {
            entity: ent.name.into(),
            identity: *id,
            keys: KeyRing::derive(secret, ent.name, rotation, now),
            infra: gue_sock(ent.infra),
            sap: ent.sap.map(gue_sock),
            outside: ent.outside,
        };
        let idx = fib.route(route);
        let ipnetwork::IpNetwork::V4(net) = ent.prefix.parse().unwrap() else {
            panic!("an IPv4 prefix: {}", ent.prefix);
        };
        fib.prefix(net.into(), idx).unwrap();
        let twin = ipnetwork::Ipv6Network::new(v6_twin(net.ip().octets()), 96 + net.prefix());
        fib.prefix(twin.unwrap().into(), idx).unwrap();
    }
    let mut tables = Tables {
        fib: fib.build(),
        acl: b.build(),
        generation,
        ..Tables::default()
    };
    tables.saps.insert(IpAddr::from(SAP));
    tables.saps.insert(IpAddr::from(OTHER_SAP));
    (tables, ids)
}

/// The kernel SaP's compiled policy against the engine: over random policies (isolation, rules
/// per pair, for any peer and for peer groups, port ranges, the mesh) and random datagrams
/// (every kind of source and destination the FIB has, outer sources that may or may not speak
/// for the source, current, previous and wrong keys, openings, replies, resets, echoes, ICMP
/// errors, other protocols; IPv4 or IPv6 inside), the kernel forwards no datagram that
/// `engine::sap_forward` does not forward, and to the same endpoint; and it forwards every one
/// the engine forwards to a pod this SaP fronts with the destination's current key, so its
/// first datagrams need no user space.
#[test]
fn the_kernel_saps_compiled_policy_forwards_exactly_what_the_engine_forwards() {
    use keyway_core::engine::sap_forward;
    use keyway_sap::io::bpf::{NodePod, NodePrograms, PAIR_RANGES, TC_ACT_REDIRECT};
    use keyway_sap::io::fastpath::SapPolicy;
    if !privileged("the_kernel_saps_compiled_policy_forwards_exactly_what_the_engine_forwards") {
        return;
    }
    let secret = ClusterSecret::new(vec![9u8; 32]).unwrap();
    let rotation = Rotation::new(10_000, 4_000).unwrap();
    // (name, prefix, infra, sap, outside, mesh): pods fronted by this SaP (b*), by another
    // node's (a*), one with no SaP, one whose endpoint is this SaP's own address (a loop), an
    // external entity behind the other node's gateway, and the rest of the overlay off it.
    let entities = [
        entity(
            "ns/a1",
            "100.64.1.1/32",
            [100, 64, 1, 1],
            [10, 244, 1, 5],
            Some(OTHER_SAP),
            false,
            false,
        ),
        entity(
            "ns/a2",
            "100.64.1.2/32",
            [100, 64, 1, 2],
            [10, 244, 1, 6],
            Some(OTHER_SAP),
            false,
            true,
        ),
        entity(
            "ns/b1",
            "100.64.2.1/32",
            [100, 64, 2, 1],
            [10, 244, 2, 5],
            Some(SAP),
            false,
            false,
        ),
        entity(
            "ns/b2",
            "100.64.2.2/32",
            [100, 64, 2, 2],
            [10, 244, 2, 6],
            Some(SAP),
            false,
            true,
        ),
        entity(
            "ns/b3",
            "100.64.2.3/32",
            [100, 64, 2, 3],
            [10, 244, 2, 7],
            Some(SAP),
            false,
            false,
        ),
        entity(
            "ns/c",
            "100.64.3.1/32",
            [100, 64, 3, 1],
            [10, 244, 3, 5],
            None,
            false,
            false,
        ),
        entity(
            "ns/loop",
            "100.64.2.4/32",
            [100, 64, 2, 4],
            SAP,
            Some(SAP),
            false,
            false,
        ),
        entity(
            "external/x",
            "203.0.113.0/24",
            [203, 0, 113, 9],
            OTHER_SAP,
            Some(OTHER_SAP),
            true,
            false,
        ),
        entity(
            "outside/rest",
            "100.64.0.0/10",
            [100, 65, 0, 1],
            OTHER_SAP,
            None,
            true,
            false,
        ),
    ];
    let mut p = NodePrograms::load().expect("the node's programs load");
    let lease = keyway_sap::io::fastpath::monotonic_ns() + 600_000_000_000;
    p.configure(6080, Some(SAP.into()), lease).unwrap();
    for (i, ent) in entities.iter().enumerate() {
        if ent.sap == Some(SAP) && ent.infra != SAP {
            let pod = NodePod {
                veth_ifindex: 100 + i as u32,
                pod_mac: [0x02, 0, 0, 0, 0, i as u8],
                bridge_mac: [0x02, 0xbb, 0, 0, 0, 0],
            };
            p.set_pod(ent.infra.into(), &pod).unwrap();
        }
    }
    // Seeded, so that a failure replays.
    let mut rng = keyway_testing::fuzz::Rng::new(0x6b77_7361_7021);
    let mut policy = SapPolicy::default();
    let (mut runs, mut engine_ok, mut kernel_ok, mut required) = (0u64, 0u64, 0u64, 0u64);
    let mut kernel_ok6 = 0u64;
    let ports = [80u16, 443, 53, 15008, 8080, 9000, 9005, 40000];
    let mut last_forwarded = None;
    for round in 0..40u64 {
        let (tables, ids) = random_tables(
            &mut rng,
            &entities,
            &ports,
            (&secret, rotation),
            round + 1,
            false,
        );
        let report = policy.sync(
            &mut p,
            &tables,
            Some(SocketAddrV4::new(SAP.into(), 6080)),
            NOW,
            false,
        );
        assert_eq!(
            report.routes,
            2 * entities.len(),
            "every prefix in the kernel, IPv4 and IPv6"
        );

        for _ in 0..1500 {
            let src = &entities[rng.below(entities.len())];
            let dst = &entities[rng.below(entities.len())];
            let (s, d) = (src.probe, dst.probe);
            let (sport, dport) = (rng.pick(&ports), rng.pick(&ports));
            let kind = rng.below(9);
            // TCP, UDP and echoes; then an ICMP error and another protocol, which the kernel
            // leaves to user space. A third of them with IPv6 inside, between the same
            // entities' IPv6 addresses (also with an extension header now and then, which
            // the kernel leaves to user space).
            let plain = kind < 7;
            let v4 = match kind {
                0 => build::syn4(s, sport, d, dport),
                1 => {
                    let mut t = build::syn4(s, sport, d, dport);
                    t[33] = 0x12; // SYN-ACK: a reply
                    t
                }
                2 => build::rst4(s, sport, d, dport),
                3 | 4 => build::tcp4(s, sport, d, dport),
                5 => build::ipv4(
                    s.into(),
                    d.into(),
                    PROTO_UDP,
                    &build::ports(PROTO_UDP, sport, dport, b"x"),
                ),
                6 => build::ipv4(
                    s.into(),
                    d.into(),
                    PROTO_ICMP,
                    &build::echo(false, rng.below(2) == 0, 7, 1),
                ),
                7 => build::ipv4(s.into(), d.into(), PROTO_ICMP, &[3, 1, 0, 0, 0, 0, 0, 0]),
                _ => build::ipv4(s.into(), d.into(), 47, &[0u8; 8]),
            };
            let (inner, plain) = if rng.below(3) == 0 {
                let mut l4 = v4[20..].to_vec();
                let next = match v4[9] {
                    PROTO_ICMP => {
                        // Echo request 8 and reply 0 are ICMPv6's 128 and 129; an error, 1.
                        l4[0] = match l4[0] {
                            8 => 128,
                            0 => 129,
                            _ => 1,
                        };
                        PROTO_ICMPV6
                    }
                    p => p,
                };
                if rng.below(8) == 0 {
                    // A destination options header (8 bytes, nothing in it) before it.
                    let mut opts = vec![next, 0, 1, 4, 0, 0, 0, 0];
                    opts.extend_from_slice(&l4);
                    (build::ipv6(v6_twin(s), v6_twin(d), 60, &opts), false)
                } else {
                    (build::ipv6(v6_twin(s), v6_twin(d), next, &l4), plain)
                }
            } else {
                (v4, plain)
            };
            let epoch = rotation.epoch_at(NOW);
            let current = secret.derive(dst.name, epoch);
            let key = match rng.below(6) {
                0 => secret.derive(dst.name, Epoch(epoch.0 - 1)),
                1 => secret.derive(src.name, epoch),
                2 => Key(rng.next_u64() as u32),
                _ => current,
            };
            let outer = match rng.below(6) {
                0 => src.sap.unwrap_or(OTHER_SAP),
                1 => SAP,
                2 => [10, 244, 2, 99],
                _ => src.infra,
            };
            let datagram = gue(key, &inner);
            let engine = sap_forward(&tables, &datagram, gue_sock(outer), NOW);
            let f = udp_frame(outer, SAP, 6080, &datagram, false);
            let compiled_before = p.sap_compiled().unwrap();
            let (ret, out) = p.run_sap(&f).unwrap();
            runs += 1;
            engine_ok += u64::from(engine.is_ok());
            let what = format!(
                "round {round}: {} -> {} ({inner:02x?}) from {outer:?} with {key:?}: engine {engine:?}",
                src.name, dst.name
            );
            if ret == TC_ACT_REDIRECT {
                kernel_ok += 1;
                kernel_ok6 += u64::from(inner[0] >> 4 == 6);
                let Ok(SocketAddr::V4(to)) = engine else {
                    panic!("the kernel forwarded what the engine refuses: {what}");
                };
                assert_eq!(&out[30..34], &to.ip().octets(), "{what}");
                assert_eq!(&out[36..38], &to.port().to_be_bytes(), "{what}");
                assert_eq!(&out[42..], &datagram[..], "unchanged: {what}");
                assert_eq!(p.sap_compiled().unwrap(), compiled_before + 1, "{what}");
                last_forwarded = Some(f.clone());
            } else {
                assert_eq!((ret, &out), (TC_ACT_OK, &f), "untouched: {what}");
                // What the kernel must not leave to user space: a datagram the engine forwards to
                // a pod this SaP fronts, with its current key, of a pair whose policy fits.
                let fits = |a: &Entity, b: &Entity| {
                    let ia = ids[entities.iter().position(|x| x.name == a.name).unwrap()];
                    let ib = ids[entities.iter().position(|x| x.name == b.name).unwrap()];
                    tables.acl.pair_policy(ia, ib).is_some_and(|pp| {
                        pp.tcp.len() <= PAIR_RANGES && pp.udp.len() <= PAIR_RANGES
                    })
                };
                let must = engine.is_ok()
                    && plain
                    && dst.sap == Some(SAP)
                    && key == current
                    && fits(src, dst)
                    && fits(dst, src);
                assert!(!must, "the kernel left to user space: {what}");
            }
            required +=
                u64::from(engine.is_ok() && plain && dst.sap == Some(SAP) && key == current);
        }
    }
    eprintln!(
        "{runs} datagrams: the engine forwarded {engine_ok}, the kernel {kernel_ok}, {kernel_ok6} of them with IPv6 inside (of {required} to this SaP's pods with their current key)"
    );
    assert!(
        kernel_ok > 1000,
        "the compiled policy forwards: {kernel_ok}"
    );
    assert!(
        kernel_ok6 > 300,
        "the compiled policy forwards IPv6 inside: {kernel_ok6}"
    );

    // Only the generation in force is used: one that is not (a compilation half written) is
    // ignored, and with none in force nothing is forwarded by policy.
    let f = last_forwarded.expect("something was forwarded");
    let generation = p.policy_generation();
    p.set_policy_generation(generation + 1, true).unwrap();
    assert_eq!(
        p.run_sap(&f).unwrap().0,
        TC_ACT_OK,
        "another generation's entries: unused"
    );
    p.set_policy_generation(generation, true).unwrap();
    assert_eq!(p.run_sap(&f).unwrap().0, TC_ACT_REDIRECT);
    let report = policy.sync(&mut p, &Tables::default(), None, NOW, false);
    assert_eq!((report.routes, report.pairs), (0, 0));
    assert_eq!(p.policy_generation(), 0);
    assert!(
        p.route_prefixes().is_empty() && p.pairs().is_empty(),
        "turned off, the maps are emptied"
    );
    assert_eq!(
        p.run_sap(&f).unwrap().0,
        TC_ACT_OK,
        "no compiled policy in force"
    );
}

/// A pod's programs judging by the node's compiled policy, against the engine: over random
/// policies (isolation, rules per pair, for any peer and for peer groups, port ranges, direct
/// pairs, the mesh) and random packets both ways (every kind of peer the FIB has; openings,
/// replies to what went before, resets, data, UDP, echoes, ICMP errors, other protocols; spoofed
/// sources, outer sources that may or may not speak for the inner source, current, previous and
/// wrong keys), run in order through the kernel and the engine alike (each packet the kernel
/// admits is one the engine then tracks, as a sync would; each it leaves is one the user-space
/// path judges), the kernel admits no packet the engine refuses, and sends each it admits where
/// and with the key the engine does; and it admits every opening the engine admits whose pair's
/// policy fits the maps, so a connection's first packets need no user space.
#[test]
fn the_pods_compiled_policy_admits_nothing_the_engine_refuses() {
    use keyway_core::engine::{Send, endpoint_egress};
    use keyway_sap::io::bpf::{NodePrograms, PAIR_RANGES, TC_ACT_REDIRECT};
    use keyway_sap::io::fastpath::SapPolicy;
    if !privileged("the_pods_compiled_policy_admits_nothing_the_engine_refuses") {
        return;
    }
    let secret = ClusterSecret::new(vec![5u8; 32]).unwrap();
    let rotation = Rotation::new(10_000, 4_000).unwrap();
    // (name, prefix, probe address, infra, sap, outside, mesh). The pod under test is b1. The
    // overlay is 8.0.0.0/14 here: a test run takes a packet's bytes 12 and 13 for its protocol
    // (see run_egress).
    let entities = [
        entity(
            "ns/b1",
            "8.0.2.1/32",
            [8, 0, 2, 1],
            [10, 244, 2, 5],
            Some(SAP),
            false,
            true,
        ),
        entity(
            "ns/b2",
            "8.0.2.2/32",
            [8, 0, 2, 2],
            [10, 244, 2, 6],
            Some(SAP),
            false,
            true,
        ),
        entity(
            "ns/a1",
            "8.0.1.1/32",
            [8, 0, 1, 1],
            [10, 244, 1, 5],
            Some(OTHER_SAP),
            false,
            false,
        ),
        entity(
            "ns/c",
            "8.0.3.1/32",
            [8, 0, 3, 1],
            [10, 244, 3, 5],
            None,
            false,
            false,
        ),
        entity(
            "ns/loop",
            "8.0.2.4/32",
            [8, 0, 2, 4],
            SAP,
            Some(SAP),
            false,
            false,
        ),
        entity(
            "external/x",
            "203.0.113.0/24",
            [203, 0, 113, 9],
            OTHER_SAP,
            Some(OTHER_SAP),
            true,
            false,
        ),
        entity(
            "outside/rest",
            "8.0.0.0/14",
            [8, 1, 0, 1],
            OTHER_SAP,
            None,
            true,
            false,
        ),
    ];
    let b1 = &entities[0];
    let (pod, pod_infra) = (b1.probe, b1.infra);

    let mut node = NodePrograms::load().expect("the node's programs load");
    let lease = keyway_sap::io::fastpath::monotonic_ns() + 600_000_000_000;
    node.configure(6080, Some(SAP.into()), lease).unwrap();
    let scratch = std::env::temp_dir();
    let mut bpf = EndpointPrograms::load(node.shared_maps().map(|m| (m, scratch.as_path())))
        .expect("the pod's programs load");
    assert_eq!(
        bpf.shared_maps(),
        node.shared_maps(),
        "the node's maps, shared"
    );
    let mut kernel_flows = bpf.take_flows().unwrap();
    // (Devices the programs would deliver to and send from: a test run goes to neither.)
    let (tun, eth) = (7, 8);
    let ring = KeyRing::derive(&secret, b1.name, rotation, NOW);
    let mut keys = ring.accepted_at(NOW);
    keys.truncate(3);
    bpf.configure_with_lease(
        &EndpointConfig {
            overlay: Some(pod.into()),
            infra: Some(pod_infra.into()),
            gue_port: 6080,
            keys,
            tun_ifindex: tun,
            eth_ifindex: eth,
            fast: true,
            ..EndpointConfig::default()
        },
        lease,
    )
    .unwrap();
    let local = LocalEndpoint {
        entity: Arc::from(b1.name),
        overlay_ips: vec![IpAddr::from(pod)],
        infra: gue_sock(pod_infra),
        keys: ring,
        local_sap: Some(gue_sock(SAP)),
    };

    let mut rng = keyway_testing::fuzz::Rng::new(0x706f_645f_6b77);
    let mut policy = SapPolicy::default();
    let flows = FlowTable::new(1 << 16, FlowTimeouts::default());
    // The engine's UDP flows, in the kernel, as the agent keeps them.
    let engine_flows = bpf.take_engine_flows().unwrap();
    assert!(!engine_flows.whole(), "not whole before it mirrors");
    engine_flows.mirror(&flows);
    assert!(engine_flows.whole());
    let ports = [80u16, 8080, 53, 15008, 9000, 40000, 40001];
    let (mut runs, mut engine_ok, mut kernel_ok, mut openings) = (0u64, 0u64, 0u64, 0u64);
    let (mut udp_openings, mut echo_openings) = (0u64, 0u64);
    // The UDP flows the engine opened: what the kernel's copy must hold.
    let mut udp_opened = std::collections::BTreeSet::new();
    for round in 0..30u64 {
        let (tables, ids) = random_tables(
            &mut rng,
            &entities,
            &ports,
            (&secret, rotation),
            round + 1,
            true,
        );
        policy.sync(
            &mut node,
            &tables,
            Some(SocketAddrV4::new(SAP.into(), 6080)),
            NOW,
            false,
        );
        // A new policy, and the connections both sides hold stay: the kernel judges by the new
        // policy before the agent's next sync has judged its connections again, as it may.
        // (That sync re-derives the flows the kernel caches through the engine: here, none
        // stays.)
        for (f, _) in kernel_flows.egress() {
            kernel_flows.remove_egress(&f);
        }
        for (f, _) in kernel_flows.ingress() {
            kernel_flows.remove_ingress(&f);
        }
        let fits = |x: usize, y: usize| {
            tables
                .acl
                .pair_policy(ids[x], ids[y])
                .is_none_or(|p| p.tcp.len() <= PAIR_RANGES && p.udp.len() <= PAIR_RANGES)
        };
        // A reset the engine judged (admitted or not: it may have ended the flow before a later
        // check refused the packet) ends the flow in the kernel too: the user-space path removes
        // the kernel's record of it at once, and the agent's next sync the flows that answered
        // it (the engine no longer admits them).
        let ended = |k: &mut keyway_sap::io::bpf::FlowMaps, f: keyway_sap::io::bpf::Flow4| {
            for g in [f, f.reversed()] {
                k.remove_conn(&g);
                k.remove_egress(&keyway_sap::io::bpf::Flow::V4(g));
                for (i, _) in k.ingress() {
                    if i.inner == keyway_sap::io::bpf::Flow::V4(g) {
                        k.remove_ingress(&i);
                    }
                }
            }
        };
        // What went before, to answer: (egress?, peer, pod port, peer port, protocol).
        let mut earlier: Vec<(bool, usize, u16, u16, u8)> = Vec::new();
        for _ in 0..1500 {
            let (egress, peer, mut pod_port, mut peer_port, mut proto, answer) =
                if !earlier.is_empty() && rng.below(3) == 0 {
                    let (e, p, a, b, proto) = rng.pick(&earlier);
                    (!e, p, a, b, proto, true)
                } else {
                    let proto = if rng.below(3) == 0 {
                        PROTO_UDP
                    } else {
                        PROTO_TCP
                    };
                    (
                        rng.below(2) == 0,
                        1 + rng.below(entities.len() - 1),
                        rng.pick(&ports),
                        rng.pick(&ports),
                        proto,
                        false,
                    )
                };
            let kind = rng.below(10);
            if kind == 8 {
                proto = PROTO_ICMP;
            } else if kind == 9 {
                proto = 47;
            }
            if rng.below(20) == 0 {
                std::mem::swap(&mut pod_port, &mut peer_port);
            }
            let peer_ent = &entities[peer];
            let (s, sport, d, dport) = if egress {
                (pod, pod_port, peer_ent.probe, peer_port)
            } else {
                (peer_ent.probe, peer_port, pod, pod_port)
            };
            // A spoofed source now and then.
            let s = if egress && rng.below(15) == 0 {
                [8, 0, 2, 2]
            } else {
                s
            };
            let tcp = |flags: u8| {
                let mut t = build::tcp4(s, sport, d, dport);
                t[33] = flags;
                t
            };
            // At least 34 bytes each: a test run takes nothing shorter (see run_egress).
            let inner = match (proto, kind) {
                (PROTO_ICMP, _) => {
                    // An echo's identifier, the same both ways: an answer replies to a request.
                    let mut l4 = if rng.below(4) > 0 {
                        build::echo(false, answer, pod_port ^ peer_port, 1)
                    } else {
                        vec![3, 3, 0, 0, 0, 0, 0, 0]
                    };
                    l4.resize(14, 0);
                    build::ipv4(s.into(), d.into(), PROTO_ICMP, &l4)
                }
                (47, _) => build::ipv4(s.into(), d.into(), 47, &[0u8; 14]),
                (PROTO_UDP, _) => build::ipv4(
                    s.into(),
                    d.into(),
                    PROTO_UDP,
                    &build::ports(PROTO_UDP, sport, dport, b"keyway"),
                ),
                (_, 0..=2) if !answer => tcp(0x02),
                (_, 0..=2) => tcp(0x12),
                (_, 3) => tcp(0x14),
                _ => tcp(0x10),
            };
            let syn = proto == PROTO_TCP && inner[33] == 0x02;
            // A UDP datagram the engine would take for no reply: an opening, if policy allows.
            let udp_opening =
                proto == PROTO_UDP && !flows.would_admit(&classify(&inner).unwrap(), false, NOW);
            let echo_opening = proto == PROTO_ICMP && inner[20] == 8;
            let opening = syn || udp_opening || echo_opening;
            let what = format!(
                "round {round}: {} {} ({inner:02x?})",
                if egress { "to" } else { "from" },
                peer_ent.name
            );
            runs += 1;
            if egress {
                let (ret, out) = bpf
                    .run_egress(&inner)
                    .unwrap_or_else(|e| panic!("{e}: {what}"));
                let mut buf = vec![0u8; gue::HEADROOM];
                buf.extend_from_slice(&inner);
                let engine = endpoint_egress(&tables, &local, &flows, &mut buf, NOW);
                engine_ok += u64::from(engine.is_ok());
                if ret == TC_ACT_REDIRECT {
                    kernel_ok += 1;
                    let Ok(Send {
                        to: SocketAddr::V4(to),
                        start,
                        ..
                    }) = engine
                    else {
                        panic!("the kernel admitted what the engine refuses: {what}: {engine:?}");
                    };
                    // Ethernet (blank), outer IPv4, UDP, GUE; then the packet past its first 14
                    // bytes (see run_egress).
                    assert_eq!(&out[26..30], &pod_infra, "from the pod IP: {what}");
                    assert_eq!(
                        &out[30..34],
                        &to.ip().octets(),
                        "to the engine's next hop: {what}"
                    );
                    assert_eq!(&out[36..38], &to.port().to_be_bytes(), "{what}");
                    assert_eq!(
                        &out[42..50],
                        &buf[start..start + 8],
                        "the engine's GUE header, key and all: {what}"
                    );
                    assert_eq!(
                        &out[out.len() - (inner.len() - 14)..],
                        &inner[14..],
                        "{what}"
                    );
                } else {
                    assert_eq!(ret, TC_ACT_OK, "{what}");
                    let must =
                        engine.is_ok() && opening && fits(0, peer) && fits(peer, 0) && s == pod;
                    assert!(
                        !must,
                        "the kernel left an opening to user space: {what}: {engine:?}"
                    );
                    if let Some(f) = keyway_sap::io::bpf::Flow4::of_packet(&inner)
                        && inner[9] == PROTO_TCP
                        && inner[33] & 0x04 != 0
                    {
                        ended(&mut kernel_flows, f);
                    }
                }
                openings += u64::from(opening && engine.is_ok());
                udp_openings += u64::from(udp_opening && engine.is_ok());
                echo_openings += u64::from(echo_opening && engine.is_ok());
                if udp_opening && engine.is_ok() {
                    udp_opened.insert(keyway_sap::io::bpf::Flow4::of_packet(&inner).unwrap());
                }
                if engine.is_ok() {
                    earlier.push((true, peer, pod_port, peer_port, proto));
                }
            } else {
                let epoch = rotation.epoch_at(NOW);
                let key = match rng.below(8) {
                    0 => secret.derive(b1.name, Epoch(epoch.0 - 1)),
                    1 => secret.derive(peer_ent.name, epoch),
                    2 => Key(rng.next_u64() as u32),
                    _ => secret.derive(b1.name, epoch),
                };
                let outer = match rng.below(6) {
                    0 => peer_ent.sap.unwrap_or(OTHER_SAP),
                    1 => SAP,
                    2 => [10, 244, 2, 99],
                    _ => peer_ent.infra,
                };
                let datagram = gue(key, &inner);
                let (ret, _) = bpf
                    .run_ingress(&udp_frame(outer, pod_infra, 6080, &datagram, false))
                    .unwrap();
                let engine =
                    endpoint_ingress(&tables, &local, &flows, &datagram, gue_sock(outer), NOW);
                engine_ok += u64::from(engine.is_ok());
                let what = format!("{what} via {outer:?} with {key:?}");
                if ret == TC_ACT_REDIRECT {
                    kernel_ok += 1;
                    assert!(
                        engine.is_ok(),
                        "the kernel admitted what the engine refuses: {what}: {engine:?}"
                    );
                } else {
                    let must = engine.is_ok()
                        && opening
                        && fits(0, peer)
                        && fits(peer, 0)
                        && key == secret.derive(b1.name, epoch);
                    assert!(
                        !must,
                        "the kernel left an opening to user space: {what}: {engine:?}"
                    );
                    if let Some(f) = keyway_sap::io::bpf::Flow4::of_packet(&inner)
                        && inner[9] == PROTO_TCP
                        && inner[33] & 0x04 != 0
                    {
                        ended(&mut kernel_flows, f);
                    }
                }
                openings += u64::from(opening && engine.is_ok());
                udp_openings += u64::from(udp_opening && engine.is_ok());
                echo_openings += u64::from(echo_opening && engine.is_ok());
                if udp_opening && engine.is_ok() {
                    udp_opened.insert(keyway_sap::io::bpf::Flow4::of_packet(&inner).unwrap());
                }
                if engine.is_ok() {
                    earlier.push((false, peer, pod_port, peer_port, proto));
                }
            }
        }
    }
    eprintln!(
        "{runs} packets: the engine admitted {engine_ok}, the kernel {kernel_ok} ({openings} openings, {udp_openings} of UDP, {echo_openings} echo requests)"
    );
    assert!(kernel_ok > 1000, "the compiled policy admits: {kernel_ok}");
    assert!(udp_openings > 100, "UDP openings: {udp_openings}");
    assert!(
        echo_openings > 50,
        "echo requests admitted: {echo_openings}"
    );
    // The kernel's copy of the engine's UDP flows holds every one the engine opened, and no
    // flow the engine does not hold (nothing expired here). (The engine also holds flows of
    // packets a later check refused.)
    let copied: std::collections::BTreeSet<_> = engine_flows.flows().into_iter().collect();
    assert!(engine_flows.whole());
    let held = |f: &keyway_sap::io::bpf::Flow4| {
        let reply = f.reversed().packet();
        flows.would_admit(&classify(&reply).unwrap(), false, NOW)
    };
    let (extra, missing): (Vec<_>, Vec<_>) = (
        copied.iter().filter(|f| !held(f)).collect(),
        udp_opened.difference(&copied).collect(),
    );
    assert!(
        extra.is_empty() && missing.is_empty(),
        "not the engine's: {extra:?}; missing: {missing:?}"
    );
}
