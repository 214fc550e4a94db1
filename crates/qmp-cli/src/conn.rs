//! Opening a session: unix or TCP monitor, a throwaway QEMU, or a guest agent, with connect
//! and greeting timeouts that say what went wrong.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qmp_testkit::launch::{Launch, LaunchError, Qemu};
use qmp_tokio::{Builder, Client, EventFilter, EventStream, RemoteError};

use crate::fail::Failure;

/// Where to connect.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// A QMP unix socket.
    Unix(PathBuf),
    /// A QMP TCP socket, `HOST:PORT`.
    Tcp(String),
    /// A throwaway QEMU program started for this run.
    Spawn(SpawnKind),
    /// A guest agent's unix socket.
    Qga(PathBuf),
}

/// Which QEMU program `--spawn` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SpawnKind {
    /// qemu-storage-daemon
    Qsd,
    /// qemu-system-x86_64 (paused, no guest)
    System,
}

impl SpawnKind {
    pub(crate) fn program(self) -> &'static str {
        match self {
            Self::Qsd => "qemu-storage-daemon",
            Self::System => "qemu-system-x86_64",
        }
    }
}

/// Timeouts of the connection phases.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) connect: Duration,
    pub(crate) greeting: Duration,
    pub(crate) command: Option<Duration>,
}

/// An open session, and the QEMU it owns (killed when dropped).
pub(crate) struct Session {
    pub(crate) client: Client,
    pub(crate) qga: bool,
    /// Every event since the greeting, subscribed before the driver ran (see
    /// [`events`](Self::events)).
    events: std::sync::Mutex<Option<EventStream>>,
    /// A program started with `--spawn`, kept alive for the session.
    #[allow(dead_code)] // held for its drop (kill and reap)
    pub(crate) qemu: Option<Qemu>,
}

impl Session {
    /// The stream of every event, from the first one QEMU sent (the first call; later calls
    /// subscribe anew).
    pub(crate) fn events(&self) -> EventStream {
        let early = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        early.unwrap_or_else(|| self.client.subscribe(EventFilter::all()))
    }
}

/// Starts a throwaway QEMU program (in its own temp dir) with the testkit launcher.
pub(crate) fn launch(kind: SpawnKind) -> Result<Qemu, Failure> {
    let launch = match kind {
        SpawnKind::Qsd => Launch::storage_daemon(),
        SpawnKind::System => Launch::system(),
    };
    // A Ctrl-C at the terminal reaches `qmp` alone, which then stops a one-shot command (and
    // this QEMU with it) or only the shell's current line; and if `qmp` is killed outright,
    // the kernel kills this QEMU too. Started from the main thread (inside `block_on`).
    launch.tied_to_caller().try_spawn().map_err(|e| match e {
        LaunchError::NotInstalled { .. } => Failure::Connection(format!(
            "--spawn {}: {e}",
            match kind {
                SpawnKind::Qsd => "qsd",
                SpawnKind::System => "system",
            }
        )),
        e => Failure::Connection(format!("cannot start {}: {e}", kind.program())),
    })
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s} s")
    }
}

async fn unix_stream(path: &Path, t: Timeouts) -> Result<std::os::unix::net::UnixStream, Failure> {
    let shown = path.display();
    match tokio::time::timeout(t.connect, tokio::net::UnixStream::connect(path)).await {
        Err(_) => Err(Failure::Connection(format!(
            "timed out after {} connecting to {shown}",
            secs(t.connect)
        ))),
        Ok(Err(e)) => Err(Failure::Connection(format!(
            "cannot connect to {shown}: {e}"
        ))),
        Ok(Ok(s)) => s
            .into_std()
            .map_err(|e| Failure::Connection(format!("cannot use {shown}: {e}"))),
    }
}

/// Opens the session described by `target`.
pub(crate) async fn open(target: &Target, t: Timeouts) -> Result<Session, Failure> {
    // The library times the greeting plus negotiation (or the QGA sync) and says which step
    // was missing; `greet` turns that into the message.
    let mut builder = Builder::new().handshake_timeout(Some(t.greeting));
    if let Some(c) = t.command {
        builder = builder.command_timeout(c);
    }
    let mut qemu = None;
    let qga = matches!(target, Target::Qga(_));
    let handshake = match target {
        Target::Unix(path) => {
            let s = unix_stream(path, t).await?;
            greet(qmp_tokio::from_unix_stream(s, builder), t).await
        }
        Target::Qga(path) => {
            let s = unix_stream(path, t).await?;
            greet(qmp_tokio::from_unix_stream(s, builder.qga()), t).await
        }
        Target::Spawn(kind) => {
            let q = launch(*kind)?;
            let s = unix_stream(q.socket_path(), t).await?;
            qemu = Some(q);
            greet(qmp_tokio::from_unix_stream(s, builder), t).await
        }
        Target::Tcp(addr) => {
            let stream = match tokio::time::timeout(
                t.connect,
                tokio::net::TcpStream::connect(addr.as_str()),
            )
            .await
            {
                Err(_) => {
                    return Err(Failure::Connection(format!(
                        "timed out after {} connecting to {addr}",
                        secs(t.connect)
                    )));
                }
                Ok(Err(e)) => {
                    return Err(Failure::Connection(format!(
                        "cannot connect to {addr}: {e}"
                    )));
                }
                Ok(Ok(s)) => s,
            };
            let _ = stream.set_nodelay(true);
            greet(qmp_tokio::from_stream(stream, builder), t).await
        }
    };
    let (client, events) = handshake?;
    Ok(Session {
        client,
        qga,
        events: std::sync::Mutex::new(Some(events)),
        qemu,
    })
}

async fn greet(
    fut: impl Future<Output = Result<(Client, qmp_tokio::Connection), qmp_tokio::Error>>,
    t: Timeouts,
) -> Result<(Client, EventStream), Failure> {
    match fut.await {
        Err(e) => Err(Failure::Connection(match e.remote_error() {
            Some(RemoteError::GreetingTimeout) => format!(
                "the monitor accepted the connection but is not greeting: is another client \
                 attached, or is it a guest agent (--qga)? (no greeting within {})",
                secs(t.greeting)
            ),
            Some(RemoteError::NegotiationTimeout) => format!(
                "the monitor greeted but did not answer qmp_capabilities within {}",
                secs(t.greeting)
            ),
            Some(RemoteError::QmpNotQga) => {
                "this is a QMP monitor, not a guest agent: connect to it with -s/--socket"
                    .to_owned()
            }
            Some(RemoteError::SyncRefused(refusal)) => format!(
                "the guest agent refused guest-sync-delimited ({}): is it blocked \
                 (--block-rpcs) or left out of --allow-rpcs?",
                refusal.desc
            ),
            Some(RemoteError::SyncTimeout) => format!(
                "the guest agent accepted the connection but did not answer \
                 guest-sync-delimited within {}: is the agent running, and is no other client \
                 attached?",
                secs(t.greeting)
            ),
            _ => format!("handshake failed: {e}"),
        })),
        Ok((client, connection)) => {
            // Subscribed before the driver runs: events read with the negotiation reply are
            // not lost.
            let events = client.subscribe(EventFilter::all());
            qmp_tokio::spawn_connection(connection);
            Ok((client, events))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qmp_testkit::fake::{FakeQemu, Response, Script};
    use qmp_tokio::EventItem;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_session_keeps_the_events_sent_with_the_negotiation_reply() {
        let script = Script::new().on(
            "qmp_capabilities",
            Response::ok("{}").event_before("EARLY", None),
        );
        let fake = FakeQemu::unix(script).unwrap();
        let t = Timeouts {
            connect: Duration::from_secs(10),
            greeting: Duration::from_secs(10),
            command: None,
        };
        let session = open(&Target::Unix(fake.socket_path().unwrap().into()), t)
            .await
            .unwrap();
        // Long after the driver's first turn: only the stream subscribed as the session
        // opened can have the event.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut events = session.events();
        match events.recv().await {
            Some(EventItem::Event(ev)) => assert_eq!(ev.name, "EARLY"),
            other => panic!("expected the EARLY event, got {other:?}"),
        }
        // A second call subscribes anew: it gets what comes next, not the early event.
        let mut again = session.events();
        fake.push_event("LATER", None);
        match again.recv().await {
            Some(EventItem::Event(ev)) => assert_eq!(ev.name, "LATER"),
            other => panic!("expected the LATER event, got {other:?}"),
        }
    }
}
