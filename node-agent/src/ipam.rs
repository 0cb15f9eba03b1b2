//! Overlay address management across nodes. Each overlay network is cut into blocks; a node claims
//! whole blocks ([`crate::claims`]: create-if-absent, so the claim is the lock and two nodes
//! racing for a block cannot both get it) and hands out addresses from its own blocks only. An
//! attachment asking again gets the same addresses; released addresses return to the pool.
//!
//! [`Ipam`] is the address book alone, with no I/O: when it has no free address in a network it
//! says so ([`NeedBlock`]) and the agent gets a block (outside its state lock) and adds it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use keyway_protocol::handoff::Attachment;

use crate::model::OverlayNetwork;

/// The geometry of a network's blocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Blocks {
    base: u128,
    v4: bool,
    block_bits: u32,
    /// How many blocks the network has.
    pub count: u128,
}

impl Blocks {
    pub fn of(net: &OverlayNetwork) -> Blocks {
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

    /// The block `ip` lies in, when it lies in the network.
    pub fn index_of(&self, ip: IpAddr) -> Option<u128> {
        let a = match ip {
            IpAddr::V4(a) if self.v4 => u128::from(u32::from(a)),
            IpAddr::V6(a) if !self.v4 => u128::from(a),
            _ => return None,
        };
        let block = a.checked_sub(self.base)? >> self.block_bits;
        (block < self.count).then_some(block)
    }

    /// The block as a prefix, for logs.
    pub fn prefix(&self, block: u128) -> String {
        let len = if self.v4 { 32 } else { 128 } - self.block_bits;
        IpNetwork::new(self.addr(block, 0), len as u8)
            .map(|n| n.to_string())
            .unwrap_or_default()
    }
}

/// No free address in the named network's blocks (or its blocks not known yet): get one, then
/// ask again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeedBlock(pub String);

/// What a node's IPAM holds.
#[derive(Debug, Default)]
pub struct Ipam {
    /// Blocks this node holds, per network; a network is absent until its blocks are known.
    blocks: BTreeMap<String, Vec<u128>>,
    used: BTreeMap<IpAddr, Attachment>,
    by_attachment: BTreeMap<Attachment, Vec<(String, IpAddr)>>,
}

impl Ipam {
    /// Whether the blocks this node holds in `network` are known.
    pub fn knows(&self, network: &str) -> bool {
        self.blocks.contains_key(network)
    }

    /// Adds blocks this node holds (found again, or newly claimed).
    pub fn add_blocks(&mut self, network: &str, blocks: impl IntoIterator<Item = u128>) {
        let held = self.blocks.entry(network.to_string()).or_default();
        for b in blocks {
            if !held.contains(&b) {
                held.push(b);
            }
        }
        held.sort();
    }

    /// Records an address held by an attachment (restored from the state directory).
    pub fn restore(&mut self, att: &Attachment, network: &str, ip: IpAddr) {
        self.used.insert(ip, att.clone());
        let held = self.by_attachment.entry(att.clone()).or_default();
        if !held.iter().any(|(n, _)| n == network) {
            held.push((network.to_string(), ip));
        }
    }

    /// The addresses of `att`, one per network, allocating what it lacks from held blocks.
    pub fn allocate(
        &mut self,
        att: &Attachment,
        networks: &[OverlayNetwork],
    ) -> Result<Vec<IpAddr>, NeedBlock> {
        let mut out = Vec::new();
        for net in networks {
            let held = self.by_attachment.get(att).into_iter().flatten();
            if let Some((_, ip)) = held.into_iter().find(|(n, _)| *n == net.name) {
                out.push(*ip);
                continue;
            }
            let ip = self
                .free_addresses(net)
                .next()
                .ok_or_else(|| NeedBlock(net.name.clone()))?;
            self.restore(att, &net.name, ip);
            out.push(ip);
        }
        Ok(out)
    }

    fn free_addresses<'a>(&'a self, net: &OverlayNetwork) -> impl Iterator<Item = IpAddr> + 'a {
        let geo = Blocks::of(net);
        let blocks = self.blocks.get(&net.name).into_iter().flatten();
        blocks
            .filter(move |b| **b < geo.count)
            .flat_map(move |&b| geo.offsets().map(move |off| geo.addr(b, off)))
            .filter(|ip| !self.used.contains_key(ip))
    }

    /// Whether an address of `net` is free in this node's blocks.
    pub fn has_free(&self, net: &OverlayNetwork) -> bool {
        self.free_addresses(net).next().is_some()
    }

    /// Whether `net` has fewer than a quarter of a block free (at least one): time to claim the
    /// next block before an ADD has to wait for one.
    pub fn running_low(&self, net: &OverlayNetwork) -> bool {
        let geo = Blocks::of(net);
        let want = (geo.offsets().end - geo.offsets().start)
            .div_ceil(4)
            .clamp(1, 64) as usize;
        self.free_addresses(net).take(want).count() < want
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

    fn net(name: &str, cidr: &str, block: u8) -> OverlayNetwork {
        OverlayNetwork::new(name, cidr.parse().unwrap(), block)
    }

    fn att(i: u32) -> Attachment {
        Attachment {
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
        }
    }

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn without_a_block_it_asks_for_one_and_then_allocates_from_it() {
        let n = net("v4", "100.64.0.0/10", 24);
        let mut ipam = Ipam::default();
        assert_eq!(
            ipam.allocate(&att(1), std::slice::from_ref(&n)),
            Err(NeedBlock("v4".into()))
        );
        assert!(!ipam.knows("v4"));
        ipam.add_blocks("v4", [0]);
        let a = ipam.allocate(&att(1), std::slice::from_ref(&n)).unwrap();
        assert_eq!(a, ips(&["100.64.0.1"]));
        assert_eq!(
            ipam.allocate(&att(1), std::slice::from_ref(&n)).unwrap(),
            a,
            "idempotent"
        );
        let b = ipam.allocate(&att(2), std::slice::from_ref(&n)).unwrap();
        assert_eq!(b, ips(&["100.64.0.2"]));
        assert_eq!(ipam.release(&att(1)).len(), 1);
        assert_eq!(
            ipam.allocate(&att(3), std::slice::from_ref(&n)).unwrap(),
            a,
            "released address reused"
        );
        assert_eq!(ipam.in_use(), 2);
        assert_eq!(ipam.holder(a[0]), Some(&att(3)));
    }

    #[test]
    fn a_full_block_asks_for_the_next_and_runs_low_before_it_is_full() {
        let n = net("small", "10.10.0.0/24", 30); // blocks of 4: two usable addresses each
        let mut ipam = Ipam::default();
        ipam.add_blocks("small", [0]);
        assert!(!ipam.running_low(&n));
        let first = ipam.allocate(&att(0), std::slice::from_ref(&n)).unwrap();
        assert!(!ipam.running_low(&n), "one of two left is a quarter");
        let second = ipam.allocate(&att(1), std::slice::from_ref(&n)).unwrap();
        assert_eq!([first, second].concat(), ips(&["10.10.0.1", "10.10.0.2"]));
        assert!(ipam.running_low(&n));
        assert!(ipam.allocate(&att(2), std::slice::from_ref(&n)).is_err());
        ipam.add_blocks("small", [2]);
        assert_eq!(
            ipam.allocate(&att(2), std::slice::from_ref(&n)).unwrap(),
            ips(&["10.10.0.9"])
        );
    }

    #[test]
    fn restored_addresses_are_not_given_again() {
        let n = net("v4", "100.64.0.0/10", 24);
        let mut ipam = Ipam::default();
        ipam.restore(&att(1), "v4", "100.64.0.1".parse().unwrap());
        ipam.add_blocks("v4", [0]);
        assert_eq!(
            ipam.allocate(&att(2), std::slice::from_ref(&n)).unwrap(),
            ips(&["100.64.0.2"]),
            "same block, next address"
        );
    }

    #[test]
    fn ipv6_networks_and_several_at_once() {
        let v6 = net("v6", "fd6b:7779::/48", 112);
        let v4 = net("v4", "100.64.0.0/10", 24);
        let mut ipam = Ipam::default();
        ipam.add_blocks("v6", [0]);
        ipam.add_blocks("v4", [3]);
        assert_eq!(
            ipam.allocate(&att(1), &[v4, v6]).unwrap(),
            ips(&["100.64.3.1", "fd6b:7779::1"])
        );
        assert_eq!(
            Blocks::of(&net("v4", "100.64.0.0/10", 24)).prefix(3),
            "100.64.3.0/24"
        );
    }
}
