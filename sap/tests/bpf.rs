//! The kernel's ingress checks (`kw_ingress` in `sap/bpf/endpoint.bpf.c`) against the user-space engine's
//! (`keyway_core::engine::endpoint_ingress`), over the same datagrams: hand-made ones for every
//! check, then tens of thousands of mutations of them by the workspace's seeded fuzzer. Run in the kernel through
//! `BPF_PROG_TEST_RUN` (root). Every drop in the kernel must be the engine's drop with the same
//! reason; every datagram the kernel fully parses (GUE, inner IPv4) and passes on must be one the
//! engine does not drop for those reasons; only an inner IPv6 packet is left to the engine whole.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use keyway_core::engine::{DropReason, LocalEndpoint, Tables, endpoint_ingress};
use keyway_core::flow::{FlowTable, FlowTimeouts};
use keyway_core::gue::{self, InnerProto};
use keyway_core::key::{ClusterSecret, Epoch, Key, KeyRing, Rotation};
use keyway_core::packet::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, build};
use keyway_sap::io::bpf::{EndpointConfig, EndpointPrograms, TC_ACT_OK, Verdict};
use keyway_testing::privileged;

const OVERLAY: [u8; 4] = [100, 64, 0, 2];
const INFRA: [u8; 4] = [10, 244, 1, 2];
const PEER: [u8; 4] = [100, 64, 0, 1];
const OUTER_SRC: [u8; 4] = [10, 244, 1, 1];
/// One second into an epoch of 10 s with 4 s of grace: the previous epoch's key is accepted too.
const NOW: u64 = 1_000_000_000 + 1_000;

/// An Ethernet frame carrying `datagram` in UDP from `OUTER_SRC` to the pod's GUE port.
fn frame(datagram: &[u8], port: u16) -> Vec<u8> {
    let udp_len = 8 + datagram.len();
    let mut f = vec![0u8; 14 + 20 + udp_len];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = PROTO_UDP;
    ip[12..16].copy_from_slice(&OUTER_SRC);
    ip[16..20].copy_from_slice(&INFRA);
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&6080u16.to_be_bytes());
    udp[2..4].copy_from_slice(&port.to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    f[42..].copy_from_slice(datagram);
    f
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
    let mut v = vec![
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
        overlay_ips: vec![IpAddr::from(OVERLAY)],
        infra: SocketAddr::new(IpAddr::from(INFRA), 6080),
        keys: ring,
        local_sap: None,
    };
    let tables = Tables::default();
    let flows = FlowTable::new(1024, FlowTimeouts::default());
    let outer = SocketAddr::new(IpAddr::from(OUTER_SRC), 6080);

    let mut bpf = EndpointPrograms::load().expect("the kernel loads keyway's programs");
    bpf.configure(&EndpointConfig {
        overlay: Some(Ipv4Addr::from(OVERLAY)),
        infra: Some(Ipv4Addr::from(INFRA)),
        gue_port: 6080,
        keys: ring.accepted_at(NOW),
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
        let whole = match gue::decode(d) {
            Err(_) => true,
            Ok(h) => h.proto == InnerProto::Ipv4,
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
        ("IPv6 inside", Verdict::Pass),
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
