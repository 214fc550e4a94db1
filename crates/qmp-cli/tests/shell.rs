//! The interactive shell driven through a pseudo-terminal (python3's `pty`, via
//! `tests/pty_driver.py`) against real QEMU: completion, history, events arriving while a
//! line is being edited, HMP, policy, errors.

use std::process::Command;

use qmp_testkit::launch::Launch;
use serde_json::{Value, json};

const QMP: &str = env!("CARGO_BIN_EXE_qmp");
const DRIVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pty_driver.py");

/// What the driver reports about one run.
#[derive(serde::Deserialize)]
struct Run {
    /// The raw terminal output.
    transcript: String,
    /// The program's child processes, where the script noted them.
    children: Vec<Child>,
    /// Whether the terminal was in canonical mode with echo after the program ended.
    cooked: bool,
}

#[derive(serde::Deserialize)]
struct Child {
    pid: u32,
    cmdline: Vec<String>,
}

/// Runs the driver, expecting the program to exit with `exit`. Panics with the transcript
/// when an expectation fails. `None` (with SKIP printed) without python3.
fn drive_to_exit(argv: &[&str], steps: Value, exit: i32) -> Option<Run> {
    let has_pty = Command::new("python3")
        .args(["-c", "import pty"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_pty {
        // These tests run real QEMU: where QEMU is required, so is their driver.
        assert_ne!(
            std::env::var_os("QMP_REQUIRE_QEMU").as_deref(),
            Some(std::ffi::OsStr::new("1")),
            "QMP_REQUIRE_QEMU=1 but python3 with its pty module is not available"
        );
        println!("SKIP: python3 is not available to drive a pseudo-terminal");
        return None;
    }
    let script = json!({ "argv": argv, "steps": steps, "exit": exit });
    let o = Command::new("python3")
        .arg(DRIVER)
        .arg(script.to_string())
        .env("HOME", "/nonexistent")
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let report: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    assert!(
        o.status.success(),
        "{}\nreport: {report}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(serde_json::from_value(report).expect("the driver's report"))
}

/// [`drive_to_exit`] for a program that exits with 0; returns the transcript.
fn drive(argv: &[&str], steps: Value) -> Option<String> {
    drive_to_exit(argv, steps, 0).map(|r| r.transcript)
}

#[test]
fn completion_history_and_live_events() {
    let Some(q) = Launch::storage_daemon().tcp().spawn() else {
        return;
    };
    let sock = q.socket_path().display().to_string();
    let tcp = q.tcp_addr().unwrap().to_string();
    let hist = q.dir().join("history");
    let hist_s = hist.display().to_string();
    let file = q.dir().join("d.raw").display().to_string();
    let steps = json!([
        {"expect": "(qmp) "},
        // A command name completes from query-commands/the schema.
        {"send": "query-ver\t"},
        {"expect": "\r\x1b[K(qmp) query-version"},
        {"send": "\r"},
        {"expect": "\"major\": 10"},
        {"expect": "# QEMU 10."},
        {"expect": "(qmp) "},
        // Argument names complete from the schema, with `=` appended; the tag selects the
        // union case whose members are offered next.
        {"send": "blockdev-add dri\t"},
        {"expect": "(qmp) blockdev-add driver="},
        // Enum values complete too.
        {"send": "null-c\t"},
        {"expect": "(qmp) blockdev-add driver=null-co "},
        {"send": "read-z\t"},
        {"expect": "(qmp) blockdev-add driver=null-co read-zeroes="},
        {"send": "true node-n\t"},
        {"expect": "read-zeroes=true node-name="},
        {"send": "s0 nmae=1\r"},
        {"expect": "error: unknown argument 'nmae' for blockdev-add (did you mean 'node-name'?)\r\n"},
        {"expect": "(qmp) "},
        // History: the failed line, edited.
        {"send": "\x1b[A"},
        {"expect": "(qmp) blockdev-add driver=null-co read-zeroes=true node-name=s0 nmae=1"},
        {"send": "\x7f\x7f\x7f\x7f\x7f\x7f\x7f\r"},
        {"expect": "{}\r\n"},
        {"expect": "(qmp) "},
        {"send": "blockdev-add driver=null-co node-name=s0\r"},
        {"expect": "error: GenericError: Duplicate nodes with node-name='s0'\r\n"},
        {"expect": "(qmp) "},
        // Events arrive while a line is half typed: printed above the prompt, which is
        // redrawn with the partial line intact.
        {"send": "query-"},
        {"expect": "\x1b[6Cquery-"},
        {"run": [QMP, "--tcp", tcp, "blockdev-create", "job-id=j1", "options.driver=file",
                 format!("options.filename={file}"), "options.size=1024"]},
        {"expect": "event JOB_STATUS_CHANGE {\"status\":\"concluded\",\"id\":\"j1\"}\r\n\r\x1b[K(qmp) query-"},
        // Two tabs list the candidates.
        {"send": "\t\t"},
        {"expect": "query-jobs"},
        {"send": "\x15help\r"},
        {"expect": "  exit, Ctrl-D"},
        {"send": "schema query-jo\t"},
        {"expect": "schema query-jobs"},
        {"send": "\r"},
        {"expect": "command query-jobs\r\n  arguments: none\r\n  returns: array of object\r\n"},
        {"send": "hmp\r"},
        {"expect": "error: this program has no HMP (no human-monitor-command)\r\n"},
        // A JSON object typed as it is, quotes and spaces included.
        {"send": "blockdev-add {\"driver\": \"null-co\", \"node-name\": \"j 0\"}\r"},
        {"expect": "error: GenericError: Invalid node-name: 'j 0'\r\n"},
        {"expect": "(qmp) "},
        // QEMU goes away while the shell waits for input: it says so, and Enter leaves.
        {"run": [QMP, "--tcp", tcp, "quit"]},
        {"expect": "(the connection closed)"},
        {"send": "\r"},
        // An error: a script can tell.
        {"expect": "qmp: the connection closed"},
    ]);
    let Some(t) = drive_to_exit(
        &[
            QMP,
            "--color",
            "never",
            "-s",
            &sock,
            "shell",
            "--history",
            &hist_s,
        ],
        steps,
        3,
    )
    .map(|r| r.transcript) else {
        return;
    };
    // Each event was printed on its own line, followed by the redrawn prompt and input.
    for status in ["created", "running", "waiting", "pending", "concluded"] {
        let want = format!(
            "\r\x1b[Kevent JOB_STATUS_CHANGE {{\"status\":\"{status}\",\"id\":\"j1\"}}\r\n\r\x1b[K(qmp) query-"
        );
        assert!(t.contains(&want), "{want:?} not in {t:?}");
    }
    // The history file holds the lines entered, oldest first.
    let saved = std::fs::read_to_string(&hist).unwrap();
    assert_eq!(
        saved,
        "#V2\nquery-version\nblockdev-add driver=null-co read-zeroes=true node-name=s0 nmae=1\n\
         blockdev-add driver=null-co read-zeroes=true node-name=s0\n\
         blockdev-add driver=null-co node-name=s0\nhelp\nschema query-jobs\nhmp\n\
         blockdev-add {\"driver\": \"null-co\", \"node-name\": \"j 0\"}\n"
    );
}

#[test]
fn hmp_policy_and_quit_on_a_vm() {
    let Some(mut vm) = Launch::system().spawn() else {
        return;
    };
    let sock = vm.socket_path().display().to_string();
    // vm-control, plus HMP and quit by explicit rules (profiles never allow HMP).
    let policy = vm.dir().join("policy.toml");
    std::fs::write(
        &policy,
        "profile = \"vm-control\"\n[commands.human-monitor-command]\nmode = \"allow\"\n\
         [commands.quit]\nmode = \"allow\"\n",
    )
    .unwrap();
    let policy_s = policy.display().to_string();
    let steps = json!([
        {"expect": "(qmp) "},
        {"send": "query-status\r"},
        {"expect": "\"status\": \"prelaunch\""},
        {"expect": "# VM is paused (prelaunch)\r\n"},
        // One HMP command, then HMP mode with its own completion.
        {"send": "hmp info status\r"},
        {"expect": "VM status: paused (prelaunch)\r\n"},
        {"send": "hmp\r"},
        {"expect": "(hmp) "},
        {"send": "info status\r"},
        {"expect": "VM status: paused (prelaunch)\r\n"},
        {"expect": "(hmp) "},
        {"send": "sys\t"},
        {"expect": "(hmp) system_"},
        {"send": "\x15qmp\r"},
        {"expect": "QMP mode"},
        {"expect": "(qmp) "},
        // The policy allows cont (vm-control) but not device_add.
        {"send": "cont\r"},
        {"expect": "event RESUME\r\n"},
        {"send": "stop\r"},
        {"expect": "event STOP\r\n"},
        {"send": "device_add driver=usb-tablet id=t0\r"},
        {"expect": "device_add denied by default deny: no rule allows it (profile vm-control); nothing was sent\r\n"},
        {"send": "quit\r"},
        {"expect": "QEMU quit; the connection is closed\r\n"},
    ]);
    let Some(t) = drive(
        &[
            QMP,
            "--color",
            "never",
            "--policy",
            &policy_s,
            "-s",
            &sock,
            "shell",
            "--no-history-file",
        ],
        steps,
    ) else {
        return;
    };
    assert!(t.starts_with("Connected to QEMU 10."), "{t:?}");
    assert!(vm.wait_exit(std::time::Duration::from_secs(5)));
}

/// The shell on a throwaway qemu-system-x86_64.
const SPAWNED_SHELL: [&str; 7] = [
    QMP,
    "--color",
    "never",
    "--spawn",
    "system",
    "shell",
    "--no-history-file",
];

/// A FIFO in a new temp dir (kept while the dir lives), and its path.
fn fifo() -> (tempfile::TempDir, String) {
    let scratch = tempfile::tempdir().unwrap();
    let fifo = scratch.path().join("dump.fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let path = fifo.display().to_string();
    (scratch, path)
}

#[test]
fn sigterm_while_a_line_runs_ends_the_shell_with_143() {
    if !Launch::system().available() {
        return;
    }
    let (_scratch, fifo_s) = fifo();
    let steps = json!([
        {"expect": "(qmp) "},
        {"send": format!("dump-guest-memory paging=false protocol=file:{fifo_s}\r")},
        {"children": true},
        {"wchan": "wait_for_partner"},
        // Killing QEMU breaks the running line too; the signal still decides how qmp ends.
        {"kill": "TERM"},
        {"expect": "qmp: stopped by signal 15\r\n"},
    ]);
    let Some(run) = drive_to_exit(&SPAWNED_SHELL, steps, 143) else {
        return;
    };
    assert!(
        !run.transcript.contains("(the connection closed)"),
        "{:?}",
        run.transcript
    );
    let [qemu] = &run.children[..] else {
        panic!("one child expected: {:?}", run.children.len())
    };
    assert!(!std::path::Path::new(&format!("/proc/{}", qemu.pid)).exists());
}

#[test]
fn ctrl_c_cancels_the_running_line_and_sigterm_cleans_up_a_spawned_qemu() {
    if !Launch::system().available() {
        return;
    }
    let (_scratch, fifo_s) = fifo();
    let steps = json!([
        {"expect": "(qmp) "},
        {"children": true},
        // QEMU blocks opening the FIFO for dump-guest-memory until someone reads it, so the
        // line runs until Ctrl-C, which reaches `qmp` alone (QEMU has its own process group).
        {"send": format!("dump-guest-memory paging=false protocol=file:{fifo_s}\r")},
        {"wchan": "wait_for_partner"},
        {"send": "\x03"},
        {"expect": "(interrupted)\r\n"},
        {"expect": "(qmp) "},
        // Reading the FIFO lets QEMU finish the dump; its late reply is dropped, and the next
        // command gets its own.
        {"run": ["cat", fifo_s]},
        {"send": "query-status\r"},
        {"expect": "# VM is paused (prelaunch)\r\n"},
        {"expect": "(qmp) "},
        // A SIGINT at the prompt (a late Ctrl-C, or from outside) leaves the shell alone.
        {"kill": "INT"},
        {"sleep": 0.2},
        {"send": "query-name\r"},
        {"expect": "{}\r\n"},
        {"expect": "(qmp) "},
        {"kill": "TERM"},
        {"expect": "qmp: stopped by signal 15\r\n"},
    ]);
    let Some(run) = drive_to_exit(&SPAWNED_SHELL, steps, 143) else {
        return;
    };
    let t = &run.transcript;
    assert!(t.contains("^C(interrupted)\r\n"), "{t:?}");
    // Between the interruption and the status, only QEMU's event about the dump: its reply
    // (`{}`) was dropped.
    let after = &t[t.find("(interrupted)").unwrap()..t.find("prelaunch").unwrap()];
    assert!(after.contains("event DUMP_COMPLETED "), "{after:?}");
    assert!(!after.contains("{}\r\n"), "{after:?}");
    assert!(run.cooked, "the terminal was left in raw mode");
    let [qemu] = &run.children[..] else {
        panic!("one child expected: {:?}", run.children.len())
    };
    assert!(qemu.cmdline[0].ends_with("qemu-system-x86_64"));
    let socket = qemu
        .cmdline
        .iter()
        .flat_map(|a| a.split(','))
        .find_map(|a| a.strip_prefix("path="))
        .unwrap();
    let dir = std::path::Path::new(socket).parent().unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{}", qemu.pid)).exists(),
        "qemu-system-x86_64 {} outlived qmp",
        qemu.pid
    );
    assert!(!dir.exists(), "{} was left behind", dir.display());
}
