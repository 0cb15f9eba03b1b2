//! The agent's state — the attachments it holds and the addresses they use — and every change to
//! it as a pure transition that returns the effects to run. Nothing here does I/O or waits: the
//! agent ([`crate::agent`]) holds its lock for a transition only, and runs the effects (disk,
//! the pod's namespace, the API server) outside it, so that one pod's handoff never queues behind
//! another's API call.

use std::collections::{BTreeMap, BTreeSet};

use ipnetwork::IpNetwork;
use keyway_protocol::Code;
use keyway_protocol::handoff::{AddRequest, AllocateRequest, Attachment, NetworkGrant};

use crate::compile::LocalPod;
use crate::ipam::{Ipam, NeedBlock};
use crate::model::{ObjectKey, OverlayAttachmentSpec, OverlayNetwork};
use crate::records::{Attached, Record};

/// Something the agent must do because the state changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Write the record, before the request that changed it is answered.
    Save(Record),
    /// Remove the attachment's record.
    Forget(Attachment),
    /// Tell the other agents where the pod is (in the background: no handoff waits for it).
    Publish(OverlayAttachmentSpec),
    /// Take that back (in the background).
    Withdraw(ObjectKey),
    /// Stop the attachment's L3 endpoint.
    Stop(Attachment),
    /// Stop it, and remove its devices and table from the pod's namespace (GC of an attachment
    /// the runtime no longer lists).
    Teardown {
        attachment: Attachment,
        devices: Vec<String>,
    },
}

/// Why a request is refused; each carries the CNI code the plugin passes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("container {0} is already attached for another pod")]
    OtherPod(String),
    #[error("Add without a prior Allocate for this attachment")]
    NotAllocated,
    #[error("Add names networks other than the ones allocated")]
    OtherNetworks,
}

impl Refused {
    pub fn code(&self) -> Code {
        Code::InvalidConfig
    }
}

/// What [`State::allocate`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Allocation {
    /// Allocated before: the same grants again.
    Existing(Vec<NetworkGrant>),
    /// A new record: save it ([`Effect::Save`]), then answer with its grants.
    New(Record),
    /// An address needs a block of this network first.
    NeedBlock(OverlayNetwork),
}

/// The attachments and their addresses.
#[derive(Debug)]
pub struct State {
    node: String,
    records: BTreeMap<Attachment, Record>,
    pub ipam: Ipam,
    /// Bumped by every change the compiled tables depend on.
    version: u64,
}

impl State {
    pub fn new(node: &str) -> State {
        State {
            node: node.to_string(),
            records: BTreeMap::new(),
            ipam: Ipam::default(),
            version: 0,
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn record(&self, att: &Attachment) -> Option<&Record> {
        self.records.get(att)
    }

    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.values()
    }

    /// Takes the records a previous agent left (at start-up, before serving).
    pub fn restore(&mut self, records: Vec<Record>) {
        for r in records {
            for g in &r.networks {
                self.ipam.restore(&r.attachment, &g.network, g.address.ip());
            }
            self.records.insert(r.attachment.clone(), r);
        }
        self.version += 1;
    }

    /// Reserves an address per network for an attachment (idempotent).
    pub fn allocate(
        &mut self,
        req: &AllocateRequest,
        networks: &[OverlayNetwork],
    ) -> Result<Allocation, Refused> {
        if let Some(r) = self.records.get(&req.attachment) {
            if r.pod != req.pod {
                return Err(Refused::OtherPod(req.attachment.container_id.clone()));
            }
            return Ok(Allocation::Existing(r.networks.clone()));
        }
        let ips = match self.ipam.allocate(&req.attachment, networks) {
            Ok(ips) => ips,
            Err(NeedBlock(name)) => {
                let net = networks.iter().find(|n| n.name == name).cloned();
                return Ok(Allocation::NeedBlock(net.expect("a network asked for")));
            }
        };
        let grants = networks
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
            pod: req.pod.clone(),
            networks: grants,
            attached: None,
        };
        self.records.insert(req.attachment.clone(), record.clone());
        Ok(Allocation::New(record))
    }

    /// The new record of an allocation could not be saved: the allocation never happened.
    pub fn allocation_lost(&mut self, att: &Attachment) {
        self.records.remove(att);
        self.ipam.release(att);
    }

    /// The record an `Add` is for, checked against what was allocated.
    pub fn check_add(&self, req: &AddRequest) -> Result<Record, Refused> {
        let r = self
            .records
            .get(&req.attachment)
            .ok_or(Refused::NotAllocated)?;
        if r.networks != req.networks {
            return Err(Refused::OtherNetworks);
        }
        Ok(r.clone())
    }

    /// The pod was handed over and its endpoint runs: record where, and publish it. Refused
    /// when the allocation is gone meanwhile (a DEL that raced the ADD).
    pub fn attached(
        &mut self,
        att: &Attachment,
        attached: Attached,
    ) -> Result<Vec<Effect>, Refused> {
        let r = self.records.get_mut(att).ok_or(Refused::NotAllocated)?;
        r.attached = Some(attached);
        self.version += 1;
        let mut effects = vec![Effect::Save(r.clone())];
        effects.extend(self.publication(att).map(Effect::Publish));
        Ok(effects)
    }

    /// What other agents should know of an attached pod.
    pub fn publication(&self, att: &Attachment) -> Option<OverlayAttachmentSpec> {
        let r = self.records.get(att)?;
        let (a, pod) = (r.attached.as_ref()?, r.pod_key()?);
        Some(OverlayAttachmentSpec {
            namespace: pod.namespace,
            pod: pod.name,
            node: self.node.clone(),
            infra_ip: a.infra_ip,
            overlay_ips: r.networks.iter().map(|g| g.address.ip()).collect(),
            proof: None,
        })
    }

    /// Forgets an attachment (DEL, GC, or a pod found gone at start-up): its endpoint stops,
    /// its addresses return, its record goes, and its publication too unless another attachment
    /// of the same pod is still served. `None` when it was not known.
    pub fn forget(&mut self, att: &Attachment, teardown: bool) -> Option<(Record, Vec<Effect>)> {
        let record = self.records.remove(att)?;
        self.ipam.release(att);
        self.version += 1;
        let stop = if teardown {
            Effect::Teardown {
                attachment: att.clone(),
                devices: record.networks.iter().map(|g| g.device.clone()).collect(),
            }
        } else {
            Effect::Stop(att.clone())
        };
        let mut effects = vec![stop, Effect::Forget(att.clone())];
        let still_served = self
            .records
            .values()
            .any(|o| o.pod == record.pod && o.attached.is_some());
        if let Some(pod) = record.pod_key().filter(|_| !still_served) {
            effects.push(Effect::Withdraw(pod));
        }
        Some((record, effects))
    }

    /// GC: forgets every attachment not in `keep`, tearing down what is left of it.
    pub fn collect_garbage(&mut self, keep: &BTreeSet<Attachment>) -> (Vec<Record>, Vec<Effect>) {
        let stale: Vec<Attachment> = self
            .records
            .keys()
            .filter(|a| !keep.contains(a))
            .cloned()
            .collect();
        let mut removed = Vec::new();
        let mut effects = Vec::new();
        for att in stale {
            if let Some((r, e)) = self.forget(&att, true) {
                removed.push(r);
                effects.extend(e);
            }
        }
        (removed, effects)
    }

    /// This node's attached pods, as the compiler needs them.
    pub fn locals(&self) -> Vec<LocalPod> {
        self.records
            .values()
            .filter_map(|r| {
                Some(LocalPod {
                    entity: r.entity(),
                    pod: r.pod_key(),
                    overlay_ips: r.networks.iter().map(|g| g.address.ip()).collect(),
                    infra_ip: r.attached.as_ref()?.infra_ip,
                })
            })
            .collect()
    }

    /// The pods this node serves: what its publications should be.
    pub fn served(&self) -> BTreeSet<ObjectKey> {
        self.records
            .values()
            .filter(|r| r.attached.is_some())
            .filter_map(Record::pod_key)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_protocol::handoff::PodRef;

    fn att(i: u32) -> Attachment {
        Attachment {
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
        }
    }

    fn pod(name: &str) -> PodRef {
        PodRef {
            namespace: "x".into(),
            name: name.into(),
            uid: String::new(),
        }
    }

    fn alloc(i: u32, name: &str) -> AllocateRequest {
        AllocateRequest {
            attachment: att(i),
            pod: pod(name),
        }
    }

    fn attached() -> Attached {
        Attached {
            netns_path: "/var/run/netns/p".into(),
            netns_id: (1, 2),
            infra_ip: "10.244.1.5".parse().unwrap(),
            mtu: 1500,
            node_addresses: vec![],
        }
    }

    fn state() -> (State, Vec<OverlayNetwork>) {
        let mut s = State::new("node-1");
        s.ipam.add_blocks("default", [0]);
        (s, vec![OverlayNetwork::default_network()])
    }

    #[test]
    fn allocate_asks_for_a_block_then_grants_and_answers_the_same_again() {
        let mut s = State::new("node-1");
        let nets = vec![OverlayNetwork::default_network()];
        assert!(matches!(
            s.allocate(&alloc(1, "a"), &nets),
            Ok(Allocation::NeedBlock(n)) if n.name == "default"
        ));
        s.ipam.add_blocks("default", [0]);
        let Ok(Allocation::New(r)) = s.allocate(&alloc(1, "a"), &nets) else {
            panic!()
        };
        assert_eq!(r.networks[0].device, "kw0");
        assert_eq!(r.networks[0].address.to_string(), "100.64.0.1/32");
        assert_eq!(
            s.allocate(&alloc(1, "a"), &nets),
            Ok(Allocation::Existing(r.networks.clone()))
        );
        assert_eq!(
            s.allocate(&alloc(1, "b"), &nets),
            Err(Refused::OtherPod("c1".into()))
        );
        assert_eq!(s.version(), 0, "nothing the tables depend on changed yet");
        s.allocation_lost(&att(1));
        assert!(s.record(&att(1)).is_none());
        assert_eq!(s.ipam.in_use(), 0);
    }

    #[test]
    fn an_attached_pod_is_saved_published_and_compiled() {
        let (mut s, nets) = state();
        let Ok(Allocation::New(r)) = s.allocate(&alloc(1, "a"), &nets) else {
            panic!()
        };
        let add = AddRequest {
            attachment: att(1),
            pod: pod("a"),
            netns_path: "/var/run/netns/p".into(),
            infra_ip: "10.244.1.5".parse().unwrap(),
            mtu: 1500,
            networks: r.networks.clone(),
            node_addresses: vec![],
        };
        assert_eq!(s.check_add(&add), Ok(r.clone()));
        let wrong = AddRequest {
            networks: vec![],
            ..add.clone()
        };
        assert_eq!(s.check_add(&wrong), Err(Refused::OtherNetworks));
        assert!(s.locals().is_empty(), "allocated is not attached");
        let effects = s.attached(&att(1), attached()).unwrap();
        assert_eq!(s.version(), 1);
        assert!(matches!(&effects[0], Effect::Save(r) if r.attached.is_some()));
        assert!(
            matches!(&effects[1], Effect::Publish(p) if p.pod == "a" && p.node == "node-1"
            && p.overlay_ips == [r.networks[0].address.ip()])
        );
        assert_eq!(s.locals().len(), 1);
        assert_eq!(&*s.locals()[0].entity, "x/a");
        assert_eq!(s.served(), BTreeSet::from([ObjectKey::new("x", "a")]));
    }

    #[test]
    fn forgetting_withdraws_only_when_no_other_attachment_serves_the_pod() {
        let (mut s, nets) = state();
        for i in [1, 2] {
            s.allocate(&alloc(i, "a"), &nets).unwrap();
            s.attached(&att(i), attached()).unwrap();
        }
        let (_, effects) = s.forget(&att(1), false).unwrap();
        assert!(
            !effects.iter().any(|e| matches!(e, Effect::Withdraw(_))),
            "c2 still serves x/a"
        );
        assert!(effects.contains(&Effect::Forget(att(1))));
        let (_, effects) = s.forget(&att(2), false).unwrap();
        assert!(effects.contains(&Effect::Withdraw(ObjectKey::new("x", "a"))));
        assert!(
            s.forget(&att(2), false).is_none(),
            "a second DEL is a no-op"
        );
        assert_eq!(s.ipam.in_use(), 0);
    }

    #[test]
    fn garbage_collection_tears_down_what_is_not_kept() {
        let (mut s, nets) = state();
        for i in 1..=3 {
            s.allocate(&alloc(i, &format!("p{i}")), &nets).unwrap();
        }
        let (removed, effects) = s.collect_garbage(&BTreeSet::from([att(2)]));
        assert_eq!(removed.len(), 2);
        assert!(effects.contains(&Effect::Teardown {
            attachment: att(3),
            devices: vec!["kw0".into()]
        }));
        assert_eq!(s.records().count(), 1);
    }

    #[test]
    fn restored_records_keep_their_addresses() {
        let (mut s, nets) = state();
        let Ok(Allocation::New(r)) = s.allocate(&alloc(1, "a"), &nets) else {
            panic!()
        };
        let mut fresh = State::new("node-1");
        fresh.restore(vec![r.clone()]);
        fresh.ipam.add_blocks("default", [0]);
        let Ok(Allocation::New(r2)) = fresh.allocate(&alloc(2, "b"), &nets) else {
            panic!()
        };
        assert_ne!(r2.networks[0].address, r.networks[0].address);
    }
}
