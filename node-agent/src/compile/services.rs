//! Stage 6: the Service ports this node's pods translate themselves, kube-proxy's way.
//!
//! For each cluster IP and port of a Service, the endpoints of its EndpointSlices of the same
//! family whose slice port has the Service port's name and protocol (the slice carries the
//! target port, named ports already resolved per pod), chosen as kube-proxy chooses:
//! - `internalTrafficPolicy: Local` keeps the endpoints on this node;
//! - the ready endpoints; when none is ready, the serving ones that are terminating (so a rolling
//!   update does not drop connections); when none of those either, none.
//!
//! Only a Service port with at least one protected pod among its chosen endpoints is translated in
//! the pod: the others are left to the node's kube-proxy, which reaches what is not on the
//! overlay as before.

use std::collections::HashSet;
use std::net::IpAddr;

use keyway_protocol::firewall::ServiceNat;

use crate::model::{Endpoint, Model, Service, ServicePort};

/// Every Service port to translate in this node's pods, sorted.
pub fn translations(model: &Model, node: &str, protected: &HashSet<IpAddr>) -> Vec<ServiceNat> {
    let mut out = Vec::new();
    for svc in model.services.values() {
        for cluster_ip in &svc.cluster_ips {
            for sp in &svc.ports {
                let endpoints = chosen(model, svc, sp, *cluster_ip, node);
                if !endpoints.iter().any(|(a, _)| protected.contains(a)) {
                    continue;
                }
                out.push(ServiceNat {
                    service: svc.key.to_string(),
                    cluster_ip: *cluster_ip,
                    protocol: sp.protocol,
                    port: sp.port,
                    affinity_secs: svc.affinity_secs,
                    endpoints,
                });
            }
        }
    }
    out.sort();
    out
}

/// The (address, port) pairs a connection to `cluster_ip`:`sp` may go to, sorted and unique.
fn chosen(
    model: &Model,
    svc: &Service,
    sp: &ServicePort,
    cluster_ip: IpAddr,
    node: &str,
) -> Vec<(IpAddr, u16)> {
    let name = sp.name.as_deref().unwrap_or_default();
    let mut candidates: Vec<(&Endpoint, u16)> = Vec::new();
    let ns = &svc.key.namespace;
    for slice in model
        .endpoint_slices
        .values()
        .filter(|s| &s.key.namespace == ns && s.service == svc.key.name)
    {
        let Some(port) = slice
            .ports
            .iter()
            .find(|p| p.name == name && p.protocol == sp.protocol)
        else {
            continue;
        };
        for e in &slice.endpoints {
            let local = e.node.as_deref() == Some(node);
            if e.address.is_ipv6() == cluster_ip.is_ipv6() && (local || !svc.internal_local) {
                candidates.push((e, port.port));
            }
        }
    }
    let ready: Vec<_> = candidates.iter().filter(|(e, _)| e.ready).collect();
    let usable = if ready.is_empty() {
        candidates
            .iter()
            .filter(|(e, _)| e.serving && e.terminating)
            .collect()
    } else {
        ready
    };
    let mut out: Vec<(IpAddr, u16)> = usable.into_iter().map(|(e, p)| (e.address, *p)).collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::model::{Object, parse_object};

    fn parsed(doc: Value) -> Object {
        parse_object(doc).unwrap().expect("an object")
    }

    fn service(name: &str, spec: Value) -> Object {
        parsed(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "x"}, "spec": spec}))
    }

    /// A slice of `service`: endpoints as (address, node, ready, serving, terminating).
    fn slice(
        name: &str,
        service: &str,
        ports: Value,
        eps: &[(&str, &str, bool, bool, bool)],
    ) -> Object {
        let family = if eps.iter().any(|e| e.0.contains(':')) {
            "IPv6"
        } else {
            "IPv4"
        };
        let endpoints: Vec<Value> = eps
            .iter()
            .map(|(a, n, r, s, t)| {
                json!({"addresses": [a], "nodeName": n,
                "conditions": {"ready": r, "serving": s, "terminating": t}})
            })
            .collect();
        parsed(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "x",
                "labels": {"kubernetes.io/service-name": service}},
            "addressType": family, "ports": ports, "endpoints": endpoints}),
        )
    }

    fn protected(ips: &[&str]) -> HashSet<IpAddr> {
        ips.iter().map(|i| i.parse().unwrap()).collect()
    }

    fn eps(nat: &ServiceNat) -> Vec<String> {
        nat.endpoints
            .iter()
            .map(|(a, p)| std::net::SocketAddr::new(*a, *p).to_string())
            .collect()
    }

    #[test]
    fn a_service_port_goes_to_its_ready_endpoints_with_the_slices_target_ports() {
        let model = Model::from_objects([
            service(
                "web",
                json!({"clusterIP": "10.96.0.20", "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                          {"name": "dns", "port": 53, "protocol": "UDP"}]}),
            ),
            // Named target ports resolve per pod: two slices with different numbers.
            slice(
                "web-a",
                "web",
                json!([{"name": "http", "port": 8080}]),
                &[
                    ("10.244.1.2", "node-1", true, true, false),
                    ("10.244.2.2", "node-2", false, false, false),
                ],
            ),
            slice(
                "web-b",
                "web",
                json!([{"name": "http", "port": 8081},
                                          {"name": "dns", "port": 5353, "protocol": "UDP"}]),
                &[("10.244.2.3", "node-2", true, true, false)],
            ),
        ]);
        let all = protected(&["10.244.1.2", "10.244.2.2", "10.244.2.3"]);
        let nats = translations(&model, "node-1", &all);
        assert_eq!(nats.len(), 2, "{nats:?}");
        let http = nats.iter().find(|n| n.port == 80).unwrap();
        assert_eq!(
            eps(http),
            ["10.244.1.2:8080", "10.244.2.3:8081"],
            "the unready one is out"
        );
        assert_eq!((http.protocol, http.affinity_secs), (6, None));
        assert_eq!(http.service, "x/web");
        let dns = nats.iter().find(|n| n.port == 53).unwrap();
        assert_eq!(
            (dns.protocol, eps(dns)),
            (17, vec!["10.244.2.3:5353".to_string()])
        );
    }

    #[test]
    fn with_no_ready_endpoint_the_serving_terminating_ones_are_used() {
        let model = Model::from_objects([
            service(
                "web",
                json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}),
            ),
            slice(
                "web-a",
                "web",
                json!([{"port": 80}]),
                &[
                    ("10.244.1.2", "node-1", false, true, true),
                    ("10.244.1.3", "node-1", false, false, true),
                    ("10.244.1.4", "node-1", false, false, false),
                ],
            ),
        ]);
        let all = protected(&["10.244.1.2", "10.244.1.3", "10.244.1.4"]);
        let nats = translations(&model, "node-1", &all);
        assert_eq!(eps(&nats[0]), ["10.244.1.2:80"]);
    }

    #[test]
    fn internal_traffic_policy_local_keeps_the_nodes_own_endpoints() {
        let model = Model::from_objects([
            service(
                "web",
                json!({"clusterIP": "10.96.0.20", "internalTrafficPolicy": "Local",
                "sessionAffinity": "ClientIP", "ports": [{"port": 80}]}),
            ),
            slice(
                "web-a",
                "web",
                json!([{"port": 80}]),
                &[
                    ("10.244.1.2", "node-1", true, true, false),
                    ("10.244.2.2", "node-2", true, true, false),
                ],
            ),
        ]);
        let all = protected(&["10.244.1.2", "10.244.2.2"]);
        let on_1 = translations(&model, "node-1", &all);
        assert_eq!(eps(&on_1[0]), ["10.244.1.2:80"]);
        assert_eq!(
            on_1[0].affinity_secs,
            Some(10_800),
            "Kubernetes' default timeout"
        );
        // A node with no endpoint of its own translates nothing (kube-proxy drops such traffic).
        let none = Model::from_objects([
            service(
                "web",
                json!({"clusterIP": "10.96.0.20", "internalTrafficPolicy": "Local",
                "ports": [{"port": 80}]}),
            ),
            slice(
                "web-a",
                "web",
                json!([{"port": 80}]),
                &[("10.244.2.2", "node-2", true, true, false)],
            ),
        ]);
        assert!(translations(&none, "node-1", &all).is_empty());
    }

    #[test]
    fn each_cluster_ip_gets_the_endpoints_of_its_family() {
        let model = Model::from_objects([
            service(
                "web",
                json!({"clusterIP": "10.96.0.20",
                "clusterIPs": ["10.96.0.20", "fd00:96::20"], "ports": [{"port": 80}]}),
            ),
            slice(
                "web-4",
                "web",
                json!([{"port": 80}]),
                &[("10.244.1.2", "node-1", true, true, false)],
            ),
            slice(
                "web-6",
                "web",
                json!([{"port": 80}]),
                &[("fd00:244::2", "node-1", true, true, false)],
            ),
        ]);
        let all = protected(&["10.244.1.2", "fd00:244::2"]);
        let nats = translations(&model, "node-1", &all);
        let by_ip: Vec<(String, Vec<String>)> = nats
            .iter()
            .map(|n| (n.cluster_ip.to_string(), eps(n)))
            .collect();
        assert_eq!(
            by_ip,
            [
                ("10.96.0.20".to_string(), vec!["10.244.1.2:80".to_string()]),
                (
                    "fd00:96::20".to_string(),
                    vec!["[fd00:244::2]:80".to_string()]
                ),
            ]
        );
    }

    #[test]
    fn services_without_protected_endpoints_and_headless_ones_are_left_to_kube_proxy() {
        let model = Model::from_objects([
            service(
                "legacy",
                json!({"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}),
            ),
            slice(
                "legacy-a",
                "legacy",
                json!([{"port": 80}]),
                &[("10.244.1.9", "node-1", true, true, false)],
            ),
            service(
                "db",
                json!({"clusterIP": "None", "ports": [{"port": 5432}]}),
            ),
            slice(
                "db-a",
                "db",
                json!([{"port": 5432}]),
                &[("10.244.1.2", "node-1", true, true, false)],
            ),
            service(
                "ext",
                json!({"type": "ExternalName", "externalName": "example.com",
                "clusterIP": "10.96.0.31", "ports": [{"port": 80}]}),
            ),
        ]);
        let nats = translations(&model, "node-1", &protected(&["10.244.1.2"]));
        assert!(nats.is_empty(), "{nats:?}");
    }

    #[test]
    fn slices_that_kube_proxy_would_not_use_are_not_read() {
        let fqdn = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "f", "namespace": "x",
                "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "FQDN", "endpoints": [{"addresses": ["example.com"]}]});
        assert!(parse_object(fqdn).unwrap().is_none());
        let orphan = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "o", "namespace": "x"}, "addressType": "IPv4", "endpoints": []});
        assert!(parse_object(orphan).unwrap().is_none());
        let wrong = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "w", "namespace": "x",
                "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["fd00::1"]}]});
        let err = parse_object(wrong).unwrap_err().to_string();
        assert!(
            err.contains("EndpointSlice w") && err.contains("is not IPv4"),
            "{err}"
        );
    }
}
