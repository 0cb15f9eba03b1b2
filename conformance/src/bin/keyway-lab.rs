//! `keyway-lab`: a simulated multi-node cluster on one machine (see `keyway_conformance::lab`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use keyway_conformance::lab::{self, Lab, Matrix, Via};

#[derive(Debug, Parser)]
#[command(
    name = "keyway-lab",
    version,
    about = "A simulated cluster on one machine: nodes, containerd through CRI, keyway"
)]
struct Args {
    /// Where the lab keeps its state (one lab per directory).
    #[arg(long, env = "KEYWAY_LAB_DIR", default_value = lab::DEFAULT_DIR, global = true)]
    lab_dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ViaArg {
    /// By overlay address.
    Overlay,
    /// By pod IP, as Kubernetes hands it out (steered into the overlay).
    PodIp,
    /// By pod IP from the pod's eth0, around keyway (a bypass attempt: blocked).
    Underlay,
    /// By the cluster IP of a Service that selects the destination alone and has the port.
    Service,
    /// By that Service's name, resolved through the cluster DNS in the source pod.
    Dns,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
#[allow(clippy::upper_case_acronyms)]
enum Protocol {
    TCP,
    UDP,
    SCTP,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Brings up nodes and creates the documents' objects (Namespaces, Pods, NetworkPolicies, keyway resources).
    Up {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// At least this many nodes (more if pods name higher nodes).
        #[arg(long, default_value_t = 2)]
        nodes: usize,
    },
    /// Creates or changes objects while the lab runs, as kubectl apply would.
    Apply {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
    },
    /// Deletes objects while the lab runs.
    Delete {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
    },
    /// Probes every ordered pair of pods (and external entities) and prints the reachability matrix.
    Probe {
        #[arg(long)]
        port: u16,
        #[arg(long, value_enum, ignore_case = true)]
        protocol: Protocol,
        #[arg(long, value_enum, default_value = "overlay")]
        via: ViaArg,
        /// How long a probe waits before it counts as blocked.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// A truth table (the same format) the matrix must equal; exits 1 with the differing
        /// pairs when it does not.
        #[arg(long)]
        expect: Option<PathBuf>,
    },
    /// For every pair the overlay connects, shows whether it went direct or through which SaPs.
    Paths {
        #[arg(long, default_value_t = 80)]
        port: u16,
        #[arg(long, value_enum, ignore_case = true, default_value = "TCP")]
        protocol: Protocol,
    },
    /// Lists the lab's nodes, pods and external entities.
    Status,
    /// Latency and throughput: native (pod IP and ClusterIP), overlay direct, via a SaP, ClusterIP via a SaP, external via a gateway, via a SaP with packet authentication, Istio ambient alone and over keyway (with a ztunnel); the direct and via-SaP fast paths again in rounds alternating with native; CNI ADD.
    Bench {
        /// Seconds of each throughput run.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// ADD and DEL latency over N pods, and the agent's memory with them attached.
    BenchCni {
        #[arg(long, default_value_t = 100)]
        pods: usize,
    },
    /// Time from a policy file being written to its enforcement on the data path, with N pods.
    BenchPolicy {
        #[arg(long, default_value_t = 100)]
        pods: usize,
        #[arg(long, default_value_t = 20)]
        trials: usize,
    },
    /// Everything at once on a lab of its own: traffic on every path (UDP sequence numbers, TCP
    /// round trips), pod churn with policies, key rotation, the SIGKILL of node-1's agent; per
    /// sample and in total: losses, errors, agents' memory and fds, devices, tables, leases,
    /// files; and what `down` left. Exits 1 when an invariant did not hold.
    Soak {
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// UDP datagrams a second, per path.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// The key rotation period (ClusterConfig `keyRotationSeconds`).
        #[arg(long, default_value_t = 10)]
        rotation_seconds: u64,
        /// Seconds between samples.
        #[arg(long, default_value_t = 60)]
        sample_seconds: u64,
        /// The agents' data path (`auto`, `kernel`, `user`); by default theirs, the kernel
        /// fast path where the kernel loads it.
        #[arg(long)]
        datapath: Option<String>,
    },
    /// Stops everything the lab started and removes every trace of it.
    Down,
    /// Writes keyway's cluster image (the one the manifests run) as a `docker save` tarball, for
    /// `docker load`, `podman load` or `ctr -n k8s.io image import`.
    Image {
        /// The tarball to write.
        #[arg(long, default_value = "target/keyway-image.tar")]
        out: PathBuf,
        /// The image's tag.
        #[arg(long, default_value = keyway_conformance::images::KEYWAY_IMAGE)]
        tag: String,
        /// Where the statically linked keyway-agent, keyway-install and keyway-cni are.
        #[arg(long, default_value = "target/x86_64-unknown-linux-gnu/release")]
        bin_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let r = match args.command {
        Cmd::Up { files, nodes } => {
            Lab::up(&args.lab_dir, &files, nodes).map(|l| print!("{}", l.status()))
        }
        Cmd::Apply { files } => Lab::load(&args.lab_dir).and_then(|mut l| l.apply(&files)),
        Cmd::Delete { files } => Lab::load(&args.lab_dir).and_then(|mut l| l.delete(&files)),
        Cmd::Probe {
            port,
            protocol,
            via,
            timeout_ms,
            expect,
        } => Lab::load(&args.lab_dir).and_then(|l| {
            let via = match via {
                ViaArg::Overlay => Via::Overlay,
                ViaArg::PodIp => Via::PodIp,
                ViaArg::Underlay => Via::Underlay,
                ViaArg::Service => Via::Service,
                ViaArg::Dns => Via::Dns,
            };
            let want = expect
                .map(|f| {
                    std::fs::read_to_string(&f)
                        .with_context(|| format!("cannot read {}", f.display()))
                        .and_then(|t| Matrix::parse(&t))
                })
                .transpose()?;
            let proto = format!("{protocol:?}");
            let m = l.probe(port, &proto, via, Duration::from_millis(timeout_ms))?;
            print!("{m}");
            if let Some(want) = want {
                let diff = m.diff(&want);
                anyhow::ensure!(
                    diff.is_empty(),
                    "the matrix is not the expected one: {}",
                    diff.join(", ")
                );
                println!("(as expected)");
            }
            Ok(())
        }),
        Cmd::Paths { port, protocol } => Lab::load(&args.lab_dir).and_then(|l| {
            print!("{}", l.paths(port, &format!("{protocol:?}"))?);
            Ok(())
        }),
        Cmd::Status => Lab::load(&args.lab_dir).map(|l| print!("{}", l.status())),
        Cmd::Bench { seconds } => lab::bench::bench(&args.lab_dir, seconds).map(|r| print!("{r}")),
        Cmd::BenchCni { pods } => lab::bench::bench_cni(pods).map(|r| print!("{r}")),
        Cmd::BenchPolicy { pods, trials } => {
            lab::bench::bench_policy(pods, trials).map(|r| print!("{r}"))
        }
        Cmd::Soak {
            minutes,
            nodes,
            rate,
            rotation_seconds,
            sample_seconds,
            datapath,
        } => {
            let mut o = lab::soak::SoakOptions::new(minutes, nodes);
            o.datapath = datapath;
            o.rate = rate;
            o.rotation_seconds = rotation_seconds;
            o.sample_seconds = sample_seconds;
            lab::soak::soak(&args.lab_dir, &o).and_then(|r| {
                print!("{}", r.text);
                anyhow::ensure!(
                    r.violations.is_empty(),
                    "the soak did not show what it must:\n  {}",
                    r.violations.join("\n  ")
                );
                println!("all invariants held");
                Ok(())
            })
        }
        Cmd::Down => Lab::down(&args.lab_dir).map(|r| println!("{r}")),
        Cmd::Image { out, tag, bin_dir } => {
            keyway_conformance::images::keyway_image(&bin_dir, &tag).and_then(|tar| {
                std::fs::write(&out, &tar)
                    .with_context(|| format!("cannot write {}", out.display()))?;
                println!("{tag}: {} ({} MiB)", out.display(), tar.len() >> 20);
                Ok(())
            })
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyway-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}
