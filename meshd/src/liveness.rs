//! Which peers are down: a peer from which nothing was heard for `timeout` —
//! its received-bytes counter did not move and no new handshake completed.
//! Both signals count because implementations differ: the kernel,
//! wireguard-go and Weft's device count keepalives in rx bytes; a program
//! that does not still shows an idle session rekeying every two minutes
//! while keepalives flow. A
//! down peer stays configured and WireGuard keeps retrying its handshake,
//! so it comes back up by itself. Pure: the caller supplies the clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use weft_keys::PublicKey;

/// What the data plane says about a peer: bytes received and the Unix
/// second of the last handshake (0: none).
pub type Reading = (u64, u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    reading: Reading,
    since: Instant,
}

/// Remembers when each peer's counter last moved.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    seen: BTreeMap<PublicKey, Seen>,
}

impl Liveness {
    /// Takes readings at `now`; returns the peers that are down. A peer
    /// first seen now gets the whole timeout as grace.
    pub fn observe(
        &mut self,
        readings: &[(PublicKey, Reading)],
        now: Instant,
        timeout: Duration,
    ) -> BTreeSet<PublicKey> {
        let current: BTreeSet<PublicKey> = readings.iter().map(|(k, _)| *k).collect();
        self.seen.retain(|k, _| current.contains(k));
        for (key, reading) in readings {
            let entry = self.seen.entry(*key).or_insert(Seen {
                reading: *reading,
                since: now,
            });
            if entry.reading != *reading {
                *entry = Seen {
                    reading: *reading,
                    since: now,
                };
            }
        }
        self.seen
            .iter()
            .filter(|(_, s)| now.duration_since(s.since) > timeout)
            .map(|(k, _)| *k)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_peers_go_down_and_come_back() {
        let (a, b) = (
            PublicKey::from_bytes([1; 32]),
            PublicKey::from_bytes([2; 32]),
        );
        let t = Duration::from_secs(10);
        let start = Instant::now();
        let mut l = Liveness::default();
        assert!(
            l.observe(&[(a, (0, 0)), (b, (0, 0))], start, t).is_empty(),
            "grace for new peers"
        );
        let later = start + Duration::from_secs(11);
        assert_eq!(
            l.observe(&[(a, (500, 0)), (b, (0, 0))], later, t),
            BTreeSet::from([b])
        );
        let again = later + Duration::from_secs(1);
        assert!(
            l.observe(&[(a, (500, 0)), (b, (92, 0))], again, t)
                .is_empty(),
            "b is heard again"
        );
        // A fresh handshake alone (a data plane that counts no keepalive bytes) is heard too.
        let much_later = again + Duration::from_secs(11);
        assert!(l
            .observe(
                &[(a, (500, 1_700_000_000)), (b, (92, 1_700_000_000))],
                much_later,
                t
            )
            .is_empty());
        // A removed peer is forgotten; re-added, it gets grace again.
        l.observe(&[(a, (600, 0))], much_later, t);
        assert!(l
            .observe(
                &[(a, (700, 0)), (b, (92, 0))],
                much_later + Duration::from_secs(11),
                t
            )
            .is_empty());
    }
}
