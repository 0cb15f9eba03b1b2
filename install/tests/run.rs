//! `keyway-install run` as the DaemonSet runs it, on real directories: it waits for the primary,
//! puts keyway in, puts it back when the primary rewrites its file (through inotify, not the
//! resync), and on SIGTERM leaves or takes out keyway as told.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const CALICO: &str = include_str!("golden/calico/before/10-calico.conflist");

struct Installer {
    root: PathBuf,
    child: Option<Child>,
}

impl Installer {
    fn start(test: &str, on_exit: &str, with_primary: bool) -> Installer {
        let root = std::env::temp_dir().join(format!("keyway-run-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("net.d")).unwrap();
        std::fs::write(root.join("keyway-cni"), b"#!/bin/sh\nexit 0\n").unwrap();
        if with_primary {
            std::fs::write(root.join("net.d/10-calico.conflist"), CALICO).unwrap();
        }
        let child = Command::new(env!("CARGO_BIN_EXE_keyway-install"))
            .arg("run")
            .arg("--conf-dir")
            .arg(root.join("net.d"))
            .arg("--bin-dir")
            .arg(format!(
                "{},{}",
                root.join("bin").display(),
                root.join("bin2").display()
            ))
            .arg("--plugin")
            .arg(root.join("keyway-cni"))
            .arg("--state-dir")
            .arg(root.join("state"))
            .arg("--ready-file")
            .arg(root.join("ready"))
            .args(["--on-exit", on_exit, "--resync-seconds", "3600"])
            .env("RUST_LOG", "debug")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Installer {
            root,
            child: Some(child),
        }
    }

    fn conflist(&self) -> String {
        std::fs::read_to_string(self.root.join("net.d/10-calico.conflist")).unwrap_or_default()
    }

    fn wait_for(&self, what: &str, f: impl Fn(&Installer) -> bool) -> Duration {
        keyway_testing::eventually(what, Duration::from_secs(10), || f(self))
    }

    /// SIGTERM, as the kubelet stops a container; the exit status and the log.
    fn stop(&mut self) -> (std::process::ExitStatus, String) {
        let child = self.child.take().unwrap();
        term(child.id());
        let out = child.wait_with_output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn term(pid: u32) {
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

fn has_keyway(s: &str) -> bool {
    s.contains("\"type\": \"keyway\"")
}

impl Drop for Installer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn exists(p: &Path) -> bool {
    p.exists()
}

#[test]
fn waits_installs_repairs_and_uninstalls_on_exit() {
    let mut i = Installer::start("uninstall", "uninstall", false);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !exists(&i.root.join("ready")),
        "not ready without a primary"
    );
    // The primary CNI arrives.
    std::fs::write(i.root.join("net.d/10-calico.conflist"), CALICO).unwrap();
    i.wait_for("keyway in the chain", |i| {
        exists(&i.root.join("ready")) && has_keyway(&i.conflist())
    });
    for b in ["bin", "bin2"] {
        assert!(
            exists(&i.root.join(b).join("keyway")),
            "plugin copied to {b}"
        );
    }
    // Calico's installer rewrites its file: keyway is back, by notification (resync is an hour).
    std::fs::write(i.root.join("net.d/10-calico.conflist"), CALICO).unwrap();
    let took = i.wait_for("the repair", |i| has_keyway(&i.conflist()));
    eprintln!("drift repaired in {took:?}");
    let (status, log) = i.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("decision=Uninstall"), "{log}");
    assert_eq!(i.conflist(), CALICO, "calico's file as calico wrote it");
    assert!(!exists(&i.root.join("bin/keyway")) && !exists(&i.root.join("bin2/keyway")));
    assert!(!exists(&i.root.join("ready")));
}

#[test]
fn a_restart_leaves_keyway_in_the_chain() {
    let mut i = Installer::start("keep", "keep", true);
    i.wait_for("keyway in the chain", |i| exists(&i.root.join("ready")));
    let (status, log) = i.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("decision=Keep"), "{log}");
    assert!(
        has_keyway(&i.conflist()),
        "new pods keep failing closed until the next agent is up"
    );
    assert!(exists(&i.root.join("bin/keyway")));
}

#[test]
fn auto_without_an_api_server_keeps_keyway() {
    let mut i = Installer::start("auto", "auto", true);
    i.wait_for("keyway in the chain", |i| exists(&i.root.join("ready")));
    let (status, log) = i.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("decision=Keep") && log.contains("keeping keyway"),
        "{log}"
    );
    assert!(has_keyway(&i.conflist()));
}

#[test]
fn bad_configuration_exits_64() {
    for args in [
        &["--entry", "{\"type\":\"bridge\"}"][..],
        &["--entry", "not json"],
        &["--daemonset", "no-slash"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_keyway-install"))
            .args(args)
            .arg("install")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
}
