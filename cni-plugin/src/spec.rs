//! The CNI specification's side of the plugin: versions, the environment, results in the 0.4.0
//! and 1.x formats, and errors with the spec's codes.
//!
//! Small typed structs of our own rather than a crate: the `cni-plugin` crate supports neither
//! spec 1.1 nor STATUS and GC, and is unmaintained; what keyway needs of the spec fits here.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The versions keyway-cni speaks.
///
/// 0.3.0 and 0.3.1 are here because the conflists that Calico and Flannel ship still say 0.3.1,
/// and the installer keeps the primary's version: their results have the same shape as 0.4.0's,
/// and CHECK does not exist before 0.4.0.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest, used where the request names none.
pub const CURRENT_VERSION: &str = "1.1.0";

/// A spec version keyway-cni supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        match s {
            "0.3.0" => Some(Version::V0_3_0),
            "0.3.1" => Some(Version::V0_3_1),
            "0.4.0" => Some(Version::V0_4_0),
            "1.0.0" => Some(Version::V1_0_0),
            "1.1.0" => Some(Version::V1_1_0),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }
}

/// The spec's error codes: defined with the handoff protocol, whose acknowledgements carry them.
pub use keyway_protocol::Code;

/// A CNI error, as printed on stdout with a non-zero exit status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The spec's error JSON.
    pub fn to_json(&self, version: &str) -> Value {
        serde_json::json!({
            "cniVersion": version,
            "code": self.code as u32,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// The CNI operation, from `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        match s {
            "ADD" => Some(Command::Add),
            "DEL" => Some(Command::Del),
            "CHECK" => Some(Command::Check),
            "VERSION" => Some(Command::Version),
            "STATUS" => Some(Command::Status),
            "GC" => Some(Command::Gc),
            _ => None,
        }
    }
}

/// What the runtime passes in environment variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
    pub path: Vec<String>,
}

/// Reads the variables `command` needs; `get` is the environment (a closure, so tests never touch
/// the process environment).
pub fn environment(
    command: Command,
    get: impl Fn(&str) -> Option<String>,
) -> Result<Environment, CniError> {
    let require = |name: &str| -> Result<String, CniError> {
        get(name).filter(|v| !v.is_empty()).ok_or_else(|| {
            CniError::new(
                Code::InvalidEnvironment,
                format!("{name} is required for {command:?}"),
            )
        })
    };
    let mut env = Environment {
        path: get("CNI_PATH")
            .map(|p| p.split(':').map(String::from).collect())
            .unwrap_or_default(),
        ..Default::default()
    };
    match command {
        Command::Add | Command::Check => {
            env.container_id = require("CNI_CONTAINERID")?;
            env.netns = require("CNI_NETNS")?;
            env.ifname = require("CNI_IFNAME")?;
        }
        Command::Del => {
            // DEL may come without a namespace (RemovePodSandbox after StopPodSandbox).
            env.container_id = require("CNI_CONTAINERID")?;
            env.ifname = require("CNI_IFNAME")?;
            env.netns = get("CNI_NETNS").unwrap_or_default();
        }
        Command::Version | Command::Status | Command::Gc => {}
    }
    if let Some(args) = get("CNI_ARGS") {
        env.args = parse_args(&args)?;
    }
    Ok(env)
}

/// Parses `CNI_ARGS` (`K=V;K=V`).
pub fn parse_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            CniError::new(
                Code::InvalidEnvironment,
                format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"),
            )
        })?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// An interface in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    /// Spec 1.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// An IP configuration in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpConfig {
    pub address: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// Specs 0.3.x and 0.4.0 only ("4" or "6").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteConfig {
    pub dst: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// A result (or a prevResult), in any supported version's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub dns: Value,
}

impl CniResult {
    /// The result re-shaped for `version`: 0.3.x and 0.4.0 carry each IP's version, 1.x does not; the
    /// interface MTU exists from 1.1 on.
    pub fn for_version(mut self, version: Version) -> CniResult {
        self.cni_version = version.as_str().to_string();
        for ip in &mut self.ips {
            ip.version = (version < Version::V1_0_0).then(|| {
                if ip.address.is_ipv4() {
                    "4".to_string()
                } else {
                    "6".to_string()
                }
            });
        }
        if version < Version::V1_1_0 {
            for i in &mut self.interfaces {
                i.mtu = None;
            }
        }
        self
    }

    /// The IPs of the interface `ifname` in namespace `netns` (all IPs when the result names no
    /// interfaces, as some plugins do).
    pub fn ips_of(&self, ifname: &str, netns: &str) -> Vec<IpNetwork> {
        let idx = self.interfaces.iter().position(|i| {
            i.name == ifname && (i.sandbox.is_empty() || netns.is_empty() || i.sandbox == netns)
        });
        self.ips
            .iter()
            .filter(|ip| match (idx, ip.interface) {
                (Some(i), Some(j)) => i == j,
                (_, None) => true,
                (None, Some(_)) => false,
            })
            .map(|ip| ip.address)
            .collect()
    }

    /// Gateways of the result: the node's addresses on the pod network (bridge plugins).
    pub fn gateways(&self) -> Vec<IpAddr> {
        let mut g: Vec<IpAddr> = self.ips.iter().filter_map(|ip| ip.gateway).collect();
        g.extend(self.routes.iter().filter_map(|r| r.gw));
        g.sort();
        g.dedup();
        g
    }
}

/// The VERSION answer.
pub fn version_info() -> Value {
    serde_json::json!({
        "cniVersion": CURRENT_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn add_needs_its_variables() {
        let err = environment(
            Command::Add,
            env(&[("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")]),
        )
        .unwrap_err();
        assert_eq!(err.code, Code::InvalidEnvironment);
        assert!(err.msg.contains("CNI_NETNS"));
        let e = environment(
            Command::Add,
            env(&[
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", "/var/run/netns/x"),
                ("CNI_IFNAME", "eth0"),
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
                ),
                ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
            ]),
        )
        .unwrap();
        assert_eq!(e.args["K8S_POD_NAME"], "p");
        assert_eq!(e.path, vec!["/opt/cni/bin", "/usr/lib/cni"]);
    }

    #[test]
    fn del_tolerates_a_missing_netns() {
        let e = environment(
            Command::Del,
            env(&[("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")]),
        )
        .unwrap();
        assert_eq!(e.netns, "");
    }

    #[test]
    fn bad_args_are_an_environment_error() {
        assert_eq!(
            parse_args("novalue").unwrap_err().code,
            Code::InvalidEnvironment
        );
    }

    const BRIDGE_040: &str = r#"{"cniVersion":"0.4.0","interfaces":[{"name":"cni0","mac":"aa:bb:cc:dd:ee:ff"},{"name":"veth1","mac":"11:22:33:44:55:66"},{"name":"eth0","mac":"66:55:44:33:22:11","sandbox":"/var/run/netns/x"}],"ips":[{"version":"4","interface":2,"address":"10.244.1.5/24","gateway":"10.244.1.1"}],"routes":[{"dst":"0.0.0.0/0","gw":"10.244.1.1"}],"dns":{}}"#;

    #[test]
    fn results_convert_between_versions() {
        let r: CniResult = serde_json::from_str(BRIDGE_040).unwrap();
        assert_eq!(
            r.ips_of("eth0", "/var/run/netns/x"),
            vec!["10.244.1.5/24".parse::<IpNetwork>().unwrap()]
        );
        assert_eq!(r.gateways(), vec!["10.244.1.1".parse::<IpAddr>().unwrap()]);
        let v1 = serde_json::to_value(r.clone().for_version(Version::V1_0_0)).unwrap();
        assert_eq!(v1["cniVersion"], "1.0.0");
        assert!(v1["ips"][0].get("version").is_none());
        let v04 = serde_json::to_value(r.for_version(Version::V0_4_0)).unwrap();
        assert_eq!(v04["ips"][0]["version"], "4");
        assert_eq!(v04["interfaces"][2]["sandbox"], "/var/run/netns/x");
    }

    #[test]
    fn errors_render_as_the_spec_says() {
        let e = CniError::new(Code::TryAgainLater, "agent not ready").with_details("socket /x");
        assert_eq!(
            e.to_json("1.0.0"),
            serde_json::json!({"cniVersion": "1.0.0", "code": 11, "msg": "agent not ready", "details": "socket /x"})
        );
        assert_eq!(e.to_string(), "agent not ready: socket /x");
    }

    #[test]
    fn versions() {
        assert_eq!(Version::parse("0.2.0"), None);
        assert_eq!(Version::parse("0.3.1"), Some(Version::V0_3_1));
        assert!(Version::V0_3_1 < Version::V0_4_0 && Version::V0_4_0 < Version::V1_1_0);
        assert_eq!(version_info()["supportedVersions"][4], "1.1.0");
    }
}
