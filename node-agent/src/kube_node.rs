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
    let bytes = keyway_sap::io::fs::random_bytes(32).map_err(ClusterError::Random)?;
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
    use keyway_testing::FakeApi;
    use keyway_testing::fake_api::{Reply, status};

    const PATH: &str = "/api/v1/namespaces/keyway-system/secrets/keyway-cluster-secret";

    fn secret(b64: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": SECRET_NAME, "namespace": "keyway-system"},
               "data": {"secret": b64}})
    }

    #[tokio::test]
    async fn an_existing_secret_is_used() {
        let api = FakeApi::new();
        api.put(
            "secrets",
            secret("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="),
        );
        assert_eq!(
            cluster_secret(api.client(), "keyway-system").await.unwrap(),
            b"0123456789abcdef0123456789abcdef"
        );
        assert_eq!(api.requests()[0].path, PATH);
        assert_eq!(api.requests().len(), 1, "read, not created");
    }

    #[tokio::test]
    async fn a_missing_secret_is_created_once_and_a_lost_race_reads_the_winner() {
        let api = FakeApi::new();
        let mine = cluster_secret(api.client(), "keyway-system").await.unwrap();
        assert_eq!(mine.len(), 32);
        let posts: Vec<_> = api
            .requests()
            .into_iter()
            .filter(|r| r.verb == "POST")
            .collect();
        assert_eq!(posts.len(), 1);
        assert_eq!(posts[0].body["immutable"], true);

        // Another agent creates it between this one's read and its create.
        let api = FakeApi::new();
        api.script("GET", PATH, Reply::Json(404, status(404, "NotFound")));
        api.script("GET", PATH, Reply::Store);
        api.put("secrets", secret("d2lubmVyd2lubmVyd2lubmVyd2lubmVy"));
        assert_eq!(
            cluster_secret(api.client(), "keyway-system").await.unwrap(),
            b"winnerwinnerwinnerwinner"
        );
        assert_eq!(api.answered(409), 1, "the create lost the race");
    }

    #[tokio::test]
    async fn a_short_secret_is_refused() {
        let api = FakeApi::new();
        api.put("secrets", secret("c2hvcnQ="));
        assert!(matches!(
            cluster_secret(api.client(), "keyway-system").await,
            Err(ClusterError::BadSecret { .. })
        ));
    }

    fn node(taints: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}, "spec": {"taints": taints}})
    }

    #[tokio::test]
    async fn the_taint_is_lifted_keeping_the_others_and_a_conflict_is_retried() {
        let api = FakeApi::new();
        api.put(
            "nodes",
            node(json!([
                {"key": NOT_READY_TAINT, "effect": "NoSchedule"},
                {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}])),
        );
        let path = "/api/v1/nodes/node-1";
        api.script("PATCH", path, Reply::Json(409, status(409, "Conflict")));
        api.script("PATCH", path, Reply::Store);
        assert!(lift_taint(api.client(), "node-1").await.unwrap());
        let patches: Vec<_> = api
            .requests()
            .into_iter()
            .filter(|r| r.verb == "PATCH")
            .collect();
        assert_eq!(patches.len(), 2, "the conflict was retried");
        assert_eq!(patches[1].body["metadata"]["resourceVersion"], "1");
        assert_eq!(
            api.get("nodes", "", "node-1").unwrap()["spec"]["taints"],
            json!([{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}])
        );

        let api = FakeApi::new();
        api.put(
            "nodes",
            node(json!([{"key": "other", "effect": "NoExecute"}])),
        );
        assert!(!lift_taint(api.client(), "node-1").await.unwrap());
        assert!(
            api.requests().iter().all(|r| r.verb == "GET"),
            "nothing to patch"
        );
    }
}
