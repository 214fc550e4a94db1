//! The interactive shell: history, completion of command and argument names from the live
//! schema, an HMP mode, and events printed above the prompt as they arrive.

use std::borrow::Cow;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use qmp_ops::Policy;
use qmp_testkit::launch::Qemu;
use rustix::termios::{OptionalActions, Termios};
use rustyline::completion::{Completer, Pair};
use rustyline::config::{CompletionType, Config};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, ExternalPrinter, Helper};
use serde_json::{Map, Value};

use crate::conn::{Session, Target, Timeouts};
use crate::fail::Failure;
use crate::schema::Schema;
use crate::{Out, SIGHUP, SIGINT, SIGTERM, Signals, json};

/// Words the shell handles itself.
const BUILTINS: &[&str] = &["exit", "help", "hmp", "schema"];

const HELP: &str =
    "  COMMAND [key=value | key:=json | {json}]...   run a QMP command (Tab completes names)
  hmp TEXT                                      run one HMP command (human-monitor-command)
  hmp                                           toggle HMP mode (every line goes to HMP)
  schema [NAME]                                 describe a command or event, or list them
  help                                          this text
  exit, Ctrl-D                                  leave (QEMU keeps running; `quit` stops it)
Events are printed as they arrive, prefixed with `event`.";

/// What completion needs to know.
struct Completion {
    schema: Option<Schema>,
    /// Command names (from the schema, or `guest-info` for the guest agent).
    commands: Vec<String>,
    /// HMP command names (from `help`), when HMP is available.
    hmp_commands: Vec<String>,
    hmp_mode: Arc<AtomicBool>,
}

struct ShellHelper(Arc<Completion>);

/// Splits a line into words, honouring single and double quotes (which group, and are
/// removed) and backslash escapes outside single quotes. A JSON value is taken as typed, with
/// its own quotes and spaces: a word that starts with `{` or `[`, or such a value after `=`
/// or `:=`, and a `"string"` after `:=` (so `{"driver":"null-co"}`, `l=["a", "b"]` and
/// `s:="12"` reach the argument parser unchanged).
pub(crate) fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        let json_starts = quote.is_none()
            && match c {
                '{' | '[' => cur.is_empty() || cur.ends_with('='),
                '"' => cur.ends_with(":="),
                _ => false,
            };
        if json_starts {
            copy_json(c, &mut chars, &mut cur);
            in_word = true;
            continue;
        }
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"') | None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    in_word = true;
                }
            }
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err("unterminated quote".to_owned());
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// Copies a JSON value that starts with `first` into `out` as it is, up to its end (the
/// bracket that closes it, or the quote that ends a string) or the end of the line; an
/// unfinished value is left for the JSON parser to report.
fn copy_json(first: char, chars: &mut impl Iterator<Item = char>, out: &mut String) {
    out.push(first);
    let (mut depth, mut in_string) = if first == '"' { (0, true) } else { (1, false) };
    let mut escaped = false;
    for c in chars.by_ref() {
        out.push(c);
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else {
            match c {
                '"' => in_string = true,
                '{' | '[' => depth += 1,
                '}' | ']' => depth -= 1,
                _ => {}
            }
        }
        if depth == 0 && !in_string {
            return;
        }
    }
}

impl Completion {
    fn complete(&self, line: &str, pos: usize) -> (usize, Vec<Pair>) {
        let before = &line[..pos];
        let start = before.rfind(char::is_whitespace).map_or(0, |i| {
            i + before[i..].chars().next().map_or(1, char::len_utf8)
        });
        let word = &before[start..];
        let earlier: Vec<&str> = before[..start].split_whitespace().collect();
        let pair = |display: &str, replacement: String| Pair {
            display: display.to_owned(),
            replacement,
        };
        let names = |list: &mut dyn Iterator<Item = &str>| -> Vec<Pair> {
            list.filter(|n| n.starts_with(word))
                .map(|n| pair(n, n.to_owned()))
                .collect()
        };
        let hmp = self.hmp_mode.load(Ordering::Relaxed);
        match earlier.as_slice() {
            [] if hmp => (
                start,
                names(&mut self.hmp_commands.iter().map(String::as_str)),
            ),
            [] => {
                let mut all = BUILTINS
                    .iter()
                    .copied()
                    .chain(self.commands.iter().map(String::as_str));
                let mut v = names(&mut all);
                v.sort_by(|a, b| a.display.cmp(&b.display));
                v.dedup_by(|a, b| a.display == b.display);
                (start, v)
            }
            _ if hmp => (start, Vec::new()),
            ["hmp"] => (
                start,
                names(&mut self.hmp_commands.iter().map(String::as_str)),
            ),
            ["schema"] => {
                let Some(schema) = &self.schema else {
                    return (start, Vec::new());
                };
                let mut all = schema.commands().into_iter().chain(schema.events());
                (start, names(&mut all))
            }
            [command, rest @ ..] => {
                let Some(schema) = &self.schema else {
                    return (start, Vec::new());
                };
                // The arguments typed so far select union variants.
                let typed_words: Vec<String> = rest
                    .iter()
                    .filter(|w| w.contains('='))
                    .map(|w| (*w).to_owned())
                    .collect();
                let typed = crate::args::parse(&typed_words)
                    .map(|(m, _)| m)
                    .unwrap_or_default();
                if let Some((key, value)) = word.split_once('=') {
                    if key.ends_with(':') {
                        return (start, Vec::new());
                    }
                    let path: Vec<&str> = key.split('.').collect();
                    let out = schema
                        .value_candidates(command, &path, &typed)
                        .into_iter()
                        .filter(|v| v.starts_with(value))
                        .map(|v| pair(&v, format!("{key}={v} ")))
                        .collect();
                    return (start, out);
                }
                let mut path: Vec<&str> = word.split('.').collect();
                let last = path.pop().unwrap_or_default();
                let prefix: String = path.iter().map(|p| format!("{p}.")).collect();
                let mut out = Vec::new();
                for name in schema.argument_names(command, &path, &typed) {
                    if !name.starts_with(last) {
                        continue;
                    }
                    let mut full = path.clone();
                    full.push(&name);
                    let already = lookup(&typed, &full).is_some();
                    if already {
                        continue;
                    }
                    let tail = if schema.is_object_arg(command, &full, &typed) {
                        "."
                    } else {
                        "="
                    };
                    out.push(pair(&name, format!("{prefix}{name}{tail}")));
                }
                (start, out)
            }
        }
    }
}

fn lookup<'a>(map: &'a Map<String, Value>, path: &[&str]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let v = map.get(*first)?;
    if rest.is_empty() {
        Some(v)
    } else {
        lookup(v.as_object()?, rest)
    }
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        Ok(self.0.complete(line, pos))
    }
}

impl Hinter for ShellHelper {
    type Hint = String;
}

impl Highlighter for ShellHelper {
    fn highlight_prompt<'b, 's: 'b, 'p: 'b>(
        &'s self,
        prompt: &'p str,
        _default: bool,
    ) -> Cow<'b, str> {
        Cow::Borrowed(prompt)
    }
}

impl Validator for ShellHelper {}

impl Helper for ShellHelper {}

/// Where shell output goes: above the prompt while editing, or straight to stdout.
#[derive(Clone)]
struct Printer {
    external: Option<Arc<Mutex<Box<dyn ExternalPrinter + Send>>>>,
}

impl Printer {
    fn line(&self, text: String) {
        match &self.external {
            Some(p) => {
                if let Ok(mut p) = p.lock() {
                    let _ = p.print(format!("{text}\n"));
                }
            }
            None => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
        }
    }
}

/// Runs the shell until `exit`, Ctrl-D, or the connection closes (an error: exit code 3; input
/// that cannot be read is one too: exit code 2).
pub(crate) fn run(
    rt: &tokio::runtime::Runtime,
    target: &Target,
    t: Timeouts,
    policy: Option<Policy>,
    history: Option<PathBuf>,
    out: Out,
    no_validate: bool,
) -> Result<(), Failure> {
    // Installed before anything starts, so a signal never skips the clean-up below.
    let mut signals = rt.block_on(async { Signals::install(&[SIGINT, SIGTERM, SIGHUP]) });
    let (mut session, (schema, commands, hmp_commands)) =
        rt.block_on(crate::until_one_of(&mut signals, async {
            let session = crate::conn::open(target, t).await?;
            let described = describe(&session, policy.as_ref(), no_validate).await?;
            Ok((session, described))
        }))?;
    let client = session.client.clone();
    let stdin = std::io::stdin();
    // Piped input is read here, a line at a time with a bound on its length (the line editor
    // would read a line of any length into memory).
    let mut piped =
        (!rustix::termios::isatty(&stdin)).then(|| std::io::BufReader::new(stdin.lock()));
    let on_signal = Arc::new(OnSignal {
        qemu: Mutex::new(session.qemu.take()),
        terminal: rustix::termios::isatty(&stdin)
            .then(|| rustix::termios::tcgetattr(&stdin).ok())
            .flatten(),
        line: Mutex::new(None),
        ending: AtomicBool::new(false),
    });
    rt.spawn(watch_signals(signals, Arc::clone(&on_signal)));
    let hmp_mode = Arc::new(AtomicBool::new(false));
    let completion = Arc::new(Completion {
        schema,
        commands,
        hmp_commands,
        hmp_mode: Arc::clone(&hmp_mode),
    });
    let config = Config::builder()
        .completion_type(CompletionType::List)
        .auto_add_history(false)
        .build();
    let mut rl: Editor<ShellHelper, DefaultHistory> = Editor::with_config(config)
        .map_err(|e| Failure::Connection(format!("cannot start the line editor: {e}")))?;
    rl.set_helper(Some(ShellHelper(Arc::clone(&completion))));
    if let Some(h) = &history {
        let _ = rl.load_history(h);
    }
    let printer = Printer {
        external: rl
            .create_external_printer()
            .ok()
            .map(|p| Arc::new(Mutex::new(Box::new(p) as Box<dyn ExternalPrinter + Send>))),
    };

    // Events, printed above the prompt as they arrive.
    let mut events = session.events();
    let ev_printer = printer.clone();
    let colour = out.style.colour;
    let event_task = rt.spawn(async move {
        while let Some(item) = events.recv().await {
            match item {
                qmp_tokio::EventItem::Event(ev) => {
                    let data = ev
                        .data
                        .as_ref()
                        .map(|d| {
                            let style = json::Style {
                                compact: true,
                                colour,
                            };
                            format!(" {}", json::format(d.get(), style))
                        })
                        .unwrap_or_default();
                    ev_printer.line(format!("event {}{data}", ev.name));
                }
                qmp_tokio::EventItem::Lagged(n) => {
                    ev_printer.line(format!("({n} events lost)"));
                }
                qmp_tokio::EventItem::Closed(_) => {
                    ev_printer.line("(the connection closed)".to_owned());
                }
                _ => {}
            }
        }
    });

    if let Some(g) = client.greeting() {
        outln!(
            "Connected to QEMU {}. Type 'help' for help, Ctrl-D to leave.",
            g.version
        );
    } else {
        outln!("Connected to the guest agent. Type 'help' for help, Ctrl-D to leave.");
    }
    let shell = Shell {
        client: client.clone(),
        completion: Arc::clone(&completion),
        policy,
        out,
        no_validate,
    };
    // How the shell ends: a script (or a user) can tell from the exit code that its input
    // could not be read, or that the connection closed under it.
    let closed = || Err(Failure::Connection("the connection closed".to_owned()));
    let mut end = Ok(());
    loop {
        let prompt = if hmp_mode.load(Ordering::Relaxed) {
            "(hmp) "
        } else {
            "(qmp) "
        };
        let read = match &mut piped {
            Some(input) => read_line(input),
            None => rl.readline(prompt),
        };
        on_signal.yield_if_ending();
        let line = match read {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                end = Err(Failure::Usage(format!("cannot read the input: {e}")));
                break;
            }
        };
        let line = line.trim();
        if line.is_empty() {
            // Enter on an empty line is how one checks on a QEMU that may have gone.
            if client.is_closed() {
                outln!("(the connection closed)");
                end = closed();
                break;
            }
            continue;
        }
        let _ = rl.add_history_entry(line);
        if line == "exit" {
            break;
        }
        // At a terminal, a SIGINT (Ctrl-C) while the line runs stops waiting for it (QEMU may
        // still carry out what was sent; the reply is dropped); the session stays.
        let (cancel, cancelled) = tokio::sync::oneshot::channel();
        *lock(&on_signal.line) = Some(cancel);
        let ended = rt.block_on(async {
            tokio::select! {
                ended = shell.line(line, &hmp_mode) => Some(ended),
                _ = cancelled => None,
            }
        });
        lock(&on_signal.line).take();
        on_signal.yield_if_ending();
        let Some(ended) = ended else {
            outln!("(interrupted)");
            continue;
        };
        if ended || client.is_closed() {
            if !ended {
                outln!("(the connection closed)");
                end = closed();
            }
            break;
        }
    }
    if let Some(h) = &history {
        let _ = rl.save_history(h);
    }
    event_task.abort();
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(2), client.close()).await;
    });
    drop(session);
    drop(lock(&on_signal.qemu).take());
    end
}

/// The longest line read from piped input.
const MAX_LINE: usize = 16 << 20;

/// Reads a line of piped input, without its line ending; at most [`MAX_LINE`] bytes of it.
fn read_line(input: &mut impl std::io::BufRead) -> Result<String, ReadlineError> {
    use std::io::{BufRead, Error, ErrorKind, Read};
    let mut line = Vec::new();
    // One byte over the limit tells a line that is too long.
    let limit = u64::try_from(MAX_LINE + 2).unwrap_or(u64::MAX);
    if input.take(limit).read_until(b'\n', &mut line)? == 0 {
        return Err(ReadlineError::Eof);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    if line.len() > MAX_LINE {
        return Err(ReadlineError::Io(Error::new(
            ErrorKind::InvalidData,
            format!("a line is longer than {} MiB", MAX_LINE >> 20),
        )));
    }
    String::from_utf8(line).map_err(|_| {
        ReadlineError::Io(Error::new(
            ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        ))
    })
}

/// The commands (and, with a schema, HMP commands) completion offers, and the schema. HMP
/// commands are asked for only if `policy` allows `human-monitor-command`. With
/// `no_validate`, a server that cannot describe its commands gets a shell without completion.
async fn describe(
    session: &Session,
    policy: Option<&Policy>,
    no_validate: bool,
) -> Result<(Option<Schema>, Vec<String>, Vec<String>), Failure> {
    let client = &session.client;
    if session.qga {
        let info = crate::send(client, "guest-info", &Map::new()).await?;
        let v: Value = serde_json::from_str(info.get()).unwrap_or_default();
        let names = v
            .get("supported_commands")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter(|c| c.get("enabled").and_then(Value::as_bool) != Some(false))
                    .filter_map(|c| c.get("name").and_then(Value::as_str))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        return Ok((None, names, Vec::new()));
    }
    let schema = match crate::fetch_schema_to_check(client).await {
        Ok(schema) => schema,
        Err(Failure::Qmp(_)) if no_validate => return Ok((None, Vec::new(), Vec::new())),
        Err(f) => return Err(f),
    };
    let names: Vec<String> = schema.commands().iter().map(|s| (*s).to_owned()).collect();
    let mut hmp = Vec::new();
    let mut args = Map::new();
    args.insert("command-line".to_owned(), Value::from("help"));
    if schema.has_command("human-monitor-command")
        && crate::check_policy(policy, "human-monitor-command", &args).is_ok()
        && let Ok(raw) = crate::send(client, "human-monitor-command", &args).await
        && let Ok(text) = serde_json::from_str::<String>(raw.get())
    {
        hmp = hmp_names(&text);
    }
    Ok((Some(schema), names, hmp))
}

/// What the signal watcher of a running shell needs.
struct OnSignal {
    /// The QEMU that `--spawn` started, if any.
    qemu: Mutex<Option<Qemu>>,
    /// The terminal's settings before the line editor first changed them, when standard
    /// input is a terminal (then the shell is interactive).
    terminal: Option<Termios>,
    /// Cancels the line running now, if any.
    line: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// Set once a signal is ending the shell: the watcher exits the process.
    ending: AtomicBool,
}

impl OnSignal {
    /// Once a signal is ending the shell, leaves the exit (and its status) to the watcher
    /// instead of going on, or ending the normal way, as the session breaks under it.
    fn yield_if_ending(&self) {
        while self.ending.load(Ordering::Acquire) {
            std::thread::park();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a signal does to a running shell. At a terminal, a SIGINT (Ctrl-C) stops waiting for
/// the line running, if any, and never ends the shell: at the prompt the line editor reads
/// Ctrl-C itself, so a SIGINT there is a late one for a line that just ended. With piped input
/// a SIGINT ends the shell, as it does a one-shot command, so a script never goes on past an
/// interrupted line. SIGTERM and SIGHUP end it. Ending does what the signal's default action
/// would skip: a `--spawn` QEMU is killed and its directory removed, and then, last, the
/// terminal leaves the line editor's raw mode (which the main thread may enter meanwhile).
async fn watch_signals(mut signals: Signals, on: Arc<OnSignal>) {
    loop {
        let n = signals.recv().await;
        if n == SIGINT && on.terminal.is_some() {
            if let Some(cancel) = lock(&on.line).take() {
                let _ = cancel.send(());
            }
            continue;
        }
        on.ending.store(true, Ordering::Release);
        drop(lock(&on.qemu).take());
        if let Some(t) = &on.terminal {
            let _ = rustix::termios::tcsetattr(std::io::stdin(), OptionalActions::Now, t);
        }
        let failure = Failure::Signal(n);
        // Never waits for stdout's lock, and a hung-up terminal (SIGHUP) is no reason to panic.
        let _ = writeln!(std::io::stderr(), "\nqmp: {}", failure.message());
        std::process::exit(failure.code().into());
    }
}

/// The first word of each line of HMP's `help`, without `|alias` parts.
fn hmp_names(help: &str) -> Vec<String> {
    let mut v: Vec<String> = help
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .flat_map(|w| w.split('|').map(str::to_owned).collect::<Vec<_>>())
        .filter(|w| {
            w.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
        .filter(|w| !w.is_empty())
        .collect();
    v.sort();
    v.dedup();
    v
}

struct Shell {
    client: qmp_tokio::Client,
    completion: Arc<Completion>,
    policy: Option<Policy>,
    out: Out,
    no_validate: bool,
}

impl Shell {
    /// Whether the peer has `human-monitor-command` (never the guest agent).
    fn has_hmp(&self) -> bool {
        self.completion
            .schema
            .as_ref()
            .is_some_and(|s| s.has_command("human-monitor-command"))
    }

    fn error(&self, msg: &str) {
        if self.out.style.colour {
            outln!("\x1b[1;31m{msg}\x1b[0m");
        } else {
            outln!("{msg}");
        }
    }

    /// Runs one line; returns whether the session ended (after `quit`).
    async fn line(&self, line: &str, hmp_mode: &AtomicBool) -> bool {
        let hmp = hmp_mode.load(Ordering::Relaxed);
        if hmp && (line == "hmp" || line == "qmp") {
            hmp_mode.store(false, Ordering::Relaxed);
            outln!("QMP mode");
            return false;
        }
        if hmp {
            self.hmp(line).await;
            return false;
        }
        let words = match split_words(line) {
            Ok(w) => w,
            Err(e) => {
                self.error(&format!("error: {e}"));
                return false;
            }
        };
        let Some((name, rest)) = words.split_first() else {
            return false;
        };
        match name.as_str() {
            "help" => {
                outln!("{HELP}");
                return false;
            }
            "hmp" if !self.has_hmp() => {
                self.error("error: this program has no HMP (no human-monitor-command)");
                return false;
            }
            "hmp" if rest.is_empty() => {
                hmp_mode.store(true, Ordering::Relaxed);
                outln!("HMP mode: lines go to human-monitor-command; 'qmp' returns");
                return false;
            }
            "hmp" => {
                // The text after `hmp` as typed (quotes are HMP's business).
                let joined = rest.join(" ");
                let text = line
                    .trim_start()
                    .strip_prefix("hmp")
                    .map_or(joined.as_str(), str::trim_start);
                self.hmp(text).await;
                return false;
            }
            "schema" => {
                let Some(schema) = &self.completion.schema else {
                    self.error("error: the guest agent has no introspection; try guest-info");
                    return false;
                };
                match rest.first() {
                    None => out!("{}", schema.render_index(None)),
                    Some(p) if p.contains(['*', '?']) => out!("{}", schema.render_index(Some(p))),
                    Some(n) => match schema.render(n) {
                        Some(t) => out!("{t}"),
                        None => self.error(&format!("error: no command or event named '{n}'")),
                    },
                }
                return false;
            }
            _ => {}
        }
        let (mut args, auto) = match crate::args::parse(rest) {
            Ok(a) => a,
            Err(e) => {
                self.error(&format!("error: {e}"));
                return false;
            }
        };
        if !self.no_validate
            && let Some(schema) = &self.completion.schema
            && let Err(e) = schema.validate(name, &mut args, &auto)
        {
            self.error(&format!("error: {e}"));
            return false;
        }
        if let Err(f) = crate::check_policy(self.policy.as_ref(), name, &args) {
            self.error(&f.message());
            return false;
        }
        match crate::send(&self.client, name, &args).await {
            Ok(ret) => {
                crate::print_return(name, ret.get(), self.out);
                if name == "quit" {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), self.client.closed()).await;
                    outln!("QEMU quit; the connection is closed");
                    return true;
                }
            }
            Err(f) => self.error(&f.message()),
        }
        false
    }

    async fn hmp(&self, text: &str) {
        let mut args = Map::new();
        args.insert("command-line".to_owned(), Value::from(text));
        if let Err(f) = crate::check_policy(self.policy.as_ref(), "human-monitor-command", &args) {
            self.error(&f.message());
            return;
        }
        match crate::send(&self.client, "human-monitor-command", &args).await {
            Ok(raw) => {
                // HMP ends its lines with CRLF.
                let text = serde_json::from_str::<String>(raw.get())
                    .unwrap_or_default()
                    .replace("\r\n", "\n");
                out!("{text}");
                if !text.is_empty() && !text.ends_with('\n') {
                    outln!();
                }
                let _ = std::io::stdout().flush();
            }
            Err(f) => self.error(&f.message()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piped_lines_are_read_without_their_endings_up_to_a_bound() {
        let read_all = |bytes: &[u8]| {
            let mut input = std::io::Cursor::new(bytes.to_vec());
            let mut lines = Vec::new();
            loop {
                match read_line(&mut input) {
                    Ok(line) => lines.push(line),
                    Err(e) => return (lines, e.to_string()),
                }
            }
        };
        assert_eq!(
            read_all(b"a b\r\n\nc\nlast"),
            (
                vec![
                    "a b".to_owned(),
                    String::new(),
                    "c".to_owned(),
                    "last".to_owned()
                ],
                ReadlineError::Eof.to_string()
            )
        );
        assert_eq!(
            read_all(b"ok\n\xff\nnever\n"),
            (
                vec!["ok".to_owned()],
                "stream did not contain valid UTF-8".to_owned()
            )
        );
        let mut longest = vec![b'x'; MAX_LINE];
        longest.extend(b"\r\n");
        assert_eq!(read_all(&longest).0[0].len(), MAX_LINE);
        let mut too_long = vec![b'x'; MAX_LINE + 1];
        too_long.extend(b"\nnever\n");
        assert_eq!(
            read_all(&too_long),
            (Vec::new(), "a line is longer than 16 MiB".to_owned())
        );
    }

    #[test]
    fn words() {
        assert_eq!(
            split_words(r#"a b="x y" 'c d' e\ f"#).unwrap(),
            ["a", "b=x y", "c d", "e f"]
        );
        assert_eq!(split_words("  ").unwrap(), Vec::<String>::new());
        assert_eq!(split_words("a \"b").unwrap_err(), "unterminated quote");
        assert_eq!(split_words("x=''").unwrap(), ["x="]);
    }

    #[test]
    fn json_values_are_taken_as_typed() {
        assert_eq!(
            split_words(r#"blockdev-add {"driver": "null-co", "node-name": "a b"}"#).unwrap(),
            [
                "blockdev-add",
                r#"{"driver": "null-co", "node-name": "a b"}"#
            ]
        );
        assert_eq!(
            split_words(r#"c s:="12" l=["a", "b\"]"] o:={"k": [1, {"x": "}"}]} n="x y""#).unwrap(),
            [
                "c",
                r#"s:="12""#,
                r#"l=["a", "b\"]"]"#,
                r#"o:={"k": [1, {"x": "}"}]}"#,
                "n=x y"
            ]
        );
        // Unfinished: left for the parser to report.
        assert_eq!(split_words(r#"c {"a": 1"#).unwrap(), ["c", r#"{"a": 1"#]);
        let (args, _) = crate::args::parse(&split_words(r#"s:="12" l=["a"]"#).unwrap()).unwrap();
        assert_eq!(Value::Object(args).to_string(), r#"{"l":["a"],"s":"12"}"#);
    }

    fn completions(c: &Completion, line: &str) -> (usize, Vec<String>) {
        let (start, pairs) = c.complete(line, line.len());
        (start, pairs.into_iter().map(|p| p.replacement).collect())
    }

    #[test]
    fn completes_commands_arguments_and_values() {
        let c = Completion {
            schema: Some(Schema::from_json(crate::demo::FAKE_SCHEMA).unwrap()),
            commands: vec!["blockdev-add".into(), "blockdev-del".into(), "quit".into()],
            hmp_commands: vec!["info".into()],
            hmp_mode: Arc::new(AtomicBool::new(false)),
        };
        assert_eq!(
            completions(&c, "blockdev-"),
            (0, vec!["blockdev-add".into(), "blockdev-del".into()])
        );
        assert_eq!(completions(&c, "he"), (0, vec!["help".into()]));
        assert_eq!(
            completions(&c, "blockdev-add dr"),
            (13, vec!["driver=".into()])
        );
        assert_eq!(
            completions(&c, "blockdev-add driver="),
            (13, vec!["driver=file ".into(), "driver=null-co ".into()])
        );
        // The tag selects the case; typed arguments are not offered again.
        assert_eq!(
            completions(&c, "blockdev-add driver=null-co "),
            (28, vec!["node-name=".into(), "size=".into()])
        );
        assert_eq!(
            completions(&c, "blockdev-add driver=file "),
            (
                25,
                vec!["filename=".into(), "node-name=".into(), "size=".into()]
            )
        );
        // Nested members of an object argument, with `.` for objects.
        assert_eq!(
            completions(&c, "blockdev-create op"),
            (16, vec!["options.".into()])
        );
        assert_eq!(
            completions(&c, "blockdev-create options.driver=null-co options.s"),
            (39, vec!["options.size=".into()])
        );
        assert_eq!(
            completions(&c, "schema blockdev-d"),
            (7, vec!["blockdev-del".into()])
        );
        assert_eq!(completions(&c, "nosuch x"), (7, vec![]));
        c.hmp_mode.store(true, Ordering::Relaxed);
        assert_eq!(completions(&c, "in"), (0, vec!["info".into()]));
    }

    #[test]
    fn hmp_help_names() {
        let help = "announce_self [interfaces] [id] -- Trigger GARP\n\
                    info [subcommand] -- show various information\n\
                    q|quit  -- quit the emulator\n";
        assert_eq!(hmp_names(help), ["announce_self", "info", "q", "quit"]);
    }
}
