//! Test support for the whole workspace, in one place: real network namespaces named after their
//! test ([`netns`]), scratch directories ([`Scratch`]), waiting for a condition ([`eventually`]),
//! an in-memory Kubernetes API server ([`fake_api`]) for kube's client, in process or over
//! HTTP, and a small mutation fuzzer for the short fuzz runs ([`fuzz`]). Everything here cleans up on drop, whether the test passed or not.
#![forbid(unsafe_code)]

pub mod fake_api;
pub mod fuzz;
pub mod netns;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use fake_api::FakeApi;
pub use netns::{TestNetns, privileged, run, veth};

/// A scratch directory named after its test, emptied when made and removed on drop.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("keyway-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `f` every 20 ms until it holds; panics naming `what` when it has not within `within`.
/// Returns how long it took.
pub fn eventually(what: &str, within: Duration, f: impl FnMut() -> bool) -> Duration {
    eventually_or(what, within, f, String::new)
}

/// [`eventually`], adding `context()` (a log, say) to the panic message.
pub fn eventually_or(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> bool,
    context: impl FnOnce() -> String,
) -> Duration {
    let started = Instant::now();
    while !f() {
        if started.elapsed() >= within {
            panic!("{what}: not within {within:?}\n{}", context());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// `read()` once it stops changing: read again every `every` until two reads agree, at most
/// `tries` times (then the last read). For counters that an agent updates in steps, such as the
/// kernel fast path's counts, added at the agent's next sync.
pub fn settled<T: PartialEq>(every: Duration, tries: usize, mut read: impl FnMut() -> T) -> T {
    let mut last = read();
    for _ in 0..tries {
        std::thread::sleep(every);
        let now = read();
        if now == last {
            break;
        }
        last = now;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_reads_until_two_reads_agree_and_no_more_than_it_may() {
        let mut n = 0;
        let steps = [1, 2, 2, 3];
        let got = settled(Duration::ZERO, 5, || {
            n += 1;
            steps[n - 1]
        });
        assert_eq!((got, n), (2, 3));
        let mut m = 0;
        let got = settled(Duration::ZERO, 2, || {
            m += 1;
            m
        });
        assert_eq!((got, m), (3, 3), "the last read once the tries are spent");
    }

    #[test]
    fn eventually_returns_once_the_condition_holds_and_panics_when_it_never_does() {
        let mut n = 0;
        eventually("three polls", Duration::from_secs(5), || {
            n += 1;
            n == 3
        });
        assert_eq!(n, 3);
        let r = std::panic::catch_unwind(|| {
            eventually_or(
                "never",
                Duration::from_millis(50),
                || false,
                || "ctx".into(),
            )
        });
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("never") && msg.contains("ctx"), "{msg}");
    }

    #[test]
    fn scratch_directories_go_on_drop() {
        let s = Scratch::new("scratch-self-test");
        std::fs::write(s.join("f"), b"x").unwrap();
        let p = s.path().to_path_buf();
        drop(s);
        assert!(!p.exists());
    }
}
