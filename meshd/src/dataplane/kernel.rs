//! Kernel WireGuard: the interface is a netlink `wireguard` link that lives
//! in the kernel, so it outlives meshd by nature.

use anyhow::{Context, Result};
use futures::TryStreamExt;
use rtnetlink::{LinkUnspec, LinkWireguard};
use wireguard_control::InterfaceName;

use super::Ensured;

/// Whether kernel WireGuard can be used: the interface already exists as a
/// kernel device, or a probe link can be created (and is removed again).
pub async fn available(iface: &InterfaceName) -> bool {
    if exists(iface).await {
        return true;
    }
    let probe = format!("wfprobe{}", std::process::id() % 100_000);
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

async fn link_index(name: &str) -> Result<Option<u32>> {
    let handle = handle().await?;
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.raw_code() == -(nix::errno::Errno::ENODEV as i32) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn exists(iface: &InterfaceName) -> bool {
    matches!(link_index(&iface.as_str_lossy()).await, Ok(Some(_)))
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
        let usable = available(&iface).await;
        // Checked after the probe: creating the link autoloads the module.
        assert_eq!(
            usable,
            std::path::Path::new("/sys/module/wireguard").exists()
        );
        let probe = format!("wfprobe{}", std::process::id() % 100_000);
        assert_eq!(link_index(&probe).await.unwrap(), None);
        assert!(!exists(&iface).await);
    }
}
