//! [`Ops`]: policy, lock, deduplication, cache, retries and hooks over any [`Execute`].

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::panic::AssertUnwindSafe;

use futures_util::future::{self, FutureExt, Shared, WeakShared};
use qmp_proto::{RawJson, SendStatus};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::cache::{ResultCache, call_key};
use crate::error::OpsError;
use crate::exec::{BoxFuture, ExecError, Execute};
use crate::hooks::{Hooks, NoHooks};
use crate::mutex::KeyedMutex;
use crate::policy::{Policy, Rule};
use crate::retry::is_retry_safe;
use crate::time::{Clock, Sleep, SystemClock};

/// What a deduplicated execution gives every caller: its result, or the message of a panic
/// (in a hook, the sleep or the executor) that each caller then raises itself.
type RunOutput = Result<Result<RawJson, OpsError>, Arc<str>>;
type SharedRun = Shared<BoxFuture<'static, RunOutput>>;
type WeakRun = WeakShared<BoxFuture<'static, RunOutput>>;

/// A deduplicated execution in flight, under its call key.
struct Inflight {
    generation: u64,
    run: WeakRun,
    /// Its lock ticket plus one once it has queued for its rule's lock group; 0 before.
    queued_as: Arc<AtomicU64>,
    /// [`Inner::writes`] when it started: once another write is done, its reply may predate it.
    writes: u64,
}

/// The safe executor: runs commands through a [`Policy`], a per-group lock, deduplication of
/// identical idempotent calls, an optional result cache and retries, reporting to [`Hooks`].
///
/// For each call, in order:
/// 1. the policy decides; a denial returns [`OpsError::Denied`] and nothing is sent;
/// 2. a rule with `cache_ttl` is answered from the cache when a fresh success is there: one
///    within its TTL, from an execution that started after the latest write finished;
/// 3. a call whose rule is idempotent joins an identical call already in flight (same command,
///    same arguments up to key order) instead of sending its own, unless another call has
///    queued for the rule's lock group since that one did (a `stop` made after a waiting
///    `cont` runs after it, not as part of an earlier `stop`), or a call whose rule is not
///    idempotent or has a lock group has finished since that one started (a `query-status`
///    made after a `stop` returned never gets an answer QEMU gave before the `stop`).
///    `Rule::allow()` is not idempotent until marked so: mark the reads a policy allows
///    idempotent, or each one counts as a write;
/// 4. the rule's lock group, if any, is taken (FIFO, in the order the calls first reach
///    this step, i.e. the order their futures are first polled);
/// 5. attempts run, with retries only when safe ([`crate::is_retry_safe`]) and allowed by the
///    rule's [`crate::RetryPolicy`], sleeping through the injected [`Sleep`]. A `quit` that
///    may have reached QEMU is never retried (QEMU often closes the connection instead of
///    answering it).
///
/// It does no I/O of its own and never spawns: all work happens inside the futures it returns.
/// Time comes from the injected [`Clock`] (latency, deadline, cache expiry) and randomness
/// from a seedable [`fastrand::Rng`].
///
/// # Cancel safety
/// Dropping a call's future abandons that caller's interest. A deduplicated execution keeps
/// running as long as any caller still awaits it; a dropped caller that was driving it hands
/// it over to the others, which neither hang nor lose the answer. Locks are released on drop.
pub struct Ops<E> {
    inner: Arc<Inner<E>>,
}

struct Inner<E> {
    exec: E,
    policy: Policy,
    sleep: Arc<dyn Sleep>,
    clock: Arc<dyn Clock>,
    hooks: Arc<dyn Hooks>,
    rng: Mutex<fastrand::Rng>,
    locks: KeyedMutex<String>,
    inflight: Mutex<HashMap<String, Inflight>>,
    next_gen: AtomicU64,
    /// Calls done (or given up) whose rule is not idempotent or has a lock group: the calls
    /// that may change what an in-flight read would return.
    writes: AtomicU64,
    cache: Mutex<ResultCache>,
}

impl<E> Clone for Ops<E> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<E> fmt::Debug for Ops<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ops")
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

/// Builds an [`Ops`]. Defaults (which may change): system clock, no hooks, a jitter rng with
/// a fresh seed from `fastrand` (not a secure one; it needs none), result cache disabled
/// (capacity 0).
#[must_use]
pub struct OpsBuilder<E> {
    exec: E,
    policy: Policy,
    sleep: Arc<dyn Sleep>,
    clock: Arc<dyn Clock>,
    hooks: Arc<dyn Hooks>,
    rng: fastrand::Rng,
    cache_capacity: usize,
}

impl<E> fmt::Debug for OpsBuilder<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpsBuilder")
            .field("policy", &self.policy)
            .field("cache_capacity", &self.cache_capacity)
            .finish_non_exhaustive()
    }
}

impl<E: Execute + 'static> OpsBuilder<E> {
    /// Sets the clock.
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Sets the hooks.
    pub fn hooks(mut self, hooks: impl Hooks + 'static) -> Self {
        self.hooks = Arc::new(hooks);
        self
    }

    /// Shares hooks the caller keeps a handle to.
    pub fn shared_hooks(mut self, hooks: Arc<dyn Hooks>) -> Self {
        self.hooks = hooks;
        self
    }

    /// Seeds the jitter rng, for a reproducible delay schedule.
    pub fn seed(mut self, seed: u64) -> Self {
        self.rng = fastrand::Rng::with_seed(seed);
        self
    }

    /// Enables the result cache with room for `capacity` results (0 disables it). Only rules
    /// with `cache_ttl` use it.
    pub fn cache_capacity(mut self, capacity: usize) -> Self {
        self.cache_capacity = capacity;
        self
    }

    /// Builds the executor. With an unrestricted policy this calls
    /// [`Hooks::on_unrestricted`] and, with the `tracing` feature, logs a warning.
    pub fn build(self) -> Ops<E> {
        if self.policy.is_unrestricted() {
            self.hooks.on_unrestricted(&self.policy);
            #[cfg(feature = "tracing")]
            tracing::warn!(
                "qmp-ops: UNRESTRICTED policy: every command except human-monitor-command is allowed"
            );
        }
        Ops {
            inner: Arc::new(Inner {
                exec: self.exec,
                policy: self.policy,
                sleep: self.sleep,
                clock: self.clock,
                hooks: self.hooks,
                rng: Mutex::new(self.rng),
                locks: KeyedMutex::new(),
                inflight: Mutex::new(HashMap::new()),
                next_gen: AtomicU64::new(0),
                writes: AtomicU64::new(0),
                cache: Mutex::new(ResultCache::new(self.cache_capacity)),
            }),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single consistent update, so a poisoned lock is usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<E: Execute + 'static> Ops<E> {
    /// Starts building an executor over `exec` governed by `policy`, sleeping with `sleep`.
    pub fn builder(exec: E, policy: Policy, sleep: impl Sleep + 'static) -> OpsBuilder<E> {
        OpsBuilder {
            exec,
            policy,
            sleep: Arc::new(sleep),
            clock: Arc::new(SystemClock),
            hooks: Arc::new(NoHooks),
            rng: fastrand::Rng::new(),
            cache_capacity: 0,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// The underlying executor.
    pub fn executor(&self) -> &E {
        &self.inner.exec
    }

    /// How many distinct idempotent executions are in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.inner.inflight).len()
    }

    /// How many results the cache holds.
    pub fn cached(&self) -> usize {
        lock(&self.inner.cache).len()
    }

    /// How many lock groups have a holder or a waiter.
    pub fn active_locks(&self) -> usize {
        self.inner.locks.active_keys()
    }

    /// Runs `name` with serialisable arguments (`&()` for none).
    ///
    /// # Errors
    /// See [`Ops::execute`]; [`OpsError::InvalidArguments`] when `args` does not serialise.
    pub async fn call<A: Serialize + ?Sized>(
        &self,
        name: &str,
        args: &A,
    ) -> Result<RawJson, OpsError> {
        let raw =
            serde_json::value::to_raw_value(args).map_err(|e| OpsError::InvalidArguments {
                command: name.to_owned(),
                message: e.to_string(),
            })?;
        self.execute(name, Some(&raw)).await
    }

    /// Runs `name` with raw arguments (a JSON object, or `None`) under the policy.
    ///
    /// # Errors
    /// [`OpsError::Denied`] without sending anything; [`OpsError::Exec`] with the last
    /// failure when no (further) retry was safe or allowed; [`OpsError::DeadlineExceeded`].
    ///
    /// # Cancel safety
    /// See the type's documentation.
    pub async fn execute(&self, name: &str, args: Option<&RawValue>) -> Result<RawJson, OpsError> {
        self.execute_timed(name, args, None).await
    }

    /// Like [`Ops::execute`], but deduplicates and caches under `key` instead of the default
    /// key ([`crate::call_key`]: the name and the arguments with sorted object keys). Use it
    /// when calls that differ in irrelevant arguments should share one execution. Keys are
    /// scoped by command name. The key only matters for rules that are idempotent or have a
    /// `cache_ttl`.
    ///
    /// # Errors
    /// As [`Ops::execute`].
    ///
    /// # Cancel safety
    /// See the type's documentation.
    pub async fn execute_with_key(
        &self,
        key: &str,
        name: &str,
        args: Option<&RawValue>,
    ) -> Result<RawJson, OpsError> {
        self.execute_timed(name, args, Some(key)).await
    }

    /// Runs the command and reports its outcome and latency to the hooks.
    async fn execute_timed(
        &self,
        name: &str,
        args: Option<&RawValue>,
        key: Option<&str>,
    ) -> Result<RawJson, OpsError> {
        let start = self.inner.clock.now();
        let result = self.execute_inner(name, args, key).await;
        let latency = self.inner.clock.now().saturating_duration_since(start);
        self.inner.hooks.on_outcome(name, latency, result.as_ref());
        result
    }

    async fn execute_inner(
        &self,
        name: &str,
        args: Option<&RawValue>,
        custom_key: Option<&str>,
    ) -> Result<RawJson, OpsError> {
        let inner = &self.inner;
        // `null` arguments are no arguments, as QMP and `qmp-proto` read them.
        let args = args.filter(|a| a.get().trim() != "null");
        let allowed = inner.policy.check(name, args).map_err(|d| {
            inner.hooks.on_denied(&d);
            #[cfg(feature = "tracing")]
            tracing::warn!(command = name, rule = %d.rule, "qmp-ops: denied: {}", d.reason);
            OpsError::Denied(d)
        })?;
        if args.is_some_and(|a| !a.get().trim_start().starts_with('{')) {
            return Err(OpsError::InvalidArguments {
                command: name.to_owned(),
                message: "arguments must be a JSON object".to_owned(),
            });
        }
        let rule = allowed.rule;
        // Counted when this call ends, however it ends (a dropped call may have reached QEMU).
        let _write = (!rule.idempotent || rule.lock.is_some()).then(|| WriteDone(&inner.writes));
        let key = if !(rule.idempotent || rule.cache_ttl.is_some()) {
            None
        } else if let Some(k) = custom_key {
            // The NUL separator keeps custom keys apart from default ones (which use a newline);
            // the name keeps equal custom keys of different commands apart.
            Some(format!("{name}\u{0}{k}"))
        } else {
            Some(
                call_key(name, args).map_err(|e| OpsError::InvalidArguments {
                    command: name.to_owned(),
                    message: e.to_string(),
                })?,
            )
        };
        // Read once, as the call starts: the execution it runs or joins started with this
        // count, and a write that finishes after this makes its result too old to cache or
        // join.
        let writes = inner.writes.load(Ordering::Acquire);
        let cached = match (rule.cache_ttl, &key) {
            (Some(_), Some(key)) => lock(&inner.cache).get(key, inner.clock.now(), writes),
            _ => None,
        };
        if let Some(hit) = cached {
            inner.hooks.on_cache_hit(name);
            return Ok(hit);
        }
        let result = match (&key, rule.idempotent) {
            (Some(key), true) => self.run_shared(key, name, args, &rule, writes).await,
            _ => run(inner, name, args, &rule, None).await,
        };
        if let (Some(ttl), Some(key), Ok(value)) = (rule.cache_ttl, key, &result) {
            let now = inner.clock.now();
            lock(&inner.cache).insert(key, value.clone(), now, ttl, writes);
        }
        result
    }

    /// Joins the execution in flight under `key`, if one may be joined (started at the same
    /// write count `writes`, nobody queued for the lock since), or starts one.
    async fn run_shared(
        &self,
        key: &str,
        name: &str,
        args: Option<&RawValue>,
        rule: &Arc<Rule>,
        writes: u64,
    ) -> Result<RawJson, OpsError> {
        let inner = &self.inner;
        let (generation, shared, joined) = {
            let mut map = lock(&inner.inflight);
            let running = map
                .get(key)
                .filter(|e| e.writes == writes && self.may_join(rule, &e.queued_as))
                .and_then(|e| Some((e.generation, e.run.upgrade()?)));
            match running {
                Some((generation, shared)) => (generation, shared, true),
                None => {
                    // A new execution; one still running under this key (that this call could
                    // not join) keeps going, and its slot will not remove this entry.
                    let generation = inner.next_gen.fetch_add(1, Ordering::Relaxed);
                    let queued_as = Arc::new(AtomicU64::new(0));
                    let owned = Arc::clone(inner);
                    let name = name.to_owned();
                    let args = args.map(|a| a.to_owned());
                    let rule = Arc::clone(rule);
                    let queued = Arc::clone(&queued_as);
                    let fut: BoxFuture<'static, RunOutput> = Box::pin(async move {
                        let run = run(&owned, &name, args.as_deref(), &rule, Some(&queued));
                        // A panic would leave the shared future poisoned, failing every later
                        // identical call, and wake none of the callers waiting on it.
                        AssertUnwindSafe(run)
                            .catch_unwind()
                            .await
                            .map_err(|payload| panic_message(&*payload))
                    });
                    let shared = fut.shared();
                    let run = shared.downgrade().expect("not yet polled");
                    let entry = Inflight {
                        generation,
                        run,
                        queued_as,
                        writes,
                    };
                    map.insert(key.to_owned(), entry);
                    (generation, shared, false)
                }
            }
        };
        if joined {
            inner.hooks.on_shared(name);
        }
        let mut slot = InflightSlot {
            inflight: &inner.inflight,
            key,
            generation,
            shared: Some(shared),
            done: false,
        };
        let result = future::poll_fn(|cx| {
            slot.shared
                .as_mut()
                .expect("present until drop")
                .poll_unpin(cx)
        })
        .await;
        slot.done = true;
        match result {
            Ok(result) => result,
            Err(message) => {
                // The entry goes first, so that later calls start afresh.
                drop(slot);
                std::panic::resume_unwind(Box::new(message.to_string()))
            }
        }
    }
}

/// The text of a panic's payload, as `panic!` makes them.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> Arc<str> {
    if let Some(s) = payload.downcast_ref::<&str>() {
        Arc::from(*s)
    } else if let Some(s) = payload.downcast_ref::<String>() {
        Arc::from(s.as_str())
    } else {
        Arc::from("a qmp-ops execution panicked")
    }
}

/// Counts a call that may change QEMU's state as done when dropped.
struct WriteDone<'a>(&'a AtomicU64);

impl Drop for WriteDone<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

impl<E> Ops<E> {
    /// Whether a call under `rule` may share an execution that queued for the rule's lock
    /// group as `queued_as`: only if nobody has asked for that lock since. A call made after
    /// a conflicting one (a `stop` after a `cont` still waiting for the run-state lock) must
    /// take effect after it, so it queues behind it with an execution of its own.
    fn may_join(&self, rule: &Rule, queued_as: &AtomicU64) -> bool {
        let Some(group) = &rule.lock else {
            return true;
        };
        match queued_as.load(Ordering::Acquire) {
            // Not queued yet: it will queue behind everyone waiting now, this call included.
            0 => true,
            place => !self.inner.locks.taken_after(group, place - 1),
        }
    }
}

/// One caller's share of a deduplicated execution; removes the in-flight entry when the
/// execution completed or nobody awaits it any more.
struct InflightSlot<'a> {
    inflight: &'a Mutex<HashMap<String, Inflight>>,
    key: &'a str,
    generation: u64,
    shared: Option<SharedRun>,
    done: bool,
}

impl Drop for InflightSlot<'_> {
    fn drop(&mut self) {
        drop(self.shared.take());
        let mut map = lock(self.inflight);
        let remove = match map.get(self.key) {
            Some(e) if e.generation == self.generation => self.done || e.run.upgrade().is_none(),
            _ => false,
        };
        if remove {
            map.remove(self.key);
        }
    }
}

/// Takes the rule's lock, then runs attempts until success, an unsafe or disallowed retry,
/// the attempt limit or the deadline.
async fn run<E: Execute>(
    inner: &Inner<E>,
    name: &str,
    args: Option<&RawValue>,
    rule: &Rule,
    queued_as: Option<&AtomicU64>,
) -> Result<RawJson, OpsError> {
    let fut = run_attempts(inner, name, args, rule, queued_as);
    #[cfg(feature = "tracing")]
    let fut = tracing::Instrument::instrument(fut, tracing::info_span!("qmp_ops", command = name));
    fut.await
}

async fn run_attempts<E: Execute>(
    inner: &Inner<E>,
    name: &str,
    args: Option<&RawValue>,
    rule: &Rule,
    queued_as: Option<&AtomicU64>,
) -> Result<RawJson, OpsError> {
    let _guard = match &rule.lock {
        Some(group) => {
            let lock = inner.locks.lock(group.clone());
            if let Some(place) = queued_as {
                place.store(lock.ticket() + 1, Ordering::Release);
            }
            Some(lock.await)
        }
        None => None,
    };
    let retry = inner.policy.retry_for(rule);
    let timeout = inner.policy.timeout_for(rule);
    let first = inner.clock.now();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        inner.hooks.on_attempt(name, attempt);
        #[cfg(feature = "tracing")]
        tracing::debug!(attempt, "qmp-ops: attempt");
        let error = match attempt_once(inner, name, args, timeout).await {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        if maybe_quit(name, &error) || !is_retry_safe(&error, rule.idempotent, &rule.retry_classes)
        {
            return Err(OpsError::Exec {
                command: name.to_owned(),
                attempts: attempt,
                error,
            });
        }
        let delay = retry.delay(attempt, &mut lock(&inner.rng));
        let Some(delay) = delay else {
            return Err(OpsError::Exec {
                command: name.to_owned(),
                attempts: attempt,
                error,
            });
        };
        if let Some(deadline) = retry.deadline {
            let elapsed = inner.clock.now().saturating_duration_since(first);
            if elapsed + delay > deadline {
                return Err(OpsError::DeadlineExceeded {
                    command: name.to_owned(),
                    attempts: attempt,
                    last: error,
                });
            }
        }
        inner.hooks.on_retry(name, attempt, delay, &error);
        #[cfg(feature = "tracing")]
        tracing::info!(attempt, ?delay, %error, "qmp-ops: retrying");
        inner.sleep.sleep(delay).await;
    }
}

/// Whether `name` must not be tried again after `error`: a `quit` that may have reached QEMU.
/// QEMU closes the monitor once `quit` is under way, often before replying, so such a `quit`
/// may well have worked; it is never repeated, even under a rule that calls it idempotent,
/// because the next attempt could reach a newly started QEMU and end that one too.
fn maybe_quit(name: &str, error: &ExecError) -> bool {
    name == "quit" && error.send_status() != SendStatus::NotSent
}

async fn attempt_once<E: Execute>(
    inner: &Inner<E>,
    name: &str,
    args: Option<&RawValue>,
    timeout: Option<Duration>,
) -> Result<RawJson, ExecError> {
    let Some(t) = timeout else {
        return inner.exec.execute(name, args).await;
    };
    inner
        .exec
        .execute_timeout(name, args, t, &*inner.sleep)
        .await
}
