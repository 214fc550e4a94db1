//! `qmp-load`: measures commands per second and client CPU per command against a QMP socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use qmp_bench::{concurrent, cpu_micros, raw, sequential};

struct Args {
    socket: PathBuf,
    runtime: String,
    mode: String,
    n: usize,
    concurrency: usize,
    raw: bool,
    /// tokio worker threads (1: the current-thread runtime).
    threads: usize,
    /// Serve the load with the testkit's fake QEMU in this process (its CPU is counted too).
    fake: bool,
}

const USAGE: &str = "usage: qmp-load --socket PATH [--runtime tokio|smol|async-std] \
                     [--mode seq|conc] [--n N] [--concurrency C] [--threads T] [--raw] [--fake]";

fn parse() -> Result<Args, String> {
    let mut a = Args {
        socket: PathBuf::new(),
        runtime: "tokio".into(),
        mode: "seq".into(),
        n: 10_000,
        concurrency: 8,
        raw: false,
        threads: 2,
        fake: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => a.socket = value()?.into(),
            "--runtime" => a.runtime = value()?,
            "--mode" => a.mode = value()?,
            "--n" => a.n = value()?.parse().map_err(|e| format!("--n: {e}"))?,
            "--concurrency" => {
                a.concurrency = value()?
                    .parse()
                    .map_err(|e| format!("--concurrency: {e}"))?;
            }
            "--raw" => a.raw = true,
            "--fake" => a.fake = true,
            "--threads" => a.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if a.socket.as_os_str().is_empty() && !a.fake {
        return Err("--socket or --fake is required".into());
    }
    Ok(a)
}

async fn measured(client: qmp_client::Client, mode: &str, n: usize, concurrency: usize) {
    match mode {
        "conc" => concurrent(&client, n, concurrency).await,
        _ => sequential(&client, n).await,
    }
    client.close().await;
}

fn main() -> ExitCode {
    let mut a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Kept alive until the end of the run.
    let _fake = if a.fake {
        match qmp_testkit::fake::FakeQemu::unix(qmp_testkit::fake::Script::new()) {
            Ok(f) => {
                a.socket = f.socket_path().expect("a unix fake has a path").to_owned();
                Some(f)
            }
            Err(e) => {
                eprintln!("qmp-load: cannot start the fake: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let builder = qmp_client::Builder::new().max_in_flight(a.concurrency.clamp(1, 8));
    let (cpu0, t0) = (cpu_micros(), Instant::now());
    let label = if a.raw {
        "raw".to_owned()
    } else {
        a.runtime.clone()
    };
    let res: Result<(), String> = if a.raw {
        raw(&a.socket, a.n, a.concurrency).map_err(|e| e.to_string())
    } else {
        match a.runtime.as_str() {
            "tokio" => match a.threads {
                0 | 1 => tokio::runtime::Builder::new_current_thread(),
                n => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(n);
                    b
                }
            }
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(async {
                    let (c, conn) = qmp_tokio::connect_unix(&a.socket, builder).await?;
                    qmp_tokio::spawn_connection(conn);
                    // The workload runs as a task too, as in a real service.
                    let (mode, n, conc) = (a.mode.clone(), a.n, a.concurrency);
                    tokio::spawn(async move { measured(c, &mode, n, conc).await })
                        .await
                        .expect("the workload panicked");
                    Ok::<_, qmp_client::Error>(())
                })
                .map_err(|e| e.to_string())
            }),
            "smol" => smol::block_on(async {
                let (c, conn) = qmp_smol::connect_unix(&a.socket, builder).await?;
                // The driver runs in this task, next to the workload (one thread).
                let work = measured(c, &a.mode, a.n, a.concurrency);
                let (driven, ()) = futures_util::future::join(conn, work).await;
                driven
            })
            .map_err(|e| e.to_string()),
            "async-std" => async_std::task::block_on(async {
                let (c, conn) = qmp_async_std::connect_unix(&a.socket, builder).await?;
                // The driver runs in this task, next to the workload (one thread).
                let work = measured(c, &a.mode, a.n, a.concurrency);
                let (driven, ()) = futures_util::future::join(conn, work).await;
                driven
            })
            .map_err(|e| e.to_string()),
            other => Err(format!("unknown runtime {other}")),
        }
    };
    if let Err(e) = res {
        eprintln!("qmp-load: {e}");
        return ExitCode::FAILURE;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_micros() - cpu0;
    println!(
        "client={label} mode={} n={} concurrency={} threads={} server={}",
        a.mode,
        a.n,
        a.concurrency,
        a.threads,
        if a.fake { "fake" } else { "socket" }
    );
    println!("ops_per_sec={:.1}", a.n as f64 / secs);
    println!("cpu_us_per_op={:.2}", cpu / a.n as f64);
    ExitCode::SUCCESS
}
