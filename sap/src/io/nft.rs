//! nftables through nf_tables netlink messages, built here.
//!
//! Why our own encoder: the plugin runs on the host, where neither the `nft` binary nor libnftnl can
//! be assumed, and the two Rust libraries are not fit for the product (`nftnl` links the C
//! libnftnl, GPL-2.0; `rustables` is GPL-3.0). keyway needs a handful of expressions (meta, cmp,
//! payload, bitwise, ct, immediate, counter) to build one table per pod, so it encodes them itself.
//! Every change is one batch, which the kernel applies atomically: all of it or none of it.
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
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;

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
/// libnftnl's user-data type for a rule comment, so `nft list` shows it.
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;

/// Address families (`NFPROTO_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Inet = 1,
    Ipv4 = 2,
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
}

impl Verdict {
    fn code(&self) -> i32 {
        match self {
            Verdict::Drop => 0,
            Verdict::Accept => 1,
            Verdict::Jump(_) => -3,
            Verdict::Return => -5,
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
    Mark = 3,
    IifName = 6,
    OifName = 7,
    NfProto = 15,
    L4Proto = 16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PayloadBase {
    Network = 1,
    Transport = 2,
}

/// One nf_tables expression.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    Meta(MetaKey),
    Cmp(CmpOp, Vec<u8>),
    Payload(PayloadBase, u32, u32),
    Bitwise {
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    CtState,
    Counter,
    Immediate(Verdict),
}

/// A rule: a sequence of matches ending in a verdict, with an optional comment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    exprs: Vec<Expr>,
    comment: Option<String>,
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
        self.push(Expr::CtState)
            .push(Expr::Bitwise {
                len: 4,
                mask: mask.to_ne_bytes().to_vec(),
                xor: vec![0; 4],
            })
            .push(Expr::Cmp(CmpOp::Neq, vec![0; 4]))
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

/// A chain: a base chain when it has a hook, a regular one (a jump target) when not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub hook: Option<(Hook, i32, Policy)>,
    pub rules: Vec<Rule>,
}

/// A whole table, installed or replaced in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub family: Family,
    pub name: String,
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

/// Builds netlink messages into one buffer.
#[derive(Debug)]
struct Writer {
    buf: Vec<u8>,
    seq: u32,
    /// (sequence number, description) of each message that expects an acknowledgement.
    acked: Vec<(u32, String)>,
}

impl Writer {
    fn new(seq: u32) -> Self {
        Writer {
            buf: Vec::with_capacity(4096),
            seq,
            acked: Vec::new(),
        }
    }

    fn begin(&mut self, ty: u16, flags: u16, family: u8, res_id: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in end()
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    fn end(&mut self, start: usize, what: Option<String>) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        if let Some(w) = what {
            self.acked.push((self.seq, w));
        }
        self.seq = self.seq.wrapping_add(1);
    }

    fn nft_msg(&mut self, msg: u16, flags: u16, family: Family) -> usize {
        self.begin(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            family as u8,
            0,
        )
    }

    fn attr(&mut self, ty: u16, value: &[u8]) {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn str_attr(&mut self, ty: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v);
    }

    fn u32_attr(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    fn nest(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    fn nest_end(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn data_value(&mut self, ty: u16, value: &[u8]) {
        let n = self.nest(ty);
        self.attr(NFTA_DATA_VALUE, value);
        self.nest_end(n);
    }

    fn batch_begin(&mut self) {
        let s = self.begin(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        self.end(s, None);
    }

    fn batch_end(&mut self) {
        let s = self.begin(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        self.end(s, None);
    }

    fn new_table(&mut self, family: Family, name: &str) {
        let s = self.nft_msg(NFT_MSG_NEWTABLE, NLM_F_CREATE, family);
        self.str_attr(NFTA_TABLE_NAME, name);
        self.u32_attr(NFTA_TABLE_FLAGS, 0);
        self.end(s, Some(format!("add table {name}")));
    }

    fn del_table(&mut self, family: Family, name: &str) {
        let s = self.nft_msg(NFT_MSG_DELTABLE, 0, family);
        self.str_attr(NFTA_TABLE_NAME, name);
        self.end(s, Some(format!("delete table {name}")));
    }

    fn new_chain(&mut self, family: Family, table: &str, chain: &Chain) {
        let s = self.nft_msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE, family);
        self.str_attr(NFTA_CHAIN_TABLE, table);
        self.str_attr(NFTA_CHAIN_NAME, &chain.name);
        if let Some((hook, prio, policy)) = chain.hook {
            let n = self.nest(NFTA_CHAIN_HOOK);
            self.u32_attr(NFTA_HOOK_HOOKNUM, hook as u32);
            self.u32_attr(NFTA_HOOK_PRIORITY, prio as u32);
            self.nest_end(n);
            self.u32_attr(NFTA_CHAIN_POLICY, policy as u32);
            self.str_attr(NFTA_CHAIN_TYPE, "filter");
        }
        self.end(s, Some(format!("add chain {table} {}", chain.name)));
    }

    fn flush_chain(&mut self, family: Family, table: &str, chain: &str) {
        let s = self.nft_msg(NFT_MSG_DELRULE, 0, family);
        self.str_attr(NFTA_RULE_TABLE, table);
        self.str_attr(NFTA_RULE_CHAIN, chain);
        self.end(s, Some(format!("flush chain {table} {chain}")));
    }

    fn expr(&mut self, e: &Expr) {
        let elem = self.nest(NFTA_LIST_ELEM);
        let name = match e {
            Expr::Meta(_) => "meta",
            Expr::Cmp(..) => "cmp",
            Expr::Payload(..) => "payload",
            Expr::Bitwise { .. } => "bitwise",
            Expr::CtState => "ct",
            Expr::Counter => "counter",
            Expr::Immediate(_) => "immediate",
        };
        self.str_attr(NFTA_EXPR_NAME, name);
        let data = self.nest(NFTA_EXPR_DATA);
        match e {
            Expr::Meta(key) => {
                self.u32_attr(1, NFT_REG_1); // NFTA_META_DREG
                self.u32_attr(2, *key as u32); // NFTA_META_KEY
            }
            Expr::Cmp(op, value) => {
                self.u32_attr(1, NFT_REG_1); // NFTA_CMP_SREG
                self.u32_attr(2, *op as u32); // NFTA_CMP_OP
                self.data_value(3, value); // NFTA_CMP_DATA
            }
            Expr::Payload(base, offset, len) => {
                self.u32_attr(1, NFT_REG_1); // NFTA_PAYLOAD_DREG
                self.u32_attr(2, *base as u32); // NFTA_PAYLOAD_BASE
                self.u32_attr(3, *offset); // NFTA_PAYLOAD_OFFSET
                self.u32_attr(4, *len); // NFTA_PAYLOAD_LEN
            }
            Expr::Bitwise { len, mask, xor } => {
                self.u32_attr(1, NFT_REG_1); // NFTA_BITWISE_SREG
                self.u32_attr(2, NFT_REG_1); // NFTA_BITWISE_DREG
                self.u32_attr(3, *len); // NFTA_BITWISE_LEN
                self.data_value(4, mask); // NFTA_BITWISE_MASK
                self.data_value(5, xor); // NFTA_BITWISE_XOR
            }
            Expr::CtState => {
                self.u32_attr(1, NFT_REG_1); // NFTA_CT_DREG
                self.u32_attr(2, 0); // NFTA_CT_KEY: NFT_CT_STATE
            }
            Expr::Counter => {
                self.attr(1, &0u64.to_be_bytes()); // NFTA_COUNTER_BYTES
                self.attr(2, &0u64.to_be_bytes()); // NFTA_COUNTER_PACKETS
            }
            Expr::Immediate(v) => {
                self.u32_attr(1, NFT_REG_VERDICT); // NFTA_IMMEDIATE_DREG
                let d = self.nest(2); // NFTA_IMMEDIATE_DATA
                let vn = self.nest(NFTA_DATA_VERDICT);
                self.u32_attr(NFTA_VERDICT_CODE, v.code() as u32);
                if let Verdict::Jump(chain) = v {
                    self.str_attr(NFTA_VERDICT_CHAIN, chain);
                }
                self.nest_end(vn);
                self.nest_end(d);
            }
        }
        self.nest_end(data);
        self.nest_end(elem);
    }

    fn new_rule(&mut self, family: Family, table: &str, chain: &str, rule: &Rule) {
        let s = self.nft_msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, family);
        self.str_attr(NFTA_RULE_TABLE, table);
        self.str_attr(NFTA_RULE_CHAIN, chain);
        let list = self.nest(NFTA_RULE_EXPRESSIONS);
        for e in &rule.exprs {
            self.expr(e);
        }
        self.nest_end(list);
        if let Some(c) = &rule.comment {
            let mut udata = vec![NFTNL_UDATA_RULE_COMMENT, (c.len() + 1).min(255) as u8];
            udata.extend_from_slice(&c.as_bytes()[..c.len().min(254)]);
            udata.push(0);
            self.attr(NFTA_RULE_USERDATA, &udata);
        }
        self.end(s, Some(format!("add rule to {table} {chain}")));
    }

    fn table_contents(&mut self, table: &Table) {
        self.new_table(table.family, &table.name);
        for chain in &table.chains {
            self.new_chain(table.family, &table.name, chain);
        }
        for chain in &table.chains {
            for rule in &chain.rules {
                self.new_rule(table.family, &table.name, &chain.name, rule);
            }
        }
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
        let seq = (crate::io::now_ms() as u32) | 1;
        Ok(Socket { fd, seq })
    }

    fn exchange(&mut self, w: Writer) -> Result<Vec<Vec<u8>>, NftError> {
        self.seq = w.seq;
        let mut pending = w.acked;
        send(self.fd.as_raw_fd(), &w.buf, MsgFlags::empty()).map_err(|e| NftError::Io(e.into()))?;
        let mut replies = Vec::new();
        let mut first_error: Option<NftError> = None;
        let mut buf = vec![0u8; 256 * 1024];
        while !pending.is_empty() {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(|e| NftError::Io(e.into()))?;
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4")) as usize;
                if len < 16 || off + len > n {
                    return Err(NftError::Malformed);
                }
                let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2"));
                let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().expect("4"));
                let body = &buf[off + 16..off + len];
                match ty {
                    NLMSG_ERROR => {
                        if body.len() < 4 {
                            return Err(NftError::Malformed);
                        }
                        let code = i32::from_ne_bytes(body[..4].try_into().expect("4"));
                        let what = pending
                            .iter()
                            .position(|(s, _)| *s == seq)
                            .map(|i| pending.remove(i));
                        if code != 0 && first_error.is_none() {
                            first_error = Some(NftError::Refused {
                                op: what.map(|(_, w)| w).unwrap_or_else(|| "a message".into()),
                                source: io::Error::from_raw_os_error(-code),
                            });
                        }
                    }
                    NLMSG_DONE => {}
                    _ => replies.push(body.to_vec()),
                }
                off += (len + 3) & !3;
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(replies),
        }
    }

    /// Installs `table`, replacing any table of that name, in one transaction.
    pub fn replace_table(&mut self, table: &Table) -> Result<(), NftError> {
        let mut w = Writer::new(self.seq);
        w.batch_begin();
        // Create-then-delete makes the delete succeed whether or not the table existed.
        w.new_table(table.family, &table.name);
        w.del_table(table.family, &table.name);
        w.table_contents(table);
        w.batch_end();
        self.exchange(w).map(|_| ())
    }

    /// Replaces the rules of one existing chain in one transaction.
    pub fn replace_chain_rules(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
        rules: &[Rule],
    ) -> Result<(), NftError> {
        let mut w = Writer::new(self.seq);
        w.batch_begin();
        w.flush_chain(family, table, chain);
        for r in rules {
            w.new_rule(family, table, chain, r);
        }
        w.batch_end();
        self.exchange(w).map(|_| ())
    }

    /// Deletes a table; `Ok(false)` when there was none.
    pub fn delete_table(&mut self, family: Family, name: &str) -> Result<bool, NftError> {
        let existed = self.table_exists(family, name)?;
        let mut w = Writer::new(self.seq);
        w.batch_begin();
        w.new_table(family, name);
        w.del_table(family, name);
        w.batch_end();
        self.exchange(w)?;
        Ok(existed)
    }

    pub fn table_exists(&mut self, family: Family, name: &str) -> Result<bool, NftError> {
        let mut w = Writer::new(self.seq);
        let s = w.nft_msg(NFT_MSG_GETTABLE, 0, family);
        w.str_attr(NFTA_TABLE_NAME, name);
        w.end(s, Some(format!("get table {name}")));
        match self.exchange(w) {
            Ok(_) => Ok(true),
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
    let mut w = Writer::new(1);
    w.batch_begin();
    w.new_table(table.family, &table.name);
    w.del_table(table.family, &table.name);
    w.table_contents(table);
    w.batch_end();
    w.buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_batch_for_an_empty_table() {
        let t = Table {
            family: Family::Inet,
            name: "kw".into(),
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
