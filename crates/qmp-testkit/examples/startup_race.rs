//! Measures QEMU's monitor start-up race: what a client meets when it connects the moment
//! `qemu-storage-daemon`'s monitor socket accepts, with `wait=off` (the usual command line)
//! against the testkit launcher (`wait=on`, greeted once before the test connects).
//!
//! ```text
//! cargo run --release -p qmp-testkit --example startup_race -- [LAUNCHES]
//! ```
//!
//! Each launch connects a first client (greeting, `qmp_capabilities`) and then a second one,
//! which QEMU should accept and leave waiting. The race needs the monitor's I/O thread to be
//! late, so it shows under CPU load: run two busy loops (`yes >/dev/null &` twice) alongside.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qmp_testkit::launch::Launch;

fn main() {
    let launches: usize = std::env::args()
        .nth(1)
        .map_or(100, |n| n.parse().expect("LAUNCHES is a number"));
    if !Launch::storage_daemon().available() {
        return;
    }
    for mode in ["wait=off", "launcher"] {
        let mut outcomes = BTreeMap::<String, usize>::new();
        for _ in 0..launches {
            *outcomes.entry(one_launch(mode)).or_default() += 1;
        }
        let list: Vec<String> = outcomes.iter().map(|(k, n)| format!("{n} {k}")).collect();
        println!("{mode}: {launches} launches: {}", list.join(", "));
    }
}

/// Starts one daemon in `mode`, runs the two clients, and names what they met.
fn one_launch(mode: &str) -> String {
    if mode == "launcher" {
        let qemu = Launch::storage_daemon().spawn().expect("available");
        return clients(qemu.socket_path());
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("qmp.sock");
    let _daemon = Daemon(
        Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,id=m,path={},server=on,wait=off",
                path.display()
            ))
            .args(["--monitor", "chardev=m"])
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon starts"),
    );
    clients(&path)
}

/// A daemon killed and reaped when dropped, panics included.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The first client (connected as soon as the socket accepts) and then a second one.
fn clients(path: &Path) -> String {
    let start = Instant::now();
    let first = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return format!("first client cannot connect ({})", e.kind()),
        }
    };
    first
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut lines = BufReader::new(&first);
    match line(&mut lines) {
        Line::Text(t) if t.starts_with("{\"QMP\"") => {}
        other => return format!("first client: {other:?} instead of a greeting"),
    }
    if let Err(e) = (&first).write_all(b"{\"execute\":\"qmp_capabilities\"}") {
        return format!("first client: cannot write ({})", e.kind());
    }
    match line(&mut lines) {
        Line::Text(t) if t.starts_with("{\"return\"") => {}
        Line::Text(t) if t.starts_with("{\"QMP\"") => return "first client greeted twice".into(),
        other => return format!("first client: {other:?} instead of a return"),
    }
    let second = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => return format!("second client cannot connect ({})", e.kind()),
    };
    second
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    match line(&mut BufReader::new(&second)) {
        Line::Silent => "clean".into(),
        other => format!("second client: {other:?} instead of silence"),
    }
}

#[derive(Debug)]
enum Line {
    Text(String),
    Eof,
    Silent,
    Failed(#[expect(dead_code, reason = "shown through Debug")] ErrorKind),
}

fn line(r: &mut impl BufRead) -> Line {
    let mut s = String::new();
    match r.read_line(&mut s) {
        Ok(0) => Line::Eof,
        Ok(_) => Line::Text(s),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Line::Silent,
        Err(e) => Line::Failed(e.kind()),
    }
}
