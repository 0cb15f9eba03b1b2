//! The nf_tables encoder against the kernel: a table built here must be accepted and must read back
//! through `nft list` as the rules we meant.

use std::net::IpAddr;

use keyway_sap::io::nft::{
    Chain, ChainKind, Family, Hook, Policy, Rule, Set, Socket, Table, Verdict, ct_state,
};
use keyway_testing::{TestNetns, privileged};

fn peers(n: u32) -> Set {
    let elements = (0..n)
        .map(|i| IpAddr::V4((0x0af4_0000 + i).into()))
        .collect();
    Set::of("peers4", false, 1, elements)
}

fn table() -> Table {
    let peers4 = peers(3);
    let peers6 = Set::of("peers6", true, 2, vec!["fd00::1".parse().unwrap()]);
    let steer = Chain {
        kind: ChainKind::Route,
        ..Chain::base(
            "steer",
            Hook::Output,
            -150,
            Policy::Accept,
            vec![
                Rule::new().daddr_in(&peers4).or_mark(0x10000),
                Rule::new().daddr_in(&peers6).or_mark(0x10000),
                Rule::new().mark_bits(0x10000).counter().accept(),
            ],
        )
    };
    Table {
        family: Family::Inet,
        name: "keyway".into(),
        sets: vec![peers4, peers6],
        chains: vec![
            Chain::base(
                "input",
                Hook::Input,
                -10,
                Policy::Accept,
                vec![
                    Rule::new().iifname("lo").accept().comment("loopback"),
                    Rule::new().ipv6_reverse_path_fails().counter().drop_(),
                    Rule::new()
                        .ct_state(ct_state::ESTABLISHED | ct_state::RELATED)
                        .accept(),
                    Rule::new().l4proto(17).dport_range(6080, 6080).accept(),
                    Rule::new().saddr("10.244.1.1/32".parse().unwrap()).accept(),
                    Rule::new().saddr("fd00::/64".parse().unwrap()).accept(),
                    Rule::new().l4proto(58).icmp_type_range(133, 137).accept(),
                    Rule::new().counter().drop_(),
                ],
            ),
            Chain::base(
                "output",
                Hook::Output,
                -10,
                Policy::Accept,
                vec![
                    Rule::new().mark(0x6b77).l4proto(17).sport(6080).accept(),
                    Rule::new().verdict(Verdict::Jump("egress".into())),
                ],
            ),
            Chain::regular(
                "egress",
                vec![
                    Rule::new()
                        .daddr("192.168.0.0/16".parse().unwrap())
                        .l4proto(6)
                        .dport_range(80, 81)
                        .accept(),
                    Rule::new()
                        .daddr("192.168.5.0/24".parse().unwrap())
                        .verdict(Verdict::Return),
                ],
            ),
            steer,
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
        "meta nfproto ipv6 fib saddr . iif oif 0 counter packets 0 bytes 0 drop",
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
        "type ipv4_addr",
        "elements = { 10.244.0.0, 10.244.0.1,",
        "10.244.0.2 }",
        "type ipv6_addr",
        "elements = { fd00::1 }",
        "type route hook output priority mangle; policy accept;",
        "ip daddr @peers4 meta mark set meta mark | 0x00010000",
        "ip6 daddr @peers6 meta mark set meta mark | 0x00010000",
        "meta mark & 0x00010000 == 0x00010000 counter packets 0 bytes 0 accept",
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
        sets: vec![],
        chains: vec![Chain::base(
            "input",
            Hook::Input,
            0,
            Policy::Accept,
            vec![Rule::new().verdict(Verdict::Jump("missing".into()))],
        )],
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

#[test]
fn a_large_set_and_many_rules_go_in_one_transaction() {
    if !privileged("nft_large_set") {
        return;
    }
    let ns = TestNetns::new("nftbig", "a");
    let mut sock = ns.netns().run(Socket::open).unwrap().unwrap();
    let set = peers(20_000);
    let table = Table {
        family: Family::Inet,
        name: "keyway".into(),
        sets: vec![set.clone()],
        chains: vec![Chain::base(
            "output",
            Hook::Output,
            0,
            Policy::Accept,
            vec![Rule::new().daddr_in(&set).counter().accept()],
        )],
    };
    sock.replace_table(&table).unwrap();
    // Thousands of messages in one batch (a rule each): answered without overflowing the socket.
    let many = Table {
        chains: vec![Chain::regular(
            "many",
            (0..5000u16)
                .map(|p| Rule::new().l4proto(6).dport_range(p, p).accept())
                .collect(),
        )],
        ..table.clone()
    };
    sock.update_table(&table, &many).unwrap();
    let listed = ns.sh(&["nft", "list", "chain", "inet", "keyway", "many"]);
    assert_eq!(listed.matches(" accept").count(), 5000);
    let listed = ns.sh(&["nft", "list", "set", "inet", "keyway", "peers4"]);
    assert_eq!(
        listed.matches("10.244.").count(),
        20_000,
        "every element, once"
    );
}

/// A Service-translation table: a nat chain choosing among endpoints at random or by a dynamic
/// set of recent clients, marking the connection, and translating.
fn services(endpoints: &[(&str, u16)]) -> Table {
    let mut choose = Vec::new();
    let mut chains = Vec::new();
    let mut sets = Vec::new();
    for (i, (addr, port)) in endpoints.iter().enumerate() {
        let addr: IpAddr = addr.parse().unwrap();
        let set = Set::dynamic(&format!("aff-{addr}"), false, i as u32 + 1);
        let chain = format!("ep-{addr}:{port}");
        choose.insert(
            0,
            Rule::new()
                .saddr_in(&set)
                .verdict(Verdict::Goto(chain.clone())),
        );
        chains.push(Chain::regular(
            &chain,
            vec![
                Rule::new().remember_saddr(&set, 10_800),
                Rule::new().or_ct_mark(0x40_0000).or_mark(0x40_0000),
                Rule::new().l4proto(6).dnat(addr, *port),
            ],
        ));
        let n = (endpoints.len() - i) as u32;
        choose.push(Rule::new().random_is(n, 0).verdict(Verdict::Goto(chain)));
        sets.push(set);
    }
    chains.push(Chain::regular("svc", choose));
    chains.push(Chain::hooked(
        ChainKind::Nat,
        "services",
        Hook::Output,
        -100,
        vec![
            Rule::new()
                .daddr_is("10.96.0.10".parse().unwrap())
                .l4proto(6)
                .dport_range(80, 80)
                .verdict(Verdict::Jump("svc".into())),
        ],
    ));
    chains.push(Chain::hooked(
        ChainKind::Route,
        "steer",
        Hook::Output,
        -150,
        vec![Rule::new().ct_mark_bits(0x40_0000).or_mark(0x40_0000)],
    ));
    Table {
        family: Family::Inet,
        name: "svc".into(),
        sets,
        chains,
    }
}

#[test]
fn nat_tables_update_in_place_and_keep_what_rules_remembered() {
    if !privileged("nft_nat") {
        return;
    }
    let ns = TestNetns::new("nftnat", "a");
    let mut sock = ns.netns().run(Socket::open).unwrap().unwrap();
    let two = services(&[("10.244.1.2", 8080), ("10.244.2.2", 8081)]);
    sock.replace_table(&two).unwrap();
    let listed = ns.sh(&["nft", "list", "table", "inet", "svc"]);
    for expected in [
        "type nat hook output priority -100; policy accept;",
        "ip daddr 10.96.0.10 tcp dport 80 jump svc",
        "ip saddr @aff-10.244.1.2 goto ep-10.244.1.2:8080",
        "numgen random mod 2 0 goto ep-10.244.1.2:8080",
        "numgen random mod 1 0 goto ep-10.244.2.2:8081",
        "update @aff-10.244.1.2 { ip saddr timeout 3h }",
        "ct mark set ct mark | 0x00400000 meta mark set meta mark | 0x00400000",
        "dnat ip to 10.244.2.2:8081",
        "type ipv4_addr",
        "flags dynamic,timeout",
        "ct mark & 0x00400000 == 0x00400000 meta mark set meta mark | 0x00400000",
    ] {
        assert!(
            listed.contains(expected),
            "missing {expected:?} in:\n{listed}"
        );
    }

    // What a rule remembered (here added by hand, as `update` would) survives an update that
    // keeps its set, and goes with a set the update drops.
    for ep in ["10.244.1.2", "10.244.2.2"] {
        let set = format!("aff-{ep}");
        ns.sh(&[
            "nft",
            "add",
            "element",
            "inet",
            "svc",
            &set,
            "{ 10.0.0.7 timeout 1h }",
        ]);
    }
    let one = services(&[("10.244.2.2", 8081)]);
    sock.update_table(&two, &one).unwrap();
    let listed = ns.sh(&["nft", "list", "table", "inet", "svc"]);
    assert!(
        !listed.contains("10.244.1.2"),
        "the endpoint is gone:\n{listed}"
    );
    assert!(
        listed.contains("numgen random mod 1 0 goto ep-10.244.2.2:8081"),
        "{listed}"
    );
    let kept = ns.sh(&["nft", "list", "set", "inet", "svc", "aff-10.244.2.2"]);
    assert!(
        kept.contains("10.0.0.7"),
        "the kept set keeps its element:\n{kept}"
    );

    // And back: the endpoint returns with an empty set; updating to the same table is a no-op.
    sock.update_table(&one, &two).unwrap();
    sock.update_table(&two, &two).unwrap();
    let back = ns.sh(&["nft", "list", "set", "inet", "svc", "aff-10.244.1.2"]);
    assert!(!back.contains("10.0.0.7"), "{back}");
    let kept = ns.sh(&["nft", "list", "set", "inet", "svc", "aff-10.244.2.2"]);
    assert!(kept.contains("10.0.0.7"), "{kept}");
}

#[test]
fn a_bridge_table_hands_marked_frames_to_the_bridge() {
    if !privileged("a_bridge_table_hands_marked_frames_to_the_bridge") {
        return;
    }
    let ns = TestNetns::new("nftbr", "a");
    let mut sock = ns.netns().run(Socket::open).unwrap().unwrap();
    let mac = [0x02, 0, 0, 0, 0, 0x01];
    for (what, rule) in [
        ("mark", Rule::new().mark_bits(0x20_0000).counter()),
        ("deliver", Rule::new().deliver_to_bridge(mac)),
        (
            "both",
            Rule::new()
                .iifname("veth1")
                .mark_bits(0x20_0000)
                .deliver_to_bridge(mac)
                .comment("to the bridge"),
        ),
    ] {
        let t = Table {
            family: Family::Bridge,
            name: "kw-bridge".into(),
            sets: vec![],
            chains: vec![Chain::base(
                "prerouting",
                Hook::Prerouting,
                100,
                Policy::Accept,
                vec![rule],
            )],
        };
        sock.replace_table(&t)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    let listed = ns.sh(&["nft", "list", "table", "bridge", "kw-bridge"]);
    assert!(
        listed.contains("ether daddr set 02:00:00:00:00:01")
            && listed.contains("meta pkttype set host")
            && listed.contains("iifname \"veth1\""),
        "{listed}"
    );
}

#[test]
fn ipv6_sources_routed_elsewhere_are_dropped_where_they_arrive() {
    if !privileged("nft_ipv6_rpf") {
        return;
    }
    // The pod: its network on a veth; an overlay prefix routed into another device (a TUN).
    let pod = TestNetns::new("nftrpf", "pod");
    let peer = TestNetns::new("nftrpf", "peer");
    keyway_testing::netns::veth(&pod, "eth0", "fd01::1/64", &peer, "p0", "fd01::2/64");
    pod.sh(&["ip", "tuntap", "add", "kw0", "mode", "tun"]);
    pod.sh(&["ip", "link", "set", "kw0", "up"]);
    pod.sh(&["ip", "-6", "route", "add", "fd00:64::/64", "dev", "kw0"]);
    // The peer can claim an overlay address as its source.
    peer.sh(&["ip", "addr", "add", "fd00:64::5/128", "dev", "p0", "nodad"]);
    let table = Table {
        family: Family::Inet,
        name: "keyway".into(),
        sets: Vec::new(),
        chains: vec![Chain::base(
            "input",
            Hook::Input,
            -10,
            Policy::Accept,
            vec![
                Rule::new().l4proto(58).icmp_type_range(135, 136).accept(),
                Rule::new()
                    .ipv6_reverse_path_fails()
                    .counter()
                    .drop_()
                    .comment("rpf"),
                Rule::new().counter().accept().comment("admitted"),
            ],
        )],
    };
    let mut sock = pod.netns().run(Socket::open).unwrap().unwrap();
    sock.replace_table(&table).unwrap();
    let ping = |src: &str| {
        peer.exec(&["ping", "-6", "-c", "1", "-W", "1", "-I", src, "fd01::1"])
            .status
            .success()
    };
    // Addresses are tentative until duplicate detection ends (about a second on a new link).
    let reached = (0..30).any(|_| {
        ping("fd01::2") || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            false
        }
    });
    assert!(reached, "a source routed back through eth0 is admitted");
    let count = |comment: &str| {
        let listed = pod.sh(&["nft", "list", "chain", "inet", "keyway", "input"]);
        listed
            .lines()
            .find(|l| l.contains(comment))
            .and_then(|l| l.split("packets ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no counter {comment:?} in {listed}"))
    };
    let (admitted, dropped) = (count("admitted"), count("rpf"));
    // The pod's reply would go into kw0 anyway; what counts is that the request never got in.
    let _ = ping("fd00:64::5");
    assert_eq!(
        count("admitted"),
        admitted,
        "a source the pod routes into its overlay device is not admitted on eth0"
    );
    assert!(count("rpf") > dropped, "it is dropped, and counted");
}
