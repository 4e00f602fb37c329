//! Which way traffic between two accepted nodes goes: over their direct
//! link when it works, else through the one node with the cheapest pair of
//! working links to both.
//!
//! WireGuard's cryptokey routing puts every prefix on exactly one peer and
//! accepts a packet only from the peer whose allowed IPs hold its source.
//! So if A sends C's traffic through R, R must send A's traffic to A and
//! C must expect A's traffic from R: the path between two nodes must be the
//! same both ways and the same on every node. It is: a link works unless
//! either end reports the other unreachable (so a node's report can only
//! take away its own links); a direct link, when it works, is always
//! cheaper than a path through a relay (link costs are positive); and the
//! relay is the minimum of a function symmetric in its two ends, over data
//! every node holds, with no ties (node names are unique). A relay's own
//! paths to both ends are then direct, which is what its forwarding needs.
//!
//! One relay at most: with two or more, every node on a path would also
//! have to choose the same path to each end, which per-pair minima do not
//! guarantee. docs/routing.md has the argument.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use crate::model::{Hop, LinkCosts, Placement, Relay};

/// One node as path choice sees it.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    pub name: &'a str,
    pub placement: &'a Placement,
    /// The nodes it reports it cannot reach.
    pub unreachable: &'a BTreeSet<String>,
}

/// The accepted nodes and which of the links between them work.
#[derive(Debug)]
pub struct Links<'a> {
    members: Vec<Member<'a>>,
    index: FnvMap<&'a str, usize>,
    /// Each member's links either end reports down, sorted, packed:
    /// member i's are `down[offsets[i]..offsets[i + 1]]`. The whole link
    /// state in O(reported links), a link's state in O(log its node's).
    down: Vec<usize>,
    offsets: Vec<usize>,
    /// Each member's (region, zone), as small numbers: costs compare them
    /// millions of times.
    places: Vec<(Option<u32>, Option<u32>)>,
    costs: LinkCosts,
}

impl<'a> Links<'a> {
    /// `relayed`: pairs known not to meet directly whatever their ends
    /// report. Cost: O(members + reported links + relayed pairs).
    pub fn new(
        members: impl IntoIterator<Item = Member<'a>>,
        relayed: impl IntoIterator<Item = (&'a str, &'a str)>,
        costs: LinkCosts,
    ) -> Self {
        let mut members: Vec<Member<'a>> = members.into_iter().collect();
        members.sort_by_key(|m| m.name);
        members.dedup_by_key(|m| m.name);
        let index: FnvMap<&str, usize> = members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name, i))
            .collect();
        // Both directions of every reported link, grouped by their first
        // end with a counting sort (no per-member allocations).
        let mut pairs: Vec<(usize, usize)> = Vec::new();
        for (i, m) in members.iter().enumerate() {
            for other in m.unreachable.iter() {
                match index.get(other.as_str()) {
                    Some(&j) if j != i => pairs.extend([(i, j), (j, i)]),
                    _ => {}
                }
            }
        }
        for (a, b) in relayed {
            if let (Some(&i), Some(&j)) = (index.get(a), index.get(b)) {
                pairs.extend([(i, j), (j, i)]);
            }
        }
        let mut offsets = vec![0; members.len() + 1];
        for &(i, _) in &pairs {
            offsets[i + 1] += 1;
        }
        for i in 0..members.len() {
            offsets[i + 1] += offsets[i];
        }
        let mut next = offsets.clone();
        let mut down = vec![0; pairs.len()];
        for &(i, j) in &pairs {
            down[next[i]] = j;
            next[i] += 1;
        }
        // Sort and dedup each member's list in place (both ends may report).
        let mut packed = 0;
        for i in 0..members.len() {
            let (start, end) = (offsets[i], offsets[i + 1]);
            down[start..end].sort_unstable();
            offsets[i] = packed;
            let mut last = None;
            for k in start..end {
                if last != Some(down[k]) {
                    last = Some(down[k]);
                    down[packed] = down[k];
                    packed += 1;
                }
            }
        }
        offsets[members.len()] = packed;
        down.truncate(packed);
        let mut names: FnvMap<&str, u32> = FnvMap::default();
        let mut intern = |s: &'a Option<String>| {
            s.as_deref().map(|s| {
                let next = names.len() as u32;
                *names.entry(s).or_insert(next)
            })
        };
        let places = members
            .iter()
            .map(|m| (intern(&m.placement.region), intern(&m.placement.zone)))
            .collect();
        Self {
            members,
            index,
            down,
            offsets,
            places,
            costs,
        }
    }

    /// Member `a`'s down links.
    fn down_of(&self, a: usize) -> &[usize] {
        &self.down[self.offsets[a]..self.offsets[a + 1]]
    }

    fn up(&self, a: usize, b: usize) -> bool {
        a != b && self.down_of(a).binary_search(&b).is_err()
    }

    fn cost(&self, a: usize, b: usize) -> u64 {
        let ((ra, za), (rb, zb)) = (self.places[a], self.places[b]);
        let same_region = ra.is_some() && ra == rb;
        u64::from(match (same_region, za.is_some() && za == zb) {
            (true, true) => self.costs.zone,
            (true, false) => self.costs.region,
            (false, _) => self.costs.other,
        })
    }

    /// The links either end reports down, as name pairs (lower name first).
    pub fn down_links(&self) -> BTreeSet<(&'a str, &'a str)> {
        (0..self.members.len())
            .flat_map(|a| {
                self.down_of(a)
                    .iter()
                    .filter(move |&&b| a < b)
                    .map(move |&b| (a, b))
            })
            .map(|(a, b)| (self.members[a].name, self.members[b].name))
            .collect()
    }

    /// The relay between `a` and `b`: of the nodes that may relay and have
    /// working links to both, the one with the least total cost; ties go to
    /// a hash of the three names (spreading pairs over relays rather than
    /// piling them on one), then to the name. Symmetric in `a` and `b`.
    fn relay(&self, a: usize, b: usize) -> Option<usize> {
        let (lo, hi) = (self.members[a.min(b)].name, self.members[a.max(b)].name);
        // The nodes without a working link to a or b, marked once: the
        // scan below is then one lookup per candidate.
        let mut cut_off = vec![false; self.members.len()];
        for &x in self.down_of(a).iter().chain(self.down_of(b)) {
            cut_off[x] = true;
        }
        cut_off[a] = true;
        cut_off[b] = true;
        // One pass; the hash only where the cost ties the best so far.
        let mut best: Option<(u64, u64, &str, usize)> = None;
        for (r, m) in self.members.iter().enumerate() {
            if cut_off[r] || !m.placement.may_relay {
                continue;
            }
            let cost = self.cost(a, r) + self.cost(r, b);
            if best.is_some_and(|(c, ..)| cost > c) {
                continue;
            }
            let key = (cost, fnv1a(&[lo, hi, m.name]), m.name, r);
            if best.is_none_or(|b| key < b) {
                best = Some(key);
            }
        }
        best.map(|(.., r)| r)
    }

    /// How `from` reaches every other member. O(members + relayed pairs ×
    /// members): a node with few down links costs little more than a full
    /// mesh. A node that is not a member (not accepted itself) has no link
    /// state: it sends to every member directly, and is refused until it
    /// is accepted.
    pub fn paths_from(&self, from: &str, relay: Relay) -> BTreeMap<String, Hop> {
        let mut paths: BTreeMap<String, Hop> = self
            .members
            .iter()
            .filter(|m| m.name != from)
            .map(|m| (m.name.to_string(), Hop::Direct))
            .collect();
        let Some(&a) = self.index.get(from) else {
            return paths;
        };
        for &b in self.down_of(a) {
            paths.insert(
                self.members[b].name.to_string(),
                self.hop_between(a, b, relay),
            );
        }
        paths
    }

    /// How `a` and `b` reach each other; `None` if either is not a member.
    pub fn hop(&self, a: &str, b: &str, relay: Relay) -> Hop {
        match (self.index.get(a), self.index.get(b)) {
            (Some(&a), Some(&b)) if a != b => self.hop_between(a, b, relay),
            _ => Hop::None,
        }
    }

    fn hop_between(&self, a: usize, b: usize, relay: Relay) -> Hop {
        if self.up(a, b) {
            return Hop::Direct;
        }
        match relay {
            Relay::Never => None,
            Relay::OneHop => self.relay(a, b),
        }
        .map_or(Hop::None, |r| Hop::Via(self.members[r].name.to_string()))
    }
}

/// 64-bit FNV-1a over the names, each ended by a 0 byte: a fixed function,
/// so meshd builds of any Rust version choose the same relays (std's
/// `DefaultHasher` makes no such promise).
pub(crate) fn fnv1a(names: &[&str]) -> u64 {
    let mut h = Fnv::default();
    for name in names {
        h.write(name.as_bytes());
        h.write_u8(0);
    }
    h.finish()
}

/// FNV-1a as a `Hasher`: for the relay tie-break, and for the name maps
/// (short keys, no untrusted collisions to fear: the names are Node names
/// the API server admitted, and a collision costs only a probe).
#[derive(Debug, Clone, Copy)]
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FnvMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Nodes `0..n` named `n00`… (so their order is their index), with
    /// the given placements and reports.
    #[derive(Debug)]
    struct Cluster {
        names: Vec<String>,
        placements: Vec<Placement>,
        reports: Vec<BTreeSet<String>>,
    }

    impl Cluster {
        fn new(n: usize) -> Self {
            Self {
                names: (0..n).map(|i| format!("n{i:02}")).collect(),
                placements: vec![Placement::anywhere(); n],
                reports: vec![BTreeSet::new(); n],
            }
        }

        fn cut(&mut self, a: usize, b: usize) {
            let name = self.names[b].clone();
            self.reports[a].insert(name);
        }

        fn links(&self) -> Links<'_> {
            Links::new(
                (0..self.names.len()).map(|i| Member {
                    name: &self.names[i],
                    placement: &self.placements[i],
                    unreachable: &self.reports[i],
                }),
                [],
                LinkCosts::default(),
            )
        }

        fn hop(&self, a: usize, b: usize) -> Hop {
            self.links().paths_from(&self.names[a], Relay::OneHop)[&self.names[b]].clone()
        }
    }

    fn via(name: &str) -> Hop {
        Hop::Via(name.into())
    }

    #[test]
    fn a_link_is_down_if_either_end_says_so() {
        let mut c = Cluster::new(3);
        c.cut(0, 2);
        assert_eq!(c.hop(0, 2), via("n01"));
        assert_eq!(c.hop(2, 0), via("n01"), "the far end agrees");
        assert_eq!(c.hop(1, 0), Hop::Direct);
        assert_eq!(c.hop(1, 2), Hop::Direct);
        let l = c.links();
        assert_eq!(l.down_links(), BTreeSet::from([("n00", "n02")]));
    }

    #[test]
    fn a_report_never_cuts_a_link_between_two_other_nodes() {
        // n3 claims it reaches nobody, and names nodes that do not exist.
        let mut c = Cluster::new(4);
        for b in [0, 1, 2] {
            c.cut(3, b);
        }
        c.reports[3].insert("ghost".into());
        for (a, b) in [(0, 1), (0, 2), (1, 2)] {
            assert_eq!(c.hop(a, b), Hop::Direct);
        }
        assert_eq!(c.hop(0, 3), Hop::None, "only its own links are gone");
    }

    #[test]
    fn the_relay_is_the_cheapest_then_hashed() {
        let mut c = Cluster::new(5);
        let place = |region: &str, zone: &str| Placement {
            region: Some(region.into()),
            zone: Some(zone.into()),
            may_relay: true,
        };
        c.placements = vec![
            place("eu", "a"),
            place("us", "x"),
            place("eu", "a"),
            place("eu", "b"),
            place("eu", "a"),
        ];
        c.cut(0, 4);
        // n2 (same zone as both: 1 + 1) beats n3 (2 + 2) and n1 (4 + 4).
        assert_eq!(c.hop(0, 4), via("n02"));
        c.cut(2, 0);
        assert_eq!(c.hop(0, 4), via("n03"));
        // Nobody may relay: no path.
        c.placements[3].may_relay = false;
        c.placements[1].may_relay = false;
        assert_eq!(c.hop(0, 4), Hop::None);
    }

    #[test]
    fn never_relaying_leaves_the_pair_apart() {
        let mut c = Cluster::new(3);
        c.cut(0, 1);
        let l = c.links();
        assert_eq!(l.paths_from("n00", Relay::Never)["n01"], Hop::None);
        assert_eq!(l.paths_from("n00", Relay::Never)["n02"], Hop::Direct);
        let stranger = l.paths_from("stranger", Relay::OneHop);
        assert_eq!(stranger.len(), 3);
        assert!(stranger.values().all(|h| *h == Hop::Direct));
    }

    #[test]
    fn ties_spread_over_relays() {
        // Many cut pairs among 12 equal nodes: more than one relay is used.
        let mut c = Cluster::new(12);
        for a in 0..6 {
            c.cut(a, a + 6);
        }
        let relays: BTreeSet<Hop> = (0..6).map(|a| c.hop(a, a + 6)).collect();
        assert!(relays.len() > 1, "{relays:?}");
    }

    fn clusters() -> impl Strategy<Value = Cluster> {
        (
            2usize..14,
            proptest::collection::vec((0usize..14, 0usize..14), 0..40),
            proptest::collection::vec(0u8..4, 14),
        )
            .prop_map(|(n, cuts, zones)| {
                let mut c = Cluster::new(n);
                for (i, p) in c.placements.iter_mut().enumerate() {
                    p.region = Some(format!("r{}", zones[i] / 2));
                    p.zone = Some(format!("z{}", zones[i]));
                    p.may_relay = zones[i] != 3;
                }
                for (a, b) in cuts {
                    if a < n && b < n && a != b {
                        c.cut(a, b);
                    }
                }
                c
            })
    }

    proptest! {
        /// Every node computes every path the same way both ways; a relayed
        /// path's relay has direct links to both ends (so its own paths
        /// forward correctly: no loop); every pair with a working link or a
        /// common neighbour that may relay has a path.
        #[test]
        fn paths_are_symmetric_agreed_loop_free_and_complete(c in clusters()) {
            let l = c.links();
            let all: Vec<BTreeMap<String, Hop>> =
                c.names.iter().map(|n| l.paths_from(n, Relay::OneHop)).collect();
            let idx = |name: &str| c.names.iter().position(|n| n == name).unwrap();
            for a in 0..c.names.len() {
                for b in 0..c.names.len() {
                    if a == b { continue; }
                    let ab = &all[a][&c.names[b]];
                    let ba = &all[b][&c.names[a]];
                    prop_assert_eq!(ab, ba, "{} and {} disagree", &c.names[a], &c.names[b]);
                    let linked = l.up(a, b);
                    match ab {
                        Hop::Direct => prop_assert!(linked),
                        Hop::Via(r) => {
                            let r = idx(r);
                            prop_assert!(!linked && r != a && r != b);
                            prop_assert!(c.placements[r].may_relay);
                            prop_assert_eq!(&all[r][&c.names[a]], &Hop::Direct);
                            prop_assert_eq!(&all[r][&c.names[b]], &Hop::Direct);
                        }
                        Hop::None => {
                            prop_assert!(!linked);
                            let common = (0..c.names.len()).any(|r| {
                                c.placements[r].may_relay && l.up(a, r) && l.up(r, b)
                            });
                            prop_assert!(!common, "{} and {} have a relay", a, b);
                        }
                    }
                }
            }
        }
    }
}
