//! Zero-change onboarding, end to end on two lab nodes: Services as users write them
//! (conformance/services/cluster.yaml — a ClusterIP with a named target port, a headless Service
//! with a selector, a NodePort with `externalTrafficPolicy: Local` and one with `Cluster`), with
//! the lab playing kube-proxy and CoreDNS. Protected pods reach each other by overlay address,
//! pod IP, cluster IP and DNS name exactly as NetworkPolicy says; a pod that opted out reaches
//! them through the node's gateway with its own identity; external hosts reach a NodePort only
//! where an ipBlock admits them; the node's probes pass while the agent is stopped; a pod IP
//! reached around the overlay is dropped and counted. The matrices hold with the kernel fast path
//! and on the user-space path alone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keyway_conformance::lab::{DownOnDrop, Lab, Matrix, Via};
use keyway_conformance::topology::Plan;
use keyway_testing::{Scratch, privileged};

const PREFIX: &str = "kws";
const UNDERLAY_OCTET: u8 = 83;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn expected(name: &str) -> Matrix {
    let f = repo().join("conformance/services").join(name);
    Matrix::parse(&std::fs::read_to_string(&f).unwrap()).unwrap()
}

/// The matrix of the protected pods only (the opted-out pod has no overlay address).
fn protected(m: &Matrix) -> Matrix {
    let keep: Vec<usize> = (0..m.names.len())
        .filter(|&i| !m.names[i].starts_with("legacy/"))
        .collect();
    Matrix {
        names: keep.iter().map(|&i| m.names[i].clone()).collect(),
        cells: keep
            .iter()
            .map(|&i| keep.iter().map(|&j| m.cells[i][j]).collect())
            .collect(),
    }
}

fn cell(m: &Matrix, from: &str, to: &str) -> bool {
    let at = |n: &str| m.names.iter().position(|x| x == n).unwrap();
    m.cells[at(from)][at(to)]
}

/// A datapath counter summed over the lab's nodes.
fn counter(lab: &Lab, series: &str) -> f64 {
    lab.node_metric(series).iter().sum()
}

#[test]
fn services_pod_ips_dns_and_node_ports_reach_protected_pods_as_policy_says() {
    if !privileged("services_pod_ips_dns_and_node_ports") {
        return;
    }
    let scratch = Scratch::new("services");
    let dir = scratch.join("lab");
    let _down = DownOnDrop(dir.clone());
    let plan = Plan {
        prefix: PREFIX.into(),
        nodes: 0,
        pod_octet: 249,
        underlay_octet: UNDERLAY_OCTET,
    };
    let mut lab = Lab::up_services_topology(&dir, plan).expect("lab up");
    let legacy = lab
        .state
        .pods
        .iter()
        .find(|p| p.key() == "legacy/old")
        .unwrap();
    assert!(
        legacy.overlay_ips.is_empty(),
        "keyway.io/enabled=false on its namespace keeps the pod off keyway"
    );
    let t = Duration::from_millis(1000);
    let truth = expected("truth-TCP-80.txt");

    // Every way a pod reaches another gives NetworkPolicy's matrix: with the kernel fast path
    // carrying established flows (the agents' default), then with every agent restarted on the
    // user-space path alone.
    let mut by_cluster_ip = truth.clone();
    let db = truth.names.iter().position(|n| n == "shop/db-0").unwrap();
    for (i, row) in by_cluster_ip.cells.iter_mut().enumerate() {
        // The headless Service has no cluster IP to probe.
        row[db] = i == db;
    }
    for datapath in ["auto", "user"] {
        if datapath == "user" {
            lab.set_datapath(datapath).expect("agents restarted");
            assert_eq!(counter(&lab, "keyway_fastpath_pods"), 0.0, "no pod is fast");
        }
        for (via, want) in [
            (Via::Overlay, &truth),
            (Via::PodIp, &truth),
            (Via::Dns, &truth),
            (Via::Service, &by_cluster_ip),
        ] {
            let got = lab.probe(80, "TCP", via, t).unwrap();
            let d = protected(&got).diff(want);
            assert!(d.is_empty(), "{datapath}: TCP via {via:?}: {d:?}\n{got}");
        }
    }
    lab.set_datapath("auto").expect("agents restarted");

    // The opted-out pod (app=front, on node-1) enters through the gateway as itself: cart
    // (node-2) admits app=front, db admits only cart; front on its own bridge too (the node's
    // bridge table hands the frame to the node's routing), and by Service.
    let by_ip = lab.probe(80, "TCP", Via::PodIp, t).unwrap();
    assert!(cell(&by_ip, "legacy/old", "shop/cart"), "{by_ip}");
    assert!(cell(&by_ip, "legacy/old", "shop/front"), "{by_ip}");
    assert!(!cell(&by_ip, "legacy/old", "shop/db-0"), "{by_ip}");
    assert!(cell(&by_ip, "shop/cart", "legacy/old"), "{by_ip}");
    let by_svc = lab.probe(80, "TCP", Via::Service, t).unwrap();
    assert!(cell(&by_svc, "legacy/old", "shop/front"), "{by_svc}");
    assert!(cell(&by_svc, "legacy/old", "shop/cart"), "{by_svc}");

    // Outside hosts and NodePorts: front admits 192.168.U.200, not .201.
    let ports = |name: &str| {
        let s = lab.state.services.iter().find(|s| s.name == name).unwrap();
        s.node_ports()[0].2
    };
    let (front_np, cart_np) = (ports("front"), ports("cart-public"));
    let node = |i: usize| lab.state.nodes[i].ip;
    let front_ip = &lab
        .state
        .pods
        .iter()
        .find(|p| p.key() == "shop/front")
        .unwrap()
        .infra_ip;
    let targets = vec![
        format!("{}:{front_np}", node(0)),
        format!("{}:{front_np}", node(1)),
        format!("{}:{cart_np}", node(0)),
        format!("{front_ip}:80"),
    ];
    let (c1, ip1) = lab.add_client(1).unwrap();
    let (c2, ip2) = lab.add_client(2).unwrap();
    assert_eq!(ip1.to_string(), format!("192.168.{UNDERLAY_OCTET}.200"));
    let gateway_before = counter(&lab, "keyway_datapath_packets_total{stage=\"gateway\"}");
    let from1 = lab.probe_from_netns(&c1, &targets, "TCP", t).unwrap();
    assert_eq!(
        from1,
        [true, false, false, true],
        "{ip1}: front's NodePort on front's node (Local), not on the other (no local \
         endpoint), not cart's from a node cart is not on (it arrives as that node, which no \
         ipBlock admits), and front's pod IP: {targets:?}"
    );
    let from2 = lab.probe_from_netns(&c2, &targets, "TCP", t).unwrap();
    assert_eq!(from2, [false; 4], "{ip2} is excepted: {targets:?}");
    assert!(
        counter(&lab, "keyway_datapath_packets_total{stage=\"gateway\"}") > gateway_before,
        "outside traffic entered through the gateway"
    );
    // Once the gateway has admitted a connection's first packets, the kernel gateway carries
    // the rest (`kw_gateway` on kwgw0), counted at the agents' next sync.
    let carried = |lab: &Lab| counter(lab, "keyway_fastpath_gateway_packets_total");
    let kernel_before = carried(&lab);
    lab.probe_from_netns(&c1, &targets[..1], "TCP", t).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while carried(&lab) <= kernel_before {
        assert!(
            std::time::Instant::now() < deadline,
            "the kernel gateway carried none of a NodePort connection's packets"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Around the overlay: a protected pod's eth0 straight to another's pod IP is dropped at
    // the gateway (an overlay source never enters there) and counted.
    let off_before = counter(
        &lab,
        "keyway_datapath_drops_total{stage=\"gateway\",reason=\"off_overlay\"}",
    );
    let got = lab.probe(80, "TCP", Via::Underlay, t).unwrap();
    let d = protected(&got).diff(&expected("underlay-TCP-80.txt"));
    assert!(d.is_empty(), "around the overlay: {d:?}\n{got}");
    let off_after = counter(
        &lab,
        "keyway_datapath_drops_total{stage=\"gateway\",reason=\"off_overlay\"}",
    );
    assert!(
        off_after > off_before,
        "counted: {off_before} -> {off_after}"
    );

    // The agent stopped (a DaemonSet rollout): the node still reaches its pods (kubelet's
    // probes), outside traffic has no way in, and it comes back with the agent.
    let node1 = lab.state.nodes[0].netns.clone();
    let locals: Vec<String> = lab
        .workloads()
        .filter(|p| p.node == "node-1")
        .map(|p| format!("{}:80", p.infra_ip))
        .collect();
    lab.stop_agent("node-1").unwrap();
    let probes = lab.probe_from_netns(&node1, &locals, "TCP", t).unwrap();
    assert!(
        probes.iter().all(|ok| *ok),
        "kubelet-style probes with the agent stopped: {locals:?} {probes:?}"
    );
    let from1 = lab.probe_from_netns(&c1, &targets[..1], "TCP", t).unwrap();
    assert_eq!(from1, [false], "no gateway, no way in: closed");
    lab.start_agent("node-1").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let from1 = lab.probe_from_netns(&c1, &targets[..1], "TCP", t).unwrap();
        if from1 == [true] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the NodePort is back with the agent"
        );
    }
}
