//! Overlay IPAM across nodes through the API server: agents racing for blocks never share an
//! address, released addresses come back, and a departed node's blocks are reclaimed. The API
//! server is a mock with the one semantic that matters here — a name is created once, the second
//! create is 409 AlreadyExists — and it records how often that race was actually run.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use keyway_agent::ipam::{Ipam, IpamError};
use keyway_agent::kube_claims::KubeClaims;
use keyway_agent::model::{OverlayNetwork, OverlayNetworkSpec};
use keyway_cni::handoff::Attachment;
use serde_json::{Value, json};

const BLOCKS: &str = "/apis/keyway.io/v1alpha1/overlayblocks";

#[derive(Debug, Clone, Default)]
struct ApiServer {
    objects: Arc<Mutex<BTreeMap<String, Value>>>,
    conflicts: Arc<AtomicUsize>,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": if code < 300 {"Success"} else {"Failure"},
           "reason": reason, "message": message, "code": code})
}

impl ApiServer {
    async fn handle(&self, req: http::Request<kube::client::Body>) -> (u16, Value) {
        // Interleave the agents' requests the way a network would.
        tokio::time::sleep(Duration::from_micros(300)).await;
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let mut objects = self.objects.lock().unwrap();
        let name = path.strip_prefix(BLOCKS).and_then(|p| p.strip_prefix('/'));
        match (method.as_str(), name) {
            ("POST", None) => {
                let mut obj: Value = serde_json::from_slice(&body).unwrap();
                let name = obj["metadata"]["name"].as_str().unwrap().to_string();
                if objects.contains_key(&name) {
                    self.conflicts.fetch_add(1, Ordering::Relaxed);
                    return (
                        409,
                        status(
                            409,
                            "AlreadyExists",
                            &format!("overlayblocks.keyway.io \"{name}\" already exists"),
                        ),
                    );
                }
                obj["metadata"]["uid"] = json!(format!("uid-{name}"));
                obj["metadata"]["resourceVersion"] = json!("1");
                objects.insert(name, obj.clone());
                (201, obj)
            }
            ("GET", None) => (
                200,
                json!({"apiVersion": "keyway.io/v1alpha1", "kind": "OverlayBlockList",
                "metadata": {"resourceVersion": "1"}, "items": objects.values().cloned().collect::<Vec<_>>()}),
            ),
            ("GET", Some(n)) => match objects.get(n) {
                Some(o) => (200, o.clone()),
                None => (404, status(404, "NotFound", "not found")),
            },
            ("DELETE", Some(n)) => match objects.remove(n) {
                Some(_) => (200, status(200, "", "")),
                None => (404, status(404, "NotFound", "not found")),
            },
            _ => (405, status(405, "MethodNotAllowed", "")),
        }
    }

    /// A client served on `rt` (kube's client starts its buffer task there).
    fn client(&self, rt: &tokio::runtime::Runtime) -> kube::Client {
        let _in_rt = rt.enter();
        let me = self.clone();
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let me = me.clone();
            async move {
                let (code, v) = me.handle(req).await;
                Ok::<_, Infallible>(
                    http::Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(v.to_string())))
                        .unwrap(),
                )
            }
        });
        kube::Client::new(svc, "default")
    }

    /// block name → node.
    fn holders(&self) -> BTreeMap<u64, String> {
        self.objects
            .lock()
            .unwrap()
            .values()
            .map(|o| {
                (
                    o["spec"]["index"].as_u64().unwrap(),
                    o["spec"]["node"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

fn network() -> OverlayNetwork {
    OverlayNetwork {
        name: "default".into(),
        spec: OverlayNetworkSpec {
            // 16 blocks of /28, 14 usable addresses each.
            cidr: "100.64.0.0/24".parse().unwrap(),
            block_prefix: Some(28),
            device: None,
            pod_selector: None,
            namespace_selector: None,
        },
    }
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

#[test]
fn racing_agents_never_share_an_address_and_addresses_come_back() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let api = ApiServer::default();
    let nets = [network()];
    // Two agents, each on its own thread, each allocating 100 addresses as fast as it can.
    let results: Vec<(String, Vec<IpAddr>, Ipam)> = std::thread::scope(|s| {
        let hs: Vec<_> = ["node-1", "node-2"]
            .into_iter()
            .map(|node| {
                let claims = KubeClaims::new(api.client(&rt), rt.handle().clone());
                let nets = &nets;
                s.spawn(move || {
                    let mut ipam = Ipam::new(node, Box::new(claims));
                    let ips: Vec<IpAddr> = (0..100)
                        .map(|i| ipam.allocate(&att(node, i), nets).unwrap()[0])
                        .collect();
                    (node.to_string(), ips, ipam)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let conflicts = api.conflicts.load(Ordering::Relaxed);
    assert!(conflicts > 0, "the agents really raced for the same blocks");
    let holders = api.holders();
    let mut all = BTreeSet::new();
    for (node, ips, _) in &results {
        for ip in ips {
            assert!(all.insert(*ip), "{ip} given twice");
            assert_eq!(
                &holders[&block_of(*ip)],
                node,
                "{ip} is in a block {node} holds"
            );
        }
    }
    assert_eq!(all.len(), 200);
    eprintln!(
        "200 addresses from {} blocks, {conflicts} lost races",
        holders.len()
    );

    // Everything is claimed now: a third node finds nothing.
    let mut third = Ipam::new(
        "node-3",
        Box::new(KubeClaims::new(api.client(&rt), rt.handle().clone())),
    );
    assert!(matches!(
        third.allocate(&att("node-3", 0), &nets),
        Err(IpamError::Exhausted { .. })
    ));

    // Released addresses come back to the same node, with no new block.
    let mut results = results;
    let (_, ips1, ipam1) = &mut results[0];
    let released: BTreeSet<IpAddr> = (0..50)
        .flat_map(|i| ipam1.release(&att("node-1", i)))
        .map(|(_, ip)| ip)
        .collect();
    assert_eq!(released.len(), 50);
    let again: BTreeSet<IpAddr> = (100..150)
        .map(|i| ipam1.allocate(&att("node-1", i), &nets).unwrap()[0])
        .collect();
    assert_eq!(again, released, "the released addresses, reused");
    assert_eq!(
        api.holders().len(),
        holders.len(),
        "no block claimed for them"
    );
    let _ = ips1;

    // node-2 leaves the cluster: its blocks are reclaimed and node-3 can allocate.
    let claims = KubeClaims::new(api.client(&rt), rt.handle().clone());
    let live = BTreeSet::from(["node-1".to_string(), "node-3".to_string()]);
    let reclaimed = claims.reclaim(&live).unwrap();
    assert_eq!(
        reclaimed,
        holders.values().filter(|n| *n == "node-2").count()
    );
    assert!(api.holders().values().all(|n| n != "node-2"));
    let ip = third.allocate(&att("node-3", 0), &nets).unwrap()[0];
    assert_eq!(api.holders()[&block_of(ip)], "node-3");
}

#[test]
fn a_restarted_agent_finds_its_blocks_again() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let api = ApiServer::default();
    let nets = [network()];
    let first = {
        let mut ipam = Ipam::new(
            "node-1",
            Box::new(KubeClaims::new(api.client(&rt), rt.handle().clone())),
        );
        ipam.allocate(&att("node-1", 0), &nets).unwrap()[0]
    };
    // A new agent (state restored from its records would hold `first`; here it holds nothing):
    // it allocates from the block it already holds rather than claiming another.
    let mut ipam = Ipam::new(
        "node-1",
        Box::new(KubeClaims::new(api.client(&rt), rt.handle().clone())),
    );
    let next = ipam.allocate(&att("node-1", 1), &nets).unwrap()[0];
    assert_eq!(block_of(next), block_of(first));
    assert_eq!(api.holders().len(), 1);
}
