//! Starts real QEMU programs for tests.
//!
//! Each [`Qemu`] gets its own temp dir and its own child process, with a QMP (or guest-agent)
//! Unix socket in that dir that is ready to connect when [`Launch::spawn`] returns. The child is
//! killed by its PID and reaped when the [`Qemu`] is dropped; nothing is ever killed by name.
//!
//! # Why the launcher greets each monitor first
//! QEMU 10.0 has a start-up race: its monitor socket listens before the monitor's I/O thread
//! has taken the chardev over, and a client that connects in that window can be handled by the
//! main thread and the I/O thread at once. With qemu-storage-daemon 10.0.2 on a 2-core VM
//! running two busy loops, connecting the moment the socket accepted went wrong in 106 of 300
//! launches: the first client was greeted twice (65) or cut off (3), or a second client was
//! cut off at once (38). `examples/startup_race.rs` measures it. Earlier hand-written probes
//! also met first clients that were greeted but never answered, and listeners that refused
//! every connection for as long as they tried (over a second).
//!
//! So the monitors are created with `wait=on`: QEMU accepts one connection before it sets up
//! the monitor, and the launcher makes that connection, reads the greeting (proof that the I/O
//! thread owns the chardev) and closes it. After that every client is handled by the I/O
//! thread alone: 300 of 300 launches under the same load were clean. A client of a monitor
//! started with `wait=off` cannot avoid the race; the QMP client tolerates the extra
//! greeting (reported as an anomaly) and its handshake timeout bounds the silent case.
//!
//! A missing binary makes [`Launch::spawn`] print `SKIP: <reason>` and return `None`, unless the
//! environment sets `QMP_REQUIRE_QEMU=1` (as CI does): then it panics.
//!
//! The programs are looked for on `PATH`, then in the usual system directories; with
//! `QMP_QEMU_DIR=DIR` set, in `DIR` alone (and its `storage-daemon/` and `qga/`
//! subdirectories, where a QEMU build directory keeps those two programs).
//!
//! # Example
//! ```no_run
//! use qmp_testkit::launch::Launch;
//!
//! let Some(qemu) = Launch::storage_daemon().pretty().spawn() else { return };
//! let stream = std::os::unix::net::UnixStream::connect(qemu.socket_path()).unwrap();
//! # drop(stream);
//! ```

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The read-only guest-agent commands tests may use (the agent runs on the host).
pub const QGA_ALLOW_LIST: &str = "guest-sync-delimited,guest-sync,guest-ping,guest-info,guest-get-osinfo,guest-get-time,guest-get-timezone,guest-get-host-name";

/// How long a program gets to be ready, by default.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    StorageDaemon,
    System,
    GuestAgent,
}

/// A builder for one QEMU program. Defaults may change.
#[derive(Debug, Clone)]
#[must_use]
pub struct Launch {
    kind: Kind,
    pretty: bool,
    tcp: bool,
    tied_to_caller: bool,
    ready_timeout: Duration,
    args: Vec<OsString>,
}

impl Launch {
    /// `qemu-storage-daemon` with a QMP monitor.
    pub fn storage_daemon() -> Self {
        Self::new(Kind::StorageDaemon)
    }

    /// `qemu-system-x86_64 -M q35 -accel tcg -S -m 64 -nodefaults -display none -device
    /// qemu-xhci,id=xhci` with a QMP monitor (no guest code runs: the VM starts paused).
    pub fn system() -> Self {
        Self::new(Kind::System)
    }

    /// `qemu-ga` listening on a Unix socket, limited to [`QGA_ALLOW_LIST`].
    pub fn guest_agent() -> Self {
        Self::new(Kind::GuestAgent)
    }

    fn new(kind: Kind) -> Self {
        Self {
            kind,
            pretty: false,
            tcp: false,
            tied_to_caller: false,
            ready_timeout: READY_TIMEOUT,
            args: Vec::new(),
        }
    }

    /// Pretty-printed monitor output (`pretty=on`). No effect on the guest agent.
    pub fn pretty(mut self) -> Self {
        self.pretty = true;
        self
    }

    /// A second QMP monitor on `127.0.0.1` with a free port ([`Qemu::tcp_addr`]). No effect on
    /// the guest agent.
    pub fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }

    /// Ties the program to the caller, the form for tools: it runs in a process group of its
    /// own, so a Ctrl-C at the terminal (SIGINT to the foreground process group) reaches only
    /// the caller, which decides what to stop; and the kernel kills it when the caller goes,
    /// so it never outlives a caller that was killed outright: on Linux when the thread that
    /// started it ends (`PR_SET_PDEATHSIG`), on FreeBSD when the caller's process does
    /// (`PROC_PDEATHSIG_CTL`). Other systems have no such signal: there a caller killed
    /// outright leaves it running. Start it from a thread that lives as long as the caller,
    /// such as the main thread. Tests leave this off: their QEMU programs share the test
    /// run's process group, and may outlive the thread that started them.
    pub fn tied_to_caller(mut self) -> Self {
        self.tied_to_caller = true;
        self
    }

    /// How long the program gets to be ready (see the module docs); 20 s by default.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// An extra command-line argument, after the launcher's own. An extra chardev with
    /// `wait=on` holds QEMU until something connects to it; on qemu-system-x86_64 that holds
    /// back the greeting [`spawn`](Self::spawn) waits for, so connect from another thread.
    /// For the guest agent, qemu-ga joins a second `--allow-rpcs` to the launcher's list
    /// (widening it); `--block-rpcs` takes commands out of it.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    fn program(&self) -> &'static str {
        match self.kind {
            Kind::StorageDaemon => "qemu-storage-daemon",
            Kind::System => "qemu-system-x86_64",
            Kind::GuestAgent => "qemu-ga",
        }
    }

    /// Whether the program is installed (on `PATH` or in the usual system directories; in
    /// `$QMP_QEMU_DIR` alone when that is set).
    pub fn is_installed(&self) -> bool {
        self.program_path().is_some()
    }

    /// Where the program is, looked for as [`is_installed`](Self::is_installed) says.
    pub fn program_path(&self) -> Option<PathBuf> {
        find_binary(self.program())
    }

    /// Whether the program can be used by a test: `true` when it is installed; otherwise
    /// prints `SKIP: <reason>` and returns `false`.
    ///
    /// # Panics
    /// When the program is missing and `QMP_REQUIRE_QEMU=1`.
    pub fn available(&self) -> bool {
        if self.is_installed() {
            return true;
        }
        let program = self.program();
        let reason = format!("{program} not found (as an executable) {}", looked_in());
        assert!(
            std::env::var_os("QMP_REQUIRE_QEMU").as_deref() != Some(OsStr::new("1")),
            "QMP_REQUIRE_QEMU=1 but {reason}"
        );
        println!("SKIP: {reason}");
        false
    }

    /// Starts the program and waits until it is ready (see the module docs): the form for
    /// tests.
    ///
    /// Returns `None` when the program is not [`available`](Self::available).
    ///
    /// # Panics
    /// When the binary is missing and `QMP_REQUIRE_QEMU=1`; when the program cannot be started,
    /// exits early, or is not ready in time (with its stderr in the message).
    pub fn spawn(self) -> Option<Qemu> {
        if !self.available() {
            return None;
        }
        Some(self.try_spawn().unwrap_or_else(|e| panic!("{e}")))
    }

    /// Starts the program and waits until it is ready (see the module docs): the form for
    /// tools, which reports every failure as an error.
    ///
    /// # Errors
    /// See [`LaunchError`].
    pub fn try_spawn(self) -> Result<Qemu, LaunchError> {
        retry_taken_port(self.tcp, || self.spawn_once())
    }

    fn spawn_once(&self) -> Result<Qemu, LaunchError> {
        let program = self.program();
        let binary = find_binary(program).ok_or_else(|| LaunchError::NotInstalled {
            program,
            looked_in: looked_in(),
        })?;
        let dir = tempfile::Builder::new()
            .prefix("qmp-testkit-")
            .tempdir()
            .map_err(|e| LaunchError::Io("cannot create a temp dir", e))?;
        let socket = dir.path().join("qmp.sock");
        let mut cmd = Command::new(&binary);
        let tcp_addr = (self.tcp && self.kind != Kind::GuestAgent)
            .then(free_port)
            .transpose()
            .map_err(|e| LaunchError::Io("cannot find a free TCP port", e))?;
        let pretty = if self.pretty { ",pretty=on" } else { "" };
        // `wait=on`: QEMU accepts the launcher's connection before it sets up the monitor, so no
        // client ever meets the start-up race described in the module docs.
        let chardev = |id: &str, addr: &str| format!("socket,{addr},server=on,wait=on,id={id}");
        let unix = format!("path={}", socket.display());
        match self.kind {
            Kind::StorageDaemon => {
                // The TCP monitor first: once the Unix socket exists, both listen.
                if let Some(addr) = tcp_addr {
                    let tcp = format!("host=127.0.0.1,port={}", addr.port());
                    cmd.arg("--chardev").arg(chardev("m1", &tcp));
                    cmd.arg("--monitor").arg(format!("chardev=m1{pretty}"));
                }
                cmd.arg("--chardev").arg(chardev("m0", &unix));
                cmd.arg("--monitor").arg(format!("chardev=m0{pretty}"));
            }
            Kind::System => {
                cmd.args([
                    "-M",
                    "q35",
                    "-accel",
                    "tcg",
                    "-S",
                    "-m",
                    "64",
                    "-nodefaults",
                ]);
                cmd.args(["-display", "none", "-device", "qemu-xhci,id=xhci"]);
                if let Some(addr) = tcp_addr {
                    let tcp = format!("host=127.0.0.1,port={}", addr.port());
                    cmd.arg("-chardev").arg(chardev("m1", &tcp));
                    cmd.arg("-mon")
                        .arg(format!("chardev=m1,mode=control{pretty}"));
                }
                cmd.arg("-chardev").arg(chardev("m0", &unix));
                cmd.arg("-mon")
                    .arg(format!("chardev=m0,mode=control{pretty}"));
            }
            Kind::GuestAgent => {
                cmd.arg("--method=unix-listen");
                cmd.arg(format!("--path={}", socket.display()));
                cmd.arg(format!("--statedir={}", dir.path().display()));
                cmd.arg(format!(
                    "--pidfile={}",
                    dir.path().join("qga.pid").display()
                ));
                cmd.arg(format!("--allow-rpcs={QGA_ALLOW_LIST}"));
            }
        }
        cmd.args(&self.args);
        if self.tied_to_caller {
            tie_to_caller(&mut cmd);
        }
        let stderr_path = dir.path().join("stderr.log");
        let stderr = File::create(&stderr_path)
            .map_err(|e| LaunchError::Io("cannot create stderr.log", e))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd
            .spawn()
            .map_err(|e| LaunchError::Io("cannot start the program", e))?;
        let mut qemu = Qemu {
            child,
            exited: false,
            socket,
            tcp_addr,
            dir,
        };
        let wait = Wait {
            program,
            stderr: &stderr_path,
            timeout: self.ready_timeout,
            // A timeout too large to add means no deadline to speak of: a day.
            deadline: Instant::now()
                .checked_add(self.ready_timeout)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400)),
        };
        qemu.wait_ready(&wait, self.kind)?;
        Ok(qemu)
    }
}

/// See [`Launch::tied_to_caller`].
fn tie_to_caller(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    die_with_caller(cmd);
    cmd.process_group(0);
}

/// Has the kernel kill the child when its parent goes (Linux's `PR_SET_PDEATHSIG`: the thread
/// that started it; FreeBSD's `PROC_PDEATHSIG_CTL`: the process).
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn die_with_caller(cmd: &mut Command) {
    use rustix::process::{Signal, getpid, getppid, set_parent_process_death_signal};
    use std::os::unix::process::CommandExt;
    let caller = getpid();
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: it makes two system calls (prctl, getppid) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            set_parent_process_death_signal(Some(Signal::KILL))?;
            // The caller may have died before the death signal was armed.
            if getppid() != Some(caller) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}

/// Runs `spawn` up to three times while it fails because its TCP port was taken: the port
/// was free when picked, but another program may bind it before QEMU does, and then QEMU
/// exits at once. A fresh port is picked on each try.
fn retry_taken_port<T>(
    tcp: bool,
    mut spawn: impl FnMut() -> Result<T, LaunchError>,
) -> Result<T, LaunchError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match spawn() {
            Err(LaunchError::Exited { stderr, .. })
                if tcp && tries < 3 && stderr.contains("Address already in use") => {}
            other => return other,
        }
    }
}

/// Why [`Launch::try_spawn`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// The program is not installed.
    #[error("{program} is not installed (no executable {looked_in})")]
    NotInstalled {
        /// The program's name.
        program: &'static str,
        /// Where it was looked for: `on PATH, /usr/sbin, ...`, or `in QMP_QEMU_DIR=DIR`.
        looked_in: String,
    },
    /// A system call failed.
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// The program exited before its socket was ready.
    #[error("{program} exited early ({status}): {stderr}")]
    Exited {
        /// The program's name.
        program: &'static str,
        /// How it exited.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The socket did not appear (or accept a connection) in time.
    #[error("{program} did not open its socket in {timeout:?}: {stderr}")]
    NotReady {
        /// The program's name.
        program: &'static str,
        /// How long it was given.
        timeout: Duration,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A QEMU monitor accepted the launcher's connection but did not greet it.
    #[error("{program}'s monitor did not greet the launcher: {detail}: {stderr}")]
    NoGreeting {
        /// The program's name.
        program: &'static str,
        /// What happened instead.
        detail: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// Where [`find_binary`] looks after `PATH`.
const SYSTEM_DIRS: [&str; 4] = ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/sbin"];

/// Where [`find_binary`] looks, in words.
fn looked_in() -> String {
    match qemu_dir() {
        Some(dir) => format!("in QMP_QEMU_DIR={}", dir.display()),
        None => format!("on PATH or in {}", SYSTEM_DIRS.join(", ")),
    }
}

/// The directory `QMP_QEMU_DIR` names, when it is set and not empty.
fn qemu_dir() -> Option<PathBuf> {
    std::env::var_os("QMP_QEMU_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// Looks for `program` in `$QMP_QEMU_DIR` (and its `storage-daemon/` and `qga/`) when that is
/// set; otherwise on `PATH`, then in [`SYSTEM_DIRS`]: the first executable file.
fn find_binary(program: &str) -> Option<PathBuf> {
    if let Some(dir) = qemu_dir() {
        return find_in(build_dirs(dir), program);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    find_in(
        std::env::split_paths(&path).chain(SYSTEM_DIRS.map(PathBuf::from)),
        program,
    )
}

/// Where `QMP_QEMU_DIR=dir` has the programs looked for: `dir`, then the subdirectories where
/// a QEMU build directory keeps qemu-storage-daemon and qemu-ga.
fn build_dirs(dir: PathBuf) -> [PathBuf; 3] {
    let (daemon, agent) = (dir.join("storage-daemon"), dir.join("qga"));
    [dir, daemon, agent]
}

/// The first executable file named `program` in `dirs`.
fn find_in(dirs: impl IntoIterator<Item = PathBuf>, program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    dirs.into_iter().map(|d| d.join(program)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Whether a Unix socket is bound at `path` and listening, from `/proc/net/unix` (the
/// `Flags` column is `00010000` for a listening socket). Without procfs: whether it exists.
fn is_listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return path.exists();
    };
    let Some(want) = path.to_str() else {
        return path.exists();
    };
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() >= 8 && cols[3] == "00010000" && cols[7..].join(" ") == want
    })
}

/// The child's stderr so far (empty when unreadable).
fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind(("127.0.0.1", 0))?.local_addr()
}

/// A running QEMU program, killed and reaped on drop.
///
/// # Drop behavior
/// Kills the child by PID (if still running), waits for it, and removes its temp dir.
/// Only a drop does: a `Qemu` that is never dropped (kept in a `static`, leaked, or in a test
/// process that aborts, exits or is killed) keeps running, and its temp dir stays, unless it
/// was started [`tied_to_caller`](Launch::tied_to_caller) from a thread that lived on.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    exited: bool,
    socket: PathBuf,
    tcp_addr: Option<SocketAddr>,
    dir: tempfile::TempDir,
}

/// One readiness wait: its deadline, and what its errors report.
struct Wait<'a> {
    program: &'static str,
    stderr: &'a Path,
    timeout: Duration,
    deadline: Instant,
}

impl Qemu {
    /// Waits until the program is ready for tests: the guest agent once its socket listens;
    /// a QEMU monitor once the launcher has connected to it and read its greeting.
    fn wait_ready(&mut self, w: &Wait<'_>, kind: Kind) -> Result<(), LaunchError> {
        if kind == Kind::GuestAgent {
            let start = Instant::now();
            return self.retry(w, |q| {
                // The path appears at bind(); connecting works only after listen(). Another
                // network namespace hides the socket from /proc/net/unix: then trust the path.
                (is_listening(&q.socket)
                    || (start.elapsed() > Duration::from_secs(2) && q.socket.exists()))
                .then_some(())
            });
        }
        // The monitors were created with `wait=on`, in command-line order: QEMU blocks at each
        // until a client connects, so the TCP one (created first) is dialled first. Both are
        // dialled before any greeting is awaited: qemu-system-x86_64 sets its monitors up only
        // once every chardev has its client (qemu-storage-daemon sets each up in turn).
        // Reads wake every 100 ms, so that the deadline is checked.
        let slice = Some(Duration::from_millis(100));
        let tcp = match self.tcp_addr {
            Some(addr) => Some(self.retry(w, |_| {
                let s = TcpStream::connect(addr).ok()?;
                s.set_read_timeout(slice).ok().map(|()| s)
            })?),
            None => None,
        };
        let socket = self.socket.clone();
        let unix = self.retry(w, |_| {
            let s = UnixStream::connect(&socket).ok()?;
            s.set_read_timeout(slice).ok().map(|()| s)
        })?;
        if let Some(tcp) = tcp {
            self.greeted(w, tcp)?;
        }
        self.greeted(w, unix)
    }

    /// Calls `attempt` every 5 ms until it gives a value, the child exits, or the deadline
    /// passes.
    fn retry<T>(
        &mut self,
        w: &Wait<'_>,
        mut attempt: impl FnMut(&Self) -> Option<T>,
    ) -> Result<T, LaunchError> {
        loop {
            if let Some(v) = attempt(self) {
                return Ok(v);
            }
            self.check_alive(w)?;
            if Instant::now() > w.deadline {
                return Err(LaunchError::NotReady {
                    program: w.program,
                    timeout: w.timeout,
                    stderr: read_log(w.stderr),
                });
            }
            // No readiness signal exists short of inotify; the socket appears within ms.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Reads from a fresh monitor connection until the greeting has arrived (then the monitor
    /// is fully set up), and closes it; QEMU then serves the next client.
    fn greeted(&mut self, w: &Wait<'_>, mut stream: impl Read) -> Result<(), LaunchError> {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let detail = loop {
            if Instant::now() > w.deadline {
                break format!("no greeting within {:?}", w.timeout);
            }
            match stream.read(&mut buf) {
                Ok(0) => break "the monitor closed the connection".to_owned(),
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    // The greeting's first key; pretty-printed or not, it comes early.
                    if seen.windows(5).any(|w| w == b"\"QMP\"") {
                        return Ok(());
                    }
                    if seen.len() > 64 * 1024 {
                        break "64 KiB without a greeting".to_owned();
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => break format!("reading the greeting: {e}"),
            }
        };
        // A program that died closed its sockets a moment before it can be reaped: give it
        // that moment, so that the error is its exit status and stderr.
        for _ in 0..20 {
            self.check_alive(w)?;
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(LaunchError::NoGreeting {
            program: w.program,
            detail,
            stderr: read_log(w.stderr),
        })
    }

    /// `Err(Exited)` when the child has exited.
    fn check_alive(&mut self, w: &Wait<'_>) -> Result<(), LaunchError> {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.exited = true;
            return Err(LaunchError::Exited {
                program: w.program,
                status,
                stderr: read_log(w.stderr),
            });
        }
        Ok(())
    }

    /// The QMP (or guest-agent) Unix socket, ready to connect. A QMP monitor has greeted the
    /// launcher once already; each new client gets its own greeting.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The TCP monitor's address, when launched with [`Launch::tcp`].
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The program's own temp dir (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills this child (SIGKILL by PID) and waits for it. Harmless when it already exited.
    pub fn kill(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.exited = true;
        }
    }

    /// Waits up to `timeout` for the child to exit on its own (after `quit`), reaping it.
    /// Returns whether it exited.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while !self.exited {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.exited = true;
            } else if start.elapsed() > timeout {
                return false;
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        true
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::*;

    #[test]
    fn only_an_executable_file_counts_as_the_program() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let [plain, dir, exe] = ["plain", "dir", "exe"].map(|d| root.path().join(d));
        for d in [&plain, &dir, &exe] {
            std::fs::create_dir(d).unwrap();
        }
        // Not executable; a directory of that name; then the real one.
        std::fs::write(plain.join("qemu-x"), "").unwrap();
        std::fs::create_dir(dir.join("qemu-x")).unwrap();
        std::fs::write(exe.join("qemu-x"), "").unwrap();
        std::fs::set_permissions(exe.join("qemu-x"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let dirs = [plain.clone(), dir.clone(), exe.clone()];
        assert_eq!(find_in(dirs, "qemu-x"), Some(exe.join("qemu-x")));
        assert_eq!(find_in([plain, dir], "qemu-x"), None);
    }

    #[test]
    fn a_qemu_build_directory_is_searched_where_meson_puts_the_programs() {
        use std::os::unix::fs::PermissionsExt;
        let build = tempfile::tempdir().unwrap();
        let exe = std::fs::Permissions::from_mode(0o755);
        for (sub, name) in [
            ("", "qemu-system-x86_64"),
            ("storage-daemon", "qemu-storage-daemon"),
            ("qga", "qemu-ga"),
        ] {
            let dir = build.path().join(sub);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), "").unwrap();
            std::fs::set_permissions(dir.join(name), exe.clone()).unwrap();
            let dirs = build_dirs(build.path().to_owned());
            assert_eq!(find_in(dirs, name), Some(dir.join(name)));
        }
    }

    fn exited(stderr: &str) -> LaunchError {
        LaunchError::Exited {
            program: "qemu-storage-daemon",
            status: ExitStatus::from_raw(256),
            stderr: stderr.to_owned(),
        }
    }

    #[test]
    fn a_taken_tcp_port_is_tried_three_times_and_nothing_else_is_retried() {
        // What QEMU 10.0 prints when the port is taken.
        let in_use = "qemu-storage-daemon: --chardev socket,id=m1,host=127.0.0.1,port=50605,\
                      server=on,wait=on: Failed to find an available port: Address already in use\n";
        for (tcp, stderr, tries) in [(true, in_use, 3), (false, in_use, 1), (true, "bad", 1)] {
            let mut n = 0;
            let r: Result<(), _> = retry_taken_port(tcp, || {
                n += 1;
                Err(exited(stderr))
            });
            assert_eq!(r.unwrap_err().to_string(), exited(stderr).to_string());
            assert_eq!(n, tries, "{tcp} {stderr}");
        }
        let mut n = 0;
        let r = retry_taken_port(true, || {
            n += 1;
            if n < 2 { Err(exited(in_use)) } else { Ok(n) }
        });
        assert_eq!(r.unwrap(), 2);
    }
}
