//! The system calls that need care, and every `unsafe` block of the workspace: entering network
//! namespaces, checking that a file descriptor really is one, creating the TUN character device,
//! and passing descriptors over unix sockets. Other crates say `#![forbid(unsafe_code)]`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sched::{CloneFlags, setns};

/// `NS_GET_NSTYPE` from `<linux/nsfs.h>`: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("file descriptor is not a namespace: {0}")]
    NotANamespace(#[source] io::Error),
    #[error("file descriptor is a namespace of type {0:#x}, not a network namespace")]
    WrongType(libc::c_int),
    #[error("cannot enter network namespace (needs CAP_SYS_ADMIN): {0}")]
    Enter(#[source] nix::Error),
}

/// A handle on a network namespace, verified to be one when made.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    /// (device, inode) of the namespace file: equal iff the same namespace.
    id: (u64, u64),
}

fn ns_type(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor, which `fd` keeps open
    // for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Netns {
    /// Takes ownership of a descriptor (e.g. received over a unix socket) and checks that it is a
    /// network namespace.
    pub fn from_fd(fd: OwnedFd) -> Result<Netns, NetnsError> {
        match ns_type(fd.as_fd()) {
            Ok(t) if t == libc::CLONE_NEWNET => {}
            Ok(t) => return Err(NetnsError::WrongType(t)),
            Err(e) => return Err(NetnsError::NotANamespace(e)),
        }
        let meta = std::fs::File::from(fd.try_clone().map_err(NetnsError::NotANamespace)?)
            .metadata()
            .map_err(NetnsError::NotANamespace)?;
        Ok(Netns {
            fd,
            id: (meta.dev(), meta.ino()),
        })
    }

    /// Opens a namespace by path (`/var/run/netns/cni-…`, `/proc/PID/ns/net`).
    pub fn open(path: impl AsRef<Path>) -> Result<Netns, NetnsError> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|source| NetnsError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Netns::from_fd(OwnedFd::from(file))
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Netns, NetnsError> {
        Netns::open("/proc/thread-self/ns/net")
    }

    /// (device, inode): two handles with the same id are the same namespace.
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    pub fn try_clone(&self) -> io::Result<Netns> {
        Ok(Netns {
            fd: self.fd.try_clone()?,
            id: self.id,
        })
    }

    /// Runs `f` on the calling thread inside this namespace and switches back before returning.
    ///
    /// Call it from a thread that may block (a `spawn_blocking` thread or a dedicated one), never
    /// from an async task, and never await inside `f`: sockets and devices made in `f` stay in the
    /// namespace; the thread must not. If the thread cannot switch back, the process aborts rather
    /// than let the thread serve other work in the wrong namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        let home = Netns::current()?;
        if home.id == self.id {
            return Ok(f());
        }
        setns(&self.fd, CloneFlags::CLONE_NEWNET).map_err(NetnsError::Enter)?;
        let out = f();
        if let Err(e) = setns(&home.fd, CloneFlags::CLONE_NEWNET) {
            tracing::error!(error = %e, "cannot return to the original network namespace; aborting");
            std::process::abort();
        }
        Ok(out)
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Makes sure a TUN character device (10, 200) exists at `path`, creating it (and its directory)
/// when missing: needs only CAP_MKNOD, never a privileged container.
pub fn ensure_tun_node(path: &Path) -> io::Result<bool> {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    match std::fs::metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_char_device() && meta.rdev() == makedev(10, 200) {
                return Ok(false);
            }
            Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists but is not the TUN device (10, 200)",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            match mknod(
                path,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                makedev(10, 200),
            ) {
                Ok(()) => Ok(true),
                Err(nix::Error::EEXIST) => Ok(false),
                Err(e) => Err(io::Error::from(e)),
            }
        }
        Err(e) => Err(e),
    }
}

/// Sends one message with descriptors attached (SCM_RIGHTS) on a connected unix socket.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    msg: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [io::IoSlice::new(msg)];
    let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)
}

/// One message received with [`recv_with_fds`].
#[derive(Debug)]
pub struct Received {
    pub len: usize,
    /// Descriptors that arrived with it, owned from the moment they were received.
    pub fds: Vec<OwnedFd>,
    /// The message did not fit the buffer (a seqpacket record is cut, not split).
    pub truncated: bool,
    /// Descriptors were lost because the control buffer was too small.
    pub fds_truncated: bool,
}

/// The most descriptors [`recv_with_fds`] takes with one message; more are closed by the kernel
/// and reported as [`Received::fds_truncated`].
pub const MAX_FDS_PER_MESSAGE: usize = 4;

/// Receives one message and up to [`MAX_FDS_PER_MESSAGE`] descriptors from a unix socket.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel installed this descriptor in our table for us alone; nothing
                // else refers to it, so it is owned from here on (and closed on every path).
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok(Received {
        len: msg.bytes,
        fds,
        truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        fds_truncated: msg.flags.contains(MsgFlags::MSG_CTRUNC),
    })
}

/// Accepts a connection on a non-blocking listening unix socket; the new descriptor is owned from
/// the line that creates it, non-blocking and close-on-exec.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use nix::sys::socket::{SockFlag, accept4};
    let raw = accept4(
        listener.as_raw_fd(),
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    // SAFETY: accept4 has just installed this descriptor for us alone; nothing else refers to it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Registers an owned descriptor with the tokio reactor.
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open descriptor that stays open, and keeps returning the same
    // number, for as long as it is owned; the AsyncFd owns it until it is dropped.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Linux capability numbers keyway needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    NetAdmin = 12,
    NetRaw = 13,
    SysAdmin = 21,
    Mknod = 27,
}

impl Capability {
    pub fn name(self) -> &'static str {
        match self {
            Capability::NetAdmin => "CAP_NET_ADMIN",
            Capability::NetRaw => "CAP_NET_RAW",
            Capability::SysAdmin => "CAP_SYS_ADMIN",
            Capability::Mknod => "CAP_MKNOD",
        }
    }
}

/// Whether the calling process has `cap` in its effective set (from `/proc/self/status`).
pub fn has_capability(cap: Capability) -> io::Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "no CapEff in /proc/self/status")
        })?;
    let bits = u64::from_str_radix(hex.trim(), 16)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(bits & (1 << cap as u64) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_namespace_is_a_network_namespace() {
        let ns = Netns::current().unwrap();
        assert_eq!(ns.id(), Netns::current().unwrap().id());
        // Running in the namespace we are already in is a no-op.
        assert_eq!(ns.run(|| 5).unwrap(), 5);
    }

    #[test]
    fn other_descriptors_are_refused() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(matches!(
            Netns::from_fd(f.into()),
            Err(NetnsError::NotANamespace(_))
        ));
        let uts = std::fs::File::open("/proc/self/ns/uts").unwrap();
        assert!(matches!(
            Netns::from_fd(uts.into()),
            Err(NetnsError::WrongType(_))
        ));
        assert!(matches!(
            Netns::open("/nonexistent/ns"),
            Err(NetnsError::Open { .. })
        ));
    }

    #[test]
    fn descriptors_cross_a_unix_socket_owned() {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let ns = Netns::current().unwrap();
        send_with_fds(a.as_fd(), b"hello", &[ns.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let r = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..r.len], b"hello");
        assert!(!r.truncated && !r.fds_truncated);
        let got = Netns::from_fd(r.fds.into_iter().next().unwrap()).unwrap();
        assert_eq!(got.id(), ns.id());

        // A record bigger than the buffer is reported truncated, not split.
        send_with_fds(a.as_fd(), &[7u8; 64], &[]).unwrap();
        let r = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert!(r.truncated);
        assert!(r.fds.is_empty());
    }
}
