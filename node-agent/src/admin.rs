//! The admin servers. On TCP, where Prometheus and kubelet look (the DaemonSet listens on the
//! node's addresses): `/metrics` (Prometheus text), `/healthz` (the process serves), `/readyz`
//! (state synced and pods re-attached) — nothing that names a pod. On a unix socket next to the
//! handoff socket, owner-only (root on the node, never a pod): the same, and
//! `/debug/attachments` (every pod's namespace, addresses and policy, as JSON).
//!
//! Both are open to whatever reaches them, so each connection is bounded: one request (no
//! keep-alive), its header within [`HEADER_TIMEOUT`], the whole of it within
//! [`CONNECTION_TIMEOUT`], at most [`MAX_CONNECTIONS`] at once and [`MAX_PER_PEER`] from one
//! address (more are closed at once and counted: a pod holding connections open cannot starve
//! kubelet's probes or Prometheus), and a failing `accept` backs off instead of spinning.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;

use crate::agent::Agent;

/// Connections served at once, per server.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections served at once from one address (the network server).
pub const MAX_PER_PEER: usize = 8;
/// How long a client has to send its request's header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may last at all.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest pause after failing `accept`s (file descriptors exhausted, say).
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What a server answers: the public one never shows debug detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Audience {
    Network,
    Local,
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

async fn route(
    agent: Arc<Agent>,
    audience: Audience,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            agent.metrics.encode(),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if agent.is_ready() => reply(StatusCode::OK, "text/plain", "ready\n"),
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: state not synced or pods not re-attached yet\n",
        ),
        "/debug/attachments" if audience == Audience::Local => reply(
            StatusCode::OK,
            "application/json",
            agent.describe().to_string(),
        ),
        "/debug/attachments" => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: debug detail is served on the agent's local socket only\n",
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz, /readyz\n",
        ),
    })
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Where the local admin socket is, next to the handoff socket: `agent.sock` → `agent.debug.sock`.
pub fn local_socket_path(handoff: &Path) -> PathBuf {
    handoff.with_extension("debug.sock")
}

/// Binds the local admin socket, owner-only, replacing a stale one.
pub fn bind_local(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    keyway_sap::io::fs::remove_if_present(path)?;
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Connections open per peer address.
#[derive(Debug, Default)]
struct Peers(Mutex<HashMap<IpAddr, usize>>);

/// One connection counted against its peer until dropped.
#[derive(Debug)]
struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Peers {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(ip).or_default();
        if *n >= MAX_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = self.peers.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// Serves the network admin server until the process ends.
pub async fn serve(agent: Arc<Agent>, listener: TcpListener) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let peers = Arc::new(Peers::default());
    let mut backoff = Backoff::default();
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                backoff.reset();
                let Some(slot) = peers.take(from.ip()) else {
                    agent.metrics.admin_refused.inc();
                    continue;
                };
                connection(&agent, &limit, Audience::Network, (stream, slot));
            }
            Err(e) => backoff.wait("admin", &e).await,
        }
    }
}

/// Serves the local admin socket until the process ends.
pub async fn serve_local(agent: Arc<Agent>, listener: UnixListener) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Backoff::default();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                backoff.reset();
                connection(&agent, &limit, Audience::Local, (stream, ()));
            }
            Err(e) => backoff.wait("local admin", &e).await,
        }
    }
}

/// Serves one connection in its own task, within the limits; over the cap it is closed at once.
/// `held` (a peer's slot) is kept as long as the connection.
fn connection<S, H>(agent: &Arc<Agent>, limit: &Arc<Semaphore>, audience: Audience, conn: (S, H))
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Send + 'static,
{
    let (stream, held) = conn;
    let Ok(permit) = limit.clone().try_acquire_owned() else {
        agent.metrics.admin_refused.inc();
        return;
    };
    let agent = agent.clone();
    tokio::spawn(async move {
        let _held = (permit, held);
        let svc = service_fn(move |req| route(agent.clone(), audience, req));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .keep_alive(false)
            .serve_connection(TokioIo::new(stream), svc);
        let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
    });
}

/// Pauses after failed `accept`s, doubling up to [`MAX_BACKOFF`], logging the first of a run.
#[derive(Debug, Default)]
struct Backoff {
    delay: Option<Duration>,
}

impl Backoff {
    fn reset(&mut self) {
        self.delay = None;
    }

    async fn wait(&mut self, server: &str, e: &std::io::Error) {
        let delay = match self.delay {
            None => {
                tracing::warn!(server, error = %e, "accept failed; backing off");
                Duration::from_millis(10)
            }
            Some(d) => (d * 2).min(MAX_BACKOFF),
        };
        self.delay = Some(delay);
        tokio::time::sleep(delay).await;
    }
}
