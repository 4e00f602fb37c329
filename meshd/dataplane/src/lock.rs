//! One owner per resource: an exclusive `flock` held for the life of the
//! process, so a second meshd on a node (or a second data plane on an
//! interface) refuses to start instead of fighting the first. The kernel
//! drops the lock when its holder dies, however it dies. It lives here,
//! in the lower of the two crates that take one; meshd re-uses it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another {what} is running (pid {holder}, holding {path}); stop it first")]
    Held {
        what: &'static str,
        holder: String,
        path: String,
    },
    #[error("locking {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// How long a lock held by another process is waited for: a predecessor
/// that was just killed releases it as it finishes exiting.
pub const WAIT: Duration = Duration::from_secs(2);

/// Takes the lock at `path` for `what` (named in the error), waiting up to
/// `wait` for a holder to go, and records this process's pid in it.
pub fn exclusive(
    path: &Path,
    what: &'static str,
    wait: Duration,
) -> Result<Flock<File>, LockError> {
    let io = |source| LockError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io)?;
    let deadline = Instant::now() + wait;
    let mut lock = loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => break l,
            Err((f, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = f;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err((mut f, Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                return Err(LockError::Held {
                    what,
                    holder: holder.trim().to_string(),
                    path: path.display().to_string(),
                });
            }
            Err((_, e)) => return Err(io(e.into())),
        }
    };
    let pid = std::process::id().to_string();
    lock.set_len(0).map_err(io)?;
    lock.rewind().map_err(io)?;
    lock.write_all(pid.as_bytes()).map_err(io)?;
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshd.lock");
        let first = exclusive(&path, "meshd", Duration::ZERO).unwrap();
        let started = Instant::now();
        let err = exclusive(&path, "meshd", Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(started.elapsed() >= Duration::from_millis(100), "waited");
        assert!(
            err.contains("another meshd is running")
                && err.contains(&std::process::id().to_string()),
            "{err}"
        );
        drop(first);
        exclusive(&path, "meshd", Duration::ZERO).expect("free once the holder is gone");
    }
}
