//! What the agent does on a cluster besides watching: the cluster secret keys derive from (a
//! Secret, created once by whichever agent comes first), and the node's `keyway.io/not-ready`
//! taint, lifted once the agent is ready so that no pod is scheduled onto a node before keyway
//! can protect it.

use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

/// The Secret that holds the cluster secret, in keyway's namespace.
pub const SECRET_NAME: &str = "keyway-cluster-secret";
/// Its key.
pub const SECRET_KEY: &str = "secret";
/// The taint nodes carry until their agent is ready (registered by kubelet's
/// `--register-with-taints`, or put on by the operator).
pub const NOT_READY_TAINT: &str = "keyway.io/not-ready";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the API server: {0}")]
    Api(#[from] kube::Error),
    #[error("Secret {namespace}/{SECRET_NAME} has no {SECRET_KEY:?} of 16 bytes or more")]
    BadSecret { namespace: String },
    #[error("cannot read random bytes: {0}")]
    Random(#[source] std::io::Error),
}

/// The cluster secret's bytes: read from the Secret, or created (32 random bytes) when absent.
/// Create-if-absent makes the first agent's bytes everyone's; a losing create reads the winner's.
pub async fn cluster_secret(
    client: kube::Client,
    namespace: &str,
) -> Result<Vec<u8>, ClusterError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let read = |s: Secret| {
        s.data
            .and_then(|d| d.get(SECRET_KEY).map(|b| b.0.clone()))
            .filter(|b| b.len() >= 16)
            .ok_or_else(|| ClusterError::BadSecret {
                namespace: namespace.to_string(),
            })
    };
    if let Some(s) = api.get_opt(SECRET_NAME).await? {
        return read(s);
    }
    let mut bytes = vec![0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(ClusterError::Random)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(SECRET_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(
                [(
                    "app.kubernetes.io/part-of".to_string(),
                    "keyway".to_string(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        data: Some([(SECRET_KEY.to_string(), ByteString(bytes))].into()),
        immutable: Some(true),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(s) => {
            tracing::info!(namespace, name = SECRET_NAME, "created the cluster secret");
            read(s)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => read(api.get(SECRET_NAME).await?),
        Err(e) => Err(e.into()),
    }
}

/// Removes `NOT_READY_TAINT` from `node`; whether it was there. The patch carries the
/// resourceVersion it was computed from, so a concurrent change to the taints is retried, never
/// overwritten.
pub async fn lift_taint(client: kube::Client, node: &str) -> Result<bool, ClusterError> {
    let api: Api<Node> = Api::all(client);
    for attempt in 0.. {
        let n = api.get(node).await?;
        let taints = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        if !taints.iter().any(|t| t.key == NOT_READY_TAINT) {
            return Ok(false);
        }
        let keep: Vec<_> = taints
            .into_iter()
            .filter(|t| t.key != NOT_READY_TAINT)
            .collect();
        let patch = json!({
            "metadata": {"resourceVersion": n.metadata.resource_version},
            "spec": {"taints": keep},
        });
        match api
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(
                    node,
                    taint = NOT_READY_TAINT,
                    "lifted the node's taint: pods may be scheduled here"
                );
                return Ok(true);
            }
            Err(kube::Error::Api(s)) if s.code == 409 && attempt < 10 => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    type Handler =
        Box<dyn Fn(&str, &str, &serde_json::Value) -> (u16, serde_json::Value) + Send + Sync>;

    type Log = Arc<Mutex<Vec<(String, String, serde_json::Value)>>>;

    /// A mock API server: `handler(method, path, body)`; every request is logged.
    fn api(handler: Handler) -> (kube::Client, Log) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (h, l) = (Arc::new(handler), log.clone());
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let (h, l) = (h.clone(), l.clone());
            async move {
                let m = req.method().to_string();
                let p = req.uri().path().to_string();
                let b = req.into_body().collect().await.unwrap().to_bytes();
                let body: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                let (code, v) = h(&m, &p, &body);
                l.lock().unwrap().push((m, p, body));
                Ok::<_, Infallible>(
                    http::Response::builder()
                        .status(code)
                        .body(http_body_util::Full::new(hyper::body::Bytes::from(
                            v.to_string(),
                        )))
                        .unwrap(),
                )
            }
        });
        (kube::Client::new(svc, "default"), log)
    }

    fn status(code: u16, reason: &str) -> serde_json::Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": reason, "message": reason, "code": code})
    }

    const PATH: &str = "/api/v1/namespaces/keyway-system/secrets/keyway-cluster-secret";

    #[tokio::test]
    async fn an_existing_secret_is_used() {
        let (c, log) = api(Box::new(|_, _, _| {
            (
                200,
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET_NAME},
                         "data": {"secret": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}}),
            )
        }));
        assert_eq!(
            cluster_secret(c, "keyway-system").await.unwrap(),
            b"0123456789abcdef0123456789abcdef"
        );
        assert_eq!(log.lock().unwrap()[0].1, PATH);
    }

    #[tokio::test]
    async fn a_missing_secret_is_created_once_and_a_lost_race_reads_the_winner() {
        let (c, log) = api(Box::new(|m, _, body| match m {
            "GET" => (404, status(404, "NotFound")),
            _ => (201, body.clone()),
        }));
        let mine = cluster_secret(c, "keyway-system").await.unwrap();
        assert_eq!(mine.len(), 32);
        let log = log.lock().unwrap().clone();
        assert_eq!(log[1].0, "POST");
        assert_eq!(log[1].2["immutable"], true);

        let created = Arc::new(Mutex::new(false));
        let (c, _) = api(Box::new(move |m, _, _| match m {
            "POST" => {
                *created.lock().unwrap() = true;
                (409, status(409, "AlreadyExists"))
            }
            "GET" if *created.lock().unwrap() => (
                200,
                json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": SECRET_NAME}, "data": {"secret": "d2lubmVyd2lubmVyd2lubmVyd2lubmVy"}}),
            ),
            _ => (404, status(404, "NotFound")),
        }));
        assert_eq!(
            cluster_secret(c, "keyway-system").await.unwrap(),
            b"winnerwinnerwinnerwinner"
        );
    }

    #[tokio::test]
    async fn a_short_secret_is_refused() {
        let (c, _) = api(Box::new(|_, _, _| {
            (
                200,
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET_NAME}, "data": {"secret": "c2hvcnQ="}}),
            )
        }));
        assert!(matches!(
            cluster_secret(c, "keyway-system").await,
            Err(ClusterError::BadSecret { .. })
        ));
    }

    fn node(rv: &str, taints: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "resourceVersion": rv}, "spec": {"taints": taints}})
    }

    #[tokio::test]
    async fn the_taint_is_lifted_keeping_the_others_and_a_conflict_is_retried() {
        let patches = Arc::new(Mutex::new(0));
        let p = patches.clone();
        let (c, log) = api(Box::new(move |m, _, _| match m {
            "GET" => (
                200,
                node(
                    "7",
                    json!([
                {"key": NOT_READY_TAINT, "effect": "NoSchedule"},
                {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]),
                ),
            ),
            _ => {
                let mut n = p.lock().unwrap();
                *n += 1;
                if *n == 1 {
                    (409, status(409, "Conflict"))
                } else {
                    (200, node("8", json!([])))
                }
            }
        }));
        assert!(lift_taint(c, "node-1").await.unwrap());
        let log = log.lock().unwrap().clone();
        let patch = &log.iter().rfind(|(m, _, _)| m == "PATCH").unwrap().2;
        assert_eq!(patch["metadata"]["resourceVersion"], "7");
        assert_eq!(
            patch["spec"]["taints"],
            json!([{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}])
        );
        assert_eq!(*patches.lock().unwrap(), 2, "the conflict was retried");

        let (c, log) = api(Box::new(|_, _, _| {
            (
                200,
                node("9", json!([{"key": "other", "effect": "NoExecute"}])),
            )
        }));
        assert!(!lift_taint(c, "node-1").await.unwrap());
        assert!(
            log.lock().unwrap().iter().all(|(m, _, _)| m == "GET"),
            "nothing to patch"
        );
    }
}
