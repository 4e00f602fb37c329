//! `meshlab netpol`: the NetworkPolicy conformance cases run with real
//! packets on a lab of three nodes.
//!
//! For each case, in order, the lab is moved to the case's state in place
//! (namespace labels, pods with their labels and named ports, policies
//! created, updated or deleted through the API — so `-step1`, `-step2`
//! files are live updates), every node's meshd is waited on until its
//! applied program reflects those writes, and every cell of every expected
//! matrix is probed with a real connection from the source pod's network
//! namespace. Pods are placed over the nodes as the compiled checks place
//! them, so both same-node and cross-node pairs occur.

mod api;
pub mod probe;
pub mod sctp;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use weft_policy::case::{self, Case, Mismatch};
use weft_policy::{PodInfo, Protocol};

use super::state::{process_alive, LabDir, LabState};
use super::topology::LabSpec;
use super::{agents, client, kube_proxy, lifecycle, netns};

/// How long a probe waits for its connection.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Extra tries for a cell that should connect but did not (loss on a busy
/// machine); a cell that connects when it should not is never retried.
const RETRIES: usize = 2;
/// How long meshd may take to apply a case's writes.
const SYNC_TIMEOUT: Duration = Duration::from_secs(20);
const NODES: usize = 3;

pub struct Options {
    pub cases: Vec<PathBuf>,
    /// Leave a lab this run brought up running.
    pub keep: bool,
    /// Probe each pod through its own Service's ClusterIP (as upstream's
    /// probes do), translated by the lab's kube-proxy, not its address.
    pub via_services: bool,
}

/// One case's outcome.
pub struct Outcome {
    pub case: Case,
    pub mismatches: Vec<Mismatch>,
}

/// Runs every case and prints one report per case through `out` as it
/// finishes.
pub fn run(
    dir: &LabDir,
    options: &Options,
    out: &mut dyn FnMut(&Outcome),
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Outcome>> {
    let cases = options
        .cases
        .iter()
        .map(|p| case::load(p).map_err(anyhow::Error::from))
        .collect::<Result<Vec<Case>>>()?;
    ensure!(!cases.is_empty(), "no case files given");
    progress(match probe::SctpProbe::detect() {
        probe::SctpProbe::Kernel => "SCTP probes: associations over this kernel's SCTP sockets",
        probe::SctpProbe::Raw => {
            "SCTP probes: INIT and INIT ACK on raw sockets (this kernel has no SCTP sockets)"
        }
    });
    let reused = match dir.read_state()? {
        Some(state) if process_alive(state.api_server.pid, &dir.path()) => {
            ensure!(
                state.plan.nodes.len() >= NODES,
                "lab {:?} has {} nodes; netpol needs {NODES}",
                dir.name,
                state.plan.nodes.len()
            );
            progress(&format!("reusing lab {:?}", dir.name));
            true
        }
        _ => {
            let spec = LabSpec {
                name: dir.name.clone(),
                nodes: NODES,
                ..LabSpec::default()
            };
            lifecycle::up(dir, &spec, progress)?;
            false
        }
    };
    let result = run_cases(dir, &cases, options.via_services, out, progress);
    if !reused && !options.keep {
        lifecycle::down(dir)?;
    }
    result
}

fn run_cases(
    dir: &LabDir,
    cases: &[Case],
    via_services: bool,
    out: &mut dyn FnMut(&Outcome),
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Outcome>> {
    let mut servers = probe::Servers::default();
    let mut outcomes = Vec::new();
    for case in cases {
        let started = Instant::now();
        let state = place_pods(dir, case)?;
        let placed = case
            .placed(|pod| lab_address(&state, pod))
            .with_context(|| format!("case {}", case.id))?;
        let revision = client::block_on(dir, |c| api::apply(c, &placed))
            .with_context(|| format!("case {}: applying it through the API", case.id))?;
        wait_synced(&state, revision)
            .with_context(|| format!("case {}: waiting for meshd", case.id))?;
        for pod in &placed.pods {
            let netns = &state.pods[state.pod_index(&pod.namespace, &pod.name)?].netns;
            for port in &placed.server_ports {
                for protocol in &placed.server_protocols {
                    servers.ensure(netns, *port, *protocol)?;
                }
            }
        }
        let targets = match via_services {
            true => {
                let ips = client::block_on(dir, |c| api::services(c, &placed))
                    .with_context(|| format!("case {}: its Services", case.id))?;
                wait_translated(&state, &ips)?;
                ips
            }
            false => placed
                .pods
                .iter()
                .map(|p| Ok((p.key(), ipv4(p)?)))
                .collect::<Result<_>>()?,
        };
        let mismatches = probe_all(&state, &placed, &targets)?;
        progress(&format!(
            "{}: {} cells probed in {} ms",
            case.id,
            placed.cells().len(),
            started.elapsed().as_millis()
        ));
        let outcome = Outcome {
            case: placed,
            mismatches,
        };
        out(&outcome);
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// Makes sure every pod of the case exists on the node the case puts it on
/// (as `case::parse` placed it), recreating one an earlier run left on
/// another node.
fn place_pods(dir: &LabDir, case: &Case) -> Result<LabState> {
    for pod in &case.pods {
        let state = dir.running_state()?;
        let existing = state
            .pods
            .iter()
            .find(|p| p.namespace == pod.namespace && p.name == pod.name);
        match existing {
            Some(p) if p.node == pod.node => continue,
            Some(_) => lifecycle::delete_pod(dir, &pod.namespace, &pod.name)?,
            None => {}
        }
        lifecycle::add_pod(
            dir,
            &pod.node,
            &pod.namespace,
            &pod.name,
            &pod.labels,
            super::pods::Status::Reported,
        )?;
    }
    dir.running_state()
}

/// Where the lab put `pod`: its node and addresses, IPv4 first (probes and
/// placeholders use the first, as upstream's single-family runs do).
fn lab_address(state: &LabState, pod: &PodInfo) -> Option<(String, Vec<IpAddr>)> {
    let record = state
        .pods
        .iter()
        .find(|p| p.namespace == pod.namespace && p.name == pod.name)?;
    let mut ips: Vec<IpAddr> = record.ips.iter().filter_map(|i| i.parse().ok()).collect();
    ips.sort_by_key(|ip| !ip.is_ipv4());
    Some((record.node.clone(), ips))
}

/// Waits until every node's meshd has applied a program reflecting
/// `revision` (the newest resourceVersion this case wrote).
fn wait_synced(state: &LabState, revision: u64) -> Result<()> {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    for node in &state.plan.nodes {
        loop {
            let synced = agents::metrics(node)
                .ok()
                .and_then(|text| metric(&text, "weft_policy_synced_revision"))
                .unwrap_or(0);
            if synced >= revision {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "meshd on {} has applied revision {synced}, not {revision}, after {} s",
                    node.name,
                    SYNC_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// The value of an unlabelled metric in Prometheus text.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until the lab's kube-proxy translates every ClusterIP of `ips` to
/// an endpoint on every node.
fn wait_translated(state: &LabState, ips: &BTreeMap<String, Ipv4Addr>) -> Result<()> {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    for node in &state.plan.nodes {
        loop {
            let rules = netns::nft(
                &node.netns,
                &["list", "chain", "ip", kube_proxy::TABLE, "services"],
                None,
            )
            .unwrap_or_default();
            if ips
                .values()
                .all(|ip| rules.contains(&format!("ip daddr {ip} ")))
            {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "kube-proxy has not translated every case Service on {} after {} s",
                node.name,
                SYNC_TIMEOUT.as_secs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Probes every cell at once, each at its destination's address in
/// `targets` (by `namespace/name`); a cell expected to connect that did
/// not is tried again, up to [`RETRIES`] times.
fn probe_all(
    state: &LabState,
    case: &Case,
    targets: &BTreeMap<String, Ipv4Addr>,
) -> Result<Vec<Mismatch>> {
    let netns = |pod: &PodInfo| -> Result<String> {
        Ok(state.pods[state.pod_index(&pod.namespace, &pod.name)?]
            .netns
            .clone())
    };
    let cells = case.cells();
    let mut got: Vec<bool> = vec![false; cells.len()];
    for attempt in 0..=RETRIES {
        let results = Mutex::new(Vec::new());
        std::thread::scope(|scope| -> Result<()> {
            for (i, (probe, from, to, expected)) in cells.iter().enumerate() {
                if attempt > 0 && (got[i] || !expected) {
                    continue;
                }
                let from_netns = netns(from)?;
                let to_ip = *targets
                    .get(&to.key())
                    .with_context(|| format!("no address to probe {} at", to.key()))?;
                let (port, protocol) = (probe.port, probe.protocol);
                let results = &results;
                scope.spawn(move || {
                    let r = probe::connects(&from_netns, to_ip, port, protocol, PROBE_TIMEOUT);
                    results.lock().expect("not poisoned").push((i, r));
                });
            }
            Ok(())
        })?;
        for (i, r) in results.into_inner().expect("not poisoned") {
            got[i] = r.with_context(|| format!("probing cell {i}"))?;
        }
    }
    let got: HashMap<(u16, Protocol, String, String), bool> = cells
        .iter()
        .zip(got)
        .map(|((probe, from, to, _), g)| ((probe.port, probe.protocol, from.key(), to.key()), g))
        .collect();
    let programs = case.programs();
    Ok(case::compare(case, |probe, from, to| {
        let connected = got[&(probe.port, probe.protocol, from.key(), to.key())];
        let decision = case::predicted(&programs, probe, from, to);
        let why = format!(
            "{}, {}; the compiled program says {}: {}",
            from.node,
            to.node,
            case::connected(decision.allowed()),
            case::why(&decision)
        );
        (connected, why)
    }))
}

fn ipv4(pod: &PodInfo) -> Result<Ipv4Addr> {
    match pod.ips.first() {
        Some(IpAddr::V4(ip)) => Ok(*ip),
        _ => bail!("pod {} has no IPv4 address", pod.key()),
    }
}

/// `N passed, M failed`.
pub fn summary(outcomes: &[Outcome]) -> String {
    let failed = outcomes.iter().filter(|o| !o.mismatches.is_empty()).count();
    format!("{} passed, {failed} failed", outcomes.len() - failed)
}
