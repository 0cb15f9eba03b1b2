//! Simulated nodes on one machine: each node is a network namespace with an uplink to a shared
//! underlay bridge (in a namespace of its own), IP forwarding on, and a route to every other
//! node's pod CIDR through that node, as Flannel's host-gw backend sets them. Nothing touches the
//! host's own network namespace.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, bail};

/// The addressing plan of a simulated cluster.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Prefix of every namespace and link name (short: interface names are at most 15 bytes).
    pub prefix: String,
    pub nodes: usize,
    /// Second octet of the pod CIDRs: node i (1-based) gets 10.<pod_octet>.<i>.0/24.
    pub pod_octet: u8,
    /// Third octet of the underlay: node i is 192.168.<underlay_octet>.<10+i>/24.
    pub underlay_octet: u8,
}

/// One simulated node.
#[derive(Debug, Clone)]
pub struct SimNode {
    pub index: usize,
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    pub gateway: Ipv4Addr,
}

/// Runs a command; its stdout, or an error with its stderr.
pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command in network namespace `ns` (`ip netns exec`), as [`sh`] does.
pub fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v)
}

impl Plan {
    pub fn underlay_netns(&self) -> String {
        format!("{}-ul", self.prefix)
    }

    pub fn node(&self, i: usize) -> SimNode {
        SimNode {
            index: i,
            name: format!("node-{i}"),
            netns: format!("{}-n{i}", self.prefix),
            ip: Ipv4Addr::new(192, 168, self.underlay_octet, 10 + i as u8),
            pod_cidr: format!("10.{}.{i}.0/24", self.pod_octet),
            gateway: Ipv4Addr::new(10, self.pod_octet, i as u8, 1),
        }
    }

    pub fn all_nodes(&self) -> Vec<SimNode> {
        (1..=self.nodes).map(|i| self.node(i)).collect()
    }

    /// An address on the underlay for something outside the cluster (an end-user device).
    pub fn outside_ip(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, self.underlay_octet, 100 + n)
    }

    /// Creates the underlay and the nodes. Fails if any of it already exists.
    pub fn create(&self) -> anyhow::Result<()> {
        let ul = self.underlay_netns();
        sh(&["ip", "netns", "add", &ul])?;
        in_ns(&ul, &["ip", "link", "set", "lo", "up"])?;
        in_ns(&ul, &["ip", "link", "add", "br0", "type", "bridge"])?;
        in_ns(&ul, &["ip", "link", "set", "br0", "up"])?;
        let nodes = self.all_nodes();
        for n in &nodes {
            sh(&["ip", "netns", "add", &n.netns])?;
            in_ns(&n.netns, &["ip", "link", "set", "lo", "up"])?;
            self.attach(&n.netns, &format!("n{}", n.index), n.ip)?;
            in_ns(&n.netns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        }
        for n in &nodes {
            for m in nodes.iter().filter(|m| m.index != n.index) {
                in_ns(
                    &n.netns,
                    &["ip", "route", "add", &m.pod_cidr, "via", &m.ip.to_string()],
                )?;
            }
        }
        Ok(())
    }

    /// Puts namespace `ns` on the underlay with `ip`, its underlay-side port named `port`.
    fn attach(&self, ns: &str, port: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
        let ul = self.underlay_netns();
        sh(&[
            "ip", "link", "add", "uplink", "netns", ns, "type", "veth", "peer", "name", port,
            "netns", &ul,
        ])?;
        in_ns(&ul, &["ip", "link", "set", port, "master", "br0", "up"])?;
        in_ns(
            ns,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "uplink"],
        )?;
        in_ns(ns, &["ip", "link", "set", "uplink", "up"])?;
        Ok(())
    }

    /// Removes the nodes and the underlay (whatever of them exists).
    pub fn destroy(&self) {
        for n in self.all_nodes() {
            let _ = sh(&["ip", "netns", "del", &n.netns]);
        }
        let _ = sh(&["ip", "netns", "del", &self.underlay_netns()]);
    }

    /// A host outside the cluster: namespace `ns` (made afresh) on the underlay at `ip`, through
    /// the underlay bridge's port `port`, routing the pod networks through the nodes.
    pub fn add_host(&self, ns: &str, port: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
        let _ = sh(&["ip", "netns", "del", ns]);
        sh(&["ip", "netns", "add", ns])?;
        in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
        self.attach(ns, port, ip)?;
        self.route_pods_from(ns)
    }

    /// Routes every other node's pod CIDR from namespace `ns` (an outside host) through the nodes.
    fn route_pods_from(&self, ns: &str) -> anyhow::Result<()> {
        for m in self.all_nodes() {
            in_ns(
                ns,
                &["ip", "route", "add", &m.pod_cidr, "via", &m.ip.to_string()],
            )?;
        }
        Ok(())
    }
}

impl SimNode {
    /// The primary CNI of this node (bridge + host-local with the node's pod CIDR) and keyway.
    pub fn conflist(
        &self,
        version: &str,
        agent_socket: &str,
        ipam_dir: &str,
        keyway: bool,
    ) -> serde_json::Value {
        let mut plugins = vec![serde_json::json!({
            "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.pod_cidr, "gateway": self.gateway.to_string()}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": ipam_dir
            }
        })];
        if keyway {
            plugins.push(serde_json::json!({"type": "keyway", "agentSocket": agent_socket}));
        }
        serde_json::json!({"cniVersion": version, "name": "keyway-lab", "plugins": plugins})
    }

    /// The Node object the lab (as the API server) publishes for this node.
    pub fn node_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nstatus:\n  addresses: [{{type: InternalIP, address: {}}}]\n",
            self.name, self.ip
        )
    }
}

/// A plan torn down on drop, for tests.
#[derive(Debug)]
pub struct Guard(pub Plan);

impl Guard {
    pub fn create(plan: Plan) -> Guard {
        plan.destroy();
        plan.create().expect("create the simulated nodes");
        Guard(plan)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.destroy();
    }
}
