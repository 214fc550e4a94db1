//! `qmp-load`: measures commands per second and client CPU per command against a QMP socket.

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, ExitCode, Stdio};

use qmp_bench::{RawIds, RawWait, Sample, fake_server, median, raw, workload};

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
    command_timeout: Option<std::time::Duration>,
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

const USAGE: &str = "usage: qmp-load (--socket PATH | --fake | --fake-in-process) \
                     [--runtime tokio|smol|async-std] [--raw] [--mode seq|conc] [--n N] \
                     [--concurrency C] [--max-in-flight M] [--threads T] [--repeat R] \
                     [--driver local|join|spawn] [--raw-wait block|poll|tick:US] [--raw-ids seq|reuse|none] [--command-timeout SECS]\n       \
                     qmp-load --serve-fake [--queue-limit Q]";

fn parse() -> Result<Args, String> {
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
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--socket" => a.socket = value()?.into(),
            "--runtime" => a.runtime = value()?,
            "--mode" => {
                a.mode = value()?;
                if !matches!(a.mode.as_str(), "seq" | "conc") {
                    return Err(format!("--mode: {:?} is not seq or conc", a.mode));
                }
            }
            "--n" => {
                a.n = num(value()?)?;
                if a.n == 0 {
                    return Err("--n: at least 1 command".into());
                }
            }
            "--concurrency" => a.concurrency = num(value()?)?.max(1),
            "--max-in-flight" => a.max_in_flight = Some(num(value()?)?),
            "--threads" => a.threads = num(value()?)?,
            "--repeat" => a.repeat = num(value()?)?.max(1),
            "--queue-limit" => a.queue_limit = num(value()?)?,
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
                let secs = num(value()?)?;
                a.command_timeout = Some(std::time::Duration::from_secs(secs as u64));
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
    }
    if a.socket.as_os_str().is_empty() && a.server == Server::Socket && !a.serve_fake {
        return Err("--socket, --fake or --fake-in-process is required".into());
    }
    Ok(a)
}

/// `--serve-fake`: prints `socket=PATH` and serves until stdin reaches EOF.
fn serve_fake(queue_limit: usize) -> Result<(), String> {
    let fake = fake_server(queue_limit).map_err(|e| format!("cannot start the fake: {e}"))?;
    let path = fake.socket_path().expect("a unix fake has a path");
    let mut out = std::io::stdout().lock();
    writeln!(out, "socket={}", path.display()).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
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
    let stdout = child.stdout.take().expect("piped");
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    match line.trim_end().strip_prefix("socket=") {
        Some(p) => Ok((child, p.into())),
        None => Err(format!("the fake process said {line:?}")),
    }
}

/// Runs the measured repeats with the chosen client.
fn run(a: &Args) -> Result<Vec<Sample>, String> {
    let max_in_flight = a.max_in_flight.unwrap_or(match a.server {
        Server::Socket => a.concurrency.min(8),
        _ => a.concurrency,
    });
    let builder = || {
        let b = qmp_client::Builder::new().max_in_flight(max_in_flight);
        match a.command_timeout {
            Some(t) => b.command_timeout(t),
            None => b,
        }
    };
    let (mode, n, conc, path) = (a.mode.as_str(), a.n, a.concurrency, &a.socket);
    let mut samples = Vec::with_capacity(a.repeat);
    if a.raw {
        let conc = if mode == "seq" { 1 } else { conc };
        for _ in 0..a.repeat {
            samples.push(raw(path, n, conc, a.raw_wait, a.raw_ids).map_err(|e| e.to_string())?);
        }
        return Ok(samples);
    }
    match a.runtime.as_str() {
        "tokio" => {
            let rt = match a.threads {
                0 | 1 => tokio::runtime::Builder::new_current_thread(),
                t => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(t);
                    b
                }
            }
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
            rt.block_on(async {
                for _ in 0..a.repeat {
                    let (c, conn) = qmp_tokio::connect_unix(path, builder()).await?;
                    qmp_tokio::spawn_connection(conn);
                    // The workload runs as a task too, as in a real service.
                    let mode = mode.to_owned();
                    let s = tokio::spawn(async move { workload(c, &mode, n, conc).await });
                    samples.push(s.await.expect("the workload panicked"));
                }
                Ok::<_, qmp_client::Error>(())
            })
        }
        // As the adapter's example does: the driver and the workload are tasks of async-std's
        // thread pool (`spawn_connection`, `task::spawn`).
        "async-std" if a.driver == "spawn" => async_std::task::block_on(async {
            for _ in 0..a.repeat {
                let (c, conn) = qmp_async_std::connect_unix(path, builder()).await?;
                let driver = qmp_async_std::spawn_connection(conn);
                let mode = mode.to_owned();
                samples.push(
                    async_std::task::spawn(async move { workload(c, &mode, n, conc).await }).await,
                );
                driver.await?;
            }
            Ok(())
        }),
        // The same for smol's global executor.
        "smol" if a.driver == "spawn" => smol::block_on(async {
            for _ in 0..a.repeat {
                let (c, conn) = qmp_smol::connect_unix(path, builder()).await?;
                let driver = qmp_smol::spawn_connection(conn);
                let mode = mode.to_owned();
                samples.push(smol::spawn(async move { workload(c, &mode, n, conc).await }).await);
                driver.await?;
            }
            Ok(())
        }),
        // Both run on async-io, and qmp-async-std's sockets are qmp-smol's: with the driver
        // on this thread only `block_on` differs.
        "smol" | "async-std" => {
            type Run<'a> = Pin<Box<dyn Future<Output = Result<(), qmp_client::Error>> + 'a>>;
            let block_on: fn(Run<'_>) -> Result<(), qmp_client::Error> = match a.runtime.as_str() {
                "smol" => |f| smol::block_on(f),
                _ => |f| async_std::task::block_on(f),
            };
            let ex = smol::LocalExecutor::new();
            let run: Run<'_> = if a.driver == "join" {
                // The driver runs in the same task as the workload.
                Box::pin(async {
                    for _ in 0..a.repeat {
                        let (c, conn) = qmp_smol::connect_unix(path, builder()).await?;
                        let (driven, s) =
                            futures_util::future::join(conn, workload(c, mode, n, conc)).await;
                        driven?;
                        samples.push(s);
                    }
                    Ok(())
                })
            } else {
                // The driver is a task of a LocalExecutor on this thread, the workload another
                // (async-std's own `spawn_local` needs its `unstable` feature; its `block_on`
                // runs the same executor type).
                Box::pin(ex.run(async {
                    for _ in 0..a.repeat {
                        let (c, conn) = qmp_smol::connect_unix(path, builder()).await?;
                        let driver = ex.spawn(conn);
                        let mode = mode.to_owned();
                        samples.push(
                            ex.spawn(async move { workload(c, &mode, n, conc).await })
                                .await,
                        );
                        driver.await?;
                    }
                    Ok(())
                }))
            };
            block_on(run)
        }
        other => return Err(format!("unknown runtime {other}")),
    }
    .map_err(|e| e.to_string())?;
    Ok(samples)
}

fn main() -> ExitCode {
    let mut a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
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
                a.socket = f.socket_path().expect("a unix fake has a path").to_owned();
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
        a.threads.max(1)
    };
    println!(
        "client={label} mode={} n={} concurrency={} threads={threads} server={server} repeat={}",
        a.mode, a.n, a.concurrency, a.repeat
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
    println!("ops_per_sec={:.1}", median(&mut ops));
    ExitCode::SUCCESS
}
