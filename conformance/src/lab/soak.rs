//! `keyway-lab soak`: what production does to a node, all at once and for as long as asked.
//!
//! On a lab of its own, for the whole run and at the same time:
//! - **traffic** on every path to one server pod: overlay direct, via a SaP, by pod IP, by
//!   ClusterIP and from an external entity through a gateway SaP; on each, sequence-numbered UDP
//!   datagrams at a fixed rate (every loss named, so counted exactly) and a TCP connection with
//!   request/response at a fixed rate (every connection error and slow round trip with its time);
//! - **pod churn** through CRI without pause, with NetworkPolicies that select the churned pods
//!   applied and removed, and the server's own policy rewritten under its live flows;
//! - **key rotation** with a period of seconds (ClusterConfig), so that many epochs pass;
//! - the **SIGKILL** of the first node's agent at random intervals, started again at once (a
//!   DaemonSet restarts it; its pods keep their devices and tables).
//!
//! Every datagram lost is placed in time by its sequence number: losses from a kill until
//! [`KILL_SETTLE`] after its agent is ready again are that kill's outage, reported apart; any other
//! loss is a failure. At every sample the soak counts, per node, the agent's memory and open
//! files, the pods, the agent's attachments and state files, the primary CNI's leases, and across
//! the pods' namespaces the TUN devices and keyway tables; anything held by a pod that no longer
//! exists is a leak. After `down`, whatever the lab left is listed.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use keyway_sap::io::now_ms;
use serde_json::Value;

use super::objects::{self, source_path};
use super::{Lab, PodState, Runner};
use crate::topology::{Plan, in_ns};

/// After an agent is ready again, how long its pods' traffic may take to be whole (the first
/// datagrams wait on the agent's re-attachment to every pod and a fresh compile).
pub const KILL_SETTLE: Duration = Duration::from_secs(2);

/// How long a killed agent's outage may be: from the kill to the last datagram it cost.
pub const MAX_OUTAGE: Duration = Duration::from_secs(1);

/// Churned pods alive at once: each new one replaces the oldest.
const CHURN_LIVE: usize = 6;

/// How much an agent's RSS may grow beyond the 10% bar before it counts as growth (KiB): the
/// allocator's settling, a few MiB once, where a leak keeps growing with the soak's length.
const RSS_SETTLE_KIB: f64 = 4096.0;

/// What a soak does and for how long.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub minutes: f64,
    pub nodes: usize,
    /// UDP datagrams a second, per path.
    pub rate: u64,
    /// TCP round trips a second, per path.
    pub tcp_rate: u64,
    /// The key rotation period (the grace window is 40% of it).
    pub rotation_seconds: u64,
    /// Seconds between samples.
    pub sample_seconds: u64,
    /// The range the interval between two agent kills is drawn from, in seconds.
    pub kill_every: (u64, u64),
    /// Seconds of one traffic run (each a CRI exec, which the runtime caps at a minute).
    pub window_seconds: f64,
    /// The lab's namespaces and addresses (a test gives its own).
    pub plan: Plan,
    /// The agents' `--datapath` (`auto`, `kernel`, `user`); `None`: their default, the kernel
    /// fast path where the kernel loads it.
    pub datapath: Option<String>,
}

impl SoakOptions {
    /// The command's defaults: samples every minute, kills every 20 to 60 s.
    pub fn new(minutes: f64, nodes: usize) -> SoakOptions {
        SoakOptions {
            minutes,
            nodes: nodes.max(2),
            rate: 200,
            tcp_rate: 20,
            rotation_seconds: 10,
            sample_seconds: 60,
            kill_every: (20, 60),
            window_seconds: 45.0,
            plan: Plan {
                prefix: "kws".into(),
                nodes: 0,
                pod_octet: 243,
                underlay_octet: 79,
            },
            datapath: None,
        }
    }
}

/// One traffic path: the client and where it sends.
struct TrafficPath {
    name: &'static str,
    from: String,
    runner: Runner,
    udp: SocketAddr,
    tcp: SocketAddr,
}

/// One traffic run's outcome, in wall-clock milliseconds.
#[derive(Debug, Clone, Default)]
struct Window {
    path: usize,
    start_ms: u64,
    end_ms: u64,
    rate: u64,
    sent: u64,
    /// Lost sequence numbers, as inclusive ranges.
    lost: Vec<(u64, u64)>,
    tcp_requests: u64,
    tcp_answered: u64,
    /// Connection errors: when, and what.
    tcp_errors: Vec<(u64, String)>,
    /// Slow round trips: when, and how long (ms).
    tcp_slow: Vec<(u64, u64)>,
    /// The run itself failed (exec, or the client said so).
    error: Option<String>,
}

impl Window {
    fn time_of(&self, seq: u64) -> u64 {
        self.start_ms + seq * 1000 / self.rate
    }
}

/// One SIGKILL of an agent: when, and when it was ready again.
#[derive(Debug, Clone)]
struct Kill {
    node: String,
    at_ms: u64,
    ready_ms: u64,
}

impl Kill {
    fn covers(&self, t: u64) -> bool {
        t + 50 >= self.at_ms && t <= self.ready_ms + KILL_SETTLE.as_millis() as u64
    }
}

/// What the churn did.
#[derive(Debug, Default)]
struct Churn {
    created: u64,
    deleted: u64,
    add_errors: Vec<String>,
    del_errors: Vec<String>,
    policies_applied: u64,
    policies_removed: u64,
    server_policy_updates: u64,
    /// (ms, created, deleted, errors) at each event, to split counts by interval.
    log: Vec<(u64, u64, u64, u64)>,
}

/// One node at one sample.
#[derive(Debug, Clone, Default)]
struct NodeSample {
    node: String,
    agent_pid: u32,
    rss_kib: u64,
    fds: u64,
    epoch: u64,
    pods: usize,
    attachments: usize,
    records: usize,
    leases: usize,
    node_tables: usize,
}

/// The cluster at one sample.
#[derive(Debug, Clone, Default)]
struct Sample {
    at_ms: u64,
    nodes: Vec<NodeSample>,
    /// Pods alive, and their TUN devices and keyway tables, counted in their namespaces.
    pods: usize,
    tun_devices: usize,
    pod_tables: usize,
    /// What a pod that is gone still holds (namespaces, leases, records, attachments, files).
    leaks: Vec<String>,
}

/// A soak's outcome: its report, and what it must show that it did not.
#[derive(Debug)]
pub struct SoakReport {
    pub text: String,
    pub violations: Vec<String>,
    /// Figures a test asserts on.
    pub datagrams_sent: u64,
    pub pods_churned: u64,
    pub kills: usize,
    pub epochs: u64,
    /// Pods the kernel fast path served at the end, over every node.
    pub fastpath_pods: u64,
    /// Per path (by name): UDP datagrams lost in kills' outages.
    pub lost_in_kills: Vec<(String, usize)>,
}

/// A small deterministic generator (xorshift): the kill intervals, reproducible from the seed
/// the report prints.
struct Rng(u64);

impl Rng {
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + self.0 % (hi.saturating_sub(lo) + 1)
    }
}

/// Sleeps up to `d`, waking early when `stop` is set; whether it slept the whole time.
fn nap(stop: &AtomicBool, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
    true
}

fn topology(o: &SoakOptions) -> String {
    let u = o.plan.underlay_octet;
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: soak}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: soak, labels: {{role: server}}}}
spec:
  nodeName: node-2
  containers:
    - {{name: serve, image: agnhost, ports: [{{containerPort: 80, protocol: UDP}}]}}
    - {{name: bench, image: agnhost, command: [bench-server, --port, "5201"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client-direct, namespace: soak, labels: {{role: client-direct}}}}
spec:
  nodeName: node-1
  containers:
    - {{name: pause, image: agnhost}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client-sap, namespace: soak, labels: {{role: client-sap}}}}
spec:
  nodeName: node-1
  containers:
    - {{name: pause, image: agnhost}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: soak}}
spec:
  selector: {{role: server}}
  ports:
    - {{name: udp, port: 80, protocol: UDP, targetPort: 80}}
    - {{name: tcp, port: 5201, protocol: TCP, targetPort: 5201}}
---
apiVersion: keyway.io/v1alpha1
kind: ExternalEntity
metadata: {{name: external, namespace: soak, labels: {{role: external}}, annotations: {{keyway.io/serve: "80/UDP"}}}}
spec: {{overlayIps: [100.127.255.20], address: "192.168.{u}.101:6080", gateway: node-1}}
---
apiVersion: keyway.io/v1alpha1
kind: DirectPath
metadata: {{name: direct, namespace: soak}}
spec:
  a: {{podSelector: {{matchLabels: {{role: client-direct}}}}}}
  b: {{podSelector: {{matchLabels: {{role: server}}}}}}
---
{}"#,
        server_policy(false)
    )
}

/// The server's NetworkPolicy: its clients on the soak's ports; `extra` adds a rule for the
/// churned pods, so that rewriting it recompiles the live flows' allow sets without changing
/// what they may do.
fn server_policy(extra: bool) -> String {
    let churn = if extra {
        "\n    - from: [{podSelector: {matchLabels: {role: churn}}}]\n      ports: [{port: 81, protocol: TCP}]"
    } else {
        ""
    };
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: server, namespace: soak}}
spec:
  podSelector: {{matchLabels: {{role: server}}}}
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector: {{matchLabels: {{role: client-direct}}}}
        - podSelector: {{matchLabels: {{role: client-sap}}}}
        - podSelector: {{matchLabels: {{role: external}}}}
      ports: [{{port: 80, protocol: UDP}}, {{port: 5201, protocol: TCP}}]{churn}
"#
    )
}

/// A NetworkPolicy that selects one group of churned pods.
fn churn_policy(group: usize) -> Value {
    serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("churn-g{group}"), "namespace": "soak"},
        "spec": {
            "podSelector": {"matchLabels": {"group": format!("g{group}")}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client-sap"}}}], "ports": [{"port": 80, "protocol": "TCP"}]}],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"role": "server"}}}]}],
        }
    })
}

fn churn_pod(i: u64, node: &str) -> anyhow::Result<objects::LabPod> {
    let name = format!("churn-{i}");
    let doc = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "soak", "labels": {"role": "churn", "group": format!("g{}", i % 4)}},
        "spec": {"nodeName": node, "containers": [{"name": "serve", "image": "agnhost", "ports": [{"containerPort": 80, "protocol": "TCP"}]}]},
    });
    objects::pod(&doc, "soak", &name)
}

/// Runs one traffic window on `p`.
fn run_window(p: &TrafficPath, index: usize, o: &SoakOptions, seconds: f64) -> Window {
    let args: Vec<String> = [
        "soak-client",
        "--target",
        &p.udp.to_string(),
        "--rate",
        &o.rate.to_string(),
        "--seconds",
        &format!("{seconds:.1}"),
        "--tcp",
        &p.tcp.to_string(),
        "--tcp-rate",
        &o.tcp_rate.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let started = now_ms();
    let mut w = Window {
        path: index,
        start_ms: started,
        rate: o.rate,
        ..Window::default()
    };
    let parsed = p.runner.run(&args).and_then(|out| {
        serde_json::from_str::<Value>(out.trim())
            .with_context(|| format!("soak-client said {out:?}"))
    });
    w.end_ms = now_ms();
    let v = match parsed {
        Ok(v) => v,
        Err(e) => {
            w.error = Some(format!("{e:#}"));
            return w;
        }
    };
    if let Some(e) = v.get("error").or_else(|| v.pointer("/tcp/error")) {
        w.error = Some(e.to_string());
        return w;
    }
    let n = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    w.start_ms = n("/start_unix_ms").max(started);
    w.sent = n("/sent");
    w.lost = v["lost"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| Some((r[0].as_u64()?, r[1].as_u64()?)))
        .collect();
    w.tcp_requests = n("/tcp/requests");
    w.tcp_answered = n("/tcp/answered");
    w.tcp_errors = v["tcp"]["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((w.start_ms + e[0].as_u64()?, e[1].as_str()?.to_string())))
        .collect();
    w.tcp_slow = v["tcp"]["slow"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((w.start_ms + e[0].as_u64()?, e[1].as_u64()?)))
        .collect();
    w
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`), 0 when the process or field is gone.
pub(crate) fn read_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn count_entries(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| keep(n))
        .collect()
}

/// The keyway tables and TUN devices in a namespace under `/var/run/netns`.
fn netns_contents(path: &str) -> (usize, usize) {
    let Some(name) = path.rsplit('/').next() else {
        return (0, 0);
    };
    let tables = in_ns(name, &["nft", "list", "tables"])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" keyway"))
        .count();
    let tuns = in_ns(name, &["ip", "-o", "link", "show", "type", "tun"])
        .unwrap_or_default()
        .lines()
        .count();
    (tables, tuns)
}

/// Counts everything the soak watches. Called with the lab locked, so that no pod is half made.
fn sample(lab: &Lab, deleted: &[(String, String, String)]) -> Sample {
    let mut s = Sample {
        at_ms: now_ms(),
        pods: lab.state.pods.len(),
        ..Sample::default()
    };
    let live: BTreeSet<(String, String)> = lab
        .state
        .pods
        .iter()
        .map(|p| (p.spec.namespace.clone(), p.spec.name.clone()))
        .collect();
    for n in &lab.state.nodes {
        let nd = lab.dir.join("nodes").join(&n.name);
        let on_node: Vec<&PodState> = lab.state.pods.iter().filter(|p| p.node == n.name).collect();
        let mut ns = NodeSample {
            node: n.name.clone(),
            agent_pid: n.agent_pid,
            rss_kib: read_status_kib(n.agent_pid, "VmRSS:"),
            fds: count_entries(Path::new(&format!("/proc/{}/fd", n.agent_pid)), |_| true).len()
                as u64,
            pods: on_node.len(),
            node_tables: in_ns(&n.netns, &["nft", "list", "tables"])
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(" keyway"))
                .count(),
            ..NodeSample::default()
        };
        ns.epoch = super::agent_get(&n.netns, "/metrics")
            .ok()
            .and_then(|(_, m)| {
                m.lines()
                    .find_map(|l| l.strip_prefix("keyway_key_epoch "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0);
        // The agent's attachments: each must be a live pod of this node.
        if let Ok((_, body)) = crate::harness::debug_get(&n.agent_socket, "/debug/attachments")
            && let Ok(v) = serde_json::from_str::<Value>(&body)
        {
            for a in v["attachments"].as_array().into_iter().flatten() {
                ns.attachments += 1;
                let key = (
                    a["namespace"].as_str().unwrap_or_default().to_string(),
                    a["pod"].as_str().unwrap_or_default().to_string(),
                );
                if !on_node
                    .iter()
                    .any(|p| p.spec.namespace == key.0 && p.spec.name == key.1)
                {
                    s.leaks
                        .push(format!("{}: attachment of {}/{}", n.name, key.0, key.1));
                }
            }
        }
        let records = count_entries(&nd.join("agent-state/attachments"), |f| {
            f.ends_with(".json")
        });
        ns.records = records.len();
        let keyway_pods = on_node.iter().filter(|p| !p.overlay_ips.is_empty()).count();
        if ns.records != keyway_pods {
            s.leaks.push(format!(
                "{}: {} attachment records for {keyway_pods} pods on the overlay",
                n.name, ns.records
            ));
        }
        // The primary CNI's leases: each must be a live pod's address.
        for net in count_entries(&nd.join("ipam"), |_| true) {
            for ip in count_entries(&nd.join("ipam").join(&net), |f| f.parse::<IpAddr>().is_ok()) {
                ns.leases += 1;
                if !on_node.iter().any(|p| p.infra_ip == ip) {
                    s.leaks
                        .push(format!("{}: lease {ip} held by no pod", n.name));
                }
            }
        }
        let logs = count_entries(&nd.join("pod-logs"), |_| true);
        for l in logs {
            if !on_node
                .iter()
                .any(|p| l == format!("{}_{}", p.spec.namespace, p.spec.name))
            {
                s.leaks.push(format!("{}: pod log directory {l}", n.name));
            }
        }
        s.nodes.push(ns);
    }
    for p in &lab.state.pods {
        let (tables, tuns) = netns_contents(&p.netns_path);
        s.pod_tables += tables;
        s.tun_devices += tuns;
    }
    // What deleted pods left: their namespaces (and in them, devices and tables), their objects.
    for (ns, name, netns) in deleted {
        if live.contains(&(ns.clone(), name.clone())) {
            continue;
        }
        if !netns.is_empty() && Path::new(netns).exists() {
            let (tables, tuns) = netns_contents(netns);
            s.leaks.push(format!(
                "{ns}/{name}: namespace {netns} ({tables} keyway tables, {tuns} TUN devices)"
            ));
        }
        if lab.source().join(source_path("Pod", ns, name)).exists() {
            s.leaks
                .push(format!("{ns}/{name}: Pod object in the state source"));
        }
    }
    s
}

/// Runs the soak on its own lab (`<dir>-soak`) and takes it down.
pub fn soak(base_dir: &Path, o: &SoakOptions) -> anyhow::Result<SoakReport> {
    let dir = super::sibling_dir(base_dir, "soak");
    let _ = Lab::down(&dir);
    let docs = dir.with_extension("yaml");
    std::fs::write(&docs, topology(o))?;
    let result = run(&dir, &docs, o);
    let after_down = leftovers(&dir, &o.plan);
    let _ = std::fs::remove_file(&docs);
    let mut report = result?;
    if after_down.is_empty() {
        report.text += "after down: nothing left (namespaces, processes, mounts, files)\n";
    } else {
        report.text += &format!("after down, left: {}\n", after_down.join("; "));
        report.violations.extend(
            after_down
                .into_iter()
                .map(|l| format!("left after down: {l}")),
        );
    }
    Ok(report)
}

/// What a lab in `dir` left after it was taken down: its directory, processes that name it,
/// mounts under it, its namespaces, and pod namespaces.
fn leftovers(dir: &Path, plan: &Plan) -> Vec<String> {
    let pods: Vec<String> = Lab::load(dir)
        .map(|l| l.state.pods.iter().map(|p| p.netns_path.clone()).collect())
        .unwrap_or_default();
    let _ = Lab::down(dir);
    let mut left = Vec::new();
    if dir.exists() {
        left.push(format!("directory {}", dir.display()));
    }
    for pid in crate::proc::find(&dir.display().to_string()) {
        left.push(format!("process {pid}"));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for m in mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&dir.display().to_string()))
    {
        left.push(format!("mount {m}"));
    }
    for l in crate::topology::sh(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
    {
        let name = l.split_whitespace().next().unwrap_or_default();
        if name.starts_with(&format!("{}-", plan.prefix)) {
            left.push(format!("namespace {name}"));
        }
    }
    for p in pods {
        if !p.is_empty() && Path::new(&p).exists() {
            left.push(format!("pod namespace {p}"));
        }
    }
    // Nothing of the lab's belongs in the host's own namespace either.
    let named = |l: &str| l.contains(&format!("{}-", plan.prefix));
    for l in crate::topology::sh(&["ip", "-o", "link"])
        .unwrap_or_default()
        .lines()
        .filter(|l| named(l))
    {
        left.push(format!("host link {l}"));
    }
    for l in crate::topology::sh(&["nft", "list", "tables"])
        .unwrap_or_default()
        .lines()
        .filter(|l| named(l))
    {
        left.push(format!("host nftables {l}"));
    }
    left
}

fn run(dir: &Path, docs: &Path, o: &SoakOptions) -> anyhow::Result<SoakReport> {
    let mut lab = Lab::up_with(dir, &[docs.to_path_buf()], o.nodes, o.plan.clone(), true)?;
    if let Some(d) = &o.datapath {
        lab.set_datapath(d)?;
    }
    let grace = (o.rotation_seconds * 2 / 5).max(1);
    lab.patch_cluster_config(serde_json::json!({
        "keyRotationSeconds": o.rotation_seconds,
        "keyGraceSeconds": grace,
    }))?;
    // Every agent on the new rotation before anything is counted: its epochs are numbered by the
    // period, so the epochs the report counts are the soak's.
    let period_ms = o.rotation_seconds * 1000;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let want = now_ms() / period_ms;
        let epochs = lab.node_metric("keyway_key_epoch");
        if epochs.iter().all(|e| (*e as u64).abs_diff(want) <= 1) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the agents' key epochs are {epochs:?}, not {want}: the rotation did not take"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let server = lab
        .state
        .pods
        .iter()
        .find(|p| p.key() == "soak/server")
        .context("the server pod")?;
    let overlay = *server
        .overlay_ips
        .first()
        .context("the server has no overlay address")?;
    let pod_ip: IpAddr = server.infra_ip.parse()?;
    let cluster_ip = lab
        .state
        .services
        .iter()
        .find(|s| s.key() == "soak/server")
        .and_then(|s| s.cluster_ip())
        .context("the server's Service has no cluster IP")?;
    let at = |ip: IpAddr| (SocketAddr::new(ip, 80), SocketAddr::new(ip, 5201));
    let path = |name, from: &str, ip| -> anyhow::Result<TrafficPath> {
        let (udp, tcp) = at(ip);
        Ok(TrafficPath {
            name,
            from: from.to_string(),
            runner: lab.runner(from)?,
            udp,
            tcp,
        })
    };
    let paths = vec![
        path("direct", "soak/client-direct", overlay)?,
        path("via SaP", "soak/client-sap", overlay)?,
        path("pod IP", "soak/client-sap", pod_ip)?,
        path("ClusterIP", "soak/client-sap", cluster_ip)?,
        path("gateway", "soak/external", overlay)?,
    ];
    let kill_node = lab.state.nodes[0].name.clone();
    let seed = now_ms() | 1;
    let mut text = format!(
        "soak: {:.1} min on {} nodes; data path: {}; per path UDP {}/s and TCP {} round trips/s; keys rotate every {} s (grace {grace} s); {kill_node}'s agent SIGKILLed every {}–{} s (seed {seed}); pods churned through CRI, {CHURN_LIVE} alive at once\n",
        o.minutes,
        lab.state.nodes.len(),
        match o.datapath.as_deref() {
            None | Some("auto") => "the kernel fast path where it loads",
            Some("kernel") => "the kernel fast path",
            Some(_) => "user space",
        },
        o.rate,
        o.tcp_rate,
        o.rotation_seconds,
        o.kill_every.0,
        o.kill_every.1,
    );

    let lab = Mutex::new(lab);
    let stop = AtomicBool::new(false);
    let windows: Mutex<Vec<Window>> = Mutex::new(Vec::new());
    let kills: Mutex<Vec<Kill>> = Mutex::new(Vec::new());
    let churn: Mutex<Churn> = Mutex::new(Churn::default());
    let deleted: Mutex<Vec<(String, String, String)>> = Mutex::new(Vec::new());
    let mut samples: Vec<Sample> = Vec::new();
    let lock = || lab.lock().unwrap_or_else(|e| e.into_inner());
    let start_ms = now_ms();
    let deadline = Instant::now() + Duration::from_secs_f64(o.minutes * 60.0);
    let mut run_error: Option<&str> = None;

    samples.push(sample(&lock(), &deleted.lock().unwrap()));
    std::thread::scope(|scope| {
        // Traffic: back-to-back windows per path until the end.
        for (i, p) in paths.iter().enumerate() {
            let (stop, windows) = (&stop, &windows);
            scope.spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .as_secs_f64();
                    if left < 2.0 {
                        break;
                    }
                    let w = run_window(p, i, o, left.min(o.window_seconds));
                    let failed = w.error.is_some();
                    windows.lock().unwrap().push(w);
                    if failed {
                        // Do not spin on a broken path; the failure is in the report.
                        nap(stop, Duration::from_secs(1));
                    }
                }
            });
        }
        // Churn: pods created and deleted without pause; policies for them applied and removed;
        // the server's policy rewritten now and then.
        {
            let (stop, churn, deleted, lock) = (&stop, &churn, &deleted, &lock);
            scope.spawn(move || {
                let mut alive: VecDeque<(String, u64)> = VecDeque::new();
                let mut i: u64 = 0;
                let t0 = Instant::now();
                while Instant::now() < deadline && !stop.load(Ordering::Acquire) {
                    let mut lab = lock();
                    let node = lab.state.nodes[(i as usize) % lab.state.nodes.len()]
                        .name
                        .clone();
                    let made = churn_pod(i, &node).and_then(|p| lab.create_pod(p));
                    let mut c = churn.lock().unwrap();
                    match made {
                        Ok(()) => {
                            c.created += 1;
                            alive.push_back((node, i));
                        }
                        Err(e) => c.add_errors.push(format!("churn-{i}: {e:#}")),
                    }
                    if alive.len() > CHURN_LIVE
                        && let Some((_, j)) = alive.pop_front()
                    {
                        let name = format!("churn-{j}");
                        let netns = lab
                            .state
                            .pods
                            .iter()
                            .find(|p| p.spec.namespace == "soak" && p.spec.name == name)
                            .map(|p| p.netns_path.clone())
                            .unwrap_or_default();
                        match lab.delete_pod("soak", &name) {
                            Ok(()) => c.deleted += 1,
                            Err(e) => c.del_errors.push(format!("{name}: {e:#}")),
                        }
                        deleted.lock().unwrap().push(("soak".into(), name, netns));
                    }
                    if i % 5 == 4 {
                        let g = (i / 5) as usize % 4;
                        let name = format!("churn-g{g}");
                        if lab
                            .source()
                            .join(source_path("NetworkPolicy", "soak", &name))
                            .exists()
                        {
                            lab.remove_object("NetworkPolicy", "soak", &name);
                            c.policies_removed += 1;
                        } else if lab
                            .write_object("NetworkPolicy", "soak", &name, &churn_policy(g))
                            .is_ok()
                        {
                            c.policies_applied += 1;
                        }
                    }
                    let due = t0.elapsed().as_secs() / 10;
                    if due > c.server_policy_updates
                        && let Ok(doc) =
                            serde_yaml_ng::from_str::<Value>(&server_policy(due % 2 == 1))
                        && lab
                            .write_object("NetworkPolicy", "soak", "server", &doc)
                            .is_ok()
                    {
                        c.server_policy_updates = due;
                    }
                    let _ = lab.save();
                    let errors = (c.add_errors.len() + c.del_errors.len()) as u64;
                    let entry = (now_ms(), c.created, c.deleted, errors);
                    c.log.push(entry);
                    drop(c);
                    drop(lab);
                    i += 1;
                }
                // The rest go, so the last sample sees the cluster as it began.
                let mut lab = lock();
                for (_, j) in alive {
                    let name = format!("churn-{j}");
                    let netns = lab
                        .state
                        .pods
                        .iter()
                        .find(|p| p.spec.name == name)
                        .map(|p| p.netns_path.clone())
                        .unwrap_or_default();
                    let mut c = churn.lock().unwrap();
                    match lab.delete_pod("soak", &name) {
                        Ok(()) => c.deleted += 1,
                        Err(e) => c.del_errors.push(format!("{name}: {e:#}")),
                    }
                    deleted.lock().unwrap().push(("soak".into(), name, netns));
                }
                let _ = lab.save();
            });
        }
        // The killer: SIGKILL, then start again at once (holding the lab, so no ADD meets a
        // dead agent: that fails closed by design, and the runtime would retry it).
        {
            let (stop, kills, lock, kill_node) = (&stop, &kills, &lock, &kill_node);
            scope.spawn(move || {
                let mut rng = Rng(seed);
                loop {
                    let wait = Duration::from_secs(rng.between(o.kill_every.0, o.kill_every.1));
                    if Instant::now() + wait + Duration::from_secs(5) > deadline || !nap(stop, wait)
                    {
                        return;
                    }
                    let mut lab = lock();
                    let Some(i) = lab.state.nodes.iter().position(|n| &n.name == kill_node) else {
                        return;
                    };
                    let pid = lab.state.nodes[i].agent_pid;
                    let at_ms = now_ms();
                    crate::proc::sigkill(pid);
                    let restarted = lab.start_agent(kill_node);
                    let ready_ms = now_ms();
                    kills.lock().unwrap().push(Kill {
                        node: kill_node.clone(),
                        at_ms,
                        ready_ms,
                    });
                    if let Err(e) = restarted {
                        eprintln!("soak: the agent of {kill_node} did not come back: {e:#}");
                        stop.store(true, Ordering::Release);
                        return;
                    }
                }
            });
        }
        // Samples, until the end; then the others stop and a last sample is taken.
        let every = Duration::from_secs(o.sample_seconds.max(1));
        let mut next = Instant::now() + every;
        while next <= deadline + Duration::from_secs(1) {
            if !nap(&stop, next.saturating_duration_since(Instant::now())) {
                run_error = Some("the soak stopped early: an agent did not come back (see above)");
                break;
            }
            samples.push(sample(&lock(), &deleted.lock().unwrap()));
            eprintln!("soak: {:.1} min", (now_ms() - start_ms) as f64 / 60_000.0);
            next += every;
        }
        stop.store(true, Ordering::Release);
    });
    // The churn has removed its pods: what the cluster holds now is what it held at the start.
    std::thread::sleep(Duration::from_secs(2));
    let lab = lab.into_inner().unwrap_or_else(|e| e.into_inner());
    samples.push(sample(&lab, &deleted.lock().unwrap()));
    let fastpath_pods = lab.node_metric("keyway_fastpath_pods").iter().sum::<f64>() as u64;
    let windows = windows.into_inner().unwrap();
    let kills = kills.into_inner().unwrap();
    let churn = churn.into_inner().unwrap();
    text += &summarise(o, &paths, &windows, &kills, &churn, &samples, start_ms);
    text += &format!("pods on the kernel fast path at the end: {fastpath_pods}\n");
    let mut violations = check(o, &paths, &windows, &kills, &churn, &samples);
    if o.datapath.as_deref() == Some("user") && fastpath_pods > 0 {
        violations.push(format!(
            "{fastpath_pods} pods on the kernel fast path with every agent on --datapath user"
        ));
    }
    if let Some(e) = run_error {
        violations.insert(0, e.to_string());
    }
    let epochs = {
        let first = samples
            .first()
            .and_then(|s| s.nodes.iter().map(|n| n.epoch).max());
        let last = samples
            .last()
            .and_then(|s| s.nodes.iter().map(|n| n.epoch).min());
        last.zip(first).map_or(0, |(l, f)| l.saturating_sub(f))
    };
    let losses = place_losses(paths.len(), &windows, &kills);
    let lost_in_kills = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let n = losses.at_kill.iter().map(|k| k[i].len()).sum();
            (p.name.to_string(), n)
        })
        .collect();
    Ok(SoakReport {
        text,
        violations,
        lost_in_kills,
        datagrams_sent: windows.iter().map(|w| w.sent).sum(),
        pods_churned: churn.created,
        kills: kills.len(),
        epochs,
        fastpath_pods,
    })
}

/// Where each lost datagram falls: in a kill's outage (by kill) or outside every one.
struct Losses {
    /// Per path: lost outside any kill, and their times.
    outside: Vec<Vec<u64>>,
    /// Per kill, per path: the times of the datagrams it cost.
    at_kill: Vec<Vec<Vec<u64>>>,
}

fn place_losses(paths: usize, windows: &[Window], kills: &[Kill]) -> Losses {
    let mut l = Losses {
        outside: vec![Vec::new(); paths],
        at_kill: vec![vec![Vec::new(); paths]; kills.len()],
    };
    for w in windows {
        for &(a, b) in &w.lost {
            for seq in a..=b {
                let t = w.time_of(seq);
                match kills.iter().position(|k| k.covers(t)) {
                    Some(k) => l.at_kill[k][w.path].push(t),
                    None => l.outside[w.path].push(t),
                }
            }
        }
    }
    l
}

/// A kill's outage on one path: from the kill to the last datagram it cost (0 if none).
fn outage_ms(kill: &Kill, lost: &[u64], rate: u64) -> u64 {
    lost.iter()
        .max()
        .map_or(0, |last| last + 1000 / rate - kill.at_ms.min(*last))
}

fn fmt_min(ms: u64, start: u64) -> String {
    let s = ms.saturating_sub(start) / 1000;
    format!("{}:{:02}", s / 60, s % 60)
}

fn summarise(
    o: &SoakOptions,
    paths: &[TrafficPath],
    windows: &[Window],
    kills: &[Kill],
    churn: &Churn,
    samples: &[Sample],
    start_ms: u64,
) -> String {
    let losses = place_losses(paths.len(), windows, kills);
    let mut t = String::new();
    // Per interval between two samples.
    let _ = writeln!(
        t,
        "\n{:>5}  {:<54} {:>9} {:>7} {:>6} {:>5} {:>5}  {:<28} {:>6} {:>4} {:>5}",
        "until",
        "UDP sent/lost per path (direct, SaP, pod IP, ClusterIP, gw)",
        "TCP rt",
        "TCP err",
        "pods+",
        "err",
        "kills",
        "agent RSS MiB / fds per node",
        "tables",
        "tun",
        "leaks"
    );
    for pair in samples.windows(2) {
        let (a, b) = (pair[0].at_ms, pair[1].at_ms);
        let in_range = |t: u64| t >= a && t < b;
        let mut cells = Vec::new();
        let mut tcp = (0u64, 0u64);
        for (i, _) in paths.iter().enumerate() {
            let mut sent = 0;
            let mut lost = 0;
            for w in windows.iter().filter(|w| w.path == i) {
                // A window is credited to the interval its datagrams were due in.
                for seq in 0..w.sent {
                    let t = w.time_of(seq);
                    if in_range(t) {
                        sent += 1;
                    }
                }
                for &(x, y) in &w.lost {
                    lost += (x..=y).filter(|s| in_range(w.time_of(*s))).count();
                }
                // Round trips by the window's share of the interval; errors by their time.
                let overlap = b.min(w.end_ms).saturating_sub(a.max(w.start_ms));
                let span = w.end_ms.saturating_sub(w.start_ms).max(1);
                tcp.0 += w.tcp_requests * overlap / span;
                tcp.1 += w.tcp_errors.iter().filter(|(t, _)| in_range(*t)).count() as u64;
            }
            cells.push(format!("{sent}/{lost}"));
        }
        let (c0, c1) = (
            churn
                .log
                .iter()
                .rfind(|e| e.0 < a)
                .map_or((0, 0), |e| (e.1, e.3)),
            churn
                .log
                .iter()
                .rfind(|e| e.0 < b)
                .map_or((0, 0), |e| (e.1, e.3)),
        );
        let k = kills.iter().filter(|k| in_range(k.at_ms)).count();
        let nodes: Vec<String> = pair[1]
            .nodes
            .iter()
            .map(|n| format!("{:.1}/{}", n.rss_kib as f64 / 1024.0, n.fds))
            .collect();
        let last = std::ptr::eq(&pair[1], samples.last().expect("two samples"));
        let _ = writeln!(
            t,
            "{:>5}  {:<54} {:>9} {:>7} {:>6} {:>5} {:>5}  {:<28} {:>6} {:>4} {:>5}",
            if last {
                "end".to_string()
            } else {
                fmt_min(b, start_ms)
            },
            cells.join(" "),
            tcp.0,
            tcp.1,
            c1.0 - c0.0,
            c1.1 - c0.1,
            k,
            nodes.join("  "),
            pair[1].pod_tables + pair[1].nodes.iter().map(|n| n.node_tables).sum::<usize>(),
            pair[1].tun_devices,
            pair[1].leaks.len()
        );
    }
    // Totals per path.
    let _ = writeln!(t, "\ntotal per path:");
    for (i, p) in paths.iter().enumerate() {
        let ws: Vec<&Window> = windows.iter().filter(|w| w.path == i).collect();
        let sent: u64 = ws.iter().map(|w| w.sent).sum();
        let at_kills: usize = losses.at_kill.iter().map(|k| k[i].len()).sum();
        let tcp_rt: u64 = ws.iter().map(|w| w.tcp_requests).sum();
        let tcp_ok: u64 = ws.iter().map(|w| w.tcp_answered).sum();
        let tcp_err: Vec<String> = ws
            .iter()
            .flat_map(|w| &w.tcp_errors)
            .map(|(at, k)| format!("{k} at {}", fmt_min(*at, start_ms)))
            .collect();
        let slow_outside = ws
            .iter()
            .flat_map(|w| &w.tcp_slow)
            .filter(|(at, _)| !kills.iter().any(|k| k.covers(*at)))
            .count();
        let failed = ws.iter().filter(|w| w.error.is_some()).count();
        let _ = writeln!(
            t,
            "  {:<10} {} → {}: UDP {sent} sent, {} lost outside kills, {at_kills} lost in kills' outages; TCP {tcp_ok}/{tcp_rt} round trips answered, {} connection errors{}, {slow_outside} slow (> 200 ms) outside kills; {} runs{}",
            p.name,
            p.from,
            p.udp.ip(),
            losses.outside[i].len(),
            tcp_err.len(),
            if tcp_err.is_empty() {
                String::new()
            } else {
                format!(" ({})", tcp_err.join(", "))
            },
            ws.len(),
            if failed > 0 {
                format!(", {failed} FAILED")
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(t, "\nagent kills ({}):", kills.len());
    for (k, kill) in kills.iter().enumerate() {
        let per_path: Vec<String> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "{} {} ms",
                    p.name,
                    outage_ms(kill, &losses.at_kill[k][i], o.rate)
                )
            })
            .collect();
        let stall = windows
            .iter()
            .flat_map(|w| &w.tcp_slow)
            .filter(|(at, _)| kill.covers(*at))
            .map(|(_, ms)| *ms)
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            t,
            "  {} at {}: ready again in {} ms; UDP outage {}; {}",
            kill.node,
            fmt_min(kill.at_ms, start_ms),
            kill.ready_ms - kill.at_ms,
            per_path.join(", "),
            if stall == 0 {
                "no TCP round trip over 200 ms".to_string()
            } else {
                format!("longest TCP round trip {stall} ms")
            }
        );
    }
    let first = samples.first();
    let last = samples.last();
    let epochs = first
        .zip(last)
        .map(|(f, l)| {
            l.nodes
                .iter()
                .zip(&f.nodes)
                .map(|(l, f)| format!("{} {}→{}", l.node, f.epoch, l.epoch))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let _ = writeln!(
        t,
        "\nchurn: {} pods created, {} deleted; ADD errors {}, DEL errors {}; churn policies applied {} and removed {}; the server's policy rewritten {} times\nkey epochs: {epochs}",
        churn.created,
        churn.deleted,
        churn.add_errors.len(),
        churn.del_errors.len(),
        churn.policies_applied,
        churn.policies_removed,
        churn.server_policy_updates
    );
    for e in churn.add_errors.iter().chain(&churn.del_errors).take(5) {
        let _ = writeln!(t, "  error: {e}");
    }
    let _ = writeln!(
        t,
        "\nper node (first sample, last sample during the run, after the churned pods were deleted):"
    );
    if let (Some(f), Some(l)) = (first, last) {
        let during = &samples[samples.len().saturating_sub(2)];
        for (i, n) in f.nodes.iter().enumerate() {
            let show = |s: &Sample| {
                s.nodes.get(i).map_or(String::new(), |x| {
                    format!(
                        "RSS {:.1} MiB, {} fds, {} pods, {} attachments, {} records, {} leases, {} node tables",
                        x.rss_kib as f64 / 1024.0,
                        x.fds,
                        x.pods,
                        x.attachments,
                        x.records,
                        x.leases,
                        x.node_tables
                    )
                })
            };
            let _ = writeln!(
                t,
                "  {}: {}\n  {:w$}  {}\n  {:w$}  {}",
                n.node,
                show(f),
                "",
                show(during),
                "",
                show(l),
                w = n.node.len()
            );
        }
        let _ = writeln!(
            t,
            "  pods' namespaces: first {} pods, {} TUN devices, {} keyway tables; last {} pods, {} TUN devices, {} keyway tables",
            f.pods, f.tun_devices, f.pod_tables, l.pods, l.tun_devices, l.pod_tables
        );
        let leaks: BTreeSet<&String> = samples.iter().flat_map(|s| &s.leaks).collect();
        if leaks.is_empty() {
            let _ = writeln!(t, "  leaks: none at any sample");
        } else {
            for l in leaks.iter().take(20) {
                let _ = writeln!(t, "  LEAK: {l}");
            }
        }
    }
    t
}

/// Mean of a per-node figure over the samples within `span` ms of the first (or of the last).
fn mean_over(samples: &[&Sample], node: usize, f: impl Fn(&NodeSample) -> u64) -> f64 {
    let v: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.nodes.get(node).map(|n| f(n) as f64))
        .collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// What the soak must show, and where it did not.
fn check(
    o: &SoakOptions,
    paths: &[TrafficPath],
    windows: &[Window],
    kills: &[Kill],
    churn: &Churn,
    samples: &[Sample],
) -> Vec<String> {
    let mut v = Vec::new();
    let losses = place_losses(paths.len(), windows, kills);
    for (i, p) in paths.iter().enumerate() {
        if !losses.outside[i].is_empty() {
            v.push(format!(
                "{}: {} datagrams lost outside the agent's kills",
                p.name,
                losses.outside[i].len()
            ));
        }
        let errors = windows
            .iter()
            .filter(|w| w.path == i)
            .map(|w| w.tcp_errors.len())
            .sum::<usize>();
        if errors > 0 {
            v.push(format!("{}: {errors} TCP connection errors", p.name));
        }
        for w in windows.iter().filter(|w| w.path == i) {
            if let Some(e) = &w.error {
                v.push(format!("{}: a traffic run failed: {e}", p.name));
            }
        }
        if windows
            .iter()
            .filter(|w| w.path == i)
            .map(|w| w.sent)
            .sum::<u64>()
            == 0
        {
            v.push(format!("{}: no datagram was sent", p.name));
        }
    }
    for (k, kill) in kills.iter().enumerate() {
        for (i, p) in paths.iter().enumerate() {
            let ms = outage_ms(kill, &losses.at_kill[k][i], o.rate);
            if ms >= MAX_OUTAGE.as_millis() as u64 {
                v.push(format!(
                    "{}: the outage of the kill at +{} s was {ms} ms",
                    p.name,
                    (kill.at_ms - samples.first().map_or(0, |s| s.at_ms)) / 1000
                ));
            }
        }
    }
    for e in churn.add_errors.iter().chain(&churn.del_errors) {
        v.push(format!("churn: {e}"));
    }
    for l in samples
        .iter()
        .flat_map(|s| &s.leaks)
        .collect::<BTreeSet<_>>()
    {
        v.push(format!("leak: {l}"));
    }
    // The cluster after the churn holds what it held before it.
    if let (Some(f), Some(l)) = (samples.first(), samples.last()) {
        if (f.pods, f.tun_devices, f.pod_tables) != (l.pods, l.tun_devices, l.pod_tables) {
            v.push(format!(
                "pods, TUN devices, keyway tables: {:?} at the start, {:?} at the end",
                (f.pods, f.tun_devices, f.pod_tables),
                (l.pods, l.tun_devices, l.pod_tables)
            ));
        }
        for (a, b) in f.nodes.iter().zip(&l.nodes) {
            if (a.attachments, a.records, a.leases, a.node_tables)
                != (b.attachments, b.records, b.leases, b.node_tables)
            {
                v.push(format!(
                    "{}: attachments, records, leases, node tables {:?} at the start, {:?} at the end",
                    a.node,
                    (a.attachments, a.records, a.leases, a.node_tables),
                    (b.attachments, b.records, b.leases, b.node_tables)
                ));
            }
        }
    }
    // Memory and descriptors flat: the first five minutes against the last five (or, in a short
    // soak, the first and last thirds), for every agent that ran the whole soak; an agent started
    // again begins afresh and is compared from its last start.
    // The first sample is before any load (the agents have just started) and the last after the
    // churn's pods are gone: neither is the soak's steady state.
    let during: Vec<&Sample> = samples[1.min(samples.len())..samples.len().saturating_sub(1)]
        .iter()
        .collect();
    let span = ((o.minutes * 60_000.0 / 3.0) as u64).min(300_000);
    for (i, n) in samples
        .first()
        .map(|s| s.nodes.clone())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let last_pid = during
            .last()
            .and_then(|s| s.nodes.get(i))
            .map_or(0, |x| x.agent_pid);
        let same: Vec<&Sample> = during
            .iter()
            .copied()
            .filter(|s| s.nodes.get(i).is_some_and(|x| x.agent_pid == last_pid))
            .collect();
        if same.len() < 2 {
            continue;
        }
        let (t0, t1) = (same[0].at_ms, same[same.len() - 1].at_ms);
        let head: Vec<&Sample> = same
            .iter()
            .copied()
            .filter(|s| s.at_ms <= t0 + span)
            .collect();
        let tail: Vec<&Sample> = same
            .iter()
            .copied()
            .filter(|s| s.at_ms + span >= t1)
            .collect();
        // RSS may also grow by RSS_SETTLE_KIB: an agent's allocator takes its first minutes to
        // settle (node-2's agent, never killed, went 24.8 → 27.6 MiB in the 30-minute run's second
        // minute and then held within 0.2 MiB), and a short soak's first third is all settling.
        for (what, f, settle) in [
            (
                "RSS",
                (|x: &NodeSample| x.rss_kib) as fn(&NodeSample) -> u64,
                RSS_SETTLE_KIB,
            ),
            ("fds", |x: &NodeSample| x.fds, 0.0),
        ] {
            let (a, b) = (mean_over(&head, i, f), mean_over(&tail, i, f));
            if a > 0.0 && (b - a) / a > 0.10 && b - a > settle {
                v.push(format!(
                    "{}: agent {what} grew {:.0}% (from {a:.0} to {b:.0})",
                    n.node,
                    (b - a) / a * 100.0
                ));
            }
        }
    }
    v
}
