//! The NetworkPolicy conformance cases, ported from the upstream Kubernetes e2e suite
//! (test/e2e/network/netpol), and the two ways of running them: against the policy compiler
//! alone (fast, no privileges: it checks the semantics) and in a lab (pods through CRI, the real
//! plugin, agents and data path: it checks the enforcement).
//!
//! A case is a YAML file: a name, a context, and steps; each step applies documents or deletes
//! objects, then probes, each probe with the truth table it must produce. Documents may name the
//! addresses of pods, which only exist once the pods run: `{{overlay x/b}}` (the pod's IPv4
//! overlay address), `{{overlay16 x/b}}` (the /16 that holds it), `{{podIP x/b}}` and
//! `{{podIP16 x/b}}` (the same for the address the primary CNI gave it, which Kubernetes reports).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;

use keyway_agent::compile::{self, KeyCache, NodeContext};
use keyway_agent::model::{Model, ObjectKey, OverlayAttachmentSpec};
use keyway_core::key::{ClusterSecret, Rotation};
use keyway_core::packet::{self, PROTO_TCP};

use crate::lab::{Lab, Matrix, Via};

/// A case file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// The protocol context upstream runs the case in (TCP, UDP, SCTP, or several).
    pub context: String,
    pub steps: Vec<Step>,
    #[serde(skip)]
    pub file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Documents to apply, as `kubectl apply` would (several separated by `---`).
    #[serde(default)]
    pub apply: Option<String>,
    /// Objects to delete.
    #[serde(default)]
    pub delete: Vec<ObjectRef>,
    pub probes: Vec<Probe>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ObjectRef {
    pub kind: String,
    #[serde(default)]
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub port: u16,
    pub protocol: String,
    /// `overlay` (default; also probed by pod IP and by Service), `pod-ip`, `service`, or
    /// `underlay`: the pods' infrastructure addresses from `eth0`, which keyway must keep closed
    /// whatever the policy.
    #[serde(default)]
    pub via: Option<String>,
    pub truth: String,
}

impl Probe {
    pub fn via(&self) -> anyhow::Result<Via> {
        match self.via.as_deref() {
            None | Some("overlay") => Ok(Via::Overlay),
            Some("pod-ip") => Ok(Via::PodIp),
            Some("underlay") => Ok(Via::Underlay),
            Some("service") => Ok(Via::Service),
            Some("dns") => Ok(Via::Dns),
            Some(v) => bail!("probe via {v:?}: expected overlay, pod-ip, service, dns or underlay"),
        }
    }

    pub fn expected(&self) -> anyhow::Result<Matrix> {
        Matrix::parse(&self.truth)
    }
}

/// Where the cases live in the source tree.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("netpol")
}

/// The topology every case starts from.
pub fn base_file() -> PathBuf {
    dir().join("base.yaml")
}

/// Loads and checks every case in `dir`, in file-name order.
pub fn load_cases(dir: &Path) -> anyhow::Result<Vec<Case>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        let mut c: Case = serde_yaml_ng::from_str(&text)
            .with_context(|| format!("{}: not a case", f.display()))?;
        c.file = f.clone();
        if c.steps.is_empty() {
            bail!("{}: a case needs at least one step", f.display());
        }
        for s in &c.steps {
            if s.apply.is_none() && s.delete.is_empty() {
                bail!("{}: a step applies or deletes something", f.display());
            }
            if s.probes.is_empty() {
                bail!("{}: a step without probes checks nothing", f.display());
            }
            for p in &s.probes {
                p.via().with_context(|| f.display().to_string())?;
                p.expected().with_context(|| f.display().to_string())?;
            }
        }
        cases.push(c);
    }
    Ok(cases)
}

/// Every pod's addresses, by `namespace/name`.
#[derive(Debug, Clone, Default)]
pub struct Addresses {
    pub overlay: BTreeMap<String, IpAddr>,
    pub infra: BTreeMap<String, IpAddr>,
}

impl Addresses {
    pub fn of_lab(lab: &Lab) -> Addresses {
        let mut a = Addresses::default();
        for p in lab.workloads() {
            if let Some(ip) = p.overlay_ips.iter().find(|i| i.is_ipv4()) {
                a.overlay.insert(p.key(), *ip);
            }
            if let Ok(ip) = p.infra_ip.parse() {
                a.infra.insert(p.key(), ip);
            }
        }
        a
    }
}

/// Replaces the address templates in `text`.
pub fn render(text: &str, addrs: &Addresses) -> anyhow::Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find("}}")
            .with_context(|| format!("unclosed template in {:?}", &rest[start..]))?;
        let inner = rest[start + 2..start + end].trim();
        let (what, pod) = inner
            .split_once(' ')
            .with_context(|| format!("template {{{{{inner}}}}}: expected `what namespace/name`"))?;
        let pod = pod.trim();
        let (table, prefix) = match what {
            "overlay" => (&addrs.overlay, None),
            "overlay16" => (&addrs.overlay, Some(16)),
            "podIP" => (&addrs.infra, None),
            "podIP16" => (&addrs.infra, Some(16)),
            _ => bail!("template {{{{{inner}}}}}: unknown address kind {what:?}"),
        };
        let ip = *table
            .get(pod)
            .with_context(|| format!("template {{{{{inner}}}}}: no pod {pod}"))?;
        match prefix {
            None => out.push_str(&ip.to_string()),
            Some(len) => {
                let net = ipnetwork::IpNetwork::new(ip, len)?;
                out.push_str(&format!("{}/{len}", net.network()));
            }
        }
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// An object's (kind, namespace, name).
type DocKey = (String, String, String);

/// The objects of a YAML text, by (kind, namespace, name).
fn documents(text: &str) -> anyhow::Result<Vec<(DocKey, Value)>> {
    keyway_agent::source::parse_file(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut v = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let d: Value = serde::Deserialize::deserialize(doc)?;
        if d.is_null() {
            continue;
        }
        let kind = d["kind"].as_str().unwrap_or_default().to_string();
        let name = crate::lab::objects::meta(&d, "name");
        let ns = if crate::lab::objects::is_cluster_scoped(&kind) {
            String::new()
        } else {
            let n = crate::lab::objects::meta(&d, "namespace");
            if n.is_empty() { "default".into() } else { n }
        };
        v.push(((kind, ns, name), d));
    }
    Ok(v)
}

/// The cluster as the compiler sees it, without pods, nodes or packets: each probe is answered
/// by the compiled ACL for a packet that opens the flow, from each pod's overlay address to each
/// other's. This checks that policy means what Kubernetes says, in milliseconds.
#[derive(Debug)]
pub struct Simulation {
    objects: BTreeMap<DocKey, Value>,
    addrs: Addresses,
    pods: Vec<String>,
    attachments: BTreeMap<ObjectKey, OverlayAttachmentSpec>,
}

/// The simulated cluster's secret, which its simulated agents attest with.
fn simulated_secret() -> anyhow::Result<ClusterSecret> {
    Ok(ClusterSecret::new(vec![7u8; 32])?)
}

impl Simulation {
    /// The base topology, pods spread over two nodes as the lab spreads them.
    pub fn new(base: &str) -> anyhow::Result<Simulation> {
        let mut objects = BTreeMap::new();
        for (k, v) in documents(base)? {
            objects.insert(k, v);
        }
        let pods: Vec<String> = objects
            .keys()
            .filter(|(k, _, _)| k == "Pod")
            .map(|(_, ns, n)| format!("{ns}/{n}"))
            .collect();
        let mut addrs = Addresses::default();
        let mut attachments = BTreeMap::new();
        let secret = simulated_secret()?;
        for (i, p) in pods.iter().enumerate() {
            let (ns, name) = p.split_once('/').expect("namespace/name");
            let node = i % 2;
            let overlay: IpAddr = format!("100.64.{node}.{}", 10 + i).parse()?;
            let infra: IpAddr = format!("10.246.{}.{}", node + 1, 10 + i).parse()?;
            addrs.overlay.insert(p.clone(), overlay);
            addrs.infra.insert(p.clone(), infra);
            attachments.insert(
                ObjectKey::new(ns, name),
                OverlayAttachmentSpec {
                    namespace: ns.into(),
                    pod: name.into(),
                    node: format!("node-{}", node + 1),
                    infra_ip: infra,
                    overlay_ips: vec![overlay],
                    proof: None,
                }
                .attest(&secret),
            );
        }
        // Each node holds the block its pods' addresses are in, as its agent would have claimed.
        for node in 0..2u64 {
            let name = format!("default-{node}");
            let block = serde_json::json!({
                "apiVersion": "keyway.io/v1alpha1", "kind": "OverlayBlock",
                "metadata": {"name": name},
                "spec": {"network": "default", "index": node, "node": format!("node-{}", node + 1)},
            });
            objects.insert(("OverlayBlock".to_string(), String::new(), name), block);
        }
        Ok(Simulation {
            objects,
            addrs,
            pods,
            attachments,
        })
    }

    pub fn addresses(&self) -> &Addresses {
        &self.addrs
    }

    pub fn apply(&mut self, text: &str) -> anyhow::Result<()> {
        for (k, v) in documents(&render(text, &self.addrs)?)? {
            self.objects.insert(k, v);
        }
        Ok(())
    }

    pub fn delete(&mut self, r: &ObjectRef) {
        let ns = if crate::lab::objects::is_cluster_scoped(&r.kind) {
            String::new()
        } else {
            r.namespace.clone()
        };
        self.objects.remove(&(r.kind.clone(), ns, r.name.clone()));
    }

    fn model(&self) -> Model {
        let objects = self
            .objects
            .values()
            .filter_map(|v| keyway_agent::model::parse_object(v.clone()).ok().flatten());
        let mut m = Model::from_objects(objects);
        m.attachments = self.attachments.clone();
        // The scheduler's and kubelet's part: each pod runs where its agent published it.
        for (key, a) in &self.attachments {
            if let Some(p) = m.pods.get_mut(key) {
                p.node = Some(a.node.clone());
                p.infra_ips = vec![a.infra_ip];
            }
        }
        m
    }

    /// The matrix a probe of the compiled policy gives.
    pub fn probe(&self, port: u16, protocol: &str) -> anyhow::Result<Matrix> {
        let Some(proto) = packet::protocol_number(protocol) else {
            bail!("unknown protocol {protocol}");
        };
        let node = NodeContext {
            node_name: "simulated".into(),
            local_sap: None,
            gue_port: keyway_core::gue::DEFAULT_PORT,
            rotation: Rotation::new(3_600_000, 60_000)?,
        };
        let mut keys = KeyCache::new(simulated_secret()?);
        let tables = compile::compile(&self.model(), &[], &node, &mut keys, 0, 1).tables;
        let mut cells = vec![vec![true; self.pods.len()]; self.pods.len()];
        for (i, from) in self.pods.iter().enumerate() {
            for (j, to) in self.pods.iter().enumerate() {
                if i == j {
                    continue;
                }
                let (IpAddr::V4(s), IpAddr::V4(d)) =
                    (self.addrs.overlay[from], self.addrs.overlay[to])
                else {
                    bail!("the simulation is IPv4");
                };
                let pkt = match proto {
                    PROTO_TCP => packet::build::syn4(s.octets(), 40000, d.octets(), port),
                    _ => packet::build::ipv4(
                        s,
                        d,
                        proto,
                        &packet::build::ports(proto, 40000, port, b"probe"),
                    ),
                };
                let c = packet::classify(&pkt)?;
                let route = |ip| {
                    tables
                        .fib
                        .lookup(ip)
                        .with_context(|| format!("no route to {ip}"))
                };
                let (src, dst) = (route(c.src)?.identity, route(c.dst)?.identity);
                cells[i][j] = tables.acl.allows(src, dst, &c);
            }
        }
        Ok(Matrix {
            names: self.pods.clone(),
            cells,
        })
    }
}

/// What running a case found: every probe that did not match its truth table.
#[derive(Debug, Default)]
pub struct Outcome {
    pub probes: usize,
    /// Probes that matched only after a retry (the change had not reached every agent yet).
    pub retried: usize,
    pub failures: Vec<String>,
}

fn mismatch(case: &Case, step: usize, p: &Probe, via: Via, got: &Matrix, want: &Matrix) -> String {
    format!(
        "{} (step {}, {} {} via {via:?}): {}\nexpected:\n{}got:\n{}",
        case.file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        step + 1,
        p.protocol,
        p.port,
        got.diff(want).join(", "),
        want,
        got
    )
}

/// Runs a case against the compiler.
pub fn simulate(case: &Case, base: &str) -> anyhow::Result<Outcome> {
    let mut sim = Simulation::new(base)?;
    let mut out = Outcome::default();
    for (i, step) in case.steps.iter().enumerate() {
        if let Some(text) = &step.apply {
            sim.apply(text)
                .with_context(|| format!("{}: step {}", case.name, i + 1))?;
        }
        for r in &step.delete {
            sim.delete(r);
        }
        for p in &step.probes {
            if p.via()? == Via::Underlay {
                continue;
            }
            out.probes += 1;
            let want = p.expected()?;
            let got = sim.probe(p.port, &p.protocol)?;
            if !got.diff(&want).is_empty() {
                out.failures
                    .push(mismatch(case, i, p, Via::Overlay, &got, &want));
            }
        }
    }
    Ok(out)
}

/// How a lab run probes.
#[derive(Debug, Clone, Copy)]
pub struct LabProbing {
    /// How long a probe waits for an answer before calling the pair blocked.
    pub timeout: Duration,
    /// How many times a probe that does not match is repeated before it counts as a failure.
    pub attempts: usize,
    pub pause: Duration,
}

impl Default for LabProbing {
    fn default() -> Self {
        LabProbing {
            timeout: Duration::from_millis(800),
            attempts: 4,
            pause: Duration::from_millis(250),
        }
    }
}

/// Probes until the matrix matches or the attempts are spent; returns the last matrix and the
/// number of attempts made.
pub fn probe_until(
    lab: &Lab,
    port: u16,
    protocol: &str,
    via: Via,
    want: &Matrix,
    how: LabProbing,
) -> anyhow::Result<(Matrix, usize)> {
    let mut n = 0;
    loop {
        n += 1;
        let got = lab.probe(port, protocol, via, how.timeout)?;
        if got.diff(want).is_empty() || n >= how.attempts {
            return Ok((got, n));
        }
        std::thread::sleep(how.pause);
    }
}

/// The matrix of a cluster where everything is connected.
pub fn all_connected(names: &[String]) -> Matrix {
    Matrix {
        names: names.to_vec(),
        cells: vec![vec![true; names.len()]; names.len()],
    }
}

/// The matrix of a cluster where nothing is connected but each pod to itself.
pub fn nothing_connected(names: &[String]) -> Matrix {
    let n = names.len();
    Matrix {
        names: names.to_vec(),
        cells: (0..n).map(|i| (0..n).map(|j| i == j).collect()).collect(),
    }
}

/// Runs a case in a lab that holds the base topology, then puts the lab back: the case's
/// policies deleted, the base namespaces and pods re-applied, and a probe that shows everything
/// connected again (so that the next case starts from a known state).
pub fn run_in_lab(
    lab: &mut Lab,
    case: &Case,
    base: &Path,
    scratch: &Path,
    how: LabProbing,
) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    let mut applied: Vec<DocKey> = Vec::new();
    let stem = case
        .file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "case".into());
    for (i, step) in case.steps.iter().enumerate() {
        if let Some(text) = &step.apply {
            let text = render(text, &Addresses::of_lab(lab))?;
            applied.extend(documents(&text)?.into_iter().map(|(k, _)| k));
            let f = scratch.join(format!("{stem}-{}.yaml", i + 1));
            std::fs::write(&f, &text)?;
            lab.apply(&[f])?;
        }
        for r in &step.delete {
            lab.delete_object(&r.kind, &r.namespace, &r.name)?;
        }
        for p in &step.probes {
            let want = p.expected()?;
            // A truth table for the overlay holds for pod IPs and Services too: both travel it.
            let ways = match p.via()? {
                Via::Overlay => vec![Via::Overlay, Via::PodIp, Via::Service],
                via => vec![via],
            };
            for via in ways {
                out.probes += 1;
                let (got, attempts) = probe_until(lab, p.port, &p.protocol, via, &want, how)?;
                if !got.diff(&want).is_empty() {
                    out.failures.push(mismatch(case, i, p, via, &got, &want));
                } else if attempts > 1 {
                    out.retried += 1;
                }
            }
        }
    }
    // Back to the base state: what the case made goes; what it changed of the base comes back.
    for (kind, ns, name) in &applied {
        if kind != "Namespace" && kind != "Pod" {
            lab.delete_object(kind, ns, name)?;
        }
    }
    if applied
        .iter()
        .any(|(k, _, _)| k == "Namespace" || k == "Pod")
    {
        lab.apply(&[base.to_path_buf()])?;
    }
    let names: Vec<String> = lab.workloads().map(|p| p.key()).collect();
    let mut names = names;
    names.sort();
    let (got, _) = probe_until(
        lab,
        80,
        "TCP",
        Via::Overlay,
        &all_connected(&names),
        LabProbing { attempts: 8, ..how },
    )?;
    if !got.diff(&all_connected(&names)).is_empty() {
        bail!(
            "after {} the lab did not return to its base state:\n{got}",
            case.name
        );
    }
    Ok(out)
}
