//! Test harness: the workspace's binaries, scratch directories, and a `keyway-agent` process per
//! test inside a "node" network namespace of the test's own, so nothing touches the host's network.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyway_testing::Scratch;

/// Where Debian's `containernetworking-plugins` put the reference plugins.
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

/// The directory holding the workspace's binaries for the profile in use
/// (`target/x86_64-unknown-linux-gnu/<profile>`, as `.cargo/config.toml` builds them): a test
/// executable lives in its `deps/`, a binary in it directly.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent()
            .expect("target/<triple>/<profile>")
            .to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A workspace binary (statically linked, so the images can hold it too); panics with what to do
/// when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace --bins`, with --release for release tests; `make test` does)",
        p.display()
    );
    p
}

/// The `keyway-agnhost` for the lab's images: the workspace's, or one named by
/// `KEYWAY_LAB_AGNHOST`.
pub fn agnhost() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYWAY_LAB_AGNHOST") {
        return PathBuf::from(p);
    }
    bin("keyway-agnhost")
}

/// A CNI bin directory under `dir` holding the plugin under the name runtimes execute: the
/// conflist's `"type": "keyway"` (the installer copies `keyway-cni` there as `keyway`).
pub fn plugin_dir(dir: &Path) -> PathBuf {
    let d = dir.join("cni-bin");
    std::fs::create_dir_all(&d).unwrap();
    let link = d.join("keyway");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(bin("keyway-cni"), &link).unwrap();
    d
}

/// A plain HTTP/1.0 GET over a connected stream.
pub fn http_get<S: Read + Write>(stream: S, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = stream;
    write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// GETs `path` from the agent's local admin socket (debug detail lives only there), found next
/// to its handoff socket `handoff`.
pub fn debug_get(handoff: &Path, path: &str) -> std::io::Result<(u16, String)> {
    let s = std::os::unix::net::UnixStream::connect(handoff.with_extension("debug.sock"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    http_get(s, path)
}

/// GETs `path` from an agent's network admin server, over `stream`.
pub fn tcp_get(stream: TcpStream, path: &str) -> std::io::Result<(u16, String)> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    http_get(stream, path)
}

/// A `keyway-agent` running in a node namespace.
#[derive(Debug)]
pub struct AgentProc {
    pub node: String,
    pub netns_name: String,
    netns: keyway_sap::sys::Netns,
    pub source: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub secret: PathBuf,
    pub admin: SocketAddr,
    pub log: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl AgentProc {
    /// Starts an agent for `node` inside the named namespace `netns`, its files under `dir`, and
    /// waits until it is ready.
    pub fn start(netns: &str, node: &str, dir: &Path, extra: &[&str]) -> AgentProc {
        let source = dir.join("state-source");
        std::fs::create_dir_all(&source).unwrap();
        let secret = dir.join("cluster-secret");
        if !secret.exists() {
            keyway_sap::io::fs::write_atomic(&secret, b"conformance tests share this 32B!", 0o600)
                .unwrap();
        }
        let mut a = AgentProc {
            node: node.to_string(),
            netns_name: netns.to_string(),
            netns: keyway_sap::sys::Netns::open(format!("/var/run/netns/{netns}"))
                .expect("node namespace"),
            source,
            state: dir.join(format!("agent-{node}")),
            socket: dir.join(format!("agent-{node}.sock")),
            secret,
            admin: "127.0.0.1:9464".parse().unwrap(),
            log: dir.join(format!("agent-{node}.log")),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns_name])
            .arg(bin("keyway-agent"))
            .args(["--node-name", &self.node])
            .arg("--source")
            .arg(format!("file:{}", self.source.display()))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--secret-file")
            .arg(&self.secret)
            .args(["--admin", &self.admin.to_string()])
            .args(&self.extra)
            .env(
                "RUST_LOG",
                std::env::var("KEYWAY_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("start keyway-agent"));
        self.wait_ready(Duration::from_secs(15));
    }

    /// GETs a path of the admin server (from inside the node's namespace).
    pub fn get(&self, path: &str) -> (u16, String) {
        let admin = self.admin;
        let stream = self
            .netns
            .run(|| TcpStream::connect_timeout(&admin, Duration::from_secs(2)))
            .unwrap();
        match stream {
            Ok(s) => tcp_get(s, path).unwrap_or((0, String::new())),
            Err(_) => (0, String::new()),
        }
    }

    pub fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.get("/readyz").0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "keyway-agent for {} did not become ready; its log:\n{}",
            self.node,
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics").1
    }

    /// One sample of a metric (`name{labels}` exactly as exported), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    pub fn attachments(&self) -> serde_json::Value {
        let body = debug_get(&self.socket, "/debug/attachments").map(|(_, b)| b);
        serde_json::from_str(&body.unwrap_or_default()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no chance to clean up, as a crash or an OOM kill.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the agent again with the same directories and waits until it is ready.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Writes a document into the agent's state source.
    pub fn apply(&self, name: &str, yaml: &str) {
        keyway_sap::io::fs::write_atomic(&self.source.join(name), yaml.as_bytes(), 0o644).unwrap();
    }

    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.source.join(name));
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A pod document for the state source.
pub fn pod_yaml(namespace: &str, name: &str, node: &str, labels: &[(&str, &str)]) -> String {
    let labels: String = labels.iter().map(|(k, v)| format!("{k}: {v}, ")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: c, image: agnhost}}]\n"
    )
}

/// The same pod once kubelet reported its IP (`status.podIPs`), as every agent checks another
/// node's attachment against.
pub fn pod_yaml_running(
    namespace: &str,
    name: &str,
    node: &str,
    labels: &[(&str, &str)],
    ip: &str,
) -> String {
    format!(
        "{}status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n",
        pod_yaml(namespace, name, node, labels)
    )
}

/// A simulated cluster for a test: nodes on an underlay, a `keyway-agent` on each sharing one
/// state source, and pods made through the real chain (bridge + host-local + keyway).
#[derive(Debug)]
pub struct TestCluster {
    pub test: String,
    pub agents: Vec<AgentProc>,
    pub nodes: Vec<crate::topology::SimNode>,
    plugin_dir: PathBuf,
    _plan: crate::topology::Guard,
    pub scratch: Scratch,
}

/// A pod of a [`TestCluster`]: its namespace, its chain's result and overlay address.
#[derive(Debug)]
pub struct TestPod {
    pub netns: keyway_testing::TestNetns,
    pub namespace: String,
    pub name: String,
    pub node: usize,
    pub rt: crate::cni_exec::Runtime,
    pub list: crate::cni_exec::ConfList,
    pub result: serde_json::Value,
    pub overlay_ip: String,
    pub infra_ip: String,
    /// How long keyway-cni's own ADD took.
    pub add_keyway_ms: f64,
}

fn ip_of(result: &serde_json::Value, iface: &str) -> String {
    let ifaces = result["interfaces"].as_array().cloned().unwrap_or_default();
    let idx = ifaces
        .iter()
        .position(|i| i["name"] == iface)
        .expect("interface in result");
    let ip = result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|ip| ip["interface"] == idx)
        .expect("ip of interface");
    ip["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

impl TestCluster {
    /// `octet` keeps concurrent tests' addresses apart (pods 10.<octet>.<node>.0/24, underlay
    /// 192.168.<octet>.0/24).
    pub fn new(test: &str, nodes: usize, octet: u8) -> TestCluster {
        let scratch = Scratch::new(test);
        let plan = crate::topology::Plan {
            prefix: format!("kwt{test}"),
            nodes,
            pod_octet: octet,
            underlay_octet: octet,
        };
        let guard = crate::topology::Guard::create(plan.clone());
        let sim = plan.all_nodes();
        let mut agents = Vec::new();
        for n in &sim {
            let source = scratch.join("state-source");
            std::fs::create_dir_all(&source).unwrap();
            std::fs::write(source.join(format!("{}.yaml", n.name)), n.node_yaml()).unwrap();
            agents.push(AgentProc::start(
                &n.netns,
                &n.name,
                scratch.path(),
                &["--node-ip", &n.ip.to_string()],
            ));
        }
        let plugin_dir = plugin_dir(scratch.path());
        TestCluster {
            test: test.to_string(),
            agents,
            nodes: sim,
            plugin_dir,
            _plan: guard,
            scratch,
        }
    }

    pub fn agent(&self, node: usize) -> &AgentProc {
        &self.agents[node - 1]
    }

    pub fn agent_mut(&mut self, node: usize) -> &mut AgentProc {
        &mut self.agents[node - 1]
    }

    /// Writes a document into the shared state source.
    pub fn apply(&self, name: &str, yaml: &str) {
        self.agents[0].apply(name, yaml);
    }

    pub fn remove(&self, name: &str) {
        self.agents[0].remove(name);
    }

    /// Creates a pod on `node` through the chain, as a runtime would, after publishing its object.
    pub fn pod(
        &self,
        node: usize,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> TestPod {
        let n = &self.nodes[node - 1];
        self.apply(
            &format!("pod-{namespace}-{name}.yaml"),
            &pod_yaml(namespace, name, &n.name, labels),
        );
        let netns = keyway_testing::TestNetns::new(&self.test, name);
        let list = crate::cni_exec::ConfList::parse(
            &n.conflist(
                "1.0.0",
                &self.agent(node).socket.display().to_string(),
                &self
                    .scratch
                    .join(format!("ipam-{}", n.name))
                    .display()
                    .to_string(),
                true,
            )
            .to_string(),
        );
        let rt = crate::cni_exec::Runtime {
            path: vec![self.plugin_dir.clone(), PathBuf::from(DEBIAN_CNI_DIR)],
            container_id: format!("{}-{namespace}-{name}", self.test),
            netns: netns.path().display().to_string(),
            ifname: "eth0".into(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), namespace.into()),
                ("K8S_POD_NAME".into(), name.into()),
            ],
            node_netns: Some(n.netns.clone()),
        };
        let (execs, result) = list.add(&rt);
        for e in &execs {
            assert_eq!(
                e.status, 0,
                "ADD of {namespace}/{name}: {} failed: {}{}",
                e.plugin, e.stdout, e.stderr
            );
        }
        let result = result.unwrap();
        let infra_ip = ip_of(&result, "eth0");
        self.apply(
            &format!("pod-{namespace}-{name}.yaml"),
            &pod_yaml_running(namespace, name, &n.name, labels, &infra_ip),
        );
        let add_keyway_ms = execs
            .iter()
            .find(|e| e.plugin == "keyway")
            .map_or(0.0, |e| e.elapsed_ms);
        TestPod {
            add_keyway_ms,
            overlay_ip: self.overlay_ip(node, &rt.container_id),
            infra_ip,
            netns,
            namespace: namespace.into(),
            name: name.into(),
            node,
            rt,
            list,
            result,
        }
    }

    /// The overlay address the agent of `node` gave an attachment (the plugin's result names the
    /// device, not the address: see cni-plugin/README.md).
    fn overlay_ip(&self, node: usize, container_id: &str) -> String {
        let att = self.agent(node).attachments();
        att["attachments"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["containerId"] == container_id)
            .and_then(|a| a["overlayIps"][0].as_str())
            .unwrap_or_else(|| panic!("{container_id} has no overlay address: {att}"))
            .to_string()
    }

    /// Deletes a pod through the chain (DEL in reverse order) and removes its object.
    pub fn delete(&self, pod: &TestPod) {
        for e in pod.list.del(&pod.rt, Some(&pod.result)) {
            assert_eq!(e.status, 0, "DEL {}: {}{}", e.plugin, e.stdout, e.stderr);
        }
        self.remove(&format!("pod-{}-{}.yaml", pod.namespace, pod.name));
    }
}

impl TestPod {
    /// `ping` from this pod; true when every echo is answered.
    pub fn ping(&self, to: &str, count: u32) -> bool {
        self.netns
            .exec(&["ping", "-c", &count.to_string(), "-i", "0.2", "-W", "1", to])
            .status
            .success()
    }

    /// `ping` from this pod's `eth0` (SO_BINDTODEVICE), around keyway's steering, as a workload
    /// trying to bypass it would.
    pub fn ping_bypassing(&self, to: &str, count: u32) -> bool {
        self.netns
            .exec(&[
                "ping",
                "-I",
                "eth0",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "1",
                to,
            ])
            .status
            .success()
    }

    /// The packets the pod's table dropped as service traffic that did not come over the overlay.
    pub fn bypass_drops(&self) -> u64 {
        let table = self
            .netns
            .sh(&["nft", "list", "chain", "inet", "keyway", "input"]);
        table
            .lines()
            .find(|l| l.contains("did not come over the overlay"))
            .and_then(|l| l.split("packets ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// A UDP exchange with `to:port`, where `server` listens (on all its addresses): one
    /// datagram there from a new port of this pod's, and its echo back.
    pub fn udp(&self, server: &TestPod, to: &str, port: u16) -> Result<(), String> {
        use std::net::UdpSocket;
        let listener = server
            .netns
            .netns()
            .run(|| UdpSocket::bind(("0.0.0.0", port)))
            .unwrap()
            .map_err(|e| e.to_string())?;
        listener
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let srv = std::thread::spawn(move || {
            let mut b = [0u8; 16];
            if let Ok((n, from)) = listener.recv_from(&mut b) {
                let _ = listener.send_to(&b[..n], from);
            }
        });
        let addr: SocketAddr = format!("{to}:{port}").parse().unwrap();
        let r = self
            .netns
            .netns()
            .run(|| UdpSocket::bind(("0.0.0.0", 0)))
            .unwrap()
            .map_err(|e| e.to_string())
            .and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                s.send_to(b"keyway", addr).map_err(|e| e.to_string())?;
                let mut b = [0u8; 16];
                match s.recv_from(&mut b) {
                    Ok((6, from)) if from == addr && &b[..6] == b"keyway" => Ok(()),
                    Ok((n, from)) => Err(format!("{n} bytes from {from}")),
                    Err(e) => Err(e.to_string()),
                }
            });
        let _ = srv.join();
        r
    }

    /// A TCP exchange with `to:port` (IPv4 or IPv6), where `server` listens (on all its
    /// addresses of that version).
    pub fn tcp(&self, server: &TestPod, to: &str, port: u16) -> Result<(), String> {
        use std::net::{TcpListener, TcpStream};
        let to: IpAddr = to.parse().map_err(|e| format!("{to}: {e}"))?;
        let (any, local): (IpAddr, IpAddr) = if to.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED.into(), Ipv6Addr::LOCALHOST.into())
        } else {
            (Ipv4Addr::UNSPECIFIED.into(), Ipv4Addr::LOCALHOST.into())
        };
        let listener = server
            .netns
            .netns()
            .run(|| TcpListener::bind((any, port)))
            .unwrap()
            .map_err(|e| e.to_string())?;
        let srv = std::thread::spawn(move || {
            listener.set_nonblocking(false).ok();
            if let Ok((mut s, _)) = listener.accept() {
                let mut b = [0u8; 16];
                let n = s.read(&mut b).unwrap_or(0);
                let _ = s.write_all(&b[..n]);
            }
        });
        let addr = SocketAddr::new(to, port);
        let r = self
            .netns
            .netns()
            .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
            .unwrap()
            .map_err(|e| e.to_string())
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                s.write_all(b"keyway").map_err(|e| e.to_string())?;
                let mut b = [0u8; 6];
                s.read_exact(&mut b).map_err(|e| e.to_string())?;
                Ok(())
            });
        if r.is_err() {
            // Unblock the accept from inside the server's own namespace.
            let _ = server
                .netns
                .netns()
                .run(|| TcpStream::connect((local, port)));
        }
        let _ = srv.join();
        r
    }
}
