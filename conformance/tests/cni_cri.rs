//! The chain run by containerd through its CRI, as kubelet drives it: RunPodSandbox runs bridge +
//! host-local + keyway; containers start and probe each other over the overlay (ExecSync);
//! StopPodSandbox (DEL with the namespace) and RemovePodSandbox (DEL without it) leave nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use keyway_conformance::containerd::{self, Containerd};
use keyway_conformance::cri::{ContainerSpec, Cri, PodSpec};
use keyway_conformance::harness::{TestCluster, agnhost, bin};
use keyway_conformance::images;
use keyway_sap::testing::privileged;

struct Runtime {
    containerd: Containerd,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.containerd.stop();
        // Shims of sandboxes a failed test left behind.
        for pid in keyway_conformance::proc::find(&self.containerd.dir.display().to_string()) {
            keyway_conformance::proc::terminate(pid, Duration::from_secs(2));
        }
    }
}

#[test]
fn containerd_runs_the_chain_through_cri() {
    if !privileged("containerd_runs_the_chain_through_cri") {
        return;
    }
    let c = TestCluster::new("cri", 1, 106);
    let node = &c.nodes[0];
    let dir = c.scratch.join("containerd");
    let cni_bin = c.scratch.join("cri-cni-bin");
    let cni_conf = c.scratch.join("cri-cni-conf");
    containerd::populate_cni_bin(&cni_bin, &bin("keyway-cni")).unwrap();
    std::fs::create_dir_all(&cni_conf).unwrap();
    let conflist = node.conflist(
        "1.0.0",
        &c.agent(1).socket.display().to_string(),
        &c.scratch.join("cri-ipam").display().to_string(),
        true,
    );
    std::fs::write(
        cni_conf.join("10-keyway.conflist"),
        serde_json::to_vec_pretty(&conflist).unwrap(),
    )
    .unwrap();
    let rt = Runtime {
        containerd: Containerd::start(&dir, &node.netns, &cni_bin, &cni_conf).expect("containerd"),
    };
    for tar in images::build(&agnhost(), &c.scratch.join("images")).unwrap() {
        rt.containerd.import(&tar).unwrap();
    }
    let mut cri = Cri::connect(&rt.containerd.socket).unwrap();
    eprintln!("CRI runtime: {}", cri.version().unwrap());

    let mut sandboxes = Vec::new();
    for name in ["a", "b"] {
        c.apply(
            &format!("pod-x-{name}.yaml"),
            &keyway_conformance::harness::pod_yaml("x", name, "node-1", &[("pod", name)]),
        );
        let spec = PodSpec {
            namespace: "x".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            labels: BTreeMap::from([("pod".to_string(), name.to_string())]),
            log_dir: c.scratch.join(format!("logs-{name}")),
        };
        let id = cri.run_pod_sandbox(&spec).expect("RunPodSandbox");
        let ips = cri.pod_ips(&id).unwrap();
        assert!(
            ips[0].starts_with("10.106.1."),
            "the pod IP is bridge's, on eth0: {ips:?}"
        );
        let ctr = cri
            .create_and_start(
                &id,
                &spec,
                &ContainerSpec {
                    name: "serve-80-tcp".into(),
                    image: images::AGNHOST_IMAGE.into(),
                    command: vec![
                        "/agnhost".into(),
                        "serve".into(),
                        "--port".into(),
                        "80".into(),
                        "--protocol".into(),
                        "TCP".into(),
                    ],
                },
            )
            .expect("container");
        sandboxes.push((id, ctr, spec));
    }
    let att = c.agent(1).attachments();
    let overlay = |pod: &str| -> String {
        att["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["pod"] == pod)
            .expect("attached")["overlayIps"][0]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (oa, ob) = (overlay("a"), overlay("b"));
    let netns_a = att["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["pod"] == "a")
        .unwrap()["netns"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        netns_a.starts_with("/var/run/netns/cni-"),
        "containerd's namespace: {netns_a}"
    );

    // b probes a over the overlay, and over the underlay (blocked by a's nftables).
    let probe = |cri: &mut Cri, target: &str| {
        let (code, out, err) = cri
            .exec_sync(
                &sandboxes[1].1,
                &[
                    "/agnhost".into(),
                    "probe".into(),
                    "--protocol".into(),
                    "TCP".into(),
                    "--timeout-ms".into(),
                    "1000".into(),
                    target.into(),
                ],
                Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(code, 0, "{err}");
        out
    };
    std::thread::sleep(Duration::from_millis(300));
    let out = probe(&mut cri, &format!("{oa}:80"));
    assert!(out.contains(" ok"), "b reaches a over the overlay: {out}");
    let infra_a = cri.pod_ips(&sandboxes[0].0).unwrap()[0].clone();
    let out = probe(&mut cri, &format!("{infra_a}:80"));
    assert!(out.contains(" fail"), "the underlay is closed: {out}");
    let _ = ob;

    // Stop (DEL with the namespace), then remove (DEL without it), as kubelet does.
    for (id, _, spec) in &sandboxes {
        cri.stop_pod_sandbox(id).expect("StopPodSandbox");
        cri.remove_pod_sandbox(id).expect("RemovePodSandbox");
        c.remove(&format!("pod-x-{}.yaml", spec.name));
    }
    let att = c.agent(1).attachments();
    assert_eq!(att["attachments"].as_array().unwrap().len(), 0, "{att}");
    assert_eq!(att["addressesInUse"], 0);
    assert!(cri.list_sandboxes().unwrap().is_empty());
    assert!(
        !std::path::Path::new(&netns_a).exists(),
        "the runtime removed the pod's namespace"
    );
}
