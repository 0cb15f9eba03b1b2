//! The agent: it takes pods from the plugin, runs an L3 endpoint for each, is the node's SaP, and
//! keeps the data plane's tables and every pod's firewall in step with the cluster's state.
//!
//! One lock guards the attachments, the IPAM and the key cache; requests and reconciles take it in
//! turn, so a pod is never half-attached when policy is compiled. The data path never takes it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use keyway_cni::firewall::{self, Egress, PodFirewall};
use keyway_cni::handoff::{Ack, AddRequest, AllocateRequest, Attachment, NetworkGrant};
use keyway_cni::spec::Code;
use keyway_sap::counters::Counters;
use keyway_sap::engine::LocalEndpoint;
use keyway_sap::flow::{FlowTable, FlowTimeouts};
use keyway_sap::io::datapath::EndpointContext;
use keyway_sap::io::endpoint::{self, Running};
use keyway_sap::io::{nft, now_ms, udp::GUE_MARK};
use keyway_sap::key::{ClusterSecret, KeyRing, Rotation};
use keyway_sap::sys::Netns;
use keyway_sap::tables::{SharedLocal, SharedTables};
use tokio::sync::{Mutex, watch};

use crate::compile::{self, KeyCache, LocalPod, NodeContext, pod_entity};
use crate::config::Config;
use crate::ipam::BlockClaims;
use crate::ipam::Ipam;
use crate::metrics::{Metrics, RequestLabel};
use crate::model::{Model, OverlayAttachmentSpec, PodKey};
use crate::records::{Attached, Record, StateDir};
use crate::source::Publisher;

/// Flow-table size per endpoint.
const FLOWS_PER_ENDPOINT: usize = 16 * 1024;

/// A running endpoint and what it takes to keep its pod's firewall current.
struct Endpoint {
    entity: Arc<str>,
    local: Arc<SharedLocal>,
    running: Running,
    nft: Arc<StdMutex<nft::Socket>>,
    firewall: PodFirewall,
    /// The egress rules last applied; `None` when unknown (re-apply).
    applied: Option<Egress>,
    netns: Netns,
}

struct Inner {
    records: BTreeMap<Attachment, Record>,
    endpoints: BTreeMap<Attachment, Endpoint>,
    ipam: Ipam,
    keys: KeyCache,
    generation: u64,
}

/// What a restart found for one record.
enum Restored {
    Attached(Box<Endpoint>),
    /// The pod is gone (namespace or device): forget it.
    Gone(String),
    /// Allocated but never handed over: keep the addresses until DEL or GC.
    Allocated,
}

pub struct Agent {
    pub cfg: Config,
    pub node: NodeContext,
    pub tables: Arc<SharedTables>,
    pub counters: Arc<Counters>,
    pub metrics: Arc<Metrics>,
    model: watch::Receiver<Arc<Model>>,
    publisher: Box<dyn Publisher>,
    store: StateDir,
    inner: Mutex<Inner>,
    ready: AtomicBool,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn error_ack(code: Code, message: impl Into<String>) -> Ack {
    Ack::error(code as u32, message)
}

/// Reads the cluster secret, creating one (with a warning) when the file does not exist.
pub fn load_secret(path: &std::path::Path) -> Result<ClusterSecret, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = vec![0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
                .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
            crate::source::write_atomic(path, &b)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            tracing::warn!(path = %path.display(), "no cluster secret: created one. Every node of a cluster must share the same secret.");
            b
        }
        Err(e) => {
            return Err(format!(
                "cannot read the cluster secret {}: {e}",
                path.display()
            ));
        }
    };
    ClusterSecret::new(bytes).map_err(|e| format!("{}: {e}", path.display()))
}

impl Agent {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        node: NodeContext,
        model: watch::Receiver<Arc<Model>>,
        secret: ClusterSecret,
        counters: Arc<Counters>,
        metrics: Arc<Metrics>,
        claims: Box<dyn BlockClaims>,
        publisher: Box<dyn Publisher>,
    ) -> std::io::Result<Arc<Agent>> {
        let store = StateDir::new(&cfg.state_dir)?;
        Ok(Arc::new(Agent {
            publisher,
            inner: Mutex::new(Inner {
                records: BTreeMap::new(),
                endpoints: BTreeMap::new(),
                ipam: Ipam::new(&cfg.node_name, claims),
                keys: KeyCache::new(secret),
                generation: 0,
            }),
            tables: SharedTables::new(Default::default()),
            store,
            cfg,
            node,
            counters,
            metrics,
            model,
            ready: AtomicBool::new(false),
        }))
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn rotation(&self, model: &Model) -> Rotation {
        match (
            model.config.key_rotation_seconds,
            model.config.key_grace_seconds,
        ) {
            (None, None) => self.node.rotation,
            (p, g) => {
                let period = p.map_or(self.node.rotation.period_ms(), |s| s * 1000);
                let grace = g.map_or(self.node.rotation.grace_ms(), |s| s * 1000);
                Rotation::new(period, grace).unwrap_or_else(|e| {
                    tracing::error!(error = %e, "ClusterConfig key rotation is invalid; keeping the agent's");
                    self.node.rotation
                })
            }
        }
    }

    fn local_endpoint(
        &self,
        entity: &Arc<str>,
        record: &Record,
        attached: &Attached,
        keys: KeyRing,
    ) -> LocalEndpoint {
        LocalEndpoint {
            entity: entity.clone(),
            overlay_ips: record.networks.iter().map(|g| g.address.ip()).collect(),
            infra: SocketAddr::new(attached.infra_ip, self.cfg.gue_port),
            keys,
            local_sap: self.node.local_sap,
        }
    }

    /// Compiles the state and this node's attachments, publishes the tables, refreshes each
    /// endpoint's keys and applies egress rules that changed.
    async fn reconcile(&self, inner: &mut Inner) {
        let started = Instant::now();
        let model = self.model.borrow().clone();
        let mut node = self.node.clone();
        node.rotation = self.rotation(&model);
        let locals: Vec<LocalPod> = inner
            .endpoints
            .keys()
            .filter_map(|att| {
                let r = inner.records.get(att)?;
                Some(LocalPod {
                    entity: inner.endpoints[att].entity.clone(),
                    pod: r.pod.is_kubernetes().then(|| PodKey {
                        namespace: r.pod.namespace.clone(),
                        name: r.pod.name.clone(),
                    }),
                    overlay_ips: r.networks.iter().map(|g| g.address.ip()).collect(),
                    infra_ip: r.attached.as_ref()?.infra_ip,
                })
            })
            .collect();
        inner.generation += 1;
        let compiled = compile::compile(
            &model,
            &locals,
            &node,
            &mut inner.keys,
            now_ms(),
            inner.generation,
        );
        self.metrics.identities.set(compiled.identities as i64);
        self.metrics
            .fib_entries
            .set(compiled.tables.fib.len() as i64);
        self.tables.publish(compiled.tables);

        let mut changes = Vec::new();
        for (att, ep) in inner.endpoints.iter_mut() {
            if let Some(keys) = compiled.local_keys.get(&ep.entity) {
                let cur = ep.local.load();
                if cur.keys != *keys {
                    let mut next = (**cur).clone();
                    next.keys = *keys;
                    ep.local.publish(next);
                }
            }
            let want = compiled
                .egress
                .get(&ep.entity)
                .cloned()
                .unwrap_or(Egress::Open);
            if ep.applied.as_ref() != Some(&want) {
                changes.push((att.clone(), ep.nft.clone(), ep.firewall.table(&want), want));
            }
        }
        if !changes.is_empty() {
            let results = tokio::task::spawn_blocking(move || {
                changes
                    .into_iter()
                    .map(|(att, sock, table, want)| {
                        let r = sock
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .replace_table(&table);
                        (att, want, r)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            for (att, want, r) in results {
                match r {
                    Ok(()) => {
                        if let Some(ep) = inner.endpoints.get_mut(&att) {
                            ep.applied = Some(want);
                        }
                    }
                    Err(e) => {
                        self.metrics.egress_apply_errors.inc();
                        tracing::error!(container = %att.container_id, error = %e, "cannot apply the pod's egress rules; will retry");
                    }
                }
            }
        }
        self.metrics.policy_generation.set(inner.generation as i64);
        self.metrics.pods.set(inner.endpoints.len() as i64);
        self.metrics
            .compile_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            generation = inner.generation,
            pods = inner.endpoints.len(),
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "tables published"
        );
    }

    /// Waits (up to the configured time) for a pod to appear in the state.
    async fn wait_for_pod(&self, key: &PodKey) -> bool {
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

    pub async fn allocate(&self, req: AllocateRequest) -> Ack {
        if !self.is_ready() {
            return error_ack(
                Code::TryAgainLater,
                "the agent is starting (state not synced yet)",
            );
        }
        let key = req.pod.is_kubernetes().then(|| PodKey {
            namespace: req.pod.namespace.clone(),
            name: req.pod.name.clone(),
        });
        if let Some(k) = &key
            && !self.wait_for_pod(k).await
        {
            return error_ack(
                Code::TryAgainLater,
                format!("pod {k} is not in the cluster state yet"),
            );
        }
        let model = self.model.borrow().clone();
        let networks = compile::networks_for(&model, key.as_ref());
        let mut inner = self.inner.lock().await;
        if let Some(r) = inner.records.get(&req.attachment) {
            if r.pod != req.pod {
                return error_ack(
                    Code::InvalidConfig,
                    format!(
                        "container {} is already attached for another pod",
                        req.attachment.container_id
                    ),
                );
            }
            return Ack {
                networks: r.networks.clone(),
                ..Ack::ok()
            };
        }
        let ips = match inner.ipam.allocate(&req.attachment, &networks) {
            Ok(ips) => ips,
            Err(e) => return error_ack(Code::Other, e.to_string()),
        };
        let grants: Vec<NetworkGrant> = networks
            .iter()
            .zip(ips)
            .enumerate()
            .map(|(i, (n, ip))| NetworkGrant {
                network: n.name.clone(),
                device: n.spec.device.clone().unwrap_or_else(|| format!("kw{i}")),
                address: IpNetwork::from(ip),
                routes: vec![n.spec.cidr],
            })
            .collect();
        let record = Record {
            attachment: req.attachment.clone(),
            pod: req.pod,
            networks: grants.clone(),
            attached: None,
        };
        if let Err(e) = self.store.save(&record) {
            inner.ipam.release(&req.attachment);
            return error_ack(
                Code::IoFailure,
                format!("cannot record the allocation: {e}"),
            );
        }
        inner.records.insert(req.attachment, record);
        Ack {
            networks: grants,
            ..Ack::ok()
        }
    }

    /// Attaches to the pod's devices and opens its socket and firewall socket, inside its
    /// namespace (on a blocking thread).
    async fn open_endpoint(
        &self,
        record: &Record,
        attached: &Attached,
        netns: Netns,
        keys: KeyRing,
    ) -> Result<Endpoint, String> {
        let devices: Vec<(String, IpAddr)> = record
            .networks
            .iter()
            .map(|g| (g.device.clone(), g.address.ip()))
            .collect();
        let listen = SocketAddr::new(attached.infra_ip, self.cfg.gue_port);
        let (opened, sock, netns) = tokio::task::spawn_blocking(move || {
            let opened = endpoint::open(&netns, &devices, listen, Some(GUE_MARK))
                .map_err(|e| e.to_string())?;
            let sock = netns
                .run(nft::Socket::open)
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((opened, sock, netns))
        })
        .await
        .map_err(|e| e.to_string())??;
        let entity: Arc<str> = record.entity().into();
        let local = SharedLocal::new(self.local_endpoint(&entity, record, attached, keys));
        let ctx = Arc::new(EndpointContext {
            tables: self.tables.clone(),
            local: local.clone(),
            flows: FlowTable::new(FLOWS_PER_ENDPOINT, FlowTimeouts::default()),
            counters: self.counters.clone(),
        });
        let running = endpoint::spawn(ctx, opened).map_err(|e| e.to_string())?;
        Ok(Endpoint {
            entity,
            local,
            running,
            nft: Arc::new(StdMutex::new(sock)),
            firewall: PodFirewall {
                overlay_devices: record.networks.iter().map(|g| g.device.clone()).collect(),
                gue_port: self.cfg.gue_port,
                node_addresses: attached.node_addresses.clone(),
            },
            applied: None,
            netns,
        })
    }

    fn publish(&self, record: &Record) {
        let (Some(a), true) = (&record.attached, record.pod.is_kubernetes()) else {
            return;
        };
        let spec = OverlayAttachmentSpec {
            namespace: record.pod.namespace.clone(),
            pod: record.pod.name.clone(),
            node: self.cfg.node_name.clone(),
            infra_ip: a.infra_ip,
            overlay_ips: record.networks.iter().map(|g| g.address.ip()).collect(),
        };
        if let Err(e) = self.publisher.publish(&spec) {
            tracing::error!(pod = %format!("{}/{}", spec.namespace, spec.pod), error = %e, "cannot publish the pod's overlay addresses");
        }
    }

    fn withdraw(&self, record: &Record) {
        if record.pod.is_kubernetes()
            && let Err(e) = self
                .publisher
                .withdraw(&record.pod.namespace, &record.pod.name)
        {
            tracing::error!(error = %e, "cannot withdraw the pod's overlay addresses");
        }
    }

    pub async fn add(&self, req: AddRequest, netns: Netns) -> Ack {
        if !self.is_ready() {
            return error_ack(
                Code::TryAgainLater,
                "the agent is starting (state not synced yet)",
            );
        }
        let mut inner = self.inner.lock().await;
        let Some(record) = inner.records.get(&req.attachment).cloned() else {
            return error_ack(
                Code::InvalidConfig,
                "Add without a prior Allocate for this attachment",
            );
        };
        if record.networks != req.networks {
            return error_ack(
                Code::InvalidConfig,
                "Add names networks other than the ones allocated",
            );
        }
        if let Some(ep) = inner.endpoints.get(&req.attachment) {
            if ep.netns.id() == netns.id() && !ep.running.is_finished() {
                return Ack::ok();
            }
            inner.endpoints.remove(&req.attachment);
        }
        let attached = Attached {
            netns_path: req.netns_path.clone(),
            netns_id: netns.id(),
            infra_ip: req.infra_ip,
            mtu: req.mtu,
            node_addresses: req.node_addresses.clone(),
        };
        let entity: Arc<str> = record.entity().into();
        let model = self.model.borrow().clone();
        let keys = inner.keys.ring(&entity, self.rotation(&model), now_ms());
        let mut ep = match self.open_endpoint(&record, &attached, netns, keys).await {
            Ok(ep) => ep,
            Err(e) => return error_ack(Code::Other, format!("cannot attach to the pod: {e}")),
        };
        // The plugin installed the table with egress closed.
        ep.applied = Some(Egress::Closed);
        let mut record = record;
        record.attached = Some(attached);
        if let Err(e) = self.store.save(&record) {
            return error_ack(
                Code::IoFailure,
                format!("cannot record the attachment: {e}"),
            );
        }
        self.publish(&record);
        inner.records.insert(req.attachment.clone(), record);
        inner.endpoints.insert(req.attachment.clone(), ep);
        // Policy in force, egress rules applied, before the pod is let go.
        self.reconcile(&mut inner).await;
        tracing::info!(pod = %entity, container = %req.attachment.container_id, "pod attached");
        Ack::ok()
    }

    /// Forgets an attachment: stops its endpoint, releases its addresses, removes its record.
    async fn forget(&self, inner: &mut Inner, att: &Attachment) -> Option<Record> {
        inner.endpoints.remove(att);
        inner.ipam.release(att);
        let record = inner.records.remove(att);
        if let Err(e) = self.store.remove(att) {
            tracing::error!(error = %e, "cannot remove the attachment record");
        }
        if let Some(r) = &record {
            let still_there = inner
                .records
                .values()
                .any(|o| o.pod == r.pod && o.attached.is_some());
            if !still_there {
                self.withdraw(r);
            }
        }
        record
    }

    pub async fn delete(&self, att: &Attachment) -> Ack {
        let mut inner = self.inner.lock().await;
        let record = self.forget(&mut inner, att).await;
        if record.is_some() {
            self.reconcile(&mut inner).await;
            tracing::info!(container = %att.container_id, "pod detached");
        }
        Ack {
            networks: record.map(|r| r.networks).unwrap_or_default(),
            ..Ack::ok()
        }
    }

    pub async fn check(&self, att: &Attachment) -> Ack {
        let inner = self.inner.lock().await;
        match (inner.records.get(att), inner.endpoints.get(att)) {
            (Some(r), Some(ep)) if !ep.running.is_finished() => Ack {
                networks: r.networks.clone(),
                ..Ack::ok()
            },
            (Some(_), Some(_)) => {
                error_ack(Code::Other, "the agent's endpoint for this pod has stopped")
            }
            (Some(_), None) => error_ack(
                Code::Other,
                "the agent has an allocation but no endpoint for this pod",
            ),
            (None, _) => error_ack(Code::Other, "the agent has no record of this pod"),
        }
    }

    /// GC: forgets every attachment not in `keep`, removing its devices and table if its
    /// namespace still exists.
    pub async fn gc(&self, keep: &BTreeSet<Attachment>) -> Ack {
        let mut inner = self.inner.lock().await;
        let stale: Vec<Attachment> = inner
            .records
            .keys()
            .filter(|a| !keep.contains(a))
            .cloned()
            .collect();
        for att in &stale {
            let netns = inner
                .endpoints
                .get(att)
                .and_then(|e| e.netns.try_clone().ok());
            let record = self.forget(&mut inner, att).await;
            if let (Some(ns), Some(r)) = (netns, record) {
                let devices: Vec<String> = r.networks.iter().map(|g| g.device.clone()).collect();
                let _ = tokio::task::spawn_blocking(move || {
                    for d in &devices {
                        let _ = endpoint::remove(&ns, d);
                    }
                    let _ = ns.run(|| {
                        nft::Socket::open()
                            .and_then(|mut s| s.delete_table(firewall::FAMILY, firewall::TABLE))
                    });
                })
                .await;
            }
            tracing::info!(container = %att.container_id, "GC: forgot a stale attachment");
        }
        if !stale.is_empty() {
            self.reconcile(&mut inner).await;
        }
        Ack {
            removed: stale.len() as u32,
            ..Ack::ok()
        }
    }

    async fn restore_one(&self, inner: &mut Inner, record: &Record) -> Restored {
        let Some(a) = &record.attached else {
            return Restored::Allocated;
        };
        let netns = match Netns::open(&a.netns_path) {
            Ok(ns) if ns.id() == a.netns_id => ns,
            Ok(_) => return Restored::Gone(format!("{} is now another namespace", a.netns_path)),
            Err(e) => return Restored::Gone(e.to_string()),
        };
        let entity: Arc<str> = record.entity().into();
        let model = self.model.borrow().clone();
        let keys = inner.keys.ring(&entity, self.rotation(&model), now_ms());
        match self.open_endpoint(record, a, netns, keys).await {
            Ok(ep) => Restored::Attached(Box::new(ep)),
            Err(e) => Restored::Gone(e),
        }
    }

    /// At start-up: re-attach to every pod the state directory lists, forget those that are gone,
    /// compile, and only then report ready.
    pub async fn restore(&self) {
        let started = Instant::now();
        let mut inner = self.inner.lock().await;
        let records = self.store.load_all();
        let mut reattached = 0;
        for r in records {
            for g in &r.networks {
                inner
                    .ipam
                    .restore(&r.attachment, &g.network, g.address.ip());
            }
            inner.records.insert(r.attachment.clone(), r.clone());
            match self.restore_one(&mut inner, &r).await {
                Restored::Attached(ep) => {
                    inner.endpoints.insert(r.attachment.clone(), *ep);
                    self.publish(&r);
                    reattached += 1;
                }
                Restored::Allocated => {}
                Restored::Gone(why) => {
                    tracing::info!(container = %r.attachment.container_id, reason = %why, "pod is gone; forgetting it");
                    self.forget(&mut inner, &r.attachment).await;
                }
            }
        }
        // Publications of pods this node no longer serves (deleted while the agent was down).
        let serving: BTreeSet<(String, String)> = inner
            .records
            .values()
            .filter(|r| r.attached.is_some())
            .map(|r| (r.pod.namespace.clone(), r.pod.name.clone()))
            .collect();
        for (ns, pod) in self.publisher.published() {
            if !serving.contains(&(ns.clone(), pod.clone())) {
                let _ = self.publisher.withdraw(&ns, &pod);
            }
        }
        self.reconcile(&mut inner).await;
        drop(inner);
        self.ready.store(true, Ordering::Release);
        self.metrics.ready.set(1);
        tracing::info!(
            reattached,
            took_ms = started.elapsed().as_millis() as u64,
            "agent ready"
        );
    }

    /// Recompiles on every state change, and at least a few times per key epoch so keys stay
    /// current. Runs until the state source ends.
    pub async fn control_loop(self: Arc<Self>) {
        let mut rx = self.model.clone();
        loop {
            let period =
                Duration::from_millis((self.rotation(&rx.borrow()).period_ms() / 4).max(1000));
            if let Ok(Err(_)) = tokio::time::timeout(period, rx.changed()).await {
                return;
            }
            let mut inner = self.inner.lock().await;
            self.reconcile(&mut inner).await;
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
    pub async fn describe(&self) -> serde_json::Value {
        let inner = self.inner.lock().await;
        let list: Vec<serde_json::Value> = inner
            .records
            .values()
            .map(|r| {
                let ep = inner.endpoints.get(&r.attachment);
                serde_json::json!({
                    "containerId": r.attachment.container_id,
                    "ifname": r.attachment.ifname,
                    "namespace": r.pod.namespace,
                    "pod": r.pod.name,
                    "entity": r.entity(),
                    "overlayIps": r.networks.iter().map(|g| g.address.ip().to_string()).collect::<Vec<_>>(),
                    "devices": r.networks.iter().map(|g| g.device.clone()).collect::<Vec<_>>(),
                    "infraIp": r.attached.as_ref().map(|a| a.infra_ip.to_string()),
                    "netns": r.attached.as_ref().map(|a| a.netns_path.clone()),
                    "running": ep.is_some_and(|e| !e.running.is_finished()),
                    "egress": ep.and_then(|e| e.applied.as_ref()).map(|e| format!("{e:?}")),
                })
            })
            .collect();
        serde_json::json!({
            "node": self.cfg.node_name,
            "generation": inner.generation,
            "ready": self.is_ready(),
            "addressesInUse": inner.ipam.in_use(),
            "attachments": list,
        })
    }

    /// The entity name of a pod (for tests and the lab).
    pub fn entity_of(key: &PodKey) -> Arc<str> {
        pod_entity(key)
    }
}
