//! `meshd uninstall`: removes what Weft made on a node — the WireGuard
//! interface, every route with Weft's protocol (the unreachable backstops
//! included) and its routing rules, the NetworkPolicy table, the CNI plugin and conflist, the
//! node's state (its private key included) and the data plane's socket. Run
//! by the cleanup DaemonSet (deploy/uninstall) after Weft itself is deleted,
//! since a running meshd would make it all again. Idempotent: what is
//! already gone is skipped; every step is tried even if one fails.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cni::{BinDir, CniPaths, ConfDir, OLD_CONFLISTS};
use crate::dataplane;
use crate::reconcile::netlink::Netlink;

/// `meshd uninstall`.
#[derive(Debug, Clone, clap::Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub paths: CniPaths,
    #[command(flatten)]
    pub bin: BinDir,
    #[command(flatten)]
    pub conf: ConfDir,
    /// meshd's state directory (its key and the pod address store).
    #[arg(long, default_value = "/var/lib/weft")]
    pub state_dir: PathBuf,
    #[arg(long, env = dataplane::INTERFACE_ENV, default_value = dataplane::DEFAULT_INTERFACE)]
    pub interface: String,
}

/// Files and directories to remove, in order (pure: tested from a table).
pub fn files(args: &UninstallArgs) -> Vec<PathBuf> {
    // The conflist first: the runtime stops using the network before the
    // plugin goes. (loopback and portmap stay: they may be the host's own.)
    let mut out = vec![args.conf.conflist()];
    out.extend(
        OLD_CONFLISTS
            .iter()
            .map(|name| args.conf.cni_conf_dir.join(name)),
    );
    out.extend([
        args.bin.plugin(),
        args.paths.cni_state_file.clone(),
        args.paths.cni_ipam_dir.clone(),
        args.state_dir.clone(),
        weft_dataplane::socket_path(&args.interface),
        weft_dataplane::lock_path(&args.interface),
    ]);
    // The state file's directory is Weft's own (`/run/weft`).
    if let Some(parent) = args.paths.cni_state_file.parent() {
        out.push(parent.to_path_buf());
    }
    out
}

/// Removes everything; fails (after trying every step) if any step failed.
pub async fn run(args: &UninstallArgs) -> Result<()> {
    let mut failed = Vec::new();
    let mut step = |what: &str, result: Result<bool>| match result {
        Ok(true) => tracing::info!("removed {what}"),
        Ok(false) => tracing::info!("no {what} to remove"),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "removing {what}");
            failed.push(what.to_string());
        }
    };
    let netlink = Netlink::new()?;
    // The rules first: with the interface gone and the routes still there,
    // they would send host traffic to the backstops.
    step("Weft's routing rules", netlink.remove_host_rules().await);
    step(
        &format!("interface {}", args.interface),
        remove_interface(&netlink, &args.interface).await,
    );
    step("Weft's routes", remove_routes(&netlink).await);
    step("the NetworkPolicy table", remove_policy_table());
    step(
        "the source guard table",
        crate::nft::apply(&crate::guard::removal(), "removing the source guard")
            .map(|()| true)
            .map_err(Into::into),
    );
    step(
        "the egress masquerade table",
        crate::nft::apply(&crate::egress::removal(), "removing the egress masquerade")
            .map(|()| true)
            .map_err(Into::into),
    );
    step(
        "the external peers' filter table",
        crate::nft::apply(
            &crate::nft::table_removal(crate::peers::FILTER_TABLE),
            "removing the external peers' filter",
        )
        .map(|()| true)
        .map_err(Into::into),
    );
    step(
        "the host firewall openings",
        crate::host_firewall::remove().map_err(Into::into),
    );
    for (what, result) in remove_files(args) {
        step(&what, result);
    }
    anyhow::ensure!(failed.is_empty(), "could not remove: {}", failed.join(", "));
    Ok(())
}

async fn remove_interface(netlink: &Netlink, name: &str) -> Result<bool> {
    let Some(index) = netlink.link_index(name).await? else {
        return Ok(false);
    };
    netlink.del_link(index).await?;
    Ok(true)
}

async fn remove_routes(netlink: &Netlink) -> Result<bool> {
    let routes = netlink.our_routes(None).await?;
    let any = !routes.is_empty();
    for r in routes {
        netlink.del_route(r).await?;
    }
    Ok(any)
}

fn remove_policy_table() -> Result<bool> {
    let mut nft = weft_policy::nft::Session::open()?;
    Ok(nft.remove_table()?)
}

/// Wipes the private key, then removes [`files`]; what each step removed.
fn remove_files(args: &UninstallArgs) -> Vec<(String, Result<bool>)> {
    // Overwritten before its directory goes: unlinked alone, the last
    // private key would stay in freed blocks.
    let key = weft_keys::KeyStore::new(args.state_dir.join(weft_keys::KEY_FILE), None);
    let wiped = key.destroy().map_err(anyhow::Error::from);
    std::iter::once(("the private key".to_string(), wiped))
        .chain(
            files(args)
                .into_iter()
                .map(|p| (p.display().to_string(), remove_path(&p))),
        )
        .collect()
}

fn remove_path(path: &Path) -> Result<bool> {
    let removed = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    removed.with_context(|| format!("{}", path.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_weft_files_and_nothing_beside_them() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let args = UninstallArgs {
            paths: CniPaths {
                cni_state_file: d.join("run/weft/node.json"),
                cni_ipam_dir: d.join("var/lib/weft/ipam"),
            },
            bin: BinDir {
                cni_bin_dir: d.join("opt/cni/bin"),
            },
            conf: ConfDir {
                cni_conf_dir: d.join("etc/cni/net.d"),
            },
            state_dir: d.join("var/lib/weft"),
            // No data plane has this name: its socket paths (outside the
            // temporary directory) are absent.
            interface: "weft-unit-test".into(),
        };
        let ours = [
            "opt/cni/bin/weft",
            "etc/cni/net.d/05-weft.conflist",
            "etc/cni/net.d/10-weft.conflist",
            "run/weft/node.json",
            "var/lib/weft/key.json",
            "var/lib/weft/ipam/198.19.1.0_24",
        ];
        let others = [
            "opt/cni/bin/bridge",
            "opt/cni/bin/loopback",
            "etc/cni/net.d/20-other.conflist",
            "run/other",
        ];
        for f in ours.iter().chain(&others) {
            let p = d.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, b"x").unwrap();
        }
        // The key's inode, reachable after the uninstall: zeros, not the key.
        let key = d.join("var/lib/weft").join(weft_keys::KEY_FILE);
        fs::write(&key, b"private key").unwrap();
        let witness = d.join("key-inode");
        fs::hard_link(&key, &witness).unwrap();
        for (what, removed) in remove_files(&args) {
            removed.unwrap_or_else(|e| panic!("{what}: {e:#}"));
        }
        assert_eq!(
            fs::read(&witness).unwrap(),
            vec![0; 11],
            "the key was not wiped"
        );
        for f in ours {
            assert!(!d.join(f).exists(), "{f} is left");
        }
        for f in ["run/weft", "var/lib/weft"] {
            assert!(!d.join(f).exists(), "{f} is left");
        }
        for f in others {
            assert!(d.join(f).exists(), "{f} was removed");
        }
        // Again: nothing left to remove is not an error.
        for (what, removed) in remove_files(&args) {
            assert!(!removed.unwrap(), "{what}");
        }
    }
}
