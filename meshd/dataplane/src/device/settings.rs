//! What the device is configured with, and what a `set` makes of it — with
//! the kernel's semantics, pure. The device then changes only what differs
//! (peers it keeps keep their sessions).

use std::collections::HashMap;
use std::net::SocketAddr;

use ipnet::IpNet;
use weft_keys::{PresharedKey, PrivateKey, PublicKey};

use crate::uapi::{AllowedIp, SetRequest};

#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub private_key: Option<PrivateKey>,
    /// The key being rotated away from (see `SetRequest`); never equal to
    /// `private_key`.
    pub previous_key: Option<PrivateKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    /// In the order they were added (`get` reports them so).
    pub peers: Vec<PeerSettings>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerSettings {
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: Option<SocketAddr>,
    pub keepalive: u16,
    pub allowed_ips: Vec<IpNet>,
}

impl PeerSettings {
    fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            preshared_key: None,
            endpoint: None,
            keepalive: 0,
            allowed_ips: Vec::new(),
        }
    }
}

impl Settings {
    /// The settings after `set`. Like the kernel: `replace_peers` first; a
    /// prefix given to a peer leaves whichever peer had it (so a prefix
    /// moves between peers in one request); `update_only` never creates;
    /// a peer with the device's own public key is dropped.
    pub fn apply(&self, set: &SetRequest) -> Settings {
        let private_key = match &set.private_key {
            Some(k) => k.clone(),
            None => self.private_key.clone(),
        };
        let previous_key = match &set.previous_private_key {
            Some(k) => k.clone(),
            None => self.previous_key.clone(),
        }
        .filter(|k| private_key.as_ref().map(PrivateKey::public_key) != Some(k.public_key()));
        let mut next = Settings {
            private_key,
            previous_key,
            listen_port: set.listen_port.unwrap_or(self.listen_port),
            fwmark: set.fwmark.unwrap_or(self.fwmark),
            peers: Vec::new(),
        };
        let mut peers: Vec<Option<PeerSettings>> = if set.replace_peers {
            Vec::new()
        } else {
            self.peers.iter().cloned().map(Some).collect()
        };
        let mut slot: HashMap<PublicKey, usize> = peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (p.public_key, i)))
            .collect();
        let mut owner: HashMap<IpNet, usize> = HashMap::new();
        for (i, p) in peers.iter().enumerate() {
            for ip in p.iter().flat_map(|p| &p.allowed_ips) {
                owner.insert(*ip, i);
            }
        }
        for request in &set.peers {
            let existing = slot.get(&request.public_key).copied();
            if request.remove {
                if let Some(i) = existing {
                    for ip in peers[i].take().into_iter().flat_map(|p| p.allowed_ips) {
                        owner.remove(&ip);
                    }
                    slot.remove(&request.public_key);
                }
                continue;
            }
            let i = match existing {
                Some(i) => i,
                None if request.update_only => continue,
                None => {
                    peers.push(Some(PeerSettings::new(request.public_key)));
                    slot.insert(request.public_key, peers.len() - 1);
                    peers.len() - 1
                }
            };
            let Some(peer) = peers[i].as_mut() else {
                continue;
            };
            if let Some(k) = &request.preshared_key {
                peer.preshared_key = k.clone();
            }
            if let Some(e) = request.endpoint {
                peer.endpoint = Some(e);
            }
            if let Some(k) = request.keepalive {
                peer.keepalive = k;
            }
            for op in &request.allowed_ips {
                match op {
                    AllowedIp::Clear => {
                        let Some(peer) = peers[i].as_mut() else {
                            continue;
                        };
                        for ip in peer.allowed_ips.drain(..) {
                            owner.remove(&ip);
                        }
                    }
                    AllowedIp::Add(ip) => match owner.insert(*ip, i) {
                        Some(j) if j == i => {}
                        previous => {
                            if let Some(other) = previous.and_then(|j| peers[j].as_mut()) {
                                other.allowed_ips.retain(|o| o != ip);
                            }
                            if let Some(peer) = peers[i].as_mut() {
                                peer.allowed_ips.push(*ip);
                            }
                        }
                    },
                }
            }
        }
        let own: Vec<PublicKey> = [&next.private_key, &next.previous_key]
            .into_iter()
            .flatten()
            .map(PrivateKey::public_key)
            .collect();
        next.peers = peers
            .into_iter()
            .flatten()
            .filter(|p| !own.contains(&p.public_key))
            .collect();
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uapi::parse_set;

    fn hex(c: char) -> String {
        c.to_string().repeat(64)
    }

    fn pk(b: u8) -> PublicKey {
        PublicKey::from_bytes([b; 32])
    }

    fn set(s: &Settings, body: &str) -> Settings {
        s.apply(&parse_set(&format!("set=1\n{body}\n")).unwrap())
    }

    fn ips(s: &Settings, key: u8) -> Vec<String> {
        s.peers
            .iter()
            .find(|p| p.public_key == pk(key))
            .map(|p| p.allowed_ips.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    #[test]
    fn kernel_semantics_of_set() {
        let (a, b, c) = (hex('a'), hex('b'), hex('c'));
        let s = set(
            &Settings::default(),
            &format!(
                "listen_port=51820\npublic_key={a}\nendpoint=198.18.0.2:1\nallowed_ip=10.1.0.0/24\nallowed_ip=10.9.0.0/24\n\
                 public_key={b}\nallowed_ip=10.2.0.0/24\n"
            ),
        );
        assert_eq!(s.listen_port, 51820);
        assert_eq!(ips(&s, 0xaa), ["10.1.0.0/24", "10.9.0.0/24"]);

        // A prefix given to b leaves a, in the same request.
        let moved = set(&s, &format!("public_key={b}\nallowed_ip=10.9.0.0/24\n"));
        assert_eq!(ips(&moved, 0xaa), ["10.1.0.0/24"]);
        assert_eq!(ips(&moved, 0xbb), ["10.2.0.0/24", "10.9.0.0/24"]);
        // Only an exact prefix moves: a covering one stays where it is.
        let covering = set(&s, &format!("public_key={b}\nallowed_ip=10.0.0.0/8\n"));
        assert_eq!(ips(&covering, 0xaa), ["10.1.0.0/24", "10.9.0.0/24"]);

        // Endpoint and keepalive change in place; allowed IPs kept.
        let changed = set(
            &s,
            &format!("public_key={a}\nendpoint=198.18.0.3:2\npersistent_keepalive_interval=5\n"),
        );
        let pa = &changed.peers[0];
        assert_eq!(
            (pa.endpoint, pa.keepalive),
            (Some("198.18.0.3:2".parse().unwrap()), 5)
        );
        assert_eq!(ips(&changed, 0xaa), ["10.1.0.0/24", "10.9.0.0/24"]);

        // replace_allowed_ips, update_only, remove, replace_peers.
        let replaced = set(
            &s,
            &format!("public_key={a}\nreplace_allowed_ips=true\nallowed_ip=10.3.0.0/24\n"),
        );
        assert_eq!(ips(&replaced, 0xaa), ["10.3.0.0/24"]);
        let update_only = set(
            &s,
            &format!("public_key={c}\nupdate_only=true\nallowed_ip=10.4.0.0/24\n"),
        );
        assert_eq!(update_only.peers.len(), 2, "update_only never creates");
        let removed = set(
            &s,
            &format!("public_key={a}\nremove=true\npublic_key={c}\nallowed_ip=10.1.0.0/24\n"),
        );
        assert_eq!(
            removed
                .peers
                .iter()
                .map(|p| p.public_key)
                .collect::<Vec<_>>(),
            [pk(0xbb), pk(0xcc)]
        );
        assert_eq!(ips(&removed, 0xcc), ["10.1.0.0/24"]);
        let fresh = set(&s, &format!("replace_peers=true\npublic_key={c}\n"));
        assert_eq!(fresh.peers.len(), 1);
        assert_eq!(fresh.listen_port, 51820, "device fields are kept");
    }

    #[test]
    fn the_device_is_never_its_own_peer() {
        let own = PrivateKey::from_bytes([0x11; 32]);
        let own_hex: String = own
            .public_key()
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let s = set(
            &Settings::default(),
            &format!(
                "private_key={}\npublic_key={own_hex}\nallowed_ip=10.0.0.0/24\n",
                hex('1')
            ),
        );
        assert!(s.peers.is_empty());
        let cleared = set(&s, &format!("private_key={}\n", hex('0')));
        assert!(cleared.private_key.is_none(), "the zero key removes it");
    }

    #[test]
    fn the_previous_key_is_kept_until_ended_and_never_equals_the_key() {
        let key = |c: char| format!("private_key={}\n", hex(c));
        let previous = |c: char| format!("weft_previous_private_key={}\n", hex(c));
        let rotating = set(
            &set(&Settings::default(), &key('1')),
            &format!("{}{}", key('2'), previous('1')),
        );
        let public = |c: char| {
            let byte = u8::from_str_radix(&format!("{c}{c}"), 16).unwrap();
            PrivateKey::from_bytes([byte; 32]).public_key()
        };
        let previous_public = |s: &Settings| s.previous_key.as_ref().map(PrivateKey::public_key);
        assert_eq!(previous_public(&rotating), Some(public('1')));
        let own_hex: String = public('1')
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let peer = set(&rotating, &format!("public_key={own_hex}\n"));
        assert!(
            peer.peers.is_empty(),
            "the previous key is the device's too"
        );
        assert_eq!(
            previous_public(&set(&rotating, "listen_port=1\n")),
            Some(public('1')),
            "a set without it keeps it"
        );
        assert_eq!(previous_public(&set(&rotating, &previous('0'))), None);
        assert_eq!(
            previous_public(&set(&rotating, &previous('2'))),
            None,
            "the key itself is no previous key"
        );
    }
}
