//! A kube-rs client for the lab's API server: for one-shot CLI commands,
//! and for the lab's own controllers (kube-proxy).

use std::future::Future;

use anyhow::{Context, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use super::state::LabDir;

/// Runs `f` with a client built from the lab's host kubeconfig on a
/// single-threaded runtime.
pub fn block_on<F, Fut, T>(dir: &LabDir, f: F) -> Result<T>
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async { f(client(dir).await?).await })
}

/// A client with the lab's host kubeconfig (the admin's).
pub async fn client(dir: &LabDir) -> Result<Client> {
    let path = dir.kubeconfig();
    let kubeconfig =
        Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading the lab kubeconfig")?;
    Ok(Client::try_from(config)?)
}
