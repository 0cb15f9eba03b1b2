//! The thin Linux I/O layer around the core: TUN devices, GUE sockets, links, addresses and routes
//! (rtnetlink), nftables (nf_tables over netlink), files, and the loops that run an L3 endpoint
//! and a SaP.

/// Milliseconds since the Unix epoch: the clock the engines are given.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub mod bpf;
pub mod datapath;
pub mod endpoint;
pub mod fastpath;
pub mod fs;
pub mod netlink;
pub mod nft;
pub mod tun;
pub mod udp;
