//! The protocol's clock: every 250 ms each tunnel's timers run (rekeys,
//! handshake retries, keepalives after receiving, expiry), persistent
//! keepalives go out, and a tunnel replaced (a preshared-key change, a
//! rotation's previous key, an entry taken over) is retired a tick after
//! its successor has a session. A tunnel taken over from a replaced entry
//! has no timers and is dropped at its bound (see `peer::Tunnel`). Once a
//! second the handshake rate limiters start a new window.

use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;

use super::peer::PeerState;
use super::sys::Family;
use super::{Device, Sockets};

const TICK: Duration = Duration::from_millis(250);

/// Sends a persistent keepalive through the peer's tunnels: with a session
/// an empty data packet, without one the handshake that opens it. Returns
/// the bytes sent.
pub fn keepalive_now(state: &mut PeerState, sockets: &Sockets, buf: &mut [u8]) -> usize {
    let Some(to) = state.endpoint.map(|e| Family::of(&e).1) else {
        return 0;
    };
    let mut sent = 0;
    for tunnel in state.keepalive_tunnels() {
        if let TunnResult::WriteToNetwork(p) = tunnel.tunn.encapsulate(&[], buf) {
            sent += p.len();
            sockets.send_to(p, to);
        }
    }
    sent
}

pub fn run(device: &Arc<Device>) {
    let mut buf = vec![0u8; 2048];
    let mut window = Instant::now();
    loop {
        std::thread::sleep(TICK);
        let now = Instant::now();
        let config = device.config.load();
        let sockets = device.sockets.load();
        if now.duration_since(window) >= Duration::from_secs(1) {
            window = now;
            for id in config.identity.iter().chain(&config.previous) {
                id.limiter.reset_count();
            }
            for l in device.anonymous.load().iter() {
                l.reset_count();
            }
        }
        for peer in &config.peers {
            let mut guard = peer.lock();
            let state = &mut *guard;
            state.retire_previous(now);
            let endpoint = state.endpoint.map(|e| Family::of(&e).1);
            let keepalive = state.keepalive_due(now);
            let mut sent = 0;
            for tunnel in state.timed_tunnels() {
                if let TunnResult::WriteToNetwork(p) = tunnel.tunn.update_timers(&mut buf) {
                    if let Some(to) = endpoint {
                        sent += p.len();
                        sockets.send_to(p, to);
                    }
                }
            }
            if keepalive {
                sent += keepalive_now(state, &sockets, &mut buf);
            }
            drop(guard);
            peer.count_tx(sent);
        }
    }
}
