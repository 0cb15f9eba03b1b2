//! The agent's work with the cluster that no handoff waits for, each in a loop of its own:
//! - [`Publications`]: pods' places on the overlay, published and withdrawn in the background,
//!   retried with a backoff, the latest word on a pod winning;
//! - [`lift_taint`]: the node's `keyway.io/not-ready` taint, lifted once the agent is ready;
//! - [`reclaim`]: the overlay blocks and EndpointSlices of nodes that have left, every minute;
//! - [`sync_slices`]: this node's EndpointSlices of covered Services, on every model change.
//!
//! A slow or absent API server delays these, never a pod's ADD.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::claims::KubeClaims;
use crate::kube_node;
use crate::metrics::{Metrics, WriteLabel};
use crate::model::{Model, ObjectKey, OverlayAttachmentSpec};
use crate::slices;
use crate::source::Publisher;

/// How often and how patiently the loops work.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Between reclaims, and between repairs of the EndpointSlices when nothing changes.
    pub resync: Duration,
    /// How long a burst of model changes (a rollout) is let settle before one write per slice.
    pub settle: Duration,
    /// The first wait after an error; it doubles up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            resync: Duration::from_secs(60),
            settle: Duration::from_millis(200),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl Timing {
    fn next(&self, backoff: Duration) -> Duration {
        (backoff * 2).min(self.max_backoff)
    }
}

/// What to say of a pod.
#[derive(Debug, Clone, PartialEq)]
enum Intent {
    Publish(OverlayAttachmentSpec),
    Withdraw,
}

/// The queue of publications, served by one background task.
#[derive(Debug, Clone)]
pub struct Publications {
    tx: mpsc::UnboundedSender<(ObjectKey, Intent)>,
}

impl Publications {
    /// Starts the task that tells `publisher` what is queued.
    pub fn spawn(publisher: Publisher, metrics: Arc<Metrics>, timing: Timing) -> Publications {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(publish(publisher, rx, metrics, timing));
        Publications { tx }
    }

    pub fn publish(&self, spec: OverlayAttachmentSpec) {
        let pod = ObjectKey::new(&spec.namespace, &spec.pod);
        let _ = self.tx.send((pod, Intent::Publish(spec)));
    }

    pub fn withdraw(&self, pod: ObjectKey) {
        let _ = self.tx.send((pod, Intent::Withdraw));
    }
}

/// Serves the queue: one pod at a time, the latest intent per pod; a failure goes back to the
/// queue (unless a newer intent came) and the task waits before the next attempt.
async fn publish(
    publisher: Publisher,
    mut rx: mpsc::UnboundedReceiver<(ObjectKey, Intent)>,
    metrics: Arc<Metrics>,
    timing: Timing,
) {
    let mut pending: BTreeMap<ObjectKey, Intent> = BTreeMap::new();
    let mut backoff = timing.backoff;
    loop {
        if pending.is_empty() {
            let Some((pod, intent)) = rx.recv().await else {
                return;
            };
            pending.insert(pod, intent);
        }
        while let Ok((pod, intent)) = rx.try_recv() {
            pending.insert(pod, intent);
        }
        let Some((pod, intent)) = pending.pop_first() else {
            continue;
        };
        let (op, result) = match &intent {
            Intent::Publish(spec) => ("publish", publisher.publish(spec).await),
            Intent::Withdraw => ("withdraw", publisher.withdraw(&pod).await),
        };
        match result {
            Ok(()) => {
                backoff = timing.backoff;
                metrics.publications.get_or_create(&WriteLabel { op }).inc();
                tracing::debug!(%pod, op, "published");
            }
            Err(e) => {
                metrics.publication_errors.inc();
                tracing::warn!(%pod, op, error = %e, retry_in = ?backoff, "cannot tell the cluster where the pod is; will retry");
                pending.entry(pod).or_insert(intent);
                tokio::time::sleep(backoff).await;
                backoff = timing.next(backoff);
            }
        }
    }
}

/// Removes the node's not-ready taint once `ready`, retrying until it is done.
pub async fn lift_taint(
    client: kube::Client,
    node: String,
    mut ready: watch::Receiver<bool>,
    timing: Timing,
) {
    if ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    let mut backoff = timing.backoff;
    while let Err(e) = kube_node::lift_taint(client.clone(), &node).await {
        tracing::warn!(error = %e, retry_in = ?backoff, "cannot lift the node's taint yet");
        tokio::time::sleep(backoff).await;
        backoff = timing.next(backoff);
    }
}

/// Once ready, then every `resync`: deletes the overlay blocks and EndpointSlices of nodes that
/// are not in the model. A model with no nodes is no view of the cluster, not an empty cluster:
/// then nothing is reclaimed.
pub async fn reclaim(
    client: kube::Client,
    model: watch::Receiver<Arc<Model>>,
    mut ready: watch::Receiver<bool>,
    timing: Timing,
) {
    if ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    let claims = KubeClaims::new(client.clone());
    let mut every = tokio::time::interval(timing.resync);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let live: BTreeSet<String> = model.borrow().nodes.keys().cloned().collect();
        if live.is_empty() {
            continue;
        }
        if let Err(e) = claims.reclaim(&live).await {
            tracing::warn!(error = %e, "cannot reclaim the blocks of departed nodes");
        }
        match slices::reclaim(client.clone(), &live).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(slices = n, "removed the EndpointSlices of departed nodes"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot remove the EndpointSlices of departed nodes")
            }
        }
    }
}

/// Once ready: keeps this node's EndpointSlices of covered Services in step with the model, on
/// every change and every `resync` (to repair edits by hand); backs off on errors.
pub async fn sync_slices(
    client: kube::Client,
    node: String,
    mut model: watch::Receiver<Arc<Model>>,
    mut ready: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    timing: Timing,
) {
    if ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    let mut backoff = timing.backoff;
    loop {
        let desired = slices::desired(&model.borrow_and_update(), &node);
        match slices::sync(client.clone(), &node, desired).await {
            Ok(r) => {
                backoff = timing.backoff;
                let m = &metrics.endpointslice_writes;
                m.get_or_create(&WriteLabel { op: "apply" })
                    .inc_by(r.applied as u64);
                m.get_or_create(&WriteLabel { op: "delete" })
                    .inc_by(r.deleted as u64);
                let _ = tokio::time::timeout(timing.resync, model.changed()).await;
                tokio::time::sleep(timing.settle).await;
            }
            Err(e) => {
                metrics.endpointslice_errors.inc();
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot update this node's EndpointSlices");
                tokio::time::sleep(backoff).await;
                backoff = timing.next(backoff);
            }
        }
    }
}

/// Starts every loop a node on a cluster runs besides the publications.
pub fn spawn_all(
    client: kube::Client,
    node: &str,
    model: watch::Receiver<Arc<Model>>,
    ready: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    timing: Timing,
) {
    tokio::spawn(lift_taint(
        client.clone(),
        node.to_string(),
        ready.clone(),
        timing,
    ));
    tokio::spawn(reclaim(
        client.clone(),
        model.clone(),
        ready.clone(),
        timing,
    ));
    tokio::spawn(sync_slices(
        client,
        node.to_string(),
        model,
        ready,
        metrics,
        timing,
    ));
}

#[cfg(test)]
mod tests;
