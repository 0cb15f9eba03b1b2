//! nftables through nf_tables netlink messages, built here.
//!
//! Why our own encoder: the plugin runs on the host, where neither the `nft` binary nor libnftnl can
//! be assumed, and the two Rust libraries are not fit for the product (`nftnl` links the C
//! libnftnl, GPL-2.0; `rustables` is GPL-3.0). keyway needs a handful of expressions (meta, cmp,
//! payload, bitwise, ct, immediate, counter) to build one table per pod, so it encodes them itself.
//! The netlink framing — message headers, attribute headers and padding, acknowledgements and
//! errors — is `netlink-packet-core`'s, the crate rtnetlink frames with. Every change is one batch,
//! which the kernel applies atomically: all of it or none of it.
//!
//! ```text
//! batch:   BATCH_BEGIN | message... | BATCH_END          (res_id = NFNL_SUBSYS_NFTABLES)
//! message: nlmsghdr (16) | nfgenmsg (family, version 0, res_id 0) | attributes
//! attr:    len u16 | type u16 (0x8000 = nested) | value | pad to 4
//! ```
//! Integers in nf_tables attributes are big-endian. A [`Socket`] acts in the network namespace it
//! was opened in; open it inside [`crate::sys::Netns::run`] to act in a pod's.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use ipnetwork::IpNetwork;
use netlink_packet_core::{
    DecodeError, Emitable, NLA_F_NESTED, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST,
    NetlinkBuffer, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, Nla,
};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt,
};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
/// `NFT_SET_TIMEOUT | NFT_SET_EVAL`: elements expire, and rules add them (`update @set`).
const NFT_SET_DYNAMIC: u32 = 0x10 | 0x20;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
/// Set elements per message: 1,000 IPv6 elements are 28 KB, well inside an attribute's 64 KiB.
const ELEMENTS_PER_MESSAGE: usize = 1000;
/// The send buffer a batch may need (a table with large sets is one `send`).
const SEND_BUFFER: usize = 8 << 20;
/// nft's data types for a set's keys (what `nft list` prints the elements as).
const NFT_TYPE_IPADDR: u32 = 7;
const NFT_TYPE_IP6ADDR: u32 = 8;
/// libnftnl's user-data type for a rule comment, so `nft list` shows it.
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
/// `nft_fib_flags`: look up by the source address, through the input interface only.
const NFTA_FIB_F_SADDR: u32 = 1 << 0;
const NFTA_FIB_F_IIF: u32 = 1 << 3;
/// `PACKET_HOST`: a frame addressed to this host.
const PACKET_HOST: u8 = 0;
const NFT_REG_2: u32 = 2;

/// Address families (`NFPROTO_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Inet = 1,
    Ipv4 = 2,
    Bridge = 7,
    Ipv6 = 10,
}

/// Netfilter hooks (`NF_INET_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting = 0,
    Input = 1,
    Forward = 2,
    Output = 3,
    Postrouting = 4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Drop = 0,
    Accept = 1,
}

/// `ct state` bits.
pub mod ct_state {
    pub const INVALID: u32 = 1;
    pub const ESTABLISHED: u32 = 2;
    pub const RELATED: u32 = 4;
    pub const NEW: u32 = 8;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    /// Continue in the chain and do not come back (a jump's return goes to the caller's caller).
    Goto(String),
}

impl Verdict {
    fn code(&self) -> i32 {
        match self {
            Verdict::Drop => 0,
            Verdict::Accept => 1,
            Verdict::Jump(_) => -3,
            Verdict::Goto(_) => -4,
            Verdict::Return => -5,
        }
    }

    fn chain(&self) -> Option<&str> {
        match self {
            Verdict::Jump(c) | Verdict::Goto(c) => Some(c),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq = 0,
    Neq = 1,
    Gte = 5,
    Lte = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetaKey {
    /// The frame's ethertype (bridge family), big-endian.
    Protocol = 1,
    Mark = 3,
    IifName = 6,
    OifName = 7,
    PktType = 19,
    NfProto = 15,
    L4Proto = 16,
}

/// Conntrack keys (`NFT_CT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CtKey {
    State = 0,
    Direction = 1,
    Mark = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PayloadBase {
    LinkLayer = 0,
    Network = 1,
    Transport = 2,
}

/// One nf_tables expression.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    Meta(MetaKey),
    Cmp(CmpOp, Vec<u8>),
    Payload(PayloadBase, u32, u32),
    /// Register 1 written into the packet at (base, offset, length), no checksum to fix.
    PayloadSet(PayloadBase, u32, u32),
    Bitwise {
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// A conntrack key into register 1.
    Ct(CtKey),
    /// A conntrack key set from register 1.
    CtSet(CtKey),
    Counter,
    Immediate(Verdict),
    /// Data into a register.
    Load(u32, Vec<u8>),
    /// The mark of the local socket the packet is for (`socket mark`) into register 1.
    SocketMark,
    /// Register 1 looked up in the named set (the set's id within the batch alongside).
    Lookup(String, u32),
    /// A meta key set from register 1.
    MetaSet(MetaKey),
    /// A random number below the modulus into register 1.
    Random(u32),
    /// Destination NAT to the address in register 1 and the port in register 2.
    Dnat {
        ipv6: bool,
    },
    /// Register 1 added to (or refreshed in) a dynamic set, expiring after the timeout (ms).
    Update(String, u32, u64),
    /// `fib saddr . iif oif`: the interface the route back to the source leaves by, looked up
    /// only through the interface the packet came in on (0 when there is none), into register 1.
    FibReversePath,
}

/// A rule: a sequence of matches ending in a verdict, with an optional comment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    exprs: Vec<Expr>,
    comment: Option<String>,
}

/// Where an address is in the network header: (offset, length).
fn network_field(ipv6: bool, source: bool) -> (u32, u32) {
    match (ipv6, source) {
        (false, true) => (12, 4),
        (false, false) => (16, 4),
        (true, true) => (8, 16),
        (true, false) => (24, 16),
    }
}

/// Register 1 with `bits` set (`reg & !bits ^ bits`).
fn or_bits(bits: u32) -> Expr {
    Expr::Bitwise {
        len: 4,
        mask: (!bits).to_ne_bytes().to_vec(),
        xor: bits.to_ne_bytes().to_vec(),
    }
}

fn ifname_bytes(name: &str, exact: bool) -> Vec<u8> {
    let mut b = name.as_bytes().to_vec();
    if exact {
        // Exact match compares the whole IFNAMSIZ register, NUL-padded.
        b.resize(16, 0);
    }
    b
}

impl Rule {
    pub fn new() -> Self {
        Rule::default()
    }

    pub fn comment(mut self, c: impl Into<String>) -> Self {
        self.comment = Some(c.into());
        self
    }

    fn push(mut self, e: Expr) -> Self {
        self.exprs.push(e);
        self
    }

    /// `iifname "name"` (exact).
    pub fn iifname(self, name: &str) -> Self {
        self.push(Expr::Meta(MetaKey::IifName))
            .push(Expr::Cmp(CmpOp::Eq, ifname_bytes(name, true)))
    }

    /// `oifname "name"` (exact).
    pub fn oifname(self, name: &str) -> Self {
        self.push(Expr::Meta(MetaKey::OifName))
            .push(Expr::Cmp(CmpOp::Eq, ifname_bytes(name, true)))
    }

    /// `ct state & mask != 0`.
    pub fn ct_state(self, mask: u32) -> Self {
        self.push(Expr::Ct(CtKey::State))
            .push(Expr::Bitwise {
                len: 4,
                mask: mask.to_ne_bytes().to_vec(),
                xor: vec![0; 4],
            })
            .push(Expr::Cmp(CmpOp::Neq, vec![0; 4]))
    }

    /// `meta nfproto ipv6 fib saddr . iif oif 0`: an IPv6 packet whose source is not routed back
    /// through the interface it came in on — IPv6's strict reverse-path filter, which has no
    /// sysctl.
    pub fn ipv6_reverse_path_fails(self) -> Self {
        self.push(Expr::Meta(MetaKey::NfProto))
            .push(Expr::Cmp(CmpOp::Eq, vec![Family::Ipv6 as u8]))
            .push(Expr::FibReversePath)
            .push(Expr::Cmp(CmpOp::Eq, vec![0; 4]))
    }

    /// `meta l4proto proto`.
    pub fn l4proto(self, proto: u8) -> Self {
        self.push(Expr::Meta(MetaKey::L4Proto))
            .push(Expr::Cmp(CmpOp::Eq, vec![proto]))
    }

    /// `meta mark mark` (host byte order, as the kernel keeps it).
    pub fn mark(self, mark: u32) -> Self {
        self.push(Expr::Meta(MetaKey::Mark))
            .push(Expr::Cmp(CmpOp::Eq, mark.to_ne_bytes().to_vec()))
    }

    fn addr_in(self, net: IpNetwork, source: bool) -> Self {
        let (family, offset, bytes, mask): (Family, u32, Vec<u8>, Vec<u8>) = match net {
            IpNetwork::V4(n) => (
                Family::Ipv4,
                if source { 12 } else { 16 },
                n.network().octets().to_vec(),
                n.mask().octets().to_vec(),
            ),
            IpNetwork::V6(n) => (
                Family::Ipv6,
                if source { 8 } else { 24 },
                n.network().octets().to_vec(),
                n.mask().octets().to_vec(),
            ),
        };
        let len = bytes.len() as u32;
        let full = net.prefix() == if family == Family::Ipv4 { 32 } else { 128 };
        let r = self
            .push(Expr::Meta(MetaKey::NfProto))
            .push(Expr::Cmp(CmpOp::Eq, vec![family as u8]))
            .push(Expr::Payload(PayloadBase::Network, offset, len));
        let r = if full || net.prefix() == 0 {
            r
        } else {
            r.push(Expr::Bitwise {
                len,
                mask,
                xor: vec![0; len as usize],
            })
        };
        if net.prefix() == 0 {
            r
        } else {
            r.push(Expr::Cmp(CmpOp::Eq, bytes))
        }
    }

    /// `ip daddr @set` / `ip6 daddr @set` for a set of [`Table::sets`] (the family check is part of
    /// the match; the set's family says which).
    pub fn daddr_in(self, set: &Set) -> Self {
        self.addr_lookup(set, false)
    }

    fn addr_lookup(self, set: &Set, source: bool) -> Self {
        let family = if set.ipv6 { Family::Ipv6 } else { Family::Ipv4 };
        let (offset, len) = network_field(set.ipv6, source);
        self.push(Expr::Meta(MetaKey::NfProto))
            .push(Expr::Cmp(CmpOp::Eq, vec![family as u8]))
            .push(Expr::Payload(PayloadBase::Network, offset, len))
            .push(Expr::Lookup(set.name.clone(), set.id))
    }

    /// `meta mark & bits == bits`: every one of `bits` is set, whatever else the mark holds.
    pub fn mark_bits(self, bits: u32) -> Self {
        self.push(Expr::Meta(MetaKey::Mark)).has_bits(bits)
    }

    /// Register 1 (a 32-bit mark) holds every one of `bits`: `& bits == bits`.
    fn has_bits(self, bits: u32) -> Self {
        self.push(Expr::Bitwise {
            len: 4,
            mask: bits.to_ne_bytes().to_vec(),
            xor: 0u32.to_ne_bytes().to_vec(),
        })
        .push(Expr::Cmp(CmpOp::Eq, bits.to_ne_bytes().to_vec()))
    }

    /// `meta mark set meta mark | bits`: adds `bits` to the packet's mark, keeping the rest.
    pub fn or_mark(self, bits: u32) -> Self {
        self.push(Expr::Meta(MetaKey::Mark))
            .push(or_bits(bits))
            .push(Expr::MetaSet(MetaKey::Mark))
    }

    /// `meta mark set meta mark & ~clear | set`: sets `set` and clears `clear` in the packet's
    /// mark, keeping the rest.
    pub fn set_mark_bits(self, set: u32, clear: u32) -> Self {
        self.push(Expr::Meta(MetaKey::Mark))
            .push(Expr::Bitwise {
                len: 4,
                mask: (!(set | clear)).to_ne_bytes().to_vec(),
                xor: set.to_ne_bytes().to_vec(),
            })
            .push(Expr::MetaSet(MetaKey::Mark))
    }

    /// `ether daddr set MAC meta pkttype set host` (bridge family): the bridge delivers the frame
    /// to itself, so the node routes it instead of switching it to a port.
    pub fn deliver_to_bridge(self, mac: [u8; 6]) -> Self {
        self.push(Expr::Load(NFT_REG_1, mac.to_vec()))
            .push(Expr::PayloadSet(PayloadBase::LinkLayer, 0, 6))
            .push(Expr::Load(NFT_REG_1, vec![PACKET_HOST]))
            .push(Expr::MetaSet(MetaKey::PktType))
    }

    /// `ct direction reply`: the packet goes the way of its connection's replies.
    pub fn ct_reply(self) -> Self {
        self.push(Expr::Ct(CtKey::Direction))
            .push(Expr::Cmp(CmpOp::Eq, vec![1]))
    }

    /// `ct mark & bits == bits`: the connection carries every one of `bits`.
    pub fn ct_mark_bits(self, bits: u32) -> Self {
        self.push(Expr::Ct(CtKey::Mark)).has_bits(bits)
    }

    /// `ct mark & bits == 0`: the connection carries none of `bits`.
    pub fn ct_mark_lacks(self, bits: u32) -> Self {
        self.push(Expr::Ct(CtKey::Mark))
            .push(Expr::Bitwise {
                len: 4,
                mask: bits.to_ne_bytes().to_vec(),
                xor: 0u32.to_ne_bytes().to_vec(),
            })
            .push(Expr::Cmp(CmpOp::Eq, vec![0; 4]))
    }

    /// `ct mark & mask == value`.
    pub fn ct_mark_masked(self, mask: u32, value: u32) -> Self {
        self.push(Expr::Ct(CtKey::Mark)).masked_is(mask, value)
    }

    /// `meta mark & mask == value`.
    pub fn mark_masked(self, mask: u32, value: u32) -> Self {
        self.push(Expr::Meta(MetaKey::Mark)).masked_is(mask, value)
    }

    /// Register 1 (a 32-bit mark) `& mask == value`.
    fn masked_is(self, mask: u32, value: u32) -> Self {
        self.push(Expr::Bitwise {
            len: 4,
            mask: mask.to_ne_bytes().to_vec(),
            xor: 0u32.to_ne_bytes().to_vec(),
        })
        .push(Expr::Cmp(CmpOp::Eq, (value & mask).to_ne_bytes().to_vec()))
    }

    /// `socket mark MARK`: the local socket the packet is delivered to carries `mark` (input
    /// and prerouting hooks; no socket, no match).
    pub fn socket_mark(self, mark: u32) -> Self {
        self.push(Expr::SocketMark)
            .push(Expr::Cmp(CmpOp::Eq, mark.to_ne_bytes().to_vec()))
    }

    /// `ether type ip saddr @set` (bridge family): a frame whose IP source is in the set.
    pub fn frame_saddr_in(self, set: &Set) -> Self {
        let ethertype: u16 = if set.ipv6 { 0x86dd } else { 0x0800 };
        let (offset, len) = network_field(set.ipv6, true);
        self.push(Expr::Meta(MetaKey::Protocol))
            .push(Expr::Cmp(CmpOp::Eq, ethertype.to_be_bytes().to_vec()))
            .push(Expr::Payload(PayloadBase::Network, offset, len))
            .push(Expr::Lookup(set.name.clone(), set.id))
    }

    /// `ct mark set ct mark | bits`: the connection remembers `bits` for its later packets.
    pub fn or_ct_mark(self, bits: u32) -> Self {
        self.push(Expr::Ct(CtKey::Mark))
            .push(or_bits(bits))
            .push(Expr::CtSet(CtKey::Mark))
    }

    /// `numgen random mod modulus == value`.
    pub fn random_is(self, modulus: u32, value: u32) -> Self {
        self.push(Expr::Random(modulus))
            .push(Expr::Cmp(CmpOp::Eq, value.to_ne_bytes().to_vec()))
    }

    /// `dnat ip to addr:port` (or `ip6 to [addr]:port`); the rule must have matched the family.
    pub fn dnat(self, addr: IpAddr, port: u16) -> Self {
        let (ipv6, bytes) = match addr {
            IpAddr::V4(a) => (false, a.octets().to_vec()),
            IpAddr::V6(a) => (true, a.octets().to_vec()),
        };
        self.push(Expr::Load(NFT_REG_1, bytes))
            .push(Expr::Load(NFT_REG_2, port.to_be_bytes().to_vec()))
            .push(Expr::Dnat { ipv6 })
    }

    /// `ip saddr @set` / `ip6 saddr @set`.
    pub fn saddr_in(self, set: &Set) -> Self {
        self.addr_lookup(set, true)
    }

    /// `update @set { ip saddr timeout Ns }`: remembers the source in a dynamic set.
    pub fn remember_saddr(self, set: &Set, timeout_secs: u32) -> Self {
        let family = if set.ipv6 { Family::Ipv6 } else { Family::Ipv4 };
        let (offset, len) = network_field(set.ipv6, true);
        self.push(Expr::Meta(MetaKey::NfProto))
            .push(Expr::Cmp(CmpOp::Eq, vec![family as u8]))
            .push(Expr::Payload(PayloadBase::Network, offset, len))
            .push(Expr::Update(
                set.name.clone(),
                set.id,
                u64::from(timeout_secs) * 1000,
            ))
    }

    /// `ip daddr ADDR` / `ip6 daddr ADDR` for one address (with its family check).
    pub fn daddr_is(self, addr: IpAddr) -> Self {
        self.daddr(IpNetwork::from(addr))
    }

    /// `ip saddr net` / `ip6 saddr net` (the family check is part of the match).
    pub fn saddr(self, net: IpNetwork) -> Self {
        self.addr_in(net, true)
    }

    /// `ip daddr net` / `ip6 daddr net`.
    pub fn daddr(self, net: IpNetwork) -> Self {
        self.addr_in(net, false)
    }

    /// `th dport start-end` for a protocol with ports (the caller matched `l4proto` first).
    pub fn dport_range(self, start: u16, end: u16) -> Self {
        let r = self.push(Expr::Payload(PayloadBase::Transport, 2, 2));
        if start == end {
            r.push(Expr::Cmp(CmpOp::Eq, start.to_be_bytes().to_vec()))
        } else {
            r.push(Expr::Cmp(CmpOp::Gte, start.to_be_bytes().to_vec()))
                .push(Expr::Cmp(CmpOp::Lte, end.to_be_bytes().to_vec()))
        }
    }

    /// `th sport port`.
    pub fn sport(self, port: u16) -> Self {
        self.push(Expr::Payload(PayloadBase::Transport, 0, 2))
            .push(Expr::Cmp(CmpOp::Eq, port.to_be_bytes().to_vec()))
    }

    /// The first byte of the transport header (ICMP type) within `start..=end`.
    pub fn icmp_type_range(self, start: u8, end: u8) -> Self {
        self.push(Expr::Payload(PayloadBase::Transport, 0, 1))
            .push(Expr::Cmp(CmpOp::Gte, vec![start]))
            .push(Expr::Cmp(CmpOp::Lte, vec![end]))
    }

    pub fn counter(self) -> Self {
        self.push(Expr::Counter)
    }

    pub fn verdict(self, v: Verdict) -> Self {
        self.push(Expr::Immediate(v))
    }

    pub fn accept(self) -> Self {
        self.verdict(Verdict::Accept)
    }

    pub fn drop_(self) -> Self {
        self.verdict(Verdict::Drop)
    }
}

/// What a base chain is for: filtering, or (`route`, on the output hook only) marking packets so
/// that they are routed again with the new mark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ChainKind {
    #[default]
    Filter,
    Route,
    /// Address translation: only a connection's first packet passes; conntrack does the rest.
    Nat,
}

impl ChainKind {
    fn as_str(self) -> &'static str {
        match self {
            ChainKind::Filter => "filter",
            ChainKind::Route => "route",
            ChainKind::Nat => "nat",
        }
    }
}

/// A chain: a base chain when it has a hook, a regular one (a jump target) when not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub hook: Option<(Hook, i32, Policy)>,
    pub kind: ChainKind,
    pub rules: Vec<Rule>,
}

impl Chain {
    /// A chain of `kind` on `hook` at `priority`.
    pub fn hooked(
        kind: ChainKind,
        name: &str,
        hook: Hook,
        priority: i32,
        rules: Vec<Rule>,
    ) -> Chain {
        Chain {
            kind,
            ..Chain::base(name, hook, priority, Policy::Accept, rules)
        }
    }

    /// A filter chain on `hook` at `priority`.
    pub fn base(name: &str, hook: Hook, priority: i32, policy: Policy, rules: Vec<Rule>) -> Chain {
        Chain {
            name: name.to_string(),
            hook: Some((hook, priority, policy)),
            kind: ChainKind::Filter,
            rules,
        }
    }

    /// A chain that only rules jump to.
    pub fn regular(name: &str, rules: Vec<Rule>) -> Chain {
        Chain {
            name: name.to_string(),
            hook: None,
            kind: ChainKind::Filter,
            rules,
        }
    }
}

/// A named set of addresses, one family, filled in the same transaction as its table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub ipv6: bool,
    /// The set's id within the batch (rules refer to it by name and id); unique in its table.
    pub id: u32,
    pub elements: Vec<IpAddr>,
    /// Filled by rules at run time, each element with a timeout (`update @set`), not by us.
    pub dynamic: bool,
}

impl Set {
    /// A set of `elements` of one family.
    pub fn of(name: &str, ipv6: bool, id: u32, elements: Vec<IpAddr>) -> Set {
        Set {
            name: name.to_string(),
            ipv6,
            id,
            elements,
            dynamic: false,
        }
    }

    /// An empty set that rules fill, whose elements expire.
    pub fn dynamic(name: &str, ipv6: bool, id: u32) -> Set {
        Set {
            dynamic: true,
            ..Set::of(name, ipv6, id, Vec::new())
        }
    }
}

/// A whole table, installed or replaced in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub family: Family,
    pub name: String,
    pub sets: Vec<Set>,
    pub chains: Vec<Chain>,
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot open a netfilter netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink I/O failed: {0}")]
    Io(#[source] io::Error),
    #[error("nf_tables refused {op}: {source}")]
    Refused {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("nf_tables answered with a malformed message")]
    Malformed,
}

impl NftError {
    /// The errno behind a refusal, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NftError::Refused { source, .. } | NftError::Io(source) | NftError::Socket(source) => {
                source.raw_os_error()
            }
            NftError::Malformed => None,
        }
    }
}

/// One attribute of an nf_tables message: bytes, or nested attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attr {
    Bytes(u16, Vec<u8>),
    Nested(u16, Vec<Attr>),
}

impl Nla for Attr {
    fn value_len(&self) -> usize {
        match self {
            Attr::Bytes(_, v) => v.len(),
            Attr::Nested(_, attrs) => attrs.as_slice().buffer_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Attr::Bytes(k, _) => *k,
            Attr::Nested(k, _) => *k | NLA_F_NESTED,
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Attr::Bytes(_, v) => buffer.copy_from_slice(v),
            Attr::Nested(_, attrs) => attrs.as_slice().emit(buffer),
        }
    }
}

/// A NUL-terminated string attribute.
fn text(kind: u16, s: &str) -> Attr {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    Attr::Bytes(kind, v)
}

/// A big-endian 32-bit attribute.
fn be32(kind: u16, v: u32) -> Attr {
    Attr::Bytes(kind, v.to_be_bytes().to_vec())
}

/// An `NFTA_DATA_VALUE` nested in `kind`.
fn data_value(kind: u16, value: &[u8]) -> Attr {
    Attr::Nested(kind, vec![Attr::Bytes(NFTA_DATA_VALUE, value.to_vec())])
}

/// A netfilter message: the `nfgenmsg` header (family, version 0, resource id), then attributes.
/// Replies are read for their header only: keyway asks nf_tables for acknowledgements, not data.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NfMessage {
    message_type: u16,
    family: u8,
    res_id: u16,
    attrs: Vec<Attr>,
}

const NFGENMSG_LEN: usize = 4;

impl NetlinkSerializable for NfMessage {
    fn message_type(&self) -> u16 {
        self.message_type
    }

    fn buffer_len(&self) -> usize {
        NFGENMSG_LEN + self.attrs.as_slice().buffer_len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        buffer[0] = self.family;
        buffer[1] = 0; // NFNETLINK_V0
        buffer[2..4].copy_from_slice(&self.res_id.to_be_bytes());
        self.attrs.as_slice().emit(&mut buffer[NFGENMSG_LEN..]);
    }
}

impl NetlinkDeserializable for NfMessage {
    type Error = DecodeError;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, DecodeError> {
        if payload.len() < NFGENMSG_LEN {
            return Err(DecodeError::from(
                "nfnetlink message shorter than its nfgenmsg",
            ));
        }
        Ok(NfMessage {
            message_type: header.message_type,
            family: payload[0],
            res_id: u16::from_be_bytes([payload[2], payload[3]]),
            attrs: Vec::new(),
        })
    }
}

/// An nf_tables message of `msg` in `family`.
fn nft(msg: u16, family: Family, attrs: Vec<Attr>) -> NfMessage {
    NfMessage {
        message_type: (NFNL_SUBSYS_NFTABLES << 8) | msg,
        family: family as u8,
        res_id: 0,
        attrs,
    }
}

/// A batch delimiter (`NFNL_MSG_BATCH_BEGIN`/`END`) for nf_tables.
fn batch_mark(message_type: u16) -> NfMessage {
    NfMessage {
        message_type,
        family: 0,
        res_id: NFNL_SUBSYS_NFTABLES,
        attrs: Vec::new(),
    }
}

impl Expr {
    fn name(&self) -> &'static str {
        match self {
            Expr::Meta(_) => "meta",
            Expr::Cmp(..) => "cmp",
            Expr::Payload(..) | Expr::PayloadSet(..) => "payload",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Ct(_) | Expr::CtSet(_) => "ct",
            Expr::Counter => "counter",
            Expr::Immediate(_) | Expr::Load(..) => "immediate",
            Expr::Lookup(..) => "lookup",
            Expr::MetaSet(_) => "meta",
            Expr::Random(_) => "numgen",
            Expr::Dnat { .. } => "nat",
            Expr::Update(..) => "dynset",
            Expr::SocketMark => "socket",
            Expr::FibReversePath => "fib",
        }
    }

    /// The expression's `NFTA_EXPR_DATA` attributes (each kind numbers its own from 1).
    fn data(&self) -> Vec<Attr> {
        match self {
            // NFTA_META_DREG, NFTA_META_KEY
            Expr::Meta(key) => vec![be32(1, NFT_REG_1), be32(2, *key as u32)],
            // NFTA_CMP_SREG, NFTA_CMP_OP, NFTA_CMP_DATA
            Expr::Cmp(op, value) => vec![
                be32(1, NFT_REG_1),
                be32(2, *op as u32),
                data_value(3, value),
            ],
            // NFTA_PAYLOAD_DREG, _BASE, _OFFSET, _LEN
            Expr::Payload(base, offset, len) => vec![
                be32(1, NFT_REG_1),
                be32(2, *base as u32),
                be32(3, *offset),
                be32(4, *len),
            ],
            // NFTA_PAYLOAD_SREG, _BASE, _OFFSET, _LEN, _CSUM_TYPE (none)
            Expr::PayloadSet(base, offset, len) => vec![
                be32(5, NFT_REG_1),
                be32(2, *base as u32),
                be32(3, *offset),
                be32(4, *len),
                be32(6, 0),
            ],
            // NFTA_BITWISE_SREG, _DREG, _LEN, _MASK, _XOR
            Expr::Bitwise { len, mask, xor } => vec![
                be32(1, NFT_REG_1),
                be32(2, NFT_REG_1),
                be32(3, *len),
                data_value(4, mask),
                data_value(5, xor),
            ],
            // NFTA_CT_DREG, NFTA_CT_KEY
            Expr::Ct(key) => vec![be32(1, NFT_REG_1), be32(2, *key as u32)],
            // NFTA_CT_KEY, NFTA_CT_SREG
            Expr::CtSet(key) => vec![be32(2, *key as u32), be32(4, NFT_REG_1)],
            // NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS
            Expr::Counter => vec![
                Attr::Bytes(1, 0u64.to_be_bytes().to_vec()),
                Attr::Bytes(2, 0u64.to_be_bytes().to_vec()),
            ],
            // NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA { NFTA_DATA_VERDICT { code, chain } }
            Expr::Immediate(v) => {
                let mut verdict = vec![be32(NFTA_VERDICT_CODE, v.code() as u32)];
                if let Some(chain) = v.chain() {
                    verdict.push(text(NFTA_VERDICT_CHAIN, chain));
                }
                vec![
                    be32(1, NFT_REG_VERDICT),
                    Attr::Nested(2, vec![Attr::Nested(NFTA_DATA_VERDICT, verdict)]),
                ]
            }
            // NFTA_LOOKUP_SET, NFTA_LOOKUP_SREG, NFTA_LOOKUP_SET_ID
            Expr::Lookup(set, id) => vec![text(1, set), be32(2, NFT_REG_1), be32(4, *id)],
            // NFTA_META_KEY, NFTA_META_SREG
            Expr::MetaSet(key) => vec![be32(2, *key as u32), be32(3, NFT_REG_1)],
            // NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA { NFTA_DATA_VALUE }
            Expr::Load(reg, value) => vec![be32(1, *reg), data_value(2, value)],
            // NFTA_NG_DREG, NFTA_NG_MODULUS, NFTA_NG_TYPE (NFT_NG_RANDOM)
            Expr::Random(modulus) => vec![be32(1, NFT_REG_1), be32(2, *modulus), be32(3, 1)],
            // NFTA_NAT_TYPE (NFT_NAT_DNAT), _FAMILY, _REG_ADDR_MIN, _REG_PROTO_MIN
            Expr::Dnat { ipv6 } => {
                let family = if *ipv6 { Family::Ipv6 } else { Family::Ipv4 };
                vec![
                    be32(1, 1),
                    be32(2, family as u32),
                    be32(3, NFT_REG_1),
                    be32(5, NFT_REG_2),
                ]
            }
            // NFTA_SOCKET_KEY (NFT_SOCKET_MARK), NFTA_SOCKET_DREG
            Expr::SocketMark => vec![be32(1, 1), be32(2, NFT_REG_1)],
            // NFTA_FIB_DREG, NFTA_FIB_RESULT (NFT_FIB_RESULT_OIF), NFTA_FIB_FLAGS (saddr | iif)
            Expr::FibReversePath => vec![
                be32(1, NFT_REG_1),
                be32(2, 1),
                be32(3, NFTA_FIB_F_SADDR | NFTA_FIB_F_IIF),
            ],
            // NFTA_DYNSET_SET_NAME, _SET_ID, _OP (NFT_DYNSET_OP_UPDATE), _SREG_KEY, _TIMEOUT
            Expr::Update(set, id, timeout_ms) => vec![
                text(1, set),
                be32(2, *id),
                be32(3, 1),
                be32(4, NFT_REG_1),
                Attr::Bytes(6, timeout_ms.to_be_bytes().to_vec()),
            ],
        }
    }

    fn attr(&self) -> Attr {
        Attr::Nested(
            NFTA_LIST_ELEM,
            vec![
                text(NFTA_EXPR_NAME, self.name()),
                Attr::Nested(NFTA_EXPR_DATA, self.data()),
            ],
        )
    }
}

/// The messages of one batch, each with its sequence number and, for requests, what it does
/// (for errors). Only the last request asks for an acknowledgement: the kernel answers a
/// failed request anyway, so one acknowledgement says the whole batch was processed, however
/// large it is (one per message would overflow the socket's receive queue).
#[derive(Debug)]
struct Batch {
    messages: Vec<NetlinkMessage<NfMessage>>,
    seq: u32,
    /// (sequence number, description) of each request.
    acked: Vec<(u32, String)>,
    /// The index in `messages` of the last request.
    last_request: Option<usize>,
}

impl Batch {
    fn new(seq: u32) -> Self {
        Batch {
            messages: Vec::new(),
            seq,
            acked: Vec::new(),
            last_request: None,
        }
    }

    fn push(&mut self, msg: NfMessage, flags: u16, what: Option<String>) {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        m.finalize();
        self.messages.push(m);
        if let Some(w) = what {
            self.acked.push((self.seq, w));
            self.last_request = Some(self.messages.len() - 1);
        }
        self.seq = self.seq.wrapping_add(1);
    }

    /// An nf_tables request (the kernel answers it if it fails, or if it is the last).
    fn request(&mut self, msg: NfMessage, flags: u16, what: String) {
        self.push(msg, NLM_F_REQUEST | flags, Some(what));
    }

    /// Asks for the acknowledgement of the last request; its sequence number.
    fn ack_last(&mut self) -> Option<u32> {
        let i = self.last_request?;
        let m = &mut self.messages[i];
        m.header.flags |= NLM_F_ACK;
        Some(m.header.sequence_number)
    }

    fn begin(&mut self) {
        self.push(batch_mark(NFNL_MSG_BATCH_BEGIN), NLM_F_REQUEST, None);
    }

    fn end(&mut self) {
        self.push(batch_mark(NFNL_MSG_BATCH_END), NLM_F_REQUEST, None);
    }

    fn bytes(&self) -> Vec<u8> {
        let len = self.messages.iter().map(|m| m.buffer_len()).sum();
        let mut buf = vec![0u8; len];
        let mut at = 0;
        for m in &self.messages {
            let n = m.buffer_len();
            m.serialize(&mut buf[at..at + n]);
            at += n;
        }
        buf
    }

    fn new_table(&mut self, family: Family, name: &str) {
        let attrs = vec![text(NFTA_TABLE_NAME, name), be32(NFTA_TABLE_FLAGS, 0)];
        let what = format!("add table {name}");
        self.request(nft(NFT_MSG_NEWTABLE, family, attrs), NLM_F_CREATE, what);
    }

    fn del_table(&mut self, family: Family, name: &str) {
        let attrs = vec![text(NFTA_TABLE_NAME, name)];
        let what = format!("delete table {name}");
        self.request(nft(NFT_MSG_DELTABLE, family, attrs), 0, what);
    }

    fn new_chain(&mut self, family: Family, table: &str, chain: &Chain) {
        let mut attrs = vec![
            text(NFTA_CHAIN_TABLE, table),
            text(NFTA_CHAIN_NAME, &chain.name),
        ];
        if let Some((hook, prio, policy)) = chain.hook {
            attrs.push(Attr::Nested(
                NFTA_CHAIN_HOOK,
                vec![
                    be32(NFTA_HOOK_HOOKNUM, hook as u32),
                    be32(NFTA_HOOK_PRIORITY, prio as u32),
                ],
            ));
            attrs.push(be32(NFTA_CHAIN_POLICY, policy as u32));
            attrs.push(text(NFTA_CHAIN_TYPE, chain.kind.as_str()));
        }
        let what = format!("add chain {table} {}", chain.name);
        self.request(nft(NFT_MSG_NEWCHAIN, family, attrs), NLM_F_CREATE, what);
    }

    fn del_chain(&mut self, family: Family, table: &str, chain: &str) {
        let attrs = vec![text(NFTA_CHAIN_TABLE, table), text(NFTA_CHAIN_NAME, chain)];
        let what = format!("delete chain {table} {chain}");
        self.request(nft(NFT_MSG_DELCHAIN, family, attrs), 0, what);
    }

    fn del_set(&mut self, family: Family, table: &str, set: &str) {
        let attrs = vec![text(NFTA_SET_TABLE, table), text(NFTA_SET_NAME, set)];
        let what = format!("delete set {table} {set}");
        self.request(nft(NFT_MSG_DELSET, family, attrs), 0, what);
    }

    /// Turns the installed `old` into `new` without touching what both hold alike: a dynamic set
    /// in both keeps its elements. Every old chain is flushed first (so nothing refers to what
    /// goes), then what `new` lacks is deleted, then what is new or changed is added.
    fn table_update(&mut self, old: &Table, new: &Table) {
        let (family, name) = (new.family, new.name.as_str());
        self.new_table(family, name);
        for chain in &old.chains {
            self.flush_chain(family, name, &chain.name);
        }
        for chain in &old.chains {
            if !new.chains.iter().any(|c| c.name == chain.name) {
                self.del_chain(family, name, &chain.name);
            }
        }
        // A dynamic set is the same set if its name and type are (ids only matter in a batch).
        let same =
            |a: &Set, b: &Set| a.dynamic && b.dynamic && a.name == b.name && a.ipv6 == b.ipv6;
        let kept = |set: &Set| old.sets.iter().any(|o| same(o, set));
        for set in &old.sets {
            if !new.sets.iter().any(|n| same(n, set)) {
                self.del_set(family, name, &set.name);
            }
        }
        for set in new.sets.iter().filter(|s| !kept(s)) {
            self.new_set(family, name, set);
        }
        for chain in &new.chains {
            self.new_chain(family, name, chain);
        }
        for chain in &new.chains {
            for rule in &chain.rules {
                self.new_rule(family, name, &chain.name, rule);
            }
        }
    }

    fn flush_chain(&mut self, family: Family, table: &str, chain: &str) {
        let attrs = vec![text(NFTA_RULE_TABLE, table), text(NFTA_RULE_CHAIN, chain)];
        let what = format!("flush chain {table} {chain}");
        self.request(nft(NFT_MSG_DELRULE, family, attrs), 0, what);
    }

    fn new_rule(&mut self, family: Family, table: &str, chain: &str, rule: &Rule) {
        let mut attrs = vec![
            text(NFTA_RULE_TABLE, table),
            text(NFTA_RULE_CHAIN, chain),
            Attr::Nested(
                NFTA_RULE_EXPRESSIONS,
                rule.exprs.iter().map(Expr::attr).collect(),
            ),
        ];
        if let Some(c) = &rule.comment {
            let mut udata = vec![NFTNL_UDATA_RULE_COMMENT, (c.len() + 1).min(255) as u8];
            udata.extend_from_slice(&c.as_bytes()[..c.len().min(254)]);
            udata.push(0);
            attrs.push(Attr::Bytes(NFTA_RULE_USERDATA, udata));
        }
        let what = format!("add rule to {table} {chain}");
        self.request(
            nft(NFT_MSG_NEWRULE, family, attrs),
            NLM_F_CREATE | NLM_F_APPEND,
            what,
        );
    }

    fn new_set(&mut self, family: Family, table: &str, set: &Set) {
        let (key_type, key_len) = if set.ipv6 {
            (NFT_TYPE_IP6ADDR, 16)
        } else {
            (NFT_TYPE_IPADDR, 4)
        };
        let attrs = vec![
            text(NFTA_SET_TABLE, table),
            text(NFTA_SET_NAME, &set.name),
            be32(
                NFTA_SET_FLAGS,
                if set.dynamic { NFT_SET_DYNAMIC } else { 0 },
            ),
            be32(NFTA_SET_KEY_TYPE, key_type),
            be32(NFTA_SET_KEY_LEN, key_len),
            be32(NFTA_SET_ID, set.id),
        ];
        let what = format!("add set {table} {}", set.name);
        self.request(nft(NFT_MSG_NEWSET, family, attrs), NLM_F_CREATE, what);
        let elements: Vec<Attr> = set
            .elements
            .iter()
            .filter(|ip| ip.is_ipv6() == set.ipv6)
            .map(|ip| {
                let key = match ip {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                };
                Attr::Nested(NFTA_LIST_ELEM, vec![data_value(NFTA_SET_ELEM_KEY, &key)])
            })
            .collect();
        // An attribute's length is 16 bits: a large set is filled by several messages.
        for chunk in elements.chunks(ELEMENTS_PER_MESSAGE) {
            let attrs = vec![
                text(NFTA_SET_ELEM_LIST_TABLE, table),
                text(NFTA_SET_ELEM_LIST_SET, &set.name),
                be32(NFTA_SET_ELEM_LIST_SET_ID, set.id),
                Attr::Nested(NFTA_SET_ELEM_LIST_ELEMENTS, chunk.to_vec()),
            ];
            let what = format!("fill set {table} {}", set.name);
            self.request(nft(NFT_MSG_NEWSETELEM, family, attrs), NLM_F_CREATE, what);
        }
    }

    fn table_contents(&mut self, table: &Table) {
        self.new_table(table.family, &table.name);
        for set in &table.sets {
            self.new_set(table.family, &table.name, set);
        }
        for chain in &table.chains {
            self.new_chain(table.family, &table.name, chain);
        }
        for chain in &table.chains {
            for rule in &chain.rules {
                self.new_rule(table.family, &table.name, &chain.name, rule);
            }
        }
    }

    /// Creates then deletes `name`, so that the delete succeeds whether or not the table existed.
    fn clear_table(&mut self, family: Family, name: &str) {
        self.new_table(family, name);
        self.del_table(family, name);
    }
}

/// A netfilter netlink socket in the namespace it was opened in.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open() -> Result<Socket, NftError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|e| NftError::Socket(e.into()))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|e| NftError::Socket(e.into()))?;
        let timeout = nix::sys::time::TimeVal::new(5, 0);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| NftError::Socket(e.into()))?;
        // A batch is one datagram, which must fit the send buffer: raise it past the default
        // (CAP_NET_ADMIN may exceed the system's maximum; without it, as far as that goes).
        if setsockopt(&fd, sockopt::SndBufForce, &SEND_BUFFER).is_err() {
            let _ = setsockopt(&fd, sockopt::SndBuf, &SEND_BUFFER);
        }
        let seq = (crate::io::now_ms() as u32) | 1;
        Ok(Socket { fd, seq })
    }

    /// Sends a batch and reads the kernel's answers until the last request's acknowledgement
    /// (the kernel processes every message, reporting each that fails, before it answers); the
    /// first refusal is the error.
    fn exchange(&mut self, mut batch: Batch) -> Result<(), NftError> {
        self.seq = batch.seq;
        let Some(last) = batch.ack_last() else {
            return Ok(());
        };
        send(self.fd.as_raw_fd(), &batch.bytes(), MsgFlags::empty())
            .map_err(|e| NftError::Io(e.into()))?;
        let mut first_error: Option<NftError> = None;
        let mut buf = vec![0u8; 256 * 1024];
        let mut done = false;
        while !done {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(|e| NftError::Io(e.into()))?;
            let mut off = 0;
            while off < n {
                let len = NetlinkBuffer::new_checked(&buf[off..n])
                    .map_err(|_| NftError::Malformed)?
                    .length() as usize;
                let msg = NetlinkMessage::<NfMessage>::deserialize(&buf[off..off + len])
                    .map_err(|_| NftError::Malformed)?;
                if let NetlinkPayload::Error(e) = msg.payload {
                    let seq = msg.header.sequence_number;
                    done |= seq == last;
                    if let (Some(code), None) = (e.code, &first_error) {
                        let what = batch.acked.iter().find(|(s, _)| *s == seq);
                        first_error = Some(NftError::Refused {
                            op: what.map_or_else(|| "a message".into(), |(_, w)| w.clone()),
                            source: io::Error::from_raw_os_error(-code.get()),
                        });
                    }
                }
                off += len.next_multiple_of(4);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Installs `table`, replacing any table of that name, in one transaction.
    pub fn replace_table(&mut self, table: &Table) -> Result<(), NftError> {
        let mut b = Batch::new(self.seq);
        b.begin();
        b.clear_table(table.family, &table.name);
        b.table_contents(table);
        b.end();
        self.exchange(b)
    }

    /// Turns the installed table `old` (as last installed by this process) into `new` in one
    /// transaction, keeping the run-time elements of the dynamic sets both hold.
    pub fn update_table(&mut self, old: &Table, new: &Table) -> Result<(), NftError> {
        let mut b = Batch::new(self.seq);
        b.begin();
        b.table_update(old, new);
        b.end();
        self.exchange(b)
    }

    /// Replaces the rules of one existing chain in one transaction.
    pub fn replace_chain_rules(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
        rules: &[Rule],
    ) -> Result<(), NftError> {
        let mut b = Batch::new(self.seq);
        b.begin();
        b.flush_chain(family, table, chain);
        for r in rules {
            b.new_rule(family, table, chain, r);
        }
        b.end();
        self.exchange(b)
    }

    /// Deletes a table; `Ok(false)` when there was none.
    pub fn delete_table(&mut self, family: Family, name: &str) -> Result<bool, NftError> {
        let existed = self.table_exists(family, name)?;
        let mut b = Batch::new(self.seq);
        b.begin();
        b.clear_table(family, name);
        b.end();
        self.exchange(b)?;
        Ok(existed)
    }

    pub fn table_exists(&mut self, family: Family, name: &str) -> Result<bool, NftError> {
        let mut b = Batch::new(self.seq);
        let get = nft(NFT_MSG_GETTABLE, family, vec![text(NFTA_TABLE_NAME, name)]);
        b.request(get, 0, format!("get table {name}"));
        match self.exchange(b) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// A host route's network for one address (`/32` or `/128`).
pub fn host(ip: IpAddr) -> IpNetwork {
    IpNetwork::from(ip)
}

/// Exposed for golden tests: the bytes of a batch installing `table` (sequence numbers from 1).
pub fn encode_replace(table: &Table) -> Vec<u8> {
    let mut b = Batch::new(1);
    b.begin();
    b.clear_table(table.family, &table.name);
    b.table_contents(table);
    b.end();
    b.ack_last();
    b.bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_batch_for_an_empty_table() {
        let t = Table {
            family: Family::Inet,
            name: "kw".into(),
            sets: vec![],
            chains: vec![],
        };
        let b = encode_replace(&t);
        // BATCH_BEGIN: len 20, type 0x10, flags REQUEST, seq 1, pid 0, AF_UNSPEC, v0, res_id 10 (BE)
        let mut expected = Vec::new();
        expected.extend_from_slice(&20u32.to_ne_bytes());
        expected.extend_from_slice(&0x10u16.to_ne_bytes());
        expected.extend_from_slice(&1u16.to_ne_bytes());
        expected.extend_from_slice(&1u32.to_ne_bytes());
        expected.extend_from_slice(&0u32.to_ne_bytes());
        expected.extend_from_slice(&[0, 0, 0, 10]);
        assert_eq!(&b[..20], &expected[..]);
        // NEWTABLE: header 16 + nfgen 4 + name attr (4 + "kw\0" padded to 4) + flags attr 8 = 36
        let newtable = &b[20..56];
        assert_eq!(u32::from_ne_bytes(newtable[0..4].try_into().unwrap()), 36);
        assert_eq!(
            u16::from_ne_bytes(newtable[4..6].try_into().unwrap()),
            0x0a00
        );
        assert_eq!(
            u16::from_ne_bytes(newtable[6..8].try_into().unwrap()),
            NLM_F_REQUEST | NLM_F_CREATE,
            "only the last request asks for an acknowledgement"
        );
        let last = &b[20 + 36 + 28..20 + 36 + 28 + 36];
        assert_eq!(
            u16::from_ne_bytes(last[6..8].try_into().unwrap()),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
        );
        assert_eq!(
            &newtable[16..20],
            &[1, 0, 0, 0],
            "NFPROTO_INET, v0, res_id 0"
        );
        assert_eq!(&newtable[20..28], &[7, 0, 1, 0, b'k', b'w', 0, 0]);
        assert_eq!(&newtable[28..36], &[8, 0, 2, 0, 0, 0, 0, 0]);
        // ... DELTABLE, NEWTABLE again, BATCH_END.
        assert_eq!(b.len(), 20 + 36 + 28 + 36 + 20);
    }

    #[test]
    fn exact_interface_names_are_nul_padded_and_prefixes_are_not() {
        assert_eq!(ifname_bytes("lo", true).len(), 16);
        assert_eq!(ifname_bytes("kw", false), b"kw".to_vec());
    }
}
