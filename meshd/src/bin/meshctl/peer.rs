//! `meshctl peer`: external peers (WeftPeer objects) — add one, print the
//! stock WireGuard configuration that reaches the cluster through its
//! gateway as the cluster is now, list and remove them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde::Serialize;
use weft_keys::PrivateKey;
use weft_meshd::graph::MeshSettings;
use weft_meshd::model::{ClusterSnapshot, Verdict};
use weft_meshd::peers::{PeerSpec, PeerVerdict, WeftPeer};

use super::MeshSource;

#[derive(clap::Subcommand)]
pub enum PeerCmd {
    /// Admit a laptop, VM or site: its addresses come from the cluster's
    /// peer ranges (WEFT_PEER_CIDRS). Without --public-key a key pair is
    /// made here and the private key printed once, inside the peer's
    /// configuration (--output FILE writes it 0600).
    Add {
        name: String,
        /// The peer's WireGuard public key (base64), if it has one.
        #[arg(long)]
        public_key: Option<String>,
        /// Where gateways send to first (ADDRESS:PORT); without one they
        /// wait for the peer's handshake (a laptop behind NAT).
        #[arg(long)]
        endpoint: Option<String>,
        /// A node that may serve as its gateway (repeatable, first choice
        /// first); default: every node with a public endpoint.
        #[arg(long = "gateway")]
        gateways: Vec<String>,
        /// A cluster range (CIDR) it may reach (repeatable); default: the
        /// pod ranges.
        #[arg(long = "reach")]
        reach: Vec<IpNet>,
        #[command(flatten)]
        print: PrintArgs,
        #[command(flatten)]
        source: MeshSource,
    },
    /// The peer's WireGuard configuration as the cluster is now: its
    /// gateway's current key and endpoint, routes to the cluster's ranges.
    /// Apply it again after a gateway rotated its key or failed over:
    /// `wg syncconf IFACE <(wg-quick strip FILE)` (with the PrivateKey:
    /// syncconf resets what a file leaves out).
    Config {
        name: String,
        /// A file holding the peer's private key: the key (base64) alone,
        /// or a configuration with a PrivateKey line (the one `peer add`
        /// wrote); without it the configuration has no PrivateKey line,
        /// for you to add (it never leaves the peer).
        #[arg(long)]
        private_key: Option<PathBuf>,
        #[command(flatten)]
        print: PrintArgs,
        #[command(flatten)]
        source: MeshSource,
    },
    /// Every external peer: its addresses, key, verdict and gateway.
    List {
        #[arg(short, long, value_enum, default_value = "table")]
        output: super::Output,
        #[command(flatten)]
        source: MeshSource,
    },
    /// Remove a peer: every gateway drops its key within a second.
    Remove { name: String },
}

/// How a peer's configuration is printed.
#[derive(clap::Args)]
pub struct PrintArgs {
    /// Write the configuration here (mode 0600) instead of stdout.
    #[arg(long)]
    output_file: Option<PathBuf>,
    /// wg-quick's INI form, or JSON.
    #[arg(short, long, value_enum, default_value = "wg-quick")]
    output: ConfigFormat,
    /// The keepalive the peer sends, in seconds (keeps its NAT open).
    #[arg(long, default_value_t = 25)]
    keepalive: u16,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ConfigFormat {
    WgQuick,
    Json,
}

pub fn run(kubeconfig: Option<&Path>, cmd: PeerCmd) -> Result<String> {
    super::block_on(async move {
        let client = super::client(kubeconfig).await?;
        let api = Api::<WeftPeer>::all(client.clone());
        match cmd {
            PeerCmd::Add {
                name,
                public_key,
                endpoint,
                gateways,
                reach,
                print,
                source,
            } => {
                let (settings, _) = super::gather(&client, &source).await?;
                let taken = taken(&api).await?;
                let (private, public_key) = match public_key {
                    Some(k) => (None, k),
                    None => {
                        let private = PrivateKey::generate();
                        let public = private.public_key().to_string();
                        (Some(private), public)
                    }
                };
                let spec = PeerSpec {
                    public_key,
                    endpoint,
                    addresses: free_addresses(&settings, &taken)?
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                    reach: reach.iter().map(ToString::to_string).collect(),
                    gateways,
                };
                let object = WeftPeer {
                    metadata: kube::api::ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    spec: serde_json::to_value(&spec)?,
                    status: serde_json::Value::Null,
                };
                api.create(&PostParams::default(), &object)
                    .await
                    .with_context(|| format!("creating WeftPeer {name}"))?;
                // The gateway may not have taken it yet: the configuration
                // is the cluster's choice, which every node computes alike.
                let (settings, snapshot) = super::gather(&client, &source).await?;
                config(&name, &settings, &snapshot, private.as_ref(), &print).or_else(|e| {
                    // The key made here exists nowhere else: it is given
                    // out whatever kept the configuration from being made.
                    let Some(private) = &private else {
                        return Err(e);
                    };
                    let kept = format!(
                        "# WeftPeer {name} was created but has no configuration yet ({e:#}).\n\
                         # Its key, which exists nowhere else: keep it for\n\
                         #   meshctl peer config {name} --private-key FILE\n\
                         [Interface]\nPrivateKey = {}\n",
                        private.to_base64()
                    );
                    emit(&print, &kept)?;
                    Err(e.context(format!(
                        "WeftPeer {name} was created; its private key was printed"
                    )))
                })
            }
            PeerCmd::Config {
                name,
                private_key,
                print,
                source,
            } => {
                let private = private_key
                    .map(|path| {
                        let text = std::fs::read_to_string(&path)
                            .with_context(|| format!("--private-key {}", path.display()))?;
                        private_key_in(&text)
                            .with_context(|| format!("--private-key {}", path.display()))
                    })
                    .transpose()?;
                let (settings, snapshot) = super::gather(&client, &source).await?;
                config(&name, &settings, &snapshot, private.as_ref(), &print)
            }
            PeerCmd::List { output, source } => {
                let (settings, snapshot) = super::gather(&client, &source).await?;
                list(&settings, &snapshot, output)
            }
            PeerCmd::Remove { name } => {
                api.delete(&name, &DeleteParams::default())
                    .await
                    .with_context(|| format!("deleting WeftPeer {name}"))?;
                Ok(format!("weftpeer {name} removed\n"))
            }
        }
    })
}

/// WeftPeer `name`'s key as written.
pub async fn public_key(client: &kube::Client, name: &str) -> Result<weft_keys::PublicKey> {
    let object = Api::<WeftPeer>::all(client.clone())
        .get(name)
        .await
        .with_context(|| format!("WeftPeer {name:?}"))?;
    object
        .spec
        .get("publicKey")
        .and_then(|k| k.as_str())
        .with_context(|| format!("WeftPeer {name} has no spec.publicKey"))?
        .trim()
        .parse()
        .with_context(|| format!("WeftPeer {name}: spec.publicKey"))
}

/// Replaces WeftPeer `name`'s key (`meshctl keys rotate --peer`): with
/// `public_key`, that one (made on the peer); else a pair made here, whose
/// private key is printed once in the new configuration. Its gateway drops
/// the old key on its next pass: the peer must apply the new configuration.
pub fn rekey(
    kubeconfig: Option<&Path>,
    name: &str,
    public_key: Option<String>,
    print: &PrintArgs,
    source: &MeshSource,
) -> Result<String> {
    let (private, public) = match public_key {
        Some(k) => (
            None,
            k.trim()
                .parse::<weft_keys::PublicKey>()
                .context("--public-key")?
                .to_string(),
        ),
        None => {
            let private = PrivateKey::generate();
            let public = private.public_key().to_string();
            (Some(private), public)
        }
    };
    super::block_on(async move {
        let client = super::client(kubeconfig).await?;
        let api = Api::<WeftPeer>::all(client.clone());
        let patch = serde_json::json!({"spec": {"publicKey": public}});
        api.patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .with_context(|| format!("replacing WeftPeer {name}'s key"))?;
        let (settings, snapshot) = super::gather(&client, source).await?;
        config(name, &settings, &snapshot, private.as_ref(), print)
    })
}

/// The private key in `text`: a wg-quick configuration's PrivateKey, or
/// the key alone.
fn private_key_in(text: &str) -> Result<PrivateKey> {
    let line = text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "PrivateKey").then_some(v)
    });
    PrivateKey::from_base64(line.unwrap_or(text).trim())
        .context("expected a base64 key, or a configuration with a PrivateKey line")
}

/// Every address some WeftPeer names, read or not (a rejected object's
/// addresses are not handed out again until it is fixed or removed).
async fn taken(api: &Api<WeftPeer>) -> Result<BTreeSet<IpAddr>> {
    let list = api
        .list(&ListParams::default())
        .await
        .context("listing WeftPeers (is deploy/base/crd-weftpeers.yaml installed?)")?;
    Ok(list
        .items
        .iter()
        .filter_map(|p| p.spec.get("addresses")?.as_array().cloned())
        .flatten()
        .filter_map(|a| a.as_str()?.trim().parse().ok())
        .collect())
}

/// The lowest address of each peer range that no WeftPeer names (a
/// range's first address, its network's, is not handed out).
fn free_addresses(settings: &MeshSettings, taken: &BTreeSet<IpAddr>) -> Result<Vec<IpAddr>> {
    let Some(peers) = settings.ranges.peers else {
        bail!("WEFT_PEER_CIDRS is not set in the cluster's ConfigMap: external peers are off (docs/install.md)");
    };
    peers
        .iter()
        .map(|range| {
            range
                .hosts()
                .filter(|a| *a != range.network())
                .find(|a| !taken.contains(a))
                .with_context(|| format!("the peer range {range} is full"))
        })
        .collect()
}

/// What a peer's configuration says, as JSON prints it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PeerConfig {
    name: String,
    addresses: Vec<IpNet>,
    gateway: Gateway,
    allowed_ips: Vec<IpNet>,
    persistent_keepalive: u16,
    /// Only when known (just made, or read from --private-key).
    #[serde(skip_serializing_if = "Option::is_none")]
    private_key: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Gateway {
    node: String,
    public_key: String,
    endpoint: String,
}

/// Every node's and every WeftPeer's verdict, as every meshd reaches them.
fn judged(
    settings: &MeshSettings,
    snapshot: &ClusterSnapshot,
) -> (BTreeMap<String, Verdict>, BTreeMap<String, PeerVerdict>) {
    let verdicts = weft_meshd::planner::judge(snapshot, &settings.ranges);
    let external = weft_meshd::peers::judge(
        &snapshot.peers,
        &snapshot.nodes,
        &verdicts,
        &snapshot.revoked,
    );
    (verdicts, external)
}

/// The configuration of `name` as the cluster is now.
fn config(
    name: &str,
    settings: &MeshSettings,
    snapshot: &ClusterSnapshot,
    private: Option<&PrivateKey>,
    print: &PrintArgs,
) -> Result<String> {
    let (verdicts, external) = judged(settings, snapshot);
    let (peer, gateway) = match external.get(name) {
        None => bail!("no WeftPeer {name}"),
        Some(PeerVerdict::Rejected(e)) => bail!("WeftPeer {name} is rejected: {e}"),
        Some(PeerVerdict::Accepted { gateway: None, .. }) => {
            bail!("WeftPeer {name} has no gateway: none of its candidates is up (meshctl status)")
        }
        Some(PeerVerdict::Accepted {
            peer,
            gateway: Some(g),
        }) => (peer, g),
    };
    let Some(Verdict::Accepted(claim)) = verdicts.get(gateway) else {
        bail!("gateway {gateway} is not in the mesh");
    };
    let Some(endpoint) = claim.endpoint else {
        bail!("gateway {gateway} has no endpoint of its own");
    };
    if let Some(private) = private {
        anyhow::ensure!(
            private.public_key() == peer.public_key,
            "the private key given is not WeftPeer {name}'s (its public key is {})",
            peer.public_key
        );
    }
    let c = PeerConfig {
        name: name.to_string(),
        addresses: peer.prefixes().collect(),
        gateway: Gateway {
            node: gateway.clone(),
            public_key: claim.key_at(snapshot.now).to_string(),
            endpoint: endpoint.to_string(),
        },
        allowed_ips: peer
            .reach
            .iter()
            .chain(&settings.services)
            .copied()
            .collect(),
        persistent_keepalive: print.keepalive,
        private_key: private.map(PrivateKey::to_base64),
    };
    let text = match print.output {
        ConfigFormat::Json => serde_json::to_string_pretty(&c)? + "\n",
        ConfigFormat::WgQuick => wg_quick(&c),
    };
    emit(print, &text)
}

/// `text` to `--output-file` (what is printed then says so), else printed.
fn emit(print: &PrintArgs, text: &str) -> Result<String> {
    match &print.output_file {
        None => {
            // An error after this must not swallow it.
            print!("{text}");
            Ok(String::new())
        }
        Some(path) => {
            weft_keys::write_private(path, text.as_bytes())
                .with_context(|| format!("--output-file {}", path.display()))?;
            Ok(format!("wrote {}\n", path.display()))
        }
    }
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// wg-quick's form (also `wg syncconf`'s, once `wg-quick strip`ped).
fn wg_quick(c: &PeerConfig) -> String {
    let mut out = format!(
        "# WeftPeer {}: written by meshctl peer config. Apply it again after\n\
         # its gateway rotates its key or fails over, with its PrivateKey:\n\
         #   wg syncconf IFACE <(wg-quick strip FILE)\n\
         [Interface]\n",
        c.name
    );
    if let Some(key) = &c.private_key {
        out.push_str(&format!("PrivateKey = {key}\n"));
    }
    out.push_str(&format!("Address = {}\n\n", join(&c.addresses)));
    out.push_str(&format!(
        "[Peer]\n# gateway {}\nPublicKey = {}\nEndpoint = {}\nAllowedIPs = {}\nPersistentKeepalive = {}\n",
        c.gateway.node,
        c.gateway.public_key,
        c.gateway.endpoint,
        join(&c.allowed_ips),
        c.persistent_keepalive
    ));
    out
}

/// One row of `meshctl peer list`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    name: String,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    addresses: Vec<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    public_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway: Option<String>,
}

fn list(
    settings: &MeshSettings,
    snapshot: &ClusterSnapshot,
    output: super::Output,
) -> Result<String> {
    let (_, external) = judged(settings, snapshot);
    let rows: Vec<Row> = external
        .iter()
        .map(|(name, v)| match v {
            PeerVerdict::Accepted { peer, gateway } => Row {
                name: name.clone(),
                state: "accepted",
                reason: gateway.is_none().then(|| "no gateway is up".into()),
                addresses: peer.addresses.clone(),
                public_key: Some(peer.public_key.to_string()),
                gateway: gateway.clone(),
            },
            PeerVerdict::Rejected(e) => Row {
                name: name.clone(),
                state: "rejected",
                reason: Some(e.to_string()),
                addresses: Vec::new(),
                public_key: None,
                gateway: None,
            },
        })
        .collect();
    if matches!(output, super::Output::Json) {
        return Ok(serde_json::to_string_pretty(&rows)? + "\n");
    }
    let mut table = vec![["NAME", "STATE", "ADDRESSES", "KEY", "GATEWAY"].map(String::from)];
    for r in &rows {
        let addresses: Vec<String> = r.addresses.iter().map(ToString::to_string).collect();
        table.push([
            r.name.clone(),
            r.reason
                .as_ref()
                .map_or(r.state.to_string(), |why| format!("{}: {why}", r.state)),
            if addresses.is_empty() {
                "-".into()
            } else {
                addresses.join(",")
            },
            r.public_key
                .as_deref()
                .map_or("-".into(), |k| k.chars().take(8).collect()),
            r.gateway.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    Ok(weft_meshd::table::render(&table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_key_is_read_alone_or_from_a_configuration() {
        let key = PrivateKey::generate();
        let b64 = key.to_base64();
        for text in [
            format!("{b64}\n"),
            format!("[Interface]\nPrivateKey = {b64}\nAddress = 100.65.0.1/32\n"),
            format!("[Interface]\nPrivateKey={b64}\n"),
        ] {
            assert_eq!(
                private_key_in(&text).unwrap().public_key(),
                key.public_key()
            );
        }
        assert!(private_key_in("[Interface]\nAddress = 100.65.0.1/32\n").is_err());
    }
}
