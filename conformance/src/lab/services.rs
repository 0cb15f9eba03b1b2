//! The lab plays the cluster components that Services need, from the Services in its documents,
//! the way they behave on a cluster:
//!
//! - the API server: a cluster IP for each Service (from [`SERVICE_CIDR`]; `clusterIP: None` is
//!   headless; one given is kept) and a node port for each port of a NodePort or LoadBalancer
//!   Service ([`NODE_PORTS`]);
//! - the EndpointSlice controller ([`slices`]): one slice per set of resolved ports, with every
//!   pod the selector picks (its pod IP, node, readiness); a named `targetPort` is resolved
//!   against each pod's container ports, and a pod without that name is left out of that port;
//! - kube-proxy in its nftables mode ([`kube_proxy`]): on each node, a cluster IP's connections
//!   are spread over its endpoints by DNAT; a NodePort's too, masqueraded under
//!   `externalTrafficPolicy: Cluster`, to the node's own endpoints only (source kept) under
//!   `Local`.
//!
//! - cluster DNS ([`add_cluster_dns`], [`zone`]): a DNS server pod (`kube-system/coredns`,
//!   agnhost's `dns-server`) behind the `kube-system/kube-dns` Service at [`DNS_SERVICE_IP`],
//!   answering `SERVICE.NAMESPACE.svc.cluster.local` with the cluster IP, or for a headless
//!   Service with its endpoints' pod IPs (and `HOSTNAME.SERVICE...` for pods that set
//!   `hostname`/`subdomain`), as CoreDNS does; every other pod's `/etc/resolv.conf` points at it
//!   (kubelet's `ClusterFirst`). A NetworkPolicy in kube-system admits DNS from everywhere, as
//!   clusters that isolate their DNS do.
//!
//! What keyway does with these is the product's business: the lab only plays the cluster.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::objects::meta;

/// Where cluster IPs come from (kubeadm's default).
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 16);
/// The cluster DNS Service's address (kubeadm's: the tenth of the range).
pub const DNS_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Kubernetes' default node port range.
pub const NODE_PORTS: RangeInclusive<u16> = 30000..=32767;
/// The zone file in the DNS directory.
pub const ZONE_FILE: &str = "zone";
/// The cluster's domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The mark kube-proxy gives what it masquerades.
const MASQUERADE_MARK: u32 = 0x4000;

/// A Service as the lab's API server holds it: the document with its allocations.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabService {
    pub namespace: String,
    pub name: String,
    pub doc: Value,
}

impl LabService {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The cluster IP; `None` for a headless or ExternalName Service.
    pub fn cluster_ip(&self) -> Option<IpAddr> {
        self.doc
            .pointer("/spec/clusterIP")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
    }

    fn selector(&self) -> Option<BTreeMap<String, String>> {
        let s: BTreeMap<String, String> = self
            .doc
            .pointer("/spec/selector")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .unwrap_or_default();
        (!s.is_empty()).then_some(s)
    }

    /// The Service's `spec.ports` entries.
    pub(crate) fn ports(&self) -> Vec<Value> {
        self.doc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    fn spec_str(&self, field: &str) -> Option<&str> {
        self.doc.get("spec")?.get(field)?.as_str()
    }

    /// The (port, protocol, node port) of a port that has a node port.
    pub fn node_ports(&self) -> Vec<(u16, String, u16)> {
        self.ports()
            .iter()
            .filter_map(|p| {
                Some((
                    p.get("port")?.as_u64()? as u16,
                    protocol(p),
                    p.get("nodePort")?.as_u64()? as u16,
                ))
            })
            .collect()
    }

    /// The Service's port for `port`/`protocol`, if it has one.
    /// Its EndpointSlices among `slices` (namespace, name, document): those of its namespace
    /// labelled with its name, as kube-proxy and CoreDNS find them.
    pub fn slices_in<'a>(
        &self,
        slices: &'a [(String, String, Value)],
    ) -> impl Iterator<Item = &'a Value> {
        slices.iter().filter_map(move |(ns, _, doc)| {
            let of = doc
                .pointer("/metadata/labels/kubernetes.io~1service-name")
                .and_then(Value::as_str);
            (*ns == self.namespace && of == Some(self.name.as_str())).then_some(doc)
        })
    }

    pub fn has_port(&self, port: u16, proto: &str) -> bool {
        self.ports().iter().any(|p| {
            p.get("port").and_then(Value::as_u64) == Some(u64::from(port))
                && protocol(p).eq_ignore_ascii_case(proto)
        })
    }
}

/// A port entry's protocol (TCP when absent, as the API server defaults it).
pub(crate) fn protocol(port: &Value) -> String {
    port.get("protocol")
        .and_then(Value::as_str)
        .unwrap_or("TCP")
        .to_string()
}

/// Fills in what the API server would: the cluster IP (unless headless or given), `clusterIPs`,
/// `ipFamilies`, and node ports; refuses a cluster IP or node port already taken. Applying a
/// Service again keeps what it was given (the fields are immutable on a cluster).
pub fn allocate(doc: &Value, taken: &[LabService]) -> anyhow::Result<LabService> {
    let namespace = {
        let n = meta(doc, "namespace");
        if n.is_empty() { "default".into() } else { n }
    };
    let name = meta(doc, "name");
    let mut doc = doc.clone();
    doc["metadata"]["namespace"] = json!(namespace);
    let others: Vec<&LabService> = taken
        .iter()
        .filter(|s| s.namespace != namespace || s.name != name)
        .collect();
    let before = taken
        .iter()
        .find(|s| s.namespace == namespace && s.name == name);
    let kind = doc
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    if kind != "ExternalName" {
        let ip = match doc.pointer("/spec/clusterIP").and_then(Value::as_str) {
            Some("None") => None,
            Some(given) => {
                let ip: IpAddr = given
                    .parse()
                    .with_context(|| format!("Service {namespace}/{name}: clusterIP {given:?}"))?;
                if others.iter().any(|s| s.cluster_ip() == Some(ip)) {
                    bail!("Service {namespace}/{name}: clusterIP {ip} is already allocated");
                }
                Some(ip)
            }
            None => match before.and_then(LabService::cluster_ip) {
                Some(kept) => Some(kept),
                None => Some(free_cluster_ip(&others)?),
            },
        };
        match ip {
            Some(ip) => {
                doc["spec"]["clusterIP"] = json!(ip.to_string());
                doc["spec"]["clusterIPs"] = json!([ip.to_string()]);
                doc["spec"]["ipFamilies"] = json!(["IPv4"]);
            }
            None => doc["spec"]["clusterIPs"] = json!(["None"]),
        }
    }
    if kind == "NodePort" || kind == "LoadBalancer" {
        let mut used: Vec<u16> = others
            .iter()
            .flat_map(|s| s.node_ports())
            .map(|p| p.2)
            .collect();
        let kept = before.map(LabService::node_ports).unwrap_or_default();
        let ports = doc["spec"]["ports"].as_array_mut();
        for p in ports.into_iter().flatten() {
            let port = p.get("port").and_then(Value::as_u64).unwrap_or_default() as u16;
            let proto = protocol(p);
            let np = match p.get("nodePort").and_then(Value::as_u64) {
                Some(n) => n as u16,
                None => match kept.iter().find(|k| k.0 == port && k.1 == proto) {
                    Some(k) => k.2,
                    None => NODE_PORTS
                        .clone()
                        .find(|n| !used.contains(n))
                        .context("no free node port")?,
                },
            };
            if used.contains(&np) {
                bail!("Service {namespace}/{name}: nodePort {np} is already allocated");
            }
            used.push(np);
            p["nodePort"] = json!(np);
        }
    }
    Ok(LabService {
        namespace,
        name,
        doc,
    })
}

fn free_cluster_ip(taken: &[&LabService]) -> anyhow::Result<IpAddr> {
    let (base, prefix) = SERVICE_CIDR;
    let size = 1u32 << (32 - prefix);
    (1..size - 1)
        .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(base) + i)))
        .find(|ip| {
            *ip != IpAddr::V4(DNS_SERVICE_IP) && !taken.iter().any(|s| s.cluster_ip() == Some(*ip))
        })
        .context("the service range is full")
}

/// A pod as the controller sees it.
#[derive(Debug, Clone)]
pub struct PodView<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
    pub ip: IpAddr,
    pub doc: &'a Value,
}

impl PodView<'_> {
    fn labels(&self) -> BTreeMap<String, String> {
        self.doc
            .pointer("/metadata/labels")
            .and_then(|l| serde_json::from_value(l.clone()).ok())
            .unwrap_or_default()
    }

    /// The container port named `name` with `protocol`.
    fn named_port(&self, name: &str, proto: &str) -> Option<u16> {
        self.doc
            .pointer("/spec/containers")?
            .as_array()?
            .iter()
            .flat_map(|c| {
                c.get("ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
            })
            .find(|p| {
                p.get("name").and_then(Value::as_str) == Some(name)
                    && protocol(p).eq_ignore_ascii_case(proto)
            })?
            .get("containerPort")?
            .as_u64()
            .map(|p| p as u16)
    }
}

/// The EndpointSlices of every Service with a selector, as (namespace, name, document), sorted.
pub fn slices(services: &[LabService], pods: &[PodView]) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for svc in services {
        let Some(selector) = svc.selector() else {
            continue;
        };
        // Resolved ports → endpoints: pods whose named ports differ go to their own slice.
        let mut groups: BTreeMap<String, (Vec<Value>, Vec<Value>)> = BTreeMap::new();
        for pod in pods.iter().filter(|p| p.namespace == svc.namespace) {
            let labels = pod.labels();
            if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                continue;
            }
            let ports = resolved_ports(svc, pod);
            let group = groups
                .entry(serde_json::to_string(&ports).unwrap_or_default())
                .or_insert_with(|| (ports, Vec::new()));
            let mut endpoint = json!({
                "addresses": [pod.ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": pod.node,
                "targetRef": {"kind": "Pod", "namespace": pod.namespace, "name": pod.name,
                    "uid": pod.uid},
            });
            let spec = pod.doc.get("spec");
            let field = |f: &str| spec.and_then(|s| s.get(f)).and_then(Value::as_str);
            if let (Some(host), Some(sub)) = (field("hostname"), field("subdomain"))
                && sub == svc.name
            {
                endpoint["hostname"] = json!(host);
            }
            group.1.push(endpoint);
        }
        for (i, (_, (ports, endpoints))) in groups.into_iter().enumerate() {
            let name = format!("{}-{i}", svc.name);
            let doc = json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": svc.namespace, "labels": {
                    "kubernetes.io/service-name": svc.name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
                "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
            });
            out.push((svc.namespace.clone(), name, doc));
        }
    }
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out
}

/// The Service's ports as `pod` serves them.
fn resolved_ports(svc: &LabService, pod: &PodView) -> Vec<Value> {
    svc.ports()
        .iter()
        .filter_map(|p| {
            let proto = protocol(p);
            let port = p.get("port")?.as_u64()? as u16;
            let target = match p.get("targetPort") {
                None => port,
                Some(Value::Number(n)) => n.as_u64()? as u16,
                Some(Value::String(name)) => pod.named_port(name, &proto)?,
                Some(_) => return None,
            };
            Some(
                json!({"name": p.get("name").and_then(Value::as_str).unwrap_or(""),
                "port": target, "protocol": proto}),
            )
        })
        .collect()
}

/// One endpoint of one Service port, as kube-proxy programs it.
struct Target {
    ip: IpAddr,
    port: u16,
    local: bool,
}

/// kube-proxy's nftables table for `node`, as an `nft -f` script that replaces it whole.
pub fn kube_proxy(
    services: &[LabService],
    slices: &[(String, String, Value)],
    node: &str,
) -> String {
    let mut services_chain = Vec::new();
    let mut chains: Vec<(String, Vec<String>)> = Vec::new();
    for svc in services {
        let Some(cluster_ip) = svc.cluster_ip() else {
            continue;
        };
        let local_only = svc.spec_str("externalTrafficPolicy") == Some("Local");
        for p in svc.ports() {
            let (Some(port), proto) = (p.get("port").and_then(Value::as_u64), protocol(&p)) else {
                continue;
            };
            let name = p.get("name").and_then(Value::as_str).unwrap_or("");
            let l4 = proto.to_lowercase();
            let id = format!("{}/{l4}/{port}", svc.key());
            let targets = targets(svc, slices, name, &proto, node);
            let pick = |chain: &str, targets: &[&Target]| -> Vec<String> {
                if targets.is_empty() {
                    return vec!["drop".into()];
                }
                let arms: Vec<String> = targets
                    .iter()
                    .enumerate()
                    .map(|(i, t)| format!("{i} : goto ep-{chain}/{}/{}", t.ip, t.port))
                    .collect();
                vec![format!(
                    "numgen random mod {} vmap {{ {} }}",
                    targets.len(),
                    arms.join(", ")
                )]
            };
            let all: Vec<&Target> = targets.iter().collect();
            services_chain.push(format!(
                "ip daddr {cluster_ip} {l4} dport {port} goto svc-{id}"
            ));
            chains.push((format!("svc-{id}"), pick(&id, &all)));
            for t in &targets {
                chains.push((
                    format!("ep-{id}/{}/{}", t.ip, t.port),
                    vec![
                        format!(
                            "ip saddr {} meta mark set meta mark | {MASQUERADE_MARK:#x}",
                            t.ip
                        ),
                        format!("meta l4proto {l4} dnat to {}:{}", t.ip, t.port),
                    ],
                ));
            }
            let Some(node_port) = p.get("nodePort").and_then(Value::as_u64) else {
                continue;
            };
            services_chain.push(format!(
                "fib daddr type local {l4} dport {node_port} goto ext-{id}"
            ));
            let ext = if local_only {
                let local: Vec<&Target> = targets.iter().filter(|t| t.local).collect();
                pick(&id, &local)
            } else {
                vec![
                    format!("meta mark set meta mark | {MASQUERADE_MARK:#x}"),
                    format!("goto svc-{id}"),
                ]
            };
            chains.push((format!("ext-{id}"), ext));
        }
    }
    let mut s =
        String::from("table ip kube-proxy\ndelete table ip kube-proxy\ntable ip kube-proxy {\n");
    s += "  chain nat-prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }\n";
    s += "  chain nat-output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n";
    s += &format!(
        "  chain nat-postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    meta mark & {MASQUERADE_MARK:#x} == {MASQUERADE_MARK:#x} masquerade\n  }}\n"
    );
    chains.insert(0, ("services".into(), services_chain));
    for (name, rules) in chains {
        // nft's names take letters, digits and `/-_.`: no quotes needed, none allowed here.
        s += &format!("  chain {name} {{\n");
        for r in rules {
            s += &format!("    {r}\n");
        }
        s += "  }\n";
    }
    s += "}\n";
    s
}

/// The ready endpoints of the Service's port named `port_name` (all of the lab's are ready).
fn targets(
    svc: &LabService,
    slices: &[(String, String, Value)],
    port_name: &str,
    proto: &str,
    node: &str,
) -> Vec<Target> {
    let mut out = Vec::new();
    for doc in svc.slices_in(slices) {
        let Some(port) = doc["ports"].as_array().into_iter().flatten().find(|p| {
            p["name"].as_str() == Some(port_name) && protocol(p).eq_ignore_ascii_case(proto)
        }) else {
            continue;
        };
        for e in doc["endpoints"].as_array().into_iter().flatten() {
            let Some(ip) = e["addresses"][0].as_str().and_then(|a| a.parse().ok()) else {
                continue;
            };
            out.push(Target {
                ip,
                port: port["port"].as_u64().unwrap_or_default() as u16,
                local: e["nodeName"].as_str() == Some(node),
            });
        }
    }
    out.sort_by_key(|t| (t.ip, t.port));
    out
}

/// The cluster DNS's objects, added to what the lab is given: its namespace, its pod on `node`
/// (serving the zone in `dns_dir`), its Service, and the policy that admits DNS.
pub fn add_cluster_dns(
    docs: &mut super::objects::Documents,
    dns_dir: &std::path::Path,
    node: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dns_dir)?;
    let zone = dns_dir.join(ZONE_FILE);
    if !zone.exists() {
        std::fs::write(&zone, "")?;
    }
    let ns = "kube-system";
    let labels = BTreeMap::from([("k8s-app".to_string(), "kube-dns".to_string())]);
    let doc = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "coredns", "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "dnsPolicy": "Default", "containers": [{"name": "coredns",
            "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]}});
    docs.pods.insert(
        0,
        super::objects::LabPod {
            namespace: ns.into(),
            name: "coredns".into(),
            node: Some(node.into()),
            labels,
            containers: vec![super::objects::LabContainer {
                name: "coredns".into(),
                ports: vec![(53, "UDP".into())],
                command: Some(vec![
                    "dns-server".into(),
                    "--zone".into(),
                    format!("/etc/coredns/{ZONE_FILE}"),
                ]),
                mounts: vec![(dns_dir.to_path_buf(), "/etc/coredns".into())],
            }],
            doc,
            system: true,
        },
    );
    let others = [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": ns, "labels": {"k8s-app": "kube-dns"}},
            "spec": {"clusterIP": DNS_SERVICE_IP.to_string(), "selector": {"k8s-app": "kube-dns"},
                "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"}]}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "allow-dns", "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {}}],
                    "ports": [{"port": 53, "protocol": "UDP"}]}]}}),
    ];
    for (i, d) in others.into_iter().enumerate() {
        let kind = d["kind"].as_str().unwrap_or_default().to_string();
        let name = meta(&d, "name");
        let namespace = if kind == "Namespace" {
            String::new()
        } else {
            ns.to_string()
        };
        docs.others.insert(i, (kind, namespace, name, d));
    }
    Ok(())
}

/// The cluster DNS's records, as a zone file for agnhost's `dns-server`.
pub fn zone(services: &[LabService], slices: &[(String, String, Value)]) -> String {
    let mut lines = Vec::new();
    for svc in services {
        let fqdn = format!("{}.{}.svc.{CLUSTER_DOMAIN}", svc.name, svc.namespace);
        if let Some(ip) = svc.cluster_ip() {
            lines.push(format!("{fqdn} A {ip}"));
            continue;
        }
        for doc in svc.slices_in(slices) {
            for e in doc["endpoints"].as_array().into_iter().flatten() {
                let Some(ip) = e["addresses"][0].as_str() else {
                    continue;
                };
                lines.push(format!("{fqdn} A {ip}"));
                if let Some(host) = e["hostname"].as_str() {
                    lines.push(format!("{host}.{fqdn} A {ip}"));
                }
            }
        }
    }
    lines.sort();
    lines.dedup();
    lines.iter().map(|l| format!("{l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(doc: Value, taken: &[LabService]) -> LabService {
        allocate(&doc, taken).unwrap()
    }

    fn web() -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "x"},
            "spec": {"type": "NodePort", "externalTrafficPolicy": "Local", "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    }

    fn pod(name: &str, node: &str, ip: &str, http: u16) -> Value {
        json!({"metadata": {"name": name, "namespace": "x", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": http, "protocol": "TCP"}]}]}})
        .as_object()
        .map(|o| {
            let mut o = o.clone();
            o.insert("node".into(), json!(node));
            o.insert("ip".into(), json!(ip));
            Value::Object(o)
        })
        .unwrap()
    }

    fn views(docs: &[Value]) -> Vec<PodView<'_>> {
        docs.iter()
            .map(|d| PodView {
                namespace: "x",
                name: d["metadata"]["name"].as_str().unwrap(),
                uid: "u",
                node: d["node"].as_str().unwrap(),
                ip: d["ip"].as_str().unwrap().parse().unwrap(),
                doc: d,
            })
            .collect()
    }

    #[test]
    fn the_api_server_allocates_addresses_and_node_ports_once() {
        let a = svc(web(), &[]);
        assert_eq!(a.cluster_ip(), Some("10.96.0.1".parse().unwrap()));
        assert_eq!(a.node_ports(), [(80, "TCP".to_string(), 30000)]);
        let mut b_doc = web();
        b_doc["metadata"]["name"] = json!("api");
        let b = svc(b_doc, std::slice::from_ref(&a));
        assert_eq!(b.cluster_ip(), Some("10.96.0.2".parse().unwrap()));
        assert_eq!(b.node_ports()[0].2, 30001);
        // Applying it again, as written, keeps what it was given.
        let again = svc(web(), &[a.clone(), b.clone()]);
        assert_eq!(again.cluster_ip(), a.cluster_ip());
        assert_eq!(again.node_ports(), a.node_ports());
        let mut clash = web();
        clash["metadata"]["name"] = json!("other");
        clash["spec"]["clusterIP"] = json!("10.96.0.1");
        let err = allocate(&clash, &[a, b]).unwrap_err().to_string();
        assert!(err.contains("already allocated"), "{err}");
        let mut headless = web();
        headless["spec"] = json!({"clusterIP": "None", "selector": {"app": "web"}});
        assert_eq!(svc(headless, &[]).cluster_ip(), None);
    }

    #[test]
    fn the_controller_resolves_named_ports_per_pod() {
        let s = svc(web(), &[]);
        let docs = [
            pod("a", "node-1", "10.244.1.2", 8080),
            pod("b", "node-2", "10.244.2.2", 8081),
            pod("c", "node-2", "10.244.2.3", 8080),
        ];
        let got = slices(std::slice::from_ref(&s), &views(&docs));
        assert_eq!(got.len(), 2, "two port sets, two slices");
        let summary: Vec<(u64, Vec<&str>)> = got
            .iter()
            .map(|(_, _, d)| {
                (
                    d["ports"][0]["port"].as_u64().unwrap(),
                    d["endpoints"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e["addresses"][0].as_str().unwrap())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (8080, vec!["10.244.1.2", "10.244.2.3"]),
                (8081, vec!["10.244.2.2"])
            ]
        );
        let rules = kube_proxy(std::slice::from_ref(&s), &got, "node-1");
        assert!(
            rules.contains("ip daddr 10.96.0.1 tcp dport 80 goto svc-x/web/tcp/80"),
            "{rules}"
        );
        assert!(rules.contains("numgen random mod 3 vmap"), "{rules}");
        assert!(rules.contains("fib daddr type local tcp dport 30000 goto ext-x/web/tcp/80"));
        // externalTrafficPolicy: Local: only node-1's endpoint, no masquerade.
        let ext = rules.split("chain ext-x/web/tcp/80 ").nth(1).unwrap();
        let ext = &ext[..ext.find("\n  }").unwrap()];
        assert!(
            ext.contains("numgen random mod 1 vmap { 0 : goto ep-x/web/tcp/80/10.244.1.2/8080 }"),
            "{ext}"
        );
        assert!(!ext.contains("mark"), "{ext}");
    }
}
