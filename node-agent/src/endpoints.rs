//! The L3 endpoints this agent runs: one per attached pod — its overlay devices and GUE socket,
//! opened inside the pod's namespace and served from the agent's threads — with the nftables
//! socket that keeps the pod's firewall current. This is where the agent's effects on pods'
//! namespaces happen; every blocking step runs on a blocking thread, and the registry's lock is
//! never held across one.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use keyway_core::counters::Counters;
use keyway_core::engine::LocalEndpoint;
use keyway_core::flow::{FlowTable, FlowTimeouts};
use keyway_core::key::KeyRing;
use keyway_core::tables::{SharedLocal, SharedTables};
use keyway_protocol::firewall::{self, Egress, PodFirewall, PodRules};
use keyway_protocol::handoff::Attachment;
use keyway_sap::io::bpf::Carried;
use keyway_sap::io::datapath::EndpointContext;
use keyway_sap::io::endpoint::{self, EndpointError, Running};
use keyway_sap::io::fastpath::{FastPath, NodeFastPath, NodeFastSlot, NodeSyncReport};
use keyway_sap::io::nft::{self, NftError};
use keyway_sap::io::udp::GUE_MARK;
use keyway_sap::sys::{Netns, NetnsError};

use crate::compile::Compiled;
use crate::config::Datapath;
use crate::records::{Attached, Record};

/// Flow-table size per endpoint.
const FLOWS_PER_ENDPOINT: usize = 16 * 1024;

/// Why an endpoint could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("the pod's nftables socket: {0}")]
    Nft(#[from] NftError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("the endpoint's loops: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the blocking task was lost: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A running L3 endpoint and what it takes to keep its pod's firewall current.
#[derive(Debug)]
pub struct Endpoint {
    entity: Arc<str>,
    local: Arc<SharedLocal>,
    ctx: Arc<EndpointContext>,
    running: Running,
    nft: Arc<Mutex<nft::Socket>>,
    firewall: PodFirewall,
    /// The rules last applied; `None` when unknown (re-apply).
    applied: Option<PodRules>,
    /// The Service table last installed, updated in place from it; `None` when unknown (replace).
    services: Option<nft::Table>,
    netns: Netns,
}

impl Endpoint {
    pub fn netns_id(&self) -> (u64, u64) {
        self.netns.id()
    }

    pub fn is_running(&self) -> bool {
        !self.running.is_finished()
    }
}

/// A firewall change to apply: the attachment, its firewall socket, the table, the rules.
/// What a compile changes in one pod's tables.
struct FirewallChange {
    att: Attachment,
    sock: Arc<Mutex<nft::Socket>>,
    /// The pod's table, when its rules changed.
    table: Option<nft::Table>,
    /// The Service table, when it changed, with the one installed (to update in place).
    services: Option<(Option<nft::Table>, nft::Table)>,
    want: PodRules,
}

impl FirewallChange {
    fn apply(&self) -> Result<(), NftError> {
        let mut sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = &self.table {
            sock.replace_table(t)?;
        }
        match &self.services {
            Some((Some(old), new)) => sock.update_table(old, new),
            Some((None, new)) => sock.replace_table(new),
            None => Ok(()),
        }
    }
}

/// Every endpoint this agent runs, by attachment.
#[derive(Debug)]
pub struct Endpoints {
    tables: Arc<SharedTables>,
    counters: Arc<Counters>,
    gue_port: u16,
    local_sap: Option<SocketAddr>,
    fast: Arc<FastShared>,
    running: Mutex<BTreeMap<Attachment, Endpoint>>,
    /// What the pods' programs carried since [`Endpoints::take_carried`] last asked: every sync
    /// adds to it, the periodic ones and those after a compile alike.
    carried: Arc<Mutex<Carried>>,
}

/// What every pod's fast path shares.
#[derive(Debug)]
struct FastShared {
    datapath: Datapath,
    gue_port: u16,
    /// A writable directory of the agent's (its socket's), where a pod's load may mount a
    /// bpffs to be handed the node's maps when the node has none.
    scratch: std::path::PathBuf,
    /// The node's SaP, which the node's fast path carries in the kernel too.
    local_sap: Option<SocketAddr>,
    /// The node's gateway device, whose traffic the node's fast path carries in the kernel too.
    gateway: Option<&'static str>,
    /// Set once the kernel has refused keyway's programs under `--datapath auto`: said once,
    /// not tried again for every pod.
    no_kernel: std::sync::atomic::AtomicBool,
    /// The node's part of the fast path, loaded with the first pod's: `None` inside when the
    /// kernel refused it (pods' fast paths still work, through the bridge and the user-space
    /// SaP).
    node: NodeFastSlot,
    worker: Worker,
}

/// One thread for every fast-path job (loading and attaching programs, syncing maps): blocking
/// work off the runtime's threads, and on one thread, so that the allocator's per-thread arenas
/// do not multiply with the blocking pool's threads (the soak saw an agent's RSS grow from 35 to
/// 154 MiB when each job ran on whichever blocking thread was free).
#[derive(Debug)]
struct Worker(Mutex<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>);

impl Worker {
    fn start() -> Worker {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let spawned = std::thread::Builder::new()
            .name("keyway-fastpath".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the fast path's thread; its jobs are not run");
        }
        Worker(Mutex::new(tx))
    }

    fn run(&self, job: impl FnOnce() + Send + 'static) {
        let tx = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = tx.send(Box::new(job));
    }
}

impl FastShared {
    /// Whether new endpoints try the kernel fast path.
    fn wants_kernel(&self) -> bool {
        match self.datapath {
            Datapath::User => false,
            Datapath::Kernel => true,
            Datapath::Auto => !self.no_kernel.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The node's part of the fast path (loaded on first use). Blocking.
    fn node(&self) -> Option<Arc<NodeFastPath>> {
        self.node
            .get_or_init(|| match NodeFastPath::load(self.gue_port, self.local_sap, self.gateway) {
                Ok(n) => {
                    if n.adopted() {
                        tracing::info!(sap_program = n.sap_program_id(), "took over the node's fast path an earlier agent left, with the SaP's flows");
                    }
                    Some(Arc::new(n))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the node's fast path cannot load: GUE to pods behind a bridge is segmented there");
                    None
                }
            })
            .clone()
    }
}

/// Attaching one endpoint's fast path (or removing an earlier agent's), on a blocking thread.
struct FastJob {
    shared: Arc<FastShared>,
    ctx: Arc<EndpointContext>,
    netns: Option<Netns>,
    devices: Vec<String>,
    overlay: Vec<IpAddr>,
    pod_ip: IpAddr,
    container: String,
}

impl FastJob {
    fn run(self) {
        let Some(netns) = &self.netns else { return };
        // The kernel fast path serves a pod with an IPv4 pod IP (the underlay it sends on),
        // on its overlay devices, IPv4 and IPv6.
        let overlays: Vec<(String, IpAddr)> = self
            .devices
            .iter()
            .cloned()
            .zip(self.overlay.iter().copied())
            .collect();
        let infra = match self.pod_ip {
            IpAddr::V4(i) if self.shared.wants_kernel() && !overlays.is_empty() => i,
            _ => {
                // A fast path a previous agent attached must not outlive the choice not to have
                // one: its flows would go on unchecked until its lease ran out.
                FastPath::detach_all(netns, &self.devices, self.pod_ip);
                return;
            }
        };
        // The node's part first: the pod's programs share its maps.
        let node = self.shared.node();
        let shared = node.as_ref().and_then(|n| n.shared_maps());
        let node_maps = shared.map(|m| (m, self.shared.scratch.as_path()));
        match FastPath::open(netns, &overlays, infra, self.shared.gue_port, node_maps) {
            Ok(f) => {
                if f.adopted() {
                    tracing::debug!(container = %self.container, programs = ?f.program_ids(), "took over the fast path an earlier agent left, with its flows");
                }
                // Keys and a lease first, then the loops may teach it flows.
                f.sync(&self.ctx, keyway_sap::io::now_ms(), false);
                if self.ctx.fast.set(f).is_err() {
                    return;
                }
                if let Some(node) = node
                    && let Err(e) = node.add_pod(netns, infra)
                {
                    tracing::warn!(container = %self.container, error = %e, "the node's fast path cannot serve this pod");
                }
            }
            Err(e) => {
                let first = !self
                    .shared
                    .no_kernel
                    .swap(true, std::sync::atomic::Ordering::Relaxed);
                if self.shared.datapath == Datapath::Kernel || first {
                    tracing::warn!(container = %self.container, error = %e, datapath = self.shared.datapath.as_str(), "the kernel fast path cannot serve this pod; the user-space path does");
                }
            }
        }
    }
}

impl Endpoints {
    pub fn new(
        tables: Arc<SharedTables>,
        counters: Arc<Counters>,
        gue_port: u16,
        local_sap: Option<SocketAddr>,
        gateway: Option<&'static str>,
        datapath: Datapath,
        scratch: std::path::PathBuf,
    ) -> Endpoints {
        Endpoints {
            tables,
            counters,
            gue_port,
            local_sap,
            fast: Arc::new(FastShared {
                datapath,
                gue_port,
                scratch,
                local_sap,
                gateway,
                no_kernel: Default::default(),
                node: Default::default(),
                worker: Worker::start(),
            }),
            running: Mutex::default(),
            carried: Arc::default(),
        }
    }

    /// Where the node's fast path is, once loaded.
    pub fn node_fast_path(&self) -> NodeFastSlot {
        self.fast.node.clone()
    }

    /// How many endpoints the kernel fast path serves.
    pub fn fast(&self) -> usize {
        self.map()
            .values()
            .filter(|e| e.ctx.fast.get().is_some())
            .count()
    }

    /// How many of those took over the fast path an earlier agent left them.
    pub fn fast_adopted(&self) -> usize {
        self.map()
            .values()
            .filter(|e| e.ctx.fast.get().is_some_and(|f| f.adopted()))
            .count()
    }

    /// Whether the node's fast path was taken over from an earlier agent.
    pub fn node_adopted(&self) -> bool {
        self.fast
            .node
            .get()
            .and_then(Option::as_ref)
            .is_some_and(|n| n.adopted())
    }

    /// Brings every endpoint's fast path, and the node's, in line with the engine (keys,
    /// lease, the flows it carries, counters): `periodic` also hands idle flows back to the
    /// engine. On the fast path's thread; map system calls only. Returns what the node's SaP
    /// did in the kernel.
    pub async fn sync_fast(&self, periodic: bool) -> NodeSyncReport {
        let ctxs: Vec<Arc<EndpointContext>> = self
            .map()
            .values()
            .filter(|e| e.ctx.fast.get().is_some())
            .map(|e| e.ctx.clone())
            .collect();
        // Without a pod on the fast path, the node's part has nothing to carry: its lease runs out.
        if ctxs.is_empty() {
            return NodeSyncReport::default();
        }
        let node = self.fast.node.get().cloned().flatten();
        let (tables, counters) = (self.tables.clone(), self.counters.clone());
        let total = self.carried.clone();
        let (done, wait) = tokio::sync::oneshot::channel();
        self.fast.worker.run(move || {
            let now = keyway_sap::io::now_ms();
            let sap = node
                .as_ref()
                .map(|n| n.sync(&tables, &counters, now, periodic))
                .unwrap_or_default();
            let (mut kept, mut idle, mut refused) = (0, 0, 0);
            let mut carried = Carried::default();
            for ctx in ctxs {
                if let Some(f) = ctx.fast.get() {
                    let r = f.sync(&ctx, now, periodic);
                    (kept, idle, refused) = (kept + r.kept, idle + r.idle, refused + r.refused);
                    carried += r.carried;
                }
            }
            tracing::debug!(
                periodic,
                kept,
                idle,
                refused,
                sap_kept = sap.flows.kept,
                sap_idle = sap.flows.idle,
                sap_refused = sap.flows.refused,
                gateway_kept = sap.gateway.kept,
                gateway_idle = sap.gateway.idle,
                gateway_refused = sap.gateway.refused,
                "fast path flows judged again"
            );
            *total.lock().unwrap_or_else(|e| e.into_inner()) += carried;
            let _ = done.send(sap);
        });
        wait.await.unwrap_or_default()
    }

    /// What the pods' programs carried since the last call.
    pub fn take_carried(&self) -> Carried {
        std::mem::take(&mut *self.carried.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<Attachment, Endpoint>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches to the pod's devices and opens its GUE socket and firewall socket inside its
    /// namespace (on a blocking thread), then starts the endpoint's loops. The plugin installed
    /// the pod's table with egress closed; that is what the endpoint starts from.
    pub async fn open(
        &self,
        record: &Record,
        attached: &Attached,
        netns: Netns,
        keys: KeyRing,
    ) -> Result<Endpoint, AttachError> {
        let devices: Vec<(String, IpAddr)> = record
            .networks
            .iter()
            .map(|g| (g.device.clone(), g.address.ip()))
            .collect();
        let listen = SocketAddr::new(attached.infra_ip, self.gue_port);
        let (opened, sock, netns) = tokio::task::spawn_blocking(move || {
            let opened = endpoint::open(&netns, &devices, listen, Some(GUE_MARK))?;
            let sock = netns.run(nft::Socket::open)??;
            Ok::<_, AttachError>((opened, sock, netns))
        })
        .await??;
        let entity = record.entity();
        let local = SharedLocal::new(LocalEndpoint {
            entity: entity.clone(),
            overlay_ips: record.networks.iter().map(|g| g.address.ip()).collect(),
            infra: listen,
            keys,
            local_sap: self.local_sap,
        });
        let ctx = Arc::new(EndpointContext {
            tables: self.tables.clone(),
            local: local.clone(),
            flows: FlowTable::counted(
                FLOWS_PER_ENDPOINT,
                FlowTimeouts::default(),
                self.counters.flows.clone(),
            ),
            counters: self.counters.clone(),
            fast: Default::default(),
        });
        let running = endpoint::spawn(ctx.clone(), opened).map_err(AttachError::Spawn)?;
        Ok(Endpoint {
            entity,
            local,
            ctx,
            running,
            nft: Arc::new(Mutex::new(sock)),
            firewall: PodFirewall {
                overlay_devices: record.networks.iter().map(|g| g.device.clone()).collect(),
                pod_ip: attached.infra_ip,
                gue_port: self.gue_port,
                node_addresses: attached.node_addresses.clone(),
            },
            applied: Some(PodRules::closed()),
            services: None,
            netns,
        })
    }

    /// Records a running endpoint, and attaches its kernel fast path (or, under `--datapath
    /// user`, removes one an earlier agent left) in the background: off the path of the pod's
    /// ADD and of a restarted agent's readiness. Until then the user-space path serves the pod,
    /// and an earlier agent's programs go on carrying its established flows (under their lease);
    /// the new programs replace them only now that this endpoint's loops run.
    pub fn insert(&self, att: Attachment, ep: Endpoint) {
        let job = FastJob {
            shared: self.fast.clone(),
            ctx: ep.ctx.clone(),
            netns: ep.netns.try_clone().ok(),
            devices: ep.firewall.overlay_devices.clone(),
            overlay: ep.local.load().overlay_ips.clone(),
            pod_ip: ep.firewall.pod_ip,
            container: att.container_id.clone(),
        };
        self.map().insert(att, ep);
        self.fast.worker.run(move || job.run());
    }

    /// Whether the attachment's endpoint runs, serving the namespace `netns_id`.
    pub fn serves(&self, att: &Attachment, netns_id: (u64, u64)) -> bool {
        self.map()
            .get(att)
            .is_some_and(|e| e.netns_id() == netns_id && e.is_running())
    }

    /// Whether the attachment has an endpoint, and whether it runs.
    pub fn status(&self, att: &Attachment) -> Option<bool> {
        self.map().get(att).map(Endpoint::is_running)
    }

    /// The egress rules last applied to the attachment's pod, for `/debug`.
    pub fn applied(&self, att: &Attachment) -> Option<Egress> {
        self.map()
            .get(att)
            .and_then(|e| Some(e.applied.as_ref()?.egress.clone()))
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Stops an endpoint: its loops end, its devices and socket close; what it made in the pod's
    /// namespace stays (the plugin's DEL removes it).
    pub fn stop(&self, att: &Attachment) {
        if let Some(ep) = self.map().remove(att) {
            self.forget_node_pod(&ep);
        }
    }

    /// The node's fast path no longer hands this endpoint's pod its GUE.
    fn forget_node_pod(&self, ep: &Endpoint) {
        if let (Some(Some(node)), IpAddr::V4(ip), true) = (
            self.fast.node.get(),
            ep.firewall.pod_ip,
            ep.ctx.fast.get().is_some(),
        ) {
            node.remove_pod(ip);
        }
    }

    /// Stops an endpoint and removes its devices and the pod's table, if the namespace still
    /// exists.
    pub async fn teardown(&self, att: &Attachment, devices: Vec<String>) {
        let Some(ep) = self.map().remove(att) else {
            return;
        };
        self.forget_node_pod(&ep);
        let Endpoint {
            netns,
            running,
            ctx,
            firewall,
            ..
        } = ep;
        drop(running);
        let _ = tokio::task::spawn_blocking(move || {
            match ctx.fast.get() {
                Some(f) => f.detach(&netns),
                None => FastPath::detach_all(&netns, &devices, firewall.pod_ip),
            }
            let _ = firewall::unsteer(&netns);
            for d in &devices {
                let _ = endpoint::remove(&netns, d);
            }
            let _ = netns.run(|| {
                let mut s = nft::Socket::open()?;
                s.delete_table(firewall::FAMILY, firewall::SERVICES_TABLE)?;
                s.delete_table(firewall::FAMILY, firewall::TABLE)
            });
        })
        .await;
    }

    /// Gives every endpoint its current keys from a compile, and returns the pods whose rules
    /// (egress policy, steered pod IPs, translated Services) differ from those applied.
    fn refresh(&self, compiled: &Compiled) -> Vec<FirewallChange> {
        let mut changes = Vec::new();
        for (att, ep) in self.map().iter_mut() {
            if let Some(keys) = compiled.local_keys.get(&ep.entity) {
                let cur = ep.local.load();
                if cur.keys != *keys {
                    let mut next = (**cur).clone();
                    next.keys = *keys;
                    ep.local.publish(next);
                }
            }
            let want = PodRules {
                egress: compiled
                    .egress
                    .get(&ep.entity)
                    .cloned()
                    .unwrap_or(Egress::Open),
                peers: compiled.pod_ips.clone(),
                services: compiled.services.clone(),
                mesh: compiled.mesh.get(&ep.entity).cloned(),
            };
            let services = ep.firewall.services_table(&want);
            let rules_changed = ep.applied.as_ref().is_none_or(|a| {
                (&a.egress, &a.peers, &a.mesh) != (&want.egress, &want.peers, &want.mesh)
            });
            let change = FirewallChange {
                att: att.clone(),
                sock: ep.nft.clone(),
                table: rules_changed.then(|| ep.firewall.table(&want)),
                services: (ep.services.as_ref() != Some(&services))
                    .then(|| (ep.services.clone(), services)),
                want,
            };
            if change.table.is_some() || change.services.is_some() {
                changes.push(change);
            }
        }
        changes
    }

    /// Brings every endpoint's keys and firewall in line with a compile; how many firewalls
    /// could not be updated (they are tried again at the next compile). A pod's firewall holds
    /// every protected pod's pod IP, so a change of the protected pods rewrites each one.
    pub async fn apply(&self, compiled: &Compiled) -> usize {
        let changes = self.refresh(compiled);
        // The kernel carries flows the engine admitted under the tables just replaced: each is
        // judged again now, and goes if the engine no longer admits it.
        self.sync_fast(false).await;
        if changes.is_empty() {
            return 0;
        }
        let results = tokio::task::spawn_blocking(move || {
            changes
                .into_iter()
                .map(|c| {
                    let r = c.apply();
                    (c, r)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut failed = 0;
        let mut map = self.map();
        for (c, r) in results {
            let Some(ep) = map.get_mut(&c.att) else {
                continue;
            };
            match r {
                Ok(()) => {
                    ep.applied = Some(c.want);
                    if let Some((_, installed)) = c.services {
                        ep.services = Some(installed);
                    }
                }
                Err(e) => {
                    failed += 1;
                    // What was installed is unknown now: both tables are replaced next time.
                    ep.applied = None;
                    ep.services = None;
                    tracing::error!(container = %c.att.container_id, error = %e, "cannot apply the pod's firewall or Service rules; will retry");
                }
            }
        }
        failed
    }
}
