//! One-line human summaries of common replies.

use serde_json::Value;

/// A human summary of `command`'s return value, when there is a useful one.
pub(crate) fn summarise(command: &str, ret: &Value) -> Option<String> {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_i64).unwrap_or(0);
    match command {
        "query-status" => {
            let status = s(ret, "status");
            if ret.get("running").and_then(Value::as_bool) == Some(true) {
                Some(if status == "running" {
                    "VM is running".to_owned()
                } else {
                    format!("VM is running ({status})")
                })
            } else {
                Some(format!("VM is paused ({status})"))
            }
        }
        "query-version" => {
            let q = ret.get("qemu")?;
            let pkg = s(ret, "package");
            let pkg = if pkg.is_empty() || pkg == "?" {
                String::new()
            } else {
                format!(" ({pkg})")
            };
            Some(format!(
                "QEMU {}.{}.{}{pkg}",
                n(q, "major"),
                n(q, "minor"),
                n(q, "micro")
            ))
        }
        "query-name" => Some(match ret.get("name").and_then(Value::as_str) {
            Some(name) => format!("VM name: {name}"),
            None => "the VM has no name".to_owned(),
        }),
        "query-jobs" | "query-block-jobs" => {
            let jobs = ret.as_array()?;
            if jobs.is_empty() {
                return Some("no jobs".to_owned());
            }
            let lines: Vec<String> = jobs
                .iter()
                .map(|j| {
                    let id = j
                        .get("id")
                        .or_else(|| j.get("device"))
                        .and_then(Value::as_str)
                        .unwrap_or("?");
                    let (cur, tot) = if command == "query-jobs" {
                        (n(j, "current-progress"), n(j, "total-progress"))
                    } else {
                        (n(j, "offset"), n(j, "len"))
                    };
                    format!(
                        "job {id} ({}): {}, {}",
                        s(j, "type"),
                        s(j, "status"),
                        progress(cur, tot)
                    )
                })
                .collect();
            Some(lines.join("\n"))
        }
        "query-named-block-nodes" => {
            let nodes = ret.as_array()?;
            if nodes.is_empty() {
                return Some("no block nodes".to_owned());
            }
            let lines: Vec<String> = nodes
                .iter()
                .map(|b| {
                    let ro = if b.get("ro").and_then(Value::as_bool) == Some(true) {
                        ", read-only"
                    } else {
                        ""
                    };
                    format!(
                        "node {}: driver {}, {}{ro}",
                        s(b, "node-name"),
                        s(b, "drv"),
                        s(b, "file")
                    )
                })
                .collect();
            Some(lines.join("\n"))
        }
        "query-commands" => Some(format!("{} commands", ret.as_array()?.len())),
        "query-kvm" => Some(format!(
            "KVM is {}{}",
            if ret.get("present").and_then(Value::as_bool) == Some(true) {
                "present"
            } else {
                "absent"
            },
            if ret.get("enabled").and_then(Value::as_bool) == Some(true) {
                " and enabled"
            } else {
                ", not enabled"
            }
        )),
        _ if ret.as_object().is_some_and(serde_json::Map::is_empty) => Some("OK".to_owned()),
        // Guest-agent commands that answer only when they fail.
        "guest-shutdown" | "guest-suspend-disk" | "guest-suspend-ram" | "guest-suspend-hybrid"
            if ret.is_null() =>
        {
            Some("OK (no error came back; it answers only when it fails)".to_owned())
        }
        _ => None,
    }
}

/// `current/total (P%)`.
pub(crate) fn progress(cur: i64, tot: i64) -> String {
    let pct = if tot > 0 { cur * 100 / tot } else { 0 };
    format!("{cur}/{tot} ({pct}%)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(cmd: &str, json: &str) -> Option<String> {
        summarise(cmd, &serde_json::from_str(json).unwrap())
    }

    #[test]
    fn summaries() {
        assert_eq!(
            sum("query-status", r#"{"status":"prelaunch","running":false}"#).unwrap(),
            "VM is paused (prelaunch)"
        );
        assert_eq!(
            sum("query-status", r#"{"status":"running","running":true}"#).unwrap(),
            "VM is running"
        );
        assert_eq!(
            sum(
                "query-version",
                r#"{"qemu":{"micro":2,"minor":0,"major":10},"package":""}"#
            )
            .unwrap(),
            "QEMU 10.0.2"
        );
        assert_eq!(
            sum("query-jobs", r#"[{"id":"j","type":"create","status":"running","current-progress":1,"total-progress":4}]"#).unwrap(),
            "job j (create): running, 1/4 (25%)"
        );
        assert_eq!(sum("stop", "{}").unwrap(), "OK");
        assert_eq!(sum("query-foo", "[1]"), None);
    }
}
