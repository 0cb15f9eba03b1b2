//! Classification of inner IP packets into what policy needs: addresses, protocol and ports.
//!
//! Documented behaviour for the awkward cases:
//! - **Fragments.** A first fragment (offset 0) is classified like an unfragmented packet: its
//!   transport header is there. A later fragment carries no transport header, so its ports are
//!   [`Transport::LaterFragment`]: policy lets it through only where the protocol is allowed on
//!   every port (a rule naming ports cannot be checked, so it does not match: fail closed).
//! - **IPv6 extension headers.** Hop-by-hop, routing, destination options and fragment headers are
//!   walked to find the transport header. AH, ESP and anything else end the walk: the packet is
//!   classified with that protocol number and no ports.
//! - **Unknown protocols** (anything but TCP, UDP, SCTP, ICMP, ICMPv6) have no ports: only rules
//!   that allow every protocol match them, which is exactly Kubernetes' semantics (a rule with
//!   ports names TCP, UDP or SCTP).
//! - **ICMP/ICMPv6** have no ports; echo requests and replies carry their identifier so that the
//!   reply can be matched to the request by flow tracking.
//!
//! Anything inconsistent (bad version, header lengths beyond the buffer, a transport header cut
//! short in a first fragment) is a [`PacketError`], counted as a malformed drop.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// The transport protocols that policy names, as Kubernetes spells them (`protocol: TCP`).
const POLICY_PROTOCOLS: [(&str, u8); 3] =
    [("TCP", PROTO_TCP), ("UDP", PROTO_UDP), ("SCTP", PROTO_SCTP)];

/// The IP protocol number of a protocol as Kubernetes spells it: `TCP`, `UDP` or `SCTP`.
pub fn protocol_number(name: &str) -> Option<u8> {
    POLICY_PROTOCOLS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| *p)
}

/// The inverse of [`protocol_number`].
pub fn protocol_name(number: u8) -> Option<&'static str> {
    POLICY_PROTOCOLS
        .iter()
        .find(|(_, p)| *p == number)
        .map(|(n, _)| *n)
}

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
const IPV6_HEADER_LEN: usize = 40;
const IPV4_MIN_HEADER_LEN: usize = 20;
/// Limit on IPv6 extension headers walked: a packet built to make us loop is malformed.
const MAX_EXTENSION_HEADERS: usize = 8;

/// What the transport layer says about a packet, as far as policy is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP, UDP or SCTP with both ports.
    Ports { src: u16, dst: u16 },
    /// ICMP or ICMPv6 echo request (`reply == false`) or reply, with its identifier.
    Echo { id: u16, reply: bool },
    /// Another ICMP message, or a protocol without ports.
    NoPorts,
    /// A fragment after the first: the transport header is in another packet.
    LaterFragment,
}

/// The classification of one inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Classified {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number of the transport (after IPv6 extension headers).
    pub proto: u8,
    pub transport: Transport,
    /// The packet opens a flow and so can never be a reply: a TCP SYN without ACK, or an ICMP
    /// echo request. Lets a stateless check refuse it as a "reply".
    pub opens_flow: bool,
    /// The packet ends its flow at once: a TCP segment with RST.
    pub resets_flow: bool,
}

impl Classified {
    /// Destination port, where the packet has one.
    pub fn dst_port(&self) -> Option<u16> {
        match self.transport {
            Transport::Ports { dst, .. } => Some(dst),
            _ => None,
        }
    }

    /// Source port, where the packet has one.
    pub fn src_port(&self) -> Option<u16> {
        match self.transport {
            Transport::Ports { src, .. } => Some(src),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("empty packet")]
    Empty,
    #[error("IP version {0} is neither 4 nor 6")]
    BadVersion(u8),
    #[error("packet truncated: {got} bytes where {needed} are needed")]
    Truncated { needed: usize, got: usize },
    #[error("IPv4 header length {0} is below the minimum of 20 bytes")]
    BadIhl(usize),
    #[error("IP total length {total} is smaller than its own header ({header})")]
    BadTotalLength { total: usize, header: usize },
    #[error("too many IPv6 extension headers")]
    TooManyExtensionHeaders,
}

fn need(buf: &[u8], needed: usize) -> Result<(), PacketError> {
    if buf.len() < needed {
        Err(PacketError::Truncated {
            needed,
            got: buf.len(),
        })
    } else {
        Ok(())
    }
}

/// Classifies an IPv4 or IPv6 packet (the whole packet, starting at the IP header).
pub fn classify(pkt: &[u8]) -> Result<Classified, PacketError> {
    match pkt.first().map(|b| b >> 4) {
        None => Err(PacketError::Empty),
        Some(4) => classify_v4(pkt),
        Some(6) => classify_v6(pkt),
        Some(v) => Err(PacketError::BadVersion(v)),
    }
}

fn classify_v4(pkt: &[u8]) -> Result<Classified, PacketError> {
    need(pkt, IPV4_MIN_HEADER_LEN)?;
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    if ihl < IPV4_MIN_HEADER_LEN {
        return Err(PacketError::BadIhl(ihl));
    }
    need(pkt, ihl)?;
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if total < ihl {
        return Err(PacketError::BadTotalLength { total, header: ihl });
    }
    need(pkt, total)?;
    let frag_offset = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff;
    let proto = pkt[9];
    let src = IpAddr::V4(Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]));
    let (transport, opens_flow, resets_flow) = if frag_offset != 0 {
        (Transport::LaterFragment, false, false)
    } else {
        transport(proto, &pkt[ihl..total])?
    };
    Ok(Classified {
        src,
        dst,
        proto,
        transport,
        opens_flow,
        resets_flow,
    })
}

fn classify_v6(pkt: &[u8]) -> Result<Classified, PacketError> {
    need(pkt, IPV6_HEADER_LEN)?;
    let payload_len = usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
    let end = IPV6_HEADER_LEN + payload_len;
    need(pkt, end)?;
    let src = IpAddr::V6(Ipv6Addr::from(
        <[u8; 16]>::try_from(&pkt[8..24]).expect("16 bytes"),
    ));
    let dst = IpAddr::V6(Ipv6Addr::from(
        <[u8; 16]>::try_from(&pkt[24..40]).expect("16 bytes"),
    ));
    let mut next = pkt[6];
    let mut off = IPV6_HEADER_LEN;
    let mut later_fragment = false;
    for _ in 0..=MAX_EXTENSION_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                need(&pkt[..end], off + 2)?;
                let len = (usize::from(pkt[off + 1]) + 1) * 8;
                need(&pkt[..end], off + len)?;
                next = pkt[off];
                off += len;
            }
            IPV6_FRAGMENT => {
                need(&pkt[..end], off + 8)?;
                let frag_offset = u16::from_be_bytes([pkt[off + 2], pkt[off + 3]]) >> 3;
                later_fragment |= frag_offset != 0;
                next = pkt[off];
                off += 8;
            }
            proto => {
                let (transport, opens_flow, resets_flow) = if later_fragment {
                    (Transport::LaterFragment, false, false)
                } else {
                    transport(proto, &pkt[off..end])?
                };
                return Ok(Classified {
                    src,
                    dst,
                    proto,
                    transport,
                    opens_flow,
                    resets_flow,
                });
            }
        }
    }
    Err(PacketError::TooManyExtensionHeaders)
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_RST: u8 = 0x04;

/// The transport facts, and whether the packet opens a flow.
/// The transport, whether the packet opens a flow, and whether it resets one.
fn transport(proto: u8, l4: &[u8]) -> Result<(Transport, bool, bool), PacketError> {
    match proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            need(l4, 4)?;
            let ports = Transport::Ports {
                src: u16::from_be_bytes([l4[0], l4[1]]),
                dst: u16::from_be_bytes([l4[2], l4[3]]),
            };
            // A first fragment may stop before the TCP flags; it is then not known to open a flow.
            let flags = (proto == PROTO_TCP && l4.len() > 13).then(|| l4[13]);
            let syn = flags.is_some_and(|f| f & (TCP_SYN | TCP_ACK) == TCP_SYN);
            let rst = flags.is_some_and(|f| f & TCP_RST != 0);
            Ok((ports, syn, rst))
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            need(l4, 4)?;
            let (request, reply) = if proto == PROTO_ICMP {
                (8, 0)
            } else {
                (128, 129)
            };
            match l4[0] {
                t if t == request || t == reply => {
                    need(l4, 6)?;
                    let echo = Transport::Echo {
                        id: u16::from_be_bytes([l4[4], l4[5]]),
                        reply: t == reply,
                    };
                    Ok((echo, t == request, false))
                }
                _ => Ok((Transport::NoPorts, false, false)),
            }
        }
        _ => Ok((Transport::NoPorts, false, false)),
    }
}

/// The Internet checksum (RFC 1071) of `bytes`, starting from the partial sum `initial`.
pub fn checksum(bytes: &[u8], initial: u32) -> u16 {
    !fold(sum16(bytes, initial))
}

fn sum16(bytes: &[u8], initial: u32) -> u32 {
    let mut sum = u64::from(initial);
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff_ffff {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Where a packet's transport header starts and its bytes end, its transport protocol, and the
/// sum of its pseudo-header: for an unfragmented IPv4 packet, or an IPv6 packet whose transport
/// header follows the fixed header (what a kernel's checksum offload and GSO handle). `None`
/// otherwise, or when the lengths do not fit `pkt`.
fn transport_of(pkt: &[u8]) -> Option<(usize, usize, u8, u32)> {
    let (l4, end, proto, mut pseudo) = match pkt.first()? >> 4 {
        4 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            if pkt.len() < IPV4_MIN_HEADER_LEN || ihl < IPV4_MIN_HEADER_LEN {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
            if u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0 || total < ihl {
                return None;
            }
            (ihl, total, pkt[9], sum16(&pkt[12..20], 0))
        }
        6 if pkt.len() >= IPV6_HEADER_LEN => {
            let payload = usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
            let end = IPV6_HEADER_LEN + payload;
            (IPV6_HEADER_LEN, end, pkt[6], sum16(&pkt[8..40], 0))
        }
        _ => return None,
    };
    if end > pkt.len() {
        return None;
    }
    // The upper-layer length (IPv4's is 16 bits, IPv6's 32: the same sum) and the protocol.
    pseudo = sum16(&((end - l4) as u32).to_be_bytes(), pseudo);
    pseudo = sum16(&[0, proto], pseudo);
    Some((l4, end, proto, pseudo))
}

/// Completes the TCP or UDP checksum of an IPv4 or IPv6 packet that carries it only partially:
/// the pseudo-header's sum alone, as a kernel leaves it for a checksum offload to finish
/// (`CHECKSUM_PARTIAL`). The kernel fast path carries such packets as they are (the receiving
/// kernel knows the checksum is to be trusted); when one reaches a user-space receiver instead,
/// its bytes must become a packet any stack accepts. A checksum that is not the pseudo-header's
/// sum is left alone, and one that is (a full checksum that happens to equal it) is recomputed
/// to the same value, so this never changes a correct packet. Returns whether it rewrote one.
pub fn complete_partial_checksum(pkt: &mut [u8]) -> bool {
    let Some((l4, end, proto, pseudo_sum)) = transport_of(pkt) else {
        return false;
    };
    let at = match proto {
        PROTO_TCP => 16,
        PROTO_UDP => 6,
        _ => return false,
    };
    if end < l4 + at + 2 {
        return false;
    }
    let field = l4 + at;
    let stored = u16::from_be_bytes([pkt[field], pkt[field + 1]]);
    // UDP over IPv4 without a checksum says 0.
    if stored != fold(pseudo_sum) || (proto == PROTO_UDP && stored == 0) {
        return false;
    }
    pkt[field..field + 2].fill(0);
    let mut c = checksum(&pkt[l4..end], pseudo_sum);
    if proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    pkt[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// Splits a TCP packet (IPv4, or IPv6 without extension headers) longer than `mss` bytes of
/// payload (a GSO packet that a fast-path sender's kernel kept whole, as it arrives at a
/// user-space SaP that must send it on as datagrams) into the segments the kernel's own
/// segmentation would make, none longer than `max_len` bytes: each with the headers of the
/// first, its share of the payload, its sequence number, (IPv4) an IP identifier counting up,
/// FIN and PSH on the last segment only, CWR on the first only, and its checksums complete.
/// `emit` gets each segment in order; returns how many, or `None` (nothing emitted) when the
/// packet is not a whole, unfragmented TCP packet or its headers leave no room in `max_len`.
pub fn segment_tcp(packet: &[u8], max_len: usize, mut emit: impl FnMut(&[u8])) -> Option<usize> {
    let (ip_len, end, proto, _) = transport_of(packet)?;
    if proto != PROTO_TCP || end != packet.len() {
        return None;
    }
    let v4 = packet[0] >> 4 == 4;
    let doff = usize::from(*packet.get(ip_len + 12)? >> 4) * 4;
    let headers = ip_len + doff;
    if doff < 20 || headers > end {
        return None;
    }
    let mss = max_len.checked_sub(headers).filter(|m| *m > 0)?;
    let payload = &packet[headers..];
    let seq = u32::from_be_bytes(packet[ip_len + 4..ip_len + 8].try_into().ok()?);
    let id = u16::from_be_bytes([packet[4], packet[5]]);
    let flags = packet[ip_len + 13];
    const FIN_PSH: u8 = 0x01 | 0x08;
    const CWR: u8 = 0x80;
    let count = payload.len().div_ceil(mss).max(1);
    let mut seg = Vec::with_capacity(headers + mss.min(payload.len()));
    for i in 0..count {
        let chunk = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
        seg.clear();
        seg.extend_from_slice(&packet[..headers]);
        seg.extend_from_slice(chunk);
        if v4 {
            let len = seg.len() as u16;
            seg[2..4].copy_from_slice(&len.to_be_bytes());
            seg[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            seg[10..12].fill(0);
            let c = checksum(&seg[..ip_len], 0);
            seg[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            let len = (seg.len() - IPV6_HEADER_LEN) as u16;
            seg[4..6].copy_from_slice(&len.to_be_bytes());
        }
        let s = seq.wrapping_add((i * mss) as u32);
        seg[ip_len + 4..ip_len + 8].copy_from_slice(&s.to_be_bytes());
        let mut f = flags;
        if i + 1 < count {
            f &= !FIN_PSH;
        }
        if i > 0 {
            f &= !CWR;
        }
        seg[ip_len + 13] = f;
        let (_, _, _, pseudo) = transport_of(&seg)?;
        seg[ip_len + 16..ip_len + 18].fill(0);
        let c = checksum(&seg[ip_len..], pseudo);
        seg[ip_len + 16..ip_len + 18].copy_from_slice(&c.to_be_bytes());
        emit(&seg);
    }
    Some(count)
}

/// Builders of well-formed packets, for tests, benches and fuzz seeds. Checksums are left zero:
/// nothing in keyway's data path reads them.
pub mod build {
    use super::*;

    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
        let total = IPV4_MIN_HEADER_LEN + l4.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[20..].copy_from_slice(l4);
        p
    }

    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; IPV6_HEADER_LEN + payload.len()];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        p[6] = next;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p[40..].copy_from_slice(payload);
        p
    }

    /// A transport header with ports (TCP gets a 20-byte header, UDP 8, SCTP 12) and a payload.
    pub fn ports(proto: u8, src: u16, dst: u16, payload: &[u8]) -> Vec<u8> {
        let hlen = match proto {
            PROTO_TCP => 20,
            PROTO_SCTP => 12,
            _ => 8,
        };
        let mut l4 = vec![0u8; hlen];
        l4[0..2].copy_from_slice(&src.to_be_bytes());
        l4[2..4].copy_from_slice(&dst.to_be_bytes());
        if proto == PROTO_TCP {
            l4[12] = 5 << 4;
            l4[13] = 0x10; // ACK: an established segment unless a test says otherwise
        }
        if proto == PROTO_UDP {
            l4[4..6].copy_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
        }
        l4.extend_from_slice(payload);
        l4
    }

    /// An ICMP (v4 or v6) echo request or reply.
    pub fn echo(v6: bool, reply: bool, id: u16, seq: u16) -> Vec<u8> {
        let t = match (v6, reply) {
            (false, false) => 8,
            (false, true) => 0,
            (true, false) => 128,
            (true, true) => 129,
        };
        let mut l4 = vec![t, 0, 0, 0];
        l4.extend_from_slice(&id.to_be_bytes());
        l4.extend_from_slice(&seq.to_be_bytes());
        l4
    }

    pub fn tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        ipv4(
            src.into(),
            dst.into(),
            PROTO_TCP,
            &ports(PROTO_TCP, sport, dport, b""),
        )
    }

    /// A TCP SYN (no ACK): the first packet of a connection.
    pub fn syn4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut p = tcp4(src, sport, dst, dport);
        p[20 + 13] = 0x02;
        p
    }

    /// A TCP RST (with ACK): the end of a connection, or the answer to a segment of none.
    pub fn rst4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut p = tcp4(src, sport, dst, dport);
        p[20 + 13] = 0x14;
        p
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use proptest::prelude::*;

    const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

    #[test]
    fn tcp_udp_sctp_over_ipv4() {
        for proto in [PROTO_TCP, PROTO_UDP, PROTO_SCTP] {
            let c = classify(&ipv4(A, B, proto, &ports(proto, 1234, 80, b"hi"))).unwrap();
            assert_eq!(c.src, IpAddr::V4(A));
            assert_eq!(c.dst, IpAddr::V4(B));
            assert_eq!(c.proto, proto);
            assert_eq!(c.transport, Transport::Ports { src: 1234, dst: 80 });
            assert_eq!(c.dst_port(), Some(80));
            assert_eq!(c.src_port(), Some(1234));
        }
    }

    #[test]
    fn icmp_echo_and_other_icmp() {
        let c = classify(&ipv4(A, B, PROTO_ICMP, &echo(false, false, 77, 1))).unwrap();
        assert_eq!(
            c.transport,
            Transport::Echo {
                id: 77,
                reply: false
            }
        );
        let c = classify(&ipv4(A, B, PROTO_ICMP, &echo(false, true, 77, 1))).unwrap();
        assert_eq!(
            c.transport,
            Transport::Echo {
                id: 77,
                reply: true
            }
        );
        // Destination unreachable: no ports.
        let c = classify(&ipv4(A, B, PROTO_ICMP, &[3, 1, 0, 0, 0, 0, 0, 0])).unwrap();
        assert_eq!(c.transport, Transport::NoPorts);
    }

    #[test]
    fn ipv6_with_extension_headers() {
        let s: Ipv6Addr = "fd00::1".parse().unwrap();
        let d: Ipv6Addr = "fd00::2".parse().unwrap();
        // hop-by-hop (8 bytes) -> destination options (8 bytes) -> UDP
        let mut payload = vec![IPV6_DEST_OPTS, 0, 0, 0, 0, 0, 0, 0];
        payload.extend_from_slice(&[PROTO_UDP, 0, 0, 0, 0, 0, 0, 0]);
        payload.extend_from_slice(&ports(PROTO_UDP, 5353, 53, b"q"));
        let c = classify(&ipv6(s, d, IPV6_HOP_BY_HOP, &payload)).unwrap();
        assert_eq!(c.proto, PROTO_UDP);
        assert_eq!(c.transport, Transport::Ports { src: 5353, dst: 53 });

        let c = classify(&ipv6(s, d, PROTO_ICMPV6, &echo(true, false, 9, 1))).unwrap();
        assert_eq!(
            c.transport,
            Transport::Echo {
                id: 9,
                reply: false
            }
        );
    }

    #[test]
    fn fragments_first_has_ports_later_does_not() {
        let mut first = ipv4(A, B, PROTO_UDP, &ports(PROTO_UDP, 1, 2, b"x"));
        first[6] = 0x20; // MF, offset 0
        assert_eq!(
            classify(&first).unwrap().transport,
            Transport::Ports { src: 1, dst: 2 }
        );
        let mut later = ipv4(A, B, PROTO_UDP, b"rest of the datagram");
        later[6] = 0x00;
        later[7] = 0xb9; // offset 185 * 8
        assert_eq!(
            classify(&later).unwrap().transport,
            Transport::LaterFragment
        );

        let s: Ipv6Addr = "fd00::1".parse().unwrap();
        let frag = [PROTO_TCP, 0, 0x00, 0x08, 0, 0, 0, 1]; // offset 1 (8 bytes)
        let mut payload = frag.to_vec();
        payload.extend_from_slice(b"later");
        let c = classify(&ipv6(s, s, IPV6_FRAGMENT, &payload)).unwrap();
        assert_eq!(c.proto, PROTO_TCP);
        assert_eq!(c.transport, Transport::LaterFragment);
    }

    #[test]
    fn a_partial_checksum_is_completed_and_a_full_one_left_alone() {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let mut p = build::ipv4(
                [10, 0, 0, 1].into(),
                [10, 0, 0, 2].into(),
                proto,
                &build::ports(proto, 40000, 80, b"some payload, odd length"),
            );
            let at = if proto == PROTO_TCP { 36 } else { 26 };
            // What a kernel leaves for the offload: the pseudo-header's sum.
            let l4 = (p.len() - 20) as u16;
            let mut pseudo = p[12..20].to_vec();
            pseudo.extend_from_slice(&[0, proto]);
            pseudo.extend_from_slice(&l4.to_be_bytes());
            p[at..at + 2].copy_from_slice(&(!checksum(&pseudo, 0)).to_be_bytes());
            assert!(complete_partial_checksum(&mut p), "proto {proto}");
            // A complete checksum verifies to zero over pseudo-header and segment.
            let mut all = pseudo.clone();
            all.extend_from_slice(&p[20..]);
            assert_eq!(checksum(&all, 0), 0, "proto {proto}");
            let done = p.clone();
            assert!(!complete_partial_checksum(&mut p), "a full checksum stays");
            assert_eq!(p, done);
        }
        let mut no_checksum = build::ipv4(
            [10, 0, 0, 1].into(),
            [10, 0, 0, 2].into(),
            PROTO_UDP,
            &build::ports(PROTO_UDP, 1, 2, b""),
        );
        assert!(!complete_partial_checksum(&mut no_checksum), "UDP's 0");
        let mut cut = build::tcp4([1, 1, 1, 1], 1, [2, 2, 2, 2], 2);
        cut.truncate(30);
        assert!(!complete_partial_checksum(&mut cut));
    }

    #[test]
    fn an_ipv6_partial_checksum_is_completed_and_a_full_one_left_alone() {
        let (a, b): (Ipv6Addr, Ipv6Addr) = ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        for proto in [PROTO_TCP, PROTO_UDP] {
            let mut p = build::ipv6(a, b, proto, &build::ports(proto, 40000, 80, b"odd payload"));
            let at = 40 + if proto == PROTO_TCP { 16 } else { 6 };
            // The pseudo-header: both addresses, the upper-layer length (32 bits), the protocol.
            let mut pseudo = p[8..40].to_vec();
            pseudo.extend_from_slice(&((p.len() - 40) as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, proto]);
            p[at..at + 2].copy_from_slice(&(!checksum(&pseudo, 0)).to_be_bytes());
            assert!(complete_partial_checksum(&mut p), "proto {proto}");
            let mut all = pseudo.clone();
            all.extend_from_slice(&p[40..]);
            assert_eq!(checksum(&all, 0), 0, "proto {proto}");
            let done = p.clone();
            assert!(!complete_partial_checksum(&mut p), "a full checksum stays");
            assert_eq!(p, done);
        }
        // Behind an extension header (here a fragment header): not the offload's to finish.
        let mut frag = build::ipv6(a, b, IPV6_FRAGMENT, &[PROTO_TCP, 0, 0, 0, 0, 0, 0, 0]);
        assert!(!complete_partial_checksum(&mut frag));
    }

    #[test]
    fn syns_and_echo_requests_open_flows() {
        assert!(
            classify(&syn4([1, 1, 1, 1], 1, [2, 2, 2, 2], 80))
                .unwrap()
                .opens_flow
        );
        assert!(
            !classify(&tcp4([1, 1, 1, 1], 1, [2, 2, 2, 2], 80))
                .unwrap()
                .opens_flow
        );
        let mut synack = syn4([1, 1, 1, 1], 1, [2, 2, 2, 2], 80);
        synack[33] = 0x12;
        assert!(!classify(&synack).unwrap().opens_flow);
        assert!(
            classify(&ipv4(A, B, PROTO_ICMP, &echo(false, false, 1, 1)))
                .unwrap()
                .opens_flow
        );
        assert!(
            !classify(&ipv4(A, B, PROTO_ICMP, &echo(false, true, 1, 1)))
                .unwrap()
                .opens_flow
        );
        assert!(
            !classify(&ipv4(A, B, PROTO_UDP, &ports(PROTO_UDP, 1, 2, b"")))
                .unwrap()
                .opens_flow
        );
    }

    #[test]
    fn unknown_protocol_has_no_ports() {
        let c = classify(&ipv4(A, B, 47, b"gre!")).unwrap();
        assert_eq!(c.proto, 47);
        assert_eq!(c.transport, Transport::NoPorts);
    }

    #[test]
    fn malformed_packets() {
        assert_eq!(classify(&[]), Err(PacketError::Empty));
        assert_eq!(classify(&[0x50; 40]), Err(PacketError::BadVersion(5)));
        assert!(matches!(
            classify(&[0x45; 10]),
            Err(PacketError::Truncated { .. })
        ));
        let mut p = tcp4([1, 1, 1, 1], 1, [2, 2, 2, 2], 2);
        p[0] = 0x44;
        assert_eq!(classify(&p), Err(PacketError::BadIhl(16)));
        let mut p = tcp4([1, 1, 1, 1], 1, [2, 2, 2, 2], 2);
        p[2..4].copy_from_slice(&500u16.to_be_bytes());
        assert!(matches!(classify(&p), Err(PacketError::Truncated { .. })));
        let mut p = tcp4([1, 1, 1, 1], 1, [2, 2, 2, 2], 2);
        p[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(
            classify(&p),
            Err(PacketError::BadTotalLength {
                total: 10,
                header: 20
            })
        );
        // UDP header cut to 2 bytes in an unfragmented packet.
        let p = ipv4(A, B, PROTO_UDP, &[0, 1]);
        assert!(matches!(classify(&p), Err(PacketError::Truncated { .. })));
        // A loop of 20 destination-options headers.
        let s: Ipv6Addr = "fd00::1".parse().unwrap();
        let payload: Vec<u8> = (0..20)
            .flat_map(|_| [IPV6_DEST_OPTS, 0, 0, 0, 0, 0, 0, 0])
            .collect();
        assert_eq!(
            classify(&ipv6(s, s, IPV6_DEST_OPTS, &payload)),
            Err(PacketError::TooManyExtensionHeaders)
        );
    }

    #[test]
    fn trailing_bytes_beyond_total_length_are_ignored() {
        let mut p = tcp4([1, 1, 1, 1], 1, [2, 2, 2, 2], 2);
        p.extend_from_slice(&[0xff; 16]);
        assert!(classify(&p).is_ok());
    }

    proptest! {
        #[test]
        fn classify_never_panics(data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = classify(&data);
        }

        #[test]
        fn ports_round_trip(proto in prop::sample::select(vec![PROTO_TCP, PROTO_UDP, PROTO_SCTP]),
                            s in any::<u16>(), d in any::<u16>(), a in any::<[u8;4]>(), b in any::<[u8;4]>()) {
            let c = classify(&ipv4(a.into(), b.into(), proto, &ports(proto, s, d, b""))).unwrap();
            prop_assert_eq!(c.transport, Transport::Ports { src: s, dst: d });
            prop_assert_eq!(c.src, IpAddr::V4(a.into()));
        }
    }

    #[test]
    fn a_whole_ipv6_tcp_packet_is_segmented_as_the_kernel_would() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let mut p = build::ipv6(
            "fd00::2".parse().unwrap(),
            "fd00:1::3".parse().unwrap(),
            PROTO_TCP,
            &build::ports(PROTO_TCP, 40000, 80, &payload),
        );
        p[44..48].copy_from_slice(&5u32.to_be_bytes());
        p[40 + 13] = 0x10 | 0x08; // ACK PSH
        let mut segs: Vec<Vec<u8>> = Vec::new();
        assert_eq!(segment_tcp(&p, 1440, |s| segs.push(s.to_vec())), Some(3));
        let lens: Vec<usize> = segs.iter().map(|s| s.len()).collect();
        assert_eq!(lens, [1440, 1440, 300]);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert_eq!(usize::from(u16::from_be_bytes([s[4], s[5]])), s.len() - 40);
            assert_eq!(&s[..4], &p[..4], "version, class and label unchanged");
            let mut pseudo = s[8..40].to_vec();
            pseudo.extend_from_slice(&((s.len() - 40) as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, PROTO_TCP]);
            assert_eq!(checksum(&s[40..], sum16(&pseudo, 0)), 0, "TCP checksum");
            let seq = u32::from_be_bytes(s[44..48].try_into().unwrap());
            assert_eq!(seq, 5 + 1380 * i as u32);
            assert_eq!(s[40 + 13] & 0x08 != 0, i == 2, "PSH on the last only");
            joined.extend_from_slice(&s[60..]);
        }
        assert_eq!(joined, payload, "the payload, whole and in order");
    }

    #[test]
    fn a_whole_tcp_packet_is_segmented_as_the_kernel_would() {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let mut p = build::ipv4(
            [100, 64, 0, 2].into(),
            [100, 64, 1, 3].into(),
            PROTO_TCP,
            &build::ports(PROTO_TCP, 40000, 80, &payload),
        );
        p[4..6].copy_from_slice(&7u16.to_be_bytes());
        p[24..28].copy_from_slice(&0xffff_fc00u32.to_be_bytes());
        p[20 + 13] = 0x80 | 0x10 | 0x08 | 0x01; // CWR ACK PSH FIN
        let mut segs: Vec<Vec<u8>> = Vec::new();
        assert_eq!(segment_tcp(&p, 1440, |s| segs.push(s.to_vec())), Some(3));
        let lens: Vec<usize> = segs.iter().map(|s| s.len()).collect();
        assert_eq!(lens, [1440, 1440, 240]);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 7 + i as u16, "IP id");
            assert_eq!(checksum(&s[..20], 0), 0, "IP header checksum");
            let mut pseudo = [0u8; 12];
            pseudo[..8].copy_from_slice(&s[12..20]);
            pseudo[9] = PROTO_TCP;
            pseudo[10..12].copy_from_slice(&((s.len() - 20) as u16).to_be_bytes());
            assert_eq!(checksum(&s[20..], sum16(&pseudo, 0)), 0, "TCP checksum");
            let seq = u32::from_be_bytes(s[24..28].try_into().unwrap());
            assert_eq!(seq, 0xffff_fc00u32.wrapping_add(1400 * i as u32), "wraps");
            let flags = s[20 + 13];
            assert_eq!(flags & 0x10, 0x10, "ACK on every segment");
            assert_eq!(flags & 0x80 != 0, i == 0, "CWR on the first only");
            assert_eq!(flags & 0x09 != 0, i == 2, "FIN and PSH on the last only");
            assert_eq!(flags & 0x09, if i == 2 { 0x09 } else { 0 });
            joined.extend_from_slice(&s[40..]);
        }
        assert_eq!(joined, payload, "the payload, whole and in order");
        let mut n = 0;
        assert_eq!(segment_tcp(&p, 4000, |_| n += 1), Some(1), "short enough");
        assert_eq!(segment_tcp(&p, 40, |_| n += 1), None, "no room for payload");
        p[9] = PROTO_UDP;
        assert_eq!(segment_tcp(&p, 1440, |_| n += 1), None, "not TCP");
        assert_eq!(n, 1);
    }
}
