//! GUE (Generic UDP Encapsulation, draft-ietf-intarea-gue) variant 0 with the 32-bit group-identifier
//! extension field (draft-ietf-intarea-gue-extensions), which keyway uses to carry the authorization key.
//!
//! The codec is I/O-free: it reads and writes caller-provided buffers, and never allocates.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Ver|C|  Hlen   |  Proto/ctype  |G|       other flags (0)       |  primary word
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |              Group identifier: the authorization key          |  extension field
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |  private data, with
//! +           MAC: SipHash-2-4 tag (packet authentication)        +  packet authentication
//! |                                                               |  only (Hlen 3)
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                 inner IPv4 or IPv6 packet ...                 |
//! ```
//!
//! - `Ver` is 0 (variant 0: a GUE header follows). Variant 1 (direct IP) is refused.
//! - `C` is 0 (data message). Control messages are refused: keyway defines none.
//! - `Hlen` counts the 32-bit words after the primary word; with only `G` set it is 1. The GUE
//!   draft puts private data after the extension fields the flags imply, its length being what
//!   `Hlen` counts beyond them: keyway's only private data is the 8-byte MAC of packet
//!   authentication (`Hlen` 3), a SipHash-2-4 tag over the primary word, the key and the inner
//!   packet, keyed per destination and epoch ([`crate::key::MacKey`]). Any other length is refused.
//! - `Proto/ctype` is the IP protocol number of the inner packet: 4 (IPv4) or 41 (IPv6).
//! - `G` (the first flag bit, bit 16 of the header) says the group-identifier field is present.
//!   keyway requires it: a data message without a key is refused. No other flag is understood, so a
//!   header with any other flag set is refused rather than misparsed.
//!
//! Over an IPv4 underlay the overhead is 20 (IPv4) + 8 (UDP) + 8 (GUE) = 36 bytes; over IPv6, 56;
//! 8 more with the MAC. Overlay devices leave room for the MAC whether or not it is on, so that
//! packet authentication is switched on and off cluster-wide without changing any pod's MTU.

use std::hash::Hasher;

use crate::key::{Key, MacKey};

/// Bytes in the primary GUE word.
pub const PRIMARY_LEN: usize = 4;
/// Bytes in the group-identifier extension field.
pub const GROUP_ID_LEN: usize = 4;
/// Bytes of GUE header keyway writes and expects: primary word + group identifier.
pub const HEADER_LEN: usize = PRIMARY_LEN + GROUP_ID_LEN;
/// Bytes of the MAC, GUE private data after the group identifier.
pub const MAC_LEN: usize = 8;
/// Bytes of GUE header with the MAC.
pub const HEADER_LEN_WITH_MAC: usize = HEADER_LEN + MAC_LEN;
/// Room the engines expect in front of an inner packet they encapsulate: the longest header.
pub const HEADROOM: usize = HEADER_LEN_WITH_MAC;
/// Offset of the group-identifier field.
const GROUP_ID_OFFSET: usize = PRIMARY_LEN;
/// Offset of the 16-bit flags field inside the primary word.
const FLAGS_OFFSET: usize = 2;
/// Offset of the Proto/ctype byte.
const PROTO_OFFSET: usize = 1;

/// The group-identifier flag (`G`): most significant bit of the flags field.
pub const FLAG_GROUP_ID: u16 = 0x8000;
/// `Hlen` when only `G` is set: one 32-bit word of extension fields.
const HLEN_WITH_KEY: u8 = (GROUP_ID_LEN / 4) as u8;
/// `Hlen` with the MAC as private data.
const HLEN_WITH_MAC: u8 = ((GROUP_ID_LEN + MAC_LEN) / 4) as u8;

/// IANA protocol number of an inner IPv4 packet.
pub const PROTO_IPV4: u8 = 4;
/// IANA protocol number of an inner IPv6 packet.
pub const PROTO_IPV6: u8 = 41;

/// The UDP port keyway's GUE listens on, for pods and SaPs alike.
pub const DEFAULT_PORT: u16 = 6080;

/// Bytes added to each inner packet on an IPv4 underlay (IPv4 + UDP + GUE).
pub const OVERHEAD_IPV4: usize = 20 + 8 + HEADER_LEN;
/// Bytes added to each inner packet on an IPv6 underlay (IPv6 + UDP + GUE).
pub const OVERHEAD_IPV6: usize = 40 + 8 + HEADER_LEN;
/// What an overlay device's MTU leaves below the underlay's on an IPv4 underlay: the overhead
/// and room for the MAC.
pub const MTU_RESERVE_IPV4: usize = OVERHEAD_IPV4 + MAC_LEN;
/// The same on an IPv6 underlay.
pub const MTU_RESERVE_IPV6: usize = OVERHEAD_IPV6 + MAC_LEN;

/// The inner packet's family, from the `Proto/ctype` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InnerProto {
    Ipv4,
    Ipv6,
}

impl InnerProto {
    pub fn number(self) -> u8 {
        match self {
            InnerProto::Ipv4 => PROTO_IPV4,
            InnerProto::Ipv6 => PROTO_IPV6,
        }
    }

    /// The family an inner packet claims by its IP version nibble.
    pub fn of_packet(inner: &[u8]) -> Result<Self, EncodeError> {
        match inner.first().map(|b| b >> 4) {
            Some(4) => Ok(InnerProto::Ipv4),
            Some(6) => Ok(InnerProto::Ipv6),
            Some(v) => Err(EncodeError::NotAnIpPacket { version: v }),
            None => Err(EncodeError::EmptyPacket),
        }
    }
}

/// A decoded GUE header: the key, the MAC when there is one, and where the inner packet starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub key: Key,
    pub proto: InnerProto,
    /// Offset of the inner packet in the datagram.
    pub payload_offset: usize,
    /// The packet-authentication tag, when the sender added one (not yet checked).
    pub mac: Option<[u8; MAC_LEN]>,
}

/// Why a datagram is not a GUE data message keyway accepts. Every variant is a "malformed" drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("datagram truncated: {got} bytes, the GUE header needs {needed}")]
    Truncated { needed: usize, got: usize },
    #[error("GUE variant {0} is not supported (only variant 0)")]
    UnsupportedVersion(u8),
    #[error("GUE control message (ctype {ctype}) is not supported")]
    ControlMessage { ctype: u8 },
    #[error("GUE flags {flags:#06x} include flags keyway does not understand")]
    UnknownFlags { flags: u16 },
    #[error("GUE data message carries no group identifier (authorization key)")]
    MissingKey,
    #[error("GUE Hlen is {hlen} words, but the flags imply {expected} (or 3 with a MAC)")]
    HeaderLengthMismatch { hlen: u8, expected: u8 },
    #[error("GUE inner protocol {0} is not IPv4 (4) or IPv6 (41)")]
    UnsupportedProtocol(u8),
    #[error("GUE says inner protocol {proto}, but the packet's IP version is {version}")]
    InnerVersionMismatch { proto: u8, version: u8 },
    #[error("GUE data message has no inner packet")]
    EmptyPayload,
}

/// Why a packet cannot be encapsulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("output buffer holds {got} bytes, {needed} are needed")]
    BufferTooSmall { needed: usize, got: usize },
    #[error("inner packet has IP version {version}, not 4 or 6")]
    NotAnIpPacket { version: u8 },
    #[error("inner packet is empty")]
    EmptyPacket,
}

/// Writes keyway's 8-byte GUE header for `proto` and `key` into `out[..HEADER_LEN]`; `Hlen`
/// says whether a MAC follows (the caller writes it).
fn write_header(out: &mut [u8], proto: InnerProto, key: Key, with_mac: bool) {
    // Ver = 0, C = 0, Hlen.
    out[0] = if with_mac {
        HLEN_WITH_MAC
    } else {
        HLEN_WITH_KEY
    };
    out[PROTO_OFFSET] = proto.number();
    out[FLAGS_OFFSET..FLAGS_OFFSET + 2].copy_from_slice(&FLAG_GROUP_ID.to_be_bytes());
    out[GROUP_ID_OFFSET..GROUP_ID_OFFSET + GROUP_ID_LEN].copy_from_slice(&key.0.to_be_bytes());
}

/// The MAC of a datagram: SipHash-2-4 under `mac`, over the header's first 8 bytes (primary word
/// and key: the tag binds the key, the inner protocol and its own presence) and the inner packet.
fn tag(mac: &MacKey, header: &[u8], inner: &[u8]) -> [u8; MAC_LEN] {
    let mut h = siphasher::sip::SipHasher24::new_with_key(mac.bytes());
    h.write(&header[..HEADER_LEN]);
    h.write(inner);
    h.finish().to_be_bytes()
}

/// Encapsulates `inner` into `out` (header then a copy of the packet); returns the datagram length.
pub fn encapsulate(key: Key, inner: &[u8], out: &mut [u8]) -> Result<usize, EncodeError> {
    let proto = InnerProto::of_packet(inner)?;
    let total = HEADER_LEN + inner.len();
    if out.len() < total {
        return Err(EncodeError::BufferTooSmall {
            needed: total,
            got: out.len(),
        });
    }
    let (header, rest) = out.split_at_mut(HEADER_LEN);
    write_header(header, proto, key, false);
    rest[..inner.len()].copy_from_slice(inner);
    Ok(total)
}

/// Encapsulates in place: `buf[HEADROOM..]` already holds the inner packet (the caller read it
/// there, leaving headroom); the header, with a MAC under `mac` when given, is written right in
/// front of it. Returns where the datagram starts in `buf`.
pub fn seal(key: Key, mac: Option<&MacKey>, buf: &mut [u8]) -> Result<usize, EncodeError> {
    if buf.len() <= HEADROOM {
        return Err(EncodeError::EmptyPacket);
    }
    let (head, inner) = buf.split_at_mut(HEADROOM);
    let proto = InnerProto::of_packet(inner)?;
    let start = match mac {
        Some(_) => HEADROOM - HEADER_LEN_WITH_MAC,
        None => HEADROOM - HEADER_LEN,
    };
    let header = &mut head[start..];
    write_header(header, proto, key, mac.is_some());
    if let Some(mac) = mac {
        let t = tag(mac, header, inner);
        header[HEADER_LEN..].copy_from_slice(&t);
    }
    Ok(start)
}

/// Whether a datagram's MAC (see [`Header::mac`]) is the one `mac` gives, in constant time.
/// A datagram without a MAC is never authentic.
pub fn authentic(datagram: &[u8], header: &Header, mac: &MacKey) -> bool {
    let Some(got) = header.mac else { return false };
    let want = tag(mac, datagram, &datagram[header.payload_offset..]);
    want.iter().zip(got).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Decodes and validates the GUE header of a datagram.
pub fn decode(datagram: &[u8]) -> Result<Header, DecodeError> {
    if datagram.len() < PRIMARY_LEN {
        return Err(DecodeError::Truncated {
            needed: PRIMARY_LEN,
            got: datagram.len(),
        });
    }
    let version = datagram[0] >> 6;
    if version != 0 {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let control = datagram[0] & 0x20 != 0;
    let hlen = datagram[0] & 0x1f;
    let proto = datagram[PROTO_OFFSET];
    if control {
        return Err(DecodeError::ControlMessage { ctype: proto });
    }
    let flags = u16::from_be_bytes([datagram[FLAGS_OFFSET], datagram[FLAGS_OFFSET + 1]]);
    if flags & !FLAG_GROUP_ID != 0 {
        return Err(DecodeError::UnknownFlags { flags });
    }
    if flags & FLAG_GROUP_ID == 0 {
        return Err(DecodeError::MissingKey);
    }
    let header_len = match hlen {
        HLEN_WITH_KEY => HEADER_LEN,
        HLEN_WITH_MAC => HEADER_LEN_WITH_MAC,
        _ => {
            return Err(DecodeError::HeaderLengthMismatch {
                hlen,
                expected: HLEN_WITH_KEY,
            });
        }
    };
    if datagram.len() < header_len {
        return Err(DecodeError::Truncated {
            needed: header_len,
            got: datagram.len(),
        });
    }
    let proto = match proto {
        PROTO_IPV4 => InnerProto::Ipv4,
        PROTO_IPV6 => InnerProto::Ipv6,
        other => return Err(DecodeError::UnsupportedProtocol(other)),
    };
    let Some(first) = datagram.get(header_len) else {
        return Err(DecodeError::EmptyPayload);
    };
    let inner_version = first >> 4;
    let expected_version = match proto {
        InnerProto::Ipv4 => 4,
        InnerProto::Ipv6 => 6,
    };
    if inner_version != expected_version {
        return Err(DecodeError::InnerVersionMismatch {
            proto: proto.number(),
            version: inner_version,
        });
    }
    let key_bytes: [u8; 4] = datagram[GROUP_ID_OFFSET..GROUP_ID_OFFSET + GROUP_ID_LEN]
        .try_into()
        .expect("length checked");
    let mac = (header_len == HEADER_LEN_WITH_MAC).then(|| {
        datagram[HEADER_LEN..HEADER_LEN_WITH_MAC]
            .try_into()
            .expect("length checked")
    });
    Ok(Header {
        key: Key(u32::from_be_bytes(key_bytes)),
        proto,
        payload_offset: header_len,
        mac,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal IPv4 header (20 bytes) + 4 bytes of payload.
    fn ipv4_packet() -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&24u16.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        p
    }

    #[test]
    fn golden_header_bytes_for_ipv4_inner() {
        let inner = ipv4_packet();
        let mut out = [0u8; 64];
        let n = encapsulate(Key(0xdead_beef), &inner, &mut out).unwrap();
        assert_eq!(n, HEADER_LEN + inner.len());
        // Ver 0, C 0, Hlen 1 | proto 4 | flags: G | key
        assert_eq!(&out[..8], &[0x01, 0x04, 0x80, 0x00, 0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(&out[8..n], &inner[..]);
    }

    #[test]
    fn golden_header_bytes_for_ipv6_inner() {
        let mut inner = vec![0u8; 40];
        inner[0] = 0x60;
        let mut out = [0u8; 64];
        encapsulate(Key(0x0102_0304), &inner, &mut out).unwrap();
        assert_eq!(&out[..8], &[0x01, 0x29, 0x80, 0x00, 0x01, 0x02, 0x03, 0x04]);
    }

    #[test]
    fn golden_decode() {
        let mut datagram = vec![0x01, 0x04, 0x80, 0x00, 0xca, 0xfe, 0x00, 0x01];
        datagram.extend_from_slice(&ipv4_packet());
        let h = decode(&datagram).unwrap();
        assert_eq!(h.key, Key(0xcafe_0001));
        assert_eq!(h.proto, InnerProto::Ipv4);
        assert_eq!(h.payload_offset, 8);
    }

    #[test]
    fn overhead_is_36_bytes_on_ipv4_and_56_on_ipv6() {
        assert_eq!(OVERHEAD_IPV4, 36);
        assert_eq!(OVERHEAD_IPV6, 56);
    }

    #[test]
    fn in_place_matches_copying_encapsulation() {
        let inner = ipv4_packet();
        let mut copied = [0u8; 64];
        let n = encapsulate(Key(7), &inner, &mut copied).unwrap();
        let mut buf = vec![0u8; HEADROOM];
        buf.extend_from_slice(&inner);
        let start = seal(Key(7), None, &mut buf).unwrap();
        assert_eq!(start, HEADROOM - HEADER_LEN);
        assert_eq!(&buf[start..], &copied[..n]);
    }

    const GOLDEN_TAG: [u8; MAC_LEN] = [0x09, 0x08, 0x2b, 0x32, 0x59, 0x62, 0xa9, 0xc2];

    fn mac_key(b: u8) -> MacKey {
        MacKey::from_bytes([b; 16])
    }

    #[test]
    fn golden_sealed_datagram_and_its_check() {
        let inner = ipv4_packet();
        let mut buf = vec![0u8; HEADROOM];
        buf.extend_from_slice(&inner);
        let start = seal(Key(0xdead_beef), Some(&mac_key(1)), &mut buf).unwrap();
        assert_eq!(start, 0);
        let d = &buf[start..];
        // Hlen 3: the key word and two words of private data.
        assert_eq!(&d[..8], &[0x03, 0x04, 0x80, 0x00, 0xde, 0xad, 0xbe, 0xef]);
        // SipHash-2-4 under the key 01…01 over these 8 header bytes and the inner packet,
        // computed independently (Python's reference implementation of SipHash-2-4).
        assert_eq!(&d[8..16], &GOLDEN_TAG);
        assert_eq!(&d[16..], &inner[..]);
        let h = decode(d).unwrap();
        assert_eq!((h.payload_offset, h.mac), (16, Some(GOLDEN_TAG)));
        assert!(authentic(d, &h, &mac_key(1)));
        assert!(
            !authentic(d, &h, &mac_key(2)),
            "another destination or epoch"
        );
        for i in [0, 4, 7, 8, 15, 16, d.len() - 1] {
            let mut bad = d.to_vec();
            bad[i] ^= 0x01;
            let ok = decode(&bad).is_ok_and(|h| authentic(&bad, &h, &mac_key(1)));
            assert!(!ok, "a flipped bit at {i} is caught");
        }
        let plain = decode(&valid()).unwrap();
        assert_eq!(plain.mac, None);
        assert!(
            !authentic(&valid(), &plain, &mac_key(1)),
            "no MAC, not authentic"
        );
    }

    fn valid() -> Vec<u8> {
        let mut d = vec![0x01, 0x04, 0x80, 0x00, 0, 0, 0, 1];
        d.extend_from_slice(&ipv4_packet());
        d
    }

    #[test]
    fn every_malformed_case_has_its_error() {
        assert_eq!(
            decode(&[0x01, 0x04]),
            Err(DecodeError::Truncated { needed: 4, got: 2 })
        );
        let mut d = valid();
        d[0] |= 0x40; // variant 1
        assert_eq!(decode(&d), Err(DecodeError::UnsupportedVersion(1)));
        let mut d = valid();
        d[0] |= 0x20;
        assert_eq!(decode(&d), Err(DecodeError::ControlMessage { ctype: 4 }));
        let mut d = valid();
        d[3] = 0x01;
        assert_eq!(decode(&d), Err(DecodeError::UnknownFlags { flags: 0x8001 }));
        let mut d = valid();
        d[2] = 0;
        assert_eq!(decode(&d), Err(DecodeError::MissingKey));
        let mut d = valid();
        d[0] = 0x02;
        assert_eq!(
            decode(&d),
            Err(DecodeError::HeaderLengthMismatch {
                hlen: 2,
                expected: 1
            })
        );
        let mut d = valid();
        d[0] = 0x03;
        d.truncate(12);
        assert_eq!(
            decode(&d),
            Err(DecodeError::Truncated {
                needed: 16,
                got: 12
            }),
            "a MAC cut short"
        );
        assert_eq!(
            decode(&valid()[..6]),
            Err(DecodeError::Truncated { needed: 8, got: 6 })
        );
        let mut d = valid();
        d[1] = 17;
        assert_eq!(decode(&d), Err(DecodeError::UnsupportedProtocol(17)));
        assert_eq!(decode(&valid()[..8]), Err(DecodeError::EmptyPayload));
        let mut d = valid();
        d[1] = PROTO_IPV6;
        assert_eq!(
            decode(&d),
            Err(DecodeError::InnerVersionMismatch {
                proto: 41,
                version: 4
            })
        );
    }

    #[test]
    fn encapsulation_refuses_non_ip_and_small_buffers() {
        let mut out = [0u8; 8];
        assert_eq!(
            encapsulate(Key(1), &ipv4_packet(), &mut out),
            Err(EncodeError::BufferTooSmall { needed: 32, got: 8 })
        );
        assert_eq!(
            encapsulate(Key(1), &[0x10, 0, 0], &mut [0u8; 64]),
            Err(EncodeError::NotAnIpPacket { version: 1 })
        );
        assert_eq!(
            encapsulate(Key(1), &[], &mut [0u8; 64]),
            Err(EncodeError::EmptyPacket)
        );
    }

    proptest! {
        #[test]
        fn round_trip(key in any::<u32>(), v6 in any::<bool>(), body in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let mut inner = body;
            inner.insert(0, if v6 { 0x60 } else { 0x45 });
            let mut out = vec![0u8; inner.len() + HEADER_LEN];
            let n = encapsulate(Key(key), &inner, &mut out).unwrap();
            let h = decode(&out[..n]).unwrap();
            prop_assert_eq!(h.key, Key(key));
            prop_assert_eq!(h.proto, if v6 { InnerProto::Ipv6 } else { InnerProto::Ipv4 });
            prop_assert_eq!(&out[h.payload_offset..n], &inner[..]);
        }

        #[test]
        fn sealed_round_trip(key in any::<u32>(), m in any::<[u8; 16]>(), body in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let mut buf = vec![0u8; HEADROOM];
            buf.push(0x45);
            buf.extend_from_slice(&body);
            let mac = MacKey::from_bytes(m);
            let start = seal(Key(key), Some(&mac), &mut buf).unwrap();
            let h = decode(&buf[start..]).unwrap();
            prop_assert_eq!(h.key, Key(key));
            prop_assert!(authentic(&buf[start..], &h, &mac));
            prop_assert_eq!(&buf[start + h.payload_offset..], &buf[HEADROOM..]);
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&data);
        }
    }
}
