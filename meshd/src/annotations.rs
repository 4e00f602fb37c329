//! The Node annotations a meshd publishes, and the strict parser every other
//! meshd reads them with. Another node's annotations are untrusted input:
//! anything malformed, oversized or unusable is a [`Rejection`] that names
//! the annotation — never a panic, never a partial peer.
//! Documented in docs/annotations.md.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weft_keys::{KeyProof, ProofError, ProofSubject, PublicKey};

use crate::model::{ClusterRanges, NodeInfo};
use crate::planner::{mesh_address_of, smallest_block};

pub const PREFIX: &str = "weft.dev/";
pub const VERSION: &str = "weft.dev/version";
pub const PUBLIC_KEY: &str = "weft.dev/public-key";
/// Proof that the node holds [`PUBLIC_KEY`]'s private key: its XEdDSA
/// signature over the Node's name and UID (see [`weft_keys::KeyProof`]).
/// A key anyone can copy; this, only its holder can make.
pub const KEY_PROOF: &str = "weft.dev/key-proof";
pub const ENDPOINT: &str = "weft.dev/endpoint";
pub const MESH_ADDRESSES: &str = "weft.dev/mesh-addresses";
pub const POD_CIDRS: &str = "weft.dev/pod-cidrs";
/// The nodes this node cannot reach directly (its link state; absent:
/// it reaches every node). A link is used only if neither end lists the
/// other, so a node's report can only take away its own links.
pub const UNREACHABLE: &str = "weft.dev/unreachable";
/// Where this node's data plane hears peers from that publish no such
/// address (`NODE=IP:port,…`): the addresses their NATs give them, as
/// this node sees them. Read by each NAT'd node about itself (see
/// [`NAT`]); absent when every peer is heard where it says it is.
pub const OBSERVED: &str = "weft.dev/observed";
/// Set by a node that learnt it is behind NAT (others see it at addresses
/// that are not its own, [`OBSERVED`]): how its NAT maps (`eim`: one
/// address:port for every peer, `symmetric`: a port per peer) and the
/// address:port most peers see, e.g. `eim 203.0.113.7:51820`.
pub const NAT: &str = "weft.dev/nat";
/// The addresses a node listens at besides its endpoint (`IP:port,…`):
/// its InternalIPs and ExternalIPs and any an admin configured. A node in
/// the same region, or behind the same NAT, tries these first; others try
/// them after the endpoint (see `planner::nat::offers`).
pub const CANDIDATES: &str = "weft.dev/candidates";
/// The candidates this node tried for a peer and gave up on, no
/// authenticated answer having come (`NODE=IP:port,…`): what it sends to
/// instead is the next one. Absent when every peer answers at its best.
pub const GIVEN_UP: &str = "weft.dev/given-up";
/// While the node rotates its key: the key its peers move to. Its old
/// key stays in [`PUBLIC_KEY`] until every peer has moved (see
/// docs/security.md, "Key rotation").
pub const NEXT_PUBLIC_KEY: &str = "weft.dev/next-public-key";
/// With [`NEXT_PUBLIC_KEY`]: its proof, as [`KEY_PROOF`] is the current
/// key's.
pub const NEXT_KEY_PROOF: &str = "weft.dev/next-key-proof";
/// With [`NEXT_PUBLIC_KEY`], from a node whose data plane answers only one
/// key (kernel WireGuard, wireguard-go): when its peers move and it
/// switches (RFC 3339). Absent: peers move at once (the node answers both).
pub const NEXT_KEY_AT: &str = "weft.dev/next-key-at";
/// With [`NEXT_PUBLIC_KEY`]: the peers not yet on the next key.
pub const KEY_PENDING: &str = "weft.dev/key-pending";
/// When the node's current key came into use (RFC 3339): its age.
pub const KEY_SINCE: &str = "weft.dev/key-since";
/// The NetworkPolicies this node enforces, as [`PolicyApplied`] renders
/// them; absent while enforcement is off or has applied nothing yet.
/// Status for `meshctl status`, not part of the claim: peers ignore it.
pub const POLICY_APPLIED: &str = "weft.dev/policy-applied";
/// This node's `WEFT_POST_QUANTUM` mode and the peers whose link has no
/// post-quantum session yet, as [`PostQuantum`] renders them; absent with
/// `off`. Status for `meshctl status`, not part of the claim.
pub const POST_QUANTUM: &str = "weft.dev/post-quantum";
/// Set by an admin (`meshctl keys rotate`), never by meshd: the node
/// rotates its key if the key is older than this time (RFC 3339).
pub const ROTATE_REQUESTED: &str = "weft.dev/rotate-requested";
/// Set by an admin (not by meshd) to override the endpoint a node publishes,
/// e.g. a public address in front of NAT, or [`NO_ENDPOINT`].
pub const FORCE_ENDPOINT: &str = "weft.dev/force-endpoint";
/// [`FORCE_ENDPOINT`]'s value for a node nothing can reach unasked (behind
/// NAT): it publishes no endpoint, and peers learn its address from the
/// handshakes it starts.
pub const NO_ENDPOINT: &str = "none";

/// The annotations meshd owns on its Node (others under the prefix, like
/// [`FORCE_ENDPOINT`], belong to admins and are never written).
pub const OWNED: &[&str] = &[
    VERSION,
    PUBLIC_KEY,
    KEY_PROOF,
    ENDPOINT,
    MESH_ADDRESSES,
    POD_CIDRS,
    UNREACHABLE,
    NEXT_PUBLIC_KEY,
    NEXT_KEY_PROOF,
    NEXT_KEY_AT,
    KEY_PENDING,
    KEY_SINCE,
    POLICY_APPLIED,
    POST_QUANTUM,
    OBSERVED,
    NAT,
    CANDIDATES,
    GIVEN_UP,
];

/// The annotation format this meshd writes.
///
/// Formats evolve additively: a later format keeps every annotation of the
/// earlier ones with the same meaning and may add more. So a reader accepts
/// any version from [`OLDEST_READ_VERSION`] up, reads the annotations it
/// knows and ignores the others: during a rolling upgrade, nodes on the
/// next format and nodes on this one mesh with each other. A change that
/// cannot be additive takes new annotation names, never a new meaning for
/// an old one.
///
/// Format 2 made key proofs ([`KEY_PROOF`]) and derived mesh addresses
/// required: a format-1 node's claims prove nothing, so it is not read.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format this meshd still reads (an older node is excluded).
pub const OLDEST_READ_VERSION: u32 = 2;
/// The furthest ahead a node may schedule its key switch ([`NEXT_KEY_AT`]):
/// the longest `--key-switch-lead` (10 minutes) and 5 minutes of clock
/// skew. A switch beyond it is refused: announcing a next key costs a node
/// nothing until peers move to it, so it must not wait forever.
pub const MAX_KEY_SWITCH_AHEAD: u64 = 15 * 60;
/// The longest `--key-switch-lead`.
pub const MAX_KEY_SWITCH_LEAD: std::time::Duration = std::time::Duration::from_secs(10 * 60);
/// No Weft annotation value is legitimately longer, but [`UNREACHABLE`].
pub const MAX_VALUE_LEN: usize = 512;
/// [`UNREACHABLE`] lists node names: room for thousands (Kubernetes allows
/// 256 KiB of annotations per object).
pub const MAX_UNREACHABLE_LEN: usize = 64 * 1024;
const MAX_POD_CIDRS: usize = 8;

/// What a valid node claims: its identity and the addresses it answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub public_key: PublicKey,
    /// Its proofs of holding `public_key` and `next_key`'s key (shared:
    /// claims are cloned on every decision).
    pub proofs: Arc<KeyProofs>,
    /// `None`: the node cannot be reached unasked (behind NAT); it keeps its
    /// sessions up itself, and peers send to where its packets come from.
    pub endpoint: Option<SocketAddr>,
    /// One per family, each derived from one of its pod CIDRs
    /// ([`mesh_address_of`]): assigned by the control plane, never free.
    pub mesh_addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
    /// Its link state: the nodes it reports it cannot reach directly
    /// (shared: claims are cloned on every decision, and at scale this is
    /// most of a claim).
    pub unreachable: Arc<BTreeSet<String>>,
    /// When its key came into use (Unix seconds), if it says.
    pub key_since: Option<u64>,
    /// A key rotation under way.
    pub next_key: Option<NextPublicKey>,
    /// Where it hears NAT'd peers from ([`OBSERVED`]; shared, like
    /// `unreachable`).
    pub observed: Arc<BTreeMap<String, SocketAddr>>,
    /// Behind NAT: how its NAT maps and where it is seen ([`NAT`]).
    pub nat: Option<NatMapping>,
    /// Where else it listens ([`CANDIDATES`]).
    pub candidates: Vec<SocketAddr>,
    /// The peers' candidates it gave up on ([`GIVEN_UP`]; shared, like
    /// `unreachable`).
    pub given_up: Arc<GivenUp>,
}

/// Per peer, the candidate addresses a node gave up on.
pub type GivenUp = BTreeMap<String, BTreeSet<SocketAddr>>;

/// How a NAT maps a node's socket for its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NatKind {
    /// Endpoint-independent mapping: every peer sees the same address:port,
    /// so two such nodes can open their NATs to each other by sending at
    /// once.
    Eim,
    /// A port per peer: no address to give another NAT'd node.
    Symmetric,
}

impl NatKind {
    fn name(self) -> &'static str {
        match self {
            NatKind::Eim => "eim",
            NatKind::Symmetric => "symmetric",
        }
    }
}

/// A node's NAT as it learnt it from its peers' observations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatMapping {
    pub kind: NatKind,
    /// Where most peers see it.
    pub reflexive: SocketAddr,
}

impl fmt::Display for NatMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.name(), self.reflexive)
    }
}

/// An address others may send WireGuard to, from annotation `annotation`.
fn usable_address(
    text: &str,
    annotation: &'static str,
    ranges: &ClusterRanges,
) -> Result<SocketAddr, Rejection> {
    let bad = |why: String| Rejection::BadReachability { annotation, why };
    let addr: SocketAddr = text.parse().map_err(|e| {
        bad(format!(
            "{:?}: {e} (expected IP:port or [IPv6]:port)",
            text.chars().take(64).collect::<String>()
        ))
    })?;
    match endpoint_problem(addr, ranges) {
        Some(why) => Err(bad(format!("{addr} is not usable: {why}"))),
        None => Ok(addr),
    }
}

/// [`OBSERVED`]: other nodes' names, each once, with usable addresses.
pub fn observed(
    node: &NodeInfo,
    ranges: &ClusterRanges,
) -> Result<BTreeMap<String, SocketAddr>, Rejection> {
    let mut seen = BTreeMap::new();
    for (name, addr) in node_addresses(node, OBSERVED, ranges)? {
        if seen.insert(name.to_string(), addr).is_some() {
            return Err(Rejection::BadReachability {
                annotation: OBSERVED,
                why: format!("{name} is listed twice"),
            });
        }
    }
    Ok(seen)
}

/// [`GIVEN_UP`]: other nodes' names with usable addresses, each pair once.
fn given_up(node: &NodeInfo, ranges: &ClusterRanges) -> Result<GivenUp, Rejection> {
    let mut given_up = GivenUp::new();
    for (name, addr) in node_addresses(node, GIVEN_UP, ranges)? {
        if !given_up.entry(name.to_string()).or_default().insert(addr) {
            return Err(Rejection::BadReachability {
                annotation: GIVEN_UP,
                why: format!("{name}={addr} is listed twice"),
            });
        }
    }
    Ok(given_up)
}

/// A `NODE=IP:port,…` list: other nodes' names with usable addresses.
fn node_addresses<'a>(
    node: &'a NodeInfo,
    annotation: &'static str,
    ranges: &ClusterRanges,
) -> Result<Vec<(&'a str, SocketAddr)>, Rejection> {
    let mut found = Vec::new();
    let Some(v) = node.annotations.get(annotation) else {
        return Ok(found);
    };
    let bad = |why: String| Rejection::BadReachability { annotation, why };
    for item in list(v) {
        let (name, addr) = item.split_once('=').ok_or_else(|| {
            bad(format!(
                "{:?} is not NODE=IP:port",
                item.chars().take(64).collect::<String>()
            ))
        })?;
        if !dns_subdomain(name) || name == node.name {
            return Err(bad(format!(
                "{:?} is not another node's name",
                name.chars().take(64).collect::<String>()
            )));
        }
        found.push((name, usable_address(addr, annotation, ranges)?));
    }
    Ok(found)
}

/// [`NAT`]: `eim|symmetric IP:port`.
pub fn nat(node: &NodeInfo, ranges: &ClusterRanges) -> Result<Option<NatMapping>, Rejection> {
    let Some(v) = node.annotations.get(NAT) else {
        return Ok(None);
    };
    let bad = |why: String| Rejection::BadReachability {
        annotation: NAT,
        why,
    };
    let (kind, addr) = v
        .trim()
        .split_once(' ')
        .ok_or_else(|| bad("expected `eim IP:port` or `symmetric IP:port`".into()))?;
    let kind = match kind {
        "eim" => NatKind::Eim,
        "symmetric" => NatKind::Symmetric,
        other => {
            return Err(bad(format!(
                "{:?} is not a NAT kind (eim, symmetric)",
                other.chars().take(16).collect::<String>()
            )))
        }
    };
    Ok(Some(NatMapping {
        kind,
        reflexive: usable_address(addr.trim(), NAT, ranges)?,
    }))
}

/// At most this many [`CANDIDATES`] (a node's own addresses).
pub const MAX_CANDIDATES: usize = 8;

/// [`CANDIDATES`]: usable addresses, each once.
fn candidates(node: &NodeInfo, ranges: &ClusterRanges) -> Result<Vec<SocketAddr>, Rejection> {
    let Some(v) = node.annotations.get(CANDIDATES) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for item in list(v) {
        let addr = usable_address(item, CANDIDATES, ranges)?;
        if !found.contains(&addr) {
            found.push(addr);
        }
    }
    if found.len() > MAX_CANDIDATES {
        return Err(Rejection::BadReachability {
            annotation: CANDIDATES,
            why: format!("at most {MAX_CANDIDATES} addresses"),
        });
    }
    Ok(found)
}

/// The key a node is rotating to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextPublicKey {
    pub key: PublicKey,
    /// When peers move to it (Unix seconds); `None`: at once.
    pub at: Option<u64>,
    /// The peers that have not moved yet, as the node last saw.
    pub pending: Arc<BTreeSet<String>>,
}

/// A node's proofs that it holds its keys' private halves ([`KEY_PROOF`],
/// [`NEXT_KEY_PROOF`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyProofs {
    pub key: KeyProof,
    /// The next key's, exactly when the claim has a next key.
    pub next: Option<KeyProof>,
}

impl Claim {
    /// The key peers configure for this node at `now` (Unix seconds): the
    /// next key once peers are to move to it.
    pub fn key_at(&self, now: u64) -> PublicKey {
        match &self.next_key {
            Some(next) if next.at.is_none_or(|at| at <= now) => next.key,
            _ => self.public_key,
        }
    }

    /// Every key the node holds: no other node may hold any of them.
    pub fn keys(&self) -> impl Iterator<Item = PublicKey> + '_ {
        std::iter::once(self.public_key).chain(self.next_key.as_ref().map(|n| n.key))
    }

    /// The prefixes traffic from this node may come from (its WireGuard
    /// allowed IPs): mesh addresses as host routes, and pod CIDRs.
    pub fn prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.mesh_addresses
            .iter()
            .map(|a| IpNet::from(*a))
            .chain(self.pod_cidrs.iter().copied())
    }
}

/// Why a node is excluded from the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    Missing(&'static str),
    Oversized(String),
    UnsupportedVersion(String),
    BadPublicKey(String),
    /// A key without a valid proof of possession ([`KEY_PROOF`],
    /// [`NEXT_KEY_PROOF`]): copied, or signed for another Node.
    BadKeyProof {
        annotation: &'static str,
        why: ProofError,
    },
    BadEndpoint(String),
    /// Parses, but nothing may be sent there: `why` says what it is.
    UnusableEndpoint {
        endpoint: SocketAddr,
        why: &'static str,
    },
    BadMeshAddress(String),
    MeshAddressOutsideRange(IpAddr),
    /// Not the mesh address of any of the node's pod CIDRs.
    MeshAddressNotAssigned {
        address: IpAddr,
        expected: Vec<IpAddr>,
    },
    BadPodCidr(String),
    BadUnreachable(String),
    /// [`OBSERVED`], [`NAT`], [`CANDIDATES`] or [`GIVEN_UP`] malformed, or naming an
    /// address nothing may be sent to.
    BadReachability {
        annotation: &'static str,
        why: String,
    },
    /// A key-rotation annotation that is malformed or inconsistent.
    BadRotation {
        annotation: &'static str,
        why: String,
    },
    /// The node holds a key an admin revoked (`meshctl keys revoke`).
    Revoked(PublicKey),
    PodCidrOverlapsMesh(IpNet),
    PodCidrOutsideCluster(IpNet),
    /// Not within the node's `spec.podCIDRs` or, without them, the blocks
    /// the cluster record holds for it.
    PodCidrNotAssigned {
        cidr: IpNet,
        assigned: Vec<IpNet>,
    },
    /// As large as the whole cluster range it lies in.
    PodCidrTooLarge(IpNet),
    /// Smaller than the mesh range can give an address of its own
    /// (`smallest` is the longest prefix it can).
    PodCidrTooSmall {
        cidr: IpNet,
        smallest: u8,
    },
    /// An older node (or, at equal age, the one whose name sorts first)
    /// already holds this: a key both prove they hold (a cloned key), or
    /// overlapping pod CIDRs the control plane assigned to both.
    Conflict {
        field: &'static str,
        value: String,
        holder: String,
    },
}

impl Rejection {
    /// A short stable label for metrics and Event reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing(_) => "missing",
            Self::Oversized(_) => "oversized",
            Self::UnsupportedVersion(_) => "unsupported_version",
            Self::BadPublicKey(_) => "bad_public_key",
            Self::BadKeyProof { .. } => "bad_key_proof",
            Self::BadEndpoint(_) | Self::UnusableEndpoint { .. } => "bad_endpoint",
            Self::BadMeshAddress(_)
            | Self::MeshAddressOutsideRange(_)
            | Self::MeshAddressNotAssigned { .. } => "bad_mesh_address",
            Self::BadPodCidr(_)
            | Self::PodCidrOverlapsMesh(_)
            | Self::PodCidrOutsideCluster(_)
            | Self::PodCidrTooLarge(_)
            | Self::PodCidrTooSmall { .. } => "bad_pod_cidr",
            Self::PodCidrNotAssigned { .. } => "pod_cidr_not_assigned",
            Self::BadUnreachable(_) => "bad_unreachable",
            Self::BadReachability { .. } => "bad_reachability",
            Self::BadRotation { .. } => "bad_rotation",
            Self::Revoked(_) => "revoked_key",
            Self::Conflict { .. } => "conflict",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(a) => write!(f, "{a} is missing"),
            Self::Oversized(a) => write!(f, "{a} is longer than {} bytes", max_len(a)),
            Self::UnsupportedVersion(v) => write!(
                f,
                "{VERSION} {v:?} is not supported (this meshd reads formats {OLDEST_READ_VERSION} and later, written as a decimal number)"
            ),
            Self::BadPublicKey(e) => write!(f, "{PUBLIC_KEY}: {e}"),
            Self::BadKeyProof { annotation, why } => write!(f, "{annotation}: {why}"),
            Self::BadEndpoint(e) => write!(f, "{ENDPOINT}: {e}"),
            Self::UnusableEndpoint { endpoint, why } => {
                write!(f, "{ENDPOINT} {endpoint} is not usable: {why}")
            }
            Self::BadMeshAddress(e) => write!(f, "{MESH_ADDRESSES}: {e}"),
            Self::MeshAddressOutsideRange(a) => write!(
                f,
                "{MESH_ADDRESSES}: {a} is outside the cluster's mesh ranges"
            ),
            Self::MeshAddressNotAssigned { address, expected } => write!(
                f,
                "{MESH_ADDRESSES}: {address} is not the mesh address of any of this node's pod CIDRs (expected {})",
                if expected.is_empty() {
                    "none: it has no pod CIDR of that family".to_string()
                } else {
                    expected.iter().map(ToString::to_string).collect::<Vec<_>>().join(" or ")
                }
            ),
            Self::BadPodCidr(e) => write!(f, "{POD_CIDRS}: {e}"),
            Self::BadUnreachable(e) => write!(f, "{UNREACHABLE}: {e}"),
            Self::BadReachability { annotation, why } => write!(f, "{annotation}: {why}"),
            Self::BadRotation { annotation, why } => write!(f, "{annotation}: {why}"),
            Self::Revoked(key) => write!(
                f,
                "holds the revoked key {key} (the node must rotate to rejoin)"
            ),
            Self::PodCidrOverlapsMesh(c) => {
                write!(f, "{POD_CIDRS}: {c} overlaps the cluster's mesh range")
            }
            Self::PodCidrOutsideCluster(c) => {
                write!(f, "{POD_CIDRS}: {c} is outside the cluster's pod ranges (--cluster-cidr)")
            }
            Self::PodCidrNotAssigned { cidr, assigned } if assigned.is_empty() => write!(
                f,
                "{POD_CIDRS}: {cidr} was not assigned to this node: it has no spec.podCIDRs and holds no block in the cluster's block record"
            ),
            Self::PodCidrNotAssigned { cidr, assigned } => write!(
                f,
                "{POD_CIDRS}: {cidr} is not within what the control plane assigned to this node ({})",
                assigned.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
            ),
            Self::PodCidrTooLarge(c) => write!(
                f,
                "{POD_CIDRS}: {c} is as large as the cluster's whole pod range"
            ),
            Self::PodCidrTooSmall { cidr, smallest } => write!(
                f,
                "{POD_CIDRS}: {cidr} is smaller than /{smallest}, the smallest block the mesh range gives an address of its own"
            ),
            Self::Conflict {
                field,
                value,
                holder,
            } => write!(f, "{field}: {value} is already claimed by node {holder}"),
        }
    }
}

/// The longest value `key` may have.
fn max_len(key: &str) -> usize {
    if [UNREACHABLE, KEY_PENDING, OBSERVED, GIVEN_UP].contains(&key) {
        MAX_UNREACHABLE_LEN
    } else {
        MAX_VALUE_LEN
    }
}

fn value<'a>(node: &'a NodeInfo, key: &'static str) -> Result<&'a str, Rejection> {
    let v = node.annotations.get(key).ok_or(Rejection::Missing(key))?;
    Ok(v.trim())
}

/// An RFC 1123 label, as Kubernetes checks one: 1-63 of `a-z`, `0-9`,
/// `-`, neither first nor last a `-`.
pub fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An RFC 1123 subdomain (what a Node's name is): labels joined by `.`, at
/// most 253 characters.
pub fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

/// A node's link state: names only, no duplicates, not itself. Names of
/// nodes that do not exist are kept (and match nothing).
pub fn unreachable(node: &NodeInfo) -> Result<BTreeSet<String>, Rejection> {
    names(node, UNREACHABLE).map_err(Rejection::BadUnreachable)
}

/// A list of other nodes' names in annotation `key` (absent: none).
fn names(node: &NodeInfo, key: &str) -> Result<BTreeSet<String>, String> {
    let Some(v) = node.annotations.get(key) else {
        return Ok(BTreeSet::new());
    };
    let mut names: Vec<&str> = Vec::new();
    for name in list(v) {
        if !dns_subdomain(name) {
            return Err(format!(
                "{:?} is not a node name",
                name.chars().take(64).collect::<String>()
            ));
        }
        if name == node.name {
            return Err("lists the node itself".into());
        }
        names.push(name);
    }
    // Sorted first, so the set is built in bulk (meshd writes it sorted).
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("{} is listed twice", w[0]));
    }
    Ok(names.into_iter().map(String::from).collect())
}

/// A time as meshd writes one: RFC 3339, UTC, whole seconds.
pub fn render_time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
        .to_string()
}

/// Reads an RFC 3339 time (as [`render_time`] writes it) as Unix seconds.
pub fn parse_time(text: &str) -> Result<u64, String> {
    let t = humantime::parse_rfc3339(text.trim()).map_err(|e| {
        format!(
            "{:?}: {e} (expected RFC 3339, e.g. 2026-12-02T12:00:00Z)",
            text.chars().take(40).collect::<String>()
        )
    })?;
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| "before 1970".to_string())
}

/// The rotation annotations: the next key, when peers move to it, who has
/// not moved yet, and the current key's age.
fn rotation(
    node: &NodeInfo,
    public_key: PublicKey,
) -> Result<(Option<u64>, Option<NextPublicKey>), Rejection> {
    let bad = |annotation, why: String| Rejection::BadRotation { annotation, why };
    let time = |key: &'static str| {
        node.annotations
            .get(key)
            .map(|v| parse_time(v).map_err(|why| bad(key, why)))
            .transpose()
    };
    let since = time(KEY_SINCE)?;
    let at = time(NEXT_KEY_AT)?;
    let pending = names(node, KEY_PENDING).map_err(|why| bad(KEY_PENDING, why))?;
    let Some(next) = node.annotations.get(NEXT_PUBLIC_KEY) else {
        if at.is_some() || !pending.is_empty() {
            return Err(bad(
                NEXT_PUBLIC_KEY,
                format!("missing, but {NEXT_KEY_AT} or {KEY_PENDING} is set"),
            ));
        }
        return Ok((since, None));
    };
    let key: PublicKey = next
        .trim()
        .parse()
        .map_err(|e: weft_keys::KeyParseError| bad(NEXT_PUBLIC_KEY, e.to_string()))?;
    if key == public_key {
        return Err(bad(NEXT_PUBLIC_KEY, format!("is the same as {PUBLIC_KEY}")));
    }
    Ok((
        since,
        Some(NextPublicKey {
            key,
            at,
            pending: Arc::new(pending),
        }),
    ))
}

/// The Node a key proof on `node` must be bound to.
pub fn subject(node: &NodeInfo) -> ProofSubject<'_> {
    ProofSubject {
        node: &node.name,
        uid: &node.uid,
    }
}

/// The proof `node` publishes in `annotation` for `key`, if it holds for
/// this Node: a node keeps publishing it (proofs are randomized, so
/// signing anew would rewrite the annotation on every pass).
pub fn published_proof(node: &NodeInfo, annotation: &str, key: &PublicKey) -> Option<KeyProof> {
    let proof: KeyProof = node.annotations.get(annotation)?.parse().ok()?;
    proof.verify(key, subject(node)).ok()?;
    Some(proof)
}

/// The proof in `annotation` that `node` holds `key`'s private key.
fn proof(
    node: &NodeInfo,
    annotation: &'static str,
    key: &PublicKey,
) -> Result<KeyProof, Rejection> {
    let bad = |why| Rejection::BadKeyProof { annotation, why };
    let proof: KeyProof = value(node, annotation)?.parse().map_err(bad)?;
    proof.verify(key, subject(node)).map_err(bad)?;
    Ok(proof)
}

fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// What is wrong with sending WireGuard to `endpoint`, if anything. An
/// IPv4-mapped IPv6 address is judged as the IPv4 address it is.
pub fn endpoint_problem(endpoint: SocketAddr, ranges: &ClusterRanges) -> Option<&'static str> {
    let ip = endpoint.ip().to_canonical();
    let link_local = match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    };
    if endpoint.port() == 0 {
        Some("port 0")
    } else if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if link_local {
        Some("a link-local address")
    } else if ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
        Some("a multicast or broadcast address")
    } else if ranges.contains(ip) {
        Some("inside the cluster's pod or mesh ranges (the tunnel cannot run through itself)")
    } else {
        None
    }
}

/// Reads a node's claim. `assigned`: the pod ranges the control plane gave
/// it (see [`crate::model::ClusterSnapshot::assigned`]). `Ok(None)`: the
/// node has no Weft annotations yet.
pub fn parse(
    node: &NodeInfo,
    ranges: &ClusterRanges,
    assigned: &[IpNet],
) -> Result<Option<Claim>, Rejection> {
    if !node.annotations.contains_key(PUBLIC_KEY) {
        return Ok(None);
    }
    for (k, v) in &node.annotations {
        if k.starts_with(PREFIX) && v.len() > max_len(k) {
            return Err(Rejection::Oversized(k.clone()));
        }
    }
    let version = value(node, VERSION)?;
    // Digits only: `+1`, ` 1` and `01` are not how meshd writes a version.
    let readable = !version.starts_with('0')
        && version.bytes().all(|b| b.is_ascii_digit())
        && version
            .parse::<u32>()
            .is_ok_and(|v| v >= OLDEST_READ_VERSION);
    if !readable {
        return Err(Rejection::UnsupportedVersion(
            version.chars().take(16).collect(),
        ));
    }
    let public_key: PublicKey = value(node, PUBLIC_KEY)?
        .parse()
        .map_err(|e: weft_keys::KeyParseError| Rejection::BadPublicKey(e.to_string()))?;
    let key_proof = proof(node, KEY_PROOF, &public_key)?;
    // Absent: a node behind NAT (nothing may be sent to it unasked).
    let endpoint = match node.annotations.get(ENDPOINT) {
        None => None,
        Some(v) => {
            let endpoint: SocketAddr = v.trim().parse().map_err(|e| {
                Rejection::BadEndpoint(format!("{e} (expected IP:port or [IPv6]:port)"))
            })?;
            if let Some(why) = endpoint_problem(endpoint, ranges) {
                return Err(Rejection::UnusableEndpoint { endpoint, why });
            }
            Some(endpoint)
        }
    };
    let mut pod_cidrs = Vec::new();
    for c in list(value(node, POD_CIDRS)?) {
        let c: IpNet = c
            .parse()
            .map_err(|e| Rejection::BadPodCidr(format!("{c:?}: {e}")))?;
        if c.trunc() != c {
            return Err(Rejection::BadPodCidr(format!("{c} has host bits set")));
        }
        if ranges.mesh.overlaps(&c) {
            return Err(Rejection::PodCidrOverlapsMesh(c));
        }
        let cluster = ranges
            .pods
            .holding(&c)
            .ok_or(Rejection::PodCidrOutsideCluster(c))?;
        if c.prefix_len() <= cluster.prefix_len() {
            return Err(Rejection::PodCidrTooLarge(c));
        }
        let mesh = ranges.mesh.of_family(&c);
        if let Some(smallest) = mesh.map(|m| smallest_block(cluster, m)) {
            if c.prefix_len() > smallest {
                return Err(Rejection::PodCidrTooSmall { cidr: c, smallest });
            }
        }
        if !assigned.iter().any(|a| a.contains(&c)) {
            return Err(Rejection::PodCidrNotAssigned {
                cidr: c,
                assigned: assigned.to_vec(),
            });
        }
        pod_cidrs.push(c);
    }
    if pod_cidrs.len() > MAX_POD_CIDRS {
        return Err(Rejection::BadPodCidr(format!(
            "at most {MAX_POD_CIDRS} CIDRs"
        )));
    }
    pod_cidrs.sort();
    pod_cidrs.dedup();
    let mut mesh_addresses = Vec::new();
    for a in list(value(node, MESH_ADDRESSES)?) {
        let a: IpAddr = a
            .parse()
            .map_err(|e| Rejection::BadMeshAddress(format!("{a:?}: {e}")))?;
        if !ranges.mesh.contains(a) {
            return Err(Rejection::MeshAddressOutsideRange(a));
        }
        if mesh_addresses
            .iter()
            .any(|m: &IpAddr| m.is_ipv4() == a.is_ipv4())
        {
            return Err(Rejection::BadMeshAddress(
                "at most one address per family".into(),
            ));
        }
        // Assigned, not claimed: the address of one of its own blocks, so
        // no node can take another's (blocks do not overlap).
        let expected: Vec<IpAddr> = pod_cidrs
            .iter()
            .filter_map(|c| mesh_address_of(ranges, c))
            .filter(|e| e.is_ipv4() == a.is_ipv4())
            .collect();
        if !expected.contains(&a) {
            return Err(Rejection::MeshAddressNotAssigned {
                address: a,
                expected,
            });
        }
        mesh_addresses.push(a);
    }
    if !mesh_addresses.iter().any(IpAddr::is_ipv4) {
        return Err(Rejection::BadMeshAddress(
            "an IPv4 mesh address is required".into(),
        ));
    }
    mesh_addresses.sort();
    let (key_since, next_key) = rotation(node, public_key)?;
    let proofs = KeyProofs {
        key: key_proof,
        next: next_key
            .as_ref()
            .map(|next| proof(node, NEXT_KEY_PROOF, &next.key))
            .transpose()?,
    };
    Ok(Some(Claim {
        public_key,
        proofs: Arc::new(proofs),
        endpoint,
        mesh_addresses,
        pod_cidrs,
        unreachable: Arc::new(unreachable(node)?),
        key_since,
        next_key,
        observed: Arc::new(observed(node, ranges)?),
        nat: nat(node, ranges)?,
        candidates: candidates(node, ranges)?,
        given_up: Arc::new(given_up(node, ranges)?),
    }))
}

/// The annotations this node publishes for `claim`. Link state only when
/// it has some (the common case, reaching everyone, is no annotation); a
/// list longer than [`MAX_UNREACHABLE_LEN`] is cut at a name (the far ends
/// of the links left out still report them).
pub fn render(claim: &Claim) -> BTreeMap<String, String> {
    let join = |items: Vec<String>| items.join(",");
    let mut rendered = BTreeMap::from([
        (VERSION.to_string(), FORMAT_VERSION.to_string()),
        (PUBLIC_KEY.to_string(), claim.public_key.to_string()),
        (KEY_PROOF.to_string(), claim.proofs.key.to_string()),
        (
            MESH_ADDRESSES.to_string(),
            join(
                claim
                    .mesh_addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
        ),
        (
            POD_CIDRS.to_string(),
            join(claim.pod_cidrs.iter().map(ToString::to_string).collect()),
        ),
    ]);
    if let Some(endpoint) = claim.endpoint {
        rendered.insert(ENDPOINT.to_string(), endpoint.to_string());
    }
    if let Some(nat) = claim.nat {
        rendered.insert(NAT.to_string(), nat.to_string());
    }
    if !claim.candidates.is_empty() {
        let addrs = claim.candidates.iter().map(ToString::to_string).collect();
        rendered.insert(CANDIDATES.to_string(), join(addrs));
    }
    if !claim.observed.is_empty() {
        // Sorted by name (a map): written only when it changes; cut at an
        // entry to stay readable (the NAT'd peers left out are still seen
        // by the other public nodes).
        let seen = claim.observed.iter().map(|(n, a)| format!("{n}={a}"));
        rendered.insert(OBSERVED.to_string(), join_bounded(seen));
    }
    if !claim.given_up.is_empty() {
        let given_up = claim
            .given_up
            .iter()
            .flat_map(|(n, addrs)| addrs.iter().map(move |a| format!("{n}={a}")));
        rendered.insert(GIVEN_UP.to_string(), join_bounded(given_up));
    }
    let mut lists = vec![(UNREACHABLE, &claim.unreachable)];
    if let Some(since) = claim.key_since {
        rendered.insert(KEY_SINCE.to_string(), render_time(since));
    }
    if let Some(next) = &claim.next_key {
        rendered.insert(NEXT_PUBLIC_KEY.to_string(), next.key.to_string());
        if let Some(at) = next.at {
            rendered.insert(NEXT_KEY_AT.to_string(), render_time(at));
        }
        lists.push((KEY_PENDING, &next.pending));
    }
    if let Some(proof) = &claim.proofs.next {
        rendered.insert(NEXT_KEY_PROOF.to_string(), proof.to_string());
    }
    for (key, names) in lists {
        let joined = join_names(names);
        if !joined.is_empty() {
            rendered.insert(key.to_string(), joined);
        }
    }
    rendered
}

/// Which set of NetworkPolicies a node enforces: how many, and the newest
/// resourceVersion among them. Two sets with the same count and newest
/// version are the same set — resourceVersions are unique and only grow, so
/// every other member of either is older than that newest object and was
/// in place, unchanged, at both moments — which lets `meshctl status` tell
/// a node in sync from one behind without the set being published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct PolicyApplied {
    pub policies: usize,
    pub revision: u64,
}

impl PolicyApplied {
    /// The set of the objects with `metas`.
    pub fn of<'a>(metas: impl IntoIterator<Item = &'a ObjectMeta>) -> Self {
        metas.into_iter().fold(Self::default(), |set, meta| Self {
            policies: set.policies + 1,
            revision: set.revision.max(crate::cluster::revision(meta)),
        })
    }
}

impl fmt::Display for PolicyApplied {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "policies={},revision={}", self.policies, self.revision)
    }
}

impl std::str::FromStr for PolicyApplied {
    type Err = String;

    /// Exactly as rendered: `policies=N,revision=R`, decimal.
    fn from_str(text: &str) -> Result<Self, String> {
        let number = |field: Option<&str>, name: &str| -> Result<String, String> {
            let digits = field
                .and_then(|f| f.strip_prefix(name))
                .and_then(|f| f.strip_prefix('='))
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| {
                    format!(
                        "{POLICY_APPLIED} {:?}: expected policies=N,revision=R",
                        text.chars().take(64).collect::<String>()
                    )
                })?;
            Ok(digits.to_string())
        };
        let mut fields = text.split(',');
        let policies = number(fields.next(), "policies")?;
        let revision = number(fields.next(), "revision")?;
        if fields.next().is_some() {
            return Err(format!("{POLICY_APPLIED}: more than policies and revision"));
        }
        let too_large = |what: &str| format!("{POLICY_APPLIED}: {what} is too large");
        Ok(Self {
            policies: policies.parse().map_err(|_| too_large("policies"))?,
            revision: revision.parse().map_err(|_| too_large("revision"))?,
        })
    }
}

/// A node's post-quantum report ([`POST_QUANTUM`]): `MODE` when every
/// link has a post-quantum session, `MODE:node-a,node-b` naming those that
/// have none yet (with `require` they carry no traffic but the exchange's).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PostQuantum {
    pub mode: crate::pq::Mode,
    pub missing: BTreeSet<String>,
}

impl fmt::Display for PostQuantum {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.mode)?;
        if !self.missing.is_empty() {
            write!(f, ":{}", join_names(&self.missing))?;
        }
        Ok(())
    }
}

impl std::str::FromStr for PostQuantum {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (mode, names) = text.split_once(':').unwrap_or((text, ""));
        let mode = match mode {
            "prefer" => crate::pq::Mode::Prefer,
            "require" => crate::pq::Mode::Require,
            other => {
                return Err(format!(
                    "{POST_QUANTUM}: mode {:?} is not prefer or require",
                    other.chars().take(32).collect::<String>()
                ))
            }
        };
        let mut missing = BTreeSet::new();
        for name in list(names) {
            if !dns_subdomain(name) || !missing.insert(name.to_string()) {
                return Err(format!(
                    "{POST_QUANTUM}: {:?} is not a node name, or is listed twice",
                    name.chars().take(64).collect::<String>()
                ));
            }
        }
        Ok(Self { mode, missing })
    }
}

/// Node names joined with commas, cut at a name before
/// [`MAX_UNREACHABLE_LEN`] (the far ends of the links left out still
/// report them).
fn join_names(names: &BTreeSet<String>) -> String {
    join_bounded(names.iter().map(String::as_str))
}

/// `items` joined with commas, cut at an item to fit
/// [`MAX_UNREACHABLE_LEN`] (what readers accept of a list).
fn join_bounded<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    let mut joined = String::new();
    for name in items {
        let name = name.as_ref();
        if joined.len() + name.len() + 1 > MAX_UNREACHABLE_LEN {
            break;
        }
        if !joined.is_empty() {
            joined.push(',');
        }
        joined.push_str(name);
    }
    joined
}

/// The merge patch taking `current` to `desired` for the keys meshd owns,
/// or `None` when they already agree (steady state writes nothing).
pub fn patch(
    current: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
) -> Option<serde_json::Value> {
    let mut changes = serde_json::Map::new();
    for key in OWNED {
        match (current.get(*key), desired.get(*key)) {
            (a, b) if a == b => {}
            (_, Some(v)) => {
                changes.insert(key.to_string(), serde_json::Value::from(v.as_str()));
            }
            (Some(_), None) => {
                changes.insert(key.to_string(), serde_json::Value::Null);
            }
            (None, None) => {}
        }
    }
    (!changes.is_empty()).then(|| serde_json::json!({"metadata": {"annotations": changes}}))
}

/// Keys and proofs for tests: test key `seed` is the private key of 32
/// bytes `seed` (never 0), so a test names keys by number and can prove
/// them.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::net::{IpAddr, SocketAddr};

    use ipnet::{IpNet, Ipv4Net};
    use weft_keys::{KeyProof, PrivateKey, PublicKey};

    use super::{render, subject, Claim, KeyProofs};
    use crate::model::{ClusterRanges, NodeInfo, Placement};
    use crate::planner::mesh_address_of;

    pub fn private(seed: u8) -> PrivateKey {
        PrivateKey::from_bytes([seed.max(1); 32])
    }

    pub fn key(seed: u8) -> PublicKey {
        private(seed).public_key()
    }

    /// `node`'s proof of test key `seed`: the same one every time in a
    /// thread (proofs are randomized), so fixtures made twice are equal.
    pub fn proof(node: &NodeInfo, seed: u8) -> KeyProof {
        thread_local! {
            static MADE: RefCell<HashMap<(String, String, u8), KeyProof>> = RefCell::default();
        }
        MADE.with(|made| {
            *made
                .borrow_mut()
                .entry((node.name.clone(), node.uid.clone(), seed))
                .or_insert_with(|| private(seed).prove(subject(node)))
        })
    }

    /// `node`'s proofs of test keys `key` and `next`.
    pub fn proofs(node: &NodeInfo, key: u8, next: Option<u8>) -> KeyProofs {
        KeyProofs {
            key: proof(node, key),
            next: next.map(|n| proof(node, n)),
        }
    }

    /// A valid claim of `node`'s with test key `key` and pod CIDR `pod`
    /// (and its mesh address), reachable at 198.18.1.`i`:51820.
    pub fn claim(node: &NodeInfo, key: u8, i: u8, pod: IpNet) -> Claim {
        Claim {
            public_key: self::key(key),
            proofs: std::sync::Arc::new(proofs(node, key, None)),
            endpoint: Some(SocketAddr::from(([198, 18, 1, i], 51820))),
            mesh_addresses: mesh_address_of(&ClusterRanges::lab(), &pod)
                .into_iter()
                .collect(),
            pod_cidrs: vec![pod],
            unreachable: Default::default(),
            key_since: None,
            next_key: None,
            observed: Default::default(),
            nat: None,
            candidates: Vec::new(),
            given_up: Default::default(),
        }
    }

    /// Node `node-{i}`, created at `i`, its pod CIDR 198.19.`i`.0/24
    /// assigned, and no annotations yet.
    pub fn bare(i: u8) -> NodeInfo {
        NodeInfo {
            name: format!("node-{i}"),
            uid: format!("node-{i}-uid"),
            created: i64::from(i),
            internal_ips: vec![IpAddr::from([198, 18, 1, i])],
            external_ips: vec![],
            spec_pod_cidrs: vec![IpNet::from(Ipv4Net::new_assert([198, 19, i, 0].into(), 24))],
            annotations: Default::default(),
            placement: Placement::anywhere(),
        }
    }

    /// [`bare`] node `i` publishing a valid claim with test key `i`.
    pub fn published(i: u8) -> (NodeInfo, Claim) {
        let mut node = bare(i);
        let claim = claim(&node, i, i, node.spec_pod_cidrs[0]);
        node.annotations = render(&claim);
        (node, claim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parsed with its spec.podCIDRs as what was assigned.
    fn check(n: &NodeInfo) -> Result<Option<Claim>, Rejection> {
        parse(n, &ClusterRanges::lab(), &n.spec_pod_cidrs)
    }

    fn node_with(claim: &Claim) -> NodeInfo {
        NodeInfo {
            annotations: render(claim),
            ..bare()
        }
    }

    /// Node `n` with its pod CIDRs assigned and no annotations.
    fn bare() -> NodeInfo {
        NodeInfo {
            name: "n".into(),
            uid: "n-uid".into(),
            created: 0,
            internal_ips: vec![],
            external_ips: vec![],
            spec_pod_cidrs: vec![
                "198.19.1.0/24".parse().unwrap(),
                "fd98:19:0:1::/64".parse().unwrap(),
            ],
            annotations: BTreeMap::new(),
            placement: crate::model::Placement::anywhere(),
        }
    }

    fn claim() -> Claim {
        Claim {
            public_key: fixtures::key(1),
            proofs: Arc::new(fixtures::proofs(&bare(), 1, None)),
            endpoint: Some("198.18.1.1:51820".parse().unwrap()),
            mesh_addresses: vec![
                "198.18.128.65".parse().unwrap(),
                "fd98:18::8000:0:1".parse().unwrap(),
            ],
            pod_cidrs: vec![
                "198.19.1.0/24".parse().unwrap(),
                "fd98:19:0:1::/64".parse().unwrap(),
            ],
            unreachable: Default::default(),
            key_since: None,
            next_key: None,
            observed: Default::default(),
            nat: None,
            candidates: Vec::new(),
            given_up: Default::default(),
        }
    }

    #[test]
    fn round_trips() {
        let c = claim();
        assert_eq!(check(&node_with(&c)), Ok(Some(c)));
        // Behind NAT: its mapping and own addresses; what it observes.
        let mut natd = claim();
        natd.endpoint = None;
        natd.nat = Some(NatMapping {
            kind: NatKind::Symmetric,
            reflexive: "203.0.113.7:40001".parse().unwrap(),
        });
        natd.candidates = vec!["10.0.0.1:51820".parse().unwrap()];
        natd.observed = Arc::new(BTreeMap::from([
            ("node-2".into(), "203.0.113.8:51820".parse().unwrap()),
            ("node-3".into(), "[2001:db8::3]:4000".parse().unwrap()),
        ]));
        natd.given_up = Arc::new(BTreeMap::from([(
            "node-2".into(),
            BTreeSet::from([
                "10.0.0.2:51820".parse().unwrap(),
                "198.51.100.2:51820".parse().unwrap(),
            ]),
        )]));
        let n = node_with(&natd);
        assert_eq!(
            n.annotations[GIVEN_UP],
            "node-2=10.0.0.2:51820,node-2=198.51.100.2:51820"
        );
        assert_eq!(n.annotations[NAT], "symmetric 203.0.113.7:40001");
        // Thousands of NAT'd peers: cut at an entry, still readable.
        let mut busy = claim();
        busy.observed = Arc::new(
            (0..5000)
                .map(|i| {
                    (
                        format!("edge-node-{i:05}"),
                        "203.0.113.7:40001".parse().unwrap(),
                    )
                })
                .collect(),
        );
        let rendered = render(&busy);
        assert!(rendered[OBSERVED].len() <= MAX_UNREACHABLE_LEN);
        assert!(rendered[OBSERVED].ends_with(":40001"));
        let mut cut = node_with(&claim());
        set(&mut cut, OBSERVED, &rendered[OBSERVED]);
        assert!(check(&cut).is_ok(), "a cut list parses");
        assert_eq!(
            n.annotations[OBSERVED],
            "node-2=203.0.113.8:51820,node-3=[2001:db8::3]:4000"
        );
        assert_eq!(check(&n), Ok(Some(natd)));
    }

    /// A node on a later (additive) format: its known annotations are read,
    /// the ones this meshd does not know are ignored.
    #[test]
    fn later_formats_are_read_for_what_this_format_knows() {
        let c = claim();
        for version in ["3", "17"] {
            let mut n = node_with(&c);
            set(&mut n, VERSION, version);
            set(&mut n, "weft.dev/a-later-field", "anything");
            assert_eq!(check(&n), Ok(Some(c.clone())), "version {version}");
        }
        // Format 1 proved no key: not read.
        let mut old = node_with(&c);
        set(&mut old, VERSION, "1");
        assert_eq!(check(&old).unwrap_err().reason(), "unsupported_version");
    }

    /// A key is the node's only with its proof, made by the key's holder
    /// for this Node: copied from another Node (the key and its proof as
    /// published there), for another UID, or missing, it is refused — the
    /// current key and the next alike.
    #[test]
    fn a_key_without_its_holder_s_proof_for_this_node_is_refused() {
        let victim = NodeInfo {
            name: "victim".into(),
            uid: "victim-uid".into(),
            ..bare()
        };
        let copied = fixtures::proofs(&victim, 5, Some(6));
        let reincarnated = NodeInfo {
            uid: "n-uid-2".into(),
            ..bare()
        };
        let mut rotating = claim();
        rotating.next_key = Some(NextPublicKey {
            key: fixtures::key(6),
            at: None,
            pending: Default::default(),
        });
        rotating.proofs = Arc::new(fixtures::proofs(&bare(), 1, Some(6)));
        assert!(check(&node_with(&rotating)).is_ok());
        type Edit<'a> = Box<dyn Fn(&mut NodeInfo) + 'a>;
        let cases: Vec<(&str, Edit, &str)> = vec![
            (
                "the victim's key and proof",
                Box::new(|n| {
                    set(n, PUBLIC_KEY, &fixtures::key(5).to_string());
                    set(n, KEY_PROOF, &copied.key.to_string());
                }),
                KEY_PROOF,
            ),
            (
                "the victim's next key and its proof",
                Box::new(|n| {
                    set(n, NEXT_PUBLIC_KEY, &fixtures::key(6).to_string());
                    set(n, NEXT_KEY_PROOF, &copied.next.unwrap().to_string());
                }),
                NEXT_KEY_PROOF,
            ),
            (
                "a proof for an earlier Node of the same name",
                Box::new(|n| {
                    let old = fixtures::proofs(&reincarnated, 1, None);
                    set(n, KEY_PROOF, &old.key.to_string());
                }),
                KEY_PROOF,
            ),
            (
                "the current key's proof for the next key",
                Box::new(|n| {
                    let own = n.annotations[KEY_PROOF].clone();
                    set(n, NEXT_KEY_PROOF, &own);
                }),
                NEXT_KEY_PROOF,
            ),
            (
                "not a proof",
                Box::new(|n| set(n, KEY_PROOF, "c2lnbmVk")),
                KEY_PROOF,
            ),
        ];
        for (what, edit, field) in cases {
            let mut n = node_with(&rotating);
            edit(&mut n);
            let err = check(&n).unwrap_err();
            assert_eq!(err.reason(), "bad_key_proof", "{what}: {err}");
            assert!(err.to_string().starts_with(field), "{what}: {err}");
        }
        for missing in [KEY_PROOF, NEXT_KEY_PROOF] {
            let mut n = node_with(&rotating);
            n.annotations.remove(missing);
            assert_eq!(check(&n), Err(Rejection::Missing(missing)));
        }
    }

    /// A published proof that holds for this Node is the one to keep
    /// publishing; another Node's (a new UID), or none, is not.
    #[test]
    fn a_published_proof_is_kept_while_it_holds() {
        let n = node_with(&claim());
        let key = fixtures::key(1);
        assert_eq!(
            published_proof(&n, KEY_PROOF, &key),
            Some(claim().proofs.key)
        );
        let registered_again = NodeInfo {
            uid: "n-uid-2".into(),
            ..n.clone()
        };
        assert_eq!(published_proof(&registered_again, KEY_PROOF, &key), None);
        assert_eq!(published_proof(&n, KEY_PROOF, &fixtures::key(2)), None);
        assert_eq!(published_proof(&n, NEXT_KEY_PROOF, &key), None);
    }

    /// A mesh address is one of the node's own blocks' and nothing else;
    /// a block too small to have one is refused.
    #[test]
    fn a_mesh_address_is_one_of_its_blocks() {
        for (value, ok) in [
            ("198.18.128.65,fd98:18::8000:0:1", true),
            ("198.18.128.65", true),
            // Another block's (node-2's, say), or any other address.
            ("198.18.128.129", false),
            ("198.18.128.66", false),
            ("198.18.128.65,fd98:18::1", false),
        ] {
            let mut n = node_with(&claim());
            set(&mut n, MESH_ADDRESSES, value);
            match check(&n) {
                Ok(_) => assert!(ok, "{value} accepted"),
                Err(e) => {
                    assert!(!ok, "{value}: {e}");
                    assert!(
                        matches!(e, Rejection::MeshAddressNotAssigned { .. }),
                        "{value}: {e}"
                    );
                    assert!(
                        e.to_string().contains("expected 198.18.128.65")
                            || e.to_string().contains("expected fd98:18::8000:0:1"),
                        "{e}"
                    );
                }
            }
        }
        let mut tiny = node_with(&claim());
        set(&mut tiny, POD_CIDRS, "198.19.1.0/31");
        assert_eq!(
            check(&tiny),
            Err(Rejection::PodCidrTooSmall {
                cidr: "198.19.1.0/31".parse().unwrap(),
                smallest: 30
            })
        );
    }

    /// Link state round-trips; absent is "reaches everyone"; a list too
    /// long for the annotation is cut at a name.
    #[test]
    fn link_state_round_trips_and_is_bounded() {
        let mut c = claim();
        assert!(!render(&c).contains_key(UNREACHABLE));
        c.unreachable = Arc::new(BTreeSet::from([
            "node-2".to_string(),
            "node-10.example".to_string(),
        ]));
        assert_eq!(render(&c)[UNREACHABLE], "node-10.example,node-2");
        assert_eq!(check(&node_with(&c)), Ok(Some(c.clone())));
        c.unreachable = Arc::new((0..20_000).map(|i| format!("node-{i:05}")).collect());
        let rendered = render(&c)[UNREACHABLE].clone();
        assert!(rendered.len() <= MAX_UNREACHABLE_LEN);
        assert!(rendered.split(',').all(|n| n.len() == 10), "cut at a name");
        assert!(check(&node_with(&c)).is_ok());
    }

    /// A node behind NAT publishes no endpoint: still a valid claim.
    #[test]
    fn a_node_without_an_endpoint_is_behind_nat() {
        let mut c = claim();
        c.endpoint = None;
        let n = node_with(&c);
        assert!(!n.annotations.contains_key(ENDPOINT));
        assert_eq!(check(&n), Ok(Some(c)));
    }

    #[test]
    fn no_annotations_is_pending() {
        let mut n = node_with(&claim());
        n.annotations.clear();
        assert_eq!(check(&n), Ok(None));
    }

    fn rejected(edit: impl FnOnce(&mut NodeInfo)) -> Rejection {
        let mut n = node_with(&claim());
        edit(&mut n);
        check(&n).unwrap_err()
    }

    fn set(n: &mut NodeInfo, k: &str, v: &str) {
        n.annotations.insert(k.into(), v.into());
    }

    #[test]
    fn a_rotation_round_trips_and_bad_rotation_annotations_are_named() {
        let mut c = claim();
        c.key_since = Some(1_764_676_800);
        c.next_key = Some(NextPublicKey {
            key: fixtures::key(2),
            at: Some(1_764_676_805),
            pending: Arc::new(BTreeSet::from(["node-2".to_string()])),
        });
        c.proofs = Arc::new(fixtures::proofs(&bare(), 1, Some(2)));
        let n = node_with(&c);
        assert_eq!(n.annotations[KEY_SINCE], "2025-12-02T12:00:00Z");
        assert_eq!(check(&n), Ok(Some(c.clone())));
        let own = c.public_key.to_string();
        for (key, value, field) in [
            (NEXT_PUBLIC_KEY, "short", NEXT_PUBLIC_KEY),
            (NEXT_PUBLIC_KEY, own.as_str(), NEXT_PUBLIC_KEY),
            (NEXT_KEY_AT, "tomorrow", NEXT_KEY_AT),
            (KEY_SINCE, "1764676800", KEY_SINCE),
            (KEY_PENDING, "n", KEY_PENDING),
            (KEY_PENDING, "Not_A_Name", KEY_PENDING),
        ] {
            let mut bad = node_with(&c);
            set(&mut bad, key, value);
            let err = check(&bad).unwrap_err();
            assert!(
                matches!(&err, Rejection::BadRotation { annotation, .. } if *annotation == field),
                "{key}={value}: {err}"
            );
            assert!(err.to_string().starts_with(field), "{err}");
        }
        let mut orphan = node_with(&claim());
        set(&mut orphan, NEXT_KEY_AT, "2026-12-02T12:00:00Z");
        assert!(check(&orphan).unwrap_err().to_string().contains("missing"));
    }

    #[test]
    fn hostile_values_are_rejected_with_the_field_named() {
        type Edit = Box<dyn FnOnce(&mut NodeInfo)>;
        let mut cases: Vec<(Edit, &str, &str)> = Vec::new();
        for (annotation, value) in [
            (OBSERVED, "node-2"),
            (OBSERVED, "n=203.0.113.1:51820"),
            (
                OBSERVED,
                "node-2=203.0.113.1:51820,node-2=203.0.113.2:51820",
            ),
            (OBSERVED, "Node_2=203.0.113.1:51820"),
            (OBSERVED, "node-2=127.0.0.1:51820"),
            (OBSERVED, "node-2=198.19.7.1:51820"),
            (NAT, "eim"),
            (NAT, "full-cone 203.0.113.1:51820"),
            (NAT, "eim 203.0.113.1"),
            (NAT, "symmetric 0.0.0.0:1"),
            (CANDIDATES, "10.0.0.1"),
            (CANDIDATES, "10.0.0.1:0"),
            (CANDIDATES, "[fe80::1]:51820"),
            (GIVEN_UP, "node-2"),
            (GIVEN_UP, "node-2=10.0.0.1:51820,node-2=10.0.0.1:51820"),
            (GIVEN_UP, "n=10.0.0.1:51820"),
            (GIVEN_UP, "node-2=[ff02::1]:51820"),
        ] {
            cases.push((
                Box::new(move |n| set(n, annotation, value)),
                "bad_reachability",
                annotation,
            ));
        }
        let many: Vec<String> = (1..=9).map(|i| format!("10.0.0.{i}:51820")).collect();
        cases.push((
            Box::new(move |n| set(n, CANDIDATES, &many.join(","))),
            "bad_reachability",
            CANDIDATES,
        ));
        cases.extend::<Vec<(Edit, &str, &str)>>(vec![
            (
                Box::new(|n| set(n, PUBLIC_KEY, "not-a-key")),
                "bad_public_key",
                PUBLIC_KEY,
            ),
            (
                Box::new(|n| set(n, ENDPOINT, "0.0.0.0:51820")),
                "bad_endpoint",
                ENDPOINT,
            ),
            (
                Box::new(|n| set(n, ENDPOINT, "[::]:51820")),
                "bad_endpoint",
                ENDPOINT,
            ),
            (
                Box::new(|n| set(n, ENDPOINT, "198.18.1.1:0")),
                "bad_endpoint",
                ENDPOINT,
            ),
            (
                Box::new(|n| set(n, ENDPOINT, "node.example:51820")),
                "bad_endpoint",
                ENDPOINT,
            ),
            (
                Box::new(|n| set(n, ENDPOINT, &"9".repeat(10_000))),
                "oversized",
                ENDPOINT,
            ),
            (
                Box::new(|n| set(n, "weft.dev/other", &"x".repeat(600))),
                "oversized",
                "weft.dev/other",
            ),
            (
                Box::new(|n| set(n, UNREACHABLE, "node-2,Node_3")),
                "bad_unreachable",
                UNREACHABLE,
            ),
            (
                Box::new(|n| set(n, UNREACHABLE, "n")),
                "bad_unreachable",
                UNREACHABLE,
            ),
            (
                Box::new(|n| set(n, UNREACHABLE, "node-2,node-2")),
                "bad_unreachable",
                UNREACHABLE,
            ),
            (
                Box::new(|n| set(n, UNREACHABLE, &"node-2,".repeat(10_000))),
                "oversized",
                UNREACHABLE,
            ),
            (
                Box::new(|n| set(n, VERSION, "0")),
                "unsupported_version",
                VERSION,
            ),
            (
                Box::new(|n| set(n, VERSION, "01")),
                "unsupported_version",
                VERSION,
            ),
            (
                Box::new(|n| set(n, VERSION, "1.5")),
                "unsupported_version",
                VERSION,
            ),
            (
                Box::new(|n| set(n, VERSION, "+2")),
                "unsupported_version",
                VERSION,
            ),
            (
                Box::new(|n| set(n, VERSION, "99999999999")),
                "unsupported_version",
                VERSION,
            ),
            (
                Box::new(|n| {
                    n.annotations.remove(MESH_ADDRESSES);
                }),
                "missing",
                MESH_ADDRESSES,
            ),
            (
                Box::new(|n| set(n, MESH_ADDRESSES, "10.0.0.1")),
                "bad_mesh_address",
                MESH_ADDRESSES,
            ),
            (
                Box::new(|n| set(n, MESH_ADDRESSES, "fd98:18::1")),
                "bad_mesh_address",
                MESH_ADDRESSES,
            ),
            (
                Box::new(|n| set(n, MESH_ADDRESSES, "198.18.128.1,198.18.128.2")),
                "bad_mesh_address",
                MESH_ADDRESSES,
            ),
            (
                Box::new(|n| set(n, POD_CIDRS, "198.19.1.1/24")),
                "bad_pod_cidr",
                POD_CIDRS,
            ),
            (
                Box::new(|n| {
                    n.spec_pod_cidrs.clear();
                    set(n, POD_CIDRS, "198.18.128.0/24");
                }),
                "bad_pod_cidr",
                POD_CIDRS,
            ),
            (
                Box::new(|n| set(n, POD_CIDRS, "bogus")),
                "bad_pod_cidr",
                POD_CIDRS,
            ),
            // Addresses nothing may be sent to, or that would loop the
            // tunnel through itself.
            (
                Box::new(|n| set(n, ENDPOINT, "127.0.0.1:51820")),
                "bad_endpoint",
                "loopback",
            ),
            (
                Box::new(|n| set(n, ENDPOINT, "[::ffff:127.0.0.1]:51820")),
                "bad_endpoint",
                "loopback",
            ),
            (
                Box::new(|n| set(n, ENDPOINT, "169.254.1.1:51820")),
                "bad_endpoint",
                "link-local",
            ),
            (
                Box::new(|n| set(n, ENDPOINT, "[fe80::1]:51820")),
                "bad_endpoint",
                "link-local",
            ),
            (
                Box::new(|n| set(n, ENDPOINT, "224.0.0.5:51820")),
                "bad_endpoint",
                "multicast",
            ),
            (
                Box::new(|n| set(n, ENDPOINT, "198.19.2.1:51820")),
                "bad_endpoint",
                "pod or mesh ranges",
            ),
            (
                Box::new(|n| set(n, ENDPOINT, "[fd98:18::9]:51820")),
                "bad_endpoint",
                "pod or mesh ranges",
            ),
            // Ranges the node was not given, with or without a spec.
            (
                Box::new(|n| set(n, POD_CIDRS, "8.8.8.0/24")),
                "bad_pod_cidr",
                "--cluster-cidr",
            ),
            (
                Box::new(|n| {
                    n.spec_pod_cidrs.clear();
                    set(n, POD_CIDRS, "8.8.8.0/24,1.0.0.0/8");
                }),
                "bad_pod_cidr",
                "outside the cluster",
            ),
            (
                Box::new(|n| {
                    n.spec_pod_cidrs = vec!["198.19.0.0/16".parse().unwrap()];
                    set(n, POD_CIDRS, "198.19.0.0/16");
                }),
                "bad_pod_cidr",
                "whole pod range",
            ),
            (
                Box::new(|n| {
                    n.spec_pod_cidrs.clear();
                    set(n, POD_CIDRS, "198.19.7.0/24");
                }),
                "pod_cidr_not_assigned",
                "holds no block",
            ),
            (
                Box::new(|n| set(n, POD_CIDRS, "198.19.2.0/24")),
                "pod_cidr_not_assigned",
                "198.19.1.0/24",
            ),
        ]);
        for (edit, reason, field) in cases {
            let r = rejected(edit);
            assert_eq!(r.reason(), reason, "{r}");
            assert!(r.to_string().contains(field), "{r} should name {field}");
        }
    }

    #[test]
    fn claims_within_what_was_assigned_are_accepted() {
        let mut n = node_with(&claim());
        set(&mut n, POD_CIDRS, "198.19.1.128/25");
        set(&mut n, MESH_ADDRESSES, "198.18.128.97");
        assert!(check(&n).unwrap().is_some());
        // Without a spec, the block the record holds for the node counts.
        n.spec_pod_cidrs.clear();
        set(&mut n, POD_CIDRS, "198.19.7.0/24");
        set(&mut n, MESH_ADDRESSES, "198.18.129.193");
        let record_block: IpNet = "198.19.7.0/24".parse().unwrap();
        assert!(parse(&n, &ClusterRanges::lab(), &[record_block])
            .unwrap()
            .is_some());
    }

    #[test]
    fn patches_only_what_differs_and_never_admin_keys() {
        let mut current = BTreeMap::from([
            (PUBLIC_KEY.to_string(), "k".to_string()),
            (FORCE_ENDPOINT.to_string(), "1.2.3.4:5".to_string()),
            (POD_CIDRS.to_string(), "old".to_string()),
        ]);
        let desired = BTreeMap::from([
            (PUBLIC_KEY.to_string(), "k".to_string()),
            (ENDPOINT.to_string(), "e".to_string()),
        ]);
        assert_eq!(
            patch(&current, &desired).unwrap(),
            serde_json::json!({"metadata": {"annotations": {ENDPOINT: "e", POD_CIDRS: null}}})
        );
        current.remove(POD_CIDRS);
        current.insert(ENDPOINT.into(), "e".into());
        assert_eq!(patch(&current, &desired), None);
    }

    #[test]
    fn a_policy_status_reads_only_as_written() {
        let applied = PolicyApplied {
            policies: 3,
            revision: 4711,
        };
        assert_eq!(applied.to_string(), "policies=3,revision=4711");
        assert_eq!("policies=3,revision=4711".parse(), Ok(applied));
        assert_eq!(
            "policies=0,revision=0".parse(),
            Ok(PolicyApplied::default())
        );
        for bad in [
            "",
            "policies=3",
            "revision=4711,policies=3",
            "policies=3,revision=4711,extra=1",
            "policies=-3,revision=4711",
            "policies=+3,revision=4711",
            "policies= 3,revision=4711",
            "policies=3,revision=",
            "policies=3;revision=4711",
            "policies=99999999999999999999999,revision=1",
        ] {
            let e = bad.parse::<PolicyApplied>().expect_err(bad);
            assert!(e.contains(POLICY_APPLIED), "{bad:?}: {e}");
        }
    }

    #[test]
    fn post_quantum_reports_round_trip_and_bad_ones_name_the_annotation() {
        for text in ["prefer", "require", "require:node-2,node-3"] {
            let r: PostQuantum = text.parse().unwrap();
            assert_eq!(r.to_string(), text);
        }
        for bad in ["off", "", "require:Node_2", "prefer:a,a", "require:a:b"] {
            let e = bad.parse::<PostQuantum>().unwrap_err();
            assert!(e.contains(POST_QUANTUM), "{bad:?}: {e}");
        }
    }

    /// Count and newest resourceVersion; a version that is not a number
    /// counts as 0 (never newer than a real one).
    #[test]
    fn a_policy_set_is_its_size_and_newest_version() {
        let meta = |rv: &str| ObjectMeta {
            resource_version: Some(rv.into()),
            ..Default::default()
        };
        let metas = [meta("12"), meta("40"), meta("x"), meta("7")];
        assert_eq!(
            PolicyApplied::of(&metas),
            PolicyApplied {
                policies: 4,
                revision: 40
            }
        );
        assert_eq!(PolicyApplied::of([]), PolicyApplied::default());
    }
}
