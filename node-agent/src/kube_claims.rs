//! Overlay block claims through the API server: one `OverlayBlock` object per claimed block, named
//! `<network>-<index>`. The API server creates a name once — a second create is 409 Conflict —
//! so the create is the lock, and two agents racing for a block cannot both get it. A node's
//! blocks are found again after a restart by listing; the blocks of a node that has gone away are
//! deleted by [`KubeClaims::reclaim`], and then free for others.
//!
//! [`BlockClaims`] is synchronous (IPAM runs under the agent's state lock); these calls block
//! the current worker with `block_in_place` rather than stall the runtime.

use std::collections::BTreeSet;
use std::io;

use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, Error};
use tokio::runtime::Handle;

use crate::ipam::BlockClaims;
use crate::model::{OverlayBlockResource, OverlayBlockSpec};

/// Claims as `OverlayBlock` objects.
#[derive(Clone)]
pub struct KubeClaims {
    api: Api<OverlayBlockResource>,
    handle: Handle,
}

impl std::fmt::Debug for KubeClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeClaims").finish_non_exhaustive()
    }
}

/// Runs an API call from synchronous code: on a runtime worker without stalling the runtime
/// (`block_in_place`), elsewhere on `handle`.
pub fn block_on<T>(handle: &Handle, f: impl std::future::Future<Output = T>) -> T {
    match Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(|| handle.block_on(f)),
        Err(_) => handle.block_on(f),
    }
}

/// The object name of block `index` of `network`.
pub fn block_name(network: &str, index: u64) -> String {
    format!("{network}-{index}")
}

fn io(e: Error) -> io::Error {
    io::Error::other(e)
}

impl KubeClaims {
    /// Claims made through `client`; `handle` runs the requests.
    pub fn new(client: kube::Client, handle: Handle) -> KubeClaims {
        KubeClaims {
            api: Api::all(client),
            handle,
        }
    }

    fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        block_on(&self.handle, f)
    }

    fn all(&self) -> io::Result<Vec<OverlayBlockSpec>> {
        self.run(async {
            let list = self.api.list(&ListParams::default()).await.map_err(io)?;
            Ok(list.items.into_iter().map(|b| b.spec).collect())
        })
    }

    /// Deletes the blocks of nodes not in `live`; returns how many. Their pods are gone with
    /// their node, so nothing still uses the addresses.
    pub fn reclaim(&self, live: &BTreeSet<String>) -> io::Result<usize> {
        let orphans: Vec<OverlayBlockSpec> = self
            .all()?
            .into_iter()
            .filter(|b| !live.contains(&b.node))
            .collect();
        self.run(async {
            for b in &orphans {
                let name = block_name(&b.network, b.index);
                match self.api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => tracing::info!(
                        block = name,
                        node = b.node,
                        "reclaimed the block of a node that is gone"
                    ),
                    Err(Error::Api(s)) if s.is_not_found() => {}
                    Err(e) => return Err(io(e)),
                }
            }
            Ok(orphans.len())
        })
    }
}

impl BlockClaims for KubeClaims {
    fn try_claim(&self, network: &str, index: u128, node: &str) -> io::Result<bool> {
        let index = u64::try_from(index).map_err(|_| {
            io::Error::other(format!("block index {index} does not fit an OverlayBlock"))
        })?;
        let name = block_name(network, index);
        let block = OverlayBlockResource {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            spec: OverlayBlockSpec {
                network: network.to_string(),
                index,
                node: node.to_string(),
            },
        };
        self.run(async {
            match self.api.create(&PostParams::default(), &block).await {
                Ok(_) => Ok(true),
                Err(Error::Api(s)) if s.code == 409 => {
                    // Someone holds it — perhaps this node, before a restart.
                    let held = self.api.get_opt(&name).await.map_err(io)?;
                    Ok(held.is_some_and(|b| b.spec.node == node))
                }
                Err(e) => Err(io(e)),
            }
        })
    }

    fn held(&self, network: &str, node: &str) -> io::Result<Vec<u128>> {
        let mut v: Vec<u128> = self
            .all()?
            .into_iter()
            .filter(|b| b.network == network && b.node == node)
            .map(|b| u128::from(b.index))
            .collect();
        v.sort();
        Ok(v)
    }

    fn claimed(&self, network: &str) -> io::Result<BTreeSet<u128>> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|b| b.network == network)
            .map(|b| u128::from(b.index))
            .collect())
    }
}
