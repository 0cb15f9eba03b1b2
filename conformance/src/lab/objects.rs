//! The Kubernetes documents a lab is given, as the lab needs them: pods with their node and the
//! ports each container declares; everything else is passed to the agents' state source as is
//! (after the same validation the agents apply, so a bad document is refused before anything starts).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde_json::Value;

/// A container of a lab pod: the ports it declares decide what it serves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LabContainer {
    pub name: String,
    /// (port, protocol) pairs from `ports`.
    pub ports: Vec<(u16, String)>,
    /// `command`, taken as arguments of the image's one binary (`/agnhost`), when given.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Host directories (host path, container path): only the lab's own pods have any.
    #[serde(default)]
    pub mounts: Vec<(std::path::PathBuf, String)>,
}

/// A pod as the lab creates it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LabPod {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub containers: Vec<LabContainer>,
    /// The document as given (the lab adds status to it when it records the pod).
    pub doc: Value,
    /// One of the cluster's own pods (the lab's DNS server): not probed, not benched, and with
    /// the runtime's resolver rather than the cluster's.
    #[serde(default)]
    pub system: bool,
}

/// What a set of files holds.
#[derive(Debug, Default)]
pub struct Documents {
    pub pods: Vec<LabPod>,
    /// Everything that is not a pod, by (kind, namespace, name).
    pub others: Vec<(String, String, String, Value)>,
}

pub fn meta(doc: &Value, field: &str) -> String {
    doc.pointer(&format!("/metadata/{field}"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Kinds that live outside namespaces.
pub fn is_cluster_scoped(kind: &str) -> bool {
    matches!(
        kind,
        "Namespace" | "Node" | "ClusterConfig" | "OverlayNetwork"
    )
}

/// Reads and validates documents from files (YAML, several per file).
pub fn read(files: &[impl AsRef<Path>]) -> anyhow::Result<Documents> {
    let mut out = Documents::default();
    for f in files {
        let f = f.as_ref();
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        // The agents' own parser: what it refuses, the lab refuses.
        keyway_agent::source::parse_file(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: Value =
                serde::Deserialize::deserialize(doc).with_context(|| format!("{}", f.display()))?;
            if v.is_null() {
                continue;
            }
            let kind = v
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let ns = if is_cluster_scoped(&kind) {
                String::new()
            } else {
                let n = meta(&v, "namespace");
                if n.is_empty() { "default".into() } else { n }
            };
            let name = meta(&v, "name");
            if kind == "Pod" {
                out.pods.push(pod(&v, &ns, &name)?);
            } else {
                out.others.push((kind, ns, name, v));
            }
        }
    }
    Ok(out)
}

/// A pod document as the lab runs it.
pub(crate) fn pod(v: &Value, ns: &str, name: &str) -> anyhow::Result<LabPod> {
    let labels: BTreeMap<String, String> = v
        .pointer("/metadata/labels")
        .and_then(|l| serde_json::from_value(l.clone()).ok())
        .unwrap_or_default();
    let node = v
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .map(String::from);
    let mut containers = Vec::new();
    for c in v
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        let cname = c
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("c")
            .to_string();
        let mut ports = Vec::new();
        for p in c
            .get("ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
        {
            let port = p
                .get("containerPort")
                .and_then(Value::as_u64)
                .filter(|p| (1..=65535).contains(p));
            let Some(port) = port else {
                bail!("pod {ns}/{name}: container {cname} has a port without a valid containerPort")
            };
            let proto = p
                .get("protocol")
                .and_then(Value::as_str)
                .unwrap_or("TCP")
                .to_string();
            ports.push((port as u16, proto));
        }
        let command = c.get("command").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        });
        containers.push(LabContainer {
            name: cname,
            ports,
            command,
            mounts: Vec::new(),
        });
    }
    if containers.is_empty() {
        bail!("pod {ns}/{name} has no containers");
    }
    Ok(LabPod {
        namespace: ns.into(),
        name: name.into(),
        node,
        labels,
        containers,
        doc: v.clone(),
        system: false,
    })
}

/// The file an object lives in, in the state source (one object per file, so each change is one
/// atomic write).
pub fn source_path(kind: &str, ns: &str, name: &str) -> String {
    let clean = |s: &str| {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>()
    };
    if ns.is_empty() {
        format!("{}/{}.yaml", clean(&kind.to_lowercase()), clean(name))
    } else {
        format!(
            "{}/{}.{}.yaml",
            clean(&kind.to_lowercase()),
            clean(ns),
            clean(name)
        )
    }
}

/// A Namespace document with the label the API server adds.
pub fn with_name_label(mut ns_doc: Value) -> Value {
    let name = meta(&ns_doc, "name");
    let labels = ns_doc
        .pointer_mut("/metadata")
        .and_then(Value::as_object_mut)
        .map(|m| m.entry("labels").or_insert_with(|| serde_json::json!({})));
    if let Some(Value::Object(l)) = labels {
        l.insert(
            keyway_agent::model::NAMESPACE_NAME_LABEL.into(),
            Value::String(name),
        );
    }
    ns_doc
}
