//! `keyway-cni`: run by the container runtime, after the primary CNI, as the CNI spec says —
//! the verb and the container in environment variables, the configuration on stdin, the result
//! or the error on stdout, exit status 0 or 1.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::process::ExitCode;

mod config;
mod plugin;
mod spec;

use config::{LogConfig, NetConf, sniff_version};
use plugin::Invocation;
use spec::{CniError, Code, Command};

fn init_logs(log: &LogConfig) {
    let level = log.level.clone().unwrap_or_else(|| "warn".to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(format!(
        "{level},rtnetlink=warn,netlink_proto=warn"
    ))
    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).json();
    match log.file.as_ref().and_then(|f| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(f)
            .ok()
    }) {
        Some(file) => builder.with_writer(std::sync::Mutex::new(file)).init(),
        None => builder.with_writer(std::io::stderr).init(),
    }
}

fn fail(e: &CniError, version: &str) -> ExitCode {
    tracing::error!(code = e.code as u32, error = %e, "keyway-cni failed");
    let _ = writeln!(std::io::stdout(), "{}", e.to_json(version));
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        return fail(
            &CniError::new(
                Code::IoFailure,
                format!("cannot read the configuration: {e}"),
            ),
            spec::CURRENT_VERSION,
        );
    }
    let version = sniff_version(&stdin);
    let Some(command) = Command::parse(&command) else {
        return fail(
            &CniError::new(
                Code::InvalidEnvironment,
                format!("CNI_COMMAND {command:?} is not ADD, DEL, CHECK, VERSION, STATUS or GC"),
            ),
            &version,
        );
    };
    if command == Command::Version {
        let _ = writeln!(std::io::stdout(), "{}", spec::version_info());
        return ExitCode::SUCCESS;
    }
    let conf = match NetConf::parse(&stdin) {
        Ok(c) => c,
        Err(e) => return fail(&e, &version),
    };
    init_logs(&conf.log);
    let env = match spec::environment(command, |k| std::env::var(k).ok()) {
        Ok(e) => e,
        Err(e) => return fail(&e, &version),
    };
    let span = tracing::info_span!(
        "cni",
        command = ?command,
        network = %conf.name,
        container = %env.container_id,
        netns = %env.netns,
        namespace = env.args.get("K8S_POD_NAMESPACE").map(String::as_str).unwrap_or(""),
        pod = env.args.get("K8S_POD_NAME").map(String::as_str).unwrap_or(""),
    );
    let _enter = span.enter();
    let inv = Invocation { env, conf };
    let outcome = match command {
        Command::Add => {
            plugin::add(&inv).map(|r| Some(serde_json::to_value(r).expect("results serialise")))
        }
        Command::Del => plugin::del(&inv).map(|()| None),
        Command::Check => plugin::check(&inv).map(|()| None),
        Command::Status => plugin::status(&inv).map(|()| None),
        Command::Gc => plugin::gc(&inv).map(|_| None),
        Command::Version => unreachable!("answered above"),
    };
    match outcome {
        Ok(Some(result)) => {
            let _ = writeln!(std::io::stdout(), "{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => fail(&e, &version),
    }
}
