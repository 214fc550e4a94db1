//! A bounded cache of successful results with a time to live, and the canonical call key.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use qmp_proto::RawJson;
use serde_json::value::RawValue;

/// The key of a call: the command name and its arguments with object keys sorted, so that
/// `{"a":1,"b":2}` and `{"b":2,"a":1}` give the same key.
///
/// # Errors
/// When `args` is not valid JSON (a `RawValue` always is).
pub fn call_key(name: &str, args: Option<&RawValue>) -> Result<String, serde_json::Error> {
    let mut key = String::with_capacity(name.len() + 2);
    key.push_str(name);
    key.push('\n');
    if let Some(args) = args {
        let value: serde_json::Value = serde_json::from_str(args.get())?;
        write_canonical(&value, &mut key);
    }
    Ok(key)
}

fn write_canonical(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Successful results kept until they expire, at most `capacity` of them. When full, expired
/// entries go first, then the oldest inserted. It reads no clock: callers pass `now`. Each
/// entry keeps the write count its execution started at: one taken before a later write
/// finished is no longer served.
#[derive(Debug)]
pub(crate) struct ResultCache {
    capacity: usize,
    seq: u64,
    entries: HashMap<String, CacheEntry>,
}

#[derive(Debug)]
struct CacheEntry {
    /// `None`: a TTL too long to represent, which never runs out.
    expires: Option<Instant>,
    seq: u64,
    /// The count of finished writes when its execution started.
    writes: u64,
    value: RawJson,
}

impl ResultCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            seq: 0,
            entries: HashMap::new(),
        }
    }

    /// The fresh result under `key`: not expired at `now`, and from an execution that started
    /// when `writes` writes had finished.
    pub(crate) fn get(&mut self, key: &str, now: Instant, writes: u64) -> Option<RawJson> {
        match self.entries.get(key) {
            Some(e) if e.expires.is_none_or(|at| at > now) && e.writes == writes => {
                Some(e.value.clone())
            }
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Keeps `value`, from an execution that started when `writes` writes had finished.
    pub(crate) fn insert(
        &mut self,
        key: String,
        value: RawJson,
        now: Instant,
        ttl: Duration,
        writes: u64,
    ) {
        if self.capacity == 0 {
            return;
        }
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            self.entries
                .retain(|_, e| e.expires.is_none_or(|at| at > now));
            let oldest = (self.entries.len() >= self.capacity)
                .then(|| {
                    self.entries
                        .iter()
                        .min_by_key(|(_, e)| e.seq)
                        .map(|(k, _)| k.clone())
                })
                .flatten();
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        self.seq += 1;
        self.entries.insert(
            key,
            CacheEntry {
                expires: now.checked_add(ttl),
                seq: self.seq,
                writes,
                value,
            },
        );
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}
