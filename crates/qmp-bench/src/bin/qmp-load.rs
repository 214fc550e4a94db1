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
}

const USAGE: &str = "usage: qmp-load --socket PATH [--runtime tokio|smol|async-std] \
                     [--mode seq|conc] [--n N] [--concurrency C] [--raw]";

fn parse() -> Result<Args, String> {
    let mut a = Args {
        socket: PathBuf::new(),
        runtime: "tokio".into(),
        mode: "seq".into(),
        n: 10_000,
        concurrency: 8,
        raw: false,
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
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if a.socket.as_os_str().is_empty() {
        return Err("--socket is required".into());
    }
    Ok(a)
}

async fn measured(client: qmp_client::Client, a: &Args) {
    match a.mode.as_str() {
        "conc" => concurrent(&client, a.n, a.concurrency).await,
        _ => sequential(&client, a.n).await,
    }
    client.close().await;
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
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
            "tokio" => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|rt| {
                    rt.block_on(async {
                        let (c, conn) = qmp_tokio::connect_unix(&a.socket, builder).await?;
                        qmp_tokio::spawn_connection(conn);
                        measured(c, &a).await;
                        Ok::<_, qmp_client::Error>(())
                    })
                    .map_err(|e| e.to_string())
                }),
            "smol" => smol::block_on(async {
                let (c, conn) = qmp_smol::connect_unix(&a.socket, builder).await?;
                qmp_smol::spawn_connection(conn).detach();
                measured(c, &a).await;
                Ok::<_, qmp_client::Error>(())
            })
            .map_err(|e| e.to_string()),
            "async-std" => async_std::task::block_on(async {
                let (c, conn) = qmp_async_std::connect_unix(&a.socket, builder).await?;
                qmp_async_std::spawn_connection(conn);
                measured(c, &a).await;
                Ok::<_, qmp_client::Error>(())
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
        "client={label} mode={} n={} concurrency={}",
        a.mode, a.n, a.concurrency
    );
    println!("ops_per_sec={:.1}", a.n as f64 / secs);
    println!("cpu_us_per_op={:.2}", cpu / a.n as f64);
    ExitCode::SUCCESS
}
