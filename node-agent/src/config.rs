//! The agent's configuration: command-line flags with environment equivalents, validated whole at
//! start-up and logged. Bad configuration exits with EX_USAGE (64) and says what is wrong.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use keyway_core::key::{KeyError, Rotation};
use keyway_protocol::DEFAULT_AGENT_SOCKET;
use keyway_sap::io::udp::GUE_MARK;

use crate::gateway::GatewayConfig;

/// What is wrong with the configuration: the flag, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag} {reason}")]
    Invalid { flag: &'static str, reason: String },
    #[error("key rotation: {0}")]
    Rotation(#[from] KeyError),
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        reason: reason.into(),
    }
}

/// Where the agent's state comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A directory of Kubernetes YAML, reloaded on change.
    File(PathBuf),
    /// The Kubernetes API (in-cluster or KUBECONFIG).
    Kubernetes,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(dir) => write!(f, "file:{}", dir.display()),
            Source::Kubernetes => f.write_str("kubernetes"),
        }
    }
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Source, String> {
        match s.split_once(':') {
            Some(("file", dir)) if !dir.is_empty() => Ok(Source::File(PathBuf::from(dir))),
            _ if s == "kubernetes" => Ok(Source::Kubernetes),
            _ => Err(format!("{s:?} is not file:DIR or kubernetes")),
        }
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "keyway-agent",
    version,
    about = "keyway's node agent: the node's policy enforcement point"
)]
pub struct Args {
    /// This node's name, as pods' spec.nodeName says it.
    #[arg(long, env = "KEYWAY_NODE_NAME")]
    pub node_name: String,
    /// Where the state comes from: file:DIR or kubernetes.
    #[arg(long, env = "KEYWAY_SOURCE")]
    pub source: Source,
    /// The handoff socket the CNI plugin connects to.
    #[arg(long, env = "KEYWAY_SOCKET", default_value = DEFAULT_AGENT_SOCKET)]
    pub socket: PathBuf,
    /// Where attachment records are kept across restarts.
    #[arg(long, env = "KEYWAY_STATE_DIR", default_value = "/var/lib/keyway")]
    pub state_dir: PathBuf,
    /// The admin server: /metrics, /healthz, /readyz.
    #[arg(long, env = "KEYWAY_ADMIN", default_value = "127.0.0.1:9464")]
    pub admin: SocketAddr,
    /// The node's address, where its SaP listens (default: the source address of the default
    /// route).
    #[arg(long, env = "KEYWAY_NODE_IP")]
    pub node_ip: Option<IpAddr>,
    /// The GUE port of pods and SaPs.
    #[arg(long, env = "KEYWAY_GUE_PORT", default_value_t = keyway_core::gue::DEFAULT_PORT)]
    pub gue_port: u16,
    /// The cluster secret keys are derived from (default: STATE_DIR/cluster-secret, created if
    /// missing: fine for one node, every node of a cluster must share it).
    #[arg(long, env = "KEYWAY_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Key rotation period, unless the cluster's ClusterConfig says otherwise.
    #[arg(long, env = "KEYWAY_KEY_ROTATION_SECONDS", default_value_t = 3600)]
    pub key_rotation_seconds: u64,
    /// How long a key stays accepted after (and before) its epoch.
    #[arg(long, env = "KEYWAY_KEY_GRACE_SECONDS", default_value_t = 60)]
    pub key_grace_seconds: u64,
    /// How long a handoff waits for the pod to appear in the state before failing with "try
    /// again later".
    #[arg(long, env = "KEYWAY_POD_WAIT_SECONDS", default_value_t = 5)]
    pub pod_wait_seconds: u64,
    /// Log JSON lines instead of text.
    #[arg(long, env = "KEYWAY_LOG_JSON")]
    pub log_json: bool,
    /// With `--source kubernetes`: keyway's namespace, where the cluster secret lives.
    #[arg(long, env = "KEYWAY_NAMESPACE", default_value = "keyway-system")]
    pub namespace: String,
    /// The mark bit that sends what reaches a local protected pod from off the overlay to the
    /// node's gateway (hex or decimal; one bit, free on this node).
    #[arg(long, env = "KEYWAY_GATEWAY_MARK", default_value = "0x200000", value_parser = parse_mark)]
    pub gateway_mark: u32,
    /// The mark bit kube-proxy sets on what it masquerades (`--masquerade-bit`, 14 by default):
    /// the gateway clears it on what it takes, so that such traffic keeps its real source.
    #[arg(
        long,
        env = "KEYWAY_KUBE_PROXY_MASQUERADE_MARK",
        default_value = "0x4000",
        value_parser = parse_mark
    )]
    pub kube_proxy_masquerade_mark: u32,
    /// Run no gateway: traffic from off the overlay to protected pods (NodePorts with
    /// `externalTrafficPolicy: Local`, unprotected pods, other nodes) is then dropped.
    #[arg(long, env = "KEYWAY_NO_GATEWAY")]
    pub no_gateway: bool,
    /// For a rolling upgrade from a keyway that did not attest attachments: count other agents'
    /// unattested attachments too (every other check still applies). Remove once every node
    /// runs this version: while it is on, whoever can write pod annotations can claim addresses.
    #[arg(long, env = "KEYWAY_ACCEPT_UNATTESTED_ATTACHMENTS")]
    pub accept_unattested_attachments: bool,
    /// Which path carries pods' established flows: `kernel` (keyway's eBPF programs, with the
    /// user-space path deciding each flow's first packets), `user` (the user-space path alone),
    /// or `auto` (the kernel's where it loads keyway's programs).
    #[arg(long, env = "KEYWAY_DATAPATH", default_value = "auto")]
    pub datapath: Datapath,
}

/// `--datapath`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Datapath {
    Auto,
    Kernel,
    User,
}

impl Datapath {
    pub fn as_str(self) -> &'static str {
        match self {
            Datapath::Auto => "auto",
            Datapath::Kernel => "kernel",
            Datapath::User => "user",
        }
    }
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    v.map_err(|_| format!("{s:?} is not a number"))
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub source: Source,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub admin: SocketAddr,
    pub node_ip: Option<IpAddr>,
    pub gue_port: u16,
    pub secret_file: PathBuf,
    pub rotation: Rotation,
    pub pod_wait: Duration,
    pub log_json: bool,
    pub namespace: String,
    /// The node's gateway, unless `--no-gateway`.
    pub gateway: Option<GatewayConfig>,
    /// `--accept-unattested-attachments`.
    pub accept_unattested: bool,
    pub datapath: Datapath,
}

impl Args {
    pub fn validate(self) -> Result<Config, ConfigError> {
        if self.node_name.is_empty() || self.node_name.len() > 253 {
            return Err(invalid("node-name", "must be 1 to 253 characters"));
        }
        if !self.socket.is_absolute() {
            let why = format!("{} must be an absolute path", self.socket.display());
            return Err(invalid("socket", why));
        }
        if !self.state_dir.is_absolute() {
            let why = format!("{} must be an absolute path", self.state_dir.display());
            return Err(invalid("state-dir", why));
        }
        if let Source::File(d) = &self.source
            && !d.is_absolute()
        {
            let why = format!("file:{} needs an absolute directory", d.display());
            return Err(invalid("source", why));
        }
        if self.gue_port == 0 {
            return Err(invalid("gue-port", "must not be 0"));
        }
        let rotation = Rotation::new(
            self.key_rotation_seconds * 1000,
            self.key_grace_seconds * 1000,
        )?;
        for (flag, mark) in [
            ("gateway-mark", self.gateway_mark),
            (
                "kube-proxy-masquerade-mark",
                self.kube_proxy_masquerade_mark,
            ),
        ] {
            if mark.count_ones() != 1 {
                return Err(invalid(flag, format!("{mark:#x} must be one bit")));
            }
        }
        if self.gateway_mark == self.kube_proxy_masquerade_mark || self.gateway_mark & GUE_MARK != 0
        {
            let why = format!(
                "{:#x} is taken (kube-proxy's mark, or keyway's GUE mark {GUE_MARK:#x})",
                self.gateway_mark
            );
            return Err(invalid("gateway-mark", why));
        }
        if self.pod_wait_seconds > 60 {
            return Err(invalid("pod-wait-seconds", "must be at most 60"));
        }
        let secret_file = self
            .secret_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("cluster-secret"));
        Ok(Config {
            node_name: self.node_name,
            source: self.source,
            socket: self.socket,
            state_dir: self.state_dir,
            admin: self.admin,
            node_ip: self.node_ip,
            gue_port: self.gue_port,
            secret_file,
            rotation,
            pod_wait: Duration::from_secs(self.pod_wait_seconds),
            log_json: self.log_json,
            namespace: self.namespace,
            gateway: (!self.no_gateway).then_some(GatewayConfig {
                mark: self.gateway_mark,
                masquerade_mark: self.kube_proxy_masquerade_mark,
                gue_port: self.gue_port,
            }),
            accept_unattested: self.accept_unattested_attachments,
            datapath: self.datapath,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Config, String> {
        let mut v = vec![
            "keyway-agent",
            "--node-name",
            "node-1",
            "--source",
            "file:/tmp/state",
        ];
        v.extend_from_slice(extra);
        Args::try_parse_from(v)
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_plugins() {
        let c = args(&[]).unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(
            c.secret_file,
            PathBuf::from("/var/lib/keyway/cluster-secret")
        );
        assert_eq!(c.gue_port, 6080);
    }

    #[test]
    fn mistakes_are_named() {
        assert!(args(&["--socket", "rel"]).unwrap_err().contains("absolute"));
        assert!(
            args(&["--key-rotation-seconds", "10", "--key-grace-seconds", "6"])
                .unwrap_err()
                .contains("grace")
        );
        assert!(
            Args::try_parse_from(["keyway-agent", "--node-name", "n", "--source", "etcd"]).is_err()
        );
        assert!(args(&["--gue-port", "0"]).unwrap_err().contains("gue-port"));
        assert_eq!("kubernetes".parse::<Source>(), Ok(Source::Kubernetes));
        let file: Source = "file:/etc/keyway".parse().unwrap();
        assert_eq!(
            file.to_string(),
            "file:/etc/keyway",
            "logged as it is given"
        );
    }

    #[test]
    fn the_gateway_takes_one_free_mark_bit() {
        let c = args(&[]).unwrap();
        let gw = c.gateway.expect("on by default");
        assert_eq!((gw.mark, gw.masquerade_mark), (0x20_0000, 0x4000));
        let c = args(&["--gateway-mark", "0x1000000"]).unwrap();
        assert_eq!(c.gateway.unwrap().mark, 0x100_0000);
        assert!(args(&["--no-gateway"]).unwrap().gateway.is_none());
        for bad in ["0x3", "0", "0x4000", &format!("{GUE_MARK:#x}")] {
            let e = args(&["--gateway-mark", bad]).unwrap_err();
            assert!(e.contains("gateway-mark"), "{bad}: {e}");
        }
        assert!(args(&["--gateway-mark", "seven"]).is_err());
    }
}
