//! Command-line arguments of a QMP command: `key=value` pairs or one JSON object.

use serde_json::{Map, Value};

/// Parses the words after the command name into an arguments object.
///
/// - a single word starting with `{` is a JSON object, taken as is;
/// - `key=value` types the value: `true`/`false`, `null`, integers and decimals, `[..]` and
///   `{..}` when they parse as JSON, a `"quoted"` JSON string; anything else is a string;
/// - `key:=json` takes the value as JSON (an error when it does not parse);
/// - dots nest: `file.driver=file` gives `{"file": {"driver": "file"}}`.
///
/// Returns the object and the auto-typed values as (dotted key, text as typed), so that
/// validation can put the text back, unchanged, where the schema wants a string (`007` stays
/// `"007"`, not `"7"`).
pub(crate) fn parse(words: &[String]) -> Result<(Map<String, Value>, Vec<Typed>), String> {
    let mut out = Map::new();
    let mut auto = Vec::new();
    if let [only] = words
        && only.trim_start().starts_with('{')
    {
        return match serde_json::from_str::<Value>(only) {
            Ok(Value::Object(map)) => Ok((map, auto)),
            Ok(_) => Err("the JSON argument must be an object".to_owned()),
            Err(e) => Err(format!("the JSON argument does not parse: {e}")),
        };
    }
    for word in words {
        let Some(eq) = word.find('=') else {
            if word.starts_with('-') {
                return Err(format!(
                    "'{word}' looks like an option: options go before the command name \
                     (qmp [OPTIONS] COMMAND [ARGS]...)"
                ));
            }
            return Err(format!(
                "argument '{word}' is not key=value (use key=value, key:=<json>, or one JSON object)"
            ));
        };
        let (key, raw, json) = if eq > 0 && word.as_bytes()[eq - 1] == b':' {
            (&word[..eq - 1], &word[eq + 1..], true)
        } else {
            (&word[..eq], &word[eq + 1..], false)
        };
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(format!("argument '{word}' has an empty key"));
        }
        let value = if json {
            serde_json::from_str(raw)
                .map_err(|e| format!("the value of '{key}' is not valid JSON: {e}"))?
        } else {
            let (v, guessed) = guess(raw);
            if guessed {
                auto.push((key.to_owned(), raw.to_owned()));
            }
            v
        };
        insert(&mut out, key, value)?;
    }
    Ok((out, auto))
}

/// A `key=value` value that was typed: its dotted key and the text as given.
pub(crate) type Typed = (String, String);

/// Types a plain value; the flag says whether it became something other than a string.
fn guess(raw: &str) -> (Value, bool) {
    match raw {
        "true" => return (Value::Bool(true), true),
        "false" => return (Value::Bool(false), true),
        "null" => return (Value::Null, true),
        _ => {}
    }
    if let Ok(i) = raw.parse::<i64>() {
        return (Value::from(i), true);
    }
    if let Ok(u) = raw.parse::<u64>() {
        return (Value::from(u), true);
    }
    let numeric = raw.bytes().any(|b| b.is_ascii_digit())
        && raw
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'));
    if numeric
        && let Ok(f) = raw.parse::<f64>()
        && let Some(n) = serde_json::Number::from_f64(f)
    {
        return (Value::Number(n), true);
    }
    let looks_json = (raw.starts_with('[') && raw.ends_with(']'))
        || (raw.starts_with('{') && raw.ends_with('}'))
        || (raw.starts_with('"') && raw.ends_with('"') && raw.len() >= 2);
    if looks_json && let Ok(v) = serde_json::from_str::<Value>(raw) {
        let guessed = !v.is_string();
        return (v, guessed);
    }
    (Value::String(raw.to_owned()), false)
}

/// Inserts `value` at the dotted `key`, creating objects on the way.
/// `args` with each auto-typed value back as the text it was typed as (`node-name=007` as
/// `"007"`, not `7`), which is what validation sends where the schema wants a string.
pub(crate) fn as_typed_text(args: &Map<String, Value>, auto: &[Typed]) -> Map<String, Value> {
    let mut out = args.clone();
    for (key, text) in auto {
        let mut parts = key.split('.').peekable();
        let mut cur = &mut out;
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                cur.insert(part.to_owned(), Value::String(text.clone()));
                break;
            }
            match cur.get_mut(part) {
                Some(Value::Object(m)) => cur = m,
                _ => break,
            }
        }
    }
    out
}

fn insert(map: &mut Map<String, Value>, key: &str, value: Value) -> Result<(), String> {
    let mut parts = key.split('.').peekable();
    let mut cur = map;
    let mut path = String::new();
    while let Some(part) = parts.next() {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(part);
        if parts.peek().is_none() {
            if cur.contains_key(part) {
                return Err(format!("argument '{path}' is given twice"));
            }
            cur.insert(part.to_owned(), value);
            return Ok(());
        }
        let slot = cur
            .entry(part.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = match slot {
            Value::Object(m) => m,
            _ => return Err(format!("argument '{path}' is both a value and an object")),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(words: &[&str]) -> Result<String, String> {
        let words: Vec<String> = words.iter().map(|s| (*s).to_owned()).collect();
        parse(&words).map(|(m, _)| Value::Object(m).to_string())
    }

    #[test]
    fn typing_and_nesting() {
        assert_eq!(
            p(&[
                "driver=null-co",
                "node-name=n0",
                "size=1048576",
                "read-zeroes=true"
            ])
            .unwrap(),
            r#"{"driver":"null-co","node-name":"n0","read-zeroes":true,"size":1048576}"#
        );
        assert_eq!(
            p(&[
                "file.driver=file",
                "file.filename=/tmp/x",
                "a=null",
                "f=1.5"
            ])
            .unwrap(),
            r#"{"a":null,"f":1.5,"file":{"driver":"file","filename":"/tmp/x"}}"#
        );
        assert_eq!(
            p(&[
                "l=[1,2]",
                "o={\"a\":1}",
                "s:=\"12\"",
                "q=\"x y\"",
                "bad=[1,"
            ])
            .unwrap(),
            r#"{"bad":"[1,","l":[1,2],"o":{"a":1},"q":"x y","s":"12"}"#
        );
        assert_eq!(p(&["k=a=b", "e="]).unwrap(), r#"{"e":"","k":"a=b"}"#);
        assert_eq!(
            p(&[r#"{"driver": "null-co"}"#]).unwrap(),
            r#"{"driver":"null-co"}"#
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            p(&["novalue"]).unwrap_err(),
            "argument 'novalue' is not key=value (use key=value, key:=<json>, or one JSON object)"
        );
        assert_eq!(
            p(&["a=1", "a=2"]).unwrap_err(),
            "argument 'a' is given twice"
        );
        assert_eq!(
            p(&["a=1", "a.b=2"]).unwrap_err(),
            "argument 'a' is both a value and an object"
        );
        assert_eq!(p(&["=1"]).unwrap_err(), "argument '=1' has an empty key");
        assert_eq!(
            p(&["a..b=1"]).unwrap_err(),
            "argument 'a..b=1' has an empty key"
        );
        assert_eq!(
            p(&["a:=[1,"]).unwrap_err(),
            "the value of 'a' is not valid JSON: EOF while parsing a value at line 1 column 3"
        );
        assert_eq!(
            p(&["[1]"]).unwrap_err(),
            "argument '[1]' is not key=value (use key=value, key:=<json>, or one JSON object)"
        );
        assert_eq!(
            p(&["{1"]).unwrap_err(),
            "the JSON argument does not parse: key must be a string at line 1 column 2"
        );
    }
}
