//! The real `keyway-agent` binary with `--source kubernetes`, in a node namespace, talking HTTP to
//! a mock API server (the only kind that runs here) through a kubeconfig, as it would in the
//! DaemonSet: it waits for every list before it is ready, creates the cluster secret once (a
//! restarted agent reads it back), and lifts the node's `keyway.io/not-ready` taint once ready.
//! The mock keeps objects and answers lists (with label selectors), gets, creates (409 when the
//! name exists), merge patches (409 on a stale resourceVersion), server-side applies (as an
//! upsert: one field manager), deletes, and watches (every change after the requested
//! resourceVersion, then open).

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

/// A change: (resourceVersion, resource, namespace, watch event).
type Change = (u64, String, String, Value);

#[derive(Debug)]
struct Store {
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    /// "METHOD path?query" of every request.
    log: Vec<String>,
    rv: u64,
    /// Every change, for watches that resume from an older resourceVersion.
    history: Vec<Change>,
    changes: tokio::sync::broadcast::Sender<Change>,
}

impl Default for Store {
    fn default() -> Store {
        Store {
            objects: BTreeMap::new(),
            log: Vec::new(),
            rv: 0,
            history: Vec::new(),
            changes: tokio::sync::broadcast::channel(1024).0,
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 3 <= b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// Whether `obj` matches an equality label selector (`a=b,c=d`).
fn selects(selector: &str, obj: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|t| {
        let (k, v) = t.split_once('=').unwrap();
        obj.pointer("/metadata/labels")
            .and_then(|l| l.get(k))
            .and_then(Value::as_str)
            == Some(v)
    })
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
    fn record(&mut self, res: &str, ns: &str, kind: &str, obj: Value) {
        let c = (
            self.rv,
            res.to_string(),
            ns.to_string(),
            json!({"type": kind, "object": obj}),
        );
        self.history.push(c.clone());
        let _ = self.changes.send(c);
    }

    fn put(&mut self, res: &str, mut obj: Value) {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let key = (res.to_string(), ns.clone(), name);
        let kind = if self.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.objects.insert(key, obj.clone());
        self.record(res, &ns, kind, obj);
    }

    fn remove(&mut self, res: &str, ns: &str, name: &str) -> Option<Value> {
        let mut obj = self
            .objects
            .remove(&(res.to_string(), ns.to_string(), name.to_string()))?;
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(res, ns, "DELETED", obj.clone());
        Some(obj)
    }

    fn get(&self, res: &str, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(res.to_string(), ns.to_string(), name.to_string()))
    }

    /// A watch of `res` (in `ns`, or everywhere): the changes after `from`, then the live ones.
    fn watch(&self, res: &str, ns: &str, from: u64) -> Body {
        let wanted = {
            let (res, ns) = (res.to_string(), ns.to_string());
            move |c: &Change| c.1 == res && (ns.is_empty() || c.2 == ns) && c.0 > from
        };
        let past: Vec<Change> = self.history.iter().filter(|c| wanted(c)).cloned().collect();
        let live = futures::stream::unfold(self.changes.subscribe(), |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(c) => return Some((c, rx)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return None,
                }
            }
        })
        .filter(move |c| std::future::ready(wanted(c)));
        StreamBody::new(
            futures::stream::iter(past)
                .chain(live)
                .map(|c| Ok(Frame::data(Bytes::from(format!("{}\n", c.3)))))
                .boxed(),
        )
    }

    fn answer(
        &mut self,
        method: &str,
        path: &str,
        query: &str,
        content_type: &str,
        body: &[u8],
    ) -> (u16, Body) {
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
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|q| q.strip_prefix(&format!("{name}=")))
                .map(percent_decode)
        };
        match (method, name) {
            ("GET", None) if param("watch").as_deref() == Some("true") => {
                let from = param("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                (200, self.watch(&res, &ns, from))
            }
            ("GET", None) => {
                let selector = param("labelSelector").unwrap_or_default();
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|((r, n, _), v)| {
                        *r == res && (ns.is_empty() || *n == ns) && selects(&selector, v)
                    })
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
            ("PATCH", Some(n)) if content_type.starts_with("application/apply-patch") => {
                let mut obj: Value = serde_json::from_slice(body).unwrap();
                obj["metadata"]["namespace"] = json!(ns);
                if let Some(old) = self.objects.get(&key(&n)) {
                    obj["metadata"]["uid"] = old["metadata"]["uid"].clone();
                }
                self.put(&res, obj);
                (200, once(self.objects[&key(&n)].clone()))
            }
            ("DELETE", Some(n)) => match self.remove(&res, &ns, &n) {
                Some(o) => (200, once(o)),
                None => (404, once(status(404, "NotFound"))),
            },
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
                            let content_type = req
                                .headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let (code, b) = store.lock().unwrap().answer(
                                &method,
                                &path,
                                &query,
                                &content_type,
                                &body,
                            );
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

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let s = self
            .netns
            .run(|| {
                std::net::TcpStream::connect_timeout(
                    &"127.0.0.1:9464".parse().unwrap(),
                    Duration::from_secs(1),
                )
            })
            .unwrap();
        s.ok().and_then(|s| http_get(s, path).ok())
    }

    fn metrics(&self) -> String {
        self.get("/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    fn readyz(&self) -> u16 {
        self.get("/readyz").map_or(0, |(c, _)| c)
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
    let kubeconfig = kubeconfig(&scratch, addr);

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

fn kubeconfig(scratch: &Scratch, addr: SocketAddr) -> std::path::PathBuf {
    let path = scratch.join("kubeconfig");
    std::fs::write(
        &path,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: http://{addr}\nusers:\n- name: mock\n  user: {{}}\ncontexts:\n- name: mock\n  context: {{cluster: mock, user: mock}}\ncurrent-context: mock\n"),
    )
    .unwrap();
    path
}

fn slice_doc(name: &str, node: &str) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop", "labels": {
            "kubernetes.io/service-name": "web",
            "endpointslice.kubernetes.io/managed-by": "keyway.io",
            "keyway.io/node": node}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["100.64.9.9"]}]})
}

/// The slices of service `web` in the store, as (name, addresses, node label).
fn web_slices(store: &Arc<Mutex<Store>>) -> Vec<(String, Vec<String>, String)> {
    let s = store.lock().unwrap();
    s.objects
        .iter()
        .filter(|((r, ns, _), v)| {
            r == "endpointslices"
                && ns == "shop"
                && v["metadata"]["labels"]["kubernetes.io/service-name"] == "web"
        })
        .map(|((_, _, n), v)| {
            (
                n.clone(),
                v["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| e["addresses"][0].as_str().unwrap().to_string())
                    .collect(),
                v["metadata"]["labels"]["keyway.io/node"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

#[test]
fn a_pod_added_on_a_cluster_gets_a_block_address_its_annotation_and_its_service_endpoint() {
    use keyway_conformance::cni_exec::{ConfList, Runtime};
    use keyway_conformance::harness::{DEBIAN_CNI_DIR, plugin_dir};
    let test =
        "a_pod_added_on_a_cluster_gets_a_block_address_its_annotation_and_its_service_endpoint";
    if !privileged(test) {
        return;
    }
    let scratch = Scratch::new("kubesvc");
    let node = TestNetns::new("kubesvc", "node");
    node.sh(&["ip", "link", "set", "lo", "up"]);
    let store = Arc::new(Mutex::new(Store::default()));
    {
        let mut s = store.lock().unwrap();
        for ns in ["keyway-system", "shop"] {
            s.put(
                "namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}}),
            );
        }
        s.put(
            "nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}}),
        );
        s.put("services", json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "uid": "uid-web",
                         "annotations": {"keyway.io/selector": "app=web"}},
            "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}));
        s.put("pods", json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "uid-web-1", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "web", "image": "agnhost"}]}}));
        // Left over: a slice of this node that no pod backs now, and one of a node that is gone.
        s.put("endpointslices", slice_doc("web-kw-stale", "node-1"));
        s.put("endpointslices", slice_doc("web-kw-gone", "node-gone"));
    }
    let (addr, _rt) = serve(&node, store.clone());
    let kubeconfig = kubeconfig(&scratch, addr);
    let mut agent = Agent::start(&node, &scratch, &kubeconfig, 1);
    eventually("/readyz 200", &agent, || agent.readyz() == 200);
    eventually("the stale slices removed", &agent, || {
        web_slices(&store).is_empty()
    });

    // ADD through Debian's bridge + host-local, then keyway-cni, as the runtime would.
    let list = ConfList::parse(
        &json!({
            "cniVersion": "1.0.0", "name": "kwkube",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.98.0.0/24"}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": scratch.join("ipam")}},
                {"type": "keyway", "agentSocket": scratch.join("agent.sock")}
            ]
        })
        .to_string(),
    );
    let pod = TestNetns::new("kubesvc", "web-1");
    let rt = Runtime {
        path: vec![
            plugin_dir(scratch.path()),
            std::path::PathBuf::from(DEBIAN_CNI_DIR),
        ],
        container_id: "cont-web-1".into(),
        netns: pod.path().display().to_string(),
        ifname: "eth0".into(),
        args: vec![
            ("IgnoreUnknown".into(), "1".into()),
            ("K8S_POD_NAMESPACE".into(), "shop".into()),
            ("K8S_POD_NAME".into(), "web-1".into()),
        ],
        node_netns: Some(node.name.clone()),
    };
    let (execs, result) = list.add(&rt);
    let result = result.unwrap_or_else(|| {
        panic!(
            "ADD failed: {execs:#?}\n{}",
            std::fs::read_to_string(&agent.log).unwrap_or_default()
        )
    });
    let overlay_ip = result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ip| ip["address"].as_str().unwrap())
        .find(|a| a.starts_with("100."))
        .expect("an overlay address in the result")
        .split('/')
        .next()
        .unwrap()
        .to_string();

    // The address comes from a block this node claimed through the API server.
    {
        let s = store.lock().unwrap();
        let blocks: Vec<&Value> = s
            .objects
            .iter()
            .filter(|((r, _, _), _)| r == "overlayblocks")
            .map(|(_, v)| v)
            .collect();
        assert!(!blocks.is_empty(), "a block claimed: {:#?}", s.log);
        assert!(
            blocks.iter().all(|b| b["spec"]["node"] == "node-1"),
            "{blocks:#?}"
        );
    }
    // The pod carries its place on the overlay, for every other agent.
    eventually("the pod's keyway.io/overlay annotation", &agent, || {
        let s = store.lock().unwrap();
        let ann =
            s.get("pods", "shop", "web-1").unwrap()["metadata"]["annotations"]["keyway.io/overlay"]
                .as_str()
                .map(|a| serde_json::from_str::<Value>(a).unwrap());
        ann.is_some_and(|a| a["node"] == "node-1" && a["overlayIps"][0] == overlay_ip.as_str())
    });
    // And the Service's name now resolves to it: this node's slice lists the overlay address.
    eventually("the Service's EndpointSlice", &agent, || {
        web_slices(&store)
            .iter()
            .any(|(_, a, n)| a == std::slice::from_ref(&overlay_ip) && n == "node-1")
    });
    {
        let s = store.lock().unwrap();
        let (name, slice) = s
            .objects
            .iter()
            .find(|((r, ns, _), _)| r == "endpointslices" && ns == "shop")
            .map(|((_, _, n), v)| (n.clone(), v.clone()))
            .unwrap();
        assert!(name.starts_with("web-kw-"), "{name}");
        assert_eq!(
            slice["ports"],
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
        );
        assert_eq!(slice["metadata"]["ownerReferences"][0]["uid"], "uid-web");
        assert_eq!(slice["endpoints"][0]["targetRef"]["name"], "web-1");
        assert_eq!(
            slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
            "keyway.io"
        );
    }
    let metrics = agent.metrics();
    assert!(
        metrics.contains("keyway_endpointslice_writes_total{op=\"apply\"} 1"),
        "{metrics}"
    );

    // DEL: the annotation is withdrawn and the slice goes with it.
    for e in list.del(&rt, Some(&result)) {
        assert_eq!(e.status, 0, "{e:?}");
    }
    eventually("the annotation withdrawn", &agent, || {
        let s = store.lock().unwrap();
        s.get("pods", "shop", "web-1").unwrap()["metadata"]["annotations"]
            .get("keyway.io/overlay")
            .is_none()
    });
    eventually("the slice deleted", &agent, || {
        web_slices(&store).is_empty()
    });
    agent.stop();
}
