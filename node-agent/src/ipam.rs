//! Overlay address management across nodes. Each overlay network is cut into blocks; a node claims
//! whole blocks (create-if-absent, so the claim is the lock: two nodes racing for a block cannot
//! both get it) and hands out addresses from its own blocks only. An attachment asking again gets
//! the same addresses; released addresses return to the pool.
//!
//! Claims go through [`BlockClaims`]: files created exclusively in the `file` source's directory,
//! or objects created in the API server.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnetwork::IpNetwork;
use keyway_cni::handoff::Attachment;

use crate::model::OverlayNetwork;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("overlay network {network}: no free address and no block left to claim")]
    Exhausted { network: String },
    #[error("overlay network {network}: cannot claim a block: {source}")]
    Claim {
        network: String,
        #[source]
        source: io::Error,
    },
}

/// Where block claims are made.
pub trait BlockClaims: Send + Sync + std::fmt::Debug {
    /// Claims block `index` of `network` for `node` if nobody holds it; `Ok(false)` when taken.
    fn try_claim(&self, network: &str, index: u128, node: &str) -> io::Result<bool>;
    /// The block indices `node` holds in `network`.
    fn held(&self, network: &str, node: &str) -> io::Result<Vec<u128>>;
    /// Every claimed index in `network` (so a search need not try each one).
    fn claimed(&self, network: &str) -> io::Result<BTreeSet<u128>>;
}

/// Claims as files in a shared directory: `<dir>/<network>/<index>` holding the node's name,
/// created with O_EXCL.
#[derive(Debug, Clone)]
pub struct FileClaims {
    pub dir: PathBuf,
}

impl BlockClaims for FileClaims {
    fn try_claim(&self, network: &str, index: u128, node: &str) -> io::Result<bool> {
        let dir = self.dir.join(network);
        std::fs::create_dir_all(&dir)?;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(index.to_string()))
        {
            Ok(mut f) => {
                use std::io::Write;
                f.write_all(node.as_bytes())?;
                f.sync_all()?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn held(&self, network: &str, node: &str) -> io::Result<Vec<u128>> {
        let mut v = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.dir.join(network)) else {
            return Ok(v);
        };
        for e in rd.flatten() {
            let Some(idx) = e.file_name().to_str().and_then(|s| s.parse::<u128>().ok()) else {
                continue;
            };
            if std::fs::read_to_string(e.path()).is_ok_and(|owner| owner.trim() == node) {
                v.push(idx);
            }
        }
        v.sort();
        Ok(v)
    }

    fn claimed(&self, network: &str) -> io::Result<BTreeSet<u128>> {
        let mut s = BTreeSet::new();
        let Ok(rd) = std::fs::read_dir(self.dir.join(network)) else {
            return Ok(s);
        };
        for e in rd.flatten() {
            if let Some(idx) = e.file_name().to_str().and_then(|s| s.parse::<u128>().ok()) {
                s.insert(idx);
            }
        }
        Ok(s)
    }
}

/// The geometry of a network's blocks.
#[derive(Debug, Clone, Copy)]
struct Blocks {
    base: u128,
    v4: bool,
    block_bits: u32,
    count: u128,
}

impl Blocks {
    fn of(net: &OverlayNetwork) -> Blocks {
        let cidr = net.spec.cidr;
        let v4 = cidr.is_ipv4();
        let bits: u32 = if v4 { 32 } else { 128 };
        let prefix = net
            .spec
            .block_prefix
            .unwrap_or(if v4 { 24 } else { 112 })
            .max(cidr.prefix()) as u32;
        let base = match cidr.network() {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        let count = 1u128
            .checked_shl(prefix - cidr.prefix() as u32)
            .unwrap_or(u128::MAX);
        Blocks {
            base,
            v4,
            block_bits: bits - prefix,
            count,
        }
    }

    fn size(&self) -> u128 {
        1u128.checked_shl(self.block_bits).unwrap_or(u128::MAX)
    }

    fn addr(&self, block: u128, offset: u128) -> IpAddr {
        let a = self.base + block * self.size() + offset;
        if self.v4 {
            IpAddr::V4((a as u32).into())
        } else {
            IpAddr::V6(a.into())
        }
    }

    /// Usable offsets: IPv4 blocks of 4 or more skip their first and last address.
    fn offsets(&self) -> std::ops::Range<u128> {
        let size = self.size();
        if self.v4 && size >= 4 {
            1..size - 1
        } else {
            1..size
        }
    }
}

/// What a node's IPAM holds.
#[derive(Debug)]
pub struct Ipam {
    node: String,
    claims: Box<dyn BlockClaims>,
    /// Blocks this node holds, per network.
    blocks: BTreeMap<String, Vec<u128>>,
    used: BTreeMap<IpAddr, Attachment>,
    by_attachment: BTreeMap<Attachment, Vec<(String, IpAddr)>>,
}

impl Ipam {
    pub fn new(node: &str, claims: Box<dyn BlockClaims>) -> Ipam {
        Ipam {
            node: node.to_string(),
            claims,
            blocks: BTreeMap::new(),
            used: BTreeMap::new(),
            by_attachment: BTreeMap::new(),
        }
    }

    fn load_blocks(&mut self, network: &str) -> io::Result<()> {
        if !self.blocks.contains_key(network) {
            let held = self.claims.held(network, &self.node)?;
            self.blocks.insert(network.to_string(), held);
        }
        Ok(())
    }

    /// Records an address held by an attachment (restored from the state directory).
    pub fn restore(&mut self, att: &Attachment, network: &str, ip: IpAddr) {
        self.used.insert(ip, att.clone());
        let held = self.by_attachment.entry(att.clone()).or_default();
        if !held.iter().any(|(n, _)| n == network) {
            held.push((network.to_string(), ip));
        }
    }

    /// The addresses of `att`, one per network, allocating what it lacks.
    pub fn allocate(
        &mut self,
        att: &Attachment,
        networks: &[OverlayNetwork],
    ) -> Result<Vec<IpAddr>, IpamError> {
        let mut out = Vec::new();
        for net in networks {
            if let Some((_, ip)) = self
                .by_attachment
                .get(att)
                .and_then(|v| v.iter().find(|(n, _)| *n == net.name))
            {
                out.push(*ip);
                continue;
            }
            let ip = self.allocate_one(&net.name, net)?;
            self.restore(att, &net.name, ip);
            out.push(ip);
        }
        Ok(out)
    }

    fn allocate_one(&mut self, name: &str, net: &OverlayNetwork) -> Result<IpAddr, IpamError> {
        let claim_err = |source: io::Error| IpamError::Claim {
            network: name.to_string(),
            source,
        };
        self.load_blocks(name).map_err(claim_err)?;
        let geo = Blocks::of(net);
        for &b in &self.blocks[name] {
            if b >= geo.count {
                continue;
            }
            for off in geo.offsets() {
                let ip = geo.addr(b, off);
                if !self.used.contains_key(&ip) {
                    return Ok(ip);
                }
            }
        }
        // Every held block is full: claim the lowest unclaimed one.
        let taken = self.claims.claimed(name).map_err(claim_err)?;
        let mut idx = 0u128;
        while idx < geo.count {
            if !taken.contains(&idx)
                && self
                    .claims
                    .try_claim(name, idx, &self.node)
                    .map_err(claim_err)?
            {
                tracing::info!(network = name, block = %IpNetwork::new(geo.addr(idx, 0), (if geo.v4 { 32 } else { 128 } - geo.block_bits) as u8).map(|n| n.to_string()).unwrap_or_default(), "claimed an overlay block");
                self.blocks.get_mut(name).expect("loaded").push(idx);
                let ip = geo.addr(idx, geo.offsets().start);
                return Ok(ip);
            }
            idx += 1;
        }
        Err(IpamError::Exhausted {
            network: name.to_string(),
        })
    }

    /// Returns an attachment's addresses to the pool; what it held.
    pub fn release(&mut self, att: &Attachment) -> Vec<(String, IpAddr)> {
        let held = self.by_attachment.remove(att).unwrap_or_default();
        for (_, ip) in &held {
            self.used.remove(ip);
        }
        held
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }

    pub fn holder(&self, ip: IpAddr) -> Option<&Attachment> {
        self.used.get(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::OverlayNetworkSpec;

    fn net(name: &str, cidr: &str, block: u8) -> OverlayNetwork {
        OverlayNetwork {
            name: name.into(),
            spec: OverlayNetworkSpec {
                cidr: cidr.parse().unwrap(),
                block_prefix: Some(block),
                device: None,
                pod_selector: None,
                namespace_selector: None,
            },
        }
    }

    fn att(i: u32) -> Attachment {
        Attachment {
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
        }
    }

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(name: &str) -> Tmp {
            let p = std::env::temp_dir().join(format!("keyway-ipam-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            Tmp(p)
        }
        fn claims(&self) -> Box<FileClaims> {
            Box::new(FileClaims {
                dir: self.0.clone(),
            })
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn same_attachment_same_address_and_release_returns_it() {
        let t = Tmp::new("same");
        let n = net("v4", "100.64.0.0/10", 24);
        let mut ipam = Ipam::new("node-1", t.claims());
        let a = ipam.allocate(&att(1), std::slice::from_ref(&n)).unwrap();
        assert_eq!(a, vec!["100.64.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            ipam.allocate(&att(1), std::slice::from_ref(&n)).unwrap(),
            a,
            "idempotent"
        );
        let b = ipam.allocate(&att(2), std::slice::from_ref(&n)).unwrap();
        assert_eq!(b, vec!["100.64.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(ipam.release(&att(1)).len(), 1);
        assert_eq!(
            ipam.allocate(&att(3), std::slice::from_ref(&n)).unwrap(),
            a,
            "released address reused"
        );
        assert_eq!(ipam.in_use(), 2);
    }

    #[test]
    fn a_full_block_claims_the_next() {
        let t = Tmp::new("full");
        let n = net("small", "10.10.0.0/24", 30); // blocks of 4: two usable addresses each
        let mut ipam = Ipam::new("node-1", t.claims());
        let ips: Vec<IpAddr> = (0..5)
            .map(|i| ipam.allocate(&att(i), std::slice::from_ref(&n)).unwrap()[0])
            .collect();
        assert_eq!(
            ips,
            [
                "10.10.0.1",
                "10.10.0.2",
                "10.10.0.5",
                "10.10.0.6",
                "10.10.0.9"
            ]
            .map(|s| s.parse::<IpAddr>().unwrap())
        );
    }

    #[test]
    fn two_nodes_never_share_a_block_or_an_address() {
        let t = Tmp::new("race");
        let n = net("v4", "10.20.0.0/24", 28);
        let handles: Vec<_> = ["node-1", "node-2", "node-3"]
            .into_iter()
            .map(|node| {
                let claims = t.claims();
                let n = n.clone();
                std::thread::spawn(move || {
                    let mut ipam = Ipam::new(node, claims);
                    (0..100)
                        .filter_map(|i| ipam.allocate(&att(i), std::slice::from_ref(&n)).ok())
                        .flatten()
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<IpAddr> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let unique: BTreeSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len(), "an address was given twice");
        // 300 requests for 16 blocks of 14 usable addresses: the /24 runs out, and every
        // address of it was handed out exactly once.
        assert_eq!(all.len(), 16 * 14);
    }

    #[test]
    fn a_restarted_node_finds_its_blocks_and_addresses() {
        let t = Tmp::new("restart");
        let n = net("v4", "100.64.0.0/10", 24);
        let first = {
            let mut ipam = Ipam::new("node-1", t.claims());
            ipam.allocate(&att(1), std::slice::from_ref(&n)).unwrap()[0]
        };
        let mut ipam = Ipam::new("node-1", t.claims());
        ipam.restore(&att(1), "v4", first);
        let second = ipam.allocate(&att(2), std::slice::from_ref(&n)).unwrap()[0];
        assert_eq!(
            second,
            "100.64.0.2".parse::<IpAddr>().unwrap(),
            "same block, next address"
        );
        let mut other = Ipam::new("node-2", t.claims());
        assert_eq!(
            other.allocate(&att(9), std::slice::from_ref(&n)).unwrap()[0],
            "100.64.1.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn ipv6_networks() {
        let t = Tmp::new("v6");
        let n = net("v6", "fd6b:7779::/48", 112);
        let mut ipam = Ipam::new("node-1", t.claims());
        assert_eq!(
            ipam.allocate(&att(1), std::slice::from_ref(&n)).unwrap()[0],
            "fd6b:7779::1".parse::<IpAddr>().unwrap()
        );
    }
}
