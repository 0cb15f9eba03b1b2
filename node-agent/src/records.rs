//! The agent's state directory: one record per attachment, written atomically, so that a new agent
//! finds every pod the old one served and re-attaches without the pod noticing more than a pause.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use keyway_cni::handoff::{Attachment, NetworkGrant, PodRef};
use serde::{Deserialize, Serialize};

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
    /// The entity name its keys are derived from.
    pub fn entity(&self) -> String {
        if self.pod.is_kubernetes() {
            format!("{}/{}", self.pod.namespace, self.pod.name)
        } else {
            format!("container/{}", self.attachment.container_id)
        }
    }
}

#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl StateDir {
    pub fn new(state_dir: &Path) -> io::Result<StateDir> {
        let dir = state_dir.join("attachments");
        std::fs::create_dir_all(&dir)?;
        Ok(StateDir { dir })
    }

    fn path(&self, a: &Attachment) -> PathBuf {
        self.dir.join(format!(
            "{}-{}.json",
            sanitize(&a.container_id),
            sanitize(&a.ifname)
        ))
    }

    pub fn save(&self, r: &Record) -> io::Result<()> {
        let text = serde_json::to_vec_pretty(r).map_err(io::Error::other)?;
        crate::source::write_atomic(&self.path(&r.attachment), &text)
    }

    pub fn remove(&self, a: &Attachment) -> io::Result<()> {
        match std::fs::remove_file(self.path(a)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
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
            match std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::error!(file = %p.display(), error = %e, "unreadable attachment record; leaving it")
                }
            }
        }
        out.sort_by(|a: &Record, b| a.attachment.cmp(&b.attachment));
        out
    }

    pub fn count(&self) -> usize {
        std::fs::read_dir(&self.dir)
            .map(|rd| rd.flatten().count())
            .unwrap_or(0)
    }
}
