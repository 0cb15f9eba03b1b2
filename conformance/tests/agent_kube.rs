//! The real `keyway-agent` binary with `--source kubernetes`, in a node namespace, talking HTTP to
//! the in-memory API server (the only kind that runs here) through a kubeconfig, as it would in the
//! DaemonSet: it waits for every list before it is ready, creates the cluster secret once (a
//! restarted agent reads it back), lifts the node's `keyway.io/not-ready` taint once ready, gives
//! a pod an address from a block it claimed, publishes it and its Service's EndpointSlice — and a
//! pod's ADD does not wait for the API server, however slow it is.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keyway_conformance::cni_exec::{ConfList, Runtime};
use keyway_conformance::harness::{DEBIAN_CNI_DIR, bin, debug_get, plugin_dir, tcp_get};
use keyway_testing::fake_api::{Server, kubeconfig};
use keyway_testing::{FakeApi, Scratch, TestNetns, eventually_or, privileged};
use serde_json::{Value, json};

/// Serves `api` on a listener bound inside `netns`.
fn serve(netns: &TestNetns, api: &FakeApi) -> Server {
    let listener = netns
        .netns()
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    api.serve(listener)
}

/// A kubeconfig file for `server`.
fn kubeconfig_file(scratch: &Scratch, server: &Server) -> std::path::PathBuf {
    let path = scratch.join("kubeconfig");
    std::fs::write(&path, kubeconfig(server.addr)).unwrap();
    path
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
        s.ok().and_then(|s| tcp_get(s, path).ok())
    }

    fn metrics(&self) -> String {
        self.get("/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    fn readyz(&self) -> u16 {
        self.get("/readyz").map_or(0, |(c, _)| c)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `within` for `f`, showing the agent's log if it never holds.
    fn until(&self, what: &str, within: Duration, f: impl FnMut() -> bool) {
        eventually_or(what, within, f, || {
            format!("the agent's log:\n{}", self.log())
        });
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

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}})
}

const WAIT: Duration = Duration::from_secs(15);

/// An API server with keyway's namespace, `shop`, node-1 and these pods of `shop` on node-1.
fn cluster_with_pods(pods: &[&str]) -> FakeApi {
    let api = FakeApi::new();
    for ns in ["keyway-system", "shop"] {
        api.put("namespaces", namespace(ns));
    }
    api.put(
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}}),
    );
    for p in pods {
        api.put("pods", json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p, "namespace": "shop", "uid": format!("uid-{p}"), "labels": {"app": "web"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "web", "image": "agnhost"}]}}));
    }
    api
}

/// Debian's bridge + host-local, then keyway, as a node's conflist would chain them.
fn chain(scratch: &Scratch) -> ConfList {
    ConfList::parse(
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
    )
}

/// The runtime's side of an ADD or DEL of pod `shop/name` in namespace `pod`.
fn runtime(scratch: &Scratch, node: &TestNetns, pod: &TestNetns, name: &str) -> Runtime {
    Runtime {
        path: vec![
            plugin_dir(scratch.path()),
            std::path::PathBuf::from(DEBIAN_CNI_DIR),
        ],
        container_id: format!("cont-{name}"),
        netns: pod.path().display().to_string(),
        ifname: "eth0".into(),
        args: vec![
            ("IgnoreUnknown".into(), "1".into()),
            ("K8S_POD_NAMESPACE".into(), "shop".into()),
            ("K8S_POD_NAME".into(), name.into()),
        ],
        node_netns: Some(node.name.clone()),
    }
}

/// The pod's `keyway.io/overlay` annotation, parsed.
fn annotation(api: &FakeApi, pod: &str) -> Option<Value> {
    let p = api.get("pods", "shop", pod)?;
    let a = p["metadata"]["annotations"]["keyway.io/overlay"].as_str()?;
    serde_json::from_str(a).ok()
}

#[test]
fn on_a_cluster_the_agent_syncs_makes_the_secret_once_and_lifts_the_taint() {
    if !privileged("on_a_cluster_the_agent_syncs_makes_the_secret_once_and_lifts_the_taint") {
        return;
    }
    let scratch = Scratch::new("agentkube");
    let node = TestNetns::new("agentkube", "node");
    let api = FakeApi::new();
    api.put("namespaces", namespace("keyway-system"));
    api.put("nodes", json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
        "spec": {"taints": [{"key": "keyway.io/not-ready", "effect": "NoSchedule"},
                            {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]},
        "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}}));
    let server = serve(&node, &api);
    let kubeconfig = kubeconfig_file(&scratch, &server);

    let mut agent = Agent::start(&node, &scratch, &kubeconfig, 1);
    agent.until("/readyz 200", WAIT, || agent.readyz() == 200);
    let log = agent.log();
    assert!(log.contains("every kind listed"), "{log}");
    let requests = api.log();
    for list in [
        "/api/v1/pods?",
        "/api/v1/namespaces?",
        "/api/v1/nodes?",
        "/apis/networking.k8s.io/v1/networkpolicies?",
        "/apis/keyway.io/v1alpha1/clusterconfigs?",
    ] {
        assert!(
            requests
                .iter()
                .any(|l| l.starts_with(&format!("GET {list}"))),
            "listed {list}: {requests:#?}"
        );
    }
    let secret = api
        .get("secrets", "keyway-system", "keyway-cluster-secret")
        .expect("the secret was created");
    assert_eq!(
        secret["data"]["secret"].as_str().unwrap().len(),
        44,
        "32 bytes, base64"
    );
    agent.until("the taint lifted", WAIT, || {
        let taints = &api.get("nodes", "", "node-1").unwrap()["spec"]["taints"];
        taints
            .as_array()
            .is_some_and(|t| t.len() == 1 && t[0]["key"] == "node-role.kubernetes.io/control-plane")
    });

    // A restarted agent reads the same secret back; nothing creates a second one.
    agent.stop();
    let agent = Agent::start(&node, &scratch, &kubeconfig, 2);
    agent.until("/readyz 200 after a restart", WAIT, || {
        agent.readyz() == 200
    });
    let requests = api.log();
    let creates = requests
        .iter()
        .filter(|l| l.starts_with("POST /api/v1/namespaces/keyway-system/secrets"))
        .count();
    assert_eq!(creates, 1, "{requests:#?}");
    assert_eq!(
        api.get("secrets", "keyway-system", "keyway-cluster-secret"),
        Some(secret)
    );
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
fn web_slices(api: &FakeApi) -> Vec<(String, Vec<String>, String)> {
    api.objects("endpointslices")
        .iter()
        .filter(|v| {
            v["metadata"]["namespace"] == "shop"
                && v["metadata"]["labels"]["kubernetes.io/service-name"] == "web"
        })
        .map(|v| {
            (
                v["metadata"]["name"].as_str().unwrap().to_string(),
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
    let test =
        "a_pod_added_on_a_cluster_gets_a_block_address_its_annotation_and_its_service_endpoint";
    if !privileged(test) {
        return;
    }
    let scratch = Scratch::new("kubesvc");
    let node = TestNetns::new("kubesvc", "node");
    let api = cluster_with_pods(&["web-1"]);
    api.put("services", json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop", "uid": "uid-web",
                     "annotations": {"keyway.io/selector": "app=web"}},
        "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}));
    // Left over: a slice of this node that no pod backs now, and one of a node that is gone.
    api.put("endpointslices", slice_doc("web-kw-stale", "node-1"));
    api.put("endpointslices", slice_doc("web-kw-gone", "node-gone"));
    let server = serve(&node, &api);
    let kubeconfig = kubeconfig_file(&scratch, &server);
    let mut agent = Agent::start(&node, &scratch, &kubeconfig, 1);
    agent.until("/readyz 200", WAIT, || agent.readyz() == 200);
    agent.until("the stale slices removed", WAIT, || {
        web_slices(&api).is_empty()
    });

    // ADD through Debian's bridge + host-local, then keyway-cni, as the runtime would.
    let list = chain(&scratch);
    let pod = TestNetns::new("kubesvc", "web-1");
    let rt = runtime(&scratch, &node, &pod, "web-1");
    let (execs, result) = list.add(&rt);
    let result = result.unwrap_or_else(|| panic!("ADD failed: {execs:#?}\n{}", agent.log()));
    let attachments = debug_get(&scratch.join("agent.sock"), "/debug/attachments")
        .expect("the local admin socket")
        .1;
    let attachments: Value = serde_json::from_str(&attachments).unwrap();
    let overlay_ip = attachments["attachments"][0]["overlayIps"][0]
        .as_str()
        .expect("an overlay address")
        .to_string();
    assert!(overlay_ip.starts_with("100."), "{overlay_ip}");

    // The address comes from a block this node claimed through the API server.
    let blocks = api.objects("overlayblocks");
    assert!(!blocks.is_empty(), "a block claimed: {:#?}", api.log());
    assert!(
        blocks.iter().all(|b| b["spec"]["node"] == "node-1"),
        "{blocks:#?}"
    );
    // The pod carries its place on the overlay, for every other agent.
    agent.until("the pod's keyway.io/overlay annotation", WAIT, || {
        annotation(&api, "web-1")
            .is_some_and(|a| a["node"] == "node-1" && a["overlayIps"][0] == overlay_ip.as_str())
    });
    // And the Service's name now resolves to it: this node's slice lists the overlay address.
    agent.until("the Service's EndpointSlice", WAIT, || {
        web_slices(&api)
            .iter()
            .any(|(_, a, n)| a == std::slice::from_ref(&overlay_ip) && n == "node-1")
    });
    {
        let slice = api.objects("endpointslices").remove(0);
        let name = slice["metadata"]["name"].as_str().unwrap();
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
    // The agent counts a write once the API server has answered it, which can be just after
    // the slice shows there.
    let one_apply = "keyway_endpointslice_writes_total{op=\"apply\"} 1\n";
    agent.until("the apply counted", WAIT, || {
        agent.metrics().contains(one_apply)
    });

    // DEL: the annotation is withdrawn and the slice goes with it.
    for e in list.del(&rt, Some(&result)) {
        assert_eq!(e.status, 0, "{e:?}");
    }
    agent.until("the annotation withdrawn", WAIT, || {
        annotation(&api, "web-1").is_none()
    });
    agent.until("the slice deleted", WAIT, || web_slices(&api).is_empty());
    // Nothing was written again while the slice stood unchanged.
    let metrics = agent.metrics();
    assert!(metrics.contains(one_apply), "{metrics}");
    agent.stop();
}

/// A run of ADDs: keyway-cni's own times, and what they ran against (dropped in this order).
struct Run {
    times: Vec<f64>,
    agent: Agent,
    api: FakeApi,
    _server: Server,
    _node: TestNetns,
    _scratch: Scratch,
}

/// ADD then DEL of `n` pods, one after another, on a fresh agent whose API server answers
/// everything but watches after `delay`.
fn add_times(test: &str, n: usize, delay: Duration) -> Run {
    let scratch = Scratch::new(test);
    let node = TestNetns::new(test, "node");
    let names: Vec<String> = (0..n).map(|i| format!("web-{i}")).collect();
    let api = cluster_with_pods(&names.iter().map(String::as_str).collect::<Vec<_>>());
    if !delay.is_zero() {
        api.slow(delay, |verb| verb != "WATCH");
    }
    let server = serve(&node, &api);
    let kubeconfig = kubeconfig_file(&scratch, &server);
    let agent = Agent::start(&node, &scratch, &kubeconfig, 1);
    agent.until("/readyz 200", Duration::from_secs(60), || {
        agent.readyz() == 200
    });
    let list = chain(&scratch);
    let mut times = Vec::new();
    for name in &names {
        let pod = TestNetns::new(test, name);
        let rt = runtime(&scratch, &node, &pod, name);
        let (execs, result) = list.add(&rt);
        assert!(result.is_some(), "ADD failed: {execs:#?}\n{}", agent.log());
        times.push(
            execs
                .iter()
                .find(|e| e.plugin == "keyway")
                .unwrap()
                .elapsed_ms,
        );
        for e in list.del(&rt, result.as_ref()) {
            assert_eq!(e.status, 0, "{e:?}");
        }
    }
    Run {
        times,
        agent,
        api,
        _server: server,
        _node: node,
        _scratch: scratch,
    }
}

fn p50(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn an_add_does_not_wait_for_a_slow_api_server() {
    let test = "an_add_does_not_wait_for_a_slow_api_server";
    if !privileged(test) {
        return;
    }
    const PODS: usize = 8;
    let fast = add_times("kwslow-f", PODS, Duration::ZERO).times;
    let slow = add_times("kwslow-s", PODS, Duration::from_secs(2));
    let (f, s) = (p50(&fast), p50(&slow.times));
    eprintln!(
        "keyway-cni ADD p50: {f:.1} ms with an API server that answers at once, {s:.1} ms with one that answers after 2 s"
    );
    assert!(
        s < f * 1.5 + 50.0,
        "ADD waited for the API server: p50 {s:.1} ms against {f:.1} ms ({:?} against {fast:?})",
        slow.times
    );
    // The API work still happened, in the background: the first pod was published.
    let api = &slow.api;
    slow.agent.until(
        "a pod published through the slow API server",
        Duration::from_secs(30),
        || {
            api.log()
                .iter()
                .any(|l| l.starts_with("PATCH /api/v1/namespaces/shop/pods/web-0"))
        },
    );
}
