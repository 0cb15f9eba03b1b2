//! A kubeconfig for node-side tools, written from the installer pod's service-account token the
//! way istio-cni's installer does it. keyway's own plugin does not need one (it talks only to the
//! node agent), so this is written only when `--kubeconfig` asks for it. Projected tokens rotate:
//! the installer rewrites the file whenever the token or CA changes.

use std::path::{Path, PathBuf};

use crate::confdir::{InstallError, io_err};

/// Where a pod finds its service account.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What the kubeconfig is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `https://host:port` of the API server.
    pub server: String,
    pub ca_pem: Vec<u8>,
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("KUBERNETES_SERVICE_HOST/PORT are not set: not running in a pod")]
    NotInCluster,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Credentials {
    /// From the pod's environment (`host`, `port`) and service-account directory.
    pub fn from_pod(
        host: Option<&str>,
        port: Option<&str>,
        sa_dir: &Path,
    ) -> Result<Credentials, CredentialsError> {
        let (Some(host), Some(port)) = (host, port) else {
            return Err(CredentialsError::NotInCluster);
        };
        let read = |f: &str| {
            let path = sa_dir.join(f);
            std::fs::read(&path).map_err(|source| CredentialsError::Read { path, source })
        };
        // An IPv6 service host needs brackets in a URL.
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        Ok(Credentials {
            server: format!("https://{host}:{port}"),
            ca_pem: read("ca.crt")?,
            token: String::from_utf8_lossy(&read("token")?).trim().to_string(),
        })
    }

    /// The kubeconfig's text: one cluster, one user, one context, all named keyway.
    pub fn render(&self) -> String {
        let ca = base64(&self.ca_pem);
        format!(
            "# Written by keyway-install from its service account; rewritten when the token rotates.\n\
             apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: keyway\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
             users:\n\
             - name: keyway\n  user:\n    token: {token}\n\
             contexts:\n\
             - name: keyway\n  context:\n    cluster: keyway\n    user: keyway\n\
             current-context: keyway\n",
            server = self.server,
            token = self.token,
        )
    }

    /// Writes the kubeconfig (mode 0600) unless it already says the same; whether it wrote.
    pub fn write(&self, path: &Path) -> Result<bool, InstallError> {
        let text = self.render();
        if std::fs::read(path).is_ok_and(|old| old == text.as_bytes()) {
            return Ok(false);
        }
        // Owner-only from its first byte: it holds the service account's token.
        keyway_sap::io::fs::write_atomic(path, text.as_bytes(), 0o600)
            .map_err(io_err("cannot write", path))?;
        Ok(true)
    }
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn written_from_the_service_account_private_and_only_when_changed() {
        let t = std::env::temp_dir().join(format!("keyway-kubeconfig-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(&t).unwrap();
        std::fs::write(t.join("ca.crt"), b"CA").unwrap();
        std::fs::write(t.join("token"), b"tok-1\n").unwrap();
        assert!(matches!(
            Credentials::from_pod(None, Some("443"), &t),
            Err(CredentialsError::NotInCluster)
        ));
        let c = Credentials::from_pod(Some("fd00::1"), Some("443"), &t).unwrap();
        assert_eq!(c.server, "https://[fd00::1]:443");
        assert_eq!(c.token, "tok-1");
        let out = t.join("out/keyway-kubeconfig");
        std::fs::create_dir_all(t.join("out")).unwrap();
        assert!(c.write(&out).unwrap());
        assert!(!c.write(&out).unwrap());
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.contains("token: tok-1") && text.contains("certificate-authority-data: Q0E="));
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(t.join("token"), b"tok-2").unwrap();
        let c2 = Credentials::from_pod(Some("10.96.0.1"), Some("443"), &t).unwrap();
        assert!(c2.write(&out).unwrap(), "a rotated token is written");
        assert!(std::fs::read_to_string(&out).unwrap().contains("tok-2"));
        std::fs::remove_dir_all(&t).unwrap();
    }
}
