//! WireGuard datagrams an attacker can make from public data alone, for
//! tests that prove a device is not moved by them (docs/security.md, "Only
//! authenticated packets count"): an initiation claiming a peer's static
//! key (mac1 and the encrypted static need only the device's public key;
//! the timestamp cannot be sealed without the peer's private key, so it is
//! noise), a data message with a known or guessed receiver index and
//! noise for ciphertext, and a cookie reply (sealed with a key derived from
//! the peer's public key, over the mac1 the device last sent).
//!
//! Pure builders plus [`flood`], which sends them from the calling
//! process's network namespace (`ip netns exec NS meshlab forge …`).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::{Aead, AeadCore, Payload};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use rand_core::{OsRng, RngCore};
use weft_keys::PublicKey;

const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
const LABEL_MAC1: &[u8] = b"mac1----";
const LABEL_COOKIE: &[u8] = b"cookie--";

/// Where mac1 sits in an initiation (and the length it covers).
pub const INITIATION_MAC1: usize = 116;
/// Where mac1 sits in a response.
pub const RESPONSE_MAC1: usize = 60;

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

/// HMAC-BLAKE2s (RFC 2104 over a 64-byte block), the protocol's KDF step.
fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let mut inner = Blake2s256::new();
    Digest::update(&mut inner, pad(0x36));
    for p in parts {
        Digest::update(&mut inner, p);
    }
    let inner: [u8; 32] = inner.finalize().into();
    hash(&[&pad(0x5c), &inner])
}

fn mac16(key: &[u8; 32], data: &[u8]) -> [u8; 16] {
    let mut mac = <Blake2sMac<blake2::digest::consts::U16> as KeyInit>::new_from_slice(key)
        .expect("a 32-byte key fits BLAKE2s");
    mac.update(data);
    mac.finalize_fixed().into()
}

/// A handshake initiation to the device `to` claiming to come from
/// `claimed` (a peer of it), with sender index `sender`. It gets as far as
/// the peer lookup; its timestamp cannot decrypt.
pub fn initiation(to: &PublicKey, claimed: &PublicKey, sender: u32) -> [u8; 148] {
    let ephemeral = x25519_dalek::StaticSecret::random_from_rng(OsRng);
    initiate(to, Claim::Public(claimed), &ephemeral, sender).0
}

/// A real initiation from the peer whose private key is `me`, with the
/// ephemeral key `ephemeral`: whoever holds both secrets (as a capture's
/// attacker would who recovered them) can follow the handshake to its
/// transport keys — but for the preshared key ([`transport`]).
pub fn initiation_as(
    to: &PublicKey,
    me: &x25519_dalek::StaticSecret,
    ephemeral: &x25519_dalek::StaticSecret,
    sender: u32,
) -> ([u8; 148], Handshake) {
    initiate(to, Claim::Private(me), ephemeral, sender)
}

/// Who an initiation says it is from: a public key alone (its timestamp
/// is then noise) or the private key that seals it.
enum Claim<'a> {
    Public(&'a PublicKey),
    Private(&'a x25519_dalek::StaticSecret),
}

/// What an initiator keeps for the response.
pub struct Handshake {
    chain: [u8; 32],
    h: [u8; 32],
    ephemeral: x25519_dalek::StaticSecret,
    me: Option<x25519_dalek::StaticSecret>,
    sender: u32,
}

fn seal(key: &[u8; 32], counter: u64, msg: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&counter.to_le_bytes());
    ChaCha20Poly1305::new(key.into())
        .encrypt(&nonce.into(), Payload { msg, aad })
        .expect("sealing fits in memory")
}

fn open(key: &[u8; 32], counter: u64, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&counter.to_le_bytes());
    ChaCha20Poly1305::new(key.into())
        .decrypt(&nonce.into(), Payload { msg: sealed, aad })
        .ok()
}

/// TAI64N now: what a real initiation seals, newer than the last one the
/// device accepted from the peer. Kernel WireGuard counts from 2^62 + 10,
/// boringtun (Weft's device) from 2^62 + 37; this is a second past both
/// (the peer's own initiations are taken for replays for that long).
fn tai64n_now() -> [u8; 12] {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        + Duration::from_secs(1);
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&((1u64 << 62) + 37 + now.as_secs()).to_be_bytes());
    t[8..].copy_from_slice(&now.subsec_nanos().to_be_bytes());
    t
}

fn initiate(
    to: &PublicKey,
    claim: Claim,
    ephemeral: &x25519_dalek::StaticSecret,
    sender: u32,
) -> ([u8; 148], Handshake) {
    let responder = to.as_bytes();
    let responder_key = x25519_dalek::PublicKey::from(*responder);
    let ephemeral_public = x25519_dalek::PublicKey::from(ephemeral);
    let chain = hash(&[CONSTRUCTION]);
    let mut h = hash(&[&hash(&[&chain, IDENTIFIER]), responder]);
    h = hash(&[&h, ephemeral_public.as_bytes()]);
    let chain = hmac(&hmac(&chain, &[ephemeral_public.as_bytes()]), &[&[1]]);
    let shared = ephemeral.diffie_hellman(&responder_key);
    let temp = hmac(&chain, &[shared.as_bytes()]);
    let chain = hmac(&temp, &[&[1]]);
    let key = hmac(&temp, &[&chain, &[2]]);
    let (claimed, me) = match claim {
        Claim::Public(k) => (*k.as_bytes(), None),
        Claim::Private(s) => (x25519_dalek::PublicKey::from(s).to_bytes(), Some(s.clone())),
    };
    let sealed_static = seal(&key, 0, &claimed, &h);
    h = hash(&[&h, &sealed_static]);

    let mut m = [0u8; 148];
    m[0] = 1;
    m[4..8].copy_from_slice(&sender.to_le_bytes());
    m[8..40].copy_from_slice(ephemeral_public.as_bytes());
    m[40..88].copy_from_slice(&sealed_static);
    let mut chain = chain;
    match &me {
        Some(me) => {
            let temp = hmac(&chain, &[me.diffie_hellman(&responder_key).as_bytes()]);
            chain = hmac(&temp, &[&[1]]);
            let key = hmac(&temp, &[&chain, &[2]]);
            let timestamp = seal(&key, 0, &tai64n_now(), &h);
            h = hash(&[&h, &timestamp]);
            m[88..INITIATION_MAC1].copy_from_slice(&timestamp);
        }
        // The timestamp: sealing it needs the claimed peer's private key.
        None => OsRng.fill_bytes(&mut m[88..INITIATION_MAC1]),
    }
    let mac1 = mac16(&hash(&[LABEL_MAC1, responder]), &m[..INITIATION_MAC1]);
    m[INITIATION_MAC1..INITIATION_MAC1 + 16].copy_from_slice(&mac1);
    let handshake = Handshake {
        chain,
        h,
        ephemeral: ephemeral.clone(),
        me,
        sender,
    };
    (m, handshake)
}

/// One session's transport keys, as the initiator holds them.
pub struct Transport {
    pub send: [u8; 32],
    pub receive: [u8; 32],
    /// The responder's index: what data sent to it carries.
    pub receiver: u32,
}

/// Follows `response` to the transport keys with the preshared key `psk`
/// (all zero: none): the keys, and whether the response authenticated
/// under that key (with the wrong one it does not, and the keys are not
/// the session's). `None`: not a response to this handshake.
pub fn transport(hs: &Handshake, response: &[u8], psk: &[u8; 32]) -> Option<(Transport, bool)> {
    if response.len() != 92 || response[0] != 2 {
        return None;
    }
    if response[8..12] != hs.sender.to_le_bytes() {
        return None;
    }
    let me = hs.me.as_ref()?;
    let receiver = u32::from_le_bytes(response[4..8].try_into().ok()?);
    let e_r: [u8; 32] = response[12..44].try_into().ok()?;
    let e_r_key = x25519_dalek::PublicKey::from(e_r);
    let mut h = hash(&[&hs.h, &e_r]);
    let mut chain = hmac(&hmac(&hs.chain, &[&e_r]), &[&[1]]);
    for shared in [
        hs.ephemeral.diffie_hellman(&e_r_key),
        me.diffie_hellman(&e_r_key),
    ] {
        chain = hmac(&hmac(&chain, &[shared.as_bytes()]), &[&[1]]);
    }
    let temp = hmac(&chain, &[psk]);
    chain = hmac(&temp, &[&[1]]);
    let tau = hmac(&temp, &[&chain, &[2]]);
    let key = hmac(&temp, &[&tau, &[3]]);
    h = hash(&[&h, &tau]);
    let authenticated = open(&key, 0, &response[44..60], &h).is_some();
    let temp = hmac(&chain, &[]);
    let send = hmac(&temp, &[&[1]]);
    let receive = hmac(&temp, &[&send, &[2]]);
    Some((
        Transport {
            send,
            receive,
            receiver,
        },
        authenticated,
    ))
}

impl Transport {
    /// A data message carrying `packet`.
    pub fn seal(&self, counter: u64, packet: &[u8]) -> Vec<u8> {
        let mut m = vec![4, 0, 0, 0];
        m.extend_from_slice(&self.receiver.to_le_bytes());
        m.extend_from_slice(&counter.to_le_bytes());
        m.extend_from_slice(&seal(&self.send, counter, packet, &[]));
        m
    }

    /// The packet a data message to this end carries, if these keys open it.
    pub fn open(&self, message: &[u8]) -> Option<Vec<u8>> {
        if message.len() < 32 || message[0] != 4 {
            return None;
        }
        let counter = u64::from_le_bytes(message[8..16].try_into().ok()?);
        open(&self.receive, counter, &message[16..], &[])
    }
}

/// A data message for `receiver` with noise for ciphertext (`len` bytes
/// in all, at least the 32 of an empty message).
pub fn data(receiver: u32, counter: u64, len: usize) -> Vec<u8> {
    let mut m = vec![0u8; len.max(32)];
    m[0] = 4;
    m[4..8].copy_from_slice(&receiver.to_le_bytes());
    m[8..16].copy_from_slice(&counter.to_le_bytes());
    OsRng.fill_bytes(&mut m[16..]);
    m
}

/// A cookie reply to the device's last handshake message, which had sender
/// index `receiver` and mac1 `mac1`, as if from the peer `from`.
pub fn cookie_reply(from: &PublicKey, receiver: u32, mac1: &[u8; 16]) -> [u8; 64] {
    let key = hash(&[LABEL_COOKIE, from.as_bytes()]);
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let mut cookie = [0u8; 16];
    OsRng.fill_bytes(&mut cookie);
    let sealed = XChaCha20Poly1305::new((&key).into())
        .encrypt(
            &nonce,
            Payload {
                msg: &cookie,
                aad: mac1,
            },
        )
        .expect("sealing 16 bytes");
    let mut m = [0u8; 64];
    m[0] = 3;
    m[4..8].copy_from_slice(&receiver.to_le_bytes());
    m[8..32].copy_from_slice(&nonce);
    m[32..].copy_from_slice(&sealed);
    m
}

/// What a flood sends to a device each round.
pub struct Target {
    pub to: SocketAddr,
    /// The device's public key.
    pub device: PublicKey,
    /// Peers of the device to claim in initiations (and cookie replies).
    pub claims: Vec<PublicKey>,
    /// Receiver indices for data messages (known, or guessed around one).
    pub indices: Vec<u32>,
    /// The sender index and mac1 of the device's last handshake message,
    /// for cookie replies.
    pub cookie: Option<(u32, [u8; 16])>,
}

/// Sends the target its forgeries every `every` for `duration`; returns
/// the datagrams sent.
pub fn flood(t: &Target, every: Duration, duration: Duration) -> std::io::Result<u64> {
    let socket = UdpSocket::bind(("0.0.0.0", 0))?;
    let start = Instant::now();
    let mut sent = 0;
    let mut counter = 0u64;
    while start.elapsed() < duration {
        for claimed in &t.claims {
            socket.send_to(&initiation(&t.device, claimed, OsRng.next_u32()), t.to)?;
            if let Some((receiver, mac1)) = &t.cookie {
                socket.send_to(&cookie_reply(claimed, *receiver, mac1), t.to)?;
                sent += 1;
            }
            sent += 1;
        }
        for &index in &t.indices {
            socket.send_to(&data(index, counter, 32), t.to)?;
            sent += 1;
        }
        counter += 1;
        std::thread::sleep(every);
    }
    Ok(sent)
}

/// Parses `INDEX:MAC1` (decimal sender index, 32 hex digits of mac1).
pub fn parse_cookie_target(text: &str) -> Result<(u32, [u8; 16]), String> {
    let bad = || format!("{text:?}: expected INDEX:MAC1 (decimal, 32 hex digits)");
    let (index, mac1) = text.split_once(':').ok_or_else(bad)?;
    let index = index.parse().map_err(|_| bad())?;
    let mut out = [0u8; 16];
    if mac1.len() != 32 {
        return Err(bad());
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&mac1[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok((index, out))
}

#[cfg(test)]
mod tests {
    use boringtun::noise::handshake::parse_handshake_anon;
    use boringtun::noise::{Packet, Tunn, TunnResult};
    use weft_keys::PrivateKey;

    use super::*;

    fn x25519(key: &PublicKey) -> boringtun::x25519::PublicKey {
        boringtun::x25519::PublicKey::from(*key.as_bytes())
    }

    /// A forged initiation names the claimed peer to the device (what the
    /// device looks the peer up by) and fails only at its timestamp.
    #[test]
    fn a_forged_initiation_names_the_claimed_peer_and_no_more() {
        let (device, peer) = (PrivateKey::generate(), PrivateKey::generate());
        let forged = initiation(&device.public_key(), &peer.public_key(), 7);
        let Ok(Packet::HandshakeInit(init)) = Tunn::parse_incoming_packet(&forged) else {
            panic!("not an initiation")
        };
        let half = parse_handshake_anon(&device.secret(), &x25519(&device.public_key()), &init)
            .expect("mac1 and the static decrypt with public data");
        assert_eq!(half.peer_static_public, *peer.public_key().as_bytes());

        let mut tunn = Tunn::new(
            device.secret(),
            x25519(&peer.public_key()),
            None,
            None,
            1,
            None,
        );
        let mut out = [0u8; 256];
        assert!(matches!(
            tunn.decapsulate(None, &forged, &mut out),
            TunnResult::Err(_)
        ));
    }

    /// The full initiator against boringtun's responder: a session both
    /// ways under the preshared key; without it the response does not
    /// authenticate and the transport keys open nothing.
    #[test]
    fn the_initiator_makes_a_session_only_with_the_preshared_key() {
        let (device, me) = (PrivateKey::generate(), PrivateKey::generate());
        let psk = [9u8; 32];
        let mut tunn = Tunn::new(
            device.secret(),
            x25519(&me.public_key()),
            Some(psk),
            None,
            1,
            None,
        );
        let ephemeral = x25519_dalek::StaticSecret::random_from_rng(OsRng);
        let (init, hs) = initiation_as(&device.public_key(), &me.secret(), &ephemeral, 42);
        let mut out = [0u8; 2048];
        let TunnResult::WriteToNetwork(response) = tunn.decapsulate(None, &init, &mut out) else {
            panic!("the initiation was not answered")
        };
        let response = response.to_vec();
        let (keys, authenticated) = transport(&hs, &response, &psk).expect("a response");
        assert!(authenticated);
        let mut packet = [0u8; 40];
        packet[0] = 0x45;
        packet[3] = 40;
        let mut out = [0u8; 2048];
        assert!(matches!(
            tunn.decapsulate(None, &keys.seal(0, &packet), &mut out),
            TunnResult::WriteToTunnelV4(p, _) if p == packet
        ));
        let mut out = [0u8; 2048];
        let TunnResult::WriteToNetwork(reply) = tunn.encapsulate(&packet, &mut out) else {
            panic!("nothing sent")
        };
        assert_eq!(keys.open(reply).as_deref(), Some(&packet[..]));
        let (guess, authenticated) = transport(&hs, &response, &[0; 32]).expect("a response");
        assert!(!authenticated);
        assert!(guess.open(reply).is_none());
    }

    /// A forged cookie reply to a device's initiation is accepted by it:
    /// only the peer's public key and the initiation's mac1 went into it.
    #[test]
    fn a_forged_cookie_reply_is_accepted() {
        let (device, peer) = (PrivateKey::generate(), PrivateKey::generate());
        let mut tunn = Tunn::new(
            device.secret(),
            x25519(&peer.public_key()),
            None,
            None,
            1,
            None,
        );
        let mut out = [0u8; 256];
        let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut out, false)
        else {
            panic!("no initiation")
        };
        let sender = u32::from_le_bytes(init[4..8].try_into().unwrap());
        let mac1: [u8; 16] = init[INITIATION_MAC1..INITIATION_MAC1 + 16]
            .try_into()
            .unwrap();
        let forged = cookie_reply(&peer.public_key(), sender, &mac1);
        let mut out = [0u8; 256];
        assert!(matches!(
            tunn.decapsulate(None, &forged, &mut out),
            TunnResult::Done
        ));
    }
}
