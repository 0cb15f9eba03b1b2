//! The `kubernetes` state source against kube's own client over a mock API server: recorded,
//! realistic responses (lists, watch streams with ADDED/MODIFIED/DELETED, bookmarks, a 410 Gone,
//! errors) served to the real watchers. No API server can run on these machines; this is kube's
//! own `Client::new(service)` seam, with the requests checked as well as the answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keyway_agent::model::Model;
use keyway_agent::source::LastGood;
use keyway_agent::source::kube::{self as kube_source, KubeSource};
use keyway_testing::FakeApi;
use keyway_testing::fake_api::{Reply, event, list};
use serde_json::{Value, json};

fn pod(ns: &str, name: &str, rv: &str, labels: Value, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "resourceVersion": rv,
                     "labels": labels, "annotations": annotations},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "agnhost",
                 "ports": [{"containerPort": 80, "name": "serve-80-tcp", "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}]}
    })
}

fn namespace(name: &str, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "resourceVersion": rv, "labels": {"kubernetes.io/metadata.name": name}},
           "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";

async fn until(src: &mut KubeSource, what: &str, f: impl Fn(&Model) -> bool) -> Arc<Model> {
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = src.model.borrow_and_update().clone();
            if *src.ready.borrow() && f(&m) {
                return m;
            }
            // The model comes first, readiness right after: wake on either.
            tokio::select! {
                r = src.model.changed() => r.unwrap(),
                r = src.ready.changed() => r.unwrap(),
            }
        }
    })
    .await;
    r.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_bookmarks_and_a_410_relist_keep_the_model_right() {
    let api = FakeApi::new();
    let overlay = json!({"keyway.io/overlay": r#"{"node":"node-1","infraIp":"10.244.1.5","overlayIps":["100.64.0.7"]}"#});
    api.script(
        "GET",
        NAMESPACES,
        Reply::Json(200, list(&[namespace("x", "10")], "10")),
    );
    api.script(
        "GET",
        PODS,
        Reply::Json(
            200,
            list(
                &[
                    pod("x", "a", "90", json!({"app": "a"}), json!({})),
                    pod("x", "b", "91", json!({"app": "b"}), json!({})),
                ],
                "100",
            ),
        ),
    );
    // The relist after the 410 below: pod a was deleted while the watch was away.
    api.script(
        "GET",
        PODS,
        Reply::Json(
            200,
            list(
                &[pod(
                    "x",
                    "b",
                    "150",
                    json!({"app": "b", "tier": "web"}),
                    overlay.clone(),
                )],
                "180",
            ),
        ),
    );
    // The first watch: a pod added, another relabelled and annotated, a bookmark, the added one
    // deleted; then the stream ends, as the API server ends watches after a timeout.
    api.script("WATCH", PODS, Reply::Events { events: vec![
        event("ADDED", pod("x", "c", "101", json!({"app": "c"}), json!({}))),
        event("MODIFIED", pod("x", "b", "102", json!({"app": "b", "tier": "web"}), overlay)),
        event("BOOKMARK", json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"resourceVersion": "105"}})),
        event("DELETED", pod("x", "c", "106", json!({"app": "c"}), json!({}))),
    ], open: false });
    // Resumed from 106, the API server has compacted past it: 410 Gone.
    api.script(
        "WATCH",
        PODS,
        Reply::Events {
            events: vec![event(
                "ERROR",
                json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version: 106 (180)", "reason": "Expired", "code": 410}),
            )],
            open: false,
        },
    );
    api.script(
        "WATCH",
        PODS,
        Reply::Events {
            events: vec![],
            open: true,
        },
    );
    let state = keyway_testing::Scratch::new("kube-source-state-1");
    let mut src = kube_source::spawn(api.client(), LastGood::new(state.path()));
    let m = until(&mut src, "pod a gone after the relist", |m| {
        m.pods.len() == 1
            && m.pods.values().all(|p| p.key.name == "b")
            && api
                .log()
                .iter()
                .filter(|l| l.starts_with("GET /api/v1/pods?"))
                .count()
                >= 2
    })
    .await;
    let b = m.pods.values().next().unwrap();
    assert_eq!(
        b.labels.get("tier").map(String::as_str),
        Some("web"),
        "MODIFIED applied"
    );
    assert_eq!(
        b.infra_ips,
        vec!["10.244.1.5".parse::<std::net::IpAddr>().unwrap()]
    );
    let att = m
        .attachments
        .values()
        .next()
        .expect("the annotation became an attachment");
    assert_eq!(
        att.overlay_ips,
        vec!["100.64.0.7".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(m.namespace_labels("x")["kubernetes.io/metadata.name"], "x");

    let log = api.log();
    let watches: Vec<&String> = log
        .iter()
        .filter(|l| l.starts_with(&format!("WATCH {PODS}?")))
        .collect();
    assert!(
        watches
            .iter()
            .all(|w| w.contains("allowWatchBookmarks=true")),
        "{watches:#?}"
    );
    assert!(
        watches[0].contains("resourceVersion=100"),
        "the first watch starts at the list's version: {watches:#?}"
    );
    assert!(
        watches[1].contains("resourceVersion=106"),
        "a watch resumes where the last ended: {watches:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_before_every_list_and_the_last_good_state_survives_errors() {
    let api = FakeApi::new();
    let unavailable = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "the server is currently unable to handle the request", "reason": "ServiceUnavailable", "code": 503});
    // Namespaces fail once before they list.
    api.script("GET", NAMESPACES, Reply::Json(503, unavailable.clone()));
    api.script(
        "GET",
        NAMESPACES,
        Reply::Json(200, list(&[namespace("x", "10")], "10")),
    );
    api.script(
        "GET",
        PODS,
        Reply::Json(
            200,
            list(
                &[pod("x", "a", "90", json!({"app": "a"}), json!({}))],
                "100",
            ),
        ),
    );
    // Then the API server goes away for the pods' watch, for good.
    api.script("WATCH", PODS, Reply::Json(503, unavailable));
    let state = keyway_testing::Scratch::new("kube-source-state-2");
    let mut src = kube_source::spawn(api.client(), LastGood::new(state.path()));
    assert!(!*src.ready.borrow(), "not ready before the first lists");
    until(&mut src, "the first model", |m| m.pods.len() == 1).await;
    let log = api.log();
    assert!(
        log.iter()
            .filter(|l| l.starts_with(&format!("GET {NAMESPACES}?")))
            .count()
            >= 2,
        "namespaces listed again after the error: {log:#?}"
    );
    // Let the pods' watch fail and back off a few times.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let watch_failures = api
        .log()
        .iter()
        .filter(|l| l.starts_with(&format!("WATCH {PODS}?")))
        .count();
    assert!(
        watch_failures >= 2,
        "the watch is retried: {watch_failures}"
    );
    assert!(
        watch_failures < 20,
        "with backoff, not in a tight loop: {watch_failures}"
    );
    assert!(src.stats.errors.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    assert!(*src.ready.borrow());
    assert_eq!(
        src.model.borrow().pods.len(),
        1,
        "existing pods stay while the API server is away"
    );
}

fn normalized(m: &Model) -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("namespaces", format!("{:?}", m.namespaces)),
        ("pods", format!("{:?}", m.pods)),
        ("nodes", format!("{:?}", m.nodes)),
        ("policies", format!("{:?}", m.policies)),
        ("networks", format!("{:?}", m.networks)),
        ("direct", format!("{:?}", m.direct_paths)),
        ("externals", format!("{:?}", m.externals)),
        ("configs", format!("{:?}", m.configs)),
        ("attachments", format!("{:?}", m.attachments)),
        ("services", format!("{:?}", m.services)),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_objects_make_the_same_model_as_the_file_source() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/paper-topology.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    // The documents as the API server would hold them (a resourceVersion, every namespaced
    // object in a namespace), listed to the kubernetes source and written for the file source.
    let mut as_file = String::new();
    let mut by_path: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let mut v: Value = serde::Deserialize::deserialize(doc).unwrap();
        if v.is_null() {
            continue;
        }
        let kind = v["kind"].as_str().unwrap().to_string();
        let path = match kind.as_str() {
            "Namespace" => NAMESPACES.to_string(),
            "Pod" => PODS.to_string(),
            "Service" => "/api/v1/services".to_string(),
            "NetworkPolicy" => "/apis/networking.k8s.io/v1/networkpolicies".to_string(),
            "ExternalEntity" => "/apis/keyway.io/v1alpha1/externalentities".to_string(),
            k => format!("/apis/keyway.io/v1alpha1/{}s", k.to_lowercase()),
        };
        v["metadata"]["resourceVersion"] = json!("7");
        if matches!(
            kind.as_str(),
            "NetworkPolicy" | "Pod" | "DirectPath" | "ExternalEntity" | "Service"
        ) && v["metadata"].get("namespace").is_none()
        {
            v["metadata"]["namespace"] = json!("default");
        }
        as_file.push_str("---\n");
        as_file.push_str(&serde_yaml_ng::to_string(&v).unwrap());
        by_path.entry(path).or_default().push(v);
    }
    let from_file = Model::from_objects(keyway_agent::source::parse_file(&as_file).unwrap());
    assert!(by_path.len() >= 6, "{:?}", by_path.keys());
    let api = FakeApi::new();
    for (path, items) in &by_path {
        api.script("GET", path, Reply::Json(200, list(items, "7")));
    }
    let state = keyway_testing::Scratch::new("kube-source-state-3");
    let mut src = kube_source::spawn(api.client(), LastGood::new(state.path()));
    let m = until(&mut src, "the first model", |_| true).await;
    assert!(!m.pods.is_empty() && !m.policies.is_empty() && !m.externals.is_empty());
    assert_eq!(m.services.len(), 3, "the Services s1, s2, s3");
    let (a, b) = (normalized(&from_file), normalized(&m));
    for k in a.keys() {
        assert_eq!(
            a[k], b[k],
            "{k} differs between the file and the kubernetes source"
        );
    }
}
