//! A fresh table whose elements make a netlink batch larger than the
//! host's socket buffer limit (`net.core.wmem_max`) still loads: the batch
//! is one datagram, so the session forces its send buffer past the limit.

use std::process::Command;

use weft_policy::nft;
use weft_policy::render::{Element, Ruleset, Set, SetKind, TABLE};

const NODE: &str = "polt-large";

struct Netns;

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", NODE]).output();
    }
}

#[test]
fn a_fresh_table_larger_than_wmem_max_loads_in_one_batch() {
    let _ = Command::new("ip").args(["netns", "del", NODE]).output();
    assert!(Command::new("ip")
        .args(["netns", "add", NODE])
        .status()
        .unwrap()
        .success());
    let _netns = Netns;
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // 16 bytes of netlink per IPv4 element; the kernel doubles a socket
    // buffer size it is given, so go past twice the limit.
    let count = (2 * wmem_max / 16 + 50_000).min(1 << 22) as u32;
    let elements = (0..count)
        .map(|i| Element::Host(std::net::Ipv4Addr::from(0x0a00_0000 + i).into()))
        .collect();
    let mut rs = Ruleset::default();
    rs.sets.insert(
        "a-large-4".into(),
        Set {
            kind: SetKind::Hosts { v4: true },
            elements,
        },
    );
    let (transaction, changes) = nft::fresh(&rs);
    assert_eq!(changes.elements_added, count as usize);
    let node = std::fs::File::open(format!("/run/netns/{NODE}")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&node, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        nft::Session::open()?.apply(&transaction)
    })
    .join()
    .unwrap()
    .unwrap_or_else(|e| panic!("{count} elements (wmem_max {wmem_max}): {e}"));
    let last = std::net::Ipv4Addr::from(0x0a00_0000 + count - 1).to_string();
    let found = Command::new("ip")
        .args([
            "netns", "exec", NODE, "nft", "get", "element", "inet", TABLE,
        ])
        .args(["a-large-4", &format!("{{ {last} }}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "the last element is missing: {}",
        String::from_utf8_lossy(&found.stderr)
    );
}
