//! A small Kubernetes-API-compatible server for the lab: real REST and watch
//! semantics for the kinds Weft uses, over TLS with a bearer token, so that
//! kube-rs, kubectl and the Python client work against it unchanged.
//!
//! Layers, top to bottom: [`http`] (wire format) → [`store`] (semantics) →
//! [`patch`], [`selector`], [`validate`] (pure helpers). [`kinds`] is the
//! table of served kinds; [`pki`] makes the credentials.

pub mod access;
pub mod admission;
pub mod auth;
pub mod discovery;
pub mod http;
pub mod kinds;
pub mod kubelet;
pub mod patch;
pub mod pki;
pub mod protobuf;
pub mod rbac;
pub mod selector;
pub mod services;
pub mod status;
pub mod store;
pub mod table;
pub mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use self::http::Shared;
use self::pki::Pki;
use self::store::Store;

/// Tunables of a server instance.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many recent changes a watch can resume from before it gets 410.
    pub watch_log: usize,
    /// How often watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
    /// A directory to keep credentials and objects in across restarts:
    /// credentials are reused if saved there, objects restored if a
    /// previous instance saved them when it stopped.
    pub persist: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            watch_log: 10_000,
            bookmark_interval: Duration::from_secs(10),
            persist: None,
        }
    }
}

/// The `kubernetes` EndpointSlice a real API server keeps for itself.
pub fn api_server_slice(at: SocketAddr) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "kubernetes"},
        },
        "addressType": if at.is_ipv4() { "IPv4" } else { "IPv6" },
        "endpoints": [{"addresses": [at.ip().to_string()], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": at.port(), "protocol": "TCP"}],
    })
}

const PKI_FILE: &str = "apiserver-pki.json";
const OBJECTS_FILE: &str = "apiserver-objects.json";

/// Removes what a server persisted in `dir`, so the next one starts empty
/// with new credentials.
pub fn forget(dir: &std::path::Path) {
    for f in [PKI_FILE, OBJECTS_FILE] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

/// A credential for node `node`'s kubelet (see [`auth::KubeletClaims`]),
/// signed with the key of the server that persists its credentials in
/// `dir`, as kubeadm signs kubelet certificates with the cluster's CA key
/// on disk: the server verifies it with nothing shared but that key, and
/// across its restarts.
pub fn kubelet_token(dir: &std::path::Path, node: &str) -> Result<String> {
    let path = dir.join(PKI_FILE);
    let bytes = std::fs::read(&path)
        .with_context(|| format!("reading {} (has the API server started?)", path.display()))?;
    let pki: Pki = serde_json::from_slice(&bytes).context("the saved API server credentials")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let signer = auth::Signer::new(&pki.signing_key);
    Ok(signer.mint(&auth::KubeletClaims::for_node(node, now)))
}

/// A running server; dropping it does not stop it, [`Running::stop`] does.
pub struct Running {
    pub addrs: Vec<SocketAddr>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    shared: Arc<Shared>,
    persist: Option<PathBuf>,
}

/// How long open connections get to finish when the server stops.
const DRAIN: Duration = Duration::from_secs(3);
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Running {
    /// Resolves when the server has stopped (after [`Running::stop`] or a
    /// cancelled token from [`Running::shutdown_token`]).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// Stops accepting, ends every watch and waits (bounded) for open
    /// connections to drain; then saves the objects if persisting.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        let _ = self.task.await;
        if let Some(dir) = &self.persist {
            let snapshot = self.shared.store.snapshot();
            weft_keys::write_private(&dir.join(OBJECTS_FILE), &serde_json::to_vec(&snapshot)?)?;
        }
        Ok(())
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// A bound listener and the kubeconfig file that tells clients how to reach it.
pub struct Endpoint {
    pub listener: std::net::TcpListener,
    pub kubeconfig: PathBuf,
    /// The address clients are told (kubeconfig, certificate, and the
    /// `kubernetes` EndpointSlice a fresh server lists, as a real API
    /// server's `--advertise-address`) when not the listener's own: an
    /// address that forwards to it.
    pub advertise: Option<SocketAddr>,
}

/// Mints fresh credentials for the endpoints' addresses, writes one
/// kubeconfig per endpoint (mode 0600) and starts serving. The listeners may
/// have been bound in other network namespaces. Needs a tokio runtime.
pub fn launch(endpoints: Vec<Endpoint>, options: Options) -> Result<Running> {
    let mut addrs = Vec::new();
    for e in &endpoints {
        addrs.push(e.advertise.unwrap_or(e.listener.local_addr()?));
    }
    let ips: Vec<_> = addrs.iter().map(SocketAddr::ip).collect();
    let advertised = endpoints.iter().find_map(|e| e.advertise);
    let saved = options.persist.as_ref().map(|d| d.join(PKI_FILE));
    let pki = match saved.as_ref().and_then(|p| std::fs::read(p).ok()) {
        Some(bytes) => {
            serde_json::from_slice(&bytes).context("the saved API server credentials")?
        }
        None => {
            let pki = Pki::generate(&ips)?;
            if let Some(path) = &saved {
                weft_keys::write_private(path, &serde_json::to_vec(&pki)?)?;
            }
            pki
        }
    };
    for (e, addr) in endpoints.iter().zip(&addrs) {
        let kubeconfig = pki.kubeconfig(&format!("https://{addr}"));
        weft_keys::write_private(&e.kubeconfig, kubeconfig.as_bytes())?;
    }
    let listeners = endpoints.into_iter().map(|e| e.listener).collect();
    let signer = auth::Signer::new(&pki.signing_key);
    start(
        listeners,
        pki.server_config()?,
        pki.token,
        signer,
        options,
        advertised,
    )
}

fn start(
    listeners: Vec<std::net::TcpListener>,
    tls: rustls::ServerConfig,
    token: String,
    signer: auth::Signer,
    options: Options,
    advertised: Option<SocketAddr>,
) -> Result<Running> {
    let shutdown = CancellationToken::new();
    let saved = options
        .persist
        .as_ref()
        .and_then(|d| std::fs::read(d.join(OBJECTS_FILE)).ok());
    let store = match saved {
        Some(bytes) => Store::restore(
            serde_json::from_slice(&bytes).context("the saved API server objects")?,
            options.watch_log,
        ),
        None => {
            let store = Store::new(options.watch_log);
            if let Some(at) = advertised {
                let kind = kinds::lookup("discovery.k8s.io", "v1", "endpointslices")
                    .context("EndpointSlices are served")?;
                store
                    .create(kind, "default", api_server_slice(at), store::Write::COMMIT)
                    .map_err(|e| anyhow::anyhow!("the kubernetes EndpointSlice: {e:?}"))?;
            }
            store
        }
    };
    let shared = Arc::new(Shared {
        store,
        token,
        signer,
        bookmark_interval: options.bookmark_interval,
        shutdown: shutdown.clone(),
    });
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let mut addrs = Vec::new();
    let mut tokio_listeners = Vec::new();
    for l in listeners {
        l.set_nonblocking(true)?;
        addrs.push(l.local_addr()?);
        tokio_listeners.push(TcpListener::from_std(l).context("registering a listener")?);
    }
    let task = tokio::spawn(serve(
        tokio_listeners,
        acceptor,
        shared.clone(),
        shutdown.clone(),
    ));
    Ok(Running {
        addrs,
        shutdown,
        task,
        shared,
        persist: options.persist,
    })
}

async fn serve(
    listeners: Vec<TcpListener>,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel(64);
    for listener in listeners {
        let (conn_tx, shutdown) = (conn_tx.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => {
                            if conn_tx.send(tcp).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                }
            }
        });
    }
    drop(conn_tx);
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => break,
            tcp = conn_rx.recv() => match tcp {
                Some(tcp) => tcp,
                None => break,
            },
        };
        let (acceptor, shared, watcher) = (acceptor.clone(), shared.clone(), graceful.watcher());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(http::handle(shared, req).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder
                .serve_connection(TokioIo::new(tls), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
}
