//! The agent's Prometheus metrics. Data-path counters live in plain atomics (the packet path never
//! takes a lock to count) and are read at scrape time by a collector; the rest are ordinary
//! prometheus-client metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keyway_core::counters::{Counters, Stage};
use keyway_core::engine::DropReason;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::source::SourceStats;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    pub request: &'static str,
}

/// Reads the data path's atomics on each scrape.
#[derive(Debug)]
struct DataPath {
    counters: Arc<Counters>,
}

impl Collector for DataPath {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        {
            let mut m = enc.encode_descriptor("keyway_datapath_packets", "Packets handled, by stage (egress: TUN to GUE; ingress: GUE to TUN; sap: forwarded)", None, MetricType::Counter)?;
            for s in Stage::ALL {
                m.encode_family(&[("stage", s.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&self.counters.packets(s), None)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "keyway_datapath_bytes",
                "Inner-packet bytes handled, by stage",
                None,
                MetricType::Counter,
            )?;
            for s in Stage::ALL {
                m.encode_family(&[("stage", s.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&self.counters.bytes(s), None)?;
            }
        }
        {
            let flows = &self.counters.flows;
            let mut m = enc.encode_descriptor(
                "keyway_flow_table_pressure",
                "Flow-table events under pressure: evicted (a flow never answered, or idle, made room for a new one), full (a new flow not tracked: the table held only answered, live flows), peer_quota (not tracked: its remote opener already had a quarter of the table)",
                None,
                MetricType::Counter,
            )?;
            for (event, n) in [
                ("evicted", &flows.evictions),
                ("full", &flows.overflows),
                ("peer_quota", &flows.over_quota),
            ] {
                m.encode_family(&[("event", event)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n.load(Ordering::Relaxed), None)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "keyway_datapath_drops",
            "Packets dropped, by stage and reason",
            None,
            MetricType::Counter,
        )?;
        for s in Stage::ALL {
            for r in DropReason::ALL {
                m.encode_family(&[("stage", s.as_str()), ("reason", r.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&self.counters.drops(s, r), None)?;
            }
        }
        Ok(())
    }
}

/// A counter read from an atomic somebody else owns.
#[derive(Debug)]
struct AtomicCounter(Arc<SourceStats>, fn(&SourceStats) -> &AtomicU64);

impl EncodeMetric for AtomicCounter {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        enc.encode_counter::<NoLabelSet, _, u64>(&(self.1)(&self.0).load(Ordering::Relaxed), None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// Every metric the agent serves.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub pods: Gauge,
    pub policy_generation: Gauge,
    pub identities: Gauge,
    pub fib_entries: Gauge,
    pub compile_seconds: Histogram,
    pub handoff_seconds: Family<RequestLabel, Histogram>,
    pub handoff_errors: Family<RequestLabel, Counter>,
    pub egress_apply_errors: Counter,
    pub ready: Gauge,
    /// EndpointSlice writes (applied or deleted) for covered Services.
    pub endpointslice_writes: Family<WriteLabel, Counter>,
    pub endpointslice_errors: Counter,
    /// Pods' places on the overlay published or withdrawn.
    pub publications: Family<WriteLabel, Counter>,
    pub publication_errors: Counter,
    /// Admin connections closed at once: the server had its cap.
    pub admin_refused: Counter,
    /// Pods whose re-attachment after a restart failed while their namespace was still there
    /// (kept, and retried).
    pub reattach_failures: Counter,
    /// Published attachments the last compile did not count, by reason.
    pub attachments_refused: Family<ReasonLabel, Gauge>,
    /// The packet-authentication mode the data path runs: 1 for the mode in force, 0 for others.
    pub packet_authentication: Family<ModeLabel, Gauge>,
    /// The key epoch the data path's keys are centred on (rises once per rotation period).
    pub key_epoch: Gauge,
    /// 1 when the kernel loads keyway's eBPF programs (probed once at start).
    pub bpf_available: Gauge,
    /// Pods whose established flows the kernel fast path carries.
    pub fastpath_pods: Gauge,
    /// Of those, pods whose programs, maps and flows this agent took over from the agent
    /// before it (a restart or an upgrade with the same programs).
    pub fastpath_pods_adopted: Gauge,
    /// 1 when the node's programs (the kernel SaP and its flows) were taken over from the
    /// agent before it.
    pub fastpath_node_adopted: Gauge,
    /// Flows the node's SaP forwards in the kernel (at the last sync).
    pub fastpath_sap_flows: Gauge,
    /// Datagrams the node's SaP forwarded in the kernel (also in `keyway_datapath_*`).
    pub fastpath_sap_datagrams: Counter,
    /// Identity pairs in the kernel SaP's compiled policy (0: none in force).
    pub fastpath_sap_policy_pairs: Gauge,
    /// Datagrams the kernel SaP forwarded by its compiled policy (a flow's first datagrams
    /// among them; also in `keyway_fastpath_sap_datagrams`).
    pub fastpath_sap_policy_datagrams: Counter,
    /// Flows the node's gateway carries in the kernel (at the last sync).
    pub fastpath_gateway_flows: Gauge,
    /// Packets the node's gateway carried in the kernel (also in `keyway_datapath_*`).
    pub fastpath_gateway_packets: Counter,
    /// Packets and bytes the pods' programs carried, by direction (also in `keyway_datapath_*`).
    pub fastpath_pod_packets: Family<DirectionLabel, Counter>,
    pub fastpath_pod_bytes: Family<DirectionLabel, Counter>,
    /// Of the packets the pods' programs carried, the ones their compiled policy admitted (a
    /// connection's first packets among them; also in `keyway_fastpath_pod_packets`).
    pub fastpath_pod_policy_packets: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabel {
    pub op: &'static str,
}

fn histogram(start: f64, buckets: u16) -> Histogram {
    Histogram::new(exponential_buckets(start, 2.0, buckets))
}

impl Metrics {
    pub fn new(counters: Arc<Counters>, source: Arc<SourceStats>) -> Metrics {
        let m = Metrics {
            pods: Gauge::default(),
            policy_generation: Gauge::default(),
            identities: Gauge::default(),
            fib_entries: Gauge::default(),
            compile_seconds: histogram(0.0001, 16),
            handoff_seconds: Family::new_with_constructor(|| histogram(0.0005, 14)),
            handoff_errors: Family::default(),
            egress_apply_errors: Counter::default(),
            ready: Gauge::default(),
            endpointslice_writes: Family::default(),
            endpointslice_errors: Counter::default(),
            publications: Family::default(),
            publication_errors: Counter::default(),
            admin_refused: Counter::default(),
            reattach_failures: Counter::default(),
            attachments_refused: Family::default(),
            packet_authentication: Family::default(),
            key_epoch: Gauge::default(),
            bpf_available: Gauge::default(),
            fastpath_pods: Gauge::default(),
            fastpath_pods_adopted: Gauge::default(),
            fastpath_node_adopted: Gauge::default(),
            fastpath_sap_flows: Gauge::default(),
            fastpath_sap_datagrams: Counter::default(),
            fastpath_sap_policy_pairs: Gauge::default(),
            fastpath_sap_policy_datagrams: Counter::default(),
            fastpath_gateway_flows: Gauge::default(),
            fastpath_gateway_packets: Counter::default(),
            fastpath_pod_packets: Family::default(),
            fastpath_pod_bytes: Family::default(),
            fastpath_pod_policy_packets: Counter::default(),
            registry: Registry::default(),
        };
        let mut r = Registry::default();
        m.register(&mut r);
        let reloads = AtomicCounter(source.clone(), |s| &s.reloads);
        r.register(
            "keyway_source_reloads",
            "Reloads of the state source",
            reloads,
        );
        let errors = AtomicCounter(source, |s| &s.errors);
        let help = "Documents of the state source that did not parse";
        r.register("keyway_source_errors", help, errors);
        r.register_collector(Box::new(DataPath { counters }));
        Metrics { registry: r, ..m }
    }

    /// Registers each metric (a metric is a handle: the registered clone counts for both).
    fn register(&self, r: &mut Registry) {
        r.register(
            "keyway_pods",
            "Pods attached to this agent",
            self.pods.clone(),
        );
        let generation = self.policy_generation.clone();
        r.register(
            "keyway_policy_generation",
            "Generation of the tables in force",
            generation,
        );
        let help = "Identities in the compiled policy";
        r.register("keyway_policy_identities", help, self.identities.clone());
        let help = "Overlay addresses in the forwarding table";
        r.register("keyway_fib_entries", help, self.fib_entries.clone());
        let help = "Time to compile and publish the tables";
        r.register(
            "keyway_policy_compile_seconds",
            help,
            self.compile_seconds.clone(),
        );
        let help = "Time to serve a plugin request, by request";
        r.register("keyway_handoff_seconds", help, self.handoff_seconds.clone());
        let help = "Plugin requests answered with an error, by request";
        r.register("keyway_handoff_errors", help, self.handoff_errors.clone());
        let help = "Failures to apply a pod's off-overlay egress rules";
        r.register(
            "keyway_egress_apply_errors",
            help,
            self.egress_apply_errors.clone(),
        );
        let help = "1 once the agent serves (state synced, pods re-attached)";
        r.register("keyway_ready", help, self.ready.clone());
        let help = "EndpointSlices of covered Services written, by op (apply, delete)";
        r.register(
            "keyway_endpointslice_writes",
            help,
            self.endpointslice_writes.clone(),
        );
        let help = "Failed attempts to bring this node's EndpointSlices up to date";
        r.register(
            "keyway_endpointslice_errors",
            help,
            self.endpointslice_errors.clone(),
        );
        let help = "Pods' places on the overlay told to the cluster, by op (publish, withdraw)";
        r.register("keyway_publications", help, self.publications.clone());
        let help = "Failed attempts to publish or withdraw a pod's place (each retried)";
        r.register(
            "keyway_publication_errors",
            help,
            self.publication_errors.clone(),
        );
        let help = "Admin connections closed unserved: the server had its connection cap";
        r.register("keyway_admin_refused", help, self.admin_refused.clone());
        let help = "Other agents' published attachments not counted, by reason (unattested, wrong_node, not_pod_ip, node_address, outside_network, wrong_block, conflict)";
        r.register(
            "keyway_attachments_refused",
            help,
            self.attachments_refused.clone(),
        );
        let help = "Packet authentication in force (1) by mode: disabled, permissive, strict";
        r.register(
            "keyway_packet_authentication",
            help,
            self.packet_authentication.clone(),
        );
        let help = "The key epoch of the last compile: rises by one each rotation period";
        r.register("keyway_key_epoch", help, self.key_epoch.clone());
        let help = "1 when this kernel loads keyway's eBPF programs (probed at start), else 0";
        r.register("keyway_bpf_available", help, self.bpf_available.clone());
        let help = "Pods whose flows keyway's eBPF fast path carries (established flows; a TCP, UDP or echo flow's first packets too, IPv4 inside, where the node's compiled policy covers them)";
        r.register("keyway_fastpath_pods", help, self.fastpath_pods.clone());
        let help = "Pods on the fast path whose programs, maps and flows this agent took over from the agent before it, so their flows went on in the kernel across the restart";
        r.register(
            "keyway_fastpath_pods_adopted",
            help,
            self.fastpath_pods_adopted.clone(),
        );
        let help = "1 when this agent took over the node's eBPF programs (the kernel SaP and its flows) from the agent before it, else 0";
        r.register(
            "keyway_fastpath_node_adopted",
            help,
            self.fastpath_node_adopted.clone(),
        );
        let help = "Flows the node's SaP forwards in the kernel from its flow map, at the last sync (what the compiled policy does not cover: the user-space SaP forwards each flow's first datagrams)";
        r.register(
            "keyway_fastpath_sap_flows",
            help,
            self.fastpath_sap_flows.clone(),
        );
        let help = "Datagrams the node's SaP forwarded in the kernel (counted in keyway_datapath_* with the user-space SaP's)";
        r.register(
            "keyway_fastpath_sap_datagrams",
            help,
            self.fastpath_sap_datagrams.clone(),
        );
        let help = "Identity pairs in the node's kernel SaP's compiled policy, at the last sync (0: none in force; the user-space SaP judges what it does not hold)";
        r.register(
            "keyway_fastpath_sap_policy_pairs",
            help,
            self.fastpath_sap_policy_pairs.clone(),
        );
        let help = "Datagrams the node's SaP forwarded in the kernel by its compiled policy, a flow's first ones among them (counted in keyway_fastpath_sap_datagrams too)";
        r.register(
            "keyway_fastpath_sap_policy_datagrams",
            help,
            self.fastpath_sap_policy_datagrams.clone(),
        );
        let help = "Flows the node's gateway carries in the kernel, at the last sync (the user-space gateway carries each flow's first packets)";
        r.register(
            "keyway_fastpath_gateway_flows",
            help,
            self.fastpath_gateway_flows.clone(),
        );
        let help = "Packets the node's gateway carried in the kernel (counted in keyway_datapath_* with the user-space gateway's)";
        r.register(
            "keyway_fastpath_gateway_packets",
            help,
            self.fastpath_gateway_packets.clone(),
        );
        let help = "Packets the pods' eBPF programs carried, by direction (egress: encapsulated and sent; ingress: decapsulated and delivered; a GSO packet as its segments; counted in keyway_datapath_* with the user-space path's)";
        r.register(
            "keyway_fastpath_pod_packets",
            help,
            self.fastpath_pod_packets.clone(),
        );
        let help = "Inner bytes the pods' eBPF programs carried, by direction";
        r.register(
            "keyway_fastpath_pod_bytes",
            help,
            self.fastpath_pod_bytes.clone(),
        );
        let help = "Packets the pods' eBPF programs admitted by the node's compiled policy, both ways, a connection's first ones among them (counted in keyway_fastpath_pod_packets too)";
        r.register(
            "keyway_fastpath_pod_policy_packets",
            help,
            self.fastpath_pod_policy_packets.clone(),
        );
        let help = "Re-attachments to a pod that failed while its namespace remained (retried)";
        r.register(
            "keyway_reattach_failures",
            help,
            self.reattach_failures.clone(),
        );
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String cannot fail");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_exported_by_stage_and_reason() {
        let c = Arc::new(Counters::new());
        c.dropped(Stage::Ingress, DropReason::BadKey);
        c.forwarded(Stage::Egress, 100);
        let m = Metrics::new(c, Arc::default());
        m.pods.set(3);
        let text = m.encode();
        assert!(
            text.contains("keyway_datapath_drops_total{stage=\"ingress\",reason=\"bad_key\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("keyway_datapath_packets_total{stage=\"egress\"} 1"),
            "{text}"
        );
        assert!(text.contains("keyway_pods 3"), "{text}");
        assert!(text.contains("keyway_source_errors_total 0"), "{text}");
    }
}
