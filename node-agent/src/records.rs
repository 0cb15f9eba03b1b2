//! The agent's files: the state directory, with one record per attachment, written atomically, so
//! that a new agent finds every pod the old one served and re-attaches without the pod noticing
//! more than a pause; and, with the `file` source, the cluster secret.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnetwork::IpNetwork;
use keyway_protocol::handoff::{Attachment, NetworkGrant, PodRef};
use keyway_sap::io::fs::{file_name_part, remove_if_present, write_atomic};
use serde::{Deserialize, Serialize};

use keyway_core::key::{ClusterSecret, KeyError};

use crate::compile::pod_entity;
use crate::model::ObjectKey;

/// What the agent needs to re-attach to a pod after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attached {
    pub netns_path: String,
    /// (device, inode) of the namespace when it was handed over: a path that now names another
    /// namespace is not the pod's.
    pub netns_id: (u64, u64),
    pub infra_ip: IpAddr,
    pub mtu: u32,
    pub node_addresses: Vec<IpNetwork>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub attachment: Attachment,
    pub pod: PodRef,
    /// The addresses allocated to it (after `Allocate`).
    pub networks: Vec<NetworkGrant>,
    /// Set once the pod was handed over (`Add`).
    #[serde(default)]
    pub attached: Option<Attached>,
}

impl Record {
    /// The Kubernetes pod it is for, if any (the runtime may not say).
    pub fn pod_key(&self) -> Option<ObjectKey> {
        self.pod
            .is_kubernetes()
            .then(|| ObjectKey::new(&self.pod.namespace, &self.pod.name))
    }

    /// The entity name its keys are derived from.
    pub fn entity(&self) -> Arc<str> {
        match self.pod_key() {
            Some(k) => pod_entity(&k),
            None => format!("container/{}", self.attachment.container_id).into(),
        }
    }
}

/// Why the state directory failed.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}", path = path.display())]
pub struct StoreError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(state_dir: &Path) -> Result<StateDir, StoreError> {
        let dir = state_dir.join("attachments");
        std::fs::create_dir_all(&dir).map_err(|source| StoreError {
            path: dir.clone(),
            source,
        })?;
        Ok(StateDir { dir })
    }

    fn path(&self, a: &Attachment) -> PathBuf {
        self.dir.join(format!(
            "{}-{}.json",
            file_name_part(&a.container_id),
            file_name_part(&a.ifname)
        ))
    }

    /// Writes a record durably (owner-only: it names the pod's namespace).
    pub fn save(&self, r: &Record) -> Result<(), StoreError> {
        let text = serde_json::to_vec_pretty(r).expect("records serialize");
        let path = self.path(&r.attachment);
        write_atomic(&path, &text, 0o600).map_err(|source| StoreError { path, source })
    }

    pub fn remove(&self, a: &Attachment) -> Result<(), StoreError> {
        let path = self.path(a);
        remove_if_present(&path).map_err(|source| StoreError { path, source })
    }

    /// Every readable record; unreadable ones are reported and left in place for an operator.
    pub fn load_all(&self) -> Vec<Record> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let bytes = match std::fs::read(&p) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(file = %p.display(), error = %e, "cannot read an attachment record; leaving it");
                    continue;
                }
            };
            match serde_json::from_slice(&bytes) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::error!(file = %p.display(), error = %e, "unreadable attachment record; leaving it")
                }
            }
        }
        out.sort_by(|a: &Record, b| a.attachment.cmp(&b.attachment));
        out
    }

    /// How many files the directory holds (records and anything else), for leak checks.
    pub fn count(&self) -> usize {
        std::fs::read_dir(&self.dir)
            .map(|rd| rd.flatten().count())
            .unwrap_or(0)
    }
}

/// Why the cluster secret cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(transparent)]
    File(#[from] StoreError),
    #[error(
        "{path} can be read by others (mode {mode:o}): every key derives from it; make it owner-only (chmod 600) and consider it leaked", path = path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{path}: {source}", path = path.display())]
    Unusable {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
}

/// Reads the cluster secret, creating one (owner-only, durably, with a warning) when the file
/// does not exist. A secret that others than its owner may read is refused.
pub fn load_secret(path: &Path) -> Result<ClusterSecret, SecretError> {
    let err = |source| StoreError {
        path: path.to_path_buf(),
        source,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => {
            let mode = keyway_sap::io::fs::mode_of(path, 0);
            if mode & 0o077 != 0 {
                return Err(SecretError::Exposed {
                    path: path.to_path_buf(),
                    mode,
                });
            }
            b
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let b = keyway_sap::io::fs::random_bytes(32).map_err(err)?;
            write_atomic(path, &b, 0o600).map_err(err)?;
            tracing::warn!(path = %path.display(), "no cluster secret: created one. Every node of a cluster must share the same secret.");
            b
        }
        Err(e) => return Err(err(e).into()),
    };
    ClusterSecret::new(bytes).map_err(|source| SecretError::Unusable {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_testing::Scratch;

    #[test]
    fn a_missing_secret_is_made_once_owner_only_and_a_short_one_refused() {
        let t = Scratch::new("records-secret");
        let path = t.join("cluster-secret");
        let a = load_secret(&path).unwrap();
        assert_eq!(keyway_sap::io::fs::mode_of(&path, 0), 0o600);
        let b = load_secret(&path).unwrap();
        assert_eq!(
            a.derive("x/a", keyway_core::key::Epoch(1)),
            b.derive("x/a", keyway_core::key::Epoch(1)),
            "read back, not made again"
        );
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            load_secret(&path),
            Err(SecretError::Unusable { .. })
        ));
        // Readable by the group or the world: refused, whatever it holds.
        for mode in [0o640, 0o604, 0o644] {
            write_atomic(&path, b"long enough to be a secret, 32B!", mode).unwrap();
            let e = load_secret(&path).unwrap_err();
            assert!(matches!(e, SecretError::Exposed { .. }), "{mode:o}: {e}");
            assert!(
                !e.to_string().contains("long enough"),
                "the message never shows the secret: {e}"
            );
        }
        write_atomic(&path, b"long enough to be a secret, 32B!", 0o400).unwrap();
        assert!(load_secret(&path).is_ok(), "owner read-only is fine");
    }
}
