//! `meshlab bench throughput`: iperf3 between two lab nodes through Weft's
//! userspace data plane, through wireguard-go 867a4c4 (the current upstream
//! with offloads, the one users would pick instead) and Debian's
//! wireguard-go — each configured by meshd exactly as Weft's is — and over
//! the raw underlay veth, all in one run so the numbers compare (absolute
//! figures drift between runs on shared CPUs).
//!
//! Per path: TCP with 1, 2, 4 and 8 streams; the UDP loss knee (the highest
//! rate received with at most 1% loss); small packets (64-byte UDP
//! payloads, packets per second received); and for each, CPU seconds per
//! GB received — of the data plane processes and of the whole machine —
//! and the data plane processes' peak memory.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::state::LabDir;
use super::topology::{LabSpec, NodeDataplane, DEBIAN_WIREGUARD_GO};
use super::{agents, lifecycle, netns, preflight};

/// What to measure.
#[derive(Debug, Clone)]
pub struct ThroughputSpec {
    pub runs: usize,
    pub seconds: u32,
    pub streams: Vec<u32>,
    /// wireguard-go 867a4c4 (`tests/setup` builds it from `tests/anchors`);
    /// its rows are left out without it.
    pub wireguard_go: Option<PathBuf>,
}

/// One kind of measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Test {
    Tcp { streams: u32 },
    UdpKnee,
    SmallPackets,
}

impl Test {
    fn label(self) -> String {
        match self {
            Self::Tcp { streams } => format!("TCP, {streams} stream(s)"),
            Self::UdpKnee => "UDP loss knee (≤1% lost)".into(),
            Self::SmallPackets => "UDP 64-byte payloads".into(),
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Self::SmallPackets => "Mpps",
            _ => "Gbit/s",
        }
    }
}

/// One measured path and test.
#[derive(Debug, Clone)]
pub struct Row {
    pub path: &'static str,
    pub test: Test,
    pub runs: Vec<Run>,
}

/// One iperf3 run and the CPU it cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    pub value: f64,
    pub bytes: f64,
    /// CPU seconds of the data plane processes on both nodes.
    pub dataplane_cpu: f64,
    /// CPU seconds of the whole machine (iperf3 and kernel included).
    pub machine_cpu: f64,
    /// Peak resident memory of the data plane processes so far, MB.
    pub dataplane_peak_mb: f64,
}

impl Row {
    fn median_by(&self, f: impl Fn(&Run) -> f64) -> f64 {
        let mut v: Vec<f64> = self.runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    }

    pub fn median(&self) -> f64 {
        self.median_by(|r| r.value)
    }

    /// CPU seconds per GB received: (data plane, machine).
    pub fn cpu_per_gb(&self) -> (f64, f64) {
        let per_gb = |cpu: f64, bytes: f64| {
            if bytes > 0.0 {
                cpu / (bytes / 1e9)
            } else {
                0.0
            }
        };
        (
            self.median_by(|r| per_gb(r.dataplane_cpu, r.bytes)),
            self.median_by(|r| per_gb(r.machine_cpu, r.bytes)),
        )
    }
}

pub const WEFT: &str = "weft";
pub const WIREGUARD_GO: &str = "wireguard-go 867a4c4";
pub const DEBIAN: &str = "wireguard-go (Debian)";
pub const UNDERLAY: &str = "raw underlay veth";

/// UDP payload that fits the mesh MTU (1420) without fragments.
const UDP_PAYLOAD: usize = 1372;
const SMALL_PAYLOAD: usize = 64;
const FLOOD_PORT: u16 = 9301;

/// What a UDP flood delivered.
struct Flood {
    sent: u64,
    received: u64,
    seconds: f64,
}
/// Loss above which a rate is past the knee.
const KNEE_LOSS_PERCENT: f64 = 1.0;

/// Runs every measurement; each path gets its own lab, torn down after.
pub fn throughput(
    root: &Path,
    spec: &ThroughputSpec,
    progress: &mut dyn FnMut(&str),
) -> Result<Measured> {
    preflight::require_tools(&[("iperf3", "iperf3")])?;
    let mut labs: Vec<(&'static str, &str, Option<String>)> = vec![(WEFT, "bench-weft", None)];
    match &spec.wireguard_go {
        Some(p) => labs.push((WIREGUARD_GO, "bench-wggo", Some(p.display().to_string()))),
        None => progress(
            "no wireguard-go 867a4c4 (run tests/setup or pass --wireguard-go): its rows are left out",
        ),
    }
    labs.push((
        DEBIAN,
        "bench-debian",
        Some(DEBIAN_WIREGUARD_GO.to_string()),
    ));
    let (mut rows, mut failed) = (Vec::new(), Vec::new());
    for (path, lab, program) in labs {
        let dir = LabDir::new(root, lab);
        let mut nodes = LabSpec {
            name: lab.into(),
            nodes: 2,
            ..LabSpec::default()
        };
        if let Some(program) = &program {
            for n in ["node-1", "node-2"] {
                nodes
                    .dataplanes
                    .insert(n.into(), NodeDataplane::Program(program.clone()));
            }
        }
        let result = (|| -> Result<Vec<Row>> {
            let state = lifecycle::up(&dir, &nodes, &mut |_| {})?;
            let client = &state.plan.nodes[0];
            let server = &state.plan.nodes[1];
            // Each node's data plane container: `meshd dataplane`, or the
            // wireguard-go that replaces it.
            let dataplanes: Vec<u32> = state
                .plan
                .nodes
                .iter()
                .filter_map(|n| agents::container_pid(&dir, n, agents::DATAPLANE))
                .filter_map(|pid| u32::try_from(pid).ok())
                .collect();
            let target = weft_ipam::gateway(&server.pod_cidrs[0]).to_string();
            let mut measured = Bench {
                client: &client.netns,
                server: &server.netns,
                target: &target,
                dataplanes: &dataplanes,
                spec,
            }
            .all(path, progress)?;
            if path == WEFT {
                let underlay = server.underlay.to_string();
                measured.extend(
                    Bench {
                        client: &client.netns,
                        server: &server.netns,
                        target: &underlay,
                        dataplanes: &[],
                        spec,
                    }
                    .all(UNDERLAY, progress)?,
                );
            }
            Ok(measured)
        })();
        lifecycle::down(&dir)?;
        // One path failing (a lab that did not converge) costs its rows,
        // not the others'.
        match result {
            Ok(r) => rows.extend(r),
            Err(e) => {
                progress(&format!("{path}: {e:#}"));
                failed.push(format!("{path}: {e:#}"));
            }
        }
    }
    Ok(Measured { rows, failed })
}

/// What a benchmark run measured, and the paths it could not.
pub struct Measured {
    pub rows: Vec<Row>,
    pub failed: Vec<String>,
}

struct Bench<'a> {
    client: &'a str,
    server: &'a str,
    target: &'a str,
    /// The data plane processes measured.
    dataplanes: &'a [u32],
    spec: &'a ThroughputSpec,
}

impl Bench<'_> {
    fn all(&self, path: &'static str, progress: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
        let mut server = start_server(self.server, self.target)?;
        let result = (|| -> Result<Vec<Row>> {
            let mut tests: Vec<Test> = self
                .spec
                .streams
                .iter()
                .map(|&streams| Test::Tcp { streams })
                .collect();
            tests.extend([Test::UdpKnee, Test::SmallPackets]);
            let mut rows = Vec::new();
            for test in tests {
                let mut row = Row {
                    path,
                    test,
                    runs: Vec::new(),
                };
                for n in 1..=self.spec.runs {
                    let run = match test {
                        Test::Tcp { streams } => {
                            self.measured(&["-P", &streams.to_string()], |r| r.gbps())?
                        }
                        Test::UdpKnee => self.knee()?,
                        Test::SmallPackets => {
                            let (run, flood) = self.flood(SMALL_PAYLOAD, None)?;
                            Run {
                                value: flood.received as f64 / flood.seconds / 1e6,
                                ..run
                            }
                        }
                    };
                    progress(&format!(
                        "{path}, {}, run {n}/{}: {:.2} {}",
                        test.label(),
                        self.spec.runs,
                        run.value,
                        test.unit()
                    ));
                    row.runs.push(run);
                }
                rows.push(row);
            }
            Ok(rows)
        })();
        let _ = server.kill();
        let _ = server.wait();
        result
    }

    /// One iperf3 run with `args`, its CPU cost, and `value` of its report.
    fn measured(&self, args: &[&str], value: impl FnOnce(&Report) -> f64) -> Result<Run> {
        let pids = self.dataplanes;
        let before = (process_cpu(pids), machine_cpu()?);
        let report = self.iperf(args)?;
        let after = (process_cpu(pids), machine_cpu()?);
        Ok(Run {
            value: value(&report),
            bytes: report.received_bytes(),
            dataplane_cpu: after.0 - before.0,
            machine_cpu: after.1 - before.1,
            dataplane_peak_mb: peak_memory_mb(pids),
        })
    }

    /// The highest UDP rate received with at most 1% loss: double from
    /// 1/16 Gbit/s until loss passes it, then bisect three times.
    fn knee(&self) -> Result<Run> {
        let udp = |gbps: f64| -> Result<(Run, f64)> {
            let (run, flood) = self.flood(UDP_PAYLOAD, Some(gbps * 1e9))?;
            let lost = 100.0 * (1.0 - flood.received as f64 / flood.sent.max(1) as f64);
            Ok((
                Run {
                    value: run.bytes * 8.0 / flood.seconds / 1e9,
                    ..run
                },
                lost,
            ))
        };
        let (mut good, mut bad): (Option<(f64, Run)>, Option<f64>) = (None, None);
        let mut rate = 0.0625;
        while bad.is_none() && rate <= 32.0 {
            let (run, lost) = udp(rate)?;
            if lost <= KNEE_LOSS_PERCENT {
                good = Some((rate, run));
                rate *= 2.0;
            } else {
                bad = Some(rate);
            }
        }
        for _ in 0..3 {
            let (Some((lo, _)), Some(hi)) = (&good, bad) else {
                break;
            };
            let mid = (lo + hi) / 2.0;
            let (run, lost) = udp(mid)?;
            if lost <= KNEE_LOSS_PERCENT {
                good = Some((mid, run));
            } else {
                bad = Some(mid);
            }
        }
        Ok(good.map(|(_, run)| run).unwrap_or_default())
    }

    /// A UDP flood of `payload`-byte datagrams for the run's seconds, paced
    /// to `rate` bits/s or as fast as one sender thread goes. iperf3's UDP
    /// sender tops out below what the data planes carry, so the lab sends
    /// its own (one `send` per datagram) and counts what arrives.
    fn flood(&self, payload: usize, rate: Option<f64>) -> Result<(Run, Flood)> {
        let target: IpAddr = self.target.parse().context("the target address")?;
        let to = SocketAddr::new(target, FLOOD_PORT);
        let seconds = f64::from(self.spec.seconds);
        let done = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = mpsc::channel();
        let (server_ns, stop) = (self.server.to_string(), done.clone());
        let receiver = std::thread::spawn(move || {
            netns::run_in(&server_ns, move || {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(to),
                    socket2::Type::DGRAM,
                    None,
                )?;
                let _ = s.set_recv_buffer_size(8 << 20);
                s.bind(&to.into())?;
                let s: UdpSocket = s.into();
                s.set_read_timeout(Some(Duration::from_millis(100)))?;
                ready_tx.send(()).ok();
                let (mut packets, mut bytes) = (0u64, 0u64);
                let mut buf = [0u8; 2048];
                let mut quiet_since = Instant::now();
                loop {
                    match s.recv(&mut buf) {
                        Ok(n) => {
                            packets += 1;
                            bytes += n as u64;
                            quiet_since = Instant::now();
                        }
                        Err(_)
                            if stop.load(Ordering::Relaxed)
                                && quiet_since.elapsed() > Duration::from_millis(300) =>
                        {
                            break
                        }
                        Err(_) => {}
                    }
                }
                Ok((packets, bytes))
            })
        });
        ready
            .recv_timeout(Duration::from_secs(10))
            .context("the flood receiver did not start")?;
        let pids = self.dataplanes;
        let before = (process_cpu(pids), machine_cpu()?);
        let per_second = rate.map(|bits| bits / (payload as f64 * 8.0));
        let sent = netns::run_in(self.client, move || {
            let s = UdpSocket::bind(SocketAddr::new(
                if to.is_ipv4() {
                    [0, 0, 0, 0].into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                },
                0,
            ))?;
            s.connect(to)?;
            let data = vec![0x5au8; payload];
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed().as_secs_f64() < seconds {
                let due = per_second.map_or(sent + 64, |pps| {
                    (pps * start.elapsed().as_secs_f64()) as u64
                });
                while sent < due {
                    // A full socket buffer (ENOBUFS) is a datagram not sent.
                    if s.send(&data).is_ok() {
                        sent += 1;
                    }
                }
                if per_second.is_some() {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            Ok(sent)
        })?;
        done.store(true, Ordering::Relaxed);
        let (received, bytes) = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("the flood receiver panicked"))??;
        let after = (process_cpu(pids), machine_cpu()?);
        Ok((
            Run {
                value: 0.0,
                bytes: bytes as f64,
                dataplane_cpu: after.0 - before.0,
                machine_cpu: after.1 - before.1,
                dataplane_peak_mb: peak_memory_mb(pids),
            },
            Flood {
                sent,
                received,
                seconds,
            },
        ))
    }

    fn iperf(&self, args: &[&str]) -> Result<Report> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                self.client,
                "iperf3",
                "-J",
                "-c",
                self.target,
            ])
            .args(["-t", &self.spec.seconds.to_string()])
            .args(args)
            .output()
            .context("running iperf3 -c")?;
        let report: Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
        if let Some(err) = report["error"].as_str() {
            bail!("iperf3 to {}: {err}", self.target);
        }
        Ok(Report(report))
    }
}

/// An iperf3 `-J` report, read from the receiver's side.
struct Report(Value);

impl Report {
    fn received(&self, field: &str) -> f64 {
        self.0["end"]["sum_received"][field].as_f64().unwrap_or(0.0)
    }

    fn gbps(&self) -> f64 {
        self.received("bits_per_second") / 1e9
    }

    fn received_bytes(&self) -> f64 {
        self.received("bytes")
    }
}

fn start_server(netns: &str, bind: &str) -> Result<Child> {
    let child = Command::new("ip")
        .args(["netns", "exec", netns, "iperf3", "-s", "-B", bind])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(child)
}

/// Clock ticks per second of /proc's CPU times (USER_HZ).
fn ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User + system CPU seconds of `pids` (all their threads).
fn process_cpu(pids: &[u32]) -> f64 {
    let ticks_used: u64 = pids
        .iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the parenthesised command name; utime and stime
            // are the 14th and 15th of the line.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks_used as f64 / ticks()
}

/// The summed peak resident memory (`VmHWM`) of `pids`, MB.
fn peak_memory_mb(pids: &[u32]) -> f64 {
    let kb: u64 = pids
        .iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum();
    kb as f64 / 1024.0
}

/// Busy CPU seconds of the whole machine (every CPU, idle and iowait excluded).
fn machine_cpu() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    Ok((total - idle) as f64 / ticks())
}

/// The results as a Markdown table, then Weft / wireguard-go 867a4c4 per test.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| path | test | median | runs | CPU s/GB, data plane | CPU s/GB, machine | peak MB, data planes |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let runs: Vec<String> = r.runs.iter().map(|g| format!("{:.2}", g.value)).collect();
        let (dp, machine) = r.cpu_per_gb();
        let peak = r
            .runs
            .iter()
            .map(|g| g.dataplane_peak_mb)
            .fold(0.0, f64::max);
        let (dp, peak) = if r.path == UNDERLAY {
            ("–".to_string(), "–".to_string())
        } else {
            (format!("{dp:.2}"), format!("{peak:.1}"))
        };
        out.push_str(&format!(
            "| {} | {} | {:.2} {} | {} | {dp} | {machine:.2} | {peak} |\n",
            r.path,
            r.test.label(),
            r.median(),
            r.test.unit(),
            runs.join(", "),
        ));
    }
    out.push('\n');
    let find = |path: &str, test: Test| rows.iter().find(|r| r.path == path && r.test == test);
    let tests: std::collections::BTreeSet<Test> = rows.iter().map(|r| r.test).collect();
    for t in tests {
        if let (Some(w), Some(g)) = (find(WEFT, t), find(WIREGUARD_GO, t)) {
            let ratio = |a: f64, b: f64| {
                if b > 0.0 {
                    format!("{:.2}×", a / b)
                } else {
                    "n/a (nothing measured for wireguard-go)".to_string()
                }
            };
            out.push_str(&format!(
                "Weft / wireguard-go 867a4c4, {}: {} the rate, {} the data plane CPU per GB\n",
                t.label(),
                ratio(w.median(), g.median()),
                ratio(w.cpu_per_gb().0, g.cpu_per_gb().0),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(value: f64, cpu: f64) -> Run {
        Run {
            value,
            bytes: 1e9,
            dataplane_cpu: cpu,
            machine_cpu: 2.0 * cpu,
            dataplane_peak_mb: 12.0,
        }
    }

    #[test]
    fn medians_cpu_and_ratios() {
        let tcp1 = Test::Tcp { streams: 1 };
        let rows = vec![
            Row {
                path: WEFT,
                test: tcp1,
                runs: vec![run(1.0, 1.0), run(3.0, 1.0), run(2.0, 1.0)],
            },
            Row {
                path: WIREGUARD_GO,
                test: tcp1,
                runs: vec![run(4.0, 2.0), run(4.0, 2.0), run(1.0, 2.0)],
            },
            Row {
                path: UNDERLAY,
                test: tcp1,
                runs: vec![run(9.0, 0.0)],
            },
        ];
        assert_eq!(rows[0].median(), 2.0);
        assert_eq!(rows[0].cpu_per_gb(), (1.0, 2.0));
        let t = table(&rows);
        assert!(
            t.contains(
                "| weft | TCP, 1 stream(s) | 2.00 Gbit/s | 1.00, 3.00, 2.00 | 1.00 | 2.00 | 12.0 |"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "| raw underlay veth | TCP, 1 stream(s) | 9.00 Gbit/s | 9.00 | – | 0.00 | – |"
            ),
            "{t}"
        );
        assert!(
            t.contains("Weft / wireguard-go 867a4c4, TCP, 1 stream(s): 0.50× the rate, 0.50× the data plane CPU per GB"),
            "{t}"
        );
    }

    #[test]
    fn cpu_times_are_read_from_proc() {
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(process_cpu(&[std::process::id()]) > 0.0, "{x}");
        assert!(machine_cpu().unwrap() > 0.0);
    }
}
