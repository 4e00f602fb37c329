//! The standard WireGuard UAPI `set` semantics, expressed in requests that
//! boringtun 0.7 can carry out. Pure: `meshd dataplane` feeds it the
//! client's request and the device's current peers, and sends what comes
//! out.
//!
//! boringtun 0.7.1 departs from the protocol in two ways that take a data
//! plane down or corrupt it:
//! - a `set` naming a peer it already has panics ("Modifying existing peers
//!   is not yet supported"), killing the device's event loop;
//! - inside one `set`, a peer section inherits `remove`, `endpoint`,
//!   `persistent_keepalive_interval` and `replace_allowed_ips` from the
//!   section before it, so a removal followed by an addition removes twice.
//!
//! So every peer section becomes a `set` of its own, and a change to an
//! existing peer becomes its merged configuration, removed and added back
//! (its session is renegotiated). A section that changes nothing is
//! dropped, so an idempotent `set` keeps sessions. Requests are bounded
//! and validated field by field; anything else is refused with an errno,
//! never passed on.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// `EINVAL` and `EPROTO`, as UAPI replies name them.
pub const EINVAL: i32 = 22;
pub const EPROTO: i32 = 71;

/// A request larger than this is refused (a full mesh of 5,000 peers with
/// four prefixes each is about 1.5 MB).
pub const MAX_REQUEST: usize = 16 << 20;

/// One peer's configuration as the device reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerConfig {
    pub endpoint: Option<String>,
    pub keepalive: Option<u16>,
    pub preshared_key: Option<String>,
    /// In the order the device reports them, without duplicates.
    pub allowed_ips: Vec<String>,
}

/// The peers of a `get` reply, by hex public key.
pub fn parse_get(reply: &str) -> Result<BTreeMap<String, PeerConfig>, i32> {
    let mut peers = BTreeMap::new();
    let mut current: Option<(String, PeerConfig)> = None;
    for line in reply.lines().filter(|l| !l.is_empty()) {
        let (key, value) = line.split_once('=').ok_or(EPROTO)?;
        match key {
            "public_key" => {
                let hex = hex_key(value)?;
                if let Some((k, p)) = current.replace((hex, PeerConfig::default())) {
                    peers.insert(k, p);
                }
            }
            "errno" => {
                let errno: i32 = value.parse().map_err(|_| EPROTO)?;
                if errno != 0 {
                    return Err(errno);
                }
            }
            _ => {
                if let Some((_, p)) = current.as_mut() {
                    match key {
                        "endpoint" => p.endpoint = Some(value.to_string()),
                        "persistent_keepalive_interval" => {
                            p.keepalive = Some(value.parse().map_err(|_| EPROTO)?)
                        }
                        "preshared_key" => p.preshared_key = Some(hex_key(value)?),
                        "allowed_ip" => push_unique(&mut p.allowed_ips, value),
                        _ => {}
                    }
                }
            }
        }
    }
    if let Some((k, p)) = current {
        peers.insert(k, p);
    }
    Ok(peers)
}

fn push_unique(list: &mut Vec<String>, value: &str) {
    if !list.iter().any(|v| v == value) {
        list.push(value.to_string());
    }
}

/// A 32-byte key in hex, lower-cased; `EINVAL` otherwise.
fn hex_key(value: &str) -> Result<String, i32> {
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(EINVAL)
    }
}

/// One peer section of a `set` request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Section {
    key: String,
    remove: bool,
    update_only: bool,
    replace_allowed_ips: bool,
    endpoint: Option<String>,
    keepalive: Option<u16>,
    preshared_key: Option<String>,
    allowed_ips: Vec<String>,
}

/// A parsed `set` request: device lines as given, then peer sections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SetRequest {
    device: Vec<String>,
    replace_peers: bool,
    private_key: Option<String>,
    sections: Vec<Section>,
}

fn parse_set(request: &str) -> Result<SetRequest, i32> {
    let mut lines = request.lines();
    if lines.next() != Some("set=1") {
        return Err(EPROTO);
    }
    let mut set = SetRequest::default();
    for line in lines.take_while(|l| !l.is_empty()) {
        let (key, value) = line.split_once('=').ok_or(EPROTO)?;
        let bool_value = || match value {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(EINVAL),
        };
        if key == "public_key" {
            set.sections.push(Section {
                key: hex_key(value)?,
                ..Section::default()
            });
            continue;
        }
        let Some(section) = set.sections.last_mut() else {
            match key {
                "private_key" => {
                    set.private_key = Some(hex_key(value)?);
                    set.device.push(line.to_string());
                }
                "listen_port" => {
                    value.parse::<u16>().map_err(|_| EINVAL)?;
                    set.device.push(line.to_string());
                }
                "fwmark" => {
                    value.parse::<u32>().map_err(|_| EINVAL)?;
                    set.device.push(line.to_string());
                }
                "replace_peers" => set.replace_peers = bool_value()?,
                _ => return Err(EINVAL),
            }
            continue;
        };
        match key {
            "remove" => section.remove = bool_value()?,
            "update_only" => section.update_only = bool_value()?,
            "replace_allowed_ips" => section.replace_allowed_ips = bool_value()?,
            "endpoint" => {
                value.parse::<std::net::SocketAddr>().map_err(|_| EINVAL)?;
                section.endpoint = Some(value.to_string());
            }
            "persistent_keepalive_interval" => {
                section.keepalive = Some(value.parse().map_err(|_| EINVAL)?)
            }
            "preshared_key" => section.preshared_key = Some(hex_key(value)?),
            "allowed_ip" => {
                value.parse::<ipnet::IpNet>().map_err(|_| EINVAL)?;
                push_unique(&mut section.allowed_ips, value);
            }
            "protocol_version" if value == "1" => {}
            _ => return Err(EINVAL),
        }
    }
    Ok(set)
}

/// What the relay sends to boringtun for one client `set`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Each a complete `set=1` request, to send in order; stop at the first
    /// failure.
    pub requests: Vec<String>,
    /// The private key the request sets, if any (`get` replies report it).
    pub private_key: Option<String>,
}

/// Translates a client's `set` into requests boringtun carries out with
/// the standard meaning, given its current peers.
pub fn plan_set(request: &str, mut peers: BTreeMap<String, PeerConfig>) -> Result<Plan, i32> {
    if request.len() > MAX_REQUEST {
        return Err(EINVAL);
    }
    let set = parse_set(request)?;
    let mut requests = Vec::new();
    if !set.device.is_empty() || set.replace_peers {
        let mut r = String::from("set=1\n");
        for line in &set.device {
            r.push_str(line);
            r.push('\n');
        }
        if set.replace_peers {
            r.push_str("replace_peers=true\n");
            peers.clear();
        }
        r.push('\n');
        requests.push(r);
    }
    for section in set.sections {
        if section.remove {
            if peers.remove(&section.key).is_some() {
                requests.push(format!(
                    "set=1\npublic_key={}\nremove=true\n\n",
                    section.key
                ));
            }
            continue;
        }
        let wanted = match peers.get(&section.key) {
            Some(have) => merge(have, &section),
            None if section.update_only => continue,
            None => merge(&PeerConfig::default(), &section),
        };
        let existing = peers.get(&section.key);
        if existing == Some(&wanted) {
            continue;
        }
        if existing.is_some() {
            requests.push(format!(
                "set=1\npublic_key={}\nremove=true\n\n",
                section.key
            ));
        }
        requests.push(add(&section.key, &wanted));
        peers.insert(section.key, wanted);
    }
    Ok(Plan {
        requests,
        private_key: set.private_key,
    })
}

/// `have` with the section's changes: the protocol's meaning of a `set`
/// for an existing peer.
fn merge(have: &PeerConfig, section: &Section) -> PeerConfig {
    let mut allowed_ips = if section.replace_allowed_ips {
        Vec::new()
    } else {
        have.allowed_ips.clone()
    };
    for ip in &section.allowed_ips {
        push_unique(&mut allowed_ips, ip);
    }
    PeerConfig {
        endpoint: section.endpoint.clone().or_else(|| have.endpoint.clone()),
        // 0 turns keepalives off; the device reports none then.
        keepalive: section.keepalive.or(have.keepalive).filter(|k| *k > 0),
        preshared_key: section
            .preshared_key
            .clone()
            .or_else(|| have.preshared_key.clone())
            .filter(|k| k.bytes().any(|b| b != b'0')),
        allowed_ips,
    }
}

fn add(key: &str, p: &PeerConfig) -> String {
    let mut r = format!("set=1\npublic_key={key}\n");
    if let Some(e) = &p.endpoint {
        let _ = writeln!(r, "endpoint={e}");
    }
    if let Some(k) = p.keepalive {
        let _ = writeln!(r, "persistent_keepalive_interval={k}");
    }
    if let Some(k) = &p.preshared_key {
        let _ = writeln!(r, "preshared_key={k}");
    }
    for ip in &p.allowed_ips {
        let _ = writeln!(r, "allowed_ip={ip}");
    }
    r.push('\n');
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn peer(endpoint: &str, keepalive: Option<u16>, ips: &[&str]) -> PeerConfig {
        PeerConfig {
            endpoint: Some(endpoint.into()),
            keepalive,
            preshared_key: None,
            allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn get_replies_parse_into_peers() {
        let reply = format!(
            "private_key={a}\nlisten_port=51820\npublic_key={b}\npersistent_keepalive_interval=5\n\
             endpoint=198.18.1.2:51820\nallowed_ip=198.19.2.0/24\nallowed_ip=198.18.128.2/32\n\
             rx_bytes=1\ntx_bytes=2\npublic_key={c}\nendpoint=[fd00::1]:1\nerrno=0\n\n",
            a = key('a'),
            b = key('b'),
            c = key('c')
        );
        let peers = parse_get(&reply).unwrap();
        assert_eq!(
            peers[&key('b')],
            peer(
                "198.18.1.2:51820",
                Some(5),
                &["198.19.2.0/24", "198.18.128.2/32"]
            )
        );
        assert_eq!(peers[&key('c')].endpoint.as_deref(), Some("[fd00::1]:1"));
        assert_eq!(parse_get("errno=5\n\n"), Err(5));
        assert_eq!(parse_get("public_key=zz\n"), Err(EINVAL));
        assert_eq!(parse_get("garbage\n"), Err(EPROTO));
    }

    /// The table: (client request, device peers before) → requests sent.
    #[test]
    fn sets_become_requests_boringtun_can_carry_out() {
        let (b, c) = (key('b'), key('c'));
        let existing = BTreeMap::from([(
            b.clone(),
            peer("198.18.1.2:51820", Some(5), &["198.19.2.0/24"]),
        )]);
        let cases: Vec<(String, Vec<String>)> = vec![
            // A new peer: one request of its own.
            (
                format!("set=1\npublic_key={c}\nendpoint=198.18.1.3:51820\nallowed_ip=198.19.3.0/24\n\n"),
                vec![format!("set=1\npublic_key={c}\nendpoint=198.18.1.3:51820\nallowed_ip=198.19.3.0/24\n\n")],
            ),
            // An endpoint change: merged, removed and added back.
            (
                format!("set=1\npublic_key={b}\nendpoint=198.18.1.9:51821\n\n"),
                vec![
                    format!("set=1\npublic_key={b}\nremove=true\n\n"),
                    format!("set=1\npublic_key={b}\nendpoint=198.18.1.9:51821\npersistent_keepalive_interval=5\nallowed_ip=198.19.2.0/24\n\n"),
                ],
            ),
            // Allowed IPs replaced, keepalive turned off.
            (
                format!("set=1\npublic_key={b}\npersistent_keepalive_interval=0\nreplace_allowed_ips=true\nallowed_ip=198.19.9.0/24\n\n"),
                vec![
                    format!("set=1\npublic_key={b}\nremove=true\n\n"),
                    format!("set=1\npublic_key={b}\nendpoint=198.18.1.2:51820\nallowed_ip=198.19.9.0/24\n\n"),
                ],
            ),
            // The same configuration again: nothing sent, the session stays.
            (
                format!("set=1\npublic_key={b}\nendpoint=198.18.1.2:51820\npersistent_keepalive_interval=5\nreplace_allowed_ips=true\nallowed_ip=198.19.2.0/24\n\n"),
                vec![],
            ),
            // Removal, then a new peer: the removal cannot leak into it.
            (
                format!("set=1\npublic_key={b}\nremove=true\npublic_key={c}\nendpoint=198.18.1.3:51820\n\n"),
                vec![
                    format!("set=1\npublic_key={b}\nremove=true\n\n"),
                    format!("set=1\npublic_key={c}\nendpoint=198.18.1.3:51820\n\n"),
                ],
            ),
            // Device fields go first, alone; update_only skips unknown peers.
            (
                format!("set=1\nprivate_key={c}\nlisten_port=51820\npublic_key={c}\nupdate_only=true\nendpoint=198.18.1.3:1\n\n"),
                vec![format!("set=1\nprivate_key={c}\nlisten_port=51820\n\n")],
            ),
            // replace_peers: every section after it is a new peer.
            (
                format!("set=1\nreplace_peers=true\npublic_key={b}\nendpoint=198.18.1.2:51820\n\n"),
                vec![
                    "set=1\nreplace_peers=true\n\n".to_string(),
                    format!("set=1\npublic_key={b}\nendpoint=198.18.1.2:51820\n\n"),
                ],
            ),
        ];
        for (request, want) in cases {
            let plan = plan_set(&request, existing.clone()).unwrap();
            assert_eq!(plan.requests, want, "for {request:?}");
        }
    }

    #[test]
    fn malformed_sets_are_refused_not_passed_on() {
        let b = key('b');
        for bad in [
            "get=1\n\n".to_string(),
            "set=1\nlisten_port=70000\n\n".to_string(),
            "set=1\nendpoint=1.2.3.4:5\n\n".to_string(),
            format!("set=1\npublic_key={b}\nendpoint=nowhere\n\n"),
            format!("set=1\npublic_key={b}\nallowed_ip=10.0.0.0/33\n\n"),
            format!("set=1\npublic_key={b}\nremove=maybe\n\n"),
            format!("set=1\npublic_key={b}\nprotocol_version=2\n\n"),
            "set=1\npublic_key=abc\n\n".to_string(),
            "set=1\nnonsense\n\n".to_string(),
        ] {
            assert!(plan_set(&bad, BTreeMap::new()).is_err(), "{bad:?}");
        }
        let private = plan_set(
            &format!("set=1\nprivate_key={}\n\n", key('A')),
            BTreeMap::new(),
        );
        assert_eq!(private.unwrap().private_key, Some(key('a')));
    }
}
