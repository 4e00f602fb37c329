//! Helpers for end-to-end tests on a real lab. Each test uses its own lab
//! name, so tests run in parallel and a crashed run's leftovers are cleared
//! by the next `up` of the same name.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

pub const MESHLAB: &str = env!("CARGO_BIN_EXE_meshlab");

/// A lab that is torn down when dropped, even if the test panicked.
pub struct Lab {
    pub name: String,
    pub root: PathBuf,
}

impl Lab {
    /// `meshlab up` with extra arguments; panics with meshlab's output on failure.
    pub fn up(name: &str, args: &[&str]) -> Lab {
        assert!(
            nix_is_root(),
            "end-to-end lab tests need root (network namespaces)"
        );
        let lab = Lab {
            name: name.to_string(),
            root: PathBuf::from("/run/meshlab-tests"),
        };
        let out = lab.meshlab(&[&["up"], args].concat());
        assert!(
            out.status.success(),
            "meshlab up failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(MESHLAB);
        c.arg("--root")
            .arg(&self.root)
            .arg("--name")
            .arg(&self.name)
            .args(args);
        c
    }

    /// Runs meshlab with a bounded wait, so a hung command fails the test
    /// instead of hanging it.
    pub fn meshlab(&self, args: &[&str]) -> Output {
        run_bounded(self.command(args), Duration::from_secs(60))
    }

    /// Runs meshlab and returns stdout, panicking with stderr on failure.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.meshlab(args);
        assert!(
            out.status.success(),
            "meshlab {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status --json is JSON")
    }

    pub fn kubeconfig(&self) -> String {
        self.ok(&["kubeconfig"]).trim().to_string()
    }

    pub fn dir(&self) -> PathBuf {
        self.root.join(&self.name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = self.meshlab(&["down"]);
        if !out.status.success() {
            eprintln!(
                "meshlab down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs a command, killing it if it outlives `limit`.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning a command");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let readers = (
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        }),
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        }),
    );
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for a command") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: readers.0.join().unwrap_or_default(),
        stderr: readers.1.join().unwrap_or_default(),
    }
}
