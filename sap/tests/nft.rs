//! The nf_tables encoder against the kernel: a table built here must be accepted and must read back
//! through `nft list` as the rules we meant.

use keyway_sap::io::nft::{Chain, Family, Hook, Policy, Rule, Socket, Table, Verdict, ct_state};
use keyway_testing::{TestNetns, privileged};

fn table() -> Table {
    Table {
        family: Family::Inet,
        name: "keyway".into(),
        chains: vec![
            Chain {
                name: "input".into(),
                hook: Some((Hook::Input, -10, Policy::Accept)),
                rules: vec![
                    Rule::new().iifname("lo").accept().comment("loopback"),
                    Rule::new()
                        .ct_state(ct_state::ESTABLISHED | ct_state::RELATED)
                        .accept(),
                    Rule::new().l4proto(17).dport_range(6080, 6080).accept(),
                    Rule::new().saddr("10.244.1.1/32".parse().unwrap()).accept(),
                    Rule::new().saddr("fd00::/64".parse().unwrap()).accept(),
                    Rule::new().l4proto(58).icmp_type_range(133, 137).accept(),
                    Rule::new().counter().drop_(),
                ],
            },
            Chain {
                name: "output".into(),
                hook: Some((Hook::Output, -10, Policy::Accept)),
                rules: vec![
                    Rule::new().mark(0x6b77).l4proto(17).sport(6080).accept(),
                    Rule::new().verdict(Verdict::Jump("egress".into())),
                ],
            },
            Chain {
                name: "egress".into(),
                hook: None,
                rules: vec![
                    Rule::new()
                        .daddr("192.168.0.0/16".parse().unwrap())
                        .l4proto(6)
                        .dport_range(80, 81)
                        .accept(),
                    Rule::new()
                        .daddr("192.168.5.0/24".parse().unwrap())
                        .verdict(Verdict::Return),
                ],
            },
        ],
    }
}

#[test]
fn tables_round_trip_through_the_kernel() {
    if !privileged("nft_round_trip") {
        return;
    }
    let ns = TestNetns::new("nftrt", "a");
    let mut sock = ns.netns().run(Socket::open).unwrap().unwrap();
    assert!(!sock.table_exists(Family::Inet, "keyway").unwrap());
    sock.replace_table(&table()).unwrap();
    assert!(sock.table_exists(Family::Inet, "keyway").unwrap());

    let listed = ns.sh(&["nft", "list", "table", "inet", "keyway"]);
    for expected in [
        "type filter hook input priority filter - 10; policy accept;",
        "iifname \"lo\" accept comment \"loopback\"",
        "ct state established,related accept",
        "udp dport 6080 accept",
        "ip saddr 10.244.1.1 accept",
        "ip6 saddr fd00::/64 accept",
        "icmpv6 type 133-137 accept",
        "counter packets 0 bytes 0 drop",
        "meta mark 0x00006b77 udp sport 6080 accept",
        "jump egress",
        "ip daddr 192.168.0.0/16 tcp dport 80-81 accept",
        "ip daddr 192.168.5.0/24 return",
    ] {
        assert!(
            listed.contains(expected),
            "missing {expected:?} in:\n{listed}"
        );
    }

    // Replacing is atomic and idempotent: the same table again gives the same listing.
    sock.replace_table(&table()).unwrap();
    assert_eq!(ns.sh(&["nft", "list", "table", "inet", "keyway"]), listed);

    // One chain's rules are replaced without touching the others.
    sock.replace_chain_rules(
        Family::Inet,
        "keyway",
        "egress",
        &[Rule::new().counter().drop_()],
    )
    .unwrap();
    let listed = ns.sh(&["nft", "list", "chain", "inet", "keyway", "egress"]);
    assert!(
        listed.contains("counter packets 0 bytes 0 drop"),
        "{listed}"
    );
    assert!(!listed.contains("192.168"), "{listed}");

    // Deleting is idempotent.
    assert!(sock.delete_table(Family::Inet, "keyway").unwrap());
    assert!(!sock.delete_table(Family::Inet, "keyway").unwrap());
    assert_eq!(ns.sh(&["nft", "list", "tables"]).trim(), "");
}

#[test]
fn refusals_name_the_operation() {
    if !privileged("nft_refusals") {
        return;
    }
    let ns = TestNetns::new("nftref", "a");
    let mut sock = ns.netns().run(Socket::open).unwrap().unwrap();
    // A jump to a chain that does not exist is refused, and nothing of the batch remains.
    let bad = Table {
        family: Family::Inet,
        name: "keyway".into(),
        chains: vec![Chain {
            name: "input".into(),
            hook: Some((Hook::Input, 0, Policy::Accept)),
            rules: vec![Rule::new().verdict(Verdict::Jump("missing".into()))],
        }],
    };
    let err = sock.replace_table(&bad).unwrap_err();
    assert!(
        err.to_string().contains("add rule to keyway input"),
        "{err}"
    );
    assert!(
        !sock.table_exists(Family::Inet, "keyway").unwrap(),
        "transaction rolled back"
    );
}
