//! Processes the lab starts and must stop: by pid, SIGTERM then SIGKILL.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub fn alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let pid = Pid::from_raw(pid as i32);
    if kill(pid, None).is_err() {
        return false;
    }
    // A zombie is not alive; reap it if it is ours.
    let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
        .unwrap_or(false)
}

/// SIGTERM, then SIGKILL after `grace`; returns when the process is gone. Pid 0 is no process
/// (a stopped one's record), never the caller's process group.
pub fn terminate(pid: u32, grace: Duration) {
    if pid == 0 {
        return;
    }
    let p = Pid::from_raw(pid as i32);
    let _ = kill(p, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while alive(pid) {
        if Instant::now() > deadline {
            let _ = kill(p, Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(50));
            if !alive(pid) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILL, as the OOM killer or a node's crash would; returns when the process is gone from
/// `/proc` (reaped), not merely a zombie: a thread group's leader turns zombie while its other
/// threads may still be exiting and holding its sockets.
pub fn sigkill(pid: u32) {
    if pid == 0 {
        return;
    }
    let p = Pid::from_raw(pid as i32);
    let _ = kill(p, Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        let _ = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Processes whose command line mentions `needle` (the lab's directory), for a thorough `down`.
pub fn find(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && String::from_utf8_lossy(&cmd).contains(needle)
        {
            out.push(pid);
        }
    }
    out
}

/// Runs `cmd` with `input` on its standard input; its output, or its error output as the error.
pub fn run_stdin(cmd: &[&str], input: &str) -> anyhow::Result<String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", cmd[0]))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{} failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
