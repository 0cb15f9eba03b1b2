//! Standing up an endpoint: provision its overlay device(s) in a namespace, open the device and the
//! GUE socket *inside* that namespace, then serve them from anywhere. The agent, `keyway-sap` and
//! the tests all go through here.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnetwork::IpNetwork;
use tokio::task::JoinHandle;
use tun_rs::{AsyncDevice, SyncDevice};

use super::datapath::{self, EndpointContext, GueSocket, OverlayDevice};
use super::netlink::{self, NetlinkError};
use crate::sys::{Netns, NetnsError};
use keyway_core::counters::Counters;
use keyway_core::tables::SharedTables;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("overlay device {device}: {source}")]
    Device {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("GUE socket {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// One overlay device as provisioned: its name, MTU, the endpoint's address on it, and the routes
/// that send overlay traffic into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: String,
    pub mtu: u16,
    pub address: IpNetwork,
    pub routes: Vec<IpNetwork>,
}

/// Creates (or finds) the persistent device and gives it its MTU, address and routes, inside
/// `netns`. Idempotent. Call from a blocking thread.
pub fn provision(netns: &Netns, spec: &DeviceSpec) -> Result<(), EndpointError> {
    netns
        .run(|| {
            super::tun::create_persistent(&spec.name, spec.mtu)?;
            quiet_ipv6(&spec.name, spec.address.is_ipv6())
        })?
        .map_err(|source| EndpointError::Device {
            device: spec.name.clone(),
            source,
        })?;
    let spec = spec.clone();
    netlink::in_netns(netns, async move |nl| {
        let link = nl.require_link(&spec.name).await?;
        nl.set_up(link.index, Some(u32::from(spec.mtu))).await?;
        nl.ensure_address(link.index, spec.address).await?;
        for route in &spec.routes {
            nl.ensure_route(*route, link.index).await?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Keeps the kernel from speaking on an overlay device by itself: no IPv6 link-local address (so no
/// router solicitations or MLD reports from an address keyway does not own, which the engine would
/// rightly drop as spoofed), and no IPv6 at all on a device that carries only IPv4. Must run in the
/// device's namespace before the device first comes up. A kernel without IPv6 has nothing to quiet.
fn quiet_ipv6(device: &str, carries_ipv6: bool) -> io::Result<()> {
    let conf = std::path::Path::new("/proc/sys/net/ipv6/conf").join(device);
    if !conf.exists() {
        return Ok(());
    }
    // addr_gen_mode 1: IN6_ADDR_GEN_MODE_NONE.
    std::fs::write(conf.join("addr_gen_mode"), "1")?;
    if !carries_ipv6 {
        std::fs::write(conf.join("disable_ipv6"), "1")?;
    }
    Ok(())
}

/// Removes an overlay device from `netns`; `Ok(false)` when it was not there. Call from a blocking
/// thread.
pub fn remove(netns: &Netns, device: &str) -> Result<bool, EndpointError> {
    let device = device.to_string();
    Ok(netlink::in_netns(netns, async move |nl| {
        nl.delete_link(&device).await
    })?)
}

/// Handles opened inside the pod's namespace, ready to be served from anywhere.
pub struct Opened {
    pub devices: Vec<(IpAddr, SyncDevice)>,
    pub socket: std::net::UdpSocket,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ips: Vec<_> = self.devices.iter().map(|(ip, _)| ip).collect();
        f.debug_struct("Opened")
            .field("devices", &ips)
            .field("socket", &self.socket)
            .finish()
    }
}

/// Attaches to the named devices (each with the overlay IP it carries) and binds the GUE socket,
/// inside `netns`. Call from a blocking thread.
pub fn open(
    netns: &Netns,
    devices: &[(String, IpAddr)],
    listen: SocketAddr,
    mark: Option<u32>,
) -> Result<Opened, EndpointError> {
    netns.run(|| {
        let mut out = Vec::new();
        for (name, ip) in devices {
            let dev = super::tun::attach(name).map_err(|source| EndpointError::Device {
                device: name.clone(),
                source,
            })?;
            out.push((*ip, dev));
        }
        let socket =
            super::udp::bind_gue(listen, mark).map_err(|source| EndpointError::Socket {
                addr: listen,
                source,
            })?;
        Ok(Opened {
            devices: out,
            socket,
        })
    })?
}

/// The running loops of one endpoint; dropping it stops them and closes the devices and socket.
#[derive(Debug)]
pub struct Running {
    tasks: Vec<JoinHandle<io::Result<()>>>,
}

impl Running {
    pub fn is_finished(&self) -> bool {
        self.tasks.iter().all(|t| t.is_finished())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts an endpoint's loops on the current tokio runtime.
pub fn spawn(ctx: Arc<EndpointContext>, opened: Opened) -> io::Result<Running> {
    let sock = Arc::new(GueSocket::new(opened.socket)?);
    let mut devices = Vec::new();
    for (ip, dev) in opened.devices {
        devices.push(OverlayDevice {
            ip,
            tun: Arc::new(AsyncDevice::new(dev)?),
        });
    }
    let mut tasks = Vec::new();
    for d in &devices {
        tasks.push(tokio::spawn(datapath::endpoint_egress(
            ctx.clone(),
            d.tun.clone(),
            sock.clone(),
        )));
    }
    tasks.push(tokio::spawn(datapath::endpoint_ingress(ctx, devices, sock)));
    Ok(Running { tasks })
}

/// Starts a SaP on a bound socket, and the node's gateway on its device when given (it sends
/// from the SaP's socket: the endpoints take what a SaP vouches for). `node`: where the node's
/// kernel fast path will be, which the SaP teaches the flows it forwards; `mtu`: the largest
/// IP packet the SaP sends (its device's MTU).
pub fn spawn_sap(
    tables: Arc<SharedTables>,
    counters: Arc<Counters>,
    socket: std::net::UdpSocket,
    gateway: Option<tun_rs::SyncDevice>,
    node: super::fastpath::NodeFastSlot,
    mtu: usize,
) -> io::Result<Running> {
    let sock = Arc::new(GueSocket::new(socket)?);
    let mut tasks = Vec::new();
    if let Some(dev) = gateway {
        let tun = Arc::new(AsyncDevice::new(dev)?);
        tasks.push(tokio::spawn(datapath::gateway(
            tables.clone(),
            counters.clone(),
            tun,
            sock.clone(),
            node.clone(),
        )));
    }
    tasks.push(tokio::spawn(datapath::sap(
        tables, counters, sock, node, mtu,
    )));
    Ok(Running { tasks })
}
