//! `/healthz` (the process serves), `/readyz` (the last sync was applied —
//! which needs the API and an answering data plane — and the NetworkPolicy
//! program is loaded) and `/metrics` (Prometheus text), on `--metrics-addr`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

use crate::annotations::PolicyApplied;
use crate::metrics::Metrics;

pub struct Health {
    /// The last sync was applied.
    pub mesh: AtomicBool,
    /// The node's NetworkPolicy program is loaded and the engine's last
    /// apply succeeded (always true when enforcement is off).
    pub policy: AtomicBool,
    /// The NetworkPolicies the kernel enforces (the engine's last applied
    /// pass), for the agent to publish.
    pub policy_applied: tokio::sync::watch::Sender<Option<PolicyApplied>>,
    pub metrics: Metrics,
}

impl Health {
    pub fn new(network_policy: bool) -> Self {
        Self {
            mesh: AtomicBool::new(false),
            policy: AtomicBool::new(!network_policy),
            policy_applied: tokio::sync::watch::Sender::new(None),
            metrics: Metrics::default(),
        }
    }

    /// What keeps the node from being ready; empty when it is.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut why = Vec::new();
        if !self.mesh.load(Ordering::Relaxed) {
            why.push("the last sync was not applied (see meshd's log)");
        }
        if !self.policy.load(Ordering::Relaxed) {
            why.push("the NetworkPolicy program is not loaded (see meshd's log)");
        }
        why
    }
}

fn respond(health: &Health, path: &str) -> Response<Full<Bytes>> {
    let not_ready = health.not_ready();
    let (code, body, content_type) = match path {
        "/healthz" | "/livez" => (StatusCode::OK, "ok".to_string(), "text/plain"),
        "/readyz" if not_ready.is_empty() => (StatusCode::OK, "ok".to_string(), "text/plain"),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}", not_ready.join("; ")),
            "text/plain",
        ),
        "/metrics" => (
            StatusCode::OK,
            health.metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => (StatusCode::NOT_FOUND, "not found".to_string(), "text/plain"),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

/// Binds `addr` and serves until the process exits.
pub async fn serve(addr: SocketAddr, health: Arc<Health>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metrics-addr {addr}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let health = health.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let health = health.clone();
                    async move { Ok::<_, Infallible>(respond(&health, req.uri().path())) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(())
}
