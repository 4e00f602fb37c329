//! WireGuard keys for Weft: X25519 key types in WireGuard's base64 text
//! form ([`PrivateKey`], [`PublicKey`]) and the node's key file
//! ([`KeyStore`]: 0600, atomic replace, optional sealing at rest).
//!
//! Private keys never leave the node: nothing in this crate serializes one
//! anywhere but the key file.

mod key;
pub mod pq;
mod proof;
mod store;

pub use key::{clamp, KeyParseError, PresharedKey, PrivateKey, PublicKey};
pub use proof::{KeyProof, ProofError, ProofSubject};
pub use store::{
    unix_now, write_atomic, write_private, KeyState, KeyStore, NextKey, SealingKey, StoreError,
    KEY_FILE,
};
