//! An in-memory Kubernetes API server, for kube's real client: no API server can run on the
//! machines keyway is built on, so the `kubernetes` side of keyway is tested against this.
//!
//! It keeps objects and answers the way the API server does for what keyway uses: lists (with
//! label selectors), gets, creates (409 AlreadyExists when the name exists), merge patches (409
//! Conflict on a stale `metadata.resourceVersion`), server-side applies (an upsert: keyway is the
//! only field manager), deletes, and watches (every change after the requested resourceVersion,
//! then the live ones, the stream left open). On top of that a test can:
//! - script answers for a verb and path ([`FakeApi::script`]): served in order, the last one
//!   repeating, instead of the store's (an error, a 410 Gone, a watch that ends);
//! - slow answers down ([`FakeApi::slow`]), to show what waits for the API server and what does not;
//! - read every request and its status ([`FakeApi::requests`]).
//!
//! Serve it in process ([`FakeApi::client`], kube's `Client::new(service)` seam) or over HTTP on a
//! listener, for a real `keyway-agent` or `keyway-install` process ([`FakeApi::serve`] and
//! [`kubeconfig`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use serde_json::{Value, json};

/// A response body: one JSON document, or a watch's stream of events.
pub type Body = StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

/// A scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A status code and a JSON body.
    Json(u16, Value),
    /// A status code and a body as it is (not JSON, say).
    Text(u16, String),
    /// A watch stream: these events, then the stream ends, or stays open when `open`.
    Events { events: Vec<Value>, open: bool },
    /// The store's own answer (after scripted failures, say).
    Store,
}

/// One request the server answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `GET`, `WATCH` (a GET with `watch=true`), `POST`, `PATCH`, `PUT` or `DELETE`.
    pub verb: String,
    pub path: String,
    pub query: String,
    pub body: Value,
    pub status: u16,
}

impl Request {
    /// `"VERB path?query"`.
    pub fn line(&self) -> String {
        format!("{} {}?{}", self.verb, self.path, self.query)
    }

    /// A query parameter, percent-decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        param(&self.query, name)
    }
}

/// A change, as watches see it: (resourceVersion, resource, namespace, watch event).
type Change = (u64, String, String, Value);

type Slow = (Duration, Arc<dyn Fn(&str) -> bool + Send + Sync>);

struct State {
    /// (resource, namespace, name) → object; resources by their plural (`pods`).
    objects: BTreeMap<(String, String, String), Value>,
    rv: u64,
    history: Vec<Change>,
    changes: tokio::sync::broadcast::Sender<Change>,
    scripts: HashMap<(String, String), VecDeque<Reply>>,
    requests: Vec<Request>,
    slow: Option<Slow>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("objects", &self.objects.len())
            .field("rv", &self.rv)
            .finish_non_exhaustive()
    }
}

/// The server; clones share it.
#[derive(Debug, Clone)]
pub struct FakeApi(Arc<Mutex<State>>);

impl Default for FakeApi {
    fn default() -> FakeApi {
        FakeApi::new()
    }
}

/// A Kubernetes `Status` object.
pub fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
           "status": if code < 300 { "Success" } else { "Failure" },
           "reason": reason, "message": reason, "code": code})
}

/// A list of `items` at resourceVersion `rv`.
pub fn list(items: &[Value], rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items})
}

/// A watch event.
pub fn event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

/// A kubeconfig that points kube's client at `addr` over plain HTTP.
pub fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{addr}\"}}\n\
         users:\n- name: fake\n  user: {{token: fake}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
         current-context: fake\n"
    )
}

fn param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|q| q.strip_prefix(&format!("{name}=")))
        .map(percent_decode)
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
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `obj` matches an equality label selector (`a=b,c=d`).
fn selects(selector: &str, obj: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|t| {
        let (k, v) = t.split_once('=').unwrap_or((t, ""));
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

fn once(text: String) -> Body {
    StreamBody::new(futures::stream::iter([Ok(Frame::data(Bytes::from(text)))]).boxed())
}

fn events(events: Vec<Value>, open: bool) -> Body {
    let s = futures::stream::iter(
        events
            .into_iter()
            .map(|e| Ok(Frame::data(Bytes::from(format!("{e}\n")))))
            .collect::<Vec<_>>(),
    );
    let s: BoxStream<'static, _> = if open {
        s.chain(futures::stream::pending()).boxed()
    } else {
        s.boxed()
    };
    StreamBody::new(s)
}

/// (resource, namespace, name) from an API path; cluster-scoped names under
/// `/api/v1/namespaces/{name}` are namespaces.
fn parse_path(path: &str) -> Option<(String, String, Option<String>)> {
    let rest = path.strip_prefix("/api/v1/").or_else(|| {
        path.strip_prefix("/apis/")
            .and_then(|p| p.splitn(3, '/').nth(2))
    })?;
    let segs: Vec<&str> = rest.split('/').collect();
    Some(match segs.as_slice() {
        ["namespaces", ns, res] => (res.to_string(), ns.to_string(), None),
        ["namespaces", ns, res, name] => (res.to_string(), ns.to_string(), Some(name.to_string())),
        ["namespaces", name] => ("namespaces".into(), String::new(), Some(name.to_string())),
        [res] => (res.to_string(), String::new(), None),
        [res, name] => (res.to_string(), String::new(), Some(name.to_string())),
        _ => return None,
    })
}

impl FakeApi {
    pub fn new() -> FakeApi {
        FakeApi(Arc::new(Mutex::new(State {
            objects: BTreeMap::new(),
            rv: 0,
            history: Vec::new(),
            changes: tokio::sync::broadcast::channel(4096).0,
            scripts: HashMap::new(),
            requests: Vec::new(),
            slow: None,
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `obj` under `resource` (its plural: `pods`), as a create or an update: a new
    /// resourceVersion, and a watch event.
    pub fn put(&self, resource: &str, obj: Value) -> Value {
        self.state().put(resource, obj)
    }

    /// Removes an object (namespace `""` for cluster-scoped ones), with a watch event.
    pub fn remove(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.state().remove(resource, namespace, name)
    }

    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.state()
            .objects
            .get(&(resource.into(), namespace.into(), name.into()))
            .cloned()
    }

    /// Every object of `resource`, by namespace and name.
    pub fn objects(&self, resource: &str) -> Vec<Value> {
        self.state()
            .objects
            .iter()
            .filter(|((r, _, _), _)| r == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Answers `verb path` (verb as in [`Request::verb`]) with `reply` instead of the store's
    /// answer. Several replies are served in order; the last one repeats.
    pub fn script(&self, verb: &str, path: &str, reply: Reply) -> &Self {
        self.state()
            .scripts
            .entry((verb.to_string(), path.to_string()))
            .or_default()
            .push_back(reply);
        self
    }

    /// Delays the answer to every request whose verb `applies` to by `delay`.
    pub fn slow(&self, delay: Duration, applies: impl Fn(&str) -> bool + Send + Sync + 'static) {
        self.state().slow = Some((delay, Arc::new(applies)));
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state().requests.clone()
    }

    /// Every request answered so far, as `"VERB path?query"`.
    pub fn log(&self) -> Vec<String> {
        self.requests().iter().map(Request::line).collect()
    }

    /// How many answers had status `code`.
    pub fn answered(&self, code: u16) -> usize {
        self.state()
            .requests
            .iter()
            .filter(|r| r.status == code)
            .count()
    }

    /// Answers one request.
    pub async fn handle(&self, req: http::Request<impl hyper::body::Body>) -> http::Response<Body> {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let verb = if method == "GET" && param(&query, "watch").as_deref() == Some("true") {
            "WATCH".to_string()
        } else {
            method
        };
        let slow = self.state().slow.clone();
        if let Some((delay, applies)) = slow
            && applies(&verb)
        {
            tokio::time::sleep(delay).await;
        }
        let (code, answer) = {
            let mut s = self.state();
            let (code, answer) = s.answer(&verb, &path, &query, &content_type, &body);
            s.requests.push(Request {
                verb,
                path,
                query,
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                status: code,
            });
            (code, answer)
        };
        http::Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(answer)
            .expect("a valid response")
    }

    /// A kube client served by this server in process. Call it inside a tokio runtime (kube
    /// starts its buffer task on the current one).
    pub fn client(&self) -> kube::Client {
        let me = self.clone();
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.handle(req).await) }
        });
        kube::Client::new(svc, "default")
    }

    /// Serves HTTP/1.1 on `listener` (bound wherever the test wants it: inside a node's network
    /// namespace, say) on a runtime of its own, until the returned server is dropped.
    pub fn serve(&self, listener: std::net::TcpListener) -> Server {
        let addr = listener.local_addr().expect("a bound listener");
        listener.set_nonblocking(true).expect("non-blocking");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the fake API server");
        let me = self.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let me = me.clone();
                            async move { Ok::<_, Infallible>(me.handle(req).await) }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(conn), svc)
                        .await;
                });
            }
        });
        Server { addr, _rt: rt }
    }
}

/// A [`FakeApi`] served over HTTP; stops on drop.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

impl State {
    fn record(&mut self, res: &str, ns: &str, kind: &str, obj: Value) {
        let c = (self.rv, res.to_string(), ns.to_string(), event(kind, obj));
        self.history.push(c.clone());
        let _ = self.changes.send(c);
    }

    fn put(&mut self, res: &str, mut obj: Value) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if obj.pointer("/metadata/uid").is_none() {
            obj["metadata"]["uid"] = json!(format!("uid-{res}-{ns}-{name}"));
        }
        let key = (res.to_string(), ns.clone(), name);
        let kind = if self.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.objects.insert(key, obj.clone());
        self.record(res, &ns, kind, obj.clone());
        obj
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

    fn scripted(&mut self, verb: &str, path: &str) -> Option<Reply> {
        let q = self
            .scripts
            .get_mut(&(verb.to_string(), path.to_string()))?;
        if q.len() > 1 {
            q.pop_front()
        } else {
            q.front().cloned()
        }
    }

    fn answer(
        &mut self,
        verb: &str,
        path: &str,
        query: &str,
        content_type: &str,
        body: &[u8],
    ) -> (u16, Body) {
        match self.scripted(verb, path) {
            Some(Reply::Json(code, v)) => return (code, once(v.to_string())),
            Some(Reply::Text(code, t)) => return (code, once(t)),
            Some(Reply::Events { events: e, open }) => return (200, events(e, open)),
            Some(Reply::Store) | None => {}
        }
        let Some((res, ns, name)) = parse_path(path) else {
            return (404, once(status(404, "NotFound").to_string()));
        };
        let json = |code: u16, v: Value| (code, once(v.to_string()));
        let key = |n: &str| (res.clone(), ns.clone(), n.to_string());
        match (verb, name) {
            ("WATCH", None) => {
                let from = param(query, "resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                (200, self.watch(&res, &ns, from))
            }
            ("GET", None) => {
                let selector = param(query, "labelSelector").unwrap_or_default();
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|((r, n, _), v)| {
                        *r == res && (ns.is_empty() || *n == ns) && selects(&selector, v)
                    })
                    .map(|(_, v)| v.clone())
                    .collect();
                json(200, list(&items, &self.rv.to_string()))
            }
            ("GET", Some(n)) => match self.objects.get(&key(&n)) {
                Some(o) => json(200, o.clone()),
                None => json(404, status(404, "NotFound")),
            },
            ("POST", None) => {
                let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
                    return json(400, status(400, "BadRequest"));
                };
                let n = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if self.objects.contains_key(&key(&n)) {
                    return json(409, status(409, "AlreadyExists"));
                }
                if !ns.is_empty() {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                json(201, self.put(&res, obj))
            }
            ("PATCH", Some(n)) if content_type.starts_with("application/apply-patch") => {
                let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
                    return json(400, status(400, "BadRequest"));
                };
                if !ns.is_empty() {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                if let Some(old) = self.objects.get(&key(&n)) {
                    obj["metadata"]["uid"] = old["metadata"]["uid"].clone();
                }
                json(200, self.put(&res, obj))
            }
            ("PATCH", Some(n)) => {
                let Ok(patch) = serde_json::from_slice::<Value>(body) else {
                    return json(400, status(400, "BadRequest"));
                };
                let Some(mut obj) = self.objects.get(&key(&n)).cloned() else {
                    return json(404, status(404, "NotFound"));
                };
                if let Some(rv) = patch.pointer("/metadata/resourceVersion")
                    && Some(rv) != obj.pointer("/metadata/resourceVersion")
                {
                    return json(409, status(409, "Conflict"));
                }
                merge(&mut obj, &patch);
                json(200, self.put(&res, obj))
            }
            ("DELETE", Some(n)) => match self.remove(&res, &ns, &n) {
                Some(o) => json(200, o),
                None => json(404, status(404, "NotFound")),
            },
            _ => json(405, status(405, "MethodNotAllowed")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ConfigMap, Pod};
    use kube::Api;
    use kube::api::{ListParams, Patch, PatchParams, PostParams};

    fn pod(name: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "x", "labels": labels}})
    }

    #[tokio::test]
    async fn kube_reads_and_writes_through_it_with_the_api_servers_answers() {
        let api = FakeApi::new();
        api.put("pods", pod("a", json!({"app": "a"})));
        api.put("pods", pod("b", json!({"app": "b"})));
        let pods: Api<Pod> = Api::namespaced(api.client(), "x");
        let listed = pods
            .list(&ListParams::default().labels("app=b"))
            .await
            .unwrap();
        assert_eq!(listed.items.len(), 1, "the label selector applies");
        let cms: Api<ConfigMap> = Api::namespaced(api.client(), "x");
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": "c"}, "data": {"k": "v"}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
        let again = cms.create(&PostParams::default(), &cm).await.unwrap_err();
        assert!(matches!(again, kube::Error::Api(s) if s.code == 409));
        let stale = json!({"metadata": {"resourceVersion": "1"}, "data": {"k": "w"}});
        let e = cms
            .patch("c", &PatchParams::default(), &Patch::Merge(&stale))
            .await
            .unwrap_err();
        assert!(matches!(e, kube::Error::Api(s) if s.code == 409));
        assert_eq!(api.answered(409), 2);
        assert!(api.get("configmaps", "x", "c").is_some());
        assert_eq!(
            api.log()[0],
            "GET /api/v1/namespaces/x/pods?&labelSelector=app%3Db"
        );
    }

    #[tokio::test]
    async fn scripted_answers_come_first_in_order_and_the_last_repeats() {
        let api = FakeApi::new();
        api.put("pods", pod("a", json!({})));
        api.script(
            "GET",
            "/api/v1/namespaces/x/pods/a",
            Reply::Json(503, status(503, "ServiceUnavailable")),
        );
        api.script(
            "GET",
            "/api/v1/namespaces/x/pods/a",
            Reply::Text(200, "{not json".into()),
        );
        let pods: Api<Pod> = Api::namespaced(api.client(), "x");
        assert!(matches!(pods.get("a").await, Err(kube::Error::Api(s)) if s.code == 503));
        for _ in 0..2 {
            assert!(pods.get("a").await.is_err(), "the last reply repeats");
        }
    }

    #[tokio::test]
    async fn slow_answers_wait_for_their_verb_only() {
        let api = FakeApi::new();
        api.slow(Duration::from_millis(300), |verb| verb == "POST");
        let pods: Api<Pod> = Api::namespaced(api.client(), "x");
        let t = std::time::Instant::now();
        pods.list(&ListParams::default()).await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(300));
        let p: Pod = serde_json::from_value(pod("n", json!({}))).unwrap();
        pods.create(&PostParams::default(), &p).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(300));
    }
}
