//! `keyway-install`: runs in the keyway DaemonSet next to the agent. `run` (the default) copies
//! the plugin, waits for the primary CNI configuration, puts keyway's entry into it, and keeps it
//! there until told to stop; then it takes everything out only if keyway is being removed from
//! the cluster. `install` and `uninstall` do one pass each, for operators and tests.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use keyway_install::confdir::{ConfDir, Reconciled};
use keyway_install::intent::{self, OnExit};
use keyway_install::kubeconfig::{self, Credentials};
use keyway_install::{binary, conflist};
use serde_json::Value;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExitPolicy {
    /// Ask the API server whether keyway's DaemonSet is being removed.
    Auto,
    /// Always leave keyway in the chain.
    Keep,
    /// Always take keyway out.
    Uninstall,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install, keep installed, and decide on exit (the default).
    Run,
    /// Install once (waiting for a primary configuration) and exit.
    Install,
    /// Take out everything the installer added and exit.
    Uninstall,
}

#[derive(Debug, Parser)]
#[command(
    name = "keyway-install",
    version,
    about = "puts keyway into the node's CNI chain"
)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// The node's CNI configuration directory (as mounted in this container).
    #[arg(
        long,
        global = true,
        env = "KEYWAY_CNI_CONF_DIR",
        default_value = "/host/etc/cni/net.d"
    )]
    conf_dir: PathBuf,
    /// The node's CNI binary directories, comma separated.
    #[arg(
        long,
        global = true,
        env = "KEYWAY_CNI_BIN_DIR",
        default_value = "/host/opt/cni/bin",
        value_delimiter = ','
    )]
    bin_dir: Vec<PathBuf>,
    /// The plugin binary to copy in as `keyway`.
    #[arg(
        long,
        global = true,
        env = "KEYWAY_PLUGIN",
        default_value = "/opt/keyway/bin/keyway-cni"
    )]
    plugin: PathBuf,
    /// Where the installer remembers what it changed (keep it on the host).
    #[arg(
        long,
        global = true,
        env = "KEYWAY_INSTALL_STATE_DIR",
        default_value = "/host/var/lib/keyway/install"
    )]
    state_dir: PathBuf,
    /// keyway's conflist entry, as JSON (see cni-plugin/README.md for its fields).
    #[arg(
        long,
        global = true,
        env = "KEYWAY_CNI_ENTRY",
        default_value = r#"{"type":"keyway"}"#
    )]
    entry: String,
    /// Also write a kubeconfig from this pod's service account here.
    #[arg(long, global = true, env = "KEYWAY_KUBECONFIG_OUT")]
    kubeconfig: Option<PathBuf>,
    /// What to do when stopped.
    #[arg(long, global = true, env = "KEYWAY_ON_EXIT", value_enum, default_value_t = ExitPolicy::Auto)]
    on_exit: ExitPolicy,
    /// keyway's DaemonSet, as namespace/name, for `--on-exit auto`.
    #[arg(
        long,
        global = true,
        env = "KEYWAY_DAEMONSET",
        default_value = "keyway-system/keyway-node"
    )]
    daemonset: String,
    /// A file created once keyway is in the chain (for a readiness probe), removed on exit.
    #[arg(long, global = true, env = "KEYWAY_INSTALL_READY_FILE")]
    ready_file: Option<PathBuf>,
    /// Re-check at least this often, in case a change notification was lost.
    #[arg(
        long,
        global = true,
        env = "KEYWAY_INSTALL_RESYNC_SECONDS",
        default_value_t = 30
    )]
    resync_seconds: u64,
    /// Log JSON lines instead of text.
    #[arg(long, global = true, env = "KEYWAY_LOG_JSON")]
    log_json: bool,
}

/// The validated configuration.
#[derive(Debug)]
struct Config {
    dir: ConfDir,
    bin_dirs: Vec<PathBuf>,
    plugin: PathBuf,
    entry: Value,
    kubeconfig: Option<PathBuf>,
    on_exit: ExitPolicy,
    daemonset: (String, String),
    ready_file: Option<PathBuf>,
    resync: Duration,
}

fn validate(a: Args) -> Result<Config, String> {
    let entry: Value =
        serde_json::from_str(&a.entry).map_err(|e| format!("--entry is not JSON: {e}"))?;
    conflist::validate_entry(&entry).map_err(|e| format!("--entry: {e}"))?;
    let daemonset = a
        .daemonset
        .split_once('/')
        .filter(|(n, d)| !n.is_empty() && !d.is_empty())
        .map(|(n, d)| (n.to_string(), d.to_string()))
        .ok_or_else(|| format!("--daemonset {:?} is not namespace/name", a.daemonset))?;
    if a.bin_dir.is_empty() {
        return Err("--bin-dir needs at least one directory".into());
    }
    if a.resync_seconds == 0 {
        return Err("--resync-seconds must be at least 1".into());
    }
    Ok(Config {
        dir: ConfDir::new(a.conf_dir, a.state_dir),
        bin_dirs: a.bin_dir,
        plugin: a.plugin,
        entry,
        kubeconfig: a.kubeconfig,
        on_exit: a.on_exit,
        daemonset,
        ready_file: a.ready_file,
        resync: Duration::from_secs(a.resync_seconds),
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_json);
    let cmd = args.cmd.as_ref().map_or("run", |c| match c {
        Cmd::Run => "run",
        Cmd::Install => "install",
        Cmd::Uninstall => "uninstall",
    });
    let config = match validate(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keyway-install: {e}");
            return ExitCode::from(64);
        }
    };
    tracing::info!(command = cmd, conf_dir = %config.dir.dir.display(), bin_dirs = ?config.bin_dirs, plugin = %config.plugin.display(), state_dir = %config.dir.state.display(), on_exit = ?config.on_exit, entry = %config.entry, "starting");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = rt.block_on(async {
        match cmd {
            "install" => install(&config, None).await.map(|_| ()),
            "uninstall" => uninstall(&config),
            _ => run(&config).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "failed");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// One pass: the plugin binary, the kubeconfig, keyway's entry.
fn reconcile(c: &Config) -> anyhow::Result<Reconciled> {
    for d in &c.bin_dirs {
        if binary::install(&c.plugin, d)? {
            tracing::info!(bin_dir = %d.display(), "plugin installed");
        }
    }
    if let Some(path) = &c.kubeconfig {
        let creds = Credentials::from_pod(
            std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref(),
            std::env::var("KUBERNETES_SERVICE_PORT").ok().as_deref(),
            Path::new(kubeconfig::SERVICE_ACCOUNT_DIR),
        )?;
        if creds.write(path)? {
            tracing::info!(path = %path.display(), "kubeconfig written");
        }
    }
    let r = c.dir.reconcile(&c.entry)?;
    match &r {
        Reconciled::NoPrimary => {}
        Reconciled::Unchanged(f) => tracing::debug!(file = f, "keyway is in place"),
        Reconciled::Wrote { file, replaced } => {
            tracing::info!(
                file,
                replaced = replaced.as_deref(),
                "keyway put into the primary configuration"
            )
        }
    }
    Ok(r)
}

/// A stream of "something in the directory changed".
fn watch(
    dir: &Path,
) -> anyhow::Result<(
    notify::RecommendedWatcher,
    tokio::sync::mpsc::UnboundedReceiver<()>,
)> {
    use notify::Watcher;
    std::fs::create_dir_all(dir)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && (ev.kind.is_create() || ev.kind.is_modify() || ev.kind.is_remove())
        {
            let _ = tx.send(());
        }
    })?;
    w.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok((w, rx))
}

/// Installs, waiting for a primary configuration to appear; stops early on `stop`.
async fn install(
    c: &Config,
    mut stop: Option<&mut tokio::sync::mpsc::UnboundedReceiver<()>>,
) -> anyhow::Result<bool> {
    let (_w, mut changes) = watch(&c.dir.dir)?;
    let mut said = false;
    loop {
        if reconcile(c)? != Reconciled::NoPrimary {
            return Ok(true);
        }
        if !said {
            tracing::warn!(conf_dir = %c.dir.dir.display(), "no primary CNI configuration yet; waiting for one");
            said = true;
        }
        let stopped = async {
            match stop.as_deref_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = changes.recv() => {}
            _ = tokio::time::sleep(c.resync) => {}
            () = stopped => return Ok(false),
        }
        // Let a writer finish its burst of events.
        tokio::time::sleep(Duration::from_millis(20)).await;
        while changes.try_recv().is_ok() {}
    }
}

/// Removes what the agent's gateway leaves on the node: its table, its routing rules and its
/// device (which persists across the agent's restarts). On its own thread, so that it runs the
/// same from async and sync callers. A failure is logged: it leaves rules and a device that
/// carry nothing once the agent is gone (the kernel gateway's lease runs out).
fn remove_gateway() {
    use keyway_protocol::gateway;
    let removed = std::thread::spawn(|| -> anyhow::Result<bool> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(gateway::unroute())?;
        Ok(gateway::delete_table()?)
    })
    .join();
    match removed {
        Ok(Ok(table)) => tracing::info!(table, "the node's gateway rules removed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot remove the node's gateway rules"),
        Err(_) => tracing::warn!("removing the node's gateway rules panicked"),
    }
}

/// The node's eBPF programs (on the bridge, and the kernel SaP on the node's device): an agent
/// leaves them when it exits, for its successor; an uninstall has none.
fn remove_node_fast_path() {
    let removed = std::thread::spawn(keyway_sap::io::fastpath::NodeFastPath::detach_all).join();
    match removed {
        Ok(Ok(devices)) => tracing::info!(?devices, "the node's fast path removed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot remove the node's fast path"),
        Err(_) => tracing::warn!("removing the node's fast path panicked"),
    }
}

fn uninstall(c: &Config) -> anyhow::Result<()> {
    let changed = c.dir.uninstall()?;
    tracing::info!(files = ?changed, "keyway taken out of the CNI configuration");
    for d in &c.bin_dirs {
        binary::uninstall(d)?;
    }
    remove_gateway();
    remove_node_fast_path();
    if let Some(k) = &c.kubeconfig {
        match std::fs::remove_file(k) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    Ok(())
}

async fn run(c: &Config) -> anyhow::Result<()> {
    let (stop_tx, mut stop) = tokio::sync::mpsc::unbounded_channel();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = stop_tx.send(());
    });
    let installed = install(c, Some(&mut stop)).await?;
    if installed {
        if let Some(r) = &c.ready_file {
            keyway_install::confdir::write_atomic(r, b"ready\n")?;
        }
        tracing::info!("keyway is in the chain; watching for changes");
        let (_w, mut changes) = watch(&c.dir.dir)?;
        loop {
            tokio::select! {
                _ = changes.recv() => {}
                _ = tokio::time::sleep(c.resync) => {}
                _ = stop.recv() => break,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            while changes.try_recv().is_ok() {}
            // A failed pass is logged and retried on the next change or resync: the loop must
            // outlive a primary that is half-way through writing its file.
            if let Err(e) = reconcile(c) {
                tracing::error!(error = %e, "cannot put keyway back into the chain; retrying");
            }
        }
    }
    if let Some(r) = &c.ready_file {
        let _ = std::fs::remove_file(r);
    }
    let (decision, why) = match c.on_exit {
        ExitPolicy::Keep => (OnExit::Keep, "--on-exit keep".to_string()),
        ExitPolicy::Uninstall => (OnExit::Uninstall, "--on-exit uninstall".to_string()),
        ExitPolicy::Auto => match kube::Client::try_default().await {
            Ok(client) => {
                let (ns, name) = &c.daemonset;
                intent::decide(client, ns, name, Duration::from_secs(10)).await
            }
            Err(e) => (
                OnExit::Keep,
                format!("no API server to ask ({e}); keeping keyway in the chain"),
            ),
        },
    };
    tracing::info!(decision = ?decision, reason = %why, "stopping");
    if decision == OnExit::Uninstall {
        uninstall(c)?;
    }
    Ok(())
}
