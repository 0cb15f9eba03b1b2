//! Links, addresses, routes and routing rules through rtnetlink, as idempotent "ensure" helpers:
//! an address, route or rule that already exists, or a link or rule already gone, is the success
//! it means.
//!
//! A [`Netlink`] talks to the network namespace its socket was created in. To work on a pod's
//! namespace, create it inside [`crate::sys::Netns::run`] (with a current-thread runtime running
//! there, see [`in_netns`]).

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::RouteHeader;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use crate::sys::{Netns, NetnsError};

const EEXIST: i32 = libc::EEXIST;
const ENODEV: i32 = libc::ENODEV;
const ENOENT: i32 = libc::ENOENT;
const ESRCH: i32 = libc::ESRCH;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("{op} failed: {source}")]
    Request {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("link {0} not found")]
    NoSuchLink(String),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot start a runtime for netlink: {0}")]
    Runtime(#[source] std::io::Error),
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// What we read of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: Option<u32>,
    pub up: bool,
    /// A veth's peer, by its index in the peer's namespace.
    pub peer: Option<u32>,
    /// The bridge (or other controller) the link is a port of.
    pub master: Option<u32>,
    /// Its Ethernet address (none for a TUN device).
    pub mac: Option<[u8; 6]>,
}

fn link_of(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mtu: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        peer: None,
        master: None,
        mac: None,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(m) => link.mtu = Some(*m),
            LinkAttribute::Link(i) => link.peer = Some(*i),
            LinkAttribute::Controller(i) => link.master = Some(*i),
            LinkAttribute::Address(a) => link.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            _ => {}
        }
    }
    link
}

/// An rtnetlink session bound to one network namespace.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens a session in the calling thread's namespace; the connection is driven by a task on
    /// the current tokio runtime.
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    fn req(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
        let op = op.into();
        move |source| NetlinkError::Request { op, source }
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(link_of(&msg))),
            Ok(None) => Ok(None),
            Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(None),
            Err(e) => Err(Self::req(format!("get link {name}"))(e)),
        }
    }

    /// Every link in the namespace.
    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let mut stream = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(Self::req("list links"))? {
            out.push(link_of(&msg));
        }
        Ok(out)
    }

    /// The link with index `index`, if there is one.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NetlinkError> {
        let mut stream = self.handle.link().get().match_index(index).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(link_of(&msg))),
            Ok(None) => Ok(None),
            Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(None),
            Err(e) => Err(Self::req(format!("get link {index}"))(e)),
        }
    }

    /// Every bridge in the namespace: its name, hardware address, ports and addresses.
    pub async fn bridges(&self) -> Result<Vec<Bridge>, NetlinkError> {
        use rtnetlink::packet_route::link::{InfoKind, LinkInfo};
        let mut stream = self.handle.link().get().execute();
        let mut bridges: Vec<(u32, Bridge)> = Vec::new();
        let mut ports: Vec<(u32, String)> = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(Self::req("list links"))? {
            let mut name = None;
            let mut mac = None;
            let mut master = None;
            let mut bridge = false;
            for a in &msg.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::Address(m) => mac = <[u8; 6]>::try_from(m.as_slice()).ok(),
                    LinkAttribute::Controller(i) => master = Some(*i),
                    LinkAttribute::LinkInfo(infos) => {
                        bridge = infos
                            .iter()
                            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge)));
                    }
                    _ => {}
                }
            }
            let Some(name) = name else { continue };
            if let (true, Some(mac)) = (bridge, mac) {
                let bridge = Bridge {
                    name,
                    mac,
                    ports: Vec::new(),
                    addresses: Vec::new(),
                };
                bridges.push((msg.header.index, bridge));
            } else if let Some(m) = master {
                ports.push((m, name));
            }
        }
        for (master, port) in ports {
            if let Some((_, b)) = bridges.iter_mut().find(|(i, _)| *i == master) {
                b.ports.push(port);
            }
        }
        let mut addrs = self.handle.address().get().execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(Self::req("list addresses"))?
        {
            let Some((_, b)) = bridges.iter_mut().find(|(i, _)| *i == msg.header.index) else {
                continue;
            };
            for a in &msg.attributes {
                if let AddressAttribute::Address(ip) = a {
                    b.addresses.push(*ip);
                }
            }
        }
        let mut out: Vec<Bridge> = bridges.into_iter().map(|(_, b)| b).collect();
        for b in &mut out {
            b.ports.sort();
            b.addresses.sort();
            b.addresses.dedup();
        }
        out.sort();
        Ok(out)
    }

    pub async fn require_link(&self, name: &str) -> Result<Link, NetlinkError> {
        self.link(name)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchLink(name.to_string()))
    }

    /// Sets the MTU (when given) and brings the link up, without multicast: overlay devices are
    /// point-to-point and carry only unicast.
    pub async fn set_up(&self, index: u32, mtu: Option<u32>) -> Result<(), NetlinkError> {
        let mut b = LinkUnspec::new_with_index(index).up().multicast(false);
        if let Some(mtu) = mtu {
            b = b.mtu(mtu);
        }
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(Self::req(format!("set link {index} up")))
    }

    /// Deletes a link by name; `Ok(false)` when it was already gone.
    pub async fn delete_link(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(false),
            Err(e) => Err(Self::req(format!("delete link {name}"))(e)),
        }
    }

    pub async fn ensure_address(&self, index: u32, addr: IpNetwork) -> Result<(), NetlinkError> {
        match self
            .handle
            .address()
            .add(index, addr.ip(), addr.prefix())
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(Self::req(format!("add address {addr}"))(e)),
        }
    }

    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNetwork>, NetlinkError> {
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(Self::req(format!("list addresses of {index}")))?
        {
            let prefix = msg.header.prefix_len;
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = addr.or_else(|| {
                msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(net) = addr.and_then(|ip| IpNetwork::new(ip, prefix).ok()) {
                out.push(net);
            }
        }
        Ok(out)
    }

    /// Routes `dst` out of link `index` (a device route: TUN devices have no neighbours).
    pub async fn ensure_route(&self, dst: IpNetwork, index: u32) -> Result<(), NetlinkError> {
        let msg = match dst {
            IpNetwork::V4(n) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix())
                .output_interface(index)
                .build(),
            IpNetwork::V6(n) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(n.network(), n.prefix())
                .output_interface(index)
                .build(),
        };
        match self.handle.route().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) if errno(&e) == Some(ESRCH) => Err(Self::req(format!(
                "add route {dst} (the link has no address of that family yet)"
            ))(e)),
            Err(e) => Err(Self::req(format!("add route {dst}"))(e)),
        }
    }

    /// Routes everything of one family out of link `index`, in routing table `table`.
    pub async fn ensure_default_route(
        &self,
        v6: bool,
        table: u32,
        index: u32,
    ) -> Result<(), NetlinkError> {
        let msg = if v6 {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .table_id(table)
                .output_interface(index)
                .build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .table_id(table)
                .output_interface(index)
                .build()
        };
        match self.handle.route().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(Self::req(format!("add default route to table {table}"))(e)),
        }
    }

    /// Makes packets whose mark has every bit of `mark` look up routing table `table`, at
    /// `priority`, for one family (`ip rule add fwmark M/M lookup T priority P`).
    pub async fn ensure_mark_rule(&self, rule: MarkRule) -> Result<(), NetlinkError> {
        let mut req = self.handle.rule().add();
        *req.message_mut() = rule.message();
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(Self::req(format!("add {rule}"))(e)),
        }
    }

    /// Whether such a rule is in place.
    pub async fn has_mark_rule(&self, rule: MarkRule) -> Result<bool, NetlinkError> {
        let version = if rule.v6 {
            rtnetlink::IpVersion::V6
        } else {
            rtnetlink::IpVersion::V4
        };
        let want = rule.message().attributes;
        let mut rules = self.handle.rule().get(version).execute();
        while let Some(m) = rules
            .try_next()
            .await
            .map_err(Self::req(format!("list rules for {rule}")))?
        {
            if want.iter().all(|a| m.attributes.contains(a)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Removes such a rule; `Ok(false)` when there was none.
    pub async fn delete_mark_rule(&self, rule: MarkRule) -> Result<bool, NetlinkError> {
        match self.handle.rule().del(rule.message()).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(ENOENT) => Ok(false),
            Err(e) => Err(Self::req(format!("delete {rule}"))(e)),
        }
    }

    /// The MTU of the link that holds address `ip` (the underlay's, for the node's address).
    pub async fn mtu_of_address(&self, ip: IpAddr) -> Result<Option<u32>, NetlinkError> {
        Ok(self.link_of_address(ip).await?.and_then(|l| l.mtu))
    }

    /// The link that holds address `ip` (a pod's primary interface, by its pod IP).
    pub async fn link_of_address(&self, ip: IpAddr) -> Result<Option<Link>, NetlinkError> {
        let mut stream = self.handle.address().get().execute();
        let mut index = None;
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(Self::req("list addresses"))?
        {
            let holds = msg.attributes.iter().any(|a| {
                matches!(a, AddressAttribute::Local(x) | AddressAttribute::Address(x) if *x == ip)
            });
            if holds {
                index = Some(msg.header.index);
            }
        }
        let Some(index) = index else {
            return Ok(None);
        };
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(link_of(&msg))),
            Ok(None) => Ok(None),
            Err(e) => Err(Self::req(format!("get link {index}"))(e)),
        }
    }

    /// The id of the eBPF program in the tc filter of `priority` on link `index`'s clsact egress
    /// (or ingress), if there is one: what an earlier agent left attached there.
    pub async fn bpf_filter_program(
        &self,
        index: u32,
        egress: bool,
        priority: u16,
    ) -> Result<Option<u32>, NetlinkError> {
        use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};
        let request = self.handle.traffic_filter(index as i32).get();
        let request = if egress {
            request.egress()
        } else {
            request.ingress()
        };
        let mut stream = request.execute();
        loop {
            let msg = match stream.try_next().await {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(None),
                // No such device, or no clsact qdisc on it: no filter.
                Err(e) if matches!(errno(&e), Some(ENODEV | ENOENT | libc::EINVAL)) => {
                    return Ok(None);
                }
                Err(e) => return Err(Self::req(format!("list tc filters of link {index}"))(e)),
            };
            // A filter's info is its priority (high half) and protocol.
            if (msg.header.info >> 16) as u16 != priority {
                continue;
            }
            let id = msg.attributes.iter().find_map(|a| match a {
                TcAttribute::Options(options) => options.iter().find_map(|o| match o {
                    TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => Some(*id),
                    _ => None,
                }),
                _ => None,
            });
            if id.is_some() {
                return Ok(id);
            }
        }
    }

    /// The MTU of link `name` (the underlay MTU, when `name` is the pod's primary interface).
    pub async fn mtu(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        Ok(self.link(name).await?.and_then(|l| l.mtu))
    }
}

/// A routing rule by mark: packets whose mark has every bit of `mark` look up `table`.
/// A bridge: its name, hardware address and the links enslaved to it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bridge {
    pub name: String,
    pub mac: [u8; 6],
    pub ports: Vec<String>,
    /// The bridge's own addresses: the node, as the pods on it see it.
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkRule {
    pub v6: bool,
    pub mark: u32,
    pub table: u32,
    pub priority: u32,
}

impl MarkRule {
    fn message(&self) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = if self.v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        m.header.table = RouteHeader::RT_TABLE_UNSPEC;
        m.header.action = RuleAction::ToTable;
        m.attributes = vec![
            RuleAttribute::Priority(self.priority),
            RuleAttribute::Table(self.table),
        ];
        // Mark 0 matches any mark when deleting: the kernel treats a missing attribute as a
        // wildcard (an uninstall need not know which bit the agent was told to use).
        if self.mark != 0 {
            m.attributes.push(RuleAttribute::FwMark(self.mark));
            m.attributes.push(RuleAttribute::FwMask(self.mark));
        }
        m
    }
}

impl std::fmt::Display for MarkRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let family = if self.v6 { "-6 " } else { "" };
        write!(
            f,
            "rule {family}fwmark {m:#x}/{m:#x} lookup {} priority {}",
            self.table,
            self.priority,
            m = self.mark
        )
    }
}

/// Runs `f` with a [`Netlink`] session inside `netns`, on the calling (blocking) thread, with a
/// current-thread runtime that lives and dies inside the namespace.
pub fn in_netns<T>(
    netns: &Netns,
    f: impl AsyncFnOnce(&Netlink) -> Result<T, NetlinkError>,
) -> Result<T, NetlinkError> {
    netns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NetlinkError::Runtime)?;
        rt.block_on(async {
            let nl = Netlink::connect()?;
            f(&nl).await
        })
    })?
}

/// Whether an address belongs to a network (helper for tests and checks).
pub fn covers(nets: &[IpNetwork], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.ip() == ip)
}
