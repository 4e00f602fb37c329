//! Proof that a node holds the private half of the public key it claims.
//!
//! A public key is public: any node can copy another's into its own
//! annotations. What it cannot copy is a signature only the private key's
//! holder can make, over the name and UID of the Node it is published on.
//! WireGuard keys are X25519 (Montgomery) keys; XEdDSA (Signal's
//! specification, the `xeddsa` crate) signs with exactly that key, so a
//! node needs no second key to prove the first.
//!
//! The signed message binds the key to one Node object: a proof copied to
//! another Node (another name, or the same name re-registered with a new
//! UID) does not verify there.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use xeddsa::{xed25519, Sign, Verify};

use crate::key::{decode_exact, Decode};
use crate::{PrivateKey, PublicKey};

/// Separates Weft's key proofs from every other use of the same key
/// (versioned, so a later proof format cannot be confused with this one).
const CONTEXT: &[u8] = b"weft.dev/key-proof v1";

/// The Node a proof is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProofSubject<'a> {
    /// `metadata.name`.
    pub node: &'a str,
    /// `metadata.uid`: set by the API server when the Node is created, so
    /// a proof does not outlive its Node object.
    pub uid: &'a str,
}

impl ProofSubject<'_> {
    /// What is signed: the context, then each field length-prefixed (so no
    /// two subjects share an encoding), then the key.
    fn message(&self, key: &PublicKey) -> Vec<u8> {
        let mut m = Vec::with_capacity(CONTEXT.len() + self.node.len() + self.uid.len() + 48);
        for field in [CONTEXT, self.node.as_bytes(), self.uid.as_bytes()] {
            m.extend_from_slice(&(field.len() as u64).to_be_bytes());
            m.extend_from_slice(field);
        }
        m.extend_from_slice(key.as_bytes());
        m
    }
}

/// An XEdDSA signature by a key over its [`ProofSubject`]: 64 bytes,
/// standard base64 (88 characters) in its text form.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyProof([u8; 64]);

/// Why a proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("not base64: {0}")]
    Base64(String),
    #[error("a key proof is 64 bytes, this is {0}")]
    Length(usize),
    #[error("it is not a signature by this key for this Node (name and UID)")]
    Invalid,
}

impl PrivateKey {
    /// A proof that this key's holder publishes it on `subject`.
    pub fn prove(&self, subject: ProofSubject) -> KeyProof {
        let key = xed25519::PrivateKey(self.to_bytes());
        // XEdDSA mixes fresh randomness into each signature's nonce (the
        // thread's CSPRNG, seeded from the OS).
        KeyProof(key.sign(&subject.message(&self.public_key()), rand::rng()))
    }
}

impl KeyProof {
    /// Whether this is `key`'s proof for `subject`.
    pub fn verify(&self, key: &PublicKey, subject: ProofSubject) -> Result<(), ProofError> {
        xed25519::PublicKey(*key.as_bytes())
            .verify(&subject.message(key), &self.0)
            .map_err(|_| ProofError::Invalid)
    }
}

impl fmt::Display for KeyProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for KeyProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyProof({self})")
    }
}

impl FromStr for KeyProof {
    type Err = ProofError;

    fn from_str(text: &str) -> Result<Self, ProofError> {
        decode_exact(text).map(Self).map_err(|e| match e {
            Decode::Base64(e) => ProofError::Base64(e),
            Decode::Length(n) => ProofError::Length(n),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ProofSubject = ProofSubject {
        node: "node-1",
        uid: "4a1c0f52-0d9e-4f7e-9a55-1b0e1c6f2a10",
    };

    #[test]
    fn a_proof_verifies_for_its_key_and_node_only() {
        let key = PrivateKey::generate();
        let proof = key.prove(A);
        assert_eq!(proof.verify(&key.public_key(), A), Ok(()));
        let other = PrivateKey::generate().public_key();
        assert_eq!(proof.verify(&other, A), Err(ProofError::Invalid));
        for subject in [
            ProofSubject {
                node: "node-2",
                ..A
            },
            ProofSubject {
                uid: "4a1c0f52-0d9e-4f7e-9a55-1b0e1c6f2a11",
                ..A
            },
            // The length prefixes: moving bytes between fields changes the
            // message.
            ProofSubject {
                node: "node-14a1c0f52-0d9e-4f7e-9a55-1b0e1c6f2a10",
                uid: "",
            },
        ] {
            assert_eq!(
                proof.verify(&key.public_key(), subject),
                Err(ProofError::Invalid),
                "{subject:?}"
            );
        }
    }

    #[test]
    fn a_proof_reads_back_as_written_and_bad_text_names_why() {
        let key = PrivateKey::generate();
        let proof = key.prove(A);
        let text = proof.to_string();
        assert_eq!(text.len(), 88);
        assert_eq!(text.parse::<KeyProof>(), Ok(proof));
        assert_eq!("abc".parse::<KeyProof>(), Err(ProofError::Length(2)));
        assert!(matches!(
            "!".repeat(88).parse::<KeyProof>(),
            Err(ProofError::Base64(_))
        ));
        // A flipped bit anywhere is refused.
        let mut bytes = proof.0;
        bytes[63] ^= 1;
        assert_eq!(
            KeyProof(bytes).verify(&key.public_key(), A),
            Err(ProofError::Invalid)
        );
    }

    #[test]
    fn a_key_with_either_sign_bit_proves_itself() {
        // XEdDSA signs with the Edwards key whose sign bit is 0; a Montgomery
        // key maps to two Edwards keys, so keys whose natural Edwards form
        // has the sign bit set must verify too. Many keys cover both.
        for _ in 0..64 {
            let key = PrivateKey::generate();
            assert_eq!(key.prove(A).verify(&key.public_key(), A), Ok(()));
        }
    }
}
