//! The agent: it takes pods from the plugin, runs an L3 endpoint for each, is the node's SaP, and
//! keeps the data plane's tables and every pod's firewall in step with the cluster's state.
//!
//! Locks, and what may wait under them:
//! - the state ([`State`]): held for a pure transition only, never across I/O or an `.await`;
//! - the claim lock: one block claim at a time (an API call), which only an allocation that
//!   found no free address waits for — blocks are claimed ahead, so that is rare;
//! - the compile lock: one compile-and-apply at a time (CPU, and nftables in pods' namespaces).
//!
//! The API server is never waited for by a handoff: publications go to a background queue
//! ([`Publications`]), and EndpointSlices, taints and reclaims run in their own loops
//! ([`crate::cluster`]). The data path never takes any of these locks.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyway_core::counters::Counters;
use keyway_core::engine::PacketAuth;
use keyway_core::key::{ClusterSecret, KeyRing, Rotation};
use keyway_core::tables::SharedTables;
use keyway_protocol::Code;
use keyway_protocol::handoff::{Ack, AddRequest, AllocateRequest, Attachment, PodRef};
use keyway_sap::io::now_ms;
use keyway_sap::sys::Netns;
use tokio::sync::watch;

use crate::claims::{ClaimError, Claims};
use crate::cluster::Publications;
use crate::compile::{self, KeyCache, LocalPod, NodeContext};
use crate::config::Config;
use crate::endpoints::{AttachError, Endpoints};
use crate::gateway::{NodeFacts, NodeTable};
use crate::metrics::{DirectionLabel, Metrics, ModeLabel, ReasonLabel, RequestLabel};
use crate::model::{Model, ObjectKey, OverlayNetwork};
use crate::records::{Attached, Record, StateDir, StoreError};
use crate::source::Publisher;
use crate::state::{Allocation, Effect, Refused, State};

/// Why a handoff request failed; each maps to the CNI code the plugin passes on.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("the agent is starting (state not synced yet)")]
    Starting,
    #[error("pod {0} is not in the cluster state yet")]
    UnknownPod(ObjectKey),
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("cannot get an overlay block: {0}")]
    Claim(#[from] ClaimError),
    #[error("cannot record the attachment: {0}")]
    Store(#[from] StoreError),
    #[error("cannot attach to the pod: {0}")]
    Attach(#[from] AttachError),
    #[error("the agent's endpoint for this pod has stopped")]
    Stopped,
    #[error("the agent has an allocation but no endpoint for this pod")]
    NoEndpoint,
    #[error("the agent has no record of this pod")]
    NoRecord,
}

impl HandoffError {
    pub fn code(&self) -> Code {
        match self {
            HandoffError::Starting | HandoffError::UnknownPod(_) => Code::TryAgainLater,
            HandoffError::Claim(ClaimError::Api(_)) => Code::TryAgainLater,
            HandoffError::Refused(r) => r.code(),
            HandoffError::Store(_) => Code::IoFailure,
            _ => Code::Other,
        }
    }
}

/// Why a pod the state directory lists cannot be served again after a restart.
#[derive(Debug, thiserror::Error)]
enum Gone {
    #[error(transparent)]
    Netns(#[from] keyway_sap::sys::NetnsError),
    #[error("{0} is now another namespace")]
    Replaced(String),
    #[error(transparent)]
    Attach(#[from] AttachError),
}

fn answer(r: Result<Ack, HandoffError>) -> Ack {
    r.unwrap_or_else(|e| Ack::error(e.code(), e.to_string()))
}

/// What an agent is made from.
#[derive(Debug)]
pub struct Parts {
    pub cfg: Config,
    pub node: NodeContext,
    pub model: watch::Receiver<Arc<Model>>,
    pub secret: ClusterSecret,
    pub counters: Arc<Counters>,
    pub metrics: Arc<Metrics>,
    pub claims: Claims,
    pub publisher: Publisher,
    pub publications: Publications,
}

/// What the compile lock guards.
#[derive(Debug)]
struct Compiler {
    keys: KeyCache,
    generation: u64,
}

/// The first retry of tables that could not be updated, and the longest wait between retries.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Agent {
    pub cfg: Config,
    pub node: NodeContext,
    pub tables: Arc<SharedTables>,
    pub metrics: Arc<Metrics>,
    model: watch::Receiver<Arc<Model>>,
    secret: ClusterSecret,
    store: StateDir,
    state: Mutex<State>,
    endpoints: Endpoints,
    claims: Claims,
    claiming: tokio::sync::Mutex<()>,
    publisher: Publisher,
    publications: Publications,
    compiler: tokio::sync::Mutex<Compiler>,
    /// The state version the tables in force were compiled from.
    compiled: AtomicU64,
    /// How many pods' tables the last reconcile could not update (the control loop retries soon).
    unapplied: AtomicU64,
    /// The node's gateway table, unless `--no-gateway`.
    gateway: Option<Arc<NodeTable>>,
    ready: watch::Sender<bool>,
}

impl Agent {
    pub fn new(p: Parts) -> Result<Arc<Agent>, StoreError> {
        let store = StateDir::new(&p.cfg.state_dir)?;
        let gateway = p.cfg.gateway.clone().map(|g| Arc::new(NodeTable::new(g)));
        let tables = SharedTables::new(Default::default());
        Ok(Arc::new(Agent {
            endpoints: Endpoints::new(
                tables.clone(),
                p.counters,
                p.cfg.gue_port,
                p.node.local_sap,
                p.cfg.gateway.as_ref().map(|_| crate::gateway::DEVICE),
                p.cfg.datapath,
                p.cfg
                    .socket
                    .parent()
                    .map_or_else(std::env::temp_dir, std::path::Path::to_path_buf),
            ),
            state: Mutex::new(State::new(&p.cfg.node_name)),
            compiler: tokio::sync::Mutex::new(Compiler {
                keys: KeyCache::new(p.secret.clone()).accepting_unattested(p.cfg.accept_unattested),
                generation: 0,
            }),
            tables,
            store,
            secret: p.secret,
            claims: p.claims,
            claiming: tokio::sync::Mutex::new(()),
            publisher: p.publisher,
            publications: p.publications,
            cfg: p.cfg,
            node: p.node,
            metrics: p.metrics,
            model: p.model,
            compiled: AtomicU64::new(0),
            unapplied: AtomicU64::new(0),
            gateway,
            ready: watch::channel(false).0,
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Becomes true once the agent serves (state synced, pods re-attached).
    /// Keeps every pod's kernel fast path in step with the engine, every second: keys and
    /// lease, flows judged again and idle ones handed back, the kernel's counts added to the
    /// agent's. Runs for the agent's life.
    pub async fn fast_path_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let node = self.endpoints.sync_fast(true).await;
            // (With what the syncs after compiles found: those go uncounted otherwise.)
            let carried = self.endpoints.take_carried();
            for (direction, packets, bytes) in [
                ("egress", carried.egress_packets, carried.egress_bytes),
                ("ingress", carried.ingress_packets, carried.ingress_bytes),
            ] {
                let label = DirectionLabel { direction };
                self.metrics
                    .fastpath_pod_packets
                    .get_or_create(&label)
                    .inc_by(packets);
                self.metrics
                    .fastpath_pod_bytes
                    .get_or_create(&label)
                    .inc_by(bytes);
            }
            self.metrics
                .fastpath_pod_policy_packets
                .inc_by(carried.compiled);
            self.metrics.fastpath_pods.set(self.endpoints.fast() as i64);
            self.metrics
                .fastpath_pods_adopted
                .set(self.endpoints.fast_adopted() as i64);
            self.metrics
                .fastpath_node_adopted
                .set(i64::from(self.endpoints.node_adopted()));
            self.metrics.fastpath_sap_flows.set(node.flows.kept as i64);
            self.metrics.fastpath_sap_datagrams.inc_by(node.forwarded);
            self.metrics
                .fastpath_sap_policy_pairs
                .set(node.policy.pairs as i64);
            self.metrics
                .fastpath_sap_policy_datagrams
                .inc_by(node.policy.forwarded);
            self.metrics
                .fastpath_gateway_flows
                .set(node.gateway.kept as i64);
            self.metrics
                .fastpath_gateway_packets
                .inc_by(node.gateway_forwarded);
        }
    }

    /// Where the node's kernel fast path is once a pod's loads it: the SaP teaches it flows.
    pub fn node_fast_path(&self) -> keyway_sap::io::fastpath::NodeFastSlot {
        self.endpoints.node_fast_path()
    }

    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// The key rotation in force: the cluster's ClusterConfig, else the agent's flags.
    fn rotation(&self, model: &Model) -> Rotation {
        let c = model.config();
        if c.key_rotation_seconds.is_none() && c.key_grace_seconds.is_none() {
            return self.node.rotation;
        }
        let period = c
            .key_rotation_seconds
            .map_or(self.node.rotation.period_ms(), |s| s * 1000);
        let grace = c
            .key_grace_seconds
            .map_or(self.node.rotation.grace_ms(), |s| s * 1000);
        Rotation::new(period, grace).unwrap_or_else(|e| {
            tracing::error!(error = %e, "ClusterConfig key rotation is invalid; keeping the agent's");
            self.node.rotation
        })
    }

    fn keys_of(&self, record: &Record) -> KeyRing {
        let rotation = self.rotation(&self.model.borrow());
        KeyRing::derive(&self.secret, &record.entity(), rotation, now_ms())
    }

    /// Runs the effects of a transition: disk first (the caller answers only once they are
    /// durable), endpoints, then publications, which are queued and never waited for.
    async fn run(&self, effects: Vec<Effect>) -> Result<(), StoreError> {
        for e in effects {
            match e {
                Effect::Save(r) => self.store.save(&r)?,
                Effect::Forget(att) => {
                    if let Err(e) = self.store.remove(&att) {
                        tracing::error!(error = %e, "cannot remove the attachment record");
                    }
                }
                Effect::Publish(spec) => self.publications.publish(spec.attest(&self.secret)),
                Effect::Withdraw(pod) => self.publications.withdraw(pod),
                Effect::Stop(att) => self.endpoints.stop(&att),
                Effect::Teardown {
                    attachment,
                    devices,
                } => self.endpoints.teardown(&attachment, devices).await,
            }
        }
        Ok(())
    }

    /// Compiles the state and the model, publishes the tables, refreshes each endpoint's keys
    /// and applies egress rules that changed — unless tables at least as new as `version` are
    /// already in force (`None`: always).
    async fn reconcile(&self, version: Option<u64>) {
        let mut c = self.compiler.lock().await;
        if version.is_some_and(|v| self.compiled.load(Ordering::Acquire) >= v) {
            return;
        }
        let started = Instant::now();
        let (locals, v) = {
            let s = self.state();
            (s.locals(), s.version())
        };
        let model = self.model.borrow().clone();
        let mut node = self.node.clone();
        node.rotation = self.rotation(&model);
        let epoch = node.rotation.epoch_at(now_ms()).0;
        self.metrics
            .key_epoch
            .set(i64::try_from(epoch).unwrap_or(i64::MAX));
        c.generation += 1;
        let generation = c.generation;
        let mut compiled =
            compile::compile(&model, &locals, &node, &mut c.keys, now_ms(), generation);
        self.metrics.identities.set(compiled.identities as i64);
        for why in crate::compile::Refusal::ALL {
            let n = compiled.refused.iter().filter(|(_, r)| *r == why).count();
            self.metrics
                .attachments_refused
                .get_or_create(&ReasonLabel {
                    reason: why.as_str(),
                })
                .set(n as i64);
        }
        self.metrics
            .fib_entries
            .set(compiled.tables.fib.len() as i64);
        let in_force = compiled.tables.packet_auth;
        if self.tables.load().packet_auth != in_force {
            tracing::info!(
                mode = in_force.as_str(),
                "packet authentication mode in force"
            );
        }
        for mode in PacketAuth::ALL {
            self.metrics
                .packet_authentication
                .get_or_create(&ModeLabel {
                    mode: mode.as_str(),
                })
                .set(i64::from(mode == in_force));
        }
        self.tables.publish(std::mem::take(&mut compiled.tables));
        let mut failed = self.endpoints.apply(&compiled).await;
        failed += self.apply_gateway(&locals).await;
        self.metrics.egress_apply_errors.inc_by(failed as u64);
        self.unapplied.store(failed as u64, Ordering::Release);
        self.compiled.store(v, Ordering::Release);
        self.metrics.policy_generation.set(c.generation as i64);
        self.metrics.pods.set(self.endpoints.len() as i64);
        self.metrics
            .compile_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            generation = c.generation,
            pods = locals.len(),
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "tables published"
        );
    }

    /// Steers what reaches this node's protected pods from off the overlay into the gateway;
    /// 1 when the table could not be installed (retried with the pods' tables).
    async fn apply_gateway(&self, locals: &[LocalPod]) -> usize {
        let Some(gw) = self.gateway.clone() else {
            return 0;
        };
        let bridges = gw.bridges().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot list the node's bridges; same-bridge pods will not reach the gateway");
            Vec::new()
        });
        let facts = NodeFacts {
            pods: locals.iter().map(|l| l.infra_ip).collect(),
            bridges,
        };
        match tokio::task::spawn_blocking(move || gw.apply(facts)).await {
            Ok(Ok(())) => 0,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot install the gateway table; will retry");
                1
            }
            Err(_) => 1,
        }
    }

    /// Waits (up to the configured time) for a pod to appear in the state.
    async fn wait_for_pod(&self, key: &ObjectKey) -> bool {
        let mut rx = self.model.clone();
        let deadline = tokio::time::Instant::now() + self.cfg.pod_wait;
        loop {
            if rx.borrow_and_update().pods.contains_key(key) {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    /// Makes sure this node has a free address in `net`: finds the blocks it already holds, or
    /// claims the next one. One claim at a time; the state lock is not held across it.
    async fn obtain_block(&self, net: &OverlayNetwork, spare: bool) -> Result<(), ClaimError> {
        let _one = self.claiming.lock().await;
        let needed = |s: &State| {
            if spare {
                s.ipam.running_low(net)
            } else {
                !s.ipam.has_free(net)
            }
        };
        if !self.state().ipam.knows(&net.name) {
            let held = self.claims.held(&net.name, &self.cfg.node_name).await?;
            self.state().ipam.add_blocks(&net.name, held);
        }
        if !needed(&self.state()) {
            return Ok(());
        }
        let idx = self.claims.claim_next(net, &self.cfg.node_name).await?;
        self.state().ipam.add_blocks(&net.name, [idx]);
        Ok(())
    }

    /// Claims the next block of every network running low, in the background, so that no ADD
    /// has to wait for a claim.
    fn keep_spare(self: &Arc<Self>, networks: &[OverlayNetwork]) {
        for net in networks {
            if !self.state().ipam.running_low(net) {
                continue;
            }
            let (me, net) = (self.clone(), net.clone());
            tokio::spawn(async move {
                if let Err(e) = me.obtain_block(&net, true).await {
                    tracing::warn!(network = %net.name, error = %e, "cannot claim a spare overlay block");
                }
            });
        }
    }

    pub async fn allocate(self: &Arc<Self>, req: AllocateRequest) -> Ack {
        answer(self.try_allocate(req).await)
    }

    async fn try_allocate(self: &Arc<Self>, req: AllocateRequest) -> Result<Ack, HandoffError> {
        if !self.is_ready() {
            return Err(HandoffError::Starting);
        }
        let key = req
            .pod
            .is_kubernetes()
            .then(|| ObjectKey::new(&req.pod.namespace, &req.pod.name));
        if let Some(k) = &key
            && !self.wait_for_pod(k).await
        {
            return Err(HandoffError::UnknownPod(k.clone()));
        }
        if let Some(k) = &key
            && compile::opted_out(&self.model.borrow(), k)
        {
            tracing::info!(pod = %k, "the pod opted out of keyway (keyway.io/enabled=false): left to the primary CNI");
            return Ok(Ack {
                excluded: true,
                ..Ack::ok()
            });
        }
        let networks = compile::networks_for(&self.model.borrow(), key.as_ref());
        let record = loop {
            let step = self.state().allocate(&req, &networks)?;
            match step {
                Allocation::Existing(networks) => {
                    return Ok(Ack {
                        networks,
                        ..Ack::ok()
                    });
                }
                Allocation::New(record) => break record,
                Allocation::NeedBlock(net) => self.obtain_block(&net, false).await?,
            }
        };
        if let Err(e) = self.store.save(&record) {
            self.state().allocation_lost(&req.attachment);
            return Err(e.into());
        }
        self.keep_spare(&networks);
        Ok(Ack {
            networks: record.networks,
            ..Ack::ok()
        })
    }

    pub async fn add(&self, req: AddRequest, netns: Netns) -> Ack {
        answer(self.try_add(req, netns).await)
    }

    async fn try_add(&self, req: AddRequest, netns: Netns) -> Result<Ack, HandoffError> {
        if !self.is_ready() {
            return Err(HandoffError::Starting);
        }
        let record = self.state().check_add(&req)?;
        if self.endpoints.serves(&req.attachment, netns.id()) {
            return Ok(Ack::ok());
        }
        let attached = Attached {
            netns_path: req.netns_path.clone(),
            netns_id: netns.id(),
            infra_ip: req.infra_ip,
            mtu: req.mtu,
            node_addresses: req.node_addresses.clone(),
        };
        let ep = self
            .endpoints
            .open(&record, &attached, netns, self.keys_of(&record))
            .await?;
        self.endpoints.insert(req.attachment.clone(), ep);
        let attached = {
            let mut s = self.state();
            s.attached(&req.attachment, attached)
                .map(|e| (e, s.version()))
        };
        let (effects, version) = attached.inspect_err(|_| self.endpoints.stop(&req.attachment))?;
        self.run(effects).await?;
        // Policy in force, egress rules applied, before the pod is let go.
        self.reconcile(Some(version)).await;
        tracing::info!(pod = %record.entity(), container = %req.attachment.container_id, "pod attached");
        Ok(Ack::ok())
    }

    pub async fn delete(&self, att: &Attachment) -> Ack {
        let forgotten = self.state().forget(att, false);
        let Some((record, effects)) = forgotten else {
            return Ack::ok();
        };
        let version = self.state().version();
        if let Err(e) = self.run(effects).await {
            tracing::error!(error = %e, "cannot remove the attachment record");
        }
        self.reconcile(Some(version)).await;
        tracing::info!(container = %att.container_id, "pod detached");
        Ack {
            networks: record.networks,
            ..Ack::ok()
        }
    }

    pub async fn check(&self, att: &Attachment, pod: Option<&PodRef>) -> Ack {
        let networks = self.state().record(att).map(|r| r.networks.clone());
        let excluded = || {
            pod.filter(|p| p.is_kubernetes()).is_some_and(|p| {
                compile::opted_out(&self.model.borrow(), &ObjectKey::new(&p.namespace, &p.name))
            })
        };
        let r = match (networks, self.endpoints.status(att)) {
            (None, _) if excluded() => Ok(Ack {
                excluded: true,
                ..Ack::ok()
            }),
            (Some(networks), Some(true)) => Ok(Ack {
                networks,
                ..Ack::ok()
            }),
            (Some(_), Some(false)) => Err(HandoffError::Stopped),
            (Some(_), None) => Err(HandoffError::NoEndpoint),
            (None, _) => Err(HandoffError::NoRecord),
        };
        answer(r)
    }

    /// GC: forgets every attachment not in `keep`, removing its devices and table if its
    /// namespace still exists.
    pub async fn gc(&self, keep: &BTreeSet<Attachment>) -> Ack {
        let (removed, effects, version) = {
            let mut s = self.state();
            let (removed, effects) = s.collect_garbage(keep);
            (removed, effects, s.version())
        };
        if let Err(e) = self.run(effects).await {
            tracing::error!(error = %e, "GC: cannot remove a record");
        }
        for r in &removed {
            tracing::info!(container = %r.attachment.container_id, "GC: forgot a stale attachment");
        }
        if !removed.is_empty() {
            self.reconcile(Some(version)).await;
        }
        Ack {
            removed: removed.len() as u32,
            ..Ack::ok()
        }
    }

    /// Re-attaches to one restored record's pod; why not, when it is gone.
    async fn reattach(&self, r: &Record) -> Result<(), Gone> {
        let Some(a) = &r.attached else {
            // Allocated but never handed over: keep the addresses until DEL or GC.
            return Ok(());
        };
        let netns = Netns::open(&a.netns_path)?;
        if netns.id() != a.netns_id {
            return Err(Gone::Replaced(a.netns_path.clone()));
        }
        let ep = self.endpoints.open(r, a, netns, self.keys_of(r)).await?;
        self.endpoints.insert(r.attachment.clone(), ep);
        Ok(())
    }

    async fn forget_gone(&self, r: &Record, why: &Gone) {
        tracing::info!(container = %r.attachment.container_id, reason = %why, "pod is gone; forgetting it");
        let forgotten = self.state().forget(&r.attachment, false);
        if let Some((_, effects)) = forgotten {
            let _ = self.run(effects).await;
        }
    }

    /// Retries re-attaching, backing off up to 30 s, until each pod is served again or gone
    /// (or deleted meanwhile: DEL forgets it).
    async fn retry_reattach(self: Arc<Self>, mut pending: Vec<Record>) {
        let mut delay = RETRY_FIRST;
        while !pending.is_empty() {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
            let mut still = Vec::new();
            for r in pending {
                if self.state().record(&r.attachment).is_none() {
                    continue;
                }
                match self.reattach(&r).await {
                    Ok(()) => {
                        tracing::info!(container = %r.attachment.container_id, "re-attached");
                        self.reconcile(None).await;
                    }
                    Err(Gone::Attach(_)) => {
                        self.metrics.reattach_failures.inc();
                        still.push(r);
                    }
                    Err(why) => self.forget_gone(&r, &why).await,
                }
            }
            pending = still;
        }
    }

    /// At start-up: re-attach to every pod the state directory lists, forget those that are gone,
    /// make sure every network has a free address, compile, and only then report ready. A pod
    /// whose namespace is still there but cannot be re-attached (its GUE port taken by a
    /// workload, say) is not forgotten — its address is never given away — and is retried.
    pub async fn restore(self: &Arc<Self>) {
        let started = Instant::now();
        let records = self.store.load_all();
        self.state().restore(records.clone());
        let mut reattached = 0;
        let mut pending = Vec::new();
        for r in &records {
            match self.reattach(r).await {
                Ok(()) if r.attached.is_some() => reattached += 1,
                Ok(()) => {}
                Err(Gone::Attach(e)) => {
                    tracing::warn!(container = %r.attachment.container_id, error = %e, "cannot re-attach to a pod that is still there; keeping it, retrying");
                    self.metrics.reattach_failures.inc();
                    pending.push(r.clone());
                }
                Err(why) => self.forget_gone(r, &why).await,
            }
        }
        if !pending.is_empty() {
            tokio::spawn(self.clone().retry_reattach(pending));
        }
        self.republish();
        let networks = self.model.borrow().overlay_networks();
        for net in networks {
            if let Err(e) = self.obtain_block(&net, true).await {
                tracing::warn!(network = %net.name, error = %e, "no overlay block yet; the first ADD will claim one");
            }
        }
        self.reconcile(None).await;
        self.ready.send_replace(true);
        self.metrics.ready.set(1);
        tracing::info!(
            reattached,
            took_ms = started.elapsed().as_millis() as u64,
            "agent ready"
        );
    }

    /// Publishes every pod this node serves, and withdraws what it published for pods it no
    /// longer serves (deleted while the agent was down).
    fn republish(&self) {
        let (served, specs): (BTreeSet<ObjectKey>, Vec<_>) = {
            let s = self.state();
            let specs = s
                .records()
                .filter_map(|r| s.publication(&r.attachment))
                .collect();
            (s.served(), specs)
        };
        for spec in specs {
            self.publications.publish(spec.attest(&self.secret));
        }
        for pod in self.publisher.published() {
            if !served.contains(&pod) {
                self.publications.withdraw(pod);
            }
        }
    }

    /// Recompiles on every state change, and at least a few times per key epoch so keys stay
    /// current; when pods' tables could not be updated, again soon (1 s, doubling to 30 s).
    /// Runs until the state source ends.
    pub async fn control_loop(self: Arc<Self>) {
        let mut rx = self.model.clone();
        let mut retry = RETRY_FIRST;
        loop {
            let period = self.rotation(&rx.borrow()).period_ms() / 4;
            let mut period = Duration::from_millis(period.max(1000));
            if self.unapplied.load(Ordering::Acquire) > 0 {
                period = period.min(retry);
                retry = (retry * 2).min(RETRY_MAX);
            } else {
                retry = RETRY_FIRST;
            }
            if let Ok(Err(_)) = tokio::time::timeout(period, rx.changed()).await {
                return;
            }
            self.reconcile(None).await;
        }
    }

    pub fn observe(&self, request: &'static str, started: Instant, ack: &Ack) {
        let l = RequestLabel { request };
        self.metrics
            .handoff_seconds
            .get_or_create(&l)
            .observe(started.elapsed().as_secs_f64());
        if ack.error.is_some() {
            self.metrics.handoff_errors.get_or_create(&l).inc();
        }
    }

    /// A JSON view of the attachments, for `/debug/attachments` and the lab.
    pub fn describe(&self) -> serde_json::Value {
        let s = self.state();
        let list: Vec<serde_json::Value> = s
            .records()
            .map(|r| {
                serde_json::json!({
                    "containerId": r.attachment.container_id,
                    "ifname": r.attachment.ifname,
                    "namespace": r.pod.namespace,
                    "pod": r.pod.name,
                    "entity": &*r.entity(),
                    "overlayIps": r.networks.iter().map(|g| g.address.ip().to_string()).collect::<Vec<_>>(),
                    "devices": r.networks.iter().map(|g| g.device.clone()).collect::<Vec<_>>(),
                    "infraIp": r.attached.as_ref().map(|a| a.infra_ip.to_string()),
                    "netns": r.attached.as_ref().map(|a| a.netns_path.clone()),
                    "running": self.endpoints.status(&r.attachment) == Some(true),
                    "egress": self.endpoints.applied(&r.attachment).map(|e| format!("{e:?}")),
                })
            })
            .collect();
        serde_json::json!({
            "node": self.cfg.node_name,
            "stateVersion": s.version(),
            "ready": self.is_ready(),
            "addressesInUse": s.ipam.in_use(),
            "attachments": list,
        })
    }
}
