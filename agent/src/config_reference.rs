//! `docs/configuration.md`, rendered from the typed config: the keys, their types and
//! defaults come from `config.rs` through its `JsonSchema` derive (doc comments become the
//! descriptions), so the reference cannot drift from what the parser accepts. A unit test
//! fails when the committed file differs from what this renders.

use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::config::Config;

/// What refreshes the committed file; the staleness test names it.
pub const REFRESH_COMMAND: &str =
    "cargo run -p portcullis-agent -- config reference > docs/configuration.md";

/// A key the config file may not spell at all: the section it belongs to, or a leaf.
enum Entry<'a> {
    Leaf {
        key: String,
        schema: &'a Map<String, Value>,
        required: bool,
    },
    Section {
        header: String,
        description: String,
        schema: &'a Map<String, Value>,
        note: &'static str,
    },
}

/// The Markdown reference of every key `Config` accepts.
pub fn render() -> String {
    let schema = schemars::schema_for!(Config);
    let root = schema.as_value();
    let empty = Map::new();
    let defs = root
        .get("$defs")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let mut out = String::new();
    out.push_str(&HEADER.replace("{refresh}", REFRESH_COMMAND));
    if let Some(top) = root.as_object() {
        render_section(&mut out, defs, "", "Top level", "", top, "");
    }
    out
}

const HEADER: &str = "\
# Configuration reference

<!-- Generated from agent/src/config.rs by `portcullis config reference`; do not edit by hand.
     A unit test fails when this file is stale; refresh it with
     {refresh} -->

The agent reads one TOML file, `/etc/portcullis/portcullis.toml` unless `portcullis agent
--config` names another. Every key is optional unless it says *required*; an unknown key, a
value of the wrong type or an invalid value stops the agent with the file, line and key
(`portcullis config check` runs the same checks; `portcullis config show` prints the
effective configuration, defaults filled in). The shipped file, `packaging/portcullis.toml`,
shows every section with these defaults.

**Reloading.** SIGHUP (`systemctl reload portcullis`) does not read this file again: it
re-reads the policy directory (`policy.dir`) and resolves targets' `host` names again. A
changed key takes effect at the next start (`systemctl restart portcullis`; enforcement
stays attached across it, open proxied connections are closed: docs/operations.md). The
last column says where a key's *file* is read more often than that.

Sizes are bytes, durations are the unit their name ends with.
";

fn render_section(
    out: &mut String,
    defs: &Map<String, Value>,
    prefix: &str,
    header: &str,
    description: &str,
    schema: &Map<String, Value>,
    note: &str,
) {
    let entries = entries(defs, prefix, schema);
    let _ = writeln!(out, "\n## {header}\n");
    if !description.is_empty() {
        let _ = writeln!(out, "{description}\n");
    }
    if !note.is_empty() {
        let _ = writeln!(out, "{note}\n");
    }
    let leaves: Vec<&Entry> = entries
        .iter()
        .filter(|e| matches!(e, Entry::Leaf { .. }))
        .collect();
    if !leaves.is_empty() {
        out.push_str("| Key | Type | Default | Description | SIGHUP |\n");
        out.push_str("|---|---|---|---|---|\n");
        for e in leaves {
            if let Entry::Leaf {
                key,
                schema,
                required,
            } = e
            {
                let field = resolve(defs, schema);
                let default = if *required {
                    "*required*".to_string()
                } else {
                    schema
                        .get("default")
                        .filter(|d| !d.is_null())
                        .map_or_else(|| "unset".to_string(), |d| format!("`{}`", toml_value(d)))
                };
                let mut text = description_of(schema, field);
                let values = valid_values(defs, field);
                if !values.is_empty() {
                    if !text.is_empty() {
                        text.push(' ');
                    }
                    text.push_str(&values);
                }
                let sighup = schema
                    .get("x-sighup")
                    .and_then(Value::as_str)
                    .unwrap_or("restart");
                let _ = writeln!(
                    out,
                    "| `{key}` | {} | {} | {} | {} |",
                    type_name(defs, field),
                    cell(&default),
                    cell(&text),
                    cell(sighup)
                );
            }
        }
    }
    for e in &entries {
        if let Entry::Section {
            header,
            description,
            schema,
            note,
        } = e
        {
            let key = header.trim_matches(|c| c == '[' || c == ']' || c == '`');
            render_section(out, defs, key, header, description, schema, note);
        }
    }
}

/// The keys of one table, in the order the struct declares them.
fn entries<'a>(
    defs: &'a Map<String, Value>,
    prefix: &str,
    schema: &'a Map<String, Value>,
) -> Vec<Entry<'a>> {
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, property) in properties {
        let Some(property) = property.as_object() else {
            continue;
        };
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        let resolved = resolve(defs, property);
        let description = description_of(property, resolved);
        if let Some(table) = table_of(defs, resolved) {
            out.push(Entry::Section {
                header: format!("`[{key}]`"),
                description,
                schema: table,
                note: "",
            });
        } else if let Some(table) = optional_table_of(defs, resolved) {
            out.push(Entry::Section {
                header: format!("`[{key}]`"),
                description,
                schema: table,
                note: "An optional table: left out, none of its keys apply.",
            });
        } else if let Some(table) = resolved
            .get("items")
            .and_then(Value::as_object)
            .and_then(|items| table_of(defs, resolve(defs, items)))
        {
            out.push(Entry::Section {
                header: format!("`[[{key}]]`"),
                description,
                schema: table,
                note: "An array of tables: repeat the header once per entry.",
            });
        } else {
            out.push(Entry::Leaf {
                key: name.clone(),
                schema: property,
                required: required.contains(&name.as_str()),
            });
        }
    }
    out
}

/// A `$ref` followed to its definition (one level: config types do not nest references).
fn resolve<'a>(
    defs: &'a Map<String, Value>,
    schema: &'a Map<String, Value>,
) -> &'a Map<String, Value> {
    schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
        .and_then(|name| defs.get(name))
        .and_then(Value::as_object)
        .unwrap_or(schema)
}

/// A struct: an object with named properties.
fn table_of<'a>(
    defs: &'a Map<String, Value>,
    schema: &'a Map<String, Value>,
) -> Option<&'a Map<String, Value>> {
    let schema = resolve(defs, schema);
    schema.get("properties").map(|_| schema)
}

/// `Option<Struct>`: `anyOf` the struct and null.
fn optional_table_of<'a>(
    defs: &'a Map<String, Value>,
    schema: &'a Map<String, Value>,
) -> Option<&'a Map<String, Value>> {
    let variants = schema.get("anyOf").and_then(Value::as_array)?;
    let mut table = None;
    for v in variants.iter().filter_map(Value::as_object) {
        if v.get("type").and_then(Value::as_str) == Some("null") {
            continue;
        }
        table = Some(table_of(defs, v)?);
    }
    table
}

fn description_of(property: &Map<String, Value>, resolved: &Map<String, Value>) -> String {
    let text = property
        .get("description")
        .or_else(|| resolved.get("description"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The words an enum accepts, each with what it means.
fn valid_values(defs: &Map<String, Value>, schema: &Map<String, Value>) -> String {
    let schema = match schema.get("anyOf").and_then(Value::as_array) {
        // `Option<Enum>`: the enum is the variant that is not null.
        Some(variants) => variants
            .iter()
            .filter_map(Value::as_object)
            .find(|v| v.get("type").and_then(Value::as_str) != Some("null"))
            .map_or(schema, |v| resolve(defs, v)),
        None => schema,
    };
    let mut words: Vec<String> = Vec::new();
    if let Some(variants) = schema.get("oneOf").and_then(Value::as_array) {
        for v in variants.iter().filter_map(Value::as_object) {
            let Some(word) = v.get("const").and_then(Value::as_str) else {
                continue;
            };
            match v.get("description").and_then(Value::as_str) {
                Some(d) => words.push(format!(
                    "`\"{word}\"`: {}",
                    d.split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                        .trim_end_matches('.')
                )),
                None => words.push(format!("`\"{word}\"`")),
            }
        }
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        words.extend(
            values
                .iter()
                .filter_map(Value::as_str)
                .map(|w| format!("`\"{w}\"`")),
        );
    }
    if words.is_empty() {
        String::new()
    } else {
        format!("One of: {}.", words.join("; "))
    }
}

fn type_name(defs: &Map<String, Value>, schema: &Map<String, Value>) -> String {
    if let Some(variants) = schema.get("anyOf").and_then(Value::as_array) {
        let names: Vec<String> = variants
            .iter()
            .filter_map(Value::as_object)
            .filter(|v| v.get("type").and_then(Value::as_str) != Some("null"))
            .map(|v| type_name(defs, resolve(defs, v)))
            .collect();
        return names.join(" or ");
    }
    if schema.get("oneOf").is_some() || schema.get("enum").is_some() {
        return "string".into();
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect(),
        _ => Vec::new(),
    };
    let Some(&kind) = types.first() else {
        return "any".into();
    };
    match kind {
        "array" => {
            let item = schema
                .get("items")
                .and_then(Value::as_object)
                .map_or_else(|| "any".to_string(), |i| type_name(defs, resolve(defs, i)));
            format!("array of {item}")
        }
        "object" => {
            let value = schema
                .get("additionalProperties")
                .and_then(Value::as_object)
                .map_or_else(|| "any".to_string(), |v| type_name(defs, resolve(defs, v)));
            format!("table of {value}")
        }
        "integer" => match schema.get("format").and_then(Value::as_str) {
            Some("uint16") => "integer (0-65535)".into(),
            _ => "integer".into(),
        },
        "string" => match schema.get("format").and_then(Value::as_str) {
            Some("ipv4") => "string (IPv4 address)".into(),
            Some("ipv6") => "string (IPv6 address)".into(),
            _ => "string".into(),
        },
        other => other.into(),
    }
}

/// A default as it is written in TOML.
fn toml_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(toml_value).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) if map.is_empty() => "{}".into(),
        other => other.to_string(),
    }
}

/// A table cell: no line breaks, no column separators.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_reference_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        let rendered = render();
        if committed != rendered {
            let line = committed
                .lines()
                .zip(rendered.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| committed.lines().count().min(rendered.lines().count()))
                + 1;
            panic!(
                "docs/configuration.md is stale (first difference at line {line}): refresh it with `{REFRESH_COMMAND}`"
            );
        }
    }

    /// The shipped file with every commented-out key and header turned on: a line `# key = …`
    /// or `# [section]` (one space at most, so indented prose examples stay comments).
    fn uncommented(text: &str) -> String {
        let mut out = String::new();
        for line in text.lines() {
            let rest = line
                .strip_prefix("# ")
                .or_else(|| line.strip_prefix('#'))
                .filter(|r| {
                    r.starts_with('[')
                        || r.split_once(" = ").is_some_and(|(k, _)| {
                            !k.is_empty()
                                && k.bytes().all(|b| {
                                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'
                                })
                        })
                });
            out.push_str(rest.unwrap_or(line));
            out.push('\n');
        }
        out
    }

    #[test]
    fn the_shipped_config_parses_and_shows_every_section() {
        let text = include_str!("../../packaging/portcullis.toml");
        let path = std::path::Path::new("/etc/portcullis/portcullis.toml");
        let (shipped, targets) = Config::parse(path, text).unwrap();
        assert!(
            targets.is_empty(),
            "nothing is protected until the admin says what"
        );
        assert_eq!(shipped.audit.retention_days, None);
        // Every example, once uncommented, is a valid configuration with every section.
        let all = uncommented(text);
        let (config, targets) = Config::parse(path, &all).unwrap_or_else(|e| panic!("{e}\n{all}"));
        assert!(
            targets.iter().any(|t| t.postgres.is_some()),
            "a postgres target"
        );
        assert!(targets.iter().any(|t| t.postgres.is_none()), "a tcp target");
        assert!(config.identity.issuer.is_some(), "the issuer");
        assert!(!config.identity.services.is_empty(), "a service identity");
        assert!(
            !config.identity.trusted_issuers.is_empty(),
            "a trusted issuer"
        );
        assert!(config.audit.central.is_some(), "the central store");
        assert!(config.audit.syslog.is_some(), "syslog");
        assert!(config.audit.webhook.is_some(), "the webhook");
        assert!(config.audit.signing_key_file.is_some(), "the signing key");
        // Every key the reference knows is shown (sections by their last name).
        let schema = schemars::schema_for!(Config);
        let root = schema.as_value();
        let defs = root.get("$defs").and_then(Value::as_object).unwrap();
        let mut keys = Vec::new();
        leaf_keys(&mut keys, defs, "", root.as_object().unwrap());
        let missing: Vec<&str> = keys
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| {
                let leaf = k.rsplit('.').next().unwrap();
                let shown = format!("{leaf} = ");
                !text
                    .lines()
                    .any(|l| l.starts_with('#') && l.contains(&shown))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "packaging/portcullis.toml does not show {missing:?}"
        );
    }

    /// Every key a config file may spell, with the sections it sits in.
    fn leaf_keys(
        out: &mut Vec<(String, String)>,
        defs: &Map<String, Value>,
        prefix: &str,
        schema: &Map<String, Value>,
    ) {
        for e in entries(defs, prefix, schema) {
            match e {
                Entry::Leaf { key, schema, .. } => {
                    out.push((
                        format!("{prefix}.{key}"),
                        description_of(schema, resolve(defs, schema)),
                    ));
                }
                Entry::Section { header, schema, .. } => {
                    let key = header
                        .trim_matches(|c| c == '[' || c == ']' || c == '`')
                        .to_string();
                    leaf_keys(out, defs, &key, schema);
                }
            }
        }
    }

    #[test]
    fn every_key_is_described_and_the_sections_are_all_there() {
        let schema = schemars::schema_for!(Config);
        let root = schema.as_value();
        let defs = root.get("$defs").and_then(Value::as_object).unwrap();
        let mut keys = Vec::new();
        leaf_keys(&mut keys, defs, "", root.as_object().unwrap());
        let undescribed: Vec<&str> = keys
            .iter()
            .filter(|(_, d)| d.is_empty())
            .map(|(k, _)| k.as_str())
            .collect();
        assert!(
            undescribed.is_empty(),
            "give these keys a doc comment in agent/src/config.rs: {undescribed:?}"
        );
        let names: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
        for key in [
            ".state_dir",
            "proxy.port",
            "target.postgres.credentials_file",
            "target.host",
            "identity.issuer",
            "identity.service.client_secret_file",
            "identity.trusted_issuer.required_claims",
            "audit.retention_days",
            "audit.central.password_file",
            "audit.syslog.facility",
            "audit.webhook.token_file",
            "limits.max_open_per_uid",
            "insecure.allow_plaintext_loopback",
            "dns.nameservers",
            "bpf.pin_dir",
        ] {
            assert!(names.contains(&key), "{key} missing from {names:?}");
        }
        let rendered = render();
        for section in [
            "## `[[target]]`",
            "## `[target.postgres]`",
            "## `[audit.webhook]`",
        ] {
            assert!(rendered.contains(section), "{section}");
        }
        assert!(
            rendered.contains("| `retention_days` | integer | unset |"),
            "nothing is pruned by default"
        );
    }
}
