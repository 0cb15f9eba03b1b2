//! Where a node claims overlay blocks, so that no two nodes ever hand out the same address:
//! - `file` source: one file per block in the shared directory (`<dir>/<network>/<index>.yaml`,
//!   an `OverlayBlock` document, so the file source reads every node's blocks as the kube source
//!   watches them), created whole by a hard link that fails when the name exists, so the
//!   directory is the lock;
//! - `kubernetes` source: one `OverlayBlock` object per block, named `<network>-<index>`. The API
//!   server creates a name once — a second create is 409 Conflict — so the create is the lock.
//!
//! A node's blocks are found again after a restart by listing; the blocks of a node that has gone
//! away are deleted by [`KubeClaims::reclaim`], and then free for others. Every call here may wait
//! on the API server: the agent makes them outside its state lock.

use std::collections::BTreeSet;
use std::io;
use std::path::PathBuf;

use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Error};

use crate::ipam::Blocks;
use crate::model::{OverlayBlockResource, OverlayBlockSpec, OverlayNetwork};

/// Why a block could not be claimed or found.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("overlay network {network}: no free address and no block left to claim")]
    Exhausted { network: String },
    #[error("{path}: {source}", path = path.display())]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the API server: {0}")]
    Api(#[from] Error),
    #[error("block index {0} does not fit an OverlayBlock")]
    Index(u128),
}

/// Claims as files in a shared directory.
#[derive(Debug, Clone)]
pub struct FileClaims {
    pub dir: PathBuf,
}

fn file_err(path: PathBuf) -> impl FnOnce(io::Error) -> ClaimError {
    move |source| ClaimError::File { path, source }
}

impl FileClaims {
    fn try_claim(&self, network: &str, index: u128, node: &str) -> Result<bool, ClaimError> {
        let dir = self.dir.join(network);
        std::fs::create_dir_all(&dir).map_err(file_err(dir.clone()))?;
        let path = dir.join(format!("{index}.yaml"));
        if dir.join(index.to_string()).exists() {
            // Claimed by a version that wrote the holder's name alone.
            return Ok(false);
        }
        let text =
            serde_yaml_ng::to_string(&block(network, index, node)?).expect("a block serializes");
        // Written whole under a name of its own, then linked into place: link(2) fails when the
        // name exists, so the claim is atomic and a reader never sees half a document.
        let tmp = dir.join(format!(".{index}.{node}.{}.tmp", std::process::id()));
        keyway_sap::io::fs::write_atomic(&tmp, text.as_bytes(), 0o644)
            .map_err(file_err(tmp.clone()))?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(file_err(path)(e)),
        }
    }

    /// Every (index, holder) of `network`: `OverlayBlock` documents, and the bare holder names
    /// earlier versions wrote.
    fn all(&self, network: &str) -> Vec<(u128, String)> {
        let Ok(rd) = std::fs::read_dir(self.dir.join(network)) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let text = std::fs::read_to_string(e.path()).ok()?;
                if let Some(idx) = name.strip_suffix(".yaml") {
                    let b: OverlayBlockResource = serde_yaml_ng::from_str(&text).ok()?;
                    return Some((idx.parse().ok()?, b.spec.node));
                }
                Some((name.parse().ok()?, text.trim().to_string()))
            })
            .collect()
    }
}

/// Claims as `OverlayBlock` objects.
#[derive(Clone)]
pub struct KubeClaims {
    api: Api<OverlayBlockResource>,
}

impl std::fmt::Debug for KubeClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeClaims").finish_non_exhaustive()
    }
}

/// Block `index` of `network`, held by `node`: what either kind of claim writes.
fn block(network: &str, index: u128, node: &str) -> Result<OverlayBlockResource, ClaimError> {
    let index = u64::try_from(index).map_err(|_| ClaimError::Index(index))?;
    Ok(OverlayBlockResource::new(
        &block_name(network, index),
        OverlayBlockSpec {
            network: network.to_string(),
            index,
            node: node.to_string(),
        },
    ))
}

/// The object name of block `index` of `network`.
pub fn block_name(network: &str, index: u64) -> String {
    format!("{network}-{index}")
}

impl KubeClaims {
    pub fn new(client: kube::Client) -> KubeClaims {
        KubeClaims {
            api: Api::all(client),
        }
    }

    async fn all(&self) -> Result<Vec<OverlayBlockSpec>, ClaimError> {
        let list = self.api.list(&ListParams::default()).await?;
        Ok(list.items.into_iter().map(|b| b.spec).collect())
    }

    async fn try_claim(&self, network: &str, index: u128, node: &str) -> Result<bool, ClaimError> {
        let block = block(network, index, node)?;
        let name = block.metadata.name.clone().unwrap_or_default();
        match self.api.create(&PostParams::default(), &block).await {
            Ok(_) => Ok(true),
            Err(Error::Api(s)) if s.code == 409 => {
                // Someone holds it — perhaps this node, before a restart.
                let held = self.api.get_opt(&name).await?;
                Ok(held.is_some_and(|b| b.spec.node == node))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the blocks of nodes not in `live`; returns how many. Their pods are gone with
    /// their node, so nothing still uses the addresses.
    pub async fn reclaim(&self, live: &BTreeSet<String>) -> Result<usize, ClaimError> {
        let orphans: Vec<OverlayBlockSpec> = self
            .all()
            .await?
            .into_iter()
            .filter(|b| !live.contains(&b.node))
            .collect();
        for b in &orphans {
            let name = block_name(&b.network, b.index);
            match self.api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(
                    block = name,
                    node = b.node,
                    "reclaimed the block of a node that is gone"
                ),
                Err(Error::Api(s)) if s.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(orphans.len())
    }
}

/// Where this agent claims blocks.
#[derive(Debug, Clone)]
pub enum Claims {
    Files(FileClaims),
    Kube(Box<KubeClaims>),
}

impl Claims {
    /// Every (index, holder) of `network`.
    async fn all(&self, network: &str) -> Result<Vec<(u128, String)>, ClaimError> {
        match self {
            Claims::Files(f) => Ok(f.all(network)),
            Claims::Kube(k) => Ok(k
                .all()
                .await?
                .into_iter()
                .filter(|b| b.network == network)
                .map(|b| (u128::from(b.index), b.node))
                .collect()),
        }
    }

    /// The blocks `node` holds in `network`, in order.
    pub async fn held(&self, network: &str, node: &str) -> Result<Vec<u128>, ClaimError> {
        let mut v: Vec<u128> = self
            .all(network)
            .await?
            .into_iter()
            .filter(|(_, holder)| holder == node)
            .map(|(i, _)| i)
            .collect();
        v.sort();
        Ok(v)
    }

    /// Claims block `index` of `network` for `node` if nobody holds it; `Ok(false)` when taken.
    pub async fn try_claim(
        &self,
        network: &str,
        index: u128,
        node: &str,
    ) -> Result<bool, ClaimError> {
        match self {
            Claims::Files(f) => f.try_claim(network, index, node),
            Claims::Kube(k) => k.try_claim(network, index, node).await,
        }
    }

    /// Claims the lowest block of `net` that nobody holds, trying the next one after each lost
    /// race; its index.
    pub async fn claim_next(&self, net: &OverlayNetwork, node: &str) -> Result<u128, ClaimError> {
        let geo = Blocks::of(net);
        let taken: BTreeSet<u128> = self
            .all(&net.name)
            .await?
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        let mut idx = 0u128;
        while idx < geo.count {
            if !taken.contains(&idx) && self.try_claim(&net.name, idx, node).await? {
                tracing::info!(network = %net.name, block = %geo.prefix(idx), "claimed an overlay block");
                return Ok(idx);
            }
            idx += 1;
        }
        Err(ClaimError::Exhausted {
            network: net.name.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_testing::Scratch;

    fn net(cidr: &str, block: u8) -> OverlayNetwork {
        OverlayNetwork::new("v4", cidr.parse().unwrap(), block)
    }

    #[tokio::test]
    async fn file_claims_are_exclusive_and_found_again() {
        let t = Scratch::new("claims-files");
        let claims = Claims::Files(FileClaims {
            dir: t.path().to_path_buf(),
        });
        let n = net("10.20.0.0/24", 26);
        assert_eq!(claims.claim_next(&n, "node-1").await.unwrap(), 0);
        assert_eq!(claims.claim_next(&n, "node-2").await.unwrap(), 1);
        assert!(!claims.try_claim("v4", 0, "node-2").await.unwrap(), "taken");
        assert_eq!(claims.claim_next(&n, "node-1").await.unwrap(), 2);
        assert_eq!(claims.held("v4", "node-1").await.unwrap(), [0, 2]);
        assert_eq!(claims.claim_next(&n, "node-2").await.unwrap(), 3);
        assert!(matches!(
            claims.claim_next(&n, "node-3").await,
            Err(ClaimError::Exhausted { .. })
        ));
        // What the file source reads: the same blocks as objects.
        let text = std::fs::read_to_string(t.path().join("v4/2.yaml")).unwrap();
        let objects = crate::source::parse_file(&text).unwrap();
        assert!(
            matches!(&objects[..], [crate::model::Object::OverlayBlock(name, b)]
                if name == "v4-2" && b.node == "node-1" && b.index == 2),
            "{objects:?}"
        );
    }

    #[tokio::test]
    async fn blocks_claimed_by_an_earlier_version_stay_theirs() {
        let t = Scratch::new("claims-old");
        std::fs::create_dir_all(t.path().join("v4")).unwrap();
        std::fs::write(t.path().join("v4/0"), "node-1\n").unwrap();
        let claims = Claims::Files(FileClaims {
            dir: t.path().to_path_buf(),
        });
        assert_eq!(claims.held("v4", "node-1").await.unwrap(), [0]);
        assert!(!claims.try_claim("v4", 0, "node-2").await.unwrap());
    }

    #[tokio::test]
    async fn racing_nodes_never_share_a_block() {
        let t = Scratch::new("claims-race");
        let n = net("10.20.0.0/24", 28);
        let tasks: Vec<_> = ["node-1", "node-2", "node-3"]
            .into_iter()
            .map(|node| {
                let claims = Claims::Files(FileClaims {
                    dir: t.path().to_path_buf(),
                });
                let n = n.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    while let Ok(i) = claims.claim_next(&n, node).await {
                        got.push(i);
                    }
                    got
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort();
        assert_eq!(
            all,
            (0..16).collect::<Vec<u128>>(),
            "each of the 16 blocks once"
        );
    }
}
