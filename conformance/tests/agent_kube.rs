//! The real `keyway-agent` binary with `--source kubernetes`, in a node namespace, talking HTTP to
//! a mock API server (the only kind that runs here) through a kubeconfig, as it would in the
//! DaemonSet: it waits for every list before it is ready, creates the cluster secret once (a
//! restarted agent reads it back), and lifts the node's `keyway.io/not-ready` taint once ready.
//! The mock keeps objects and answers lists, gets, creates (409 when the name exists), merge
//! patches (409 on a stale resourceVersion) and watches (that stay open).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use keyway_conformance::harness::{Scratch, bin, http_get};
use keyway_sap::testing::{TestNetns, privileged};
use serde_json::{Value, json};

type Body = StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

#[derive(Debug, Default)]
struct Store {
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    /// "METHOD path?query" of every request.
    log: Vec<String>,
    rv: u64,
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "reason": reason, "message": reason, "code": code})
}

fn once(v: Value) -> Body {
    StreamBody::new(futures::stream::iter([Ok(Frame::data(Bytes::from(v.to_string())))]).boxed())
}

/// (resource, namespace, name) from an API path.
fn parse_path(path: &str) -> Option<(String, String, Option<String>)> {
    let rest = path.strip_prefix("/api/v1/").or_else(|| {
        path.strip_prefix("/apis/")
            .and_then(|p| p.splitn(3, '/').nth(2))
    })?;
    let segs: Vec<&str> = rest.split('/').collect();
    match segs.as_slice() {
        ["namespaces", ns, res] => Some((res.to_string(), ns.to_string(), None)),
        ["namespaces", ns, res, name] => {
            Some((res.to_string(), ns.to_string(), Some(name.to_string())))
        }
        [res] => Some((res.to_string(), String::new(), None)),
        [res, name] => Some((res.to_string(), String::new(), Some(name.to_string()))),
        _ => None,
    }
}

impl Store {
    fn put(&mut self, res: &str, mut obj: Value) {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        self.objects.insert((res.to_string(), ns, name), obj);
    }

    fn answer(&mut self, method: &str, path: &str, query: &str, body: &[u8]) -> (u16, Body) {
        self.log.push(format!("{method} {path}?{query}"));
        let Some((res, ns, name)) = parse_path(path) else {
            return (404, once(status(404, "NotFound")));
        };
        // Cluster-scoped names under /api/v1/namespaces/{name}.
        let (res, ns, name) = if res != "namespaces"
            && ns.is_empty()
            && name.is_none()
            && path.starts_with("/api/v1/namespaces/")
        {
            ("namespaces".to_string(), String::new(), Some(res))
        } else {
            (res, ns, name)
        };
        let key = |n: &str| (res.clone(), ns.clone(), n.to_string());
        match (method, name) {
            ("GET", None) if query.split('&').any(|q| q == "watch=true") => {
                (200, StreamBody::new(futures::stream::pending().boxed()))
            }
            ("GET", None) => {
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|((r, n, _), _)| *r == res && (ns.is_empty() || *n == ns))
                    .map(|(_, v)| v.clone())
                    .collect();
                (
                    200,
                    once(json!({"apiVersion": "v1", "kind": "List",
                    "metadata": {"resourceVersion": self.rv.to_string()}, "items": items})),
                )
            }
            ("GET", Some(n)) => match self.objects.get(&key(&n)) {
                Some(o) => (200, once(o.clone())),
                None => (404, once(status(404, "NotFound"))),
            },
            ("POST", None) => {
                let mut obj: Value = serde_json::from_slice(body).unwrap();
                let n = obj["metadata"]["name"].as_str().unwrap().to_string();
                if self.objects.contains_key(&key(&n)) {
                    return (409, once(status(409, "AlreadyExists")));
                }
                if !ns.is_empty() {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                self.put(&res, obj);
                (201, once(self.objects[&key(&n)].clone()))
            }
            ("PATCH", Some(n)) => {
                let patch: Value = serde_json::from_slice(body).unwrap();
                let Some(mut obj) = self.objects.get(&key(&n)).cloned() else {
                    return (404, once(status(404, "NotFound")));
                };
                if let Some(rv) = patch.pointer("/metadata/resourceVersion")
                    && Some(rv) != obj.pointer("/metadata/resourceVersion")
                {
                    return (409, once(status(409, "Conflict")));
                }
                merge(&mut obj, &patch);
                self.put(&res, obj);
                (200, once(self.objects[&key(&n)].clone()))
            }
            _ => (405, once(status(405, "MethodNotAllowed"))),
        }
    }
}

/// Serves `store` on a listener bound inside `netns`, on a runtime of its own.
fn serve(netns: &TestNetns, store: Arc<Mutex<Store>>) -> (SocketAddr, tokio::runtime::Runtime) {
    let listener = netns
        .netns()
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let (conn, _) = listener.accept().await.unwrap();
            let store = store.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let store = store.clone();
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().path().to_string();
                            let query = req.uri().query().unwrap_or_default().to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let (code, b) =
                                store.lock().unwrap().answer(&method, &path, &query, &body);
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(code)
                                    .header("content-type", "application/json")
                                    .body(b)
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(conn), svc)
                    .await;
            });
        }
    });
    (addr, rt)
}

struct Agent {
    child: Child,
    netns: keyway_sap::sys::Netns,
    log: std::path::PathBuf,
}

impl Agent {
    fn start(node: &TestNetns, scratch: &Scratch, kubeconfig: &std::path::Path, n: u32) -> Agent {
        let log = scratch.join(format!("agent-{n}.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", &node.name])
            .arg(bin("keyway-agent"))
            .args([
                "--node-name",
                "node-1",
                "--source",
                "kubernetes",
                "--namespace",
                "keyway-system",
            ])
            .arg("--socket")
            .arg(scratch.join("agent.sock"))
            .arg("--state-dir")
            .arg(scratch.join("state"))
            .args(["--admin", "127.0.0.1:9464", "--node-ip", "127.0.0.1"])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Agent {
            child,
            netns: keyway_sap::sys::Netns::open(node.path()).unwrap(),
            log,
        }
    }

    fn readyz(&self) -> u16 {
        let s = self
            .netns
            .run(|| {
                std::net::TcpStream::connect_timeout(
                    &"127.0.0.1:9464".parse().unwrap(),
                    Duration::from_secs(1),
                )
            })
            .unwrap();
        s.ok()
            .and_then(|s| http_get(s, "/readyz").ok())
            .map_or(0, |(c, _)| c)
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn eventually(what: &str, agent: &Agent, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}; the agent's log:\n{}",
            std::fs::read_to_string(&agent.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn on_a_cluster_the_agent_syncs_makes_the_secret_once_and_lifts_the_taint() {
    if !privileged("on_a_cluster_the_agent_syncs_makes_the_secret_once_and_lifts_the_taint") {
        return;
    }
    let scratch = Scratch::new("agentkube");
    let node = TestNetns::new("agentkube", "node");
    node.sh(&["ip", "link", "set", "lo", "up"]);
    let store = Arc::new(Mutex::new(Store::default()));
    {
        let mut s = store.lock().unwrap();
        s.put("namespaces", json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "keyway-system", "labels": {"kubernetes.io/metadata.name": "keyway-system"}}}));
        s.put("nodes", json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
            "spec": {"taints": [{"key": "keyway.io/not-ready", "effect": "NoSchedule"},
                                {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]},
            "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}}));
    }
    let (addr, _rt) = serve(&node, store.clone());
    let kubeconfig = scratch.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: http://{addr}\nusers:\n- name: mock\n  user: {{}}\ncontexts:\n- name: mock\n  context: {{cluster: mock, user: mock}}\ncurrent-context: mock\n"),
    )
    .unwrap();

    let mut agent = Agent::start(&node, &scratch, &kubeconfig, 1);
    eventually("/readyz 200", &agent, || agent.readyz() == 200);
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("every kind listed"), "{log}");
    let s = store.lock().unwrap();
    for list in [
        "/api/v1/pods?",
        "/api/v1/namespaces?",
        "/api/v1/nodes?",
        "/apis/networking.k8s.io/v1/networkpolicies?",
        "/apis/keyway.io/v1alpha1/clusterconfigs?",
    ] {
        assert!(
            s.log
                .iter()
                .any(|l| l.starts_with(&format!("GET {list}")) && !l.contains("watch=true")),
            "listed {list}: {:#?}",
            s.log
        );
    }
    let secret = s
        .objects
        .get(&(
            "secrets".into(),
            "keyway-system".into(),
            "keyway-cluster-secret".into(),
        ))
        .expect("the secret was created")
        .clone();
    assert_eq!(
        secret["data"]["secret"].as_str().unwrap().len(),
        44,
        "32 bytes, base64"
    );
    drop(s);
    eventually("the taint lifted", &agent, || {
        let s = store.lock().unwrap();
        let taints =
            &s.objects[&("nodes".into(), String::new(), "node-1".into())]["spec"]["taints"];
        taints
            .as_array()
            .is_some_and(|t| t.len() == 1 && t[0]["key"] == "node-role.kubernetes.io/control-plane")
    });

    // A restarted agent reads the same secret back; nothing creates a second one.
    agent.stop();
    let agent = Agent::start(&node, &scratch, &kubeconfig, 2);
    eventually("/readyz 200 after a restart", &agent, || {
        agent.readyz() == 200
    });
    let s = store.lock().unwrap();
    let creates = s
        .log
        .iter()
        .filter(|l| l.starts_with("POST /api/v1/namespaces/keyway-system/secrets"))
        .count();
    assert_eq!(creates, 1, "{:#?}", s.log);
    assert_eq!(
        s.objects[&(
            "secrets".into(),
            "keyway-system".into(),
            "keyway-cluster-secret".into()
        )],
        secret
    );
}
