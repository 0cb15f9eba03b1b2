//! Where the model comes from, and where an agent publishes its pods' places on the overlay: the
//! `file` source (a directory of Kubernetes YAML, [`file`]) or the Kubernetes API ([`kube`]).
//! Both feed the same [`Model`](crate::model::Model) through the same parser.

pub mod file;
pub mod kube;
pub mod last_good;

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;

use crate::model::{ObjectKey, OverlayAttachmentSpec};

pub use file::{AGENT_DIR, FilePublisher, FileSource, parse_file};
pub use kube::KubePublisher;
pub use last_good::LastGood;

/// Counts what a source did, for metrics.
#[derive(Debug, Default)]
pub struct SourceStats {
    pub reloads: AtomicU64,
    pub errors: AtomicU64,
}

/// Why a publication failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot write {path}: {source}", path = path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the API server refused or did not answer: {0}")]
    Api(#[from] ::kube::Error),
}

/// Where an agent publishes its pods' places on the overlay, so every other agent can route to
/// them: files in the `file` source's directory, or pod annotations through the API server.
#[derive(Debug, Clone)]
pub enum Publisher {
    Files(FilePublisher),
    Kube(KubePublisher),
}

impl Publisher {
    pub async fn publish(&self, a: &OverlayAttachmentSpec) -> Result<(), PublishError> {
        match self {
            Publisher::Files(p) => p.publish(a),
            Publisher::Kube(p) => p.publish(a).await,
        }
    }

    /// Removes a publication; one that does not exist is success.
    pub async fn withdraw(&self, pod: &ObjectKey) -> Result<(), PublishError> {
        match self {
            Publisher::Files(p) => p.withdraw(pod),
            Publisher::Kube(p) => p.withdraw(pod).await,
        }
    }

    /// Every pod this node has published.
    pub fn published(&self) -> Vec<ObjectKey> {
        match self {
            Publisher::Files(p) => p.published(),
            Publisher::Kube(p) => p.published(),
        }
    }
}
