//! Test doubles shared by the integration tests: a scripted executor, a recording sleeper, a
//! manual clock and recording hooks. No wall-clock time anywhere.
#![allow(dead_code, unreachable_pub)] // each test file uses a different subset

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use qmp_ops::{BoxFuture, Clock, Denial, ExecError, Execute, Hooks, OpsError, Sleep};
use qmp_proto::RawJson;
use serde_json::value::RawValue;

pub fn raw(s: &str) -> RawJson {
    RawJson::from_string(s.to_owned()).unwrap()
}

pub fn args(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.to_owned()).unwrap()
}

/// One scripted answer.
pub enum Step {
    /// Answer at once.
    Now(Result<RawJson, ExecError>),
    /// Answer when the test sends on the channel (pending until then).
    Later(oneshot::Receiver<Result<RawJson, ExecError>>),
}

/// A scripted executor: answers from its script in call order (then `{}`), recording calls.
#[derive(Default)]
pub struct FakeExec {
    script: Mutex<VecDeque<Step>>,
    calls: Mutex<Vec<(String, Option<String>)>>,
}

impl FakeExec {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn push(&self, result: Result<RawJson, ExecError>) {
        self.script.lock().unwrap().push_back(Step::Now(result));
    }

    pub fn push_ok(&self, json: &str) {
        self.push(Ok(raw(json)));
    }

    pub fn push_err(&self, e: ExecError) {
        self.push(Err(e));
    }

    /// Scripts an answer the test gives later.
    pub fn push_later(&self) -> oneshot::Sender<Result<RawJson, ExecError>> {
        let (tx, rx) = oneshot::channel();
        self.script.lock().unwrap().push_back(Step::Later(rx));
        tx
    }

    pub fn calls(&self) -> Vec<(String, Option<String>)> {
        self.calls.lock().unwrap().clone()
    }

    pub fn names(&self) -> Vec<String> {
        self.calls().into_iter().map(|c| c.0).collect()
    }

    pub fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

impl Execute for FakeExec {
    fn execute<'a>(
        &'a self,
        name: &'a str,
        args: Option<&'a RawValue>,
    ) -> BoxFuture<'a, Result<RawJson, ExecError>> {
        self.calls
            .lock()
            .unwrap()
            .push((name.to_owned(), args.map(|a| a.get().to_owned())));
        let step = self.script.lock().unwrap().pop_front();
        Box::pin(async move {
            match step {
                None => Ok(raw("{}")),
                Some(Step::Now(r)) => r,
                Some(Step::Later(rx)) => rx.await.expect("test dropped the answer sender"),
            }
        })
    }
}

/// A clock the test (or the sleeper) moves by hand.
#[derive(Clone)]
pub struct ManualClock {
    now: Arc<Mutex<Instant>>,
}

impl ManualClock {
    pub fn new(t0: Instant) -> Self {
        Self {
            now: Arc::new(Mutex::new(t0)),
        }
    }

    pub fn advance(&self, d: Duration) {
        *self.now.lock().unwrap() += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.now.lock().unwrap()
    }
}

/// Records each requested sleep, advances the clock by it and returns at once.
#[derive(Clone)]
pub struct RecordingSleep {
    pub slept: Arc<Mutex<Vec<Duration>>>,
    clock: ManualClock,
}

impl RecordingSleep {
    pub fn new(clock: ManualClock) -> Self {
        Self {
            slept: Arc::default(),
            clock,
        }
    }

    pub fn slept(&self) -> Vec<Duration> {
        self.slept.lock().unwrap().clone()
    }
}

impl Sleep for RecordingSleep {
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        self.slept.lock().unwrap().push(d);
        self.clock.advance(d);
        Box::pin(async {})
    }
}

/// Records every hook call as a line of text.
#[derive(Default)]
pub struct RecordingHooks {
    pub log: Mutex<Vec<String>>,
    pub unrestricted: AtomicUsize,
}

impl RecordingHooks {
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Hooks for RecordingHooks {
    fn on_attempt(&self, command: &str, attempt: u32) {
        self.log
            .lock()
            .unwrap()
            .push(format!("attempt {command} {attempt}"));
    }
    fn on_retry(&self, command: &str, attempt: u32, delay: Duration, error: &ExecError) {
        self.log
            .lock()
            .unwrap()
            .push(format!("retry {command} {attempt} {delay:?} {error}"));
    }
    fn on_outcome(&self, command: &str, latency: Duration, result: Result<&RawJson, &OpsError>) {
        let r = match result {
            Ok(v) => format!("ok {}", v.get()),
            Err(e) => format!("err {:?}", e.kind()),
        };
        self.log
            .lock()
            .unwrap()
            .push(format!("outcome {command} {latency:?} {r}"));
    }
    fn on_denied(&self, denial: &Denial) {
        self.log.lock().unwrap().push(format!("denied {denial}"));
    }
    fn on_shared(&self, command: &str) {
        self.log.lock().unwrap().push(format!("shared {command}"));
    }
    fn on_cache_hit(&self, command: &str) {
        self.log
            .lock()
            .unwrap()
            .push(format!("cache-hit {command}"));
    }
    fn on_unrestricted(&self, _policy: &qmp_ops::Policy) {
        self.unrestricted.fetch_add(1, Ordering::SeqCst);
    }
}

/// Polls a future once with a no-op waker.
pub fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    Pin::new(f).poll(&mut cx)
}
