//! `keyway-sap` as a user runs it: two endpoints and a gateway SaP, three processes in three
//! namespaces on one underlay bridge. An IPv6 overlay over an IPv4 underlay, every packet through
//! the SaP; the SaP's own allow list decides.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keyway_testing::{Scratch, TestNetns, eventually, privileged, run};

const BIN: &str = env!("CARGO_BIN_EXE_keyway-sap");

struct Lan {
    _lan: TestNetns,
    nodes: Vec<TestNetns>,
}

/// A bridge in its own namespace and one namespace per host on it, 10.8.0.(i+1)/24.
fn lan(test: &str, hosts: &[&str]) -> Lan {
    let lan = TestNetns::new(test, "lan");
    lan.sh(&["ip", "link", "add", "br0", "type", "bridge"]);
    lan.sh(&["ip", "link", "set", "br0", "up"]);
    let mut nodes = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let ns = TestNetns::new(test, h);
        let port = format!("p{i}");
        run(&[
            "ip", "link", "add", "eth0", "netns", &ns.name, "type", "veth", "peer", "name", &port,
            "netns", &lan.name,
        ]);
        lan.sh(&["ip", "link", "set", &port, "master", "br0", "up"]);
        ns.sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.8.0.{}/24", i + 1),
            "dev",
            "eth0",
        ]);
        ns.sh(&["ip", "link", "set", "eth0", "up"]);
        nodes.push(ns);
    }
    Lan { _lan: lan, nodes }
}

/// A running `keyway-sap`, killed if the test panics before stopping it.
struct Proc(Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(ns: &TestNetns, config: &str, dir: &std::path::Path, name: &str) -> Proc {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).unwrap();
    Command::new("ip")
        .args(["netns", "exec", &ns.name, BIN, "--log-json", "--config"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .map(|c| Proc(Some(c)))
        .unwrap()
}

/// Stops a process with SIGTERM and returns its JSON log lines.
fn stop(mut p: Proc) -> Vec<serde_json::Value> {
    let child = p.0.take().unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    // `ip netns exec` passes the signal on by exec'ing the binary in place.
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn sap_packets(logs: &[serde_json::Value]) -> u64 {
    logs.iter()
        .filter(|l| l["fields"]["stage"] == "sap" && l["fields"]["message"] == "counters")
        .filter_map(|l| l["fields"]["packets"].as_u64())
        .next_back()
        .unwrap_or(0)
}

/// One endpoint host: entity name, underlay address, overlay address, key.
struct Host(&'static str, &'static str, &'static str, &'static str);

const A: Host = Host("ext/a", "10.8.0.1", "fd6b::a", "0x0000000a");
const B: Host = Host("ext/b", "10.8.0.2", "fd6b::b", "0x0000000b");

fn endpoint(me: &Host, peer: &Host) -> String {
    let (Host(name, ip, addr, key), Host(pname, pip, paddr, pkey)) = (me, peer);
    format!(
        r#"mode: endpoint
listen: {ip}:6080
saps: [10.8.0.3]
endpoint:
  entity: {name}
  device: kw1
  address: {addr}/128
  routes: ["fd6b::/64"]
  key: "{key}"
entities:
  - entity: {pname}
    prefixes: ["{paddr}/128"]
    infra: {pip}:6080
    sap: 10.8.0.3:6080
    key: "{pkey}"
"#
    )
}

fn gateway(allow_ports: &str) -> String {
    format!(
        r#"mode: sap
listen: 10.8.0.3:6080
saps: [10.8.0.3]
entities:
  - {{entity: ext/a, prefixes: ["fd6b::a/128"], infra: "10.8.0.1:6080", key: "0x0000000a"}}
  - {{entity: ext/b, prefixes: ["fd6b::b/128"], infra: "10.8.0.2:6080", key: "0x0000000b"}}
allow:
  - {{from: ext/a, to: ext/b, ports: [{allow_ports}]}}
"#
    )
}

fn ping6(ns: &TestNetns, to: &str) -> bool {
    ns.exec(&["ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", to])
        .status
        .success()
}

fn wait_until(what: &str, ready: impl FnMut() -> bool) {
    eventually(what, Duration::from_secs(5), ready);
}

/// The endpoint is serving once its device has carrier (LOWER_UP: a process is attached) and the
/// overlay route is in place.
fn wait_for_endpoint(ns: &TestNetns) {
    wait_until(&format!("endpoint in {}", ns.name), || {
        let link =
            String::from_utf8_lossy(&ns.exec(&["ip", "link", "show", "kw1"]).stdout).into_owned();
        let route =
            String::from_utf8_lossy(&ns.exec(&["ip", "-6", "route", "show", "fd6b::/64"]).stdout)
                .into_owned();
        link.contains("LOWER_UP") && route.contains("kw1")
    });
}

fn wait_for_sap(ns: &TestNetns) {
    wait_until(&format!("SaP in {}", ns.name), || {
        !ns.exec(&["ss", "-Hlun", "sport", "= :6080"])
            .stdout
            .is_empty()
    });
}

fn setup(test: &str, allow_ports: &str) -> (Lan, Scratch, Vec<Proc>) {
    let lan = lan(test, &["a", "b", "g"]);
    let dir = Scratch::new(test);
    let a = spawn(&lan.nodes[0], &endpoint(&A, &B), dir.path(), "a");
    let b = spawn(&lan.nodes[1], &endpoint(&B, &A), dir.path(), "b");
    let g = spawn(&lan.nodes[2], &gateway(allow_ports), dir.path(), "g");
    wait_for_endpoint(&lan.nodes[0]);
    wait_for_endpoint(&lan.nodes[1]);
    wait_for_sap(&lan.nodes[2]);
    (lan, dir, vec![a, b, g])
}

#[test]
fn endpoints_talk_through_a_gateway_sap() {
    if !privileged("endpoints_talk_through_a_gateway_sap") {
        return;
    }
    // No ports: a → b allows everything; b's replies ride on the SaP's reflexive check.
    let (lan, _dir, mut procs) = setup("sapbin", "");
    assert!(
        ping6(&lan.nodes[0], "fd6b::b"),
        "a reaches b through the SaP"
    );
    assert!(
        !ping6(&lan.nodes[1], "fd6b::a"),
        "b may not open flows to a"
    );
    let g = procs.pop().unwrap();
    let logs = stop(g);
    assert!(
        sap_packets(&logs) >= 4,
        "the SaP forwarded both directions: {logs:?}"
    );
    for p in procs {
        stop(p);
    }
    // The endpoints removed their devices on exit.
    for n in &lan.nodes[..2] {
        assert!(!n.exec(&["ip", "link", "show", "kw1"]).status.success());
    }
}

#[test]
fn the_gateway_denies_what_its_policy_does_not_allow() {
    if !privileged("the_gateway_denies_what_its_policy_does_not_allow") {
        return;
    }
    let (lan, _dir, mut procs) = setup("sapdeny", "tcp/80");
    assert!(!ping6(&lan.nodes[0], "fd6b::b"), "only TCP 80 is allowed");
    let logs = stop(procs.pop().unwrap());
    let denied = logs
        .iter()
        .filter(|l| l["fields"]["stage"] == "sap")
        .filter_map(|l| l["fields"]["drops"].as_str())
        .next_back()
        .unwrap_or_default()
        .to_string();
    assert!(denied.contains("denied_by_policy=2"), "{denied:?}");
    for p in procs {
        stop(p);
    }
}

#[test]
fn a_bad_config_exits_64_with_a_reason() {
    let dir = Scratch::new("sapbadcfg");
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "mode: endpoint\nlisten: 1.2.3.4:6080\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs an `endpoint` section"));
}
