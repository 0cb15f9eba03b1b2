//! The cluster loops against the in-memory API server, with their timing shortened.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use keyway_core::counters::Counters;
use keyway_testing::FakeApi;
use keyway_testing::fake_api::{Reply, status};
use serde_json::{Value, json};

use super::*;
use crate::source::KubePublisher;

fn fast() -> Timing {
    Timing {
        resync: Duration::from_millis(100),
        settle: Duration::from_millis(10),
        backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
    }
}

fn metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new(Arc::new(Counters::new()), Arc::default()))
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn unavailable() -> Reply {
    Reply::Json(503, status(503, "ServiceUnavailable"))
}

fn model(docs: &[Value]) -> Model {
    let mut objects = Vec::new();
    for d in docs {
        objects.extend(crate::source::kube::objects_of(d.clone()).unwrap());
    }
    Model::from_objects(objects)
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

#[tokio::test]
async fn the_taint_is_lifted_only_once_the_agent_is_ready() {
    let api = FakeApi::new();
    api.put(
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
        "spec": {"taints": [{"key": "keyway.io/not-ready", "effect": "NoSchedule"},
                            {"key": "dedicated", "effect": "NoSchedule"}]}}),
    );
    api.script("GET", "/api/v1/nodes/node-1", unavailable());
    api.script("GET", "/api/v1/nodes/node-1", Reply::Store);
    let (ready, rx) = watch::channel(false);
    let task = tokio::spawn(lift_taint(api.client(), "node-1".into(), rx, fast()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        api.requests().is_empty(),
        "nothing before the agent is ready"
    );
    ready.send_replace(true);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    let taints = &api.get("nodes", "", "node-1").unwrap()["spec"]["taints"];
    assert_eq!(
        taints,
        &json!([{"key": "dedicated", "effect": "NoSchedule"}])
    );
    assert_eq!(api.answered(503), 1, "the failure was retried");
}

fn block(name: &str, index: u64, node: &str) -> Value {
    json!({"apiVersion": "keyway.io/v1alpha1", "kind": "OverlayBlock", "metadata": {"name": name},
           "spec": {"network": "default", "index": index, "node": node}})
}

fn slice(name: &str, node: &str) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop", "labels": {
            "kubernetes.io/service-name": "web",
            "endpointslice.kubernetes.io/managed-by": "keyway.io",
            "keyway.io/node": node}},
        "addressType": "IPv4", "endpoints": []})
}

fn names(api: &FakeApi, resource: &str) -> Vec<String> {
    api.objects(resource)
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn departed_nodes_lose_their_blocks_and_slices_but_no_view_reclaims_nothing() {
    let api = FakeApi::new();
    api.put("overlayblocks", block("default-0", 0, "node-1"));
    api.put("overlayblocks", block("default-1", 1, "node-gone"));
    api.put("endpointslices", slice("web-kw-1", "node-1"));
    api.put("endpointslices", slice("web-kw-2", "node-gone"));
    let (_, ready) = watch::channel(true);
    // No nodes in the model: the source has not seen the cluster; nothing is touched.
    let (to_model, view) = watch::channel(Arc::new(Model::default()));
    let task = tokio::spawn(reclaim(api.client(), view, ready, fast()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(names(&api, "overlayblocks").len(), 2);
    to_model.send_replace(Arc::new(model(&[node("node-1")])));
    until("the departed node's block and slice gone", || {
        names(&api, "overlayblocks") == ["default-0"]
            && names(&api, "endpointslices") == ["web-kw-1"]
    })
    .await;
    task.abort();
}

fn covered(attached: bool) -> Model {
    let mut docs = vec![
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "uid": "uid-web",
                         "annotations": {"keyway.io/selector": "app=web"}},
            "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}}),
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c"}]}}),
    ];
    if attached {
        docs[1]["metadata"]["annotations"] = json!({"keyway.io/overlay":
            r#"{"node":"node-1","infraIp":"10.244.1.5","overlayIps":["100.64.0.7"]}"#});
    }
    model(&docs)
}

#[tokio::test]
async fn slices_follow_the_model_and_a_failed_sync_is_retried() {
    let api = FakeApi::new();
    let path = "/apis/discovery.k8s.io/v1/endpointslices";
    api.script("GET", path, unavailable());
    api.script("GET", path, Reply::Store);
    let m = metrics();
    let (to_model, view) = watch::channel(Arc::new(covered(true)));
    let (_, ready) = watch::channel(true);
    let task = tokio::spawn(sync_slices(
        api.client(),
        "node-1".into(),
        view,
        ready,
        m.clone(),
        fast(),
    ));
    until("the slice written", || {
        api.objects("endpointslices")
            .iter()
            .any(|s| s["endpoints"][0]["addresses"][0] == "100.64.0.7")
    })
    .await;
    assert_eq!(m.endpointslice_errors.get(), 1);
    to_model.send_replace(Arc::new(covered(false)));
    until("the slice deleted with its pod's attachment", || {
        api.objects("endpointslices").is_empty()
    })
    .await;
    task.abort();
}

fn spec(ip: &str) -> OverlayAttachmentSpec {
    OverlayAttachmentSpec {
        namespace: "x".into(),
        pod: "a".into(),
        node: "node-1".into(),
        infra_ip: "10.244.1.5".parse().unwrap(),
        overlay_ips: vec![ip.parse().unwrap()],
        proof: None,
    }
}

fn annotation(api: &FakeApi) -> Option<Value> {
    let pod = api.get("pods", "x", "a")?;
    let a = pod["metadata"]["annotations"]["keyway.io/overlay"].as_str()?;
    serde_json::from_str(a).ok()
}

#[tokio::test]
async fn publications_are_retried_and_the_latest_word_on_a_pod_wins() {
    let api = FakeApi::new();
    api.put(
        "pods",
        json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "a", "namespace": "x"}, "spec": {"containers": [{"name": "c"}]}}),
    );
    let path = "/api/v1/namespaces/x/pods/a";
    api.script("PATCH", path, unavailable());
    api.script("PATCH", path, Reply::Store);
    let (pods, _) = kube::runtime::reflector::store::<Pod>();
    let publisher = Publisher::Kube(KubePublisher::new(api.client(), "node-1", pods));
    let m = metrics();
    let p = Publications::spawn(publisher, m.clone(), fast());
    p.publish(spec("100.64.0.7"));
    until("the annotation", || annotation(&api).is_some()).await;
    assert_eq!(
        annotation(&api).unwrap()["overlayIps"],
        json!(["100.64.0.7"])
    );
    assert_eq!(m.publication_errors.get(), 1);
    p.publish(spec("100.64.0.8"));
    p.withdraw(ObjectKey::new("x", "a"));
    until("withdrawn", || annotation(&api).is_none()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        annotation(&api).is_none(),
        "the withdrawal was the last word"
    );
}
