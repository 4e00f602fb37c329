//! `meshlab netpol`: every NetworkPolicy conformance case (shared and
//! Weft's own) with real TCP, UDP and SCTP connections across three nodes,
//! and a case with wrong expectations failing in both directions (so the
//! probes can fail); the upstream cases again through Services, as
//! upstream probes.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{run_bounded, Lab};
use serde_json::Value;
use weft_policy::case;

fn all_cases() -> Vec<PathBuf> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    case::conformance_files(&repo).unwrap_or_else(|e| panic!("{e}"))
}

fn netpol(lab: &Lab, cases: &[PathBuf]) -> (bool, String, String) {
    netpol_with(lab, &[], cases)
}

fn netpol_with(lab: &Lab, flags: &[&str], cases: &[PathBuf]) -> (bool, String, String) {
    let mut cmd = lab.command(&[&["netpol"], flags].concat());
    cmd.args(cases);
    let out = run_bounded(cmd, Duration::from_secs(600));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Flips the first expected-connected and the first expected-blocked cell
/// off the diagonal; returns them as `from -> to`.
fn flip_two_cells(case: &mut Value) -> Vec<String> {
    let expected = case["probes"][0]["expected"].as_object_mut().unwrap();
    let first = |want: bool| {
        expected.iter().find_map(|(from, row)| {
            let (to, _) = row
                .as_object()?
                .iter()
                .find(|(to, cell)| *to != from && cell.as_bool() == Some(want))?;
            Some((from.clone(), to.clone()))
        })
    };
    let cells = [first(true).unwrap(), first(false).unwrap()];
    for (from, to) in &cells {
        let cell = &mut expected[from][to];
        *cell = Value::Bool(!cell.as_bool().unwrap());
    }
    cells.iter().map(|(f, t)| format!("{f} -> {t}")).collect()
}

#[test]
fn every_case_passes_with_real_packets_and_wrong_expectations_fail() {
    let files = all_cases();
    assert!(
        files.len() >= 18 + 12,
        "expected the conformance cases, found {}",
        files.len()
    );
    let lab = Lab::up("t-netpol", &[]);
    let (ok, stdout, stderr) = netpol(&lab, &files);
    assert!(ok, "meshlab netpol failed:\n{stdout}\n{stderr}");
    for file in &files {
        let id = file.file_stem().unwrap().to_string_lossy();
        assert!(
            stdout.contains(&format!("PASS {id}\n")),
            "{id} did not pass:\n{stdout}"
        );
    }
    assert!(
        stdout.ends_with(&format!("{} passed, 0 failed\n", files.len())),
        "{stdout}"
    );

    let ports = files
        .iter()
        .find(|p| p.to_string_lossy().contains("014-"))
        .unwrap();
    let mut case: Value = serde_norway::from_str(&std::fs::read_to_string(ports).unwrap()).unwrap();
    let flipped = flip_two_cells(&mut case);
    let wrong = tempfile::NamedTempFile::with_suffix(".yaml").unwrap();
    std::fs::write(wrong.path(), case.to_string()).unwrap();
    let (ok, stdout, stderr) = netpol(&lab, &[wrong.path().to_path_buf()]);
    assert!(!ok, "a wrong expectation passed:\n{stdout}");
    assert!(stderr.contains("1 of 1 cases failed"), "{stderr}");
    assert!(stdout.starts_with("FAIL 014-"), "{stdout}");
    assert!(stdout.ends_with("0 passed, 1 failed\n"), "{stdout}");
    for cell in &flipped {
        assert!(stdout.contains(cell), "{cell} not reported:\n{stdout}");
    }
    assert!(
        stdout.contains("expected blocked, got connected"),
        "{stdout}"
    );
    assert!(
        stdout.contains("expected connected, got blocked"),
        "{stdout}"
    );

    // As upstream probes: every pod through its own Service's ClusterIP,
    // translated by the lab's kube-proxy before Weft's policy sees it.
    let upstream: Vec<PathBuf> = files
        .iter()
        .filter(|p| p.to_string_lossy().contains("/upstream/"))
        .cloned()
        .collect();
    assert_eq!(upstream.len(), 18);
    let (ok, stdout, stderr) = netpol_with(&lab, &["--via-services"], &upstream);
    assert!(
        ok,
        "meshlab netpol --via-services failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.ends_with("18 passed, 0 failed\n"), "{stdout}");
}
