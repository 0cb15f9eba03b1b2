//! The last good version of what the sources read, kept on disk in the agent's state directory,
//! so that it survives a restart. A NetworkPolicy or ClusterConfig that stops parsing keeps its
//! last good version in force — in memory while the agent runs, and from here after a restart;
//! without this an object that no longer parses would not be enforced at all after a restart (a
//! policy that isolated a pod would be gone, opening it). Only the kinds whose absence opens
//! something are kept: NetworkPolicies (isolation) and ClusterConfig (strict mode). For the file
//! source, each file's last text that parsed.

use std::path::{Path, PathBuf};

use keyway_sap::io::fs::{file_name_part, remove_if_present, write_atomic};
use serde_json::Value;

use crate::model::{Kind, ObjectKey};

/// Where the last good versions are kept.
#[derive(Debug, Clone)]
pub struct LastGood {
    dir: PathBuf,
}

/// Whether `kind`'s last good versions are kept on disk.
pub fn kept(kind: Kind) -> bool {
    matches!(kind, Kind::NetworkPolicy | Kind::ClusterConfig)
}

impl LastGood {
    /// Kept under `state_dir/last-good`.
    pub fn new(state_dir: &Path) -> LastGood {
        LastGood {
            dir: state_dir.join("last-good"),
        }
    }

    fn object_path(&self, kind: Kind, key: &ObjectKey) -> PathBuf {
        self.dir.join(format!("{kind:?}")).join(format!(
            "{}.{}.json",
            file_name_part(&key.namespace),
            file_name_part(&key.name)
        ))
    }

    fn file_path(&self, file: &Path) -> PathBuf {
        self.dir
            .join("files")
            .join(file_name_part(&file.display().to_string()))
    }

    fn write(path: &Path, bytes: &[u8]) {
        if std::fs::read(path).is_ok_and(|old| old == bytes) {
            return;
        }
        if let Err(e) = write_atomic(path, bytes, 0o600) {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep the last good version");
        }
    }

    fn remove(path: &Path) {
        if let Err(e) = remove_if_present(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a last good version");
        }
    }

    /// Keeps `doc` as `kind`'s `key`'s last good version (when the kind is kept).
    pub fn keep(&self, kind: Kind, key: &ObjectKey, doc: &Value) {
        if kept(kind) {
            let text = serde_json::to_vec(doc).expect("a JSON value serializes");
            Self::write(&self.object_path(kind, key), &text);
        }
    }

    /// The last good version kept of `kind`'s `key`.
    pub fn recall(&self, kind: Kind, key: &ObjectKey) -> Option<Value> {
        let text = std::fs::read(self.object_path(kind, key)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The object is gone: so is its last good version.
    pub fn forget(&self, kind: Kind, key: &ObjectKey) {
        if kept(kind) {
            Self::remove(&self.object_path(kind, key));
        }
    }

    /// Keeps a source file's text that parsed.
    pub fn keep_file(&self, file: &Path, text: &str) {
        Self::write(&self.file_path(file), text.as_bytes());
    }

    /// The last text of `file` that parsed.
    pub fn recall_file(&self, file: &Path) -> Option<String> {
        std::fs::read_to_string(self.file_path(file)).ok()
    }

    /// The file is gone: so is its last good text.
    pub fn forget_file(&self, file: &Path) {
        Self::remove(&self.file_path(file));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_testing::Scratch;

    #[test]
    fn versions_are_kept_recalled_and_forgotten_for_the_kinds_that_close_things() {
        let t = Scratch::new("last-good");
        let lg = LastGood::new(t.path());
        let key = ObjectKey::new("x", "deny-all");
        let doc = serde_json::json!({"kind": "NetworkPolicy", "metadata": {"name": "deny-all"}});
        lg.keep(Kind::NetworkPolicy, &key, &doc);
        assert_eq!(
            LastGood::new(t.path()).recall(Kind::NetworkPolicy, &key),
            Some(doc.clone()),
            "a new agent finds it"
        );
        lg.keep(Kind::Pod, &key, &doc);
        assert_eq!(lg.recall(Kind::Pod, &key), None, "pods are not kept");
        lg.forget(Kind::NetworkPolicy, &key);
        assert_eq!(lg.recall(Kind::NetworkPolicy, &key), None);

        let file = Path::new("/src/policies.yaml");
        lg.keep_file(file, "kind: NetworkPolicy\n");
        assert_eq!(
            lg.recall_file(file).as_deref(),
            Some("kind: NetworkPolicy\n")
        );
        lg.forget_file(file);
        assert_eq!(lg.recall_file(file), None);
    }
}
