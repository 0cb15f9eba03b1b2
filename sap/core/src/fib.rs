//! The forwarding table: overlay IP or prefix → where the entity receives GUE, the SaP that fronts
//! it, its keys and its identity. Longest-prefix match for both families.
//!
//! One hash table per prefix length present, probed from the longest: a lookup costs one probe per
//! distinct prefix length (pods are /32 or /128, so usually one or two), independent of the number
//! of entries. The table is immutable once built; the control plane builds a new one and publishes
//! it atomically (see [`crate::tables`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnetwork::IpNetwork;

use crate::acl::{FastMap, Identity};
use crate::key::KeyRing;

/// Everything the data path needs to know about one overlay destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The entity's name (`namespace/pod`, `external/name`): for logs and key derivation.
    pub entity: Arc<str>,
    pub identity: Identity,
    pub keys: KeyRing,
    /// The entity's own GUE socket address on the underlay (its infrastructure IP, port 6080).
    pub infra: SocketAddr,
    /// The SaP that fronts the entity: its node's SaP, or the gateway of an external entity. `None`
    /// when no SaP is known; traffic then goes direct.
    pub sap: Option<SocketAddr>,
    /// An address off the overlay (outside the cluster, an unprotected pod, a node): it has no
    /// endpoint, so nothing is sent to it over the overlay; what it sends enters through a node's
    /// gateway, which vouches for it (`infra` is that gateway's SaP).
    pub outside: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FibError {
    #[error("prefix {0} is in the FIB twice")]
    Duplicate(IpNetwork),
}

#[derive(Debug, Clone, Default)]
struct Lpm<A> {
    /// Prefix lengths present, longest first, each with its table of masked addresses.
    levels: Vec<(u8, FastMap<A, u32>)>,
}

trait Address: Copy + Eq + std::hash::Hash + std::ops::BitAnd<Output = Self> {
    fn mask(len: u8) -> Self;
}

impl Address for u32 {
    fn mask(len: u8) -> Self {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        }
    }
}

impl Address for u128 {
    fn mask(len: u8) -> Self {
        if len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(len))
        }
    }
}

impl<A: Address> Lpm<A> {
    /// Adds `addr/len` unless it is there already (the first holder keeps it); whether it was new.
    fn insert(&mut self, addr: A, len: u8, idx: u32) -> bool {
        let pos = match self.levels.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(p) => p,
            Err(p) => {
                self.levels.insert(p, (len, FastMap::default()));
                p
            }
        };
        match self.levels[pos].1.entry(addr & A::mask(len)) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(idx);
                true
            }
        }
    }

    #[inline]
    fn lookup(&self, addr: A) -> Option<u32> {
        self.levels
            .iter()
            .find_map(|(len, map)| map.get(&(addr & A::mask(*len))).copied())
    }

    fn len(&self) -> usize {
        self.levels.iter().map(|(_, m)| m.len()).sum()
    }

    /// Every prefix, in no order: its masked address, its length and its route's index.
    fn prefixes(&self) -> impl Iterator<Item = (A, u8, u32)> + '_ {
        self.levels
            .iter()
            .flat_map(|(len, map)| map.iter().map(move |(addr, &idx)| (*addr, *len, idx)))
    }
}

/// The forwarding table.
#[derive(Debug, Clone, Default)]
pub struct Fib {
    v4: Lpm<u32>,
    v6: Lpm<u128>,
    routes: Vec<Route>,
}

impl Fib {
    pub fn builder() -> FibBuilder {
        FibBuilder::default()
    }

    /// The route for `ip` by longest-prefix match.
    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Option<&Route> {
        let idx = match ip {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }?;
        self.routes.get(idx as usize)
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Every IPv4 prefix with its route, in no order: what a longest-prefix table elsewhere (the
    /// kernel SaP's) needs to match as this one does.
    pub fn prefixes_v4(&self) -> impl Iterator<Item = (std::net::Ipv4Addr, u8, &Route)> + '_ {
        self.v4
            .prefixes()
            .map(|(addr, len, idx)| (addr.into(), len, &self.routes[idx as usize]))
    }

    /// Every IPv6 prefix with its route, likewise.
    pub fn prefixes_v6(&self) -> impl Iterator<Item = (std::net::Ipv6Addr, u8, &Route)> + '_ {
        self.v6
            .prefixes()
            .map(|(addr, len, idx)| (addr.into(), len, &self.routes[idx as usize]))
    }
}

#[derive(Debug, Default)]
pub struct FibBuilder {
    fib: Fib,
}

impl FibBuilder {
    /// Adds a prefix. Several prefixes may share one route (a pod with an IPv4 and an IPv6 overlay
    /// address): pass the index returned by [`FibBuilder::route`] to [`FibBuilder::prefix`].
    /// A prefix that is there already keeps its route: the new one is refused, not stored.
    pub fn insert(&mut self, prefix: IpNetwork, route: Route) -> Result<u32, FibError> {
        let idx = self.route(route);
        if let Err(e) = self.prefix(prefix, idx) {
            self.fib.routes.pop();
            return Err(e);
        }
        Ok(idx)
    }

    /// Stores a route and returns its index.
    pub fn route(&mut self, route: Route) -> u32 {
        self.fib.routes.push(route);
        (self.fib.routes.len() - 1) as u32
    }

    /// Points `prefix` at the stored route `idx`.
    pub fn prefix(&mut self, prefix: IpNetwork, idx: u32) -> Result<(), FibError> {
        let fresh = match prefix {
            IpNetwork::V4(n) => self.fib.v4.insert(u32::from(n.network()), n.prefix(), idx),
            IpNetwork::V6(n) => self.fib.v6.insert(u128::from(n.network()), n.prefix(), idx),
        };
        if fresh {
            Ok(())
        } else {
            Err(FibError::Duplicate(prefix))
        }
    }

    pub fn build(self) -> Fib {
        self.fib
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Key;
    use proptest::prelude::*;

    fn route(name: &str, id: u32) -> Route {
        Route {
            entity: name.into(),
            identity: Identity(id),
            keys: KeyRing::Static(Key(id)),
            infra: "10.0.0.1:6080".parse().unwrap(),
            sap: None,
            outside: false,
        }
    }

    #[test]
    fn longest_prefix_wins_in_both_families() {
        let mut b = Fib::builder();
        b.insert("100.64.0.0/10".parse().unwrap(), route("wide", 1))
            .unwrap();
        b.insert("100.64.1.0/24".parse().unwrap(), route("node", 2))
            .unwrap();
        b.insert("100.64.1.7/32".parse().unwrap(), route("pod", 3))
            .unwrap();
        b.insert("fd00::/48".parse().unwrap(), route("v6wide", 4))
            .unwrap();
        b.insert("fd00::7/128".parse().unwrap(), route("v6pod", 5))
            .unwrap();
        let fib = b.build();
        let id = |ip: &str| fib.lookup(ip.parse().unwrap()).map(|r| r.identity.0);
        assert_eq!(id("100.64.1.7"), Some(3));
        assert_eq!(id("100.64.1.8"), Some(2));
        assert_eq!(id("100.65.0.1"), Some(1));
        assert_eq!(id("100.128.0.1"), None);
        assert_eq!(id("fd00::7"), Some(5));
        assert_eq!(id("fd00::8"), Some(4));
        assert_eq!(id("fd01::7"), None);
        assert_eq!(id("10.0.0.1"), None);
        assert_eq!(fib.len(), 5);
    }

    #[test]
    fn default_routes_match_everything_in_their_family() {
        let mut b = Fib::builder();
        b.insert("0.0.0.0/0".parse().unwrap(), route("any4", 1))
            .unwrap();
        let fib = b.build();
        assert_eq!(
            fib.lookup("1.2.3.4".parse().unwrap()).unwrap().identity.0,
            1
        );
        assert!(fib.lookup("::1".parse().unwrap()).is_none());
    }

    #[test]
    fn duplicates_are_refused_and_routes_can_be_shared() {
        let mut b = Fib::builder();
        let idx = b
            .insert("100.64.0.1/32".parse().unwrap(), route("p", 1))
            .unwrap();
        b.prefix("fd00::1/128".parse().unwrap(), idx).unwrap();
        assert_eq!(
            b.prefix("100.64.0.1/32".parse().unwrap(), idx),
            Err(FibError::Duplicate("100.64.0.1/32".parse().unwrap()))
        );
        assert!(
            b.insert("100.64.0.1/32".parse().unwrap(), route("q", 2))
                .is_err()
        );
        let fib = b.build();
        assert_eq!(fib.routes().len(), 1, "a refused route is not stored");
        assert_eq!(
            fib.lookup("100.64.0.1".parse().unwrap())
                .unwrap()
                .entity
                .as_ref(),
            "p",
            "the first holder keeps its prefix"
        );
        assert_eq!(
            fib.lookup("fd00::1".parse().unwrap())
                .unwrap()
                .entity
                .as_ref(),
            "p"
        );
    }

    proptest! {
        /// The table agrees with a linear longest-prefix scan.
        #[test]
        fn agrees_with_linear_scan(prefixes in proptest::collection::vec((any::<u32>(), 0u8..=32), 1..40),
                                   probes in proptest::collection::vec(any::<u32>(), 1..40)) {
            let mut b = Fib::builder();
            let mut kept: Vec<(u32, u8, u32)> = Vec::new();
            for (i, (addr, len)) in prefixes.iter().enumerate() {
                let net = ipnetwork::Ipv4Network::new((*addr).into(), *len).unwrap();
                let masked = u32::from(net.network());
                if kept.iter().any(|(a, l, _)| *a == masked && *l == *len) { continue; }
                b.insert(IpNetwork::V4(ipnetwork::Ipv4Network::new(masked.into(), *len).unwrap()), route("r", i as u32)).unwrap();
                kept.push((masked, *len, i as u32));
            }
            let fib = b.build();
            for p in probes.iter().chain(prefixes.iter().map(|(a, _)| a)) {
                let expected = kept.iter()
                    .filter(|(a, l, _)| (p & <u32 as Address>::mask(*l)) == *a)
                    .max_by_key(|(_, l, _)| *l)
                    .map(|(_, _, id)| *id);
                let got = fib.lookup(IpAddr::V4((*p).into())).map(|r| r.identity.0);
                prop_assert_eq!(got, expected);
            }
        }
    }
}
