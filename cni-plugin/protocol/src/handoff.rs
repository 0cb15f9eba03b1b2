//! The handoff protocol between `keyway-cni` and `keyway-agent`: one definition both sides use.
//!
//! A unix `SOCK_SEQPACKET` socket carries one message per record, so a message is never split or
//! merged; each request gets exactly one [`Ack`]. The pod's network namespace travels with `Add`
//! as a file descriptor (SCM_RIGHTS), never as a path the agent would have to trust.
//!
//! ```text
//!  0       3     4      5       6              8
//! +-------+-----+------+-------+--------------+------------------------+
//! | "KWH" | ver | type | flags | body len u16 | body: JSON, UTF-8 ...  |
//! +-------+-----+------+-------+--------------+------------------------+
//! ```
//! A record whose length is not exactly `8 + body len`, whose magic or version is unknown, whose
//! type is unknown, whose body does not parse, or whose descriptors are not exactly those its type
//! needs (one for `Add`, none otherwise) is refused with an error [`Ack`] and changes nothing.
//!
//! A connection may carry several requests. `Keep` messages followed by `SnapshotDone` on one
//! connection form a snapshot: the agent then forgets every attachment that was not kept (GC).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use keyway_sap::sys;

use crate::Code;

pub const MAGIC: &[u8; 3] = b"KWH";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8;
/// The largest body accepted: a message is a few hundred bytes; anything near this is an error.
pub const MAX_BODY: usize = 60 * 1024;
/// The largest record: header and body.
pub const MAX_RECORD: usize = HEADER_LEN + MAX_BODY;

/// Which attachment a message is about (the CNI spec's key: container and interface).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// The Kubernetes pod behind an attachment, from `CNI_ARGS` (empty outside Kubernetes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

impl PodRef {
    pub fn is_kubernetes(&self) -> bool {
        !self.namespace.is_empty() && !self.name.is_empty()
    }
}

/// One overlay network a pod joins, as the agent grants it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkGrant {
    /// The overlay network's name.
    pub network: String,
    /// The device name in the pod (`kw0`, `kw1`, …).
    pub device: String,
    /// The pod's overlay address (a /32 or /128).
    pub address: IpNetwork,
    /// The overlay's prefixes, routed into the device.
    pub routes: Vec<IpNetwork>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocateRequest {
    pub attachment: Attachment,
    pub pod: PodRef,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddRequest {
    pub attachment: Attachment,
    pub pod: PodRef,
    /// Where the runtime keeps the namespace; the agent re-opens it after a restart and checks it
    /// is still the namespace it was handed.
    pub netns_path: String,
    /// The pod's infrastructure address (from the primary CNI), where its GUE socket binds.
    pub infra_ip: IpAddr,
    /// The underlay MTU seen in the pod.
    pub mtu: u32,
    /// What the plugin provisioned (the grants of `Allocate`).
    pub networks: Vec<NetworkGrant>,
    /// Exemptions the plugin put in the pod's firewall (node addresses), kept so the agent can
    /// rebuild the same table with its egress rules.
    pub node_addresses: Vec<IpNetwork>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentRequest {
    pub attachment: Attachment,
    /// `Check`: the pod, so that the agent can tell a pod that opted out of keyway (it holds no
    /// record of it) from one whose record is lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// A request from the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Reserve overlay addresses for an attachment (idempotent: the same attachment gets the same
    /// addresses).
    Allocate(AllocateRequest),
    /// Take the pod: the namespace descriptor comes with it.
    Add(AddRequest),
    /// Forget the pod and release its addresses (idempotent).
    Delete(AttachmentRequest),
    /// Does the agent serve this attachment?
    Check(AttachmentRequest),
    /// Part of a GC snapshot: keep this attachment.
    Keep(AttachmentRequest),
    /// End of a GC snapshot: forget what was not kept.
    SnapshotDone,
    /// Is the agent ready?
    Status,
}

/// The error part of an [`Ack`]: a CNI error code the plugin passes on, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AckError {
    /// A [`Code`] on the wire (a number, so that a code this build does not know still travels).
    pub code: u32,
    pub message: String,
}

impl AckError {
    /// The CNI error code, [`Code::Other`] for one this build does not know.
    pub fn code(&self) -> Code {
        Code::from_u32(self.code)
    }
}

/// The agent's answer to every request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AckError>,
    /// `Allocate`, `Delete`, `Check`: the attachment's networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NetworkGrant>,
    /// `Allocate`, `Check`: the pod opted out of keyway (a label): the plugin leaves it as the
    /// primary CNI made it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub excluded: bool,
    /// `SnapshotDone`: how many attachments were forgotten.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub removed: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Ack {
    pub fn ok() -> Ack {
        Ack::default()
    }

    pub fn error(code: Code, message: impl Into<String>) -> Ack {
        Ack {
            error: Some(AckError {
                code: code as u32,
                message: message.into(),
            }),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Type {
    Allocate = 1,
    Add = 2,
    Delete = 3,
    Check = 4,
    Keep = 5,
    SnapshotDone = 6,
    Status = 7,
    Ack = 0x80,
}

impl Type {
    fn from_u8(t: u8) -> Option<Type> {
        Some(match t {
            1 => Type::Allocate,
            2 => Type::Add,
            3 => Type::Delete,
            4 => Type::Check,
            5 => Type::Keep,
            6 => Type::SnapshotDone,
            7 => Type::Status,
            0x80 => Type::Ack,
            _ => return None,
        })
    }
}

/// Why a record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("record of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    Short(usize),
    #[error("record does not start with the handoff magic")]
    BadMagic,
    #[error("handoff protocol version {0} is not supported (this agent speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("record is {got} bytes but its header says {expected}: truncated or padded")]
    LengthMismatch { got: usize, expected: usize },
    #[error("record was cut by the receiver: larger than {MAX_RECORD} bytes")]
    Oversized,
    #[error("message body does not parse: {0}")]
    Body(String),
    #[error("{kind} must carry {expected} descriptor(s), got {got}")]
    Descriptors {
        kind: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("expected an acknowledgement, got message type {0:#04x}")]
    NotAnAck(u8),
}

fn encode(t: Type, body: &impl Serialize) -> Vec<u8> {
    let body = serde_json::to_vec(body).expect("handoff bodies always serialise");
    assert!(
        body.len() <= MAX_BODY,
        "handoff message of {} bytes exceeds the protocol limit",
        body.len()
    );
    let mut rec = Vec::with_capacity(HEADER_LEN + body.len());
    rec.extend_from_slice(MAGIC);
    rec.push(VERSION);
    rec.push(t as u8);
    rec.push(0);
    rec.extend_from_slice(&(body.len() as u16).to_be_bytes());
    rec.extend_from_slice(&body);
    rec
}

/// Checks the header and returns the type and body.
fn decode(rec: &[u8]) -> Result<(u8, &[u8]), ProtocolError> {
    if rec.len() < HEADER_LEN {
        return Err(ProtocolError::Short(rec.len()));
    }
    if &rec[..3] != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    if rec[3] != VERSION {
        return Err(ProtocolError::UnsupportedVersion(rec[3]));
    }
    let len = usize::from(u16::from_be_bytes([rec[6], rec[7]]));
    if rec.len() != HEADER_LEN + len {
        return Err(ProtocolError::LengthMismatch {
            got: rec.len(),
            expected: HEADER_LEN + len,
        });
    }
    Ok((rec[4], &rec[HEADER_LEN..]))
}

fn body<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(b).map_err(|e| ProtocolError::Body(e.to_string()))
}

impl Request {
    fn kind(&self) -> &'static str {
        match self {
            Request::Allocate(_) => "Allocate",
            Request::Add(_) => "Add",
            Request::Delete(_) => "Delete",
            Request::Check(_) => "Check",
            Request::Keep(_) => "Keep",
            Request::SnapshotDone => "SnapshotDone",
            Request::Status => "Status",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Allocate(b) => encode(Type::Allocate, b),
            Request::Add(b) => encode(Type::Add, b),
            Request::Delete(b) => encode(Type::Delete, b),
            Request::Check(b) => encode(Type::Check, b),
            Request::Keep(b) => encode(Type::Keep, b),
            Request::SnapshotDone => encode(Type::SnapshotDone, &serde_json::json!({})),
            Request::Status => encode(Type::Status, &serde_json::json!({})),
        }
    }

    /// Parses a received record and checks that it came with the descriptors its type needs.
    pub fn decode(rec: &[u8], fds: usize) -> Result<Request, ProtocolError> {
        let (t, b) = decode(rec)?;
        let req = match Type::from_u8(t) {
            Some(Type::Allocate) => Request::Allocate(body(b)?),
            Some(Type::Add) => Request::Add(body(b)?),
            Some(Type::Delete) => Request::Delete(body(b)?),
            Some(Type::Check) => Request::Check(body(b)?),
            Some(Type::Keep) => Request::Keep(body(b)?),
            Some(Type::SnapshotDone) => Request::SnapshotDone,
            Some(Type::Status) => Request::Status,
            Some(Type::Ack) | None => return Err(ProtocolError::UnknownType(t)),
        };
        let expected = usize::from(matches!(req, Request::Add(_)));
        if fds != expected {
            return Err(ProtocolError::Descriptors {
                kind: req.kind(),
                expected,
                got: fds,
            });
        }
        Ok(req)
    }
}

impl Ack {
    pub fn encode(&self) -> Vec<u8> {
        encode(Type::Ack, self)
    }

    pub fn decode(rec: &[u8]) -> Result<Ack, ProtocolError> {
        let (t, b) = decode(rec)?;
        if t != Type::Ack as u8 {
            return Err(ProtocolError::NotAnAck(t));
        }
        body(b)
    }
}

/// Why a call to the agent failed: the plugin maps these onto CNI error codes.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the keyway agent at {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the keyway agent did not answer in time ({0:?})")]
    Timeout(Duration),
    #[error("talking to the keyway agent failed: {0}")]
    Io(#[source] io::Error),
    #[error("the keyway agent sent a bad answer: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the keyway agent refused: {}", .0.message)]
    Refused(AckError),
}

/// The plugin's side: a blocking connection with a deadline per exchange.
#[derive(Debug)]
pub struct Client {
    sock: OwnedFd,
    timeout: Duration,
}

impl Client {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
        let err = |source: io::Error| ClientError::Connect {
            path: path.display().to_string(),
            source,
        };
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| err(e.into()))?;
        let addr = UnixAddr::new(path).map_err(|e| err(e.into()))?;
        connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr).map_err(|e| err(e.into()))?;
        // Deadlines on both directions: a wedged agent must not wedge the runtime.
        let stream = UnixStream::from(sock);
        stream
            .set_read_timeout(Some(timeout))
            .map_err(ClientError::Io)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(ClientError::Io)?;
        Ok(Client {
            sock: OwnedFd::from(stream),
            timeout,
        })
    }

    /// Sends a request (with the namespace descriptor for `Add`) and waits for its [`Ack`]. An
    /// error ack becomes [`ClientError::Refused`].
    pub fn call(&self, req: &Request, netns: Option<BorrowedFd<'_>>) -> Result<Ack, ClientError> {
        let rec = req.encode();
        let fds: Vec<BorrowedFd<'_>> = netns.into_iter().collect();
        let io_err = |e: io::Error| {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                ClientError::Timeout(self.timeout)
            } else {
                ClientError::Io(e)
            }
        };
        sys::send_with_fds(self.sock.as_fd(), &rec, &fds).map_err(io_err)?;
        let mut buf = vec![0u8; MAX_RECORD];
        let got = sys::recv_with_fds(self.sock.as_fd(), &mut buf).map_err(io_err)?;
        if got.len == 0 {
            return Err(ClientError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the connection",
            )));
        }
        if got.truncated {
            return Err(ProtocolError::Oversized.into());
        }
        let ack = Ack::decode(&buf[..got.len])?;
        match ack.error {
            Some(e) => Err(ClientError::Refused(e)),
            None => Ok(ack),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att() -> Attachment {
        Attachment {
            container_id: "abc".into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn golden_header() {
        let rec = Request::Status.encode();
        assert_eq!(&rec[..8], &[b'K', b'W', b'H', 1, 7, 0, 0, 2]);
        assert_eq!(&rec[8..], b"{}");
    }

    #[test]
    fn requests_round_trip() {
        let add = Request::Add(AddRequest {
            attachment: att(),
            pod: PodRef {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
            },
            netns_path: "/var/run/netns/cni-1".into(),
            infra_ip: "10.244.1.5".parse().unwrap(),
            mtu: 1500,
            networks: vec![NetworkGrant {
                network: "default".into(),
                device: "kw0".into(),
                address: "100.64.1.5/32".parse().unwrap(),
                routes: vec!["100.64.0.0/10".parse().unwrap()],
            }],
            node_addresses: vec!["10.244.1.1/32".parse().unwrap()],
        });
        assert_eq!(Request::decode(&add.encode(), 1).unwrap(), add);
        for r in [
            Request::Allocate(AllocateRequest {
                attachment: att(),
                pod: PodRef::default(),
            }),
            Request::Delete(AttachmentRequest {
                attachment: att(),
                pod: None,
            }),
            Request::Check(AttachmentRequest {
                attachment: att(),
                pod: None,
            }),
            Request::Keep(AttachmentRequest {
                attachment: att(),
                pod: None,
            }),
            Request::SnapshotDone,
            Request::Status,
        ] {
            assert_eq!(Request::decode(&r.encode(), 0).unwrap(), r);
        }
        let ack = Ack::error(Code::TryAgainLater, "not ready");
        assert_eq!(Ack::decode(&ack.encode()).unwrap(), ack);
    }

    #[test]
    fn bad_records_are_refused_with_their_reason() {
        let good = Request::Delete(AttachmentRequest {
            attachment: att(),
            pod: None,
        })
        .encode();
        assert_eq!(Request::decode(&good[..5], 0), Err(ProtocolError::Short(5)));
        let truncated = &good[..good.len() - 3];
        assert!(matches!(
            Request::decode(truncated, 0),
            Err(ProtocolError::LengthMismatch { .. })
        ));
        let mut padded = good.clone();
        padded.push(b' ');
        assert!(matches!(
            Request::decode(&padded, 0),
            Err(ProtocolError::LengthMismatch { .. })
        ));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert_eq!(Request::decode(&magic, 0), Err(ProtocolError::BadMagic));
        let mut ver = good.clone();
        ver[3] = 9;
        assert_eq!(
            Request::decode(&ver, 0),
            Err(ProtocolError::UnsupportedVersion(9))
        );
        let mut ty = good.clone();
        ty[4] = 0x42;
        assert_eq!(
            Request::decode(&ty, 0),
            Err(ProtocolError::UnknownType(0x42))
        );
        assert!(matches!(
            Request::decode(&Ack::ok().encode(), 0),
            Err(ProtocolError::UnknownType(0x80))
        ));
        let mut garbage = encode(Type::Delete, &serde_json::json!({"nope": 1}));
        assert!(matches!(
            Request::decode(&garbage, 0),
            Err(ProtocolError::Body(_))
        ));
        garbage = encode(Type::Add, &serde_json::json!({}));
        assert!(matches!(
            Request::decode(&garbage, 1),
            Err(ProtocolError::Body(_))
        ));
        // Descriptors: Add needs exactly one, the others none.
        assert_eq!(
            Request::decode(&good, 1),
            Err(ProtocolError::Descriptors {
                kind: "Delete",
                expected: 0,
                got: 1
            })
        );
    }

    #[test]
    fn add_without_its_namespace_is_refused() {
        let add = Request::Add(AddRequest {
            attachment: att(),
            pod: PodRef::default(),
            netns_path: String::new(),
            infra_ip: "10.0.0.1".parse().unwrap(),
            mtu: 1500,
            networks: vec![],
            node_addresses: vec![],
        });
        assert_eq!(
            Request::decode(&add.encode(), 0),
            Err(ProtocolError::Descriptors {
                kind: "Add",
                expected: 1,
                got: 0
            })
        );
    }
}
