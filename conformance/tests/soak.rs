//! The short soak in `make test`: `keyway-lab soak` on two nodes for a minute on the agents'
//! default path (the kernel fast path), then a minute on the user-space path (traffic on every
//! path, pod churn with policies, keys rotating every 10 s, node-1's agent SIGKILLed every 10 to
//! 20 s), asserting what the 30-minute run must show: no datagram lost outside a kill's outage,
//! none lost to a kill at all on the fast path (the kernel carries established flows while the
//! agent is away), each outage under a second, no TCP connection broken, no ADD or DEL error, no leak at any
//! sample, the cluster after the churn as before it, and nothing left after `down`.

use keyway_conformance::lab::DownOnDrop;
use keyway_conformance::lab::soak::{SoakOptions, soak};
use keyway_conformance::topology::Plan;
use keyway_testing::{Scratch, privileged};

#[test]
fn a_two_minute_soak_loses_nothing_outside_kills_and_leaks_nothing() {
    if !privileged("a_two_minute_soak_loses_nothing_outside_kills_and_leaks_nothing") {
        return;
    }
    let scratch = Scratch::new("soak");
    let dir = scratch.join("lab");
    // `soak` runs its lab in `<dir>-soak` and takes it down itself; this is for a panic.
    let _down = DownOnDrop(scratch.join("lab-soak"));
    // A minute on the agents' default path (the kernel carries established flows), then a
    // minute with every agent on the user-space path.
    for datapath in [None, Some("user")] {
        let mut o = SoakOptions::new(1.0, 2);
        o.sample_seconds = 15;
        o.kill_every = (10, 20);
        o.datapath = datapath.map(str::to_string);
        o.plan = Plan {
            prefix: "kwk".into(),
            nodes: 0,
            pod_octet: 241,
            underlay_octet: 87,
        };
        let r = soak(&dir, &o).expect("the soak runs");
        eprintln!("{}", r.text);
        let mode = datapath.unwrap_or("default");
        assert!(
            r.violations.is_empty(),
            "the soak ({mode} path) did not show:\n  {}",
            r.violations.join("\n  ")
        );
        // What the run did, so that a soak that did nothing cannot pass.
        assert!(r.kills >= 2, "{mode}: {} agent kills", r.kills);
        assert!(
            r.pods_churned >= 20,
            "{mode}: {} pods churned",
            r.pods_churned
        );
        assert!(r.epochs >= 4, "{mode}: {} key epochs passed", r.epochs);
        assert!(
            r.datagrams_sent >= 5 * 200 * 45,
            "{mode}: {} datagrams sent",
            r.datagrams_sent
        );
        if datapath.is_none() {
            // The soak's four fixed pods, on machines whose kernel loads keyway's programs (the
            // lab's tests assert that these do).
            assert!(
                r.fastpath_pods >= 4,
                "{} pods on the fast path",
                r.fastpath_pods
            );
            // Every path's flow is established before the first kill, so the kernel carries
            // it while the agent is away: direct, through the kernel SaP (to the server's node,
            // and from the external entity through node-1's SaP to another node), by pod IP and
            // by cluster IP. No datagram may be lost to a kill.
            let lost: Vec<_> = r.lost_in_kills.iter().filter(|(_, n)| *n > 0).collect();
            assert!(
                lost.is_empty(),
                "datagrams of established flows lost to kills on the fast path: {lost:?}"
            );
        }
    }
}
