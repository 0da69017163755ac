//! The masking engine: what each content detector finds and what it leaves alone, how each
//! mask kind rewrites a value, which values can be masked in which wire format (and that a
//! selected value that cannot be masked is an error, never passed through), which rule plans a
//! column, and the load errors of masking rules.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail loudly"
)]

use std::path::Path;

use portcullis_policy::{
    ColumnOrigin, ColumnPlan, Masker, MaskingProfile, PolicySet, Problem, FORMAT_BINARY,
    FORMAT_TEXT,
};

const TEXT: u32 = 25;
const VARCHAR: u32 = 1043;
const INT4: u32 = 23;
const INT8: u32 = 20;
const BYTEA: u32 = 17;
const JSON: u32 = 114;
const JSONB: u32 = 3802;
/// An extension type such as citext: its OID is assigned at CREATE EXTENSION.
const EXTENSION_TYPE: u32 = 16_500;

const KEY: &[u8] = b"agent-secret";

/// Loads `masking` as the masking.toml of a policy set and returns its profile `t`.
fn profile(masking: &str) -> MaskingProfile {
    let set = PolicySet::load([
        ("p/masking.toml", masking),
        (
            "p/a.cedar",
            "@id(\"a\") @mask(\"t\") permit (principal, action, resource);",
        ),
    ])
    .unwrap_or_else(|error| panic!("{error}\n{masking}"));
    set.masking_profile("t").expect("profile t").clone()
}

fn masker(masking: &str) -> Masker {
    Masker::new(&profile(masking), KEY)
}

/// Every built-in detector, each redacting to its own marker so a row shows which one fired.
fn every_detector() -> Masker {
    let mut text = String::from("[profiles.t]\n");
    for (detector, marker) in [
        ("card_number", "<card>"),
        ("email", "<email>"),
        ("national_id", "<ssn>"),
        ("iban", "<iban>"),
        ("phone", "<phone>"),
    ] {
        text.push_str(&format!(
            "[[profiles.t.rules]]\ndetector = \"{detector}\"\nmask = \"redact\"\nreplacement = \"{marker}\"\n"
        ));
    }
    text.push_str(
        "[[profiles.t.rules]]\ndetector = \"regex\"\npattern = '\\bEMP-\\d{6}\\b'\nmask = \"redact\"\nreplacement = \"<regex>\"\n",
    );
    masker(&text)
}

#[test]
fn detectors_mask_what_they_find_and_leave_look_alikes() {
    // (what the row shows, input, expected output; None = unchanged)
    let rows: &[(&str, &str, Option<&str>)] = &[
        // Card numbers.
        ("visa, contiguous", "4111111111111111", Some("<card>")),
        ("visa, spaces", "4111 1111 1111 1111", Some("<card>")),
        ("visa, dashes", "4111-1111-1111-1111", Some("<card>")),
        (
            "card inside text",
            "paid with 4111 1111 1111 1111 today",
            Some("paid with <card> today"),
        ),
        ("amex 15 digits", "378282246310005", Some("<card>")),
        ("amex grouping", "3782 822463 10005", Some("<card>")),
        ("mastercard", "5555555555554444", Some("<card>")),
        (
            "card then punctuation",
            "card: 6011111111111117.",
            Some("card: <card>."),
        ),
        (
            "card after a shorter number",
            "order 12 4111 1111 1111 1111",
            Some("order 12 <card>"),
        ),
        ("luhn-invalid 16 digits", "4111111111111112", None),
        (
            "mixed separators are not one number",
            "4111 1111-1111 1111",
            None,
        ),
        (
            "double space breaks the grouping",
            "4111  1111 1111 1111",
            None,
        ),
        (
            "card digits inside a longer number",
            "41111111111111111111111",
            None,
        ),
        ("12 digits are too few", "411111111111", None),
        ("timestamp", "2024-01-15 10:30:00.123456+00", None),
        // Emails.
        ("email alone", "alice@example.com", Some("<email>")),
        (
            "email in a sentence",
            "write to alice.smith+tag@mail.example.co.uk, thanks",
            Some("write to <email>, thanks"),
        ),
        (
            "email then full stop",
            "from bob@example.org.",
            Some("from <email>."),
        ),
        (
            "hyphenated domain",
            "ops@sub-domain.example.io",
            Some("<email>"),
        ),
        (
            "double dot starts the local part after it",
            "x..y@example.com",
            Some("x..<email>"),
        ),
        ("host without a dot", "root@localhost", None),
        ("ip literal domain", "root@192.0.2.1", None),
        ("no local part", "@example.com", None),
        ("spaced at sign", "a @ b.com", None),
        // US SSNs.
        ("ssn", "123-45-6789", Some("<ssn>")),
        ("ssn in text", "SSN: 078-05-1120.", Some("SSN: <ssn>.")),
        ("ssn area 666 never issued", "666-12-3456", None),
        ("ssn area 000 never issued", "000-12-3456", None),
        ("ssn area 9xx never issued", "912-12-3456", None),
        ("ssn group 00 never issued", "123-00-4567", None),
        ("ssn serial 0000 never issued", "123-45-0000", None),
        ("ssn inside a longer number", "1123-45-6789", None),
        ("ssn followed by more digits", "123-45-67890", None),
        ("ssn continuing a dashed number", "1-123-45-6789", None),
        ("nine digits without dashes", "123456789", None),
        // IBANs.
        (
            "iban grouped",
            "GB82 WEST 1234 5698 7654 32",
            Some("<iban>"),
        ),
        ("iban compact", "GB82WEST12345698765432", Some("<iban>")),
        (
            "iban germany",
            "DE89 3704 0044 0532 0130 00",
            Some("<iban>"),
        ),
        (
            "iban with a short last group in text",
            "pay FR14 2004 1010 0505 0001 3M02 606 now",
            Some("pay <iban> now"),
        ),
        (
            "iban with bad checksum",
            "GB82 WEST 1234 5698 7654 33",
            None,
        ),
        ("iban inside a word", "XGB82WEST12345698765432", None),
        ("lower-case iban", "gb82west12345698765432", None),
        // Phone numbers.
        ("e164 with grouping", "+1 (415) 555-2671", Some("<phone>")),
        ("e164 compact", "+14155552671", Some("<phone>")),
        (
            "e164 uk",
            "call +44 20 7946 0958 today",
            Some("call <phone> today"),
        ),
        (
            "north american with parentheses",
            "call (415) 555-2671 now",
            Some("call <phone> now"),
        ),
        ("north american dashes", "415-555-2671", Some("<phone>")),
        ("north american dots", "415.555.2671", Some("<phone>")),
        ("area code starting with 1", "(115) 555-2671", None),
        ("exchange starting with 1", "415-155-2671", None),
        (
            "north american inside a longer number",
            "1415-555-2671",
            None,
        ),
        ("north american followed by digits", "415-555-26710", None),
        ("e164 with 7 digits", "+1234567", None),
        ("e164 country code 0", "+0 123 456 789", None),
        ("plus after a digit", "2+12345678", None),
        // Operator pattern.
        (
            "regex detector",
            "employee EMP-123456 left",
            Some("employee <regex> left"),
        ),
        ("regex detector respects its anchors", "EMP-1234567", None),
        // Several in one value.
        (
            "card and email together",
            "alice@example.com paid 4111111111111111",
            Some("<email> paid <card>"),
        ),
    ];
    assert!(rows.len() >= 40);
    let masker = every_detector();
    let mut failures = Vec::new();
    for (name, input, want) in rows {
        let got = masker.mask_text(input);
        if got.as_deref() != *want {
            failures.push(format!("{name}: {input:?} gave {got:?}, want {want:?}"));
        }
        // A column value in text format goes through the same detectors.
        let value = masker
            .mask_value(
                &ColumnPlan::ContentOnly,
                FORMAT_TEXT,
                TEXT,
                input.as_bytes(),
            )
            .unwrap();
        if value.as_deref() != want.map(str::as_bytes) {
            failures.push(format!("{name}: as a text column value gave {value:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

const CARD_PARTIAL: &str = "[profiles.t]\n[[profiles.t.rules]]\ndetector = \"card_number\"\nmask = \"partial\"\nkeep_last = 4\n";

#[test]
fn partial_mask_on_a_detected_card_keeps_separators_and_last_digits() {
    let masker = masker(CARD_PARTIAL);
    assert_eq!(
        masker
            .mask_text("paid with 4111 1111 1111 1111 today")
            .as_deref(),
        Some("paid with **** **** **** 1111 today")
    );
    assert_eq!(
        masker.mask_text("4111111111111111").as_deref(),
        Some("************1111")
    );
    assert_eq!(masker.mask_text("nothing to see"), None);
}

fn whole(mask: &str) -> Masker {
    masker(&format!(
        "[profiles.t]\n[[profiles.t.rules]]\ncolumn = \"secret\"\n{mask}\n"
    ))
}

fn mask_whole_text(masker: &Masker, value: &str) -> String {
    let plan = masker.plan_column("secret", None);
    let masked = masker
        .mask_value(&plan, FORMAT_TEXT, TEXT, value.as_bytes())
        .unwrap()
        .expect("a selected column is always rewritten");
    String::from_utf8(masked).unwrap()
}

#[test]
fn partial_mask_counts_characters_not_bytes() {
    let masker = whole("mask = \"partial\"\nkeep_first = 1\nkeep_last = 1");
    assert_eq!(mask_whole_text(&masker, "Zoë Ångström"), "Z**********m");
    assert_eq!(mask_whole_text(&masker, "日本語テキスト"), "日*****ト");
    assert_eq!(
        mask_whole_text(&masker, "ab"),
        "**",
        "too short to keep anything"
    );
    let last4 = whole("mask = \"partial\"\nkeep_last = 4");
    assert_eq!(
        mask_whole_text(&last4, "4111111111111111"),
        "************1111"
    );
    assert_eq!(
        mask_whole_text(&last4, "1234"),
        "****",
        "never shows a whole value"
    );
}

#[test]
fn partial_mask_of_text_that_is_not_utf8_works_a_byte_at_a_time() {
    // "Müller" in LATIN1, as a client with client_encoding LATIN1 receives it.
    let masker = whole("mask = \"partial\"\nkeep_first = 1");
    let plan = masker.plan_column("secret", None);
    let masked = masker
        .mask_value(&plan, FORMAT_TEXT, TEXT, b"M\xfcller")
        .unwrap();
    assert_eq!(masked.as_deref(), Some(&b"M*****"[..]));
}

#[test]
fn hash_is_a_keyed_hmac_stable_across_runs() {
    let masker = whole("mask = \"hash\"");
    // HMAC-SHA256("agent-secret", value), first 16 hex digits, computed independently.
    assert_eq!(
        mask_whole_text(&masker, "alice@example.com"),
        "h:fe7a17971ab9a04f"
    );
    assert_eq!(
        mask_whole_text(&masker, "4111111111111111"),
        "h:fb02fd45b1302e49"
    );
    let other_key = Masker::new(
        &profile("[profiles.t]\n[[profiles.t.rules]]\ncolumn = \"secret\"\nmask = \"hash\"\n"),
        b"another",
    );
    let plan = other_key.plan_column("secret", None);
    let masked = other_key
        .mask_value(&plan, FORMAT_TEXT, TEXT, b"alice@example.com")
        .unwrap()
        .unwrap();
    assert_ne!(masked, b"h:fe7a17971ab9a04f");
    // Keys longer than SHA-256's block are hashed first, as RFC 2104 says.
    let long_key = Masker::new(
        &profile("[profiles.t]\n[[profiles.t.rules]]\ncolumn = \"secret\"\nmask = \"hash\"\n"),
        &[b'k'; 100],
    );
    let masked = long_key
        .mask_value(&plan, FORMAT_TEXT, TEXT, b"alice@example.com")
        .unwrap()
        .unwrap();
    assert_eq!(masked, b"h:da52fd927659ee91");
}

#[test]
fn hash_of_a_detected_span_hashes_only_the_match() {
    let masker =
        masker("[profiles.t]\n[[profiles.t.rules]]\ndetector = \"email\"\nmask = \"hash\"\n");
    assert_eq!(
        masker.mask_text("from alice@example.com:").as_deref(),
        Some("from h:fe7a17971ab9a04f:")
    );
}

#[test]
fn redact_replaces_the_whole_value() {
    assert_eq!(
        mask_whole_text(&whole("mask = \"redact\""), "anything"),
        "****"
    );
    let custom = whole("mask = \"redact\"\nreplacement = \"[hidden]\"");
    assert_eq!(mask_whole_text(&custom, "anything"), "[hidden]");
}

#[test]
fn text_types_are_masked_in_binary_format_too() {
    let masker = whole("mask = \"partial\"\nkeep_last = 2");
    let plan = masker.plan_column("secret", None);
    for oid in [TEXT, VARCHAR, 1042, 19, 705] {
        let masked = masker
            .mask_value(&plan, FORMAT_BINARY, oid, "Ångström".as_bytes())
            .unwrap();
        assert_eq!(masked.as_deref(), Some("******öm".as_bytes()), "type {oid}");
    }
}

#[test]
fn whole_json_values_become_json_strings() {
    let masker = whole("mask = \"partial\"\nkeep_last = 4");
    let plan = masker.plan_column("secret", None);
    let text = masker
        .mask_value(&plan, FORMAT_TEXT, JSON, br#""4111111111111111""#)
        .unwrap();
    assert_eq!(text.as_deref(), Some(&br#""************1111""#[..]));
    let object = masker
        .mask_value(&plan, FORMAT_TEXT, JSONB, br#"{"a": "b"}"#)
        .unwrap();
    assert_eq!(object.as_deref(), Some(&br#""******\"b\"}""#[..]));
    // jsonb in binary: the version byte, then the text.
    let binary = masker
        .mask_value(&plan, FORMAT_BINARY, JSONB, b"\x01\"4111111111111111\"")
        .unwrap();
    assert_eq!(binary.as_deref(), Some(&b"\x01\"************1111\""[..]));
}

#[test]
fn detectors_rewrite_json_so_it_still_parses() {
    let masker = masker(CARD_PARTIAL);
    let inside_string = masker
        .mask_value(
            &ColumnPlan::ContentOnly,
            FORMAT_BINARY,
            JSONB,
            b"\x01{\"note\": \"paid 4111-1111-1111-1111\"}",
        )
        .unwrap();
    assert_eq!(
        inside_string.as_deref(),
        Some(&b"\x01{\"note\": \"paid ****-****-****-1111\"}"[..])
    );
    let bare_number = masker
        .mask_value(
            &ColumnPlan::ContentOnly,
            FORMAT_TEXT,
            JSON,
            br#"{"pan": 4111111111111111, "n": "x"}"#,
        )
        .unwrap();
    assert_eq!(
        bare_number.as_deref(),
        Some(&br#"{"pan": "************1111", "n": "x"}"#[..])
    );
}

#[test]
fn whole_column_mask_of_a_binary_non_text_value_is_refused() {
    let masker = whole("mask = \"redact\"");
    let plan = masker.plan_column("secret", None);
    for oid in [INT4, INT8, BYTEA, 1700, 1082, EXTENSION_TYPE] {
        let error = masker
            .mask_value(&plan, FORMAT_BINARY, oid, &[0, 0, 0, 42])
            .expect_err("unmasked data never leaves");
        assert!(error.reason.contains("binary format"), "{error}");
        assert!(error.reason.contains("profile `t`"), "{error}");
    }
    // In text format every type can be replaced (the client may fail to parse `****` as a
    // number, which is its error, not a leak).
    let text = masker.mask_value(&plan, FORMAT_TEXT, INT4, b"42").unwrap();
    assert_eq!(text.as_deref(), Some(&b"****"[..]));
    assert!(
        masker.mask_value(&plan, 2, TEXT, b"x").is_err(),
        "unknown format code"
    );
}

#[test]
fn detectors_skip_values_that_cannot_hold_text() {
    let masker = masker(CARD_PARTIAL);
    let plan = ColumnPlan::ContentOnly;
    // Numbers, dates and bytea: detectors apply to textual data (select such columns by
    // column rule); bytea's hex text would otherwise be corrupted by chance matches.
    for (format, oid, value) in [
        (FORMAT_TEXT, INT8, &b"4111111111111111"[..]),
        (
            FORMAT_BINARY,
            INT8,
            &b"\x00\x0e\x9a\x1b\xe5\xb1\x8e\x07"[..],
        ),
        (FORMAT_TEXT, BYTEA, &b"\\x4111111111111111"[..]),
        (FORMAT_BINARY, BYTEA, &b"4111111111111111"[..]),
    ] {
        assert_eq!(
            masker.mask_value(&plan, format, oid, value),
            Ok(None),
            "type {oid}"
        );
    }
}

#[test]
fn binary_values_of_unknown_layout_pass_only_if_nothing_is_found() {
    let masker = masker(CARD_PARTIAL);
    let plan = ColumnPlan::ContentOnly;
    assert_eq!(
        masker.mask_value(&plan, FORMAT_BINARY, EXTENSION_TYPE, b"nothing here"),
        Ok(None)
    );
    let error = masker
        .mask_value(
            &plan,
            FORMAT_BINARY,
            EXTENSION_TYPE,
            b"card 4111111111111111",
        )
        .expect_err("cannot be rewritten, must not be sent");
    assert!(error.reason.contains("card_number"), "{error}");
    // The same type in text format is text, and is masked.
    let text = masker
        .mask_value(&plan, FORMAT_TEXT, EXTENSION_TYPE, b"card 4111111111111111")
        .unwrap();
    assert_eq!(text.as_deref(), Some(&b"card ************1111"[..]));
}

const PRECEDENCE: &str = r#"
[profiles.t]
[[profiles.t.rules]]
detector = "email"
mask = "hash"

[[profiles.t.rules]]
column = "email"
mask = "hash"

[[profiles.t.rules]]
table_column = "public.users.email"
mask = "redact"

[[profiles.t.rules]]
column_regex = "mail"
mask = "partial"
keep_first = 1

[[profiles.t.rules]]
table_column = "users.phone"
mask = "redact"
"#;

#[test]
fn first_column_rule_that_selects_a_column_plans_it() {
    let masker = masker(PRECEDENCE);
    assert!(masker.needs_column_origins());
    // (label, the table column it is read from, plan). A name rule selects by the label or by
    // the origin's column name, so rule 1 (`column = "email"`) comes before rule 2 for every
    // column read from an `email` column, whatever its label.
    let rows: &[(&str, Option<&str>, ColumnPlan)] = &[
        (
            "email",
            Some("public.users.email"),
            ColumnPlan::Whole { rule: 1 },
        ),
        ("EMAIL", None, ColumnPlan::Whole { rule: 1 }),
        (
            "contact",
            Some("public.users.email"),
            ColumnPlan::Whole { rule: 1 },
        ),
        (
            "contact",
            Some("PUBLIC.Users.EMAIL"),
            ColumnPlan::Whole { rule: 1 },
        ),
        (
            "mailbox",
            Some("public.users.email"),
            ColumnPlan::Whole { rule: 1 },
        ),
        ("mailbox", None, ColumnPlan::Whole { rule: 3 }),
        // Another schema's email column: still an email by name.
        (
            "contact",
            Some("crm.users.email"),
            ColumnPlan::Whole { rule: 1 },
        ),
        // Read from a column the regex selects, under a label it does not.
        (
            "c",
            Some("crm.users.mailbox"),
            ColumnPlan::Whole { rule: 3 },
        ),
        (
            "contact",
            Some("crm.users.contact"),
            ColumnPlan::ContentOnly,
        ),
        ("contact", None, ColumnPlan::ContentOnly),
        // `users.phone` is in schema public.
        (
            "p",
            Some("public.users.phone"),
            ColumnPlan::Whole { rule: 4 },
        ),
        ("p", Some("crm.users.phone"), ColumnPlan::ContentOnly),
        ("p", Some("public.users.phone2"), ColumnPlan::ContentOnly),
    ];
    for (name, qualified, want) in rows {
        assert_eq!(
            masker.plan_column(name, qualified.map(origin)),
            *want,
            "{name} {qualified:?}"
        );
    }
}

/// The origin of a result column read from `schema.table.column`.
fn origin(qualified: &str) -> ColumnOrigin<'_> {
    ColumnOrigin {
        qualified,
        column: qualified.rsplit('.').next().unwrap(),
    }
}

#[test]
fn columns_no_rule_can_touch_cost_nothing() {
    let masker = whole("mask = \"hash\"");
    // A name rule may select a column under any label: where each is read from is needed.
    assert!(masker.needs_column_origins());
    let plan = masker.plan_column("name", Some(origin("public.users.name")));
    assert_eq!(plan, ColumnPlan::Untouched);
    assert_eq!(
        masker.mask_value(&plan, FORMAT_BINARY, INT4, &[0, 0, 0, 1]),
        Ok(None)
    );
    assert_eq!(masker.mask_text("alice@example.com 4111111111111111"), None);
}

#[test]
fn a_plan_from_another_profile_fails_closed() {
    let masker = whole("mask = \"hash\"");
    let error = masker
        .mask_value(&ColumnPlan::Whole { rule: 7 }, FORMAT_TEXT, TEXT, b"x")
        .unwrap_err();
    assert!(error.reason.contains("rule 7"), "{error}");
}

#[test]
fn masker_is_shared_across_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Masker>();
    let masker = whole("mask = \"hash\"");
    assert!(!format!("{masker:?}").contains("agent-secret"));
}

#[test]
fn analysts_example_masks_tables_and_card_numbers_in_text() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/analysts");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| portcullis_policy::is_policy_set_file(path))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            (path, text)
        })
        .collect();
    let set = PolicySet::load(files).unwrap();
    let masker = Masker::new(set.masking_profile("pii").unwrap(), KEY);
    assert!(masker.needs_column_origins());
    let plan = masker.plan_column("ref", Some(origin("billing.customers.tax_id")));
    assert_eq!(
        masker.mask_value(&plan, FORMAT_TEXT, TEXT, b"12-3456789"),
        Ok(Some(b"[tax id]".to_vec()))
    );
    assert_eq!(
        masker.mask_text("paid with 4111 1111 1111 1111").as_deref(),
        Some("paid with **** **** **** 1111")
    );
}

#[test]
fn bad_masking_rules_are_rejected_with_their_line() {
    let rule = |body: &str| format!("[profiles.t]\n[[profiles.t.rules]]\n{body}");
    // (name, rule body from line 3, line, column, part of the message)
    let rows: &[(&str, &str, usize, usize, &str)] = &[
        (
            "column and detector",
            "column = \"a\"\ndetector = \"email\"\nmask = \"hash\"\n",
            5,
            8,
            "needs exactly one of `column` and `detector`",
        ),
        (
            "three selectors",
            "column = \"a\"\ntable_column = \"t.a\"\ndetector = \"email\"\nmask = \"hash\"\n",
            6,
            8,
            "needs exactly one of `column`, `table_column` and `detector`",
        ),
        ("no selector", "mask = \"hash\"\n", 3, 8, "selects nothing"),
        (
            "unknown detector",
            "detector = \"ssn\"\nmask = \"hash\"\n",
            3,
            12,
            "key `detector`: unknown variant `ssn`",
        ),
        (
            "regex detector without pattern",
            "detector = \"regex\"\nmask = \"hash\"\n",
            3,
            12,
            "the `regex` detector needs a `pattern`",
        ),
        (
            "pattern on a built-in detector",
            "detector = \"card_number\"\npattern = \"x\"\nmask = \"hash\"\n",
            4,
            11,
            "key `pattern`: only `detector = \"regex\"` takes a pattern",
        ),
        (
            "pattern on a column rule",
            "column = \"a\"\npattern = \"x\"\nmask = \"hash\"\n",
            4,
            11,
            "only `detector = \"regex\"` takes a pattern",
        ),
        (
            "invalid pattern",
            "detector = \"regex\"\npattern = \"(EMP\"\nmask = \"hash\"\n",
            4,
            11,
            "key `pattern`: not a valid regular expression: unclosed group",
        ),
        (
            "pattern matching the empty string",
            "detector = \"regex\"\npattern = \"x*\"\nmask = \"hash\"\n",
            4,
            11,
            "matches the empty string",
        ),
        (
            "table_column with four parts",
            "table_column = \"a.b.c.d\"\nmask = \"hash\"\n",
            3,
            16,
            "key `table_column`: `a.b.c.d` is not `table.column` or `schema.table.column`",
        ),
        (
            "table_column without a table",
            "table_column = \"email\"\nmask = \"hash\"\n",
            3,
            16,
            "is not `table.column`",
        ),
        (
            "table_column with an empty part",
            "table_column = \"public..email\"\nmask = \"hash\"\n",
            3,
            16,
            "is not `table.column`",
        ),
        (
            "partial that keeps a whole card number",
            "detector = \"card_number\"\nmask = \"partial\"\nkeep_first = 6\nkeep_last = 7\n",
            6,
            13,
            "keeping 13 characters of a card number",
        ),
        (
            "partial that keeps a whole ssn",
            "detector = \"national_id\"\nmask = \"partial\"\nkeep_first = 9\n",
            5,
            14,
            "would show whole values",
        ),
        (
            "partial that keeps too much",
            "column = \"a\"\nmask = \"partial\"\nkeep_first = 40\nkeep_last = 40\n",
            4,
            8,
            "keep at most 64",
        ),
        (
            "keep_last on a hash",
            "detector = \"email\"\nmask = \"hash\"\nkeep_last = 2\n",
            5,
            13,
            "key `keep_last`: only a `partial` mask keeps characters",
        ),
        (
            "misspelt key",
            "detektor = \"email\"\nmask = \"hash\"\n",
            3,
            1,
            "key `detektor`: unknown field `detektor`",
        ),
    ];
    let mut failures = Vec::new();
    for (name, body, line, column, message) in rows {
        let text = rule(body);
        let error = match PolicySet::load([("p/masking.toml", text.as_str())]) {
            Ok(_) => {
                failures.push(format!("{name}: loaded"));
                continue;
            }
            Err(error) => error,
        };
        let first = &error.problems()[0];
        let shown = first.to_string();
        let at = first.location().unwrap();
        let right = matches!(first, Problem::Settings { .. })
            && at.file == Path::new("p/masking.toml")
            && at.line == *line
            && at.column == *column
            && shown.contains(message);
        if !right {
            failures.push(format!(
                "{name}: got {shown:?}, want line {line}, column {column}: …{message}…"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn computed_columns_are_masked_by_what_they_are_computed_from() {
    let columns = masker(
        r#"
[[profiles.t.rules]]
column = "email"
mask = "redact"

[[profiles.t.rules]]
table_column = "public.customers.name"
mask = "hash"

[[profiles.t.rules]]
detector = "card_number"
mask = "redact"
"#,
    );
    let email = ColumnPlan::Whole { rule: 0 };
    let name = ColumnPlan::Whole { rule: 1 };
    type Sources = Vec<(Option<&'static str>, Option<&'static str>)>;
    let rows: Vec<(Sources, ColumnPlan)> = vec![
        // lower(email), from any table.
        (vec![(Some("orders"), Some("email"))], email),
        (vec![(None, Some("Email"))], email),
        // upper(name) from customers, written with or without schema, or from an unknown table.
        (vec![(Some("customers"), Some("name"))], name),
        (vec![(Some("public.customers"), Some("name"))], name),
        (vec![(None, Some("name"))], name),
        // Another table's name, another schema's customers: not selected.
        (
            vec![(Some("products"), Some("name"))],
            ColumnPlan::ContentOnly,
        ),
        (
            vec![(Some("archive.customers"), Some("name"))],
            ColumnPlan::ContentOnly,
        ),
        // A whole row may hold an `email` column: the name rule, first in file order.
        (vec![(Some("products"), None)], email),
        (vec![(None, None)], email),
        // Several sources: the first rule in file order that selects any of them.
        (
            vec![(Some("customers"), Some("name")), (None, Some("email"))],
            email,
        ),
        // Values sampled from every analyzed column (pg_stats' histogram_bounds and
        // most_common_vals, pg_stats_ext's MCV lists): the first column rule, whatever it
        // names.
        (vec![(Some("pg_statistic"), Some("stavalues1"))], email),
        (
            vec![(Some("pg_catalog.pg_statistic"), Some("stavalues5"))],
            email,
        ),
        (vec![(None, Some("stavalues2"))], email),
        (
            vec![(Some("pg_statistic_ext_data"), Some("stxdmcv"))],
            email,
        ),
        (vec![(None, Some("stxdexpr"))], email),
        (vec![(Some("pg_statistic_ext_data"), None)], email),
        // The views that show them, read in a computed value.
        (
            vec![(Some("pg_catalog.pg_stats"), Some("histogram_bounds"))],
            email,
        ),
        (vec![(Some("pg_stats"), Some("most_common_vals"))], email),
        (
            vec![(Some("pg_stats_ext"), Some("most_common_vals"))],
            email,
        ),
        (vec![(None, Some("most_common_elems"))], email),
        (
            vec![(Some("pg_stats"), Some("null_frac"))],
            ColumnPlan::ContentOnly,
        ),
        // Its other columns hold no values.
        (
            vec![(Some("pg_statistic"), Some("stanullfrac"))],
            ColumnPlan::ContentOnly,
        ),
        // Nothing it uses is selected (count(*), now()): detectors only.
        (vec![], ColumnPlan::ContentOnly),
        (
            vec![(Some("customers"), Some("id"))],
            ColumnPlan::ContentOnly,
        ),
    ];
    for (sources, want) in rows {
        assert_eq!(
            columns.plan_derived("computed", sources.iter().copied()),
            want,
            "{sources:?}"
        );
    }
    // Without column rules a whole row selects nothing.
    let detectors = masker(
        r#"
[[profiles.t.rules]]
detector = "card_number"
mask = "redact"
"#,
    );
    assert_eq!(
        detectors.plan_derived("x", [(None, None)]),
        ColumnPlan::ContentOnly
    );
}

#[test]
fn functions_that_run_sql_text_are_refused_under_column_rules_unless_allowed() {
    let columns = masker(
        r#"
[profiles.t]
allow_sql_text_functions = ["Table_To_Xml"]

[[profiles.t.rules]]
column = "email"
mask = "redact"
"#,
    );
    // (functions a statement calls, the one refused)
    let rows: &[(&[&str], Option<&str>)] = &[
        (&["lower", "count"], None),
        (&["query_to_xml"], Some("query_to_xml")),
        (
            &["lower", "pg_catalog.QUERY_TO_XML"],
            Some("pg_catalog.QUERY_TO_XML"),
        ),
        (
            &["query_to_xml_and_xmlschema"],
            Some("query_to_xml_and_xmlschema"),
        ),
        (&["cursor_to_xml"], Some("cursor_to_xml")),
        (&["database_to_xmlschema"], Some("database_to_xmlschema")),
        (&["schema_to_xml"], Some("schema_to_xml")),
        (&["ts_stat"], Some("ts_stat")),
        (&["public.dblink_exec"], Some("public.dblink_exec")),
        (&["dblink"], Some("dblink")),
        (&["crosstab3"], Some("crosstab3")),
        (&["xpath_table"], Some("xpath_table")),
        // Allowed by the profile, under any spelling of its name.
        (&["table_to_xml"], None),
        (&["pg_catalog.table_to_xml"], None),
        // Only the function allowed: its schema forms are other functions.
        (&["table_to_xmlschema"], Some("table_to_xmlschema")),
        // Names that merely resemble one.
        (&["xml", "query_to", "dblin"], None),
    ];
    for (functions, want) in rows {
        assert_eq!(
            columns.refused_sql_text_function(functions.iter().copied()),
            *want,
            "{functions:?}"
        );
    }
    // Detectors alone select no column: nothing such a function returns escapes a rule.
    let detectors = masker(
        r#"
[[profiles.t.rules]]
detector = "card_number"
mask = "redact"
"#,
    );
    assert_eq!(detectors.refused_sql_text_function(["query_to_xml"]), None);
}

#[test]
fn only_functions_that_run_sql_text_can_be_allowed() {
    let text = "[profiles.t]\nallow_sql_text_functions = [\"query_to_xml\", \"lower\"]\n[[profiles.t.rules]]\ncolumn = \"email\"\nmask = \"hash\"\n";
    let error = PolicySet::load([("p/masking.toml", text)]).expect_err("`lower` is refused");
    let shown = error.to_string();
    assert!(
        shown.contains("line 2")
            && shown.contains("`lower` is not a function known to run SQL given as text"),
        "{shown}"
    );
    assert!(!shown.contains("`query_to_xml` is not"), "{shown}");
}
