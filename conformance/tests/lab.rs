//! keyway-lab end to end on the paper's topology (examples/paper-topology.yaml): the reachability
//! matrices over the overlay (TCP, UDP, SCTP), by pod IP, by cluster IP, by Service name and
//! around the overlay equal the files in examples/paper-topology.expect/, with the kernel fast
//! path on and with every agent on the user-space path alone; the paths are those of the paper's Table I, objects applied
//! and deleted while the lab runs take effect, and `down` leaves nothing behind (twice).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keyway_conformance::lab::{DownOnDrop, Lab, Matrix, Via};
use keyway_conformance::topology::Plan;
use keyway_testing::Scratch;
use keyway_testing::privileged;

const PREFIX: &str = "kwp";
const UNDERLAY_OCTET: u8 = 82;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn expected(name: &str) -> Matrix {
    let f = repo().join("examples/paper-topology.expect").join(name);
    Matrix::parse(&std::fs::read_to_string(&f).unwrap()).unwrap()
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Everything of this test's lab that can outlive it, as the host shows it.
fn traces(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for l in sh("ip netns list").lines() {
        if l.starts_with(&format!("{PREFIX}-")) {
            v.push(format!("netns {l}"));
        }
    }
    for l in sh("ip -o link").lines() {
        if l.contains(&format!("{PREFIX}-")) {
            v.push(format!("link {l}"));
        }
    }
    let tables = sh("nft list tables");
    if tables.contains(PREFIX) {
        v.push(format!("nft {tables}"));
    }
    let d = dir.display().to_string();
    for l in sh("ps -eo pid=,args=").lines() {
        if l.contains(&d) {
            v.push(format!("process {l}"));
        }
    }
    for l in std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
    {
        if l.contains(&d) || l.contains(&format!("/run/netns/{PREFIX}-")) {
            v.push(format!("mount {l}"));
        }
    }
    if dir.exists() {
        v.push(format!("directory {}", dir.display()));
    }
    v
}

#[test]
fn the_papers_topology_end_to_end_and_down_leaves_nothing() {
    if !privileged("the_papers_topology_end_to_end") {
        return;
    }
    let scratch = Scratch::new("lab");
    let dir = scratch.join("lab");
    let _down = DownOnDrop(dir.clone());
    // The example as a user runs it, moved onto this test's own underlay.
    let topology = std::fs::read_to_string(repo().join("examples/paper-topology.yaml"))
        .unwrap()
        .replace("192.168.77.", &format!("192.168.{UNDERLAY_OCTET}."));
    let file = scratch.join("paper-topology.yaml");
    std::fs::write(&file, topology).unwrap();
    let plan = Plan {
        prefix: PREFIX.into(),
        nodes: 0,
        pod_octet: 250,
        underlay_octet: UNDERLAY_OCTET,
    };
    let mut lab = Lab::up_with(&dir, std::slice::from_ref(&file), 1, plan, true).expect("lab up");
    assert_eq!(
        lab.state.nodes.len(),
        2,
        "the pods ask for node-1 and node-2"
    );
    assert_eq!(lab.state.externals.len(), 1, "the end-user device");

    let t = Duration::from_millis(1000);
    // Every path, with the kernel fast path carrying established flows (the agents' default
    // here), then with every agent restarted on the user-space path alone: the same tables.
    for datapath in ["auto", "user"] {
        if datapath != "auto" {
            lab.set_datapath(datapath).expect("agents restarted");
        }
        let fast_pods: f64 = lab.node_metric("keyway_fastpath_pods").iter().sum();
        if datapath == "user" {
            assert_eq!(
                fast_pods, 0.0,
                "no pod on the fast path under --datapath user"
            );
        } else {
            assert!(fast_pods > 0.0, "the fast path serves the pods by default");
        }
        for (proto, file) in [
            ("TCP", "overlay-TCP-80.txt"),
            ("UDP", "overlay-UDP-80.txt"),
            ("SCTP", "overlay-SCTP-80.txt"),
        ] {
            let got = lab.probe(80, proto, Via::Overlay, t).unwrap();
            let d = got.diff(&expected(file));
            assert!(
                d.is_empty(),
                "{datapath}: {proto} over the overlay: {d:?}\n{got}"
            );
        }
        let got = lab.probe(80, "TCP", Via::PodIp, t).unwrap();
        let d = got.diff(&expected("pod-ip-TCP-80.txt"));
        assert!(d.is_empty(), "{datapath}: TCP by pod IP: {d:?}\n{got}");
        for (via, file) in [
            (Via::Service, "service-TCP-80.txt"),
            (Via::Dns, "dns-TCP-80.txt"),
        ] {
            let got = lab.probe(80, "TCP", via, t).unwrap();
            let d = got.diff(&expected(file));
            assert!(d.is_empty(), "{datapath}: TCP via {via:?}: {d:?}\n{got}");
        }
        let got = lab.probe(80, "TCP", Via::Underlay, t).unwrap();
        let d = got.diff(&expected("underlay-TCP-80.txt"));
        assert!(
            d.is_empty(),
            "{datapath}: TCP via the underlay: {d:?}\n{got}"
        );
        // The probes through a SaP (S1 <-> S3): past their first datagram, forwarded by the
        // kernel SaP on the fast path (counted at the agents' next sync), by nothing else under
        // --datapath user.
        let in_kernel = || -> f64 {
            lab.node_metric("keyway_fastpath_sap_datagrams_total")
                .iter()
                .sum()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while datapath != "user" && in_kernel() == 0.0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        if datapath == "user" {
            assert_eq!(in_kernel(), 0.0, "no kernel SaP under --datapath user");
        } else {
            assert!(
                in_kernel() > 0.0,
                "the kernel SaP forwards the flows the user-space SaP forwarded first"
            );
        }
    }
    lab.set_datapath("auto").expect("agents restarted");

    // Table I's paths, from the SaPs' own packet counters.
    let paths = lab.paths(80, "TCP").unwrap();
    let line = |from: &str, to: &str| {
        paths
            .lines()
            .find(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[0] == from && f[2] == to
            })
            .unwrap_or_else(|| panic!("no path {from} -> {to}:\n{paths}"))
            .to_string()
    };
    assert!(line("paper/s1", "paper/s2").contains("direct"), "{paths}");
    assert!(line("paper/s2", "paper/s1").contains("direct"), "{paths}");
    let s1_s3 = line("paper/s1", "paper/s3");
    assert!(
        s1_s3.contains("through the SaP") && s1_s3.contains("node-2"),
        "S1 -> S3 goes through S3's SaP: {s1_s3}"
    );
    let eu = line("paper/end-user", "paper/s1");
    assert!(
        eu.contains("through the SaP of node-1"),
        "the end-user enters through node-1's gateway SaP: {eu}"
    );
    assert!(
        !paths.contains("paper/s2                 -> paper/s3"),
        "S2 and S3 do not talk:\n{paths}"
    );

    // Changes while the lab runs, as kubectl would make them: a policy that lets S2 reach S3,
    // then its deletion.
    let allow = scratch.join("allow-s2-s3.yaml");
    std::fs::write(
        &allow,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: s3-from-s2, namespace: paper}\nspec:\n  podSelector: {matchLabels: {app: s3}}\n  policyTypes: [Ingress]\n  ingress: [{from: [{podSelector: {matchLabels: {app: s2}}}]}]\n",
    )
    .unwrap();
    lab.apply(std::slice::from_ref(&allow)).unwrap();
    let mut want = expected("overlay-TCP-80.txt");
    let (s2, s3) = (
        want.names.iter().position(|n| n == "paper/s2").unwrap(),
        want.names.iter().position(|n| n == "paper/s3").unwrap(),
    );
    want.cells[s2][s3] = true;
    let got = lab.probe(80, "TCP", Via::Overlay, t).unwrap();
    assert!(got.diff(&want).is_empty(), "after apply:\n{got}");
    lab.delete(std::slice::from_ref(&allow)).unwrap();
    let got = lab.probe(80, "TCP", Via::Overlay, t).unwrap();
    let d = got.diff(&expected("overlay-TCP-80.txt"));
    assert!(d.is_empty(), "after delete: {d:?}\n{got}");

    // Down: nothing of the lab remains; a second down is harmless.
    assert!(
        !traces(&dir).is_empty(),
        "the trace check sees a running lab"
    );
    drop(lab);
    Lab::down(&dir).expect("down");
    let left = traces(&dir);
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
    Lab::down(&dir).expect("a second down");
    assert!(traces(&dir).is_empty());
}
