//! The policy compiler at scale: 3,000 pods, each with a label of its own (as tenant-controlled
//! labels can make them), so that every pod is an identity of its own. The baseline is the
//! cluster with a policy whose rule names one peer; the cases under test are policies selecting
//! every pod with rules whose peers are every pod: a rule that names none (`ingress: [{ports}]`),
//! one whose peer is `namespaceSelector: {}`, and an egress rule to every pod on a named port.
//! Before such rules were kept per selected identity, each expanded to 3,000² identity pairs. The
//! bench prints what each compiles to and the process's peak resident memory after each.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use keyway_agent::compile::{KeyCache, NodeContext, compile};
use keyway_agent::model::{Model, Object};
use keyway_agent::source::parse_file;
use keyway_core::key::{ClusterSecret, Rotation};

const PODS: usize = 3000;

fn cluster(policy: &str) -> Model {
    let mut text = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: t}\n");
    for i in 0..PODS {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: t, labels: {{app: x, unique: u{i}}}}}\n\
             spec: {{nodeName: node-1, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\nstatus: {{podIPs: [{{ip: 10.{}.{}.{}}}]}}\n",
            i / 65536,
            (i / 256) % 256,
            i % 256
        ));
    }
    text.push_str(policy);
    let objects: Vec<Object> = parse_file(&text).expect("the bench's cluster parses");
    Model::from_objects(objects)
}

const ONE_PEER: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: one, namespace: t}\n\
    spec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {unique: u0}}}]}]}\n";
const EVERY_SOURCE: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: all, namespace: t}\n\
    spec: {podSelector: {}, ingress: [{ports: [{port: 80}]}]}\n";
const EVERY_NAMESPACE: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: all, namespace: t}\n\
    spec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 80}]}]}\n";
const EVERY_POD_NAMED_PORT: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: all, namespace: t}\n\
    spec: {podSelector: {}, policyTypes: [Egress], egress: [{to: [{podSelector: {}}], ports: [{port: http}]}]}\n";

fn node() -> NodeContext {
    NodeContext {
        node_name: "node-1".into(),
        local_sap: None,
        gue_port: 6080,
        rotation: Rotation::new(3_600_000, 60_000).expect("valid"),
    }
}

/// Peak resident memory of the process so far, in MiB (Linux `VmHWM`).
fn peak_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn compiler(c: &mut Criterion) {
    let secret = ClusterSecret::new(vec![7u8; 32]).expect("long enough");
    let mut g = c.benchmark_group("compile_3000_unique_pods");
    g.sample_size(10);
    for (name, policy) in [
        ("baseline_one_peer", ONE_PEER),
        ("every_source", EVERY_SOURCE),
        ("every_namespace", EVERY_NAMESPACE),
        ("egress_every_pod_named_port", EVERY_POD_NAMED_PORT),
    ] {
        let model = cluster(policy);
        let mut keys = KeyCache::new(secret.clone());
        let out = compile(&model, &[], &node(), &mut keys, 0, 1);
        let (group_rules, groups) = out.tables.acl.group_rule_count();
        eprintln!(
            "{name}: {} identities, {} identity pairs, {group_rules} rules on {groups} peer groups, \
             {} allow sets; peak RSS so far {:.0} MiB",
            out.identities,
            out.tables.acl.pair_count(),
            out.tables.acl.allow_set_count(),
            peak_mib()
        );
        g.bench_function(name, |b| {
            b.iter(|| black_box(compile(&model, &[], &node(), &mut keys, 0, 1)))
        });
    }
    g.finish();
}

criterion_group!(benches, compiler);
criterion_main!(benches);
