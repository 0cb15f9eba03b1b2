//! Istio ambient on keyway with a real ztunnel (issue 16): two lab nodes, an ambient namespace
//! whose pods a real ztunnel per node serves in in-pod mode, fed as istio-cni would feed it. What
//! it shows so far: kubelet's probes (SNATed to Istio's probe address) pass; an ambient pod
//! reaches another by pod IP through both ztunnels, and the HBONE connection between them travels
//! keyway's overlay: on the underlay there is GUE and no HBONE.
//!
//! The ztunnel binary is found through `ZTUNNEL`, then `PATH`, then `../shared/ztunnel/`; without
//! one the test fails under `CI` and is skipped otherwise, saying how to build it.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use keyway_conformance::ambient::{
    AMBIENT, Ambient, BUILD_ZTUNNEL, DATAPLANE_MODE_LABEL, ambient_pods, find_ztunnel,
};
use keyway_conformance::lab::{DownOnDrop, Lab};
use keyway_conformance::topology::Plan;
use keyway_testing::{Scratch, privileged};

const CLUSTER: &str = "apiVersion: v1
kind: Namespace
metadata: {name: amb, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: amb, labels: {app: a}}
spec:
  nodeName: node-1
  containers:
    - {name: serve-80-tcp, image: registry.k8s.io/e2e-test-images/agnhost:2.53, ports: [{containerPort: 80, name: serve-80-tcp, protocol: TCP}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: amb, labels: {app: b}}
spec:
  nodeName: node-2
  containers:
    - {name: serve-80-tcp, image: registry.k8s.io/e2e-test-images/agnhost:2.53, ports: [{containerPort: 80, name: serve-80-tcp, protocol: TCP}]}
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
    let lab = Lab::up_with(&dir, &[file], 2, plan.clone(), true).expect("lab up");
    let labels = [(
        "amb".to_string(),
        [(DATAPLANE_MODE_LABEL.to_string(), AMBIENT.to_string())].into(),
    )]
    .into();
    let pods = ambient_pods(&lab, &labels);
    assert_eq!(pods.len(), 2, "a and b are ambient");
    let ambient =
        Ambient::start(&lab, &ztunnel, &pods, &scratch.join("ambient")).expect("ztunnels");
    let (a, b) = (&pods[0], &pods[1]);
    assert_eq!((a.name.as_str(), b.name.as_str()), ("a", "b"));

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
}
