//! A small mutation fuzzer for the short fuzz runs in `make test`, on the stable toolchain: the
//! same checks as the libFuzzer targets (`make fuzz`, nightly, coverage-guided), over inputs made
//! by mutating seed inputs with a seeded generator, so a run is repeatable and a failure names
//! the input that caused it. It finds less than libFuzzer — no coverage feedback — and is not
//! meant to replace it; it keeps each target's checks running on every change.

use std::panic::{AssertUnwindSafe, catch_unwind};

/// xorshift64*: fast, seeded, enough to pick mutations (and the cases of tests that generate
/// their inputs, so that a failure replays).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value: a zero state is avoided).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 for 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// One of `of` (not empty).
    pub fn pick<T: Copy>(&mut self, of: &[T]) -> T {
        of[self.below(of.len())]
    }
}

/// Bytes that decoders treat specially: boundaries of lengths, versions and types.
const INTERESTING: [u8; 10] = [0, 1, 0x7f, 0x80, 0xff, 0x40, 0x60, b'{', b'"', b':'];

/// One mutation of `base` (several, stacked, one time in four), with `others` to splice from.
fn mutate(base: &[u8], others: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut v = base.to_vec();
    let rounds = if rng.below(4) == 0 {
        1 + rng.below(8)
    } else {
        1
    };
    for _ in 0..rounds {
        let len = v.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = rng.next_u64() as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                v.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                v.drain(i..i + n);
            }
            5 => v.truncate(rng.below(len + 1)),
            6 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                let copy = v[i..i + n].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, copy);
            }
            7 if !others.is_empty() => {
                let other = &others[rng.below(others.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ => {
                let n = rng.below(64);
                v = (0..n).map(|_| rng.next_u64() as u8).collect();
            }
        }
    }
    v
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs `check` on `iterations` inputs mutated from `seeds` (and on the seeds themselves); the
/// generator's seed comes from `KEYWAY_FUZZ_SEED` or is fixed, so a run repeats. A panic in
/// `check` fails the run with the input, in hex, and the seed. Returns the number of inputs run.
pub fn run<S: AsRef<[u8]>>(
    name: &str,
    seeds: &[S],
    iterations: usize,
    check: impl Fn(&[u8]),
) -> usize {
    let seed = std::env::var("KEYWAY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b65_7977_6179_u64);
    let mut rng = Rng::new(seed);
    let corpus: Vec<Vec<u8>> = seeds.iter().map(|s| s.as_ref().to_vec()).collect();
    let mut ran = 0;
    let mut try_one = |input: &[u8]| {
        if catch_unwind(AssertUnwindSafe(|| check(input))).is_err() {
            panic!(
                "fuzz {name}: input {ran} failed (KEYWAY_FUZZ_SEED={seed}): {}",
                hex(input)
            );
        }
        ran += 1;
    };
    for s in &corpus {
        try_one(s);
    }
    let empty = [Vec::new()];
    let bases = if corpus.is_empty() {
        &empty[..]
    } else {
        &corpus[..]
    };
    for _ in 0..iterations {
        let base = &bases[rng.below(bases.len())];
        let input = mutate(base, &corpus, &mut rng);
        try_one(&input);
    }
    ran
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_check_is_reported_with_its_input() {
        let r = catch_unwind(|| {
            run("demo", &[b"abc"], 10_000, |d| {
                assert!(!d.windows(2).any(|w| w == b"ca"), "found it")
            })
        });
        let msg = r.expect_err("the mutations reach \"ca\"");
        let text = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("fuzz demo: input"), "{text}");
    }

    #[test]
    fn runs_are_repeatable() {
        let seen = std::sync::Mutex::new(Vec::new());
        run("a", &[b"seed"], 100, |d| {
            seen.lock().unwrap().push(d.to_vec())
        });
        let first = std::mem::take(&mut *seen.lock().unwrap());
        run("a", &[b"seed"], 100, |d| {
            seen.lock().unwrap().push(d.to_vec())
        });
        assert_eq!(first, *seen.lock().unwrap());
        assert_eq!(first.len(), 101);
    }
}
