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

/// `key=value` pairs of one output line, in order.
fn fields(line: &str) -> Vec<(&str, &str)> {
    line.split(' ')
        .map(|kv| kv.split_once('=').unwrap_or_else(|| panic!("{line}")))
        .collect()
}

/// The keys of `line` and its values parsed as numbers.
fn numbers(line: &str) -> (Vec<&str>, Vec<f64>) {
    fields(line)
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                v.parse::<f64>().unwrap_or_else(|e| panic!("{line}: {e}")),
            )
        })
        .unzip()
}

#[test]
fn every_client_measures_a_real_qemu_storage_daemon() {
    let Some(qsd) = qmp_testkit::launch::Launch::storage_daemon().spawn() else {
        return;
    };
    let socket = qsd.socket_path().to_str().unwrap().to_owned();
    let runs: &[(&[&str], &str)] = &[
        (
            &["--raw", "--mode", "seq"],
            "client=raw mode=seq n=300 concurrency=8 in_flight=1 threads=1",
        ),
        (
            &["--raw", "--raw-wait", "poll", "--mode", "conc"],
            "client=raw-poll mode=conc n=300 concurrency=8 in_flight=8 threads=1",
        ),
        (
            &["--runtime", "tokio", "--mode", "seq"],
            "client=tokio mode=seq n=300 concurrency=8 in_flight=1 threads=2",
        ),
        (
            &["--runtime", "smol", "--mode", "conc", "--concurrency", "4"],
            "client=smol mode=conc n=300 concurrency=4 in_flight=4 threads=1",
        ),
        (
            &[
                "--runtime",
                "async-std",
                "--driver",
                "spawn",
                "--mode",
                "conc",
            ],
            "client=async-std mode=conc n=300 concurrency=8 in_flight=8 threads=1",
        ),
    ];
    for (extra, header) in runs {
        let mut args = vec!["--socket", &socket, "--n", "300"];
        args.extend_from_slice(extra);
        let out = qmp_load(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert_eq!(
            lines[0],
            format!("{header} server=socket repeat=1"),
            "{args:?}"
        );
        let (keys, run) = numbers(lines[1]);
        assert_eq!(
            keys,
            [
                "run",
                "secs",
                "switches_per_op",
                "cpu_us_per_op",
                "ops_per_sec"
            ]
        );
        assert_eq!(run[0], 1.0);
        assert!(run[1] > 0.0 && run[3] > 0.0 && run[4] > 0.0, "{text}");
        // One run: the best and the medians are that run's figures.
        let (keys, best) = numbers(lines[2]);
        assert_eq!(keys, ["cpu_us_per_op_min", "ops_per_sec_max"]);
        assert_eq!(best, [run[3], run[4]]);
        assert_eq!(numbers(lines[3]), (vec!["switches_per_op"], vec![run[2]]));
        assert_eq!(numbers(lines[4]), (vec!["cpu_us_per_op"], vec![run[3]]));
        assert_eq!(numbers(lines[5]), (vec!["ops_per_sec"], vec![run[4]]));
    }
}
