//! Kernel WireGuard: the interface is a netlink `wireguard` link that lives
//! in the kernel, so it outlives meshd by nature.

use anyhow::{Context, Result};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{LinkUnspec, LinkWireguard};
use wireguard_control::InterfaceName;

use super::{Ensured, Existing};

/// Whether a probe link of kind `wireguard` can be created (it is removed
/// again): the module is loaded or loadable.
pub async fn module_available() -> bool {
    // Not the pid alone: meshd and the data plane container probe at the
    // same moment in one network namespace, and in containers both may be
    // pid 1.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let probe = format!("wfp{:x}", (nanos ^ std::process::id()) & 0xff_ffff);
    match create(&probe).await {
        Ok(()) => {
            let _ = delete(&probe).await;
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "kernel WireGuard unavailable");
            false
        }
    }
}

async fn handle() -> Result<rtnetlink::Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening netlink")?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn link(name: &str) -> Result<Option<LinkMessage>> {
    let handle = handle().await?;
    let links = handle.link().get().match_name(name.to_string()).execute();
    match crate::reconcile::netlink::first(links).await {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.raw_code() == -(nix::errno::Errno::ENODEV as i32) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn link_index(name: &str) -> Result<Option<u32>> {
    Ok(link(name).await?.map(|l| l.header.index))
}

/// What holds the interface's name in this network namespace, by the
/// link's kind: a kernel WireGuard link, a TUN (a userspace data plane), or
/// something else.
pub async fn existing(iface: &InterfaceName) -> Result<Existing> {
    let Some(link) = link(&iface.as_str_lossy()).await? else {
        return Ok(Existing::Nothing);
    };
    let kind = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    });
    Ok(match kind {
        Some(InfoKind::Wireguard) => Existing::Kernel,
        Some(InfoKind::Tun) => Existing::Tun,
        Some(other) => Existing::Other(other.to_string()),
        None => Existing::Other("unknown".into()),
    })
}

async fn create(name: &str) -> Result<()> {
    handle()
        .await?
        .link()
        .add(LinkWireguard::new(name).build())
        .execute()
        .await
        .with_context(|| format!("creating WireGuard link {name}"))
}

async fn delete(name: &str) -> Result<()> {
    if let Some(index) = link_index(name).await? {
        handle().await?.link().del(index).execute().await?;
    }
    Ok(())
}

pub async fn ensure(iface: &InterfaceName) -> Result<Ensured> {
    let name = iface.as_str_lossy();
    if link_index(&name).await?.is_some() {
        return Ok(Ensured::Existing);
    }
    create(&name).await?;
    handle()
        .await?
        .link()
        .set(LinkUnspec::new_with_name(&name).up().build())
        .execute()
        .await
        .with_context(|| format!("setting {name} up"))?;
    Ok(Ensured::Created)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The boundary on a machine without the module: creating a wireguard
    /// link fails, so auto mode must fall back (CI has no module). Where the
    /// module exists, the probe succeeds and leaves nothing behind.
    #[tokio::test]
    async fn probe_matches_the_kernel_and_leaves_nothing() {
        let iface: InterfaceName = "wfnotthere0".parse().unwrap();
        let usable = module_available().await;
        // Checked after the probe: creating the link autoloads the module.
        assert_eq!(
            usable,
            std::path::Path::new("/sys/module/wireguard").exists()
        );
        let probe = format!("wfprobe{}", std::process::id() % 100_000);
        assert_eq!(link_index(&probe).await.unwrap(), None);
        assert_eq!(existing(&iface).await.unwrap(), Existing::Nothing);
    }

    /// A userspace data plane's TUN holding the name is told apart from a
    /// kernel link by its kind, not taken for one by its name (the bug: a
    /// restarted meshd chose "kernel" and every netlink read failed).
    #[tokio::test]
    async fn a_tun_is_a_userspace_data_plane_not_a_kernel_link() {
        let name = format!("wftun{}", std::process::id() % 100_000);
        let out = std::process::Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tun"])
            .output()
            .expect("ip");
        assert!(out.status.success(), "{out:?}");
        let iface: InterfaceName = name.parse().unwrap();
        let found = existing(&iface).await;
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &name])
            .status();
        assert_eq!(found.unwrap(), Existing::Tun);
    }
}
