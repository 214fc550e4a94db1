//! JSON output: re-indents raw JSON text keeping QEMU's member order, optionally coloured.

/// ANSI colours used for JSON and messages.
pub(crate) mod colour {
    pub(crate) const KEY: &str = "\x1b[1;34m";
    pub(crate) const STRING: &str = "\x1b[32m";
    pub(crate) const NUMBER: &str = "\x1b[36m";
    pub(crate) const LITERAL: &str = "\x1b[33m";
    pub(crate) const DIM: &str = "\x1b[2m";
    pub(crate) const RESET: &str = "\x1b[0m";
}

/// How JSON is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Style {
    /// One line, no spaces.
    pub(crate) compact: bool,
    /// ANSI colours.
    pub(crate) colour: bool,
}

/// Formats one JSON text (assumed valid) in `style`, keeping member order.
pub(crate) fn format(text: &str, style: Style) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let bytes = text.as_bytes();
    let mut i = 0;
    // For each open container, whether it is an object; and whether a key comes next.
    let mut stack = Vec::<bool>::new();
    let mut expect_key = false;
    let newline = |out: &mut String, depth: usize| {
        if !style.compact {
            out.push('\n');
            for _ in 0..depth {
                out.push_str("  ");
            }
        }
    };
    let paint = |out: &mut String, c: &str, s: &str| {
        if style.colour {
            out.push_str(c);
            out.push_str(s);
            out.push_str(colour::RESET);
        } else {
            out.push_str(s);
        }
    };
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => i += 1,
            b'{' | b'[' => {
                let close = if b == b'{' { b'}' } else { b']' };
                let mut j = i + 1;
                while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                    j += 1;
                }
                if j < bytes.len() && bytes[j] == close {
                    out.push(b as char);
                    out.push(close as char);
                    i = j + 1;
                } else {
                    out.push(b as char);
                    depth += 1;
                    stack.push(b == b'{');
                    expect_key = b == b'{';
                    newline(&mut out, depth);
                    i += 1;
                }
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                stack.pop();
                newline(&mut out, depth);
                out.push(b as char);
                i += 1;
            }
            b',' => {
                out.push(',');
                expect_key = stack.last() == Some(&true);
                newline(&mut out, depth);
                i += 1;
            }
            b':' => {
                out.push_str(if style.compact { ":" } else { ": " });
                expect_key = false;
                i += 1;
            }
            b'"' => {
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i = (i + 1).min(bytes.len());
                let is_key = expect_key;
                let c = if is_key { colour::KEY } else { colour::STRING };
                paint(&mut out, c, &text[start..i]);
            }
            _ => {
                let start = i;
                while i < bytes.len() && !b",:]} \t\r\n".contains(&bytes[i]) {
                    i += 1;
                }
                let tok = &text[start..i.max(start + 1).min(text.len())];
                i = i.max(start + 1);
                let c = if tok.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
                    colour::NUMBER
                } else {
                    colour::LITERAL
                };
                paint(&mut out, c, tok);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: Style = Style {
        compact: false,
        colour: false,
    };

    #[test]
    fn pretty_keeps_order() {
        let text = r#"{"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "a \"b\"", "l": [1, true, null, {}, []]}"#;
        assert_eq!(
            format(text, PLAIN),
            "{\n  \"qemu\": {\n    \"micro\": 2,\n    \"minor\": 0,\n    \"major\": 10\n  },\n  \"package\": \"a \\\"b\\\"\",\n  \"l\": [\n    1,\n    true,\n    null,\n    {},\n    []\n  ]\n}"
        );
        let compact = Style {
            compact: true,
            colour: false,
        };
        assert_eq!(
            format(text, compact),
            r#"{"qemu":{"micro":2,"minor":0,"major":10},"package":"a \"b\"","l":[1,true,null,{},[]]}"#
        );
        assert_eq!(format("{}", PLAIN), "{}");
        assert_eq!(format("-1.5e3", PLAIN), "-1.5e3");
    }

    /// `text` without its colour escapes (`ESC [ ... m`).
    fn strip_colour(text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(i) = rest.find('\x1b') {
            out.push_str(&rest[..i]);
            let end = rest[i..].find('m').expect("an escape ends with m");
            rest = &rest[i + end + 1..];
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn any_prefix_of_any_text_formats_the_same_with_and_without_colour() {
        let samples = [
            r#"{"a": "é\\\"x", "b": [1, -2.5e3, true, null, {"c": {}}], "d": "\u00e9"}"#,
            "[[[[]]]] }}} ,,, ::: \"\\",
            "garbage é ü 😀 , : ] } [ {",
        ];
        for text in samples {
            for (i, _) in text.char_indices() {
                for compact in [false, true] {
                    let plain = format(
                        &text[..i],
                        Style {
                            compact,
                            colour: false,
                        },
                    );
                    let coloured = format(
                        &text[..i],
                        Style {
                            compact,
                            colour: true,
                        },
                    );
                    assert_eq!(strip_colour(&coloured), plain, "{:?}", &text[..i]);
                }
            }
        }
    }

    #[test]
    fn colours_keys_and_values() {
        let c = Style {
            compact: true,
            colour: true,
        };
        assert_eq!(
            format(r#"{"a": ["x", 1, false]}"#, c),
            "{\x1b[1;34m\"a\"\x1b[0m:[\x1b[32m\"x\"\x1b[0m,\x1b[36m1\x1b[0m,\x1b[33mfalse\x1b[0m]}"
        );
    }
}
