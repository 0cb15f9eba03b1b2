//! Real network namespaces for tests, with veth pairs between them. Tests shell out to `ip` and
//! `nft` here (and only in tests) to set up and to observe.
//!
//! Every namespace is named after its test and removed on drop, whether the test passed or not.
//! A test that cannot get the privileges it needs skips with a message, except under `CI`, where
//! it fails: a skipped test must never pass for a run that was meant to exercise it.

use std::path::PathBuf;
use std::process::{Command, Output};

use keyway_sap::sys::Netns;

/// Whether namespaced tests can run here. Under `CI` a missing privilege is a failure.
pub fn privileged(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if root && ip {
        return true;
    }
    let why = if !root {
        "not root"
    } else {
        "iproute2 (`ip`) is not installed"
    };
    if std::env::var_os("CI").is_some() {
        panic!("{test}: cannot run namespaced test under CI: {why}");
    }
    eprintln!("skipping {test}: {why} (set CI=1 to make this a failure)");
    false
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &[&str]) -> Output {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace for one test, deleted on drop.
#[derive(Debug)]
pub struct TestNetns {
    pub name: String,
    netns: Netns,
}

impl TestNetns {
    /// Creates `kwt-<test>-<role>` (a stale one from a crashed run is replaced).
    pub fn new(test: &str, role: &str) -> TestNetns {
        let name = format!("kwt-{test}-{role}");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        run(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", "lo", "up",
        ]);
        let netns = Netns::open(format!("/var/run/netns/{name}")).expect("open test netns");
        TestNetns { name, netns }
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// Runs a command inside the namespace (`ip netns exec`), returning its output whatever its
    /// exit status.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?} in {}: {e}", self.name))
    }

    /// Like [`TestNetns::exec`] but panics on failure and returns stdout.
    pub fn sh(&self, cmd: &[&str]) -> String {
        let out = self.exec(cmd);
        assert!(
            out.status.success(),
            "{cmd:?} in {} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Joins two namespaces with a veth pair and addresses each end (`"10.9.0.1/24"`).
pub fn veth(a: &TestNetns, a_if: &str, a_addr: &str, b: &TestNetns, b_if: &str, b_addr: &str) {
    run(&[
        "ip", "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]);
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.sh(&["ip", "addr", "add", addr, "dev", ifname]);
        ns.sh(&["ip", "link", "set", ifname, "up"]);
    }
}
