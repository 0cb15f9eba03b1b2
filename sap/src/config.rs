//! Configuration of `keyway-sap`, the standalone data plane for things outside the cluster: an
//! endpoint (an end-user device, a VM) or a gateway SaP. Read once, validated whole at start-up,
//! compiled into the same [`Tables`] the agent publishes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::Deserialize;

use crate::io::endpoint::DeviceSpec;
use keyway_core::acl::{Acl, AllowSetBuilder, FastSet, Identity, Isolation, PortRange};
use keyway_core::engine::{LocalEndpoint, PacketAuth, Tables};
use keyway_core::fib::{Fib, Route};
use keyway_core::key::{ClusterSecret, Key, KeyRing, Rotation};
use keyway_core::packet::protocol_number;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// An L3 endpoint: a TUN device for local applications, GUE to the cluster.
    Endpoint,
    /// A gateway SaP: checks and forwards GUE between entities.
    Sap,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub mode: Mode,
    /// The GUE socket (port 6080 by convention).
    pub listen: SocketAddr,
    /// Underlay addresses of SaPs whose datagrams carry other entities' inner sources.
    #[serde(default)]
    pub saps: Vec<IpAddr>,
    /// Endpoint mode: this endpoint.
    pub endpoint: Option<EndpointConfig>,
    /// Cluster secret file, for deriving keys of entities given without a static `key`.
    pub secret_file: Option<PathBuf>,
    /// Key rotation period and grace window, in seconds (with `secretFile`).
    #[serde(default)]
    pub rotation: Option<RotationConfig>,
    /// What the FIB holds.
    #[serde(default)]
    pub entities: Vec<EntityConfig>,
    /// Allowed pairs. Empty: nothing is isolated. Otherwise every entity is isolated in both
    /// directions and only these pairs (with these ports) are allowed.
    #[serde(default)]
    pub allow: Vec<AllowConfig>,
    /// Per-packet MAC: `disabled` (the default), `permissive` (seal, accept unsealed) or
    /// `strict` (seal, refuse unsealed), as the cluster's ClusterConfig says. Needs keys derived
    /// from `secretFile`: a static key has no MAC key.
    #[serde(default)]
    pub packet_authentication: PacketAuthConfig,
}

/// [`PacketAuth`] as configuration spells it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PacketAuthConfig {
    #[default]
    Disabled,
    Permissive,
    Strict,
}

impl From<PacketAuthConfig> for PacketAuth {
    fn from(c: PacketAuthConfig) -> Self {
        match c {
            PacketAuthConfig::Disabled => PacketAuth::Disabled,
            PacketAuthConfig::Permissive => PacketAuth::Permissive,
            PacketAuthConfig::Strict => PacketAuth::Strict,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointConfig {
    pub entity: String,
    #[serde(default = "default_device")]
    pub device: String,
    pub mtu: Option<u16>,
    /// This endpoint's overlay address (a /32 or /128).
    pub address: IpNetwork,
    /// Overlay prefixes routed into the device.
    pub routes: Vec<IpNetwork>,
    /// This endpoint's own key; derived from the secret when absent.
    pub key: Option<HexKey>,
}

fn default_device() -> String {
    "kw0".to_string()
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotationConfig {
    pub period_seconds: u64,
    pub grace_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntityConfig {
    pub entity: String,
    pub prefixes: Vec<IpNetwork>,
    pub infra: SocketAddr,
    pub sap: Option<SocketAddr>,
    pub key: Option<HexKey>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowConfig {
    pub from: String,
    pub to: String,
    /// `tcp/80`, `udp/53`, `sctp/9000-9010`, `tcp` (every port). Empty: everything.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Send directly, bypassing SaPs (relies on keys alone).
    #[serde(default)]
    pub direct: bool,
}

/// A 32-bit key written as `0x…` hex (or a plain number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HexKey(pub Key);

impl<'de> Deserialize<'de> for HexKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u32),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(HexKey(Key(n))),
            Raw::S(s) => {
                let t = s.trim();
                let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                    Some(hex) => u32::from_str_radix(hex, 16),
                    None => t.parse(),
                };
                v.map(|v| HexKey(Key(v)))
                    .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a 32-bit key")))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

fn invalid(s: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(s.into())
}

/// Parses a port rule (`tcp/80`, `udp/1000-2000`, `sctp`) into the allow set.
pub fn parse_port_rule(rule: &str, into: &mut AllowSetBuilder) -> Result<(), ConfigError> {
    let (proto, ports) = match rule.split_once('/') {
        Some((p, r)) => (p, Some(r)),
        None => (rule, None),
    };
    let Some(proto) = protocol_number(&proto.to_ascii_uppercase()) else {
        return Err(invalid(format!(
            "port rule {rule:?}: unknown protocol {proto:?}"
        )));
    };
    let range = match ports {
        None => None,
        Some(r) => {
            let parse = |s: &str| {
                s.parse::<u16>()
                    .map_err(|_| invalid(format!("port rule {rule:?}: {s:?} is not a port")))
            };
            Some(match r.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (parse(a)?, parse(b)?);
                    if a > b {
                        return Err(invalid(format!("port rule {rule:?}: range is backwards")));
                    }
                    PortRange::new(a, b)
                }
                None => PortRange::single(parse(r)?),
            })
        }
    };
    into.allow(proto, range);
    Ok(())
}

/// A validated configuration, ready to run.
#[derive(Debug)]
pub struct Compiled {
    pub mode: Mode,
    pub listen: SocketAddr,
    pub tables: Tables,
    /// Endpoint mode: the device to provision and what the endpoint knows of itself.
    pub endpoint: Option<(DeviceSpec, LocalEndpoint)>,
    /// How often to compile again so that derived keys follow their epochs (a key ring holds
    /// only the epochs around the time it was derived): a few times per rotation period, as the
    /// node agent does. `None` when every key is static.
    pub rekey_every_ms: Option<u64>,
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_yaml_ng::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Validates everything and builds the tables, deriving keys at `now_ms`.
    pub fn compile(&self, now_ms: u64) -> Result<Compiled, ConfigError> {
        let secret = match &self.secret_file {
            Some(p) => {
                let bytes = std::fs::read(p).map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                })?;
                Some(
                    ClusterSecret::new(bytes)
                        .map_err(|e| invalid(format!("{}: {e}", p.display())))?,
                )
            }
            None => None,
        };
        let rotation = match self.rotation {
            Some(r) => Rotation::new(r.period_seconds * 1000, r.grace_seconds * 1000)
                .map_err(|e| invalid(e.to_string()))?,
            None => Rotation::default(),
        };
        let auth = PacketAuth::from(self.packet_authentication);
        let keys_for = |entity: &str, key: Option<HexKey>| -> Result<KeyRing, ConfigError> {
            match (key, &secret) {
                (Some(_), _) if auth.seals() => Err(invalid(format!(
                    "entity {entity:?} has a static key, which has no MAC key: \
                     packetAuthentication needs keys derived from secretFile"
                ))),
                (Some(k), _) => Ok(KeyRing::Static(k.0)),
                (None, Some(s)) => Ok(KeyRing::derive(s, entity, rotation, now_ms)),
                (None, None) => Err(invalid(format!(
                    "entity {entity:?} has no key and there is no secretFile"
                ))),
            }
        };

        let mut entities: Vec<EntityConfig> = self.entities.clone();
        let endpoint = match (self.mode, &self.endpoint) {
            (Mode::Endpoint, None) => {
                return Err(invalid("mode endpoint needs an `endpoint` section"));
            }
            (Mode::Sap, Some(_)) => return Err(invalid("mode sap takes no `endpoint` section")),
            (Mode::Endpoint, Some(e)) => {
                if e.address.prefix() != if e.address.is_ipv4() { 32 } else { 128 } {
                    return Err(invalid(format!(
                        "endpoint address {} must be a single address",
                        e.address
                    )));
                }
                if e.device.is_empty() || e.device.len() > 15 {
                    return Err(invalid(format!(
                        "device name {:?} must be 1 to 15 characters",
                        e.device
                    )));
                }
                entities.push(EntityConfig {
                    entity: e.entity.clone(),
                    prefixes: vec![e.address],
                    infra: self.listen,
                    sap: None,
                    key: e.key,
                });
                let overhead = if self.listen.is_ipv4() {
                    keyway_core::gue::MTU_RESERVE_IPV4
                } else {
                    keyway_core::gue::MTU_RESERVE_IPV6
                };
                let mtu = e.mtu.unwrap_or((1500 - overhead) as u16);
                if mtu < 576 {
                    return Err(invalid(format!("mtu {mtu} is too small")));
                }
                Some((
                    DeviceSpec {
                        name: e.device.clone(),
                        mtu,
                        address: e.address,
                        routes: e.routes.clone(),
                    },
                    LocalEndpoint {
                        entity: e.entity.as_str().into(),
                        overlay_ips: vec![e.address.ip()],
                        infra: self.listen,
                        keys: keys_for(&e.entity, e.key)?,
                        local_sap: None,
                    },
                ))
            }
            (Mode::Sap, None) => None,
        };

        let isolated = !self.allow.is_empty();
        let iso = Isolation {
            ingress: isolated,
            egress: isolated,
        };
        let mut acl = Acl::builder();
        let mut ids: BTreeMap<String, Identity> = BTreeMap::new();
        let mut fib = Fib::builder();
        for e in &entities {
            if ids.contains_key(&e.entity) {
                return Err(invalid(format!("entity {:?} is listed twice", e.entity)));
            }
            if e.prefixes.is_empty() {
                return Err(invalid(format!("entity {:?} has no prefixes", e.entity)));
            }
            let id = acl.identity(iso);
            ids.insert(e.entity.clone(), id);
            let idx = fib.route(Route {
                entity: Arc::from(e.entity.as_str()),
                identity: id,
                keys: keys_for(&e.entity, e.key)?,
                infra: e.infra,
                sap: e.sap,
                outside: false,
            });
            for p in &e.prefixes {
                fib.prefix(*p, idx)
                    .map_err(|err| invalid(err.to_string()))?;
            }
        }
        for a in &self.allow {
            let find = |n: &str| {
                ids.get(n)
                    .copied()
                    .ok_or_else(|| invalid(format!("allow names unknown entity {n:?}")))
            };
            let (from, to) = (find(&a.from)?, find(&a.to)?);
            let apply = |b: &mut AllowSetBuilder| -> Result<(), ConfigError> {
                if a.ports.is_empty() {
                    b.allow_everything();
                }
                a.ports.iter().try_for_each(|p| parse_port_rule(p, b))
            };
            apply(acl.egress(from, to))?;
            apply(acl.ingress(from, to))?;
            if a.direct {
                acl.direct(from, to);
            }
        }
        let mut saps = FastSet::default();
        saps.extend(self.saps.iter().copied());
        Ok(Compiled {
            mode: self.mode,
            listen: self.listen,
            tables: Tables {
                fib: fib.build(),
                acl: acl.build(),
                saps,
                generation: 1,
                packet_auth: auth,
            },
            endpoint,
            rekey_every_ms: secret
                .is_some()
                .then(|| (rotation.period_ms() / 4).max(1000)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENDPOINT: &str = r#"
mode: endpoint
listen: 192.168.77.50:6080
saps: [192.168.77.11]
endpoint:
  entity: external/enduser
  device: kw1
  address: fd6b:7779::100/128
  routes: [fd6b:7779::/48]
  key: "0x0000abcd"
entities:
  - entity: default/s1
    prefixes: [fd6b:7779::1/128]
    infra: 10.244.1.5:6080
    sap: 192.168.77.11:6080
    key: 0x12345678
allow:
  - from: external/enduser
    to: default/s1
    ports: [tcp/80, udp/5000-5010]
"#;

    #[test]
    fn an_endpoint_config_compiles() {
        let c: Config = serde_yaml_ng::from_str(ENDPOINT).unwrap();
        let compiled = c.compile(0).unwrap();
        let (dev, local) = compiled.endpoint.unwrap();
        assert_eq!(dev.name, "kw1");
        assert_eq!(dev.mtu, 1456, "1500 less GUE's 36 bytes and the MAC's 8");
        assert_eq!(local.keys, KeyRing::Static(Key(0xabcd)));
        let s1 = compiled
            .tables
            .fib
            .lookup("fd6b:7779::1".parse().unwrap())
            .unwrap();
        assert_eq!(s1.keys, KeyRing::Static(Key(0x1234_5678)));
        let me = compiled
            .tables
            .fib
            .lookup("fd6b:7779::100".parse().unwrap())
            .unwrap();
        assert_eq!(me.infra, "192.168.77.50:6080".parse().unwrap());
        assert!(
            compiled
                .tables
                .saps
                .contains(&"192.168.77.11".parse::<IpAddr>().unwrap())
        );
    }

    #[test]
    fn derived_keys_are_compiled_again_a_few_times_per_period_and_move_with_their_epochs() {
        assert_eq!(
            serde_yaml_ng::from_str::<Config>(ENDPOINT)
                .unwrap()
                .compile(0)
                .unwrap()
                .rekey_every_ms,
            None,
            "static keys never change"
        );
        let dir = std::env::temp_dir().join(format!("kw-sap-rekey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, [7u8; 32]).unwrap();
        let yaml = ENDPOINT.replace("    key: 0x12345678\n", "").replace(
            "saps: [",
            &format!(
                "secretFile: {}\nrotation: {{periodSeconds: 10, graceSeconds: 4}}\nsaps: [",
                secret.display()
            ),
        );
        let c: Config = serde_yaml_ng::from_str(&yaml).unwrap();
        let s1 = "fd6b:7779::1".parse().unwrap();
        let at = |ms: u64| {
            let compiled = c.compile(ms).unwrap();
            assert_eq!(compiled.rekey_every_ms, Some(2500));
            compiled.tables.fib.lookup(s1).unwrap().keys.key_at(ms)
        };
        // Three epochs on, the first compile's ring no longer holds the key in force.
        let first = c.compile(0).unwrap().tables.fib.lookup(s1).unwrap().keys;
        assert!(at(30_000).is_some());
        assert_eq!(first.key_at(30_000), None);
        assert_ne!(at(0), at(30_000));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mistakes_are_named() {
        let bad = |yaml: &str, needle: &str| {
            let err = serde_yaml_ng::from_str::<Config>(yaml)
                .map_err(|e| e.to_string())
                .and_then(|c| c.compile(0).map(|_| ()).map_err(|e| e.to_string()))
                .unwrap_err();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        };
        bad(
            "mode: endpoint\nlisten: 1.2.3.4:6080\n",
            "needs an `endpoint` section",
        );
        bad("mode: gateway\nlisten: 1.2.3.4:6080\n", "unknown variant");
        bad(
            "mode: sap\nlisten: 1.2.3.4:6080\nentities: [{entity: a, prefixes: [10.0.0.1/32], infra: 1.1.1.1:6080}]\n",
            "has no key",
        );
        bad(
            "mode: sap\nlisten: 1.2.3.4:6080\nbogus: 1\n",
            "unknown field",
        );
        bad(&ENDPOINT.replace("tcp/80", "icmp/1"), "unknown protocol");
        bad(
            &ENDPOINT.replace("udp/5000-5010", "udp/5010-5000"),
            "backwards",
        );
        bad(
            &ENDPOINT.replace("to: default/s1", "to: default/s9"),
            "unknown entity",
        );
        bad(
            &ENDPOINT.replace("fd6b:7779::100/128", "fd6b:7779::100/64"),
            "single address",
        );
        bad(&ENDPOINT.replace("0x12345678", "0xzz"), "not a 32-bit key");
    }
}
