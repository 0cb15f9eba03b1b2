//! The short soak in `make test`: two minutes of `keyway-lab soak` on two nodes (traffic on every
//! path, pod churn with policies, keys rotating every 10 s, node-1's agent SIGKILLed every 15 to
//! 30 s), asserting what the 30-minute run must show: no datagram lost outside a kill's outage,
//! each outage under a second, no TCP connection broken, no ADD or DEL error, no leak at any
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
    let mut o = SoakOptions::new(2.0, 2);
    o.sample_seconds = 20;
    o.kill_every = (15, 30);
    o.plan = Plan {
        prefix: "kwk".into(),
        nodes: 0,
        pod_octet: 241,
        underlay_octet: 87,
    };
    let r = soak(&dir, &o).expect("the soak runs");
    eprintln!("{}", r.text);
    assert!(
        r.violations.is_empty(),
        "the soak did not show:\n  {}",
        r.violations.join("\n  ")
    );
    // What the run did, so that a soak that did nothing cannot pass.
    assert!(r.kills >= 2, "{} agent kills", r.kills);
    assert!(r.pods_churned >= 40, "{} pods churned", r.pods_churned);
    assert!(r.epochs >= 8, "{} key epochs passed", r.epochs);
    assert!(
        r.datagrams_sent >= 5 * 200 * 90,
        "{} datagrams sent",
        r.datagrams_sent
    );
}
