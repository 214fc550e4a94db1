//! Property tests: framing is independent of read boundaries and formatting, and correlation
//! resolves every request exactly once with its own reply, whatever the order and splits.

#![allow(
    clippy::disallowed_methods,
    reason = "tests take one real instant as virtual time zero"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use proptest::prelude::*;
use qmp_proto::{Command, Config, Connection, Outcome, Output};

const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n";

fn ready(max_in_flight: usize) -> (Instant, Connection) {
    let t0 = Instant::now();
    let mut c = Connection::new(t0, Config::default().max_in_flight(max_in_flight));
    c.handle_input(t0, GREETING);
    drain_tx(&mut c, t0);
    c.handle_input(t0, b"{\"return\": {}, \"id\": 0}\r\n");
    while c.poll_output().is_some() {}
    (t0, c)
}

fn drain_tx(c: &mut Connection, now: Instant) -> Vec<u8> {
    let mut all = Vec::new();
    while let Some(b) = c.poll_transmit() {
        let b = b.to_vec();
        c.handle_transmitted(now, b.len());
        all.extend(b);
    }
    all
}

/// Arbitrary JSON values, including strings full of brackets, quotes and escapes.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[\\[\\]{}\"\\\\a-z \u{e9}\u{1F600}\n\r\t]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z{}\"]{0,6}", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// How QEMU might lay a message out: compact, spaced, or pretty, with CRLF or LF.
fn render(v: &serde_json::Value, style: u8) -> String {
    match style % 4 {
        0 => format!("{}\r\n", serde_json::to_string(v).unwrap()),
        1 => format!("{}\n", serde_json::to_string(v).unwrap()),
        2 => format!(
            "{}\r\n",
            serde_json::to_string_pretty(v)
                .unwrap()
                .replace('\n', "\r\n")
        ),
        _ => serde_json::to_string(v).unwrap(),
    }
}

fn feed_in_chunks(c: &mut Connection, t0: Instant, bytes: &[u8], cuts: &[usize]) {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.dedup();
    for w in points.windows(2) {
        c.handle_input(t0, &bytes[w[0]..w[1]]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Replies carrying arbitrary values, in any layout, split anywhere, come out whole and
    /// byte-identical to what a single parse of each message gives.
    #[test]
    fn replies_survive_any_layout_and_any_split(
        values in prop::collection::vec((json(), 0u8..4), 1..8),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let (t0, mut c) = ready(64);
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (v, style) in &values {
            let id = c.send(t0, Command::new("x")).unwrap();
            let msg = serde_json::json!({"return": v, "id": id.get()});
            stream.extend_from_slice(render(&msg, *style).as_bytes());
            expected.push((id, v.clone()));
        }
        drain_tx(&mut c, t0);
        feed_in_chunks(&mut c, t0, &stream, &cuts);
        let mut got = Vec::new();
        while let Some(o) = c.poll_output() {
            match o {
                Output::Completed { id, outcome: Outcome::Replied(Ok(raw)) } => {
                    got.push((id, raw.deserialize::<serde_json::Value>().unwrap()));
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
        prop_assert_eq!(got, expected);
    }

    /// Whatever order replies come in (in-band ones in order, as QEMU sends them, with
    /// `exec-oob` ones anywhere between them), and however many are dropped by abandoning,
    /// every request resolves exactly once, with its own value.
    #[test]
    fn correlation_is_exact_under_reordering_and_abandonment(
        n in 1usize..40,
        order_seed in any::<u64>(),
        oob_mask in any::<u64>(),
        abandon_mask in any::<u64>(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let (t0, mut c) = ready(8);
        let ids: Vec<_> = (0..n)
            .map(|i| {
                let cmd = Command::new("echo");
                let cmd = if oob_mask >> (i % 64) & 1 == 1 { cmd.oob() } else { cmd };
                c.send(t0, cmd).unwrap()
            })
            .collect();
        let mut abandoned = BTreeSet::new();
        let mut resolved: BTreeMap<u64, u64> = BTreeMap::new();
        let mut rng = order_seed | 1;
        // At the server: in-band requests in arrival order, and oob ones.
        let mut inband: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
        let mut oob: Vec<u64> = Vec::new();
        let mut rounds = 0;
        loop {
            rounds += 1;
            prop_assert!(rounds < 1000, "livelock");
            // Everything the machine wrote is now "at the server".
            let wire = drain_tx(&mut c, t0);
            for req in serde_json::Deserializer::from_slice(&wire).into_iter::<serde_json::Value>() {
                let req = req.unwrap();
                let id = req["id"].as_u64().unwrap();
                if req.get("exec-oob").is_some() { oob.push(id) } else { inband.push_back(id) }
            }
            for (i, id) in ids.iter().enumerate() {
                if abandon_mask >> (i % 64) & 1 == 1 && i % 3 == 0 && c.abandon(*id) {
                    abandoned.insert(id.get());
                }
            }
            if inband.is_empty() && oob.is_empty() {
                break;
            }
            // Answer the oldest in-band request or any oob one.
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            let k = (rng % (oob.len() as u64 + 1)) as usize;
            let pick = match inband.front() {
                Some(&first) if k == oob.len() => { inband.pop_front(); first }
                _ if oob.is_empty() => inband.pop_front().unwrap(),
                _ => oob.swap_remove(k % oob.len()),
            };
            let reply = format!("{{\"return\": {}, \"id\": {}}}\r\n", pick * 10, pick);
            feed_in_chunks(&mut c, t0, reply.as_bytes(), &cuts);
            while let Some(o) = c.poll_output() {
                match o {
                    Output::Completed { id, outcome: Outcome::Replied(Ok(raw)) } => {
                        let v: u64 = raw.deserialize().unwrap();
                        prop_assert_eq!(v, id.get() * 10, "misrouted");
                        prop_assert!(resolved.insert(id.get(), v).is_none(), "resolved twice");
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
        }
        for id in &ids {
            let once = resolved.contains_key(&id.get()) ^ abandoned.contains(&id.get());
            prop_assert!(once, "id {} resolved {} abandoned {}", id.get(), resolved.contains_key(&id.get()), abandoned.contains(&id.get()));
        }
        prop_assert_eq!(c.pending(), 0);
    }
}
