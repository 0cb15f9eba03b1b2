//! Counters the data path increments and the agent exports: packets and bytes per direction, drops
//! by reason. Plain relaxed atomics, so the packet path never takes a lock to count.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::DropReason;

/// Where in the data path a packet was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Endpoint egress: TUN → GUE.
    Egress,
    /// Endpoint ingress: GUE → TUN.
    Ingress,
    /// SaP forwarding.
    Sap,
    /// The node's gateway: traffic from off the overlay into it.
    Gateway,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Egress, Stage::Ingress, Stage::Sap, Stage::Gateway];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Egress => "egress",
            Stage::Ingress => "ingress",
            Stage::Sap => "sap",
            Stage::Gateway => "gateway",
        }
    }
}

const REASONS: usize = DropReason::ALL.len();
const STAGES: usize = Stage::ALL.len();

/// Packets, bytes and drops, per stage.
#[derive(Debug, Default)]
pub struct Counters {
    packets: [AtomicU64; STAGES],
    bytes: [AtomicU64; STAGES],
    drops: [[AtomicU64; REASONS]; STAGES],
    /// What the endpoints' flow tables did under pressure.
    pub flows: std::sync::Arc<crate::flow::FlowCounters>,
}

impl Counters {
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    pub fn forwarded(&self, stage: Stage, bytes: usize) {
        self.packets[stage as usize].fetch_add(1, Ordering::Relaxed);
        self.bytes[stage as usize].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Adds what another path (the kernel's) forwarded: `packets` packets of `bytes` in all.
    pub fn forwarded_n(&self, stage: Stage, packets: u64, bytes: u64) {
        self.packets[stage as usize].fetch_add(packets, Ordering::Relaxed);
        self.bytes[stage as usize].fetch_add(bytes, Ordering::Relaxed);
    }

    #[inline]
    pub fn dropped(&self, stage: Stage, reason: DropReason) {
        self.drops[stage as usize][reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn packets(&self, stage: Stage) -> u64 {
        self.packets[stage as usize].load(Ordering::Relaxed)
    }

    pub fn bytes(&self, stage: Stage) -> u64 {
        self.bytes[stage as usize].load(Ordering::Relaxed)
    }

    pub fn drops(&self, stage: Stage, reason: DropReason) -> u64 {
        self.drops[stage as usize][reason.index()].load(Ordering::Relaxed)
    }

    /// Drops for a reason summed over stages.
    pub fn drops_total(&self, reason: DropReason) -> u64 {
        Stage::ALL.iter().map(|s| self.drops(*s, reason)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_stage_and_reason() {
        let c = Counters::new();
        c.forwarded(Stage::Egress, 100);
        c.forwarded(Stage::Egress, 50);
        c.dropped(Stage::Ingress, DropReason::BadKey);
        c.dropped(Stage::Sap, DropReason::BadKey);
        c.dropped(Stage::Sap, DropReason::Malformed);
        assert_eq!(c.packets(Stage::Egress), 2);
        assert_eq!(c.bytes(Stage::Egress), 150);
        assert_eq!(c.packets(Stage::Ingress), 0);
        assert_eq!(c.drops(Stage::Ingress, DropReason::BadKey), 1);
        assert_eq!(c.drops_total(DropReason::BadKey), 2);
        assert_eq!(c.drops_total(DropReason::NoRoute), 0);
        for r in DropReason::ALL {
            assert!(!r.as_str().is_empty());
        }
    }
}
