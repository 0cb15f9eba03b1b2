//! Istio ambient on keyway with a real ztunnel (issue 16): two lab nodes, an ambient namespace
//! whose pods a real ztunnel per node serves in in-pod mode, fed as istio-cni would feed it, and a
//! pod outside the mesh. It shows: kubelet's probes (SNATed to Istio's probe address) pass; an
//! ambient pod reaches another by pod IP through both ztunnels, and the HBONE connection between
//! them travels keyway's overlay (on the underlay there is GUE and no HBONE); the probe matrix
//! through ztunnel is NetworkPolicy's truth table on the application's real port (a pair policy
//! denies stays denied although ztunnel accepts the application's connection), with the kernel
//! fast path and on the user-space path alone; with STRICT mTLS meshed pairs connect and the
//! client outside the mesh is refused.
//!
//! The ztunnel binary is found through `ZTUNNEL`, then `PATH`, then `../shared/ztunnel/`; without
//! one the test fails under `CI` and is skipped otherwise, saying how to build it.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use keyway_conformance::ambient::{
    AMBIENT, Ambient, BUILD_ZTUNNEL, DATAPLANE_MODE_LABEL, Mtls, ambient_pods, find_ztunnel,
};
use keyway_conformance::lab::{DownOnDrop, Lab, Matrix, Via};
use keyway_conformance::netpol::{LabProbing, probe_until};
use keyway_conformance::topology::Plan;
use keyway_testing::{Scratch, privileged};

/// amb/a, amb/b, amb/c in the mesh; plain/d outside it; a Service for each. amb/b admits only
/// amb/a, on 80; amb/c may reach only amb/a, on 81 (and so not the cluster's DNS).
const CLUSTER: &str = "apiVersion: v1
kind: Namespace
metadata: {name: amb, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: amb, labels: {app: c}}
spec:
  nodeName: node-2
  containers:
    - {name: serve-80-tcp, image: registry.k8s.io/e2e-test-images/agnhost:2.53, ports: [{containerPort: 80, name: serve-80-tcp, protocol: TCP}]}
    - {name: serve-81-tcp, image: registry.k8s.io/e2e-test-images/agnhost:2.53, ports: [{containerPort: 81, name: serve-81-tcp, protocol: TCP}]}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: plain, labels: {app: d}}
spec:
  nodeName: node-1
  containers:
    - {name: serve-80-tcp, image: registry.k8s.io/e2e-test-images/agnhost:2.53, ports: [{containerPort: 80, name: serve-80-tcp, protocol: TCP}]}
    - {name: serve-81-tcp, image: registry.k8s.io/e2e-test-images/agnhost:2.53, ports: [{containerPort: 81, name: serve-81-tcp, protocol: TCP}]}
---
apiVersion: v1
kind: Service
metadata: {name: a, namespace: amb}
spec: {selector: {app: a}, ports: [{port: 80, protocol: TCP}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: amb}
spec: {selector: {app: b}, ports: [{port: 80, protocol: TCP}]}
---
apiVersion: v1
kind: Service
metadata: {name: c, namespace: amb}
spec: {selector: {app: c}, ports: [{port: 80, protocol: TCP}]}
---
apiVersion: v1
kind: Service
metadata: {name: d, namespace: plain}
spec: {selector: {app: d}, ports: [{port: 80, protocol: TCP}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a-on-80, namespace: amb}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress]
  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 80, protocol: TCP}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: c-to-a-on-81, namespace: amb}
spec:
  podSelector: {matchLabels: {app: c}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 81, protocol: TCP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: amb, labels: {app: a}}
spec:
  nodeName: node-1
  containers:
    - {name: serve-80-tcp, image: registry.k8s.io/e2e-test-images/agnhost:2.53, ports: [{containerPort: 80, name: serve-80-tcp, protocol: TCP}]}
    - {name: serve-81-tcp, image: registry.k8s.io/e2e-test-images/agnhost:2.53, ports: [{containerPort: 81, name: serve-81-tcp, protocol: TCP}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: amb, labels: {app: b}}
spec:
  nodeName: node-2
  containers:
    - {name: serve-80-tcp, image: registry.k8s.io/e2e-test-images/agnhost:2.53, ports: [{containerPort: 80, name: serve-80-tcp, protocol: TCP}]}
    - {name: serve-81-tcp, image: registry.k8s.io/e2e-test-images/agnhost:2.53, ports: [{containerPort: 81, name: serve-81-tcp, protocol: TCP}]}
";

/// `GET /hostname` to `to` from inside `netns`: the server's answer, or why there is none.
fn hostname(netns: &Path, to: SocketAddr) -> Result<String, String> {
    let ns = keyway_sap::sys::Netns::open(netns).map_err(|e| e.to_string())?;
    let mut s = ns
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET /hostname HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("read: {e}"))?;
    reply
        .split("\r\n\r\n")
        .nth(1)
        .map(|b| b.trim().to_string())
        .ok_or_else(|| format!("no body in {reply:?}"))
}

/// NetworkPolicy's truth tables for the cluster, port 80 and port 81: what Kubernetes says,
/// whichever way the connection travels.
const TRUTH_80: &str = "
-        amb/a amb/b amb/c plain/d
amb/a    .     .     .     .
amb/b    .     .     .     .
amb/c    X     X     .     X
plain/d  .     X     .     .
";
const TRUTH_81: &str = "
-        amb/a amb/b amb/c plain/d
amb/a    .     X     .     .
amb/b    .     .     .     .
amb/c    .     X     .     X
plain/d  .     X     .     .
";
/// With STRICT mTLS, plain/d (outside the mesh) reaches no meshed pod, whatever policy says.
const STRICT_80: &str = "
-        amb/a amb/b amb/c plain/d
amb/a    .     .     .     .
amb/b    .     .     .     .
amb/c    X     X     .     X
plain/d  X     X     X     .
";

/// Probes the lab `via` until the matrix is `truth` (or the attempts are spent), printing it.
fn matrix_through_ztunnel(lab: &Lab, port: u16, via: Via, truth: &str) -> (Matrix, Matrix) {
    let want = Matrix::parse(truth).unwrap();
    let how = LabProbing {
        timeout: Duration::from_secs(3),
        attempts: 3,
        pause: Duration::from_millis(500),
    };
    let (got, _) = probe_until(lab, port, "TCP", via, &want, how).expect("probe");
    eprintln!("TCP {port} via {via:?}, through ztunnel:\n{got}");
    (got, want)
}

/// The packets the `mesh-ingress` chain of the pod table in `netns` dropped.
fn mesh_ingress_drops(netns: &Path) -> u64 {
    let ns = netns.file_name().unwrap().to_str().unwrap();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "nft",
            "list",
            "chain",
            "inet",
            "keyway",
            "mesh-ingress",
        ])
        .output()
        .expect("nft");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.contains("drop"))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "packets")?;
            w.next()?.parse::<u64>().ok()
        })
        .sum()
}

/// Packets in `pcap` matching the tcpdump `filter`.
fn count(pcap: &Path, filter: &str) -> usize {
    let out = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(pcap)
        .arg(filter)
        .stderr(Stdio::null())
        .output()
        .expect("tcpdump");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn ambient_pods_reach_each_other_through_ztunnel_over_the_overlay() {
    if !privileged("ambient") {
        return;
    }
    let Some(ztunnel) = find_ztunnel() else {
        assert!(std::env::var_os("CI").is_none(), "{BUILD_ZTUNNEL}");
        eprintln!("skipped: {BUILD_ZTUNNEL}");
        return;
    };
    let scratch = Scratch::new("ambient");
    let dir = scratch.join("lab");
    let _down = DownOnDrop(dir.clone());
    let file = scratch.join("cluster.yaml");
    std::fs::write(&file, CLUSTER).unwrap();
    let plan = Plan {
        prefix: "kwz".into(),
        nodes: 0,
        pod_octet: 242,
        underlay_octet: 86,
    };
    let mut lab = Lab::up_with(&dir, &[file], 2, plan.clone(), true).expect("lab up");
    let labels = [(
        "amb".to_string(),
        [(DATAPLANE_MODE_LABEL.to_string(), AMBIENT.to_string())].into(),
    )]
    .into();
    let pods = ambient_pods(&lab, &labels);
    assert_eq!(pods.len(), 3, "a, b and c are ambient");
    let ambient = Ambient::start(
        &lab,
        &ztunnel,
        &pods,
        &scratch.join("ambient"),
        Mtls::Permissive,
    )
    .expect("ztunnels");
    let pod = |name: &str| {
        pods.iter()
            .find(|p| p.name == name)
            .expect("an ambient pod")
    };
    let (a, b) = (pod("a"), pod("b"));

    // kubelet's probe of b, from b's node: SNATed to Istio's probe address, admitted.
    let node2 = Path::new("/var/run/netns").join(&lab.state.nodes[1].netns);
    assert_eq!(
        hostname(&node2, SocketAddr::new(b.pod_ip, 80)).as_deref(),
        Ok("b"),
        "the probe passes"
    );

    // a -> b by pod IP, through a's ztunnel, HBONE to b's ztunnel, b's application; a capture on
    // the underlay meanwhile.
    let pcap = scratch.join("underlay.pcap");
    let mut capture = Command::new("ip")
        .args([
            "netns",
            "exec",
            &plan.underlay_netns(),
            "tcpdump",
            "-i",
            "any",
            "-nn",
            "-U",
            "-w",
        ])
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump on the underlay");
    std::thread::sleep(Duration::from_millis(1000));
    let got = hostname(&a.netns, SocketAddr::new(b.pod_ip, 80));
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill").arg(capture.id().to_string()).status();
    let _ = capture.wait();
    let ztunnel_b = std::fs::read_to_string(&ambient.logs[1]).unwrap_or_default();
    assert_eq!(
        got.as_deref(),
        Ok("b"),
        "a reaches b; b's ztunnel:\n{ztunnel_b}"
    );
    let inbound = ztunnel_b.lines().any(|l| {
        l.contains("connection complete")
            && l.contains("direction=\"inbound\"")
            && l.contains(&format!("dst.hbone_addr={}:80", b.pod_ip))
            && l.contains("src.workload=\"a\"")
    });
    assert!(
        inbound,
        "b's ztunnel took a's HBONE connection:\n{ztunnel_b}"
    );
    let gue = count(&pcap, "udp port 6080");
    let hbone = count(&pcap, "tcp port 15008");
    let pods_ips = [a.pod_ip, b.pod_ip].map(|ip: IpAddr| ip.to_string());
    eprintln!("underlay: {gue} GUE datagrams, {hbone} HBONE segments ({pods_ips:?})");
    assert!(gue > 0, "the connection travelled as GUE");
    assert_eq!(
        hbone, 0,
        "no HBONE on the underlay: it is inside the overlay"
    );

    // NetworkPolicy on the real port, through ztunnel. a -> b on 81: ztunnel takes a's
    // connection and carries it as HBONE (a may reach b on 80, so 15008 is open between them),
    // and b's table refuses ztunnel's hand-over to port 81.
    // With the kernel fast path carrying the overlay's established flows (the agents' default),
    // then with every agent restarted on the user-space path alone.
    for datapath in ["auto", "user"] {
        if datapath == "user" {
            lab.set_datapath(datapath).expect("agents restarted");
        }
        for (port, via, truth) in [
            (80, Via::PodIp, TRUTH_80),
            (81, Via::PodIp, TRUTH_81),
            // By Service name, the same: ztunnel answers the meshed pods' queries for the
            // Services it knows (in the pod: amb/c's egress policy does not stop it) and carries
            // a connection to a cluster IP as HBONE to the endpoint, where the real port is
            // checked.
            (80, Via::Dns, TRUTH_80),
        ] {
            let (got, want) = matrix_through_ztunnel(&lab, port, via, truth);
            assert!(
                got.diff(&want).is_empty(),
                "{datapath}: port {port} via {via:?} through ztunnel is NetworkPolicy's truth table: {:?}",
                got.diff(&want)
            );
        }
    }
    lab.set_datapath("auto").expect("agents restarted");
    // (Counted from here: a restarted agent installs the pod's table again, with new counters.)
    let before = mesh_ingress_drops(&b.netns);
    let ns = keyway_sap::sys::Netns::open(&a.netns).unwrap();
    let accepted = ns
        .run(|| TcpStream::connect_timeout(&SocketAddr::new(b.pod_ip, 81), Duration::from_secs(3)))
        .unwrap();
    assert!(
        accepted.is_ok(),
        "ztunnel accepts a's connection to b:81 ({accepted:?})"
    );
    // ztunnel accepts at once, then carries the connection as HBONE to b's ztunnel, which hands
    // it over: the drop comes a little after the accept.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut dropped = mesh_ingress_drops(&b.netns);
    while dropped <= before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        dropped = mesh_ingress_drops(&b.netns);
    }
    assert!(
        dropped > before,
        "b's table dropped ztunnel's hand-over on 81 ({before} -> {dropped})"
    );
    drop(ambient);

    // STRICT mTLS, mesh-wide: meshed pairs connect as before; plain/d is refused by ztunnel.
    let strict = Ambient::start(
        &lab,
        &ztunnel,
        &pods,
        &scratch.join("ambient-strict"),
        Mtls::Strict,
    )
    .expect("ztunnels, STRICT");
    let ztunnel_a = || std::fs::read_to_string(&strict.logs[0]).unwrap_or_default();
    for via in [Via::PodIp, Via::Dns] {
        let (got, want) = matrix_through_ztunnel(&lab, 80, via, STRICT_80);
        assert!(
            got.diff(&want).is_empty(),
            "STRICT via {via:?}: {:?}\nztunnel of node-1:\n{}",
            got.diff(&want),
            ztunnel_a()
        );
    }
    let ztunnel_a = ztunnel_a();
    assert!(
        ztunnel_a.contains("istio_converted_static_strict"),
        "the refusal is ztunnel's STRICT policy:\n{ztunnel_a}"
    );
}
