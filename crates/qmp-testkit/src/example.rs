//! Runs an adapter's status example (`tokio_status`, `smol_status`, `async_std_status`) against
//! a real `qemu-system-x86_64` and checks what it prints.
//!
//! The example connects to the launcher's Unix monitor, subscribes, prints the greeting's
//! version and `query-status`, and then every event until the connection closes. The check
//! drives the VM through a second (TCP) monitor, since QEMU sends events to every monitor:
//! `cont`, `stop`, then `quit`, after which the example must print `closed: PeerClosed` and
//! exit successfully.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::launch::Launch;

/// How long each step may take.
const STEP: Duration = Duration::from_secs(20);

/// Runs the example binary `name` and asserts its output line by line. Returns without
/// checking when qemu-system-x86_64 is not installed (see [`Launch::spawn`]).
///
/// The binary is the one cargo built next to the calling test: `cargo test -p <crate>` builds
/// the package's examples, but `cargo test --test <file>` does not (and would run an older
/// build if one is there).
///
/// # Panics
/// When the example is not built, prints something else, or does not exit successfully.
pub fn check_status_example(name: &str) {
    let launch = Launch::system().tcp();
    if !launch.available() {
        return;
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join("examples")
        .join(name);
    assert!(
        bin.is_file(),
        "{} is not built: run `cargo test -p <its crate>`, which builds the examples",
        bin.display()
    );
    let mut qemu = launch.spawn().expect("available");
    let mut child = Reaped(
        Command::new(&bin)
            .arg(qemu.socket_path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the example starts"),
    );
    let child = &mut child.0;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let mut until = |prefix: &str| loop {
        let line = rx
            .recv_timeout(STEP)
            .unwrap_or_else(|_| panic!("{name}: no line starting {prefix:?} after {lines:?}"));
        let found = line.starts_with(prefix);
        lines.push(line);
        if found {
            break;
        }
    };
    until("status: ");
    let mut monitor = TcpStream::connect(qemu.tcp_addr().expect("a TCP monitor")).unwrap();
    monitor
        .write_all(b"{\"execute\":\"qmp_capabilities\"}")
        .unwrap();
    monitor.write_all(b"{\"execute\":\"cont\"}").unwrap();
    until("event RESUME");
    monitor.write_all(b"{\"execute\":\"stop\"}").unwrap();
    until("event STOP");
    monitor.write_all(b"{\"execute\":\"quit\"}").unwrap();
    until("closed: ");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < STEP,
            "{name} did not exit after {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{name}: {status} after {lines:?}");
    assert!(qemu.wait_exit(STEP), "QEMU did not quit");
    assert!(
        lines[0].starts_with("connected to QEMU 10."),
        "{name}: {lines:?}"
    );
    assert_eq!(
        lines[1..],
        [
            r#"status: {"running":false,"status":"prelaunch"}"#,
            "event RESUME None",
            "event STOP None",
            r#"event SHUTDOWN Some(RawJson({"guest": false, "reason": "host-qmp-quit"}))"#,
            "closed: PeerClosed",
        ],
        "{name}"
    );
}

/// The example's process, killed and reaped when the check ends, by panic or not.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
