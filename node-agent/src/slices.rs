//! Services on the overlay: for each Service keyway covers (headless, selector-less, with a
//! `keyway.io/selector` annotation — see `docs/services.md`), every agent publishes EndpointSlices
//! listing the overlay addresses of the matching pods *it serves*. Cluster DNS then answers the
//! Service's name with overlay addresses, so clients reach the pods through their L3 endpoints and
//! the SaP, with no change to either side.
//!
//! Each agent owns only its node's slices (label `keyway.io/node`), so agents never write the same
//! object and need no leader. A Service's slices are owned by it (ownerReference: deleting the
//! Service deletes them); a departed node's slices are removed with its overlay blocks.
//!
//! [`desired`] is pure (the model in, the slices out); [`sync`] and [`reclaim`] talk to the API.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::ObjectReference;
// An EndpointSlice's entries are "endpoints" in the Kubernetes API; here they are called slice
// endpoints, since "endpoint" alone means keyway's L3 endpoint (docs/glossary.md).
use k8s_openapi::api::discovery::v1::{
    Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};

use crate::model::{Model, ObjectKey, Pod, SERVICE_NAME_LABEL, Service, TargetPort};
use crate::policy::protocol_name;

/// The `endpointslice.kubernetes.io/managed-by` value on keyway's slices.
pub const MANAGED_BY: &str = "keyway.io";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The node whose agent wrote the slice.
pub const NODE_LABEL: &str = "keyway.io/node";
/// The field manager of keyway's server-side applies.
pub const FIELD_MANAGER: &str = "keyway-agent";

/// FNV-1a, 64 bits: a name suffix that is the same in every build and on every node.
fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The node as a label value (at most 63 characters; longer names are hashed).
pub fn node_label(node: &str) -> String {
    if node.len() <= 63 {
        node.to_string()
    } else {
        format!("h-{:016x}", fnv(&[node]))
    }
}

/// The service's ports as one pod serves them (named targets resolved against its container
/// ports; a name the pod does not have leaves that port out, as Kubernetes does).
fn ports_for(svc: &Service, pod: &Pod) -> Vec<EndpointPort> {
    svc.ports
        .iter()
        .filter_map(|sp| {
            let port = match &sp.target {
                TargetPort::Number(n) => *n,
                TargetPort::Name(name) => {
                    pod.ports
                        .iter()
                        .find(|p| &p.name == name && p.protocol == sp.protocol)?
                        .port
                }
            };
            Some(EndpointPort {
                name: Some(sp.name.clone().unwrap_or_default()),
                port: Some(i32::from(port)),
                protocol: Some(protocol_name(sp.protocol).to_string()),
                app_protocol: None,
            })
        })
        .collect()
}

/// One slice's worth: its ports and its endpoints.
type Group = (Vec<EndpointPort>, Vec<SliceEndpoint>);

/// The slices this node's agent should hold, sorted by namespace and name.
pub fn desired(model: &Model, node: &str) -> Vec<EndpointSlice> {
    let mut out = Vec::new();
    for svc in model.services.values() {
        let Some(selector) = &svc.covered else {
            continue;
        };
        // (family, ports) → endpoints: pods whose ports resolve differently get their own slice.
        let mut groups: BTreeMap<(&'static str, String), Group> = BTreeMap::new();
        for (key, pod) in model.pods.range(ObjectKey::new(&svc.key.namespace, "")..) {
            if key.namespace != svc.key.namespace {
                break;
            }
            if !selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v)) {
                continue;
            }
            let Some(att) = model.attachments.get(key).filter(|a| a.node == node) else {
                continue;
            };
            let ports = ports_for(svc, pod);
            let ports_key = serde_json::to_string(&ports).unwrap_or_default();
            for ip in &att.overlay_ips {
                let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
                let group = groups
                    .entry((family, ports_key.clone()))
                    .or_insert_with(|| (ports.clone(), Vec::new()));
                group.1.push(slice_endpoint(*ip, pod, node));
            }
        }
        for ((family, ports_key), (ports, mut endpoints)) in groups {
            endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
            out.push(slice(svc, node, family, &ports_key, ports, endpoints));
        }
    }
    out.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    out
}

fn slice_endpoint(ip: IpAddr, pod: &Pod, node: &str) -> SliceEndpoint {
    let ready = pod.ready.unwrap_or(true);
    SliceEndpoint {
        addresses: vec![ip.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(ready),
            terminating: Some(false),
        }),
        node_name: Some(node.to_string()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: Some(pod.key.namespace.clone()),
            name: Some(pod.key.name.clone()),
            uid: (!pod.uid.is_empty()).then(|| pod.uid.clone()),
            ..ObjectReference::default()
        }),
        ..SliceEndpoint::default()
    }
}

fn slice(
    svc: &Service,
    node: &str,
    family: &str,
    ports_key: &str,
    ports: Vec<EndpointPort>,
    endpoints: Vec<SliceEndpoint>,
) -> EndpointSlice {
    let prefix: String = svc.key.name.chars().take(40).collect();
    let name = format!(
        "{}-kw-{:010x}",
        prefix.trim_end_matches('-'),
        fnv(&[node, family, ports_key]) & 0xff_ffff_ffff
    );
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(svc.key.namespace.clone()),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.to_string(), svc.key.name.clone()),
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                (NODE_LABEL.to_string(), node_label(node)),
            ])),
            owner_references: (!svc.uid.is_empty()).then(|| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Service".into(),
                    name: svc.key.name.clone(),
                    uid: svc.uid.clone(),
                    ..OwnerReference::default()
                }]
            }),
            ..ObjectMeta::default()
        },
        address_type: family.to_string(),
        endpoints: Some(endpoints),
        ports: Some(ports),
    }
}

/// A slice's endpoints (the API leaves the list out when it is empty).
pub fn endpoints_of(s: &EndpointSlice) -> &[SliceEndpoint] {
    s.endpoints.as_deref().unwrap_or_default()
}

/// What a slice says (what keyway sets), to tell whether an existing one needs writing.
fn content(s: &EndpointSlice) -> serde_json::Value {
    let labels: BTreeMap<&String, &String> = s
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| [SERVICE_NAME_LABEL, MANAGED_BY_LABEL, NODE_LABEL].contains(&k.as_str()))
        .collect();
    let owners: Vec<(&str, &str)> = s
        .metadata
        .owner_references
        .iter()
        .flatten()
        .map(|o| (o.name.as_str(), o.uid.as_str()))
        .collect();
    serde_json::json!({
        "labels": labels,
        "owners": owners,
        "addressType": s.address_type,
        "endpoints": endpoints_of(s),
        "ports": s.ports.clone().unwrap_or_default(),
    })
}

/// What one [`sync`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    pub applied: usize,
    pub deleted: usize,
    pub unchanged: usize,
}

fn mine(node: &str) -> ListParams {
    ListParams::default().labels(&format!(
        "{MANAGED_BY_LABEL}={MANAGED_BY},{NODE_LABEL}={}",
        node_label(node)
    ))
}

/// Brings this node's slices to `desired`: applies what differs (server-side apply, keyway's
/// field manager), deletes what is no longer wanted, leaves the rest alone.
pub async fn sync(
    client: kube::Client,
    node: &str,
    desired: Vec<EndpointSlice>,
) -> Result<SyncReport, kube::Error> {
    let all: Api<EndpointSlice> = Api::all(client.clone());
    let existing: BTreeMap<(String, String), EndpointSlice> = all
        .list(&mine(node))
        .await?
        .items
        .into_iter()
        .map(|s| ((s.namespace().unwrap_or_default(), s.name_any()), s))
        .collect();
    let mut report = SyncReport::default();
    let mut wanted = BTreeSet::new();
    for s in desired {
        let key = (s.namespace().unwrap_or_default(), s.name_any());
        wanted.insert(key.clone());
        if existing.get(&key).map(content) == Some(content(&s)) {
            report.unchanged += 1;
            continue;
        }
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &key.0);
        let mut doc = serde_json::to_value(&s).map_err(kube::Error::SerdeError)?;
        doc["apiVersion"] = "discovery.k8s.io/v1".into();
        doc["kind"] = "EndpointSlice".into();
        api.patch(
            &key.1,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&doc),
        )
        .await?;
        tracing::info!(slice = %format!("{}/{}", key.0, key.1), endpoints = endpoints_of(&s).len(), "EndpointSlice applied");
        report.applied += 1;
    }
    for (key, _) in existing.into_iter().filter(|(k, _)| !wanted.contains(k)) {
        delete(&client, &key.0, &key.1).await?;
        report.deleted += 1;
    }
    Ok(report)
}

async fn delete(client: &kube::Client, namespace: &str, name: &str) -> Result<(), kube::Error> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {
            tracing::info!(slice = %format!("{namespace}/{name}"), "EndpointSlice deleted");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes the slices of nodes that are no longer in the cluster (`live` are node names);
/// returns how many.
pub async fn reclaim(client: kube::Client, live: &BTreeSet<String>) -> Result<usize, kube::Error> {
    let live: BTreeSet<String> = live.iter().map(|n| node_label(n)).collect();
    let all: Api<EndpointSlice> = Api::all(client.clone());
    let lp = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let mut n = 0;
    for s in all.list(&lp).await?.items {
        let owner = s.labels().get(NODE_LABEL).cloned().unwrap_or_default();
        if !live.contains(&owner) {
            delete(&client, &s.namespace().unwrap_or_default(), &s.name_any()).await?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Object, parse_object};
    use serde_json::json;

    fn model(docs: &[serde_json::Value], attachments: &[(&str, &str, &[&str])]) -> Model {
        let mut objects: Vec<Object> = docs
            .iter()
            .filter_map(|d| parse_object(d.clone()).unwrap())
            .collect();
        for (pod, node, ips) in attachments {
            objects.push(Object::OverlayAttachment(
                crate::model::OverlayAttachmentSpec {
                    namespace: "shop".into(),
                    pod: pod.to_string(),
                    node: node.to_string(),
                    infra_ip: "10.0.0.9".parse().unwrap(),
                    overlay_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
                    proof: None,
                },
            ));
        }
        Model::from_objects(objects)
    }

    fn pod(
        name: &str,
        app: &str,
        ready: Option<bool>,
        http_port: Option<u16>,
    ) -> serde_json::Value {
        let mut p = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                         "labels": {"app": app}},
            "spec": {"containers": [{"name": "c"}]}});
        if let Some(port) = http_port {
            p["spec"]["containers"][0]["ports"] = json!([{"name": "http", "containerPort": port}]);
        }
        if let Some(r) = ready {
            p["status"] = json!({"conditions": [{"type": "Ready",
                "status": if r { "True" } else { "False" }}]});
        }
        p
    }

    fn service() -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "uid": "uid-web",
                         "annotations": {"keyway.io/selector": "app=web"}},
            "spec": {"clusterIP": "None", "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "metrics", "port": 9090, "protocol": "UDP"}]}})
    }

    #[test]
    fn a_node_publishes_the_overlay_addresses_of_the_matching_pods_it_serves() {
        let m = model(
            &[
                service(),
                pod("web-1", "web", Some(true), Some(8080)),
                pod("web-2", "web", Some(false), Some(8080)),
                pod("web-3", "web", None, Some(8080)),
                pod("db-1", "db", Some(true), Some(8080)),
            ],
            &[
                ("web-1", "node-a", &["100.64.0.2", "fd00::2"]),
                ("web-2", "node-a", &["100.64.0.3"]),
                ("web-3", "node-b", &["100.64.1.2"]),
                ("db-1", "node-a", &["100.64.0.4"]),
            ],
        );
        let a = desired(&m, "node-a");
        assert_eq!(a.len(), 2, "{a:#?}");
        let v4 = a.iter().find(|s| s.address_type == "IPv4").unwrap();
        let v6 = a.iter().find(|s| s.address_type == "IPv6").unwrap();
        let addrs = |s: &EndpointSlice| -> Vec<String> {
            endpoints_of(s)
                .iter()
                .map(|e| e.addresses[0].clone())
                .collect()
        };
        assert_eq!(
            addrs(v4),
            ["100.64.0.2", "100.64.0.3"],
            "db-1 is not selected; web-3 is another node's"
        );
        assert_eq!(addrs(v6), ["fd00::2"]);
        let ready: Vec<_> = endpoints_of(v4)
            .iter()
            .map(|e| e.conditions.as_ref().unwrap().ready)
            .collect();
        assert_eq!(ready, [Some(true), Some(false)], "web-2 is not Ready");
        let labels = v4.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        assert_eq!(labels[MANAGED_BY_LABEL], "keyway.io");
        assert_eq!(labels[NODE_LABEL], "node-a");
        assert_eq!(
            v4.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-web"
        );
        let t = endpoints_of(v4)[0].target_ref.as_ref().unwrap();
        assert_eq!(
            (t.name.as_deref(), t.uid.as_deref()),
            (Some("web-1"), Some("uid-web-1"))
        );
        let ports: Vec<_> = v4
            .ports
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.name.clone().unwrap(),
                    p.port.unwrap(),
                    p.protocol.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                ("http".into(), 8080, "TCP".into()),
                ("metrics".into(), 9090, "UDP".into())
            ],
            "the named target resolved to the container port; the unnamed defaults to the port"
        );
        // Node b's agent publishes web-3 (no Ready condition in its status: counted ready).
        let b = desired(&m, "node-b");
        assert_eq!(b.len(), 1);
        assert_eq!(endpoints_of(&b[0])[0].addresses, ["100.64.1.2"]);
        assert_eq!(
            endpoints_of(&b[0])[0].conditions.as_ref().unwrap().ready,
            Some(true)
        );
        assert_ne!(
            b[0].metadata.name, v4.metadata.name,
            "each node writes its own slice"
        );
        assert!(desired(&m, "node-c").is_empty());
        // The same model gives the same names: nothing is rewritten needlessly.
        assert_eq!(desired(&m, "node-a"), a);
    }

    #[test]
    fn pods_whose_ports_resolve_differently_get_their_own_slice() {
        let m = model(
            &[
                service(),
                pod("web-1", "web", None, Some(8080)),
                pod("web-2", "web", None, Some(8081)),
                pod("web-3", "web", None, None),
            ],
            &[
                ("web-1", "n", &["100.64.0.2"]),
                ("web-2", "n", &["100.64.0.3"]),
                ("web-3", "n", &["100.64.0.4"]),
            ],
        );
        let s = desired(&m, "n");
        assert_eq!(s.len(), 3);
        let mut seen: Vec<(String, Vec<i32>)> = s
            .iter()
            .map(|s| {
                (
                    endpoints_of(s)[0].addresses[0].clone(),
                    s.ports.iter().flatten().map(|p| p.port.unwrap()).collect(),
                )
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                ("100.64.0.2".into(), vec![8080, 9090]),
                ("100.64.0.3".into(), vec![8081, 9090]),
                ("100.64.0.4".into(), vec![9090]),
            ],
            "web-3 has no port named http: that port is left out for it"
        );
    }

    fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        match (target, patch) {
            (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
            (t, p) => *t = p.clone(),
        }
    }

    #[test]
    fn services_keyway_cannot_serve_are_refused_with_the_reason() {
        let err = |patch: serde_json::Value| {
            let mut s = service();
            merge(&mut s, &patch);
            parse_object(s).unwrap_err().to_string()
        };
        assert!(err(json!({"spec": {"clusterIP": "10.96.0.10"}})).contains("headless Services"));
        assert!(err(json!({"spec": {"selector": {"app": "web"}}})).contains("spec.selector"));
        assert!(
            err(json!({"metadata": {"annotations": {"keyway.io/selector": "app!=web"}}}))
                .contains("only key=value")
        );
        assert!(
            err(json!({"metadata": {"annotations": {"keyway.io/selector": " , "}}}))
                .contains("empty")
        );
        // Without the annotation the Service is an ordinary one, which keyway publishes nothing for.
        let mut plain = service();
        plain["metadata"]["annotations"] = json!({});
        plain["spec"]["clusterIP"] = json!("10.96.0.10");
        let Some(Object::Service(plain)) = parse_object(plain).unwrap() else {
            panic!("a Service");
        };
        assert_eq!(plain.covered, None);
        let model = Model::from_objects([Object::Service(plain)]);
        assert!(desired(&model, "node-1").is_empty());
    }

    #[test]
    fn long_node_names_become_valid_label_values() {
        let long = "n".repeat(100);
        let l = node_label(&long);
        assert!(l.len() <= 63 && l.starts_with("h-"));
        assert_eq!(l, node_label(&long));
        assert_eq!(node_label("node-1"), "node-1");
    }
}
