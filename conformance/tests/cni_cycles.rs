//! 200 ADD/DEL cycles through the real chain leave nothing behind: no overlay device, no nftables
//! table, no routing rule, no IP allocation (keyway's or host-local's), no state file, no agent
//! record, no published attachment.

use std::path::Path;

use keyway_conformance::harness::TestCluster;
use keyway_testing::privileged;

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

#[test]
fn two_hundred_add_del_cycles_leave_nothing_behind() {
    if !privileged("two_hundred_add_del_cycles_leave_nothing_behind") {
        return;
    }
    let c = TestCluster::new("cycles", 1, 105);
    let started = std::time::Instant::now();
    for i in 0..200 {
        let name = format!("p{}", i % 7);
        let pod = c.pod(1, "cyc", &name, &[("app", "cyc")]);
        assert!(pod.netns.sh(&["ip", "link", "show", "kw0"]).contains("kw0"));
        assert!(pod.netns.sh(&["ip", "rule"]).contains("lookup 6080"));
        c.delete(&pod);
        assert!(
            !pod.netns
                .exec(&["ip", "link", "show", "kw0"])
                .status
                .success(),
            "cycle {i}: kw0 left behind"
        );
        assert!(
            !pod.netns
                .exec(&["nft", "list", "table", "inet", "keyway"])
                .status
                .success(),
            "cycle {i}: nftables table left behind"
        );
        assert!(
            !pod.netns.sh(&["ip", "rule"]).contains("6080"),
            "cycle {i}: steering rule left behind"
        );
    }
    eprintln!(
        "200 ADD/DEL cycles in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let agent = c.agent(1);
    let att = agent.attachments();
    assert_eq!(
        att["attachments"].as_array().unwrap().len(),
        0,
        "agent records: {att}"
    );
    assert_eq!(att["addressesInUse"], 0, "overlay allocations: {att}");
    assert_eq!(
        files_under(&agent.state.join("attachments")),
        Vec::<String>::new(),
        "state files"
    );
    assert_eq!(
        files_under(&agent.source.join(".keyway/attachments")),
        Vec::<String>::new(),
        "published attachments"
    );
    // host-local keeps one file per allocated address (plus its lock and last-reserved index).
    let ipam: Vec<String> = files_under(&c.scratch.join("ipam-node-1"))
        .into_iter()
        .filter(|f| !f.ends_with("/lock") && !f.contains("last_reserved_ip"))
        .collect();
    assert_eq!(ipam, Vec::<String>::new(), "host-local allocations");
    assert_eq!(agent.metric("keyway_pods"), 0.0);
    // And the node still works after it all.
    let a = c.pod(1, "cyc", "x", &[("app", "x")]);
    let b = c.pod(1, "cyc", "y", &[("app", "y")]);
    assert!(a.ping(&b.overlay_ip, 2));
    assert!(a.ping(&b.infra_ip, 2), "and by pod IP, through the overlay");
}
