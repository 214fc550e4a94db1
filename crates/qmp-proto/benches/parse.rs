//! Parse throughput of whole replies and events, as QEMU sends them.
//!
//! For each input, three parsers run over the same bytes in the same process:
//! - `value`: `serde_json::from_slice::<serde_json::Value>`, the usual baseline;
//! - `floor`: `serde::de::IgnoredAny`, serde_json's validate-only pass, which nothing that
//!   checks the JSON can beat by much;
//! - `proto`: a long-lived ready `Connection` fed the bytes: framing, envelope parse with the
//!   return kept raw, correlation to its pending request, and the output drained.
//!
//! After criterion's own report, a summary prints one machine-readable line per input with the
//! throughputs and the ratios `proto/floor` (time) and `value/proto` (speed-up).
//!
//! Run: `cargo bench -p qmp-proto --bench parse`.

#![allow(
    clippy::disallowed_methods,
    reason = "a benchmark reads the clock to time itself"
)]

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use qmp_proto::{Command, Config, Connection, Outcome, Output};

const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n";

/// A long-lived connection past negotiation, with the default in-flight cap (8).
fn ready() -> Connection {
    let t0 = Instant::now();
    let mut c = Connection::new(t0, Config::default());
    c.handle_input(t0, GREETING);
    drain_tx(&mut c, t0);
    c.handle_input(t0, b"{\"return\": {}, \"id\": 0}\r\n");
    while c.poll_output().is_some() {}
    c
}

fn drain_tx(c: &mut Connection, now: Instant) {
    while let Some(n) = c.poll_transmit().map(<[u8]>::len) {
        c.handle_transmitted(now, n);
    }
}

/// The reply bytes with their trailing `"id": 1}` replaced by `id`.
fn with_id(reply: &[u8], id: u64) -> Vec<u8> {
    let cut = reply
        .iter()
        .rposition(|&b| b == b':')
        .expect("an id member")
        + 1;
    let mut v = reply[..cut].to_vec();
    v.extend_from_slice(format!(" {id}}}\r\n").as_bytes());
    v
}

/// Times only `handle_input` plus draining outputs, over `iters` messages, on one connection.
/// Requests are sent and reply bytes prepared outside the timed sections.
fn time_proto(iters: u64, bytes: &[u8], is_event: bool) -> Duration {
    let mut conn = ready();
    // Replies come for at most 8 in-flight requests at a time, as against QEMU.
    let batch = 8;
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(batch);
        left -= n;
        let msgs: Vec<Vec<u8>> = (0..n)
            .map(|_| {
                if is_event {
                    bytes.to_vec()
                } else {
                    let id = conn.send(Instant::now(), Command::new("x")).unwrap();
                    with_id(bytes, id.get())
                }
            })
            .collect();
        drain_tx(&mut conn, Instant::now());
        // A driver reads the clock once per wake-up, not per message.
        let now = Instant::now();
        let start = Instant::now();
        for m in &msgs {
            proto_parse(&mut conn, now, black_box(m));
        }
        total += start.elapsed();
    }
    total
}

struct Input {
    name: &'static str,
    bytes: Vec<u8>,
    is_event: bool,
}

fn inputs() -> Vec<Input> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/data");
    // The recorded replies answer id 1, as the pending request here does.
    let schema = |f: &str| std::fs::read(data.join(f)).expect("schema data");
    vec![
        Input { name: "schema-qsd-117k", bytes: schema("schema-qsd.json"), is_event: false },
        Input { name: "schema-system-236k", bytes: schema("schema-system.json"), is_event: false },
        Input {
            name: "small-reply",
            bytes: b"{\"return\": {\"status\": \"prelaunch\", \"singlestep\": false, \"running\": false}, \"id\": 1}\r\n".to_vec(),
            is_event: false,
        },
        Input {
            name: "event",
            bytes: b"{\"timestamp\": {\"seconds\": 1764017100, \"microseconds\": 123456}, \"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"status\": \"running\", \"id\": \"job0\"}}\r\n".to_vec(),
            is_event: true,
        },
    ]
}

fn proto_parse(c: &mut Connection, now: Instant, bytes: &[u8]) {
    c.handle_input(now, bytes);
    let mut got = false;
    while let Some(out) = c.poll_output() {
        match out {
            Output::Completed {
                outcome: Outcome::Replied(Ok(v)),
                ..
            } => {
                black_box(v);
                got = true;
            }
            Output::Event(e) => {
                black_box(e);
                got = true;
            }
            other => panic!("unexpected output {other:?}"),
        }
    }
    assert!(got, "no reply or event parsed");
}

fn bench(c: &mut Criterion) {
    for input in inputs() {
        let mut g = c.benchmark_group(input.name);
        g.throughput(Throughput::Bytes(input.bytes.len() as u64));
        if input.bytes.len() > 10_000 {
            g.measurement_time(Duration::from_secs(4));
        }
        let bytes = &input.bytes;
        g.bench_function("value", |b| {
            b.iter(|| {
                black_box(serde_json::from_slice::<serde_json::Value>(black_box(bytes)).unwrap())
            })
        });
        g.bench_function("floor", |b| {
            b.iter(|| {
                black_box(
                    serde_json::from_slice::<serde::de::IgnoredAny>(black_box(bytes)).unwrap(),
                )
            })
        });
        g.bench_function("proto", |b| {
            b.iter_custom(|iters| time_proto(iters, bytes, input.is_event))
        });
        g.finish();
    }
}

/// Reads criterion's point estimate (mean time in ns) for one benchmark.
fn mean_ns(group: &str, func: &str) -> Option<f64> {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target")
            .to_string_lossy()
            .into_owned()
    });
    let path = Path::new(&target)
        .join("criterion")
        .join(group)
        .join(func)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    println!("\nsummary (time ratios from criterion's mean estimates; MB/s = 1e6 bytes/s)");
    for input in inputs() {
        let (Some(v), Some(f), Some(p)) = (
            mean_ns(input.name, "value"),
            mean_ns(input.name, "floor"),
            mean_ns(input.name, "proto"),
        ) else {
            continue;
        };
        let mbps = |ns: f64| input.bytes.len() as f64 / ns * 1e3;
        println!(
            "bench={} bytes={} value_mb_s={:.0} floor_mb_s={:.0} proto_mb_s={:.0} proto_over_floor={:.3} value_over_proto={:.2}",
            input.name,
            input.bytes.len(),
            mbps(v),
            mbps(f),
            mbps(p),
            p / f,
            v / p
        );
    }
}
