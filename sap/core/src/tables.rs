//! Atomic publication of what the control plane compiles. A writer builds a whole new snapshot and
//! swaps it in; the packet path loads the current one without ever waiting for a writer, and a
//! packet is judged entirely by one snapshot, never by half of an update.

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use crate::engine::{LocalEndpoint, Tables};

/// The current [`Tables`], shared by every endpoint and SaP of a process.
#[derive(Debug)]
pub struct SharedTables(ArcSwap<Tables>);

impl SharedTables {
    pub fn new(tables: Tables) -> Arc<Self> {
        Arc::new(SharedTables(ArcSwap::from_pointee(tables)))
    }

    /// The current snapshot. Cheap: no lock, no reference-count traffic in the common case.
    #[inline]
    pub fn load(&self) -> Guard<Arc<Tables>> {
        self.0.load()
    }

    /// Replaces the snapshot; packets already being judged finish with the old one.
    pub fn publish(&self, tables: Tables) {
        self.0.store(Arc::new(tables));
    }

    pub fn generation(&self) -> u64 {
        self.0.load().generation
    }
}

/// An endpoint's own facts, refreshed by the control plane (its keys rotate).
#[derive(Debug)]
pub struct SharedLocal(ArcSwap<LocalEndpoint>);

impl SharedLocal {
    pub fn new(local: LocalEndpoint) -> Arc<Self> {
        Arc::new(SharedLocal(ArcSwap::from_pointee(local)))
    }

    #[inline]
    pub fn load(&self) -> Guard<Arc<LocalEndpoint>> {
        self.0.load()
    }

    pub fn publish(&self, local: LocalEndpoint) {
        self.0.store(Arc::new(local));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_keep_their_snapshot_while_a_writer_publishes() {
        let shared = SharedTables::new(Tables {
            generation: 1,
            ..Default::default()
        });
        let held = shared.load_full_for_test();
        shared.publish(Tables {
            generation: 2,
            ..Default::default()
        });
        assert_eq!(held.generation, 1);
        assert_eq!(shared.generation(), 2);
    }

    impl SharedTables {
        fn load_full_for_test(&self) -> Arc<Tables> {
            self.0.load_full()
        }
    }
}
