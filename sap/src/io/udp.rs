//! GUE sockets: one per pod, bound to the pod's infrastructure IP inside its namespace, and one per
//! SaP on the node's address. Made blocking-free and marked, so that the pod's nftables can tell the
//! agent's GUE from anything the pod itself sends.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// The fwmark on keyway's own GUE packets ("kw"): the pod's output chain accepts GUE only with it,
/// and its input chain delivers GUE only to a socket carrying it. Setting a mark needs
/// CAP_NET_ADMIN or CAP_NET_RAW; a workload with CAP_NET_RAW could set it, but could as well write
/// frames below netfilter, so the receiver's checks (keys, the outer source) are what holds
/// (`docs/threat-model.md`).
pub const GUE_MARK: u32 = 0x6b77;

/// Socket buffers asked for (the kernel caps them at net.core.[rw]mem_max).
const BUFFER_BYTES: usize = 4 << 20;

/// Binds a non-blocking GUE socket to `addr` in the calling thread's namespace.
pub fn bind_gue(addr: SocketAddr, mark: Option<u32>) -> io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    if let Some(mark) = mark {
        sock.set_mark(mark)?;
    }
    // Best effort: small buffers cost throughput, not correctness.
    let _ = sock.set_recv_buffer_size(BUFFER_BYTES);
    let _ = sock.set_send_buffer_size(BUFFER_BYTES);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}
