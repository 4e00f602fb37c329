//! Post-quantum preshared keys: two nodes agree on a WireGuard preshared
//! key with ML-KEM-768 (FIPS 203), mixed with classical X25519 so the key
//! is never weaker than WireGuard without one.
//!
//! The exchange (four messages, carried by meshd inside the pair's own
//! tunnel):
//!
//! 1. `Offer`: the initiator's fresh ML-KEM encapsulation key and a fresh
//!    X25519 key `e_I`, with a MAC keyed from the pair's static-static
//!    Diffie-Hellman ([`PairKey`]): only the two nodes can make one, so
//!    nobody else can start (or abort) an exchange or make a node do its
//!    asymmetric work.
//! 2. `Accept`: the responder encapsulates to it (`ct`), adds its own
//!    fresh `e_R`, and proves it derived the key.
//! 3. `Confirm`: the initiator proves the same.
//! 4. `Done`: the responder acknowledges the confirm (the initiator
//!    installs the key on it; the responder installed it on the confirm).
//!
//! `psk = HKDF-BLAKE2s(salt = H(transcript), ikm = ss_kem ‖ DH(e_I, e_R) ‖
//! DH(s_I, S_R))`. The static-static DH authenticates both ends with their
//! WireGuard keys; the ephemeral DH and the KEM secret are
//! fresh every exchange. Recorded traffic then needs the KEM secret to be
//! decrypted: a future quantum computer that breaks X25519 does not have
//! it. Authentication itself is classical (see docs/security.md).

use std::fmt;

use blake2::{Blake2s256, Digest};
use hkdf::SimpleHkdf;
use ml_kem::kem::{Decapsulate, Encapsulate, Kem, KeyExport};
use ml_kem::{Ciphertext, DecapsulationKey, EncapsulationKey, MlKem768};
use subtle::ConstantTimeEq;
use x25519_dalek::{PublicKey as DalekPublic, SharedSecret, StaticSecret};
use zeroize::Zeroizing;

use crate::{PresharedKey, PrivateKey, PublicKey};

/// An ML-KEM-768 encapsulation key's length in bytes.
pub const EK_LEN: usize = 1184;
/// An ML-KEM-768 ciphertext's length in bytes.
pub const CT_LEN: usize = 1088;
const MAGIC: &[u8; 4] = b"WPQ1";
const HEADER: usize = MAGIC.len() + 1 + 8;
const LABEL: &[u8] = b"weft.dev/pq-psk v1";

/// The longest message (an offer), for receive buffers.
pub const MAX_MESSAGE: usize = HEADER + EK_LEN + 64;

/// Why a message or an exchange was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PqError {
    #[error("not a Weft post-quantum message (bad magic)")]
    Magic,
    #[error("message type {0} is unknown")]
    Type(u8),
    #[error("{what} is {got} bytes, not {want}")]
    Length {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("the encapsulation key is not a valid ML-KEM-768 key")]
    EncapsulationKey,
    #[error("an X25519 key is of low order (no shared secret)")]
    LowOrder,
    #[error("the {0} tag does not match: not the peer's key, or another exchange")]
    Tag(&'static str),
}

/// One exchange's messages on the wire: `WPQ1`, the type, the epoch (little
/// endian), then the body.
#[derive(Clone, PartialEq, Eq)]
pub enum Message {
    Offer {
        epoch: u64,
        ek: Box<[u8; EK_LEN]>,
        e: [u8; 32],
        /// Keyed by the pair ([`PairKey`]) over the initiator's key, the
        /// epoch, `ek` and `e`.
        mac: [u8; 32],
    },
    Accept {
        epoch: u64,
        ct: Box<[u8; CT_LEN]>,
        e: [u8; 32],
        tag: [u8; 32],
    },
    Confirm {
        epoch: u64,
        tag: [u8; 32],
    },
    Done {
        epoch: u64,
        tag: [u8; 32],
    },
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (epoch {})", self.kind(), self.epoch())
    }
}

impl Message {
    pub fn epoch(&self) -> u64 {
        match self {
            Self::Offer { epoch, .. }
            | Self::Accept { epoch, .. }
            | Self::Confirm { epoch, .. }
            | Self::Done { epoch, .. } => *epoch,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Offer { .. } => "offer",
            Self::Accept { .. } => "accept",
            Self::Confirm { .. } => "confirm",
            Self::Done { .. } => "done",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let (kind, parts): (u8, Vec<&[u8]>) = match self {
            Self::Offer { ek, e, mac, .. } => (1, vec![&ek[..], e, mac]),
            Self::Accept { ct, e, tag, .. } => (2, vec![&ct[..], e, tag]),
            Self::Confirm { tag, .. } => (3, vec![tag]),
            Self::Done { tag, .. } => (4, vec![tag]),
        };
        let mut out = Vec::with_capacity(MAX_MESSAGE);
        out.extend_from_slice(MAGIC);
        out.push(kind);
        out.extend_from_slice(&self.epoch().to_le_bytes());
        for p in parts {
            out.extend_from_slice(p);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, PqError> {
        if bytes.len() < HEADER {
            return Err(PqError::Length {
                what: "a message",
                got: bytes.len(),
                want: HEADER,
            });
        }
        if &bytes[..4] != MAGIC {
            return Err(PqError::Magic);
        }
        let kind = bytes[4];
        let mut epoch = [0u8; 8];
        epoch.copy_from_slice(&bytes[5..HEADER]);
        let epoch = u64::from_le_bytes(epoch);
        let body = &bytes[HEADER..];
        let (what, want) = match kind {
            1 => ("an offer", EK_LEN + 64),
            2 => ("an accept", CT_LEN + 64),
            3 => ("a confirm", 32),
            4 => ("a done", 32),
            other => return Err(PqError::Type(other)),
        };
        if body.len() != want {
            return Err(PqError::Length {
                what,
                got: body.len(),
                want,
            });
        }
        let key = |at: usize| -> [u8; 32] {
            let mut k = [0u8; 32];
            k.copy_from_slice(&body[at..at + 32]);
            k
        };
        Ok(match kind {
            1 => {
                let mut ek = Box::new([0u8; EK_LEN]);
                ek.copy_from_slice(&body[..EK_LEN]);
                Self::Offer {
                    epoch,
                    ek,
                    e: key(EK_LEN),
                    mac: key(EK_LEN + 32),
                }
            }
            2 => {
                let mut ct = Box::new([0u8; CT_LEN]);
                ct.copy_from_slice(&body[..CT_LEN]);
                Self::Accept {
                    epoch,
                    ct,
                    e: key(CT_LEN),
                    tag: key(CT_LEN + 32),
                }
            }
            3 => Self::Confirm { epoch, tag: key(0) },
            _ => Self::Done { epoch, tag: key(0) },
        })
    }
}

/// A pair of nodes as one of them sees it: both public keys and their
/// static-static Diffie-Hellman, which authenticates offers and goes into
/// every key the pair agrees. Made once per peer key; wiped when dropped.
pub struct PairKey {
    me: PublicKey,
    peer: PublicKey,
    statics: Zeroizing<[u8; 32]>,
    offer_key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for PairKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PairKey({} with {})", self.me, self.peer)
    }
}

impl PairKey {
    pub fn new(me: &PrivateKey, peer: &PublicKey) -> Result<Self, PqError> {
        let statics = contributory(
            me.secret()
                .diffie_hellman(&DalekPublic::from(*peer.as_bytes())),
        )?;
        let statics = Zeroizing::new(statics.to_bytes());
        let mut offer_key = Zeroizing::new([0u8; 32]);
        let hk = SimpleHkdf::<Blake2s256>::new(Some(LABEL), &statics[..]);
        if hk.expand(b"offer mac", &mut offer_key[..]).is_err() {
            unreachable!("HKDF expands 32 bytes");
        }
        Ok(PairKey {
            me: me.public_key(),
            peer: *peer,
            statics,
            offer_key,
        })
    }

    pub fn peer(&self) -> &PublicKey {
        &self.peer
    }

    pub fn me(&self) -> &PublicKey {
        &self.me
    }

    /// The MAC of an offer `initiator` made.
    fn offer_mac(
        &self,
        initiator: &PublicKey,
        epoch: u64,
        ek: &[u8; EK_LEN],
        e: &[u8; 32],
    ) -> [u8; 32] {
        use blake2::digest::{KeyInit, Mac};
        let mut mac = <blake2::Blake2sMac256 as KeyInit>::new_from_slice(&self.offer_key[..])
            .unwrap_or_else(|_| unreachable!("a 32-byte key fits BLAKE2s"));
        mac.update(initiator.as_bytes());
        mac.update(&epoch.to_le_bytes());
        mac.update(ek);
        mac.update(e);
        mac.finalize().into_bytes().into()
    }
}

/// The initiator's half of an exchange in flight. Its secrets are wiped
/// when it is dropped.
pub struct Initiation {
    epoch: u64,
    dk: DecapsulationKey<MlKem768>,
    ek: Box<[u8; EK_LEN]>,
    e: StaticSecret,
}

impl fmt::Debug for Initiation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Initiation(epoch {})", self.epoch)
    }
}

/// What an exchange agreed: the preshared key and the tags that confirm
/// it. `Debug` shows none of them.
#[derive(Clone)]
pub struct Agreed {
    pub epoch: u64,
    pub psk: PresharedKey,
    confirm: Zeroizing<[u8; 32]>,
    done: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for Agreed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Agreed(epoch {})", self.epoch)
    }
}

impl Agreed {
    /// The initiator's proof (message 3).
    pub fn confirm(&self) -> Message {
        Message::Confirm {
            epoch: self.epoch,
            tag: *self.confirm,
        }
    }

    /// The responder's acknowledgement (message 4).
    pub fn done(&self) -> Message {
        Message::Done {
            epoch: self.epoch,
            tag: *self.done,
        }
    }

    /// Whether `tag` is this exchange's confirm (constant time).
    pub fn confirms(&self, tag: &[u8; 32]) -> bool {
        self.confirm.ct_eq(tag).into()
    }

    /// Whether `tag` is this exchange's acknowledgement (constant time).
    pub fn acknowledges(&self, tag: &[u8; 32]) -> bool {
        self.done.ct_eq(tag).into()
    }
}

/// Starts an exchange with the pair's peer: fresh ML-KEM and X25519 keys,
/// and the offer.
pub fn initiate(pair: &PairKey, epoch: u64) -> (Initiation, Message) {
    let (dk, ek) = MlKem768::generate_keypair();
    let mut ek_bytes = Box::new([0u8; EK_LEN]);
    ek_bytes.copy_from_slice(&ek.to_bytes());
    let e = StaticSecret::random_from_rng(rand_core::OsRng);
    let e_public = DalekPublic::from(&e).to_bytes();
    let offer = Message::Offer {
        epoch,
        mac: pair.offer_mac(&pair.me, epoch, &ek_bytes, &e_public),
        ek: ek_bytes.clone(),
        e: e_public,
    };
    (
        Initiation {
            epoch,
            dk,
            ek: ek_bytes,
            e,
        },
        offer,
    )
}

/// Answers an offer from the pair's peer: its MAC first (nothing costly
/// for an offer the peer did not make). Returns the accept to send and
/// what it agrees on once the initiator confirms.
pub fn respond(
    pair: &PairKey,
    epoch: u64,
    ek: &[u8; EK_LEN],
    e_i: &[u8; 32],
    mac: &[u8; 32],
) -> Result<(Message, Agreed), PqError> {
    if !bool::from(pair.offer_mac(&pair.peer, epoch, ek, e_i).ct_eq(mac)) {
        return Err(PqError::Tag("offer"));
    }
    let key = ml_kem::Key::<EncapsulationKey<MlKem768>>::try_from(&ek[..])
        .map_err(|_| PqError::EncapsulationKey)?;
    let encapsulation =
        EncapsulationKey::<MlKem768>::new(&key).map_err(|_| PqError::EncapsulationKey)?;
    let (ct, ss) = encapsulation.encapsulate();
    let ss = Zeroizing::new(<[u8; 32]>::from(ss));
    let mut ct_bytes = Box::new([0u8; CT_LEN]);
    ct_bytes.copy_from_slice(&ct);
    let e = StaticSecret::random_from_rng(rand_core::OsRng);
    let e_r = DalekPublic::from(&e).to_bytes();
    let ephemeral = contributory(e.diffie_hellman(&DalekPublic::from(*e_i)))?;
    let transcript = Transcript {
        initiator: &pair.peer,
        responder: &pair.me,
        epoch,
        ek,
        e_i,
        ct: &ct_bytes,
        e_r: &e_r,
    };
    let (agreed, tag) = derive(&transcript, &ss[..], &ephemeral, pair);
    let accept = Message::Accept {
        epoch,
        ct: ct_bytes,
        e: e_r,
        tag,
    };
    Ok((accept, agreed))
}

impl Initiation {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Completes the exchange with `responder`'s accept: the agreed key,
    /// once the responder's tag proves it derived the same.
    pub fn finish(
        &self,
        pair: &PairKey,
        ct: &[u8; CT_LEN],
        e_r: &[u8; 32],
        tag: &[u8; 32],
    ) -> Result<Agreed, PqError> {
        let ciphertext =
            Ciphertext::<MlKem768>::try_from(&ct[..]).map_err(|_| PqError::Length {
                what: "the ciphertext",
                got: ct.len(),
                want: CT_LEN,
            })?;
        let ss = Zeroizing::new(<[u8; 32]>::from(self.dk.decapsulate(&ciphertext)));
        let ephemeral = contributory(self.e.diffie_hellman(&DalekPublic::from(*e_r)))?;
        let transcript = Transcript {
            initiator: &pair.me,
            responder: &pair.peer,
            epoch: self.epoch,
            ek: &self.ek,
            e_i: &DalekPublic::from(&self.e).to_bytes(),
            ct,
            e_r,
        };
        let (agreed, expected) = derive(&transcript, &ss[..], &ephemeral, pair);
        if bool::from(expected.ct_eq(tag)) {
            Ok(agreed)
        } else {
            Err(PqError::Tag("accept"))
        }
    }
}

/// Everything both ends saw, in order: the salt of the derivation, so a
/// key is bound to both identities, the epoch and every public value.
struct Transcript<'a> {
    initiator: &'a PublicKey,
    responder: &'a PublicKey,
    epoch: u64,
    ek: &'a [u8; EK_LEN],
    e_i: &'a [u8; 32],
    ct: &'a [u8; CT_LEN],
    e_r: &'a [u8; 32],
}

impl Transcript<'_> {
    fn hash(&self) -> [u8; 32] {
        let mut h = Blake2s256::new();
        h.update(LABEL);
        h.update(self.initiator.as_bytes());
        h.update(self.responder.as_bytes());
        h.update(self.epoch.to_le_bytes());
        h.update(self.ek);
        h.update(self.e_i);
        h.update(self.ct);
        h.update(self.e_r);
        h.finalize().into()
    }
}

fn contributory(s: SharedSecret) -> Result<SharedSecret, PqError> {
    if s.was_contributory() {
        Ok(s)
    } else {
        Err(PqError::LowOrder)
    }
}

/// The agreed key and tags, and the responder's tag.
fn derive(
    transcript: &Transcript,
    ss_kem: &[u8],
    ephemeral: &SharedSecret,
    pair: &PairKey,
) -> (Agreed, [u8; 32]) {
    let salt = transcript.hash();
    // Every secret: wiped when dropped.
    let mut ikm = Zeroizing::new(Vec::with_capacity(96));
    ikm.extend_from_slice(ss_kem);
    ikm.extend_from_slice(ephemeral.as_bytes());
    ikm.extend_from_slice(&pair.statics[..]);
    let hk = SimpleHkdf::<Blake2s256>::new(Some(&salt), &ikm);
    let out = |info: &[u8]| {
        let mut o = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF's limit of 255 hash lengths.
        if hk.expand(info, &mut o[..]).is_err() {
            unreachable!("HKDF expands 32 bytes");
        }
        o
    };
    let agreed = Agreed {
        epoch: transcript.epoch,
        psk: PresharedKey::from_bytes(*out(b"wireguard psk")),
        confirm: out(b"initiator confirms"),
        done: out(b"responder done"),
    };
    (agreed, *out(b"responder accepts"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends' view of one pair.
    fn pair() -> (PairKey, PairKey) {
        let (i, r) = (PrivateKey::generate(), PrivateKey::generate());
        (
            PairKey::new(&i, &r.public_key()).unwrap(),
            PairKey::new(&r, &i.public_key()).unwrap(),
        )
    }

    /// `r`'s answer to `offer`, told `epoch`.
    fn answer(r: &PairKey, epoch: u64, offer: &Message) -> Result<(Message, Agreed), PqError> {
        let Message::Offer { ek, e, mac, .. } = offer else {
            panic!("not an offer")
        };
        respond(r, epoch, ek, e, mac)
    }

    fn finish(init: &Initiation, i: &PairKey, accept: &Message) -> Result<Agreed, PqError> {
        let Message::Accept { ct, e, tag, .. } = accept else {
            panic!("not an accept")
        };
        init.finish(i, ct, e, tag)
    }

    /// An exchange up to the accept, through the wire format.
    fn run(i: &PairKey, r: &PairKey, epoch: u64) -> (Initiation, Message, Message, Agreed) {
        let (init, offer) = initiate(i, epoch);
        let offer = Message::decode(&offer.encode()).unwrap();
        let (accept, agreed) = answer(r, epoch, &offer).unwrap();
        let accept = Message::decode(&accept.encode()).unwrap();
        (init, offer, accept, agreed)
    }

    #[test]
    fn both_ends_agree_and_each_exchange_is_fresh() {
        let (i, r) = pair();
        let (init, _, accept, responder) = run(&i, &r, 7);
        let initiator = finish(&init, &i, &accept).unwrap();
        assert_eq!(initiator.psk, responder.psk);
        assert_ne!(initiator.psk.to_bytes(), [0; 32]);
        let Message::Confirm { tag, .. } = initiator.confirm() else {
            panic!()
        };
        assert!(responder.confirms(&tag));
        let Message::Done { tag, .. } = responder.done() else {
            panic!()
        };
        assert!(initiator.acknowledges(&tag));
        assert!(!initiator.confirms(&tag), "the tags differ by role");
        let (init2, _, accept2, _) = run(&i, &r, 7);
        assert_ne!(finish(&init2, &i, &accept2).unwrap().psk, initiator.psk);
    }

    /// Only the two key holders make offers and agree: a third node's
    /// offer is refused before any costly work, its accept does not
    /// finish, and a replayed accept or a confirm of another epoch does
    /// not count. An offer sent back to the node that made it is refused
    /// too (the MAC names the initiator).
    #[test]
    fn only_the_two_key_holders_agree() {
        let (i, r) = pair();
        let mallory = PrivateKey::generate();
        let m_to_r = PairKey::new(&mallory, &r.peer).unwrap();
        let m_to_i = PairKey::new(&mallory, &i.peer).unwrap();
        // Mallory's offer to r, as i's (from i's address).
        let (_, forged) = initiate(&m_to_r, 1);
        assert_eq!(answer(&r, 1, &forged).unwrap_err(), PqError::Tag("offer"));
        // i's own offer reflected back to i.
        let (_, offer) = initiate(&i, 1);
        assert_eq!(answer(&i, 1, &offer).unwrap_err(), PqError::Tag("offer"));
        // Mallory answers i's offer as r: she cannot (the MAC is for r), and
        // an accept she makes anyway does not finish.
        let (init, offer, _, _) = run(&i, &r, 1);
        assert!(answer(&m_to_i, 1, &offer).is_err());
        // An accept made without r's key (mallory's, for a pair of hers).
        let (x, y) = pair();
        let (_, _, m_accept, _) = run(&x, &y, 1);
        assert_eq!(
            finish(&init, &i, &m_accept).unwrap_err(),
            PqError::Tag("accept")
        );
        // An accept from another exchange (a replay) does not finish this one.
        let (_, _, old_accept, r_agreed) = run(&i, &r, 1);
        assert!(finish(&init, &i, &old_accept).is_err());
        // Nor does a confirm made with another exchange's keys.
        let Message::Confirm { tag, .. } = r_agreed.confirm() else {
            panic!()
        };
        let (_, _, _, other) = run(&i, &r, 2);
        assert!(!other.confirms(&tag));
    }

    #[test]
    fn the_epoch_is_bound_to_the_offer_and_the_key() {
        let (i, r) = pair();
        let (_, offer) = initiate(&i, 3);
        // The offer's epoch changed on the way: its MAC no longer holds.
        assert_eq!(answer(&r, 4, &offer).unwrap_err(), PqError::Tag("offer"));
    }

    #[test]
    fn malformed_messages_name_what_is_wrong() {
        let (i, r) = pair();
        let (_, offer) = initiate(&i, 1);
        let bytes = offer.encode();
        assert_eq!(bytes.len(), MAX_MESSAGE);
        assert_eq!(
            Message::decode(&bytes[..bytes.len() - 1]).unwrap_err(),
            PqError::Length {
                what: "an offer",
                got: EK_LEN + 63,
                want: EK_LEN + 64
            }
        );
        let mut wrong = bytes.clone();
        wrong[0] = b'X';
        assert_eq!(Message::decode(&wrong).unwrap_err(), PqError::Magic);
        wrong = bytes.clone();
        wrong[4] = 9;
        assert_eq!(Message::decode(&wrong).unwrap_err(), PqError::Type(9));
        assert!(matches!(
            Message::decode(&bytes[..3]),
            Err(PqError::Length { .. })
        ));
        // Past the MAC (the peer's own offer): an encapsulation key out of
        // range (ML-KEM's modulus check), a low-order X25519 point.
        let bad = Box::new([0xff; EK_LEN]);
        let e = [9; 32];
        let mac = i.offer_mac(&i.me, 1, &bad, &e);
        assert_eq!(
            respond(&r, 1, &bad, &e, &mac).unwrap_err(),
            PqError::EncapsulationKey
        );
        let Message::Offer { ek, .. } = &offer else {
            panic!()
        };
        let mac = i.offer_mac(&i.me, 1, ek, &[0; 32]);
        assert_eq!(
            respond(&r, 1, ek, &[0; 32], &mac).unwrap_err(),
            PqError::LowOrder
        );
        // A peer key of low order makes no pair.
        assert_eq!(
            PairKey::new(&PrivateKey::generate(), &PublicKey::from_bytes([0; 32])).unwrap_err(),
            PqError::LowOrder
        );
    }

    #[test]
    fn debug_shows_no_secret() {
        let (i, r) = pair();
        let (_, _, _, agreed) = run(&i, &r, 5);
        assert_eq!(format!("{agreed:?}"), "Agreed(epoch 5)");
        let (init, _) = initiate(&i, 5);
        assert_eq!(format!("{init:?}"), "Initiation(epoch 5)");
        assert!(!format!("{i:?}").contains(&format!("{:?}", &i.statics[..])));
    }
}
