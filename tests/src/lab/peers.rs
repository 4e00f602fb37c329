//! External peers (`meshlab peer add`): a host beyond the fabric's router,
//! like the outside host, running a stock WireGuard client — `wg-quick`
//! (the kernel's WireGuard where it has it, else wireguard-go, as wg-quick
//! itself falls back) — with the configuration `meshctl peer config`
//! printed, exactly as an admin's laptop would.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::netns::{ip_in, sysctl};
use super::state::LabDir;

/// One external peer of a lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerRecord {
    /// Its WeftPeer's name.
    pub name: String,
    /// Which of the lab's peers it is: where its link lies.
    pub index: u8,
    pub netns: String,
    /// Its WireGuard interface (wg-quick names it after the file).
    pub interface: String,
    /// Its configuration, as wg-quick reads it.
    pub config: PathBuf,
    /// Its own underlay address (beyond the fabric's router).
    pub underlay: Ipv4Addr,
    pub underlay6: Ipv6Addr,
}

/// Peer `index`'s link to the fabric: a /30 and a /64 of the documentation
/// ranges the outside host is in, `.1`/`::1` the fabric's end.
fn link(index: u8) -> (Ipv4Addr, Ipv4Addr, Ipv6Addr, Ipv6Addr) {
    let base = 64 + 4 * index;
    let v6 = |host: u16| {
        Ipv6Addr::new(
            0x2001,
            0xdb8,
            0x113,
            0x100 + u16::from(index),
            0,
            0,
            0,
            host,
        )
    };
    (
        Ipv4Addr::new(203, 0, 113, base + 1),
        Ipv4Addr::new(203, 0, 113, base + 2),
        v6(1),
        v6(2),
    )
}

/// The namespace of peer `name` of lab `lab`.
pub fn netns(lab: &str, name: &str) -> String {
    format!("{lab}-peer-{name}")
}

/// A WeftPeer name the lab can make a namespace and interface of.
pub fn check_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 12
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "peer name {name:?}: up to 12 of a-z, 0-9 and -"
    );
    Ok(())
}

/// Creates peer `name`'s host as the `index`th peer of the lab (namespace,
/// link to the fabric) and brings its WireGuard interface up with
/// `wg-quick up` of `config` (copied into the lab's directory).
pub fn add(dir: &LabDir, fabric: &str, index: u8, name: &str, config: &str) -> Result<PeerRecord> {
    check_name(name)?;
    ensure!(index < 32, "a lab has room for 32 peers");
    let ns = netns(&dir.name, name);
    let (fabric_end, own, fabric_end6, own6) = link(index);
    // Unique on the machine: wireguard-go's control socket is named after
    // the interface, in one directory for every namespace.
    let interface = format!("wp{:08x}", fnv(&format!("{}/{name}", dir.path().display())));
    let folder = dir.path().join("peers");
    std::fs::create_dir_all(&folder)?;
    let path = folder.join(format!("{interface}.conf"));
    write_private(&path, config)?;
    super::netns::ip(&["netns", "add", &ns])?;
    ip_in(&ns, &["link", "set", "lo", "up"])?;
    let fabric_port = format!("pr{index}");
    ip_in(
        &ns,
        &[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &fabric_port,
            "netns",
            fabric,
        ],
    )?;
    ip_in(
        fabric,
        &[
            "addr",
            "add",
            &format!("{fabric_end}/30"),
            "dev",
            &fabric_port,
        ],
    )?;
    ip_in(
        fabric,
        &[
            "addr",
            "add",
            &format!("{fabric_end6}/64"),
            "dev",
            &fabric_port,
            "nodad",
        ],
    )?;
    ip_in(fabric, &["link", "set", &fabric_port, "up"])?;
    ip_in(&ns, &["addr", "add", &format!("{own}/30"), "dev", "eth0"])?;
    ip_in(
        &ns,
        &["addr", "add", &format!("{own6}/64"), "dev", "eth0", "nodad"],
    )?;
    ip_in(&ns, &["link", "set", "eth0", "up"])?;
    ip_in(
        &ns,
        &["route", "add", "default", "via", &fabric_end.to_string()],
    )?;
    ip_in(
        &ns,
        &[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &fabric_end6.to_string(),
        ],
    )?;
    sysctl(&ns, "net.ipv4.conf.all.rp_filter=0")?;
    let record = PeerRecord {
        name: name.to_string(),
        index,
        netns: ns,
        interface,
        config: path,
        underlay: own,
        underlay6: own6,
    };
    wg_quick(&record, "up")?;
    Ok(record)
}

/// Applies `config` to peer `record`'s running interface as an admin does
/// after a gateway changed: `wg syncconf` of the `wg-quick strip`ped file.
/// A configuration printed without the key (`meshctl peer config` without
/// `--private-key`) gets the peer's own, as the admin adds it: `wg
/// syncconf` resets whatever a file leaves out, the key included.
pub fn apply(record: &PeerRecord, config: &str) -> Result<()> {
    let config = match config
        .lines()
        .any(|l| l.trim_start().starts_with("PrivateKey"))
    {
        true => config.to_string(),
        false => {
            let current = std::fs::read_to_string(&record.config)
                .with_context(|| format!("reading {}", record.config.display()))?;
            let key = current
                .lines()
                .find(|l| l.trim_start().starts_with("PrivateKey"))
                .context("the peer's configuration has no PrivateKey")?;
            config.replacen("[Interface]\n", &format!("[Interface]\n{key}\n"), 1)
        }
    };
    write_private(&record.config, &config)?;
    let stripped = run(
        Command::new("wg-quick").arg("strip").arg(&record.config),
        "wg-quick strip",
    )?;
    let temporary = record.config.with_extension("stripped");
    write_private(&temporary, &stripped)?;
    let synced = run(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &record.netns,
                "wg",
                "syncconf",
                &record.interface,
            ])
            .arg(&temporary),
        "wg syncconf",
    );
    let _ = std::fs::remove_file(&temporary);
    synced.map(|_| ())
}

/// Takes peer `record`'s interface down and removes its host.
pub fn remove(record: &PeerRecord) -> Result<()> {
    let down = wg_quick(record, "down");
    for pid in super::netns::pids(&record.netns) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    super::netns::delete(&record.netns)?;
    down
}

fn wg_quick(record: &PeerRecord, action: &str) -> Result<()> {
    run(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &record.netns,
                "timeout",
                "30",
                "wg-quick",
                action,
            ])
            .arg(&record.config),
        &format!("wg-quick {action} in {}", record.netns),
    )
    .map(|_| ())
}

fn run(command: &mut Command, what: &str) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {what} (install wireguard-tools)"))?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes a file holding a private key: its owner's only, whole or not.
fn write_private(path: &Path, text: &str) -> Result<()> {
    weft_keys::write_private(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// 32-bit FNV-1a: a short, fixed name for an interface.
fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}
