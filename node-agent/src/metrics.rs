//! The agent's Prometheus metrics. Data-path counters live in plain atomics (the packet path never
//! takes a lock to count) and are read at scrape time by a collector; the rest are ordinary
//! prometheus-client metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keyway_sap::counters::{Counters, Stage};
use keyway_sap::engine::DropReason;
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
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabel {
    pub op: &'static str,
}

impl Metrics {
    pub fn new(counters: Arc<Counters>, source: Arc<SourceStats>) -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            pods: Gauge::default(),
            policy_generation: Gauge::default(),
            identities: Gauge::default(),
            fib_entries: Gauge::default(),
            compile_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            handoff_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 14))
            }),
            handoff_errors: Family::default(),
            egress_apply_errors: Counter::default(),
            ready: Gauge::default(),
            endpointslice_writes: Family::default(),
            endpointslice_errors: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("keyway_pods", "Pods attached to this agent", m.pods.clone());
        registry.register(
            "keyway_policy_generation",
            "Generation of the tables in force",
            m.policy_generation.clone(),
        );
        registry.register(
            "keyway_policy_identities",
            "Identities in the compiled policy",
            m.identities.clone(),
        );
        registry.register(
            "keyway_fib_entries",
            "Overlay addresses in the forwarding table",
            m.fib_entries.clone(),
        );
        registry.register(
            "keyway_policy_compile_seconds",
            "Time to compile and publish the tables",
            m.compile_seconds.clone(),
        );
        registry.register(
            "keyway_handoff_seconds",
            "Time to serve a plugin request, by request",
            m.handoff_seconds.clone(),
        );
        registry.register(
            "keyway_handoff_errors",
            "Plugin requests answered with an error, by request",
            m.handoff_errors.clone(),
        );
        registry.register(
            "keyway_egress_apply_errors",
            "Failures to apply a pod's off-overlay egress rules",
            m.egress_apply_errors.clone(),
        );
        registry.register(
            "keyway_ready",
            "1 once the agent serves (state synced, pods re-attached)",
            m.ready.clone(),
        );
        registry.register(
            "keyway_endpointslice_writes",
            "EndpointSlices of covered Services written, by op (apply, delete)",
            m.endpointslice_writes.clone(),
        );
        registry.register(
            "keyway_endpointslice_errors",
            "Failed attempts to bring this node's EndpointSlices up to date",
            m.endpointslice_errors.clone(),
        );
        registry.register(
            "keyway_source_reloads",
            "Reloads of the state source",
            AtomicCounter(source.clone(), |s| &s.reloads),
        );
        registry.register(
            "keyway_source_errors",
            "Documents of the state source that did not parse",
            AtomicCounter(source, |s| &s.errors),
        );
        registry.register_collector(Box::new(DataPath { counters }));
        Metrics { registry, ..m }
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
