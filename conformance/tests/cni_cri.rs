//! The chain run by containerd through its CRI, as kubelet drives it: RunPodSandbox runs bridge +
//! host-local + keyway; containers start and probe each other over the overlay (ExecSync);
//! StopPodSandbox (DEL with the namespace) and RemovePodSandbox (DEL without it) leave nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use keyway_conformance::containerd::{self, Containerd};
use keyway_conformance::cri::{ContainerSpec, Cri, PodSpec};
use keyway_conformance::harness::{TestCluster, agnhost, bin, bin_dir};
use keyway_conformance::images;
use keyway_testing::privileged;

struct Runtime {
    containerd: Containerd,
}

impl Runtime {
    /// containerd in the cluster's first node, its CNI chain bridge + host-local + keyway (at
    /// 1.0.0, served by the node's agent), with the lab's images imported, and a CRI client.
    fn start(c: &TestCluster) -> (Runtime, Cri) {
        let cni_bin = c.scratch.join("cri-cni-bin");
        let cni_conf = c.scratch.join("cri-cni-conf");
        containerd::populate_cni_bin(&cni_bin, &bin("keyway-cni")).unwrap();
        std::fs::create_dir_all(&cni_conf).unwrap();
        let conflist = c.nodes[0].conflist(
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
            containerd: Containerd::start(
                &c.scratch.join("containerd"),
                &c.nodes[0].netns,
                &cni_bin,
                &cni_conf,
            )
            .expect("containerd"),
        };
        for tar in images::build(&agnhost(), &c.scratch.join("images")).unwrap() {
            rt.containerd.import(&tar).unwrap();
        }
        let mut cri = Cri::connect(&rt.containerd.socket).unwrap();
        eprintln!("CRI runtime: {}", cri.version().unwrap());
        (rt, cri)
    }
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
    let (_rt, mut cri) = Runtime::start(&c);

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
            dns: None,
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
                    mounts: Vec::new(),
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

    // b probes a over the overlay, by pod IP (steered into the overlay), and from its eth0 around
    // keyway (blocked by a's nftables).
    let probe = |cri: &mut Cri, target: &str, extra: &[&str]| {
        let mut cmd: Vec<String> = [
            "/agnhost",
            "probe",
            "--protocol",
            "TCP",
            "--timeout-ms",
            "1000",
        ]
        .map(String::from)
        .to_vec();
        cmd.extend(extra.iter().map(|s| s.to_string()));
        cmd.push(target.into());
        let (code, out, err) = cri
            .exec_sync(&sandboxes[1].1, &cmd, Duration::from_secs(10))
            .unwrap();
        assert_eq!(code, 0, "{err}");
        out
    };
    std::thread::sleep(Duration::from_millis(300));
    let out = probe(&mut cri, &format!("{oa}:80"), &[]);
    assert!(out.contains(" ok"), "b reaches a over the overlay: {out}");
    let pod_ips = cri.pod_ips(&sandboxes[0].0).unwrap();
    assert!(
        pod_ips.iter().all(|ip| !ip.starts_with("100.64.")),
        "the runtime reports the primary's pod IP, not the overlay's: {pod_ips:?}"
    );
    let infra_a = pod_ips[0].clone();
    let out = probe(&mut cri, &format!("{infra_a}:80"), &[]);
    assert!(out.contains(" ok"), "b reaches a by pod IP: {out}");
    let out = probe(&mut cri, &format!("{infra_a}:80"), &["--device", "eth0"]);
    assert!(
        out.contains(" fail"),
        "around keyway, from eth0, it is closed: {out}"
    );
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

/// keyway's cluster image (`make image`, the image `manifests/` run) under containerd, as the
/// DaemonSet's install-cni container: its installer copies the plugin into a mounted CNI bin
/// directory and chains keyway after a real primary conflist in a mounted conf directory; the
/// agent and the copied plugin run from it. Nothing else is in the image, so this also shows the
/// binaries need no libc of the host's.
#[test]
fn the_cluster_image_installs_keyway_from_a_container() {
    if !privileged("the_cluster_image_installs_keyway_from_a_container") {
        return;
    }
    let c = TestCluster::new("crimg", 1, 108);
    let (rt, mut cri) = Runtime::start(&c);
    let tar = c.scratch.join("keyway-image.tar");
    std::fs::write(
        &tar,
        images::keyway_image(&bin_dir(), images::KEYWAY_IMAGE).expect("the image"),
    )
    .unwrap();
    rt.containerd.import(&tar).unwrap();

    // The node's directories the DaemonSet mounts, here with a real primary (Flannel's).
    let host_bin = c.scratch.join("host-opt-cni-bin");
    let host_conf = c.scratch.join("host-etc-cni-net.d");
    let host_state = c.scratch.join("host-var-lib-keyway-install");
    for d in [&host_bin, &host_conf, &host_state] {
        std::fs::create_dir_all(d).unwrap();
    }
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../install/tests/golden/flannel");
    let primary = std::fs::read(golden.join("before/10-flannel.conflist")).unwrap();
    std::fs::write(host_conf.join("10-flannel.conflist"), &primary).unwrap();

    c.apply(
        "pod-kw.yaml",
        &keyway_conformance::harness::pod_yaml("keyway-system", "node", "node-1", &[]),
    );
    let spec = PodSpec {
        namespace: "keyway-system".into(),
        name: "node".into(),
        uid: "uid-keyway-node".into(),
        labels: BTreeMap::new(),
        log_dir: c.scratch.join("logs-kw"),
        dns: None,
    };
    let sandbox = cri.run_pod_sandbox(&spec).expect("RunPodSandbox");
    let in_image = |name: &str| format!("/{}/{name}", images::KEYWAY_IMAGE_BIN);
    let entry = std::fs::read_to_string(golden.join("../entry.json")).unwrap();
    let ctr = cri
        .create_and_start(
            &sandbox,
            &spec,
            &ContainerSpec {
                name: "install-cni".into(),
                image: images::KEYWAY_IMAGE.into(),
                command: vec![
                    in_image("keyway-install"),
                    "run".into(),
                    "--entry".into(),
                    entry.trim().into(),
                    "--on-exit".into(),
                    "keep".into(),
                    "--ready-file".into(),
                    "/tmp/ready".into(),
                ],
                mounts: vec![
                    (host_bin.clone(), "/host/opt/cni/bin".into()),
                    (host_conf.clone(), "/host/etc/cni/net.d".into()),
                    (host_state.clone(), "/host/var/lib/keyway/install".into()),
                ],
            },
        )
        .expect("the installer's container");

    // The installer, from the image, joins the chain on the host's files.
    let deadline = Instant::now() + Duration::from_secs(20);
    let want = std::fs::read(golden.join("after/10-flannel.conflist")).unwrap();
    while std::fs::read(host_conf.join("10-flannel.conflist")).unwrap() != want {
        assert!(
            Instant::now() < deadline,
            "keyway never joined the chain: {}",
            String::from_utf8_lossy(&std::fs::read(host_conf.join("10-flannel.conflist")).unwrap())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let copied = std::fs::read(host_bin.join("keyway")).expect("the plugin on the host");
    assert_eq!(
        copied,
        std::fs::read(bin_dir().join("keyway-cni")).unwrap(),
        "the plugin copied is the image's"
    );

    // The image's other binaries run in it, and so does the plugin the installer copied.
    let exec = |cri: &mut Cri, cmd: &[&str]| {
        let cmd: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        cri.exec_sync(&ctr, &cmd, Duration::from_secs(10)).unwrap()
    };
    let (code, out, err) = exec(&mut cri, &[&in_image("keyway-agent"), "--version"]);
    assert_eq!((code, out.trim()), (0, "keyway-agent 0.1.0"), "{err}");
    let (code, out, _) = exec(&mut cri, &["/host/opt/cni/bin/keyway"]);
    assert_eq!(code, 1);
    let answer: serde_json::Value = serde_json::from_str(&out).expect("a CNI error answer");
    assert_eq!(
        answer["code"], 4,
        "no CNI_COMMAND is a bad-argument error: {out}"
    );

    cri.stop_pod_sandbox(&sandbox).expect("StopPodSandbox");
    cri.remove_pod_sandbox(&sandbox).expect("RemovePodSandbox");
    c.remove("pod-kw.yaml");
    // A stop is not an uninstall (--on-exit keep): keyway stays in the chain.
    assert_eq!(
        std::fs::read(host_conf.join("10-flannel.conflist")).unwrap(),
        want
    );
    assert!(cri.list_sandboxes().unwrap().is_empty());
}
