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
    use std::convert::Infallible;

    /// A client whose API server answers every request with `status` and `body`, and checks
    /// that it was asked for the right object.
    fn api_server(status: u16, body: &'static str) -> kube::Client {
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| async move {
            assert_eq!(req.method(), http::Method::GET);
            assert_eq!(
                req.uri().path(),
                "/apis/apps/v1/namespaces/keyway-system/daemonsets/keyway-node"
            );
            Ok::<_, Infallible>(
                http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(body.as_bytes().to_vec()))
                    .unwrap(),
            )
        });
        kube::Client::new(svc, "default")
    }

    const DS: &str = r#"{"apiVersion":"apps/v1","kind":"DaemonSet","metadata":{"name":"keyway-node","namespace":"keyway-system","uid":"6a1c","resourceVersion":"4711"},"spec":{"selector":{"matchLabels":{"app":"keyway-node"}},"template":{"metadata":{"labels":{"app":"keyway-node"}},"spec":{"containers":[{"name":"agent","image":"keyway"}]}}}}"#;
    const DS_DELETING: &str = r#"{"apiVersion":"apps/v1","kind":"DaemonSet","metadata":{"name":"keyway-node","namespace":"keyway-system","uid":"6a1c","resourceVersion":"4712","deletionTimestamp":"2026-11-22T10:00:00Z","deletionGracePeriodSeconds":0,"finalizers":["foregroundDeletion"]},"spec":{"selector":{"matchLabels":{"app":"keyway-node"}},"template":{"metadata":{"labels":{"app":"keyway-node"}},"spec":{"containers":[{"name":"agent","image":"keyway"}]}}}}"#;
    const NOT_FOUND: &str = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"daemonsets.apps \"keyway-node\" not found","reason":"NotFound","details":{"name":"keyway-node","group":"apps","kind":"daemonsets"},"code":404}"#;
    const UNAVAILABLE: &str = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server is currently unable to handle the request","reason":"ServiceUnavailable","code":503}"#;

    async fn ask(status: u16, body: &'static str) -> (OnExit, String) {
        decide(
            api_server(status, body),
            "keyway-system",
            "keyway-node",
            Duration::from_secs(5),
        )
        .await
    }

    #[tokio::test]
    async fn a_daemonset_that_remains_means_restart() {
        let (d, why) = ask(200, DS).await;
        assert_eq!(d, OnExit::Keep, "{why}");
    }

    #[tokio::test]
    async fn a_daemonset_gone_or_going_means_uninstall() {
        assert_eq!(ask(404, NOT_FOUND).await.0, OnExit::Uninstall);
        let (d, why) = ask(200, DS_DELETING).await;
        assert_eq!(d, OnExit::Uninstall);
        assert!(why.contains("being deleted"), "{why}");
    }

    #[tokio::test]
    async fn an_api_server_that_cannot_answer_keeps_keyway() {
        let (d, why) = ask(503, UNAVAILABLE).await;
        assert_eq!(d, OnExit::Keep);
        assert!(why.contains("cannot ask"), "{why}");
        let (d, why) = ask(200, "{not json").await;
        assert_eq!(d, OnExit::Keep, "{why}");
    }
}
