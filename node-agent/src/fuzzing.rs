//! The check the file source's fuzz target makes, on arbitrary input: shared by the libFuzzer
//! target (`node-agent/fuzz/`, `make fuzz`) and the short run in `make test`
//! (`conformance/tests/fuzz.rs`).

use std::sync::Arc;

use keyway_core::key::{ClusterSecret, Rotation};

use crate::compile::{self, KeyCache, LocalPod, NodeContext};
use crate::model::Model;
use crate::source::parse_file;

/// Any text as the file source's YAML: parsed into objects or refused with a reason, never a
/// panic; and whatever parses, the policy compiler compiles without panicking, with the first
/// pod (if any) served by this node.
pub fn file_source(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(objects) = parse_file(text) else {
        return;
    };
    let model = Model::from_objects(objects);
    let node = NodeContext {
        node_name: "node-1".into(),
        local_sap: Some("192.168.0.1:6080".parse().expect("valid")),
        gue_port: keyway_core::gue::DEFAULT_PORT,
        rotation: Rotation::default(),
    };
    let locals: Vec<LocalPod> = model
        .pods
        .keys()
        .take(1)
        .map(|k| LocalPod {
            entity: Arc::from(format!("{}/{}", k.namespace, k.name)),
            pod: Some(k.clone()),
            overlay_ips: vec!["100.64.0.9".parse().expect("valid")],
            infra_ip: "10.0.0.9".parse().expect("valid"),
        })
        .collect();
    let secret = ClusterSecret::new(vec![7u8; 32]).expect("long enough");
    let mut keys = KeyCache::new(secret);
    let _ = compile::compile(&model, &locals, &node, &mut keys, 0, 1);
}
