//! The launcher starts each real program with a socket ready to connect, and cleans up.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use qmp_testkit::launch::Launch;

const T: Duration = Duration::from_secs(10);

/// Reads until `end` is seen; returns everything read.
fn read_until(s: &mut impl Read, end: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = [0u8; 1024];
    while !out.ends_with(end) {
        let n = s.read(&mut b).unwrap();
        assert!(n > 0, "EOF after {:?}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&b[..n]);
    }
    out
}

#[test]
fn storage_daemon_on_unix_and_tcp() {
    let Some(qemu) = Launch::storage_daemon().tcp().spawn() else {
        return;
    };
    let dir = qemu.dir().to_owned();
    assert!(dir.is_dir());
    assert!(qemu.socket_path().starts_with(&dir));
    let pid = qemu.pid();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());

    let mut unix = UnixStream::connect(qemu.socket_path()).unwrap();
    unix.set_read_timeout(Some(T)).unwrap();
    let greeting = read_until(&mut unix, b"\r\n");
    assert!(greeting.starts_with(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": "));

    let mut tcp = TcpStream::connect(qemu.tcp_addr().expect("a TCP monitor")).unwrap();
    tcp.set_read_timeout(Some(T)).unwrap();
    assert_eq!(read_until(&mut tcp, b"\r\n"), greeting);
    drop(qemu);
    assert!(!dir.exists(), "the temp dir is removed on drop");
}

#[test]
fn pretty_storage_daemon() {
    let Some(qemu) = Launch::storage_daemon().pretty().spawn() else {
        return;
    };
    assert_eq!(qemu.tcp_addr(), None);
    let mut s = UnixStream::connect(qemu.socket_path()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let greeting = read_until(&mut s, b"\r\n}\r\n");
    assert!(greeting.starts_with(b"{\r\n    \"QMP\": {\r\n"));
}

#[test]
fn system_emulator_and_kill() {
    let Some(mut qemu) = Launch::system().arg("-name").arg("launch-test").spawn() else {
        return;
    };
    let mut s = UnixStream::connect(qemu.socket_path()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    read_until(&mut s, b"\r\n");
    s.write_all(br#"{"execute":"qmp_capabilities","id":0}{"execute":"query-name","id":1}"#)
        .unwrap();
    let replies = read_until(&mut s, b"\"id\": 1}\r\n");
    assert_eq!(
        replies,
        b"{\"return\": {}, \"id\": 0}\r\n{\"return\": {\"name\": \"launch-test\"}, \"id\": 1}\r\n"
    );
    qemu.kill();
    let mut rest = Vec::new();
    // The monitor closes when the process dies: EOF or a reset, never a hang (which the read
    // timeout would report as WouldBlock).
    match s.read_to_end(&mut rest) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => assert!(rest.is_empty()),
        other => panic!("expected EOF or a reset, got {other:?} after {rest:?}"),
    }
    qemu.kill(); // harmless twice
}

#[test]
fn guest_agent_sync() {
    let Some(qemu) = Launch::guest_agent().spawn() else {
        return;
    };
    let mut s = UnixStream::connect(qemu.socket_path()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":42}}")
        .unwrap();
    let got = read_until(&mut s, b"\xff{\"return\": 42}\n");
    assert_eq!(
        got,
        b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n\xff{\"return\": 42}\n"
    );
    s.write_all(br#"{"execute":"guest-shutdown","id":1}"#)
        .unwrap();
    let refused = read_until(&mut s, b"\n");
    assert_eq!(
        String::from_utf8_lossy(&refused),
        "{\"id\": 1, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Command guest-shutdown has been disabled: the command is not allowed\"}}\n"
    );
}

#[test]
fn try_spawn_reports_a_program_that_exits_early_with_its_stderr() {
    let launch = Launch::storage_daemon().arg("--no-such-option");
    if !launch.available() {
        return;
    }
    match launch.try_spawn() {
        Err(qmp_testkit::launch::LaunchError::Exited {
            program,
            status,
            stderr,
        }) => {
            assert_eq!((program, status.code()), ("qemu-storage-daemon", Some(1)));
            // One line, after the binary's full path (which depends on where it is installed).
            let (path, line) = stderr.split_once(": ").unwrap();
            assert!(path.ends_with("/qemu-storage-daemon"), "{stderr}");
            assert_eq!(line, "unrecognized option '--no-such-option'\n");
        }
        other => panic!("expected an early exit, got {other:?}"),
    }
}

#[test]
fn try_spawn_reports_a_monitor_that_never_greets() {
    // qemu-system-x86_64 sets up its monitors once every chardev has its client, so a second
    // `wait=on` chardev that nobody dials holds back the greeting.
    let q = tempfile::tempdir().unwrap();
    let held = q.path().join("held.sock");
    let launch = Launch::system()
        .arg("-chardev")
        .arg(format!(
            "socket,path={},server=on,wait=on,id=held",
            held.display()
        ))
        .ready_timeout(Duration::from_secs(3));
    if !launch.available() {
        return;
    }
    let start = std::time::Instant::now();
    match launch.try_spawn() {
        Err(qmp_testkit::launch::LaunchError::NoGreeting {
            program,
            detail,
            stderr,
        }) => {
            assert_eq!(program, "qemu-system-x86_64");
            assert_eq!(detail, "no greeting within 3s");
            // QEMU says what it is waiting for.
            assert!(stderr.contains(&format!("{}", held.display())), "{stderr}");
        }
        other => panic!("expected no greeting, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(10));
}
