//! The allow-list: profiles, per-command rules and argument rules, loadable from TOML or JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use qmp_proto::ErrorClass;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::retry::{Jitter, RetryPolicy};

/// `human-monitor-command` runs arbitrary HMP text and so bypasses any allow-list. Only a rule
/// naming it exactly may allow it; profiles and wildcard rules never do.
pub const HMP_COMMAND: &str = "human-monitor-command";

/// Read-only commands outside the `query-*` family that the read-only profile allows.
///
/// `x-query-*` commands are left out on purpose: they are unstable, and some of them are
/// expensive debugging dumps. Allow them with an explicit rule (`[commands."x-query-*"]`).
pub const READ_ONLY_EXTRA: &[&str] = &[
    "qom-list",
    "qom-get",
    "qom-list-types",
    "qom-list-properties",
    "device-list-properties",
];

/// The run-state commands the vm-control profile adds to the read-only ones.
pub const VM_CONTROL_COMMANDS: &[&str] = &["stop", "cont", "system_powerdown", "system_reset"];

/// The lock group the vm-control profile gives its run-state commands, so that they are
/// serialised with each other.
pub const RUN_STATE_LOCK: &str = "run-state";

/// A predefined set of allowed commands, applied when no explicit rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Profile {
    /// Nothing beyond the explicit rules (default deny).
    #[default]
    None,
    /// Commands that change nothing: `query-*` and [`READ_ONLY_EXTRA`].
    ReadOnly,
    /// Read-only plus [`VM_CONTROL_COMMANDS`].
    VmControl,
    /// Every command except `human-monitor-command`. Needs an explicit acknowledgement.
    Unrestricted,
}

impl Profile {
    /// The name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::ReadOnly => "read-only",
            Self::VmControl => "vm-control",
            Self::Unrestricted => "unrestricted",
        }
    }

    /// Whether this profile allows `name` (never `human-monitor-command`).
    pub fn allows(self, name: &str) -> bool {
        if name == HMP_COMMAND {
            return false;
        }
        let read_only = name.starts_with("query-") || READ_ONLY_EXTRA.contains(&name);
        match self {
            Self::None => false,
            Self::ReadOnly => read_only,
            Self::VmControl => read_only || VM_CONTROL_COMMANDS.contains(&name),
            Self::Unrestricted => true,
        }
    }

    /// The rule the profile applies to a command it allows.
    fn rule_for(self, name: &str) -> Rule {
        let read_only = name.starts_with("query-") || READ_ONLY_EXTRA.contains(&name);
        let mut rule = Rule::allow();
        if read_only {
            rule.idempotent = true;
        } else if VM_CONTROL_COMMANDS.contains(&name) {
            // Asking a stopped VM to stop (or a running one to continue) again is harmless;
            // a second reset or powerdown request is not.
            rule.idempotent = matches!(name, "stop" | "cont");
            rule.lock = Some(RUN_STATE_LOCK.to_owned());
        }
        rule
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a rule allows or denies its command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Mode {
    /// Allow (subject to the argument rules).
    #[default]
    Allow,
    /// Deny.
    Deny,
}

/// A glob pattern: `*` matches any run of characters, `?` exactly one. No escapes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Pattern(String);

impl Pattern {
    /// A pattern from its text.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The pattern text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the pattern contains a wildcard.
    pub fn is_glob(&self) -> bool {
        self.0.contains(['*', '?'])
    }

    /// Whether `text` matches the whole pattern.
    pub fn matches(&self, text: &str) -> bool {
        // By character: `?` is one character, however many bytes it takes.
        let pat: Vec<char> = self.0.chars().collect();
        let text: Vec<char> = text.chars().collect();
        glob_match(&pat, &text)
    }
}

fn glob_match(pat: &[char], text: &[char]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        // A `*` in the pattern is always the wildcard, even facing a `*` in the text.
        if p < pat.len() && pat[p] == '*' {
            star = Some((p, t));
            p += 1;
        } else if p < pat.len() && (pat[p] == '?' || pat[p] == text[t]) {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == '*')
}

/// A rule on one argument of a command.
///
/// The value is looked up with a JSON pointer (`/driver`, `/props/size`; a path without a
/// leading `/` is read as dot-separated keys, `props.size`). Strings are matched as they are;
/// other values as their compact JSON text (`true`, `5`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ArgRule {
    /// Where the argument is.
    pub path: String,
    /// If set, the argument MUST be present and match one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<Pattern>>,
    /// The call is denied when the argument is present and matches one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Pattern>,
}

impl ArgRule {
    /// A rule that allows the call only when the argument at `path` matches one of `values`.
    pub fn allow_only<I, S>(path: impl Into<String>, values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            path: path.into(),
            allow: Some(values.into_iter().map(|v| Pattern::new(v)).collect()),
            deny: Vec::new(),
        }
    }

    /// A rule that denies the call when the argument at `path` matches one of `values`.
    pub fn deny_matching<I, S>(path: impl Into<String>, values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            path: path.into(),
            allow: None,
            deny: values.into_iter().map(|v| Pattern::new(v)).collect(),
        }
    }

    fn pointer(&self) -> String {
        if self.path.is_empty() || self.path.starts_with('/') {
            self.path.clone()
        } else {
            self.path
                .split('.')
                .map(|k| format!("/{}", k.replace('~', "~0").replace('/', "~1")))
                .collect()
        }
    }

    /// Checks the arguments; `Err` holds the reason for a denial.
    fn check(&self, args: &serde_json::Value) -> Result<(), String> {
        let value = args.pointer(&self.pointer()).map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        if let Some(allowed) = &self.allow {
            match &value {
                None => return Err(format!("argument {} is required", self.path)),
                Some(v) if !allowed.iter().any(|p| p.matches(v)) => {
                    let list: Vec<&str> = allowed.iter().map(Pattern::as_str).collect();
                    return Err(format!(
                        "argument {} = {v:?} is not allowed (allowed: {})",
                        self.path,
                        list.join(", ")
                    ));
                }
                Some(_) => {}
            }
        }
        let denied = value
            .as_ref()
            .and_then(|v| Some((v, self.deny.iter().find(|p| p.matches(v))?)));
        if let Some((v, p)) = denied {
            return Err(format!(
                "argument {} = {v:?} matches denied pattern {:?}",
                self.path,
                p.as_str()
            ));
        }
        Ok(())
    }
}

/// What a policy says about one command: whether it may run and how.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Rule {
    /// Allow or deny.
    pub mode: Mode,
    /// Running the command twice has the same effect as once. Makes a sent-but-unanswered
    /// attempt retryable and concurrent identical calls share one execution.
    pub idempotent: bool,
    /// Retry schedule; `None` uses the policy's default.
    pub retry: Option<RetryPolicy>,
    /// Error classes returned by QEMU after which a retry is allowed.
    pub retry_classes: Vec<ErrorClass>,
    /// Per-attempt timeout: how long one attempt waits for its reply, enforced through
    /// [`crate::Execute::execute_timeout`] (over [`crate::Reconnecting`], an attempt that must
    /// first connect also waits this long for its session). `None` uses the policy's default.
    pub timeout: Option<Duration>,
    /// Lock group: calls whose rules name the same group run one at a time, in FIFO order.
    pub lock: Option<String>,
    /// Cache successful results this long (needs the cache enabled on [`crate::Ops`]).
    pub cache_ttl: Option<Duration>,
    /// Argument rules; all must pass.
    pub args: Vec<ArgRule>,
}

impl Rule {
    /// A rule that allows the command, with no retry of sent commands, no lock and no cache.
    pub fn allow() -> Self {
        Self::default()
    }

    /// A rule that denies the command.
    pub fn deny() -> Self {
        Self {
            mode: Mode::Deny,
            ..Self::default()
        }
    }

    /// Marks the command idempotent.
    #[must_use]
    pub fn idempotent(mut self, yes: bool) -> Self {
        self.idempotent = yes;
        self
    }

    /// Sets the retry schedule.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = Some(retry);
        self
    }

    /// Allows retries after QEMU errors of these classes.
    #[must_use]
    pub fn retry_classes<I: IntoIterator<Item = ErrorClass>>(mut self, classes: I) -> Self {
        self.retry_classes = classes.into_iter().collect();
        self
    }

    /// Sets the per-attempt timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Puts the command in a lock group.
    #[must_use]
    pub fn lock(mut self, group: impl Into<String>) -> Self {
        self.lock = Some(group.into());
        self
    }

    /// Caches successful results for `ttl`.
    #[must_use]
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = Some(ttl);
        self
    }

    /// Adds an argument rule.
    #[must_use]
    pub fn arg(mut self, rule: ArgRule) -> Self {
        self.args.push(rule);
        self
    }
}

/// Which rule allowed or denied a command.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RuleRef {
    /// The explicit rule with this name or pattern.
    Command(String),
    /// The profile.
    Profile(Profile),
    /// No rule matched and no profile allows it (default deny).
    Default,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Command(p) => write!(f, "rule commands.{p:?}"),
            Self::Profile(p) => write!(f, "profile {p}"),
            Self::Default => f.write_str("default deny"),
        }
    }
}

/// A command refused by the policy. Nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{command} denied by {rule}: {reason}")]
#[non_exhaustive]
pub struct Denial {
    /// The command.
    pub command: String,
    /// The rule that denied it.
    pub rule: RuleRef,
    /// Why, in words (names the argument for argument rules).
    pub reason: String,
}

/// A command the policy allows, with the rule that governs it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Allowed {
    /// The rule that allowed it.
    pub by: RuleRef,
    /// The rule's settings.
    pub rule: Arc<Rule>,
}

/// An allow-list of QMP commands. Default deny.
///
/// A command is allowed by, in order:
/// 1. the explicit rule with exactly its name;
/// 2. else the matching wildcard rule with the longest pattern (ties: the smaller pattern);
///    wildcard rules never allow `human-monitor-command`;
/// 3. else the profile (profiles never allow `human-monitor-command`).
///
/// The first rule that matches decides: an allow rule's argument rules can still deny.
/// The policy only decides; it does no I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    profile: Profile,
    rules: BTreeMap<String, Arc<Rule>>,
    default_retry: RetryPolicy,
    default_timeout: Option<Duration>,
}

impl Default for Policy {
    fn default() -> Self {
        Self::deny_all()
    }
}

impl Policy {
    fn with_profile(profile: Profile) -> Self {
        Self {
            profile,
            rules: BTreeMap::new(),
            default_retry: RetryPolicy::default(),
            default_timeout: None,
        }
    }

    /// Denies everything until rules are added.
    pub fn deny_all() -> Self {
        Self::with_profile(Profile::None)
    }

    /// The read-only profile: `query-*` and [`READ_ONLY_EXTRA`], all idempotent.
    pub fn read_only() -> Self {
        Self::with_profile(Profile::ReadOnly)
    }

    /// The vm-control profile: read-only plus stop, cont, system_powerdown and system_reset, in
    /// the [`RUN_STATE_LOCK`] lock group (stop and cont are idempotent).
    pub fn vm_control() -> Self {
        Self::with_profile(Profile::VmControl)
    }

    /// Allows every command except `human-monitor-command`. [`crate::Ops`] reports such a
    /// policy to its hooks ([`crate::Hooks::on_unrestricted`]) and, with the `tracing`
    /// feature, logs a warning.
    pub fn unrestricted_i_know_what_i_am_doing() -> Self {
        Self::with_profile(Profile::Unrestricted)
    }

    /// Adds (or replaces) the rule for `name`, which may be a wildcard pattern.
    #[must_use]
    pub fn rule(mut self, name: impl Into<String>, rule: Rule) -> Self {
        self.rules.insert(name.into(), Arc::new(rule));
        self
    }

    /// Sets the retry schedule of rules that do not set one.
    #[must_use]
    pub fn default_retry(mut self, retry: RetryPolicy) -> Self {
        self.default_retry = retry;
        self
    }

    /// Sets the per-attempt timeout of rules that do not set one.
    #[must_use]
    pub fn default_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.default_timeout = timeout;
        self
    }

    /// The profile.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// Whether the profile is unrestricted.
    pub fn is_unrestricted(&self) -> bool {
        self.profile == Profile::Unrestricted
    }

    /// The retry schedule that applies under `rule`: its own, else the policy's default.
    pub fn retry_for(&self, rule: &Rule) -> RetryPolicy {
        rule.retry
            .clone()
            .unwrap_or_else(|| self.default_retry.clone())
    }

    /// The per-attempt timeout that applies under `rule`: its own, else the policy's default.
    pub fn timeout_for(&self, rule: &Rule) -> Option<Duration> {
        rule.timeout.or(self.default_timeout)
    }

    fn find_rule(&self, name: &str) -> Option<(&str, &Arc<Rule>)> {
        if let Some((k, r)) = self.rules.get_key_value(name) {
            return Some((k, r));
        }
        self.rules
            .iter()
            .filter(|(k, r)| {
                let p = Pattern::new(k.as_str());
                p.is_glob() && p.matches(name) && !(name == HMP_COMMAND && r.mode == Mode::Allow)
            })
            // BTreeMap order is ascending, so `max_by_key` on the length keeps the last of the
            // longest; reverse to keep the smallest pattern among equals.
            .rev()
            .max_by_key(|(k, _)| k.len())
            .map(|(k, r)| (k.as_str(), r))
    }

    /// Decides whether `name` may run with `args`.
    ///
    /// # Errors
    /// A [`Denial`] naming the rule that refused the command.
    pub fn check(&self, name: &str, args: Option<&RawValue>) -> Result<Allowed, Denial> {
        let deny = |rule: RuleRef, reason: String| Denial {
            command: name.to_owned(),
            rule,
            reason,
        };
        if name.is_empty() || name.chars().any(char::is_control) {
            // No QMP command is named so (QEMU would refuse it); denying it also keeps the
            // separators of call keys out of names, so two calls' keys never collide.
            return Err(deny(
                RuleRef::Default,
                "not a QMP command name (empty, or with a control character)".to_owned(),
            ));
        }
        let (by, rule) = match self.find_rule(name) {
            Some((pattern, rule)) => {
                let by = RuleRef::Command(pattern.to_owned());
                if rule.mode == Mode::Deny {
                    return Err(deny(by, "the rule denies this command".to_owned()));
                }
                (by, Arc::clone(rule))
            }
            None if self.profile.allows(name) => (
                RuleRef::Profile(self.profile),
                Arc::new(self.profile.rule_for(name)),
            ),
            None if name == HMP_COMMAND => {
                return Err(deny(
                    RuleRef::Default,
                    "human-monitor-command bypasses the allow-list; only a rule naming it \
                     exactly can allow it"
                        .to_owned(),
                ));
            }
            None => {
                return Err(deny(
                    RuleRef::Default,
                    format!("no rule allows it (profile {})", self.profile),
                ));
            }
        };
        if !rule.args.is_empty() {
            let value: serde_json::Value = match args {
                Some(raw) => serde_json::from_str(raw.get())
                    .map_err(|e| deny(by.clone(), format!("unreadable arguments: {e}")))?,
                None => serde_json::Value::Object(serde_json::Map::new()),
            };
            for arg in &rule.args {
                arg.check(&value)
                    .map_err(|reason| deny(by.clone(), reason))?;
            }
        }
        Ok(Allowed { by, rule })
    }

    /// Parses a policy from TOML text. See [`Policy::from_json_str`] for the schema.
    ///
    /// # Errors
    /// A [`PolicyError`] with the line, column and key of the first problem.
    pub fn from_toml_str(text: &str) -> Result<Self, PolicyError> {
        let de = toml::Deserializer::new(text);
        let file: PolicyFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let (line, column) = match inner.span() {
                Some(span) => line_col(text, span.start),
                None => (None, None),
            };
            PolicyError {
                line,
                column,
                key: (key != ".").then_some(key),
                message: inner.message().to_owned(),
            }
        })?;
        file.into_policy()
    }

    /// Parses a policy from JSON text.
    ///
    /// The schema (the same in TOML):
    /// ```toml
    /// profile = "read-only"             # none | read-only | vm-control | unrestricted
    /// i_know_what_i_am_doing = false    # MUST be true with profile = "unrestricted"
    /// [defaults]
    /// timeout_ms = 5000
    /// retry = { max_attempts = 3, base_ms = 100, cap_ms = 5000, deadline_ms = 30000, jitter = "full" }
    /// [commands.device_add]
    /// mode = "allow"                    # allow | deny
    /// idempotent = false
    /// retry_classes = ["GenericError"]
    /// lock = "hotplug"
    /// cache_ttl_ms = 1000
    /// args = [ { path = "/driver", allow = ["usb-tablet", "virtio-*"] },
    ///          { path = "/id", deny = ["evil*"] } ]
    /// ```
    ///
    /// # Errors
    /// A [`PolicyError`] with the line, column and key of the first problem.
    pub fn from_json_str(text: &str) -> Result<Self, PolicyError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let file: PolicyFile = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            PolicyError {
                line: Some(inner.line()),
                column: Some(inner.column()),
                key: (key != ".").then_some(key),
                message: strip_json_position(&inner.to_string()),
            }
        })?;
        de.end().map_err(|e| PolicyError {
            line: Some(e.line()),
            column: Some(e.column()),
            key: None,
            message: strip_json_position(&e.to_string()),
        })?;
        file.into_policy()
    }

    /// Reads a policy file: JSON when the name ends in `.json`, TOML otherwise.
    ///
    /// # Errors
    /// When the file cannot be read (line and key unset) or does not parse.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            line: None,
            column: None,
            key: None,
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        if path.extension().is_some_and(|e| e == "json") {
            Self::from_json_str(&text)
        } else {
            Self::from_toml_str(&text)
        }
    }
}

fn line_col(text: &str, offset: usize) -> (Option<usize>, Option<usize>) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (Some(line), Some(col))
}

fn strip_json_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

/// A policy file that does not parse or does not make sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{message}", line.map(|l| format!("line {l}, column {}: ", column.unwrap_or(0))).unwrap_or_default(), key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
#[non_exhaustive]
pub struct PolicyError {
    /// 1-based line of the problem, when known.
    pub line: Option<usize>,
    /// 1-based column of the problem, when known.
    pub column: Option<usize>,
    /// Dotted path of the offending key (`commands.stop.mode`), when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

// --- File schema ---

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    profile: Profile,
    #[serde(default)]
    i_know_what_i_am_doing: bool,
    #[serde(default)]
    defaults: DefaultsFile,
    #[serde(default)]
    commands: BTreeMap<String, RuleFile>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DefaultsFile {
    retry: Option<RetryFile>,
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryFile {
    #[serde(default, deserialize_with = "attempts")]
    max_attempts: Option<u32>,
    base_ms: Option<u64>,
    cap_ms: Option<u64>,
    deadline_ms: Option<u64>,
    jitter: Option<Jitter>,
}

fn attempts<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let n = u32::deserialize(d)?;
    if n == 0 {
        return Err(serde::de::Error::custom(
            "max_attempts must be at least 1 (it counts the first attempt)",
        ));
    }
    Ok(Some(n))
}

impl RetryFile {
    fn apply(self, mut r: RetryPolicy) -> RetryPolicy {
        if let Some(n) = self.max_attempts {
            r.max_attempts = n;
        }
        if let Some(b) = self.base_ms {
            r.base = Duration::from_millis(b);
        }
        if let Some(c) = self.cap_ms {
            r.cap = Duration::from_millis(c);
        }
        if let Some(d) = self.deadline_ms {
            r.deadline = Some(Duration::from_millis(d));
        }
        if let Some(j) = self.jitter {
            r.jitter = j;
        }
        r
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    idempotent: bool,
    retry: Option<RetryFile>,
    #[serde(default)]
    retry_classes: Vec<String>,
    timeout_ms: Option<u64>,
    lock: Option<String>,
    cache_ttl_ms: Option<u64>,
    #[serde(default)]
    args: Vec<ArgRule>,
}

impl PolicyFile {
    fn into_policy(self) -> Result<Policy, PolicyError> {
        if self.profile == Profile::Unrestricted && !self.i_know_what_i_am_doing {
            return Err(PolicyError {
                line: None,
                column: None,
                key: Some("profile".to_owned()),
                message: "profile \"unrestricted\" allows every command; it also needs \
                          `i_know_what_i_am_doing = true`"
                    .to_owned(),
            });
        }
        let mut policy = Policy::with_profile(self.profile);
        if let Some(r) = self.defaults.retry {
            policy.default_retry = r.apply(RetryPolicy::default());
        }
        policy.default_timeout = self.defaults.timeout_ms.map(Duration::from_millis);
        for (name, f) in self.commands {
            let default_retry = policy.default_retry.clone();
            let rule = Rule {
                mode: f.mode,
                idempotent: f.idempotent,
                retry: f.retry.map(|r| r.apply(default_retry)),
                retry_classes: f
                    .retry_classes
                    .iter()
                    .map(|c| ErrorClass::from(c.as_str()))
                    .collect(),
                timeout: f.timeout_ms.map(Duration::from_millis),
                lock: f.lock,
                cache_ttl: f.cache_ttl_ms.map(Duration::from_millis),
                args: f.args,
            };
            policy.rules.insert(name, Arc::new(rule));
        }
        Ok(policy)
    }
}
