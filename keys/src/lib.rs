//! WireGuard keys for Weft: X25519 key types and their base64 text form, the
//! on-disk key store (0600, atomic replace, optional sealing at rest), and the
//! rotation state (current / next / activation).
//!
//! Filled by the mesh issue; nothing here yet.
