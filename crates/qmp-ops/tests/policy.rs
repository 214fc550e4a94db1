//! The allow-list: profiles, explicit and wildcard rules, argument rules, files and errors.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{FakeExec, ManualClock, RecordingHooks, RecordingSleep, args};
use futures_executor::block_on;
use qmp_ops::{
    ArgRule, ErrorKind, Jitter, Ops, Policy, PolicyError, Profile, RetryPolicy, Rule, RuleRef,
};
use qmp_proto::ErrorClass;

fn allowed(p: &Policy, name: &str) -> bool {
    p.check(name, None).is_ok()
}

#[test]
fn read_only_allows_queries_and_nothing_that_changes_state() {
    let p = Policy::read_only();
    for ok in [
        "query-status",
        "query-version",
        "query-chardev",
        "qom-list",
        "qom-get",
    ] {
        assert!(allowed(&p, ok), "{ok}");
    }
    for no in [
        "quit",
        "stop",
        "cont",
        "device_add",
        "x-query-jit",
        "human-monitor-command",
        "queryx",
    ] {
        assert!(!allowed(&p, no), "{no}");
    }
    let d = p.check("quit", None).unwrap_err();
    assert_eq!(d.rule, RuleRef::Default);
    assert_eq!(
        d.to_string(),
        "quit denied by default deny: no rule allows it (profile read-only)"
    );
    let a = p.check("query-status", None).unwrap();
    assert_eq!(a.by, RuleRef::Profile(Profile::ReadOnly));
    assert!(a.rule.idempotent);
}

#[test]
fn vm_control_adds_run_state_commands_under_one_lock() {
    let p = Policy::vm_control();
    for ok in [
        "query-status",
        "stop",
        "cont",
        "system_powerdown",
        "system_reset",
    ] {
        assert!(allowed(&p, ok), "{ok}");
    }
    for no in ["quit", "device_add", "migrate", "human-monitor-command"] {
        assert!(!allowed(&p, no), "{no}");
    }
    let stop = p.check("stop", None).unwrap().rule;
    assert_eq!(stop.lock.as_deref(), Some("run-state"));
    assert!(stop.idempotent);
    let reset = p.check("system_reset", None).unwrap().rule;
    assert_eq!(reset.lock.as_deref(), Some("run-state"));
    assert!(!reset.idempotent);
}

#[test]
fn unrestricted_still_needs_an_explicit_rule_for_hmp() {
    let p = Policy::unrestricted_i_know_what_i_am_doing();
    assert!(allowed(&p, "quit"));
    assert!(allowed(&p, "blockdev-del"));
    // Run-state commands keep their lock group whatever profile allows them.
    let stop = p.check("stop", None).unwrap().rule;
    assert_eq!(stop.lock.as_deref(), Some("run-state"));
    let d = p.check("human-monitor-command", None).unwrap_err();
    assert_eq!(d.rule, RuleRef::Default);
    assert!(d.reason.contains("only a rule naming it exactly"), "{d}");
}

#[test]
fn only_an_exact_rule_allows_hmp_and_wildcards_never_do() {
    let wild = Policy::deny_all()
        .rule("*", Rule::allow())
        .rule("human-*", Rule::allow());
    assert!(allowed(&wild, "quit"));
    assert!(!allowed(&wild, "human-monitor-command"));
    let exact = wild.rule(
        "human-monitor-command",
        Rule::allow().arg(ArgRule::allow_only("/command-line", ["info *"])),
    );
    assert!(
        exact
            .check(
                "human-monitor-command",
                Some(&args(r#"{"command-line":"info status"}"#))
            )
            .is_ok()
    );
    let d = exact
        .check(
            "human-monitor-command",
            Some(&args(r#"{"command-line":"quit"}"#)),
        )
        .unwrap_err();
    assert_eq!(d.rule, RuleRef::Command("human-monitor-command".into()));
    assert_eq!(
        d.reason,
        "argument /command-line = \"quit\" is not allowed (allowed: info *)"
    );
}

#[test]
fn wildcard_deny_rules_do_apply_to_hmp() {
    let p = Policy::deny_all()
        .rule("human-monitor-command", Rule::allow())
        .rule("*", Rule::deny());
    // The exact rule wins over the wildcard.
    assert!(allowed(&p, "human-monitor-command"));
    let q = Policy::unrestricted_i_know_what_i_am_doing().rule("human-*", Rule::deny());
    assert_eq!(
        q.check("human-monitor-command", None).unwrap_err().rule,
        RuleRef::Command("human-*".into())
    );
}

#[test]
fn explicit_rules_override_the_profile_and_the_longest_pattern_wins() {
    let p = Policy::read_only()
        .rule("query-*", Rule::deny())
        .rule("query-status", Rule::allow())
        .rule("query-block*", Rule::allow().idempotent(true));
    assert!(allowed(&p, "query-status"));
    assert!(!allowed(&p, "query-version"));
    let a = p.check("query-block-jobs", None).unwrap();
    assert_eq!(a.by, RuleRef::Command("query-block*".into()));
    let d = p.check("query-version", None).unwrap_err();
    assert_eq!(
        d.to_string(),
        "query-version denied by rule commands.\"query-*\": the rule denies this command"
    );
}

fn device_add_policy() -> Policy {
    Policy::deny_all().rule(
        "device_add",
        Rule::allow()
            .arg(ArgRule::allow_only("/driver", ["usb-tablet", "virtio-*"]))
            .arg(ArgRule::deny_matching("id", ["evil*"]))
            .arg(ArgRule::deny_matching("/opts/hotplug", ["false"])),
    )
}

#[test]
fn argument_rules_allow_listed_values_and_deny_matches() {
    let p = device_add_policy();
    let check = |a: &str| p.check("device_add", Some(&args(a))).map(|_| ());
    assert_eq!(check(r#"{"driver":"usb-tablet","id":"t0"}"#), Ok(()));
    assert_eq!(check(r#"{"driver":"virtio-net-pci"}"#), Ok(()));
    let reason = |a: &str| check(a).unwrap_err().reason;
    assert_eq!(
        reason(r#"{"driver":"e1000"}"#),
        "argument /driver = \"e1000\" is not allowed (allowed: usb-tablet, virtio-*)"
    );
    assert_eq!(reason(r#"{"id":"x"}"#), "argument /driver is required");
    assert_eq!(
        reason(r#"{"driver":"usb-tablet","id":"evil-1"}"#),
        "argument id = \"evil-1\" matches denied pattern \"evil*\""
    );
    assert_eq!(
        reason(r#"{"driver":"usb-tablet","opts":{"hotplug":false}}"#),
        "argument /opts/hotplug = \"false\" matches denied pattern \"false\""
    );
    assert_eq!(
        p.check("device_add", None).unwrap_err().rule,
        RuleRef::Command("device_add".into())
    );
}

#[test]
fn a_star_in_the_value_does_not_defeat_a_wildcard() {
    let m = |pat: &str, text: &str| qmp_ops::Pattern::new(pat).matches(text);
    assert!(m("/etc/*", "/etc/*/../shadow"));
    assert!(m("a*", "a*b"));
    assert!(m("*", "*x"));
    assert!(m("a*c", "a**c"));
    assert!(m("a?c", "a*c"));
    assert!(!m("a*c", "a*b"));
    assert!(!m("a", "*"));
    // `?` is one character, not one byte.
    assert!(m("vm-?", "vm-é"));
    assert!(m("?", "€"));
    assert!(!m("?", "é€"));
    let p = device_add_policy();
    assert_eq!(
        p.check(
            "device_add",
            Some(&args(r#"{"driver":"usb-tablet","id":"evil*x"}"#))
        )
        .unwrap_err()
        .reason,
        "argument id = \"evil*x\" matches denied pattern \"evil*\""
    );
}

#[test]
fn a_name_no_qmp_command_has_is_denied_even_by_a_wildcard_or_the_unrestricted_profile() {
    let p = Policy::unrestricted_i_know_what_i_am_doing().rule("query-*", Rule::allow());
    for name in ["", "query-x\0a", "query-x\n", "query-\u{7f}x"] {
        let d = p.check(name, None).unwrap_err();
        assert_eq!(
            (d.rule, d.reason.as_str()),
            (
                RuleRef::Default,
                "not a QMP command name (empty, or with a control character)"
            ),
            "{name:?}"
        );
    }
    assert!(allowed(&p, "query-x"));
}

#[test]
fn a_denied_command_is_never_sent_and_the_hook_sees_the_rule() {
    let exec = FakeExec::new();
    let clock = ManualClock::new(Instant::now());
    let hooks = Arc::new(RecordingHooks::default());
    let ops = Ops::builder(
        Arc::clone(&exec),
        Policy::read_only(),
        RecordingSleep::new(clock.clone()),
    )
    .clock(clock)
    .shared_hooks(hooks.clone())
    .build();
    for name in ["quit", "stop"] {
        let e = block_on(ops.execute(name, None)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Denied);
        assert_eq!(e.denial().unwrap().command, name);
        assert_eq!(e.attempts(), 0);
    }
    assert_eq!(exec.count(), 0);
    assert_eq!(
        hooks.log(),
        [
            "denied quit denied by default deny: no rule allows it (profile read-only)",
            "outcome quit 0ns err Denied",
            "denied stop denied by default deny: no rule allows it (profile read-only)",
            "outcome stop 0ns err Denied",
        ]
    );
}

#[test]
fn building_over_an_unrestricted_policy_calls_the_hook() {
    let hooks = Arc::new(RecordingHooks::default());
    let clock = ManualClock::new(Instant::now());
    let _ops = Ops::builder(
        FakeExec::new(),
        Policy::unrestricted_i_know_what_i_am_doing(),
        RecordingSleep::new(clock),
    )
    .shared_hooks(hooks.clone())
    .build();
    assert_eq!(hooks.unrestricted.load(Ordering::SeqCst), 1);
}

const FULL_TOML: &str = r#"
profile = "vm-control"

[defaults]
timeout_ms = 5000
retry = { max_attempts = 4, base_ms = 50, cap_ms = 2000, deadline_ms = 10000, jitter = "equal" }

[commands."query-*"]
idempotent = true
cache_ttl_ms = 1000

[commands.device_add]
retry_classes = ["DeviceNotActive"]
lock = "hotplug"
retry = { max_attempts = 2 }
args = [
  { path = "/driver", allow = ["usb-tablet"] },
  { path = "/id", deny = ["evil*"] },
]

[commands.quit]
mode = "deny"
"#;

#[test]
fn a_full_toml_policy_loads() {
    let p = Policy::from_toml_str(FULL_TOML).unwrap();
    assert_eq!(p.profile(), Profile::VmControl);
    let q = p.check("query-status", None).unwrap();
    assert_eq!(q.by, RuleRef::Command("query-*".into()));
    assert_eq!(q.rule.cache_ttl, Some(Duration::from_secs(1)));
    assert_eq!(p.timeout_for(&q.rule), Some(Duration::from_secs(5)));
    let want_default = RetryPolicy::default()
        .max_attempts(4)
        .backoff(Duration::from_millis(50), Duration::from_secs(2))
        .deadline(Some(Duration::from_secs(10)))
        .jitter(Jitter::Equal);
    assert_eq!(p.retry_for(&q.rule), want_default);
    let d = p
        .check(
            "device_add",
            Some(&args(r#"{"driver":"usb-tablet","id":"a"}"#)),
        )
        .unwrap();
    assert_eq!(d.rule.lock.as_deref(), Some("hotplug"));
    assert_eq!(d.rule.retry_classes, vec![ErrorClass::DeviceNotActive]);
    assert_eq!(p.retry_for(&d.rule), want_default.max_attempts(2));
    assert_eq!(
        p.check("device_add", Some(&args(r#"{"driver":"e1000"}"#)))
            .unwrap_err()
            .to_string(),
        "device_add denied by rule commands.\"device_add\": argument /driver = \"e1000\" is not \
         allowed (allowed: usb-tablet)"
    );
    assert_eq!(
        p.check("quit", None).unwrap_err().rule,
        RuleRef::Command("quit".into())
    );
    assert!(p.check("stop", None).is_ok());
}

#[test]
fn the_same_policy_loads_from_json() {
    let json = r#"{
  "profile": "read-only",
  "commands": {
    "device_add": { "args": [ { "path": "/driver", "allow": ["usb-tablet"] } ] },
    "quit": { "mode": "deny" }
  }
}"#;
    let p = Policy::from_json_str(json).unwrap();
    assert_eq!(p.profile(), Profile::ReadOnly);
    assert!(
        p.check("device_add", Some(&args(r#"{"driver":"usb-tablet"}"#)))
            .is_ok()
    );
    assert_eq!(
        p.check("quit", None).unwrap_err().rule,
        RuleRef::Command("quit".into())
    );
}

fn toml_err(text: &str) -> PolicyError {
    Policy::from_toml_str(text).unwrap_err()
}

#[test]
fn toml_errors_name_the_line_and_the_key() {
    let e = toml_err("profile = \"read-only\"\n\n[commands.stop]\nmode = \"allow\"\nbogus = 1\n");
    assert_eq!(
        (e.line, e.key.as_deref()),
        (Some(5), Some("commands.stop.bogus"))
    );
    assert!(e.message.contains("unknown field `bogus`"), "{e}");

    let e = toml_err("[commands.stop]\nmode = \"maybe\"\n");
    assert_eq!(
        (e.line, e.key.as_deref()),
        (Some(2), Some("commands.stop.mode"))
    );
    assert!(e.message.contains("unknown variant `maybe`"), "{e}");

    let e = toml_err("[commands.stop]\nretry = { max_attempts = 0 }\n");
    assert_eq!(e.line, Some(2));
    assert_eq!(e.key.as_deref(), Some("commands.stop.retry.max_attempts"));
    assert!(e.message.contains("at least 1"), "{e}");

    let e = toml_err("profile = \"everything\"\n");
    assert_eq!((e.line, e.key.as_deref()), (Some(1), Some("profile")));

    let e = toml_err("profile = \"read-only\"\n[commands\n");
    assert_eq!(e.line, Some(2));

    let e = toml_err("[commands.device_add]\nargs = [ { path = \"/driver\", allow = \"x\" } ]\n");
    assert_eq!(e.line, Some(2));
    assert_eq!(e.key.as_deref(), Some("commands.device_add.args[0].allow"));
    assert_eq!(
        e.to_string(),
        format!(
            "line 2, column {}: key `commands.device_add.args[0].allow`: {}",
            e.column.unwrap(),
            e.message
        )
    );
}

#[test]
fn unrestricted_in_a_file_needs_the_acknowledgement() {
    let e = toml_err("profile = \"unrestricted\"\n");
    assert_eq!(e.key.as_deref(), Some("profile"));
    assert!(e.message.contains("i_know_what_i_am_doing = true"), "{e}");
    let p = Policy::from_toml_str("profile = \"unrestricted\"\ni_know_what_i_am_doing = true\n")
        .unwrap();
    assert!(p.is_unrestricted());
}

#[test]
fn json_errors_name_the_line_and_the_key() {
    let e = Policy::from_json_str("{\n  \"commands\": {\n    \"stop\": { \"mode\": 3 }\n  }\n}")
        .unwrap_err();
    assert_eq!(e.line, Some(3));
    assert_eq!(e.key.as_deref(), Some("commands.stop.mode"));
    let e = Policy::from_json_str("{\n  \"profile\": \"read-only\",\n  \"extra\": true\n}")
        .unwrap_err();
    assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("extra")));
    assert!(e.message.contains("unknown field `extra`"), "{e}");
    let e = Policy::from_json_str("{} x").unwrap_err();
    assert_eq!(e.line, Some(1));
}

#[test]
fn from_path_picks_the_format_from_the_extension() {
    let dir = std::env::temp_dir().join(format!("qmp-ops-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml_path = dir.join("p.toml");
    let json_path = dir.join("p.json");
    std::fs::write(&toml_path, "profile = \"read-only\"\n").unwrap();
    std::fs::write(&json_path, "{\"profile\": \"vm-control\"}").unwrap();
    assert_eq!(
        Policy::from_path(&toml_path).unwrap().profile(),
        Profile::ReadOnly
    );
    assert_eq!(
        Policy::from_path(&json_path).unwrap().profile(),
        Profile::VmControl
    );
    let missing = Policy::from_path(dir.join("nope.toml")).unwrap_err();
    assert!(missing.message.starts_with("cannot read "), "{missing}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_example_policy_file_loads_and_means_what_it_says() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policy.toml");
    let p = Policy::from_path(path).unwrap();
    assert_eq!(p.profile(), Profile::VmControl);
    let tablet = args(r#"{"driver":"usb-tablet","id":"t0"}"#);
    assert_eq!(
        p.check("device_add", Some(&tablet))
            .unwrap()
            .rule
            .lock
            .as_deref(),
        Some("hotplug")
    );
    let denied = |name: &str, a: Option<&str>| {
        let a = a.map(args);
        p.check(name, a.as_deref()).unwrap_err().to_string()
    };
    assert_eq!(
        denied("device_add", Some(r#"{"driver":"usb-tablet","id":"sys0"}"#)),
        r#"device_add denied by rule commands."device_add": argument /id = "sys0" matches denied pattern "sys*""#
    );
    assert_eq!(
        denied("device_add", Some(r#"{"driver":"e1000"}"#)),
        r#"device_add denied by rule commands."device_add": argument /driver = "e1000" is not allowed (allowed: usb-tablet)"#
    );
    let info = args(r#"{"command-line":"info status"}"#);
    assert!(p.check("human-monitor-command", Some(&info)).is_ok());
    assert_eq!(
        denied(
            "human-monitor-command",
            Some(r#"{"command-line":"system_reset"}"#)
        ),
        r#"human-monitor-command denied by rule commands."human-monitor-command": argument /command-line = "system_reset" is not allowed (allowed: info *)"#
    );
    // Denied by its own rule in the file, not only by the profile's default.
    assert_eq!(
        denied("quit", None),
        r#"quit denied by rule commands."quit": the rule denies this command"#
    );
    assert!(p.check("stop", None).is_ok());
    assert_eq!(
        p.check("query-status", None).unwrap().rule.cache_ttl,
        Some(Duration::from_secs(1))
    );
}
