//! Criterion benches of the data-plane core. Each group carries its own baseline, measured in the
//! same run, so results read as ratios: a plain copy of the packet for encapsulation and
//! decapsulation, the 10-entry table for FIB lookups, the 10-rule policy for policy checks.
//! `make bench` prints the ratios (scripts/bench-ratios).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keyway_core::acl::{Acl, Identity, Isolation, PortRange};
use keyway_core::engine::{self, LocalEndpoint, PacketAuth, Tables};
use keyway_core::fib::{Fib, Route};
use keyway_core::flow::{FlowTable, FlowTimeouts};
use keyway_core::gue;
use keyway_core::key::{ClusterSecret, Key, KeyRing, MacKey, Rotation};
use keyway_core::packet::{self, PROTO_TCP, build};

const PACKET: usize = 1400;

fn inner_packet() -> Vec<u8> {
    let payload = vec![0xabu8; PACKET - 40];
    build::ipv4(
        [100, 64, 0, 1].into(),
        [100, 64, 0, 2].into(),
        PROTO_TCP,
        &build::ports(PROTO_TCP, 40000, 80, &payload),
    )
}

fn codec(c: &mut Criterion) {
    let inner = inner_packet();
    let mut g = c.benchmark_group("gue");
    g.throughput(Throughput::Bytes(inner.len() as u64));
    let mut out = vec![0u8; inner.len() + gue::HEADER_LEN];
    g.bench_function("baseline_copy", |b| {
        b.iter(|| {
            out[gue::HEADER_LEN..].copy_from_slice(black_box(&inner));
            black_box(&out);
        })
    });
    g.bench_function("encapsulate", |b| {
        b.iter(|| black_box(gue::encapsulate(Key(7), black_box(&inner), &mut out).unwrap()))
    });
    let mut inplace = vec![0u8; gue::HEADROOM];
    inplace.extend_from_slice(&inner);
    g.bench_function("encapsulate_in_place", |b| {
        b.iter(|| {
            black_box(gue::seal(Key(7), None, black_box(&mut inplace)).unwrap());
            black_box(&inplace);
        })
    });
    let mac = MacKey::from_bytes([7; 16]);
    g.bench_function("seal_with_mac", |b| {
        b.iter(|| {
            black_box(gue::seal(Key(7), Some(&mac), black_box(&mut inplace)).unwrap());
            black_box(&inplace);
        })
    });
    let sealed = inplace.clone();
    g.bench_function("decapsulate_and_check_mac", |b| {
        b.iter(|| {
            let d = black_box(&sealed[..]);
            let h = gue::decode(d).unwrap();
            black_box(gue::authentic(d, &h, &mac))
        })
    });
    let datagram = out.clone();
    g.bench_function("decapsulate", |b| {
        b.iter(|| black_box(gue::decode(black_box(&datagram)).unwrap()))
    });
    g.bench_function("classify", |b| {
        b.iter(|| black_box(packet::classify(black_box(&inner)).unwrap()))
    });
    g.finish();
}

fn route(i: u32) -> Route {
    Route {
        entity: format!("ns/pod-{i}").into(),
        identity: Identity(i),
        keys: KeyRing::Static(Key(i)),
        infra: "10.0.0.1:6080".parse().unwrap(),
        sap: None,
        outside: false,
    }
}

/// A FIB of `n` pod addresses (/32) plus a handful of node blocks (/24) and the overlay (/10), as
/// an agent holds them.
fn fib_of(n: u32) -> (Fib, Vec<IpAddr>) {
    let mut b = Fib::builder();
    let mut addrs = Vec::new();
    for i in 0..n {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + 1 + i);
        b.insert(
            ipnetwork::IpNetwork::new(IpAddr::V4(ip), 32).unwrap(),
            route(i),
        )
        .unwrap();
        addrs.push(IpAddr::V4(ip));
    }
    for blk in 0..8u8 {
        b.insert(
            format!("100.127.{blk}.0/24").parse().unwrap(),
            route(n + u32::from(blk)),
        )
        .unwrap();
    }
    b.insert("100.64.0.0/10".parse().unwrap(), route(n + 100))
        .unwrap();
    (b.build(), addrs)
}

fn fib(c: &mut Criterion) {
    let mut g = c.benchmark_group("fib_lookup");
    for n in [10u32, 10_000, 100_000] {
        let (fib, addrs) = fib_of(n);
        // Walk the table with a stride so lookups do not hit one cache line.
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                i = (i + 7919) % addrs.len();
                black_box(fib.lookup(black_box(addrs[i])))
            })
        });
    }
    g.finish();
}

/// `rules` allow rules spread over pairs of 100 identities, each naming a port: the policy a
/// cluster with that many rules compiles to.
fn acl_of(rules: u32) -> Acl {
    let mut b = Acl::builder();
    let ids: Vec<Identity> = (0..100)
        .map(|_| {
            b.identity(Isolation {
                ingress: true,
                egress: true,
            })
        })
        .collect();
    for r in 0..rules {
        let s = ids[(r % 100) as usize];
        let d = ids[((r / 100) % 100) as usize];
        let port = Some(PortRange::single(1000 + (r % 5000) as u16));
        b.egress(s, d).allow(PROTO_TCP, port);
        b.ingress(s, d).allow(PROTO_TCP, port);
    }
    b.build()
}

fn policy(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_check");
    for rules in [10u32, 10_000] {
        let acl = acl_of(rules);
        // Every query hits a rule that allows it, cycling through the rules: the same work per
        // packet in both cases, so only the table's size differs.
        let queries: Vec<_> = (0..rules)
            .map(|r| {
                let pkt = build::tcp4(
                    [100, 64, 0, 1],
                    40000,
                    [100, 64, 0, 2],
                    1000 + (r % 5000) as u16,
                );
                (
                    Identity(r % 100),
                    Identity((r / 100) % 100),
                    packet::classify(&pkt).unwrap(),
                )
            })
            .collect();
        assert!(queries.iter().all(|(s, d, p)| acl.allows(*s, *d, p)));
        // One flow's packets, as a busy endpoint mostly sees: algorithmic cost alone.
        let (s, d, p) = &queries[queries.len() / 2];
        g.bench_with_input(BenchmarkId::new("one_flow", rules), &rules, |b, _| {
            b.iter(|| black_box(acl.allows(*s, *d, black_box(p))))
        });
        // The same ten flows against either table: what the number of rules alone costs when
        // the traffic is the same.
        let ten: Vec<_> = queries
            .iter()
            .step_by(queries.len() / 10)
            .take(10)
            .collect();
        let mut k = 0usize;
        g.bench_with_input(BenchmarkId::new("ten_flows", rules), &rules, |b, _| {
            b.iter(|| {
                k = (k + 1) % ten.len();
                let (s, d, p) = ten[k];
                black_box(acl.allows(*s, *d, black_box(p)))
            })
        });
        // Every packet a different rule: adds the cache misses of a table that no longer fits.
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("spread", rules), &rules, |b, _| {
            b.iter(|| {
                i = (i + 7919) % queries.len();
                let (s, d, p) = &queries[i];
                black_box(acl.allows(*s, *d, black_box(p)))
            })
        });
    }
    g.finish();
}

fn engines(c: &mut Criterion) {
    let (fib, _) = fib_of(10_000);
    let mut acl = Acl::builder();
    for _ in 0..10_200 {
        acl.identity(Isolation::default());
    }
    let tables = Tables {
        fib,
        acl: acl.build(),
        saps: Default::default(),
        generation: 1,
        packet_auth: PacketAuth::Disabled,
    };
    let local = LocalEndpoint {
        entity: "ns/pod-0".into(),
        overlay_ips: vec!["100.64.0.1".parse().unwrap()],
        infra: "10.0.0.1:6080".parse().unwrap(),
        keys: KeyRing::Static(Key(0)),
        local_sap: None,
    };
    let flows = FlowTable::new(65536, FlowTimeouts::default());
    let inner = inner_packet();
    let mut buf = vec![0u8; gue::HEADROOM];
    buf.extend_from_slice(&inner);
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Bytes(inner.len() as u64));
    g.bench_function("endpoint_egress", |b| {
        b.iter(|| {
            black_box(
                engine::endpoint_egress(&tables, &local, &flows, black_box(&mut buf), 1).unwrap(),
            )
        })
    });
    let datagram = buf[gue::HEADROOM - gue::HEADER_LEN..].to_vec();
    let local_b = LocalEndpoint {
        entity: "ns/pod-1".into(),
        overlay_ips: vec!["100.64.0.2".parse().unwrap()],
        keys: KeyRing::Static(Key(1)),
        ..local.clone()
    };
    let from = "10.0.0.1:6080".parse().unwrap();
    g.bench_function("endpoint_ingress", |b| {
        b.iter(|| {
            black_box(
                engine::endpoint_ingress(&tables, &local_b, &flows, black_box(&datagram), from, 1)
                    .unwrap(),
            )
        })
    });
    g.bench_function("sap_forward", |b| {
        b.iter(|| black_box(engine::sap_forward(&tables, black_box(&datagram), from, 1).unwrap()))
    });
    g.finish();
}

/// Packet authentication's cost on the engines: the same two pods, keys derived from a cluster
/// secret (a static key has no MAC key), with authentication off (the baseline) and strict.
fn packet_auth(c: &mut Criterion) {
    let secret = ClusterSecret::new(vec![7u8; 32]).expect("long enough");
    let rotation = Rotation::default();
    let now = 1_000_000;
    let mut acl = Acl::builder();
    let ids = [
        acl.identity(Isolation::default()),
        acl.identity(Isolation::default()),
    ];
    let mut fib = Fib::builder();
    for (i, id) in ids.iter().enumerate() {
        let entity = format!("ns/pod-{i}");
        let keys = KeyRing::derive(&secret, &entity, rotation, now);
        let r = Route {
            entity: entity.into(),
            identity: *id,
            keys,
            infra: format!("10.0.0.{}:6080", i + 1).parse().unwrap(),
            sap: None,
            outside: false,
        };
        let overlay = format!("100.64.0.{}/32", i + 1).parse().unwrap();
        fib.insert(overlay, r).unwrap();
    }
    let mut tables = Tables {
        fib: fib.build(),
        acl: acl.build(),
        saps: Default::default(),
        generation: 1,
        packet_auth: PacketAuth::Disabled,
    };
    let endpoint = |i: u32| LocalEndpoint {
        entity: format!("ns/pod-{i}").into(),
        overlay_ips: vec![format!("100.64.0.{}", i + 1).parse().unwrap()],
        infra: format!("10.0.0.{}:6080", i + 1).parse().unwrap(),
        keys: KeyRing::derive(&secret, &format!("ns/pod-{i}"), rotation, now),
        local_sap: None,
    };
    let (a, b) = (endpoint(0), endpoint(1));
    let flows = FlowTable::new(65536, FlowTimeouts::default());
    let inner = inner_packet();
    let mut g = c.benchmark_group("packet_auth");
    g.throughput(Throughput::Bytes(inner.len() as u64));
    for (name, mode) in [
        ("off", PacketAuth::Disabled),
        ("strict", PacketAuth::Strict),
    ] {
        tables.packet_auth = mode;
        let mut buf = vec![0u8; gue::HEADROOM];
        buf.extend_from_slice(&inner);
        g.bench_function(format!("endpoint_egress_{name}"), |bn| {
            bn.iter(|| {
                let send = engine::endpoint_egress(&tables, &a, &flows, black_box(&mut buf), now);
                black_box(send.unwrap())
            })
        });
        let start = engine::endpoint_egress(&tables, &a, &flows, &mut buf, now)
            .unwrap()
            .start;
        let datagram = buf[start..].to_vec();
        let from = a.infra;
        g.bench_function(format!("endpoint_ingress_{name}"), |bn| {
            bn.iter(|| {
                let d = black_box(&datagram[..]);
                black_box(engine::endpoint_ingress(&tables, &b, &flows, d, from, now).unwrap())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, codec, fib, policy, engines, packet_auth);
criterion_main!(benches);
