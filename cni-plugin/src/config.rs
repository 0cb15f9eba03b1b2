//! The plugin's network configuration: a conflist entry `{"type": "keyway", ...}`. Read once,
//! validated whole; every field is documented in `cni-plugin/README.md`.

use std::path::PathBuf;
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::Deserialize;
use serde_json::Value;

use crate::spec::{CniError, CniResult, Code, Version};

pub use keyway_protocol::DEFAULT_AGENT_SOCKET;
pub const DEFAULT_AGENT_TIMEOUT_SECONDS: u64 = 10;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn` (default), `info`, `debug`, `trace`.
    #[serde(default)]
    pub level: Option<String>,
    /// Append JSON lines here; default: stderr, which the runtime records.
    #[serde(default)]
    pub file: Option<PathBuf>,
}

/// An attachment as the runtime lists it in `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The raw configuration, as the runtime passes it on stdin.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    cni_version: String,
    #[serde(default)]
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    #[serde(default)]
    agent_timeout_seconds: Option<u64>,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    gue_port: Option<u16>,
    #[serde(default)]
    node_addresses: Vec<IpNetwork>,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    prev_result: Option<Value>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<ValidAttachment>>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub version: Version,
    pub name: String,
    pub agent_socket: PathBuf,
    pub agent_timeout: Duration,
    /// Overlay MTU; default: the pod's underlay MTU minus the GUE overhead.
    pub mtu: Option<u32>,
    pub gue_port: u16,
    /// Node addresses whose traffic reaches the pod on the underlay (health probes), in addition
    /// to the primary CNI's gateways.
    pub node_addresses: Vec<IpNetwork>,
    pub log: LogConfig,
    pub prev_result: Option<CniResult>,
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(Code::InvalidConfig, msg)
}

/// The `cniVersion` of a configuration that may not parse as ours (for error replies).
pub fn sniff_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| crate::spec::CURRENT_VERSION.to_string())
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                Code::DecodeFailure,
                "the network configuration is not valid JSON",
            )
            .with_details(e.to_string())
        })?;
        let raw: Raw = serde_json::from_value(value).map_err(|e| {
            invalid("the network configuration does not fit keyway's").with_details(e.to_string())
        })?;
        let version = Version::parse(&raw.cni_version).ok_or_else(|| {
            CniError::new(
                Code::IncompatibleVersion,
                format!(
                    "incompatible CNI versions: the configuration is {}, keyway-cni supports {}",
                    raw.cni_version,
                    crate::spec::SUPPORTED_VERSIONS.join(", ")
                ),
            )
        })?;
        if raw.kind != "keyway" {
            return Err(invalid(format!("type is {:?}, not \"keyway\"", raw.kind)));
        }
        if let Some(mtu) = raw.mtu.filter(|m| !(576..=65535).contains(m)) {
            return Err(invalid(format!("mtu {mtu} is outside 576..=65535")));
        }
        let timeout = raw
            .agent_timeout_seconds
            .unwrap_or(DEFAULT_AGENT_TIMEOUT_SECONDS);
        if timeout == 0 || timeout > 300 {
            return Err(invalid(format!(
                "agentTimeoutSeconds {timeout} is outside 1..=300"
            )));
        }
        if let Some(level) = raw
            .log
            .level
            .as_ref()
            .filter(|l| !["error", "warn", "info", "debug", "trace"].contains(&l.as_str()))
        {
            return Err(invalid(format!(
                "log level {level:?} is not error, warn, info, debug or trace"
            )));
        }
        let prev_result =
            match raw.prev_result {
                None | Some(Value::Null) => None,
                Some(v) => Some(serde_json::from_value::<CniResult>(v).map_err(|e| {
                    invalid("prevResult does not parse").with_details(e.to_string())
                })?),
            };
        let socket = raw
            .agent_socket
            .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET));
        if !socket.is_absolute() {
            return Err(invalid(format!(
                "agentSocket {} must be an absolute path",
                socket.display()
            )));
        }
        Ok(NetConf {
            version,
            name: raw.name,
            agent_socket: socket,
            agent_timeout: Duration::from_secs(timeout),
            mtu: raw.mtu,
            gue_port: raw.gue_port.unwrap_or(keyway_core::gue::DEFAULT_PORT),
            node_addresses: raw.node_addresses,
            log: raw.log,
            prev_result,
            valid_attachments: raw.valid_attachments,
        })
    }
}

/// Any bytes as the plugin's stdin: a configuration or an error with a CNI code and message,
/// never a panic; a parsed `prevResult` answers the questions the plugin asks of it and
/// serialises for the configuration's version. The check of the fuzz target
/// (`cni-plugin/fuzz/`, `make fuzz`) and of the short run in the tests.
#[cfg(any(test, fuzzing))]
pub fn check_any_stdin(data: &[u8]) {
    let version = sniff_version(data);
    match NetConf::parse(data) {
        Ok(conf) => {
            if let Some(prev) = conf.prev_result {
                let _ = prev.ips_of("eth0", "/var/run/netns/x");
                let _ = prev.gateways();
                let out = prev.for_version(conf.version);
                serde_json::to_vec(&out).expect("a result serialises");
            }
        }
        Err(e) => {
            let j = e.to_json(&version);
            assert!(j.get("code").is_some() && j.get("msg").is_some(), "{j}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The short fuzz run of `make test` (the long one: `make fuzz`).
    #[test]
    fn any_stdin_parses_or_is_refused_with_a_code() {
        let seeds: [&[u8]; 3] = [
            br#"{"cniVersion":"1.0.0","name":"k8s","type":"keyway","agentSocket":"/run/a.sock","mtu":1450,"nodeAddresses":["10.0.0.1/32"],"log":{"level":"info"},"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],"ips":[{"address":"10.244.1.5/24","gateway":"10.244.1.1","interface":0}],"routes":[{"dst":"0.0.0.0/0","gw":"10.244.1.1"}],"dns":{}}}"#,
            br#"{"cniVersion":"0.4.0","name":"k8s","type":"keyway","prevResult":{"cniVersion":"0.4.0","interfaces":[{"name":"eth0"}],"ips":[{"version":"6","address":"fd00::5/64","interface":0}]}}"#,
            br#"{"cniVersion":"1.1.0","name":"k8s","type":"keyway","agentTimeoutSeconds":3,"guePort":6080}"#,
        ];
        let n = keyway_testing::fuzz::run("cni_config", &seeds, 30_000, check_any_stdin);
        assert_eq!(n, 30_003);
    }

    fn parse(s: &str) -> Result<NetConf, CniError> {
        NetConf::parse(s.as_bytes())
    }

    #[test]
    fn defaults_match_the_agent() {
        let c = parse(r#"{"cniVersion":"1.0.0","name":"n","type":"keyway"}"#).unwrap();
        assert_eq!(c.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(c.gue_port, 6080);
        assert_eq!(c.agent_timeout, Duration::from_secs(10));
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn each_mistake_has_its_code() {
        assert_eq!(parse("{not json").unwrap_err().code, Code::DecodeFailure);
        assert_eq!(
            parse(r#"{"cniVersion":"0.2.0","name":"n","type":"keyway"}"#)
                .unwrap_err()
                .code,
            Code::IncompatibleVersion
        );
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0","type":"keyway","mtu":100}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0","type":"keyway","agentSocket":"rel.sock"}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0","type":"keyway","log":{"level":"loud"}}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
        assert_eq!(
            parse(
                r#"{"cniVersion":"1.0.0","type":"keyway","prevResult":{"ips":[{"address":"bad"}]}}"#
            )
            .unwrap_err()
            .code,
            Code::InvalidConfig
        );
    }

    #[test]
    fn gc_attachments_use_the_spec_spelling() {
        let c = parse(r#"{"cniVersion":"1.1.0","type":"keyway","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#).unwrap();
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "a");
    }

    #[test]
    fn versions_are_sniffed_for_error_replies() {
        assert_eq!(sniff_version(br#"{"cniVersion":"0.4.0"}"#), "0.4.0");
        assert_eq!(sniff_version(b"garbage"), "1.1.0");
    }
}
