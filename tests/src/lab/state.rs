//! The lab's runtime directory: everything a lab writes lives under
//! `<root>/<name>/`, described by `lab.json`; `<root>/<name>.lock` keeps two
//! meshlab commands from changing the same lab at once.

use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::pods::PodRecord;
use super::topology::LabPlan;

/// The default root of all labs' runtime directories.
pub const DEFAULT_ROOT: &str = "/run/meshlab";

/// Where one lab keeps its files.
#[derive(Debug, Clone)]
pub struct LabDir {
    pub root: PathBuf,
    pub name: String,
}

/// The running API server, as recorded at `up`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiServerState {
    pub pid: i32,
    /// Reachable from the host.
    pub url: String,
    /// Reachable from every node namespace.
    pub fabric_url: String,
}

/// `lab.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabState {
    pub plan: LabPlan,
    pub api_server: ApiServerState,
    #[serde(default)]
    pub pods: Vec<PodRecord>,
    /// Underlay links cut between nodes (`meshlab link cut`).
    #[serde(default)]
    pub cuts: std::collections::BTreeSet<super::links::Cut>,
    /// External peers (`meshlab peer add`).
    #[serde(default)]
    pub peers: Vec<super::peers::PeerRecord>,
}

impl LabState {
    /// The number of the node `node add` creates next (after the highest).
    pub fn next_node(&self) -> usize {
        self.plan
            .nodes
            .iter()
            .filter_map(|n| n.name.strip_prefix("node-")?.parse::<usize>().ok())
            .max()
            .unwrap_or(0)
            + 1
    }

    /// External peer `name`.
    pub fn peer(&self, name: &str) -> Result<&super::peers::PeerRecord> {
        self.peers
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("lab {}: no peer {name}", self.plan.name))
    }

    /// The position of pod `namespace/name`.
    pub fn pod_index(&self, namespace: &str, name: &str) -> Result<usize> {
        self.pods
            .iter()
            .position(|p| p.namespace == namespace && p.name == name)
            .with_context(|| format!("no pod {namespace}/{name} in lab {:?}", self.plan.name))
    }

    /// The position of node `name` in the plan.
    pub fn node_index(&self, name: &str) -> Result<usize> {
        self.plan
            .nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name:?} in lab {:?}", self.plan.name))
    }
}

impl LabDir {
    pub fn new(root: impl Into<PathBuf>, name: &str) -> Self {
        Self {
            root: root.into(),
            name: name.to_string(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.root.join(&self.name)
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    /// The kubeconfig for clients on the host.
    pub fn kubeconfig(&self) -> PathBuf {
        self.file("kubeconfig")
    }

    /// The kubeconfig for processes inside node namespaces.
    pub fn node_kubeconfig(&self) -> PathBuf {
        self.file("kubeconfig-node")
    }

    pub fn state_file(&self) -> PathBuf {
        self.file("lab.json")
    }

    /// Takes the lab's lock, failing at once if another command holds it.
    pub fn lock(&self) -> Result<Flock<File>> {
        fs::create_dir_all(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        let path = self.lock_path();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
                "another meshlab command is working on lab {:?} right now; wait for it, or use --name for a separate lab",
                self.name
            ),
            Err((_, e)) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }

    /// Deletes the lock file (while still holding it), and the root if no
    /// other lab uses it.
    pub fn remove_lock(&self, lock: Flock<File>) -> Result<()> {
        fs::remove_file(self.lock_path())
            .with_context(|| format!("removing {}", self.lock_path().display()))?;
        drop(lock);
        // Fails harmlessly while other labs live under the same root.
        let _ = fs::remove_dir(&self.root);
        Ok(())
    }

    fn lock_path(&self) -> PathBuf {
        self.root.join(format!("{}.lock", self.name))
    }

    /// The state of a lab that is up; an error saying so otherwise.
    pub fn running_state(&self) -> Result<LabState> {
        self.read_state()?.with_context(|| {
            format!(
                "lab {:?} is not up (no {}); start it with `meshlab up`",
                self.name,
                self.state_file().display()
            )
        })
    }

    pub fn read_state(&self) -> Result<Option<LabState>> {
        let path = self.state_file();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("{} is corrupt", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn write_state(&self, state: &LabState) -> Result<()> {
        write_atomic(&self.state_file(), &serde_json::to_vec_pretty(state)?)
    }
}

/// Writes `path` whole or not at all (a temporary file renamed over it), so
/// a reader polling for it never sees it empty or half written.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Whether `pid` is alive and one of its arguments, `--flag=` values or
/// environment values is `dir` or a path inside it (so a recycled pid, or
/// another lab's process, is never taken for ours; every container the lab
/// runs has its kubeconfig there).
pub fn process_alive(pid: i32, dir: &Path) -> bool {
    let inside = |value: &[u8]| Path::new(std::ffi::OsStr::from_bytes(value)).starts_with(dir);
    let after_eq = |item: &[u8]| match item.iter().position(|b| *b == b'=') {
        Some(i) => inside(&item[i + 1..]),
        None => false,
    };
    let Some(cmdline) = cmdline(pid) else {
        return false;
    };
    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let mentions = cmdline
        .split(|b| *b == 0)
        .any(|arg| inside(arg) || after_eq(arg))
        || environ.split(|b| *b == 0).any(after_eq);
    mentions && !is_zombie(pid)
}

/// The process's arguments. A process inside `execve` (a container the lab
/// just started: `ip netns exec` replacing itself with the container's
/// command) briefly shows an empty cmdline and environ; it is read again
/// until it has its new ones, for at most 200 ms. Kernel threads (no
/// executable) always have an empty one and are not waited for.
fn cmdline(pid: i32) -> Option<Vec<u8>> {
    for _ in 0..40 {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let kernel_thread = fs::read_link(format!("/proc/{pid}/exe")).is_err();
        if !cmdline.is_empty() || kernel_thread || is_zombie(pid) {
            return Some(cmdline);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Some(Vec::new())
}

/// A process that has exited but not been reaped (or is already gone).
pub fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "))
}
