//! The installer on real-world CNI configuration directories: for each case in `tests/golden/`,
//! `before/` is the node's directory as the primary CNI left it and `after/` is what it must be
//! once keyway is in the chain, byte for byte. Install, install again, the primary rewriting its
//! file, istio-cni arriving later, uninstall. `UPDATE_GOLDEN=1` rewrites `after/` (then read the
//! diff before committing it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keyway_install::confdir::{ConfDir, Reconciled};
use keyway_install::conflist;
use serde_json::Value;

const CASES: [&str; 6] = [
    "calico",
    "flannel",
    "bridge",
    "istio-after-calico",
    "istio-owned-calico",
    "single-conf",
];

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn entry() -> Value {
    serde_json::from_slice(&std::fs::read(golden().join("entry.json")).unwrap()).unwrap()
}

/// Every regular file of `dir`, by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_file() {
            m.insert(
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            );
        }
    }
    m
}

fn assert_same(got: &BTreeMap<String, Vec<u8>>, want: &BTreeMap<String, Vec<u8>>, what: &str) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: the files"
    );
    for (name, bytes) in want {
        assert!(
            got[name] == *bytes,
            "{what}: {name} differs\n--- got\n{}\n--- want\n{}",
            String::from_utf8_lossy(&got[name]),
            String::from_utf8_lossy(bytes)
        );
    }
}

/// A node's directory for one test: the CNI conf dir and the installer's state dir.
struct Node {
    root: PathBuf,
    dir: ConfDir,
}

impl Node {
    fn new(test: &str, case: &str) -> Node {
        let root = std::env::temp_dir().join(format!(
            "keyway-golden-{test}-{case}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let conf = root.join("net.d");
        std::fs::create_dir_all(&conf).unwrap();
        for (name, bytes) in files(&golden().join(case).join("before")) {
            std::fs::write(conf.join(name), bytes).unwrap();
        }
        Node {
            dir: ConfDir::new(conf, root.join("state")),
            root,
        }
    }

    fn conf(&self) -> BTreeMap<String, Vec<u8>> {
        files(&self.dir.dir)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The plugin types of a conflist's bytes, in chain order.
fn plugin_types(bytes: &[u8]) -> Vec<String> {
    conflist::parse("x.conflist", bytes).unwrap().value["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect()
}

fn before(case: &str) -> BTreeMap<String, Vec<u8>> {
    files(&golden().join(case).join("before"))
}

fn after(case: &str, got: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Vec<u8>> {
    let dir = golden().join(case).join("after");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (n, b) in got {
            std::fs::write(dir.join(n), b).unwrap();
        }
    }
    files(&dir)
}

#[test]
fn install_matches_the_golden_files_and_is_idempotent() {
    for case in CASES {
        let node = Node::new("install", case);
        let r = node.dir.reconcile(&entry()).unwrap();
        assert!(matches!(r, Reconciled::Wrote { .. }), "{case}: {r:?}");
        let got = node.conf();
        assert_same(&got, &after(case, &got), case);
        assert_eq!(
            node.dir.reconcile(&entry()).unwrap(),
            Reconciled::Unchanged(primary_name(case)),
            "{case}: a second pass changes nothing"
        );
        assert_same(&node.conf(), &got, case);
    }
}

fn primary_name(case: &str) -> String {
    match case {
        "calico" | "istio-after-calico" => "10-calico.conflist",
        "flannel" => "10-flannel.conflist",
        "bridge" => "10-bridge.conflist",
        "single-conf" => "10-mynet.conflist",
        // Istio's own copy of the primary's chain with istio-cni appended, named to sort first
        // (`istioOwnedCNIConfig`): the file the runtime reads, so the one keyway joins.
        "istio-owned-calico" => "02-istio-cni.conflist",
        _ => unreachable!(),
    }
    .to_string()
}

#[test]
fn what_keyway_writes_is_what_the_issue_asks() {
    // Independent of the golden bytes: the shape runtimes will act on.
    for case in CASES {
        let node = Node::new("shape", case);
        node.dir.reconcile(&entry()).unwrap();
        let name = primary_name(case);
        let list = conflist::parse(&name, &node.conf()[&name]).unwrap().value;
        let types = plugin_types(&node.conf()[&name]);
        let want: &[&str] = match case {
            "calico" => &["calico", "portmap", "bandwidth", "keyway"],
            "flannel" => &["flannel", "portmap", "keyway"],
            "bridge" => &["bridge", "portmap", "keyway"],
            "istio-after-calico" | "istio-owned-calico" => {
                &["calico", "portmap", "bandwidth", "istio-cni", "keyway"]
            }
            "single-conf" => &["bridge", "keyway"],
            _ => unreachable!(),
        };
        assert_eq!(types, want, "{case}");
        let version = match case {
            "calico" | "flannel" | "istio-after-calico" | "istio-owned-calico" => "0.3.1",
            "bridge" => "1.0.0",
            _ => "0.4.0",
        };
        assert_eq!(
            list["cniVersion"], version,
            "{case}: the primary's version is kept"
        );
    }
    // With Istio owning its file, the primary's own file is left as it was.
    let node = Node::new("shape-istio-owned", "istio-owned-calico");
    node.dir.reconcile(&entry()).unwrap();
    assert_eq!(
        node.conf()["10-calico.conflist"],
        before("istio-owned-calico")["10-calico.conflist"]
    );
    // Only the primary is touched: the broken file before it and podman's after it stay as they were.
    let node = Node::new("shape-others", "bridge");
    node.dir.reconcile(&entry()).unwrap();
    let b = before("bridge");
    for f in ["05-half-written.conflist", "87-podman-bridge.conflist"] {
        assert_eq!(node.conf()[f], b[f], "{f} untouched");
    }
    // A single .conf became a conflist and is gone, so the runtime reads the conflist.
    let node = Node::new("shape-conf", "single-conf");
    node.dir.reconcile(&entry()).unwrap();
    assert!(!node.conf().contains_key("10-mynet.conf"));
    assert_eq!(
        node.conf()["99-loopback.conf"],
        before("single-conf")["99-loopback.conf"]
    );
}

#[test]
fn uninstall_leaves_the_primary_byte_for_byte() {
    for case in CASES {
        let node = Node::new("uninstall", case);
        node.dir.reconcile(&entry()).unwrap();
        let changed = node.dir.uninstall().unwrap();
        assert_eq!(changed.len(), 1, "{case}: {changed:?}");
        assert_same(
            &node.conf(),
            &before(case),
            &format!("{case} after uninstall"),
        );
        assert!(
            node.dir.uninstall().unwrap().is_empty(),
            "{case}: twice is harmless"
        );
        assert!(
            !node.dir.state.join("orig").exists() && !node.dir.state.join("converted").exists(),
            "{case}: no state left"
        );
    }
}

#[test]
fn drift_is_repaired_when_the_primary_rewrites_its_file() {
    for case in CASES {
        let node = Node::new("drift", case);
        node.dir.reconcile(&entry()).unwrap();
        let installed = node.conf();
        // The primary's installer restarts and writes its configuration again, without keyway.
        for (name, bytes) in before(case) {
            std::fs::write(node.dir.dir.join(name), bytes).unwrap();
        }
        let r = node.dir.reconcile(&entry()).unwrap();
        assert!(matches!(r, Reconciled::Wrote { .. }), "{case}: {r:?}");
        assert_same(&node.conf(), &installed, &format!("{case} repaired"));
        node.dir.uninstall().unwrap();
        assert_same(
            &node.conf(),
            &before(case),
            &format!("{case} uninstalled after repair"),
        );
    }
}

#[test]
fn a_changed_primary_is_what_uninstall_gives_back() {
    let node = Node::new("changed", "calico");
    node.dir.reconcile(&entry()).unwrap();
    // Calico rewrites its file with a new MTU: that file is the one to give back.
    let new = String::from_utf8(before("calico")["10-calico.conflist"].clone())
        .unwrap()
        .replace("\"mtu\": 0", "\"mtu\": 1440");
    std::fs::write(node.dir.dir.join("10-calico.conflist"), &new).unwrap();
    node.dir.reconcile(&entry()).unwrap();
    let list = conflist::parse("x.conflist", &node.conf()["10-calico.conflist"])
        .unwrap()
        .value;
    assert_eq!(list["plugins"][0]["mtu"], 1440);
    assert!(conflist::is_in_place(&list, &entry()));
    node.dir.uninstall().unwrap();
    assert_eq!(node.conf()["10-calico.conflist"], new.as_bytes());
}

#[test]
fn istio_cni_arriving_later_is_followed_and_kept_on_uninstall() {
    let node = Node::new("istio-later", "calico");
    node.dir.reconcile(&entry()).unwrap();
    // istio-cni's installer appends itself, after keyway.
    let path = node.dir.dir.join("10-calico.conflist");
    let mut list: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    list["plugins"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "istio-cni", "ambient_enabled": true}));
    std::fs::write(&path, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
    assert!(matches!(
        node.dir.reconcile(&entry()).unwrap(),
        Reconciled::Wrote { .. }
    ));
    let types = plugin_types(&std::fs::read(&path).unwrap());
    assert_eq!(
        types,
        ["calico", "portmap", "bandwidth", "istio-cni", "keyway"]
    );
    // Uninstall cannot give back calico's bytes (istio changed the file since): it takes keyway
    // out and keeps istio-cni.
    node.dir.uninstall().unwrap();
    let types = plugin_types(&std::fs::read(&path).unwrap());
    assert_eq!(types, ["calico", "portmap", "bandwidth", "istio-cni"]);
}

#[test]
fn no_valid_primary_means_waiting() {
    let root = std::env::temp_dir().join(format!("keyway-golden-empty-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = ConfDir::new(root.join("net.d"), root.join("state"));
    assert_eq!(
        dir.reconcile(&entry()).unwrap(),
        Reconciled::NoPrimary,
        "no directory yet"
    );
    std::fs::create_dir_all(&dir.dir).unwrap();
    std::fs::write(dir.dir.join("10-x.conflist"), "{\"name\": ").unwrap();
    std::fs::write(dir.dir.join("README"), "not a config").unwrap();
    std::fs::write(
        dir.dir.join("20-only-keyway.conflist"),
        r#"{"name":"k","plugins":[{"type":"keyway"}]}"#,
    )
    .unwrap();
    assert_eq!(dir.reconcile(&entry()).unwrap(), Reconciled::NoPrimary);
    assert_eq!(
        std::fs::read_to_string(dir.dir.join("10-x.conflist")).unwrap(),
        "{\"name\": "
    );
    let _ = std::fs::remove_dir_all(&root);
}
