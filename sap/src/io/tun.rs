//! keyway's overlay devices: persistent TUN devices that belong to the pod's network namespace and
//! outlive the process that made them, so that the agent can restart without the pod noticing more
//! than a short pause. The plugin creates them; the agent attaches to them.

use std::io;
use std::path::Path;

use tun_rs::DeviceBuilder;
pub use tun_rs::SyncDevice;

/// Where the TUN character device is opened. A container that lacks it gets it made (CAP_MKNOD).
pub const TUN_NODE: &str = "/dev/net/tun";

/// Creates the persistent TUN device `name` in the calling thread's namespace; if it already exists
/// this attaches to it and makes sure it persists (idempotent). The MTU is set here; addresses and
/// routes are the caller's (see [`super::netlink`]).
pub fn create_persistent(name: &str, mtu: u16) -> io::Result<()> {
    if crate::sys::ensure_tun_node(Path::new(TUN_NODE))? {
        tracing::info!(path = TUN_NODE, "created the TUN device node (10, 200)");
    }
    let dev = DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .inherit_enable_state()
        .build_sync()?;
    dev.persist()?;
    Ok(())
}

/// Creates (or takes over) the TUN device `name` in the calling thread's namespace for a gateway.
/// Persistent, as the pods' are, so that the kernel gateway on it goes on carrying established
/// flows while the agent restarts; what it does not carry is dropped there while no process
/// reads the device (fail closed). An uninstall deletes it.
pub fn create_gateway(name: &str, mtu: u16) -> io::Result<SyncDevice> {
    crate::sys::ensure_tun_node(Path::new(TUN_NODE))?;
    let dev = DeviceBuilder::new().name(name).mtu(mtu).build_sync()?;
    dev.persist()?;
    Ok(dev)
}

/// Attaches to the persistent TUN device `name` in the calling thread's namespace, with TCP (and,
/// where the kernel has them, UDP) segmentation offloads, so that the data path can move 64 KiB
/// aggregates instead of one packet per system call.
pub fn attach(name: &str) -> io::Result<SyncDevice> {
    crate::sys::ensure_tun_node(Path::new(TUN_NODE))?;
    DeviceBuilder::new()
        .name(name)
        .inherit_enable_state()
        .with(|b| {
            b.offload(true);
        })
        .build_sync()
}
