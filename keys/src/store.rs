//! The node's key on disk.
//!
//! One JSON file, mode 0600, replaced atomically (temp file, fsync, rename,
//! fsync of the directory), so a crash leaves either the old key or the new
//! one, never half of either. A key file readable by group or others is
//! repaired to 0600 with a warning. With a sealing key configured, the file
//! holds the key encrypted with XChaCha20-Poly1305 instead.
//!
//! Format (version 1): `{"version":1,"current":"<base64 private key>",
//! "since":<unix seconds>}` and, while the node rotates, `"next"`,
//! `"next_started"` and (for a switch at a set time) `"next_at"`; or
//! sealed: `{"version":1,"sealed":"<base64 nonce ‖ ciphertext>"}` whose
//! plaintext is the unsealed form. A file without `since` (written before
//! rotation existed) counts its key's age from when it is first loaded.
//!
//! Each save wipes what it replaces: the old file's bytes are overwritten
//! with zeros (through a descriptor opened before the rename) once the new
//! file is in place, so a retired private key does not linger on disk.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use serde::{Deserialize, Serialize};

use crate::key::PrivateKey;

const FORMAT_VERSION: u32 = 1;
/// Binds a sealed blob to its purpose: it cannot be swapped for another
/// ciphertext made with the same sealing key for something else.
const SEAL_AAD: &[u8] = b"weft-keystore-v1";
const NONCE_LEN: usize = 24;

/// What can go wrong with the key file; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {reason} (move it away to generate a new key; peers will pick up the new public key)")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} is sealed, but no sealing key is configured")]
    SealedWithoutKey { path: PathBuf },
    #[error("{path} cannot be unsealed: wrong sealing key, or the file was tampered with")]
    Unseal { path: PathBuf },
    #[error("sealing key {path}: {reason}")]
    SealingKey { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A 32-byte key that encrypts the key file at rest.
#[derive(Clone)]
pub struct SealingKey([u8; 32]);

impl SealingKey {
    /// Reads a sealing key file: 32 bytes in base64 (e.g. `wg genkey` output,
    /// or a Kubernetes Secret mounted as a file).
    pub fn from_file(path: &Path) -> Result<Self, StoreError> {
        let text = fs::read_to_string(path).map_err(io(path))?;
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|e| StoreError::SealingKey {
                path: path.into(),
                reason: format!("not base64: {e}"),
            })?;
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::SealingKey {
                path: path.into(),
                reason: format!("must be 32 bytes, is {}", bytes.len()),
            })?;
        Ok(Self(key))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.0.into())
    }
}

/// The keys the store holds.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyState {
    /// The key the node uses now.
    pub current: PrivateKey,
    /// When `current` became the node's key (Unix seconds).
    pub since: u64,
    /// A rotation under way.
    pub next: Option<NextKey>,
}

/// The key a node is rotating to.
#[derive(Debug, Clone, PartialEq)]
pub struct NextKey {
    pub key: PrivateKey,
    /// When the rotation started (Unix seconds).
    pub started: u64,
    /// For a switch at a set time: when (Unix seconds).
    pub at: Option<u64>,
}

impl KeyState {
    /// A fresh key, in use from `now`.
    pub fn generate(now: u64) -> Self {
        Self {
            current: PrivateKey::generate(),
            since: now,
            next: None,
        }
    }
}

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    current: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next_started: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<String>,
}

/// Now, in Unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The key file of one node.
pub struct KeyStore {
    path: PathBuf,
    sealing: Option<SealingKey>,
}

impl KeyStore {
    pub fn new(path: impl Into<PathBuf>, sealing: Option<SealingKey>) -> Self {
        Self {
            path: path.into(),
            sealing,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the key, or generates and stores one if there is no file.
    /// Never replaces an existing file it cannot read.
    pub fn load_or_create(&self) -> Result<KeyState, StoreError> {
        match fs::metadata(&self.path) {
            Ok(meta) => {
                self.repair_mode(&meta)?;
                let state = self.load()?;
                if self.sealing.is_some() && !self.is_sealed_on_disk()? {
                    tracing::info!(path = %self.path.display(), "sealing the key file with the configured sealing key");
                    self.save(&state)?;
                }
                Ok(state)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let state = KeyState::generate(unix_now());
                self.save(&state)?;
                tracing::info!(path = %self.path.display(), public_key = %state.current.public_key(), "generated a new WireGuard key");
                Ok(state)
            }
            Err(e) => Err(io(&self.path)(e)),
        }
    }

    fn repair_mode(&self, meta: &fs::Metadata) -> Result<(), StoreError> {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(path = %self.path.display(), mode = format!("{mode:o}"), "key file was readable by others; repaired to 0600");
            fs::set_permissions(&self.path, fs::Permissions::from_mode(0o600))
                .map_err(io(&self.path))?;
        }
        Ok(())
    }

    fn read_format(&self) -> Result<FileFormat, StoreError> {
        let bytes = fs::read(&self.path).map_err(io(&self.path))?;
        let format: FileFormat =
            serde_json::from_slice(&bytes).map_err(|e| self.corrupt(e.to_string()))?;
        if format.version != FORMAT_VERSION {
            return Err(self.corrupt(format!(
                "format version {} (this meshd reads {FORMAT_VERSION})",
                format.version
            )));
        }
        Ok(format)
    }

    fn is_sealed_on_disk(&self) -> Result<bool, StoreError> {
        Ok(self.read_format()?.sealed.is_some())
    }

    fn load(&self) -> Result<KeyState, StoreError> {
        let mut format = self.read_format()?;
        if let Some(sealed) = &format.sealed {
            let key = self
                .sealing
                .as_ref()
                .ok_or_else(|| StoreError::SealedWithoutKey {
                    path: self.path.clone(),
                })?;
            let blob = STANDARD
                .decode(sealed)
                .map_err(|e| self.corrupt(format!("sealed blob: {e}")))?;
            if blob.len() < NONCE_LEN {
                return Err(self.corrupt("sealed blob too short".into()));
            }
            let (nonce, ciphertext) = blob.split_at(NONCE_LEN);
            let plain = key
                .cipher()
                .decrypt(
                    nonce.into(),
                    Payload {
                        msg: ciphertext,
                        aad: SEAL_AAD,
                    },
                )
                .map_err(|_| StoreError::Unseal {
                    path: self.path.clone(),
                })?;
            format = serde_json::from_slice(&plain)
                .map_err(|e| self.corrupt(format!("sealed contents: {e}")))?;
        }
        let key = |field: &str, text: Option<&String>| {
            let text = text.ok_or_else(|| self.corrupt(format!("no \"{field}\" key")))?;
            PrivateKey::from_base64(text).map_err(|e| self.corrupt(format!("{field} key: {e}")))
        };
        let current = key("current", format.current.as_ref())?;
        let next = match (&format.next, format.next_started) {
            (None, None) if format.next_at.is_none() => None,
            (Some(_), Some(started)) => Some(NextKey {
                key: key("next", format.next.as_ref())?,
                started,
                at: format.next_at,
            }),
            _ => {
                return Err(self.corrupt(
                    "\"next\", \"next_started\" and \"next_at\" must come together".into(),
                ))
            }
        };
        Ok(KeyState {
            current,
            since: format.since.unwrap_or_else(unix_now),
            next,
        })
    }

    /// Stores `state`, replacing the file atomically.
    pub fn save(&self, state: &KeyState) -> Result<(), StoreError> {
        let plain = FileFormat {
            version: FORMAT_VERSION,
            current: Some(state.current.to_base64()),
            since: Some(state.since),
            next: state.next.as_ref().map(|n| n.key.to_base64()),
            next_started: state.next.as_ref().map(|n| n.started),
            next_at: state.next.as_ref().and_then(|n| n.at),
            sealed: None,
        };
        let plain = serde_json::to_vec(&plain).expect("the key file format serializes");
        let contents = match &self.sealing {
            None => plain,
            Some(key) => {
                let nonce = XChaCha20Poly1305::generate_nonce(&mut rand_core::OsRng);
                let ciphertext = key
                    .cipher()
                    .encrypt(
                        &nonce,
                        Payload {
                            msg: &plain,
                            aad: SEAL_AAD,
                        },
                    )
                    .expect("XChaCha20-Poly1305 encryption of a small buffer cannot fail");
                let mut blob = nonce.to_vec();
                blob.extend_from_slice(&ciphertext);
                let sealed = FileFormat {
                    version: FORMAT_VERSION,
                    sealed: Some(STANDARD.encode(blob)),
                    ..FileFormat::default()
                };
                serde_json::to_vec(&sealed).expect("the key file format serializes")
            }
        };
        // What this replaces is wiped once the new file is in place.
        let old = File::options().write(true).open(&self.path).ok();
        write_private(&self.path, &contents)?;
        if let Some(old) = old {
            wipe(old).map_err(io(&self.path))?;
        }
        Ok(())
    }

    /// Overwrites the key file with zeros, then removes it (uninstall): the
    /// last private key does not stay in the file's blocks. False if there
    /// was no file.
    pub fn destroy(&self) -> Result<bool, StoreError> {
        let file = match File::options().write(true).open(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            other => other.map_err(io(&self.path))?,
        };
        wipe(file).map_err(io(&self.path))?;
        fs::remove_file(&self.path).map_err(io(&self.path))?;
        Ok(true)
    }

    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }
}

/// The key file's name in meshd's state directory.
pub const KEY_FILE: &str = "key.json";

/// Overwrites a replaced (already unlinked) file's bytes with zeros.
fn wipe(mut old: File) -> std::io::Result<()> {
    let len = old.metadata()?.len();
    let zeros = vec![0u8; usize::try_from(len).unwrap_or(0).min(1 << 20)];
    old.write_all(&zeros)?;
    old.sync_all()
}

/// Writes a secret file (mode 0600) so that a crash at any point leaves
/// either the old contents or the new, never a mix: temp file in the same
/// directory, fsync, rename over the target, fsync of the directory.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    write_atomic(path, contents, 0o600)
}

/// Writes `contents` to `path` with permissions `mode` set before the
/// rename, so the file appears whole and with its final mode at once (a
/// runtime may exec a plugin binary the instant it appears).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode given to open.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealing() -> SealingKey {
        SealingKey([7; 32])
    }

    #[test]
    fn creates_then_loads_the_same_key_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path().join("sub/key.json"), None);
        let first = store.load_or_create().unwrap();
        let second = store.load_or_create().unwrap();
        assert_eq!(first, second);
        let mode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("sub")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp files left behind");
    }

    #[test]
    fn repairs_a_readable_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path().join("key.json"), None);
        let first = store.load_or_create().unwrap();
        fs::set_permissions(store.path(), fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(store.load_or_create().unwrap(), first);
        let mode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn refuses_corrupt_files_without_replacing_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        for garbage in [
            &b"{not json"[..],
            br#"{"version":1}"#,
            br#"{"version":9,"current":"x"}"#,
            br#"{"version":1,"current":"short"}"#,
        ] {
            fs::write(&path, garbage).unwrap();
            let err = KeyStore::new(&path, None).load_or_create().unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
            assert!(err.to_string().contains("key.json"));
            assert_eq!(
                fs::read(&path).unwrap(),
                garbage,
                "a corrupt file is never overwritten"
            );
        }
    }

    #[test]
    fn sealing_round_trip_upgrade_and_tamper() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        let plain = KeyStore::new(&path, None).load_or_create().unwrap();
        // Turning sealing on seals the existing key in place.
        let sealed_store = KeyStore::new(&path, Some(sealing()));
        assert_eq!(sealed_store.load_or_create().unwrap(), plain);
        let on_disk = fs::read_to_string(&path).unwrap();
        assert!(on_disk.contains("sealed") && !on_disk.contains(&plain.current.to_base64()));
        assert_eq!(sealed_store.load_or_create().unwrap(), plain);
        // Without the key, or with another key: a clear refusal.
        assert!(matches!(
            KeyStore::new(&path, None).load_or_create(),
            Err(StoreError::SealedWithoutKey { .. })
        ));
        assert!(matches!(
            KeyStore::new(&path, Some(SealingKey([8; 32]))).load_or_create(),
            Err(StoreError::Unseal { .. })
        ));
        // A flipped byte in the ciphertext is detected.
        let mut format: serde_json::Value = serde_json::from_str(&on_disk).unwrap();
        let mut blob = STANDARD.decode(format["sealed"].as_str().unwrap()).unwrap();
        let last = blob.len() - 1;
        blob[last] ^= 1;
        format["sealed"] = STANDARD.encode(blob).into();
        fs::write(&path, format.to_string()).unwrap();
        assert!(matches!(
            sealed_store.load_or_create(),
            Err(StoreError::Unseal { .. })
        ));
    }

    #[test]
    fn sealing_key_file_is_validated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seal");
        fs::write(&path, "c2hvcnQ=\n").unwrap();
        let err = SealingKey::from_file(&path).err().unwrap();
        assert!(err.to_string().contains("must be 32 bytes"));
        fs::write(&path, PrivateKey::generate().to_base64()).unwrap();
        assert!(SealingKey::from_file(&path).is_ok());
    }

    #[test]
    fn a_rotation_round_trips_plain_and_sealed() {
        let dir = tempfile::tempdir().unwrap();
        for sealing in [None, Some(sealing())] {
            let store = KeyStore::new(dir.path().join("key.json"), sealing);
            let mut state = store.load_or_create().unwrap();
            assert!(state.since > 0 && state.next.is_none());
            state.next = Some(NextKey {
                key: PrivateKey::generate(),
                started: 1_700_000_000,
                at: Some(1_700_000_005),
            });
            store.save(&state).unwrap();
            assert_eq!(store.load_or_create().unwrap(), state);
            fs::remove_file(store.path()).unwrap();
        }
    }

    #[test]
    fn a_half_recorded_rotation_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        let key = PrivateKey::generate().to_base64();
        for fields in [
            format!(r#""next":"{key}""#),
            r#""next_started":5"#.to_string(),
            r#""next_at":5"#.to_string(),
        ] {
            fs::write(
                &path,
                format!(r#"{{"version":1,"current":"{key}",{fields}}}"#),
            )
            .unwrap();
            let err = KeyStore::new(&path, None).load_or_create().unwrap_err();
            assert!(err.to_string().contains("must come together"), "{err}");
        }
    }

    /// A second name for the old file keeps its inode reachable: after a
    /// save, what it holds is zeros, not the retired key.
    #[test]
    fn a_replaced_key_is_wiped_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path().join("key.json"), None);
        let old = store.load_or_create().unwrap();
        let witness = dir.path().join("old-inode");
        fs::hard_link(store.path(), &witness).unwrap();
        let before = fs::read(&witness).unwrap();
        assert!(String::from_utf8_lossy(&before).contains(&old.current.to_base64()));
        store.save(&KeyState::generate(1)).unwrap();
        let after = fs::read(&witness).unwrap();
        assert_eq!(after.len(), before.len());
        assert!(
            after.iter().all(|b| *b == 0),
            "the old key file was not wiped"
        );
        assert_ne!(store.load_or_create().unwrap().current, old.current);
    }

    /// Destroyed, the key file is gone and its bytes are zeros.
    #[test]
    fn a_destroyed_key_is_wiped_then_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path().join("key.json"), None);
        store.load_or_create().unwrap();
        let witness = dir.path().join("old-inode");
        fs::hard_link(store.path(), &witness).unwrap();
        assert!(store.destroy().unwrap());
        assert!(!store.path().exists());
        let after = fs::read(&witness).unwrap();
        assert!(!after.is_empty() && after.iter().all(|b| *b == 0));
        assert!(!store.destroy().unwrap(), "nothing left to destroy");
    }
}
