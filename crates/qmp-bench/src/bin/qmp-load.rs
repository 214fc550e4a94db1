//! `qmp-load`: measures commands per second and client CPU per command against a QMP socket.

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use qmp_bench::{COMMAND, RawIds, RawWait, Sample, fake_server, median, raw, workload};

/// Where the commands go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    /// `--socket PATH`.
    Socket,
    /// `--fake`: the testkit's fake in a child process (its CPU is not counted).
    FakeProcess,
    /// `--fake-in-process`: the fake on a thread of this process (its CPU is counted).
    FakeInProcess,
}

struct Args {
    socket: PathBuf,
    runtime: String,
    mode: String,
    n: usize,
    concurrency: usize,
    max_in_flight: Option<usize>,
    raw: bool,
    /// Every command's timeout (`--command-timeout SECS`; none by default).
    command_timeout: Option<Duration>,
    /// How the raw baseline waits for replies.
    raw_wait: RawWait,
    /// Which ids the raw baseline writes.
    raw_ids: RawIds,
    /// tokio worker threads (1: the current-thread runtime).
    threads: usize,
    server: Server,
    /// Measured runs, each on a fresh connection; the medians are reported.
    repeat: usize,
    /// Serve a fake QEMU and print its socket, until stdin closes (used by `--fake`).
    serve_fake: bool,
    /// Queued in-band commands the fake reads (QEMU: 8).
    queue_limit: usize,
    /// smol and async-std: where the driver runs (`local`: a task of a same-thread executor
    /// next to the workload's task; `join`: in the workload's task; `spawn`: both are tasks of
    /// the runtime's thread pool, as the adapters' `spawn_connection` does).
    driver: String,
}

impl Args {
    /// `--max-in-flight`, or its default: `min(C, 8)` on a socket (the library's default of
    /// 8), `C` against the fake.
    fn max_in_flight(&self) -> usize {
        self.max_in_flight.unwrap_or(match self.server {
            Server::Socket => self.concurrency.min(8),
            _ => self.concurrency,
        })
    }

    /// Requests on the wire at most, for every client: 1 in `seq`, else `min(C, M)`.
    fn in_flight(&self) -> usize {
        match self.mode.as_str() {
            "conc" => self.concurrency.min(self.max_in_flight()),
            _ => 1,
        }
    }
}

/// Most requests the raw client keeps in flight (about 40 KB of requests and 30 KB of
/// replies, well within a Unix socket's buffers).
const MAX_RAW_IN_FLIGHT: usize = 1024;

const USAGE: &str = "usage: qmp-load (--socket PATH | --fake | --fake-in-process) \
                     [--runtime tokio|smol|async-std] [--raw] [--mode seq|conc] [--n N] \
                     [--concurrency C] [--max-in-flight M] [--threads T] [--repeat R] \
                     [--driver local|join|spawn] [--raw-wait block|poll|tick:US] [--raw-ids seq|reuse|none] [--command-timeout SECS] [--queue-limit Q]\n       \
                     qmp-load --serve-fake [--queue-limit Q]";

/// Most tokio worker threads.
const MAX_THREADS: usize = 1024;

/// Most requests on the wire (`--max-in-flight`): the library's default local queue.
fn max_queued() -> usize {
    qmp_client::Config::default().max_queued
}

/// How long the raw baseline waits for data (or for the server to read): the library's
/// handshake timeout.
fn raw_timeout() -> Duration {
    qmp_client::Config::default()
        .handshake_timeout
        .unwrap_or(Duration::from_secs(10))
}

fn parse() -> Result<Args, String> {
    parse_from(std::env::args().skip(1))
}

fn parse_from(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        socket: PathBuf::new(),
        runtime: "tokio".into(),
        mode: "seq".into(),
        n: 10_000,
        concurrency: 8,
        max_in_flight: None,
        raw: false,
        raw_wait: RawWait::Block,
        raw_ids: RawIds::Sequential,
        command_timeout: None,
        threads: 2,
        server: Server::Socket,
        repeat: 1,
        serve_fake: false,
        queue_limit: 64,
        driver: "local".into(),
    };
    // The flags given, to refuse those that would be ignored.
    let mut seen: Vec<String> = Vec::new();
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| {
            v.parse::<usize>()
                .map_err(|e| format!("{flag}: {v:?}: {e}"))
        };
        // A count of at least 1 (and at most `max`).
        let count = |v: String, max: usize| match num(v)? {
            0 => Err(format!("{flag}: at least 1")),
            k if k > max => Err(format!("{flag}: at most {max}")),
            k => Ok(k),
        };
        match flag.as_str() {
            "--socket" => a.socket = value()?.into(),
            "--runtime" => {
                a.runtime = value()?;
                if !matches!(a.runtime.as_str(), "tokio" | "smol" | "async-std") {
                    return Err(format!(
                        "--runtime: {:?} is not tokio, smol or async-std",
                        a.runtime
                    ));
                }
            }
            "--mode" => {
                a.mode = value()?;
                if !matches!(a.mode.as_str(), "seq" | "conc") {
                    return Err(format!("--mode: {:?} is not seq or conc", a.mode));
                }
            }
            "--n" => a.n = count(value()?, usize::MAX)?,
            "--concurrency" => a.concurrency = count(value()?, usize::MAX)?,
            "--max-in-flight" => a.max_in_flight = Some(count(value()?, max_queued())?),
            "--threads" => a.threads = count(value()?, MAX_THREADS)?,
            "--repeat" => a.repeat = count(value()?, usize::MAX)?,
            "--queue-limit" => a.queue_limit = count(value()?, usize::MAX)?,
            "--driver" => {
                a.driver = value()?;
                if !matches!(a.driver.as_str(), "local" | "join" | "spawn") {
                    return Err(format!(
                        "--driver: {:?} is not local, join or spawn",
                        a.driver
                    ));
                }
            }
            "--raw" => a.raw = true,
            "--command-timeout" => {
                let v = value()?;
                let secs = v
                    .parse::<u64>()
                    .map_err(|e| format!("{flag}: {v:?}: {e}"))?;
                if secs == 0 {
                    return Err("--command-timeout: at least 1 second".into());
                }
                a.command_timeout = Some(Duration::from_secs(secs));
            }
            "--raw-wait" => {
                a.raw_wait = match value()?.as_str() {
                    "block" => RawWait::Block,
                    "poll" => RawWait::Poll,
                    other => match other.strip_prefix("tick:").map(str::parse) {
                        Some(Ok(us)) => RawWait::Tick(us),
                        _ => {
                            return Err(format!(
                                "--raw-wait: {other:?} is not block, poll or tick:MICROSECONDS"
                            ));
                        }
                    },
                }
            }
            "--raw-ids" => {
                a.raw_ids = match value()?.as_str() {
                    "seq" => RawIds::Sequential,
                    "reuse" => RawIds::Reuse,
                    "none" => RawIds::None,
                    other => {
                        return Err(format!("--raw-ids: {other:?} is not seq, reuse or none"));
                    }
                }
            }
            "--fake" => a.server = Server::FakeProcess,
            "--fake-in-process" => a.server = Server::FakeInProcess,
            "--serve-fake" => a.serve_fake = true,
            _ => return Err(format!("unknown argument {flag}")),
        }
        seen.push(flag);
    }
    let given = |f: &str| seen.iter().any(|s| s == f);
    if a.serve_fake {
        return Ok(a);
    }
    let servers = ["--socket", "--fake", "--fake-in-process"];
    match servers.iter().filter(|f| given(f)).count() {
        0 => return Err("--socket, --fake or --fake-in-process is required".into()),
        1 => {}
        _ => return Err("--socket, --fake and --fake-in-process exclude each other".into()),
    }
    // Flags that would be ignored.
    let only = |flag: &str, applies: bool, to: &str| {
        if given(flag) && !applies {
            Err(format!("{flag} applies to {to} only"))
        } else {
            Ok(())
        }
    };
    let library = "the library clients (not --raw)";
    only("--runtime", !a.raw, library)?;
    only("--command-timeout", !a.raw, library)?;
    only(
        "--threads",
        !a.raw && a.runtime == "tokio",
        "--runtime tokio",
    )?;
    only(
        "--driver",
        !a.raw && a.runtime != "tokio",
        "--runtime smol and async-std",
    )?;
    only("--raw-wait", a.raw, "--raw")?;
    only("--raw-ids", a.raw, "--raw")?;
    // The raw client writes its whole window before it reads a reply; more than a socket
    // buffer holds would leave it and a server that stops reading while its replies are not
    // read (as a proxy may; QEMU and the fake keep reading) both blocked.
    if a.raw && a.in_flight() > MAX_RAW_IN_FLIGHT {
        return Err(format!(
            "--raw: at most {MAX_RAW_IN_FLIGHT} in flight (it writes them all before reading)"
        ));
    }
    only(
        "--queue-limit",
        a.server != Server::Socket,
        "--fake and --fake-in-process",
    )?;
    // The library queues at most max_queued callers beyond those in flight.
    let most = a.max_in_flight().saturating_add(max_queued());
    if a.concurrency > most {
        return Err(format!(
            "--concurrency: at most {most} (--max-in-flight plus the client's queue of {})",
            max_queued()
        ));
    }
    Ok(a)
}

/// `--serve-fake`: prints `socket=PATH` and serves until stdin reaches EOF.
fn serve_fake(queue_limit: usize) -> Result<(), String> {
    let fake = fake_server(queue_limit).map_err(|e| format!("cannot start the fake: {e}"))?;
    let path = fake.socket_path().ok_or("the fake has no socket path")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "socket={}", path.display()).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    // Until EOF (or an error), without keeping what comes.
    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    Ok(())
}

/// Starts `qmp-load --serve-fake` as a child and returns it with the socket it serves.
fn spawn_fake(queue_limit: usize) -> Result<(Child, PathBuf), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["--serve-fake", "--queue-limit", &queue_limit.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the fake process: {e}"))?;
    let mut line = String::new();
    let read = match child.stdout.take() {
        Some(stdout) => BufReader::new(stdout)
            .take(4096)
            .read_line(&mut line)
            .map_err(|e| e.to_string()),
        None => Err("no pipe from the fake process".into()),
    };
    match read.map(|_| line.trim_end().strip_prefix("socket=")) {
        Ok(Some(p)) => Ok((child, p.into())),
        // Dropping its stdin ends it.
        Ok(None) => Err(format!("the fake process said {line:?}")),
        Err(e) => Err(format!("the fake process: {e}")),
    }
}

/// A failed command, as the tool reports it.
fn failed(e: qmp_client::Error) -> String {
    format!("{COMMAND} failed: {e}")
}

/// Runs the measured repeats with the chosen client.
fn run(a: &Args) -> Result<Vec<Sample>, String> {
    let max_in_flight = a.max_in_flight();
    let builder = || {
        let b = qmp_client::Builder::new().max_in_flight(max_in_flight);
        match a.command_timeout {
            Some(t) => b.command_timeout(t),
            None => b,
        }
    };
    let (mode, n, conc, path) = (a.mode.as_str(), a.n, a.concurrency, &a.socket);
    let connect_failed =
        |e: qmp_client::Error| format!("cannot connect to {}: {e}", path.display());
    let mut samples = Vec::with_capacity(a.repeat.min(1024));
    if a.raw {
        for _ in 0..a.repeat {
            let s = raw(path, n, a.in_flight(), a.raw_wait, a.raw_ids, raw_timeout());
            samples.push(s.map_err(|e| e.to_string())?);
        }
        return Ok(samples);
    }
    match a.runtime.as_str() {
        "tokio" => {
            let rt = match a.threads {
                1 => tokio::runtime::Builder::new_current_thread(),
                t => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(t);
                    b
                }
            }
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the tokio runtime: {e}"))?;
            rt.block_on(async {
                for _ in 0..a.repeat {
                    let (c, conn) = qmp_tokio::connect_unix(path, builder())
                        .await
                        .map_err(connect_failed)?;
                    qmp_tokio::spawn_connection(conn);
                    // The workload runs as a task too, as in a real service.
                    let mode = mode.to_owned();
                    let s = tokio::spawn(async move { workload(c, &mode, n, conc).await });
                    let s = s.await.map_err(|e| format!("the workload failed: {e}"))?;
                    samples.push(s.map_err(failed)?);
                }
                Ok(())
            })
        }
        // As the adapter's example does: the driver and the workload are tasks of async-std's
        // thread pool (`spawn_connection`, `task::spawn`).
        "async-std" if a.driver == "spawn" => async_std::task::block_on(async {
            for _ in 0..a.repeat {
                let (c, conn) = qmp_async_std::connect_unix(path, builder())
                    .await
                    .map_err(connect_failed)?;
                let driver = qmp_async_std::spawn_connection(conn);
                let mode = mode.to_owned();
                let s = async_std::task::spawn(async move { workload(c, &mode, n, conc).await });
                samples.push(s.await.map_err(failed)?);
                driver.await.map_err(|e| e.to_string())?;
            }
            Ok(())
        }),
        // The same for smol's global executor.
        "smol" if a.driver == "spawn" => smol::block_on(async {
            for _ in 0..a.repeat {
                let (c, conn) = qmp_smol::connect_unix(path, builder())
                    .await
                    .map_err(connect_failed)?;
                let driver = qmp_smol::spawn_connection(conn);
                let mode = mode.to_owned();
                let s = smol::spawn(async move { workload(c, &mode, n, conc).await });
                samples.push(s.await.map_err(failed)?);
                driver.await.map_err(|e| e.to_string())?;
            }
            Ok(())
        }),
        // Both run on async-io, and qmp-async-std's sockets are qmp-smol's: with the driver
        // on this thread only `block_on` differs.
        _ => {
            type Run<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + 'a>>;
            let block_on: fn(Run<'_>) -> Result<(), String> = match a.runtime.as_str() {
                "smol" => |f| smol::block_on(f),
                _ => |f| async_std::task::block_on(f),
            };
            let ex = smol::LocalExecutor::new();
            let run: Run<'_> = if a.driver == "join" {
                // The driver runs in the same task as the workload.
                Box::pin(async {
                    for _ in 0..a.repeat {
                        let (c, conn) = qmp_smol::connect_unix(path, builder())
                            .await
                            .map_err(connect_failed)?;
                        let (driven, s) =
                            futures_util::future::join(conn, workload(c, mode, n, conc)).await;
                        samples.push(s.map_err(failed)?);
                        driven.map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            } else {
                // The driver is a task of a LocalExecutor on this thread, the workload another
                // (async-std's own `spawn_local` needs its `unstable` feature; its `block_on`
                // runs the same executor type).
                Box::pin(ex.run(async {
                    for _ in 0..a.repeat {
                        let (c, conn) = qmp_smol::connect_unix(path, builder())
                            .await
                            .map_err(connect_failed)?;
                        let driver = ex.spawn(conn);
                        let mode = mode.to_owned();
                        let s = ex.spawn(async move { workload(c, &mode, n, conc).await });
                        samples.push(s.await.map_err(failed)?);
                        driver.await.map_err(|e| e.to_string())?;
                    }
                    Ok(())
                }))
            };
            block_on(run)
        }
    }?;
    Ok(samples)
}

fn main() -> ExitCode {
    let mut a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("qmp-load: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if a.serve_fake {
        return match serve_fake(a.queue_limit) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("qmp-load: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // Kept alive until the end of the run.
    let mut child = None;
    let mut _in_process = None;
    match a.server {
        Server::Socket => {}
        Server::FakeProcess => match spawn_fake(a.queue_limit) {
            Ok((c, path)) => {
                a.socket = path;
                child = Some(c);
            }
            Err(e) => {
                eprintln!("qmp-load: {e}");
                return ExitCode::FAILURE;
            }
        },
        Server::FakeInProcess => match fake_server(a.queue_limit) {
            Ok(f) => {
                a.socket = f.socket_path().map(Path::to_owned).unwrap_or_default();
                _in_process = Some(f);
            }
            Err(e) => {
                eprintln!("qmp-load: cannot start the fake: {e}");
                return ExitCode::FAILURE;
            }
        },
    }
    let res = run(&a);
    if let Some(mut c) = child {
        drop(c.stdin.take()); // EOF: the fake exits.
        let _ = c.wait();
    }
    let samples = match res {
        Ok(s) => s,
        Err(e) => {
            eprintln!("qmp-load: {e}");
            return ExitCode::FAILURE;
        }
    };
    let label = match (a.raw, a.raw_wait) {
        (true, RawWait::Block) => "raw".to_owned(),
        (true, RawWait::Poll) => "raw-poll".to_owned(),
        (true, RawWait::Tick(us)) => format!("raw-tick:{us}"),
        (false, _) => a.runtime.clone(),
    };
    let label = match (a.raw, a.raw_ids) {
        (true, RawIds::Reuse) => label + "-reuse",
        (true, RawIds::None) => label + "-noid",
        _ => label,
    };
    let server = match a.server {
        Server::Socket => "socket",
        Server::FakeProcess => "fake-process",
        Server::FakeInProcess => "fake-in-process",
    };
    let threads = if a.raw || a.runtime != "tokio" {
        1
    } else {
        a.threads
    };
    println!(
        "client={label} mode={} n={} concurrency={} in_flight={} threads={threads} server={server} repeat={}",
        a.mode,
        a.n,
        a.concurrency,
        a.in_flight(),
        a.repeat
    );
    for (i, s) in samples.iter().enumerate() {
        println!(
            "run={} secs={:.3} switches_per_op={:.2} cpu_us_per_op={:.2} ops_per_sec={:.1}",
            i + 1,
            s.secs,
            s.switches_per_op(),
            s.cpu_us_per_op(),
            s.ops_per_sec()
        );
    }
    let mut cpu: Vec<f64> = samples.iter().map(Sample::cpu_us_per_op).collect();
    let mut ops: Vec<f64> = samples.iter().map(Sample::ops_per_sec).collect();
    let mut sw: Vec<f64> = samples.iter().map(Sample::switches_per_op).collect();
    // Medians, with the best run beside them (the machine is shared and noisy).
    println!(
        "cpu_us_per_op_min={:.2} ops_per_sec_max={:.1}",
        cpu.iter().copied().fold(f64::INFINITY, f64::min),
        ops.iter().copied().fold(0.0, f64::max)
    );
    println!("switches_per_op={:.2}", median(&mut sw));
    println!("cpu_us_per_op={:.2}", median(&mut cpu));
    // Last, as the issue asks.
    println!("ops_per_sec={:.1}", median(&mut ops));
    ExitCode::SUCCESS
}
