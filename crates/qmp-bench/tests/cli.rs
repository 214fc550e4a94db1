//! `qmp-load`'s command line: usage errors, failures, and the output's shape.

use std::process::{Command, Output};

fn qmp_load(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qmp-load"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn values_that_would_be_changed_or_ignored_are_usage_errors() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--fake", "--concurrency", "0"],
            "--concurrency: at least 1",
        ),
        (&["--fake", "--repeat", "0"], "--repeat: at least 1"),
        (&["--fake", "--n", "0"], "--n: at least 1"),
        (
            &["--fake", "--max-in-flight", "0"],
            "--max-in-flight: at least 1",
        ),
        (
            &["--fake", "--max-in-flight", "65537"],
            "--max-in-flight: at most 65536",
        ),
        (&["--fake", "--threads", "0"], "--threads: at least 1"),
        (
            &["--fake", "--queue-limit", "0"],
            "--queue-limit: at least 1",
        ),
        (
            &["--fake", "--command-timeout", "0"],
            "--command-timeout: at least 1 second",
        ),
        (
            &["--fake", "--command-timeout", "-1"],
            "--command-timeout: \"-1\"",
        ),
        (
            &["--fake", "--runtime", "smol", "--threads", "2"],
            "--threads applies to --runtime tokio only",
        ),
        (
            &["--fake", "--raw", "--threads", "2"],
            "--threads applies to --runtime tokio only",
        ),
        (
            &["--fake", "--driver", "join"],
            "--driver applies to --runtime smol and async-std only",
        ),
        (
            &["--fake", "--raw", "--runtime", "smol"],
            "--runtime applies to the library clients",
        ),
        (
            &["--fake", "--raw", "--command-timeout", "5"],
            "--command-timeout applies to the library",
        ),
        (
            &["--fake", "--raw-wait", "poll"],
            "--raw-wait applies to --raw only",
        ),
        (
            &["--fake", "--raw-ids", "none"],
            "--raw-ids applies to --raw only",
        ),
        (
            &["--socket", "/x", "--queue-limit", "8"],
            "--queue-limit applies to --fake",
        ),
        (&["--socket", "/x", "--fake"], "exclude each other"),
        (
            &["--runtime", "gevent", "--fake"],
            "--runtime: \"gevent\" is not tokio",
        ),
        (
            &["--mode", "conc"],
            "--socket, --fake or --fake-in-process is required",
        ),
        (
            &[
                "--fake",
                "--mode",
                "conc",
                "--max-in-flight",
                "1",
                "--concurrency",
                "65538",
            ],
            "--concurrency: at most 65537",
        ),
        (&["--fake", "--n"], "--n needs a value"),
        (
            &["--fake", "--raw", "--mode", "conc", "--concurrency", "1025"],
            "--raw: at most 1024 in flight (it writes them all before reading)",
        ),
    ];
    for (args, expect) in cases {
        let out = qmp_load(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert!(err.starts_with("qmp-load: "), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn a_failed_run_is_one_line_and_exit_1() {
    for extra in [
        &["--raw"][..],
        &["--runtime", "tokio"],
        &["--runtime", "smol"],
    ] {
        let mut args = vec!["--socket", "/nonexistent/qmp.sock", "--n", "10"];
        args.extend_from_slice(extra);
        let out = qmp_load(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.starts_with("qmp-load: cannot connect to /nonexistent/qmp.sock"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn every_client_prints_the_effective_in_flight_and_ops_per_sec_last() {
    let runs: &[(&[&str], &str)] = &[
        (
            &[
                "--raw",
                "--mode",
                "conc",
                "--concurrency",
                "16",
                "--max-in-flight",
                "4",
            ],
            "in_flight=4 ",
        ),
        (
            &["--raw", "--mode", "seq", "--concurrency", "8"],
            "in_flight=1 ",
        ),
        (
            &[
                "--runtime",
                "tokio",
                "--threads",
                "1",
                "--mode",
                "conc",
                "--concurrency",
                "8",
            ],
            "in_flight=8 ",
        ),
        (
            &[
                "--runtime",
                "smol",
                "--driver",
                "join",
                "--mode",
                "conc",
                "--concurrency",
                "3",
            ],
            "in_flight=3 ",
        ),
        (
            &[
                "--runtime",
                "async-std",
                "--mode",
                "seq",
                "--command-timeout",
                "30",
            ],
            "in_flight=1 ",
        ),
    ];
    for (extra, in_flight) in runs {
        let mut args = vec!["--fake-in-process", "--n", "200", "--repeat", "2"];
        args.extend_from_slice(extra);
        let out = qmp_load(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains(in_flight), "{args:?}: {}", lines[0]);
        let last = lines.last().unwrap().strip_prefix("ops_per_sec=").unwrap();
        assert!(last.parse::<f64>().unwrap() > 0.0);
    }
}
