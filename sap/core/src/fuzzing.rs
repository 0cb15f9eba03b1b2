//! The checks the fuzz targets make, on arbitrary input: shared by the libFuzzer targets
//! (`sap/core/fuzz/`, `make fuzz`) and the short runs in `make test`
//! (`conformance/tests/fuzz.rs`), so the two never drift.

use std::sync::OnceLock;

use crate::acl::{Acl, Isolation};
use crate::engine::{self, LocalEndpoint, Tables};
use crate::fib::{Fib, Route};
use crate::flow::{FlowTable, FlowTimeouts};
use crate::key::{Key, KeyRing};
use crate::packet::{Transport, classify};

/// Packet classification: never panics; what it accepts is consistent with the bytes.
pub fn classify_packet(data: &[u8]) {
    if let Ok(c) = classify(data) {
        assert_eq!(c.src.is_ipv4(), data[0] >> 4 == 4);
        if c.opens_flow {
            assert!(matches!(
                c.transport,
                Transport::Ports { .. } | Transport::Echo { reply: false, .. }
            ));
        }
    }
}

struct World {
    tables: Tables,
    local: LocalEndpoint,
    flows: FlowTable,
}

/// Two endpoints, `a` (key 1) and `b` (key 2, served here), IPv4 and IPv6.
fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let mut acl = Acl::builder();
        let a = acl.identity(Isolation::default());
        let b = acl.identity(Isolation::default());
        let mut fib = Fib::builder();
        for (net, id, key, infra) in [
            ("100.64.0.1/32", a, 1, "10.0.0.1:6080"),
            ("100.64.0.2/32", b, 2, "10.0.0.2:6080"),
            ("fd00::2/128", b, 2, "10.0.0.2:6080"),
        ] {
            fib.insert(
                net.parse().expect("valid"),
                Route {
                    entity: "x".into(),
                    identity: id,
                    keys: KeyRing::Static(Key(key)),
                    infra: infra.parse().expect("valid"),
                    sap: None,
                    outside: false,
                },
            )
            .expect("distinct prefixes");
        }
        World {
            tables: Tables {
                fib: fib.build(),
                acl: acl.build(),
                ..Default::default()
            },
            local: LocalEndpoint {
                entity: "b".into(),
                overlay_ips: vec![
                    "100.64.0.2".parse().expect("valid"),
                    "fd00::2".parse().expect("valid"),
                ],
                infra: "10.0.0.2:6080".parse().expect("valid"),
                keys: KeyRing::Static(Key(2)),
                local_sap: None,
            },
            flows: FlowTable::new(1024, FlowTimeouts::default()),
        }
    })
}

/// Any datagram from the underlay through GUE decoding and the whole ingress and SaP paths: an
/// action or a drop reason, never a panic, and never an accepted datagram whose key is not the
/// destination's.
pub fn gue_decapsulate(data: &[u8]) {
    let w = world();
    let from = "10.0.0.1:6080".parse().expect("valid");
    let header = crate::gue::decode(data);
    if let Ok(range) = engine::endpoint_ingress(&w.tables, &w.local, &w.flows, data, from, 0) {
        assert_eq!(header.expect("accepted datagrams decode").key, Key(2));
        assert!(range.end <= data.len());
    }
    let _ = engine::sap_forward(&w.tables, data, from, 0);
}
