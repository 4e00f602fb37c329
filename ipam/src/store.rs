//! The node's pod address store on local disk, used directly by the CNI
//! plugin (no daemon round trip on the ADD path).
//!
//! Every operation takes an exclusive `flock` on `<dir>/lock`, reads
//! `<dir>/allocations.json`, changes it in memory and replaces it atomically
//! (temp file, fsync, rename). A plugin killed at any point leaves either the
//! old state or the new one; the kernel drops its lock. An allocation whose
//! ADD died before the pod was wired up is an attachment the runtime does not
//! know, which GC frees.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use nix::fcntl::{Flock, FlockArg};

use crate::pool::{AllocError, Allocations, Attachment, PodRef};

/// Why the store failed; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({reason}); move it away and run CNI GC to rebuild from live pods")]
    Corrupt { path: PathBuf, reason: String },
    #[error(transparent)]
    Alloc(#[from] AllocError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A directory holding one node's pod address allocations.
pub struct PodStore {
    dir: PathBuf,
}

impl PodStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("allocations.json")
    }

    /// Runs `f` on the allocations under the lock, saving them if it changed them.
    fn locked<T>(
        &self,
        f: impl FnOnce(&mut Allocations) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let lock_path = self.dir.join("lock");
        let lock_file: File = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, e)| io(&lock_path)(e.into()))?;
        let path = self.file();
        let before = self.read()?;
        let mut after = before.clone();
        let result = f(&mut after)?;
        if after != before {
            let bytes = serde_json::to_vec(&after).expect("allocations serialize");
            weft_keys::write_private(&path, &bytes).map_err(|e| StoreError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        Ok(result)
    }

    /// The directory (meshd watches it for attachments).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// One address per block for `attachment` (the same ones if it has
    /// them), recording the pod it is when the runtime said.
    pub fn allocate(
        &self,
        attachment: &Attachment,
        blocks: &[IpNet],
        pod: Option<&PodRef>,
    ) -> Result<Vec<IpNet>, StoreError> {
        self.locked(|a| Ok(a.allocate(attachment, blocks, pod)?))
    }

    /// The allocations as stored (none yet: empty). The file is replaced
    /// whole, so a read without the lock sees one state or the next.
    fn read(&self) -> Result<Allocations, StoreError> {
        let path = self.file();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Allocations::default()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Every attached pod the runtime named (`namespace/name`) with its
    /// addresses (read without the lock).
    pub fn attached_pods(&self) -> Result<BTreeMap<String, Vec<IpAddr>>, StoreError> {
        Ok(self
            .read()?
            .pods()
            .map(|(pod, addresses)| (pod.key(), addresses.iter().map(IpNet::addr).collect()))
            .collect())
    }

    /// Every attachment holding addresses, with the pod the runtime said
    /// it is (read without the lock).
    pub fn holders(&self) -> Result<Vec<(Attachment, Option<PodRef>)>, StoreError> {
        Ok(self
            .read()?
            .holders()
            .map(|(a, pod)| (a.clone(), pod.cloned()))
            .collect())
    }

    /// What `attachment` holds.
    pub fn get(&self, attachment: &Attachment) -> Result<Option<Vec<IpNet>>, StoreError> {
        self.locked(|a| Ok(a.get(attachment).map(<[IpNet]>::to_vec)))
    }

    /// Frees `attachment`'s addresses; false if it held none.
    pub fn release(&self, attachment: &Attachment) -> Result<bool, StoreError> {
        self.locked(|a| Ok(a.release(attachment)))
    }

    /// Frees every attachment not in `live`; returns what was freed.
    pub fn gc(&self, live: &BTreeSet<Attachment>) -> Result<Vec<Attachment>, StoreError> {
        self.locked(|a| Ok(a.gc(live)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn att(i: usize) -> Attachment {
        Attachment {
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn a_hundred_parallel_allocations_are_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(PodStore::new(dir.path()));
        let blocks: Vec<IpNet> = vec![
            "198.19.1.0/24".parse().unwrap(),
            "fd98:19:0:1::/64".parse().unwrap(),
        ];
        let threads: Vec<_> = (0..100)
            .map(|i| {
                let (store, blocks) = (store.clone(), blocks.clone());
                std::thread::spawn(move || store.allocate(&att(i), &blocks, None).unwrap())
            })
            .collect();
        let all: Vec<IpNet> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(all.len(), 200);
        assert_eq!(
            all.iter().collect::<BTreeSet<_>>().len(),
            200,
            "an address was handed out twice"
        );
        // State survives a reopen.
        let reopened = PodStore::new(dir.path());
        assert_eq!(reopened.get(&att(7)).unwrap().map(|v| v.len()), Some(2));
    }

    #[test]
    fn corrupt_state_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = PodStore::new(dir.path());
        fs::write(store.file(), b"{garbage").unwrap();
        let err = store
            .allocate(&att(1), &["198.19.1.0/24".parse().unwrap()], None)
            .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert_eq!(fs::read(store.file()).unwrap(), b"{garbage");
    }

    #[test]
    fn release_and_gc_persist() {
        let dir = tempfile::tempdir().unwrap();
        let store = PodStore::new(dir.path());
        let block = ["198.19.1.0/24".parse().unwrap()];
        for i in 0..3 {
            store.allocate(&att(i), &block, None).unwrap();
        }
        assert!(store.release(&att(0)).unwrap());
        assert!(!store.release(&att(0)).unwrap(), "DEL twice is fine");
        assert_eq!(store.gc(&BTreeSet::from([att(2)])).unwrap(), vec![att(1)]);
        assert_eq!(
            PodStore::new(dir.path())
                .get(&att(2))
                .unwrap()
                .map(|v| v.len()),
            Some(1)
        );
        assert_eq!(PodStore::new(dir.path()).get(&att(1)).unwrap(), None);
    }
}
