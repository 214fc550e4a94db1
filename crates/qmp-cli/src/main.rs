//! `qmp`: a command-line client for QEMU's machine protocol (QMP) and guest agent (QGA).
//!
//! One-shot commands with `key=value` arguments checked against the live schema, event
//! following, an interactive shell with completion, schema look-ups, policy enforcement
//! (`qmp-ops`), and a guided demo. Built on `qmp-tokio`; see `qmp --help`.
#![cfg_attr(not(fuzzing), warn(missing_docs))]

/// `println!` that ignores a closed stdout (`qmp events | head -1`) instead of panicking.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `print!` that ignores a closed stdout, then flushes.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout();
        let _ = write!(stdout, $($t)*);
        let _ = stdout.flush();
    }};
}

mod args;
mod conn;
mod demo;
mod fail;
mod json;
mod schema;
mod shell;
mod summary;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use qmp_ops::Policy;
use serde_json::{Map, Value};

use crate::conn::{Session, SpawnKind, Target, Timeouts};
use crate::fail::{EXIT_CODES, Failure};
use crate::schema::Schema;

/// A command-line client for QEMU's machine protocol (QMP) and guest agent (QGA).
#[derive(Debug, Parser)]
#[command(
    name = "qmp",
    version,
    after_help = EXIT_CODES,
    override_usage = "qmp [OPTIONS] <TARGET> <COMMAND> [key=value | key:=json | {json}]...\n       \
                      qmp [OPTIONS] <TARGET> events|shell|schema [...]\n       qmp demo",
    after_long_help = concat!(
        "Arguments: key=value (numbers, true/false, null, [..] and {..} are typed; a dotted key\n",
        "nests: file.driver=file), key:=<json> for a JSON value, or one JSON object.\n\n",
        "Examples:\n",
        "  qmp -s /run/vm.sock query-status\n",
        "  qmp -s /run/qsd.sock blockdev-add driver=null-co node-name=n0 size=1048576\n",
        "  qmp --spawn qsd query-version\n",
        "  qmp -s /run/vm.sock events --filter 'BLOCK_JOB_*' --count 2 --timeout 30\n",
        "  qmp -s /run/vm.sock schema blockdev-add\n",
        "  qmp --qga /run/qga.sock guest-info\n\n",
        "Exit codes:\n",
        "  0  success\n",
        "  1  QEMU answered with an error (its class and description are printed)\n",
        "  2  usage error: bad options or arguments, or a command or argument QEMU's schema\n",
        "     does not have (not checked with --no-validate or --qga); nothing is sent. From\n",
        "     the shell: its input could not be read (the lines before that ran)\n",
        "  3  connection or protocol failure: cannot connect, no greeting, disconnected, no reply\n",
        "  4  denied by the policy (--policy/--profile); the rule is named and nothing is sent\n",
        "  5  `qmp events`: --timeout passed before --count events arrived\n",
        "  129, 130, 143  a command, `events` or `schema` stopped by SIGHUP, SIGINT or SIGTERM\n",
        "            (a QEMU that --spawn started is killed first; under nohup SIGHUP stays\n",
        "            ignored); in the shell at a terminal, Ctrl-C stops waiting for the command\n",
        "            running (QEMU may still carry it out), and SIGTERM or SIGHUP end the shell;\n",
        "            with piped input SIGINT ends it"
    )
)]
struct Cli {
    /// QMP unix socket of the monitor.
    #[arg(short = 's', long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    /// QMP TCP monitor.
    #[arg(long, value_name = "HOST:PORT", global = true)]
    tcp: Option<String>,
    /// Start a throwaway QEMU program in a temp dir and talk to it (killed on exit).
    #[arg(long, value_enum, value_name = "PROGRAM", global = true)]
    spawn: Option<SpawnKind>,
    /// Guest agent unix socket (QGA protocol: no greeting, synced with 0xFF).
    #[arg(long, value_name = "PATH", global = true)]
    qga: Option<PathBuf>,
    /// Seconds to wait for the socket to connect.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, global = true)]
    connect_timeout: f64,
    /// Seconds to wait for the greeting and negotiation (or the guest agent's sync).
    #[arg(long, value_name = "SECS", default_value_t = 5.0, global = true)]
    greeting_timeout: f64,
    /// Seconds to wait for each command's reply (default: no limit).
    #[arg(long, value_name = "SECS", global = true)]
    command_timeout: Option<f64>,
    /// Allow or deny commands by a qmp-ops policy file (TOML, or JSON when named *.json); its
    /// timeouts, retries, locks and cache are for qmp_ops::Ops, not this tool.
    #[arg(long, value_name = "FILE", global = true)]
    policy: Option<PathBuf>,
    /// Enforce a built-in qmp-ops profile.
    #[arg(long, value_enum, global = true)]
    profile: Option<ProfileArg>,
    /// Do not check arguments against the live schema before sending.
    #[arg(long, global = true)]
    no_validate: bool,
    /// Send the one-shot command out of band (`exec-oob`; the command must allow it).
    #[arg(long)]
    oob: bool,
    /// Print JSON on one line.
    #[arg(long, global = true)]
    compact: bool,
    /// Print a human summary instead of JSON where one exists.
    #[arg(short = 'H', long, global = true)]
    human: bool,
    /// Colour the output.
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        value_name = "WHEN",
        global = true
    )]
    color: ColorArg,
    #[command(subcommand)]
    sub: Option<Sub>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProfileArg {
    /// query-* and the qom/device introspection commands.
    ReadOnly,
    /// read-only plus stop, cont, system_powerdown, system_reset.
    VmControl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ColorArg {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Follow events as JSON lines.
    ///
    /// Without --count, it ends (exit 0) when --timeout passes or QEMU closes the connection;
    /// with --count, those are failures (exit 5 and 3).
    Events {
        /// Only events whose name matches (repeatable; `*` and `?` wildcards).
        #[arg(long, short = 'f', value_name = "NAME")]
        filter: Vec<String>,
        /// Stop after this many events.
        #[arg(long, short = 'n', value_name = "N")]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long, short = 't', value_name = "SECS")]
        timeout: Option<f64>,
    },
    /// Interactive shell with history, completion, HMP mode and live events.
    Shell {
        /// History file (default: $HOME/.qmp_history).
        #[arg(long, value_name = "FILE")]
        history: Option<PathBuf>,
        /// Keep history in memory only.
        #[arg(long)]
        no_history_file: bool,
    },
    /// Show the live schema of a command or event; without NAME (or with a `*` pattern),
    /// list the commands and events.
    Schema {
        /// A command or event name, or a pattern such as `query-*`.
        name: Option<String>,
    },
    /// A guided tour on a throwaway qemu-storage-daemon (under 10 seconds).
    Demo {
        /// Use the testkit's fake QEMU even when QEMU is installed.
        #[arg(long)]
        fake: bool,
    },
    /// Any QMP command: `qmp -s PATH query-status`, `qmp -s PATH blockdev-add driver=...`.
    #[command(external_subcommand)]
    Exec(Vec<String>),
}

/// Output settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Out {
    pub(crate) style: json::Style,
    pub(crate) human: bool,
    pub(crate) tty: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            complain(format_args!("cannot start the runtime: {e}"));
            return ExitCode::from(3);
        }
    };
    let res = run(cli, &rt);
    rt.shutdown_timeout(Duration::from_millis(200));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            let _ = std::io::stdout().flush();
            complain(format_args!("{}", f.message()));
            ExitCode::from(f.code())
        }
    }
}

/// Writes `qmp: <message>` to stderr. Unlike `eprintln!`, a closed stderr is no panic: the exit
/// code still tells.
fn complain(message: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "qmp: {message}");
}

fn duration(secs: f64, what: &str) -> Result<Duration, Failure> {
    Duration::try_from_secs_f64(secs)
        .map_err(|_| Failure::Usage(format!("{what} must be a non-negative number of seconds")))
}

impl Cli {
    fn target(&self) -> Result<Target, Failure> {
        let mut targets = Vec::new();
        if let Some(p) = &self.socket {
            targets.push(Target::Unix(p.clone()));
        }
        if let Some(a) = &self.tcp {
            targets.push(Target::Tcp(a.clone()));
        }
        if let Some(k) = self.spawn {
            targets.push(Target::Spawn(k));
        }
        if let Some(p) = &self.qga {
            targets.push(Target::Qga(p.clone()));
        }
        match targets.len() {
            1 => Ok(targets.remove(0)),
            0 => Err(Failure::Usage(
                "no target: give --socket PATH, --tcp HOST:PORT, --spawn qsd|system or --qga PATH"
                    .to_owned(),
            )),
            _ => Err(Failure::Usage(
                "give only one of --socket, --tcp, --spawn and --qga".to_owned(),
            )),
        }
    }

    fn timeouts(&self) -> Result<Timeouts, Failure> {
        Ok(Timeouts {
            connect: duration(self.connect_timeout, "--connect-timeout")?,
            greeting: duration(self.greeting_timeout, "--greeting-timeout")?,
            command: self
                .command_timeout
                .map(|s| duration(s, "--command-timeout"))
                .transpose()?,
        })
    }

    fn policy(&self) -> Result<Option<Policy>, Failure> {
        match (&self.policy, self.profile) {
            (Some(_), Some(_)) => Err(Failure::Usage(
                "give either --policy or --profile, not both".to_owned(),
            )),
            (Some(path), None) => Policy::from_path(path)
                .map(Some)
                .map_err(|e| Failure::Usage(format!("policy {}: {e}", path.display()))),
            (None, Some(ProfileArg::ReadOnly)) => Ok(Some(Policy::read_only())),
            (None, Some(ProfileArg::VmControl)) => Ok(Some(Policy::vm_control())),
            (None, None) => Ok(None),
        }
    }

    fn out(&self) -> Out {
        let tty = std::io::stdout().is_terminal();
        let colour = match self.color {
            ColorArg::Always => true,
            ColorArg::Never => false,
            ColorArg::Auto => tty && std::env::var_os("NO_COLOR").is_none(),
        };
        Out {
            style: json::Style {
                compact: self.compact,
                colour,
            },
            human: self.human,
            tty,
        }
    }
}

fn run(cli: Cli, rt: &tokio::runtime::Runtime) -> Result<(), Failure> {
    let out = cli.out();
    let policy = cli.policy()?;
    let timeouts = cli.timeouts()?;
    match &cli.sub {
        Some(Sub::Demo { fake }) => return demo::run(rt, *fake, out),
        Some(Sub::Exec(words)) => {
            let (name, rest) = words
                .split_first()
                .ok_or_else(|| Failure::Usage("no command".to_owned()))?;
            let (mut args, auto) = args::parse(rest).map_err(Failure::Usage)?;
            // Checked before connecting, so a denied command starts no QEMU. Validation may
            // yet turn auto-typed values back into the text typed (`007`), and the policy is
            // checked again on what it sends; so here either form passing will do.
            let validating = !cli.no_validate && cli.qga.is_none();
            check_policy(policy.as_ref(), name, &args).or_else(|denied| {
                let text = args::as_typed_text(&args, &auto);
                if validating && check_policy(policy.as_ref(), name, &text).is_ok() {
                    Ok(())
                } else {
                    Err(denied)
                }
            })?;
            let target = cli.target()?;
            return rt.block_on(until_signalled(async {
                let session = conn::open(&target, timeouts).await?;
                let res =
                    one_shot(&session, name, &mut args, &auto, &cli, policy.as_ref(), out).await;
                finish(session).await;
                res
            }));
        }
        _ => {}
    }
    let target = cli.target()?;
    match cli.sub {
        Some(Sub::Events {
            filter,
            count,
            timeout,
        }) => {
            let timeout = timeout.map(|t| duration(t, "--timeout")).transpose()?;
            rt.block_on(until_signalled(async {
                let session = conn::open(&target, timeouts).await?;
                let res = follow_events(&session, &filter, count, timeout, out).await;
                finish(session).await;
                res
            }))
        }
        Some(Sub::Schema { name }) => rt.block_on(until_signalled(async {
            let session = conn::open(&target, timeouts).await?;
            let res = show_schema(&session, name.as_deref()).await;
            finish(session).await;
            res
        })),
        Some(Sub::Shell {
            history,
            no_history_file,
        }) => {
            let history = if no_history_file {
                None
            } else {
                history.or_else(default_history)
            };
            shell::run(rt, &target, timeouts, policy, history, out, cli.no_validate)
        }
        None => {
            let history = default_history();
            shell::run(rt, &target, timeouts, policy, history, out, cli.no_validate)
        }
        Some(Sub::Demo { .. } | Sub::Exec(_)) => Ok(()),
    }
}

/// `$HOME/.qmp_history`.
fn default_history() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".qmp_history"))
}

async fn finish(session: Session) {
    let _ = tokio::time::timeout(Duration::from_secs(2), session.client.close()).await;
    drop(session);
}

/// Checks `name` with `args` against the policy, if any.
pub(crate) fn check_policy(
    policy: Option<&Policy>,
    name: &str,
    args: &Map<String, Value>,
) -> Result<(), Failure> {
    let Some(policy) = policy else {
        return Ok(());
    };
    let raw = serde_json::value::to_raw_value(args)
        .map_err(|e| Failure::Usage(format!("arguments: {e}")))?;
    policy
        .check(name, Some(&raw))
        .map(|_| ())
        .map_err(|d| Failure::Denied(d.to_string()))
}

/// Fetches and parses the live schema.
pub(crate) async fn fetch_schema(client: &qmp_tokio::Client) -> Result<Schema, Failure> {
    let raw = client.execute_raw("query-qmp-schema", &()).await?;
    Schema::from_json(raw.get()).map_err(Failure::Connection)
}

/// [`fetch_schema`], to check a command against: QEMU refusing it is said to be what failed,
/// with the way round.
pub(crate) async fn fetch_schema_to_check(client: &qmp_tokio::Client) -> Result<Schema, Failure> {
    fetch_schema(client).await.map_err(|f| match f {
        Failure::Qmp(mut e) => {
            e.desc = format!(
                "query-qmp-schema, which checks commands and arguments, failed: {} \
                 (--no-validate skips the check)",
                e.desc
            );
            Failure::Qmp(e)
        }
        other => other,
    })
}

/// Sends a command, once its arguments pass the schema (unless disabled) and the policy.
#[allow(clippy::too_many_arguments)] // the one-shot path needs all of the command line
async fn one_shot(
    session: &Session,
    name: &str,
    args: &mut Map<String, Value>,
    auto: &[args::Typed],
    cli: &Cli,
    policy: Option<&Policy>,
    out: Out,
) -> Result<(), Failure> {
    if !cli.no_validate && !session.qga {
        let schema = fetch_schema_to_check(&session.client).await?;
        schema.validate(name, args, auto).map_err(Failure::Usage)?;
        check_policy(policy, name, args)?;
    }
    let ret = if cli.oob {
        let mut cmd = qmp_tokio::Command::new(name.to_owned()).oob();
        if !args.is_empty() {
            cmd = cmd
                .arguments(&*args)
                .map_err(|e| Failure::Usage(e.to_string()))?;
        }
        session.client.run_raw(cmd).await?
    } else {
        send(&session.client, name, args).await?
    };
    print_return(name, ret.get(), out);
    Ok(())
}

/// Executes `name` with `args` (none when empty).
pub(crate) async fn send(
    client: &qmp_tokio::Client,
    name: &str,
    args: &Map<String, Value>,
) -> Result<qmp_tokio::RawJson, Failure> {
    let res = if args.is_empty() {
        client.execute_raw(name, &()).await
    } else {
        client.execute_raw(name, args).await
    };
    Ok(res?)
}

/// Writes a command's return value to stdout.
pub(crate) fn print_return(name: &str, raw: &str, out: Out) {
    let summary = serde_json::from_str::<Value>(raw)
        .ok()
        .and_then(|v| summary::summarise(name, &v));
    let mut stdout = std::io::stdout().lock();
    if out.human
        && let Some(s) = &summary
    {
        let _ = writeln!(stdout, "{s}");
        return;
    }
    let _ = writeln!(stdout, "{}", json::format(raw, out.style));
    if out.tty
        && !out.style.compact
        && let Some(s) = summary
    {
        let (a, b) = if out.style.colour {
            (json::colour::DIM, json::colour::RESET)
        } else {
            ("", "")
        };
        let _ = writeln!(stdout, "{a}# {}{b}", s.replace('\n', "\n# "));
    }
}

/// One event as a JSON line.
pub(crate) fn event_line(ev: &qmp_tokio::Event) -> String {
    let name = serde_json::to_string(&ev.name).unwrap_or_default();
    let data = ev
        .data
        .as_ref()
        .map(|d| {
            format!(
                ",\"data\":{}",
                json::format(
                    d.get(),
                    json::Style {
                        compact: true,
                        colour: false
                    }
                )
            )
        })
        .unwrap_or_default();
    format!(
        "{{\"event\":{name}{data},\"timestamp\":{{\"seconds\":{},\"microseconds\":{}}}}}",
        ev.timestamp.seconds, ev.timestamp.microseconds
    )
}

/// Signal numbers `qmp` handles.
pub(crate) const SIGHUP: i32 = 1;
pub(crate) const SIGINT: i32 = 2;
pub(crate) const SIGTERM: i32 = 15;

/// Handlers for some signals, installed at once: from then on these signals no longer end
/// the process, they are reported by [`Signals::recv`]. Created inside the runtime.
pub(crate) struct Signals(Vec<(i32, tokio::signal::unix::Signal)>);

impl Signals {
    /// Installs handlers for `numbers`, except those `qmp` was started with ignored (SIGHUP
    /// under `nohup`, SIGINT for a background job of a script): a handler would undo that. One
    /// that cannot be installed keeps its default action.
    pub(crate) fn install(numbers: &[i32]) -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let ignored = ignored_signals();
        Self(
            numbers
                .iter()
                .filter(|&&n| ignored & (1 << (n - 1)) == 0)
                .filter_map(|&n| Some((n, signal(SignalKind::from_raw(n)).ok()?)))
                .collect(),
        )
    }

    /// The number of the next signal received.
    pub(crate) async fn recv(&mut self) -> i32 {
        std::future::poll_fn(|cx| {
            for (n, s) in &mut self.0 {
                if s.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*n);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// The set of signals this process ignores (bit n-1 for signal n), from `/proc/self/status`;
/// none where that cannot be read.
fn ignored_signals() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let mask = status.lines().find_map(|l| l.strip_prefix("SigIgn:"))?;
            u64::from_str_radix(mask.trim(), 16).ok()
        })
        .unwrap_or(0)
}

/// Runs `fut` unless SIGINT, SIGTERM or SIGHUP comes first. Then `fut` is dropped, and with
/// it the session: a QEMU that `--spawn` started is killed and its directory removed, which
/// the signal's default action (ending the process at once) would skip. The handlers are
/// installed before `fut` first runs, so before any QEMU is started.
async fn until_signalled<T>(fut: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    until_one_of(&mut Signals::install(&[SIGINT, SIGTERM, SIGHUP]), fut).await
}

/// Runs `fut` unless one of `signals` comes first ([`Failure::Signal`]).
pub(crate) async fn until_one_of<T>(
    signals: &mut Signals,
    fut: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::select! {
        res = fut => res,
        n = signals.recv() => Err(Failure::Signal(n)),
    }
}

async fn follow_events(
    session: &Session,
    filters: &[String],
    count: Option<u64>,
    timeout: Option<Duration>,
    out: Out,
) -> Result<(), Failure> {
    let mut stream = session.events();
    let filters: Vec<qmp_ops::Pattern> = filters.iter().map(qmp_ops::Pattern::new).collect();
    // A timeout too long to represent never runs out.
    let deadline = timeout.and_then(|t| tokio::time::Instant::now().checked_add(t));
    let mut seen = 0u64;
    if count == Some(0) {
        return Ok(());
    }
    loop {
        let item = match deadline {
            Some(d) => match tokio::time::timeout_at(d, stream.recv()).await {
                Ok(item) => item,
                Err(_) => {
                    return match count {
                        Some(n) => Err(Failure::Timeout(format!(
                            "timed out: {seen} of {n} events arrived"
                        ))),
                        None => Ok(()),
                    };
                }
            },
            None => stream.recv().await,
        };
        match item {
            Some(qmp_tokio::EventItem::Event(ev)) => {
                if !filters.is_empty() && !filters.iter().any(|f| f.matches(&ev.name)) {
                    continue;
                }
                let line = event_line(&ev);
                // Coloured, but still one event per line, whatever the output style.
                let line = if out.style.colour {
                    let style = json::Style {
                        compact: true,
                        ..out.style
                    };
                    json::format(&line, style)
                } else {
                    line
                };
                if writeln!(std::io::stdout(), "{line}").is_err() {
                    // The reader went away (`| head -1`): stop quietly.
                    return Ok(());
                }
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    return Ok(());
                }
            }
            Some(qmp_tokio::EventItem::Lagged(n)) => {
                complain(format_args!(
                    "{n} events were lost (dropped, or unreadable) before they could be shown"
                ));
            }
            Some(qmp_tokio::EventItem::Closed(_)) | None => {
                return match count {
                    Some(n) => Err(Failure::Connection(format!(
                        "the connection closed after {seen} of {n} events"
                    ))),
                    None => Ok(()),
                };
            }
            Some(_) => {}
        }
    }
}

async fn show_schema(session: &Session, name: Option<&str>) -> Result<(), Failure> {
    if session.qga {
        return Err(Failure::Usage(
            "the guest agent has no introspection; try guest-info".to_owned(),
        ));
    }
    let schema = fetch_schema(&session.client).await?;
    let text = match name {
        None => schema.render_index(None),
        Some(p) if p.contains(['*', '?']) => schema.render_index(Some(p)),
        Some(n) => match schema.render(n) {
            Some(t) => t,
            None => {
                let all = schema.commands().into_iter().chain(schema.events());
                let hint = schema::suggest(n, all)
                    .map(|s| format!(" (did you mean '{s}'?)"))
                    .unwrap_or_default();
                return Err(Failure::Usage(format!(
                    "no command or event named '{n}'{hint}"
                )));
            }
        },
    };
    out!("{text}");
    Ok(())
}
