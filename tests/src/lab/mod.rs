//! The lab: a fabric namespace with a bridge, one namespace per node wired to
//! it by a veth, and the API server process, all recorded under one runtime
//! directory.
//!
//! [`topology`] plans it (pure), [`netns`], [`control`] and [`agents`]
//! (one real meshd per node) build it, [`mesh`] reads the data planes,
//! [`lifecycle`] sequences `up`/`down`, [`status`] reports on it.

pub mod agents;
pub mod bench;
pub mod bench_cni;
pub mod bench_failover;
pub mod bench_planner;
pub mod bench_policy;
pub mod bench_rotate;
pub mod client;
pub mod control;
pub mod kube_proxy;
pub mod lifecycle;
pub mod links;
pub mod manifest;
pub mod mesh;
pub mod netns;
pub mod netpol;
pub mod peers;
pub mod pods;
pub mod preflight;
pub mod sentinel;
pub mod sites;
pub mod state;
pub mod status;
pub mod strict_runtime;
pub mod topology;
pub mod traffic;

use std::time::Duration;

/// The variable a slow machine (a guest without KVM, `meshlab vm`) sets so
/// that the lab's and the tests' bounded waits stretch by its factor.
pub const TIME_SCALE_ENV: &str = "MESHLAB_TIME_SCALE";

/// `limit` stretched for this machine: only where a wait bounds something
/// slow hardware slows down, never to loosen what a test measures.
pub fn scaled(limit: Duration) -> Duration {
    static FACTOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let factor = *FACTOR.get_or_init(|| match std::env::var(TIME_SCALE_ENV) {
        Err(_) => 1,
        Ok(v) => match v.parse::<u32>() {
            Ok(f @ 1..=20) => f,
            _ => {
                eprintln!("meshlab: ignoring {TIME_SCALE_ENV}={v:?}: want a whole factor from 1 to 20");
                1
            }
        },
    });
    limit * factor
}
