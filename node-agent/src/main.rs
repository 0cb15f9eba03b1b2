//! `keyway-agent`: one per node. Validates its configuration (exit 64 when it cannot be used),
//! checks its privileges (exit 77 naming the missing capability), restores the pods it served,
//! then serves the plugin, the pods and the admin endpoint.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use keyway_agent::agent::{Agent, load_secret};
use keyway_agent::compile::NodeContext;
use keyway_agent::config::{Args, Config, Source};
use keyway_agent::metrics::Metrics;
use keyway_agent::source::FileSource;
use keyway_agent::{admin, server};
use keyway_sap::counters::Counters;
use keyway_sap::sys::{self, Capability};

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
                eprintln!("keyway-agent: {e}");
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
    model: tokio::sync::watch::Receiver<Arc<keyway_agent::model::Model>>,
    stats: Arc<keyway_agent::source::SourceStats>,
    secret: keyway_sap::key::ClusterSecret,
    claims: Box<dyn keyway_agent::ipam::BlockClaims>,
    publisher: Box<dyn keyway_agent::source::Publisher>,
    client: Option<kube::Client>,
}

async fn source(
    cfg: &Config,
    secret: Option<keyway_sap::key::ClusterSecret>,
) -> anyhow::Result<Sourced> {
    use anyhow::Context;
    match &cfg.source {
        Source::File(dir) => {
            let (model, stats) = FileSource::new(dir)
                .spawn(Duration::from_secs(10))
                .context("cannot watch the state directory")?;
            Ok(Sourced {
                model,
                stats,
                secret: secret.expect("read in main"),
                claims: Box::new(keyway_agent::ipam::FileClaims {
                    dir: dir.join(keyway_agent::source::AGENT_DIR).join("blocks"),
                }),
                publisher: Box::new(keyway_agent::source::FilePublisher::new(
                    dir,
                    &cfg.node_name,
                )),
                client: None,
            })
        }
        Source::Kubernetes => {
            let client = kube::Client::try_default()
                .await
                .context("no Kubernetes API to talk to (not in a pod, and no KUBECONFIG)")?;
            let bytes = keyway_agent::kube_node::cluster_secret(client.clone(), &cfg.namespace)
                .await
                .context("cannot get the cluster secret")?;
            let secret = keyway_sap::key::ClusterSecret::new(bytes)
                .map_err(|e| anyhow::anyhow!("the cluster secret: {e}"))?;
            let mut src = keyway_agent::kube_source::spawn(client.clone());
            tracing::info!("waiting for the API server's first lists");
            src.ready
                .wait_for(|r| *r)
                .await
                .context("the kubernetes source stopped")?;
            let handle = tokio::runtime::Handle::current();
            Ok(Sourced {
                model: src.model,
                stats: src.stats,
                secret,
                claims: Box::new(keyway_agent::kube_claims::KubeClaims::new(
                    client.clone(),
                    handle.clone(),
                )),
                publisher: Box::new(keyway_agent::kube_source::KubePublisher::new(
                    client.clone(),
                    &cfg.node_name,
                    handle,
                )),
                client: Some(client),
            })
        }
    }
}

async fn run(cfg: Config, secret: Option<keyway_sap::key::ClusterSecret>) -> anyhow::Result<()> {
    use anyhow::Context;
    let source_name = match &cfg.source {
        Source::File(d) => format!("file:{}", d.display()),
        Source::Kubernetes => "kubernetes".to_string(),
    };
    let node_ip = cfg.node_ip.or_else(detect_node_ip);
    let local_sap = node_ip.map(|ip| SocketAddr::new(ip, cfg.gue_port));
    tracing::info!(
        node = %cfg.node_name,
        source = %source_name,
        socket = %cfg.socket.display(),
        state_dir = %cfg.state_dir.display(),
        admin = %cfg.admin,
        sap = ?local_sap,
        rotation_s = cfg.rotation.period_ms() / 1000,
        "keyway-agent starting"
    );
    let sourced = source(&cfg, secret).await?;
    let counters = Arc::new(Counters::new());
    let metrics = Arc::new(Metrics::new(counters.clone(), sourced.stats.clone()));
    let node = NodeContext {
        node_name: cfg.node_name.clone(),
        local_sap,
        gue_port: cfg.gue_port,
        rotation: cfg.rotation,
    };
    let agent = Agent::new(
        cfg.clone(),
        node,
        sourced.model.clone(),
        sourced.secret,
        counters.clone(),
        metrics,
        sourced.claims,
        sourced.publisher,
    )
    .context("cannot set up the agent")?;

    let admin_listener = admin::bind(cfg.admin)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.admin))?;
    tokio::spawn(admin::serve(agent.clone(), admin_listener));
    let _sap = match local_sap {
        Some(addr) => {
            let sock = keyway_sap::io::udp::bind_gue(addr, None)
                .with_context(|| format!("cannot bind the SaP on {addr}"))?;
            Some(keyway_sap::io::endpoint::spawn_sap(
                agent.tables.clone(),
                counters,
                sock,
            )?)
        }
        None => {
            tracing::warn!(
                "no node address: the SaP serves only pods on this node (set --node-ip)"
            );
            None
        }
    };
    agent.restore().await;
    let listener = server::bind_socket(&cfg.socket)
        .with_context(|| format!("cannot listen on {}", cfg.socket.display()))?;
    tokio::spawn(agent.clone().control_loop());
    if let Some(client) = sourced.client.clone() {
        tokio::spawn(publish_endpoints(
            agent.clone(),
            client.clone(),
            cfg.node_name.clone(),
            sourced.model.clone(),
        ));
        tokio::spawn(cluster_duties(
            agent.clone(),
            client,
            cfg.node_name.clone(),
            sourced.model.clone(),
        ));
    }
    let handoff = tokio::spawn(server::serve(agent.clone(), listener));

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping; pods keep their devices and rules, a new agent re-attaches"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
        r = handoff => anyhow::bail!("the handoff server stopped: {r:?}"),
    }
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

/// Returns once the agent serves (state synced, pods re-attached): what the cluster sees of this
/// node waits for that.
async fn until_ready(agent: &Agent) {
    while !agent.is_ready() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// On a cluster: lift the node's not-ready taint once the agent is ready, and reclaim the overlay
/// blocks and EndpointSlices of nodes that have left.
async fn cluster_duties(
    agent: Arc<Agent>,
    client: kube::Client,
    node: String,
    model: tokio::sync::watch::Receiver<Arc<keyway_agent::model::Model>>,
) {
    until_ready(&agent).await;
    loop {
        match keyway_agent::kube_node::lift_taint(client.clone(), &node).await {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot lift the node's taint yet; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
    let claims = keyway_agent::kube_claims::KubeClaims::new(
        client.clone(),
        tokio::runtime::Handle::current(),
    );
    // Once at start (what departed while no agent ran), then every minute.
    let mut every_minute = tokio::time::interval(Duration::from_secs(60));
    every_minute.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every_minute.tick().await;
        let live: std::collections::BTreeSet<String> =
            model.borrow().nodes.keys().cloned().collect();
        // No nodes listed means no view of the cluster, not an empty cluster: reclaim nothing.
        if live.is_empty() {
            continue;
        }
        if let Err(e) = claims.reclaim(&live) {
            tracing::warn!(error = %e, "cannot reclaim the blocks of departed nodes");
        }
        match keyway_agent::endpoints::reclaim(client.clone(), &live).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(slices = n, "removed the EndpointSlices of departed nodes"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot remove the EndpointSlices of departed nodes")
            }
        }
    }
}

/// On a cluster: keep this node's EndpointSlices of covered Services in step with the model (on
/// every change, and every minute to repair edits by hand); retries with a backoff on errors.
async fn publish_endpoints(
    agent: Arc<Agent>,
    client: kube::Client,
    node: String,
    mut model: tokio::sync::watch::Receiver<Arc<keyway_agent::model::Model>>,
) {
    use keyway_agent::metrics::WriteLabel;
    until_ready(&agent).await;
    let mut backoff = Duration::from_secs(1);
    loop {
        let desired = keyway_agent::endpoints::desired(&model.borrow_and_update(), &node);
        match keyway_agent::endpoints::sync(client.clone(), &node, desired).await {
            Ok(r) => {
                backoff = Duration::from_secs(1);
                let m = &agent.metrics.endpointslice_writes;
                m.get_or_create(&WriteLabel { op: "apply" })
                    .inc_by(r.applied as u64);
                m.get_or_create(&WriteLabel { op: "delete" })
                    .inc_by(r.deleted as u64);
                // A burst of changes (a rollout) becomes one write per slice.
                let _ = tokio::time::timeout(Duration::from_secs(60), model.changed()).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                agent.metrics.endpointslice_errors.inc();
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot update this node's EndpointSlices");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
