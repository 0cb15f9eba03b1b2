//! The ways around enforcement (issue 15), each performed with real packets from where an
//! attacker would be, against a two-node lab with kube-proxy's rules (the Services topology of
//! `conformance/services/cluster.yaml`): a host on the underlay, a pod with the default
//! capabilities (raw sockets: CAP_NET_RAW), a neighbour on the pod bridge (the opted-out pod
//! `legacy/old`, which no keyway table constrains), a workload binding keyway's port while the
//! agent restarts. Each asserts that the secure outcome holds and that the refusal is counted
//! where an operator would look (a metric, or the counter of the nftables rule that dropped it).
//!
//! Every attack is run and reported before anything is asserted, so that a run against an older
//! build prints the whole "before" table (`cargo test --test attacks -- --nocapture`). The whole
//! suite runs twice: with the kernel fast path on (the agents' default), then with every agent on
//! the user-space path alone (`--datapath user`).

use std::fmt::Write as _;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keyway_conformance::attack::{
    port_unreachable4, received, router_advertisement, rule_packets, send_raw, udp_socket, udp4, v4,
};
use keyway_conformance::lab::{DownOnDrop, Lab, PodState, Via};
use keyway_conformance::topology::{Plan, in_ns};
use keyway_testing::{Scratch, privileged};

const PREFIX: &str = "kwa";
const UNDERLAY_OCTET: u8 = 84;
const POD_OCTET: u8 = 247;
const T: Duration = Duration::from_millis(1000);
/// The test's own nftables table in a pod, counting what arrived there.
const WITNESS: &str = "keyway-test-witness";

/// One attack's result: whether it got through, and whether its refusal was counted.
struct Outcome {
    item: u8,
    attack: &'static str,
    got_through: bool,
    counted: bool,
    detail: String,
    /// What the attack achieves by design in a mode that does not defend against it (packet
    /// authentication off): it must get through, which shows the attack is real and the test
    /// able to see it succeed.
    residual: bool,
}

impl Outcome {
    fn failed(&self) -> bool {
        if self.residual {
            !self.got_through
        } else {
            self.got_through || !self.counted
        }
    }
}

fn pod<'a>(lab: &'a Lab, key: &str) -> &'a PodState {
    lab.state
        .pods
        .iter()
        .find(|p| p.key() == key)
        .unwrap_or_else(|| panic!("no pod {key}"))
}

fn netns(p: &PodState) -> PathBuf {
    PathBuf::from(&p.netns_path)
}

fn netns_name(p: &PodState) -> String {
    netns(p).file_name().unwrap().to_string_lossy().into_owned()
}

fn ip(p: &PodState) -> Ipv4Addr {
    v4(&p.infra_ip).unwrap()
}

fn overlay(p: &PodState) -> Ipv4Addr {
    p.overlay_ips
        .iter()
        .find_map(|a| match a {
            IpAddr::V4(v) => Some(*v),
            _ => None,
        })
        .expect("an IPv4 overlay address")
}

/// The node's address on the pod's bridge (the primary's gateway): `.1` of the pod's /24.
fn bridge_ip(p: &PodState) -> Ipv4Addr {
    let o = ip(p).octets();
    Ipv4Addr::new(o[0], o[1], o[2], 1)
}

fn metric(lab: &Lab, node: usize, series: &str) -> f64 {
    lab.node_metric(series)[node]
}

/// The counter of the pod table's final input drop.
fn pod_drops(p: &PodState) -> u64 {
    rule_packets(&netns(p), "inet", "keyway", "did not come over the overlay").unwrap_or(0)
}

fn node_netns(lab: &Lab, i: usize) -> PathBuf {
    PathBuf::from("/var/run/netns").join(&lab.state.nodes[i].netns)
}

/// What node `i`'s gateway device dropped for want of a reader (no agent running): its TX
/// drops, as `ip -s link show kwgw0` prints them.
fn gateway_device_drops(lab: &Lab, i: usize) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.state.nodes[i].netns])
        .args(["cat", "/sys/class/net/kwgw0/statistics/tx_dropped"])
        .output()
        .expect("ip netns exec runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Whether the server still holds `s` open (no EOF, no reset, within 100 ms).
fn still_open(s: &TcpStream) -> bool {
    let mut s = s;
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let mut b = [0u8; 512];
    loop {
        match s.read(&mut b) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) => {
                return matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
            }
        }
    }
}

/// GET `path` from the agent's admin server at `addr`, from inside `netns`.
fn admin_get(netns: &Path, addr: SocketAddr, path: &str) -> Option<u16> {
    let ns = keyway_sap::sys::Netns::open(netns).ok()?;
    let s = ns
        .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .ok()?
        .ok()?;
    keyway_conformance::harness::tcp_get(s, path)
        .ok()
        .map(|(c, _)| c)
}

#[test]
fn attacks_on_enforcement_are_refused_and_counted() {
    if !privileged("attacks_on_enforcement") {
        return;
    }
    let scratch = Scratch::new("attacks");
    let dir = scratch.join("lab");
    let _down = DownOnDrop(dir.clone());
    let plan = Plan {
        prefix: PREFIX.into(),
        nodes: 0,
        pod_octet: POD_OCTET,
        underlay_octet: UNDERLAY_OCTET,
    };
    let mut lab = Lab::up_services_topology(&dir, plan).expect("lab up");
    let mut out = Vec::new();

    // Every attack with the kernel fast path carrying established flows (the agents' default),
    // then again with every agent restarted on the user-space path alone.
    for datapath in ["auto", "user"] {
        if datapath == "user" {
            lab.set_packet_authentication("Disabled")
                .expect("packet authentication off again");
            lab.set_datapath(datapath).expect("agents restarted");
        }
        let flow = overlay_flow(&lab);
        let mut pass = vec![forged_attachment(&lab)];
        pass.extend(node_exemption(&lab));
        pass.extend(conntrack_without_interfaces(&lab, &flow, "agent running"));
        pass.push(routing_through_a_pod(&lab));
        pass.push(rogue_router(&lab));
        pass.extend(flow_table_exhaustion(&lab));
        pass.extend(admin_endpoint(&lab));
        pass.extend(gue_port_and_restart(&mut lab, &flow));
        pass.extend(sniffed_key(&mut lab));
        out.extend(pass.into_iter().map(|o| (datapath, o)));
    }

    let mut table = String::from("datapath | item | attack | got through | counted | detail\n");
    for (datapath, o) in &out {
        let residual = if o.residual { " (residual)" } else { "" };
        let _ = writeln!(
            table,
            "{datapath} | {} | {}{residual} | {} | {} | {}",
            o.item, o.attack, o.got_through, o.counted, o.detail
        );
    }
    println!("{table}");
    let failed: Vec<&Outcome> = out.iter().map(|(_, o)| o).filter(|o| o.failed()).collect();
    assert!(
        failed.is_empty(),
        "attacks that got through or went uncounted:\n{table}"
    );
}

/// Item 1: an object writer claims front's overlay address for another pod (the opted-out
/// `legacy/old`, whose own facts are otherwise true: its node, its pod IP). Every other node
/// would route front's address to old; cart (node-2) could no longer reach front.
fn forged_attachment(lab: &Lab) -> Outcome {
    let front = pod(lab, "shop/front");
    let old = pod(lab, "legacy/old");
    let claim = format!(
        "apiVersion: keyway.io/v1alpha1\nkind: OverlayAttachment\n\
         metadata: {{name: legacy.old, namespace: legacy}}\n\
         spec: {{namespace: legacy, pod: old, node: {}, infraIp: {}, overlayIps: [{}]}}\n",
        old.node,
        ip(old),
        overlay(front)
    );
    std::fs::write(lab.source().join("zz-claim.yaml"), claim).unwrap();
    let series = "keyway_attachments_refused{reason=\"unattested\"}";
    let target = vec![format!("{}:80", overlay(front))];
    let cart = pod(lab, "shop/cart");
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let n = metric(lab, 1, series);
        if n > 0.0 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Whatever the agents made of it, give them the time to act on it.
    std::thread::sleep(Duration::from_millis(500));
    let got = lab
        .probe_from_netns(&netns_name(cart), &target, "TCP", T)
        .unwrap();
    std::fs::remove_file(lab.source().join("zz-claim.yaml")).unwrap();
    Outcome {
        item: 1,
        residual: false,
        attack: "object writer publishes another pod's overlay address for its own pod",
        got_through: !got[0],
        counted: refused > 0.0,
        detail: format!(
            "legacy/old claims {}; cart -> front {target:?} afterwards: {}; {series} {refused}",
            overlay(front),
            got[0]
        ),
    }
}

/// Item 3: what the node forwards to a pod is not the node. A NodePort with
/// `externalTrafficPolicy: Cluster` is masqueraded by kube-proxy; it used to arrive as the node,
/// which the pod admits unchecked. And a neighbour on the bridge claiming the node's address.
fn node_exemption(lab: &Lab) -> Vec<Outcome> {
    let cart_np = lab
        .state
        .services
        .iter()
        .find(|s| s.name == "cart-public")
        .unwrap()
        .node_ports()[0]
        .2;
    let node2 = lab.state.nodes[1].ip;
    let cart = pod(lab, "shop/cart");
    let mut v = Vec::new();

    // A host on the underlay that only front's ipBlock admits, to cart's NodePort on cart's
    // node: kube-proxy DNATs and masquerades it.
    let (c1, _) = lab.add_client(1).unwrap();
    let series = "keyway_datapath_drops_total{stage=\"gateway\",reason=\"denied_by_policy\"}";
    let before = metric(lab, 1, series);
    let got = lab
        .probe_from_netns(&c1, &[format!("{node2}:{cart_np}")], "TCP", T)
        .unwrap();
    v.push(Outcome {
        item: 3,
        residual: false,
        attack: "underlay host -> NodePort (Cluster, masqueraded) -> pod that does not admit it",
        got_through: got[0],
        counted: metric(lab, 1, series) > before,
        detail: format!("{c1} -> {node2}:{cart_np}; {series}"),
    });

    // A pod cart does not admit, through its own node's forwarded port (node address and the
    // bridge's).
    let intruder = pod(lab, "other/intruder");
    let series = "keyway_datapath_drops_total{stage=\"gateway\",reason=\"off_overlay\"}";
    let before = metric(lab, 1, series);
    let targets = vec![
        format!("{node2}:{cart_np}"),
        format!("{}:{cart_np}", bridge_ip(cart)),
    ];
    let got = lab
        .probe_from_netns(&netns_name(intruder), &targets, "TCP", T)
        .unwrap();
    v.push(Outcome {
        item: 3,
        residual: false,
        attack: "denied pod -> its node's NodePort -> pod that denies it",
        got_through: got.iter().any(|g| *g),
        counted: metric(lab, 1, series) > before,
        detail: format!("{targets:?}: {got:?}; {series}"),
    });

    v.push(spoofed_node_source(lab, "agent running"));
    v
}

/// A neighbour on front's bridge sends front a datagram from the node's address (which the pod
/// admits as its node): the node's bridge table drops it, with the agent running or not.
fn spoofed_node_source(lab: &Lab, when: &'static str) -> Outcome {
    let front = pod(lab, "shop/front");
    let old = pod(lab, "legacy/old");
    let listener = udp_socket(&netns(front), "0.0.0.0:9999".parse().unwrap()).unwrap();
    let node1 = node_netns(lab, 0);
    let drops = || rule_packets(&node1, "bridge", "keyway-gateway", "spoofed").unwrap_or(0);
    let before = drops();
    let spoofed = udp4(bridge_ip(front), 5555, ip(front), 9999, b"from-the-node?");
    send_raw(&netns(old), &[spoofed]).unwrap();
    let got = received(&listener, T);
    Outcome {
        item: 3,
        residual: false,
        attack: "bridge neighbour -> pod, claiming the node's address",
        got_through: got.iter().any(|g| g.as_deref() == Ok(b"from-the-node?")),
        counted: drops() > before,
        detail: format!(
            "{when}: {} as {} -> {}:9999; bridge keyway-gateway 'spoofed' counter",
            ip(old),
            bridge_ip(front),
            ip(front)
        ),
    }
}

/// A pod does not route: with forwarding on in front's namespace (as a privileged init
/// container might leave it), a neighbour on its bridge sends through front to cart's overlay
/// address, which cart admits from front.
fn routing_through_a_pod(lab: &Lab) -> Outcome {
    let front = pod(lab, "shop/front");
    let cart = pod(lab, "shop/cart");
    let old = pod(lab, "legacy/old");
    let listener = udp_socket(
        &netns(cart),
        SocketAddr::new(IpAddr::V4(overlay(cart)), 7777),
    )
    .unwrap();
    let sh = |ns: &Path, args: &[&str]| {
        in_ns(&ns.file_name().unwrap().to_string_lossy(), args).unwrap();
    };
    sh(&netns(front), &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    // The attacker's frames: to front's MAC, for cart's overlay address.
    let route = format!("{}/32", overlay(cart));
    sh(
        &netns(old),
        &[
            "ip",
            "route",
            "replace",
            &route,
            "via",
            &ip(front).to_string(),
        ],
    );
    let forward = || rule_packets(&netns(front), "inet", "keyway", "does not route").unwrap_or(0);
    let spoofed = "keyway_datapath_drops_total{stage=\"egress\",reason=\"spoofed_source\"}";
    let counted = || forward() + lab.node_metric(spoofed)[0] as u64;
    let before = counted();
    send_raw(
        &netns(old),
        &[udp4(ip(old), 5555, overlay(cart), 7777, b"through-front")],
    )
    .unwrap();
    let got = received(&listener, T);
    sh(&netns(front), &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    sh(&netns(old), &["ip", "route", "del", &route]);
    Outcome {
        item: 4,
        residual: false,
        attack: "bridge neighbour routes through a pod into the overlay",
        got_through: got.iter().any(|g| g.as_deref() == Ok(b"through-front")),
        counted: counted() > before,
        detail: format!(
            "{} -> {} via {}; front's forward-chain counter + {spoofed}",
            ip(old),
            overlay(cart),
            ip(front)
        ),
    }
}

/// Item 10: a neighbour on front's bridge sends it a router advertisement (a default route and
/// a prefix to take an address from); front takes neither, and its table counts the drop.
fn rogue_router(lab: &Lab) -> Outcome {
    let front = pod(lab, "shop/front");
    let old = pod(lab, "legacy/old");
    let ns = netns_name(front);
    let link_local = in_ns(
        &ns,
        &[
            "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link",
        ],
    )
    .unwrap_or_default()
    .split_whitespace()
    .find_map(|w| w.split('/').next()?.parse::<std::net::Ipv6Addr>().ok())
    .expect("front's eth0 has an IPv6 link-local address");
    let prefix: std::net::Ipv6Addr = "2001:db8:77::".parse().unwrap();
    let taken = || {
        let routes = in_ns(&ns, &["ip", "-6", "route", "show"]).unwrap_or_default();
        let addrs = in_ns(&ns, &["ip", "-6", "addr", "show"]).unwrap_or_default();
        routes.lines().any(|l| l.starts_with("default")) || addrs.contains("2001:db8:77")
    };
    let before = pod_drops(front);
    router_advertisement(&netns(old), "eth0", link_local, prefix).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    Outcome {
        item: 10,
        residual: false,
        attack: "bridge neighbour sends a pod a router advertisement (default route, prefix)",
        got_through: taken(),
        counted: pod_drops(front) > before,
        detail: format!("{} -> {link_local}: front's table drop counter", ip(old)),
    }
}

/// front's UDP flow to cart's pod IP, steered into the overlay and answered there.
fn overlay_flow(lab: &Lab) -> UdpSocket {
    let front = pod(lab, "shop/front");
    let cart = pod(lab, "shop/cart");
    let sock = udp_socket(&netns(front), "0.0.0.0:40404".parse().unwrap()).unwrap();
    sock.connect(SocketAddr::new(IpAddr::V4(ip(cart)), 80))
        .unwrap();
    sock.send(b"hello").unwrap();
    assert!(
        !received(&sock, T).is_empty(),
        "cart answers front over the overlay"
    );
    sock
}

/// Item 4: a connection's replies only on the interface it uses. A neighbour on front's bridge
/// forges cart's reply to front's flow (`overlay_flow`), and an ICMP error quoting it, on
/// front's eth0. With the agent running the node's gateway takes them first (a packet claiming
/// a protected pod's address never enters there); with it stopped they reach front's own table.
fn conntrack_without_interfaces(lab: &Lab, sock: &UdpSocket, when: &'static str) -> Vec<Outcome> {
    let front = pod(lab, "shop/front");
    let cart = pod(lab, "shop/cart");
    let old = pod(lab, "legacy/old");
    let gateway = "keyway_datapath_drops_total{stage=\"gateway\",reason=\"off_overlay\"}";
    // Front is on node-1. With its agent stopped, the gateway device (which persists, so that
    // the kernel gateway carries established flows across a restart) drops what the node
    // routes into it.
    let drops = || {
        let at_gateway = lab.node_metric(gateway).first().copied().unwrap_or(0.0) as u64;
        pod_drops(front) + at_gateway + gateway_device_drops(lab, 0)
    };
    let mut v = Vec::new();

    let before = drops();
    let forged = udp4(ip(cart), 80, ip(front), 40404, b"forged-reply");
    send_raw(&netns(old), &[forged]).unwrap();
    let got = received(sock, T);
    v.push(Outcome {
        item: 4,
        residual: false,
        attack: "bridge neighbour forges a reply to a pod's overlay flow on its eth0",
        got_through: got.iter().any(|g| g.as_deref() == Ok(b"forged-reply")),
        counted: drops() > before,
        detail: format!(
            "{when}: {} as {}:80 -> {}:40404; front's table drop counter + {gateway} + kwgw0's TX drops",
            ip(old),
            ip(cart),
            ip(front),
        ),
    });

    let before = drops();
    let quoted = udp4(ip(front), 40404, ip(cart), 80, b"hello");
    let icmp = port_unreachable4(ip(cart), ip(front), &quoted);
    send_raw(&netns(old), &[icmp]).unwrap();
    // An accepted error is reported by the socket's next call.
    std::thread::sleep(Duration::from_millis(200));
    let got = received(sock, T);
    v.push(Outcome {
        item: 4,
        residual: false,
        attack: "bridge neighbour sends an ICMP error quoting the overlay flow",
        got_through: got.contains(&Err(std::io::ErrorKind::ConnectionRefused)),
        counted: drops() > before,
        detail: format!(
            "{when}: port unreachable from {} quoting front->cart",
            ip(old)
        ),
    });
    v
}

/// Item 7: an allowed peer (front may reach cart) fills cart's flow table with flows it makes
/// up; cart must still open its own connections (to db-0, whose replies only the flow table
/// admits: cart admits only app=front).
fn flow_table_exhaustion(lab: &Lab) -> Vec<Outcome> {
    let front = pod(lab, "shop/front");
    let cart = pod(lab, "shop/cart");
    let series = "keyway_flow_table_pressure_total{event=\"peer_quota\"}";
    let before = metric(lab, 1, series);
    let packets: Vec<Vec<u8>> = (1..=20_000u16)
        .map(|p| udp4(overlay(front), p, overlay(cart), 80, b"f"))
        .collect();
    for batch in packets.chunks(500) {
        send_raw(&netns(front), batch).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let db = pod(lab, "shop/db-0");
    let target = vec![format!("{}:80", overlay(db))];
    let got = lab
        .probe_from_netns(&netns_name(cart), &target, "TCP", T)
        .unwrap();
    vec![Outcome {
        item: 7,
        residual: false,
        attack: "allowed peer fills a pod's flow table (20,000 made-up UDP flows)",
        got_through: !got[0],
        counted: metric(lab, 1, series) > before,
        detail: format!(
            "afterwards cart -> db-0 {target:?} connects: {}; {series}",
            got[0]
        ),
    }]
}

/// Item 6: the admin server, as the DaemonSet exposes it (every address of the node).
fn admin_endpoint(lab: &Lab) -> Vec<Outcome> {
    let intruder = pod(lab, "other/intruder");
    let admin = SocketAddr::new(lab.state.nodes[1].ip, 9464);
    let mut v = Vec::new();
    let debug = admin_get(&netns(intruder), admin, "/debug/attachments");
    let metrics = admin_get(&netns(intruder), admin, "/metrics");
    v.push(Outcome {
        item: 6,
        residual: false,
        attack: "pod reads every pod's netns and policy from the node's admin port",
        got_through: debug == Some(200),
        counted: debug == Some(404),
        detail: format!("/debug/attachments: {debug:?}; /metrics still: {metrics:?}"),
    });
    assert_eq!(metrics, Some(200), "Prometheus still scrapes the node");

    // A pod holds connections open without a word.
    let series = "keyway_admin_refused_total";
    let before = metric(lab, 1, series);
    let ns = keyway_sap::sys::Netns::open(netns(intruder)).unwrap();
    let held: Vec<TcpStream> = (0..20)
        .filter_map(|_| {
            ns.run(|| TcpStream::connect_timeout(&admin, Duration::from_secs(2)))
                .ok()?
                .ok()
        })
        .collect();
    let node = node_netns(lab, 1);
    let healthz = admin_get(&node, "127.0.0.1:9464".parse().unwrap(), "/healthz");
    std::thread::sleep(Duration::from_secs(6));
    let open = held.into_iter().filter(still_open).count();
    v.push(Outcome {
        item: 6,
        residual: false,
        attack: "pod holds 20 idle connections to the admin port",
        got_through: open > 0 || healthz != Some(200),
        counted: metric(lab, 1, series) > before,
        detail: format!(
            "still open after 6 s: {open}; kubelet's /healthz meanwhile: {healthz:?}; {series}"
        ),
    });
    v
}

/// Item 5: keyway's port, and a restart. With node-1's agent stopped, a workload in front binds
/// front's GUE address and port; a neighbour sends to it; then the agent starts while the port
/// is taken. The agent must keep front (never give its address away) and serve it again once
/// the port is free.
fn gue_port_and_restart(lab: &mut Lab, flow: &UdpSocket) -> Vec<Outcome> {
    let front = pod(lab, "shop/front").clone();
    let old = pod(lab, "legacy/old").clone();
    lab.stop_agent("node-1").unwrap();
    let mut v = conntrack_without_interfaces(lab, flow, "agent stopped");
    v.push(spoofed_node_source(lab, "agent stopped"));
    let squatter = udp_socket(
        &netns(&front),
        SocketAddr::new(IpAddr::V4(ip(&front)), 6080),
    )
    .expect("the GUE port is free while the agent is down");
    let before = pod_drops(&front);
    send_raw(
        &netns(&old),
        &[udp4(ip(&old), 6080, ip(&front), 6080, b"to-the-squatter")],
    )
    .unwrap();
    let got = received(&squatter, T);
    v.push(Outcome {
        item: 5,
        residual: false,
        attack: "workload takes the GUE port while the agent restarts; underlay sends to it",
        got_through: got.iter().any(|g| g.as_deref() == Ok(b"to-the-squatter")),
        counted: pod_drops(&front) > before,
        detail: format!("{} -> {}:6080", ip(&old), ip(&front)),
    });

    lab.start_agent("node-1").unwrap();
    let failures = metric(lab, 0, "keyway_reattach_failures_total");
    drop(squatter);
    let deadline = Instant::now() + Duration::from_secs(15);
    let served = loop {
        let m = lab.probe(80, "TCP", Via::Overlay, T).unwrap();
        let at = |n: &str| m.names.iter().position(|x| x == n).unwrap();
        if m.cells[at("shop/db-0")][at("shop/front")] {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    v.push(Outcome {
        item: 5,
        residual: false,
        attack: "the squatted port at the agent's start makes it forget the pod",
        got_through: !served,
        counted: failures > 0.0,
        detail: format!(
            "front served again by overlay once the port is free: {served}; \
             keyway_reattach_failures_total {failures}"
        ),
    });
    v
}

/// Item 2, what a key seen on the wire allows: a bridge neighbour (old, with CAP_NET_RAW) sends
/// GUE to cart's pod IP with cart's key (derived here from the lab's secret, standing for one
/// sniffed off the underlay), claiming front — whom cart admits — as inner source and front's pod
/// IP as outer source. With packet authentication off that is delivered (the residual the threat
/// model states); once the cluster is `Strict`, neither that datagram nor one with a made-up MAC
/// is, each counted, while front's real traffic to cart still flows.
fn sniffed_key(lab: &mut Lab) -> Vec<Outcome> {
    use keyway_core::gue;
    use keyway_core::key::{ClusterSecret, KeyRing, MacKey, Rotation};
    let (front, cart, old) = (
        pod(lab, "shop/front").clone(),
        pod(lab, "shop/cart").clone(),
        pod(lab, "legacy/old").clone(),
    );
    let secret = ClusterSecret::new(std::fs::read(lab.dir.join("cluster-secret")).unwrap())
        .expect("the lab's secret");
    // The agents' default rotation (the lab sets none).
    let rotation = Rotation::new(3_600_000, 60_000).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let ring = KeyRing::derive(&secret, "shop/cart", rotation, now);
    let key = ring.key_at(now).unwrap();
    let forge = |mac: Option<&MacKey>, payload: &[u8]| {
        let inner = udp4(overlay(&front), 40405, overlay(&cart), 80, payload);
        let mut buf = vec![0u8; gue::HEADROOM];
        buf.extend_from_slice(&inner);
        let start = gue::seal(key, mac, &mut buf).unwrap();
        udp4(ip(&front), 6080, ip(&cart), 6080, &buf[start..])
    };
    // What reached cart is counted in cart itself, before any of its rules: a witness rule on
    // its overlay device for exactly the forged datagram. (keyway's own delivery counter would
    // also count a datagram that cart's kernel then throws away.)
    let cart_ns = netns_name(&cart);
    let witness = "the forged datagram, delivered";
    let front_overlay = overlay(&front);
    for cmd in [
        format!("add table inet {WITNESS}"),
        format!("add chain inet {WITNESS} input {{ type filter hook input priority raw; }}"),
        format!(
            "add rule inet {WITNESS} input iifname kw0 ip saddr {front_overlay} \
             udp sport 40405 udp dport 80 counter comment \"{witness}\""
        ),
    ] {
        in_ns(&cart_ns, &["nft", &cmd]).unwrap();
    }
    let arrived = || rule_packets(&netns(&cart), "inet", WITNESS, witness).unwrap();
    // cart is on node-2.
    let dropped = |lab: &Lab, reason: &str| {
        metric(
            lab,
            1,
            &format!("keyway_datapath_drops_total{{stage=\"ingress\",reason=\"{reason}\"}}"),
        )
    };
    let attempt = |lab: &Lab, mac: Option<&MacKey>, reason: &str| {
        let (before, drops) = (arrived(), dropped(lab, reason));
        send_raw(&netns(&old), &[forge(mac, b"as-front")]).unwrap();
        // A drop reaches /metrics at the agent's next sync (every second).
        std::thread::sleep(Duration::from_millis(1500));
        (arrived() > before, dropped(lab, reason) > drops)
    };
    let mut v = Vec::new();

    let (through, _) = attempt(lab, None, "unauthenticated");
    v.push(Outcome {
        item: 2,
        residual: true,
        attack: "bridge neighbour with a sniffed key sends as front to cart, packet authentication off",
        got_through: through,
        counted: false,
        detail: format!(
            "{} as {}:6080 -> {}:6080, key {key:?}; cart's witness rule",
            ip(&old),
            ip(&front),
            ip(&cart)
        ),
    });

    lab.set_packet_authentication("Strict")
        .expect("the agents turn strict");
    // Real traffic is sealed and checked end to end: front still reaches cart, and back.
    let sock = udp_socket(&netns(&front), "0.0.0.0:40406".parse().unwrap()).unwrap();
    sock.connect(SocketAddr::new(IpAddr::V4(ip(&cart)), 80))
        .unwrap();
    sock.send(b"sealed").unwrap();
    assert!(
        !received(&sock, T).is_empty(),
        "front reaches cart with packet authentication strict"
    );

    let (through, counted) = attempt(lab, None, "unauthenticated");
    v.push(Outcome {
        item: 2,
        residual: false,
        attack: "the same, packet authentication strict (no MAC)",
        got_through: through,
        counted,
        detail: "keyway_datapath_drops_total{stage=\"ingress\",reason=\"unauthenticated\"}".into(),
    });
    let guess = MacKey::from_bytes(*b"a guessed key...");
    let (through, counted) = attempt(lab, Some(&guess), "bad_mac");
    v.push(Outcome {
        item: 2,
        residual: false,
        attack: "the same with a made-up MAC, packet authentication strict",
        got_through: through,
        counted,
        detail: "keyway_datapath_drops_total{stage=\"ingress\",reason=\"bad_mac\"}".into(),
    });
    in_ns(&cart_ns, &["nft", "delete", "table", "inet", WITNESS]).unwrap();
    v
}
