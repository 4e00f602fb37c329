//! Element changes straight over nfnetlink: what a pod change needs (plain
//! set and verdict map elements added and removed) as one batch, which the
//! kernel runs as one transaction — without `nft`, which parses its input
//! and reads the table back into its cache on every run (tens of
//! milliseconds at 10,000 pods, however small the change).
//!
//! The same batches fill a freshly loaded table's plain sets and maps, and
//! one request asks whether the table exists. The socket stays open
//! between transactions ([`Socket`]).
//!
//! No crate encodes verdict-map elements or concatenated keys (rustables
//! has key-only elements; nftnl needs the C libraries), and the handful of
//! messages here are plain netlink attributes, so they are written out.

use std::io::Read;
use std::net::IpAddr;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol as SocketProtocol, Socket as Socket2, Type};

use crate::model::Protocol;
use crate::nft::Command;
use crate::render::{Element, TABLE};

const AF_NETLINK: i32 = 16;
const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NFPROTO_INET: u8 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;
/// An attribute's length is 16 bits: elements go in messages of at most
/// this many bytes of them.
const ELEMENTS_PER_MESSAGE_BYTES: usize = 60_000;
/// How long the kernel may take to answer before the batch counts as failed.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// One element as the kernel stores it: key bytes, and for a map entry the
/// chain it jumps to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    key: Vec<u8>,
    jump: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Op {
    add: bool,
    set: String,
    items: Vec<Item>,
}

/// Element commands ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<Op>,
}

fn address(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// The key of a plain-set element; `None` for interval elements, which the
/// kernel stores as start and end and `nft` computes.
fn key(element: &Element) -> Option<Vec<u8>> {
    match element {
        Element::Host(ip) => Some(address(ip)),
        // A concatenation: each field in its own 32-bit registers.
        Element::Named(t) => {
            let mut key = address(&t.address);
            key.extend([protocol_number(t.protocol), 0, 0, 0]);
            key.extend(t.port.to_be_bytes());
            key.extend([0, 0]);
            Some(key)
        }
        Element::Net(_) | Element::Ports(_) => None,
    }
}

impl Batch {
    /// The batch doing `commands`, if they only add and remove plain set
    /// and map elements.
    pub fn of(commands: &[Command]) -> Option<Self> {
        let ops = commands
            .iter()
            .map(|c| match c {
                Command::Elements { add, set, elements } => Some(Op {
                    add: *add,
                    set: set.clone(),
                    items: elements
                        .iter()
                        .map(|e| {
                            Some(Item {
                                key: key(e)?,
                                jump: None,
                            })
                        })
                        .collect::<Option<_>>()?,
                }),
                Command::Jumps { add, map, entries } => Some(Op {
                    add: *add,
                    set: map.name(),
                    items: entries
                        .iter()
                        .map(|(ip, chain)| Item {
                            key: address(ip),
                            jump: Some(chain.clone()),
                        })
                        .collect(),
                }),
                _ => None,
            })
            .collect::<Option<Vec<Op>>>()?;
        (!ops.is_empty()).then_some(Self { ops })
    }

    /// The datagram: batch begin, one message per op (per chunk of
    /// elements), batch end; sequence numbers from `seq`. Returns the
    /// sequence numbers of the element messages. Only the last asks for an
    /// acknowledgement (the kernel reports any refusal anyway): one per
    /// message would carry each message back and overflow the socket.
    fn encode(&self, seq: u32) -> (Vec<u8>, Vec<u32>) {
        let mut out = Vec::new();
        let mut seqs = Vec::new();
        let mut seq = seq;
        message(
            &mut out,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            seq,
            0,
            |_| {},
        );
        let messages: Vec<(&Op, &[Item])> = self
            .ops
            .iter()
            .flat_map(|op| chunks(&op.items).into_iter().map(move |c| (op, c)))
            .collect();
        for (i, (op, chunk)) in messages.iter().enumerate() {
            let (kind, mut flags) = if op.add {
                (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE)
            } else {
                (NFT_MSG_DELSETELEM, NLM_F_REQUEST)
            };
            if i + 1 == messages.len() {
                flags |= NLM_F_ACK;
            }
            seq += 1;
            seqs.push(seq);
            let kind = (NFNL_SUBSYS_NFTABLES << 8) | kind;
            message(&mut out, kind, flags, seq, NFPROTO_INET, |m| {
                attr_str(m, NFTA_SET_ELEM_LIST_TABLE, TABLE);
                attr_str(m, NFTA_SET_ELEM_LIST_SET, &op.set);
                nest(m, NFTA_SET_ELEM_LIST_ELEMENTS, |m| {
                    for item in *chunk {
                        nest(m, NFTA_LIST_ELEM, |m| element(m, item));
                    }
                });
            });
        }
        seq += 1;
        message(&mut out, NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, |_| {});
        (out, seqs)
    }
}

/// A netlink socket to nf_tables in the network namespace it was opened
/// in, kept open: closing one waits for the kernel to finish freeing what
/// its transactions removed (an RCU grace period, milliseconds), which an
/// agent applying change after change should not pay each time.
pub struct Socket {
    socket: Socket2,
    seq: u32,
}

/// Why a policy transaction or a read of nf_tables failed.
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error("nfnetlink {step}: {source}")]
    Netlink {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("nfnetlink {what} refused: {why}")]
    Refused { what: String, why: String },
    #[error("{what}: {message}")]
    Nft { what: &'static str, message: String },
    #[error("the nf_tables task ended abnormally: {0}")]
    Task(String),
}

fn io_error(step: &'static str) -> impl FnOnce(std::io::Error) -> EnforceError {
    move |source| EnforceError::Netlink { step, source }
}

impl Socket {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, EnforceError> {
        let socket = Socket2::new(
            Domain::from(AF_NETLINK),
            Type::RAW,
            Some(SocketProtocol::from(NETLINK_NETFILTER)),
        )
        .map_err(io_error("socket"))?;
        socket
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(io_error("timeout"))?;
        Ok(Self { socket, seq: 0 })
    }

    /// Whether table `name` of the inet family exists.
    pub fn table_exists(&mut self, name: &str) -> Result<bool, EnforceError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut request = Vec::new();
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE;
        message(
            &mut request,
            kind,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            NFPROTO_INET,
            |m| attr_str(m, NFTA_TABLE_NAME, name),
        );
        match self.exchange(&request, &[seq])?.first() {
            None => Ok(true),
            Some((_, e)) if *e == -2 => Ok(false),
            Some((_, e)) => Err(EnforceError::Refused {
                what: format!("asking for table {name}"),
                why: std::io::Error::from_raw_os_error(-e).to_string(),
            }),
        }
    }

    /// Sends `datagram` (messages numbered `ours`, the last asking for an
    /// acknowledgement) and reads answers until the last is acknowledged or
    /// one is refused; returns the refusals.
    fn exchange(&mut self, datagram: &[u8], ours: &[u32]) -> Result<Vec<(u32, i32)>, EnforceError> {
        // A batch is one datagram and must fit the send buffer whole. A
        // fresh table's elements run to megabytes, past the usual wmem_max
        // (208 KiB) that caps SO_SNDBUF; SO_SNDBUFFORCE (CAP_NET_ADMIN,
        // which meshd has) is not capped.
        let size = datagram.len() * 2;
        if setsockopt(&self.socket, sockopt::SndBufForce, &size).is_err() {
            let _ = self.socket.set_send_buffer_size(size);
        }
        let sent = self.socket.send(datagram).map_err(io_error("send"))?;
        if sent != datagram.len() {
            return Err(EnforceError::Refused {
                what: "send".into(),
                why: format!("{sent} of {} bytes sent", datagram.len()),
            });
        }
        let mut buf = vec![0u8; 64 * 1024];
        let mut refused = Vec::new();
        let mut done = ours.is_empty();
        while !done && refused.is_empty() {
            let n = (&self.socket).read(&mut buf).map_err(io_error("answer"))?;
            // Answers to an earlier batch that failed part-way are not ours.
            for (seq, error) in answers(&buf[..n]) {
                if !ours.contains(&seq) {
                    continue;
                }
                done |= Some(&seq) == ours.last();
                if error != 0 {
                    refused.push((seq, error));
                }
            }
        }
        Ok(refused)
    }

    /// Sends `batch` and waits for the kernel to acknowledge every message;
    /// any error aborts the whole transaction, and is returned.
    pub fn send(&mut self, batch: &Batch) -> Result<(), EnforceError> {
        let (datagram, seqs) = batch.encode(self.seq.wrapping_add(1));
        self.seq = self.seq.wrapping_add(seqs.len() as u32 + 2);
        let refused = self.exchange(&datagram, &seqs)?;
        if refused.is_empty() {
            return Ok(());
        }
        let why: Vec<String> = refused
            .iter()
            .map(|(seq, e)| format!("message {seq}: {}", std::io::Error::from_raw_os_error(-e)))
            .collect();
        Err(EnforceError::Refused {
            what: "element batch".into(),
            why: why.join("; "),
        })
    }
}

/// Splits items so each message's element attribute stays within its
/// 16-bit length.
fn chunks(items: &[Item]) -> Vec<&[Item]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, item) in items.iter().enumerate() {
        let size = 32 + item.key.len() + item.jump.as_ref().map_or(0, |c| 40 + c.len());
        if bytes + size > ELEMENTS_PER_MESSAGE_BYTES && i > start {
            out.push(&items[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

fn element(m: &mut Vec<u8>, item: &Item) {
    nest(m, NFTA_SET_ELEM_KEY, |m| {
        attr(m, NFTA_DATA_VALUE, &item.key)
    });
    if let Some(chain) = &item.jump {
        nest(m, NFTA_SET_ELEM_DATA, |m| {
            nest(m, NFTA_DATA_VERDICT, |m| {
                attr(m, NFTA_VERDICT_CODE, &NFT_JUMP.to_be_bytes());
                attr_str(m, NFTA_VERDICT_CHAIN, chain);
            });
        });
    }
}

fn pad(m: &mut Vec<u8>) {
    while !m.len().is_multiple_of(4) {
        m.push(0);
    }
}

fn attr(m: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    m.extend((len as u16).to_ne_bytes());
    m.extend(kind.to_ne_bytes());
    m.extend(value);
    pad(m);
}

fn attr_str(m: &mut Vec<u8>, kind: u16, value: &str) {
    let mut bytes = value.as_bytes().to_vec();
    bytes.push(0);
    attr(m, kind, &bytes);
}

fn nest(m: &mut Vec<u8>, kind: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = m.len();
    m.extend([0u8; 4]);
    body(m);
    let len = (m.len() - start) as u16;
    m[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    m[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

/// A netlink message with the nfnetlink header (family, version 0, and the
/// nftables subsystem as resource id on batch delimiters).
fn message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.extend([0u8; 4]);
    out.extend(kind.to_ne_bytes());
    out.extend(flags.to_ne_bytes());
    out.extend(seq.to_ne_bytes());
    out.extend(0u32.to_ne_bytes());
    let res_id = if family == 0 { NFNL_SUBSYS_NFTABLES } else { 0 };
    out.extend([family, 0]);
    out.extend(res_id.to_be_bytes());
    body(out);
    pad(out);
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// The (sequence number, error) of each acknowledgement or error in a
/// datagram from the kernel (error 0: acknowledged).
fn answers(datagram: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= datagram.len() {
        let word = |i: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&datagram[i..i + 4]);
            w
        };
        let len = u32::from_ne_bytes(word(at)) as usize;
        let kind = u16::from_ne_bytes([datagram[at + 4], datagram[at + 5]]);
        if len < 16 || at + len > datagram.len() {
            break;
        }
        if kind == NLMSG_ERROR && len >= 20 {
            let seq = u32::from_ne_bytes(word(at + 8));
            out.push((seq, i32::from_ne_bytes(word(at + 16))));
        }
        at += (len + 3) & !3;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::NamedTarget;
    use crate::render::MapName;

    #[test]
    fn only_plain_elements_go_over_netlink() {
        let host = Element::Host("198.19.1.5".parse().unwrap());
        let plain = [Command::Elements {
            add: true,
            set: "a-1-4".into(),
            elements: vec![host],
        }];
        assert!(Batch::of(&plain).is_some());
        let net = Element::Net("198.19.0.0/16".parse().unwrap());
        let interval = [Command::Elements {
            add: true,
            set: "b-1-4".into(),
            elements: vec![net],
        }];
        assert!(Batch::of(&interval).is_none());
        assert!(Batch::of(&[Command::AddChain("x".into())]).is_none());
    }

    #[test]
    fn keys_are_laid_out_as_the_kernel_registers_hold_them() {
        let named = Element::Named(NamedTarget {
            address: "198.19.1.5".parse().unwrap(),
            protocol: Protocol::Udp,
            port: 53,
        });
        assert_eq!(
            key(&named).unwrap(),
            [198, 19, 1, 5, 17, 0, 0, 0, 0, 53, 0, 0]
        );
        let v6 = Element::Host("fd98:19::1".parse().unwrap());
        assert_eq!(key(&v6).unwrap().len(), 16);
    }

    #[test]
    fn a_batch_is_delimited_and_each_message_is_acknowledged() {
        let map = MapName::ALL[0];
        let entries = (0..3000u32)
            .map(|i| (IpAddr::from(i.to_be_bytes()), format!("gi-{i:016x}")))
            .collect();
        let batch = Batch::of(&[Command::Jumps {
            add: true,
            map,
            entries,
        }])
        .unwrap();
        let (datagram, acked) = batch.encode(7);
        // 3,000 entries do not fit one 64 KiB attribute.
        assert!(acked.len() > 1, "{acked:?}");
        assert_eq!(acked[0], 8);
        // Messages tile the datagram exactly, begin and end included.
        let mut at = 0;
        let mut kinds = Vec::new();
        while at < datagram.len() {
            let len = u32::from_ne_bytes(datagram[at..at + 4].try_into().unwrap()) as usize;
            kinds.push(u16::from_ne_bytes([datagram[at + 4], datagram[at + 5]]));
            at += len;
        }
        assert_eq!(at, datagram.len());
        assert_eq!(kinds.first(), Some(&NFNL_MSG_BATCH_BEGIN));
        assert_eq!(kinds.last(), Some(&NFNL_MSG_BATCH_END));
        assert_eq!(kinds.len(), acked.len() + 2);
    }

    #[test]
    fn answers_are_read_per_sequence_number() {
        let mut datagram = Vec::new();
        for (seq, error) in [(3u32, 0i32), (4, -2)] {
            datagram.extend(36u32.to_ne_bytes());
            datagram.extend(NLMSG_ERROR.to_ne_bytes());
            datagram.extend(0u16.to_ne_bytes());
            datagram.extend(seq.to_ne_bytes());
            datagram.extend(0u32.to_ne_bytes());
            datagram.extend(error.to_ne_bytes());
            datagram.extend([0u8; 16]);
        }
        assert_eq!(answers(&datagram), vec![(3, 0), (4, -2)]);
    }
}
