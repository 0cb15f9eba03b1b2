//! Benchmarks (commands, never tests): every figure is measured in the same run as its baseline and
//! reported next to it as a ratio.
//!
//! - `keyway-lab bench`: request/response latency (TCP round trips and HTTP) and TCP throughput
//!   between pods on two nodes — without keyway in the chain ("native"), over the overlay direct
//!   and via a SaP (each over IPv4 and IPv6), and from an external client through a gateway SaP — plus
//!   RunPodSandbox (CNI ADD) latency with and without keyway. The kernel fast path's direct and
//!   via-SaP paths are also measured in rounds alternating with native ([`paired`]): on a machine
//!   whose two vCPUs carry both nodes, a single native run minutes apart is a noisy baseline.
//! - `keyway-lab bench-cni`: ADD and DEL latency of the chain and of keyway-cni alone over N pods,
//!   and the agent's resident memory with N pods attached.
//! - `keyway-lab bench-policy`: time from a policy file being written to the data path enforcing
//!   it, with N pods attached.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::{Lab, Runner};
use crate::harness::TestCluster;
use crate::topology::Plan;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// One measured path.
#[derive(Debug, Clone, Default)]
pub struct PathFigures {
    pub name: String,
    pub rr_p50: f64,
    pub rr_p99: f64,
    pub http_p50: f64,
    pub http_p99: f64,
    /// A connection per request (connect, one HTTP exchange, close): what a flow's first
    /// packets cost.
    pub conn_p50: f64,
    pub gbps: f64,
    /// The machine's CPU (cores busy, every process) per Gbit/s during the stream.
    pub cpu_per_gbps: f64,
}

/// Busy and total jiffies of the whole machine (`/proc/stat`'s first line).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle and iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn bench_pod(name: &str, node: &str, labels: &[(&str, &str)], server: bool) -> String {
    bench_pod_in("bench", name, node, labels, server)
}

fn bench_pod_in(
    namespace: &str,
    name: &str,
    node: &str,
    labels: &[(&str, &str)],
    server: bool,
) -> String {
    let labels: String = labels.iter().map(|(k, v)| format!("{k}: {v}, ")).collect();
    let c = if server {
        "    - {name: bench, image: agnhost, ports: [{containerPort: 5201, protocol: TCP}], command: [bench-server, --port, \"5201\", --cpu, \"1\"]}"
    } else {
        "    - {name: pause, image: agnhost}"
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}\nspec:\n  nodeName: {node}\n  containers:\n{c}\n---\n"
    )
}

/// The overlay networks of the bench's keyway pods: the default IPv4 one, and an IPv6 one for
/// the pods labelled [`V6`].
const OVERLAYS: &str = "apiVersion: keyway.io/v1alpha1\nkind: OverlayNetwork\nmetadata: {name: v4}\nspec: {cidr: 100.64.0.0/10, blockPrefix: 24, device: kw0}\n---\napiVersion: keyway.io/v1alpha1\nkind: OverlayNetwork\nmetadata: {name: v6}\nspec:\n  cidr: fd6b:7779::/48\n  blockPrefix: 112\n  device: kw1\n  podSelector: {matchLabels: {overlay-v6: \"true\"}}\n---\n";
const V6: (&str, &str) = ("overlay-v6", "\"true\"");

/// A Service for the bench's server pods labelled `role`, on the bench port.
fn bench_service(name: &str, role: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  selector: {{role: {role}}}\n  ports: [{{port: 5201, protocol: TCP, targetPort: 5201}}]\n---\n"
    )
}

/// The cluster IP the lab gave Service `name`.
fn cluster_ip(lab: &Lab, name: &str) -> anyhow::Result<IpAddr> {
    lab.state
        .services
        .iter()
        .find(|s| s.namespace == "bench" && s.name == name)
        .and_then(|s| s.cluster_ip())
        .with_context(|| format!("Service bench/{name} has no cluster IP"))
}

/// One run of the bench client from `runner` to `target` in `mode` (`count` exchanges, or a
/// stream of `seconds`), pinned to CPU 0: what it reports.
fn client(
    runner: &Runner,
    target: SocketAddr,
    mode: &str,
    count: u32,
    seconds: f64,
    name: &str,
) -> anyhow::Result<Value> {
    let args: Vec<String> = [
        "bench-client",
        "--target",
        &target.to_string(),
        "--mode",
        mode,
        "--count",
        &count.to_string(),
        "--seconds",
        &seconds.to_string(),
        "--cpu",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = runner.run(&args)?;
    let v: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("bench-client said {out:?}"))?;
    if let Some(e) = v.get("error") {
        bail!("{name} {mode}: {e}");
    }
    Ok(v)
}

fn figure(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn measure(
    runner: &Runner,
    target: SocketAddr,
    seconds: f64,
    name: &str,
) -> anyhow::Result<PathFigures> {
    let run = |mode: &str| -> anyhow::Result<Value> {
        let count = if mode == "crr" { 1000 } else { 3000 };
        client(runner, target, mode, count, seconds, name)
    };
    // Warm up the path first (flow state, caches, the agents' threads), then measure.
    client(runner, target, "rr", 500, seconds, name)?;
    let rr = run("rr")?;
    let http = run("http")?;
    let crr = run("crr")?;
    let (stream, cpu_per_gbps) = stream_with_cpu(|| run("stream"))?;
    Ok(PathFigures {
        name: name.into(),
        rr_p50: figure(&rr, "p50_us"),
        rr_p99: figure(&rr, "p99_us"),
        http_p50: figure(&http, "p50_us"),
        http_p99: figure(&http, "p99_us"),
        conn_p50: figure(&crr, "p50_us"),
        gbps: figure(&stream, "gbps"),
        cpu_per_gbps,
    })
}

/// Runs `stream` (a stream's client run) and returns what it reported and the cores busy on the
/// whole machine meanwhile per Gbit/s it carried.
fn stream_with_cpu(stream: impl FnOnce() -> anyhow::Result<Value>) -> anyhow::Result<(Value, f64)> {
    let (busy0, total0) = cpu_jiffies();
    let v = stream()?;
    let (busy1, total1) = cpu_jiffies();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let busy_cores = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64 * cores;
    let per_gbps = busy_cores / figure(&v, "gbps");
    Ok((v, per_gbps))
}

/// How many rounds [`paired`] alternates.
const PAIRED_ROUNDS: usize = 6;

/// A path measured in rounds alternating with native (see [`paired`]): per round, the round
/// trip's p50 less native's, the stream's throughput over native's and its CPU per bit over
/// native's.
#[derive(Debug, Clone, Default)]
pub struct Paired {
    pub name: String,
    pub rr_deltas: Vec<f64>,
    pub tput_ratios: Vec<f64>,
    pub cpu_ratios: Vec<f64>,
}

impl Paired {
    /// "median (lowest to highest)" of `v`, with `fmt` for each.
    fn summary(v: &[f64], fmt: impl Fn(f64) -> String) -> String {
        let mut v = v.to_vec();
        let median = percentile(&mut v, 0.5);
        format!(
            "{} ({} to {})",
            fmt(median),
            fmt(v.first().copied().unwrap_or(f64::NAN)),
            fmt(v.last().copied().unwrap_or(f64::NAN))
        )
    }
}

/// `rounds` rounds of a round-trip run (1,000 exchanges) and a stream of `seconds`, natively
/// (`native`: runner and target) and on the path `path`, alternating which goes first (native,
/// path; path, native; ...), so that what the machine does meanwhile (two vCPUs shared by both
/// nodes, both agents and the pods) weighs on both alike: each round's figures are compared
/// within the round.
fn paired(
    native: (&Runner, SocketAddr),
    path: (&Runner, SocketAddr),
    rounds: usize,
    seconds: f64,
    name: &str,
) -> anyhow::Result<Paired> {
    let mut out = Paired {
        name: name.into(),
        ..Paired::default()
    };
    let once = |(runner, target): (&Runner, SocketAddr)| -> anyhow::Result<(f64, f64, f64)> {
        let rr = client(runner, target, "rr", 1000, seconds, name)?;
        let (stream, cpu) =
            stream_with_cpu(|| client(runner, target, "stream", 1000, seconds, name))?;
        Ok((figure(&rr, "p50_us"), figure(&stream, "gbps"), cpu))
    };
    for round in 0..rounds {
        let (n, p) = if round % 2 == 0 {
            let n = once(native)?;
            (n, once(path)?)
        } else {
            let p = once(path)?;
            (once(native)?, p)
        };
        out.rr_deltas.push(p.0 - n.0);
        out.tput_ratios.push(p.1 / n.1);
        out.cpu_ratios.push(p.2 / n.2);
    }
    Ok(out)
}

/// Istio ambient between the client and server pods of `namespace` (labelled for ambient): a
/// real ztunnel per node, measured by the server's pod IP through both; `None` without a
/// ztunnel binary. The ztunnels stop on return.
fn measure_ambient(
    lab: &Lab,
    namespace: &str,
    seconds: f64,
    name: &str,
) -> anyhow::Result<Option<PathFigures>> {
    use crate::ambient::{AMBIENT, Ambient, DATAPLANE_MODE_LABEL, Mtls, ambient_pods};
    let Some(ztunnel) = crate::ambient::find_ztunnel() else {
        return Ok(None);
    };
    let labels = [(
        namespace.to_string(),
        [(DATAPLANE_MODE_LABEL.to_string(), AMBIENT.to_string())].into(),
    )]
    .into();
    let pods = ambient_pods(lab, &labels);
    let server = pods
        .iter()
        .find(|p| p.name.ends_with("server"))
        .with_context(|| format!("no server pod in {namespace}"))?;
    let dir = lab.dir.join(format!("ztunnel-{namespace}"));
    let _ztunnels = Ambient::start(lab, &ztunnel, &pods, &dir, Mtls::Permissive)?;
    let client = pods
        .iter()
        .find(|p| p.name.ends_with("client"))
        .with_context(|| format!("no client pod in {namespace}"))?;
    let runner = lab.runner(&format!("{namespace}/{}", client.name))?;
    let target = SocketAddr::new(server.pod_ip, 5201);
    measure(&runner, target, seconds, name).map(Some)
}

/// A namespace enrolled in Istio ambient, with a bench client on node-1 and server on node-2.
fn ambient_bench_pods(namespace: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n{}{}",
        bench_pod_in(
            namespace,
            "amb-client",
            "node-1",
            &[("role", "client")],
            false
        ),
        bench_pod_in(
            namespace,
            "amb-server",
            "node-2",
            &[("role", "server")],
            true
        ),
    )
}

/// Waits (30 s at most) until the fast path serves every pod of the lab that is on keyway, so
/// that a path is measured as it runs steadily: the agents attach a new pod's fast path in the
/// background, and until then its packets take the user-space path. Not on `--datapath user`.
fn wait_for_fast_paths(lab: &Lab) {
    if lab.state.datapath.as_deref() == Some("user") {
        return;
    }
    let pods = lab
        .state
        .pods
        .iter()
        .filter(|p| !p.overlay_ips.is_empty())
        .count() as f64;
    let t0 = Instant::now();
    while lab.node_metric("keyway_fastpath_pods").iter().sum::<f64>() < pods
        && t0.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// ", fast" when the kernel fast path serves the lab's pods now, ", user" when it serves none.
fn path_note(lab: &Lab) -> &'static str {
    if lab.node_metric("keyway_fastpath_pods").iter().sum::<f64>() > 0.0 {
        ", fast"
    } else {
        ", user"
    }
}

fn runsandbox_latency(lab: &mut Lab, prefix: &str, count: usize) -> anyhow::Result<(f64, f64)> {
    let mut v = Vec::new();
    for i in 0..count {
        let name = format!("{prefix}-{i}");
        let doc = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  nodeName: node-1\n  containers: [{{name: pause, image: agnhost}}]\n"
        );
        let file = lab.dir.join(format!("{name}.yaml"));
        std::fs::write(&file, &doc)?;
        let docs = super::objects::read(&[&file])?;
        let p = docs.pods.into_iter().next().expect("one pod");
        let t = Instant::now();
        lab.create_pod(p)?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((percentile(&mut v.clone(), 0.5), percentile(&mut v, 0.99)))
}

/// `keyway-lab bench`.
pub fn bench(base_dir: &Path, seconds: f64) -> anyhow::Result<String> {
    let dir = super::sibling_dir(base_dir, "bench");
    let _ = Lab::down(&dir);
    let plan = Plan {
        prefix: "kwb".into(),
        nodes: 2,
        pod_octet: 245,
        underlay_octet: 78,
    };
    let docs = dir.with_extension("native.yaml");
    std::fs::write(
        &docs,
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: bench}}\n---\n{}{}{}{}",
            bench_pod("native-client", "node-1", &[("role", "client")], false),
            bench_pod("native-server", "node-2", &[("role", "server")], true),
            bench_service("native", "server"),
            ambient_bench_pods("bench-ambient-alone"),
        ),
    )?;
    let result = (|| -> anyhow::Result<String> {
        // Native: the same chain without keyway.
        let mut lab = Lab::up_with(&dir, std::slice::from_ref(&docs), 2, plan.clone(), false)?;
        let native_server = lab
            .state
            .pods
            .iter()
            .find(|p| p.spec.name == "native-server")
            .unwrap()
            .infra_ip
            .parse::<IpAddr>()?;
        let native = measure(
            &lab.runner("bench/native-client")?,
            SocketAddr::new(native_server, 5201),
            seconds,
            "native (no keyway)",
        )?;
        let native_svc = measure(
            &lab.runner("bench/native-client")?,
            SocketAddr::new(cluster_ip(&lab, "native")?, 5201),
            seconds,
            "native ClusterIP",
        )?;
        let add_native = runsandbox_latency(&mut lab, "add-native", 10)?;
        // Istio ambient without keyway: HBONE between the ztunnels on the underlay.
        let ambient_alone = measure_ambient(
            &lab,
            "bench-ambient-alone",
            seconds,
            "ambient alone (ztunnel)",
        )?;

        // keyway in the chain (containerd reloads its CNI configuration on change).
        for (n, sim) in lab.state.nodes.iter().zip(plan.all_nodes()) {
            let nd = lab.dir.join("nodes").join(&n.name);
            let conflist = sim.conflist(
                "1.0.0",
                &n.agent_socket.display().to_string(),
                &nd.join("ipam").display().to_string(),
                true,
            );
            std::fs::write(
                n.containerd.cni_conf.join("10-keyway.conflist"),
                serde_json::to_vec_pretty(&conflist)?,
            )?;
        }
        std::thread::sleep(Duration::from_secs(2));
        let kw_docs = dir.with_extension("keyway.yaml");
        std::fs::write(
            &kw_docs,
            format!(
                "{}{}{}{}{OVERLAYS}apiVersion: keyway.io/v1alpha1\nkind: ExternalEntity\nmetadata: {{name: ext-client, namespace: bench, labels: {{role: external}}, annotations: {{keyway.io/serve: \"5299/TCP\"}}}}\nspec: {{overlayIps: [100.127.255.10], address: \"192.168.78.101:6080\", gateway: node-1}}\n",
                bench_pod("kw-client", "node-1", &[("role", "kwclient"), V6], false),
                bench_pod("kw-server", "node-2", &[("role", "kwserver"), V6], true),
                bench_service("kw", "kwserver"),
                ambient_bench_pods("bench-ambient"),
            ),
        )?;
        lab.apply(&[kw_docs])?;
        wait_for_fast_paths(&lab);
        let kw = lab
            .state
            .pods
            .iter()
            .find(|p| p.spec.name == "kw-server")
            .unwrap();
        anyhow::ensure!(
            !kw.overlay_ips.is_empty(),
            "kw-server has no overlay address: is keyway in the chain?"
        );
        let kw_server = SocketAddr::new(kw.overlay_ips[0], 5201);
        let kw_server6 = kw
            .overlay_ips
            .iter()
            .find(|ip| ip.is_ipv6())
            .map(|ip| SocketAddr::new(*ip, 5201))
            .context("kw-server has no IPv6 overlay address")?;
        let via_sap = measure(
            &lab.runner("bench/kw-client")?,
            kw_server,
            seconds,
            &format!("overlay via SaP{}", path_note(&lab)),
        )?;
        // The native pods were made before keyway joined the chain: they stay off it.
        let native_at = (
            &lab.runner("bench/native-client")?,
            SocketAddr::new(native_server, 5201),
        );
        let kw_client = lab.runner("bench/kw-client")?;
        let paired_sap = paired(
            native_at,
            (&kw_client, kw_server),
            PAIRED_ROUNDS,
            seconds,
            &via_sap.name,
        )?;
        let via_sap6 = measure(
            &lab.runner("bench/kw-client")?,
            kw_server6,
            seconds,
            &format!("IPv6 overlay via SaP{}", path_note(&lab)),
        )?;
        let svc_sap = measure(
            &lab.runner("bench/kw-client")?,
            SocketAddr::new(cluster_ip(&lab, "kw")?, 5201),
            seconds,
            "ClusterIP via SaP",
        )?;
        let direct_doc = dir.with_extension("direct.yaml");
        std::fs::write(
            &direct_doc,
            "apiVersion: keyway.io/v1alpha1\nkind: DirectPath\nmetadata: {name: kw, namespace: bench}\nspec:\n  a: {podSelector: {matchLabels: {role: kwclient}}}\n  b: {podSelector: {matchLabels: {role: kwserver}}}\n",
        )?;
        lab.apply(std::slice::from_ref(&direct_doc))?;
        std::thread::sleep(Duration::from_millis(300));
        let direct = measure(
            &lab.runner("bench/kw-client")?,
            kw_server,
            seconds,
            &format!("overlay direct{}", path_note(&lab)),
        )?;
        let paired_direct = paired(
            native_at,
            (&kw_client, kw_server),
            PAIRED_ROUNDS,
            seconds,
            &direct.name,
        )?;
        let direct6 = measure(
            &lab.runner("bench/kw-client")?,
            kw_server6,
            seconds,
            &format!("IPv6 overlay direct{}", path_note(&lab)),
        )?;
        // The same paths with every agent on the user-space path alone, then back.
        let datapath = lab.state.datapath.clone();
        lab.set_datapath("user")?;
        let direct_user = measure(
            &lab.runner("bench/kw-client")?,
            kw_server,
            seconds,
            "overlay direct, user",
        )?;
        let direct6_user = measure(
            &lab.runner("bench/kw-client")?,
            kw_server6,
            seconds,
            "IPv6 overlay direct, user",
        )?;
        lab.delete(std::slice::from_ref(&direct_doc))?;
        std::thread::sleep(Duration::from_millis(300));
        let via_sap_user = measure(
            &lab.runner("bench/kw-client")?,
            kw_server,
            seconds,
            "overlay via SaP, user",
        )?;
        let via_sap6_user = measure(
            &lab.runner("bench/kw-client")?,
            kw_server6,
            seconds,
            "IPv6 overlay via SaP, user",
        )?;
        lab.apply(std::slice::from_ref(&direct_doc))?;
        lab.set_datapath(datapath.as_deref().unwrap_or("auto"))?;
        std::thread::sleep(Duration::from_millis(300));
        let external = measure(
            &lab.runner("bench/ext-client")?,
            kw_server,
            seconds,
            "external via gateway SaP",
        )?;
        let add_keyway = runsandbox_latency(&mut lab, "add-keyway", 10)?;
        // Istio ambient on keyway: HBONE carried by the overlay, through the SaP.
        let ambient_keyway =
            measure_ambient(&lab, "bench-ambient", seconds, "ambient over keyway")?;
        // Last, as it stops the external endpoint (its static key has no MAC key): every
        // datagram sealed and checked.
        lab.set_packet_authentication("Strict")?;
        let sealed = measure(
            &lab.runner("bench/kw-client")?,
            kw_server,
            seconds,
            "overlay via SaP, MAC",
        )?;

        let mut out = String::new();
        out += "request/response latency (µs) and TCP throughput between pods on two nodes; ratios to native\n";
        out += "(\"fast\": the endpoints' established flows in keyway's eBPF programs; \"user\": every agent on --datapath user; conn: a new connection per request, connect to close; CPU: cores busy on the whole machine per Gbit/s of the stream; client pinned to CPU 0, server to CPU 1)\n";
        out += &format!(
            "{:<30} {:>9} {:>9} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            "path",
            "rr p50",
            "rr p99",
            "http p50",
            "http p99",
            "conn p50",
            "Gbit/s",
            "CPU/Gbps",
            "rr p50 ×",
            "http p50 ×",
            "conn ×",
            "tput ×"
        );
        let rows = [
            Some(&native),
            Some(&native_svc),
            ambient_alone.as_ref(),
            Some(&direct),
            Some(&direct_user),
            Some(&direct6),
            Some(&direct6_user),
            Some(&via_sap),
            Some(&via_sap_user),
            Some(&via_sap6),
            Some(&via_sap6_user),
            Some(&svc_sap),
            Some(&external),
            ambient_keyway.as_ref(),
            Some(&sealed),
        ];
        for f in rows.into_iter().flatten() {
            out += &format!(
                "{:<30} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>10.1} {:>9.2} {:>9.3} {:>9.2} {:>9.2} {:>9.2} {:>9.2}\n",
                f.name,
                f.rr_p50,
                f.rr_p99,
                f.http_p50,
                f.http_p99,
                f.conn_p50,
                f.gbps,
                f.cpu_per_gbps,
                f.rr_p50 / native.rr_p50,
                f.http_p50 / native.http_p50,
                f.conn_p50 / native.conn_p50,
                f.gbps / native.gbps
            );
        }
        if ambient_keyway.is_none() {
            out += &format!("ambient rows left out: {}\n", crate::ambient::BUILD_ZTUNNEL);
        }
        out += &format!(
            "paired with native in alternating rounds ({PAIRED_ROUNDS} rounds; each, per path: 1,000 round trips and a {seconds} s stream; median (lowest to highest))\n"
        );
        out += &format!(
            "{:<30} {:<30} {:<30} {:<30}\n",
            "path", "rr p50 − native µs", "tput ×", "CPU per bit ×"
        );
        for p in [&paired_direct, &paired_sap] {
            out += &format!(
                "{:<30} {:<30} {:<30} {:<30}\n",
                p.name,
                Paired::summary(&p.rr_deltas, |x| format!("{x:+.1}")),
                Paired::summary(&p.tput_ratios, |x| format!("{x:.2}")),
                Paired::summary(&p.cpu_ratios, |x| format!("{x:.2}")),
            );
        }
        out += &format!(
            "RunPodSandbox (CNI ADD, 10 pods): native p50 {:.0} ms p99 {:.0} ms; with keyway p50 {:.0} ms p99 {:.0} ms (p50 × {:.2})\n",
            add_native.0,
            add_native.1,
            add_keyway.0,
            add_keyway.1,
            add_keyway.0 / add_native.0
        );
        Ok(out)
    })();
    let _ = Lab::down(&dir);
    for ext in ["native.yaml", "keyway.yaml", "direct.yaml"] {
        let _ = std::fs::remove_file(dir.with_extension(ext));
    }
    result
}

/// `keyway-lab bench-cni`: ADD and DEL latency over `pods` pods through the chain (no runtime in
/// the way), and the agent's memory with them attached.
pub fn bench_cni(pods: usize) -> anyhow::Result<String> {
    let c = TestCluster::new("benchcni", 1, 110);
    let rss = |pid: u32| super::soak::read_status_kib(pid, "VmRSS:") as f64 / 1024.0;
    // `ip netns exec` runs the agent directly; its pid is the agent's.
    let agent_pid = c.agent(1).pid().context("agent pid")?;
    let rss_empty = rss(agent_pid);
    let mut add_chain = Vec::new();
    let mut add_kw = Vec::new();
    let mut created = Vec::new();
    for i in 0..pods {
        let t = Instant::now();
        let pod = c.pod(1, "bench", &format!("p{i}"), &[("app", "bench")]);
        add_chain.push(t.elapsed().as_secs_f64() * 1e3);
        add_kw.push(pod.add_keyway_ms);
        created.push(pod);
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss_full = rss(agent_pid);
    let mut del_chain = Vec::new();
    let mut del_kw = Vec::new();
    for pod in &created {
        let t = Instant::now();
        let execs = pod.list.del(&pod.rt, Some(&pod.result));
        del_chain.push(t.elapsed().as_secs_f64() * 1e3);
        del_kw.push(
            execs
                .iter()
                .find(|e| e.plugin == "keyway")
                .map_or(f64::NAN, |e| e.elapsed_ms),
        );
    }
    let p = |v: &mut Vec<f64>| (percentile(v, 0.5), percentile(v, 0.99));
    let (ac, ak, dc, dk) = (
        p(&mut add_chain),
        p(&mut add_kw),
        p(&mut del_chain),
        p(&mut del_kw),
    );
    Ok(format!(
        "CNI latency over {pods} pods (ms)          p50      p99\n\
         ADD, whole chain (bridge+host-local+keyway) {:>8.1} {:>8.1}   (includes creating the pod's netns)\n\
         ADD, keyway-cni alone                       {:>8.1} {:>8.1}\n\
         DEL, whole chain                            {:>8.1} {:>8.1}\n\
         DEL, keyway-cni alone                       {:>8.1} {:>8.1}\n\
         agent RSS: {:.1} MiB with no pods, {:.1} MiB with {pods} pods attached ({:.2} MiB per pod)\n",
        ac.0,
        ac.1,
        ak.0,
        ak.1,
        dc.0,
        dc.1,
        dk.0,
        dk.1,
        rss_empty,
        rss_full,
        (rss_full - rss_empty) / pods as f64
    ))
}

/// Sends numbered UDP requests every 200 µs from a client and records which got answers.
struct Prober {
    sent: Vec<(u32, Instant)>,
    answered: Vec<u32>,
}

fn probe_window(
    client: &keyway_sap::sys::Netns,
    server: SocketAddr,
    window: Duration,
    t0: Instant,
) -> anyhow::Result<Prober> {
    let sock = client.run(|| UdpSocket::bind("0.0.0.0:0"))??;
    sock.connect(server)?;
    sock.set_read_timeout(Some(Duration::from_millis(1)))?;
    let mut p = Prober {
        sent: Vec::new(),
        answered: Vec::new(),
    };
    let mut seq = 0u32;
    let mut buf = [0u8; 64];
    while t0.elapsed() < window {
        sock.send(&seq.to_be_bytes())?;
        p.sent.push((seq, Instant::now()));
        seq += 1;
        let until = Instant::now() + Duration::from_micros(200);
        while Instant::now() < until {
            if let Ok(n) = sock.recv(&mut buf)
                && n >= 4
            {
                p.answered
                    .push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
            }
        }
    }
    // Late answers.
    while let Ok(n) = sock.recv(&mut buf) {
        if n >= 4 {
            p.answered
                .push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
        }
    }
    Ok(p)
}

/// When the traffic's fate switched for good after `t0`: the send time of the first request from
/// which every later one is dropped (`deny`) or answered (`allow`).
fn switch_time(p: &Prober, t0: Instant, deny: bool) -> Option<f64> {
    let answered: std::collections::HashSet<u32> = p.answered.iter().copied().collect();
    let mut first: Option<Instant> = None;
    for (seq, at) in p.sent.iter().rev() {
        let ok = answered.contains(seq);
        if ok == deny {
            break;
        }
        first = Some(*at);
    }
    first.map(|t| t.saturating_duration_since(t0).as_secs_f64() * 1e3)
}

/// `keyway-lab bench-policy`.
pub fn bench_policy(pods: usize, trials: usize) -> anyhow::Result<String> {
    // Two nodes, the pods split between them; client and server on different nodes, so a change
    // is enforced only once both agents have it (allowing needs both; denying, either).
    let c = TestCluster::new("benchpol", 2, 111);
    let _pods: Vec<_> = (0..pods)
        .map(|i| c.pod(1 + i % 2, "bench", &format!("p{i}"), &[("app", "bench")]))
        .collect();
    let client = c.pod(1, "bench", "client", &[("app", "client")]);
    let server = c.pod(2, "bench", "server", &[("app", "server")]);
    let server_addr: SocketAddr = format!("{}:7777", server.overlay_ip).parse()?;
    let stop = Arc::new(AtomicBool::new(false));
    let echo = server
        .netns
        .netns()
        .run(|| UdpSocket::bind("0.0.0.0:7777"))??;
    echo.set_read_timeout(Some(Duration::from_millis(100)))?;
    let s2 = stop.clone();
    let echo_thread = std::thread::spawn(move || {
        let mut b = [0u8; 64];
        while !s2.load(Ordering::Relaxed) {
            if let Ok((n, from)) = echo.recv_from(&mut b) {
                let _ = echo.send_to(&b[..n], from);
            }
        }
    });
    // A policy that isolates every pod of the namespace, egress too (so each pod's nftables egress
    // chain changes with it), and lets nothing reach the server.
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: lockdown, namespace: bench}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 9, protocol: UDP}]}]\n  egress: [{}]\n";
    let file = c.agents[0].source.join("bench-lockdown.yaml");
    let mut deny = Vec::new();
    let mut allow = Vec::new();
    for _ in 0..trials {
        for (enforce, out) in [(true, &mut deny), (false, &mut allow)] {
            let t0 = Instant::now();
            let ns = client.netns.netns().try_clone()?;
            let h = std::thread::spawn(move || {
                probe_window(&ns, server_addr, Duration::from_millis(400), t0)
            });
            std::thread::sleep(Duration::from_millis(50));
            let written = Instant::now();
            if enforce {
                keyway_sap::io::fs::write_atomic(&file, policy.as_bytes(), 0o644)?;
            } else {
                std::fs::remove_file(&file)?;
            }
            let p = h.join().map_err(|_| anyhow::anyhow!("prober panicked"))??;
            let since_t0 = written.duration_since(t0).as_secs_f64() * 1e3;
            match switch_time(&p, t0, enforce) {
                Some(t) => out.push(t - since_t0),
                None => bail!("the policy change was not enforced within the window"),
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = echo_thread.join();
    let p = |v: &mut Vec<f64>| {
        (
            percentile(v, 0.5),
            percentile(v, 0.99),
            v.iter().copied().fold(0.0, f64::max),
        )
    };
    let (d, a) = (p(&mut deny), p(&mut allow));
    Ok(format!(
        "policy file written -> enforced on the data path, {} pods on 2 nodes, {trials} trials (ms)\n\
         deny (policy added)      p50 {:.1}  p99 {:.1}  max {:.1}\n\
         allow (policy removed)   p50 {:.1}  p99 {:.1}  max {:.1}\n",
        pods + 2,
        d.0,
        d.1,
        d.2,
        a.0,
        a.1,
        a.2
    ))
}
