//! The CNI verbs. ADD puts the pod on the overlay and hands it to the agent, or undoes everything
//! it made and fails (the runtime retries: pods never start unprotected). DEL is idempotent and
//! tolerates a missing namespace, device or record. CHECK verifies what ADD made. STATUS asks
//! whether the agent is ready. GC makes the agent forget every attachment the runtime no longer
//! lists.

use std::net::IpAddr;
use std::os::fd::AsFd;

use ipnetwork::IpNetwork;
use keyway_protocol::firewall::steer_rule;
use keyway_sap::io::endpoint::{self, DeviceSpec};
use keyway_sap::io::netlink::NetlinkError;
use keyway_sap::io::{netlink, nft};
use keyway_sap::sys::{Netns, NetnsError};

use crate::config::NetConf;
use crate::spec::{CniError, CniResult, Code, Environment, Interface, RouteConfig, Version};
use keyway_protocol::firewall::{self, PodFirewall, PodRules};
use keyway_protocol::handoff::{
    AddRequest, AllocateRequest, Attachment, AttachmentRequest, Client, ClientError, NetworkGrant,
    PodRef, Request,
};

/// What one invocation works with.
#[derive(Debug)]
pub struct Invocation {
    pub env: Environment,
    pub conf: NetConf,
}

impl Invocation {
    fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.env.container_id.clone(),
            ifname: self.env.ifname.clone(),
        }
    }

    fn pod(&self) -> PodRef {
        let arg = |k: &str| self.env.args.get(k).cloned().unwrap_or_default();
        PodRef {
            namespace: arg("K8S_POD_NAMESPACE"),
            name: arg("K8S_POD_NAME"),
            uid: arg("K8S_POD_UID"),
        }
    }

    fn connect(&self) -> Result<Client, CniError> {
        Client::connect(&self.conf.agent_socket, self.conf.agent_timeout).map_err(agent_error)
    }
}

/// The CNI error for a failed exchange with the agent. An agent that cannot be reached or does
/// not answer is "try again later": the pod must not start unprotected.
pub fn agent_error(e: ClientError) -> CniError {
    match e {
        ClientError::Refused(a) => CniError::new(a.code(), format!("keyway agent: {}", a.message)),
        e @ (ClientError::Connect { .. } | ClientError::Timeout(_) | ClientError::Io(_)) => {
            CniError::new(
                Code::TryAgainLater,
                "keyway agent unavailable; try again later",
            )
            .with_details(e.to_string())
        }
        e @ ClientError::Protocol(_) => CniError::new(Code::Other, e.to_string()),
    }
}

fn netns_error(path: &str, e: NetnsError) -> CniError {
    match e {
        NetnsError::Open { .. } => CniError::new(
            Code::UnknownContainer,
            format!("network namespace {path} does not exist"),
        )
        .with_details(e.to_string()),
        other => CniError::new(Code::Other, format!("network namespace {path}: {other}")),
    }
}

fn other(context: &str, e: impl std::fmt::Display) -> CniError {
    CniError::new(Code::Other, format!("{context}: {e}"))
}

fn require_prev_result(conf: &NetConf) -> Result<&CniResult, CniError> {
    conf.prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(Code::InvalidConfig, "Required prevResult missing"))
}

/// The pod's infrastructure IP: the first IPv4 address of the sandbox interface in prevResult
/// (IPv6 when it has none).
fn infra_ip(prev: &CniResult, env: &Environment) -> Result<IpAddr, CniError> {
    let ips = prev.ips_of(&env.ifname, &env.netns);
    ips.iter()
        .find(|n| n.is_ipv4())
        .or_else(|| ips.first())
        .map(|n| n.ip())
        .ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                format!(
                    "prevResult has no IP address for {} (keyway chains after a primary CNI)",
                    env.ifname
                ),
            )
        })
}

fn node_addresses(conf: &NetConf, prev: &CniResult) -> Vec<IpNetwork> {
    let mut v: Vec<IpNetwork> = prev.gateways().into_iter().map(IpNetwork::from).collect();
    for a in &conf.node_addresses {
        if !v.contains(a) {
            v.push(*a);
        }
    }
    v
}

fn firewall_of(
    conf: &NetConf,
    grants: &[NetworkGrant],
    pod_ip: IpAddr,
    nodes: Vec<IpNetwork>,
) -> PodFirewall {
    PodFirewall {
        overlay_devices: grants.iter().map(|g| g.device.clone()).collect(),
        pod_ip,
        gue_port: conf.gue_port,
        node_addresses: nodes,
    }
}

/// Routes what the pod's table marks for the overlay (traffic to protected pods' pod IPs, of the
/// pod IP's family) into `device`: a table whose only route is the device, and a routing rule by
/// mark. Sets the reverse-path filters (below).
fn steer(netns: &Netns, ifname: &str, device: &str, v6: bool) -> Result<(), NetlinkError> {
    let device = device.to_string();
    netns
        .run(|| reverse_path_filters(ifname, &device, v6))?
        .map_err(NetlinkError::Socket)?;
    netlink::in_netns(netns, async move |nl| {
        let link = nl.require_link(&device).await?;
        nl.ensure_default_route(v6, firewall::STEER_TABLE, link.index)
            .await?;
        nl.ensure_mark_rule(steer_rule(v6)).await
    })
}

/// Inside the pod's namespace, IPv4's reverse-path filters (the effective value of a device is
/// the larger of `all` and its own): strict on the primary's interface, so that a neighbour cannot
/// send it a packet from an address routed elsewhere (an overlay address); loose on the overlay
/// device, where steered replies arrive from pod IPs the main table routes through `eth0`; `all`
/// no stricter than loose. IPv6 has no such sysctl (the pod's table filters it with a `fib`
/// lookup instead); it gets the overlay device enabled.
fn reverse_path_filters(ifname: &str, device: &str, v6: bool) -> std::io::Result<()> {
    if v6 {
        let conf = std::path::Path::new("/proc/sys/net/ipv6/conf").join(device);
        return match conf.exists() {
            true => std::fs::write(conf.join("disable_ipv6"), "0"),
            false => Ok(()),
        };
    }
    let conf = std::path::Path::new("/proc/sys/net/ipv4/conf");
    let all = conf.join("all/rp_filter");
    if std::fs::read_to_string(&all).is_ok_and(|v| v.trim() == "1") {
        std::fs::write(&all, "2")?;
    }
    std::fs::write(conf.join(device).join("rp_filter"), "2")?;
    std::fs::write(conf.join(ifname).join("rp_filter"), "1")
}

/// Removes the steering rules of both families; what is not there is fine.
fn unsteer(netns: &Netns) -> Result<(), NetlinkError> {
    firewall::unsteer(netns)
}

/// Undoes a partial ADD unless disarmed: devices, steering, the table, the agent's allocation.
struct Rollback<'a> {
    netns: &'a Netns,
    client: &'a Client,
    attachment: Attachment,
    devices: Vec<String>,
    steered: bool,
    table: bool,
    armed: bool,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        tracing::warn!(container = %self.attachment.container_id, "ADD failed; rolling back");
        if self.table {
            match self
                .netns
                .run(|| nft::Socket::open()?.delete_table(firewall::FAMILY, firewall::TABLE))
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "rollback: cannot remove the pod's table"),
                Err(e) => {
                    tracing::warn!(error = %e, "rollback: cannot enter the namespace to remove the table")
                }
            }
        }
        if self.steered
            && let Err(e) = unsteer(self.netns)
        {
            tracing::warn!(error = %e, "rollback: cannot remove the steering rules");
        }
        for d in &self.devices {
            if let Err(e) = endpoint::remove(self.netns, d) {
                tracing::warn!(device = %d, error = %e, "rollback: cannot remove device");
            }
        }
        let del = Request::Delete(AttachmentRequest {
            attachment: self.attachment.clone(),
            pod: None,
        });
        if let Err(e) = self.client.call(&del, None) {
            tracing::warn!(error = %e, "rollback: the agent did not release the allocation");
        }
    }
}

pub fn add(inv: &Invocation) -> Result<CniResult, CniError> {
    let prev = require_prev_result(&inv.conf)?;
    let netns = Netns::open(&inv.env.netns).map_err(|e| netns_error(&inv.env.netns, e))?;
    let infra = infra_ip(prev, &inv.env)?;
    let client = inv.connect()?;
    let attachment = inv.attachment();
    let pod = inv.pod();

    let ack = client
        .call(
            &Request::Allocate(AllocateRequest {
                attachment: attachment.clone(),
                pod: pod.clone(),
            }),
            None,
        )
        .map_err(agent_error)?;
    if ack.excluded {
        tracing::info!(pod = %pod.name, namespace = %pod.namespace, "the pod opted out of keyway: passing the primary's result through");
        return Ok(prev.clone());
    }
    let grants = ack.networks;
    let mut rollback = Rollback {
        netns: &netns,
        client: &client,
        attachment: attachment.clone(),
        devices: vec![],
        steered: false,
        table: false,
        armed: true,
    };

    let ifname = inv.env.ifname.clone();
    let underlay_mtu = netlink::in_netns(&netns, async move |nl| nl.mtu(&ifname).await)
        .map_err(|e| other("cannot read the pod's interface", e))?
        .ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                format!("{} does not exist in the pod", inv.env.ifname),
            )
        })?;
    let overhead = if infra.is_ipv4() {
        keyway_core::gue::MTU_RESERVE_IPV4
    } else {
        keyway_core::gue::MTU_RESERVE_IPV6
    } as u32;
    let mtu = inv
        .conf
        .mtu
        .unwrap_or(underlay_mtu.saturating_sub(overhead));
    if mtu < 1280 && grants.iter().any(|g| g.address.is_ipv6()) || mtu < 576 {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!("overlay MTU {mtu} is too small (underlay {underlay_mtu})"),
        ));
    }

    for g in &grants {
        rollback.devices.push(g.device.clone());
        let spec = DeviceSpec {
            name: g.device.clone(),
            mtu: mtu as u16,
            address: g.address,
            routes: g.routes.clone(),
        };
        endpoint::provision(&netns, &spec)
            .map_err(|e| other(&format!("cannot provision {}", g.device), e))?;
    }
    // Pod IPs of the pod IP's family go into the overlay device of that family, or the first.
    let steer_dev = grants
        .iter()
        .find(|g| g.address.is_ipv4() == infra.is_ipv4())
        .or(grants.first());
    if let Some(g) = steer_dev {
        rollback.steered = true;
        steer(&netns, &inv.env.ifname, &g.device, infra.is_ipv6())
            .map_err(|e| other("cannot steer pod IPs into the overlay", e))?;
    }
    let nodes = node_addresses(&inv.conf, prev);
    let table = firewall_of(&inv.conf, &grants, infra, nodes.clone()).table(&PodRules::closed());
    rollback.table = true;
    netns
        .run(|| nft::Socket::open()?.replace_table(&table))
        .map_err(|e| netns_error(&inv.env.netns, e))?
        .map_err(|e| other("cannot install the pod's nftables table", e))?;

    let add = Request::Add(AddRequest {
        attachment,
        pod,
        netns_path: inv.env.netns.clone(),
        infra_ip: infra,
        mtu: underlay_mtu,
        networks: grants.clone(),
        node_addresses: nodes,
    });
    client
        .call(&add, Some(netns.as_fd()))
        .map_err(agent_error)?;
    rollback.armed = false;
    drop(rollback);

    // The result names the devices keyway made, but not their overlay addresses: upstream
    // plugins' CHECK (bridge's, ptp's) matches every address of the result against their own
    // interface, and the pod IP the runtime reports stays the primary's. The overlay addresses
    // are the agent's to publish.
    let mut result = prev.clone();
    for g in &grants {
        result.interfaces.push(Interface {
            name: g.device.clone(),
            sandbox: inv.env.netns.clone(),
            mtu: Some(mtu),
            ..Default::default()
        });
        for r in &g.routes {
            result.routes.push(RouteConfig {
                dst: *r,
                gw: None,
                other: Default::default(),
            });
        }
    }
    tracing::info!(overlay = ?grants.iter().map(|g| g.address.to_string()).collect::<Vec<_>>(), "pod on the overlay");
    Ok(result.for_version(inv.conf.version))
}

/// Devices keyway made, by the names in prevResult or the agent's record.
fn our_devices(prev: Option<&CniResult>, netns: &str, agent: &[NetworkGrant]) -> Vec<String> {
    let mut v: Vec<String> = agent.iter().map(|g| g.device.clone()).collect();
    if let Some(prev) = prev {
        for i in &prev.interfaces {
            if i.sandbox == netns && i.name.starts_with("kw") && !v.contains(&i.name) {
                v.push(i.name.clone());
            }
        }
    }
    v
}

pub fn del(inv: &Invocation) -> Result<(), CniError> {
    // The agent first: it stops serving the pod and releases its addresses. If it is down, the
    // devices still go; the agent forgets the attachment when it comes back (its namespace or
    // device is gone) or at the next GC.
    let released = match inv.connect().and_then(|c| {
        c.call(
            &Request::Delete(AttachmentRequest {
                attachment: inv.attachment(),
                pod: None,
            }),
            None,
        )
        .map_err(agent_error)
    }) {
        Ok(ack) => ack.networks,
        Err(e) => {
            tracing::warn!(error = %e, "DEL: the agent did not answer; removing the pod's devices anyway");
            Vec::new()
        }
    };
    if inv.env.netns.is_empty() {
        return Ok(());
    }
    let netns = match Netns::open(&inv.env.netns) {
        Ok(ns) => ns,
        // The namespace is gone, and with it every device and rule keyway put there.
        Err(NetnsError::Open { .. }) => return Ok(()),
        Err(e) => return Err(netns_error(&inv.env.netns, e)),
    };
    unsteer(&netns).map_err(|e| other("cannot remove the steering rules", e))?;
    for d in our_devices(inv.conf.prev_result.as_ref(), &inv.env.netns, &released) {
        endpoint::remove(&netns, &d).map_err(|e| other(&format!("cannot remove {d}"), e))?;
    }
    netns
        .run(|| nft::Socket::open()?.delete_table(firewall::FAMILY, firewall::TABLE))
        .map_err(|e| netns_error(&inv.env.netns, e))?
        .map_err(|e| other("cannot remove the pod's nftables table", e))?;
    Ok(())
}

pub fn check(inv: &Invocation) -> Result<(), CniError> {
    if inv.conf.version < Version::V0_4_0 {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            "CHECK needs CNI 0.4.0 or later",
        ));
    }
    require_prev_result(&inv.conf)?;
    let netns = Netns::open(&inv.env.netns).map_err(|e| netns_error(&inv.env.netns, e))?;
    let client = inv.connect()?;
    let ack = client
        .call(
            &Request::Check(AttachmentRequest {
                attachment: inv.attachment(),
                pod: Some(inv.pod()),
            }),
            None,
        )
        .map_err(agent_error)?;
    if ack.excluded {
        return Ok(());
    }
    let grants = ack.networks;
    for g in &grants {
        let dev = g.device.clone();
        let addrs = netlink::in_netns(&netns, async move |nl| match nl.link(&dev).await? {
            Some(l) => Ok(Some(nl.addresses(l.index).await?)),
            None => Ok(None),
        })
        .map_err(|e| other("cannot inspect the pod", e))?;
        match addrs {
            None => {
                return Err(CniError::new(
                    Code::Other,
                    format!("overlay device {} is missing", g.device),
                ));
            }
            Some(a) if !a.contains(&g.address) => {
                return Err(CniError::new(
                    Code::Other,
                    format!("{} has lost its overlay address {}", g.device, g.address),
                ));
            }
            Some(_) => {}
        }
    }
    let table = netns
        .run(|| nft::Socket::open()?.table_exists(firewall::FAMILY, firewall::TABLE))
        .map_err(|e| netns_error(&inv.env.netns, e))?
        .map_err(|e| other("cannot read the pod's nftables", e))?;
    if !table {
        return Err(CniError::new(
            Code::Other,
            "keyway's nftables table is missing from the pod",
        ));
    }
    let steered =
        netlink::in_netns(&netns, async move |nl| {
            Ok(nl.has_mark_rule(steer_rule(false)).await?
                || nl.has_mark_rule(steer_rule(true)).await?)
        })
        .map_err(|e| other("cannot read the pod's routing rules", e))?;
    if !grants.is_empty() && !steered {
        return Err(CniError::new(
            Code::Other,
            "the routing rule that steers pod IPs into the overlay is missing",
        ));
    }
    Ok(())
}

pub fn status(inv: &Invocation) -> Result<(), CniError> {
    if inv.conf.version < Version::V1_1_0 {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            "STATUS needs CNI 1.1.0",
        ));
    }
    let not_ready = |detail: String| {
        CniError::new(Code::NotAvailable, "keyway agent not ready").with_details(detail)
    };
    let client = Client::connect(&inv.conf.agent_socket, inv.conf.agent_timeout)
        .map_err(|e| not_ready(e.to_string()))?;
    client
        .call(&Request::Status, None)
        .map_err(|e| not_ready(e.to_string()))?;
    Ok(())
}

pub fn gc(inv: &Invocation) -> Result<u32, CniError> {
    if inv.conf.version < Version::V1_1_0 {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            "GC needs CNI 1.1.0",
        ));
    }
    let valid =
        inv.conf.valid_attachments.as_ref().ok_or_else(|| {
            CniError::new(Code::InvalidConfig, "GC needs cni.dev/valid-attachments")
        })?;
    let client = inv.connect()?;
    for a in valid {
        let keep = Request::Keep(AttachmentRequest {
            attachment: Attachment {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            },
            pod: None,
        });
        client.call(&keep, None).map_err(agent_error)?;
    }
    let removed = client
        .call(&Request::SnapshotDone, None)
        .map_err(agent_error)?
        .removed;
    tracing::info!(kept = valid.len(), removed, "GC done");
    Ok(removed)
}
