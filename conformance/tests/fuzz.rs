//! The short fuzz runs of `make test`: each decoder that takes outside input, with the checks of
//! its libFuzzer target (`make fuzz` runs those for as long as asked), over inputs mutated from
//! real ones by `keyway_testing::fuzz`. The CNI configuration's run is the plugin's own test
//! (`cni-plugin/src/config.rs`), the plugin being a binary.

use std::path::Path;

use keyway_core::gue;
use keyway_core::key::Key;
use keyway_core::packet::{self, PROTO_UDP, build};
use keyway_testing::fuzz;

/// Inner packets of each kind classification tells apart.
fn packets() -> Vec<Vec<u8>> {
    let (a, b) = ([100, 64, 0, 1], [100, 64, 0, 2]);
    vec![
        build::syn4(a, 40000, b, 80),
        build::tcp4(a, 40000, b, 80),
        build::rst4(a, 40000, b, 80),
        build::ipv4(
            a.into(),
            b.into(),
            PROTO_UDP,
            &build::ports(PROTO_UDP, 5, 53, b"q"),
        ),
        build::ipv4(
            a.into(),
            b.into(),
            packet::PROTO_ICMP,
            &build::echo(false, false, 1, 1),
        ),
        build::ipv6(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            packet::PROTO_ICMPV6,
            &build::echo(true, false, 1, 1),
        ),
    ]
}

#[test]
fn classification_takes_any_packet() {
    fuzz::run(
        "classify",
        &packets(),
        1_000_000,
        keyway_core::fuzzing::classify_packet,
    );
}

#[test]
fn gue_and_the_ingress_and_sap_paths_take_any_datagram() {
    let datagrams: Vec<Vec<u8>> = packets()
        .iter()
        .flat_map(|p| {
            [Key(2), Key(1)].map(|k| {
                let mut out = vec![0u8; p.len() + 64];
                let n = gue::encapsulate(k, p, &mut out).expect("fits");
                out.truncate(n);
                out
            })
        })
        .collect();
    fuzz::run(
        "gue_decapsulate",
        &datagrams,
        1_000_000,
        keyway_core::fuzzing::gue_decapsulate,
    );
}

#[test]
fn the_handoff_decoder_takes_any_record() {
    // Descriptor count, shape (even: framed, type index = shape / 2), body.
    let seeds: [&[u8]; 4] = [
        b"\x00\x04{\"attachment\":{\"containerId\":\"c1\",\"ifname\":\"eth0\"}}",
        b"\x01\x02{\"attachment\":{\"containerId\":\"c1\",\"ifname\":\"eth0\"},\"pod\":{\"namespace\":\"ns\",\"name\":\"p\",\"uid\":\"u\"},\"netnsPath\":\"/var/run/netns/x\",\"infraIp\":\"10.0.0.5\",\"mtu\":1450,\"networks\":[]}",
        b"\x00\x0c",
        b"\x00\x0e{\"error\":{\"code\":11,\"message\":\"not ready\"}}",
    ];
    fuzz::run(
        "handoff_decode",
        &seeds,
        1_000_000,
        keyway_protocol::fuzzing::handoff_decode,
    );
}

#[test]
fn the_file_source_takes_any_text() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let files = [
        "conformance/netpol/base.yaml",
        "conformance/netpol/paper-topology.yaml",
        "examples/paper-topology.yaml",
    ];
    let texts: Vec<Vec<u8>> = files
        .iter()
        .filter_map(|f| std::fs::read(root.join(f)).ok())
        .collect();
    assert!(!texts.is_empty(), "seed documents under {}", root.display());
    fuzz::run(
        "file_source",
        &texts,
        20_000,
        keyway_agent::fuzzing::file_source,
    );
}
