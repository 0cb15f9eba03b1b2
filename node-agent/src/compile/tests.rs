//! The compiler's own tests: each stage, and NetworkPolicy's semantics on a small cluster of four
//! pods on two nodes, checked on the compiled tables as the data path reads them.

use std::net::{IpAddr, Ipv4Addr};

use keyway_core::key::ClusterSecret;
use keyway_core::packet::{self, PROTO_TCP, PROTO_UDP};

use super::*;
use crate::model::{Object, OverlayAttachmentSpec};

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: red}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {team: blue}}
---
apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
---
apiVersion: keyway.io/v1alpha1
kind: OverlayBlock
metadata: {name: default-1}
spec: {network: default, index: 1, node: node-2}
---
apiVersion: keyway.io/v1alpha1
kind: OverlayBlock
metadata: {name: default-3}
spec: {network: default, index: 3, node: node-2}
"#;

/// x/a (served here, on node-1), x/b, x/c and y/a (on node-2); every pod serves `http` on 8080.
const PODS: [(&str, &str, &str, &str, &str); 4] = [
    ("x", "a", "node-1", "100.64.0.1", "10.244.1.1"),
    ("x", "b", "node-2", "100.64.1.1", "10.244.2.1"),
    ("x", "c", "node-2", "100.64.1.2", "10.244.2.2"),
    ("y", "a", "node-2", "100.64.1.3", "10.244.2.3"),
];

fn pod_doc(ns: &str, name: &str, node: &str, infra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{pod: {name}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
         status: {{podIPs: [{{ip: {infra}}}]}}\n"
    )
}

fn node() -> NodeContext {
    NodeContext {
        node_name: "node-1".into(),
        local_sap: Some("192.168.0.1:6080".parse().unwrap()),
        gue_port: 6080,
        rotation: Rotation::default(),
    }
}

/// The cluster secret of the tests: the agents that published the attachments held it.
fn secret() -> ClusterSecret {
    ClusterSecret::new(vec![7u8; 32]).unwrap()
}

/// The cluster with `extra` documents, compiled on node-1.
fn compiled(extra: &str) -> (Model, Compiled) {
    compiled_with(extra, Vec::new())
}

/// The cluster with `extra` documents and `more` objects, compiled on node-1.
fn compiled_with(extra: &str, more: Vec<Object>) -> (Model, Compiled) {
    let mut text = BASE.to_string();
    for (ns, name, node, _, infra) in PODS {
        text.push_str("---\n");
        text.push_str(&pod_doc(ns, name, node, infra));
    }
    text.push_str("---\n");
    text.push_str(extra);
    let mut objects = crate::source::parse_file(&text).unwrap();
    for (ns, name, node, overlay, infra) in PODS.iter().skip(1) {
        objects.push(Object::OverlayAttachment(
            OverlayAttachmentSpec {
                namespace: ns.to_string(),
                pod: name.to_string(),
                node: node.to_string(),
                infra_ip: infra.parse().unwrap(),
                overlay_ips: vec![overlay.parse().unwrap()],
                proof: None,
            }
            .attest(&secret()),
        ));
    }
    objects.extend(more);
    let model = Model::from_objects(objects);
    let (ns, name, _, overlay, infra) = PODS[0];
    let key = ObjectKey::new(ns, name);
    let local = LocalPod {
        entity: pod_entity(&key),
        pod: Some(key),
        overlay_ips: vec![overlay.parse().unwrap()],
        infra_ip: infra.parse().unwrap(),
    };
    let mut keys = KeyCache::new(secret());
    let c = compile(&model, &[local], &node(), &mut keys, 0, 1);
    (model, c)
}

fn overlay(ns: &str, name: &str) -> Ipv4Addr {
    let p = PODS.iter().find(|p| p.0 == ns && p.1 == name).unwrap();
    p.3.parse().unwrap()
}

/// Whether the tables let a new connection from one pod to another on `proto`/`port`.
fn allows(c: &Compiled, from: (&str, &str), to: (&str, &str), proto: u8, port: u16) -> bool {
    let (s, d) = (overlay(from.0, from.1), overlay(to.0, to.1));
    let pkt = match proto {
        PROTO_TCP => packet::build::syn4(s.octets(), 40000, d.octets(), port),
        _ => packet::build::ipv4(s, d, proto, &packet::build::ports(proto, 40000, port, b"x")),
    };
    let k = packet::classify(&pkt).unwrap();
    let id = |ip| c.tables.fib.lookup(ip).unwrap().identity;
    c.tables.acl.allows(id(k.src), id(k.dst), &k)
}

const XA: (&str, &str) = ("x", "a");
const XB: (&str, &str) = ("x", "b");
const XC: (&str, &str) = ("x", "c");
const YA: (&str, &str) = ("y", "a");

fn policy(ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: {ns}}}\nspec: {spec}\n"
    )
}

#[test]
fn a_pod_no_policy_selects_is_open_and_a_deny_all_isolates_only_what_it_selects() {
    let (_, open) = compiled("");
    assert!(allows(&open, XA, XB, PROTO_TCP, 80));
    assert!(allows(&open, YA, XB, PROTO_UDP, 53));
    let (_, c) = compiled(&policy("x", "{podSelector: {matchLabels: {pod: b}}}"));
    assert!(
        !allows(&c, XA, XB, PROTO_TCP, 80),
        "x/b is ingress-isolated"
    );
    assert!(allows(&c, XB, XA, PROTO_TCP, 80), "its egress is not");
    assert!(allows(&c, XA, XC, PROTO_TCP, 80), "x/c is not selected");
}

#[test]
fn peers_by_namespace_and_pod_selector_are_anded() {
    let (_, c) = compiled(&policy(
        "x",
        "{podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}, podSelector: {matchLabels: {pod: a}}}]}]}",
    ));
    assert!(
        allows(&c, YA, XB, PROTO_TCP, 80),
        "y/a: team blue and pod a"
    );
    assert!(
        !allows(&c, XA, XB, PROTO_TCP, 80),
        "x/a: pod a, but team red"
    );
    let (_, c) = compiled(&policy(
        "x",
        "{podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}, {podSelector: {matchLabels: {pod: a}}}]}]}",
    ));
    assert!(allows(&c, YA, XB, PROTO_TCP, 80), "either peer");
    assert!(
        allows(&c, XA, XB, PROTO_TCP, 80),
        "a pod selector alone means the policy's namespace"
    );
    assert!(!allows(&c, XC, XB, PROTO_TCP, 80));
}

#[test]
fn ports_by_number_range_and_name_resolve_against_the_destination() {
    let (_, c) = compiled(&policy(
        "x",
        "{podSelector: {matchLabels: {pod: b}}, ingress: [{ports: [{port: http}, {protocol: UDP, port: 1000, endPort: 1010}]}]}",
    ));
    assert!(allows(&c, XA, XB, PROTO_TCP, 8080), "http is 8080 on x/b");
    assert!(!allows(&c, XA, XB, PROTO_TCP, 80));
    assert!(allows(&c, XA, XB, PROTO_UDP, 1005));
    assert!(!allows(&c, XA, XB, PROTO_UDP, 1011));
    assert!(!allows(&c, XA, XB, PROTO_TCP, 1005), "the range is UDP's");
}

#[test]
fn ip_blocks_hold_pods_by_their_pod_ip_whatever_their_overlay_address() {
    let (_, c) = compiled(&policy(
        "x",
        "{podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.2/32]}}]}]}",
    ));
    assert!(
        allows(&c, XA, XB, PROTO_TCP, 80),
        "x/a's pod IP 10.244.1.1 is in the block"
    );
    assert!(allows(&c, YA, XB, PROTO_TCP, 80));
    assert!(
        !allows(&c, XC, XB, PROTO_TCP, 80),
        "x/c's pod IP is excepted"
    );
    let (_, c) = compiled(&policy(
        "x",
        "{podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{ipBlock: {cidr: 100.64.1.0/24}}]}]}",
    ));
    assert!(
        !allows(&c, XC, XB, PROTO_TCP, 80),
        "a pod is named by its pod IP, not its overlay address"
    );
    // Everything but the pod network: no pod, whatever its overlay address (the block holds
    // every overlay address, and no except names one).
    let (_, c) = compiled(&policy(
        "x",
        "{podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.244.0.0/16]}}]}]}",
    ));
    for from in [XA, XC, YA] {
        assert!(!allows(&c, from, XB, PROTO_TCP, 80), "{from:?}");
    }
    // A block that is exactly a protected pod's address leaves the pod its route.
    let (_, c) = compiled(&policy(
        "x",
        "{podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{ipBlock: {cidr: 10.244.2.2/32}}, {ipBlock: {cidr: 100.64.1.2/32}}]}]}",
    ));
    for addr in ["10.244.2.2", "100.64.1.2"] {
        let r = c.tables.fib.lookup(addr.parse().unwrap()).unwrap();
        assert_eq!(r.entity.as_ref(), "x/c", "{addr}");
        assert!(!r.outside, "{addr}");
    }
    assert!(allows(&c, XC, XB, PROTO_TCP, 80));
}

#[test]
fn egress_ip_blocks_become_the_local_pods_firewall_and_other_pods_stay_open() {
    let (_, c) = compiled(&policy(
        "x",
        "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 8.8.8.0/24, except: [8.8.8.8/32]}}], ports: [{protocol: UDP, port: 53}, {port: http}]}]}",
    ));
    let Egress::Allow(allows_) = &c.egress[&pod_entity(&ObjectKey::new("x", "a"))] else {
        panic!("x/a is egress-isolated: {:?}", c.egress);
    };
    assert_eq!(allows_.len(), 1);
    assert_eq!(allows_[0].cidr, "8.8.8.0/24".parse::<IpNetwork>().unwrap());
    assert_eq!(
        allows_[0].except,
        ["8.8.8.8/32".parse::<IpNetwork>().unwrap()]
    );
    assert_eq!(
        allows_[0].ports,
        [(PROTO_UDP, Some((53, 53)))],
        "a named port cannot be resolved off the overlay"
    );
    assert!(
        !allows(&c, XA, XB, PROTO_TCP, 80),
        "no overlay peer is allowed"
    );
    assert_eq!(c.egress.len(), 1, "only local pods get firewall rules");
    let (_, open) = compiled("");
    assert!(matches!(open.egress.values().next(), Some(Egress::Open)));
}

#[test]
fn strict_mode_isolates_every_ingress_until_a_policy_allows() {
    let config = "apiVersion: keyway.io/v1alpha1\nkind: ClusterConfig\nmetadata: {name: c}\nspec: {policyMode: Strict}\n";
    let (_, c) = compiled(config);
    assert!(!allows(&c, XA, XB, PROTO_TCP, 80));
    let allow = policy(
        "x",
        "{podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{podSelector: {}}]}]}",
    );
    let (_, c) = compiled(&format!("{config}---\n{allow}"));
    assert!(allows(&c, XA, XB, PROTO_TCP, 80));
    assert!(!allows(&c, XB, XA, PROTO_TCP, 80), "x/a stays isolated");
}

#[test]
fn direct_paths_mark_the_pairs_they_name() {
    let direct = "apiVersion: keyway.io/v1alpha1\nkind: DirectPath\nmetadata: {name: d, namespace: x}\nspec: {a: {podSelector: {matchLabels: {pod: a}}}, b: {podSelector: {matchLabels: {pod: b}}}}\n";
    let (_, c) = compiled(direct);
    let id = |p: (&str, &str)| {
        c.tables
            .fib
            .lookup(IpAddr::V4(overlay(p.0, p.1)))
            .unwrap()
            .identity
    };
    assert!(c.tables.acl.is_direct(id(XA), id(XB)));
    assert!(!c.tables.acl.is_direct(id(XA), id(XC)));
}

#[test]
fn remote_pods_route_through_their_nodes_sap_and_local_ones_through_this_one() {
    let (_, c) = compiled("");
    let route = |p: (&str, &str)| c.tables.fib.lookup(IpAddr::V4(overlay(p.0, p.1))).unwrap();
    assert_eq!(route(XB).sap, Some("192.168.0.2:6080".parse().unwrap()));
    assert_eq!(route(XB).infra, "10.244.2.1:6080".parse().unwrap());
    assert_eq!(route(XA).sap, node().local_sap);
    assert_eq!(
        c.tables.fib.len(),
        10,
        "each pod's overlay IP and pod IP, and each family's address space off the overlay"
    );
    assert!(
        c.tables
            .saps
            .contains(&"192.168.0.2".parse::<IpAddr>().unwrap())
    );
    assert_eq!(c.local_keys.len(), 1);
}

fn pod_ip(ns: &str, name: &str) -> Ipv4Addr {
    let p = PODS.iter().find(|p| p.0 == ns && p.1 == name).unwrap();
    p.4.parse().unwrap()
}

/// Whether the tables let a new TCP connection from one pod's pod IP to another's.
fn allows_by_pod_ip(c: &Compiled, from: (&str, &str), to: (&str, &str), port: u16) -> bool {
    let (s, d) = (pod_ip(from.0, from.1), pod_ip(to.0, to.1));
    let k = packet::classify(&packet::build::syn4(s.octets(), 40000, d.octets(), port)).unwrap();
    let id = |ip| c.tables.fib.lookup(ip).unwrap().identity;
    c.tables.acl.allows(id(k.src), id(k.dst), &k)
}

#[test]
fn pod_ips_are_routed_like_overlay_addresses_and_judged_by_the_same_policy() {
    let (_, c) = compiled(&policy(
        "x",
        "{podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}]}]}",
    ));
    for (ns, name, ..) in PODS {
        let by_overlay = c.tables.fib.lookup(IpAddr::V4(overlay(ns, name))).unwrap();
        let by_pod_ip = c.tables.fib.lookup(IpAddr::V4(pod_ip(ns, name))).unwrap();
        assert_eq!(
            by_pod_ip, by_overlay,
            "{ns}/{name}: same entity, identity, keys, SaP"
        );
    }
    assert!(allows_by_pod_ip(&c, XA, XB, 80));
    assert!(
        !allows_by_pod_ip(&c, XC, XB, 80),
        "denied by pod IP as by overlay address"
    );
    let want: Vec<IpAddr> = PODS.iter().map(|p| p.4.parse().unwrap()).collect();
    let mut want = want;
    want.sort();
    assert_eq!(c.pod_ips, want, "every protected pod's pod IP is steered");
}

#[test]
fn stale_and_conflicting_attachments_are_left_out() {
    let (mut model, _) = compiled("");
    // y/a's pod object is gone: its attachment is stale.
    model.pods.remove(&ObjectKey::new("y", "a"));
    // x/c claims x/a's overlay address: the local pod keeps it.
    model
        .attachments
        .get_mut(&ObjectKey::new("x", "c"))
        .unwrap()
        .overlay_ips = vec![IpAddr::V4(overlay("x", "a"))];
    let key = ObjectKey::new("x", "a");
    let local = LocalPod {
        entity: pod_entity(&key),
        pod: Some(key),
        overlay_ips: vec![IpAddr::V4(overlay("x", "a"))],
        infra_ip: "10.244.1.1".parse().unwrap(),
    };
    let mut keys = KeyCache::new(secret());
    let c = compile(&model, &[local], &node(), &mut keys, 0, 1);
    assert_eq!(c.entities, 2, "x/a and x/b");
    let owner = c.tables.fib.lookup(IpAddr::V4(overlay("x", "a"))).unwrap();
    assert_eq!(&*owner.entity, "x/a");
}

#[test]
fn an_address_stays_with_the_node_that_holds_its_block() {
    // An agent on node-1 (compromised, or mistaken) publishes x/b's address, in node-2's block,
    // for a pod of its own. Seen from a third node, x/b keeps it: before blocks were checked,
    // both claims lost it.
    let w = pod_doc("x", "w", "node-1", "10.244.1.9");
    let claim = Object::OverlayAttachment(
        OverlayAttachmentSpec {
            namespace: "x".into(),
            pod: "w".into(),
            node: "node-1".into(),
            infra_ip: "10.244.1.9".parse().unwrap(),
            overlay_ips: vec![IpAddr::V4(overlay("x", "b"))],
            proof: None,
        }
        .attest(&secret()),
    );
    let (model, _) = compiled_with(&w, vec![claim]);
    let third = NodeContext {
        node_name: "node-3".into(),
        local_sap: None,
        ..node()
    };
    let c = compile(&model, &[], &third, &mut KeyCache::new(secret()), 0, 1);
    assert_eq!(c.refused, [(ObjectKey::new("x", "w"), Refusal::WrongBlock)]);
    let owner = c.tables.fib.lookup(IpAddr::V4(overlay("x", "b"))).unwrap();
    assert_eq!(&*owner.entity, "x/b");
}

/// A change to a published attachment; whether to attest it again (as an agent would).
type Edit = dyn Fn(&mut OverlayAttachmentSpec) -> bool;

#[test]
fn an_attachment_counts_only_when_attested_and_true_to_its_pod() {
    let (model, _) = compiled("");
    let key = ObjectKey::new("x", "b");
    let good = model.attachments[&key].clone();
    let refusal = |edit: &Edit| {
        let mut m = model.clone();
        let mut a = good.clone();
        if edit(&mut a) {
            a.proof = None;
            a = a.attest(&secret());
        }
        m.attachments.insert(key.clone(), a);
        let c = compile(&m, &[], &node(), &mut KeyCache::new(secret()), 0, 1);
        let routed = c
            .tables
            .fib
            .lookup("100.64.1.1".parse().unwrap())
            .is_some_and(|r| &*r.entity == "x/b");
        (c.refused.first().map(|(_, r)| *r), routed)
    };
    assert_eq!(
        refusal(&|_| false),
        (None, true),
        "as the agent published it"
    );
    // Written by someone without the cluster secret: an annotation writer.
    assert_eq!(
        refusal(&|a| {
            a.overlay_ips = vec!["100.64.1.2".parse().unwrap()];
            false
        }),
        (Some(Refusal::Unattested), false)
    );
    // During a rolling upgrade from agents that did not attest: counted, unless forged.
    let mut m = model.clone();
    let mut unattested = good.clone();
    unattested.proof = None;
    m.attachments.insert(key.clone(), unattested.clone());
    let mut upgrading = KeyCache::new(secret()).accepting_unattested(true);
    assert!(
        compile(&m, &[], &node(), &mut upgrading, 0, 1)
            .refused
            .is_empty()
    );
    unattested.proof = Some("00".repeat(16));
    m.attachments.insert(key.clone(), unattested);
    let c = compile(&m, &[], &node(), &mut upgrading, 0, 1);
    assert_eq!(c.refused, [(key.clone(), Refusal::Unattested)]);
    // Attested, but not true to the pod (an agent's stale or mistaken word).
    let cases: [(&Edit, Refusal); 5] = [
        (
            &|a| {
                a.node = "node-3".into();
                true
            },
            Refusal::WrongNode,
        ),
        (
            &|a| {
                a.infra_ip = "10.244.2.77".parse().unwrap();
                true
            },
            Refusal::NotPodIp,
        ),
        (
            &|a| {
                a.overlay_ips = vec!["10.9.9.9".parse().unwrap()];
                true
            },
            Refusal::OutsideNetwork,
        ),
        (
            // In the overlay, but in a block nobody holds (node-2 holds blocks 1 and 3).
            &|a| {
                a.overlay_ips = vec!["100.64.2.5".parse().unwrap()];
                true
            },
            Refusal::WrongBlock,
        ),
        (
            &|a| {
                a.overlay_ips = vec!["100.64.1.2".parse().unwrap()];
                true
            },
            Refusal::Conflict,
        ),
    ];
    for (edit, want) in cases {
        assert_eq!(refusal(edit).0, Some(want));
    }
    // Pointed at a node's address: a SaP would forward to itself.
    let mut m = model.clone();
    m.pods.get_mut(&key).unwrap().infra_ips = vec!["192.168.0.2".parse().unwrap()];
    let mut a = good.clone();
    a.infra_ip = "192.168.0.2".parse().unwrap();
    m.attachments.insert(key.clone(), a.attest(&secret()));
    let c = compile(&m, &[], &node(), &mut KeyCache::new(secret()), 0, 1);
    assert_eq!(c.refused, [(key.clone(), Refusal::NodeAddress)]);
}

#[test]
fn identities_are_shared_by_entities_with_the_same_facts() {
    let twin = "apiVersion: v1\nkind: Pod\nmetadata: {name: d, namespace: x, labels: {pod: b}}\n\
                spec: {nodeName: node-2, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\n\
                status: {podIPs: [{ip: 10.244.2.9}]}\n";
    let (mut model, _) = compiled(twin);
    model.insert(Object::OverlayAttachment(
        OverlayAttachmentSpec {
            namespace: "x".into(),
            pod: "d".into(),
            node: "node-2".into(),
            infra_ip: "10.244.2.9".parse().unwrap(),
            overlay_ips: vec!["100.64.1.9".parse().unwrap()],
            proof: None,
        }
        .attest(&secret()),
    ));
    let mut keys = KeyCache::new(secret());
    let entities = entities::collect(&model, &[], &node(), &mut keys, 0, &mut Vec::new());
    assert_eq!(
        entities.len(),
        5,
        "the remote pods, and x/a off the overlay (no agent serves it: no local one given)"
    );
    let of = |name: &str| entities.iter().position(|e| &*e.name == name).unwrap();
    let ids = identities::assign(&model, &entities, vec![]);
    assert_eq!(
        ids.len(),
        5,
        "x/d has x/b's facts; x/a's own; both families' outside share one"
    );
    assert_eq!(ids.of_entity[of("x/b")], ids.of_entity[of("x/d")]);
    // A block that holds only x/d's pod IP tells them apart.
    let block = ("10.244.2.9/32".parse().unwrap(), vec![]);
    let ids = identities::assign(&model, &entities, vec![block]);
    assert_eq!(ids.len(), 7, "and the block's own region");
    assert_ne!(ids.of_entity[of("x/b")], ids.of_entity[of("x/d")]);

    let blocks = identities::referenced_blocks(&Model::from_objects(
        crate::source::parse_file(&format!(
            "{}---\n{}",
            policy(
                "x",
                "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}}]}]}"
            ),
            policy(
                "y",
                "{podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}}]}]}"
            )
        ))
        .unwrap(),
    ));
    assert_eq!(blocks.len(), 1, "the same block named twice is one");
}

#[test]
fn networks_are_joined_by_their_selectors() {
    let net = "apiVersion: keyway.io/v1alpha1\nkind: OverlayNetwork\nmetadata: {name: blue}\nspec: {cidr: 100.80.0.0/16, namespaceSelector: {matchLabels: {team: blue}}}\n";
    let (model, _) = compiled(net);
    let names = |ns: &str, n: &str| -> Vec<String> {
        networks_for(&model, Some(&ObjectKey::new(ns, n)))
            .into_iter()
            .map(|n| n.name)
            .collect()
    };
    assert_eq!(names("y", "a"), ["blue"]);
    assert!(
        names("x", "a").is_empty(),
        "once networks are defined, the default is gone"
    );
}

/// Whether a new TCP connection from `src` (any address) to x/b's pod IP on `port` is allowed, and
/// whether `src` is routed as an outside address.
fn from_outside(c: &Compiled, src: &str, port: u16) -> (bool, bool) {
    let s: Ipv4Addr = src.parse().unwrap();
    let d = pod_ip("x", "b");
    let k = packet::classify(&packet::build::syn4(s.octets(), 40000, d.octets(), port)).unwrap();
    let route = c.tables.fib.lookup(k.src).unwrap();
    let id = c.tables.fib.lookup(k.dst).unwrap().identity;
    (c.tables.acl.allows(route.identity, id, &k), route.outside)
}

#[test]
fn outside_addresses_get_identities_by_the_ip_blocks_that_hold_them() {
    let (_, c) = compiled(&policy(
        "x",
        "{podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}}], ports: [{port: 80}]}, {from: [{namespaceSelector: {}}]}]}",
    ));
    assert_eq!(from_outside(&c, "203.0.113.5", 80), (true, true));
    assert_eq!(
        from_outside(&c, "203.0.113.5", 81),
        (false, true),
        "the block's port only"
    );
    assert_eq!(
        from_outside(&c, "203.0.113.200", 80),
        (false, true),
        "the exception"
    );
    assert_eq!(
        from_outside(&c, "198.51.100.1", 80),
        (false, true),
        "a namespace selector selects pods, never an outside address"
    );
    // Nothing routes to an outside address as a destination with a key: it has no endpoint.
    assert!(!c.pod_ips.contains(&"203.0.113.5".parse().unwrap()));
}

#[test]
fn pods_off_the_overlay_keep_their_pod_identity() {
    // x/u has a pod IP but no agent serves it (it started before keyway, or was kept off).
    let u = pod_doc("x", "u", "node-2", "10.244.2.50");
    let allow_u = policy(
        "x",
        "{podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{podSelector: {matchLabels: {pod: u}}}]}]}",
    );
    let (_, c) = compiled(&format!("{u}---\n{allow_u}"));
    assert_eq!(from_outside(&c, "10.244.2.50", 8080), (true, true));
    assert!(
        !c.pod_ips.contains(&"10.244.2.50".parse().unwrap()),
        "protected pods do not steer to it: it has no overlay"
    );
    let (_, deny) = compiled(&format!(
        "{u}---\n{}",
        policy("x", "{podSelector: {matchLabels: {pod: b}}}")
    ));
    assert_eq!(from_outside(&deny, "10.244.2.50", 8080), (false, true));
}

#[test]
fn a_label_keeps_pods_off_keyway_the_pods_own_first() {
    let extra = r#"
apiVersion: v1
kind: Namespace
metadata: {name: legacy, labels: {keyway.io/enabled: "false"}}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy}
spec: {nodeName: node-1}
---
apiVersion: v1
kind: Pod
metadata: {name: new, namespace: legacy, labels: {keyway.io/enabled: "true"}}
spec: {nodeName: node-1}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: x, labels: {keyway.io/enabled: "false"}}
spec: {nodeName: node-1}
"#;
    let (model, _) = compiled(extra);
    let out = |ns: &str, n: &str| opted_out(&model, &ObjectKey::new(ns, n));
    assert!(out("legacy", "old"), "its namespace's label");
    assert!(!out("legacy", "new"), "its own label wins");
    assert!(out("x", "d"), "its own label");
    assert!(!out("x", "a"), "no label: on keyway");
}

#[test]
fn egress_to_pods_off_the_overlay_opens_their_pod_ips_in_the_firewall() {
    // x/u has no overlay: x/a's traffic to it leaves by eth0, through x/a's own table.
    let u = pod_doc("x", "u", "node-2", "10.244.2.50");
    let (_, c) = compiled(&format!(
        "{u}---\n{}",
        policy(
            "x",
            "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{podSelector: {matchLabels: {pod: u}}}], ports: [{protocol: TCP, port: 80}]}]}",
        )
    ));
    let Egress::Allow(allows_) = &c.egress[&pod_entity(&ObjectKey::new("x", "a"))] else {
        panic!("x/a is egress-isolated: {:?}", c.egress);
    };
    assert_eq!(allows_.len(), 1, "{allows_:?}");
    assert_eq!(
        allows_[0].cidr,
        "10.244.2.50/32".parse::<IpNetwork>().unwrap()
    );
    assert_eq!(allows_[0].ports, [(PROTO_TCP, Some((80, 80)))]);
    assert!(
        !allows(&c, XA, XB, PROTO_TCP, 80),
        "protected pods the rule does not name stay closed"
    );
}

/// Twelve more pods on node-2, `z/p0`…`z/p11`, each with labels of its own (an identity each);
/// the even ones serve `http` on 8080, the odd ones on 9090.
fn with_many_pods(extra: &str) -> (Compiled, impl Fn(usize) -> Ipv4Addr) {
    let mut text = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: z}\n");
    let mut attachments = Vec::new();
    for i in 0..12u8 {
        let port = if i % 2 == 0 { 8080 } else { 9090 };
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: z, labels: {{pod: p{i}}}}}\n\
             spec: {{nodeName: node-2, containers: [{{name: c, ports: [{{name: http, containerPort: {port}}}]}}]}}\n\
             status: {{podIPs: [{{ip: 10.244.3.{i}}}]}}\n"
        ));
        attachments.push(Object::OverlayAttachment(
            OverlayAttachmentSpec {
                namespace: "z".into(),
                pod: format!("p{i}"),
                node: "node-2".into(),
                infra_ip: IpAddr::from([10, 244, 3, i]),
                overlay_ips: vec![IpAddr::from([100, 64, 3, i])],
                proof: None,
            }
            .attest(&secret()),
        ));
    }
    text.push_str("---\n");
    text.push_str(extra);
    let (_, c) = compiled_with(&text, attachments);
    (c, |i: usize| Ipv4Addr::new(100, 64, 3, i as u8))
}

fn allows_between(c: &Compiled, s: Ipv4Addr, d: Ipv4Addr, port: u16) -> bool {
    let k = packet::classify(&packet::build::syn4(s.octets(), 40000, d.octets(), port)).unwrap();
    let id = |ip| c.tables.fib.lookup(ip).unwrap().identity;
    c.tables.acl.allows(id(k.src), id(k.dst), &k)
}

#[test]
fn rules_naming_many_peers_compile_per_selected_identity_with_the_same_meaning() {
    let (c, z) = with_many_pods(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: in, namespace: z}\n\
         spec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 80}, {port: http}]}]}\n\
         ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: out, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: \
         {matchLabels: {kubernetes.io/metadata.name: z}}}], ports: [{port: http}]}]}\n",
    );
    assert_eq!(c.tables.acl.pair_count(), 0, "no rule expanded per pair");
    let (rules, groups) = c.tables.acl.group_rule_count();
    assert_eq!(
        groups, 3,
        "every pod; z's pods serving http on 8080; on 9090"
    );
    assert_eq!(rules, 12 + 2, "one per z pod, and x/a's two");
    let xb = overlay("x", "b");
    assert!(allows_between(&c, xb, z(3), 80), "every namespace's pods");
    assert!(allows_between(&c, z(5), z(3), 80));
    assert!(!allows_between(&c, xb, z(3), 81), "ports still count");
    assert!(allows_between(&c, xb, z(3), 9090) && !allows_between(&c, xb, z(3), 8080));
    let xa = overlay("x", "a");
    assert!(
        !allows_between(&c, xa, z(0), 80),
        "x/a's egress allows http only"
    );
    assert!(allows_between(&c, xa, z(0), 8080) && allows_between(&c, xa, z(1), 9090));
    assert!(
        !allows_between(&c, xa, z(0), 9090) && !allows_between(&c, xa, z(1), 8080),
        "the name resolves against each destination"
    );
    assert!(
        !allows_between(&c, xa, xb, 8080),
        "x/b is not among x/a's peers"
    );
}

#[test]
fn ambient_pods_get_hbone_for_some_allowed_tcp_port_and_their_real_ports_at_the_last_hop() {
    use keyway_core::acl::HBONE_PORT;
    use keyway_protocol::firewall::MeshAllow;
    let ambient_x = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: red, istio.io/dataplane-mode: ambient}}\n---\n";
    let (_, c) = compiled(&format!(
        "{ambient_x}{}",
        policy(
            "x",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 8080}]}]}",
        )
    ));
    assert!(allows(&c, XB, XA, PROTO_TCP, 8080));
    assert!(
        !allows(&c, XB, XA, PROTO_TCP, 9090),
        "plaintext keeps its port"
    );
    assert!(
        allows(&c, XB, XA, PROTO_TCP, HBONE_PORT),
        "HBONE from a meshed client that may reach some TCP port"
    );
    assert!(
        !allows(&c, XC, XA, PROTO_TCP, HBONE_PORT),
        "no port allowed: no HBONE"
    );
    assert!(
        !allows(&c, YA, XA, PROTO_TCP, HBONE_PORT),
        "y is not in the mesh"
    );

    let mesh = c
        .mesh
        .get(&pod_entity(&ObjectKey::new("x", "a")))
        .expect("x/a is meshed");
    let addrs = |name: &str| {
        let p = PODS.iter().find(|p| p.0 == "x" && p.1 == name).unwrap();
        [p.3, p.4].map(|a| a.parse::<IpAddr>().unwrap())
    };
    let mut sources = mesh.sources.clone();
    sources.sort();
    let mut want: Vec<IpAddr> = addrs("b").into_iter().chain(addrs("c")).collect();
    want.sort();
    assert_eq!(
        sources, want,
        "every other meshed workload, not x/a, not y/a"
    );
    let mut from_b = addrs("b").to_vec();
    from_b.sort();
    let allows_: Vec<MeshAllow> = mesh
        .allows
        .iter()
        .map(|a| {
            let mut a = a.clone();
            a.sources.sort();
            a
        })
        .collect();
    assert_eq!(
        allows_,
        vec![MeshAllow {
            sources: from_b,
            ports: vec![(8080, 8080)]
        }],
        "x/b on 8080 only; x/c nothing"
    );

    let (_, plain) = compiled("");
    assert!(plain.mesh.is_empty(), "no pod in the mesh");
}

#[test]
fn the_key_cache_holds_the_current_epochs_rings_only() {
    let mut keys = KeyCache::new(keyway_core::key::ClusterSecret::new(vec![3u8; 32]).unwrap());
    let rotation = keyway_core::key::Rotation::new(10_000, 4_000).unwrap();
    let entity = |i: u32| -> Arc<str> { format!("ns/pod-{i}").into() };
    for i in 0..10 {
        keys.ring(&entity(i), rotation, 100_000);
    }
    assert_eq!(keys.rings_held(), 10);
    let first = keys.ring(&entity(0), rotation, 105_000);
    assert_eq!(
        keys.rings_held(),
        10,
        "the same epoch: remembered, not derived again"
    );
    // A thousand epochs on, with pods coming and going: never more than one epoch's rings.
    for step in 1..1000u64 {
        let now = 100_000 + step * 10_000;
        for i in 0..5 {
            keys.ring(&entity((step as u32) * 5 + i), rotation, now);
        }
        assert_eq!(keys.rings_held(), 5, "epoch {step}");
    }
    assert_ne!(
        keys.ring(&entity(0), rotation, 100_000 + 1000 * 10_000),
        first,
        "a later epoch's ring is derived afresh"
    );
}
