//! `qmp demo`: a guided tour on a throwaway qemu-storage-daemon, or on the testkit's fake
//! QEMU (said plainly) when none is installed.

use std::io::Write;
use std::time::{Duration, Instant};

use qmp_ops::Policy;
use qmp_testkit::fake::{FakeQemu, Response, Script};
use qmp_tokio::{Client, ErrorClass, EventItem};
use serde_json::{Map, Value};

use crate::conn::{SpawnKind, Target, Timeouts};
use crate::fail::Failure;
use crate::schema::Schema;
use crate::{Out, json};

const JOB: &str = "demo-create";
const JOB_EVENT: &str = "JOB_STATUS_CHANGE";

/// A small schema for the fake, enough to validate the tour's commands.
pub(crate) const FAKE_SCHEMA: &str = r#"[
 {"name":"blockdev-add","meta-type":"command","arg-type":"1","ret-type":"0"},
 {"name":"blockdev-del","meta-type":"command","arg-type":"3","ret-type":"0"},
 {"name":"blockdev-create","meta-type":"command","arg-type":"4","ret-type":"0"},
 {"name":"job-dismiss","meta-type":"command","arg-type":"6","ret-type":"0"},
 {"name":"query-named-block-nodes","meta-type":"command","arg-type":"0","ret-type":"[7]"},
 {"name":"query-jobs","meta-type":"command","arg-type":"0","ret-type":"[8]"},
 {"name":"quit","meta-type":"command","arg-type":"0","ret-type":"0"},
 {"name":"0","meta-type":"object","members":[]},
 {"name":"1","meta-type":"object","tag":"driver","members":[{"name":"driver","type":"2"},{"name":"node-name","type":"str","default":null}],"variants":[{"case":"null-co","type":"5"},{"case":"file","type":"9"}]},
 {"name":"2","meta-type":"enum","values":["file","null-co"]},
 {"name":"3","meta-type":"object","members":[{"name":"node-name","type":"str"}]},
 {"name":"4","meta-type":"object","members":[{"name":"job-id","type":"str"},{"name":"options","type":"1"}]},
 {"name":"5","meta-type":"object","members":[{"name":"size","type":"int","default":null}]},
 {"name":"6","meta-type":"object","members":[{"name":"id","type":"str"}]},
 {"name":"7","meta-type":"object","members":[{"name":"node-name","type":"str"}]},
 {"name":"8","meta-type":"object","members":[{"name":"id","type":"str"}]},
 {"name":"9","meta-type":"object","members":[{"name":"filename","type":"str"},{"name":"size","type":"int","default":null}]},
 {"name":"[7]","meta-type":"array","element-type":"7"},
 {"name":"[8]","meta-type":"array","element-type":"8"},
 {"name":"str","meta-type":"builtin","json-type":"string"},
 {"name":"int","meta-type":"builtin","json-type":"int"}
]"#;

fn fake_script() -> Script {
    let status = |s: &str| format!(r#"{{"status": "{s}", "id": "{JOB}"}}"#);
    let mut create = Response::ok("{}");
    for s in ["created", "running", "waiting", "pending", "concluded"] {
        create = create.event_after(JOB_EVENT, Some(&status(s)));
    }
    Script::new()
        .on("query-qmp-schema", Response::ok(FAKE_SCHEMA))
        .on_once("blockdev-add", Response::ok("{}"))
        .on(
            "blockdev-add",
            Response::error(
                ErrorClass::GenericError,
                "Duplicate nodes with node-name='demo-null'",
            ),
        )
        .on(
            "query-named-block-nodes",
            Response::ok(r#"[{"node-name": "demo-null", "drv": "null-co", "file": "null-co://", "ro": false}]"#),
        )
        .on("blockdev-create", create)
        .on(
            "query-jobs",
            Response::ok(format!(
                r#"[{{"current-progress": 1, "status": "concluded", "total-progress": 1, "type": "create", "id": "{JOB}"}}]"#
            )),
        )
        .on("job-dismiss", Response::ok("{}"))
}

struct Tour {
    client: Client,
    out: Out,
    schema: Schema,
    step: u32,
    /// Talking to a real QEMU (not the fake).
    real: bool,
}

impl Tour {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.out.style.colour {
            format!("{code}{text}{}", json::colour::RESET)
        } else {
            text.to_owned()
        }
    }

    fn heading(&mut self, text: &str) {
        self.step += 1;
        let line = format!("{}. {text}", self.step);
        outln!("\n{}", self.paint("\x1b[1m", &line));
    }

    fn say(&self, text: &str) {
        outln!("   {text}");
        let _ = std::io::stdout().flush();
    }

    fn command_line(&self, text: &str) {
        self.say(&self.paint(json::colour::KEY, &format!("> {text}")));
    }

    /// Runs `line` like the one-shot command would: parse, validate, send, summarise.
    async fn run(&self, line: &str) -> Result<Result<Value, Failure>, Failure> {
        self.command_line(line);
        let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        let (name, rest) = words
            .split_first()
            .ok_or_else(|| Failure::Usage("empty".into()))?;
        let (mut args, auto) = crate::args::parse(rest).map_err(Failure::Usage)?;
        if let Err(e) = self.schema.validate(name, &mut args, &auto) {
            return Ok(Err(Failure::Usage(e)));
        }
        Ok(match crate::send(&self.client, name, &args).await {
            Ok(raw) => Ok(serde_json::from_str(raw.get()).unwrap_or(Value::Null)),
            Err(Failure::Qmp(e)) => Err(Failure::Qmp(e)),
            Err(other) => return Err(other),
        })
    }

    fn show(&self, name: &str, v: &Value) {
        let text = crate::summary::summarise(name, v).unwrap_or_else(|| {
            json::format(
                &v.to_string(),
                json::Style {
                    compact: true,
                    colour: false,
                },
            )
        });
        for l in text.lines() {
            self.say(l);
        }
    }
}

/// Runs the tour.
pub(crate) fn run(rt: &tokio::runtime::Runtime, force_fake: bool, out: Out) -> Result<(), Failure> {
    let started = Instant::now();
    let real = !force_fake && qmp_testkit::launch::Launch::storage_daemon().is_installed();
    let timeouts = Timeouts {
        connect: Duration::from_secs(5),
        greeting: Duration::from_secs(5),
        command: Some(Duration::from_secs(10)),
    };
    let mut fake = None;
    let (session, dir_note) = if real {
        outln!(
            "qmp demo: a guided tour on a real qemu-storage-daemon, started for this tour in a temp dir."
        );
        let s = rt.block_on(crate::conn::open(&Target::Spawn(SpawnKind::Qsd), timeouts))?;
        (s, "the daemon's temp dir")
    } else {
        let why = if force_fake {
            "--fake was given"
        } else {
            "qemu-storage-daemon is not installed"
        };
        outln!(
            "qmp demo: NOTE: {why}, so this tour talks to the testkit's FAKE QEMU \
             (scripted replies), NOT a real QEMU."
        );
        let f = FakeQemu::unix(fake_script())
            .map_err(|e| Failure::Connection(format!("cannot start the fake QEMU: {e}")))?;
        let path = f
            .socket_path()
            .ok_or_else(|| Failure::Connection("the fake QEMU has no socket".into()))?
            .to_owned();
        fake = Some(f);
        let s = rt.block_on(crate::conn::open(&Target::Unix(path), timeouts))?;
        (s, "a scratch dir")
    };
    let dir = session
        .qemu
        .as_ref()
        .map(|q| q.dir().to_owned())
        .unwrap_or_else(std::env::temp_dir);
    let res = rt.block_on(async {
        let schema = crate::fetch_schema(&session.client).await?;
        let mut tour = Tour {
            client: session.client.clone(),
            out,
            schema,
            step: 0,
            real,
        };
        tour_steps(&mut tour, &dir, dir_note).await
    });
    let res = res.map(|()| {
        let exited = match session.qemu {
            Some(mut q) => q.wait_exit(Duration::from_secs(5)),
            None => true,
        };
        outln!(
            "   {}",
            if !real {
                "the fake QEMU closed the connection"
            } else if exited {
                "qemu-storage-daemon exited"
            } else {
                "qemu-storage-daemon did not exit in time (killed)"
            }
        );
    });
    drop(fake);
    res?;
    outln!(
        "\nTour finished in {:.1} s{}.",
        started.elapsed().as_secs_f64(),
        if real { "" } else { " (against the FAKE QEMU)" }
    );
    Ok(())
}

async fn tour_steps(tour: &mut Tour, dir: &std::path::Path, dir_note: &str) -> Result<(), Failure> {
    tour.heading("Connect: the greeting and the version");
    if let Some(g) = tour.client.greeting() {
        tour.say(&format!(
            "{}QEMU {} greeted us, offering capabilities: [{}]",
            if tour.real { "" } else { "the FAKE " },
            g.version,
            g.capabilities.join(", ")
        ));
    }
    tour.say(&format!(
        "negotiated: [{}]; the schema lists {} commands and {} events",
        tour.client.capabilities().join(", "),
        tour.schema.commands().len(),
        tour.schema.events().len()
    ));

    tour.heading("Add a block node");
    tour.run("blockdev-add driver=null-co node-name=demo-null size=67108864")
        .await??;
    tour.say("OK");
    let nodes = tour.run("query-named-block-nodes").await??;
    tour.show("query-named-block-nodes", &nodes);

    tour.heading("Create an image with a job; its events stream live");
    let file = dir.join("demo.raw");
    let mut events = tour
        .client
        .subscribe(qmp_tokio::EventFilter::names([JOB_EVENT]));
    tour.say(&format!("(demo.raw in {dir_note})"));
    // Words, not a line split at spaces: the temporary directory may have spaces in its path.
    let words = |filename: &str| {
        vec![
            format!("job-id={JOB}"),
            "options.driver=file".to_owned(),
            format!("options.filename={filename}"),
            "options.size=1048576".to_owned(),
        ]
    };
    tour.command_line(&format!("blockdev-create {}", words("demo.raw").join(" ")));
    let words = words(&file.display().to_string());
    let (mut args, auto) = crate::args::parse(&words).map_err(Failure::Usage)?;
    tour.schema
        .validate("blockdev-create", &mut args, &auto)
        .map_err(Failure::Usage)?;
    crate::send(&tour.client, "blockdev-create", &args).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let item = tokio::time::timeout_at(deadline, events.recv())
            .await
            .map_err(|_| Failure::Connection("the job did not conclude within 5 s".into()))?;
        let Some(EventItem::Event(ev)) = item else {
            return Err(Failure::Connection(
                "the connection closed during the job".into(),
            ));
        };
        let data: Value = ev.data().unwrap_or(Value::Null);
        let status = data
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        tour.say(&format!(
            "event {JOB_EVENT} {}",
            tour.paint(json::colour::STRING, &status)
        ));
        if status == "concluded" {
            break;
        }
    }
    let jobs = crate::send(&tour.client, "query-jobs", &Map::new()).await?;
    let jobs: Value = serde_json::from_str(jobs.get()).unwrap_or(Value::Null);
    if let Some(job) = jobs
        .as_array()
        .and_then(|a| a.iter().find(|j| j["id"] == JOB))
    {
        let cur = job["current-progress"].as_i64().unwrap_or(0);
        let tot = job["total-progress"].as_i64().unwrap_or(0);
        let filled = if tot > 0 {
            (cur * 20 / tot) as usize
        } else {
            0
        };
        tour.say(&format!(
            "progress [{}{}] {}",
            "#".repeat(filled),
            ".".repeat(20 - filled.min(20)),
            crate::summary::progress(cur, tot)
        ));
    }
    tour.run(&format!("job-dismiss id={JOB}")).await??;
    tour.say("OK (job dismissed)");

    tour.heading("Errors, shown readably");
    match tour
        .run("blockdev-add driver=null-co node-name=demo-null")
        .await?
    {
        Err(f) => tour.say(&format!("QEMU says: {}", f.message())),
        Ok(_) => tour.say("(unexpectedly accepted)"),
    }
    match tour.run("blockdev-add driver=null-co nmae=demo-2").await? {
        Err(f) => tour.say(&format!("caught before sending: {}", f.message())),
        Ok(_) => tour.say("(unexpectedly accepted)"),
    }

    tour.heading("A policy denial (--profile read-only)");
    tour.command_line("qmp --profile read-only ... blockdev-del node-name=demo-null");
    let mut args = Map::new();
    args.insert("node-name".into(), Value::from("demo-null"));
    match crate::check_policy(Some(&Policy::read_only()), "blockdev-del", &args) {
        Err(f) => tour.say(&f.message()),
        Ok(()) => tour.say("(unexpectedly allowed)"),
    }
    match crate::check_policy(
        Some(&Policy::read_only()),
        "query-named-block-nodes",
        &Map::new(),
    ) {
        Ok(()) => tour.say("while query-named-block-nodes is allowed by the read-only profile"),
        Err(f) => tour.say(&f.message()),
    }

    tour.heading("A clean quit");
    tour.command_line("quit");
    crate::send(&tour.client, "quit", &Map::new()).await?;
    let _ = tokio::time::timeout(Duration::from_secs(5), tour.client.closed()).await;
    tour.say("OK; the connection closed");
    Ok(())
}
