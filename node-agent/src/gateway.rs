//! The node's gateway table, kept in line with the node's protected pods (the table itself, the
//! device and the routes are [`keyway_protocol::gateway`]'s, shared with the installer).

use std::net::IpAddr;
use std::sync::Mutex;

pub use keyway_protocol::gateway::*;
use keyway_sap::io::netlink::{Bridge, Netlink, NetlinkError};
use keyway_sap::io::nft;

/// What the node's tables were made for: the node's protected pods' pod IPs, and its bridges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    pub pods: Vec<IpAddr>,
    pub bridges: Vec<Bridge>,
}

/// The node's tables as last installed: replaced when this node's protected pods or bridges
/// change.
#[derive(Debug)]
pub struct NodeTable {
    cfg: GatewayConfig,
    installed: Mutex<Option<NodeFacts>>,
    /// The session the node's bridges are listed on, opened at first use (and again after one
    /// fails).
    netlink: Mutex<Option<Netlink>>,
}

impl NodeTable {
    pub fn new(cfg: GatewayConfig) -> NodeTable {
        NodeTable {
            cfg,
            installed: Mutex::new(None),
            netlink: Mutex::new(None),
        }
    }

    /// The node's bridges and their ports.
    pub async fn bridges(&self) -> Result<Vec<Bridge>, NetlinkError> {
        let nl = {
            let mut held = self.netlink.lock().unwrap_or_else(|e| e.into_inner());
            match &*held {
                Some(nl) => nl.clone(),
                None => held.insert(Netlink::connect()?).clone(),
            }
        };
        let listed = nl.bridges().await;
        if listed.is_err() {
            *self.netlink.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        listed
    }

    /// Installs both tables for `facts` in the calling process's namespace, unless they are
    /// installed already.
    pub fn apply(&self, mut facts: NodeFacts) -> Result<(), nft::NftError> {
        facts.pods.sort();
        facts.pods.dedup();
        if facts.bridges.len() < 2 {
            // With one bridge the rules do not name ports: a new port changes nothing.
            for b in &mut facts.bridges {
                b.ports.clear();
            }
        }
        let mut installed = self.installed.lock().unwrap_or_else(|e| e.into_inner());
        if installed.as_ref() == Some(&facts) {
            return Ok(());
        }
        *installed = None;
        let mut sock = nft::Socket::open()?;
        sock.replace_table(&table(&self.cfg, &facts.pods))?;
        sock.replace_table(&bridge_table(&self.cfg, &facts.bridges))?;
        tracing::info!(
            pods = facts.pods.len(),
            bridges = facts.bridges.len(),
            table = TABLE,
            "gateway tables installed"
        );
        *installed = Some(facts);
        Ok(())
    }
}
