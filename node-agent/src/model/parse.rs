//! Documents into model objects: one function per kind, each refusing what the API server would
//! refuse, with the object and the place of the mistake in the error.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    Namespace as K8sNamespace, Node as K8sNode, Pod as K8sPod, Service as K8sService,
};
use k8s_openapi::api::discovery::v1::EndpointSlice as K8sEndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{
    ClusterConfigSpec, DirectPath, DirectPathSpec, Endpoint, EndpointSlice, ExternalEntity,
    ExternalEntitySpec, KEYWAY_API_VERSION, NAMESPACE_NAME_LABEL, NamedPort, Node, Object,
    ObjectKey, OverlayAttachmentSpec, OverlayBlockSpec, OverlayNetwork, OverlayNetworkSpec, Pod,
    SERVICE_NAME_LABEL, SERVICE_SELECTOR_ANNOTATION, Service, ServicePort, SlicePort, TargetPort,
};
use crate::policy::{self, Labels, PolicyError};

/// Why a document is refused.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("document has no apiVersion/kind")]
    NoKind,
    #[error("{kind} {name}: {source}")]
    Invalid {
        kind: String,
        name: String,
        #[source]
        source: Invalid,
    },
}

/// What is wrong with an object.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    /// It does not have the shape of its kind.
    #[error(transparent)]
    Schema(#[from] serde_json::Error),
    /// A policy, a selector or a protocol that Kubernetes would refuse.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A field out of range, missing, or that keyway cannot serve.
    #[error("{0}")]
    Field(String),
}

fn field(reason: impl Into<String>) -> Invalid {
    Invalid::Field(reason.into())
}

/// Understands one document; `Ok(None)` for kinds keyway does not use.
pub fn parse_object(doc: Value) -> Result<Option<Object>, ObjectError> {
    let text = |k: &str| doc.get(k).and_then(Value::as_str).map(str::to_string);
    let (Some(api), Some(kind)) = (text("apiVersion"), text("kind")) else {
        return Err(ObjectError::NoKind);
    };
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_string();
    let parsed = match (api.as_str(), kind.as_str()) {
        ("v1", "Namespace") => namespace(doc),
        ("v1", "Pod") => pod(doc),
        ("v1", "Service") => service(doc),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            return endpoint_slice(doc).map_err(|source| invalid(kind, name, source));
        }
        ("v1", "Node") => node(doc),
        ("networking.k8s.io/v1", "NetworkPolicy") => network_policy(doc),
        (KEYWAY_API_VERSION, kind) => return keyway_resource(kind, &name, doc),
        _ => return Ok(None),
    };
    parsed
        .map(Some)
        .map_err(|source| invalid(kind, name, source))
}

fn invalid(kind: String, name: String, source: Invalid) -> ObjectError {
    ObjectError::Invalid { kind, name, source }
}

fn typed<T: DeserializeOwned>(doc: Value) -> Result<T, Invalid> {
    Ok(serde_json::from_value(doc)?)
}

/// A namespaced object's key, with the namespace the API server defaults.
fn key_of(m: &ObjectMeta) -> Result<ObjectKey, Invalid> {
    Ok(ObjectKey::new(
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().ok_or_else(|| field("no metadata.name"))?,
    ))
}

fn namespace(doc: Value) -> Result<Object, Invalid> {
    let ns: K8sNamespace = typed(doc)?;
    let name = ns.metadata.name.ok_or_else(|| field("no metadata.name"))?;
    let mut labels: Labels = ns.metadata.labels.unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
    Ok(Object::Namespace(name, labels))
}

fn port_number(what: &str, n: i32) -> Result<u16, Invalid> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| field(format!("{what} {n} out of range")))
}

fn pod(doc: Value) -> Result<Object, Invalid> {
    let p: K8sPod = typed(doc)?;
    let spec = p.spec.unwrap_or_default();
    let mut ports = Vec::new();
    for cp in spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
    {
        let protocol = policy::protocol(cp.protocol.as_deref())?;
        let port = port_number("containerPort", cp.container_port)?;
        if let Some(n) = &cp.name {
            ports.push(NamedPort {
                name: n.clone(),
                port,
                protocol,
            });
        }
    }
    let status = p.status.unwrap_or_default();
    let ready = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status == "True");
    let mut infra_ips: Vec<IpAddr> = Vec::new();
    let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    for ip in listed.chain(status.pod_ip.as_deref()) {
        if let Ok(ip) = ip.parse()
            && !infra_ips.contains(&ip)
        {
            infra_ips.push(ip);
        }
    }
    Ok(Object::Pod(Box::new(Pod {
        key: key_of(&p.metadata)?,
        uid: p.metadata.uid.unwrap_or_default(),
        labels: p.metadata.labels.unwrap_or_default(),
        node: spec.node_name,
        infra_ips,
        ports,
        ready,
    })))
}

/// An equality-based label selector as the annotation spells it: `k=v` pairs joined by commas
/// (`==` is accepted for `=`). Empty selects nothing, so it is refused.
pub fn parse_selector(text: &str) -> Result<Labels, Invalid> {
    let mut out = Labels::new();
    for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (k, v) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .ok_or_else(|| {
                field(format!(
                    "{SERVICE_SELECTOR_ANNOTATION} term {term:?} is not key=value"
                ))
            })?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || k.contains('!') || v.contains('=') {
            return Err(field(format!(
                "{SERVICE_SELECTOR_ANNOTATION} term {term:?}: only key=value terms are supported"
            )));
        }
        out.insert(k.to_string(), v.to_string());
    }
    if out.is_empty() {
        return Err(field(format!(
            "{SERVICE_SELECTOR_ANNOTATION} is empty: it would select no pods"
        )));
    }
    Ok(out)
}

/// A Service: its cluster IPs, ports and traffic policies; with keyway's annotation, the
/// checks that its headless mechanism needs.
fn service(doc: Value) -> Result<Object, Invalid> {
    let svc: K8sService = typed(doc)?;
    let spec = svc.spec.unwrap_or_default();
    let covered = match svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SERVICE_SELECTOR_ANNOTATION))
    {
        Some(selector) => Some(covered_selector(selector, &spec)?),
        None => None,
    };
    let mut ports = Vec::new();
    for sp in spec.ports.iter().flatten() {
        let port = port_number("port", sp.port)?;
        let target = match &sp.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_number("targetPort", *n)?),
            Some(IntOrString::String(n)) => TargetPort::Name(n.clone()),
        };
        ports.push(ServicePort {
            name: sp.name.clone(),
            protocol: policy::protocol(sp.protocol.as_deref())?,
            port,
            target,
            node_port: sp
                .node_port
                .map(|n| port_number("nodePort", n))
                .transpose()?,
        });
    }
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    let listed = spec.cluster_ips.iter().flatten().map(String::as_str);
    for ip in listed.chain(spec.cluster_ip.as_deref()) {
        if ip == "None" || ip.is_empty() {
            continue;
        }
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| field(format!("clusterIP {ip:?} is not an address")))?;
        if !cluster_ips.contains(&ip) {
            cluster_ips.push(ip);
        }
    }
    if spec.type_.as_deref() == Some("ExternalName") {
        cluster_ips.clear();
    }
    let affinity_secs = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .and_then(|c| c.client_ip)
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_SECS)
    });
    Ok(Object::Service(Box::new(Service {
        key: key_of(&svc.metadata)?,
        uid: svc.metadata.uid.unwrap_or_default(),
        cluster_ips,
        ports,
        affinity_secs,
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        covered,
    })))
}

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (three hours).
const DEFAULT_AFFINITY_SECS: u32 = 10_800;

/// The selector of keyway's annotation, on a Service it may be used on.
fn covered_selector(
    selector: &str,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
) -> Result<Labels, Invalid> {
    let selector = parse_selector(selector)?;
    if spec.selector.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(field(format!(
            "has both spec.selector and {SERVICE_SELECTOR_ANNOTATION}: remove the annotation \
             (a Service with a selector reaches protected pods as it is)"
        )));
    }
    if spec.cluster_ip.as_deref() != Some("None") {
        return Err(field(format!(
            "{SERVICE_SELECTOR_ANNOTATION} is for headless Services (clusterIP: None); remove \
             it and give the Service its selector"
        )));
    }
    Ok(selector)
}

/// An EndpointSlice of addresses; `Ok(None)` for an FQDN slice or one that belongs to no
/// Service (kube-proxy uses neither).
fn endpoint_slice(doc: Value) -> Result<Option<Object>, Invalid> {
    let s: K8sEndpointSlice = typed(doc)?;
    let ipv6 = match s.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        _ => return Ok(None),
    };
    let Some(service) = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
    else {
        return Ok(None);
    };
    let mut ports = Vec::new();
    for p in s.ports.iter().flatten() {
        let Some(port) = p.port else { continue };
        ports.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            port: port_number("port", port)?,
            protocol: policy::protocol(p.protocol.as_deref())?,
        });
    }
    let mut endpoints = Vec::new();
    for e in s.endpoints.iter().flatten() {
        let Some(first) = e.addresses.first() else {
            continue;
        };
        let address: IpAddr = first
            .parse()
            .ok()
            .filter(|a: &IpAddr| a.is_ipv6() == ipv6)
            .ok_or_else(|| {
                field(format!(
                    "endpoint address {first:?} is not {}",
                    s.address_type
                ))
            })?;
        let c = e.conditions.clone().unwrap_or_default();
        endpoints.push(Endpoint {
            address,
            ready: c.ready.unwrap_or(true),
            serving: c.serving.unwrap_or(true),
            terminating: c.terminating.unwrap_or(false),
            node: e.node_name.clone(),
        });
    }
    Ok(Some(Object::EndpointSlice(Box::new(EndpointSlice {
        key: key_of(&s.metadata)?,
        service,
        ports,
        endpoints,
    }))))
}

fn node(doc: Value) -> Result<Object, Invalid> {
    let n: K8sNode = typed(doc)?;
    let address = n
        .status
        .and_then(|s| s.addresses)
        .unwrap_or_default()
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse().ok());
    Ok(Object::Node(Node {
        name: n.metadata.name.ok_or_else(|| field("no metadata.name"))?,
        address,
    }))
}

fn network_policy(doc: Value) -> Result<Object, Invalid> {
    let mut np: NetworkPolicy = typed(doc)?;
    np.metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    policy::validate(&np)?;
    Ok(Object::NetworkPolicy(Box::new(np)))
}

/// A keyway resource's spec, its namespace (as the API server defaults it) and labels.
fn spec_of<T: DeserializeOwned>(doc: &Value) -> Result<T, Invalid> {
    typed(doc.get("spec").cloned().unwrap_or_default())
}

fn keyway_resource(kind: &str, name: &str, doc: Value) -> Result<Option<Object>, ObjectError> {
    let namespace = doc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let parsed = match kind {
        "OverlayNetwork" => overlay_network(name, &doc),
        "DirectPath" => spec_of::<DirectPathSpec>(&doc).map(|spec| {
            Object::DirectPath(DirectPath {
                namespace,
                name: name.to_string(),
                spec,
            })
        }),
        "ExternalEntity" => spec_of::<ExternalEntitySpec>(&doc).map(|spec| {
            let labels = doc
                .pointer("/metadata/labels")
                .and_then(|l| serde_json::from_value(l.clone()).ok())
                .unwrap_or_default();
            Object::External(ExternalEntity {
                namespace,
                name: name.to_string(),
                labels,
                spec,
            })
        }),
        "ClusterConfig" => spec_of::<ClusterConfigSpec>(&doc)
            .map(|spec| Object::ClusterConfig(name.to_string(), spec)),
        "OverlayAttachment" => {
            spec_of::<OverlayAttachmentSpec>(&doc).map(Object::OverlayAttachment)
        }
        "OverlayBlock" => spec_of::<OverlayBlockSpec>(&doc)
            .map(|spec| Object::OverlayBlock(name.to_string(), spec)),
        _ => return Ok(None),
    };
    parsed
        .map(Some)
        .map_err(|source| invalid(kind.to_string(), name.to_string(), source))
}

fn overlay_network(name: &str, doc: &Value) -> Result<Object, Invalid> {
    let spec: OverlayNetworkSpec = spec_of(doc)?;
    if let Some(p) = spec.block_prefix {
        let max = if spec.cidr.is_ipv4() { 32 } else { 128 };
        if p < spec.cidr.prefix() || p > max {
            return Err(field(format!(
                "blockPrefix /{p} does not fit in {}",
                spec.cidr
            )));
        }
    }
    if let Some(d) = &spec.device
        && (d.is_empty() || d.len() > 15)
    {
        return Err(field(format!("device {d:?} must be 1 to 15 characters")));
    }
    Ok(Object::OverlayNetwork(OverlayNetwork {
        name: name.to_string(),
        spec,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Value {
        serde_yaml_ng::from_str(s).unwrap()
    }

    #[test]
    fn pods_namespaces_and_nodes_parse() {
        let pod = parse_object(yaml(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec:
  nodeName: node-1
  containers:
    - name: c80
      image: agnhost
      ports: [{containerPort: 80, name: serve-80-tcp, protocol: TCP}, {containerPort: 81, name: serve-81-udp, protocol: UDP}]
status: {podIPs: [{ip: 10.244.1.5}]}
"#,
        ))
        .unwrap()
        .unwrap();
        let Object::Pod(p) = pod else { panic!() };
        assert_eq!(p.key.to_string(), "x/a");
        assert_eq!(p.node.as_deref(), Some("node-1"));
        assert_eq!(p.infra_ips, vec!["10.244.1.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            p.ports[1],
            NamedPort {
                name: "serve-81-udp".into(),
                port: 81,
                protocol: 17
            }
        );

        let Object::Namespace(n, l) = parse_object(yaml(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: y, labels: {ns: y}}",
        ))
        .unwrap()
        .unwrap() else {
            panic!()
        };
        assert_eq!(n, "y");
        assert_eq!(l[NAMESPACE_NAME_LABEL], "y");

        let Object::Node(node) = parse_object(yaml("apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\nstatus: {addresses: [{type: Hostname, address: n1}, {type: InternalIP, address: 192.168.77.11}]}")).unwrap().unwrap() else { panic!() };
        assert_eq!(node.address, Some("192.168.77.11".parse().unwrap()));
    }

    #[test]
    fn bad_documents_say_what_is_wrong() {
        let e = parse_object(yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPort: 80, protocol: ICMP}]}]}")).unwrap_err();
        assert!(
            e.to_string().contains("Pod p") && e.to_string().contains("ICMP"),
            "{e}"
        );
        let e = parse_object(yaml("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: 7}")).unwrap_err();
        assert!(e.to_string().contains("NetworkPolicy np"), "{e}");
        let e = parse_object(yaml("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}, ingress: [{from: [{}]}]}")).unwrap_err();
        assert!(
            matches!(&e, ObjectError::Invalid { source: Invalid::Policy(p), .. } if p.place == "ingress[0].from[0]"),
            "{e:?}"
        );
        assert!(matches!(
            parse_object(yaml("foo: bar")),
            Err(ObjectError::NoKind)
        ));
        assert!(
            parse_object(yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}"))
                .unwrap()
                .is_none()
        );
        let e = parse_object(yaml("apiVersion: keyway.io/v1alpha1\nkind: OverlayNetwork\nmetadata: {name: n}\nspec: {cidr: 100.64.0.0/10, blockPrefix: 8}")).unwrap_err();
        assert!(e.to_string().contains("blockPrefix"), "{e}");
        let e = parse_object(yaml("apiVersion: keyway.io/v1alpha1\nkind: OverlayNetwork\nmetadata: {name: n}\nspec: {cidr: nonsense}")).unwrap_err();
        assert!(
            matches!(&e, ObjectError::Invalid { source: Invalid::Schema(_), kind, .. } if kind == "OverlayNetwork"),
            "{e:?}"
        );
    }

    #[test]
    fn cluster_configs_keep_their_name() {
        let o = parse_object(yaml("apiVersion: keyway.io/v1alpha1\nkind: ClusterConfig\nmetadata: {name: cluster}\nspec: {policyMode: Strict}")).unwrap().unwrap();
        assert!(
            matches!(o, Object::ClusterConfig(n, c) if n == "cluster" && c.policy_mode == super::super::PolicyMode::Strict)
        );
    }
}
