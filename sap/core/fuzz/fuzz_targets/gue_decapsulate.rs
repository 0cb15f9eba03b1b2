//! Any datagram from the underlay goes through GUE decoding and the whole ingress and SaP paths:
//! they must return an action or a drop reason, never panic, and never accept a datagram whose
//! key is not the destination's.
#![no_main]

use std::sync::OnceLock;

use keyway_core::acl::{Acl, Isolation};
use keyway_core::engine::{self, LocalEndpoint, Tables};
use keyway_core::fib::{Fib, Route};
use keyway_core::flow::{FlowTable, FlowTimeouts};
use keyway_core::key::{Key, KeyRing};
use libfuzzer_sys::fuzz_target;

struct World {
    tables: Tables,
    local: LocalEndpoint,
    flows: FlowTable,
}

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
                net.parse().unwrap(),
                Route {
                    entity: "x".into(),
                    identity: id,
                    keys: KeyRing::Static(Key(key)),
                    infra: infra.parse().unwrap(),
                    sap: None,
                    outside: false,
                },
            )
            .unwrap();
        }
        World {
            tables: Tables {
                fib: fib.build(),
                acl: acl.build(),
                ..Default::default()
            },
            local: LocalEndpoint {
                entity: "b".into(),
                overlay_ips: vec!["100.64.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
                infra: "10.0.0.2:6080".parse().unwrap(),
                keys: KeyRing::Static(Key(2)),
                local_sap: None,
            },
            flows: FlowTable::new(1024, FlowTimeouts::default()),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let from = "10.0.0.1:6080".parse().unwrap();
    let header = keyway_core::gue::decode(data);
    if let Ok(range) = engine::endpoint_ingress(&w.tables, &w.local, &w.flows, data, from, 0) {
        assert_eq!(header.expect("accepted datagrams decode").key, Key(2));
        assert!(range.end <= data.len());
    }
    let _ = engine::sap_forward(&w.tables, data, from, 0);
});
