//! The live introspected schema (`query-qmp-schema`): look-ups, readable rendering with the
//! masked type names resolved, argument validation with suggestions, and completion data.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use serde_json::{Map, Value};

/// One member of an object type.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub(crate) name: String,
    pub(crate) ty: String,
    pub(crate) optional: bool,
    pub(crate) features: Vec<String>,
}

/// One schema entity, by meta-type.
#[derive(Debug, Clone)]
pub(crate) enum Entity {
    Command {
        arg: String,
        ret: String,
        oob: bool,
        features: Vec<String>,
    },
    Event {
        arg: String,
        features: Vec<String>,
    },
    Object {
        members: Vec<Member>,
        tag: Option<String>,
        variants: Vec<(String, String)>,
    },
    Enum {
        values: Vec<String>,
    },
    Array {
        element: String,
    },
    Alternate {
        members: Vec<String>,
    },
    Builtin {
        json: String,
    },
}

/// The introspected schema of one QEMU program.
#[derive(Debug, Clone, Default)]
pub(crate) struct Schema {
    entities: BTreeMap<String, Entity>,
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// How many levels of nested objects [`Schema::render`] expands.
const MAX_DEPTH: usize = 4;

impl Schema {
    /// Builds the schema from the `query-qmp-schema` return value.
    pub(crate) fn from_json(text_in: &str) -> Result<Self, String> {
        let list: Vec<Value> = serde_json::from_str(text_in)
            .map_err(|e| format!("query-qmp-schema returned something unexpected: {e}"))?;
        let mut entities = BTreeMap::new();
        for v in &list {
            let name = text(v, "name");
            let entity = match v.get("meta-type").and_then(Value::as_str) {
                Some("command") => Entity::Command {
                    arg: text(v, "arg-type"),
                    ret: text(v, "ret-type"),
                    oob: v.get("allow-oob").and_then(Value::as_bool).unwrap_or(false),
                    features: strings(v.get("features")),
                },
                Some("event") => Entity::Event {
                    arg: text(v, "arg-type"),
                    features: strings(v.get("features")),
                },
                Some("object") => Entity::Object {
                    members: v
                        .get("members")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .map(|m| Member {
                                    name: text(m, "name"),
                                    ty: text(m, "type"),
                                    optional: m.get("default").is_some(),
                                    features: strings(m.get("features")),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    tag: v.get("tag").and_then(Value::as_str).map(str::to_owned),
                    variants: v
                        .get("variants")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .map(|c| (text(c, "case"), text(c, "type")))
                                .collect()
                        })
                        .unwrap_or_default(),
                },
                Some("enum") => Entity::Enum {
                    values: strings(v.get("values")),
                },
                Some("array") => Entity::Array {
                    element: text(v, "element-type"),
                },
                Some("alternate") => Entity::Alternate {
                    members: v
                        .get("members")
                        .and_then(Value::as_array)
                        .map(|a| a.iter().map(|m| text(m, "type")).collect())
                        .unwrap_or_default(),
                },
                Some("builtin") => Entity::Builtin {
                    json: text(v, "json-type"),
                },
                _ => continue,
            };
            entities.insert(name, entity);
        }
        Ok(Self { entities })
    }

    /// Command names, sorted.
    pub(crate) fn commands(&self) -> Vec<&str> {
        self.entities
            .iter()
            .filter(|(_, e)| matches!(e, Entity::Command { .. }))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Event names, sorted.
    pub(crate) fn events(&self) -> Vec<&str> {
        self.entities
            .iter()
            .filter(|(_, e)| matches!(e, Entity::Event { .. }))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    fn get(&self, name: &str) -> Option<&Entity> {
        self.entities.get(name)
    }

    /// The object members of type `ty` (base plus the variant selected by `value`, or all
    /// variants when none is selected), following alternates to their object branch.
    fn object_members(&self, ty: &str, value: Option<&Map<String, Value>>) -> Vec<&Member> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        self.collect_members(ty, value, &mut out, &mut seen);
        out
    }

    fn collect_members<'a>(
        &'a self,
        ty: &str,
        value: Option<&Map<String, Value>>,
        out: &mut Vec<&'a Member>,
        seen: &mut HashSet<String>,
    ) {
        if !seen.insert(ty.to_owned()) {
            return;
        }
        match self.get(ty) {
            Some(Entity::Object {
                members,
                tag,
                variants,
            }) => {
                out.extend(members.iter());
                if let Some(tag) = tag {
                    let chosen = value
                        .and_then(|m| m.get(tag))
                        .and_then(Value::as_str)
                        .and_then(|t| variants.iter().find(|(c, _)| c == t));
                    match chosen {
                        Some((_, vt)) => self.collect_members(vt, value, out, seen),
                        None => {
                            for (_, vt) in variants {
                                self.collect_members(vt, value, out, seen);
                            }
                        }
                    }
                }
            }
            Some(Entity::Alternate { members }) => {
                for m in members {
                    self.collect_members(m, value, out, seen);
                }
            }
            Some(Entity::Array { element }) => self.collect_members(element, value, out, seen),
            _ => {}
        }
    }

    /// A one-line type description; `None` for objects (expanded by the caller).
    fn type_line(&self, ty: &str) -> String {
        match self.get(ty) {
            Some(Entity::Builtin { .. }) | None => ty.to_owned(),
            Some(Entity::Enum { values }) => format!("enum ({})", values.join(" | ")),
            Some(Entity::Array { element }) => format!("array of {}", self.type_line(element)),
            Some(Entity::Alternate { members }) => members
                .iter()
                .map(|m| self.type_line(m))
                .collect::<Vec<_>>()
                .join(" or "),
            Some(Entity::Object { members, .. }) if members.is_empty() => "{}".to_owned(),
            Some(Entity::Object { .. }) => "object".to_owned(),
            Some(Entity::Command { .. } | Entity::Event { .. }) => ty.to_owned(),
        }
    }

    /// The object type a type leads to for expansion (itself, an array element, an
    /// alternate's object branch).
    fn expandable<'a>(&'a self, ty: &'a str) -> Option<&'a str> {
        match self.get(ty)? {
            Entity::Object { members, .. } if !members.is_empty() => Some(ty),
            Entity::Array { element } => self.expandable(element),
            Entity::Alternate { members } => members.iter().find_map(|m| self.expandable(m)),
            _ => None,
        }
    }

    fn render_object(&self, ty: &str, indent: usize, stack: &mut Vec<String>, out: &mut String) {
        let pad = "  ".repeat(indent);
        let Some(Entity::Object {
            members,
            tag,
            variants,
        }) = self.get(ty)
        else {
            return;
        };
        if stack.iter().any(|t| t == ty) {
            let _ = writeln!(out, "{pad}(recursive)");
            return;
        }
        if stack.len() >= MAX_DEPTH {
            let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
            let _ = writeln!(out, "{pad}... ({})", names.join(", "));
            return;
        }
        stack.push(ty.to_owned());
        for m in members {
            self.render_member(m, indent, stack, out);
        }
        if let Some(tag) = tag {
            // Group the cases that share a type.
            let mut groups: Vec<(Vec<&str>, &str)> = Vec::new();
            for (case, vt) in variants {
                match groups.iter_mut().find(|(_, t)| *t == vt.as_str()) {
                    Some((cases, _)) => cases.push(case),
                    None => groups.push((vec![case], vt)),
                }
            }
            for (cases, vt) in groups {
                let has_members = matches!(self.get(vt), Some(Entity::Object { members, .. }) if !members.is_empty());
                if !has_members {
                    continue;
                }
                let _ = writeln!(out, "{pad}when {tag} is {}:", cases.join(" | "));
                self.render_object(vt, indent + 1, stack, out);
            }
        }
        stack.pop();
    }

    fn render_member(&self, m: &Member, indent: usize, stack: &mut Vec<String>, out: &mut String) {
        let pad = "  ".repeat(indent);
        let opt = if m.optional { " (optional)" } else { "" };
        let feats = if m.features.is_empty() {
            String::new()
        } else {
            format!(" [{}]", m.features.join(", "))
        };
        let _ = writeln!(
            out,
            "{pad}{}: {}{opt}{feats}",
            m.name,
            self.type_line(&m.ty)
        );
        if let Some(obj) = self.expandable(&m.ty) {
            self.render_object(obj, indent + 1, stack, out);
        }
    }

    fn render_type_block(&self, label: &str, ty: &str, out: &mut String) {
        match self.get(ty) {
            Some(Entity::Object { members, tag, .. }) if members.is_empty() && tag.is_none() => {
                let _ = writeln!(out, "  {label}: none");
            }
            _ => match self.expandable(ty) {
                Some(obj) if obj == ty => {
                    let _ = writeln!(out, "  {label}:");
                    self.render_object(obj, 2, &mut Vec::new(), out);
                }
                Some(obj) => {
                    let _ = writeln!(out, "  {label}: {}", self.type_line(ty));
                    self.render_object(obj, 2, &mut Vec::new(), out);
                }
                None => {
                    let _ = writeln!(out, "  {label}: {}", self.type_line(ty));
                }
            },
        }
    }

    /// The readable description of command or event `name`.
    pub(crate) fn render(&self, name: &str) -> Option<String> {
        let mut out = String::new();
        match self.get(name)? {
            Entity::Command {
                arg,
                ret,
                oob,
                features,
            } => {
                let _ = writeln!(out, "command {name}");
                if *oob {
                    let _ = writeln!(out, "  allow-oob: yes");
                }
                if !features.is_empty() {
                    let _ = writeln!(out, "  features: {}", features.join(", "));
                }
                self.render_type_block("arguments", arg, &mut out);
                self.render_type_block("returns", ret, &mut out);
            }
            Entity::Event { arg, features } => {
                let _ = writeln!(out, "event {name}");
                if !features.is_empty() {
                    let _ = writeln!(out, "  features: {}", features.join(", "));
                }
                self.render_type_block("data", arg, &mut out);
            }
            _ => return None,
        }
        Some(out)
    }

    /// The listing of every command and event.
    pub(crate) fn render_index(&self, pattern: Option<&str>) -> String {
        let pattern = pattern.map(qmp_ops::Pattern::new);
        let keep = |n: &&str| pattern.as_ref().is_none_or(|p| p.matches(n));
        let commands: Vec<&str> = self.commands().into_iter().filter(keep).collect();
        let events: Vec<&str> = self.events().into_iter().filter(keep).collect();
        let mut out = format!("commands ({}):\n", commands.len());
        for c in commands {
            let _ = writeln!(out, "  {c}");
        }
        let _ = writeln!(out, "events ({}):", events.len());
        for e in events {
            let _ = writeln!(out, "  {e}");
        }
        out
    }

    /// Whether `name` is a command.
    pub(crate) fn has_command(&self, name: &str) -> bool {
        matches!(self.get(name), Some(Entity::Command { .. }))
    }

    /// Checks (and where harmless fixes) the arguments of `command`. `auto` lists the dotted
    /// keys whose values were auto-typed from `key=value`; where the schema wants a string
    /// they become strings again (`node-name=123`).
    pub(crate) fn validate(
        &self,
        command: &str,
        args: &mut Map<String, Value>,
        auto: &[crate::args::Typed],
    ) -> Result<(), String> {
        let Some(Entity::Command { arg, .. }) = self.get(command) else {
            let hint = suggest(command, self.commands().iter().copied())
                .map(|s| format!(" (did you mean '{s}'?)"))
                .unwrap_or_default();
            return Err(format!("unknown command '{command}'{hint}"));
        };
        let mut v = Value::Object(std::mem::take(args));
        let res = self.check(command, arg, &mut v, "", auto);
        if let Value::Object(m) = v {
            *args = m;
        }
        res
    }

    fn check(
        &self,
        command: &str,
        ty: &str,
        v: &mut Value,
        path: &str,
        auto: &[crate::args::Typed],
    ) -> Result<(), String> {
        let what = |path: &str| {
            if path.is_empty() {
                format!("the arguments of {command}")
            } else {
                format!("argument '{path}' of {command}")
            }
        };
        match self.get(ty) {
            None => Ok(()),
            Some(Entity::Builtin { json }) => {
                if json == "string"
                    && matches!(v, Value::Number(_) | Value::Bool(_) | Value::Null)
                    && let Some((_, text)) = auto.iter().find(|(key, _)| key == path)
                {
                    *v = Value::String(text.clone());
                }
                // `size=1e6` was typed as a decimal number; where an integer is wanted, a whole
                // one that fits is that integer.
                if json == "int"
                    && v.is_f64()
                    && let Some(f) = v.as_f64()
                    && auto.iter().any(|(key, _)| key == path)
                    && f.fract() == 0.0
                    && f.abs() < 9.007_199_254_740_992e15
                {
                    #[expect(
                        clippy::cast_possible_truncation,
                        reason = "a whole number below 2^53 converts exactly"
                    )]
                    let i = f as i64;
                    *v = Value::from(i);
                }
                let ok = match json.as_str() {
                    "string" => v.is_string(),
                    "int" => v.is_i64() || v.is_u64(),
                    "number" => v.is_number(),
                    "boolean" => v.is_boolean(),
                    "null" => v.is_null(),
                    _ => true,
                };
                if ok {
                    Ok(())
                } else {
                    Err(format!(
                        "{} must be {}, not {}",
                        what(path),
                        kind_name(json),
                        value_kind(v)
                    ))
                }
            }
            Some(Entity::Enum { values }) => {
                // `type=null` was typed as JSON null; as an enum value it is the text typed.
                if !v.is_string()
                    && let Some((_, text)) = auto.iter().find(|(key, _)| key == path)
                {
                    *v = Value::String(text.clone());
                }
                match v.as_str() {
                    Some(s) if values.iter().any(|x| x == s) => Ok(()),
                    Some(s) => {
                        let hint = suggest(s, values.iter().map(String::as_str))
                            .map(|x| format!(" (did you mean '{x}'?)"))
                            .unwrap_or_default();
                        Err(format!("invalid value '{s}' for {}{hint}", what(path)))
                    }
                    None => Err(format!(
                        "{} must be one of: {}",
                        what(path),
                        values.join(", ")
                    )),
                }
            }
            Some(Entity::Array { element }) => {
                let Value::Array(items) = v else {
                    return Err(format!(
                        "{} must be an array, not {}",
                        what(path),
                        value_kind(v)
                    ));
                };
                for (i, item) in items.iter_mut().enumerate() {
                    let p = format!("{path}[{i}]");
                    self.check(command, element, item, &p, auto)?;
                }
                Ok(())
            }
            Some(Entity::Alternate { members }) => {
                // A branch that takes the value as it was typed wins: `backing=null` is the
                // null branch, not the string "null" of a string branch listed first.
                for m in members {
                    let mut attempt = v.clone();
                    if self.check(command, m, &mut attempt, path, &[]).is_ok() {
                        *v = attempt;
                        return Ok(());
                    }
                }
                let mut first_err = None;
                for m in members {
                    let mut attempt = v.clone();
                    match self.check(command, m, &mut attempt, path, auto) {
                        Ok(()) => {
                            *v = attempt;
                            return Ok(());
                        }
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                // Prefer the error of the branch of the same JSON kind.
                for m in members {
                    let obj = self.expandable(m).is_some();
                    if obj == v.is_object() {
                        let mut attempt = v.clone();
                        self.check(command, m, &mut attempt, path, auto)?;
                    }
                }
                Err(first_err.unwrap_or_else(|| format!("{} has the wrong type", what(path))))
            }
            Some(Entity::Object {
                members: base, tag, ..
            }) => {
                let Value::Object(map) = v else {
                    return Err(format!(
                        "{} must be an object, not {}",
                        what(path),
                        value_kind(v)
                    ));
                };
                // The tag picks the variant whose members the others are checked against, so
                // it goes first (and `type=null` becomes the string it names).
                if let Some(tag) = tag
                    && let Some(m) = base.iter().find(|m| &m.name == tag)
                    && let Some(slot) = map.get_mut(tag)
                {
                    let p = if path.is_empty() {
                        tag.clone()
                    } else {
                        format!("{path}.{tag}")
                    };
                    self.check(command, &m.ty, slot, &p, auto)?;
                }
                let snapshot = map.clone();
                let members = self.object_members(ty, Some(&snapshot));
                let mut keys: Vec<String> = map.keys().cloned().collect();
                keys.sort();
                for key in &keys {
                    let p = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    let Some(m) = members.iter().find(|m| &m.name == key) else {
                        let hint = suggest(key, members.iter().map(|m| m.name.as_str()))
                            .map(|s| {
                                let full = if path.is_empty() {
                                    s.to_owned()
                                } else {
                                    format!("{path}.{s}")
                                };
                                format!(" (did you mean '{full}'?)")
                            })
                            .unwrap_or_default();
                        return Err(format!("unknown argument '{p}' for {command}{hint}"));
                    };
                    let ty = m.ty.clone();
                    if let Some(slot) = map.get_mut(key) {
                        self.check(command, &ty, slot, &p, auto)?;
                    }
                }
                for m in &members {
                    if !m.optional && !map.contains_key(&m.name) {
                        let p = if path.is_empty() {
                            m.name.clone()
                        } else {
                            format!("{path}.{}", m.name)
                        };
                        return Err(format!("missing argument '{p}' for {command}"));
                    }
                }
                Ok(())
            }
            Some(Entity::Command { .. } | Entity::Event { .. }) => Ok(()),
        }
    }

    /// The type of the member at dotted `path` of `command`'s arguments (the arguments
    /// themselves for an empty path), given the arguments already typed.
    fn arg_type(&self, command: &str, path: &[&str], typed: &Map<String, Value>) -> Option<String> {
        let Some(Entity::Command { arg, .. }) = self.get(command) else {
            return None;
        };
        let mut ty = arg.clone();
        let mut value = Some(typed);
        for part in path {
            let members = self.object_members(&ty, value);
            ty = members.iter().find(|m| m.name == *part)?.ty.clone();
            value = value.and_then(|v| v.get(*part)).and_then(Value::as_object);
        }
        Some(ty)
    }

    /// Argument names for completion: the members at dotted `path` of `command`'s
    /// arguments, given the arguments already typed (which select union variants).
    pub(crate) fn argument_names(
        &self,
        command: &str,
        path: &[&str],
        typed: &Map<String, Value>,
    ) -> Vec<String> {
        let Some(ty) = self.arg_type(command, path, typed) else {
            return Vec::new();
        };
        let value = path
            .iter()
            .try_fold(typed, |m, p| m.get(*p).and_then(Value::as_object));
        let mut names: Vec<String> = self
            .object_members(&ty, value)
            .iter()
            .map(|m| m.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Whether the member at dotted `path` of `command`'s arguments is an object (so that
    /// completion offers `key.` rather than `key=`).
    pub(crate) fn is_object_arg(
        &self,
        command: &str,
        path: &[&str],
        typed: &Map<String, Value>,
    ) -> bool {
        self.arg_type(command, path, typed).is_some_and(|ty| {
            matches!(self.get(&ty), Some(Entity::Object { members, .. }) if !members.is_empty())
        })
    }

    /// The values completion offers for the member at dotted `path`: an enum's values (also
    /// through alternates and arrays), `true`/`false` for booleans.
    pub(crate) fn value_candidates(
        &self,
        command: &str,
        path: &[&str],
        typed: &Map<String, Value>,
    ) -> Vec<String> {
        fn walk(schema: &Schema, ty: &str, out: &mut Vec<String>, depth: usize) {
            match schema.get(ty) {
                Some(Entity::Enum { values }) => out.extend(values.iter().cloned()),
                Some(Entity::Builtin { json }) if json == "boolean" => {
                    out.extend(["false".to_owned(), "true".to_owned()]);
                }
                Some(Entity::Alternate { members }) if depth < 4 => {
                    for m in members {
                        walk(schema, m, out, depth + 1);
                    }
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        if let Some(ty) = self.arg_type(command, path, typed) {
            walk(self, &ty, &mut out, 0);
        }
        out
    }
}

fn kind_name(json: &str) -> &str {
    match json {
        "string" => "a string",
        "int" => "an integer",
        "number" => "a number",
        "boolean" => "a boolean",
        "null" => "null",
        other => other,
    }
}

fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Optimal string alignment distance (Levenshtein with adjacent transpositions).
pub(crate) fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The closest candidate to a misspelt `word`: by edit distance to the whole name, or to a
/// dash-separated part of it (`nmae` -> `node-name`), within a third of the length (at
/// least 2). Ties go to the closest length, then to the first in sorted order.
pub(crate) fn suggest<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    let mut best: Option<(usize, usize, &str)> = None;
    let mut all: Vec<&str> = candidates.collect();
    all.sort_unstable();
    all.dedup();
    for c in all {
        let whole = distance(word, c);
        let part = c
            .split(['-', '_'])
            .filter(|p| p.len() >= 3)
            .map(|p| distance(word, p) + 1)
            .min()
            .unwrap_or(usize::MAX);
        let score = whole.min(part);
        let len_gap = word.len().abs_diff(c.len());
        if score <= limit && best.is_none_or(|(b, g, _)| (score, len_gap) < (b, g)) {
            best = Some((score, len_gap, c));
        }
    }
    best.map(|(_, _, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command `c` whose one argument `x` is a string-or-null alternate, string first (as
    /// QEMU's `StrOrNull` and `BlockdevRefOrNull` list theirs).
    const STR_OR_NULL: &str = r#"[
        {"name": "c", "meta-type": "command", "arg-type": "A", "ret-type": "R"},
        {"name": "A", "meta-type": "object",
         "members": [{"name": "x", "type": "S", "default": null}]},
        {"name": "S", "meta-type": "alternate",
         "members": [{"type": "str"}, {"type": "null"}]},
        {"name": "str", "meta-type": "builtin", "json-type": "string"},
        {"name": "null", "meta-type": "builtin", "json-type": "null"},
        {"name": "R", "meta-type": "object", "members": []}
    ]"#;

    /// The arguments `words` of command `c` become once parsed and validated against
    /// `schema` (introspection JSON), as compact JSON; or the validation error.
    fn validated(schema: &str, words: &[&str]) -> Result<String, String> {
        let schema = Schema::from_json(schema).unwrap();
        let words: Vec<String> = words.iter().map(|w| (*w).to_owned()).collect();
        let (mut args, auto) = crate::args::parse(&words).unwrap();
        schema
            .validate("c", &mut args, &auto)
            .map(|()| Value::Object(args).to_string())
    }

    #[test]
    fn an_alternate_takes_a_typed_value_in_the_branch_of_its_kind() {
        let v = |words: &[&str]| validated(STR_OR_NULL, words).unwrap();
        assert_eq!(v(&["x=null"]), r#"{"x":null}"#);
        assert_eq!(v(&["x=abc"]), r#"{"x":"abc"}"#);
        // Not a kind any branch takes as typed: the string branch gets the text.
        assert_eq!(v(&["x=12"]), r#"{"x":"12"}"#);
        assert_eq!(v(&["x=true"]), r#"{"x":"true"}"#);
    }

    #[test]
    fn a_whole_number_typed_as_a_decimal_is_an_integer_where_one_is_wanted() {
        let schema = r#"[
            {"name": "c", "meta-type": "command", "arg-type": "A", "ret-type": "R"},
            {"name": "A", "meta-type": "object",
             "members": [{"name": "n", "type": "int"}, {"name": "f", "type": "number",
                          "default": null}]},
            {"name": "int", "meta-type": "builtin", "json-type": "int"},
            {"name": "number", "meta-type": "builtin", "json-type": "number"},
            {"name": "R", "meta-type": "object", "members": []}
        ]"#;
        let run = |words: &[&str]| validated(schema, words);
        assert_eq!(
            run(&["n=1e6", "f=2e0"]).unwrap(),
            r#"{"f":2.0,"n":1000000}"#
        );
        assert_eq!(run(&["n=1024.0"]).unwrap(), r#"{"n":1024}"#);
        assert_eq!(
            run(&["n=1.5"]).unwrap_err(),
            "argument 'n' of c must be an integer, not a decimal number"
        );
        // Given as JSON, the value is taken as it is.
        assert_eq!(
            run(&["n:=1e6"]).unwrap_err(),
            "argument 'n' of c must be an integer, not a decimal number"
        );
    }

    #[test]
    fn a_union_tag_typed_as_null_names_the_null_variant_whose_members_are_checked() {
        // As QEMU's `ChardevBackend`: the tag `type` is an enum with a value "null", and each
        // variant has its own `data`.
        let schema = r#"[
            {"name": "c", "meta-type": "command", "arg-type": "A", "ret-type": "R"},
            {"name": "A", "meta-type": "object",
             "members": [{"name": "id", "type": "str"}, {"name": "backend", "type": "B"}]},
            {"name": "B", "meta-type": "object", "tag": "type",
             "members": [{"name": "type", "type": "K"}],
             "variants": [{"case": "file", "type": "WF"}, {"case": "null", "type": "WN"}]},
            {"name": "K", "meta-type": "enum", "values": ["file", "null"]},
            {"name": "WF", "meta-type": "object", "members": [{"name": "data", "type": "F"}]},
            {"name": "F", "meta-type": "object", "members": [{"name": "out", "type": "str"}]},
            {"name": "WN", "meta-type": "object", "members": [{"name": "data", "type": "N"}]},
            {"name": "N", "meta-type": "object", "members": []},
            {"name": "str", "meta-type": "builtin", "json-type": "string"},
            {"name": "R", "meta-type": "object", "members": []}
        ]"#;
        let run = |words: &[&str]| validated(schema, words);
        assert_eq!(
            run(&["id=c0", "backend.type=null", "backend.data:={}"]).unwrap(),
            r#"{"backend":{"data":{},"type":"null"},"id":"c0"}"#
        );
        assert_eq!(
            run(&["id=c0", "backend.type=file", "backend.data.out=/tmp/x"]).unwrap(),
            r#"{"backend":{"data":{"out":"/tmp/x"},"type":"file"},"id":"c0"}"#
        );
        // Given as JSON, null is no enum value.
        assert_eq!(
            run(&["id=c0", "backend.type:=null", "backend.data:={}"]).unwrap_err(),
            "argument 'backend.type' of c must be one of: file, null"
        );
        // The variant the tag names is the one checked.
        assert_eq!(
            run(&["id=c0", "backend.type=file", "backend.data:={}"]).unwrap_err(),
            "missing argument 'backend.data.out' for c"
        );
    }

    #[test]
    fn suggestions() {
        let c = ["driver", "node-name", "discard", "read-only", "size"];
        assert_eq!(suggest("nmae", c.iter().copied()), Some("node-name"));
        assert_eq!(suggest("drivr", c.iter().copied()), Some("driver"));
        assert_eq!(suggest("xyzzy", c.iter().copied()), None);
        assert_eq!(
            suggest("query-statsu", ["query-status", "query-stats"].into_iter()),
            Some("query-status")
        );
    }
}
