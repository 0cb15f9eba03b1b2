//! The NetworkPolicy cases ported from the upstream Kubernetes e2e suite (conformance/netpol/):
//! every case against the policy compiler alone, then every case in a two-node lab with pods made
//! through CRI, where the probes cross the real plugin, agents and data path — once with the
//! kernel fast path on (the agents' default), once with every agent on the user-space path. Underlay probes
//! (the pods' infrastructure addresses) must find every pair blocked while keyway is on.
//!
//! `KEYWAY_NETPOL_CASES=17,20` runs only the cases whose file names start with those numbers.

use std::time::Instant;

use keyway_conformance::lab::{DownOnDrop, Lab, Via};
use keyway_conformance::netpol::{self, Case, LabProbing};
use keyway_conformance::topology::Plan;
use keyway_testing::Scratch;
use keyway_testing::privileged;

fn cases() -> Vec<Case> {
    let all = netpol::load_cases(&netpol::dir().join("cases")).expect("cases load");
    match std::env::var("KEYWAY_NETPOL_CASES") {
        Ok(only) if !only.trim().is_empty() => {
            let wanted: Vec<String> = only.split(',').map(|s| s.trim().to_string()).collect();
            all.into_iter()
                .filter(|c| {
                    let f = c.file.file_name().unwrap().to_string_lossy().into_owned();
                    wanted.iter().any(|w| f.starts_with(w.as_str()))
                })
                .collect()
        }
        _ => all,
    }
}

#[test]
fn the_ported_cases_cover_what_upstream_tests() {
    let all = netpol::load_cases(&netpol::dir().join("cases")).expect("cases load");
    assert!(
        all.len() >= 20,
        "at least 20 upstream cases, have {}",
        all.len()
    );
    let text = |c: &Case| {
        c.steps
            .iter()
            .map(|s| s.apply.clone().unwrap_or_default())
            .collect::<String>()
    };
    let probes = |proto: &str| {
        all.iter()
            .flat_map(|c| c.steps.iter().flat_map(|s| s.probes.iter()))
            .filter(|p| p.protocol == proto)
            .count()
    };
    assert!(
        probes("UDP") >= 3 && probes("SCTP") >= 3,
        "UDP and SCTP contexts"
    );
    assert!(
        all.iter().any(|c| text(c).contains("port: serve-")),
        "named ports"
    );
    assert!(
        all.iter()
            .any(|c| c.steps.iter().any(|s| !s.delete.is_empty())),
        "deletions"
    );
    assert!(all.iter().any(|c| c.steps.len() > 1), "updates over time");
    assert!(
        all.iter().any(|c| text(c).contains("except:")),
        "ipBlock except"
    );
    assert!(all.iter().any(|c| text(c).contains("endPort")), "endPort");
    assert!(
        all.iter()
            .any(|c| text(c).contains("kind: Namespace") && c.steps.len() > 1),
        "a relabelled namespace"
    );
}

#[test]
fn the_compiled_policy_gives_every_truth_table() {
    let base = std::fs::read_to_string(netpol::base_file()).unwrap();
    let mut failures = Vec::new();
    let mut probes = 0;
    for c in cases() {
        let out = netpol::simulate(&c, &base).unwrap_or_else(|e| panic!("{}: {e:#}", c.name));
        probes += out.probes;
        failures.extend(out.failures);
    }
    assert!(
        failures.is_empty(),
        "{} of {probes} probes differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_upstream_cases_pass_in_the_lab() {
    if !privileged("the_upstream_cases_pass_in_the_lab") {
        return;
    }
    let scratch = Scratch::new("netpol");
    let dir = scratch.join("lab");
    let _guard = DownOnDrop(dir.clone());
    let base = netpol::base_file();
    let started = Instant::now();
    let mut lab = Lab::up_with(
        &dir,
        std::slice::from_ref(&base),
        2,
        Plan {
            prefix: "kwn".into(),
            nodes: 0,
            pod_octet: 248,
            underlay_octet: 80,
        },
        true,
    )
    .expect("lab up");
    eprintln!("lab up in {:.1} s", started.elapsed().as_secs_f64());
    let mut names: Vec<String> = lab.workloads().map(|p| p.key()).collect();
    names.sort();
    assert_eq!(names.len(), 9, "x, y, z × a, b, c");
    let how = LabProbing::default();

    // No policy: everything reaches everything over the overlay, by overlay address and by pod
    // IP, on every port and protocol...
    for proto in ["TCP", "UDP", "SCTP"] {
        for port in [80, 81] {
            let want = netpol::all_connected(&names);
            for via in [Via::Overlay, Via::PodIp] {
                let (got, _) = netpol::probe_until(&lab, port, proto, via, &want, how).unwrap();
                assert!(
                    got.diff(&want).is_empty(),
                    "{proto} {port} via {via:?}:\n{got}"
                );
            }
        }
    }
    // ... and nothing reaches anything around keyway (from eth0, by pod IP).
    let closed = netpol::nothing_connected(&names);
    for proto in ["TCP", "UDP", "SCTP"] {
        let got = lab
            .probe(80, proto, Via::Underlay, how.timeout)
            .expect("probe");
        assert_eq!(got, closed, "{proto} 80 via the underlay:\n{got}");
    }

    let mut failures = Vec::new();
    let (mut probes, mut retried) = (0, 0);
    let all = cases();
    // Every case with the kernel fast path carrying established flows (the agents' default),
    // then every case again with every agent restarted on the user-space path alone.
    for datapath in ["auto", "user"] {
        if datapath == "user" {
            lab.set_datapath(datapath).expect("agents restarted");
        }
        for c in &all {
            let t = Instant::now();
            let out = netpol::run_in_lab(&mut lab, c, &base, scratch.path(), how)
                .unwrap_or_else(|e| panic!("{datapath}: {}: {e:#}", c.name));
            eprintln!(
                "{datapath}: {}: {} ({} probes, {:.1} s)",
                c.file.file_name().unwrap().to_string_lossy(),
                if out.failures.is_empty() {
                    "ok"
                } else {
                    "FAILED"
                },
                out.probes,
                t.elapsed().as_secs_f64()
            );
            probes += out.probes;
            retried += out.retried;
            failures.extend(out.failures.into_iter().map(|f| format!("{datapath}: {f}")));
        }
    }
    eprintln!(
        "{} cases in both modes, {probes} probes, {} failed, {retried} matched only on a retry; {:.0} s in all",
        all.len(),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    // The underlay stays closed after all of it.
    let got = lab
        .probe(80, "TCP", Via::Underlay, how.timeout)
        .expect("probe");
    assert_eq!(got, closed, "TCP 80 via the underlay at the end:\n{got}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
