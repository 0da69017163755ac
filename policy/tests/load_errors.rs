//! A policy set with a mistake is rejected, and the error says where and what, so the operator
//! can fix it without guessing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail loudly"
)]

use std::path::Path;

use portcullis_policy::{PolicySet, Problem};

struct Row {
    name: &'static str,
    files: &'static [(&'static str, &'static str)],
    /// (file, line, column, part of the message) of the first problem.
    want: (&'static str, usize, usize, &'static str),
}

const MASKING: (&str, &str) = (
    "policies/masking.toml",
    "[profiles.pii]\n[[profiles.pii.rules]]\ncolumn = \"email\"\nmask = \"hash\"\n",
);

const UNKNOWN_TYPE_ON_LINE_12: &str = r#"// Production access.

@id("prod-read")
permit (principal, action == Portcullis::Action::"query", resource)
when { context.statement_class == "read" };

@id("prod-connect")
permit (principal, action == Portcullis::Action::"connect", resource);

@id("prod-users")
permit (
    principal is Usr,
    action,
    resource
);
"#;

fn rows() -> Vec<Row> {
    vec![
        Row {
            name: "unknown entity type",
            files: &[("policies/prod.cedar", UNKNOWN_TYPE_ON_LINE_12)],
            want: (
                "policies/prod.cedar",
                12,
                18,
                "policy `prod-users`: unrecognized entity type `Usr`",
            ),
        },
        Row {
            name: "unknown action",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\")\npermit (principal, action == Portcullis::Action::\"delete\", resource);",
            )],
            want: (
                "policies/p.cedar",
                2,
                30,
                "unrecognized action `Portcullis::Action::\"delete\"`",
            ),
        },
        Row {
            name: "misspelt context attribute",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\")\npermit (principal, action == Portcullis::Action::\"query\", resource)\nwhen { context.statment_class == \"read\" };",
            )],
            want: (
                "policies/p.cedar",
                3,
                8,
                "did you mean `statement_class`?",
            ),
        },
        Row {
            name: "context attribute of another action",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\")\npermit (principal, action == Portcullis::Action::\"connect\", resource)\nwhen { context.statement_class == \"read\" };",
            )],
            want: (
                "policies/p.cedar",
                3,
                8,
                "attribute `statement_class` in context for Portcullis::Action::\"connect\" not found",
            ),
        },
        Row {
            name: "optional attribute read without has",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\")\npermit (principal is Portcullis::User, action, resource)\n  when { principal.email == \"a@example.com\" };",
            )],
            want: (
                "policies/p.cedar",
                3,
                10,
                "optional attribute `email`",
            ),
        },
        Row {
            name: "label read without hasTag",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\")\npermit (principal, action, resource)\nwhen { resource.getTag(\"environment\") == \"production\" };",
            )],
            want: ("policies/p.cedar", 3, 8, "try testing for the tag's presence"),
        },
        Row {
            name: "syntax error",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\")\npermit (principal, action, resource)\n  when { context.hour == };",
            )],
            want: ("policies/p.cedar", 3, 26, "unexpected token `}`"),
        },
        Row {
            name: "missing semicolon at the end",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\")\npermit (principal, action, resource)",
            )],
            want: ("policies/p.cedar", 2, 37, "unexpected end of input"),
        },
        Row {
            name: "policy without an id",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\")\npermit (principal, action, resource);\n\npermit (principal, action, resource);",
            )],
            want: ("policies/p.cedar", 4, 1, "has no @id"),
        },
        Row {
            name: "unusable id",
            files: &[(
                "policies/p.cedar",
                "@id(\"read everything\") permit (principal, action, resource);",
            )],
            want: ("policies/p.cedar", 1, 1, "policy id `read everything` is not usable"),
        },
        Row {
            name: "duplicate id across files",
            files: &[
                ("policies/a.cedar", "@id(\"same\") permit (principal, action, resource);"),
                (
                    "policies/b.cedar",
                    "// second file\n@id(\"same\") forbid (principal, action, resource);",
                ),
            ],
            want: (
                "policies/b.cedar",
                2,
                1,
                "policy id `same` is already used at policies/a.cedar line 1, column 1",
            ),
        },
        Row {
            name: "unknown annotation",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\")\n@aproval(\"leads\")\npermit (principal, action, resource);",
            )],
            want: ("policies/p.cedar", 1, 1, "unknown annotation `@aproval`"),
        },
        Row {
            name: "mask names an unknown profile",
            files: &[
                MASKING,
                (
                    "policies/p.cedar",
                    "@id(\"a\") @mask(\"pci\") permit (principal, action, resource);",
                ),
            ],
            want: (
                "policies/p.cedar",
                1,
                1,
                "@mask(\"pci\") names an unknown masking profile; known profiles: pii",
            ),
        },
        Row {
            name: "approval on a forbid",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\") @approval(\"leads\") forbid (principal, action, resource);",
            )],
            want: ("policies/p.cedar", 1, 1, "@approval only belongs on a permit policy"),
        },
        Row {
            name: "approvals not a number",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\") @approval(\"leads\") @approvals(\"two\") permit (principal, action, resource);",
            )],
            want: ("policies/p.cedar", 1, 1, "@approvals(\"two\") must be a number from 1 to 20"),
        },
        Row {
            name: "approvals without approval",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\") @approvals(\"2\") permit (principal, action, resource);",
            )],
            want: ("policies/p.cedar", 1, 1, "@approvals needs @approval"),
        },
        Row {
            name: "approvals list with approval next to it",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\") @approval(\"leads\") @approvals(\"leads:1,security:1\") permit (principal, action, resource);",
            )],
            want: ("policies/p.cedar", 1, 1, "names its groups itself; drop @approval"),
        },
        Row {
            name: "approvals list entry without a count",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\") @approvals(\"leads:1,security\") permit (principal, action, resource);",
            )],
            want: ("policies/p.cedar", 1, 1, "`security` is not `group:count`"),
        },
        Row {
            name: "approvals list count out of range",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\") @approvals(\"leads:0,security:1\") permit (principal, action, resource);",
            )],
            want: ("policies/p.cedar", 1, 1, "the count of `leads` must be a number from 1 to 20"),
        },
        Row {
            name: "approvals list names a group twice",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\") @approvals(\"leads:1,leads:2\") permit (principal, action, resource);",
            )],
            want: ("policies/p.cedar", 1, 1, "`leads` is listed twice"),
        },
        Row {
            name: "approvals list names a group outside approver_groups",
            files: &[
                ("policies/approvals.toml", "approver_groups = [\"dba-leads\"]\n"),
                (
                    "policies/p.cedar",
                    "@id(\"a\") @approvals(\"dba-leads:1,securty:1\") permit (principal, action, resource);",
                ),
            ],
            want: ("policies/p.cedar", 1, 1, "`securty` is not in approver_groups"),
        },
        Row {
            name: "bare approval without a default group",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\") @approval permit (principal, action, resource);",
            )],
            want: ("policies/p.cedar", 1, 1, "sets no default_approver_group"),
        },
        Row {
            name: "approval names a group outside approver_groups",
            files: &[
                ("policies/approvals.toml", "approver_groups = [\"dba-leads\"]\n"),
                (
                    "policies/p.cedar",
                    "@id(\"a\") @approval(\"dba-lead\") permit (principal, action, resource);",
                ),
            ],
            want: ("policies/p.cedar", 1, 1, "not in approver_groups"),
        },
        Row {
            name: "template",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\") permit (principal, action, resource);\n@id(\"t\") permit (principal == ?principal, action, resource);",
            )],
            want: ("policies/p.cedar", 2, 1, "policy `t` is a template"),
        },
        Row {
            name: "bidirectional control characters",
            files: &[(
                "policies/p.cedar",
                "@id(\"a\") permit (principal, action == Portcullis::Action::\"query\", resource)\nwhen { context.db_name == \"app\u{202e}\" };",
            )],
            want: ("policies/p.cedar", 2, 27, "BIDI control characters"),
        },
        Row {
            name: "unknown masking key",
            files: &[(
                "policies/masking.toml",
                "[profiles.pii]\n[[profiles.pii.rules]]\ncolumn = \"x\"\nmask = \"partial\"\nkepp_last = 4\n",
            )],
            want: ("policies/masking.toml", 5, 1, "key `kepp_last`: unknown field `kepp_last`"),
        },
        Row {
            name: "unknown mask kind",
            files: &[(
                "policies/masking.toml",
                "[profiles.pii]\n[[profiles.pii.rules]]\ncolumn = \"x\"\nmask = \"scramble\"\n",
            )],
            want: ("policies/masking.toml", 4, 8, "key `mask`: unknown variant `scramble`"),
        },
        Row {
            name: "invalid column regex",
            files: &[(
                "policies/masking.toml",
                "[profiles.pii]\n[[profiles.pii.rules]]\ncolumn_regex = \"(card\"\nmask = \"hash\"\n",
            )],
            want: (
                "policies/masking.toml",
                3,
                16,
                "key `column_regex`: not a valid regular expression: unclosed group",
            ),
        },
        Row {
            name: "partial mask that keeps nothing",
            files: &[(
                "policies/masking.toml",
                "[profiles.pii]\n[[profiles.pii.rules]]\ncolumn = \"card\"\nmask = \"partial\"\n",
            )],
            want: ("policies/masking.toml", 4, 8, "needs `keep_first` or `keep_last`"),
        },
        Row {
            name: "rule with both column and column_regex",
            files: &[(
                "policies/masking.toml",
                "[profiles.pii]\n[[profiles.pii.rules]]\ncolumn = \"a\"\ncolumn_regex = \"b\"\nmask = \"hash\"\n",
            )],
            want: ("policies/masking.toml", 5, 8, "exactly one of `column` and `column_regex`"),
        },
        Row {
            name: "profile without rules",
            files: &[("policies/masking.toml", "\n[profiles.pii]\ndescription = \"x\"\n")],
            want: ("policies/masking.toml", 2, 11, "masking profile `pii` has no rules"),
        },
        Row {
            name: "approval setting of the wrong type",
            files: &[("policies/approvals.toml", "\ntimeout_seconds = \"soon\"\n")],
            want: (
                "policies/approvals.toml",
                2,
                19,
                "key `timeout_seconds`: invalid type: string \"soon\", expected u64",
            ),
        },
        Row {
            name: "approval setting out of range",
            files: &[("policies/approvals.toml", "default_approvals = 0\n")],
            want: ("policies/approvals.toml", 1, 21, "key `default_approvals`: 0 is out of range"),
        },
        Row {
            name: "toml syntax error",
            files: &[("policies/approvals.toml", "timeout_seconds = = 3\n")],
            want: ("policies/approvals.toml", 1, 19, "key `timeout_seconds`: invalid string"),
        },
    ]
}

#[test]
fn broken_policy_sets_are_rejected_with_their_location() {
    let mut failures = Vec::new();
    for row in rows() {
        let error = match PolicySet::load(row.files.iter().copied()) {
            Ok(_) => {
                failures.push(format!("{}: loaded", row.name));
                continue;
            }
            Err(error) => error,
        };
        let first = &error.problems()[0];
        let (file, line, column, message) = row.want;
        let at = first.location().expect("problem has a location");
        let text = first.to_string();
        if at.file != Path::new(file)
            || at.line != line
            || at.column != column
            || !text.contains(message)
        {
            failures.push(format!(
                "{}: got {text:?}, want {file} line {line}, column {column}: …{message}…",
                row.name
            ));
        }
        if !error.to_string().contains(&text) {
            failures.push(format!(
                "{}: the load error does not show the problem",
                row.name
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn message_reads_like_the_operator_guide() {
    let error = PolicySet::load([("policies/prod.cedar", UNKNOWN_TYPE_ON_LINE_12)]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "policy set rejected: policies/prod.cedar line 12, column 18: policy `prod-users`: \
         unrecognized entity type `Usr`; did you mean `Portcullis::User`?"
    );
}

#[test]
fn every_problem_of_every_file_is_reported_at_once() {
    let error = PolicySet::load([
        ("p/a.cedar", "permit (principal, action, resource);"),
        (
            "p/b.cedar",
            "@id(\"b\") permit (principal is Usr, action, resource);",
        ),
        (
            "p/c.cedar",
            "@id(\"c\") permit (principal, action, resource",
        ),
        ("p/masking.toml", "[profile.pii]\n"),
    ])
    .unwrap_err();
    let files: Vec<String> = error
        .problems()
        .iter()
        .filter_map(|p| p.location())
        .map(|at| at.file.display().to_string())
        .collect();
    assert_eq!(
        files,
        ["p/masking.toml", "p/a.cedar", "p/c.cedar", "p/b.cedar"],
        "{error}"
    );
}

#[test]
fn misnamed_settings_file_is_rejected_not_ignored() {
    let error = PolicySet::load([("p/approval.toml", "timeout_seconds = 60\n")]).unwrap_err();
    assert!(matches!(
        error.problems(),
        [Problem::UnexpectedFile { file }] if file == Path::new("p/approval.toml")
    ));
}

#[test]
fn same_file_twice_is_rejected() {
    let error = PolicySet::load([
        (
            "p/a.cedar",
            "@id(\"a\") permit (principal, action, resource);",
        ),
        (
            "p/a.cedar",
            "@id(\"b\") permit (principal, action, resource);",
        ),
    ])
    .unwrap_err();
    assert!(matches!(error.problems(), [Problem::DuplicateFile { .. }]));
}

#[test]
fn policy_that_can_never_apply_loads_with_a_warning() {
    let set = PolicySet::load([(
        "p/a.cedar",
        "@id(\"never\") permit (principal, action == Portcullis::Action::\"connect\", resource) when { 1 == 2 };",
    )])
    .unwrap();
    assert_eq!(set.warnings().len(), 1);
    assert!(set.warnings()[0].to_string().contains("policy `never`"));
}

#[test]
fn empty_directory_loads_and_denies_everything() {
    let set = PolicySet::load(Vec::<(String, String)>::new()).unwrap();
    assert!(set.is_empty());
}
