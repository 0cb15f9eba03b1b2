//! Overlay IPAM across nodes through the API server: agents racing for blocks never share an
//! address, released addresses come back, and a departed node's blocks are reclaimed. The API
//! server is the in-memory one, with the one semantic that matters here — a name is created once,
//! the second create is 409 AlreadyExists — and it counts how often that race was actually run.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use keyway_agent::claims::{ClaimError, Claims, KubeClaims};
use keyway_agent::ipam::{Ipam, NeedBlock};
use keyway_agent::model::OverlayNetwork;
use keyway_protocol::handoff::Attachment;
use keyway_testing::FakeApi;

fn network() -> OverlayNetwork {
    // 16 blocks of /28, 14 usable addresses each.
    OverlayNetwork::new("default", "100.64.0.0/24".parse().unwrap(), 28)
}

fn att(node: &str, i: usize) -> Attachment {
    Attachment {
        container_id: format!("{node}-c{i}"),
        ifname: "eth0".into(),
    }
}

fn block_of(ip: IpAddr) -> u64 {
    let IpAddr::V4(a) = ip else { panic!() };
    u64::from(a.octets()[3] / 16)
}

/// What an agent does for one address: allocate, and when the address book has no free address,
/// find the blocks it holds or claim the next one, then allocate again.
async fn allocate(
    ipam: &mut Ipam,
    claims: &Claims,
    node: &str,
    att: &Attachment,
) -> Result<IpAddr, ClaimError> {
    let nets = [network()];
    loop {
        match ipam.allocate(att, &nets) {
            Ok(ips) => return Ok(ips[0]),
            Err(NeedBlock(name)) if !ipam.knows(&name) => {
                let held = claims.held(&name, node).await?;
                ipam.add_blocks(&name, held.clone());
                if held.is_empty() {
                    ipam.add_blocks(&name, [claims.claim_next(&nets[0], node).await?]);
                }
            }
            Err(NeedBlock(name)) => {
                ipam.add_blocks(&name, [claims.claim_next(&nets[0], node).await?])
            }
        }
    }
}

/// Block index → holder.
fn holders(api: &FakeApi) -> BTreeMap<u64, String> {
    api.objects("overlayblocks")
        .iter()
        .map(|o| {
            (
                o["spec"]["index"].as_u64().unwrap(),
                o["spec"]["node"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn claims(api: &FakeApi) -> Claims {
    Claims::Kube(Box::new(KubeClaims::new(api.client())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_agents_never_share_an_address_and_addresses_come_back() {
    let api = FakeApi::new();
    // Interleave the agents' requests the way a network would.
    api.slow(Duration::from_micros(300), |_| true);
    // Two agents, each allocating 100 addresses as fast as it can.
    let agents: Vec<_> = ["node-1", "node-2"]
        .into_iter()
        .map(|node| {
            let claims = claims(&api);
            tokio::spawn(async move {
                let mut ipam = Ipam::default();
                let mut ips = Vec::new();
                for i in 0..100 {
                    ips.push(
                        allocate(&mut ipam, &claims, node, &att(node, i))
                            .await
                            .unwrap(),
                    );
                }
                (node.to_string(), ips, ipam)
            })
        })
        .collect();
    let mut results = Vec::new();
    for a in agents {
        results.push(a.await.unwrap());
    }
    let conflicts = api.answered(409);
    assert!(conflicts > 0, "the agents really raced for the same blocks");
    let held = holders(&api);
    let mut all = BTreeSet::new();
    for (node, ips, _) in &results {
        for ip in ips {
            assert!(all.insert(*ip), "{ip} given twice");
            assert_eq!(
                &held[&block_of(*ip)],
                node,
                "{ip} is in a block {node} holds"
            );
        }
    }
    assert_eq!(all.len(), 200);
    eprintln!(
        "200 addresses from {} blocks, {conflicts} lost races",
        held.len()
    );

    // Everything is claimed now: a third node finds nothing.
    let third_claims = claims(&api);
    let mut third = Ipam::default();
    assert!(matches!(
        allocate(&mut third, &third_claims, "node-3", &att("node-3", 0)).await,
        Err(ClaimError::Exhausted { .. })
    ));

    // Released addresses come back to the same node, with no new block.
    let (_, _, ipam1) = &mut results[0];
    let released: BTreeSet<IpAddr> = (0..50)
        .flat_map(|i| ipam1.release(&att("node-1", i)))
        .map(|(_, ip)| ip)
        .collect();
    assert_eq!(released.len(), 50);
    let c1 = claims(&api);
    let mut again = BTreeSet::new();
    for i in 100..150 {
        again.insert(
            allocate(ipam1, &c1, "node-1", &att("node-1", i))
                .await
                .unwrap(),
        );
    }
    assert_eq!(again, released, "the released addresses, reused");
    assert_eq!(holders(&api).len(), held.len(), "no block claimed for them");

    // node-2 leaves the cluster: its blocks are reclaimed and node-3 can allocate.
    let live = BTreeSet::from(["node-1".to_string(), "node-3".to_string()]);
    let reclaimed = KubeClaims::new(api.client()).reclaim(&live).await.unwrap();
    assert_eq!(reclaimed, held.values().filter(|n| *n == "node-2").count());
    assert!(holders(&api).values().all(|n| n != "node-2"));
    let ip = allocate(&mut third, &third_claims, "node-3", &att("node-3", 0))
        .await
        .unwrap();
    assert_eq!(holders(&api)[&block_of(ip)], "node-3");
}

#[tokio::test]
async fn a_restarted_agent_finds_its_blocks_again() {
    let api = FakeApi::new();
    let first = {
        let mut ipam = Ipam::default();
        allocate(&mut ipam, &claims(&api), "node-1", &att("node-1", 0))
            .await
            .unwrap()
    };
    // A new agent (state restored from its records would hold `first`; here it holds nothing):
    // it allocates from the block it already holds rather than claiming another.
    let mut ipam = Ipam::default();
    let next = allocate(&mut ipam, &claims(&api), "node-1", &att("node-1", 1))
        .await
        .unwrap();
    assert_eq!(block_of(next), block_of(first));
    assert_eq!(holders(&api).len(), 1);
}
