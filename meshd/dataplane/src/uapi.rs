//! The cross-platform WireGuard UAPI (`wg`, wireguard-go and
//! wireguard-control speak it over `/var/run/wireguard/<iface>.sock`):
//! a `set` parsed into a typed request, a `get` reply rendered from the
//! device's view. Pure; table-tested and fuzzed. Every field is checked
//! before anything is applied, so a bad request changes nothing.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use weft_keys::{PresharedKey, PrivateKey, PublicKey};

/// A request larger than this is refused (a full mesh of 5,000 peers with
/// four prefixes each is about 1.5 MB).
pub const MAX_REQUEST: usize = 16 << 20;

/// Why a request was refused; the reply carries [`UapiError::errno`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    #[error("line {line}: {why}")]
    Malformed { line: usize, why: &'static str },
    #[error("line {line}: invalid {key}")]
    Invalid { line: usize, key: String },
    #[error("the request is larger than {MAX_REQUEST} bytes")]
    TooLarge,
}

impl UapiError {
    /// The errno a UAPI reply reports: EPROTO for a request that is not the
    /// protocol, EINVAL for a bad value.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Malformed { .. } => libc::EPROTO,
            Self::Invalid { .. } | Self::TooLarge => libc::EINVAL,
        }
    }
}

/// The device key of Weft's rotation extension. Only Weft's device knows
/// it; `wg` and wireguard-go never send it, and `get` never reports it (so
/// `wg show` and wireguard-control read Weft's device as any other).
pub const PREVIOUS_PRIVATE_KEY: &str = "weft_previous_private_key";
/// The peer key of Weft's rotation extension (`weft_successor_of=<old
/// public key>` in a new peer's section): the new peer is the same node
/// under its next key, and takes the old peer's sessions over until it has
/// its own (the old peer is removed in the same request).
pub const SUCCESSOR_OF: &str = "weft_successor_of";

/// A `set=1` request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SetRequest {
    /// `Some(None)`: the all-zero key, which removes the device's key.
    pub private_key: Option<Option<PrivateKey>>,
    /// Weft's extension for key rotation (`weft_previous_private_key=`): a
    /// key the device still answers handshakes for, and whose sessions it
    /// keeps, until every peer has moved to `private_key`. `Some(None)`:
    /// the all-zero key, which ends the overlap.
    pub previous_private_key: Option<Option<PrivateKey>>,
    pub listen_port: Option<u16>,
    /// 0 removes the mark.
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerRequest>,
}

/// One `public_key=` section.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerRequest {
    pub public_key: PublicKey,
    pub remove: bool,
    pub update_only: bool,
    /// `Some(None)`: the all-zero key, no preshared key.
    pub preshared_key: Option<Option<PresharedKey>>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds; 0 turns it off.
    pub keepalive: Option<u16>,
    /// In request order: a `replace_allowed_ips` clears what came before.
    pub allowed_ips: Vec<AllowedIp>,
    /// Weft's extension: the peer this one succeeds (see [`SUCCESSOR_OF`]).
    pub successor_of: Option<PublicKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowedIp {
    Clear,
    Add(IpNet),
}

/// Parses a whole `set=1\n…\n\n` request.
pub fn parse_set(request: &str) -> Result<SetRequest, UapiError> {
    if request.len() > MAX_REQUEST {
        return Err(UapiError::TooLarge);
    }
    let mut lines = request.lines().enumerate();
    if lines.next().map(|(_, l)| l) != Some("set=1") {
        return Err(UapiError::Malformed {
            line: 1,
            why: "a set request starts with set=1",
        });
    }
    let mut set = SetRequest::default();
    for (n, line) in lines.take_while(|(_, l)| !l.is_empty()) {
        let line_no = n + 1;
        let (key, value) = line.split_once('=').ok_or(UapiError::Malformed {
            line: line_no,
            why: "expected key=value",
        })?;
        let invalid = || UapiError::Invalid {
            line: line_no,
            key: key.to_string(),
        };
        let flag = || match value {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(invalid()),
        };
        if key == "public_key" {
            let bytes = hex32(value).ok_or_else(invalid)?;
            set.peers.push(PeerRequest {
                public_key: PublicKey::from_bytes(bytes),
                remove: false,
                update_only: false,
                preshared_key: None,
                endpoint: None,
                keepalive: None,
                allowed_ips: Vec::new(),
                successor_of: None,
            });
            continue;
        }
        let Some(peer) = set.peers.last_mut() else {
            let key_name = key;
            match key {
                "private_key" | PREVIOUS_PRIVATE_KEY => {
                    let bytes = hex32(value).ok_or_else(invalid)?;
                    let key = Some((bytes != [0; 32]).then(|| PrivateKey::from_bytes(bytes)));
                    if key_name == "private_key" {
                        set.private_key = key;
                    } else {
                        set.previous_private_key = key;
                    }
                }
                "listen_port" => set.listen_port = Some(value.parse().map_err(|_| invalid())?),
                "fwmark" => set.fwmark = Some(value.parse().map_err(|_| invalid())?),
                "replace_peers" => set.replace_peers = flag()?,
                _ => return Err(invalid()),
            }
            continue;
        };
        match key {
            "remove" => peer.remove = flag()?,
            "update_only" => peer.update_only = flag()?,
            "preshared_key" => {
                let bytes = hex32(value).ok_or_else(invalid)?;
                peer.preshared_key =
                    Some((bytes != [0; 32]).then(|| PresharedKey::from_bytes(bytes)));
            }
            "endpoint" => peer.endpoint = Some(value.parse().map_err(|_| invalid())?),
            "persistent_keepalive_interval" => {
                peer.keepalive = Some(value.parse().map_err(|_| invalid())?)
            }
            "replace_allowed_ips" => {
                if flag()? {
                    peer.allowed_ips.push(AllowedIp::Clear);
                }
            }
            "allowed_ip" => {
                let net: IpNet = value.parse().map_err(|_| invalid())?;
                peer.allowed_ips.push(AllowedIp::Add(net.trunc()));
            }
            SUCCESSOR_OF => {
                peer.successor_of = Some(PublicKey::from_bytes(hex32(value).ok_or_else(invalid)?))
            }
            "protocol_version" if value == "1" => {}
            _ => return Err(invalid()),
        }
    }
    Ok(set)
}

/// What a `get` reports about the device.
#[derive(Debug, Clone, Default)]
pub struct DeviceView {
    pub private_key: Option<PrivateKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerView>,
}

#[derive(Debug, Clone)]
pub struct PeerView {
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: Option<SocketAddr>,
    /// Since the Unix epoch; `None` before the first handshake.
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub keepalive: u16,
    pub allowed_ips: Vec<IpNet>,
}

/// The `get=1` reply, `errno=0` and the empty line included.
pub fn render_get(view: &DeviceView) -> String {
    let mut out = String::with_capacity(128 + view.peers.len() * 256);
    if let Some(k) = &view.private_key {
        let _ = writeln!(out, "private_key={}", hex(&k.to_bytes()));
    }
    let _ = writeln!(out, "listen_port={}", view.listen_port);
    if view.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", view.fwmark);
    }
    for p in &view.peers {
        let _ = writeln!(out, "public_key={}", hex(p.public_key.as_bytes()));
        if let Some(k) = &p.preshared_key {
            let _ = writeln!(out, "preshared_key={}", hex(&k.to_bytes()));
        }
        out.push_str("protocol_version=1\n");
        if let Some(e) = p.endpoint {
            let _ = writeln!(out, "endpoint={e}");
        }
        let at = p.last_handshake.unwrap_or_default();
        let _ = writeln!(
            out,
            "last_handshake_time_sec={}\nlast_handshake_time_nsec={}",
            at.as_secs(),
            at.subsec_nanos()
        );
        let _ = writeln!(out, "tx_bytes={}\nrx_bytes={}", p.tx_bytes, p.rx_bytes);
        let _ = writeln!(out, "persistent_keepalive_interval={}", p.keepalive);
        for ip in &p.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
    }
    out.push_str("errno=0\n\n");
    out
}

/// The reply to a refused or failed request.
pub fn render_errno(errno: i32) -> String {
    format!("errno={errno}\n\n")
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The request that sets the device's key and previous key in one step.
/// The extension comes first: a device that does not know it (wireguard-go)
/// refuses the request before applying any of it.
pub fn render_keys(private: &PrivateKey, previous: Option<&PrivateKey>) -> String {
    let previous = previous.map_or([0; 32], PrivateKey::to_bytes);
    format!(
        "set=1\n{PREVIOUS_PRIVATE_KEY}={}\nprivate_key={}\n\n",
        hex(&previous),
        hex(&private.to_bytes())
    )
}

/// The request moving a node from its entry `old` to `new` (its next key)
/// in one step: the new entry succeeds the old one (takes its sessions
/// over, see [`SUCCESSOR_OF`]) with the old entry's prefixes, and the old
/// entry goes. Only Weft's device takes it.
pub fn render_successor(
    new: &PublicKey,
    old: &PublicKey,
    endpoint: Option<SocketAddr>,
    keepalive: Option<u16>,
    allowed_ips: &[IpNet],
) -> String {
    let mut out = format!(
        "set=1\npublic_key={}\n{SUCCESSOR_OF}={}\n",
        hex(new.as_bytes()),
        hex(old.as_bytes())
    );
    if let Some(e) = endpoint {
        let _ = writeln!(out, "endpoint={e}");
    }
    let _ = writeln!(
        out,
        "persistent_keepalive_interval={}",
        keepalive.unwrap_or(0)
    );
    out.push_str("replace_allowed_ips=true\n");
    for ip in allowed_ips {
        let _ = writeln!(out, "allowed_ip={ip}");
    }
    let _ = write!(out, "public_key={}\nremove=true\n\n", hex(old.as_bytes()));
    out
}

/// The errno of a reply (`errno=N`), if it has one.
pub fn reply_errno(reply: &str) -> Option<i32> {
    reply
        .lines()
        .find_map(|l| l.strip_prefix("errno="))
        .and_then(|n| n.trim().parse().ok())
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: char) -> String {
        c.to_string().repeat(64)
    }

    #[test]
    fn the_rotation_extensions_round_trip() {
        let (old, new) = (
            PublicKey::from_bytes([1; 32]),
            PublicKey::from_bytes([2; 32]),
        );
        let text = render_successor(
            &new,
            &old,
            Some("198.18.1.1:51820".parse().unwrap()),
            Some(10),
            &["198.19.1.0/24".parse().unwrap()],
        );
        let set = parse_set(&text).unwrap();
        assert_eq!(set.peers.len(), 2);
        assert_eq!(
            (set.peers[0].public_key, set.peers[0].successor_of),
            (new, Some(old))
        );
        assert_eq!(
            set.peers[0].allowed_ips,
            [
                AllowedIp::Clear,
                AllowedIp::Add("198.19.1.0/24".parse().unwrap())
            ]
        );
        assert!(set.peers[1].remove && set.peers[1].public_key == old);
        let (key, previous) = (
            PrivateKey::from_bytes([3; 32]),
            PrivateKey::from_bytes([4; 32]),
        );
        let set = parse_set(&render_keys(&key, Some(&previous))).unwrap();
        assert_eq!(set.private_key, Some(Some(key.clone())));
        assert_eq!(set.previous_private_key, Some(Some(previous)));
        let set = parse_set(&render_keys(&key, None)).unwrap();
        assert_eq!(
            set.previous_private_key,
            Some(None),
            "zeros end the overlap"
        );
        assert_eq!(reply_errno("errno=0\n\n"), Some(0));
        assert_eq!(reply_errno("errno=22\n\n"), Some(22));
    }

    #[test]
    fn a_full_set_parses_field_by_field() {
        let request = format!(
            "set=1\nprivate_key={}\nlisten_port=51820\nfwmark=7\nreplace_peers=true\n\
             public_key={}\npreshared_key={}\nendpoint=198.18.1.2:51820\npersistent_keepalive_interval=25\n\
             allowed_ip=10.1.0.7/24\nreplace_allowed_ips=true\nallowed_ip=fd00::1/64\nprotocol_version=1\n\
             public_key={}\nremove=true\n\
             public_key={}\nupdate_only=true\nendpoint=[fd00::2]:1\npreshared_key={}\n\n",
            key('1'),
            key('a'),
            key('c'),
            key('b'),
            key('d'),
            key('0'),
        );
        let set = parse_set(&request).unwrap();
        assert_eq!(
            set.private_key,
            Some(Some(PrivateKey::from_bytes([0x11; 32])))
        );
        assert_eq!(
            (set.listen_port, set.fwmark, set.replace_peers),
            (Some(51820), Some(7), true)
        );
        assert_eq!(set.peers.len(), 3);
        let a = &set.peers[0];
        assert_eq!(a.public_key, PublicKey::from_bytes([0xaa; 32]));
        assert_eq!(
            a.preshared_key,
            Some(Some(PresharedKey::from_bytes([0xcc; 32])))
        );
        assert_eq!(a.endpoint, Some("198.18.1.2:51820".parse().unwrap()));
        assert_eq!(a.keepalive, Some(25));
        assert_eq!(
            a.allowed_ips,
            [
                // Host bits are cleared, as the kernel stores prefixes.
                AllowedIp::Add("10.1.0.0/24".parse().unwrap()),
                AllowedIp::Clear,
                AllowedIp::Add("fd00::/64".parse().unwrap()),
            ]
        );
        assert!(set.peers[1].remove);
        let d = &set.peers[2];
        assert!(d.update_only);
        assert_eq!(d.preshared_key, Some(None), "the zero key removes it");
    }

    #[test]
    fn bad_requests_name_the_line_and_field() {
        let table: &[(&str, UapiError)] = &[
            (
                "get=1\n\n",
                UapiError::Malformed {
                    line: 1,
                    why: "a set request starts with set=1",
                },
            ),
            (
                "set=1\nnonsense\n\n",
                UapiError::Malformed {
                    line: 2,
                    why: "expected key=value",
                },
            ),
            (
                "set=1\nlisten_port=70000\n\n",
                UapiError::Invalid {
                    line: 2,
                    key: "listen_port".into(),
                },
            ),
            (
                "set=1\nprivate_key=abc\n\n",
                UapiError::Invalid {
                    line: 2,
                    key: "private_key".into(),
                },
            ),
            (
                "set=1\nendpoint=1.2.3.4:5\n\n",
                UapiError::Invalid {
                    line: 2,
                    key: "endpoint".into(),
                },
            ),
            (
                &format!("set=1\npublic_key={}\nallowed_ip=10.0.0.1/33\n\n", key('a')),
                UapiError::Invalid {
                    line: 3,
                    key: "allowed_ip".into(),
                },
            ),
            (
                &format!("set=1\npublic_key={}\nremove=yes\n\n", key('a')),
                UapiError::Invalid {
                    line: 3,
                    key: "remove".into(),
                },
            ),
            (
                &format!("set=1\npublic_key={}\nprotocol_version=2\n\n", key('a')),
                UapiError::Invalid {
                    line: 3,
                    key: "protocol_version".into(),
                },
            ),
            (
                &format!("set=1\npublic_key={}\n\n", "zz".repeat(32)),
                UapiError::Invalid {
                    line: 2,
                    key: "public_key".into(),
                },
            ),
        ];
        for (request, want) in table {
            assert_eq!(parse_set(request).as_ref(), Err(want), "{request:?}");
        }
        assert_eq!(
            parse_set(&"x".repeat(MAX_REQUEST + 1)),
            Err(UapiError::TooLarge)
        );
        assert_eq!(UapiError::TooLarge.errno(), libc::EINVAL);
    }

    #[test]
    fn get_replies_are_the_standard_form() {
        let view = DeviceView {
            private_key: Some(PrivateKey::from_bytes([0x11; 32])),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![PeerView {
                public_key: PublicKey::from_bytes([0xaa; 32]),
                preshared_key: None,
                endpoint: Some("198.18.1.2:51820".parse().unwrap()),
                last_handshake: Some(Duration::new(984, 5)),
                rx_bytes: 1,
                tx_bytes: 2,
                keepalive: 25,
                allowed_ips: vec!["10.1.0.0/24".parse().unwrap()],
            }],
        };
        assert_eq!(
            render_get(&view),
            format!(
                "private_key={}\nlisten_port=51820\npublic_key={}\nprotocol_version=1\n\
                 endpoint=198.18.1.2:51820\nlast_handshake_time_sec=984\nlast_handshake_time_nsec=5\n\
                 tx_bytes=2\nrx_bytes=1\npersistent_keepalive_interval=25\nallowed_ip=10.1.0.0/24\nerrno=0\n\n",
                key('1'),
                key('a')
            )
        );
    }
}
