//! Builds keyway's eBPF programs (`bpf/*.bpf.c`) with clang's BPF target into `OUT_DIR`, where
//! `keyway_sap::io::bpf` embeds them: the binaries carry their programs, nothing is compiled or
//! fetched on a node. Needs Debian's `clang` and `libbpf-dev` (`make deps` installs both).

use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &["endpoint", "node"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed=bpf/flow.h");
    println!("cargo:rerun-if-changed=bpf/encap.h");
    println!("cargo:rerun-if-changed=bpf/policy.h");
    for p in PROGRAMS {
        let src = format!("bpf/{p}.bpf.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{p}.bpf.o"));
        // -g: the maps are declared with BTF, which the loader reads. The multiarch include
        // directory holds <asm/types.h>, which the BPF target does not look for by itself.
        let status = Command::new(&clang)
            .args([
                "-O2",
                "-g",
                "-target",
                "bpf",
                "-Wall",
                "-Werror",
                "-I/usr/include/x86_64-linux-gnu",
                "-c",
                &src,
                "-o",
            ])
            .arg(&obj)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{clang} could not compile {src} ({s})"),
            Err(e) => panic!(
                "cannot run {clang} ({e}): keyway's eBPF programs need clang and libbpf-dev \
                 (`make deps` installs them)"
            ),
        }
    }
}
