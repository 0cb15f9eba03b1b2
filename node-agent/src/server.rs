//! The handoff server: a unix SOCK_SEQPACKET socket the plugin talks to. Each record is one
//! request; each request gets one acknowledgement. Records that are truncated, oversized, carry the
//! wrong descriptors, or do not parse are refused with an error acknowledgement and change nothing.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use keyway_protocol::Code;
use keyway_protocol::handoff::{Ack, Attachment, MAX_RECORD, ProtocolError, Request};
use keyway_sap::sys::{self, Netns};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::agent::Agent;

/// Binds the handoff socket (replacing a stale one) with owner-only permissions.
pub fn bind_socket(path: &Path) -> io::Result<AsyncFd<OwnedFd>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listen(&fd, Backlog::new(128)?)?;
    sys::async_fd(fd)
}

/// Accepts connections until the listener fails.
pub async fn serve(agent: Arc<Agent>, listener: AsyncFd<OwnedFd>) -> io::Result<()> {
    loop {
        let mut guard = listener.readable().await?;
        match sys::accept(listener.get_ref().as_fd()) {
            Ok(conn) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(agent, conn).await {
                        tracing::debug!(error = %e, "handoff connection ended");
                    }
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
            Err(e) => tracing::warn!(error = %e, "accept on the handoff socket failed"),
        }
    }
}

async fn recv(conn: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<sys::Received> {
    loop {
        let mut guard = conn.readable().await?;
        match guard.try_io(|c| sys::recv_with_fds(c.get_ref().as_fd(), buf)) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

async fn send(conn: &AsyncFd<OwnedFd>, ack: &Ack) -> io::Result<()> {
    let rec = ack.encode();
    loop {
        let mut guard = conn.ready(Interest::WRITABLE).await?;
        match guard.try_io(|c| sys::send_with_fds(c.get_ref().as_fd(), &rec, &[])) {
            Ok(r) => return r.map(|_| ()),
            Err(_would_block) => continue,
        }
    }
}

fn refuse(e: impl std::fmt::Display) -> Ack {
    Ack::error(Code::DecodeFailure, format!("refused: {e}"))
}

async fn connection(agent: Arc<Agent>, fd: OwnedFd) -> io::Result<()> {
    let conn = sys::async_fd(fd)?;
    let mut buf = vec![0u8; MAX_RECORD + 1];
    // A GC snapshot in progress on this connection.
    let mut snapshot: Option<BTreeSet<Attachment>> = None;
    loop {
        let got = recv(&conn, &mut buf).await?;
        if got.len == 0 && got.fds.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        if got.truncated || got.len > MAX_RECORD {
            send(&conn, &refuse(ProtocolError::Oversized)).await?;
            continue;
        }
        if got.fds_truncated {
            send(&conn, &refuse("too many descriptors attached")).await?;
            continue;
        }
        let req = match Request::decode(&buf[..got.len], got.fds.len()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "refused a handoff message");
                send(&conn, &refuse(e)).await?;
                continue;
            }
        };
        let (name, ack) = match req {
            Request::Allocate(r) => ("allocate", agent.allocate(r).await),
            Request::Add(r) => {
                let fd = got
                    .fds
                    .into_iter()
                    .next()
                    .expect("decode checked one descriptor");
                let ack = match Netns::from_fd(fd) {
                    Ok(ns) => agent.add(r, ns).await,
                    Err(e) => refuse(format!("the descriptor is not a network namespace: {e}")),
                };
                ("add", ack)
            }
            Request::Delete(r) => ("delete", agent.delete(&r.attachment).await),
            Request::Check(r) => ("check", agent.check(&r.attachment, r.pod.as_ref()).await),
            Request::Keep(r) => {
                snapshot
                    .get_or_insert_with(BTreeSet::new)
                    .insert(r.attachment);
                ("keep", Ack::ok())
            }
            Request::SnapshotDone => {
                let keep = snapshot.take().unwrap_or_default();
                ("gc", agent.gc(&keep).await)
            }
            Request::Status => {
                let ack = if agent.is_ready() {
                    Ack::ok()
                } else {
                    Ack::error(Code::NotAvailable, "the agent is not ready")
                };
                ("status", ack)
            }
        };
        agent.observe(name, started, &ack);
        send(&conn, &ack).await?;
    }
}
