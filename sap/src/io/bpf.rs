//! keyway's eBPF programs (`sap/bpf/`, compiled by `build.rs` with clang's BPF target and embedded
//! here) and their loader, through aya: pure Rust, no libbpf on the node.
//!
//! What exists so far is the first part of the kernel fast path: [`IngressCheck`], the checks an
//! endpoint makes on an arriving GUE datagram up to its destination (malformed, bad key, wrong
//! destination), exactly as [`keyway_core::engine::endpoint_ingress`] makes them and in its
//! order, everything else left to the user-space path. It is loaded and run through
//! `BPF_PROG_TEST_RUN` against the engine (`sap/tests/bpf.rs`); nothing attaches it to a pod yet.

use std::net::Ipv4Addr;

use aya::maps::{Array, MapError, PerCpuArray};
use aya::programs::{ProgramError, SchedClassifier};
use aya::{Ebpf, EbpfError, EbpfLoader, TestRun, TestRunOptions};
use keyway_core::engine::DropReason;
use keyway_core::key::Key;

/// The ingress program's object, as `build.rs` compiled it.
static INGRESS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ingress.bpf.o"));

const INGRESS_PROGRAM: &str = "kw_ingress";
const INGRESS_CONFIG: &str = "kw_ingress_config";
const INGRESS_VERDICTS: &str = "kw_ingress_verdicts";

/// tc's verdict for a packet that goes on (`TC_ACT_OK`).
pub const TC_ACT_OK: u32 = 0;
/// tc's verdict for a packet dropped (`TC_ACT_SHOT`).
pub const TC_ACT_SHOT: u32 = 2;

/// What the ingress program decided about a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// On to the user-space path, which decides the rest.
    Pass,
    /// Dropped in the kernel, for the engine's reason.
    Drop(DropReason),
}

/// The program's verdict counters, by index (`enum verdict` in `ingress.bpf.c`).
pub const INGRESS_VERDICTS_BY_INDEX: [Verdict; 4] = [
    Verdict::Pass,
    Verdict::Drop(DropReason::Malformed),
    Verdict::Drop(DropReason::BadKey),
    Verdict::Drop(DropReason::WrongDestination),
];

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("cannot load keyway's eBPF object: {0}")]
    Object(#[source] Box<EbpfError>),
    #[error("the object has no {0}")]
    Missing(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("the pod accepts {0} keys; the program holds at most 3")]
    TooManyKeys(usize),
    #[error("one run of the program counted several verdicts: {0:?}")]
    Counted(Vec<Verdict>),
}

/// What the ingress program knows of its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressConfig {
    pub overlay: Option<Ipv4Addr>,
    pub infra: Option<Ipv4Addr>,
    pub gue_port: u16,
    /// The keys the pod accepts now ([`keyway_core::key::KeyRing::accepted_at`]).
    pub keys: Vec<Key>,
}

impl IngressConfig {
    /// `struct ingress_config` as the program reads it: addresses and port in network order,
    /// then the number of keys and the keys, in host order (as GUE's group identifier is read).
    fn words(&self) -> Result<[u32; 7], BpfError> {
        if self.keys.len() > 3 {
            return Err(BpfError::TooManyKeys(self.keys.len()));
        }
        let net = |ip: Option<Ipv4Addr>| ip.map_or(0, |a| u32::from_ne_bytes(a.octets()));
        let mut w = [
            net(self.overlay),
            net(self.infra),
            u32::from(u16::from_ne_bytes(self.gue_port.to_be_bytes())),
            self.keys.len() as u32,
            0,
            0,
            0,
        ];
        for (slot, k) in w[4..].iter_mut().zip(&self.keys) {
            *slot = k.0;
        }
        Ok(w)
    }
}

/// The ingress program, loaded into the kernel (not attached).
#[derive(Debug)]
pub struct IngressCheck {
    ebpf: Ebpf,
}

impl IngressCheck {
    /// Loads the program and its maps: needs CAP_BPF (or root) and a kernel with BPF.
    pub fn load() -> Result<IngressCheck, BpfError> {
        // No kernel BTF: the programs use no CO-RE relocations, and parsing the kernel's BTF
        // (which `Ebpf::load` does, twice) costs tens of milliseconds and megabytes.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .load(INGRESS_OBJECT)
            .map_err(|e| BpfError::Object(Box::new(e)))?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(INGRESS_PROGRAM)
            .ok_or(BpfError::Missing(INGRESS_PROGRAM))?
            .try_into()
            .map_err(|e| program_error(INGRESS_PROGRAM, e))?;
        program
            .load()
            .map_err(|e| program_error(INGRESS_PROGRAM, e))?;
        Ok(IngressCheck { ebpf })
    }

    /// Tells the program about its pod (replacing what it knew).
    pub fn configure(&mut self, c: &IngressConfig) -> Result<(), BpfError> {
        let words = c.words()?;
        let map = self
            .ebpf
            .map_mut(INGRESS_CONFIG)
            .ok_or(BpfError::Missing(INGRESS_CONFIG))?;
        let mut config: Array<_, [u32; 7]> =
            Array::try_from(map).map_err(|e| map_error(INGRESS_CONFIG, e))?;
        config
            .set(0, words, 0)
            .map_err(|e| map_error(INGRESS_CONFIG, e))
    }

    /// The verdicts so far, summed over CPUs, in [`INGRESS_VERDICTS_BY_INDEX`] order.
    pub fn verdicts(&self) -> Result<[u64; 4], BpfError> {
        let map = self
            .ebpf
            .map(INGRESS_VERDICTS)
            .ok_or(BpfError::Missing(INGRESS_VERDICTS))?;
        let counters: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(|e| map_error(INGRESS_VERDICTS, e))?;
        let mut out = [0u64; 4];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = counters
                .get(&(i as u32), 0)
                .map_err(|e| map_error(INGRESS_VERDICTS, e))?
                .iter()
                .sum();
        }
        Ok(out)
    }

    /// Runs the program once on `frame` (Ethernet, as it arrives on the pod's eth0) through
    /// `BPF_PROG_TEST_RUN`, and says what it decided: the tc action and the verdict it counted.
    pub fn run(&mut self, frame: &[u8]) -> Result<(u32, Verdict), BpfError> {
        let before = self.verdicts()?;
        let program: &SchedClassifier = self
            .ebpf
            .program(INGRESS_PROGRAM)
            .ok_or(BpfError::Missing(INGRESS_PROGRAM))?
            .try_into()
            .map_err(|e| program_error(INGRESS_PROGRAM, e))?;
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..TestRunOptions::default()
            })
            .map_err(|e| program_error(INGRESS_PROGRAM, e))?;
        let after = self.verdicts()?;
        let counted: Vec<Verdict> = INGRESS_VERDICTS_BY_INDEX
            .iter()
            .zip(before.iter().zip(after))
            .filter(|(_, (b, a))| a > *b)
            .map(|(v, _)| *v)
            .collect();
        // A frame that is not GUE to the pod is left alone without a count: it passed.
        let verdict = match counted.as_slice() {
            [] | [Verdict::Pass] => Verdict::Pass,
            [v] => *v,
            more => return Err(BpfError::Counted(more.to_vec())),
        };
        Ok((result.return_value, verdict))
    }
}

/// Whether this kernel (and these privileges) load keyway's programs: what a node reports before
/// it relies on them.
pub fn probe() -> Result<(), BpfError> {
    IngressCheck::load().map(drop)
}

fn program_error(name: &'static str, e: ProgramError) -> BpfError {
    BpfError::Program {
        name,
        source: Box::new(e),
    }
}

fn map_error(name: &'static str, e: MapError) -> BpfError {
    BpfError::Map {
        name,
        source: Box::new(e),
    }
}
