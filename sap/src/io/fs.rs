//! Files the way every keyway program writes them: whole or not at all, durable before they
//! count, with the permissions they need. One helper for the workspace (the agent's records and
//! publications, the cluster secret, the installer's CNI configuration and plugin binary, the
//! lab's files), and the randomness secrets are made from.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `bytes` to `path` atomically and durably: a temporary file in the same directory
/// (a dot-file ending in `.tmp`, which no reader of the directory takes for a real one), written,
/// given `mode`, synced, renamed over `path`, then the directory synced, so that after a crash
/// `path` holds either its old contents or the new ones, never a part. Missing parent directories
/// are created. The temporary file is removed when anything fails.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // The creation mode is filtered by the umask; the file must have exactly `mode`.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The permissions of an existing file, to keep them when rewriting it; `default` for a new one.
pub fn mode_of(path: &Path, default: u32) -> u32 {
    std::fs::metadata(path).map_or(default, |m| m.permissions().mode() & 0o7777)
}

/// Removes a file; one that does not exist is success.
pub fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `s` as one component of a file name: ASCII letters, digits, `-` and `.` kept, anything else
/// (a `/` above all) replaced by `_`.
pub fn file_name_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `n` random bytes from the kernel's CSPRNG, for secrets.
pub fn random_bytes(n: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("keyway-fs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn writes_whole_files_with_their_mode_and_leaves_no_temporary() {
        let d = scratch("write");
        let p = d.join("sub/secret");
        write_atomic(&p, b"one", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(mode_of(&p, 0), 0o600);
        write_atomic(&p, b"two", mode_of(&p, 0o644)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p, 0), 0o600, "the mode kept");
        let left: Vec<_> = std::fs::read_dir(d.join("sub"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
        remove_if_present(&p).unwrap();
        remove_if_present(&p).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let d = scratch("fail");
        std::fs::create_dir_all(d.join("target")).unwrap();
        // A directory cannot be replaced by a file: the rename fails.
        assert!(write_atomic(&d.join("target"), b"x", 0o644).is_err());
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn names_and_randomness() {
        assert_eq!(
            file_name_part("kube-system/core dns"),
            "kube-system_core_dns"
        );
        let (a, b) = (random_bytes(32).unwrap(), random_bytes(32).unwrap());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
