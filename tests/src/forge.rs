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
    let responder = to.as_bytes();
    let ephemeral = x25519_dalek::StaticSecret::random_from_rng(OsRng);
    let ephemeral_public = x25519_dalek::PublicKey::from(&ephemeral);
    let chain = hash(&[CONSTRUCTION]);
    let mut h = hash(&[&hash(&[&chain, IDENTIFIER]), responder]);
    h = hash(&[&h, ephemeral_public.as_bytes()]);
    let chain = hmac(&hmac(&chain, &[ephemeral_public.as_bytes()]), &[&[1]]);
    let shared = ephemeral.diffie_hellman(&x25519_dalek::PublicKey::from(*responder));
    let temp = hmac(&chain, &[shared.as_bytes()]);
    let chain = hmac(&temp, &[&[1]]);
    let key = hmac(&temp, &[&chain, &[2]]);
    let sealed_static = ChaCha20Poly1305::new((&key).into())
        .encrypt(
            &[0u8; 12].into(),
            Payload {
                msg: claimed.as_bytes(),
                aad: &h,
            },
        )
        .expect("sealing 32 bytes");

    let mut m = [0u8; 148];
    m[0] = 1;
    m[4..8].copy_from_slice(&sender.to_le_bytes());
    m[8..40].copy_from_slice(ephemeral_public.as_bytes());
    m[40..88].copy_from_slice(&sealed_static);
    // The timestamp: sealing it needs the claimed peer's private key.
    OsRng.fill_bytes(&mut m[88..INITIATION_MAC1]);
    let mac1 = mac16(&hash(&[LABEL_MAC1, responder]), &m[..INITIATION_MAC1]);
    m[INITIATION_MAC1..INITIATION_MAC1 + 16].copy_from_slice(&mac1);
    m
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
