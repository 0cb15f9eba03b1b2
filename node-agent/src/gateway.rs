//! The node's gateway table, kept in line with the node's protected pods (the table itself, the
//! device and the routes are [`keyway_protocol::gateway`]'s, shared with the installer).

use std::net::IpAddr;
use std::sync::Mutex;

pub use keyway_protocol::gateway::*;
use keyway_sap::io::nft;

/// The node's table as last installed: replaced when this node's protected pods change.
#[derive(Debug)]
pub struct NodeTable {
    cfg: GatewayConfig,
    installed: Mutex<Option<Vec<IpAddr>>>,
}

impl NodeTable {
    pub fn new(cfg: GatewayConfig) -> NodeTable {
        NodeTable {
            cfg,
            installed: Mutex::new(None),
        }
    }

    /// Installs the table for `pods` (this node's protected pods' pod IPs) in the calling
    /// process's namespace, unless it is installed already.
    pub fn apply(&self, mut pods: Vec<IpAddr>) -> Result<(), nft::NftError> {
        pods.sort();
        pods.dedup();
        let mut installed = self.installed.lock().unwrap_or_else(|e| e.into_inner());
        if installed.as_ref() == Some(&pods) {
            return Ok(());
        }
        *installed = None;
        nft::Socket::open()?.replace_table(&table(&self.cfg, &pods))?;
        tracing::info!(pods = pods.len(), table = TABLE, "gateway table installed");
        *installed = Some(pods);
        Ok(())
    }
}
