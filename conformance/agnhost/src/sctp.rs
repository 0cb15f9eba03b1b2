//! SCTP association set-up from user space, for the lab's test pods: this kernel has no SCTP module
//! (`socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP)` fails with EPROTONOSUPPORT), so the test server
//! and client speak SCTP's four-way handshake (INIT, INIT ACK, COOKIE ECHO, COOKIE ACK) over raw
//! IP sockets. The packets on the wire are real SCTP (protocol 132, CRC32c checksums), so keyway
//! classifies and enforces them exactly as it would a kernel's.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

pub const PROTO_SCTP: i32 = 132;
const COMMON_HEADER: usize = 12;
const CHUNK_INIT: u8 = 1;
const CHUNK_INIT_ACK: u8 = 2;
const CHUNK_ABORT: u8 = 6;
const CHUNK_COOKIE_ECHO: u8 = 10;
const CHUNK_COOKIE_ACK: u8 = 11;
const PARAM_STATE_COOKIE: u16 = 7;
/// The start of the lab server's state cookie (the peer's verification tag follows).
const COOKIE_MAGIC: &[u8] = b"keyway";

/// CRC32c (Castagnoli), reflected, as SCTP's checksum (RFC 9260 appendix B).
pub fn crc32c(data: &[u8]) -> u32 {
    const POLY: u32 = 0x82f6_3b78;
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An SCTP packet: common header and one chunk.
pub fn packet(src: u16, dst: u16, vtag: u32, chunk_type: u8, flags: u8, value: &[u8]) -> Vec<u8> {
    let chunk_len = 4 + value.len();
    let mut p = Vec::with_capacity(COMMON_HEADER + chunk_len + 3);
    p.extend_from_slice(&src.to_be_bytes());
    p.extend_from_slice(&dst.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.push(chunk_type);
    p.push(flags);
    p.extend_from_slice(&(chunk_len as u16).to_be_bytes());
    p.extend_from_slice(value);
    while !p.len().is_multiple_of(4) {
        p.push(0);
    }
    let crc = crc32c(&p);
    // The checksum is stored little-endian (the CRC's natural byte order), per RFC 9260.
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// A parsed SCTP packet (first chunk only: keyway's probes carry one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub src: u16,
    pub dst: u16,
    pub vtag: u32,
    pub chunk: u8,
    pub value: Vec<u8>,
}

pub fn parse(p: &[u8]) -> Option<Parsed> {
    if p.len() < COMMON_HEADER + 4 {
        return None;
    }
    let mut zeroed = p.to_vec();
    zeroed[8..12].copy_from_slice(&[0; 4]);
    if crc32c(&zeroed).to_le_bytes() != p[8..12] {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([p[14], p[15]]));
    if len < 4 || COMMON_HEADER + len > p.len() {
        return None;
    }
    Some(Parsed {
        src: u16::from_be_bytes([p[0], p[1]]),
        dst: u16::from_be_bytes([p[2], p[3]]),
        vtag: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
        chunk: p[12],
        value: p[16..COMMON_HEADER + len].to_vec(),
    })
}

fn init_value(tag: u32, cookie: Option<&[u8]>) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&tag.to_be_bytes()); // initiate tag
    v.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    v.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    v.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    v.extend_from_slice(&tag.to_be_bytes()); // initial TSN
    if let Some(c) = cookie {
        v.extend_from_slice(&PARAM_STATE_COOKIE.to_be_bytes());
        v.extend_from_slice(&((4 + c.len()) as u16).to_be_bytes());
        v.extend_from_slice(c);
    }
    v
}

/// A raw SCTP socket of the given family (needs CAP_NET_RAW).
pub fn raw_socket(v6: bool) -> io::Result<Socket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    Socket::new(domain, Type::RAW, Some(Protocol::from(PROTO_SCTP)))
}

/// Receives one SCTP packet and its source address; IPv4 raw sockets deliver the IP header too.
fn recv(sock: &Socket, buf: &mut [u8]) -> io::Result<(IpAddr, Vec<u8>)> {
    use nix::sys::socket::{SockaddrLike, SockaddrStorage, recvfrom};
    let (n, from) = recvfrom::<SockaddrStorage>(sock.as_raw_fd(), buf).map_err(io::Error::from)?;
    let from = from.ok_or_else(|| io::Error::other("no source address"))?;
    let ip = if let Some(v4) = from.as_sockaddr_in() {
        IpAddr::V4(v4.ip())
    } else if let Some(v6) = from.as_sockaddr_in6() {
        IpAddr::V6(v6.ip())
    } else {
        return Err(io::Error::other(format!(
            "unexpected address family {:?}",
            from.family()
        )));
    };
    let payload = if ip.is_ipv4() {
        let ihl = usize::from(buf.first().copied().unwrap_or(0x45) & 0x0f) * 4;
        buf[ihl.min(n)..n].to_vec()
    } else {
        buf[..n].to_vec()
    };
    Ok((ip, payload))
}

fn send(sock: &Socket, to: IpAddr, p: &[u8]) -> io::Result<()> {
    sock.send_to(p, &SocketAddr::new(to, 0).into()).map(|_| ())
}

/// Serves SCTP association set-up on `port` (both families) forever: answers INIT with INIT ACK
/// and COOKIE ECHO with COOKIE ACK; everything else, and other ports, are ignored.
pub fn serve(port: u16) -> io::Result<()> {
    let mut handles = Vec::new();
    for v6 in [false, true] {
        let sock = match raw_socket(v6) {
            Ok(s) => s,
            Err(e) if v6 => {
                eprintln!("sctp: no IPv6 raw socket ({e}); serving IPv4 only");
                continue;
            }
            Err(e) => return Err(e),
        };
        handles.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let my_tag = 0x6b77_0000 | u32::from(port);
            loop {
                let Ok((from, p)) = recv(&sock, &mut buf) else {
                    continue;
                };
                let Some(pkt) = parse(&p) else { continue };
                if pkt.dst != port {
                    continue;
                }
                let reply = match pkt.chunk {
                    CHUNK_INIT if pkt.value.len() >= 16 => {
                        // The server keeps no state: the peer's tag travels in the cookie.
                        let peer_tag = u32::from_be_bytes(pkt.value[..4].try_into().expect("4"));
                        let mut cookie = COOKIE_MAGIC.to_vec();
                        cookie.extend_from_slice(&peer_tag.to_be_bytes());
                        packet(
                            port,
                            pkt.src,
                            peer_tag,
                            CHUNK_INIT_ACK,
                            0,
                            &init_value(my_tag, Some(&cookie)),
                        )
                    }
                    CHUNK_COOKIE_ECHO
                        if pkt.vtag == my_tag
                            && pkt.value.len() == COOKIE_MAGIC.len() + 4
                            && pkt.value.starts_with(COOKIE_MAGIC) =>
                    {
                        let peer_tag = u32::from_be_bytes(
                            pkt.value[COOKIE_MAGIC.len()..].try_into().expect("4"),
                        );
                        packet(port, pkt.src, peer_tag, CHUNK_COOKIE_ACK, 0, &[])
                    }
                    _ => continue,
                };
                let _ = send(&sock, from, &reply);
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// How often INIT and COOKIE ECHO are sent again while unanswered (SCTP's T1 timer, shortened
/// for probes: a fresh interface may lose the first ones while its neighbours are resolved).
const RETRANSMIT: Duration = Duration::from_millis(200);

/// Sets up an association with `to` (INIT … COOKIE ACK) and aborts it; `Ok` when the peer
/// answered both steps within `timeout`.
pub fn connect(
    to: SocketAddr,
    src_port: u16,
    timeout: Duration,
    device: Option<&str>,
) -> io::Result<()> {
    let sock = raw_socket(to.is_ipv6())?;
    if let Some(d) = device {
        sock.bind_device(Some(d.as_bytes()))?;
    }
    let deadline = Instant::now() + timeout;
    let my_tag = 0x4b00_0000 | u32::from(src_port);
    let debug = std::env::var_os("KEYWAY_SCTP_DEBUG").is_some();
    // What to send (again) until the step it starts is answered.
    let mut outgoing = packet(
        src_port,
        to.port(),
        0,
        CHUNK_INIT,
        0,
        &init_value(my_tag, None),
    );
    let mut wait_for = CHUNK_INIT_ACK;
    let mut buf = vec![0u8; 65536];
    'send: loop {
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer"));
        }
        send(&sock, to.ip(), &outgoing)?;
        let resend_at = (Instant::now() + RETRANSMIT).min(deadline);
        loop {
            let left = resend_at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                continue 'send;
            }
            sock.set_read_timeout(Some(left))?;
            let (from, p) = match recv(&sock, &mut buf) {
                Ok(r) => r,
                Err(e) if crate::timed_out(&e) => continue 'send,
                Err(e) => return Err(e),
            };
            if debug {
                eprintln!(
                    "sctp: {} bytes from {from}: parsed={:?}",
                    p.len(),
                    parse(&p)
                );
            }
            let Some(pkt) = parse(&p) else { continue };
            if from != to.ip() || pkt.src != to.port() || pkt.dst != src_port || pkt.vtag != my_tag
            {
                continue;
            }
            match (pkt.chunk, wait_for) {
                (CHUNK_INIT_ACK, CHUNK_INIT_ACK) if pkt.value.len() >= 16 => {
                    let peer_tag = u32::from_be_bytes(pkt.value[..4].try_into().expect("4"));
                    // The state cookie parameter follows the fixed part.
                    let params = &pkt.value[16..];
                    let cookie = if params.len() >= 4
                        && u16::from_be_bytes([params[0], params[1]]) == PARAM_STATE_COOKIE
                    {
                        {
                            let l = usize::from(u16::from_be_bytes([params[2], params[3]]))
                                .min(params.len());
                            params[4..l].to_vec()
                        }
                    } else {
                        Default::default()
                    };
                    outgoing = packet(src_port, to.port(), peer_tag, CHUNK_COOKIE_ECHO, 0, &cookie);
                    wait_for = CHUNK_COOKIE_ACK;
                    continue 'send;
                }
                (CHUNK_COOKIE_ACK, CHUNK_COOKIE_ACK) => {
                    let _ = send(
                        &sock,
                        to.ip(),
                        &packet(src_port, to.port(), my_tag, CHUNK_ABORT, 1, &[]),
                    );
                    return Ok(());
                }
                (CHUNK_ABORT, _) => {
                    return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "aborted"));
                }
                _ => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_rfc_vectors() {
        // RFC 3720 B.4: 32 bytes of zeros -> 0x8a9136aa; 32 bytes of 0xff -> 0x62a8ab43.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn packets_round_trip_and_bad_checksums_are_refused() {
        let p = packet(40000, 80, 7, CHUNK_INIT, 0, &init_value(99, None));
        let q = parse(&p).unwrap();
        assert_eq!((q.src, q.dst, q.vtag, q.chunk), (40000, 80, 7, CHUNK_INIT));
        let mut bad = p.clone();
        bad[20] ^= 1;
        assert!(parse(&bad).is_none());
        // keyway's classifier reads the ports where TCP and UDP keep them.
        let ip =
            keyway_core::packet::build::ipv4([1, 1, 1, 1].into(), [2, 2, 2, 2].into(), 132, &p);
        let c = keyway_core::packet::classify(&ip).unwrap();
        assert_eq!(c.dst_port(), Some(80));
    }
}
