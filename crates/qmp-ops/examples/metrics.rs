//! Collects metrics through [`Hooks`] while a flaky fake QEMU is driven through [`Ops`], then
//! prints them. Run with `cargo run -p qmp-ops --example metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmp_ops::{
    BoxFuture, Denial, ExecError, Execute, Hooks, Ops, OpsError, Policy, RetryPolicy, Rule, Sleep,
};
use qmp_proto::{Failure, RawJson};
use serde_json::value::RawValue;

/// Fails every third call as "not sent", as a connection that drops now and then would.
struct Flaky {
    calls: AtomicUsize,
}

impl Execute for Flaky {
    fn execute<'a>(
        &'a self,
        name: &'a str,
        _args: Option<&'a RawValue>,
    ) -> BoxFuture<'a, Result<RawJson, ExecError>> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            if n % 3 == 2 {
                return Err(ExecError::NotSent(Failure::PeerClosed));
            }
            let reply = match name {
                "query-status" => r#"{"status": "running", "running": true}"#,
                _ => "{}",
            };
            Ok(RawJson::from_string(reply.to_owned()).expect("valid JSON"))
        })
    }
}

/// Does not wait: this example has no runtime. A real program passes its runtime's timer.
struct NoWait;

impl Sleep for NoWait {
    fn sleep(&self, _: Duration) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

#[derive(Default)]
struct Metrics {
    counters: Mutex<BTreeMap<String, u64>>,
    backoff: Mutex<Duration>,
}

impl Metrics {
    fn bump(&self, key: String) {
        *self.counters.lock().unwrap().entry(key).or_default() += 1;
    }
}

impl Hooks for Metrics {
    fn on_attempt(&self, command: &str, _attempt: u32) {
        self.bump(format!("attempts{{command={command}}}"));
    }
    fn on_retry(&self, command: &str, _attempt: u32, delay: Duration, _error: &ExecError) {
        self.bump(format!("retries{{command={command}}}"));
        *self.backoff.lock().unwrap() += delay;
    }
    fn on_outcome(&self, command: &str, _latency: Duration, result: Result<&RawJson, &OpsError>) {
        let outcome = match result {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("{:?}", e.kind()).to_lowercase(),
        };
        self.bump(format!("outcomes{{command={command},result={outcome}}}"));
    }
    fn on_denied(&self, denial: &Denial) {
        self.bump(format!(
            "denials{{command={},rule={}}}",
            denial.command, denial.rule
        ));
    }
}

fn main() {
    let metrics = Arc::new(Metrics::default());
    let policy = Policy::vm_control().rule(
        "query-status",
        Rule::allow()
            .idempotent(true)
            .retry(RetryPolicy::default().max_attempts(4)),
    );
    let ops = Ops::builder(
        Flaky {
            calls: AtomicUsize::new(0),
        },
        policy,
        NoWait,
    )
    .shared_hooks(metrics.clone())
    .seed(2026)
    .build();
    futures_executor::block_on(async {
        for _ in 0..5 {
            let status = ops.query_status().await.expect("retries absorb the drops");
            assert_eq!(status.status, qmp_ops::RunState::Running);
        }
        ops.stop().await.expect("stop is allowed by vm-control");
        let denied = ops.quit().await.expect_err("quit is not in vm-control");
        println!("refused: {denied}");
    });
    for (name, value) in metrics.counters.lock().unwrap().iter() {
        println!("{name} {value}");
    }
    println!(
        "backoff_total_ms {}",
        metrics.backoff.lock().unwrap().as_millis()
    );
}
