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
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use keyway_sap::io::fs::{file_name_part, remove_if_present, write_atomic};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::watch;

use super::{LastGood, PublishError, SourceStats};
use crate::model::{
    KEYWAY_API_VERSION, Model, Object, ObjectError, ObjectKey, OverlayAttachmentSpec, parse_object,
};

/// Where agents write inside the source directory.
pub const AGENT_DIR: &str = ".keyway";

#[derive(Debug, Clone)]
struct Cached {
    modified: Option<SystemTime>,
    len: u64,
    objects: Vec<Object>,
}

/// Reads the directory into a model, keeping each file's last good objects.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    cache: BTreeMap<PathBuf, Cached>,
    pub stats: Arc<SourceStats>,
    /// Where each file's last good text survives a restart.
    last_good: Option<LastGood>,
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

/// Why the directory cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot create {dir}: {source}", dir = dir.display())]
    Create {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch for changes (inotify): {0}")]
    Notify(#[from] notify::Error),
}

/// Why a file does not parse: which document (counting from 1), and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
    #[error("document {document}: {source}")]
    Yaml {
        document: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("document {document}{}: {source}", item.map(|i| format!(" item {i}")).unwrap_or_default())]
    Object {
        document: usize,
        /// Within a `List`.
        item: Option<usize>,
        #[source]
        source: ObjectError,
    },
}

/// Parses every document of one file; the first error fails the whole file (so a half-edited file
/// never applies half of itself).
pub fn parse_file(text: &str) -> Result<Vec<Object>, DocumentError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value =
            Value::deserialize(doc).map_err(|source| DocumentError::Yaml { document, source })?;
        // A `List` (as `kubectl get -o yaml` writes) holds its documents in `items`.
        let (items, listed) = match value.get("kind").and_then(Value::as_str) {
            Some("List") => (
                value
                    .get("items")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
                true,
            ),
            _ if value.is_null() => (Vec::new(), false),
            _ => (vec![value], false),
        };
        for (j, item) in items.into_iter().enumerate() {
            let item_no = listed.then_some(j + 1);
            let parsed = parse_object(item).map_err(|source| DocumentError::Object {
                document,
                item: item_no,
                source,
            })?;
            out.extend(parsed);
        }
    }
    Ok(out)
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> FileSource {
        FileSource {
            dir: dir.into(),
            cache: BTreeMap::new(),
            stats: Arc::default(),
            last_good: None,
        }
    }

    /// Keeps each file's last good text in `last_good` too, so that it outlives the agent.
    pub fn keeping(mut self, last_good: LastGood) -> FileSource {
        self.last_good = Some(last_good);
        self
    }

    /// What a file that does not parse (and has no last good objects in memory) stands for:
    /// its last good text kept on disk, if any.
    fn recalled(&self, f: &Path) -> Option<Vec<Object>> {
        let text = self.last_good.as_ref()?.recall_file(f)?;
        parse_file(&text).ok()
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
            let (text, parsed) = match std::fs::read_to_string(&f) {
                Ok(t) => {
                    let parsed = parse_file(&t);
                    (Some(t), parsed)
                }
                Err(e) => (None, Err(DocumentError::Read(e))),
            };
            match parsed {
                Ok(objects) => {
                    if let (Some(lg), Some(t)) = (&self.last_good, &text) {
                        lg.keep_file(&f, t);
                    }
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
                            let objects = match self.recalled(&f) {
                                Some(objects) => {
                                    tracing::error!(file = %f.display(), error = %e, "file does not parse; keeping its last good contents, kept from before a restart");
                                    objects
                                }
                                None => {
                                    tracing::error!(file = %f.display(), error = %e, "file does not parse; ignoring it until it does");
                                    Vec::new()
                                }
                            };
                            next.insert(
                                f,
                                Cached {
                                    modified,
                                    len,
                                    objects,
                                },
                            );
                        }
                    }
                }
            }
        }
        if let Some(lg) = &self.last_good {
            for gone in self.cache.keys().filter(|f| !next.contains_key(*f)) {
                lg.forget_file(gone);
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
    ) -> Result<(watch::Receiver<Arc<Model>>, Arc<SourceStats>), WatchError> {
        use notify::{RecursiveMode, Watcher};
        std::fs::create_dir_all(&self.dir).map_err(|source| WatchError::Create {
            dir: self.dir.clone(),
            source,
        })?;
        let stats = self.stats.clone();
        let (tx, rx) = watch::channel(Arc::new(self.load()));
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                // Only changes count: opening and reading the files (as every reload does, in every
                // agent sharing the directory) must not trigger another reload.
                if let Ok(ev) = res
                    && (ev.kind.is_create() || ev.kind.is_modify() || ev.kind.is_remove())
                {
                    let _ = ev_tx.send(());
                }
            })?;
        watcher.watch(&self.dir, RecursiveMode::Recursive)?;
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

/// Writes what an agent publishes into the source directory.
#[derive(Debug, Clone)]
pub struct FilePublisher {
    dir: PathBuf,
    node: String,
}

impl FilePublisher {
    pub fn new(dir: &Path, node: &str) -> FilePublisher {
        FilePublisher {
            dir: dir
                .join(AGENT_DIR)
                .join("attachments")
                .join(file_name_part(node)),
            node: node.to_string(),
        }
    }

    fn path(&self, pod: &ObjectKey) -> PathBuf {
        self.dir.join(format!(
            "{}.{}.yaml",
            file_name_part(&pod.namespace),
            file_name_part(&pod.name)
        ))
    }

    pub fn publish(&self, a: &OverlayAttachmentSpec) -> Result<(), PublishError> {
        let doc = serde_json::json!({
            "apiVersion": KEYWAY_API_VERSION,
            "kind": "OverlayAttachment",
            "metadata": {"name": format!("{}.{}", a.namespace, a.pod), "namespace": a.namespace},
            "spec": a,
        });
        let text = serde_yaml_ng::to_string(&doc).expect("an attachment serializes");
        let path = self.path(&ObjectKey::new(&a.namespace, &a.pod));
        write_atomic(&path, text.as_bytes(), 0o644)
            .map_err(|source| PublishError::File { path, source })
    }

    pub fn withdraw(&self, pod: &ObjectKey) -> Result<(), PublishError> {
        let path = self.path(pod);
        remove_if_present(&path).map_err(|source| PublishError::File { path, source })
    }

    /// Every attachment this node has published.
    pub fn published(&self) -> Vec<ObjectKey> {
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
                    out.push(ObjectKey::new(a.namespace, a.pod));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_testing::Scratch;

    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n";

    #[test]
    fn multi_document_files_in_subdirectories_load() {
        let t = Scratch::new("src-multi");
        std::fs::create_dir_all(t.join("sub")).unwrap();
        std::fs::write(
            t.join("sub/a.yaml"),
            format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n---\n{POLICY}"),
        )
        .unwrap();
        std::fs::write(t.join("notes.txt"), "not a document").unwrap();
        let m = FileSource::new(t.path()).load();
        assert!(m.namespaces.contains_key("x"));
        assert_eq!(m.policies.len(), 1);
    }

    #[test]
    fn a_file_that_stops_parsing_keeps_its_last_good_objects() {
        let t = Scratch::new("src-keep");
        let f = t.join("p.yaml");
        std::fs::write(&f, POLICY).unwrap();
        let mut src = FileSource::new(t.path());
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
    fn a_file_that_stops_parsing_keeps_its_last_good_objects_across_a_restart() {
        let t = Scratch::new("src-keep-restart");
        let dir = t.join("source");
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.yaml");
        std::fs::write(&f, POLICY).unwrap();
        let state = t.join("state");
        let mut src = FileSource::new(&dir).keeping(LastGood::new(&state));
        assert_eq!(src.load().policies.len(), 1);
        // The agent stops; the file is broken meanwhile; a new agent starts.
        std::fs::write(&f, "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny}\nspec: {podSelector: {matchExpressions: [{key: a, operator: In}]}}\n").unwrap();
        let mut after = FileSource::new(&dir).keeping(LastGood::new(&state));
        assert_eq!(
            after.load().policies.len(),
            1,
            "the last good version from before the restart is enforced"
        );
        let mut without = FileSource::new(&dir);
        assert!(
            without.load().policies.is_empty(),
            "what it would be without"
        );
        std::fs::remove_file(&f).unwrap();
        assert!(after.load().policies.is_empty());
        assert!(
            LastGood::new(&state).recall_file(&f).is_none(),
            "a removed file's last good text goes too"
        );
    }

    #[test]
    fn lists_and_errors_name_the_document() {
        let objs = parse_file("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n").unwrap();
        assert_eq!(objs.len(), 1);
        let e = parse_file("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [\n")
            .unwrap_err();
        assert!(matches!(e, DocumentError::Yaml { document: 2, .. }), "{e}");
        let e = parse_file("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod}\n")
            .unwrap_err();
        assert!(e.to_string().starts_with("document 1 item 1: "), "{e}");
    }

    #[test]
    fn published_attachments_round_trip() {
        let t = Scratch::new("src-pub");
        let p = FilePublisher::new(t.path(), "node-1");
        let a = OverlayAttachmentSpec {
            namespace: "x".into(),
            pod: "a".into(),
            node: "node-1".into(),
            infra_ip: "10.244.1.5".parse().unwrap(),
            overlay_ips: vec!["100.64.1.1".parse().unwrap()],
            proof: None,
        };
        p.publish(&a).unwrap();
        assert_eq!(p.published(), vec![ObjectKey::new("x", "a")]);
        let m = FileSource::new(t.path()).load();
        assert_eq!(m.attachments.values().next(), Some(&a));
        p.withdraw(&ObjectKey::new("x", "a")).unwrap();
        p.withdraw(&ObjectKey::new("x", "a")).unwrap();
        assert!(p.published().is_empty());
    }
}
