//! `keyway-agent`: one per node. Validates its configuration (exit 64 when it cannot be used),
//! checks its privileges (exit 77 naming the missing capability), restores the pods it served,
//! then serves the plugin, the pods and the admin server.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use keyway_agent::agent::{Agent, Parts};
use keyway_agent::claims::{Claims, FileClaims, KubeClaims};
use keyway_agent::cluster::{self, Publications, Timing};
use keyway_agent::compile::NodeContext;
use keyway_agent::config::{Args, Config, Source};
use keyway_agent::gateway::{self, GatewayConfig};
use keyway_agent::metrics::Metrics;
use keyway_agent::model::Model;
use keyway_agent::records::load_secret;
use keyway_agent::source::{
    self, FilePublisher, FileSource, KubePublisher, Publisher, SourceStats,
};
use keyway_agent::{admin, kube_node, server};
use keyway_core::counters::Counters;
use keyway_core::key::ClusterSecret;
use keyway_sap::sys::{self, Capability};
use tokio::sync::watch;

const EX_USAGE: u8 = 64;
const EX_NOPERM: u8 = 77;

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rtnetlink=warn,netlink_proto=warn")
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// Which capability is missing for what, if any.
fn missing_capability() -> Option<String> {
    let needs = [
        (
            Capability::NetAdmin,
            "create overlay devices, addresses, routes and nftables rules in pods",
        ),
        (
            Capability::SysAdmin,
            "enter pods' network namespaces (setns)",
        ),
        (
            Capability::Mknod,
            "create /dev/net/tun when the container lacks it",
        ),
    ];
    for (cap, why) in needs {
        match sys::has_capability(cap) {
            Ok(true) => {}
            Ok(false) => {
                if cap == Capability::Mknod
                    && std::path::Path::new(keyway_sap::io::tun::TUN_NODE).exists()
                {
                    continue;
                }
                return Some(format!("missing {}: needed to {why}", cap.name()));
            }
            Err(e) => return Some(format!("cannot read this process's capabilities: {e}")),
        }
    }
    None
}

/// The node's address as the kernel would pick it to reach beyond the node (no packet is sent).
fn detect_node_ip() -> Option<IpAddr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    s.local_addr()
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
}

fn main() -> ExitCode {
    let cfg = match Args::try_parse() {
        Ok(a) => match a.validate() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("keyway-agent: {e}");
                return ExitCode::from(EX_USAGE);
            }
        },
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EX_USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    init_logs(cfg.log_json);
    if let Some(why) = missing_capability() {
        eprintln!("keyway-agent: {why}");
        return ExitCode::from(EX_NOPERM);
    }
    // The file source's secret is a file; the kubernetes source's is a Secret, read in `run`.
    let secret = match &cfg.source {
        Source::File(_) => match load_secret(&cfg.secret_file) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("keyway-agent: the cluster secret: {e}");
                return ExitCode::from(EX_USAGE);
            }
        },
        Source::Kubernetes => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keyway-agent")
        .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyway-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg, secret)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "keyway-agent stopped");
            ExitCode::FAILURE
        }
    }
}

/// What the state source gives the agent.
struct Sourced {
    model: watch::Receiver<Arc<Model>>,
    stats: Arc<SourceStats>,
    secret: ClusterSecret,
    claims: Claims,
    publisher: Publisher,
    client: Option<kube::Client>,
}

async fn file_source(
    cfg: &Config,
    dir: &std::path::Path,
    secret: ClusterSecret,
) -> anyhow::Result<Sourced> {
    let (model, stats) = FileSource::new(dir)
        .keeping(source::LastGood::new(&cfg.state_dir))
        .spawn(Duration::from_secs(10))
        .context("cannot watch the state directory")?;
    Ok(Sourced {
        model,
        stats,
        secret,
        claims: Claims::Files(FileClaims {
            dir: dir.join(source::AGENT_DIR).join("blocks"),
        }),
        publisher: Publisher::Files(FilePublisher::new(dir, &cfg.node_name)),
        client: None,
    })
}

async fn kube_source(cfg: &Config) -> anyhow::Result<Sourced> {
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes API to talk to (not in a pod, and no KUBECONFIG)")?;
    let bytes = kube_node::cluster_secret(client.clone(), &cfg.namespace)
        .await
        .context("cannot get the cluster secret")?;
    let secret = ClusterSecret::new(bytes).context("the cluster secret")?;
    let mut src = source::kube::spawn(client.clone(), source::LastGood::new(&cfg.state_dir));
    tracing::info!("waiting for the API server's first lists");
    src.ready
        .wait_for(|r| *r)
        .await
        .context("the kubernetes source stopped")?;
    Ok(Sourced {
        model: src.model,
        stats: src.stats,
        secret,
        claims: Claims::Kube(Box::new(KubeClaims::new(client.clone()))),
        publisher: Publisher::Kube(KubePublisher::new(client.clone(), &cfg.node_name, src.pods)),
        client: Some(client),
    })
}

async fn run(cfg: Config, secret: Option<ClusterSecret>) -> anyhow::Result<()> {
    let node_ip = cfg.node_ip.or_else(detect_node_ip);
    let local_sap = node_ip.map(|ip| SocketAddr::new(ip, cfg.gue_port));
    tracing::info!(
        node = %cfg.node_name,
        source = %cfg.source,
        socket = %cfg.socket.display(),
        state_dir = %cfg.state_dir.display(),
        admin = %cfg.admin,
        sap = ?local_sap,
        rotation_s = cfg.rotation.period_ms() / 1000,
        "keyway-agent starting"
    );
    let sourced = match (&cfg.source, secret) {
        (Source::File(dir), Some(secret)) => file_source(&cfg, dir, secret).await?,
        _ => kube_source(&cfg).await?,
    };
    let counters = Arc::new(Counters::new());
    let metrics = Arc::new(Metrics::new(counters.clone(), sourced.stats.clone()));
    let timing = Timing::default();
    let publications = Publications::spawn(sourced.publisher.clone(), metrics.clone(), timing);
    let agent = Agent::new(Parts {
        node: NodeContext {
            node_name: cfg.node_name.clone(),
            local_sap,
            gue_port: cfg.gue_port,
            rotation: cfg.rotation,
        },
        cfg: cfg.clone(),
        model: sourced.model.clone(),
        secret: sourced.secret,
        counters: counters.clone(),
        metrics: metrics.clone(),
        claims: sourced.claims,
        publisher: sourced.publisher,
        publications,
    })
    .context("cannot set up the agent")?;
    // Whether this kernel loads keyway's eBPF programs, said once, and only once the agent
    // serves: a restarted agent's pods come back first. Pods' fast paths are attached as pods
    // are, by `--datapath`.
    tokio::spawn(agent.clone().fast_path_loop());
    {
        let metrics = metrics.clone();
        let datapath = cfg.datapath;
        let mut ready = agent.readiness();
        tokio::spawn(async move {
            let _ = ready.wait_for(|r| *r).await;
            match tokio::task::spawn_blocking(keyway_sap::io::bpf::probe).await {
                Ok(Ok(())) => {
                    metrics.bpf_available.set(1);
                    tracing::info!(
                        datapath = datapath.as_str(),
                        "eBPF: the kernel loads keyway's programs"
                    );
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, datapath = datapath.as_str(), "eBPF: the kernel does not load keyway's programs; the user-space path serves every pod")
                }
                Err(e) => tracing::warn!(error = %e, "eBPF: the probe did not finish"),
            }
        });
    }

    let admin_listener = admin::bind(cfg.admin)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.admin))?;
    tokio::spawn(admin::serve(agent.clone(), admin_listener));
    let local_admin = admin::local_socket_path(&cfg.socket);
    let local_listener = admin::bind_local(&local_admin)
        .with_context(|| format!("cannot listen on {}", local_admin.display()))?;
    tokio::spawn(admin::serve_local(agent.clone(), local_listener));
    let _sap = start_sap(local_sap, &agent, counters).await?;
    agent.restore().await;
    let listener = server::bind_socket(&cfg.socket)
        .with_context(|| format!("cannot listen on {}", cfg.socket.display()))?;
    tokio::spawn(agent.clone().control_loop());
    if let Some(client) = sourced.client {
        let ready = agent.readiness();
        cluster::spawn_all(
            client,
            &cfg.node_name,
            sourced.model,
            ready,
            metrics,
            timing,
        );
    }
    let handoff = tokio::spawn(server::serve(agent.clone(), listener));
    let stopped = until_stopped(handoff).await;
    let _ = std::fs::remove_file(&cfg.socket);
    stopped
}

/// The node's SaP, on the node's address (without one, the SaP serves only this node's pods),
/// and its gateway device unless `--no-gateway`.
async fn start_sap(
    local_sap: Option<SocketAddr>,
    agent: &Agent,
    counters: Arc<Counters>,
) -> anyhow::Result<Option<keyway_sap::io::endpoint::Running>> {
    let Some(addr) = local_sap else {
        tracing::warn!("no node address: the SaP serves only pods on this node (set --node-ip)");
        return Ok(None);
    };
    let sock = keyway_sap::io::udp::bind_gue(addr, None)
        .with_context(|| format!("cannot bind the SaP on {addr}"))?;
    let device = match &agent.cfg.gateway {
        Some(gw) => open_gateway(gw, addr.ip()).await,
        None => None,
    };
    let mtu = match keyway_sap::io::netlink::Netlink::connect() {
        Ok(nl) => nl.mtu_of_address(addr.ip()).await.ok().flatten(),
        Err(_) => None,
    };
    let tables = agent.tables.clone();
    Ok(Some(keyway_sap::io::endpoint::spawn_sap(
        tables,
        counters,
        sock,
        device,
        agent.node_fast_path(),
        mtu.unwrap_or(1500) as usize,
    )?))
}

/// The gateway device and the routes into it. A node without it still enforces (what would
/// have gone through it is dropped by the pods' tables), so a failure is logged, not fatal.
async fn open_gateway(
    gw: &GatewayConfig,
    node_ip: IpAddr,
) -> Option<keyway_sap::io::tun::SyncDevice> {
    // Room for GUE and packet authentication's MAC, as the pods' overlay devices leave.
    let overhead = if node_ip.is_ipv6() {
        keyway_core::gue::MTU_RESERVE_IPV6
    } else {
        keyway_core::gue::MTU_RESERVE_IPV4
    };
    let underlay = match keyway_sap::io::netlink::Netlink::connect() {
        Ok(nl) => nl.mtu_of_address(node_ip).await.ok().flatten(),
        Err(_) => None,
    };
    let mtu = underlay.unwrap_or(1500).saturating_sub(overhead as u32) as u16;
    let device = match keyway_sap::io::tun::create_gateway(gateway::DEVICE, mtu) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, device = gateway::DEVICE, "cannot create the gateway device; traffic from off the overlay to protected pods is dropped");
            return None;
        }
    };
    if let Err(e) = gateway::route(gw).await {
        tracing::error!(error = %e, "cannot route into the gateway; traffic from off the overlay to protected pods is dropped");
        return None;
    }
    tracing::info!(
        device = gateway::DEVICE,
        mtu,
        mark = format_args!("{:#x}", gw.mark),
        "gateway ready"
    );
    Some(device)
}

/// Serves until SIGTERM or an interrupt (pods keep their devices and rules, and a new agent
/// re-attaches), or until the handoff server fails.
async fn until_stopped(
    handoff: tokio::task::JoinHandle<std::io::Result<()>>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping; pods keep their devices and rules, a new agent re-attaches"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
        r = handoff => anyhow::bail!("the handoff server stopped: {r:?}"),
    }
    Ok(())
}
