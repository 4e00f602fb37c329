//! The lab inside a QEMU guest booted from the distribution's kernel, for
//! what the host's kernel lacks (kernel WireGuard, SCTP, netem, IPVS).
//!
//! The guest has no disk of its own: it sees the host's root read-only over
//! 9p, one overlay per top-level directory on a tmpfs (see `init`), so the
//! project's binaries and every tool the lab uses are the host's. Commands
//! go in and their output and status come back through a second, writable
//! 9p share (the mailbox; see `agent`). One guest holds a whole lab, so the
//! lab's code inside is the same code path as on the host.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Where the guests of the CLI (`meshlab --vm`) and of tests live.
pub const DEFAULT_ROOT: &str = "/run/meshlab-vm";

/// Set in every command the guest runs: what runs there knows it (meshlab
/// does not forward `--vm` again; tests expect the guest's kernel).
pub const GUEST_ENV: &str = "MESHLAB_IN_VM";

/// Whether this process runs inside meshlab's guest.
pub fn in_guest() -> bool {
    std::env::var_os(GUEST_ENV).is_some()
}

/// The first stage, run from the initramfs by busybox.
const INIT: &str = include_str!("init");
/// The second stage, PID 1 on the host's userland.
const AGENT: &str = include_str!("agent");

/// What the first stage loads (with what they need, in order) to reach the
/// host's files: virtio, 9p, overlayfs, and entropy so that TLS does not
/// wait for it.
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_rng"];

/// The static busybox the first stage runs on (package busybox-static).
const BUSYBOX: &str = "/bin/busybox";

/// Kernel modules the guest loads up front: what the host's kernel lacks,
/// and `tun`, whose device node appears only once it is loaded (no udev
/// here). A guest missing one fails to boot, naming it, rather than
/// running the suite on a fallback.
const GUEST_MODULES: &[&str] = &["wireguard", "sctp", "sch_netem", "ip_vs", "tun"];

/// Guest size: the lab's processes plus the tmpfs holding what they write.
const MEMORY_MIB: u32 = 6144;
const CPUS: u32 = 2;

/// How a guest's CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// QEMU's translator: slow for computation, fine for correctness.
    Tcg,
}

impl Accel {
    /// Its name in the guest directory's `accel` file.
    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    fn from_name(name: &str) -> Option<Accel> {
        [Accel::Kvm, Accel::Tcg]
            .into_iter()
            .find(|a| a.name() == name)
    }

    fn qemu_arg(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg,thread=multi",
        }
    }

    /// How long a boot may take before it counts as hung. A KVM guest that
    /// hangs (no nested virtualisation) is given up quickly for TCG.
    fn boot_bound(self) -> Duration {
        match self {
            Accel::Kvm => Duration::from_secs(30),
            Accel::Tcg => Duration::from_secs(180),
        }
    }

    /// The factor the lab's bounded waits are stretched by in this guest
    /// ([`crate::lab::scaled`]): TCG runs the same code several times slower.
    pub fn time_scale(self) -> u32 {
        match self {
            Accel::Kvm => 1,
            Accel::Tcg => 4,
        }
    }
}

/// The accelerators to try, in order: KVM only where the device exists and
/// the CPU offers virtualisation (without `vmx`/`svm` a KVM guest hangs in
/// early boot, as on nested clouds).
pub fn accelerators(kvm_device: bool, cpuinfo: &str) -> Vec<Accel> {
    let virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let mut accels = Vec::new();
    if kvm_device && virt {
        accels.push(Accel::Kvm);
    }
    accels.push(Accel::Tcg);
    accels
}

/// A kernel to boot: its image and its modules.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub release: String,
    pub image: PathBuf,
    pub modules: PathBuf,
}

/// The newest installed kernel whose modules include WireGuard (Debian's
/// `linux-image-amd64`, installed by `tests/setup`).
pub fn kernel() -> Result<Kernel> {
    let mut found: Vec<Kernel> = fs::read_dir("/boot")
        .context("reading /boot")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let release = name.strip_prefix("vmlinuz-")?.to_string();
            let modules = Path::new("/lib/modules").join(&release);
            let dep = fs::read_to_string(modules.join("modules.dep")).ok()?;
            dep.contains("/wireguard.ko").then(|| Kernel {
                release,
                image: e.path(),
                modules,
            })
        })
        .collect();
    found.sort_by_key(|k| version_key(&k.release));
    found.pop().context(
        "no kernel with WireGuard modules in /boot and /lib/modules: tests/setup installs linux-image-amd64",
    )
}

/// Orders releases numerically (6.1.0-57 after 6.1.0-9).
fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A module's name as modprobe spells it, from its file.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// The files of `wanted` and everything they need, each after what it
/// needs, from `modules.dep` (`FILE: DEP…`).
pub fn module_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let deps: std::collections::HashMap<String, (String, Vec<String>)> = modules_dep
        .lines()
        .filter_map(|l| {
            let (file, needs) = l.split_once(':')?;
            let needs = needs.split_whitespace().map(str::to_string).collect();
            Some((module_name(file), (file.to_string(), needs)))
        })
        .collect();
    let mut order: Vec<String> = Vec::new();
    fn visit(
        name: &str,
        deps: &std::collections::HashMap<String, (String, Vec<String>)>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        let (file, needs) = deps
            .get(name)
            .with_context(|| format!("module {name} is not in modules.dep"))?;
        if order.contains(file) {
            return Ok(());
        }
        for need in needs {
            visit(&module_name(need), deps, order)?;
        }
        order.push(file.clone());
        Ok(())
    }
    for name in wanted {
        visit(name, &deps, &mut order)?;
    }
    Ok(order)
}

/// The initramfs for `kernel` (built once into `cache` and reused): static
/// busybox, the first stage and the modules it loads.
fn initramfs(kernel: &Kernel, cache: &Path) -> Result<PathBuf> {
    use blake2::Digest;
    let busybox = fs::read(BUSYBOX)
        .with_context(|| format!("reading {BUSYBOX} (tests/setup installs busybox-static)"))?;
    // The initramfs has no libc: a dynamic busybox (package `busybox`)
    // would leave the guest with no init.
    match weft_meshd::elf::linking(&busybox) {
        Ok(weft_meshd::elf::Linking::Static) => {}
        other => bail!("{BUSYBOX} is not a static executable ({other:?}): install busybox-static"),
    }
    // Everything the image is made of names it.
    let mut hash = blake2::Blake2s256::new();
    hash.update(INIT.as_bytes());
    hash.update(BOOT_MODULES.join(",").as_bytes());
    hash.update(&busybox);
    let digest: String = hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let out = cache.join(format!("initrd-{}-{digest}.img", kernel.release));
    if out.exists() {
        return Ok(out);
    }
    let dep = fs::read_to_string(kernel.modules.join("modules.dep"))
        .with_context(|| format!("reading {}", kernel.modules.join("modules.dep").display()))?;
    let order = module_order(&dep, BOOT_MODULES)?;
    let stage = tempfile_dir(cache, "initrd")?;
    fs::create_dir_all(stage.join("bin"))?;
    fs::create_dir_all(stage.join("lib/modules"))?;
    write_executable_bytes(&stage.join("bin/busybox"), &busybox)?;
    let mut list = String::new();
    for file in &order {
        let name = file.rsplit('/').next().unwrap_or(file);
        fs::copy(
            kernel.modules.join(file),
            stage.join("lib/modules").join(name),
        )
        .with_context(|| format!("copying module {file}"))?;
        list.push_str(name);
        list.push('\n');
    }
    fs::write(stage.join("modules"), list)?;
    write_executable(&stage.join("init"), INIT)?;
    let partial = out.with_extension(format!("partial.{}", std::process::id()));
    let archive = fs::File::create(&partial)?;
    // busybox's cpio writes the newc archive the kernel unpacks.
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | bin/busybox cpio -o -H newc 2>/dev/null")
        .current_dir(&stage)
        .stdout(archive)
        .status()
        .context("running busybox cpio")?;
    let _ = fs::remove_dir_all(&stage);
    if !status.success() {
        bail!("building the initramfs with busybox cpio: {status}");
    }
    fs::rename(&partial, &out)?;
    Ok(out)
}

/// A scratch directory under `parent`, removed first if a crashed run left it.
fn tempfile_dir(parent: &Path, what: &str) -> Result<PathBuf> {
    let dir = parent.join(format!("{what}.{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    write_executable_bytes(path, text.as_bytes())
}

fn write_executable_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Quotes `s` for the guest's shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What a command in the guest returned.
#[derive(Debug)]
pub struct Output {
    /// The command's exit code (124, or 137 after a KILL, if the guest's
    /// bound ended it).
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// Whether a command's output is kept or copied to meshlab's own as it comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Capture,
    Forward,
}

/// Which guest: a lab's (`meshlab --vm`) or a run's (`meshlab vm run`, a
/// test suite), each named apart so that neither takes the other's.
#[derive(Debug, Clone, Copy)]
pub enum Guest<'a> {
    Lab(&'a str),
    Run(&'a str),
}

/// Whom a guest lives for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Killed when the thread that booted it ends, even by a crash (tests,
    /// `vm run`): nothing is left burning the CPUs.
    Process,
    /// Outlives meshlab (`meshlab --vm up`) until `down`.
    Detached,
}

/// A running guest. Dropping it powers the guest off (a CLI lab that must
/// outlive meshlab is [`Vm::detach`]ed).
#[derive(Debug)]
pub struct Vm {
    dir: PathBuf,
    pub accel: Accel,
    pub kernel_release: String,
    detached: bool,
}

/// Requests of this process, told apart.
static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Vm {
    /// The directory of `guest` under `root`.
    pub fn dir(root: &Path, guest: Guest) -> PathBuf {
        match guest {
            Guest::Lab(name) => root.join("labs").join(name),
            Guest::Run(name) => root.join("runs").join(name),
        }
    }

    /// Boots a guest in `dir`, trying each accelerator within its bound;
    /// fails with the console's last lines if none boots. The guest's QEMU
    /// holds `dir`'s lock for as long as it runs: a guest of another run
    /// there is refused, a crashed run's leftovers are removed.
    pub fn boot(dir: &Path, lifetime: Lifetime) -> Result<Vm> {
        let lock = lock(dir)?;
        remove(dir);
        fs::create_dir_all(dir.join("mailbox"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let kernel = kernel()?;
        let cache = Path::new("/var/cache/meshlab/vm");
        fs::create_dir_all(cache)?;
        let initrd = initramfs(&kernel, cache)?;
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let kvm = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let mut failures = Vec::new();
        for accel in accelerators(kvm, &cpuinfo) {
            match boot_with(dir, &kernel, &initrd, accel, lifetime, &lock) {
                Ok(()) => {
                    return Ok(Vm {
                        dir: dir.to_path_buf(),
                        accel,
                        kernel_release: kernel.release,
                        detached: false,
                    })
                }
                Err(e) => {
                    kill(dir);
                    failures.push(format!("{accel:?}: {e:#}"));
                }
            }
        }
        bail!("the VM did not boot:\n{}", failures.join("\n"))
    }

    /// The running guest in `dir`, if there is one.
    pub fn attach(dir: &Path) -> Option<Vm> {
        qemu_pid(dir)?;
        let ready = fs::read_to_string(dir.join("mailbox/ready")).ok()?;
        let accel = Accel::from_name(fs::read_to_string(dir.join("accel")).ok()?.trim())?;
        Some(Vm {
            dir: dir.to_path_buf(),
            accel,
            kernel_release: ready.split_whitespace().next()?.to_string(),
            detached: false,
        })
    }

    /// Leaves the guest running when this handle goes.
    pub fn detach(mut self) {
        self.detached = true;
    }

    /// Runs `argv` in the guest from directory `cwd`, killed there after
    /// `limit` (scaled for the accelerator), and returns its output. Fails
    /// if the guest stops answering.
    pub fn run(&self, argv: &[String], cwd: &Path, limit: Duration) -> Result<Output> {
        self.exec(argv, cwd, limit, Stream::Capture)
    }

    /// [`Vm::run`] with the output copied to meshlab's as it comes;
    /// returns the exit code.
    pub fn run_forwarded(&self, argv: &[String], cwd: &Path, limit: Duration) -> Result<i32> {
        Ok(self.exec(argv, cwd, limit, Stream::Forward)?.code)
    }

    fn exec(&self, argv: &[String], cwd: &Path, limit: Duration, stream: Stream) -> Result<Output> {
        let limit = limit * self.accel.time_scale();
        let n = REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let reqs = self.dir.join("mailbox/req");
        fs::create_dir_all(&reqs)?;
        // Written whole under a hidden name, then renamed: the guest never
        // sees half a request.
        let partial = reqs.join(format!(".{id}"));
        let _ = fs::remove_dir_all(&partial);
        fs::create_dir(&partial)?;
        let cwd = cwd.to_str().context("the working directory is not UTF-8")?;
        let script = format!(
            "cd {}\nexec {}\n",
            quote(cwd),
            argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
        );
        fs::write(partial.join("cmd"), script)?;
        fs::write(partial.join("timeout"), limit.as_secs().max(1).to_string())?;
        let req = reqs.join(&id);
        fs::rename(&partial, &req)?;
        let result = self.wait_for(&req, limit + Duration::from_secs(60), stream);
        let _ = fs::remove_dir_all(&req);
        result
    }

    fn wait_for(&self, req: &Path, bound: Duration, stream: Stream) -> Result<Output> {
        let deadline = Instant::now() + bound;
        let mut forwarded = (0u64, 0u64);
        let read = |f: &str| fs::read(req.join(f)).unwrap_or_default();
        loop {
            if stream == Stream::Forward {
                forwarded.0 = forward(&req.join("stdout"), forwarded.0, &mut std::io::stdout());
                forwarded.1 = forward(&req.join("stderr"), forwarded.1, &mut std::io::stderr());
            }
            // The agent renames rc into place after the command ended: its
            // output is complete by then.
            if let Ok(rc) = fs::read_to_string(req.join("rc")) {
                let code = rc.trim().parse().unwrap_or(-1);
                if stream == Stream::Forward {
                    forward(&req.join("stdout"), forwarded.0, &mut std::io::stdout());
                    forward(&req.join("stderr"), forwarded.1, &mut std::io::stderr());
                }
                return Ok(Output {
                    code,
                    stdout: read("stdout"),
                    stderr: read("stderr"),
                });
            }
            let stopped = qemu_pid(&self.dir).is_none();
            if stopped || Instant::now() >= deadline {
                let tail = |f: &str| {
                    let text = String::from_utf8_lossy(&read(f)).into_owned();
                    let lines: Vec<&str> = text.lines().collect();
                    lines[lines.len().saturating_sub(40)..].join("\n")
                };
                bail!(
                    "{}\n--- the command's stdout (end) ---\n{}\n--- its stderr (end) ---\n{}\n--- the console (end) ---\n{}",
                    if stopped {
                        "the VM stopped while running a command".to_string()
                    } else {
                        format!("the VM did not answer within {bound:?}")
                    },
                    tail("stdout"),
                    tail("stderr"),
                    self.console_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The console's last lines (the guest kernel's and the agent's messages).
    pub fn console_tail(&self) -> String {
        console_tail(&self.dir)
    }

    /// Powers the guest off (bounded, then killed) and removes its directory.
    pub fn stop(mut self) {
        self.detached = true;
        shutdown(&self.dir);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.detached {
            shutdown(&self.dir);
        }
    }
}

/// Copies what `file` gained since `from` to `to`; returns the new offset.
fn forward(file: &Path, from: u64, to: &mut impl Write) -> u64 {
    let Ok(mut f) = fs::File::open(file) else {
        return from;
    };
    if f.seek(SeekFrom::Start(from)).is_err() {
        return from;
    }
    let mut buf = Vec::new();
    let n = f.read_to_end(&mut buf).unwrap_or(0);
    let _ = to.write_all(&buf[..n]);
    let _ = to.flush();
    from + n as u64
}

/// Takes `dir`'s lock (a file beside it), or fails naming who holds it.
fn lock(dir: &Path) -> Result<fs::File> {
    use std::os::fd::AsRawFd;
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let path = dir.with_extension("lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "the guest {} is in use by another run (its QEMU holds {})",
            dir.display(),
            path.display()
        );
    }
    Ok(file)
}

fn boot_with(
    dir: &Path,
    kernel: &Kernel,
    initrd: &Path,
    accel: Accel,
    lifetime: Lifetime,
    lock: &fs::File,
) -> Result<()> {
    use std::os::fd::AsFd;
    let mailbox = dir.join("mailbox");
    let _ = fs::remove_file(mailbox.join("ready"));
    write_executable(&mailbox.join("agent"), AGENT)?;
    fs::write(
        mailbox.join("env"),
        format!(
            "export {}={} {GUEST_ENV}=1 MESHLAB_VM_MODULES='{}'\n",
            crate::lab::TIME_SCALE_ENV,
            accel.time_scale(),
            GUEST_MODULES.join(" "),
        ),
    )?;
    fs::write(dir.join("accel"), accel.name())?;
    let console = fs::File::create(dir.join("console.log"))?;
    let share = |path: &Path, tag: &str, ro: bool| {
        format!(
            "local,path={},mount_tag={tag},security_model=none,multidevs=remap{}",
            path.display(),
            if ro { ",readonly=on" } else { "" }
        )
    };
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", accel.qemu_arg()])
        .args(["-smp", &CPUS.to_string(), "-m", &MEMORY_MIB.to_string()])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args(["-virtfs", &share(Path::new("/"), "host", true)])
        .args(["-virtfs", &share(&mailbox, "mailbox", false)])
        .args(["-device", "virtio-rng-pci"])
        .arg("-pidfile")
        .arg(dir.join("qemu.pid"))
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        // Its own process group: a terminal's ^C to meshlab does not reach it.
        .process_group(0);
    // QEMU inherits the lock and holds it for as long as it runs.
    nix::fcntl::fcntl(
        lock.as_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .context("handing the guest's lock to QEMU")?;
    if lifetime == Lifetime::Process {
        // SAFETY: prctl is async-signal-safe; nothing else runs here.
        unsafe {
            qemu.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = qemu
        .spawn()
        .context("starting qemu-system-x86_64 (tests/setup installs qemu-system-x86)")?;
    let deadline = Instant::now() + accel.boot_bound();
    loop {
        if mailbox.join("ready").exists() {
            // Reaped by whoever outlives us; the pid file is the handle.
            std::mem::forget(child);
            let missing = fs::read_to_string(mailbox.join("missing")).unwrap_or_default();
            let missing: Vec<&str> = missing.split_whitespace().collect();
            if !missing.is_empty() {
                bail!("the guest's kernel lacks {missing:?}");
            }
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("qemu exited ({status}):\n{}", console_tail(dir));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "no answer within {:?} of booting:\n{}",
                accel.boot_bound(),
                console_tail(dir)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn console_tail(dir: &Path) -> String {
    let text = fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The guest's QEMU, if it is running.
fn qemu_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(dir.join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let zombie = status
        .lines()
        .any(|l| l.starts_with("State:") && l.contains('Z'));
    (comm.trim().starts_with("qemu-system") && !zombie).then_some(pid)
}

fn kill(dir: &Path) {
    if let Some(pid) = qemu_pid(dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while qemu_pid(dir).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = fs::remove_file(dir.join("qemu.pid"));
}

/// Asks the guest to power off, kills it if it does not within a bound.
fn shutdown(dir: &Path) {
    if qemu_pid(dir).is_some() {
        let _ = fs::write(dir.join("mailbox/poweroff"), "");
        let deadline = Instant::now() + Duration::from_secs(20);
        while qemu_pid(dir).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    remove(dir);
}

/// Kills whatever guest `dir` has and removes the directory.
fn remove(dir: &Path) {
    kill(dir);
    let _ = fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_only_where_the_cpu_can_virtualise() {
        let vmx = "processor\t: 0\nflags\t\t: fpu vme vmx sse\n";
        let plain = "processor\t: 0\nflags\t\t: fpu vme sse\n";
        let cases = [
            (true, vmx, vec![Accel::Kvm, Accel::Tcg]),
            (true, plain, vec![Accel::Tcg]),
            (false, vmx, vec![Accel::Tcg]),
            (false, plain, vec![Accel::Tcg]),
        ];
        for (device, cpuinfo, want) in cases {
            assert_eq!(accelerators(device, cpuinfo), want, "{device} {cpuinfo:?}");
        }
    }

    #[test]
    fn modules_come_after_what_they_need() {
        let dep = "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n\
                   kernel/net/9p/9pnet.ko:\n\
                   kernel/fs/netfs/netfs.ko:\n\
                   kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko\n\
                   kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/virtio/virtio_ring.ko:\n\
                   kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko\n";
        let order = module_order(dep, &["9pnet_virtio", "9p", "virtio_rng"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/9p/9pnet.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/net/9p/9pnet_virtio.ko",
                "kernel/fs/netfs/netfs.ko",
                "kernel/fs/9p/9p.ko",
                "kernel/drivers/char/hw_random/virtio-rng.ko",
            ]
        );
        let err = module_order(dep, &["overlay"]).unwrap_err().to_string();
        assert!(err.contains("overlay"), "{err}");
    }

    #[test]
    fn releases_order_numerically() {
        let mut r = vec!["6.1.0-57-amd64", "6.1.0-9-amd64", "5.10.0-30-amd64"];
        r.sort_by_key(|r| version_key(r));
        assert_eq!(r, ["5.10.0-30-amd64", "6.1.0-9-amd64", "6.1.0-57-amd64"]);
    }

    #[test]
    fn arguments_reach_the_guest_s_shell_verbatim() {
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote("$HOME a"), "'$HOME a'");
    }
}
