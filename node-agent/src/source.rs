//! The `file` state source: a directory of Kubernetes YAML documents (any depth, `.yaml`, `.yml`
//! or `.json`, several documents per file), reloaded when anything in it changes. It is the
//! embedded default for one machine, the lab and the tests.
//!
//! A file that stops parsing keeps its last good objects: the error is logged and counted, and
//! nothing it held is lost. A file that is removed takes its objects with it.
//!
//! Agents also write into the directory, under `.keyway/`: the overlay blocks they claim (one file
//! per block, created exclusively, so the directory is the lock) and the attachments they publish
//! so every other agent can route to their pods. The lab plays the API server around them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::watch;

use crate::model::{KEYWAY_API_VERSION, Model, Object, OverlayAttachmentSpec, parse_object};

/// Where agents write inside the source directory.
pub const AGENT_DIR: &str = ".keyway";

#[derive(Debug, Clone)]
struct Cached {
    modified: Option<SystemTime>,
    len: u64,
    objects: Vec<Object>,
}

/// Counts what the source did, for metrics.
#[derive(Debug, Default)]
pub struct SourceStats {
    pub reloads: AtomicU64,
    pub errors: AtomicU64,
}

/// Reads the directory into a model, keeping each file's last good objects.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    cache: BTreeMap<PathBuf, Cached>,
    pub stats: Arc<SourceStats>,
}

fn is_document(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&p, out),
            Ok(t) if t.is_file() && is_document(&p) => out.push(p),
            _ => {}
        }
    }
}

/// Parses every document of one file; the first error fails the whole file (so a half-edited file
/// never applies half of itself).
pub fn parse_file(text: &str) -> Result<Vec<Object>, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize_yaml(doc).map_err(|e| format!("document {}: {e}", i + 1))?;
        if value.is_null() {
            continue;
        }
        // A `List` (as `kubectl get -o yaml` writes) holds its documents in `items`.
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            for (j, item) in value
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                if let Some(o) = parse_object(item)
                    .map_err(|e| format!("document {} item {}: {e}", i + 1, j + 1))?
                {
                    out.push(o);
                }
            }
            continue;
        }
        if let Some(o) = parse_object(value).map_err(|e| format!("document {}: {e}", i + 1))? {
            out.push(o);
        }
    }
    Ok(out)
}

trait DeserializeYaml {
    fn deserialize_yaml(d: serde_yaml_ng::Deserializer<'_>) -> Result<Value, serde_yaml_ng::Error>;
}

impl DeserializeYaml for Value {
    fn deserialize_yaml(d: serde_yaml_ng::Deserializer<'_>) -> Result<Value, serde_yaml_ng::Error> {
        serde::Deserialize::deserialize(d)
    }
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> FileSource {
        FileSource {
            dir: dir.into(),
            cache: BTreeMap::new(),
            stats: Arc::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads what changed and returns the whole model.
    pub fn load(&mut self) -> Model {
        self.stats.reloads.fetch_add(1, Ordering::Relaxed);
        let mut files = Vec::new();
        walk(&self.dir, &mut files);
        files.sort();
        let mut next = BTreeMap::new();
        for f in files {
            let meta = std::fs::metadata(&f).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.as_ref().map_or(0, |m| m.len());
            if let Some(c) = self.cache.get(&f)
                && c.modified == modified
                && c.len == len
            {
                next.insert(f, c.clone());
                continue;
            }
            let parsed = std::fs::read_to_string(&f)
                .map_err(|e| e.to_string())
                .and_then(|t| parse_file(&t));
            match parsed {
                Ok(objects) => {
                    next.insert(
                        f,
                        Cached {
                            modified,
                            len,
                            objects,
                        },
                    );
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    match self.cache.get(&f) {
                        Some(old) => {
                            tracing::error!(file = %f.display(), error = %e, "file does not parse; keeping its last good contents");
                            // Remember the bad version so the error is not repeated until it changes.
                            next.insert(
                                f,
                                Cached {
                                    modified,
                                    len,
                                    objects: old.objects.clone(),
                                },
                            );
                        }
                        None => {
                            tracing::error!(file = %f.display(), error = %e, "file does not parse; ignoring it until it does");
                            next.insert(
                                f,
                                Cached {
                                    modified,
                                    len,
                                    objects: Vec::new(),
                                },
                            );
                        }
                    }
                }
            }
        }
        self.cache = next;
        Model::from_objects(self.cache.values().flat_map(|c| c.objects.iter().cloned()))
    }

    /// Watches the directory and sends a new model after every change (debounced), and at least
    /// every `resync` in case a change notification was lost.
    pub fn spawn(
        mut self,
        resync: Duration,
    ) -> std::io::Result<(watch::Receiver<Arc<Model>>, Arc<SourceStats>)> {
        use notify::{RecursiveMode, Watcher};
        std::fs::create_dir_all(&self.dir)?;
        let stats = self.stats.clone();
        let (tx, rx) = watch::channel(Arc::new(self.load()));
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Only changes count: opening and reading the files (as every reload does, in every
            // agent sharing the directory) must not trigger another reload.
            if let Ok(ev) = res
                && (ev.kind.is_create() || ev.kind.is_modify() || ev.kind.is_remove())
            {
                let _ = ev_tx.send(());
            }
        })
        .map_err(std::io::Error::other)?;
        watcher
            .watch(&self.dir, RecursiveMode::Recursive)
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _watcher = watcher;
            loop {
                let woke = tokio::time::timeout(resync, ev_rx.recv()).await;
                if let Ok(None) = woke {
                    return;
                }
                // Debounce: an editor's save or the lab's write is several events.
                tokio::time::sleep(Duration::from_millis(5)).await;
                while ev_rx.try_recv().is_ok() {}
                let model = tokio::task::block_in_place(|| self.load());
                if tx.send(Arc::new(model)).is_err() {
                    return;
                }
            }
        });
        Ok((rx, stats))
    }
}

/// Where an agent publishes its pods' places on the overlay, so every other agent can route to
/// them: files in the `file` source's directory, or pod annotations through the API server.
pub trait Publisher: Send + Sync + std::fmt::Debug {
    fn publish(&self, a: &OverlayAttachmentSpec) -> std::io::Result<()>;
    /// Removes a publication; one that does not exist is success.
    fn withdraw(&self, namespace: &str, pod: &str) -> std::io::Result<()>;
    /// Every (namespace, pod) this node has published.
    fn published(&self) -> Vec<(String, String)>;
}

impl Publisher for FilePublisher {
    fn publish(&self, a: &OverlayAttachmentSpec) -> std::io::Result<()> {
        FilePublisher::publish(self, a)
    }
    fn withdraw(&self, namespace: &str, pod: &str) -> std::io::Result<()> {
        FilePublisher::withdraw(self, namespace, pod)
    }
    fn published(&self) -> Vec<(String, String)> {
        FilePublisher::published(self)
    }
}

/// Writes what an agent publishes into the source directory.
#[derive(Debug, Clone)]
pub struct FilePublisher {
    dir: PathBuf,
    node: String,
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes `contents` to `path` atomically (temporary file, then rename).
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

impl FilePublisher {
    pub fn new(dir: &Path, node: &str) -> FilePublisher {
        FilePublisher {
            dir: dir.join(AGENT_DIR).join("attachments").join(sanitize(node)),
            node: node.to_string(),
        }
    }

    fn path(&self, namespace: &str, pod: &str) -> PathBuf {
        self.dir
            .join(format!("{}.{}.yaml", sanitize(namespace), sanitize(pod)))
    }

    pub fn publish(&self, a: &OverlayAttachmentSpec) -> std::io::Result<()> {
        let doc = serde_json::json!({
            "apiVersion": KEYWAY_API_VERSION,
            "kind": "OverlayAttachment",
            "metadata": {"name": format!("{}.{}", a.namespace, a.pod), "namespace": a.namespace},
            "spec": a,
        });
        let text = serde_yaml_ng::to_string(&doc).map_err(std::io::Error::other)?;
        write_atomic(&self.path(&a.namespace, &a.pod), text.as_bytes())
    }

    pub fn withdraw(&self, namespace: &str, pod: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(namespace, pod)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every attachment this node has published, as (namespace, pod).
    pub fn published(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for e in rd.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            for o in parse_file(&text).unwrap_or_default() {
                if let Object::OverlayAttachment(a) = o
                    && a.node == self.node
                {
                    out.push((a.namespace, a.pod));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(name: &str) -> Tmp {
            let p = std::env::temp_dir().join(format!("keyway-src-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Tmp(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n";

    #[test]
    fn multi_document_files_in_subdirectories_load() {
        let t = Tmp::new("multi");
        std::fs::create_dir_all(t.0.join("sub")).unwrap();
        std::fs::write(
            t.0.join("sub/a.yaml"),
            format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n---\n{POLICY}"),
        )
        .unwrap();
        std::fs::write(t.0.join("notes.txt"), "not a document").unwrap();
        let m = FileSource::new(&t.0).load();
        assert!(m.namespaces.contains_key("x"));
        assert_eq!(m.policies.len(), 1);
    }

    #[test]
    fn a_file_that_stops_parsing_keeps_its_last_good_objects() {
        let t = Tmp::new("keep");
        let f = t.0.join("p.yaml");
        std::fs::write(&f, POLICY).unwrap();
        let mut src = FileSource::new(&t.0);
        assert_eq!(src.load().policies.len(), 1);
        std::fs::write(&f, "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny}\nspec: {podSelector: {matchExpressions: [{key: a, operator: In}]}}\n").unwrap();
        let m = src.load();
        assert_eq!(m.policies.len(), 1, "the good version is kept");
        assert_eq!(src.stats.errors.load(Ordering::Relaxed), 1);
        std::fs::remove_file(&f).unwrap();
        assert!(
            src.load().policies.is_empty(),
            "removing the file removes its objects"
        );
    }

    #[test]
    fn lists_and_errors_name_the_document() {
        let objs = parse_file("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n").unwrap();
        assert_eq!(objs.len(), 1);
        let e = parse_file("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [\n")
            .unwrap_err();
        assert!(e.starts_with("document 2"), "{e}");
    }

    #[test]
    fn published_attachments_round_trip() {
        let t = Tmp::new("pub");
        let p = FilePublisher::new(&t.0, "node-1");
        let a = OverlayAttachmentSpec {
            namespace: "x".into(),
            pod: "a".into(),
            node: "node-1".into(),
            infra_ip: "10.244.1.5".parse().unwrap(),
            overlay_ips: vec!["100.64.1.1".parse().unwrap()],
        };
        p.publish(&a).unwrap();
        assert_eq!(p.published(), vec![("x".to_string(), "a".to_string())]);
        let m = FileSource::new(&t.0).load();
        assert_eq!(m.attachments.values().next(), Some(&a));
        p.withdraw("x", "a").unwrap();
        p.withdraw("x", "a").unwrap();
        assert!(p.published().is_empty());
    }
}
