//! NAT traversal from what the cluster already has: the API for signalling
//! and every node's data plane as an observer.
//!
//! - A node's peers publish where they hear it from when that is not an
//!   address it publishes itself ([`crate::annotations::OBSERVED`]): for a
//!   node behind NAT, the address:port its NAT maps it to.
//! - The node reads those observations about itself ([`observations_of`])
//!   and learns that it is behind NAT, how its NAT maps, and where it is
//!   seen ([`mapping`]); it then publishes no endpoint but that mapping
//!   ([`crate::annotations::NAT`]) and its own addresses
//!   ([`crate::annotations::CANDIDATES`]).
//! - Each pair picks the address to send to from both ends' claims alone
//!   ([`reach`]), so both ends agree: a public peer's endpoint; nothing for
//!   a NAT'd peer of a public node (it starts the session and is answered
//!   where it came from); the peer's own address behind the same NAT; its
//!   mapped address when both NATs map endpoint-independently — both ends
//!   then send at once, each opening its NAT for the other (WireGuard
//!   retries its handshake until both have); else nothing, and the pair
//!   goes through a relay.
//!
//! Everything here is a claim: a lying observer or node can only make a
//! pair try an address where no handshake completes (then it relays), never
//! draw traffic: WireGuard sends only to a peer's key, and a session needs
//! its private key.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use crate::annotations::{Claim, NatKind, NatMapping};
use crate::model::NodeInfo;

/// Where the public nodes (those with an endpoint) hear `me` from. Only
/// they vote: a NAT'd node's view of another repeats what it was told (the
/// address it was given to punch to), and would keep a renumbered NAT's
/// old address alive.
pub fn observations_of<'a>(
    me: &str,
    claims: impl IntoIterator<Item = &'a Claim>,
) -> Vec<SocketAddr> {
    claims
        .into_iter()
        .filter(|c| c.endpoint.is_some())
        .filter_map(|c| c.observed.get(me).copied())
        .collect()
}

/// A peer as its observers judge where it is heard: its claim and its
/// Node, whose status lists its own addresses.
#[derive(Debug, Clone, Copy)]
pub struct Listed<'a> {
    pub claim: &'a Claim,
    pub node: &'a NodeInfo,
}

/// Whether a peer heard at `at` is worth publishing as seen there: it
/// publishes no such address itself, and its Node lists no such IP (a
/// node of an older release publishes no candidates: heard at its
/// ExternalIP, it is not behind NAT).
pub fn worth_observing(at: SocketAddr, peer: Listed) -> bool {
    let listed = peer.node.internal_ips.iter().chain(&peer.node.external_ips);
    peer.claim.endpoint != Some(at)
        && !peer.claim.candidates.contains(&at)
        && !listed.into_iter().any(|ip| *ip == at.ip())
}

/// How many observers must agree before a node's NAT is believed: one
/// observer, which may be the attacker, can neither put a node behind NAT
/// nor choose the address it is sent to.
pub const QUORUM: usize = 2;

/// A node's NAT from where the public nodes see it: the foreign address
/// (not one of `own`) at least [`QUORUM`] observers report at one IP, the
/// IP most report (ties: none believed). At that IP, a port [`QUORUM`]
/// observers agree on and more report than any other is an
/// endpoint-independent mapping; ports that no quorum agrees on are a port
/// per peer. `None`: not behind NAT as far as a quorum can tell.
pub fn mapping(observations: &[SocketAddr], own: &[IpAddr]) -> Option<NatMapping> {
    let mut by_ip: BTreeMap<IpAddr, BTreeMap<u16, usize>> = BTreeMap::new();
    for o in observations.iter().filter(|o| !own.contains(&o.ip())) {
        *by_ip
            .entry(o.ip())
            .or_default()
            .entry(o.port())
            .or_default() += 1;
    }
    let votes = |ports: &BTreeMap<u16, usize>| ports.values().sum::<usize>();
    let most = by_ip.values().map(votes).max()?;
    let mut top = by_ip.iter().filter(|(_, ports)| votes(ports) == most);
    let (ip, ports) = top.next()?;
    if most < QUORUM || top.next().is_some() {
        return None;
    }
    let best = ports.values().copied().max().unwrap_or(0);
    let mut at_best = ports.iter().filter(|(_, n)| **n == best);
    let (port, _) = at_best.next()?;
    let kind = if best >= QUORUM && at_best.next().is_none() {
        NatKind::Eim
    } else {
        NatKind::Symmetric
    };
    Some(NatMapping {
        kind,
        reflexive: SocketAddr::new(*ip, *port),
    })
}

/// How a node reaches a peer directly, if it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// To the endpoint the peer publishes.
    Endpoint(SocketAddr),
    /// To another address the peer listens at: its own address in a
    /// shared region, or where it answers when its endpoint does not.
    Candidate(SocketAddr),
    /// The peer is behind NAT and this node is not: the peer starts the
    /// session and is answered where it comes from.
    Answered,
    /// Both behind the same NAT: to the peer's own address.
    SameSite(SocketAddr),
    /// Both behind NATs that map endpoint-independently: to the peer's
    /// mapped address, both ends sending at once.
    HolePunched(SocketAddr),
    /// No direct link is possible: through a relay.
    Relayed(Why),
}

/// Why a pair cannot meet directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// One of the NATs gives each peer its own port.
    SymmetricNat,
    /// One of them has not learnt its NAT's mapping (no observation yet).
    UnknownMapping,
    /// Behind the same NAT, but the peer publishes no address of its own.
    NoLocalAddress,
}

impl std::fmt::Display for Reach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reach::Endpoint(a) => write!(f, "endpoint {a}"),
            Reach::Candidate(a) => write!(f, "candidate {a}"),
            Reach::Answered => write!(f, "answered where it comes from (behind NAT)"),
            Reach::SameSite(a) => write!(f, "same site {a}"),
            Reach::HolePunched(a) => write!(f, "hole-punched {a}"),
            Reach::Relayed(Why::SymmetricNat) => write!(f, "no direct link: symmetric NAT"),
            Reach::Relayed(Why::UnknownMapping) => {
                write!(f, "no direct link: a NAT's mapping not learnt yet")
            }
            Reach::Relayed(Why::NoLocalAddress) => {
                write!(
                    f,
                    "no direct link: behind one NAT, an end without an own address"
                )
            }
        }
    }
}

impl Reach {
    /// What the data plane is given as the peer's endpoint.
    pub fn endpoint(self) -> Option<SocketAddr> {
        match self {
            Reach::Endpoint(a)
            | Reach::Candidate(a)
            | Reach::SameSite(a)
            | Reach::HolePunched(a) => Some(a),
            Reach::Answered | Reach::Relayed(_) => None,
        }
    }
}

/// The pairs of nodes behind NAT that cannot meet directly because a NAT
/// gives each peer a port of its own (on evidence no one observer can make
/// up, [`Sighting::symmetric`]): down links from the start, computed alike
/// by every node, so that they go through a relay at once instead of after
/// a timeout's silence. A pair that only lacks knowledge (a mapping not
/// learnt, observers gone) is left to liveness: a session WireGuard
/// already has keeps working, with the endpoints it learnt.
pub fn relayed_pairs<'a>(
    claims: &BTreeMap<&'a str, &'a Claim>,
    sightings: &BTreeMap<&'a str, Sighting>,
) -> Vec<(&'a str, &'a str)> {
    let natd: Vec<(&'a str, End<'_>)> = claims
        .iter()
        .filter(|(_, c)| c.endpoint.is_none())
        .map(|(&name, &claim)| {
            let end = End {
                claim,
                seen: sightings.get(name),
                region: None,
            };
            (name, end)
        })
        .collect();
    // Only a pair with a symmetric end relays from the start: pairs are
    // looked at from those ends (few, where NATs are mostly kind), not
    // all NAT'd pairs.
    let symmetric = |e: &End| e.seen.is_some_and(|s| s.symmetric);
    let mut pairs = Vec::new();
    for (a, end_a) in natd.iter().filter(|(_, e)| symmetric(e)) {
        for (b, end_b) in &natd {
            // A pair of two symmetric ends once, in name order.
            let once = !symmetric(end_b) || a < b;
            if a != b && once && way(Some(*end_a), *end_b) == Reach::Relayed(Why::SymmetricNat) {
                pairs.push(if a < b { (*a, *b) } else { (*b, *a) });
            }
        }
    }
    pairs.sort_unstable();
    pairs
}

/// How the public nodes see a NAT'd node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sighting {
    /// What a quorum of them agrees on ([`mapping`]).
    pub mapping: Option<NatMapping>,
    /// Its NAT gives each peer a port of its own, on evidence that no one
    /// observer can make up ([`robustly_symmetric`]).
    pub symmetric: bool,
    /// Every address it is seen at, by most observers first.
    pub seen_at: Vec<SocketAddr>,
}

impl Sighting {
    /// From `observations` of a node whose own addresses are `own`.
    pub fn of(observations: &[SocketAddr], own: &[IpAddr]) -> Self {
        let foreign: Vec<SocketAddr> = observations
            .iter()
            .filter(|o| !own.contains(&o.ip()))
            .copied()
            .collect();
        let mapping = mapping(&foreign, &[]);
        let mut votes: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        for o in &foreign {
            *votes.entry(*o).or_default() += 1;
        }
        let mut seen_at: Vec<SocketAddr> = votes.keys().copied().collect();
        seen_at.sort_by_key(|a| std::cmp::Reverse(votes[a]));
        let symmetric = mapping.is_some_and(|m| {
            let at_ip: Vec<SocketAddr> = foreign
                .iter()
                .filter(|o| o.ip() == m.reflexive.ip())
                .copied()
                .collect();
            m.kind == NatKind::Symmetric && robustly_symmetric(&at_ip)
        });
        Sighting {
            mapping,
            symmetric,
            seen_at,
        }
    }
}

/// Whether observations at one IP still show two ports after any one of
/// them is taken away: one lying observer cannot make a mapping look
/// symmetric (its one vote for another port leaves the honest ones in
/// agreement).
fn robustly_symmetric(at_ip: &[SocketAddr]) -> bool {
    let mut ports: BTreeMap<u16, usize> = BTreeMap::new();
    for o in at_ip {
        *ports.entry(o.port()).or_default() += 1;
    }
    match ports.len() {
        0 | 1 => false,
        2 => ports.values().all(|n| *n >= 2),
        _ => true,
    }
}

/// Each NAT'd node's sighting (nodes without an endpoint) from where the
/// public nodes see it now ([`observations_of`]) — not from what it last
/// published about itself: a node whose NAT changed its address may not
/// reach the API for a while (its connections went with the old address),
/// while its peers see the new one at its next keepalive. Every node
/// computes the same from the same claims.
pub fn sightings<'a>(claims: &BTreeMap<&'a str, &'a Claim>) -> BTreeMap<&'a str, Sighting> {
    // Observations grouped by whom they see, in one pass over them all.
    let mut seen: BTreeMap<&str, Vec<SocketAddr>> = BTreeMap::new();
    for claim in claims.values().filter(|c| c.endpoint.is_some()) {
        for (name, at) in claim.observed.iter() {
            seen.entry(name.as_str()).or_default().push(*at);
        }
    }
    seen.into_iter()
        .filter_map(|(name, observations)| {
            let (&name, claim) = claims.get_key_value(name)?;
            if claim.endpoint.is_some() {
                return None;
            }
            let own: Vec<IpAddr> = claim.candidates.iter().map(SocketAddr::ip).collect();
            Some((name, Sighting::of(&observations, &own)))
        })
        .collect()
}

/// A node as a pair's end: its claim, how it is seen behind NAT
/// ([`sightings`]) and its region (`topology.kubernetes.io/region`).
#[derive(Debug, Clone, Copy)]
pub struct End<'a> {
    pub claim: &'a Claim,
    pub seen: Option<&'a Sighting>,
    pub region: Option<&'a str>,
}

impl End<'_> {
    /// Both labelled with one region: a cloud region's private network is
    /// nearer, cheaper and often the only way between its nodes.
    fn near(&self, other: &End) -> bool {
        self.region.is_some() && self.region == other.region
    }
}

/// How `me` reaches `peer` (`me`: `None` before this node's own claim is
/// accepted), having given up on the peer's addresses in `given_up` (see
/// [`crate::ladder`]): at the best of [`offers`] not given up (all given
/// up: the best). Symmetric: `reach(a, b)` and `reach(b, a)` agree on
/// whether the pair meets directly.
pub fn reach(me: Option<End>, peer: End, given_up: &BTreeSet<SocketAddr>) -> Reach {
    let way = way(me, peer);
    let offers = offers_for(way, me, peer);
    let Some(&at) = offers
        .iter()
        .find(|a| !given_up.contains(a))
        .or(offers.first())
    else {
        return way;
    };
    match way {
        Reach::Endpoint(e) if e == at => way,
        Reach::Endpoint(_) | Reach::Candidate(_) => Reach::Candidate(at),
        Reach::SameSite(_) => Reach::SameSite(at),
        Reach::HolePunched(_) => Reach::HolePunched(at),
        Reach::Answered | Reach::Relayed(_) => way,
    }
}

/// The addresses `me` may send `peer` to, best first; empty when it sends
/// to none (the peer starts the session, or the pair relays). A public
/// peer: its endpoint, then its other addresses — those first in a shared
/// region; behind the same NAT: its own addresses; behind another NAT that
/// maps endpoint-independently: where its NAT maps it.
pub fn offers(me: Option<End>, peer: End) -> Vec<SocketAddr> {
    offers_for(way(me, peer), me, peer)
}

fn offers_for(way: Reach, me: Option<End>, peer: End) -> Vec<SocketAddr> {
    let own = peer.claim.candidates.iter().copied();
    let mut offers: Vec<SocketAddr> = match way {
        Reach::Endpoint(e) if me.is_some_and(|m| m.near(&peer)) => own.chain([e]).collect(),
        Reach::Endpoint(e) => [e].into_iter().chain(own).collect(),
        Reach::SameSite(_) => own.collect(),
        // Where a quorum sees it first, then wherever anyone does.
        Reach::HolePunched(a) => {
            let seen_at = peer.seen.map_or(&[][..], |s| &s.seen_at[..]);
            [a].into_iter().chain(seen_at.iter().copied()).collect()
        }
        Reach::Candidate(_) | Reach::Answered | Reach::Relayed(_) => Vec::new(),
    };
    let mut seen = BTreeSet::new();
    offers.retain(|a| seen.insert(*a));
    offers
}

/// Which way the pair goes, from both ends' claims alone, at its best
/// address.
fn way(me: Option<End>, peer: End) -> Reach {
    if let Some(endpoint) = peer.claim.endpoint {
        return Reach::Endpoint(endpoint);
    }
    let Some(me) = me.filter(|m| m.claim.endpoint.is_none()) else {
        return Reach::Answered;
    };
    let mapped = |e: &End| e.seen.and_then(|s| s.mapping);
    if let (Some(m), Some(t)) = (mapped(&me), mapped(&peer)) {
        if m.reflexive.ip() == t.reflexive.ip() {
            // Both need an own address, or the ends would disagree.
            return match (me.claim.candidates.first(), peer.claim.candidates.first()) {
                (Some(_), Some(own)) => Reach::SameSite(*own),
                _ => Reach::Relayed(Why::NoLocalAddress),
            };
        }
    }
    let symmetric = |e: &End| e.seen.is_some_and(|s| s.symmetric);
    if symmetric(&me) || symmetric(&peer) {
        return Reach::Relayed(Why::SymmetricNat);
    }
    if let (Some(m), Some(t)) = (mapped(&me), mapped(&peer)) {
        if m.kind == NatKind::Eim && t.kind == NatKind::Eim {
            return Reach::HolePunched(t.reflexive);
        }
    }
    // No quorum on a mapping (perhaps one observer lies or keeps quiet):
    // try where each is seen rather than relay; an address that is not
    // the peer's gets no authenticated answer and is given up.
    let seen_at = |e: &End| e.seen.and_then(|s| s.seen_at.first().copied());
    match (seen_at(&me), seen_at(&peer)) {
        (Some(_), Some(at)) => Reach::HolePunched(at),
        _ => Reach::Relayed(Why::UnknownMapping),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::fixtures;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_node_learns_its_nat_from_a_quorum_of_public_observers() {
        let own: Vec<IpAddr> = vec!["10.0.0.4".parse().unwrap()];
        let eim = |a: &str| {
            Some(NatMapping {
                kind: NatKind::Eim,
                reflexive: addr(a),
            })
        };
        let symmetric = |a: &str| {
            Some(NatMapping {
                kind: NatKind::Symmetric,
                reflexive: addr(a),
            })
        };
        for (observations, want) in [
            (&[][..], None),
            // Seen at its own address: not behind NAT.
            (&["10.0.0.4:51820", "10.0.0.4:51820"][..], None),
            // One observer (perhaps the attacker) is no quorum.
            (&["203.0.113.1:51820"], None),
            (&["203.0.113.1:51820", "10.0.0.4:51820"], None),
            (
                &["203.0.113.1:40001", "203.0.113.1:40001", "10.0.0.4:51820"],
                eim("203.0.113.1:40001"),
            ),
            // A port per observer: symmetric, at the lowest port seen.
            (
                &["203.0.113.1:40002", "203.0.113.1:40001"],
                symmetric("203.0.113.1:40001"),
            ),
            // One liar's port does not make a mapping symmetric...
            (
                &["203.0.113.1:40001", "203.0.113.1:40001", "203.0.113.1:9"],
                eim("203.0.113.1:40001"),
            ),
            // ...nor its address move where the node is sent to.
            (
                &["203.0.113.1:40001", "198.51.100.9:1", "203.0.113.1:40001"],
                eim("203.0.113.1:40001"),
            ),
            // Two IPs with as many votes: nothing believed.
            (
                &[
                    "203.0.113.1:1",
                    "203.0.113.1:1",
                    "198.51.100.9:1",
                    "198.51.100.9:1",
                ],
                None,
            ),
        ] {
            let observations: Vec<SocketAddr> = observations.iter().map(|a| addr(a)).collect();
            assert_eq!(mapping(&observations, &own), want, "{observations:?}");
        }
    }

    /// A claim with an endpoint, or behind a NAT mapping it to `mapped`.
    fn claim(endpoint: Option<&str>, nat: Option<(NatKind, &str)>, candidates: &[&str]) -> Claim {
        let (node, _) = fixtures::published(1);
        let mut c = fixtures::claim(&node, 1, 1, "198.19.1.0/24".parse().unwrap());
        c.endpoint = endpoint.map(addr);
        c.nat = nat.map(|(kind, a)| NatMapping {
            kind,
            reflexive: addr(a),
        });
        c.candidates = candidates.iter().map(|a| addr(a)).collect();
        c
    }

    #[test]
    fn every_pair_picks_the_same_way_from_both_ends() {
        use NatKind::{Eim, Symmetric};
        let public = claim(Some("198.51.100.1:51820"), None, &[]);
        let site_a1 = claim(None, Some((Eim, "203.0.113.1:51820")), &["10.0.0.1:51820"]);
        let site_a2 = claim(None, Some((Eim, "203.0.113.1:40002")), &["10.0.0.2:51820"]);
        let site_b = claim(None, Some((Eim, "203.0.113.2:51820")), &["10.0.0.1:51820"]);
        let symmetric = claim(
            None,
            Some((Symmetric, "203.0.113.3:1234")),
            &["10.9.0.1:51820"],
        );
        let unknown = claim(None, None, &["10.8.0.1:51820"]);
        // Behind site A's NAT without an own address to give (an admin's
        // `none` on a node without a usable InternalIP).
        let site_a3 = claim(None, Some((Eim, "203.0.113.1:40003")), &[]);
        let cases = [
            (&public, &site_a1, Reach::Answered),
            (
                &site_a1,
                &public,
                Reach::Endpoint(addr("198.51.100.1:51820")),
            ),
            (&site_a1, &site_a2, Reach::SameSite(addr("10.0.0.2:51820"))),
            (&site_a2, &site_a1, Reach::SameSite(addr("10.0.0.1:51820"))),
            (
                &site_a1,
                &site_b,
                Reach::HolePunched(addr("203.0.113.2:51820")),
            ),
            (
                &site_b,
                &site_a1,
                Reach::HolePunched(addr("203.0.113.1:51820")),
            ),
            (&site_a1, &symmetric, Reach::Relayed(Why::SymmetricNat)),
            (&symmetric, &site_a1, Reach::Relayed(Why::SymmetricNat)),
            (&site_a1, &unknown, Reach::Relayed(Why::UnknownMapping)),
            (&site_a1, &site_a3, Reach::Relayed(Why::NoLocalAddress)),
            (&site_a3, &site_a1, Reach::Relayed(Why::NoLocalAddress)),
            (&unknown, &site_a1, Reach::Relayed(Why::UnknownMapping)),
        ];
        let none = BTreeSet::new();
        for (me, peer, want) in cases {
            assert_eq!(reach(Some(end(me)), end(peer), &none), want);
            // Direct from one end exactly when direct from the other.
            let back = reach(Some(end(peer)), end(me), &none);
            assert_eq!(
                matches!(want, Reach::Relayed(_)),
                matches!(back, Reach::Relayed(_)),
                "{want:?} one way, {back:?} the other"
            );
        }
        assert_eq!(
            reach(None, end(&site_a1), &none),
            Reach::Answered,
            "before our own claim"
        );
        // The pairs that relay, as every node computes them.
        let claims = BTreeMap::from([
            ("public", &public),
            ("site-a1", &site_a1),
            ("site-b", &site_b),
            ("symmetric", &symmetric),
            ("unknown", &unknown),
        ]);
        let sightings = claims
            .iter()
            .filter_map(|(n, c)| Some((*n, sighting_of(c)?)))
            .collect();
        assert_eq!(
            relayed_pairs(&claims, &sightings),
            [
                ("site-a1", "symmetric"),
                ("site-b", "symmetric"),
                ("symmetric", "unknown"),
            ],
            "a mapping not learnt is no reason to cut a pair off"
        );
    }

    /// How a claim's own NAT annotation would be seen by a quorum.
    fn sighting_of(c: &Claim) -> Option<Sighting> {
        c.nat.map(|m| Sighting {
            mapping: Some(m),
            symmetric: m.kind == NatKind::Symmetric,
            seen_at: vec![m.reflexive],
        })
    }

    fn end(c: &Claim) -> End<'_> {
        End {
            claim: c,
            seen: sighting_of(c).map(|s| &*Box::leak(Box::new(s))),
            region: None,
        }
    }

    /// A public node in region `region` with an endpoint and own addresses.
    fn public_in<'a>(c: &'a Claim, region: &'a str) -> End<'a> {
        End {
            region: Some(region),
            ..end(c)
        }
    }

    #[test]
    fn each_pair_tries_the_best_address_first_and_falls_back_in_order() {
        // Cloud nodes: a public endpoint (ExternalIP) and a private address.
        let a = claim(
            Some("198.51.100.1:51820"),
            None,
            &["10.0.0.1:51820", "192.0.2.1:51820"],
        );
        let b = claim(Some("198.51.100.2:51820"), None, &["10.0.0.2:51820"]);
        let given = |addrs: &[&str]| addrs.iter().map(|a| addr(a)).collect::<BTreeSet<_>>();
        let cases = [
            // In one region: the private address first.
            (
                public_in(&b, "r1"),
                public_in(&a, "r1"),
                &[][..],
                &["10.0.0.1:51820", "192.0.2.1:51820", "198.51.100.1:51820"][..],
                Reach::Candidate(addr("10.0.0.1:51820")),
            ),
            (
                public_in(&b, "r1"),
                public_in(&a, "r1"),
                &["10.0.0.1:51820", "192.0.2.1:51820"],
                &["10.0.0.1:51820", "192.0.2.1:51820", "198.51.100.1:51820"],
                Reach::Endpoint(addr("198.51.100.1:51820")),
            ),
            // Elsewhere (or unlabelled): the endpoint, then the others.
            (
                public_in(&b, "r2"),
                public_in(&a, "r1"),
                &[],
                &["198.51.100.1:51820", "10.0.0.1:51820", "192.0.2.1:51820"],
                Reach::Endpoint(addr("198.51.100.1:51820")),
            ),
            (
                end(&b),
                end(&a),
                &["198.51.100.1:51820"],
                &["198.51.100.1:51820", "10.0.0.1:51820", "192.0.2.1:51820"],
                Reach::Candidate(addr("10.0.0.1:51820")),
            ),
            // All given up: the best again (the ladder then starts over).
            (
                end(&b),
                end(&a),
                &["198.51.100.1:51820", "10.0.0.1:51820", "192.0.2.1:51820"],
                &["198.51.100.1:51820", "10.0.0.1:51820", "192.0.2.1:51820"],
                Reach::Endpoint(addr("198.51.100.1:51820")),
            ),
            // Addresses given up that it no longer has change nothing.
            (
                end(&a),
                end(&b),
                &["203.0.113.9:1"],
                &["198.51.100.2:51820", "10.0.0.2:51820"],
                Reach::Endpoint(addr("198.51.100.2:51820")),
            ),
        ];
        for (me, peer, given_up, want_offers, want) in cases {
            let want_offers: Vec<SocketAddr> = want_offers.iter().map(|a| addr(a)).collect();
            assert_eq!(offers(Some(me), peer), want_offers);
            assert_eq!(
                reach(Some(me), peer, &given(given_up)),
                want,
                "{given_up:?}"
            );
        }
        // Behind NAT: a public node answers, whatever its region.
        let natd = claim(None, None, &["10.0.0.3:51820"]);
        assert!(offers(Some(public_in(&a, "r1")), public_in(&natd, "r1")).is_empty());
    }

    /// A NAT'd node's mapping is where its peers see it now, whatever it
    /// last published; public nodes have none.
    #[test]
    fn sightings_come_from_the_observers_not_the_node() {
        let mut observer = claim(Some("198.51.100.1:51820"), None, &[]);
        let mut other = claim(Some("198.51.100.2:51820"), None, &[]);
        // It still publishes its NAT's old address.
        let moved = claim(
            None,
            Some((NatKind::Eim, "203.0.113.1:51820")),
            &["10.0.0.1:51820"],
        );
        let quiet = claim(None, None, &["10.0.0.9:51820"]);
        for c in [&mut observer, &mut other] {
            c.observed = std::sync::Arc::new(BTreeMap::from([(
                "moved".to_string(),
                addr("203.0.113.99:51820"),
            )]));
        }
        // A NAT'd peer still sees it at the old address: no vote.
        let mut punched = claim(None, Some((NatKind::Eim, "203.0.113.5:51820")), &[]);
        punched.observed = std::sync::Arc::new(BTreeMap::from([(
            "moved".to_string(),
            addr("203.0.113.1:51820"),
        )]));
        let claims = BTreeMap::from([
            ("observer", &observer),
            ("other", &other),
            ("moved", &moved),
            ("quiet", &quiet),
            ("punched", &punched),
        ]);
        let got = sightings(&claims);
        assert_eq!(
            got,
            BTreeMap::from([(
                "moved",
                Sighting {
                    mapping: Some(NatMapping {
                        kind: NatKind::Eim,
                        reflexive: addr("203.0.113.99:51820")
                    }),
                    symmetric: false,
                    seen_at: vec![addr("203.0.113.99:51820")],
                }
            )]),
            "public nodes and a NAT'd node nobody sees have none"
        );
    }

    /// With two public nodes, one of them lying (or keeping quiet), the
    /// honest one's view still lets two NAT'd nodes meet directly: a
    /// mapping the liar makes look symmetric, or keeps below the quorum, is
    /// tried at every address it is seen at; only symmetric evidence no one
    /// observer can make up relays a pair from the start.
    #[test]
    fn one_lying_observer_cannot_make_a_pair_relay() {
        let honest = |seen: &[(&str, &str)]| {
            let mut c = claim(Some("198.51.100.1:51820"), None, &[]);
            c.observed =
                std::sync::Arc::new(seen.iter().map(|(n, a)| (n.to_string(), addr(a))).collect());
            c
        };
        let n1 = claim(None, None, &["10.0.0.1:51820"]);
        let n2 = claim(None, None, &["10.0.1.1:51820"]);
        let truth = [("n1", "203.0.113.1:4000"), ("n2", "203.0.113.2:4000")];
        for lie in [
            // Another port for n1: looks symmetric on two votes.
            &[("n1", "203.0.113.1:4001"), ("n2", "203.0.113.2:4000")][..],
            // Quiet about n2: below the quorum.
            &[("n1", "203.0.113.1:4000")],
            // Its own address for both (a tie: perhaps tried first, and
            // given up when no authenticated answer comes).
            &[("n1", "198.51.100.2:1"), ("n2", "198.51.100.2:1")],
        ] {
            let h = honest(&truth);
            let mut liar = honest(lie);
            liar.endpoint = Some(addr("198.51.100.2:51820"));
            let claims = BTreeMap::from([("h", &h), ("liar", &liar), ("n1", &n1), ("n2", &n2)]);
            let seen = sightings(&claims);
            assert!(relayed_pairs(&claims, &seen).is_empty(), "{lie:?}");
            let end = |name: &str| End {
                claim: claims[name],
                seen: seen.get(name),
                region: None,
            };
            let got = reach(Some(end("n1")), end("n2"), &BTreeSet::new());
            assert!(matches!(got, Reach::HolePunched(_)), "{lie:?}: {got:?}");
            assert!(
                offers(Some(end("n1")), end("n2")).contains(&addr("203.0.113.2:4000")),
                "the honest view is among what is tried"
            );
        }
        // Two honest observers seeing n1 at two ports each is evidence.
        let h1 = honest(&[("n1", "203.0.113.1:4000"), ("n2", "203.0.113.2:4000")]);
        let h2 = honest(&[("n1", "203.0.113.1:4001"), ("n2", "203.0.113.2:4000")]);
        let h3 = honest(&[("n1", "203.0.113.1:4002"), ("n2", "203.0.113.2:4000")]);
        let claims = BTreeMap::from([
            ("h1", &h1),
            ("h2", &h2),
            ("h3", &h3),
            ("n1", &n1),
            ("n2", &n2),
        ]);
        let seen = sightings(&claims);
        assert_eq!(relayed_pairs(&claims, &seen), [("n1", "n2")]);
    }

    #[test]
    fn symmetric_only_on_evidence_that_survives_one_liar() {
        let at = |ports: &[u16]| -> Vec<SocketAddr> {
            ports
                .iter()
                .map(|p| SocketAddr::new("203.0.113.1".parse().unwrap(), *p))
                .collect()
        };
        for (ports, want) in [
            (&[][..], false),
            (&[1, 1][..], false),
            (&[1, 2], false),
            (&[1, 1, 2], false),
            (&[1, 2, 3], true),
            (&[1, 1, 2, 2], true),
        ] {
            assert_eq!(robustly_symmetric(&at(ports)), want, "{ports:?}");
        }
    }

    #[test]
    fn only_peers_heard_away_from_what_they_publish_are_observed() {
        let public = claim(Some("198.51.100.1:51820"), None, &[]);
        let natd = claim(None, None, &["10.0.0.1:51820"]);
        let (mut node, _) = fixtures::published(2);
        node.internal_ips = vec!["10.9.0.2".parse().unwrap()];
        node.external_ips = vec!["192.0.2.2".parse().unwrap()];
        let listed = |claim| Listed { claim, node: &node };
        assert!(!worth_observing(
            addr("198.51.100.1:51820"),
            listed(&public)
        ));
        assert!(worth_observing(addr("198.51.100.1:40000"), listed(&public)));
        assert!(!worth_observing(addr("10.0.0.1:51820"), listed(&natd)));
        assert!(worth_observing(addr("203.0.113.1:51820"), listed(&natd)));
        // Heard at an address its Node lists (an older release publishes
        // no candidates): not behind NAT.
        assert!(!worth_observing(addr("192.0.2.2:51820"), listed(&public)));
        assert!(!worth_observing(addr("10.9.0.2:1234"), listed(&natd)));
    }
}
