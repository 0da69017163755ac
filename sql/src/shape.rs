//! The shape of a SQL string: its text with every constant replaced, and where its statements
//! start and end, both from PostgreSQL's own scanner (the lexer the parser runs), so a
//! cached shape is found without parsing.
//!
//! Two strings with the same key are the same string outside their constant tokens, and
//! their constants are tokens of the same kinds: the key copies everything else byte for byte
//! and stands a NUL (which no SQL the classifier accepts contains) and a letter naming the
//! token's kind for each constant, so the segments between constants are recovered
//! unambiguously. The kind matters because the grammar tells the kinds apart: `varchar(10)`
//! parses, `varchar(.5)` and `varchar(99999999999)` (too large for an integer, so a numeric
//! token) do not. What the classifier reads from a parse tree does not depend on a constant's
//! value, except where the walk says so (`shape_cacheable`): those statements are never
//! remembered by shape.

use pg_query::protobuf::Token;

/// One SQL string's key and statement texts.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Shape<'s> {
    pub(crate) key: String,
    /// Each statement's text, trimmed, in order: what lies between top-level `;` tokens and
    /// holds more than comments.
    pub(crate) texts: Vec<&'s str>,
}

/// The constant tokens and the letter each stands as in a key, after its NUL.
const CONSTANTS: [(Token, char); 6] = [
    (Token::Sconst, 's'),
    (Token::Usconst, 'u'),
    (Token::Iconst, 'i'),
    (Token::Fconst, 'f'),
    (Token::Bconst, 'b'),
    (Token::Xconst, 'x'),
];

/// The scanner's tokens, comments included; `None` when it rejects the string.
///
/// `scan_tokens` hands the tokens over as they are; `scan` has libpg_query encode them as
/// protobuf for the crate to decode, which cost more than the rest of a cached statement's
/// classification. But the crate's `scan_tokens` builds a slice from a null pointer when the
/// scanner returns no tokens, which is undefined behaviour. The scanner returns no tokens
/// only for input that is all whitespace to it (comments are tokens here), and input whose
/// first character outside the scanner's whitespace cannot start a comment has a token there
/// or a scanner error, never nothing: only such input takes `scan_tokens`. Anything else (a
/// leading comment, blank input) takes `scan`.
fn tokens(sql: &str) -> Option<Vec<pg_query::protobuf::ScanToken>> {
    let first = sql
        .bytes()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c));
    match first {
        Some(b) if b != b'-' && b != b'/' => pg_query::scan_tokens(sql).ok(),
        _ => pg_query::scan(sql).ok().map(|r| r.tokens),
    }
}

/// `None` when the scanner rejects the string (the full parse then says why).
pub(crate) fn shape(sql: &str) -> Option<Shape<'_>> {
    plain_shape(sql).or_else(|| scanned_shape(sql))
}

/// Whether [`plain_shape`] answers `sql` exactly as the scanner does (or leaves it to the
/// scanner): what the `classify` fuzz target checks on every input.
pub(crate) fn plain_shape_agrees(sql: &str) -> bool {
    plain_shape(sql).is_none_or(|plain| Some(plain) == scanned_shape(sql))
}

/// The shape of the plain SQL that most clients send, read in one pass without the scanner.
/// Calling the scanner costs about a microsecond for a short statement (it sets up and tears
/// down its memory contexts), more than the rest of a cached simple query's classification.
///
/// It reads a strict subset of PostgreSQL's lexical rules, the one where a token's extent is
/// plain to see: ASCII only; whitespace, identifiers, operators and punctuation copied as
/// they are; `'...'` strings (quotes doubled inside) and quoted identifiers; decimal numbers
/// of the forms `12`, `1.5`, `1.` and `.5`. Anything else, and anything near which the
/// scanner reads differently, answers `None` and goes to the scanner: a backslash, `$` (dollar
/// quotes, parameters), `&` (`U&` strings), a quote right after a letter or digit (`E'..'`,
/// `B'..'`, `X'..'`, `N'..'`), a string continued on another line (`'a'` newline `'b'` is
/// one constant), `--` and `/*` anywhere (comments, also inside operators), a number run
/// into letters, `_`, another dot or an exponent (`1e5`, `0x1f`, `1_000`, `1..2`, `12abc`), `..` anywhere,
/// an empty quoted identifier, an unterminated string, an operator of 32 characters or more
/// (the scanner refuses 64), control characters.
/// `plain_shape_agrees` holds it to the scanner's answer.
fn plain_shape(sql: &str) -> Option<Shape<'_>> {
    const OPERATOR_CHARS: &[u8] = b"~!@#^&|`?+-*/%<>=";
    let b = sql.as_bytes();
    let at = |i: usize| b.get(i).copied();
    let is_word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let is_space = |c: u8| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    let mut key = String::with_capacity(sql.len());
    let mut texts = Vec::new();
    let mut copied = 0;
    let mut statement_start = 0;
    let mut has_code = false;
    let mut i = 0;
    while let Some(c) = at(i) {
        match c {
            _ if is_space(c) => i += 1,
            b';' => {
                if has_code {
                    texts.push(sql.get(statement_start..i)?.trim());
                }
                i += 1;
                statement_start = i;
                has_code = false;
            }
            b'\'' => {
                if i.checked_sub(1).and_then(at).is_some_and(is_word) {
                    return None;
                }
                let mut j = i + 1;
                loop {
                    match at(j)? {
                        b'\'' if at(j + 1) == Some(b'\'') => j += 2,
                        b'\'' => break,
                        b'\\' => return None,
                        b' '..=b'~' | b'\t' | b'\n' | b'\r' => j += 1,
                        _ => return None,
                    }
                }
                let end = j + 1;
                let mut k = end;
                let mut newline = false;
                while let Some(w) = at(k).filter(|w| is_space(*w)) {
                    newline |= matches!(w, b'\n' | b'\r');
                    k += 1;
                }
                if newline && at(k) == Some(b'\'') {
                    return None;
                }
                key.push_str(sql.get(copied..i)?);
                key.push_str("\0s");
                copied = end;
                has_code = true;
                i = end;
            }
            b'"' => {
                let mut j = i + 1;
                loop {
                    match at(j)? {
                        b'"' if at(j + 1) == Some(b'"') => j += 2,
                        b'"' => break,
                        b' '..=b'~' | b'\t' | b'\n' | b'\r' => j += 1,
                        _ => return None,
                    }
                }
                if j == i + 1 {
                    return None;
                }
                has_code = true;
                i = j + 1;
            }
            // `..` is one token to the scanner, so `..5` is not `.` and `.5`.
            b'.' if at(i + 1) == Some(b'.') => return None,
            b'0'..=b'9' | b'.' if c != b'.' || at(i + 1).is_some_and(|d| d.is_ascii_digit()) => {
                let mut j = i;
                while at(j).is_some_and(|d| is_word(d) || d == b'.') {
                    j += 1;
                }
                let run = b.get(i..j)?;
                let (whole, fraction) = match run.iter().position(|d| *d == b'.') {
                    Some(dot) => (run.get(..dot)?, Some(run.get(dot + 1..)?)),
                    None => (run, None),
                };
                let digits = |part: &[u8]| part.iter().all(u8::is_ascii_digit);
                let plain = digits(whole)
                    && fraction.is_none_or(digits)
                    && !(whole.is_empty() && fraction.is_none_or(<[u8]>::is_empty));
                if !plain {
                    return None;
                }
                // Like the scanner: an integer too large for `int4` is a numeric token.
                let integer = fraction.is_none()
                    && std::str::from_utf8(whole).is_ok_and(|w| w.parse::<i32>().is_ok());
                key.push_str(sql.get(copied..i)?);
                key.push_str(if integer { "\0i" } else { "\0f" });
                copied = j;
                has_code = true;
                i = j;
            }
            b'A'..=b'Z' | b'a'..=b'z' | b'_' => {
                while at(i).is_some_and(is_word) {
                    i += 1;
                }
                has_code = true;
            }
            b'-' if at(i + 1) == Some(b'-') => return None,
            b'/' if at(i + 1) == Some(b'*') => return None,
            b'$' | b'\\' | b'&' => return None,
            b'!'..=b'~' => {
                // The scanner refuses an operator of NAMEDATALEN (64) characters or more.
                let run = b
                    .get(i..)?
                    .iter()
                    .take_while(|o| OPERATOR_CHARS.contains(o));
                if run.count() >= 32 {
                    return None;
                }
                has_code = true;
                i += 1;
            }
            _ => return None,
        }
    }
    key.push_str(sql.get(copied..)?);
    if has_code {
        texts.push(sql.get(statement_start..)?.trim());
    }
    Some(Shape { key, texts })
}

/// The shape from PostgreSQL's scanner; `None` when it rejects the string.
fn scanned_shape(sql: &str) -> Option<Shape<'_>> {
    let tokens = tokens(sql)?;
    let mut key = String::with_capacity(sql.len());
    let mut texts = Vec::new();
    let mut copied = 0;
    let mut statement_start = 0;
    let mut has_code = false;
    for token in &tokens {
        let start = usize::try_from(token.start).ok()?;
        let end = usize::try_from(token.end).ok()?;
        let kind = Token::try_from(token.token).ok();
        if let Some((_, letter)) = CONSTANTS.iter().find(|(k, _)| Some(*k) == kind) {
            key.push_str(sql.get(copied..start)?);
            key.push('\0');
            key.push(*letter);
            copied = end;
        }
        match kind {
            Some(Token::Ascii59) => {
                if has_code {
                    texts.push(sql.get(statement_start..start)?.trim());
                }
                statement_start = end;
                has_code = false;
            }
            Some(Token::SqlComment | Token::CComment) => {}
            _ => has_code = true,
        }
    }
    key.push_str(sql.get(copied..)?);
    if has_code {
        texts.push(sql.get(statement_start..)?.trim());
    }
    Some(Shape { key, texts })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// The fast path reads the same tokens as the protobuf one, and input that could have
    /// none never takes it.
    #[test]
    fn both_scanner_entry_points_agree_and_blank_input_takes_the_safe_one() {
        for sql in [
            "SELECT 1",
            "  \n\tselect 'a''b', $1, 1.5e3, B'01', X'ff', U&'d\\0061' FROM t; -- end",
            "(SELECT 1) UNION ALL (SELECT 2)",
            "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
            "SELECT $$a ; b$$; SELECT /* c */ 2",
            "\u{b}\u{c}SELECT 1",
            "é",
            "'unterminated",
            // These take `scan` itself.
            "",
            " \n\t\r\u{b}\u{c}",
            "-- only a comment",
            "/* only */",
            "-1",
            "/",
        ] {
            let safe = pg_query::scan(sql).ok().map(|r| r.tokens);
            assert_eq!(tokens(sql), safe, "{sql:?}");
        }
        assert_eq!(tokens(" \n").map(|t| t.len()), Some(0));
        assert_eq!(
            tokens("-- c").map(|t| t.len()),
            Some(1),
            "comments are tokens"
        );
    }

    /// The one-pass reader answers plain SQL itself, and whatever it answers is the scanner's
    /// answer; everything near which the scanner reads differently goes to the scanner.
    #[test]
    fn the_plain_reader_answers_like_the_scanner_or_not_at_all() {
        let answered = [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
            "UPDATE pgbench_accounts SET abalance = abalance + -4021 WHERE aid = 1;",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 7, 12, CURRENT_TIMESTAMP);",
            "BEGIN; END;",
            "SELECT 'it''s', '', 1.5, 1., .5, 10.25 FROM \"My \"\"Table\"\"\" WHERE x <> 'a;b'",
            "SELECT a.b, t.5, x::numeric(10,2), y <= 2, z || 'q' FROM t",
            "SELECT 'a' 'b'",
            "SELECT 'a'\n, 'b'",
            "\u{b}\u{c} select\t1 ;; ;",
            " ; ",
            "",
            "SELECT 'multi\nline\tstring'",
            "SELECT 99999999999999999999999",
            "SELECT 'unterminated''",
        ];
        for sql in answered {
            assert!(plain_shape_agrees(sql), "{sql:?}");
        }
        for sql in answered.iter().take(12) {
            assert!(
                plain_shape(sql).is_some(),
                "{sql:?} should not need the scanner"
            );
        }
        for sql in [
            "SELECT E'a\\'b'",
            "SELECT B'101', X'ff', N'n', U&'d\\0061t'",
            "SELECT date'2024-01-01'",
            "SELECT 'a'\n'b'",
            "SELECT 'a' \r\n  'b'",
            "SELECT 1 -- comment",
            "SELECT 1 /* c */",
            "SELECT 1 +-- c\n 2",
            "SELECT 1 */* c */ 2",
            "SELECT $1",
            "SELECT $$a$$",
            "SELECT a$b FROM t",
            "SELECT 1e5, 2E-3",
            "SELECT 0x1f",
            "SELECT 1_000",
            "SELECT 12abc",
            "SELECT 1.5.6",
            "SELECT 1..2",
            "SELECT t..5",
            "SELECT 1'a'",
            "SELECT \"\"",
            "SELECT \"unterminated",
            "SELECT 'unterminated",
            "SELECT 'café'",
            "SELECT é",
            "SELECT 'a\\b'",
            "SELECT 1\u{1}",
            "SELECT 'a\u{0}'",
            "SELECT 1 & 2",
            "SELECT 1 ?================================================================= 2",
        ] {
            assert!(plain_shape(sql).is_none(), "{sql:?} must go to the scanner");
            assert!(plain_shape_agrees(sql), "{sql:?}");
        }
        // The cases the scanner settles still shape as before.
        assert_eq!(shape("SELECT 1e5").unwrap().key, "SELECT \0f");
        assert_eq!(shape("SELECT 'a'\n'b'").unwrap().key, "SELECT \0s");
        assert!(shape("SELECT 'unterminated").is_none());
    }

    #[test]
    fn constants_become_a_nul_and_their_kind_and_everything_else_stays() {
        let s =
            shape("SELECT a FROM t WHERE id = 42 AND n = 'x''y' -- 'c'\n AND f = 1.5e3").unwrap();
        assert_eq!(
            s.key,
            "SELECT a FROM t WHERE id = \0i AND n = \0s -- 'c'\n AND f = \0f"
        );
        for (sql, key) in [
            (
                "SELECT E'a\\'b', B'101', X'ff', U&'d\\0061t'",
                "SELECT \0s, \0b, \0x, \0u",
            ),
            (
                "SELECT $tag$ ; $tag$, $1, \"q;1\"",
                "SELECT \0s, $1, \"q;1\"",
            ),
            ("SELECT x::varchar(10)", "SELECT x::varchar(\0i)"),
            (
                "SELECT 1., .5, 2147483647, 2147483648",
                "SELECT \0f, \0f, \0i, \0f",
            ),
        ] {
            assert_eq!(shape(sql).unwrap().key, key, "{sql}");
        }
    }

    #[test]
    fn statements_are_split_at_top_level_semicolons_only() {
        let s =
            shape("SELECT ';'; /* ; */ SELECT \"a;b\" ;; -- x; y\n SELECT $$;$$; -- end").unwrap();
        assert_eq!(
            s.texts,
            [
                "SELECT ';'",
                "/* ; */ SELECT \"a;b\"",
                "-- x; y\n SELECT $$;$$"
            ]
        );
        assert!(shape("  -- nothing\n").unwrap().texts.is_empty());
    }

    #[test]
    fn different_statements_never_share_a_key() {
        let same = |a: &str, b: &str| shape(a).unwrap().key == shape(b).unwrap().key;
        assert!(same("SELECT 1", "SELECT 22"));
        assert!(same("SELECT 'a'", "SELECT 'a'' ; DROP TABLE t; --'"));
        assert!(!same("SELECT 'a', 'b'", "SELECT 'a'' , ''b'"));
        assert!(!same("SELECT 1; DROP TABLE t", "SELECT 1"));
        assert!(!same("SELECT a FROM t", "SELECT b FROM t"));
        // The grammar tells constant kinds apart; the key does too.
        assert!(!same("SELECT x::varchar(10)", "SELECT x::varchar(.5)"));
        assert!(!same(
            "SELECT x::varchar(10)",
            "SELECT x::varchar(99999999999)"
        ));
        assert!(!same("SELECT 1", "SELECT '1'"));
    }
}
