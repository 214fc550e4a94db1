//! Deterministic test helpers (feature `test-util`): a scripted sans-IO [`FakeQemu`] and a
//! [`Pair`] that wires a client [`Connection`] to it under virtual time.
//!
//! Nothing here touches a socket, a thread or the clock: time advances only through
//! [`Pair::advance`], so tests are exact and repeatable. For a fake on a real socket (for async
//! clients), see the `qmp-testkit` crate.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use qmp_proto::testing::{FakeQemu, Pair, Reply};
//! use qmp_proto::{Command, Config, Outcome, Output};
//!
//! let fake = FakeQemu::new()
//!     .reply("query-status", Reply::ok(r#"{"status": "running", "running": true}"#))
//!     .reply("stop", Reply::ok("{}").event_before("STOP").after(Duration::from_millis(5)));
//! let mut pair = Pair::new(Config::default(), fake);
//! assert!(matches!(pair.outputs().last(), Some(Output::Ready(_))));
//! let id = pair.client.send(pair.now(), Command::new("stop")).unwrap();
//! pair.drive();
//! assert!(pair.outputs().is_empty(), "the reply is 5 ms away");
//! pair.advance(Duration::from_millis(5));
//! let outs = pair.outputs();
//! assert!(matches!(&outs[0], Output::Event(e) if e.name == "STOP"));
//! assert!(matches!(&outs[1], Output::Completed { id: done, outcome: Outcome::Replied(Ok(_)) } if *done == id));
//! ```

use std::collections::HashMap;
use std::time::Duration;

use crate::{
    CommandError, Config, Connection, ErrorClass, Greeting, Instant, Output, Received, Server,
    ServerConfig, ServerRequest, Timestamp, VersionInfo,
};

/// How the fake answers one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    answer: Answer,
    events_before: Vec<String>,
    events_after: Vec<String>,
    delay: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Return(String),
    Error(CommandError),
    Silent,
}

impl Reply {
    /// Answers `{"return": json}`.
    pub fn ok(json: &str) -> Self {
        Self::with(Answer::Return(json.to_owned()))
    }

    /// Answers with an error of this class and description.
    pub fn error(class: ErrorClass, desc: &str) -> Self {
        Self::with(Answer::Error(CommandError::new(class, desc)))
    }

    /// Never answers.
    pub fn silent() -> Self {
        Self::with(Answer::Silent)
    }

    fn with(answer: Answer) -> Self {
        Self {
            answer,
            events_before: Vec::new(),
            events_after: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    /// Emits event `name` (no data) just before the reply, as QEMU may.
    #[must_use]
    pub fn event_before(mut self, name: &str) -> Self {
        self.events_before.push(name.to_owned());
        self
    }

    /// Emits event `name` (no data) just after the reply.
    #[must_use]
    pub fn event_after(mut self, name: &str) -> Self {
        self.events_after.push(name.to_owned());
        self
    }

    /// Answers this long after the request arrives (in-band order is kept).
    #[must_use]
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// A handler for commands without a canned reply.
type Handler = Box<dyn FnMut(&ServerRequest) -> Reply + Send>;

/// A scripted QMP server (or guest agent) over the sans-IO [`Server`] machine.
///
/// It greets (QMP), negotiates as QEMU does, answers each command from its canned replies or
/// its handler (default: `CommandNotFound`), answers `guest-sync-delimited` and `guest-sync`
/// itself in QGA mode, and records every request it received.
pub struct FakeQemu {
    server: Server,
    greeting: Greeting,
    replies: HashMap<String, Reply>,
    handler: Handler,
    /// Bytes due at an instant, in order (in-band replies never overtake each other).
    due: Vec<(Instant, Vec<u8>)>,
    requests: Vec<ServerRequest>,
}

impl std::fmt::Debug for FakeQemu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeQemu")
            .field("requests", &self.requests.len())
            .field("due", &self.due.len())
            .finish_non_exhaustive()
    }
}

impl Default for FakeQemu {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeQemu {
    /// A QMP monitor of QEMU 10.0.2 offering `oob`.
    pub fn new() -> Self {
        Self::with_config(ServerConfig::qmp())
    }

    /// A guest agent.
    pub fn qga() -> Self {
        Self::with_config(ServerConfig::qga())
    }

    /// A server with this configuration (pretty printing, capabilities, limits).
    pub fn with_config(config: ServerConfig) -> Self {
        let caps = config.capabilities.clone();
        Self {
            server: Server::new(config),
            greeting: Greeting::new(VersionInfo::new(10, 0, 2), caps),
            replies: HashMap::new(),
            handler: Box::new(|req| Reply::with(Answer::Error(CommandError::not_found(&req.name)))),
            due: Vec::new(),
            requests: Vec::new(),
        }
    }

    /// Answers command `name` with `reply` every time.
    #[must_use]
    pub fn reply(mut self, name: &str, reply: Reply) -> Self {
        self.replies.insert(name.to_owned(), reply);
        self
    }

    /// Answers commands without a canned reply with `f`.
    #[must_use]
    pub fn handler(mut self, f: impl FnMut(&ServerRequest) -> Reply + Send + 'static) -> Self {
        self.handler = Box::new(f);
        self
    }

    /// Every command received, in order.
    pub fn requests(&self) -> &[ServerRequest] {
        &self.requests
    }

    /// Sends an event now (dropped before negotiation, as QEMU does).
    pub fn push_event(&mut self, now: Instant, name: &str, data: Option<&str>) {
        if self.server.is_negotiated() {
            self.server
                .send_event(name, data, stamp())
                .expect("event data must be valid JSON");
            self.queue_output(now);
        }
    }

    /// Sends raw bytes now (garbage, a partial message, an invalid id...).
    pub fn push_raw(&mut self, now: Instant, bytes: &[u8]) {
        self.server.send_raw(bytes);
        self.queue_output(now);
    }

    /// The bytes due at or before `now`, removed from the queue.
    fn take_due(&mut self, now: Instant) -> Vec<u8> {
        let n = self.due.iter().take_while(|(at, _)| *at <= now).count();
        self.due.drain(..n).flat_map(|(_, b)| b).collect()
    }

    fn next_due(&self) -> Option<Instant> {
        self.due.first().map(|(at, _)| *at)
    }

    fn queue_output(&mut self, at: Instant) {
        let bytes = self.server.take_transmit();
        if !bytes.is_empty() {
            // Keep order: nothing is sent before what was queued earlier.
            let at = self.due.last().map_or(at, |(last, _)| at.max(*last));
            self.due.push((at, bytes));
        }
    }

    fn greet(&mut self, now: Instant) {
        if !self.server.config().qga {
            self.server.send_greeting(&self.greeting);
            self.queue_output(now);
        }
    }

    fn handle_input(&mut self, now: Instant, bytes: &[u8]) {
        self.server.handle_input(bytes);
        while let Some(received) = self.server.poll_received() {
            match received {
                Received::Negotiated { id, .. } => {
                    self.server.send_return(id.as_deref(), "{}").expect("valid");
                    self.queue_output(now);
                }
                Received::Rejected { id, error, .. } => {
                    self.server
                        .send_error(id.as_deref(), &error)
                        .expect("valid");
                    self.queue_output(now);
                }
                Received::Command(req) => self.answer(now, req),
            }
        }
    }

    fn answer(&mut self, now: Instant, req: ServerRequest) {
        self.requests.push(req.clone());
        let id = req.id.as_deref();
        if self.server.config().qga
            && matches!(req.name.as_str(), "guest-sync-delimited" | "guest-sync")
        {
            match req.sync_answer() {
                Ok(sync) => {
                    if req.name == "guest-sync-delimited" {
                        self.server.send_delimiter();
                    }
                    self.server.send_return(id, &sync).expect("valid");
                }
                Err(e) => self.server.send_error(id, &e).expect("valid"),
            }
            self.queue_output(now);
            return;
        }
        let reply = match self.replies.get(&req.name) {
            Some(r) => r.clone(),
            None => (self.handler)(&req),
        };
        let at = now + reply.delay;
        for name in &reply.events_before {
            self.server.send_event(name, None, stamp()).expect("valid");
        }
        match &reply.answer {
            Answer::Return(json) => self.server.send_return(id, json).expect("valid reply JSON"),
            Answer::Error(e) => self.server.send_error(id, e).expect("valid"),
            Answer::Silent => {}
        }
        for name in &reply.events_after {
            self.server.send_event(name, None, stamp()).expect("valid");
        }
        self.queue_output(at);
    }
}

fn stamp() -> Timestamp {
    Timestamp {
        seconds: 1_764_000_000,
        microseconds: 0,
    }
}

/// A client [`Connection`] and a [`FakeQemu`] joined in memory, under virtual time.
#[derive(Debug)]
pub struct Pair {
    /// The client machine under test.
    pub client: Connection,
    /// The fake server.
    pub fake: FakeQemu,
    now: Instant,
    outputs: Vec<Output>,
    eof: bool,
}

impl Pair {
    /// Connects `config`'s client to `fake` at virtual time zero; the fake greets at once.
    pub fn new(config: Config, fake: FakeQemu) -> Self {
        #[allow(
            clippy::disallowed_methods,
            reason = "one real instant as virtual time zero"
        )]
        let now = Instant::now();
        let mut fake = fake;
        fake.greet(now);
        Self {
            client: Connection::new(now, config),
            fake,
            now,
            outputs: Vec::new(),
            eof: false,
        }
    }

    /// The current virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Moves bytes once in each direction and collects outputs. Returns whether anything
    /// moved.
    pub fn step(&mut self) -> bool {
        let mut progress = false;
        while let Some(bytes) = self.client.poll_transmit() {
            let bytes = bytes.to_vec();
            self.client.handle_transmitted(self.now, bytes.len());
            if !self.eof {
                self.fake.handle_input(self.now, &bytes);
            }
            progress = true;
        }
        let due = self.fake.take_due(self.now);
        if !due.is_empty() && !self.eof {
            self.client.handle_input(self.now, &due);
            progress = true;
        }
        while let Some(o) = self.client.poll_output() {
            self.outputs.push(o);
            progress = true;
        }
        progress
    }

    /// Steps until nothing moves.
    ///
    /// # Panics
    /// After 10,000 steps (a livelock).
    pub fn drive(&mut self) {
        assert!(
            self.drive_bounded(10_000),
            "livelock: still busy after 10,000 steps"
        );
    }

    /// Steps until nothing moves or `max_steps` ran; returns whether it settled.
    pub fn drive_bounded(&mut self, max_steps: usize) -> bool {
        (0..max_steps).any(|_| !self.step())
    }

    /// Advances virtual time by `d`, firing the client's deadlines and the fake's delayed
    /// replies in time order, and drives to quiescence after each.
    pub fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            self.drive();
            let next = [self.client.poll_timeout(), self.fake.next_due()]
                .into_iter()
                .flatten()
                .filter(|&t| t <= end)
                .min();
            let Some(t) = next else { break };
            self.now = self.now.max(t);
            self.client.handle_timeout(self.now);
        }
        self.now = end;
        self.client.handle_timeout(end);
        self.drive();
    }

    /// Closes the fake's side: the client sees EOF; nothing more is exchanged.
    pub fn eof(&mut self) {
        self.eof = true;
        self.client.handle_eof(self.now);
        self.drive();
    }

    /// The outputs collected since the last call.
    pub fn outputs(&mut self) -> Vec<Output> {
        self.drive();
        std::mem::take(&mut self.outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Command, Failure, Outcome};

    fn ready(fake: FakeQemu, config: Config) -> Pair {
        let mut p = Pair::new(config, fake);
        let outs = p.outputs();
        assert!(matches!(outs.last(), Some(Output::Ready(_))), "{outs:?}");
        p
    }

    #[test]
    fn handshake_replies_errors_and_the_request_log() {
        let mut p = ready(
            FakeQemu::new().reply("query-version", Reply::ok(r#"{"qemu": {"major": 10}}"#)),
            Config::default(),
        );
        let a = p
            .client
            .send(p.now(), Command::new("query-version"))
            .unwrap();
        let b = p.client.send(p.now(), Command::new("nope")).unwrap();
        let outs = p.outputs();
        assert_eq!(outs.len(), 2);
        assert!(
            matches!(&outs[0], Output::Completed { id, outcome: Outcome::Replied(Ok(v)) } if *id == a && v.get() == r#"{"qemu": {"major": 10}}"#)
        );
        assert!(
            matches!(&outs[1], Output::Completed { id, outcome: Outcome::Replied(Err(e)) } if *id == b && e.class == ErrorClass::CommandNotFound)
        );
        let names: Vec<&str> = p.fake.requests().iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["query-version", "nope"]);
    }

    #[test]
    fn delayed_and_silent_replies_meet_client_timeouts() {
        let cfg = Config::default().command_timeout(Some(Duration::from_secs(1)));
        let mut p = ready(
            FakeQemu::new()
                .reply("slow", Reply::ok("1").after(Duration::from_millis(500)))
                .reply("hang", Reply::silent()),
            cfg,
        );
        let slow = p.client.send(p.now(), Command::new("slow")).unwrap();
        let hang = p.client.send(p.now(), Command::new("hang").oob()).unwrap();
        p.advance(Duration::from_millis(499));
        assert!(p.outputs().is_empty());
        p.advance(Duration::from_millis(1));
        assert!(
            matches!(&p.outputs()[..], [Output::Completed { id, outcome: Outcome::Replied(Ok(_)) }] if *id == slow)
        );
        p.advance(Duration::from_millis(500));
        assert_eq!(
            p.outputs(),
            vec![Output::Completed {
                id: hang,
                outcome: Outcome::Unknown(Failure::Timeout)
            }]
        );
    }

    #[test]
    fn guest_agent_sync_and_eof() {
        let mut p = ready(
            FakeQemu::qga().reply("guest-ping", Reply::ok("{}")),
            Config::qga(77),
        );
        let id = p.client.send(p.now(), Command::new("guest-ping")).unwrap();
        let outs = p.outputs();
        assert!(
            matches!(&outs[..], [Output::Completed { id: done, outcome: Outcome::Replied(Ok(_)) }] if *done == id)
        );
        // The agent goes away before the next command is written: it was never sent.
        let lost = p.client.send(p.now(), Command::new("guest-info")).unwrap();
        p.eof();
        assert_eq!(
            p.outputs(),
            vec![
                Output::Completed {
                    id: lost,
                    outcome: Outcome::NotSent(Failure::PeerClosed)
                },
                Output::Closed(crate::CloseReason::PeerClosed),
            ]
        );
    }

    #[test]
    fn pushed_events_and_garbage() {
        let mut p = ready(FakeQemu::new(), Config::default());
        let now = p.now();
        p.fake.push_event(now, "RESUME", None);
        p.fake.push_raw(now, b"junk\r\n");
        let outs = p.outputs();
        assert!(matches!(&outs[0], Output::Event(e) if e.name == "RESUME"));
        assert_eq!(outs[1], Output::Anomaly(crate::Anomaly::Garbage { len: 6 }));
    }
}
