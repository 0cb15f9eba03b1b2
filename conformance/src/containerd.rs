//! containerd with its CRI plugin, one per simulated node, configured as RUNTIME-NOTES.md says it
//! must be on these machines: its own root, state, socket, runc root and CNI directories; a locally
//! imported sandbox image; `restrict_oom_score_adj` (CAP_SYS_RESOURCE is missing); cgroupfs.
//!
//! It runs inside the node's network namespace but in the host's mount namespace (entered with
//! `nsenter --net`, not `ip netns exec`), so the pod namespaces it creates under /var/run/netns
//! and the mounts it makes are visible to the agent and to `keyway-lab down`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// One node's containerd.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub cni_bin: PathBuf,
    pub cni_conf: PathBuf,
    pub netns: String,
    pub pid: u32,
}

pub fn config_toml(dir: &Path, cni_bin: &Path, cni_conf: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{sock}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        sock = dir.join("containerd.sock").display(),
        pause = crate::images::PAUSE_IMAGE,
        runc = dir.join("runc").display(),
        bin = cni_bin.display(),
        conf = cni_conf.display(),
    )
}

/// Links Debian's reference plugins and keyway's into one bin directory (containerd takes one).
pub fn populate_cni_bin(cni_bin: &Path, keyway_cni: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(cni_bin)?;
    for p in ["bridge", "host-local", "loopback", "portmap"] {
        let link = cni_bin.join(p);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(Path::new(crate::harness::DEBIAN_CNI_DIR).join(p), &link)?;
    }
    let link = cni_bin.join("keyway");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(keyway_cni, &link)?;
    Ok(())
}

/// Starts a process inside a node's network namespace, in its own session (it outlives the
/// command that started it), logging to `log`. Returns its pid.
pub fn spawn_detached(
    netns: &str,
    program: &Path,
    args: &[String],
    log: &Path,
    env: &[(&str, String)],
) -> anyhow::Result<u32> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = Command::new("setsid");
    cmd.arg("nsenter")
        .arg(format!("--net=/var/run/netns/{netns}"))
        .arg(program)
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    Ok(child.id())
}

impl Containerd {
    pub fn start(
        dir: &Path,
        netns: &str,
        cni_bin: &Path,
        cni_conf: &Path,
    ) -> anyhow::Result<Containerd> {
        std::fs::create_dir_all(dir)?;
        std::fs::create_dir_all(cni_conf)?;
        let config = dir.join("config.toml");
        std::fs::write(&config, config_toml(dir, cni_bin, cni_conf))?;
        let socket = dir.join("containerd.sock");
        let _ = std::fs::remove_file(&socket);
        let pid = spawn_detached(
            netns,
            Path::new("/usr/bin/containerd"),
            &["--config".into(), config.display().to_string()],
            &dir.join("containerd.log"),
            &[],
        )?;
        let c = Containerd {
            dir: dir.to_path_buf(),
            socket,
            cni_bin: cni_bin.into(),
            cni_conf: cni_conf.into(),
            netns: netns.into(),
            pid,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.socket.exists() {
            if Instant::now() > deadline || !crate::proc::alive(pid) {
                bail!(
                    "containerd did not start; its log:\n{}",
                    std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(c)
    }

    /// `ctr -n k8s.io image import`.
    pub fn import(&self, tar: &Path) -> anyhow::Result<()> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import", "--no-unpack"])
            .arg(tar)
            .output()
            .context("cannot run ctr (Debian package containerd)")?;
        if !out.status.success() {
            bail!(
                "ctr import {} failed: {}",
                tar.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    pub fn stop(&self) {
        crate::proc::terminate(self.pid, Duration::from_secs(5));
    }
}
