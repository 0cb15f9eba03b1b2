//! Istio ambient in the lab, as a cluster with Istio's ambient profile would have it, without
//! istiod: a real ztunnel per node in shared (in-pod) mode, fed by a ZDS server that hands it each
//! ambient pod's network namespace (what istio-cni's node agent does), a static workload file
//! instead of xDS, Istio's in-pod redirection in each ambient pod's namespace, and the node's SNAT
//! of kubelet's probes to Istio's probe address. keyway runs underneath, unchanged.
//!
//! The redirection follows what Istio's CNI installs in a pod (istio/istio `cni/pkg/iptables`),
//! written here as one nftables table: the pod's outbound TCP to ztunnel's 15001, inbound TCP
//! (but HBONE's 15008 and the probes) to 15006, DNS to 15053; ztunnel's own sockets carry the mark
//! 0x539, and a connection ztunnel opens to deliver inside the pod gets the conntrack mark 0x111,
//! whose replies go back to ztunnel through routing table 100 (`local` everything).

use std::collections::BTreeMap;
use std::io::{IoSlice, Read};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
use prost::Message;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::lab::{Lab, PodState};
use crate::topology::in_ns;

/// The namespace label that enrols a namespace's pods in ambient, as Istio reads it.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Its value for ambient.
pub const AMBIENT: &str = "ambient";
/// The source address Istio's CNI gives kubelet's probes of ambient pods.
pub const PROBE_SOURCE: &str = "169.254.7.127";
/// ztunnel's HBONE port.
pub const HBONE_PORT: u16 = 15008;

/// Where the real ztunnel is: `ZTUNNEL` (a path), then `PATH`, then the test machines'
/// `../shared/ztunnel/` next to the workspace. `None` when it is nowhere.
pub fn find_ztunnel() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ZTUNNEL") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("ztunnel"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/ztunnel/ztunnel");
        shared.is_file().then_some(shared)
    })
}

/// How to get a ztunnel when [`find_ztunnel`] finds none.
pub const BUILD_ZTUNNEL: &str = "no ztunnel: set ZTUNNEL to its path, or build istio/ztunnel with \
    `cargo build --release --no-default-features --features tls-ring,testing` (docs/ambient.md)";

/// The ZDS protocol's messages (istio/ztunnel `proto/zds.proto`, package `istio.workload.zds`).
mod zds {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WorkloadInfo {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        #[prost(string, tag = "3")]
        pub service_account: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AddWorkload {
        #[prost(string, tag = "1")]
        pub uid: String,
        #[prost(message, optional, tag = "2")]
        pub workload_info: Option<WorkloadInfo>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DelWorkload {
        #[prost(string, tag = "2")]
        pub uid: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SnapshotSent {}

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Request {
        #[prost(message, tag = "1")]
        Add(AddWorkload),
        #[prost(message, tag = "2")]
        Del(DelWorkload),
        #[prost(message, tag = "3")]
        SnapshotSent(SnapshotSent),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WorkloadRequest {
        #[prost(oneof = "Request", tags = "1, 2, 3")]
        pub payload: Option<Request>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Ack {
        #[prost(string, tag = "1")]
        pub error: String,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Response {
        #[prost(message, tag = "1")]
        Ack(Ack),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WorkloadResponse {
        #[prost(oneof = "Response", tags = "1")]
        pub payload: Option<Response>,
    }
}

/// An ambient pod as ztunnel knows it.
#[derive(Debug, Clone)]
pub struct AmbientPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub pod_ip: IpAddr,
    pub netns: PathBuf,
    /// The Service that stands for the pod (port 80), as istiod would tell ztunnel of it.
    pub service: Option<MeshService>,
}

/// A Service as ztunnel knows it: its hostname, cluster IP and ports (port, target port).
#[derive(Debug, Clone)]
pub struct MeshService {
    pub name: String,
    pub hostname: String,
    pub vip: IpAddr,
    pub ports: Vec<(u16, u16)>,
}

impl MeshService {
    fn of(s: &crate::lab::services::LabService) -> Option<MeshService> {
        let ports = s
            .ports()
            .iter()
            .filter(|p| crate::lab::services::protocol(p) == "TCP")
            .filter_map(|p| {
                let port = p.get("port")?.as_u64()? as u16;
                let target = p.get("targetPort").and_then(|t| t.as_u64());
                Some((port, target.map_or(port, |t| t as u16)))
            })
            .collect();
        Some(MeshService {
            name: s.name.clone(),
            hostname: format!(
                "{}.{}.svc.{}",
                s.name,
                s.namespace,
                crate::lab::services::CLUSTER_DOMAIN
            ),
            vip: s.cluster_ip()?,
            ports,
        })
    }

    fn ports_map(&self) -> BTreeMap<u16, u16> {
        self.ports.iter().copied().collect()
    }
}

/// ztunnel's local configuration (its `LocalConfig`), the parts the lab fills. Typed rather than
/// JSON values: ztunnel reads ports as numbers, and a JSON map's keys are strings.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LocalWorkload {
    uid: String,
    name: String,
    namespace: String,
    service_account: String,
    workload_ips: Vec<IpAddr>,
    protocol: &'static str,
    node: String,
    network: &'static str,
    /// By `namespace/hostname`: port to target port.
    services: BTreeMap<String, BTreeMap<u16, u16>>,
}

#[derive(Debug, serde::Serialize)]
struct LocalService {
    name: String,
    namespace: String,
    hostname: String,
    /// `network/address`.
    vips: Vec<String>,
    ports: BTreeMap<u16, u16>,
}

#[derive(Debug, serde::Serialize)]
struct LocalConfig {
    workloads: Vec<LocalWorkload>,
    services: Vec<LocalService>,
}

impl AmbientPod {
    fn uid(&self) -> String {
        format!("lab//v1/Pod/{}/{}", self.namespace, self.name)
    }
}

/// Reads one ztunnel answer (one record: ztunnel reads and writes whole messages); an error it
/// reports is an error here.
fn ack(conn: &mut Socket) -> anyhow::Result<()> {
    let mut buf = [0u8; 1024];
    let n = conn.read(&mut buf).context("ztunnel's answer")?;
    let resp = zds::WorkloadResponse::decode(&buf[..n]).context("a ZDS answer")?;
    match resp.payload {
        Some(zds::Response::Ack(a)) if a.error.is_empty() => Ok(()),
        Some(zds::Response::Ack(a)) => bail!("ztunnel refused: {}", a.error),
        None => bail!("an empty ZDS answer"),
    }
}

/// Sends one request, with the pod's network namespace attached when it adds one.
fn request(conn: &Socket, req: &zds::WorkloadRequest, netns: Option<&Path>) -> anyhow::Result<()> {
    let bytes = req.encode_to_vec();
    let iov = [IoSlice::new(&bytes)];
    match netns {
        Some(p) => {
            let f = std::fs::File::open(p).with_context(|| format!("{}", p.display()))?;
            let fds = [f.as_raw_fd()];
            sendmsg::<UnixAddr>(
                conn.as_raw_fd(),
                &iov,
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            )?;
        }
        None => {
            sendmsg::<UnixAddr>(conn.as_raw_fd(), &iov, &[], MsgFlags::empty(), None)?;
        }
    }
    Ok(())
}

/// Serves one node's ztunnel: waits for it to connect and say hello, hands it every pod (each
/// acknowledged), says the snapshot is complete, then holds the connection until ztunnel
/// closes it.
fn serve(listener: Socket, pods: Vec<AmbientPod>) -> anyhow::Result<()> {
    let (mut conn, _) = listener.accept().context("ztunnel connecting")?;
    let mut hello = [0u8; 1024];
    conn.read(&mut hello).context("ztunnel's hello")?;
    for p in &pods {
        let add = zds::WorkloadRequest {
            payload: Some(zds::Request::Add(zds::AddWorkload {
                uid: p.uid(),
                workload_info: Some(zds::WorkloadInfo {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    service_account: "default".into(),
                }),
            })),
        };
        request(&conn, &add, Some(&p.netns))?;
        ack(&mut conn).with_context(|| format!("adding {}/{}", p.namespace, p.name))?;
    }
    let done = zds::WorkloadRequest {
        payload: Some(zds::Request::SnapshotSent(zds::SnapshotSent {})),
    };
    request(&conn, &done, None)?;
    ack(&mut conn).context("the snapshot")?;
    let mut buf = [0u8; 1024];
    while conn.read(&mut buf).is_ok_and(|n| n > 0) {}
    Ok(())
}

/// Istio's mutual TLS mode, mesh-wide (a `PeerAuthentication` in the root namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mtls {
    /// Meshed clients use mTLS; plaintext from outside the mesh is accepted.
    Permissive,
    /// Plaintext is refused: only meshed clients connect.
    Strict,
}

/// The static workload file ztunnel reads instead of xDS: every ambient pod, HBONE; with
/// [`Mtls::Strict`], the policy istiod makes of a mesh-wide STRICT `PeerAuthentication` (deny
/// every connection without a peer identity). YAML text: ztunnel's string matches are enums,
/// which its YAML reader takes as tags (`!Presence []`), which JSON values cannot carry.
fn workload_file(pods: &[AmbientPod], mtls: Mtls) -> anyhow::Result<String> {
    let workloads = pods
        .iter()
        .map(|p| LocalWorkload {
            uid: p.uid(),
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            service_account: "default".into(),
            workload_ips: vec![p.pod_ip],
            protocol: "HBONE",
            node: p.node.clone(),
            network: "",
            services: p
                .service
                .iter()
                .map(|s| (format!("{}/{}", p.namespace, s.hostname), s.ports_map()))
                .collect(),
        })
        .collect();
    let services = pods
        .iter()
        .filter_map(|p| {
            let s = p.service.as_ref()?;
            Some(LocalService {
                name: s.name.clone(),
                namespace: p.namespace.clone(),
                hostname: s.hostname.clone(),
                vips: vec![format!("/{}", s.vip)],
                ports: s.ports_map(),
            })
        })
        .collect();
    let file = LocalConfig {
        workloads,
        services,
    };
    let policies = match mtls {
        Mtls::Permissive => "policies: []\n",
        Mtls::Strict => {
            "policies:\n- name: istio_converted_static_strict\n  namespace: istio-system\n  \
             scope: Global\n  action: Deny\n  dryRun: false\n  \
             rules: [[[{notPrincipals: [!Presence []]}]]]\n"
        }
    };
    Ok(serde_yaml_ng::to_string(&file)? + policies)
}

/// Istio's in-pod redirection, for one pod's namespace (see the module's notes).
fn redirection(netns: &str) -> anyhow::Result<()> {
    // Declared, deleted and declared again: the same rules whenever it is applied.
    let rules = "table inet istio-inpod
delete table inet istio-inpod
table inet istio-inpod {
  chain prerouting_mangle {
    type filter hook prerouting priority mangle;
    meta mark & 0xfff == 0x539 ct mark set ct mark & 0xfffff000 | 0x111
  }
  chain output_mangle {
    type route hook output priority mangle;
    ct mark & 0xfff == 0x111 meta mark set meta mark & 0xfffff000 | 0x111
  }
  chain output_nat {
    type nat hook output priority -100;
    ip daddr 169.254.7.127 meta l4proto tcp accept
    oifname != \"lo\" udp dport 53 meta mark & 0xfff != 0x539 redirect to :15053
    ip daddr != 127.0.0.1 tcp dport 53 meta mark & 0xfff != 0x539 redirect to :15053
    meta l4proto tcp meta mark & 0xfff == 0x111 accept
    oifname \"lo\" ip daddr != 127.0.0.1 accept
    meta l4proto tcp ip daddr != 127.0.0.1 meta mark & 0xfff != 0x539 redirect to :15001
  }
  chain prerouting_nat {
    type nat hook prerouting priority -100;
    ip saddr 169.254.7.127 meta l4proto tcp accept
    meta l4proto tcp ip daddr != 127.0.0.1 tcp dport != 15008 meta mark & 0xfff != 0x539 redirect to :15006
  }
}
";
    nft(netns, rules)?;
    in_ns(
        netns,
        &[
            "ip",
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ],
    )?;
    let rules = in_ns(netns, &["ip", "rule", "list"])?;
    if !rules.contains("lookup 100") {
        in_ns(
            netns,
            &[
                "ip",
                "rule",
                "add",
                "fwmark",
                "0x111/0xfff",
                "pref",
                "32764",
                "lookup",
                "100",
            ],
        )?;
    }
    Ok(())
}

/// The node's SNAT of kubelet's probes to ambient pods (istio-cni's host rule): what the node
/// itself sends to an ambient pod leaves from Istio's probe address.
fn probe_snat(node_netns: &str, node_sources: &[IpAddr], pods: &[IpAddr]) -> anyhow::Result<()> {
    let list = |v: &[IpAddr]| {
        v.iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rules = format!(
        "table ip istio-probes {{
  chain postrouting {{
    type nat hook postrouting priority srcnat;
    ip saddr {{ {} }} ip daddr {{ {} }} meta l4proto tcp snat to {PROBE_SOURCE}
  }}
}}
",
        list(node_sources),
        list(pods)
    );
    let _ = in_ns(
        node_netns,
        &["nft", "delete", "table", "ip", "istio-probes"],
    );
    nft(node_netns, &rules)
}

/// Applies an nftables script in network namespace `netns`.
fn nft(netns: &str, script: &str) -> anyhow::Result<()> {
    let cmd = ["ip", "netns", "exec", netns, "nft", "-f", "-"];
    crate::proc::run_stdin(&cmd, script).map(|_| ())
}

/// The pods of namespaces labelled for ambient.
pub fn ambient_pods(
    lab: &Lab,
    labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> Vec<AmbientPod> {
    lab.state
        .pods
        .iter()
        .filter(|p| {
            labels
                .get(&p.spec.namespace)
                .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
                .is_some_and(|v| v == AMBIENT)
        })
        .filter_map(|p: &PodState| {
            Some(AmbientPod {
                namespace: p.spec.namespace.clone(),
                name: p.spec.name.clone(),
                node: p.spec.node.clone()?,
                pod_ip: p.infra_ip.parse().ok()?,
                netns: PathBuf::from(&p.netns_path),
                service: lab
                    .service_of(&p.key(), 80, "TCP")
                    .and_then(MeshService::of),
            })
        })
        .collect()
}

/// Ambient on a running lab: one ztunnel per node, its ZDS server, the pods' redirection and the
/// nodes' probe SNAT. Stops its ztunnels when dropped.
#[derive(Debug)]
pub struct Ambient {
    pids: Vec<u32>,
    servers: Vec<JoinHandle<anyhow::Result<()>>>,
    pub logs: Vec<PathBuf>,
}

impl Ambient {
    /// Enrols `pods` (on the lab's nodes) with the ztunnel at `ztunnel`, mesh-wide mTLS `mtls`;
    /// files go to `dir`.
    pub fn start(
        lab: &Lab,
        ztunnel: &Path,
        pods: &[AmbientPod],
        dir: &Path,
        mtls: Mtls,
    ) -> anyhow::Result<Ambient> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("ztunnel-workloads.yaml");
        std::fs::write(&config, workload_file(pods, mtls)?)?;
        let resolv = dir.join("resolv.conf");
        let dns = crate::lab::services::DNS_SERVICE_IP;
        std::fs::write(&resolv, format!("nameserver {dns}\noptions ndots:5\n"))?;
        for p in pods {
            let ns = p
                .netns
                .file_name()
                .and_then(|n| n.to_str())
                .context("a pod netns name")?;
            redirection(ns)
                .with_context(|| format!("redirection in {}/{}", p.namespace, p.name))?;
        }
        let mut me = Ambient {
            pids: Vec::new(),
            servers: Vec::new(),
            logs: Vec::new(),
        };
        let pod_ips: Vec<IpAddr> = pods.iter().map(|p| p.pod_ip).collect();
        for node in &lab.state.nodes {
            // The node's own sources towards its pods: its address, and its bridge's (`.1` of
            // the pods' /24, as the lab's primary CNI has it).
            let mut sources = vec![node.ip];
            for p in pods.iter().filter(|p| p.node == node.name) {
                if let IpAddr::V4(a) = p.pod_ip {
                    let o = a.octets();
                    let bridge = IpAddr::from([o[0], o[1], o[2], 1]);
                    if !sources.contains(&bridge) {
                        sources.push(bridge);
                    }
                }
            }
            probe_snat(&node.netns, &sources, &pod_ips)?;
            let socket = dir.join(format!("{}.zds.sock", node.name));
            let _ = std::fs::remove_file(&socket);
            let listener = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
            listener.bind(&SockAddr::unix(&socket)?)?;
            listener.listen(1)?;
            let mine: Vec<AmbientPod> = pods
                .iter()
                .filter(|p| p.node == node.name)
                .cloned()
                .collect();
            me.servers
                .push(std::thread::spawn(move || serve(listener, mine)));
            let log = dir.join(format!("ztunnel-{}.log", node.name));
            let env = [
                ("XDS_ADDRESS", String::new()),
                ("CA_ADDRESS", String::new()),
                ("FAKE_CA", "true".into()),
                ("LOCAL_XDS_PATH", config.display().to_string()),
                ("PROXY_MODE", "shared".into()),
                ("INPOD_UDS", socket.display().to_string()),
                ("NODE_NAME", node.name.clone()),
                ("RUST_LOG", "info".into()),
            ];
            // In a mount namespace of its own whose resolv.conf names the cluster's DNS, as a
            // ztunnel pod's (ClusterFirst) would: its DNS proxy forwards what it does not know there.
            let run = [
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount --bind \"$0\" /etc/resolv.conf && exec \"$1\" proxy ztunnel",
            ];
            let mut args: Vec<String> = run.iter().map(|s| s.to_string()).collect();
            args.push(resolv.display().to_string());
            args.push(ztunnel.display().to_string());
            let pid = crate::containerd::spawn_detached(
                &node.netns,
                Path::new("unshare"),
                &args,
                &log,
                &env,
            )?;
            me.pids.push(pid);
            me.logs.push(log);
        }
        // Each ztunnel has every pod of its node once its server has been answered for all.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while me.servers.iter().any(|s| !s.is_finished()) && std::time::Instant::now() < deadline {
            let ready = me.logs.iter().all(|l| {
                std::fs::read_to_string(l).is_ok_and(|t| t.contains("received snapshot sent"))
            });
            if ready {
                return Ok(me);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(done) = me.servers.iter().position(|s| s.is_finished()) {
            let s = me.servers.remove(done);
            if let Ok(Err(e)) = s.join() {
                return Err(e.context("a ZDS server"));
            }
        }
        let tails: Vec<String> = me
            .logs
            .iter()
            .map(|l| {
                let text = std::fs::read_to_string(l).unwrap_or_default();
                // Its last messages, not a backtrace's frames.
                let last: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.starts_with(' '))
                    .rev()
                    .take(5)
                    .collect();
                format!(
                    "{}:\n{}",
                    l.display(),
                    last.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect();
        bail!(
            "the ztunnels did not take their pods within 20 s; their logs end:\n{}",
            tails.join("\n")
        )
    }
}

impl Drop for Ambient {
    fn drop(&mut self) {
        for pid in &self.pids {
            crate::proc::terminate(*pid, Duration::from_secs(3));
        }
    }
}
