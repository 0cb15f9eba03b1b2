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
//! |                 inner IPv4 or IPv6 packet ...                 |
//! ```
//!
//! - `Ver` is 0 (variant 0: a GUE header follows). Variant 1 (direct IP) is refused.
//! - `C` is 0 (data message). Control messages are refused: keyway defines none.
//! - `Hlen` counts the 32-bit words after the primary word; with only `G` set it is 1.
//! - `Proto/ctype` is the IP protocol number of the inner packet: 4 (IPv4) or 41 (IPv6).
//! - `G` (the first flag bit, bit 16 of the header) says the group-identifier field is present.
//!   keyway requires it: a data message without a key is refused. No other flag is understood, so a
//!   header with any other flag set is refused rather than misparsed.
//!
//! Over an IPv4 underlay the overhead is 20 (IPv4) + 8 (UDP) + 8 (GUE) = 36 bytes; over IPv6, 56.

use crate::key::Key;

/// Bytes in the primary GUE word.
pub const PRIMARY_LEN: usize = 4;
/// Bytes in the group-identifier extension field.
pub const GROUP_ID_LEN: usize = 4;
/// Bytes of GUE header keyway writes and expects: primary word + group identifier.
pub const HEADER_LEN: usize = PRIMARY_LEN + GROUP_ID_LEN;
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

/// A decoded GUE header: the key and where the inner packet starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub key: Key,
    pub proto: InnerProto,
    /// Offset of the inner packet in the datagram.
    pub payload_offset: usize,
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
    #[error("GUE Hlen is {hlen} words, but the flags imply {expected}")]
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

/// Writes keyway's 8-byte GUE header for `proto` and `key` into `out[..HEADER_LEN]`.
pub fn write_header(out: &mut [u8; HEADER_LEN], proto: InnerProto, key: Key) {
    // Ver = 0, C = 0, Hlen = 1.
    out[0] = HLEN_WITH_KEY;
    out[PROTO_OFFSET] = proto.number();
    out[FLAGS_OFFSET..FLAGS_OFFSET + 2].copy_from_slice(&FLAG_GROUP_ID.to_be_bytes());
    out[GROUP_ID_OFFSET..GROUP_ID_OFFSET + GROUP_ID_LEN].copy_from_slice(&key.0.to_be_bytes());
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
    write_header(header.try_into().expect("split at HEADER_LEN"), proto, key);
    rest[..inner.len()].copy_from_slice(inner);
    Ok(total)
}

/// Encapsulates in place: `buf[HEADER_LEN..]` already holds the inner packet (the caller read it
/// there, leaving headroom); the header is written into `buf[..HEADER_LEN]`.
pub fn encapsulate_in_place(key: Key, buf: &mut [u8]) -> Result<(), EncodeError> {
    if buf.len() <= HEADER_LEN {
        return Err(EncodeError::EmptyPacket);
    }
    let proto = InnerProto::of_packet(&buf[HEADER_LEN..])?;
    let header: &mut [u8; HEADER_LEN] =
        (&mut buf[..HEADER_LEN]).try_into().expect("length checked");
    write_header(header, proto, key);
    Ok(())
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
    if hlen != HLEN_WITH_KEY {
        return Err(DecodeError::HeaderLengthMismatch {
            hlen,
            expected: HLEN_WITH_KEY,
        });
    }
    if datagram.len() < HEADER_LEN {
        return Err(DecodeError::Truncated {
            needed: HEADER_LEN,
            got: datagram.len(),
        });
    }
    let proto = match proto {
        PROTO_IPV4 => InnerProto::Ipv4,
        PROTO_IPV6 => InnerProto::Ipv6,
        other => return Err(DecodeError::UnsupportedProtocol(other)),
    };
    let Some(first) = datagram.get(HEADER_LEN) else {
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
    Ok(Header {
        key: Key(u32::from_be_bytes(key_bytes)),
        proto,
        payload_offset: HEADER_LEN,
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
        let mut buf = vec![0u8; HEADER_LEN];
        buf.extend_from_slice(&inner);
        encapsulate_in_place(Key(7), &mut buf).unwrap();
        assert_eq!(&buf[..], &copied[..n]);
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
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&data);
        }
    }
}
