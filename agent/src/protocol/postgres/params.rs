//! Which start-up parameters a client may pass to the server. Every parameter of a
//! StartupMessage other than the protocol's own (`user`, `database`, `options`,
//! `replication`, `_pq_.*`) is a setting the server applies before the first statement, as
//! the session's role and without a statement the policy sees; `options` carries more of
//! them in a command line. So the agent passes only the settings drivers really send, on
//! the list below, refuses every other name (`role`, `session_authorization`,
//! `session_replication_role`, `log_statement`, anything unknown), and restricts the values
//! of the settings that change how its own SQL parser must read statements.
//!
//! `options` is split and read by the server's rules (`pg_split_opts` in
//! src/backend/utils/init/postinit.c, `process_postgres_switches` in
//! src/backend/tcop/postgres.c, `ParseLongOption` in src/backend/utils/misc/guc.c); the
//! server is then sent each setting as a start-up parameter of its own and never the
//! `options` string, so what it applies is exactly what was checked here, whatever a parser
//! difference might be.
//!
//! Protocol: PostgreSQL docs, "Message Formats" → StartupMessage; "Connection Strings" →
//! `options`; "Setting Parameters" (GUC names are case-insensitive).
//!
//! Sans-IO: no sockets, no tokio; `startup` turns a refusal into the client's error and a
//! `connection.refused` event.

/// The settings a client may give at start-up, by the name PostgreSQL spells them, and what
/// values pass. Who sends each: libpq sends `application_name`, `client_encoding`
/// (PGCLIENTENCODING; psql's `auto` resolved to the locale's encoding: `SQL_ASCII` under the
/// C locale), `datestyle` (PGDATESTYLE), `timezone` (PGTZ), `geqo` (PGGEQO) and whatever
/// PGOPTIONS says; pgjdbc `client_encoding`, `DateStyle`, `TimeZone`, `extra_float_digits`,
/// `application_name`, `search_path` (currentSchema); node-postgres `statement_timeout`,
/// `lock_timeout`, `idle_in_transaction_session_timeout`, `client_encoding`;
/// postgres.js and asyncpg `client_encoding` (`'utf-8'`, quotes included) and any server
/// settings the application lists (`jit`, `search_path`, …); npgsql `client_encoding`,
/// `search_path`, `TimeZone`. None of them changes who the session acts as, what it may
/// read or how a statement is parsed (the two that could are held to safe values), and each
/// can also be changed later with SET, which the policy decides.
pub const ALLOWED: [(&str, Values); 19] = [
    ("application_name", Values::Any),
    ("client_encoding", Values::AsciiSafeEncoding),
    ("DateStyle", Values::Any),
    ("TimeZone", Values::Any),
    ("IntervalStyle", Values::Any),
    ("extra_float_digits", Values::Any),
    ("bytea_output", Values::Any),
    ("search_path", Values::Any),
    ("statement_timeout", Values::Any),
    ("lock_timeout", Values::Any),
    ("idle_in_transaction_session_timeout", Values::Any),
    ("idle_session_timeout", Values::Any),
    ("standard_conforming_strings", Values::On),
    ("geqo", Values::Any),
    ("jit", Values::Any),
    ("client_min_messages", Values::Any),
    ("default_transaction_isolation", Values::Any),
    ("default_transaction_read_only", Values::Any),
    ("default_transaction_deferrable", Values::Any),
];

/// What values of an allowed setting pass. The server still validates each one itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// Whatever the server accepts.
    Any,
    /// A spelling PostgreSQL reads as true: the agent's parser reads string literals as the
    /// server does only with `standard_conforming_strings` on (off, a backslash before a quote
    /// would end a literal for one and not for the other).
    On,
    /// An encoding PostgreSQL can also use for a database (UTF8, SQL_ASCII, LATIN1…10,
    /// WIN125x, EUC_*, KOI8…), in any spelling PostgreSQL reads as one: quotes and
    /// backslashes are then what they look like to the agent's parser. Not the client-only
    /// encodings (SJIS, BIG5, GBK, …), where the second byte of a character can be a
    /// backslash (`portcullis_sql::is_ascii_safe_encoding` says why). The agent reads
    /// statements as UTF-8, so in the single-byte encodings only ASCII statements get
    /// through; that is a limit, not a hole.
    AsciiSafeEncoding,
}

/// The start-up parameters a session gives the server, after [`check`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Allowed settings, by PostgreSQL's spelling of their name, in the order the server
    /// applies them: `options` first, then the packet's own settings, so the later of two
    /// values of one setting wins as it would at the server.
    pub settings: Vec<(&'static str, String)>,
    /// `_pq_.*` protocol extensions the client asked for. The agent speaks protocol 3.0 with
    /// no extension to both sides: it names them back as unrecognized in
    /// NegotiateProtocolVersion, as a server that does not know them does, and never
    /// forwards them.
    pub protocol_extensions: Vec<String>,
}

/// Why a start-up parameter is refused. Messages name the parameter and never echo the
/// value of one that is not allowed (a client may put anything there).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("start-up parameter `{name}`{} is refused: it would change who the session acts as without a statement the policy sees; connect as the role you need, or use SET ROLE, which the policy decides", via_options(*.in_options))]
    Identity { name: String, in_options: bool },
    #[error("start-up parameter `{name}`{} is refused: the agent passes only the settings clients send at start-up (docs/postgres.md lists them); set it in the session with SET, which the policy decides", via_options(*.in_options))]
    NotAllowed { name: String, in_options: bool },
    #[error("start-up parameter `{name}` = `{value}` is refused: {why}")]
    Value {
        name: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("start-up parameter `options` is refused: {0}")]
    Options(#[from] OptionsError),
}

/// An `options` string the server itself would refuse, or a switch other than a setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("`{0}` needs a `name=value` after it")]
    MissingValue(String),
    #[error("`{0}` has no `=value`")]
    NoValue(String),
    #[error("switch `{0}` is not a setting; only `-c name=value` and `--name=value` are passed")]
    Switch(String),
    #[error("`{0}` is not a switch")]
    NotASwitch(String),
}

fn via_options(in_options: bool) -> &'static str {
    if in_options {
        " (in `options`)"
    } else {
        ""
    }
}

/// Parameters that choose the session's identity: the server would set them as the
/// session's role after authentication. Named in their own message, whatever their case.
const IDENTITY: [&str; 2] = ["role", "session_authorization"];

/// Longest value quoted back in a refusal.
const MAX_QUOTED_VALUE: usize = 64;

/// Checks every start-up parameter of a StartupMessage and returns what the server may be
/// sent besides `user`, `database` and `replication`, which the caller handles (policy
/// decides `replication`). The protocol's own names are matched exactly, as the server does
/// (`strcmp`); setting names case-insensitively, as GUC names are.
pub fn check(params: &[(String, String)]) -> Result<Checked, ParamError> {
    let mut from_options = Vec::new();
    let mut from_packet = Vec::new();
    let mut protocol_extensions = Vec::new();
    for (name, value) in params {
        match name.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                // The server keeps the last `options` it was sent; every one is checked.
                from_options = parse_options(value)?
                    .into_iter()
                    .map(|(name, value)| setting(&name, value, true))
                    .collect::<Result<_, _>>()?;
            }
            n if n.starts_with("_pq_.") => protocol_extensions.push(name.clone()),
            n => from_packet.push(setting(n, value.clone(), false)?),
        }
    }
    from_options.extend(from_packet);
    Ok(Checked {
        settings: from_options,
        protocol_extensions,
    })
}

/// One setting by the allowlist: its name as PostgreSQL spells it and the value.
fn setting(
    name: &str,
    value: String,
    in_options: bool,
) -> Result<(&'static str, String), ParamError> {
    if IDENTITY.iter().any(|i| i.eq_ignore_ascii_case(name)) {
        return Err(ParamError::Identity {
            name: name.to_string(),
            in_options,
        });
    }
    let Some((canonical, values)) = ALLOWED
        .iter()
        .find(|(allowed, _)| allowed.eq_ignore_ascii_case(name))
    else {
        return Err(ParamError::NotAllowed {
            name: name.to_string(),
            in_options,
        });
    };
    let why = match values {
        Values::Any => None,
        Values::On => (!reads_true(&value)).then_some(
            "the agent checks statements as the server reads them with standard_conforming_strings on",
        ),
        Values::AsciiSafeEncoding => (!portcullis_sql::is_ascii_safe_encoding(&value)).then_some(
            "in this encoding the server could read a statement other than as the agent checked it; connect with client_encoding UTF8",
        ),
    };
    match why {
        None => Ok((canonical, value)),
        Some(why) => Err(ParamError::Value {
            name: canonical,
            value: value.chars().take(MAX_QUOTED_VALUE).collect(),
            why,
        }),
    }
}

/// PostgreSQL's `parse_bool` true spellings: prefixes of `true` and `yes`, `on` (at least
/// two letters, so not `o`), `1`; any case, nothing around them.
fn reads_true(value: &str) -> bool {
    let v = value.to_ascii_lowercase();
    let prefix_of = |word: &str, shortest: usize| v.len() >= shortest && word.starts_with(&v);
    prefix_of("true", 1) || prefix_of("yes", 1) || prefix_of("on", 2) || v == "1"
}

/// The server's `isspace` in the C locale: also vertical tab and form feed.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{0b}' | '\u{0c}' | '\r')
}

/// `pg_split_opts`: words separated by whitespace; a backslash makes the next character part
/// of the word (a trailing backslash is dropped).
pub fn split_options(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = options.chars().peekable();
    loop {
        while chars.next_if(|c| is_c_space(*c)).is_some() {}
        if chars.peek().is_none() {
            return words;
        }
        let mut word = String::new();
        while let Some(c) = chars.next_if(|c| !is_c_space(*c)) {
            if c == '\\' {
                if let Some(escaped) = chars.next() {
                    word.push(escaped);
                }
            } else {
                word.push(c);
            }
        }
        words.push(word);
    }
}

/// The settings an `options` string makes, as `process_postgres_switches` reads it for a
/// client: `-c name=value`, `-cname=value` and `--name=value`, `-` read as `_` in the name
/// (`ParseLongOption`). Any other switch (`-D`, `-P`, `-e`, `-F`, `-o`, grouped letters, `--`
/// alone) or a word that is no switch is refused: the server rejects some of them and the
/// rest set things that are no client's to set.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, OptionsError> {
    let mut settings = Vec::new();
    let mut words = split_options(options).into_iter();
    while let Some(word) = words.next() {
        let argument = if word == "-c" {
            words
                .next()
                .ok_or_else(|| OptionsError::MissingValue(word.clone()))?
        } else if let Some(attached) = word.strip_prefix("-c") {
            attached.to_string()
        } else if let Some(long) = word.strip_prefix("--").filter(|l| !l.is_empty()) {
            long.to_string()
        } else if word.starts_with('-') {
            return Err(OptionsError::Switch(word));
        } else {
            return Err(OptionsError::NotASwitch(word));
        };
        let Some((name, value)) = argument.split_once('=') else {
            return Err(OptionsError::NoValue(argument));
        };
        settings.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(settings)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests: a failed expectation should stop the test loudly"
)]
mod tests {
    use super::*;

    fn s(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_split_like_pg_split_opts() {
        let table: &[(&str, &[&str])] = &[
            ("", &[]),
            ("   \t\n ", &[]),
            ("-c a=b", &["-c", "a=b"]),
            ("  -c   a=b  ", &["-c", "a=b"]),
            (r"-c search_path=a\ b", &["-c", "search_path=a b"]),
            (r"-c x=a\\b", &["-c", r"x=a\b"]),
            (r"-c x=a\b", &["-c", "x=ab"]),
            ("-c x=y\\", &["-c", "x=y"]),
            // A lone backslash still starts a word, an empty one, which is no switch.
            ("\\", &[""]),
            ("\\ ", &[" "]),
            ("-c\u{0b}x=y\u{0c}-cz=w\r", &["-c", "x=y", "-cz=w"]),
            ("a\u{a0}b", &["a\u{a0}b"]),
        ];
        for (options, words) in table {
            assert_eq!(split_options(options), *words, "{options:?}");
        }
    }

    #[test]
    fn options_read_like_process_postgres_switches() {
        type Row<'a> = (&'a str, Result<&'a [(&'a str, &'a str)], OptionsError>);
        let table: &[Row] = &[
            ("", Ok(&[])),
            ("-c search_path=public", Ok(&[("search_path", "public")])),
            ("-csearch_path=public", Ok(&[("search_path", "public")])),
            ("--search_path=public", Ok(&[("search_path", "public")])),
            ("--search-path=public", Ok(&[("search_path", "public")])),
            (
                "-c statement-timeout=5s",
                Ok(&[("statement_timeout", "5s")]),
            ),
            // Only the name's dashes become underscores, and only the first `=` splits.
            (
                "-c application_name=a-b=c",
                Ok(&[("application_name", "a-b=c")]),
            ),
            ("-c search_path=", Ok(&[("search_path", "")])),
            (
                "-c search_path=public -c statement_timeout=5000 --lock_timeout=1s",
                Ok(&[
                    ("search_path", "public"),
                    ("statement_timeout", "5000"),
                    ("lock_timeout", "1s"),
                ]),
            ),
            (
                r"-c search_path=a\ b,c -c\ application_name=x",
                Ok(&[("search_path", "a b,c"), (" application_name", "x")]),
            ),
            (r"-c\ role=admin", Ok(&[(" role", "admin")])),
            (r"-c role\=x=y", Ok(&[("role", "x=y")])),
            ("-c", Err(OptionsError::MissingValue("-c".into()))),
            (
                "-c search_path",
                Err(OptionsError::NoValue("search_path".into())),
            ),
            (
                "--search_path",
                Err(OptionsError::NoValue("search_path".into())),
            ),
            ("-c -x", Err(OptionsError::NoValue("-x".into()))),
            ("--", Err(OptionsError::Switch("--".into()))),
            ("\\", Err(OptionsError::NotASwitch("".into()))),
            ("-D /tmp", Err(OptionsError::Switch("-D".into()))),
            ("-P", Err(OptionsError::Switch("-P".into()))),
            ("-e", Err(OptionsError::Switch("-e".into()))),
            ("-F", Err(OptionsError::Switch("-F".into()))),
            ("-o x", Err(OptionsError::Switch("-o".into()))),
            ("-B 100", Err(OptionsError::Switch("-B".into()))),
            ("-ec a=b", Err(OptionsError::Switch("-ec".into()))),
            ("-", Err(OptionsError::Switch("-".into()))),
            (
                "search_path=x",
                Err(OptionsError::NotASwitch("search_path=x".into())),
            ),
            (
                "-c a=b extra",
                Err(OptionsError::NotASwitch("extra".into())),
            ),
        ];
        for (options, expected) in table {
            let got = parse_options(options);
            let expected = expected.clone().map(s);
            assert_eq!(got, expected, "{options:?}");
        }
    }

    #[test]
    fn every_allowed_setting_passes_under_any_case_of_its_name() {
        for (name, values) in ALLOWED {
            let value = match values {
                Values::Any => "x",
                Values::On => "on",
                Values::AsciiSafeEncoding => "UTF8",
            };
            for spelled in [
                name.to_string(),
                name.to_ascii_lowercase(),
                name.to_ascii_uppercase(),
            ] {
                let checked = check(&s(&[("user", "app"), (&spelled, value)])).unwrap();
                assert_eq!(
                    checked.settings,
                    vec![(name, value.to_string())],
                    "{spelled}"
                );
                let checked = check(&s(&[("options", &format!("-c {spelled}={value}"))])).unwrap();
                assert_eq!(
                    checked.settings,
                    vec![(name, value.to_string())],
                    "{spelled}"
                );
            }
        }
    }

    #[test]
    fn identity_and_unknown_settings_are_refused_by_name() {
        let identity = |name: &str, in_options| {
            Err(ParamError::Identity {
                name: name.into(),
                in_options,
            })
        };
        let not_allowed = |name: &str, in_options| {
            Err(ParamError::NotAllowed {
                name: name.into(),
                in_options,
            })
        };
        type Row<'a> = (&'a [(&'a str, &'a str)], Result<Checked, ParamError>);
        let table: &[Row] = &[
            (&[("role", "admin_role")], identity("role", false)),
            (&[("ROLE", "admin_role")], identity("ROLE", false)),
            (
                &[("session_authorization", "postgres")],
                identity("session_authorization", false),
            ),
            (
                &[("Session_Authorization", "postgres")],
                identity("Session_Authorization", false),
            ),
            (&[("options", "-c role=admin_role")], identity("role", true)),
            (&[("options", "-crole=admin_role")], identity("role", true)),
            (&[("options", "--role=admin_role")], identity("role", true)),
            (&[("options", "--ROLE=admin_role")], identity("ROLE", true)),
            (
                &[("options", r"-c\ session_authorization=postgres")],
                not_allowed(" session_authorization", true),
            ),
            (
                &[("options", "-c session_authorization=postgres")],
                identity("session_authorization", true),
            ),
            (
                &[("options", "--Session-Authorization=postgres")],
                identity("Session_Authorization", true),
            ),
            (
                &[("options", "-c search_path=public --role=admin_role")],
                identity("role", true),
            ),
            (
                &[("session_replication_role", "replica")],
                not_allowed("session_replication_role", false),
            ),
            (
                &[("log_statement", "none")],
                not_allowed("log_statement", false),
            ),
            (
                &[("options", "-c log_statement=none")],
                not_allowed("log_statement", true),
            ),
            (&[("work_mem", "1TB")], not_allowed("work_mem", false)),
            (
                &[("no_such_setting", "1")],
                not_allowed("no_such_setting", false),
            ),
            (&[("search-path", "x")], not_allowed("search-path", false)),
            // The protocol's own names are exact: in another case they are settings.
            (&[("USER", "postgres")], not_allowed("USER", false)),
            (&[("Options", "-c role=x")], not_allowed("Options", false)),
            (&[("_PQ_.x", "1")], not_allowed("_PQ_.x", false)),
            (
                &[("options", "-D /tmp")],
                Err(ParamError::Options(OptionsError::Switch("-D".into()))),
            ),
        ];
        for (params, expected) in table {
            assert_eq!(check(&s(params)), *expected, "{params:?}");
        }
    }

    #[test]
    fn values_that_change_how_statements_are_read_are_restricted() {
        // The encodings themselves are tabled in portcullis-sql's `is_ascii_safe_encoding`;
        // here, that the start-up check asks it, quoted spellings included.
        for ok in ["UTF8", "'utf-8'", "LATIN1"] {
            assert!(check(&s(&[("client_encoding", ok)])).is_ok(), "{ok}");
        }
        for refused in ["SJIS", "GBK", "no such"] {
            let e = check(&s(&[("client_encoding", refused)])).unwrap_err();
            assert!(
                matches!(&e, ParamError::Value { name: "client_encoding", value, .. } if value == refused),
                "{refused}: {e}"
            );
        }
        for ok in ["on", "ON", "true", "t", "yes", "y", "1"] {
            assert!(
                check(&s(&[("standard_conforming_strings", ok)])).is_ok(),
                "{ok}"
            );
        }
        for refused in ["off", "of", "o", "false", "0", "no", "", " on", "2"] {
            let options = format!(
                "-c standard_conforming_strings={}",
                refused.replace(' ', "\\ ")
            );
            for params in [
                s(&[("standard_conforming_strings", refused)]),
                s(&[("options", &options)]),
            ] {
                assert!(
                    matches!(
                        check(&params),
                        Err(ParamError::Value {
                            name: "standard_conforming_strings",
                            ..
                        })
                    ),
                    "{params:?}"
                );
            }
        }
        let long = "x".repeat(500);
        let Err(ParamError::Value { value, .. }) = check(&s(&[("client_encoding", &long)])) else {
            panic!("refused")
        };
        assert_eq!(value.len(), MAX_QUOTED_VALUE);
    }

    #[test]
    fn the_server_gets_options_first_then_the_packet_and_no_protocol_extension() {
        let checked = check(&s(&[
            ("user", "app"),
            ("database", "app"),
            ("replication", "database"),
            ("application_name", "psql"),
            ("_pq_.compression", "on"),
            ("options", "-c search_path=public -c application_name=early"),
            ("datestyle", "ISO, MDY"),
        ]))
        .unwrap();
        assert_eq!(
            checked.settings,
            vec![
                ("search_path", "public".to_string()),
                ("application_name", "early".to_string()),
                ("application_name", "psql".to_string()),
                ("DateStyle", "ISO, MDY".to_string()),
            ]
        );
        assert_eq!(
            checked.protocol_extensions,
            vec!["_pq_.compression".to_string()]
        );
        // Every `options` is checked; the server applies the last.
        let checked = check(&s(&[("options", "-c jit=off"), ("options", "-c geqo=off")])).unwrap();
        assert_eq!(checked.settings, vec![("geqo", "off".to_string())]);
        assert!(check(&s(&[("options", "-c role=x"), ("options", "-c geqo=off")])).is_err());
    }

    #[test]
    fn messages_name_the_parameter_and_not_a_refused_value() {
        let e = check(&s(&[("role", "secret-ish-value")])).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("`role`") && !text.contains("secret-ish"),
            "{text}"
        );
        let text = check(&s(&[("options", "--session-authorization=x")]))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("`session_authorization` (in `options`)"),
            "{text}"
        );
        let text = check(&s(&[("client_encoding", "SJIS")]))
            .unwrap_err()
            .to_string();
        assert!(text.contains("`client_encoding` = `SJIS`"), "{text}");
    }
}
