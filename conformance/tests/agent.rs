//! keyway-agent with pods made through the real chain (bridge + host-local + keyway) on simulated
//! nodes: pods talk over the overlay; a denying policy blocks, counted by reason in /metrics;
//! traffic between nodes goes through the destination's SaP; a SIGKILLed agent comes back without
//! any pod being recreated; pods on an IPv6 overlay too have their flows carried by the kernel,
//! across a restart; malformed handoff messages are refused and change nothing; egress off the
//! overlay follows ipBlock rules in the pod's own nftables table.

use std::os::fd::AsFd;
use std::time::{Duration, SystemTime};

use keyway_conformance::harness::TestCluster;
use keyway_protocol::handoff::{self, Request};
use keyway_sap::sys;
use keyway_testing::{eventually, privileged};

const DENY_B: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-b, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Ingress]\n";

#[test]
fn pods_talk_over_the_overlay_and_a_denying_policy_blocks_with_a_counted_drop() {
    if !privileged("pods_talk_over_the_overlay") {
        return;
    }
    let c = TestCluster::new("agtalk", 1, 101);
    let a = c.pod(1, "t", "a", &[("app", "a")]);
    let b = c.pod(1, "t", "b", &[("app", "b")]);
    assert!(a.ping(&b.overlay_ip, 3), "a reaches b over the overlay");
    assert!(b.ping(&a.overlay_ip, 3), "b reaches a over the overlay");
    a.tcp(&b, &b.overlay_ip, 8080)
        .expect("TCP over the overlay");
    // By pod IP too: a's traffic to b's pod IP is steered into the overlay.
    assert!(
        a.ping(&b.infra_ip, 2),
        "a reaches b's pod IP, over the overlay"
    );
    a.tcp(&b, &b.infra_ip, 8081)
        .expect("TCP to b's pod IP, over the overlay");
    // Around keyway — from a's eth0 — nothing arrives, and it is counted: by the node's gateway,
    // where the bridge hands it (an overlay source never enters there), or by b's own table.
    let agent = c.agent(1);
    let counted = || {
        b.bypass_drops()
            + agent.metric("keyway_datapath_drops_total{stage=\"gateway\",reason=\"off_overlay\"}")
                as u64
    };
    let drops = counted();
    assert!(
        !a.ping_bypassing(&b.infra_ip, 2),
        "ping from eth0 to b's pod IP does not arrive"
    );
    assert!(counted() >= drops + 2, "the bypass was counted");

    // A workload cannot speak GUE itself: datagrams from a's own socket to b's endpoint port
    // are dropped in a's table, so b's endpoint never sees them (else it would count bad keys).
    let seen_by_b = || {
        agent.metric("keyway_datapath_drops_total{stage=\"ingress\",reason=\"bad_key\"}")
            + agent.metric("keyway_datapath_drops_total{stage=\"ingress\",reason=\"malformed\"}")
    };
    let before = seen_by_b();
    let to: std::net::SocketAddr = format!("{}:6080", b.infra_ip).parse().unwrap();
    a.netns
        .netns()
        .run(|| -> std::io::Result<()> {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            for _ in 0..5 {
                let _ = s.send_to(b"\x01\x04\x80\x00\x12\x34\x56\x78forged", to);
            }
            Ok(())
        })
        .unwrap()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(seen_by_b(), before, "forged GUE reached b's endpoint");
    let table = a.netns.exec(&["nft", "list", "table", "inet", "keyway"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.contains("workloads never speak it") && l.contains("packets 5 ")),
        "a's table dropped the five datagrams:\n{table}"
    );

    let series = "keyway_datapath_drops_total{stage=\"egress\",reason=\"denied_by_policy\"}";
    let before = agent.metric(series);
    c.apply("deny-b.yaml", DENY_B);
    eventually(
        "the deny policy takes effect",
        Duration::from_secs(5),
        || !a.ping(&b.overlay_ip, 1),
    );
    assert!(!a.ping(&b.overlay_ip, 2));
    assert!(
        !a.ping(&b.infra_ip, 2),
        "denied by pod IP as by overlay address"
    );
    assert!(
        agent.metric(series) >= before + 4.0,
        "drops counted by reason:\n{}",
        agent.metrics()
    );
    assert!(
        b.ping(&a.overlay_ip, 2),
        "a is not isolated: b still reaches it"
    );
    // These machines' kernel loads keyway's eBPF programs, and the agent says so.
    assert_eq!(
        agent.metric("keyway_bpf_available"),
        1.0,
        "{}",
        agent.metrics()
    );

    c.remove("deny-b.yaml");
    eventually(
        "removing the policy restores traffic",
        Duration::from_secs(5),
        || a.ping(&b.overlay_ip, 1),
    );
    c.delete(&a);
    c.delete(&b);
}

const DENY_A: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-a, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Ingress]\n";

/// Runs `ping` in `pod`'s namespace with echo identifier `id`; the replies it got.
fn ping_with_id(
    pod: &keyway_conformance::harness::TestPod,
    to: &str,
    id: u16,
    count: u32,
) -> usize {
    let out = pod.netns.exec(&[
        "ping",
        "-e",
        &id.to_string(),
        "-c",
        &count.to_string(),
        "-i",
        "0.05",
        "-W",
        "1",
        to,
    ]);
    reply_lines(&String::from_utf8_lossy(&out.stdout)).count()
}

/// The replies to a pod's own pings are admitted as replies; they must never admit its peer's
/// echo requests, which its ingress policy refuses — on the kernel's fast path too, where both
/// ends cache the replies' flow while the pod pings (its requests and its replies are two flows:
/// were they one, the peer's kernel would send its requests and the pod's kernel deliver them).
#[test]
fn a_pods_own_pings_do_not_let_in_its_peers_pings_of_the_same_identifier() {
    if !privileged("a_pods_own_pings_do_not_let_in_its_peers_pings") {
        return;
    }
    let c = TestCluster::new("agecho", 1, 109);
    let a = c.pod(1, "t", "a", &[("app", "a")]);
    let b = c.pod(1, "t", "b", &[("app", "b")]);
    let agent = c.agent(1);
    c.apply("deny-a.yaml", DENY_A);
    eventually(
        "a's ingress policy takes effect",
        Duration::from_secs(5),
        || ping_with_id(&b, &a.overlay_ip, 4242, 1) == 0,
    );
    eventually(
        "both pods on the fast path",
        Duration::from_secs(10),
        || agent.metric("keyway_fastpath_pods") >= 2.0,
    );
    // Refused where the engine finds it first: at b's egress (which holds a's ingress policy
    // too), else at a's ingress.
    let denied = || {
        ["egress", "ingress"]
            .map(|stage| {
                agent.metric(&format!(
                    "keyway_datapath_drops_total{{stage=\"{stage}\",reason=\"denied_by_policy\"}}"
                ))
            })
            .iter()
            .sum::<f64>()
    };
    let before = denied();
    std::thread::scope(|s| {
        // a pings b (a's egress and b's ingress allow it) for three seconds, identifier 4242...
        let own = s.spawn(|| ping_with_id(&a, &b.overlay_ip, 4242, 60));
        // ...and, once those flows are the kernel's, b pings a with the same identifier.
        std::thread::sleep(Duration::from_secs(1));
        let peers = ping_with_id(&b, &a.overlay_ip, 4242, 20);
        assert_eq!(peers, 0, "b's echo requests got past a's ingress policy");
        assert_eq!(own.join().unwrap(), 60, "a's own pings all answered");
    });
    assert!(
        denied() >= before + 20.0,
        "b's 20 requests dropped by a's policy and counted:\n{}",
        agent.metrics()
    );
    c.remove("deny-a.yaml");
    c.delete(&a);
    c.delete(&b);
}

#[test]
fn traffic_between_nodes_goes_through_the_destination_sap_unless_direct() {
    if !privileged("traffic_between_nodes_goes_through_the_destination_sap") {
        return;
    }
    let c = TestCluster::new("agsap", 2, 102);
    let a = c.pod(1, "t", "a", &[("app", "a")]);
    let b = c.pod(2, "t", "b", &[("app", "b")]);
    // Each agent learns the other's pod from the shared state source.
    eventually("node-1 routes to b", Duration::from_secs(5), || {
        a.ping(&b.overlay_ip, 1)
    });
    let sap = "keyway_datapath_packets_total{stage=\"sap\"}";
    // A SaP in the kernel (an established ping is its) adds what it forwarded to the agent's
    // counters at the agent's next sync, every second: a count is read once it stops moving.
    let settled = |node: usize| {
        keyway_testing::settled(Duration::from_millis(1200), 5, || c.agent(node).metric(sap))
    };
    let (s1, s2) = (settled(1), settled(2));
    assert!(a.ping(&b.overlay_ip, 4));
    eventually(
        "requests went through node-2's SaP",
        Duration::from_secs(5),
        || c.agent(2).metric(sap) >= s2 + 4.0,
    );
    eventually(
        "replies went through node-1's SaP",
        Duration::from_secs(5),
        || c.agent(1).metric(sap) >= s1 + 4.0,
    );

    // A DirectPath: the pair bypasses SaPs and relies on keys alone.
    c.apply(
        "direct.yaml",
        "apiVersion: keyway.io/v1alpha1\nkind: DirectPath\nmetadata: {name: ab, namespace: t}\nspec:\n  a: {podSelector: {matchLabels: {app: a}}}\n  b: {podSelector: {matchLabels: {app: b}}}\n",
    );
    std::thread::sleep(Duration::from_millis(500));
    let (s1, s2) = (settled(1), settled(2));
    assert!(a.ping(&b.overlay_ip, 4));
    // Past a sync, when a SaP's kernel count would have reached the counters.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.agent(2).metric(sap), s2, "direct: no SaP on the way");
    assert_eq!(c.agent(1).metric(sap), s1);
    c.delete(&a);
    c.delete(&b);
}

/// Pod a on node-1 and pod b on node-2, with a NetworkPolicy that lets a reach b on TCP 8080
/// (and nothing else reach b), once a does.
fn pods_allowed_on_8080(
    c: &TestCluster,
) -> (
    keyway_conformance::harness::TestPod,
    keyway_conformance::harness::TestPod,
) {
    let a = c.pod(1, "t", "a", &[("app", "a")]);
    let b = c.pod(2, "t", "b", &[("app", "b")]);
    c.apply(
        "allow-b.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-b, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: a}}}]\n    ports: [{protocol: TCP, port: 8080}]\n",
    );
    eventually("a reaches b on 8080", Duration::from_secs(5), || {
        a.tcp(&b, &b.overlay_ip, 8080).is_ok()
    });
    (a, b)
}

/// Through a SaP, a connection's first datagrams (its SYN among them) are judged and forwarded
/// by the destination node's kernel SaP, from the policy the agent compiled into its maps: the
/// user-space SaP forwards none of them. (IPv6 inside: in
/// `ipv6_overlay_flows_ride_the_fast_path_through_the_sap_and_outlive_a_restart`.)
#[test]
fn a_connections_first_datagrams_cross_the_sap_in_the_kernel_by_compiled_policy() {
    if !privileged("a_connections_first_datagrams_cross_the_sap_in_the_kernel") {
        return;
    }
    let c = TestCluster::new("agpol", 2, 112);
    let (a, b) = pods_allowed_on_8080(&c);
    sap_forwards_connections_in_the_kernel(&c, &a, &b, &b.overlay_ip);
    c.delete(&a);
    c.delete(&b);
}

/// Five connections from `a` to `b` at `to`, port 8080, through node-2's SaP: their datagrams
/// (each connection's SYN, the ACK of the handshake, data, and the close, a to b) were let
/// through by node-2's kernel SaP by the compiled policy, and the user-space SaP forwarded none.
fn sap_forwards_connections_in_the_kernel(
    c: &TestCluster,
    a: &keyway_conformance::harness::TestPod,
    b: &keyway_conformance::harness::TestPod,
    to: &str,
) {
    let node2 = c.agent(2);
    // The gauge is set at the agent's periodic syncs, every second.
    eventually(
        "node-2's kernel SaP holds a compiled policy",
        Duration::from_secs(3),
        || node2.metric("keyway_fastpath_sap_policy_pairs") > 0.0,
    );
    // The SaP's counts reach /metrics at the agent's syncs: read once they stop moving.
    let counts = || {
        let read = || {
            [
                "keyway_datapath_packets_total{stage=\"sap\"}",
                "keyway_fastpath_sap_datagrams_total",
                "keyway_fastpath_sap_policy_datagrams_total",
            ]
            .map(|m| node2.metric(m))
        };
        keyway_testing::settled(Duration::from_millis(1200), 5, || {
            read().iter().sum::<f64>()
        });
        read()
    };
    let [sap0, kernel0, policy0] = counts();
    let connections = 5;
    for _ in 0..connections {
        a.tcp(b, to, 8080)
            .unwrap_or_else(|e| panic!("a connection to {to} allowed by policy: {e}"));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let [sap1, kernel1, policy1] = counts();
    eprintln!(
        "to {to}: node-2's SaP forwarded {} datagrams, the kernel {}, {} by the compiled policy",
        sap1 - sap0,
        kernel1 - kernel0,
        policy1 - policy0
    );
    assert!(
        policy1 - policy0 >= f64::from(connections) * 3.0,
        "the connections' datagrams through node-2's SaP were let through by the compiled policy: {} ",
        policy1 - policy0
    );
    assert_eq!(
        sap1 - sap0,
        kernel1 - kernel0,
        "every datagram node-2's SaP forwarded, the kernel forwarded: none by the user-space SaP"
    );
}

/// A flow's first packets (a TCP connection's SYN and SYN-ACK, a UDP exchange's datagram and
/// its answer, a ping's request and reply) are judged by the pods' own programs, from the policy
/// the agent compiled into the node's maps, both ways and at both ends: the user-space path
/// carries none of them.
#[test]
fn a_flows_first_packets_cross_both_pods_in_the_kernel_by_compiled_policy_tcp_udp_and_echo() {
    if !privileged("a_flows_first_packets_cross_both_pods_in_the_kernel") {
        return;
    }
    let c = TestCluster::new("agpod", 2, 113);
    let (a, b) = pods_allowed_on_8080(&c);
    let agents = [c.agent(1), c.agent(2)];
    for agent in &agents {
        eventually(
            "the node's compiled policy is in force",
            Duration::from_secs(3),
            || agent.metric("keyway_fastpath_sap_policy_pairs") > 0.0,
        );
    }
    // Per node: the endpoints' packets (both ways), those the pods' programs carried, and those
    // their compiled policy admitted; read once they stop moving (they reach /metrics at the
    // agents' syncs).
    let counts = || {
        let read = || {
            agents.each_ref().map(|n| {
                [
                    n.metric("keyway_datapath_packets_total{stage=\"egress\"}")
                        + n.metric("keyway_datapath_packets_total{stage=\"ingress\"}"),
                    n.metric("keyway_fastpath_pod_packets_total{direction=\"egress\"}")
                        + n.metric("keyway_fastpath_pod_packets_total{direction=\"ingress\"}"),
                    n.metric("keyway_fastpath_pod_policy_packets_total"),
                ]
            })
        };
        keyway_testing::settled(Duration::from_millis(1200), 5, || {
            read().iter().flatten().sum::<f64>()
        });
        read()
    };
    // `flows` flows of `what` made by `flow`: on each node, every packet of theirs crossed the
    // pod in the kernel, and the compiled policy admitted (at least) each flow's first packet one
    // way and its first reply the other (the rest may ride on the flows the kernel cached).
    let measure = |what: &str, flows: u32, flow: &dyn Fn() -> Result<(), String>| {
        let before = counts();
        for _ in 0..flows {
            flow().unwrap_or_else(|e| panic!("{what}: a flow allowed by policy: {e}"));
        }
        std::thread::sleep(Duration::from_millis(1500));
        let after = counts();
        for (node, (b, a)) in before.iter().zip(&after).enumerate() {
            let [all, kernel, policy] = [0, 1, 2].map(|i| a[i] - b[i]);
            eprintln!(
                "{what}, node-{}: {all} packets, {kernel} in the kernel, {policy} by compiled policy",
                node + 1
            );
            assert!(
                policy >= f64::from(flows) * 2.0,
                "{what}: node-{}'s pod admitted the flows' first packets by the compiled policy: {policy}",
                node + 1
            );
            assert_eq!(
                all,
                kernel,
                "{what}: node-{}: every packet of the flows crossed its pod in the kernel",
                node + 1
            );
        }
    };
    // Each connection: its SYN one way, its SYN-ACK the other, at each end.
    measure("TCP", 5, &|| a.tcp(&b, &b.overlay_ip, 8080));

    // UDP has no opening: a datagram is one only when the engine holds no flow it replies
    // within, which the kernel knows from its copy of the engine's UDP flows.
    c.apply(
        "allow-b-udp.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-b-udp, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: a}}}]\n    ports: [{protocol: UDP, port: 5353}]\n",
    );
    eventually("a reaches b on UDP 5353", Duration::from_secs(5), || {
        a.udp(&b, &b.overlay_ip, 5353).is_ok()
    });
    // Each exchange (from a new port): its datagram one way, the echo the other, at each end.
    measure("UDP", 5, &|| a.udp(&b, &b.overlay_ip, 5353));

    // A ping: NetworkPolicy allows ICMP only where a rule names no port.
    c.apply(
        "allow-b-all.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-b-all, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: a}}}]\n",
    );
    eventually("a pings b", Duration::from_secs(5), || {
        a.ping(&b.overlay_ip, 1)
    });
    // Each ping (a new identifier): its request one way, its reply the other, at each end.
    measure("echo", 5, &|| {
        a.ping(&b.overlay_ip, 1)
            .then_some(())
            .ok_or_else(|| "no reply".to_string())
    });
    c.delete(&a);
    c.delete(&b);
}

/// The lines of `ping` output that report a reply.
fn reply_lines(out: &str) -> impl Iterator<Item = &str> {
    out.lines().filter(|l| l.contains("bytes from"))
}

/// Parses `ping -D` output into the Unix times of the replies.
fn reply_times(out: &str) -> Vec<f64> {
    reply_lines(out)
        .filter_map(|l| {
            l.strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .and_then(|t| t.parse().ok())
        })
        .collect()
}

/// The sequence numbers of the echo requests `ping` sent that were not answered: every one
/// from the first answered to the last answered that has no reply.
fn unanswered(out: &str) -> Vec<u32> {
    let answered: std::collections::BTreeSet<u32> = reply_lines(out)
        .filter_map(|l| l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    match (answered.first(), answered.last()) {
        (Some(&first), Some(&last)) => (first..=last).filter(|s| !answered.contains(s)).collect(),
        _ => Vec::new(),
    }
}

/// A namespace's TCP senders' counters: segments retransmitted, and retransmitted segments the
/// receiver reported it already had (D-SACK). A retransmission without a D-SACK repaired a loss;
/// one with it was only early (a tail-loss probe after a delay, say).
fn tcp_retransmissions(pod: &keyway_conformance::harness::TestPod) -> (u64, u64) {
    let out = pod
        .netns
        .sh(&["nstat", "-asz", "TcpRetransSegs", "TcpExtTCPDSACKRecvSegs"]);
    let counter = |name: &str| {
        out.lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next()? == name).then(|| w.next()?.parse().ok())?
            })
            .unwrap_or(0)
    };
    (counter("TcpRetransSegs"), counter("TcpExtTCPDSACKRecvSegs"))
}

/// A ping from a pod, 20 a second with each reply's time (`ping -D`), written to a log until
/// stopped: what the restart tests hold across a kill.
struct SteadyPing {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl SteadyPing {
    fn start(
        from: &keyway_conformance::harness::TestPod,
        to: &str,
        log: std::path::PathBuf,
    ) -> Self {
        let child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &from.netns.name,
                "ping",
                "-D",
                "-i",
                "0.05",
            ])
            .args(["-W", "1", to])
            .stdout(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        SteadyPing { child, log }
    }

    /// Stops the ping as ^C would (its summary written) and returns its output.
    fn stop(mut self) -> String {
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap()
    }
}

/// The longest time between two replies, in seconds.
fn longest_pause(replies: &[f64]) -> f64 {
    replies.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max)
}

/// The id of the eBPF program keyway's tc filter runs on `dev`'s `at` (ingress or egress) in
/// namespace `netns`, as `tc` prints it ("... id N tag ..."); empty when there is none.
fn filter_program(netns: &str, dev: &str, at: &str) -> String {
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", netns, "tc", "filter", "show", "dev", dev, at,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "id")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// Every pod on an IPv4 overlay (`kw0`) and an IPv6 one (`kw1`).
const DUAL_STACK: &str = "apiVersion: keyway.io/v1alpha1\nkind: OverlayNetwork\nmetadata: {name: v4}\nspec: {cidr: 100.64.0.0/10, blockPrefix: 24, device: kw0}\n---\napiVersion: keyway.io/v1alpha1\nkind: OverlayNetwork\nmetadata: {name: v6}\nspec: {cidr: 'fd6b:7779::/48', blockPrefix: 112, device: kw1}\n";

/// A TCP stream of two seconds from `from` to `to` port 5201 (iperf3): the bytes sent and the
/// bytes received.
fn iperf(
    from: &keyway_conformance::harness::TestPod,
    server: &keyway_conformance::harness::TestPod,
    to: &str,
) -> (u64, u64) {
    let mut srv = std::process::Command::new("ip")
        .args(["netns", "exec", &server.netns.name])
        .args(["iperf3", "-s", "-1", "-p", "5201"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = from
        .netns
        .exec(&["iperf3", "-c", to, "-p", "5201", "-t", "2", "-J"]);
    let _ = srv.kill();
    let _ = srv.wait();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let end = &report["end"];
    (
        end["sum_sent"]["bytes"].as_u64().unwrap_or(0),
        end["sum_received"]["bytes"].as_u64().unwrap_or(0),
    )
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn a_killed_agent_restarts_without_recreating_any_pod() {
    if !privileged("a_killed_agent_restarts_without_recreating_any_pod") {
        return;
    }
    let mut c = TestCluster::new("agkill", 1, 103);
    let a = c.pod(1, "t", "a", &[("app", "a")]);
    let b = c.pod(1, "t", "b", &[("app", "b")]);
    assert!(a.ping(&b.overlay_ip, 2));
    let ifindex = |p: &keyway_conformance::harness::TestPod| {
        p.netns.sh(&["cat", "/sys/class/net/kw0/ifindex"])
    };
    let inode = |p: &keyway_conformance::harness::TestPod| {
        std::fs::metadata(p.netns.path())
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap()
    };
    let before = (ifindex(&a), ifindex(&b), inode(&a), inode(&b));
    // Where the kernel loads keyway's programs (the lab's tests assert that it does here), the
    // agent puts both pods on the fast path in the background: wait for it.
    let fast = eventually_or_not(Duration::from_secs(10), || {
        c.agent(1).metric("keyway_fastpath_pods") >= 2.0
    });

    // The programs on a's devices: a restarted agent takes them over with their maps rather
    // than replacing them with empty ones.
    let programs = |p: &keyway_conformance::harness::TestPod| {
        [("kw0", "egress"), ("eth0", "ingress")]
            .map(|(dev, at)| filter_program(&p.netns.name, dev, at))
    };
    let programs_before = programs(&a);

    // A TCP stream at a steady rate and a steady ping, 20 per second, while the agent is killed
    // and started again.
    let tcp_before = tcp_retransmissions(&a);
    let server = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &b.netns.name,
            "iperf3",
            "-s",
            "-1",
            "-p",
            "5201",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let stream = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &a.netns.name,
            "iperf3",
            "-c",
            &b.overlay_ip,
        ])
        .args(["-p", "5201", "-t", "5", "-b", "200M", "-J"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ping = SteadyPing::start(&a, &b.overlay_ip, c.scratch.join("ping.log"));
    std::thread::sleep(Duration::from_secs(1));
    let killed_at = unix_now();
    c.agent_mut(1).kill();
    std::thread::sleep(Duration::from_millis(500));
    let restarted_at = unix_now();
    c.agent_mut(1).restart();
    std::thread::sleep(Duration::from_secs(2));
    let text = ping.stop();
    let sent = stream.wait_with_output().unwrap();
    let tcp_after = tcp_retransmissions(&a);
    let retransmitted = tcp_after.0 - tcp_before.0;
    let lost = retransmitted.saturating_sub(tcp_after.1 - tcp_before.1);
    let mut server = server;
    let _ = server.kill();
    let _ = server.wait();
    let replies = reply_times(&text);
    let last_before = replies
        .iter()
        .copied()
        .filter(|t| *t < killed_at)
        .fold(0.0, f64::max);
    let first_after = replies
        .iter()
        .copied()
        .find(|t| *t > restarted_at)
        .expect("traffic came back");
    let back_in = first_after - restarted_at;
    let longest_pause = longest_pause(&replies);
    eprintln!(
        "agent SIGKILL: last reply {:.0} ms before the kill, first {:.0} ms after the restart; longest pause between replies {:.0} ms",
        (killed_at - last_before) * 1e3,
        back_in * 1e3,
        longest_pause * 1e3
    );
    assert!(
        back_in < 1.0,
        "traffic back {back_in:.3} s after the restart: not within 1 s"
    );
    assert!(
        replies.iter().any(|t| *t > restarted_at + 1.0),
        "and it stays back"
    );
    let report: serde_json::Value = serde_json::from_slice(&sent.stdout).unwrap_or_default();
    let end = &report["end"];
    let (bytes, received) = (
        end["sum_sent"]["bytes"].as_u64().unwrap_or(0),
        end["sum_received"]["bytes"].as_u64().unwrap_or(0),
    );
    eprintln!(
        "TCP stream across the kill: {bytes} bytes sent, {received} received, {retransmitted} segments retransmitted, {lost} of them not D-SACKed (lost); pings unanswered: {:?} (fast path: {fast})",
        unanswered(&text)
    );
    assert!(
        sent.status.success() && received > 0 && received == bytes,
        "the TCP stream outlived the kill: {}",
        String::from_utf8_lossy(&sent.stdout)
    );
    if fast {
        // Established flows are the kernel's: the agent's absence costs them nothing, not even
        // a pause (on the user-space path, the echoes sent while the agent is away are lost:
        // ten of them, a 0.64 s pause, with an agent that left pings to user space).
        assert_eq!(unanswered(&text), Vec::<u32>::new(), "no echo request lost");
        assert!(
            longest_pause < 0.25,
            "the ping paused for {:.0} ms around the kill",
            longest_pause * 1e3
        );
        assert_eq!(lost, 0, "no segment of the stream lost");
        assert!(
            programs_before.iter().all(|id| !id.is_empty()),
            "a's fast path is attached: {programs_before:?}"
        );
        assert_eq!(
            programs(&a),
            programs_before,
            "the restarted agent went on with the programs (and maps) the killed one left"
        );
        keyway_testing::eventually(
            "both pods' fast paths were taken over (keyway_fastpath_pods_adopted = 2)",
            Duration::from_secs(5),
            || c.agent(1).metric("keyway_fastpath_pods_adopted") == 2.0,
        );
    }
    assert_eq!(
        (ifindex(&a), ifindex(&b), inode(&a), inode(&b)),
        before,
        "no device or namespace was recreated"
    );
    let att = c.agent(1).attachments();
    assert_eq!(att["attachments"].as_array().unwrap().len(), 2, "{att}");
    c.delete(&a);
    c.delete(&b);
}

/// Pods on an IPv6 overlay too: a new connection's first datagrams cross node-2's SaP in the
/// kernel by the compiled policy (its IPv6 routes); a stream rides the fast path out of a,
/// through the SaP and into b; and a restarted agent takes every device's programs over.
#[test]
fn ipv6_overlay_flows_ride_the_fast_path_through_the_sap_and_outlive_a_restart() {
    if !privileged("ipv6_overlay_flows_ride_the_fast_path_through_the_sap_and_outlive_a_restart") {
        return;
    }
    let mut c = TestCluster::new("agv6", 2, 111);
    let generation = |n: usize| c.agent(n).metric("keyway_policy_generation");
    let before = [generation(1), generation(2)];
    c.apply("overlays.yaml", DUAL_STACK);
    eventually(
        "the agents compiled the overlay networks",
        Duration::from_secs(10),
        || (1..=2).all(|n| generation(n) > before[n - 1]),
    );
    // a on node-1, b on node-2: a's flows to b go through node-2's SaP.
    let a = c.pod(1, "t", "a", &[("app", "a")]);
    let b = c.pod(2, "t", "b", &[("app", "b")]);
    let att = c.agent(2).attachments();
    let b6 = att["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["containerId"] == b.rt.container_id.as_str())
        .flat_map(|x| x["overlayIps"].as_array().cloned().unwrap_or_default())
        .find_map(|ip| ip.as_str().filter(|s| s.contains(':')).map(String::from))
        .unwrap_or_else(|| panic!("b has an IPv6 overlay address: {att}"));
    assert!(a.ping(&b6, 2), "a pings b over the IPv6 overlay");
    for n in 1..=2 {
        assert_eq!(c.agent(n).metric("keyway_bpf_available"), 1.0);
        eventually("each pod on the fast path", Duration::from_secs(10), || {
            c.agent(n).metric("keyway_fastpath_pods") >= 1.0
        });
    }
    // One kw_egress on both overlay devices (and kw_ingress on eth0).
    let programs = |p: &keyway_conformance::harness::TestPod| {
        [("kw0", "egress"), ("kw1", "egress"), ("eth0", "ingress")]
            .map(|(dev, at)| filter_program(&p.netns.name, dev, at))
    };
    let before = programs(&a);
    assert!(
        before.iter().all(|id| !id.is_empty()) && before[0] == before[1],
        "kw_egress on a's kw0 and kw1, kw_ingress on eth0: {before:?}"
    );

    // A new connection's first datagrams through node-2's SaP: its kernel's, by the compiled
    // policy (its IPv6 routes).
    sap_forwards_connections_in_the_kernel(&c, &a, &b, &b6);

    // A TCP stream over IPv6: after its first packets, a's kernel sends it, node-2's kernel SaP
    // forwards it, and b's kernel delivers it.
    let metric = |node: usize, series: &str| c.agent(node).metric(series);
    let out_of_a = || metric(1, "keyway_fastpath_pod_bytes_total{direction=\"egress\"}");
    let into_b = || metric(2, "keyway_fastpath_pod_bytes_total{direction=\"ingress\"}");
    let by_sap = || metric(2, "keyway_fastpath_sap_datagrams_total");
    let (out0, in0, sap0) = (out_of_a(), into_b(), by_sap());
    let (sent, received) = iperf(&a, &b, &b6);
    // (A stream timed by the client: what was in flight at its end may not be counted received.)
    assert!(
        sent > 0 && received as f64 >= 0.99 * sent as f64,
        "{sent} bytes sent, {received} received"
    );
    let most = 0.9 * sent as f64;
    eventually(
        "the kernels carried at least 90% of the stream, out of a, through the SaP, into b",
        Duration::from_secs(5),
        || {
            out_of_a() - out0 >= most
                && into_b() - in0 >= most
                // Datagrams of at most 1,500 bytes.
                && by_sap() - sap0 >= most / 1500.0
        },
    );
    eprintln!(
        "IPv6 stream: {sent} bytes; the kernels carried {} out of a and {} into b; node-2's kernel SaP forwarded {} datagrams",
        out_of_a() - out0,
        into_b() - in0,
        by_sap() - sap0
    );

    // A restarted agent takes the programs over, the IPv6 device's with the rest.
    c.agent_mut(1).kill();
    c.agent_mut(1).restart();
    keyway_testing::eventually(
        "a's fast path was taken over",
        Duration::from_secs(5),
        || c.agent(1).metric("keyway_fastpath_pods_adopted") == 1.0,
    );
    assert_eq!(programs(&a), before, "the same programs, on every device");
    let (sent, received) = iperf(&a, &b, &b6);
    assert!(
        sent > 0 && received as f64 >= 0.99 * sent as f64,
        "after the restart: {sent} sent, {received} received"
    );
    c.delete(&a);
    c.delete(&b);
}

#[test]
fn a_restarted_agent_takes_over_its_kernel_sap_with_its_flows() {
    if !privileged("a_restarted_agent_takes_over_its_kernel_sap_with_its_flows") {
        return;
    }
    let mut c = TestCluster::new("agsapkill", 2, 110);
    let a = c.pod(1, "t", "a", &[("app", "a")]);
    let b = c.pod(2, "t", "b", &[("app", "b")]);
    eventually("node-1 routes to b", Duration::from_secs(5), || {
        a.ping(&b.overlay_ip, 1)
    });
    let node = c.nodes[1].clone();
    let sap_device = {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &node.netns,
                "ip",
                "-o",
                "-4",
                "addr",
                "show",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find(|l| l.contains(&format!(" {}/", node.ip)))
            .and_then(|l| l.split_whitespace().nth(1))
            .expect("a device holds node-2's address")
            .to_string()
    };
    let fast = eventually_or_not(Duration::from_secs(10), || {
        c.agent(2).metric("keyway_fastpath_pods") >= 1.0
            && !filter_program(&node.netns, &sap_device, "ingress").is_empty()
    });
    if !fast {
        eprintln!("no kernel fast path here: nothing to take over");
        return;
    }
    // A ping from a to b, 20 a second, through node-2's SaP (kernel-forwarded once
    // established), while node-2's agent is killed and started again.
    let sap_before = filter_program(&node.netns, &sap_device, "ingress");
    let ping = SteadyPing::start(&a, &b.overlay_ip, c.scratch.join("ping.log"));
    std::thread::sleep(Duration::from_secs(1));
    c.agent_mut(2).kill();
    std::thread::sleep(Duration::from_millis(500));
    c.agent_mut(2).restart();
    std::thread::sleep(Duration::from_secs(2));
    let text = ping.stop();
    let replies = reply_times(&text);
    let longest_pause = longest_pause(&replies);
    eprintln!(
        "node-2's agent SIGKILLed under a ping through its SaP: {} replies, longest pause {:.0} ms, unanswered {:?}",
        replies.len(),
        longest_pause * 1e3,
        unanswered(&text)
    );
    assert_eq!(unanswered(&text), Vec::<u32>::new(), "no echo request lost");
    assert!(
        longest_pause < 0.25,
        "the ping paused for {:.0} ms",
        longest_pause * 1e3
    );
    assert_eq!(
        filter_program(&node.netns, &sap_device, "ingress"),
        sap_before,
        "the restarted agent went on with the kernel SaP (and its flows) the killed one left"
    );
    eventually(
        "node-2's agent reports its node's fast path taken over",
        Duration::from_secs(5),
        || c.agent(2).metric("keyway_fastpath_node_adopted") == 1.0,
    );
    c.delete(&a);
    c.delete(&b);
}

/// Whether `f` holds within `within` (polled every 100 ms).
fn eventually_or_not(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn malformed_handoff_messages_are_refused_and_change_nothing() {
    if !privileged("malformed_handoff_messages_are_refused_and_change_nothing") {
        return;
    }
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let c = TestCluster::new("aghand", 1, 104);
    let a = c.pod(1, "t", "a", &[("app", "a")]);
    let before = c.agent(1).attachments();
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&sock),
        &UnixAddr::new(&c.agent(1).socket).unwrap(),
    )
    .unwrap();
    let ask = |rec: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]| -> handoff::Ack {
        sys::send_with_fds(sock.as_fd(), rec, fds).unwrap();
        let mut buf = vec![0u8; handoff::MAX_RECORD];
        let got = sys::recv_with_fds(sock.as_fd(), &mut buf).unwrap();
        handoff::Ack::decode(&buf[..got.len]).unwrap()
    };
    let del = Request::Delete(handoff::AttachmentRequest {
        attachment: handoff::Attachment {
            container_id: a.rt.container_id.clone(),
            ifname: "eth0".into(),
        },
        pod: None,
    })
    .encode();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            del[..del.len() - 2].to_vec(),
            "truncated or padded",
        ),
        (
            "oversized",
            vec![b'K'; handoff::MAX_RECORD + 100],
            "larger than",
        ),
        (
            "bad magic",
            [b"XYZ".as_slice(), &del[3..]].concat(),
            "magic",
        ),
        (
            "future version",
            [b"KWH\x09".as_slice(), &del[4..]].concat(),
            "version 9",
        ),
        ("header only", del[..5].to_vec(), "shorter than"),
    ];
    for (what, rec, needle) in cases {
        let ack = ask(&rec, &[]);
        let err = ack.error.unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(err.message.contains(needle), "{what}: {}", err.message);
        assert_eq!(err.code, 6, "{what}: decode failure");
    }
    // An Add without the namespace descriptor, and one with a descriptor that is not a namespace.
    let add = Request::Add(handoff::AddRequest {
        attachment: handoff::Attachment {
            container_id: "intruder".into(),
            ifname: "eth0".into(),
        },
        pod: handoff::PodRef {
            namespace: "t".into(),
            name: "a".into(),
            uid: String::new(),
        },
        netns_path: "/proc/1/ns/net".into(),
        infra_ip: "10.0.0.9".parse().unwrap(),
        mtu: 1500,
        networks: vec![],
        node_addresses: vec![],
    })
    .encode();
    let ack = ask(&add, &[]);
    assert!(
        ack.error
            .unwrap()
            .message
            .contains("must carry 1 descriptor")
    );
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let ack = ask(&add, &[devnull.as_fd()]);
    assert!(
        ack.error
            .unwrap()
            .message
            .contains("not a network namespace")
    );
    // The connection still serves well-formed requests, and nothing changed.
    assert!(ask(&Request::Status.encode(), &[]).error.is_none());
    // An empty record reads as end-of-stream on SOCK_SEQPACKET: the agent hangs up, nothing else.
    sys::send_with_fds(sock.as_fd(), &[], &[]).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        sys::recv_with_fds(sock.as_fd(), &mut buf).unwrap().len,
        0,
        "connection closed"
    );
    let fresh = handoff::Client::connect(&c.agent(1).socket, Duration::from_secs(2)).unwrap();
    assert!(fresh.call(&Request::Status, None).is_ok());
    let after = c.agent(1).attachments();
    assert_eq!(before["attachments"], after["attachments"]);
    assert!(a.ping(&a.overlay_ip, 1));
}

/// Serves TCP on `addr` inside the node's namespace (a destination off the overlay) until dropped.
struct NodeServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodeServer {
    fn start(netns: &str, addr: std::net::SocketAddr) -> NodeServer {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let ns = sys::Netns::open(format!("/var/run/netns/{netns}")).unwrap();
        let listener = ns
            .run(|| std::net::TcpListener::bind(addr))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).ok();
                        c.set_read_timeout(Some(Duration::from_secs(1))).ok();
                        let mut b = [0u8; 16];
                        let n = c.read(&mut b).unwrap_or(0);
                        let _ = c.write_all(&b[..n]);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        NodeServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for NodeServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP exchange from inside `pod` with `addr` off the overlay.
fn reaches(pod: &keyway_conformance::harness::TestPod, addr: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    pod.netns
        .netns()
        .run(|| {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            s.write_all(b"keyway")?;
            let mut b = [0u8; 6];
            s.read_exact(&mut b)
        })
        .unwrap()
        .is_ok()
}

#[test]
fn egress_off_the_overlay_follows_ipblock_policy_in_the_pods_nftables() {
    if !privileged("egress_off_the_overlay_follows_ipblock_policy") {
        return;
    }
    let c = TestCluster::new("agegress", 1, 107);
    let node = &c.nodes[0];
    let a = c.pod(1, "t", "a", &[("app", "a")]);
    let open = std::net::SocketAddr::new(node.ip.into(), 9090);
    let other_port = std::net::SocketAddr::new(node.ip.into(), 9091);
    let _s1 = NodeServer::start(&node.netns, open);
    let _s2 = NodeServer::start(&node.netns, other_port);
    assert!(reaches(&a, open), "no policy: off-overlay egress is open");
    assert!(reaches(&a, other_port));

    let policy = |egress: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: egress-a, namespace: t}}\nspec:\n  podSelector: {{matchLabels: {{app: a}}}}\n  policyTypes: [Egress]\n  egress: {egress}\n"
        )
    };
    // Egress-isolated with no rule: nothing off the overlay.
    c.apply("egress-a.yaml", &policy("[]"));
    eventually(
        "an egress-isolated pod reaches nothing off the overlay",
        Duration::from_secs(5),
        || !reaches(&a, open),
    );
    assert!(!reaches(&a, other_port));

    // An ipBlock with a port: that address and port only.
    c.apply(
        "egress-a.yaml",
        &policy(&format!(
            "[{{to: [{{ipBlock: {{cidr: {}/32}}}}], ports: [{{port: 9090, protocol: TCP}}]}}]",
            node.ip
        )),
    );
    eventually(
        "the allowed block and port open",
        Duration::from_secs(5),
        || reaches(&a, open),
    );
    assert!(
        !reaches(&a, other_port),
        "the port the rule does not name stays closed"
    );
    let table = a.netns.exec(&["nft", "list", "table", "inet", "keyway"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&node.ip.to_string()) && table.contains("9090"),
        "the pod's own table holds the rule:\n{table}"
    );

    // The address in the block's `except`: closed again.
    let underlay = ipnetwork::Ipv4Network::new(node.ip, 24).unwrap();
    c.apply(
        "egress-a.yaml",
        &policy(&format!(
            "[{{to: [{{ipBlock: {{cidr: {}/24, except: [{}/32]}}}}]}}]",
            underlay.network(),
            node.ip
        )),
    );
    eventually(
        "the excepted address closes",
        Duration::from_secs(5),
        || !reaches(&a, open),
    );
    assert!(!reaches(&a, other_port));

    // The policy deleted: open again, and the pod's table says so.
    c.remove("egress-a.yaml");
    eventually(
        "deleting the policy reopens egress",
        Duration::from_secs(5),
        || reaches(&a, open) && reaches(&a, other_port),
    );
    c.delete(&a);
}
