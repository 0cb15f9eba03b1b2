//! `keyway-lab`: a simulated cluster on one machine. Nodes are network namespaces on an underlay;
//! each runs containerd with its CRI plugin (the primary CNI `bridge` + `host-local`, then
//! `keyway-cni`) and a `keyway-agent`. Pods are made through CRI as kubelet makes them. The lab
//! plays the API server for the agents' `file` state source: it keeps the objects (one per file),
//! labels namespaces with their name, and records pod status.
//!
//! The lab's state lives in its directory (default `/run/keyway-lab`), so `up`, `apply`, `probe`,
//! `bench` and `down` are separate invocations; `down` removes everything `up` made.

pub mod bench;
pub mod objects;
pub mod services;
pub mod soak;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keyway_sap::io::fs::{random_bytes, write_atomic};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::containerd::{self, Containerd};
use crate::cri::{ContainerSpec, Cri, DnsSpec, PodSpec};
use crate::harness::{agnhost, bin};
use crate::images;
use crate::topology::{Plan, SimNode, in_ns, sh};
use objects::{LabPod, meta, source_path};

pub const DEFAULT_DIR: &str = "/run/keyway-lab";

/// The name of the cluster's one ClusterConfig.
const CLUSTER_CONFIG: &str = "cluster";
const AGENT_ADMIN: &str = "127.0.0.1:9464";
const AGENT_LISTEN: &str = "0.0.0.0:9464";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanState {
    pub prefix: String,
    pub nodes: usize,
    pub pod_octet: u8,
    pub underlay_octet: u8,
}

impl PlanState {
    pub fn plan(&self) -> Plan {
        Plan {
            prefix: self.prefix.clone(),
            nodes: self.nodes,
            pod_octet: self.pod_octet,
            underlay_octet: self.underlay_octet,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub ip: IpAddr,
    pub containerd: Containerd,
    pub agent_pid: u32,
    pub agent_socket: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub spec: LabPod,
    pub node: String,
    pub uid: String,
    pub sandbox: String,
    /// (container name, container id)
    pub containers: Vec<(String, String)>,
    pub infra_ip: String,
    pub overlay_ips: Vec<IpAddr>,
    /// The pod's network namespace (the agent's word for a protected pod, the runtime's for
    /// one that opted out).
    pub netns_path: String,
}

impl PodState {
    pub fn key(&self) -> String {
        format!("{}/{}", self.spec.namespace, self.spec.name)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExternalState {
    pub namespace: String,
    pub name: String,
    pub netns: String,
    pub address: SocketAddr,
    pub overlay_ips: Vec<IpAddr>,
    pub gateway: String,
    pub sap_pid: u32,
    pub server_pid: u32,
    pub config: PathBuf,
    /// The ports its server answers on (from the ExternalEntity's `keyway.io/serve` annotation).
    pub ports: Vec<(u16, String)>,
}

impl ExternalState {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Everything a running lab is made of.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub plan: PlanState,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    pub externals: Vec<ExternalState>,
    /// Overlay networks from the documents (name, cidr), for routing externals.
    pub networks: Vec<(String, ipnetwork::IpNetwork)>,
    pub agnhost: PathBuf,
    pub next_node: usize,
    /// Services as the lab's API server holds them (with their cluster IPs and node ports).
    #[serde(default)]
    pub services: Vec<services::LabService>,
    /// The EndpointSlices the lab's controller wrote, (namespace, name).
    #[serde(default)]
    pub slices: Vec<(String, String)>,
    /// The agents' `--datapath` (`auto`, `kernel`, `user`): from `KEYWAY_LAB_DATAPATH` at `up`,
    /// else the agent's default; [`Lab::set_datapath`] changes it.
    #[serde(default)]
    pub datapath: Option<String>,
}

#[derive(Debug)]
pub struct Lab {
    pub dir: PathBuf,
    pub state: LabState,
}

/// How to reach a probe target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// By its overlay address.
    Overlay,
    /// By its pod IP, as Kubernetes hands it out: a protected pod's pod IP is steered into the
    /// overlay, so the matrix is policy's.
    PodIp,
    /// By its pod IP from a socket bound to the pod's `eth0`, around keyway's steering, as a
    /// workload trying to bypass it would: a protected destination drops it.
    Underlay,
    /// By the cluster IP of a Service that selects the destination alone and has the port.
    Service,
    /// By that Service's name (`SERVICE.NAMESPACE`), resolved in the source pod through the
    /// cluster DNS and its search path.
    Dns,
}

/// A reachability matrix: rows are sources, columns destinations (`namespace/name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matrix {
    pub names: Vec<String>,
    /// `cells[from][to]`: connected?
    pub cells: Vec<Vec<bool>>,
}

impl std::fmt::Display for Matrix {
    /// The format the upstream Kubernetes NetworkPolicy tests print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "-")?;
        for n in &self.names {
            write!(f, "\t{n}")?;
        }
        writeln!(f)?;
        for (i, n) in self.names.iter().enumerate() {
            write!(f, "{n}")?;
            for c in &self.cells[i] {
                write!(f, "\t{}", if *c { "." } else { "X" })?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

impl Matrix {
    /// Parses the printed format back (for truth tables kept in files).
    pub fn parse(text: &str) -> anyhow::Result<Matrix> {
        let mut lines = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        let header: Vec<String> = lines
            .next()
            .context("empty truth table")?
            .split_whitespace()
            .map(String::from)
            .collect();
        if header.first().map(String::as_str) != Some("-") {
            bail!("a truth table starts with '-'");
        }
        let names = header[1..].to_vec();
        let mut cells = Vec::new();
        for (i, l) in lines.enumerate() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != names.len() + 1 || f[0] != names[i] {
                bail!(
                    "row {} of the truth table does not match the header: {l:?}",
                    i + 1
                );
            }
            cells.push(f[1..].iter().map(|c| *c == ".").collect());
        }
        if cells.len() != names.len() {
            bail!(
                "truth table has {} rows for {} columns",
                cells.len(),
                names.len()
            );
        }
        Ok(Matrix { names, cells })
    }

    /// The cells where `self` and `expected` differ, as "from -> to".
    pub fn diff(&self, expected: &Matrix) -> Vec<String> {
        let mut v = Vec::new();
        for (i, from) in self.names.iter().enumerate() {
            for (j, to) in self.names.iter().enumerate() {
                let e = expected
                    .names
                    .iter()
                    .position(|n| n == from)
                    .zip(expected.names.iter().position(|n| n == to))
                    .map(|(a, b)| expected.cells[a][b]);
                if e != Some(self.cells[i][j]) {
                    v.push(format!(
                        "{from} -> {to}: got {}, expected {}",
                        if self.cells[i][j] { "." } else { "X" },
                        e.map_or("?", |c| if c { "." } else { "X" })
                    ));
                }
            }
        }
        for n in &expected.names {
            if !self.names.contains(n) {
                v.push(format!("{n}: expected, not probed"));
            }
        }
        v
    }
}

/// GETs the admin server of the agent in namespace `netns`.
pub fn agent_get(netns: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let ns = keyway_sap::sys::Netns::open(format!("/var/run/netns/{netns}"))?;
    let addr: SocketAddr = AGENT_ADMIN.parse().expect("valid");
    let stream = ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))??;
    Ok(crate::harness::tcp_get(stream, path)?)
}

/// agnhost's `probe` command line, before its targets.
fn probe_args(protocol: &str, timeout: Duration) -> Vec<String> {
    vec![
        "probe".into(),
        "--protocol".into(),
        protocol.into(),
        "--timeout-ms".into(),
        timeout.as_millis().to_string(),
    ]
}

fn random_hex(n: usize) -> anyhow::Result<String> {
    let b = random_bytes(n).context("no randomness")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Lab {
    pub fn state_file(dir: &Path) -> PathBuf {
        dir.join("lab.json")
    }

    pub fn source(&self) -> PathBuf {
        self.dir.join("source")
    }

    pub fn load(dir: &Path) -> anyhow::Result<Lab> {
        let text = std::fs::read_to_string(Self::state_file(dir))
            .with_context(|| format!("no lab is up in {} (run keyway-lab up)", dir.display()))?;
        Ok(Lab {
            dir: dir.to_path_buf(),
            state: serde_json::from_str(&text).context("lab.json does not parse")?,
        })
    }

    pub fn save(&self) -> anyhow::Result<()> {
        write_atomic(
            &Self::state_file(&self.dir),
            &serde_json::to_vec_pretty(&self.state)?,
            0o644,
        )?;
        Ok(())
    }

    fn write_object(&self, kind: &str, ns: &str, name: &str, doc: &Value) -> anyhow::Result<()> {
        let path = self.source().join(source_path(kind, ns, name));
        write_atomic(&path, serde_yaml_ng::to_string(doc)?.as_bytes(), 0o644)?;
        Ok(())
    }

    fn remove_object(&self, kind: &str, ns: &str, name: &str) {
        let _ = std::fs::remove_file(self.source().join(source_path(kind, ns, name)));
    }

    fn node(&self, name: &str) -> anyhow::Result<&NodeState> {
        self.state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name} in this lab"))
    }

    /// Brings up the lab: nodes, agents, runtimes, images, then the documents' objects and pods.
    pub fn up(dir: &Path, files: &[PathBuf], nodes: usize) -> anyhow::Result<Lab> {
        Self::up_with(
            dir,
            files,
            nodes,
            Plan {
                prefix: "kwl".into(),
                nodes: 0,
                pod_octet: 244,
                underlay_octet: 77,
            },
            true,
        )
    }

    /// The Services topology (`conformance/services/cluster.yaml`, a template whose underlay
    /// octet is written `UNDERLAY`) on two nodes and `plan`'s underlay, with keyway: what the
    /// Services and attack suites run against. The rendered file is `dir` with `.yaml`.
    pub fn up_services_topology(dir: &Path, plan: Plan) -> anyhow::Result<Lab> {
        let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("services/cluster.yaml");
        let topology = std::fs::read_to_string(&template)
            .with_context(|| format!("cannot read {}", template.display()))?
            .replace("UNDERLAY", &plan.underlay_octet.to_string());
        let file = dir.with_extension("yaml");
        std::fs::write(&file, topology)?;
        Self::up_with(dir, &[file], 2, plan, true)
    }

    pub fn up_with(
        dir: &Path,
        files: &[PathBuf],
        nodes: usize,
        mut plan: Plan,
        keyway: bool,
    ) -> anyhow::Result<Lab> {
        if Self::state_file(dir).exists() {
            bail!(
                "a lab is already up in {} (keyway-lab down first)",
                dir.display()
            );
        }
        let docs = objects::read(files)?;
        let wanted = docs
            .pods
            .iter()
            .filter_map(|p| p.node.as_deref())
            .filter_map(|n| {
                n.strip_prefix("node-")
                    .and_then(|i| i.parse::<usize>().ok())
            })
            .max()
            .unwrap_or(1);
        plan.nodes = nodes.max(wanted).max(1);
        let started = Instant::now();
        let agnhost = agnhost();
        let keyway_cni = bin("keyway-cni");
        std::fs::create_dir_all(dir)?;
        let images = images::build(&agnhost, &dir.join("images"))?;
        let mut lab = Lab {
            dir: dir.to_path_buf(),
            state: LabState {
                plan: PlanState {
                    prefix: plan.prefix.clone(),
                    nodes: plan.nodes,
                    pod_octet: plan.pod_octet,
                    underlay_octet: plan.underlay_octet,
                },
                nodes: Vec::new(),
                pods: Vec::new(),
                externals: Vec::new(),
                networks: Vec::new(),
                agnhost: agnhost.clone(),
                next_node: 0,
                services: Vec::new(),
                slices: Vec::new(),
                datapath: std::env::var("KEYWAY_LAB_DATAPATH").ok(),
            },
        };
        // Record before creating anything, so `down` finds whatever was made if `up` fails.
        lab.save()?;
        plan.destroy();
        plan.create()?;
        let secret = dir.join("cluster-secret");
        write_atomic(&secret, random_hex(32)?.as_bytes(), 0o600)?;
        std::fs::create_dir_all(lab.source())?;
        let nodes_dir = dir.join("nodes");
        for n in plan.all_nodes() {
            lab.write_object(
                "Node",
                "",
                &n.name,
                &serde_yaml_ng::from_str(&n.node_yaml())?,
            )?;
            let nd = nodes_dir.join(&n.name);
            std::fs::create_dir_all(&nd)?;
            let agent_socket = nd.join("agent.sock");
            let agent_pid = lab.spawn_agent(&n.name, &n.netns, IpAddr::V4(n.ip))?;
            let cni_bin = nd.join("cni-bin");
            let cni_conf = nd.join("cni-conf");
            containerd::populate_cni_bin(&cni_bin, &keyway_cni)?;
            std::fs::create_dir_all(&cni_conf)?;
            let conflist = n.conflist(
                "1.0.0",
                &agent_socket.display().to_string(),
                &nd.join("ipam").display().to_string(),
                keyway,
            );
            std::fs::write(
                cni_conf.join("10-keyway.conflist"),
                serde_json::to_vec_pretty(&conflist)?,
            )?;
            let c = Containerd::start(&nd.join("containerd"), &n.netns, &cni_bin, &cni_conf)?;
            lab.state.nodes.push(NodeState {
                name: n.name.clone(),
                netns: n.netns.clone(),
                ip: IpAddr::V4(n.ip),
                containerd: c,
                agent_pid,
                agent_socket,
            });
            lab.save()?;
        }
        // Images and agent readiness, per node.
        for n in &lab.state.nodes {
            for t in &images {
                n.containerd.import(t)?;
            }
            lab.wait_agent_ready(n)?;
        }
        eprintln!(
            "lab: {} node(s) up in {:.1} s",
            plan.nodes,
            started.elapsed().as_secs_f64()
        );
        let mut docs = docs;
        services::add_cluster_dns(&mut docs, &lab.dns_dir(), &lab.state.nodes[0].name)?;
        lab.apply_documents(docs)?;
        lab.save()?;
        Ok(lab)
    }

    /// Where the DNS server's zone lives (mounted into its pod).
    pub fn dns_dir(&self) -> PathBuf {
        self.dir.join("dns")
    }

    /// Starts a node's agent (its state, socket and log in the node's directory).
    fn spawn_agent(&self, node: &str, netns: &str, ip: IpAddr) -> anyhow::Result<u32> {
        let nd = self.dir.join("nodes").join(node);
        containerd::spawn_detached(
            netns,
            &bin("keyway-agent"),
            &[
                "--node-name".into(),
                node.into(),
                "--source".into(),
                format!("file:{}", self.source().display()),
                "--socket".into(),
                nd.join("agent.sock").display().to_string(),
                "--state-dir".into(),
                nd.join("agent-state").display().to_string(),
                "--secret-file".into(),
                self.dir.join("cluster-secret").display().to_string(),
                "--admin".into(),
                // On every address, as the DaemonSet has it (Prometheus scrapes the node).
                AGENT_LISTEN.into(),
                "--node-ip".into(),
                ip.to_string(),
            ],
            &nd.join("agent.log"),
            &[
                (
                    "RUST_LOG",
                    std::env::var("KEYWAY_LAB_AGENT_LOG").unwrap_or_else(|_| "info".into()),
                ),
                (
                    "KEYWAY_DATAPATH",
                    self.state.datapath.clone().unwrap_or_else(|| "auto".into()),
                ),
            ],
        )
    }

    /// Restarts every agent with `--datapath datapath` (as a DaemonSet rollout would: pods keep
    /// running, each agent re-attaches and attaches or removes their fast paths).
    pub fn set_datapath(&mut self, datapath: &str) -> anyhow::Result<()> {
        self.state.datapath = Some(datapath.to_string());
        self.save()?;
        let nodes: Vec<String> = self.state.nodes.iter().map(|n| n.name.clone()).collect();
        for n in nodes {
            self.stop_agent(&n)?;
            self.start_agent(&n)?;
        }
        Ok(())
    }

    /// Stops a node's agent as a DaemonSet rollout does (SIGTERM): its pods keep their devices
    /// and tables.
    pub fn stop_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let i = self.node_index(node)?;
        crate::proc::terminate(self.state.nodes[i].agent_pid, Duration::from_secs(3));
        self.state.nodes[i].agent_pid = 0;
        self.save()
    }

    /// Starts a stopped agent again and waits until it is ready.
    pub fn start_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let i = self.node_index(node)?;
        let n = &self.state.nodes[i];
        let pid = self.spawn_agent(&n.name, &n.netns, n.ip)?;
        self.state.nodes[i].agent_pid = pid;
        self.save()?;
        self.wait_agent_ready(&self.state.nodes[i])
    }

    fn node_index(&self, node: &str) -> anyhow::Result<usize> {
        self.state
            .nodes
            .iter()
            .position(|n| n.name == node)
            .with_context(|| format!("no node {node}"))
    }

    /// A host outside the cluster on the underlay (namespace `<prefix>-c<idx>`, address
    /// 192.168.<underlay>.<199 + idx>), with routes to the pod networks through the nodes: what
    /// reaches NodePorts from outside.
    pub fn add_client(&self, idx: u8) -> anyhow::Result<(String, IpAddr)> {
        let plan = self.state.plan.plan();
        let netns = format!("{}-c{idx}", plan.prefix);
        let ip = std::net::Ipv4Addr::new(192, 168, plan.underlay_octet, 199 + idx);
        plan.add_host(&netns, &format!("c{idx}"), ip)?;
        Ok((netns, IpAddr::V4(ip)))
    }

    /// Probes `targets` (`ADDRESS:PORT` or `NAME:PORT`) from a namespace that is not a pod (a
    /// node, a client): which connected.
    pub fn probe_from_netns(
        &self,
        netns: &str,
        targets: &[String],
        protocol: &str,
        timeout: Duration,
    ) -> anyhow::Result<Vec<bool>> {
        let runner = Runner::Netns {
            netns: netns.into(),
            agnhost: self.state.agnhost.clone(),
        };
        let mut args = probe_args(protocol, timeout);
        args.extend(targets.iter().cloned());
        let out = runner.run(&args)?;
        Ok(targets
            .iter()
            .map(|t| out.lines().any(|l| l == format!("{t} ok")))
            .collect())
    }

    fn wait_agent_ready(&self, n: &NodeState) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if agent_get(&n.netns, "/readyz")
                .map(|r| r.0 == 200)
                .unwrap_or(false)
            {
                return Ok(());
            }
            if Instant::now() > deadline || !crate::proc::alive(n.agent_pid) {
                let log =
                    std::fs::read_to_string(self.dir.join("nodes").join(&n.name).join("agent.log"))
                        .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                bail!(
                    "the agent of {} is not ready; the end of its log:\n{tail}",
                    n.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Applies documents: objects go to the state source (pods are created or relabelled).
    pub fn apply_documents(&mut self, docs: objects::Documents) -> anyhow::Result<()> {
        for (kind, ns, name, doc) in &docs.others {
            if kind == "OverlayNetwork"
                && let Some(cidr) = doc
                    .pointer("/spec/cidr")
                    .and_then(Value::as_str)
                    .and_then(|c| c.parse().ok())
            {
                self.state.networks.retain(|(n, _)| n != name);
                self.state.networks.push((name.clone(), cidr));
            }
            let doc = if kind == "Namespace" {
                objects::with_name_label(doc.clone())
            } else {
                doc.clone()
            };
            if kind == "Service" {
                let svc = services::allocate(&doc, &self.state.services)?;
                self.write_object(kind, ns, name, &svc.doc)?;
                self.state
                    .services
                    .retain(|s| s.namespace != svc.namespace || s.name != svc.name);
                self.state.services.push(svc);
            } else if kind != "ExternalEntity" {
                self.write_object(kind, ns, name, &doc)?;
            }
        }
        // Namespaces of pods exist, as the API server would insist.
        for p in &docs.pods {
            if !self
                .source()
                .join(source_path("Namespace", "", &p.namespace))
                .exists()
            {
                let ns_doc = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": p.namespace}});
                self.write_object(
                    "Namespace",
                    "",
                    &p.namespace,
                    &objects::with_name_label(ns_doc),
                )?;
            }
        }
        for p in docs.pods {
            match self
                .state
                .pods
                .iter()
                .position(|s| s.spec.namespace == p.namespace && s.spec.name == p.name)
            {
                Some(i) => self.relabel(i, p)?,
                None => self.create_pod(p)?,
            }
            self.save()?;
        }
        for (kind, ns, name, doc) in &docs.others {
            if kind == "ExternalEntity"
                && !self
                    .state
                    .externals
                    .iter()
                    .any(|e| e.namespace == *ns && e.name == *name)
            {
                self.create_external(ns, name, doc)?;
                self.save()?;
            }
        }
        self.refresh_externals()?;
        self.sync_services()?;
        self.wait_converged(Duration::from_secs(20))
    }

    /// Plays the EndpointSlice controller and kube-proxy after a change: the slices of every
    /// Service with a selector are written for the agents (stale ones removed), and each node's
    /// kube-proxy table is replaced.
    pub fn sync_services(&mut self) -> anyhow::Result<()> {
        let pods: Vec<services::PodView> = self
            .state
            .pods
            .iter()
            .filter_map(|p| {
                Some(services::PodView {
                    namespace: &p.spec.namespace,
                    name: &p.spec.name,
                    uid: &p.uid,
                    node: &p.node,
                    ip: p.infra_ip.parse().ok()?,
                    doc: &p.spec.doc,
                })
            })
            .collect();
        let slices = services::slices(&self.state.services, &pods);
        let keys: Vec<(String, String)> = slices
            .iter()
            .map(|(ns, n, _)| (ns.clone(), n.clone()))
            .collect();
        for (ns, name) in &self.state.slices {
            if !keys.contains(&(ns.clone(), name.clone())) {
                self.remove_object("EndpointSlice", ns, name);
            }
        }
        for (ns, name, doc) in &slices {
            let path = self.source().join(source_path("EndpointSlice", ns, name));
            let text = serde_yaml_ng::to_string(doc)?;
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                write_atomic(&path, text.as_bytes(), 0o644)?;
            }
        }
        self.state.slices = keys;
        let zone = services::zone(&self.state.services, &slices);
        std::fs::create_dir_all(self.dns_dir())?;
        let zone_file = self.dns_dir().join(services::ZONE_FILE);
        if std::fs::read_to_string(&zone_file).ok().as_deref() != Some(zone.as_str()) {
            write_atomic(&zone_file, zone.as_bytes(), 0o644)?;
        }
        for n in &self.state.nodes {
            let script = services::kube_proxy(&self.state.services, &slices, &n.name);
            crate::proc::run_stdin(
                &["ip", "netns", "exec", &n.netns, "nft", "-f", "-"],
                &script,
            )
            .with_context(|| format!("kube-proxy's table on {}", n.name))?;
        }
        Ok(())
    }

    fn relabel(&mut self, i: usize, p: LabPod) -> anyhow::Result<()> {
        let mut doc = p.doc.clone();
        let st = &self.state.pods[i];
        doc["spec"]["nodeName"] = Value::String(st.node.clone());
        doc["metadata"]["uid"] = Value::String(st.uid.clone());
        doc["status"] = self.status_of(st);
        self.write_object("Pod", &p.namespace, &p.name, &doc)?;
        self.state.pods[i].spec = p;
        Ok(())
    }

    fn status_of(&self, st: &PodState) -> Value {
        let host = self
            .node(&st.node)
            .map(|n| n.ip.to_string())
            .unwrap_or_default();
        serde_json::json!({"phase": "Running", "hostIP": host, "podIP": st.infra_ip, "podIPs": [{"ip": st.infra_ip}]})
    }

    /// Creates a pod through CRI on its node, as kubelet would, recording its status.
    pub fn create_pod(&mut self, p: LabPod) -> anyhow::Result<()> {
        let node = match &p.node {
            Some(n) => n.clone(),
            None => {
                let i = self.state.next_node % self.state.nodes.len();
                self.state.next_node += 1;
                self.state.nodes[i].name.clone()
            }
        };
        let n = self.node(&node)?.clone();
        let uid = random_hex(8)?;
        let mut doc = p.doc.clone();
        doc["spec"]["nodeName"] = Value::String(node.clone());
        doc["metadata"]["uid"] = Value::String(uid.clone());
        if doc["metadata"]["namespace"].is_null() {
            doc["metadata"]["namespace"] = Value::String(p.namespace.clone());
        }
        // The API server has the pod before kubelet runs it.
        self.write_object("Pod", &p.namespace, &p.name, &doc)?;
        let mut cri = Cri::connect(&n.containerd.socket)?;
        let spec = PodSpec {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            uid: uid.clone(),
            labels: p.labels.clone(),
            log_dir: self.pod_log_dir(&node, &p.namespace, &p.name),
            dns: (!p.system).then(|| {
                DnsSpec::cluster_first(&services::DNS_SERVICE_IP.to_string(), &p.namespace)
            }),
        };
        let sandbox = cri
            .run_pod_sandbox(&spec)
            .with_context(|| format!("creating {}/{} on {node}", p.namespace, p.name))?;
        let infra_ip = cri
            .pod_ips(&sandbox)?
            .into_iter()
            .next()
            .unwrap_or_default();
        let mut containers = Vec::new();
        for c in &p.containers {
            let mut command = vec!["/agnhost".to_string()];
            if let Some(args) = &c.command {
                command.extend(args.iter().cloned());
            } else if c.ports.is_empty() {
                command.push("pause".into());
            } else {
                command.push("serve".into());
                command.extend(
                    c.ports
                        .iter()
                        .map(|(port, proto)| format!("{port}/{proto}")),
                );
            }
            let id = cri.create_and_start(
                &sandbox,
                &spec,
                &ContainerSpec {
                    name: c.name.clone(),
                    image: images::AGNHOST_IMAGE.into(),
                    command,
                    mounts: c.mounts.clone(),
                },
            )?;
            containers.push((c.name.clone(), id));
        }
        let mut st = PodState {
            spec: p,
            node: node.clone(),
            uid,
            sandbox,
            containers,
            infra_ip,
            overlay_ips: Vec::new(),
            netns_path: String::new(),
        };
        // The pod's overlay addresses, from the agent that serves it.
        let (_, body) = crate::harness::debug_get(&n.agent_socket, "/debug/attachments")?;
        let att: Value = serde_json::from_str(&body)?;
        if let Some(a) = att["attachments"].as_array().and_then(|v| {
            v.iter()
                .find(|a| a["namespace"] == st.spec.namespace && a["pod"] == st.spec.name)
        }) {
            st.overlay_ips = a["overlayIps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_str()?.parse().ok())
                .collect();
            st.netns_path = a["netns"].as_str().unwrap_or_default().to_string();
        } else {
            // Not keyway's (opted out): the runtime knows where it is.
            st.netns_path = cri.netns_path(&st.sandbox)?;
        }
        doc["status"] = self.status_of(&st);
        self.write_object("Pod", &st.spec.namespace, &st.spec.name, &doc)?;
        eprintln!(
            "lab: pod {} on {node}: {} {:?}",
            st.key(),
            st.infra_ip,
            st.overlay_ips
        );
        self.state.pods.push(st);
        Ok(())
    }

    /// Stops and removes a pod through CRI (DEL with and then without its namespace), and takes
    /// it out of its Services' endpoints.
    pub fn delete_pod(&mut self, ns: &str, name: &str) -> anyhow::Result<()> {
        self.remove_pod(ns, name)?;
        self.sync_services()
    }

    fn remove_pod(&mut self, ns: &str, name: &str) -> anyhow::Result<()> {
        let Some(i) = self
            .state
            .pods
            .iter()
            .position(|p| p.spec.namespace == ns && p.spec.name == name)
        else {
            bail!("no pod {ns}/{name} in this lab");
        };
        let st = self.state.pods.remove(i);
        let n = self.node(&st.node)?;
        let mut cri = Cri::connect(&n.containerd.socket)?;
        cri.stop_pod_sandbox(&st.sandbox)?;
        cri.remove_pod_sandbox(&st.sandbox)?;
        self.remove_object("Pod", ns, name);
        // kubelet removes a deleted pod's log directory; so does the lab.
        let _ = std::fs::remove_dir_all(self.pod_log_dir(&st.node, ns, name));
        Ok(())
    }

    /// Where the runtime writes a pod's container logs.
    fn pod_log_dir(&self, node: &str, ns: &str, name: &str) -> PathBuf {
        self.dir
            .join("nodes")
            .join(node)
            .join("pod-logs")
            .join(format!("{ns}_{name}"))
    }

    fn overlay_route(&self, ip: IpAddr) -> ipnetwork::IpNetwork {
        self.state
            .networks
            .iter()
            .map(|(_, c)| *c)
            .find(|c| c.contains(ip))
            .unwrap_or_else(|| match ip {
                IpAddr::V4(_) => "100.64.0.0/10".parse().expect("valid"),
                IpAddr::V6(a) => ipnetwork::IpNetwork::new(IpAddr::V6(a), 48)
                    .map(|n| ipnetwork::IpNetwork::new(n.network(), 48).expect("valid"))
                    .expect("valid"),
            })
    }

    /// An external entity: a namespace on the underlay running `keyway-sap` as an endpoint, with a
    /// test server on its overlay address; its gateway is a node's SaP.
    fn create_external(&mut self, ns: &str, name: &str, doc: &Value) -> anyhow::Result<()> {
        let spec: keyway_agent::model::ExternalEntitySpec =
            serde_json::from_value(doc["spec"].clone()).context("ExternalEntity spec")?;
        let idx = self.state.externals.len() + 1;
        let netns = format!("{}-x{idx}", self.state.plan.prefix);
        let plan = self.state.plan.plan();
        let IpAddr::V4(addr) = spec.address.ip() else {
            bail!("external {ns}/{name}: the lab's underlay is IPv4")
        };
        for ip in &spec.overlay_ips {
            if !self.state.networks.is_empty()
                && !self.state.networks.iter().any(|(_, c)| c.contains(*ip))
            {
                bail!(
                    "external {ns}/{name}: overlay address {ip} is in no OverlayNetwork of the lab"
                );
            }
        }
        plan.add_host(&netns, &format!("x{idx}"), addr)?;
        let ports: Vec<(u16, String)> = doc
            .pointer("/metadata/annotations/keyway.io~1serve")
            .and_then(Value::as_str)
            .unwrap_or("80/TCP")
            .split(',')
            .filter_map(|s| {
                let (p, proto) = s.trim().split_once('/')?;
                Some((p.parse().ok()?, proto.to_string()))
            })
            .collect();
        self.state.externals.push(ExternalState {
            namespace: ns.into(),
            name: name.into(),
            netns,
            address: spec.address,
            overlay_ips: spec.overlay_ips.clone(),
            gateway: spec.gateway.clone(),
            sap_pid: 0,
            server_pid: 0,
            config: self.dir.join(format!("external-{ns}-{name}.yaml")),
            ports,
        });
        // The agents learn of it from the state source.
        self.write_object("ExternalEntity", ns, name, doc)?;
        Ok(())
    }

    /// (Re)writes each external's configuration from the pods now known, and (re)starts its
    /// endpoint and server.
    fn refresh_externals(&mut self) -> anyhow::Result<()> {
        let secret =
            keyway_core::key::ClusterSecret::new(std::fs::read(self.dir.join("cluster-secret"))?)?;
        let externals = self.state.externals.clone();
        for (i, e) in externals.iter().enumerate() {
            let gw = self.node(&e.gateway)?.ip;
            let Some(my_ip) = e.overlay_ips.first().copied() else {
                continue;
            };
            let entity = format!("external/{}/{}", e.namespace, e.name);
            let key = secret.derive(&entity, keyway_core::key::Epoch(0));
            let mut entities = Vec::new();
            for p in &self.state.pods {
                let prefixes: Vec<String> = p
                    .overlay_ips
                    .iter()
                    .filter(|ip| ip.is_ipv4() == my_ip.is_ipv4())
                    .map(|ip| ipnetwork::IpNetwork::from(*ip).to_string())
                    .collect();
                if prefixes.is_empty() {
                    continue;
                }
                entities.push(serde_json::json!({
                    "entity": p.key(), "prefixes": prefixes, "infra": format!("{}:6080", p.infra_ip), "sap": format!("{gw}:6080")
                }));
            }
            let mut config = serde_json::json!({
                "mode": "endpoint",
                "listen": e.address.to_string(),
                "saps": [gw.to_string()],
                "secretFile": self.dir.join("cluster-secret"),
                "endpoint": {
                    "entity": entity,
                    "device": "kw0",
                    "address": ipnetwork::IpNetwork::from(my_ip).to_string(),
                    "routes": [self.overlay_route(my_ip).to_string()],
                    "key": format!("{:#010x}", key.0),
                },
                "entities": entities,
            });
            // The cluster's key rotation, as its operator would configure the endpoint.
            let cc = self.cluster_config();
            if let Some(period) = cc["keyRotationSeconds"].as_u64() {
                config["rotation"] = serde_json::json!({
                    "periodSeconds": period,
                    "graceSeconds": cc["keyGraceSeconds"].as_u64().unwrap_or(period / 4),
                });
            }
            let text = serde_yaml_ng::to_string(&config)?;
            if crate::proc::alive(e.sap_pid)
                && std::fs::read_to_string(&e.config).is_ok_and(|old| old == text)
            {
                continue;
            }
            std::fs::write(&e.config, text)?;
            if e.sap_pid != 0 {
                crate::proc::terminate(e.sap_pid, Duration::from_secs(3));
            }
            let log = self
                .dir
                .join(format!("external-{}-{}.log", e.namespace, e.name));
            let sap_pid = containerd::spawn_detached(
                &e.netns,
                &bin("keyway-sap"),
                &["--config".into(), e.config.display().to_string()],
                &log,
                &[],
            )?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !in_ns(&e.netns, &["ip", "link", "show", "kw0"])
                .is_ok_and(|o| o.contains("LOWER_UP"))
            {
                if Instant::now() > deadline || !crate::proc::alive(sap_pid) {
                    bail!(
                        "keyway-sap for {} did not come up: {}",
                        e.key(),
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if e.server_pid == 0 || !crate::proc::alive(e.server_pid) {
                let mut args = vec!["serve".to_string(), "--bind".into(), my_ip.to_string()];
                args.extend(e.ports.iter().map(|(p, proto)| format!("{p}/{proto}")));
                let spid =
                    containerd::spawn_detached(&e.netns, &self.state.agnhost, &args, &log, &[])?;
                self.state.externals[i].server_pid = spid;
            }
            self.state.externals[i].sap_pid = sap_pid;
        }
        Ok(())
    }

    /// Waits until every agent routes to every overlay address (and pod IP) of the lab.
    pub fn wait_converged(&self, within: Duration) -> anyhow::Result<()> {
        let want: usize = self
            .state
            .pods
            .iter()
            .map(|p| p.overlay_ips.len() + usize::from(!p.overlay_ips.is_empty()))
            .sum::<usize>()
            + self
                .state
                .externals
                .iter()
                .map(|e| e.overlay_ips.len())
                .sum::<usize>();
        let deadline = Instant::now() + within;
        for n in &self.state.nodes {
            loop {
                let have = agent_get(&n.netns, "/metrics")
                    .ok()
                    .and_then(|(_, m)| {
                        m.lines().find_map(|l| {
                            l.strip_prefix("keyway_fib_entries ")
                                .and_then(|v| v.trim().parse::<f64>().ok())
                        })
                    })
                    .unwrap_or(0.0) as usize;
                if have >= want {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{} routes {have} of {want} overlay addresses", n.name);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    pub fn apply(&mut self, files: &[PathBuf]) -> anyhow::Result<()> {
        let docs = objects::read(files)?;
        self.apply_documents(docs)?;
        self.save()
    }

    pub fn delete(&mut self, files: &[PathBuf]) -> anyhow::Result<()> {
        let docs = objects::read(files)?;
        for p in &docs.pods {
            self.delete_object("Pod", &p.namespace, &p.name)?;
        }
        for (kind, ns, name, _) in &docs.others {
            self.delete_object(kind, ns, name)?;
        }
        self.save()
    }

    /// Deletes one object, as `kubectl delete` would: a pod is stopped and removed through CRI, a
    /// namespace takes its pods with it.
    pub fn delete_object(&mut self, kind: &str, ns: &str, name: &str) -> anyhow::Result<()> {
        match kind {
            "Pod" => return self.delete_pod(ns, name),
            "Namespace" => {
                let pods: Vec<(String, String)> = self
                    .state
                    .pods
                    .iter()
                    .filter(|p| p.spec.namespace == name)
                    .map(|p| (p.spec.namespace.clone(), p.spec.name.clone()))
                    .collect();
                for (pns, pname) in pods {
                    self.remove_pod(&pns, &pname)?;
                }
                self.state.services.retain(|s| s.namespace != name);
            }
            "Service" => {
                self.state
                    .services
                    .retain(|s| s.namespace != ns || s.name != name);
            }
            _ => {}
        }
        self.remove_object(kind, ns, name);
        self.sync_services()
    }

    /// The pods the documents asked for (not the lab's own, such as its DNS server).
    pub fn workloads(&self) -> impl Iterator<Item = &PodState> {
        self.state.pods.iter().filter(|p| !p.spec.system)
    }

    /// Every probe source/target: pods, then externals, by `namespace/name`.
    fn endpoints(&self) -> Vec<(String, Vec<IpAddr>, String)> {
        let mut v: Vec<(String, Vec<IpAddr>, String)> = self
            .workloads()
            .map(|p| (p.key(), p.overlay_ips.clone(), p.infra_ip.clone()))
            .collect();
        v.extend(
            self.state
                .externals
                .iter()
                .map(|e| (e.key(), e.overlay_ips.clone(), e.address.ip().to_string())),
        );
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Probes every ordered pair in parallel from inside each source and returns the matrix. A pod
    /// to itself is always connected (loopback is never blocked) and is not probed.
    pub fn probe(
        &self,
        port: u16,
        protocol: &str,
        via: Via,
        timeout: Duration,
    ) -> anyhow::Result<Matrix> {
        let eps = self.endpoints();
        let names: Vec<String> = eps.iter().map(|e| e.0.clone()).collect();
        let mut handles = Vec::new();
        for (i, (src, src_overlay, _)) in eps.iter().enumerate() {
            // Targets: the destination's address in a family the source is on (or its underlay).
            let mut targets: Vec<(usize, Option<String>)> = Vec::new();
            for (j, (dst, dst_overlay, dst_infra)) in eps.iter().enumerate() {
                if i == j {
                    continue;
                }
                if via == Via::Dns {
                    let name = self
                        .named_service_of(dst, port, protocol)
                        .map(|s| format!("{}.{}:{port}", s.name, s.namespace));
                    targets.push((j, name));
                    continue;
                }
                let ip = match via {
                    Via::Overlay => dst_overlay
                        .iter()
                        .find(|d| src_overlay.iter().any(|s| s.is_ipv4() == d.is_ipv4()))
                        .copied(),
                    Via::PodIp | Via::Underlay => dst_infra.parse().ok(),
                    Via::Service | Via::Dns => self
                        .service_of(dst, port, protocol)
                        .and_then(|s| s.cluster_ip()),
                };
                targets.push((j, ip.map(|ip| SocketAddr::new(ip, port).to_string())));
            }
            let mut args = probe_args(protocol, timeout);
            let runner = self.runner(src)?;
            if via == Via::Underlay && matches!(runner, Runner::Cri { .. }) {
                args.extend(["--device".to_string(), "eth0".to_string()]);
            }
            let flags = args.len();
            args.extend(targets.iter().filter_map(|(_, t)| t.clone()));
            handles.push(std::thread::spawn(
                move || -> anyhow::Result<(usize, Vec<(usize, bool)>)> {
                    let out = if args.len() > flags {
                        runner.run(&args)?
                    } else {
                        String::new()
                    };
                    let ok: std::collections::HashSet<String> = out
                        .lines()
                        .filter(|l| l.ends_with(" ok"))
                        .map(|l| l.trim_end_matches(" ok").to_string())
                        .collect();
                    Ok((
                        i,
                        targets
                            .iter()
                            .map(|(j, t)| (*j, t.as_ref().is_some_and(|t| ok.contains(t))))
                            .collect(),
                    ))
                },
            ));
        }
        let mut cells = vec![vec![false; names.len()]; names.len()];
        for h in handles {
            let (i, row) = h
                .join()
                .map_err(|_| anyhow::anyhow!("a probe thread panicked"))??;
            cells[i][i] = true;
            for (j, ok) in row {
                cells[i][j] = ok;
            }
        }
        Ok(Matrix { names, cells })
    }

    /// A Service that stands for the pod `key` alone (its selector picks no other pod) and has
    /// `port`/`protocol`, with a cluster IP; the first by name.
    pub fn service_of(
        &self,
        key: &str,
        port: u16,
        protocol: &str,
    ) -> Option<&services::LabService> {
        self.services_of(key, port, protocol)
            .into_iter()
            .find(|s| s.cluster_ip().is_some())
    }

    /// As [`Lab::service_of`], headless Services too (DNS answers them with the pod IP).
    pub fn named_service_of(
        &self,
        key: &str,
        port: u16,
        protocol: &str,
    ) -> Option<&services::LabService> {
        self.services_of(key, port, protocol).into_iter().next()
    }

    fn services_of(&self, key: &str, port: u16, protocol: &str) -> Vec<&services::LabService> {
        let selected = |svc: &services::LabService| -> Vec<String> {
            let sel: BTreeMap<String, String> = svc
                .doc
                .pointer("/spec/selector")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .unwrap_or_default();
            if sel.is_empty() {
                return Vec::new();
            }
            self.state
                .pods
                .iter()
                .filter(|p| p.spec.namespace == svc.namespace)
                .filter(|p| sel.iter().all(|(k, v)| p.spec.labels.get(k) == Some(v)))
                .map(|p| p.key())
                .collect()
        };
        let mut candidates: Vec<&services::LabService> = self
            .state
            .services
            .iter()
            .filter(|s| s.has_port(port, protocol))
            .filter(|s| selected(s) == [key])
            .collect();
        candidates.sort_by_key(|s| s.key());
        candidates
    }

    /// How to run agnhost as a source: ExecSync in a pod's first container, or directly in an
    /// external's namespace.
    fn runner(&self, key: &str) -> anyhow::Result<Runner> {
        if let Some(p) = self.state.pods.iter().find(|p| p.key() == key) {
            let n = self.node(&p.node)?;
            return Ok(Runner::Cri {
                socket: n.containerd.socket.clone(),
                container: p.containers[0].1.clone(),
            });
        }
        let e = self
            .state
            .externals
            .iter()
            .find(|e| e.key() == key)
            .with_context(|| format!("no endpoint {key}"))?;
        Ok(Runner::Netns {
            netns: e.netns.clone(),
            agnhost: self.state.agnhost.clone(),
        })
    }

    /// A series of the agents' metrics, per node (0 where an agent does not answer or lacks it).
    /// Switches the cluster's packet authentication (`Disabled`, `Permissive`, `Strict`) in its
    /// ClusterConfig, as an operator would, and waits until every node's agent runs the mode.
    pub fn set_packet_authentication(&mut self, mode: &str) -> anyhow::Result<()> {
        self.patch_cluster_config(serde_json::json!({ "packetAuthentication": mode }))?;
        let series = format!(
            "keyway_packet_authentication{{mode=\"{}\"}}",
            mode.to_lowercase()
        );
        self.await_metric(&series, 1.0)
    }

    /// The spec of the cluster's ClusterConfig as the state source holds it (empty without one).
    fn cluster_config(&self) -> Value {
        std::fs::read_to_string(self.source().join(source_path(
            "ClusterConfig",
            "",
            CLUSTER_CONFIG,
        )))
        .ok()
        .and_then(|t| serde_yaml_ng::from_str::<Value>(&t).ok())
        .map(|d| d["spec"].clone())
        .filter(Value::is_object)
        .unwrap_or_else(|| serde_json::json!({}))
    }

    /// Sets fields of the cluster's ClusterConfig and keeps the others, as `kubectl patch` does.
    pub fn patch_cluster_config(&mut self, fields: Value) -> anyhow::Result<()> {
        let mut spec = self.cluster_config();
        for (k, v) in fields.as_object().context("ClusterConfig fields")? {
            spec[k] = v.clone();
        }
        let doc = serde_json::json!({
            "apiVersion": "keyway.io/v1alpha1", "kind": "ClusterConfig",
            "metadata": {"name": CLUSTER_CONFIG}, "spec": spec,
        });
        self.apply_documents(objects::Documents {
            pods: Vec::new(),
            others: vec![(
                "ClusterConfig".into(),
                String::new(),
                CLUSTER_CONFIG.into(),
                doc,
            )],
        })
    }

    /// Waits (up to 15 s) until every node's agent reports `value` for `series`: a change of the
    /// state source has reached every data path.
    fn await_metric(&self, series: &str, value: f64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.node_metric(series);
            if now.iter().all(|v| *v == value) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{series} is {now:?} on the nodes after 15 s, not {value}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn node_metric(&self, series: &str) -> Vec<f64> {
        self.state
            .nodes
            .iter()
            .map(|n| {
                agent_get(&n.netns, "/metrics")
                    .ok()
                    .and_then(|(_, m)| {
                        m.lines().find_map(|l| {
                            l.strip_prefix(series)?
                                .strip_prefix(' ')?
                                .trim()
                                .parse()
                                .ok()
                        })
                    })
                    .unwrap_or(0.0)
            })
            .collect()
    }

    fn sap_counters(&self) -> Vec<f64> {
        self.node_metric("keyway_datapath_packets_total{stage=\"sap\"}")
    }

    /// The SaP counters once they stop moving: a probe's connection may still be closing when
    /// the probe returns, and what the kernel fast path forwarded is added to the counters at
    /// the agent's next sync (every second).
    fn settled_sap_counters(&self) -> Vec<f64> {
        keyway_testing::settled(Duration::from_millis(1200), 5, || self.sap_counters())
    }

    /// For every pair the overlay connects, which SaPs its packets went through (the paper's
    /// Table I): each pair is probed alone, and the nodes' SaP counters read before and after.
    pub fn paths(&self, port: u16, protocol: &str) -> anyhow::Result<String> {
        let m = self.probe(port, protocol, Via::Overlay, Duration::from_millis(1000))?;
        let eps = self.endpoints();
        let mut out = String::new();
        let mut counters = self.settled_sap_counters();
        for (i, from) in m.names.iter().enumerate() {
            for (j, to) in m.names.iter().enumerate() {
                if i == j || !m.cells[i][j] {
                    continue;
                }
                let Some(ip) = eps[j]
                    .1
                    .iter()
                    .find(|d| eps[i].1.iter().any(|s| s.is_ipv4() == d.is_ipv4()))
                else {
                    continue;
                };
                let target = SocketAddr::new(*ip, port).to_string();
                let before = counters;
                self.runner(from)?.run(&[
                    "probe".into(),
                    "--protocol".into(),
                    protocol.into(),
                    "--timeout-ms".into(),
                    "1000".into(),
                    target,
                ])?;
                let after = self.settled_sap_counters();
                counters = after.clone();
                let saps: Vec<String> = self
                    .state
                    .nodes
                    .iter()
                    .zip(before.iter().zip(&after))
                    .filter(|(_, (b, a))| *a > *b)
                    .map(|(n, (b, a))| format!("{} ({} packets)", n.name, a - b))
                    .collect();
                let path = if saps.is_empty() {
                    "direct (keys alone)".to_string()
                } else {
                    format!("through the SaP of {}", saps.join(" and "))
                };
                out += &format!("{from:<24} -> {to:<24} {path}\n");
            }
        }
        Ok(out)
    }

    pub fn status(&self) -> String {
        let mut s = format!(
            "lab in {} with {} node(s)\n",
            self.dir.display(),
            self.state.nodes.len()
        );
        for n in &self.state.nodes {
            let ready = agent_get(&n.netns, "/readyz")
                .map(|r| r.0 == 200)
                .unwrap_or(false);
            s += &format!(
                "  {} {} agent pid {} {}\n",
                n.name,
                n.ip,
                n.agent_pid,
                if ready { "ready" } else { "NOT READY" }
            );
        }
        for p in &self.state.pods {
            s += &format!(
                "  pod {} on {}: {} overlay {:?}\n",
                p.key(),
                p.node,
                p.infra_ip,
                p.overlay_ips
            );
        }
        for e in &self.state.externals {
            s += &format!(
                "  external {} at {} overlay {:?} via {}\n",
                e.key(),
                e.address,
                e.overlay_ips,
                e.gateway
            );
        }
        s
    }

    /// Stops everything the lab in `dir` started and removes every namespace, link, table,
    /// process, mount and file of it. Harmless when there is nothing left.
    pub fn down(dir: &Path) -> anyhow::Result<String> {
        let mut report = Vec::new();
        let state: Option<LabState> = std::fs::read_to_string(Self::state_file(dir))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        if let Some(st) = &state {
            // Pods first, while the agents can still take their DELs.
            for n in &st.nodes {
                if crate::proc::alive(n.containerd.pid)
                    && let Ok(mut cri) = Cri::connect(&n.containerd.socket)
                {
                    for (id, ns, name) in cri.list_sandboxes().unwrap_or_default() {
                        let _ = cri.stop_pod_sandbox(&id);
                        let _ = cri.remove_pod_sandbox(&id);
                        report.push(format!("pod {ns}/{name} removed"));
                    }
                }
            }
            for e in &st.externals {
                for pid in [e.sap_pid, e.server_pid] {
                    if pid != 0 {
                        crate::proc::terminate(pid, Duration::from_secs(3));
                    }
                }
            }
            for n in &st.nodes {
                n.containerd.stop();
                crate::proc::terminate(n.agent_pid, Duration::from_secs(3));
            }
        }
        // Anything else that mentions the lab's directory: shims, stragglers.
        let mut stopped: Vec<u32> = state
            .iter()
            .flat_map(|st| {
                st.nodes
                    .iter()
                    .flat_map(|n| [n.containerd.pid, n.agent_pid])
                    .chain(st.externals.iter().flat_map(|e| [e.sap_pid, e.server_pid]))
            })
            .filter(|p| *p != 0)
            .collect();
        for pid in crate::proc::find(&dir.display().to_string()) {
            crate::proc::terminate(pid, Duration::from_secs(2));
            report.push(format!("process {pid} stopped"));
            stopped.push(pid);
        }
        // Gone means gone from /proc, not just dead: wait for them to be reaped.
        let deadline = Instant::now() + Duration::from_secs(5);
        while stopped
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Mounts under the lab's directory, deepest first; pod namespaces the runtime left.
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(String::from))
            .filter(|m| m.starts_with(&dir.display().to_string()))
            .collect();
        if let Some(st) = &state {
            for p in &st.pods {
                if !p.netns_path.is_empty() && Path::new(&p.netns_path).exists() {
                    mounts.push(p.netns_path.clone());
                }
            }
        }
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in &mounts {
            let _ = sh(&["umount", "-l", m]);
            if m.starts_with("/var/run/netns/") || m.starts_with("/run/netns/") {
                let _ = std::fs::remove_file(m);
            }
            report.push(format!("unmounted {m}"));
        }
        // Namespaces: the nodes, the underlay, the externals.
        let prefix = state
            .as_ref()
            .map(|s| s.plan.prefix.clone())
            .unwrap_or_else(|| "kwl".into());
        let names = sh(&["ip", "netns", "list"]).unwrap_or_default();
        for l in names.lines() {
            let name = l.split_whitespace().next().unwrap_or_default();
            if name.starts_with(&format!("{prefix}-")) {
                let _ = sh(&["ip", "netns", "del", name]);
                report.push(format!("namespace {name} deleted"));
            }
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
            report.push(format!("{} removed", dir.display()));
        }
        Ok(if report.is_empty() {
            "nothing to take down".into()
        } else {
            report.join("\n")
        })
    }
}

/// A lab directory beside `base` for a command that brings up its own lab (`bench`, `soak`):
/// `<base's name>-<suffix>`.
pub fn sibling_dir(base: &Path, suffix: &str) -> PathBuf {
    base.with_file_name(format!(
        "{}-{suffix}",
        base.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("keyway-lab")
    ))
}

/// Takes the lab in a directory down when dropped, so that a test that fails half-way leaves
/// nothing behind.
#[derive(Debug)]
pub struct DownOnDrop(pub PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if let Err(e) = Lab::down(&self.0) {
            eprintln!("lab down: {e:#}");
        }
    }
}

/// Runs `agnhost` as a probe source.
#[derive(Debug, Clone)]
pub enum Runner {
    Cri { socket: PathBuf, container: String },
    Netns { netns: String, agnhost: PathBuf },
}

impl Runner {
    pub fn run(&self, args: &[String]) -> anyhow::Result<String> {
        match self {
            Runner::Cri { socket, container } => {
                let mut cri = Cri::connect(socket)?;
                let mut cmd = vec!["/agnhost".to_string()];
                cmd.extend_from_slice(args);
                let (code, out, err) = cri.exec_sync(container, &cmd, Duration::from_secs(60))?;
                if code != 0 {
                    bail!("agnhost {} failed ({code}): {err}", args.join(" "));
                }
                Ok(out)
            }
            Runner::Netns { netns, agnhost } => {
                let agnhost = agnhost.display().to_string();
                let mut cmd = vec![agnhost.as_str()];
                cmd.extend(args.iter().map(String::as_str));
                in_ns(netns, &cmd)
            }
        }
    }
}

/// Pods by name, for callers that want them.
pub fn pods_by_key(lab: &Lab) -> BTreeMap<String, &PodState> {
    lab.state.pods.iter().map(|p| (p.key(), p)).collect()
}

/// Names used in documents.
pub fn doc_name(doc: &Value) -> String {
    meta(doc, "name")
}

/// The node an index names.
pub fn sim_node(plan: &Plan, name: &str) -> Option<SimNode> {
    plan.all_nodes().into_iter().find(|n| n.name == name)
}
