//! What an attacker does, with real packets, from where an attacker would be: a pod with the
//! default capabilities (CAP_NET_RAW among them) crafting packets with a raw socket, a workload
//! binding a port, a neighbour on the pod bridge. And what the defender reads afterwards: whether
//! a packet arrived, and the counters of the rules that dropped it. Used by
//! `conformance/tests/attacks.rs`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use keyway_core::packet::{PROTO_UDP, build};
use keyway_sap::sys::Netns;

use crate::topology::in_ns;
use socket2::{Domain, Protocol, Socket, Type};

const PROTO_ICMP: u8 = 1;

/// Sends whole IPv4 packets (their own headers, any source address) from `netns` with a raw
/// socket, as a process with CAP_NET_RAW there can; the kernel routes each by its destination.
pub fn send_raw(netns: &Path, packets: &[Vec<u8>]) -> anyhow::Result<()> {
    let ns = Netns::open(netns)?;
    ns.run(|| -> anyhow::Result<()> {
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))
            .context("a raw socket (IPPROTO_RAW)")?;
        for p in packets {
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            sock.send_to(p, &SocketAddr::V4(SocketAddrV4::new(dst, 0)).into())
                .with_context(|| format!("send {} bytes to {dst}", p.len()))?;
        }
        Ok(())
    })?
}

/// A router advertisement (ICMPv6 134), from `netns`'s `ifname` to `to` (an address on that
/// link), announcing the sender as a default router for 30 minutes and `prefix`/64 as on-link and
/// for addresses: what a rogue neighbour sends to take a pod's IPv6 routing. The kernel fills in
/// the link-local source and the checksum (an ICMPv6 raw socket); the hop limit is 255, as
/// receivers require of neighbour discovery.
pub fn router_advertisement(
    netns: &Path,
    ifname: &str,
    to: Ipv6Addr,
    prefix: Ipv6Addr,
) -> anyhow::Result<()> {
    let ns = Netns::open(netns)?;
    ns.run(|| -> anyhow::Result<()> {
        let sock = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
            .context("a raw ICMPv6 socket")?;
        sock.set_unicast_hops_v6(255)?;
        sock.set_multicast_hops_v6(255)?;
        let ifindex = nix::net::if_::if_nametoindex(ifname)?;
        // Type, code, checksum; current hop limit 64, no flags, router lifetime 1800 s; reachable
        // time and retransmission timer unspecified.
        let mut ra = vec![134, 0, 0, 0, 64, 0];
        ra.extend(1800u16.to_be_bytes());
        ra.extend([0u8; 8]);
        // Prefix information: type 3, 4 × 8 bytes, /64, on-link and autonomous; lifetimes.
        ra.extend([3, 4, 64, 0xc0]);
        ra.extend(86_400u32.to_be_bytes());
        ra.extend(14_400u32.to_be_bytes());
        ra.extend([0u8; 4]);
        ra.extend(prefix.octets());
        sock.send_to(
            &ra,
            &SocketAddr::V6(SocketAddrV6::new(to, 0, 0, ifindex)).into(),
        )
        .with_context(|| format!("send a router advertisement to {to}%{ifname}"))?;
        Ok(())
    })?
}

/// A UDP datagram with a valid IPv4 header checksum (a receiving kernel drops one without) and
/// UDP checksum 0 ("none", as IPv4 allows). A raw socket fills in the checksum of the header it
/// sends, not of one carried inside, so a forged GUE payload needs its own.
pub fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = build::ipv4(
        src,
        dst,
        PROTO_UDP,
        &build::ports(PROTO_UDP, sport, dport, payload),
    );
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p
}

fn checksum(bytes: &[u8]) -> u16 {
    keyway_core::packet::checksum(bytes, 0)
}

/// An ICMP "port unreachable" from `src` to `dst` quoting `quoted` (the offending packet's IP
/// header and first 8 bytes), with a valid checksum, as a router or host would send it.
pub fn port_unreachable4(src: Ipv4Addr, dst: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let quoted = &quoted[..quoted.len().min(28)];
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(quoted);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    build::ipv4(src, dst, PROTO_ICMP, &icmp)
}

/// A UDP socket bound in `netns` (it stays there, whichever thread uses it).
pub fn udp_socket(netns: &Path, bind: SocketAddr) -> anyhow::Result<UdpSocket> {
    let ns = Netns::open(netns)?;
    let sock = ns
        .run(|| UdpSocket::bind(bind))?
        .with_context(|| format!("bind {bind} in {}", netns.display()))?;
    Ok(sock)
}

/// What `sock` receives within `window`: payloads, or the error the socket reported (an ICMP
/// error for a connected socket).
pub fn received(sock: &UdpSocket, window: Duration) -> Vec<Result<Vec<u8>, std::io::ErrorKind>> {
    let deadline = Instant::now() + window;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match sock.recv(&mut buf) {
            Ok(n) => got.push(Ok(buf[..n].to_vec())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => got.push(Err(e.kind())),
        }
    }
    got
}

/// The packets counted by the rules of `family table` in `netns` whose comment contains
/// `comment`, summed (`nft -j list table`).
pub fn rule_packets(netns: &Path, family: &str, table: &str, comment: &str) -> anyhow::Result<u64> {
    let name = netns
        .file_name()
        .context("a namespace under /var/run/netns")?
        .to_string_lossy()
        .into_owned();
    let out = in_ns(&name, &["nft", "-j", "list", "table", family, table])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mut sum = 0;
    for item in v["nftables"].as_array().into_iter().flatten() {
        let rule = &item["rule"];
        if !rule["comment"]
            .as_str()
            .is_some_and(|c| c.contains(comment))
        {
            continue;
        }
        for e in rule["expr"].as_array().into_iter().flatten() {
            sum += e["counter"]["packets"].as_u64().unwrap_or(0);
        }
    }
    Ok(sum)
}

/// An IPv4 address (the lab's are).
pub fn v4(addr: impl AsRef<str>) -> anyhow::Result<Ipv4Addr> {
    let a = addr.as_ref();
    a.parse()
        .with_context(|| format!("{a} is not an IPv4 address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_of_a_packet_with_its_checksum_is_zero() {
        let p = port_unreachable4(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            &udp4(
                Ipv4Addr::new(10, 0, 0, 2),
                40000,
                Ipv4Addr::new(10, 0, 0, 1),
                80,
                b"x",
            ),
        );
        assert_eq!(checksum(&p[20..]), 0);
    }

    #[test]
    fn a_forged_datagram_has_a_valid_header_checksum() {
        let p = udp4(
            Ipv4Addr::new(100, 64, 0, 7),
            40405,
            Ipv4Addr::new(100, 64, 1, 9),
            80,
            b"as-front",
        );
        assert_ne!(p[10..12], [0, 0]);
        assert_eq!(checksum(&p[..20]), 0);
    }
}
