//! Restart or uninstall? When the installer is told to stop, it must tell a rolling update (or a
//! node drain, or an eviction) — after which another keyway pod takes over — from the removal of
//! keyway from the cluster. Taking the entry out on a restart would let pods start unprotected in
//! the gap; leaving it in on an uninstall would leave every new pod failing with "try again later".
//!
//! The DaemonSet says which: it is gone, or has a deletion timestamp, only when keyway is being
//! removed. When the API server cannot be asked, the entry stays (fail closed: new pods wait for an
//! agent rather than start without one).

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::Api;

/// What to do with keyway's configuration on the way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    /// Leave the entry and the plugin: another keyway pod will serve this node.
    Keep,
    /// Take out everything the installer added.
    Uninstall,
}

/// Asks the API server whether the DaemonSet `namespace/name` is going away; the answer, and why.
pub async fn decide(
    client: kube::Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> (OnExit, String) {
    let api: Api<DaemonSet> = Api::namespaced(client, namespace);
    match tokio::time::timeout(timeout, api.get_opt(name)).await {
        Ok(Ok(None)) => (
            OnExit::Uninstall,
            format!("DaemonSet {namespace}/{name} is gone"),
        ),
        Ok(Ok(Some(ds))) if ds.metadata.deletion_timestamp.is_some() => (
            OnExit::Uninstall,
            format!("DaemonSet {namespace}/{name} is being deleted"),
        ),
        Ok(Ok(Some(_))) => (
            OnExit::Keep,
            format!("DaemonSet {namespace}/{name} remains: a restart or an update"),
        ),
        Ok(Err(e)) => (
            OnExit::Keep,
            format!("cannot ask the API server ({e}); keeping keyway in the chain"),
        ),
        Err(_) => (
            OnExit::Keep,
            format!("the API server did not answer in {timeout:?}; keeping keyway in the chain"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_testing::FakeApi;
    use keyway_testing::fake_api::{Reply, status};
    use serde_json::json;

    const PATH: &str = "/apis/apps/v1/namespaces/keyway-system/daemonsets/keyway-node";

    fn daemonset(deleting: bool) -> serde_json::Value {
        let mut ds = json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "keyway-node", "namespace": "keyway-system", "uid": "6a1c"},
            "spec": {"selector": {"matchLabels": {"app": "keyway-node"}},
                     "template": {"metadata": {"labels": {"app": "keyway-node"}},
                                  "spec": {"containers": [{"name": "agent", "image": "keyway"}]}}}});
        if deleting {
            ds["metadata"]["deletionTimestamp"] = json!("2026-11-22T10:00:00Z");
            ds["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
        }
        ds
    }

    async fn ask(api: &FakeApi) -> (OnExit, String) {
        let r = decide(
            api.client(),
            "keyway-system",
            "keyway-node",
            Duration::from_secs(5),
        )
        .await;
        let asked: Vec<_> = api
            .requests()
            .iter()
            .map(|r| (r.verb.clone(), r.path.clone()))
            .collect();
        assert_eq!(
            asked,
            [("GET".to_string(), PATH.to_string())],
            "asked for the right object"
        );
        r
    }

    #[tokio::test]
    async fn a_daemonset_that_remains_means_restart() {
        let api = FakeApi::new();
        api.put("daemonsets", daemonset(false));
        let (d, why) = ask(&api).await;
        assert_eq!(d, OnExit::Keep, "{why}");
    }

    #[tokio::test]
    async fn a_daemonset_gone_or_going_means_uninstall() {
        assert_eq!(ask(&FakeApi::new()).await.0, OnExit::Uninstall);
        let api = FakeApi::new();
        api.put("daemonsets", daemonset(true));
        let (d, why) = ask(&api).await;
        assert_eq!(d, OnExit::Uninstall);
        assert!(why.contains("being deleted"), "{why}");
    }

    #[tokio::test]
    async fn an_api_server_that_cannot_answer_keeps_keyway() {
        let api = FakeApi::new();
        api.script(
            "GET",
            PATH,
            Reply::Json(503, status(503, "ServiceUnavailable")),
        );
        let (d, why) = ask(&api).await;
        assert_eq!(d, OnExit::Keep);
        assert!(why.contains("cannot ask"), "{why}");
        let api = FakeApi::new();
        api.script("GET", PATH, Reply::Text(200, "{not json".into()));
        let (d, why) = ask(&api).await;
        assert_eq!(d, OnExit::Keep, "{why}");
    }
}
