//! X25519 keys in WireGuard's text form: 32 bytes, standard base64 with
//! padding (44 characters), exactly as `wg genkey` / `wg pubkey` print them.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use x25519_dalek::{PublicKey as DalekPublic, StaticSecret};

/// Why a key's text form was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    #[error("not base64: {0}")]
    Base64(String),
    #[error("a WireGuard key is 32 bytes, this is {0}")]
    Length(usize),
    #[error("the all-zero key is not a usable public key")]
    Zero,
}

/// Why a fixed-size value's base64 text was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decode {
    Base64(String),
    /// The length in bytes it would have had.
    Length(usize),
}

/// `N` bytes from standard base64 with padding. Longer input is refused
/// before it is decoded (an oversized annotation costs no large decode).
pub(crate) fn decode_exact<const N: usize>(text: &str) -> Result<[u8; N], Decode> {
    let text = text.trim();
    if text.len() != N.div_ceil(3) * 4 {
        return Err(Decode::Length(text.len() * 3 / 4));
    }
    let bytes = STANDARD
        .decode(text)
        .map_err(|e| Decode::Base64(e.to_string()))?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| Decode::Length(bytes.len()))
}

fn decode(text: &str) -> Result<[u8; 32], KeyParseError> {
    decode_exact(text).map_err(|e| match e {
        Decode::Base64(e) => KeyParseError::Base64(e),
        Decode::Length(n) => KeyParseError::Length(n),
    })
}

/// A node's private key. Its `Debug` form never shows the key.
#[derive(Clone)]
pub struct PrivateKey(StaticSecret);

impl PrivateKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        Self(StaticSecret::random_from_rng(rand_core::OsRng))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(DalekPublic::from(&self.0).to_bytes())
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The key as a WireGuard device stores and reports it: clamped for
    /// X25519 (the same key; the kernel and wireguard-go clamp what they are
    /// given, so a device is compared with this form).
    pub fn to_clamped_bytes(&self) -> [u8; 32] {
        clamp(self.0.to_bytes())
    }

    /// The `wg genkey` text form. Handle with care: this is the secret.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }

    pub fn from_base64(text: &str) -> Result<Self, KeyParseError> {
        decode(text).map(|b| Self(StaticSecret::from(b)))
    }

    /// From the raw 32 bytes (the UAPI's hex form, decoded).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(StaticSecret::from(bytes))
    }

    /// The x25519 secret, for the WireGuard handshake.
    pub fn secret(&self) -> StaticSecret {
        self.0.clone()
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_key())
    }
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bytes() == other.0.to_bytes()
    }
}

/// A peer's optional preshared key (mixed into the handshake). Secret as a
/// private key is: its `Debug` form never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey([u8; 32]);

impl PresharedKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }
}

impl Drop for PresharedKey {
    /// A preshared key is what a recording of today's traffic needs
    /// tomorrow: wiped when dropped.
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(..)")
    }
}

/// A public key: what nodes publish and peers are known by.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bytes = decode(text)?;
        if bytes == [0; 32] {
            return Err(KeyParseError::Zero);
        }
        Ok(Self(bytes))
    }
}

/// X25519 clamping of a private key, as WireGuard devices apply it.
pub fn clamp(mut b: [u8; 32]) -> [u8; 32] {
    b[0] &= 248;
    b[31] &= 127;
    b[31] |= 64;
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn wg(args: &[&str], input: Option<&str>) -> String {
        let mut child = Command::new("wg")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("wg (wireguard-tools) must be installed: run tests/setup");
        if let Some(input) = input {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    #[test]
    fn matches_wireguard_tools() {
        for _ in 0..5 {
            let private = wg(&["genkey"], None);
            let public = wg(&["pubkey"], Some(&private));
            let ours = PrivateKey::from_base64(&private).unwrap();
            assert_eq!(ours.to_base64(), private);
            assert_eq!(ours.public_key().to_string(), public);
            assert_eq!(public.parse::<PublicKey>().unwrap(), ours.public_key());
        }
        let mine = PrivateKey::generate();
        assert_eq!(
            wg(&["pubkey"], Some(&mine.to_base64())),
            mine.public_key().to_string()
        );
    }

    #[test]
    fn rejects_malformed_text() {
        assert!(matches!(
            "abc".parse::<PublicKey>(),
            Err(KeyParseError::Length(_))
        ));
        assert!(matches!(
            "!".repeat(44).parse::<PublicKey>(),
            Err(KeyParseError::Base64(_))
        ));
        let zero = STANDARD.encode([0u8; 32]);
        assert_eq!(zero.parse::<PublicKey>(), Err(KeyParseError::Zero));
        assert!(matches!(
            "A".repeat(100_000).parse::<PublicKey>(),
            Err(KeyParseError::Length(_))
        ));
    }

    #[test]
    fn debug_hides_the_private_key() {
        let k = PrivateKey::generate();
        let shown = format!("{k:?}");
        assert!(!shown.contains(&k.to_base64()));
        assert!(shown.contains(&k.public_key().to_string()));
    }
}
