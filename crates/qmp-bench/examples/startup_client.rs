//! What `qmp_tokio::connect_unix_wait` meets when it connects to a `qemu-storage-daemon` the
//! moment it starts, with the monitor's usual `wait=off`: QEMU 10.0's start-up race (see
//! `qmp_testkit::launch`). Each launch starts a daemon, connects at once (waiting up to 5 s for
//! the socket), runs `query-version` and names the outcome; when there was no session, it
//! also says what a second client met.
//!
//! ```text
//! cargo run --release -p qmp-bench --example startup_client -- [LAUNCHES]
//! ```
//!
//! The race needs the monitor's I/O thread to be late, so it shows under CPU load: run busy
//! loops (`yes >/dev/null &`) alongside. On this 2-core VM with four of them, 800 launches
//! gave 792 working sessions, 6 greeted twice, and 2 cut off (before the greeting, and during
//! negotiation), where a second client was refused or cut off in turn. In 2,400 launches, no
//! monitor that had cut a client off took the next one.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qmp_client::Builder;

fn main() {
    let launches: usize = std::env::args()
        .nth(1)
        .map_or(100, |n| n.parse().expect("LAUNCHES is a number"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut outcomes = BTreeMap::<String, usize>::new();
    for _ in 0..launches {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("qmp.sock");
        let spawned = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,id=m,path={},server=on,wait=off",
                path.display()
            ))
            .args(["--monitor", "chardev=m"])
            .stderr(Stdio::null())
            .spawn();
        let Ok(daemon) = spawned else {
            println!("SKIP: qemu-storage-daemon cannot be started");
            return;
        };
        let _daemon = Daemon(daemon);
        let outcome = rt.block_on(one_client(&path));
        *outcomes.entry(outcome).or_default() += 1;
    }
    let list: Vec<String> = outcomes.iter().map(|(k, n)| format!("{n} {k}")).collect();
    println!(
        "wait=off, connect_unix_wait: {launches} launches: {}",
        list.join(", ")
    );
}

fn builder() -> Builder {
    Builder::new()
        .handshake_timeout(Some(Duration::from_secs(2)))
        .command_timeout(Duration::from_secs(2))
}

/// Connects, runs `query-version`, and names the outcome. When there is no session, a second
/// `connect_unix_wait` shows whether the monitor recovers.
async fn one_client(path: &std::path::Path) -> String {
    let wait = Duration::from_secs(5);
    let (client, conn) = match qmp_tokio::connect_unix_wait(path, builder(), wait).await {
        Ok(session) => session,
        Err(e) => {
            let then = match qmp_tokio::connect_unix_wait(path, builder(), wait).await {
                Ok(_) => "a second client gets a session".to_owned(),
                Err(again) => format!("a second client gets: {again}"),
            };
            return format!("no session ({:?}: {e}); {then}", e.kind());
        }
    };
    let driver = tokio::spawn(conn);
    let res = client
        .execute::<serde::de::IgnoredAny, _>("query-version", &())
        .await;
    let outcome = match res {
        Ok(_) if client.stats().anomalies > 0 => "works, greeted twice".to_owned(),
        Ok(_) => "works".to_owned(),
        Err(e) => format!("query-version failed ({:?}: {e})", e.kind()),
    };
    driver.abort();
    outcome
}

/// A daemon killed and reaped when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
