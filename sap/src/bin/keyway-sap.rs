//! `keyway-sap`: keyway's data plane on its own, for what lives outside the cluster — an end-user
//! device or VM running an L3 endpoint, or a gateway SaP.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use keyway_core::counters::{Counters, Stage};
use keyway_core::engine::DropReason;
use keyway_core::flow::{FlowTable, FlowTimeouts};
use keyway_core::tables::{SharedLocal, SharedTables};
use keyway_sap::config::{Config, Mode};
use keyway_sap::io::{datapath::EndpointContext, endpoint, now_ms};
use keyway_sap::sys::Netns;

/// Exit status for a configuration that cannot be used (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "keyway's standalone data plane: an L3 endpoint or a gateway SaP"
)]
struct Args {
    /// The configuration file (YAML; see sap/README.md).
    #[arg(long, short, env = "KEYWAY_SAP_CONFIG")]
    config: PathBuf,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "KEYWAY_LOG_JSON")]
    log_json: bool,
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn report(counters: &Counters) {
    for stage in Stage::ALL {
        let drops: Vec<String> = DropReason::ALL
            .iter()
            .filter_map(|r| {
                let n = counters.drops(stage, *r);
                (n > 0).then(|| format!("{r}={n}"))
            })
            .collect();
        tracing::info!(
            stage = stage.as_str(),
            packets = counters.packets(stage),
            bytes = counters.bytes(stage),
            drops = %drops.join(","),
            "counters"
        );
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logs(args.log_json);
    let (config, compiled) = match Config::load(&args.config)
        .and_then(|c| c.compile(now_ms()).map(|compiled| (c, compiled)))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keyway-sap: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    tracing::info!(
        mode = ?compiled.mode,
        listen = %compiled.listen,
        entities = compiled.tables.fib.routes().len(),
        "configuration loaded"
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyway-sap: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config, compiled)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "keyway-sap stopped");
            ExitCode::FAILURE
        }
    }
}

/// Compiles the configuration again every `every_ms` and publishes the tables (and the
/// endpoint's own facts), so that derived keys move on with their epochs; a compile that fails
/// (the secret file unreadable) keeps the current tables and says so.
async fn rekey(
    config: Config,
    every_ms: u64,
    tables: Arc<SharedTables>,
    local: Option<Arc<SharedLocal>>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(every_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match config.compile(now_ms()) {
            Ok(c) => {
                tables.publish(c.tables);
                if let (Some(l), Some((_, new))) = (&local, c.endpoint) {
                    l.publish(new);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot derive the keys of the coming epochs; keeping the current ones");
            }
        }
    }
}

async fn run(config: Config, compiled: keyway_sap::config::Compiled) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let tables = SharedTables::new(compiled.tables);
    let mut local_handle = None;
    let counters = Arc::new(Counters::new());
    let here = Netns::current()?;
    let mut device = None;
    let _running = match (compiled.mode, compiled.endpoint) {
        (Mode::Endpoint, Some((spec, local))) => {
            let listen = compiled.listen;
            let name = spec.name.clone();
            let ip = local.overlay_ips[0];
            let ns = here.try_clone()?;
            let opened = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                endpoint::provision(&ns, &spec)?;
                Ok(endpoint::open(
                    &ns,
                    &[(spec.name.clone(), ip)],
                    listen,
                    None,
                )?)
            })
            .await??;
            device = Some(name.clone());
            tracing::info!(device = %name, overlay = %ip, "endpoint up");
            let local = SharedLocal::new(local);
            local_handle = Some(local.clone());
            let ctx = Arc::new(EndpointContext {
                tables: tables.clone(),
                local,
                flows: FlowTable::new(65536, FlowTimeouts::default()),
                counters: counters.clone(),
                // An external endpoint's traffic is the user-space path's.
                fast: Default::default(),
            });
            endpoint::spawn(ctx, opened)?
        }
        _ => {
            let sock = keyway_sap::io::udp::bind_gue(compiled.listen, None)?;
            tracing::info!(listen = %compiled.listen, "SaP up");
            // A standalone SaP runs in user space alone (no node fast path), sending datagrams
            // that fit the MTU of the device it listens on.
            let mtu = match keyway_sap::io::netlink::Netlink::connect() {
                Ok(nl) => nl.mtu_of_address(compiled.listen.ip()).await.ok().flatten(),
                Err(_) => None,
            };
            endpoint::spawn_sap(
                tables.clone(),
                counters.clone(),
                sock,
                None,
                Default::default(),
                mtu.unwrap_or(1500) as usize,
            )?
        }
    };
    let rekeying = compiled
        .rekey_every_ms
        .map(|every| tokio::spawn(rekey(config, every, tables.clone(), local_handle)));
    let mut term = signal(SignalKind::terminate())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = usr1.recv() => report(&counters),
        }
    }
    report(&counters);
    if let Some(r) = rekeying {
        r.abort();
    }
    drop(_running);
    if let Some(name) = device {
        let ns = here.try_clone()?;
        tokio::task::spawn_blocking(move || endpoint::remove(&ns, &name)).await??;
    }
    tracing::info!("stopped");
    Ok(())
}
