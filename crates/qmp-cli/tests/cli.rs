//! The `qmp` binary against real qemu-storage-daemon, qemu-system-x86_64 and qemu-ga (skipped
//! with a printed reason when missing; failing under `QMP_REQUIRE_QEMU=1`), and against the
//! testkit's fake for faults real QEMU cannot be made to show on demand.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use qmp_testkit::fake::{FakeQemu, Script};
use qmp_testkit::launch::{Launch, Qemu};

const QMP: &str = env!("CARGO_BIN_EXE_qmp");

/// The fake QEMU serving `script` on a Unix socket, and the socket's path.
fn serve_fake(script: Script) -> (FakeQemu, String) {
    let fake = FakeQemu::unix(script).unwrap();
    let path = fake.socket_path().unwrap().display().to_string();
    (fake, path)
}

/// Runs `qmp` with `args`; stdout and stderr are pipes (so no colour, no tty summary).
fn qmp(args: &[&str]) -> Output {
    Command::new(QMP)
        .args(args)
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .output()
        .expect("run qmp")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code, stdout and stderr exactly.
#[track_caller]
fn check(o: &Output, code: i32, stdout: &str, stderr: &str) {
    assert_eq!(
        (o.status.code(), out(o).as_str(), err(o).as_str()),
        (Some(code), stdout, stderr)
    );
}

fn qsd() -> Option<Qemu> {
    Launch::storage_daemon().spawn()
}

fn sock(q: &Qemu) -> String {
    q.socket_path().display().to_string()
}

#[test]
fn one_shot_pretty_compact_and_human() {
    let Some(q) = qsd() else { return };
    let s = sock(&q);
    let compact = qmp(&["-s", &s, "--compact", "query-version"]);
    assert_eq!(compact.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_str(&out(&compact)).unwrap();
    let package = v["package"].as_str().unwrap().to_owned();
    let (maj, min, mic) = (
        &v["qemu"]["major"],
        &v["qemu"]["minor"],
        &v["qemu"]["micro"],
    );
    // QEMU's member order is kept.
    check(
        &compact,
        0,
        &format!(
            "{{\"qemu\":{{\"micro\":{mic},\"minor\":{min},\"major\":{maj}}},\"package\":\"{package}\"}}\n"
        ),
        "",
    );
    check(
        &qmp(&["-s", &s, "query-version"]),
        0,
        &format!(
            "{{\n  \"qemu\": {{\n    \"micro\": {mic},\n    \"minor\": {min},\n    \"major\": {maj}\n  }},\n  \"package\": \"{package}\"\n}}\n"
        ),
        "",
    );
    check(
        &qmp(&["-s", &s, "-H", "query-version"]),
        0,
        &format!("QEMU {maj}.{min}.{mic} ({package})\n"),
        "",
    );
    // Forced colour.
    let o = qmp(&["-s", &s, "--color", "always", "--compact", "query-jobs"]);
    check(&o, 0, "[]\n", "");
    let o = qmp(&[
        "-s",
        &s,
        "--color",
        "always",
        "--compact",
        "query-named-block-nodes",
    ]);
    check(&o, 0, "[]\n", "");
    let o = qmp(&[
        "-s",
        &s,
        "--color",
        "always",
        "--compact",
        "blockdev-add",
        "driver=null-co",
        "node-name=c0",
    ]);
    check(&o, 0, "{}\n", "");
    let o = qmp(&[
        "-s",
        &s,
        "--color",
        "always",
        "--compact",
        "query-named-block-nodes",
    ]);
    assert!(
        out(&o).starts_with("[{\x1b[1;34m\"iops_rd\"\x1b[0m:\x1b[36m0\x1b[0m,"),
        "{}",
        out(&o)
    );
}

#[test]
fn arguments_typed_nested_json_and_validated() {
    let Some(q) = qsd() else { return };
    let s = sock(&q);
    // Numbers and booleans are typed.
    check(
        &qmp(&[
            "-s",
            &s,
            "blockdev-add",
            "driver=null-co",
            "node-name=n0",
            "size=1048576",
            "read-zeroes=true",
        ]),
        0,
        "{}\n",
        "",
    );
    check(
        &qmp(&["-s", &s, "-H", "query-named-block-nodes"]),
        0,
        "node n0: driver null-co, json:{\"read-zeroes\": true, \"driver\": \"null-co\", \"size\": 1048576}\n",
        "",
    );
    // One JSON object.
    check(
        &qmp(&[
            "-s",
            &s,
            "blockdev-add",
            r#"{"driver": "null-co", "node-name": "n1"}"#,
        ]),
        0,
        "{}\n",
        "",
    );
    // Nested keys and a JSON value, on a real job.
    let file = q.dir().join("disk.raw");
    let filename = format!("options.filename={}", file.display());
    check(
        &qmp(&[
            "-s",
            &s,
            "blockdev-create",
            "job-id=j0",
            "options.driver=file",
            &filename,
            "options.size:=1048576",
        ]),
        0,
        "{}\n",
        "",
    );
    // A string where the schema wants one, though it looks like a number: sent as "123",
    // so QEMU (not the validator) refuses it.
    check(
        &qmp(&["-s", &s, "blockdev-add", "driver=null-co", "node-name=123"]),
        1,
        "",
        "qmp: error: GenericError: Invalid node-name: '123'\n",
    );
    // Sent exactly as typed, not as the number it parsed to.
    for typed in ["007", "1e3", "+5", "1.50", "-0"] {
        check(
            &qmp(&[
                "-s",
                &s,
                "blockdev-add",
                "driver=null-co",
                &format!("node-name={typed}"),
            ]),
            1,
            "",
            &format!("qmp: error: GenericError: Invalid node-name: '{typed}'\n"),
        );
    }
    // Exit 1: QEMU's error, class and description.
    check(
        &qmp(&["-s", &s, "blockdev-add", "driver=null-co", "node-name=n0"]),
        1,
        "",
        "qmp: error: GenericError: Duplicate nodes with node-name='n0'\n",
    );
    check(
        &qmp(&["-s", &s, "blockdev-del", "node-name=nope"]),
        1,
        "",
        "qmp: error: GenericError: Failed to find node with node-name='nope'\n",
    );
    // Exit 2: validation against the live schema, nothing sent.
    check(
        &qmp(&[
            "-s",
            &s,
            "blockdev-add",
            "driver=null-co",
            "node-name=n2",
            "nmae=1",
        ]),
        2,
        "",
        "qmp: unknown argument 'nmae' for blockdev-add (did you mean 'node-name'?)\n",
    );
    check(
        &qmp(&["-s", &s, "blockdev-add", "driver=nul-co", "node-name=n2"]),
        2,
        "",
        "qmp: invalid value 'nul-co' for argument 'driver' of blockdev-add (did you mean 'null-co'?)\n",
    );
    check(
        &qmp(&[
            "-s",
            &s,
            "blockdev-add",
            "driver=null-co",
            "node-name=n2",
            "size=big",
        ]),
        2,
        "",
        "qmp: argument 'size' of blockdev-add must be an integer, not a string\n",
    );
    check(
        &qmp(&[
            "-s",
            &s,
            "blockdev-create",
            "job-id=j1",
            "options.driver=file",
            "options.fielname=x",
            "options.size=1",
        ]),
        2,
        "",
        "qmp: unknown argument 'options.fielname' for blockdev-create (did you mean 'options.filename'?)\n",
    );
    check(
        &qmp(&["-s", &s, "blockdev-del"]),
        2,
        "",
        "qmp: missing argument 'node-name' for blockdev-del\n",
    );
    check(
        &qmp(&["-s", &s, "query-verison"]),
        2,
        "",
        "qmp: unknown command 'query-verison' (did you mean 'query-version'?)\n",
    );
    check(
        &qmp(&["-s", &s, "blockdev-add", "driver"]),
        2,
        "",
        "qmp: argument 'driver' is not key=value (use key=value, key:=<json>, or one JSON object)\n",
    );
    check(
        &qmp(&["-s", &s, "blockdev-add", "a:=[1,"]),
        2,
        "",
        "qmp: the value of 'a' is not valid JSON: EOF while parsing a value at line 1 column 3\n",
    );
    // --no-validate: QEMU judges.
    check(
        &qmp(&[
            "-s",
            &s,
            "--no-validate",
            "blockdev-add",
            "driver=null-co",
            "node-name=n2",
            "nmae=1",
        ]),
        1,
        "",
        "qmp: error: GenericError: Parameter 'nmae' is unexpected\n",
    );
    // All of that left exactly the nodes added on purpose.
    let o = qmp(&["-s", &s, "--compact", "query-named-block-nodes"]);
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&out(&o)).unwrap();
    let mut names: Vec<&str> = nodes
        .iter()
        .map(|n| n["node-name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["n0", "n1"]);
}

#[test]
fn usage_errors_exit_2() {
    let o = qmp(&["query-status"]);
    check(
        &o,
        2,
        "",
        "qmp: no target: give --socket PATH, --tcp HOST:PORT, --spawn qsd|system or --qga PATH\n",
    );
    check(
        &qmp(&["-s", "/x", "--tcp", "127.0.0.1:1", "query-status"]),
        2,
        "",
        "qmp: give only one of --socket, --tcp, --spawn and --qga\n",
    );
    check(
        &qmp(&["-s", "/x", "--connect-timeout=-1", "query-status"]),
        2,
        "",
        "qmp: --connect-timeout must be a non-negative number of seconds\n",
    );
    check(
        &qmp(&[
            "-s",
            "/x",
            "--policy",
            "/nonexistent.toml",
            "--profile",
            "read-only",
            "query-status",
        ]),
        2,
        "",
        "qmp: give either --policy or --profile, not both\n",
    );
    let o = qmp(&["--bogus"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err(&o).starts_with("error: unexpected argument '--bogus' found"),
        "{}",
        err(&o)
    );
    let o = qmp(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(out(&o).contains(
        "Exit codes:\n  0  success\n  1  QEMU answered with an error (its class and description are printed)\n  2  usage error"
    ));
    assert!(out(&o).contains(
        "  4  denied by the policy (--policy/--profile); the rule is named and nothing is sent\n"
    ));
}

#[test]
fn guest_agent_commands_without_a_success_reply_do_not_hang() {
    // guest-shutdown answers only if it fails: the agent closing (the guest powering off)
    // without a word is success, and so is silence for the grace (2 s).
    let (_fake, g) = serve_fake(Script::qga().on(
        "guest-shutdown",
        qmp_testkit::fake::Response::none().then(qmp_testkit::fake::Action::Close),
    ));
    check(&qmp(&["--qga", &g, "guest-shutdown"]), 0, "null\n", "");
    let (_fake, g) =
        serve_fake(Script::qga().on("guest-suspend-ram", qmp_testkit::fake::Response::none()));
    let start = Instant::now();
    check(
        &qmp(&["--qga", &g, "-H", "guest-suspend-ram"]),
        0,
        "OK (no error came back; it answers only when it fails)\n",
        "",
    );
    assert!(start.elapsed() >= Duration::from_secs(2));
}

#[test]
fn connection_failures_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let m = missing.display().to_string();
    check(
        &qmp(&["-s", &m, "query-status"]),
        3,
        "",
        &format!("qmp: cannot connect to {m}: No such file or directory (os error 2)\n"),
    );
    // A guest agent that never answers the sync.
    let (_fake_ga, g) =
        serve_fake(Script::qga().on("guest-sync-delimited", qmp_testkit::fake::Response::none()));
    check(
        &qmp(&["--qga", &g, "--greeting-timeout", "0.3", "guest-ping"]),
        3,
        "",
        "qmp: the guest agent accepted the connection but did not answer guest-sync-delimited within 0.3 s: is the agent running, and is no other client attached?\n",
    );
    // Options after the command name are arguments: said clearly.
    check(
        &qmp(&["--qga", &g, "guest-ping", "--compact"]),
        2,
        "",
        "qmp: '--compact' looks like an option: options go before the command name (qmp [OPTIONS] COMMAND [ARGS]...)\n",
    );
    // A QMP monitor taken for a guest agent: said at once, not after the timeout.
    let (_fake_qmp, q) = serve_fake(Script::new());
    let start = Instant::now();
    check(
        &qmp(&["--qga", &q, "--greeting-timeout", "10", "guest-ping"]),
        3,
        "",
        "qmp: this is a QMP monitor, not a guest agent: connect to it with -s/--socket\n",
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    // A monitor that accepts but never greets (the fake, scripted).
    let (_fake, f) = serve_fake(Script::new().no_greeting());
    let start = Instant::now();
    check(
        &qmp(&["-s", &f, "--greeting-timeout", "0.3", "query-status"]),
        3,
        "",
        "qmp: the monitor accepted the connection but is not greeting: is another client attached, or is it a guest agent (--qga)? (no greeting within 0.3 s)\n",
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn second_client_on_real_qemu_is_told_why() {
    let Some(q) = qsd() else { return };
    let s = sock(&q);
    // Hold the monitor: read the greeting and stay connected.
    let holder = UnixStream::connect(q.socket_path()).unwrap();
    let mut line = String::new();
    BufReader::new(&holder).read_line(&mut line).unwrap();
    assert!(line.starts_with("{\"QMP\""));
    check(
        &qmp(&["-s", &s, "--greeting-timeout", "0.5", "query-version"]),
        3,
        "",
        "qmp: the monitor accepted the connection but is not greeting: is another client attached, or is it a guest agent (--qga)? (no greeting within 0.5 s)\n",
    );
    drop(holder);
}

/// Writes `text` to `path`, a policy file, and returns the path as text.
fn policy_file(path: &std::path::Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

#[test]
fn policy_denials_exit_4_and_send_nothing() {
    let Some(q) = qsd() else { return };
    let s = sock(&q);
    check(
        &qmp(&[
            "-s",
            &s,
            "--profile",
            "read-only",
            "blockdev-add",
            "driver=null-co",
            "node-name=p0",
        ]),
        4,
        "",
        "qmp: blockdev-add denied by default deny: no rule allows it (profile read-only); nothing was sent\n",
    );
    check(
        &qmp(&[
            "-s",
            &s,
            "--profile",
            "read-only",
            "--compact",
            "query-jobs",
        ]),
        0,
        "[]\n",
        "",
    );
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let p = policy_file(
        &policy,
        "profile = \"read-only\"\n[commands.blockdev-add]\nmode = \"allow\"\nargs = [ { path = \"/driver\", allow = [\"null-co\"] } ]\n[commands.\"query-named-*\"]\nmode = \"deny\"\n",
    );
    check(
        &qmp(&[
            "-s",
            &s,
            "--policy",
            &p,
            "blockdev-add",
            "driver=file",
            "node-name=p1",
            "filename=/dev/null",
        ]),
        4,
        "",
        "qmp: blockdev-add denied by rule commands.\"blockdev-add\": argument /driver = \"file\" is not allowed (allowed: null-co); nothing was sent\n",
    );
    check(
        &qmp(&[
            "-s",
            &s,
            "--policy",
            &p,
            "blockdev-add",
            "driver=null-co",
            "node-name=p2",
        ]),
        0,
        "{}\n",
        "",
    );
    check(
        &qmp(&["-s", &s, "--policy", &p, "query-named-block-nodes"]),
        4,
        "",
        "qmp: query-named-block-nodes denied by rule commands.\"query-named-*\": the rule denies this command; nothing was sent\n",
    );
    // A value typed as `007` is sent as the string "007" where the schema wants a string,
    // and the policy sees it so (it used to see the number 7 first and deny).
    let p7 = policy_file(
        &dir.path().join("007.toml"),
        "[commands.blockdev-add]\nmode = \"allow\"\nargs = [ { path = \"/node-name\", allow = [\"007\"] } ]\n",
    );
    for (node, code, stderr) in [
        (
            "007",
            1,
            "qmp: error: GenericError: Invalid node-name: '007'\n",
        ),
        (
            "7",
            4,
            "qmp: blockdev-add denied by rule commands.\"blockdev-add\": argument /node-name = \"7\" is not allowed (allowed: 007); nothing was sent\n",
        ),
    ] {
        let node = format!("node-name={node}");
        let o = qmp(&[
            "-s",
            &s,
            "--policy",
            &p7,
            "blockdev-add",
            "driver=null-co",
            &node,
        ]);
        check(&o, code, "", stderr);
    }
    // Only p2 was added: the denied commands were never sent.
    let o = qmp(&["-s", &s, "--compact", "query-named-block-nodes"]);
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["node-name"], "p2");
    // A policy file that does not parse is a usage error.
    std::fs::write(&policy, "profile = \"bogus\"\n").unwrap();
    let o = qmp(&["-s", &s, "--policy", &p, "query-jobs"]);
    check(
        &o,
        2,
        "",
        &format!(
            "qmp: policy {p}: line 1, column 11: key `profile`: unknown variant `bogus`, \
             expected one of `none`, `read-only`, `vm-control`, `unrestricted`\n"
        ),
    );
}

/// Runs `qmp` with `args` (an `events` follower) while toggling the VM's run state through the
/// monitor at `tcp` (cont, stop) until it has exited; checks that it exited 0 with nothing on
/// standard error and returns what it printed.
fn follow_while_toggling(tcp: &str, args: &[&str]) -> String {
    let follower = Command::new(QMP)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let pid = follower.id();
    let waiter = std::thread::spawn(move || follower.wait_with_output().unwrap());
    while !waiter.is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "qmp events {pid} did not finish"
        );
        check(&qmp(&["--tcp", tcp, "cont"]), 0, "{}\n", "");
        check(&qmp(&["--tcp", tcp, "stop"]), 0, "{}\n", "");
    }
    let o = waiter.join().unwrap();
    assert_eq!((o.status.code(), err(&o).as_str()), (Some(0), ""));
    out(&o)
}

#[test]
fn events_follow_filter_count_timeout() {
    let Some(vm) = Launch::system().tcp().spawn() else {
        return;
    };
    let s = sock(&vm);
    let tcp = vm.tcp_addr().unwrap().to_string();
    // Keep toggling the run state through the second monitor until the follower has seen
    // two STOP events (it may subscribe after the first toggles).
    let text = follow_while_toggling(
        &tcp,
        &[
            "-s",
            &s,
            "events",
            "--filter",
            "ST?P",
            "--filter",
            "NOPE_*",
            "--count",
            "2",
            "--timeout",
            "20",
        ],
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["event"], "STOP");
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["event", "timestamp"]);
        assert!(
            l.starts_with("{\"event\":\"STOP\",\"timestamp\":{\"seconds\":"),
            "{l}"
        );
    }
    // --timeout before --count events: exit 5; without --count: exit 0.
    check(
        &qmp(&[
            "-s",
            &s,
            "events",
            "--filter",
            "NOPE",
            "--count",
            "1",
            "--timeout",
            "0.2",
        ]),
        5,
        "",
        "qmp: timed out: 0 of 1 events arrived\n",
    );
    check(
        &qmp(&["-s", &s, "events", "--filter", "NOPE", "--timeout", "0.2"]),
        0,
        "",
        "",
    );
    // A timeout too long to represent is no timeout (it used to panic).
    check(
        &qmp(&["-s", &s, "events", "--count", "0", "--timeout", "1e19"]),
        0,
        "",
        "",
    );
    // Coloured events are still one per line.
    let text = follow_while_toggling(
        &tcp,
        &[
            "-s",
            &s,
            "--color",
            "always",
            "events",
            "--filter",
            "STOP",
            "--count",
            "1",
            "--timeout",
            "20",
        ],
    );
    assert_eq!(text.lines().count(), 1, "{text:?}");
    assert!(
        text.starts_with("{\x1b[1;34m\"event\"\x1b[0m:\x1b[32m\"STOP\"\x1b[0m,"),
        "{text:?}"
    );
}

#[test]
fn events_stream_a_job_with_data() {
    let Some(q) = Launch::storage_daemon().tcp().spawn() else {
        return;
    };
    let s = sock(&q);
    let tcp = q.tcp_addr().unwrap().to_string();
    let child = Command::new(QMP)
        .args([
            "-s",
            &s,
            "events",
            "--filter",
            "JOB_*",
            "--count",
            "10",
            "--timeout",
            "20",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    let mut n = 0;
    let start = Instant::now();
    // One job per round, each with its own id, until the follower has ten events. It may
    // have subscribed while a job was under way, so its first lines can be the end of one job
    // (at most four of its five events); the five lines from the first `created` on must be
    // one later job's whole life cycle.
    let mut jobs = Vec::new();
    while !waiter.is_finished() {
        assert!(start.elapsed() < Duration::from_secs(20));
        let file = q.dir().join(format!("d{n}.raw"));
        let id = format!("j{n}");
        let o = qmp(&[
            "--tcp",
            &tcp,
            "blockdev-create",
            &format!("job-id={id}"),
            "options.driver=file",
            &format!("options.filename={}", file.display()),
            "options.size=1024",
        ]);
        check(&o, 0, "{}\n", "");
        jobs.push(id);
        n += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = waiter.join().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let events: Vec<(String, String)> = out(&o)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["event"], "JOB_STATUS_CHANGE");
            let field = |k: &str| v["data"][k].as_str().unwrap().to_owned();
            (field("id"), field("status"))
        })
        .collect();
    assert_eq!(events.len(), 10);
    let start = events.iter().position(|(_, s)| s == "created").unwrap();
    assert!(start <= 4, "{events:?}");
    let id = &events[start].0;
    assert!(jobs.contains(id), "{id} is not one of {jobs:?}");
    let life: Vec<(String, String)> = ["created", "running", "waiting", "pending", "concluded"]
        .iter()
        .map(|s| (id.clone(), (*s).to_owned()))
        .collect();
    assert_eq!(events[start..start + 5], life[..], "{events:?}");
}

const QUERY_VERSION_SCHEMA: &str = "\
command query-version
  arguments: none
  returns:
    qemu: object
      major: int
      minor: int
      micro: int
    package: str
";

const JOB_STATUS_CHANGE_SCHEMA: &str = "\
event JOB_STATUS_CHANGE
  data:
    id: str
    status: enum (undefined | created | running | paused | ready | standby | waiting | pending | aborting | concluded | null)
";

const QUERY_JOBS_SCHEMA: &str = "\
command query-jobs
  arguments: none
  returns: array of object
    id: str
    type: enum (commit | stream | mirror | backup | create | amend | snapshot-load | snapshot-save | snapshot-delete)
    status: enum (undefined | created | running | paused | ready | standby | waiting | pending | aborting | concluded | null)
    current-progress: int
    total-progress: int
    error: str (optional)
";

#[test]
fn schema_renders_real_introspection() {
    let Some(q) = qsd() else { return };
    let s = sock(&q);
    check(
        &qmp(&["-s", &s, "schema", "query-version"]),
        0,
        QUERY_VERSION_SCHEMA,
        "",
    );
    check(
        &qmp(&["-s", &s, "schema", "JOB_STATUS_CHANGE"]),
        0,
        JOB_STATUS_CHANGE_SCHEMA,
        "",
    );
    check(
        &qmp(&["-s", &s, "schema", "query-jobs"]),
        0,
        QUERY_JOBS_SCHEMA,
        "",
    );
    check(
        &qmp(&["-s", &s, "schema", "job-*"]),
        0,
        "commands (6):\n  job-cancel\n  job-complete\n  job-dismiss\n  job-finalize\n  job-pause\n  job-resume\nevents (0):\n",
        "",
    );
    // A union with cases: blockdev-add names its tag and each case's members.
    let o = qmp(&["-s", &s, "schema", "blockdev-add"]);
    assert_eq!(o.status.code(), Some(0));
    let text = out(&o);
    assert!(
        text.starts_with("command blockdev-add\n  arguments:\n    driver: enum (blkdebug | "),
        "{text}"
    );
    assert!(
        text.contains("    when driver is null-aio | null-co:\n      size: int (optional)\n      latency-ns: int (optional)\n      read-zeroes: bool (optional)\n"),
        "{text}"
    );
    assert!(text.ends_with("  returns: none\n"), "{text}");
    let o = qmp(&["-s", &s, "schema"]);
    assert!(
        out(&o).starts_with("commands (76):\n  block-commit\n"),
        "{}",
        out(&o)
    );
    check(
        &qmp(&["-s", &s, "schema", "query-verison"]),
        2,
        "",
        "qmp: no command or event named 'query-verison' (did you mean 'query-version'?)\n",
    );
}

#[test]
fn spawn_and_tcp_targets() {
    if !Launch::storage_daemon().available() || !Launch::system().available() {
        return;
    }
    let o = qmp(&["--spawn", "qsd", "-H", "query-jobs"]);
    check(&o, 0, "no jobs\n", "");
    let o = qmp(&["--spawn", "system", "-H", "query-status"]);
    check(&o, 0, "VM is paused (prelaunch)\n", "");
    // Out of band: query-yank allows it; query-status does not, and QEMU says so.
    check(
        &qmp(&["--spawn", "system", "--oob", "query-yank"]),
        0,
        "[\n  {\n    \"type\": \"chardev\",\n    \"id\": \"m0\"\n  }\n]\n",
        "",
    );
    check(
        &qmp(&["--spawn", "system", "--oob", "query-status"]),
        1,
        "",
        "qmp: error: GenericError: The command query-status does not support OOB\n",
    );
    check(
        &qmp(&["--spawn", "system", "query-status"]),
        0,
        "{\n  \"status\": \"prelaunch\",\n  \"running\": false\n}\n",
        "",
    );
    let Some(q) = Launch::storage_daemon().tcp().spawn() else {
        return;
    };
    let tcp = q.tcp_addr().unwrap().to_string();
    check(
        &qmp(&["--tcp", &tcp, "--compact", "query-jobs"]),
        0,
        "[]\n",
        "",
    );
    drop(q);
    let o = qmp(&["--tcp", &tcp, "query-jobs"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        err(&o).starts_with(&format!("qmp: cannot connect to {tcp}: Connection refused")),
        "{}",
        err(&o)
    );
}

#[test]
fn guest_agent() {
    let Some(ga) = Launch::guest_agent().spawn() else {
        return;
    };
    let p = sock(&ga);
    check(&qmp(&["--qga", &p, "guest-ping"]), 0, "{}\n", "");
    check(&qmp(&["--qga", &p, "-H", "guest-ping"]), 0, "OK\n", "");
    // An agent that cannot sync is named at once, with the likely cause.
    let Some(blocked) = Launch::guest_agent()
        .arg("--block-rpcs=guest-sync-delimited")
        .spawn()
    else {
        return;
    };
    check(
        &qmp(&["--qga", &sock(&blocked), "guest-ping"]),
        3,
        "",
        "qmp: the guest agent refused guest-sync-delimited (Command guest-sync-delimited has been disabled: the command is not allowed): is it blocked (--block-rpcs) or left out of --allow-rpcs?\n",
    );
    // The agent has no out-of-band execution: a usage error, nothing sent.
    check(
        &qmp(&["--qga", &p, "--oob", "guest-ping"]),
        2,
        "",
        "qmp: guest-ping: the guest agent protocol has no exec-oob\n",
    );
    let o = qmp(&["--qga", &p, "--compact", "guest-info"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(out(&o).starts_with("{\"version\":\""), "{}", out(&o));
    // Not on the agent's allow-list.
    check(
        &qmp(&["--qga", &p, "guest-get-users"]),
        1,
        "",
        "qmp: error: CommandNotFound: Command guest-get-users has been disabled: the command is not allowed\n",
    );
    // The shell on the agent, fed from a pipe.
    let mut child = Command::new(QMP)
        .args(["--qga", &p, "--compact", "shell", "--no-history-file"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(
                b"guest-ping
hmp info status
",
            )
            .unwrap();
    }
    let o = child.wait_with_output().unwrap();
    check(
        &o,
        0,
        "Connected to the guest agent. Type 'help' for help, Ctrl-D to leave.\n{}\n\
         error: this program has no HMP (no human-monitor-command)\n",
        "",
    );
    check(
        &qmp(&["--qga", &p, "schema"]),
        2,
        "",
        "qmp: the guest agent has no introspection; try guest-info\n",
    );
}

#[test]
fn run_state_summaries_on_a_vm() {
    let Some(vm) = Launch::system().spawn() else {
        return;
    };
    let s = sock(&vm);
    check(
        &qmp(&["-s", &s, "-H", "query-status"]),
        0,
        "VM is paused (prelaunch)\n",
        "",
    );
    check(
        &qmp(&["-s", &s, "--profile", "vm-control", "-H", "cont"]),
        0,
        "OK\n",
        "",
    );
    check(
        &qmp(&["-s", &s, "-H", "query-status"]),
        0,
        "VM is running\n",
        "",
    );
    check(
        &qmp(&["-s", &s, "--profile", "vm-control", "stop"]),
        0,
        "{}\n",
        "",
    );
    check(
        &qmp(&["-s", &s, "--compact", "query-status"]),
        0,
        "{\"status\":\"paused\",\"running\":false}\n",
        "",
    );
    check(
        &qmp(&["-s", &s, "--profile", "vm-control", "system_wakeup"]),
        4,
        "",
        "qmp: system_wakeup denied by default deny: no rule allows it (profile vm-control); nothing was sent\n",
    );
}

#[test]
fn quit_ends_qemu() {
    let Some(mut q) = qsd() else { return };
    check(&qmp(&["-s", &sock(&q), "quit"]), 0, "{}\n", "");
    assert!(q.wait_exit(Duration::from_secs(5)));
}

/// Lines of the demo with what varies between machines and runs masked.
fn normalise_demo(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.contains("greeted us") {
                "   <greeting>".to_owned()
            } else if l.starts_with("   negotiated: [oob]; the schema lists") {
                "   negotiated: [oob]; <counts>".to_owned()
            } else if l.starts_with("   node demo-null: driver null-co, ") {
                "   node demo-null: driver null-co, <file>".to_owned()
            } else if l.starts_with("Tour finished in ") {
                l.split(" in ").next().unwrap().to_owned() + " in <time>"
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const DEMO_BODY: &str = "
1. Connect: the greeting and the version
   <greeting>
   negotiated: [oob]; <counts>

2. Add a block node
   > blockdev-add driver=null-co node-name=demo-null size=67108864
   OK
   > query-named-block-nodes
   node demo-null: driver null-co, <file>

3. Create an image with a job; its events stream live
   (demo.raw in DIR)
   > blockdev-create job-id=demo-create options.driver=file options.filename=demo.raw options.size=1048576
   event JOB_STATUS_CHANGE created
   event JOB_STATUS_CHANGE running
   event JOB_STATUS_CHANGE waiting
   event JOB_STATUS_CHANGE pending
   event JOB_STATUS_CHANGE concluded
   progress [####################] 1/1 (100%)
   > job-dismiss id=demo-create
   OK (job dismissed)

4. Errors, shown readably
   > blockdev-add driver=null-co node-name=demo-null
   QEMU says: error: GenericError: Duplicate nodes with node-name='demo-null'
   > blockdev-add driver=null-co nmae=demo-2
   caught before sending: unknown argument 'nmae' for blockdev-add (did you mean 'node-name'?)

5. A policy denial (--profile read-only)
   > qmp --profile read-only ... blockdev-del node-name=demo-null
   blockdev-del denied by default deny: no rule allows it (profile read-only); nothing was sent
   while query-named-block-nodes is allowed by the read-only profile

6. A clean quit
   > quit
   OK; the connection closed
";

#[test]
fn demo_on_real_qemu_under_ten_seconds() {
    if !Launch::storage_daemon().available() {
        return;
    }
    let start = Instant::now();
    let o = qmp(&["demo"]);
    let took = start.elapsed();
    assert_eq!((o.status.code(), err(&o).as_str()), (Some(0), ""));
    let expected = format!(
        "qmp demo: a guided tour on a real qemu-storage-daemon, started for this tour in a temp dir.\n{}   qemu-storage-daemon exited\n\nTour finished in <time>",
        DEMO_BODY.replace("DIR", "the daemon's temp dir")
    );
    assert_eq!(normalise_demo(&out(&o)), expected);
    assert!(!out(&o).contains("FAKE"));
    // The issue asks for a tour in under 10 s; the time is printed, and a hang fails.
    println!("the demo took {took:?}");
    assert!(took < Duration::from_secs(10), "the demo took {took:?}");
}

#[test]
fn demo_on_the_fake_says_so() {
    let o = qmp(&["demo", "--fake"]);
    assert_eq!((o.status.code(), err(&o).as_str()), (Some(0), ""));
    let text = out(&o);
    assert!(
        text.contains(
            "   the FAKE QEMU 10.0.2 (qmp-testkit) greeted us, offering capabilities: [oob]\n"
        ),
        "{text}"
    );
    let expected = format!(
        "qmp demo: NOTE: --fake was given, so this tour talks to the testkit's FAKE QEMU (scripted replies), NOT a real QEMU.\n{}   the fake QEMU closed the connection\n\nTour finished in <time>",
        DEMO_BODY.replace("DIR", "a scratch dir")
    );
    assert_eq!(normalise_demo(&text), expected);
    assert!(text.ends_with(" s (against the FAKE QEMU).\n"), "{text}");
    // A temporary directory with a space in its path changes nothing.
    let tmp = tempfile::tempdir().unwrap();
    let spaced = tmp.path().join("a b");
    std::fs::create_dir(&spaced).unwrap();
    let o = Command::new(QMP)
        .args(["demo", "--fake"])
        .env("TMPDIR", &spaced)
        .output()
        .unwrap();
    assert_eq!((o.status.code(), err(&o).as_str()), (Some(0), ""));
    assert_eq!(normalise_demo(&out(&o)), expected);
}

#[test]
fn demo_falls_back_to_the_fake_only_without_qemu_storage_daemon() {
    // QMP_QEMU_DIR points the launcher at one directory: empty, there is no QEMU to use.
    let empty = tempfile::tempdir().unwrap();
    let o = Command::new(QMP)
        .arg("demo")
        .env("QMP_QEMU_DIR", empty.path())
        .output()
        .unwrap();
    assert_eq!((o.status.code(), err(&o).as_str()), (Some(0), ""));
    let expected = format!(
        "qmp demo: NOTE: qemu-storage-daemon is not installed, so this tour talks to the testkit's FAKE QEMU (scripted replies), NOT a real QEMU.\n{}   the fake QEMU closed the connection\n\nTour finished in <time>",
        DEMO_BODY.replace("DIR", "a scratch dir")
    );
    assert_eq!(normalise_demo(&out(&o)), expected);
    let o = Command::new(QMP)
        .args(["--spawn", "qsd", "query-version"])
        .env("QMP_QEMU_DIR", empty.path())
        .output()
        .unwrap();
    assert_eq!(
        (o.status.code(), out(&o).as_str(), err(&o)),
        (
            Some(3),
            "",
            format!(
                "qmp: --spawn qsd: qemu-storage-daemon is not installed (no executable in \
                 QMP_QEMU_DIR={})\n",
                empty.path().display()
            )
        )
    );
    // With the real program in that directory, the tour is on it.
    let Some(real) = Launch::storage_daemon().program_path() else {
        assert!(!Launch::storage_daemon().available());
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(real, dir.path().join("qemu-storage-daemon")).unwrap();
    let o = Command::new(QMP)
        .arg("demo")
        .env("QMP_QEMU_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!((o.status.code(), err(&o).as_str()), (Some(0), ""));
    assert!(
        out(&o).starts_with("qmp demo: a guided tour on a real qemu-storage-daemon"),
        "{}",
        out(&o)
    );
}

#[test]
fn faults_from_the_fake_are_reported_not_hung() {
    use qmp_testkit::fake::{Action, Response};
    let script = Script::new()
        .on("query-qmp-schema", Response::ok("[]"))
        .on("query-status", Response::none())
        .on("stop", Response::actions(vec![Action::Close]));
    let (_fake, f) = serve_fake(script);
    // No reply within --command-timeout: exit 3, and the outcome is said to be unknown.
    let start = Instant::now();
    let o = qmp(&[
        "-s",
        &f,
        "--no-validate",
        "--command-timeout",
        "0.3",
        "query-status",
    ]);
    check(
        &o,
        3,
        "",
        "qmp: query-status: timed out (sent, but no reply came)\n",
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    // The peer closes instead of answering: exit 3.
    let o = qmp(&["-s", &f, "--no-validate", "stop"]);
    check(
        &o,
        3,
        "",
        "qmp: stop: the peer closed the connection (sent, but no reply came)\n",
    );
    // Following events when the connection closes before --count: exit 3. The fake answers
    // the negotiation, waits (the follower subscribes meanwhile), sends one event, hangs up.
    let script = Script::new().on(
        "qmp_capabilities",
        Response::actions(vec![
            Action::Return("{}".into()),
            Action::Delay(Duration::from_millis(300)),
            Action::Event {
                name: "STOP".into(),
                data: None,
            },
            Action::Close,
        ]),
    );
    let (_fake, f) = serve_fake(script);
    // Without --count, following until QEMU goes away is the normal end: exit 0.
    for (count, code, stderr) in [
        (
            Some("3"),
            3,
            "qmp: the connection closed after 1 of 3 events\n",
        ),
        (None, 0, ""),
    ] {
        let mut args = vec!["-s", &f, "events", "--timeout", "10"];
        args.extend(count.map(|n| ["--count", n]).into_iter().flatten());
        let o = qmp(&args);
        let text = out(&o);
        assert_eq!(
            (o.status.code(), err(&o).as_str(), text.lines().count()),
            (Some(code), stderr, 1),
            "{text}"
        );
        assert!(
            text.starts_with("{\"event\":\"STOP\",\"timestamp\":{\"seconds\":"),
            "{text}"
        );
    }
}

#[test]
fn shell_reads_piped_commands() {
    let Some(q) = qsd() else { return };
    let o = qmp_with_input(
        &["-s", &sock(&q), "shell", "--no-history-file"],
        "query-jobs\nblockdev-add driver=null-co nmae=1\nblockdev-add driver=null-co node-name=x0\nbogus-command\n\"unterminated\n",
    );
    let text = out(&o);
    let (banner, rest) = text.split_once('\n').unwrap();
    assert!(banner.starts_with("Connected to QEMU 10."), "{banner}");
    assert_eq!(
        rest,
        "[]\nerror: unknown argument 'nmae' for blockdev-add (did you mean 'node-name'?)\n{}\n\
         error: unknown command 'bogus-command'\nerror: unterminated quote\n"
    );
    assert_eq!((o.status.code(), err(&o).as_str()), (Some(0), ""));
}

/// The children of process `pid`, from `/proc/*/stat`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let child: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
            // "pid (comm) state ppid ...": the command name may hold spaces and parentheses.
            let ppid: u32 = stat[stat.rfind(')')? + 2..]
                .split(' ')
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}

/// Whether process `pid` has ended (gone, or a zombie waiting for a parent that is not us).
fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat[stat.rfind(')').unwrap() + 2..].starts_with('Z'),
        Err(_) => true,
    }
}

#[test]
fn a_signal_stops_qmp_and_the_qemu_it_spawned() {
    if !Launch::storage_daemon().available() {
        return;
    }
    let events = ["--spawn", "qsd", "events"].as_slice();
    // The shell reading a pipe (kept open): SIGINT ends it, as it does a one-shot command.
    let shell = ["--spawn", "qsd", "shell", "--no-history-file"].as_slice();
    // How qmp is started: directly; with SIGHUP at its default action whatever this test
    // inherited (python3 resets it, then execs qmp); or under nohup, which ignores it.
    const HUP_DEFAULT: &str = "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])";
    let direct: &[&str] = &[];
    let hup_default: &[&str] = &["python3", "-c", HUP_DEFAULT];
    let nohup: &[&str] = &["nohup"];
    // With SIGINT ignored, as a script's background job has it.
    const INT_IGNORED: &str = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])";
    let int_ignored: &[&str] = &["python3", "-c", INT_IGNORED];
    // SIGKILL leaves qmp no chance to clean up: the kernel still kills the daemon (its
    // parent-death signal), but its directory stays behind. Under nohup, SIGHUP changes
    // nothing and the SIGTERM after it ends qmp; so does SIGINT when it was ignored.
    for (launcher, args, signals, code, message) in [
        (
            direct,
            events,
            &["-TERM"][..],
            Some(143),
            "qmp: stopped by signal 15\n",
        ),
        (direct, events, &["-INT"], Some(130), "qmp: interrupted\n"),
        (direct, events, &["-KILL"], None, ""),
        (
            hup_default,
            events,
            &["-HUP"],
            Some(129),
            "qmp: stopped by signal 1\n",
        ),
        (
            nohup,
            events,
            &["-HUP", "-TERM"],
            Some(143),
            "qmp: stopped by signal 15\n",
        ),
        (
            int_ignored,
            events,
            &["-INT", "-TERM"],
            Some(143),
            "qmp: stopped by signal 15\n",
        ),
        (direct, shell, &["-INT"], Some(130), "qmp: interrupted\n"),
        (
            hup_default,
            shell,
            &["-HUP"],
            Some(129),
            "qmp: stopped by signal 1\n",
        ),
    ] {
        let (program, first) = match launcher {
            [] => (QMP, &[][..]),
            [program, rest @ ..] => (*program, rest),
        };
        let mut command = Command::new(program);
        if !launcher.is_empty() {
            command.args(first).arg(QMP);
        }
        let mut child = command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let pid = child.id();
        let start = Instant::now();
        // The daemon, once it runs its own program (before exec the child still shows qmp's
        // command line).
        let (daemon, socket) = loop {
            let found = children_of(pid).into_iter().find_map(|d| {
                let cmdline = std::fs::read_to_string(format!("/proc/{d}/cmdline")).ok()?;
                let socket = cmdline
                    .split(['\0', ','])
                    .find_map(|a| a.strip_prefix("path="))?
                    .to_owned();
                Some((d, socket))
            });
            if let Some(found) = found {
                break found;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no daemon started"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let dir = std::path::Path::new(&socket).parent().unwrap().to_owned();
        assert!(dir.exists());
        // Signalled while it follows events (or still connecting): qmp alone gets it.
        for signal in signals {
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                !is_gone(pid),
                "{launcher:?} {args:?}: qmp ended before {signal}"
            );
            let kill = Command::new("kill")
                .args([*signal, &pid.to_string()])
                .status()
                .unwrap();
            assert!(kill.success());
        }
        let o = child.wait_with_output().unwrap();
        drop(stdin);
        // The shell may have greeted by then, and starts its message on a new line.
        let stdout = out(&o);
        let stdout = stdout
            .strip_prefix("Connected to QEMU ")
            .map_or(stdout.as_str(), |_| "");
        assert_eq!(
            (o.status.code(), stdout, err(&o).trim_start_matches('\n')),
            (code, "", message),
            "{launcher:?} {args:?} {signals:?}"
        );
        let start = Instant::now();
        while !is_gone(daemon) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "qemu-storage-daemon {daemon} outlived qmp"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if code.is_some() {
            assert!(!dir.exists(), "{} was left behind", dir.display());
        } else {
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

#[test]
fn events_sent_with_the_negotiation_reply_are_followed_too() {
    use qmp_testkit::fake::Response;
    // QEMU may send events before its qmp_capabilities reply and in the same read.
    let script = Script::new().on(
        "qmp_capabilities",
        Response::ok("{}")
            .event_before("BEFORE", Some(r#"{"n": 1}"#))
            .event_after("AFTER", None),
    );
    let (_fake, f) = serve_fake(script);
    let o = qmp(&["-s", &f, "events", "--count", "2", "--timeout", "5"]);
    assert_eq!((o.status.code(), err(&o).as_str()), (Some(0), ""));
    let events: Vec<(String, String)> = out(&o)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["event"].to_string(), v["data"].to_string())
        })
        .collect();
    assert_eq!(
        events,
        [
            (r#""BEFORE""#.to_owned(), r#"{"n":1}"#.to_owned()),
            (r#""AFTER""#.to_owned(), "null".to_owned())
        ]
    );
}

/// Runs `qmp` with `args`, feeding it `input` on standard input.
fn qmp_with_input(args: &[&str], input: impl AsRef<[u8]>) -> Output {
    use std::io::Write;
    let mut child = Command::new(QMP)
        .args(args)
        .env_remove("NO_COLOR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qmp");
    let written = child.stdin.take().unwrap().write_all(input.as_ref());
    // The program may end before reading it all (or at all): that is for the caller to check.
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    child.wait_with_output().unwrap()
}

/// The commands the fake received, in order.
fn request_names(fake: &FakeQemu) -> Vec<String> {
    fake.requests().into_iter().filter_map(|r| r.name).collect()
}

#[test]
fn the_shell_asks_hmp_for_its_commands_only_if_the_policy_allows_hmp() {
    use qmp_testkit::fake::Response;
    // Two commands, `query-status` and `human-monitor-command`, both without arguments.
    let schema = r#"[{"name": "query-status", "meta-type": "command", "arg-type": "0", "ret-type": "0"},
        {"name": "human-monitor-command", "meta-type": "command", "arg-type": "0", "ret-type": "0"},
        {"name": "0", "meta-type": "object", "members": []}]"#;
    for (profile, hmp) in [(None, true), (Some("read-only"), false)] {
        let script = Script::new()
            .record(true)
            .on("query-qmp-schema", Response::ok(schema))
            .on(
                "human-monitor-command",
                Response::ok("\"info  -- show\\r\\n\""),
            )
            .on("query-status", Response::ok("{\"status\": \"running\"}"));
        let (fake, f) = serve_fake(script);
        let mut args = vec!["-s", f.as_str()];
        args.extend(profile.iter().flat_map(|p| ["--profile", p]));
        args.extend(["shell", "--no-history-file"]);
        let o = qmp_with_input(&args, "query-status\n");
        assert_eq!(
            (o.status.code(), err(&o).as_str()),
            (Some(0), ""),
            "{profile:?}"
        );
        let mut expect = vec!["qmp_capabilities", "query-qmp-schema"];
        if hmp {
            expect.push("human-monitor-command");
        }
        expect.push("query-status");
        assert_eq!(request_names(&fake), expect, "{profile:?}");
    }
}

#[test]
fn a_server_without_query_qmp_schema_says_so_and_no_validate_does_without() {
    use qmp_testkit::fake::Response;
    let script = Script::new().on("query-status", Response::ok("{\"status\": \"running\"}"));
    let (_fake, f) = serve_fake(script);
    let hint = "qmp: error: CommandNotFound: query-qmp-schema, which checks commands and \
                arguments, failed: The command query-qmp-schema has not been found \
                (--no-validate skips the check)\n";
    check(&qmp(&["-s", &f, "query-status"]), 1, "", hint);
    // Where no command is checked, there is nothing to skip.
    check(
        &qmp(&["-s", &f, "--no-validate", "schema"]),
        1,
        "",
        "qmp: error: CommandNotFound: The command query-qmp-schema has not been found\n",
    );
    let o = qmp_with_input(&["-s", &f, "shell", "--no-history-file"], "query-status\n");
    check(&o, 1, "", hint);
    let o = qmp(&["-s", &f, "--no-validate", "--compact", "query-status"]);
    check(&o, 0, "{\"status\":\"running\"}\n", "");
    let o = qmp_with_input(
        &["-s", &f, "--no-validate", "shell", "--no-history-file"],
        "query-status\n",
    );
    let text = out(&o);
    assert_eq!((o.status.code(), err(&o).as_str()), (Some(0), ""), "{text}");
    assert_eq!(
        text,
        "Connected to QEMU 10.0.2 (qmp-testkit). Type 'help' for help, Ctrl-D to leave.\n\
         {\n  \"status\": \"running\"\n}\n"
    );
}

#[test]
fn a_piped_shell_fails_when_its_input_cannot_be_read_or_the_connection_closes() {
    use qmp_testkit::fake::{Action, Response};
    let script = Script::new()
        .record(true)
        .on("query-status", Response::ok("{}"))
        .on("stop", Response::actions(vec![Action::Close]));
    let (fake, f) = serve_fake(script);
    let shell = [
        "-s",
        f.as_str(),
        "--no-validate",
        "shell",
        "--no-history-file",
    ];
    // Not UTF-8: the rest of the script is not run, and the exit code says so.
    let o = qmp_with_input(&shell, b"query-status\n\xff\nquery-status\n");
    assert_eq!(
        (o.status.code(), err(&o).as_str()),
        (
            Some(2),
            "qmp: cannot read the input: stream did not contain valid UTF-8\n"
        )
    );
    assert_eq!(
        request_names(&fake),
        ["qmp_capabilities", "query-qmp-schema", "query-status"]
    );
    // The connection closes under the script: exit 3.
    let o = qmp_with_input(&shell, "stop\nquery-status\n");
    assert_eq!(
        (o.status.code(), err(&o).as_str()),
        (Some(3), "qmp: the connection closed\n"),
        "{}",
        out(&o)
    );
}

#[test]
fn a_closed_stderr_changes_the_exit_code_of_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock").display().to_string();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let status = Command::new(QMP)
        .args(["-s", &missing, "query-status"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(writer)
        .status()
        .unwrap();
    // Cannot connect: 3, not a panic's 101.
    assert_eq!(status.code(), Some(3));
}
