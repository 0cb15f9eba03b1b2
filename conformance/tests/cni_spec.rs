//! keyway-cni driven exactly as the CNI spec says, behind Debian's `bridge` + `host-local`, with a
//! real `keyway-agent`, in namespaces of each test's own: ADD, CHECK, DEL, DEL again, VERSION for
//! every version the chain supports; STATUS and GC at 1.1.0 on the plugin alone (Debian's plugins
//! stop at 1.0.0); and every way of failing, with its code.

use std::path::PathBuf;

use keyway_conformance::cni_exec::{ConfList, Exec, Runtime};
use keyway_conformance::harness::{AgentProc, DEBIAN_CNI_DIR, bin, plugin_dir, pod_yaml};
use keyway_testing::Scratch;
use keyway_testing::{TestNetns, privileged};
use serde_json::{Value, json};

struct Setup {
    scratch: Scratch,
    node: TestNetns,
    agent: AgentProc,
    list: ConfList,
}

fn conflist(scratch: &Scratch, socket: &std::path::Path, version: &str) -> ConfList {
    let text = json!({
        "cniVersion": version,
        "name": "kwtest",
        "plugins": [
            {
                "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.99.0.0/24"}]],
                         "routes": [{"dst": "0.0.0.0/0"}], "dataDir": scratch.join("ipam")}
            },
            {"type": "keyway", "agentSocket": socket, "log": {"level": "info"}}
        ]
    });
    ConfList::parse(&text.to_string())
}

fn setup(test: &str, version: &str) -> Setup {
    let scratch = Scratch::new(test);
    let node = TestNetns::new(test, "node");
    let agent = AgentProc::start(
        &node.name,
        "node-1",
        scratch.path(),
        &["--node-ip", "127.0.0.1"],
    );
    let list = conflist(&scratch, &agent.socket, version);
    Setup {
        scratch,
        node,
        agent,
        list,
    }
}

impl Setup {
    fn runtime(&self, pod: &TestNetns, container: &str, name: &str) -> Runtime {
        Runtime {
            path: vec![
                plugin_dir(self.scratch.path()),
                PathBuf::from(DEBIAN_CNI_DIR),
            ],
            container_id: container.to_string(),
            netns: pod.path().display().to_string(),
            ifname: "eth0".into(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), "spec".into()),
                ("K8S_POD_NAME".into(), name.into()),
            ],
            node_netns: Some(self.node.name.clone()),
        }
    }

    fn pod(&self, test: &str, name: &str) -> TestNetns {
        self.agent.apply(
            &format!("{name}.yaml"),
            &pod_yaml("spec", name, "node-1", &[("app", name)]),
        );
        TestNetns::new(test, name)
    }
}

fn ok(execs: &[Exec]) {
    for e in execs {
        assert_eq!(
            e.status, 0,
            "{} failed: {}\n{}",
            e.plugin, e.stdout, e.stderr
        );
    }
}

/// The full life of one pod at `version`.
fn lifecycle(test: &str, version: &str) {
    let s = setup(test, version);
    let pod = s.pod(test, "a");
    let rt = s.runtime(&pod, "cont-a", "a");

    // ADD: bridge, then keyway with the bridge's result.
    let (execs, result) = s.list.add(&rt);
    ok(&execs);
    let result = result.unwrap();
    assert_eq!(result["cniVersion"], version);
    let ifaces = result["interfaces"].as_array().unwrap();
    let kw = ifaces
        .iter()
        .position(|i| i["name"] == "kw0")
        .expect("kw0 in the result");
    assert_eq!(ifaces[kw]["sandbox"], rt.netns);
    assert!(
        ifaces.iter().any(|i| i["name"] == "eth0"),
        "prevResult kept: {result}"
    );
    // The overlay address is the agent's to publish; the result's addresses stay the primary's,
    // so that upstream plugins' CHECK (which matches them against eth0) keeps passing.
    let ips = result["ips"].as_array().unwrap();
    assert!(
        ips.iter().all(|ip| ip["interface"] != kw),
        "no address listed on kw0: {result}"
    );
    assert_eq!(
        ips[0].get("version").is_some(),
        version.starts_with("0."),
        "0.3.x and 0.4.0 results carry ip versions"
    );
    let att = s.agent.attachments();
    let addr = format!(
        "{}/32",
        att["attachments"][0]["overlayIps"][0].as_str().unwrap()
    );
    assert!(addr.starts_with("100.64."), "{addr}");

    // What ADD made, in the pod.
    let link = pod.sh(&["ip", "-d", "link", "show", "kw0"]);
    assert!(link.contains("mtu 1456") && link.contains("tun"), "{link}");
    assert!(pod.sh(&["ip", "addr", "show", "kw0"]).contains(&addr));
    assert!(
        pod.sh(&["ip", "route", "show", "100.64.0.0/10"])
            .contains("dev kw0")
    );
    let table = pod.sh(&["nft", "list", "table", "inet", "keyway"]);
    assert!(
        table.contains("service traffic that did not come over the overlay"),
        "{table}"
    );
    assert!(
        pod.sh(&["ip", "rule"])
            .contains("fwmark 0x400000/0x400000 lookup 6080"),
        "pod IPs are steered into the overlay"
    );
    assert!(
        pod.sh(&["ip", "route", "show", "table", "6080"])
            .contains("dev kw0")
    );
    assert!(
        table.contains("ip saddr 10.99.0.1 accept"),
        "the node's gateway is exempt: {table}"
    );
    let att = s.agent.attachments();
    assert_eq!(att["attachments"][0]["running"], true, "{att}");
    assert_eq!(
        att["attachments"][0]["egress"], "Open",
        "not egress-isolated: {att}"
    );

    // CHECK with the cached result: the whole chain's, Debian's bridge and host-local included.
    let pre_check = version.starts_with("0.3");
    if pre_check {
        // CHECK does not exist before 0.4.0: code 1, and nothing touched.
        let c = rt.exec("CHECK", &s.list.keyway(json!({"prevResult": result})));
        assert_ne!(c.status, 0);
        assert_eq!(c.json()["code"], 1, "{}", c.stdout);
        assert!(pod.exec(&["ip", "link", "show", "kw0"]).status.success());
    } else {
        ok(&s.list.check(&rt, &result));
        // CHECK notices when what ADD made is gone.
        pod.sh(&["nft", "delete", "table", "inet", "keyway"]);
        let broken = rt.exec("CHECK", &s.list.keyway(json!({"prevResult": result})));
        assert_ne!(broken.status, 0);
        assert!(
            broken.stdout.contains("nftables table is missing"),
            "{}",
            broken.stdout
        );
    }

    // DEL, then DEL again, then DEL without a namespace (as RemovePodSandbox sends it).
    ok(&s.list.del(&rt, Some(&result)));
    assert!(
        !pod.exec(&["ip", "link", "show", "kw0"]).status.success(),
        "kw0 removed"
    );
    assert!(
        !pod.exec(&["nft", "list", "table", "inet", "keyway"])
            .status
            .success(),
        "table removed"
    );
    assert!(
        !pod.sh(&["ip", "rule"]).contains("6080"),
        "steering rule removed"
    );
    assert_eq!(
        s.agent.attachments()["attachments"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(s.agent.attachments()["addressesInUse"], 0);
    ok(&s.list.del(&rt, Some(&result)));
    let mut no_ns = rt.clone();
    no_ns.netns.clear();
    ok(&s.list.del(&no_ns, Some(&result)));

    // CHECK after DEL fails: the agent has no record.
    if !pre_check {
        let check = rt.exec("CHECK", &s.list.keyway(json!({"prevResult": result})));
        assert_ne!(check.status, 0);
        assert!(check.stdout.contains("no record"), "{}", check.stdout);
    }

    // VERSION.
    let v = rt.exec("VERSION", &json!({"cniVersion": version, "type": "keyway"}));
    assert_eq!(v.status, 0);
    assert_eq!(
        v.json()["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    drop(s.scratch);
}

/// Calico's and Flannel's own conflists say 0.3.1, and the installer keeps the primary's version.
#[test]
fn lifecycle_at_0_3_1() {
    if privileged("lifecycle_at_0_3_1") {
        lifecycle("spec031", "0.3.1");
    }
}

#[test]
fn lifecycle_at_0_4_0() {
    if privileged("lifecycle_at_0_4_0") {
        lifecycle("spec040", "0.4.0");
    }
}

#[test]
fn lifecycle_at_1_0_0() {
    if privileged("lifecycle_at_1_0_0") {
        lifecycle("spec100", "1.0.0");
    }
}

#[test]
fn every_failure_has_its_code_and_leaves_nothing() {
    if !privileged("every_failure_has_its_code_and_leaves_nothing") {
        return;
    }
    let s = setup("specerr", "1.0.0");
    let pod = s.pod("specerr", "e");
    let rt = s.runtime(&pod, "cont-e", "e");
    let keyway = bin("keyway-cni");
    let (execs, bridge_result) = {
        let bridge_only = ConfList {
            plugins: vec![s.list.plugins[0].clone()],
            ..s.list.clone()
        };
        bridge_only.add(&rt)
    };
    ok(&execs);
    let prev = bridge_result.unwrap();
    let conf = |extra: Value| s.list.keyway(extra);

    // Bad JSON: 6.
    let e = rt.exec_binary(&keyway, "keyway", "ADD", "{not json");
    assert_eq!((e.status, e.code()), (1, Some(6)), "{}", e.stdout);
    // Missing prevResult: 7, and the spec's message.
    let e = rt.exec("ADD", &conf(json!({})));
    assert_eq!(e.code(), Some(7));
    assert_eq!(e.json()["msg"], "Required prevResult missing");
    // Unknown version: 1.
    let e = rt.exec(
        "ADD",
        &conf(json!({"cniVersion": "0.2.0", "prevResult": prev})),
    );
    assert_eq!(e.code(), Some(1), "{}", e.stdout);
    assert_eq!(e.json()["cniVersion"], "0.2.0");
    // A missing variable: 4.
    let mut no_netns = rt.clone();
    no_netns.netns.clear();
    let e = no_netns.exec("ADD", &conf(json!({"prevResult": prev})));
    assert_eq!(e.code(), Some(4), "{}", e.stdout);
    // Bad configuration: 7.
    let e = rt.exec("ADD", &conf(json!({"prevResult": prev, "mtu": 12})));
    assert_eq!(e.code(), Some(7));
    // A namespace that does not exist: 3.
    let mut gone = rt.clone();
    gone.netns = "/var/run/netns/keyway-does-not-exist".into();
    let e = gone.exec("ADD", &conf(json!({"prevResult": prev})));
    assert_eq!(e.code(), Some(3), "{}", e.stdout);
    // No agent: 11 (try again later), and nothing of the attempt is left in the pod.
    let e = rt.exec(
        "ADD",
        &conf(json!({"prevResult": prev, "agentSocket": s.scratch.join("nobody.sock")})),
    );
    assert_eq!(e.code(), Some(11), "{}", e.stdout);
    assert!(!pod.exec(&["ip", "link", "show", "kw0"]).status.success());
    assert!(
        !pod.exec(&["nft", "list", "table", "inet", "keyway"])
            .status
            .success()
    );
    // Unknown command: 4.
    let e = rt.exec("FROB", &conf(json!({"prevResult": prev})));
    assert_eq!(e.code(), Some(4));
    // The agent refusing (its pod never appears in the state): 11, and rolled back.
    let stranger = Runtime {
        args: vec![
            ("K8S_POD_NAMESPACE".into(), "spec".into()),
            ("K8S_POD_NAME".into(), "ghost".into()),
        ],
        ..rt.clone()
    };
    let e = stranger.exec("ADD", &conf(json!({"prevResult": prev})));
    assert_eq!(e.code(), Some(11), "{}", e.stdout);
    assert!(
        e.json()["msg"]
            .as_str()
            .unwrap()
            .contains("not in the cluster state"),
        "{}",
        e.stdout
    );
    assert!(!pod.exec(&["ip", "link", "show", "kw0"]).status.success());
    assert_eq!(
        s.agent.attachments()["addressesInUse"],
        0,
        "the allocation was released"
    );
}

#[test]
fn status_and_gc_at_1_1_0() {
    if !privileged("status_and_gc_at_1_1_0") {
        return;
    }
    let s = setup("specgc", "1.0.0");
    let pods: Vec<TestNetns> = ["g1", "g2"].iter().map(|n| s.pod("specgc", n)).collect();
    let rts: Vec<Runtime> = pods
        .iter()
        .zip(["g1", "g2"])
        .map(|(p, n)| s.runtime(p, &format!("cont-{n}"), n))
        .collect();
    for rt in &rts {
        ok(&s.list.add(rt).0);
    }
    let keyway_11 = |extra: Value| {
        let mut c = s.list.keyway(extra);
        c["cniVersion"] = json!("1.1.0");
        c
    };
    let rt = &rts[0];
    // STATUS: ready.
    let e = rt.exec("STATUS", &keyway_11(json!({})));
    assert_eq!(e.status, 0, "{}", e.stdout);
    // STATUS below 1.1.0: incompatible.
    let e = rt.exec("STATUS", &s.list.keyway(json!({})));
    assert_eq!(e.code(), Some(1));
    // GC keeping only g1: g2 is forgotten, its devices removed.
    let e = rt.exec(
        "GC",
        &keyway_11(
            json!({"cni.dev/valid-attachments": [{"containerID": "cont-g1", "ifname": "eth0"}]}),
        ),
    );
    assert_eq!(e.status, 0, "{}{}", e.stdout, e.stderr);
    let att = s.agent.attachments();
    let names: Vec<&str> = att["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["pod"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["g1"], "{att}");
    assert!(
        !pods[1]
            .exec(&["ip", "link", "show", "kw0"])
            .status
            .success(),
        "GC removed g2's device"
    );
    assert!(
        pods[0]
            .exec(&["ip", "link", "show", "kw0"])
            .status
            .success(),
        "g1 untouched"
    );
    // STATUS with no agent: 50.
    let e = rt.exec(
        "STATUS",
        &keyway_11(json!({"agentSocket": s.scratch.join("nobody.sock")})),
    );
    assert_eq!(e.code(), Some(50), "{}", e.stdout);
}

#[test]
fn the_plugin_needs_only_net_admin_mknod_and_sys_admin() {
    if !privileged("the_plugin_needs_only_net_admin_mknod_and_sys_admin") {
        return;
    }
    let s = setup("speccaps", "1.0.0");
    let pod = s.pod("speccaps", "c");
    let rt = s.runtime(&pod, "cont-c", "c");
    let bridge_only = ConfList {
        plugins: vec![s.list.plugins[0].clone()],
        ..s.list.clone()
    };
    let (execs, prev) = bridge_only.add(&rt);
    ok(&execs);

    // A wrapper that runs keyway-cni in a private mount namespace without /dev/net/tun, with a
    // bounding set of exactly NET_ADMIN, MKNOD and SYS_ADMIN.
    let wrapper_dir = s.scratch.join("capbin");
    std::fs::create_dir_all(&wrapper_dir).unwrap();
    let caps = "-all,+net_admin,+mknod,+sys_admin";
    let script = format!(
        "#!/bin/sh\nexec unshare -m sh -c 'mount -t tmpfs tmpfs /dev/net && grep CapEff /proc/self/status >&2 && exec setpriv --bounding-set={caps} --inh-caps={caps} --ambient-caps={caps} sh -c \"grep CapEff /proc/self/status >&2; exec {}\"'\n",
        bin("keyway-cni").display()
    );
    let wrapper = wrapper_dir.join("keyway");
    std::fs::write(&wrapper, script).unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&wrapper)
        .status()
        .unwrap();
    let capped = Runtime {
        path: vec![wrapper_dir.clone(), PathBuf::from(DEBIAN_CNI_DIR)],
        ..rt.clone()
    };
    let e = capped.exec("ADD", &s.list.keyway(json!({"prevResult": prev.unwrap()})));
    assert_eq!(e.status, 0, "{}\n{}", e.stdout, e.stderr);
    // NET_ADMIN (12), SYS_ADMIN (21), MKNOD (27) and nothing else.
    assert!(
        e.stderr.contains("CapEff:\t0000000008201000"),
        "{}",
        e.stderr
    );
    assert!(
        e.stderr.contains("created the TUN device node"),
        "the plugin had to mknod: {}",
        e.stderr
    );
    assert!(pod.sh(&["ip", "link", "show", "kw0"]).contains("kw0"));
    assert!(
        pod.sh(&["nft", "list", "table", "inet", "keyway"])
            .contains("keyway")
    );
}
