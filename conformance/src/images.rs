//! The lab's container images, built locally (no registry is reachable): each is a `docker save`
//! tarball — one layer holding the statically linked `keyway-agnhost` at `/agnhost`, a config, and
//! a `manifest.json` with its tag — imported with `ctr -n k8s.io image import`.
//!
//! Every container of the lab runs this image, whatever its pod spec's `image` says: the lab is
//! about reachability, and this one binary serves, pauses and probes.
//!
//! keyway's own cluster image ([`keyway_image`], `make image`) is built the same way: one layer
//! with the three statically linked binaries the DaemonSet runs.

use std::path::Path;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

/// The sandbox (pause) image.
pub const PAUSE_IMAGE: &str = "keyway.io/lab-pause:dev";
/// The image every container runs.
pub const AGNHOST_IMAGE: &str = "keyway.io/lab-agnhost:dev";

/// Appends one ustar entry (a regular file or a directory).
fn tar_entry(out: &mut Vec<u8>, name: &str, mode: u32, data: Option<&[u8]>) {
    let mut h = [0u8; 512];
    let name_bytes = name.as_bytes();
    assert!(name_bytes.len() < 100, "tar name too long: {name}");
    h[..name_bytes.len()].copy_from_slice(name_bytes);
    let octal = |field: &mut [u8], v: u64| {
        let s = format!("{:0width$o}", v, width = field.len() - 1);
        field[..s.len()].copy_from_slice(s.as_bytes());
    };
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], 0); // uid
    octal(&mut h[116..124], 0); // gid
    octal(&mut h[124..136], data.map_or(0, |d| d.len() as u64));
    octal(&mut h[136..148], 1_700_000_000); // mtime: fixed, for reproducible images
    h[156] = if data.is_some() { b'0' } else { b'5' };
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    out.extend_from_slice(&h);
    if let Some(d) = data {
        out.extend_from_slice(d);
        out.resize(out.len() + (512 - d.len() % 512) % 512, 0);
    }
}

fn tar_end(out: &mut Vec<u8>) {
    out.resize(out.len() + 1024, 0);
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Whether an ELF binary is statically linked (no PT_INTERP program header).
pub fn is_static(binary: &[u8]) -> bool {
    if binary.len() < 64 || &binary[..4] != b"\x7fELF" || binary[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([binary[o], binary[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(binary[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 > binary.len() || u32::from_le_bytes(binary[o..o + 4].try_into().unwrap()) != 3
    })
}

/// Builds a `docker save` tarball of an image holding `files` (path without the leading `/`,
/// mode, bytes), their parent directories, and a world-writable `/tmp`.
pub fn image_tar(files: &[(&str, u32, &[u8])], tag: &str, entrypoint: &[&str]) -> Vec<u8> {
    let mut layer = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    for (path, _, _) in files {
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            at += i + 1;
            if dirs.insert(&path[..at]) {
                tar_entry(&mut layer, &path[..at], 0o755, None);
            }
        }
    }
    for (path, mode, data) in files {
        tar_entry(&mut layer, path, *mode, Some(data));
    }
    tar_entry(&mut layer, "tmp/", 0o1777, None);
    tar_end(&mut layer);
    let diff_id = format!("sha256:{}", sha256_hex(&layer));
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "keyway-lab"}],
    })
    .to_string();
    let config_name = format!("{}.json", sha256_hex(config.as_bytes()));
    let manifest =
        serde_json::json!([{"Config": config_name, "RepoTags": [tag], "Layers": ["layer.tar"]}])
            .to_string();
    let mut out = Vec::new();
    tar_entry(&mut out, "layer.tar", 0o644, Some(&layer));
    tar_entry(&mut out, &config_name, 0o644, Some(config.as_bytes()));
    tar_entry(&mut out, "manifest.json", 0o644, Some(manifest.as_bytes()));
    tar_end(&mut out);
    out
}

/// Reads a binary the images hold, refusing a dynamically linked one (the images have no libc).
fn read_static(path: &Path) -> anyhow::Result<Vec<u8>> {
    let binary = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !is_static(&binary) {
        bail!(
            "{} is dynamically linked; the images need a static build (the workspace's \
             .cargo/config.toml makes every build one: cargo build --release)",
            path.display()
        );
    }
    Ok(binary)
}

/// The image the manifests run (`manifests/base/daemonset.yaml`).
pub const KEYWAY_IMAGE: &str = "keyway:0.1.0";
/// Where the image holds keyway's binaries.
pub const KEYWAY_IMAGE_BIN: &str = "opt/keyway/bin";

/// Builds keyway's cluster image: the statically linked `keyway-agent`, `keyway-install` and
/// `keyway-cni` from `bin_dir` under `/opt/keyway/bin`, and nothing else (no shell, no libc).
pub fn keyway_image(bin_dir: &Path, tag: &str) -> anyhow::Result<Vec<u8>> {
    let names = ["keyway-agent", "keyway-install", "keyway-cni"];
    let mut binaries = Vec::new();
    for n in names {
        binaries.push((
            format!("{KEYWAY_IMAGE_BIN}/{n}"),
            read_static(&bin_dir.join(n))?,
        ));
    }
    let files: Vec<(&str, u32, &[u8])> = binaries
        .iter()
        .map(|(p, b)| (p.as_str(), 0o755, b.as_slice()))
        .collect();
    Ok(image_tar(
        &files,
        tag,
        &[&format!("/{KEYWAY_IMAGE_BIN}/keyway-agent")],
    ))
}

/// Writes the pause and agnhost image tarballs into `dir`; returns their paths.
pub fn build(agnhost: &Path, dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let binary = read_static(agnhost)?;
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for (tag, entry, file) in [
        (PAUSE_IMAGE, vec!["/agnhost", "pause"], "pause.tar"),
        (AGNHOST_IMAGE, vec!["/agnhost", "pause"], "agnhost.tar"),
    ] {
        let p = dir.join(file);
        std::fs::write(&p, image_tar(&[("agnhost", 0o755, &binary)], tag, &entry))?;
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tarballs_list_with_the_system_tar() {
        let dir = std::env::temp_dir().join(format!("keyway-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = dir.join("i.tar");
        let files: [(&str, u32, &[u8]); 2] = [
            ("agnhost", 0o755, b"#!/bin/true\n"),
            ("opt/keyway/bin/x", 0o755, b"x"),
        ];
        std::fs::write(&t, image_tar(&files, "x/y:z", &["/agnhost"])).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-tf")
            .arg(&t)
            .output()
            .unwrap();
        let names = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            names.contains("layer.tar") && names.contains("manifest.json"),
            "{names}"
        );
        let layer = std::process::Command::new("tar")
            .arg("-xOf")
            .arg(&t)
            .arg("layer.tar")
            .output()
            .unwrap();
        std::fs::write(dir.join("layer.tar"), &layer.stdout).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(dir.join("layer.tar"))
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        let paths: Vec<&str> = listing
            .lines()
            .filter_map(|l| l.split_whitespace().last())
            .collect();
        assert_eq!(
            paths,
            [
                "opt/",
                "opt/keyway/",
                "opt/keyway/bin/",
                "agnhost",
                "opt/keyway/bin/x",
                "tmp/"
            ],
            "{listing}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn static_binaries_are_told_apart() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(
            is_static(&me),
            "the workspace builds static binaries, tests too"
        );
        let ls = std::fs::read("/bin/ls").unwrap();
        assert!(!is_static(&ls), "Debian's ls is dynamically linked");
        assert!(!is_static(b"not an elf"));
    }
}
