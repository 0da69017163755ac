//! The shape of a SQL string: its text with every constant replaced, and where its statements
//! start and end, both from PostgreSQL's own scanner (the lexer the parser runs), so a
//! cached shape is found without parsing.
//!
//! Two strings with the same key are the same string outside their constant tokens: the key
//! copies everything else byte for byte and stands one NUL (which no SQL the classifier
//! accepts contains) for each constant, so the segments between constants are recovered
//! unambiguously. What the classifier reads from a parse tree does not depend on a constant's
//! value, except where the walk says so (`shape_cacheable`): those statements are never
//! remembered by shape.

use pg_query::protobuf::Token;

/// One SQL string's key and statement texts.
pub(crate) struct Shape<'s> {
    pub(crate) key: String,
    /// Each statement's text, trimmed, in order: what lies between top-level `;` tokens and
    /// holds more than comments.
    pub(crate) texts: Vec<&'s str>,
}

const CONSTANTS: [Token; 6] = [
    Token::Sconst,
    Token::Usconst,
    Token::Iconst,
    Token::Fconst,
    Token::Bconst,
    Token::Xconst,
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
        if kind.is_some_and(|k| CONSTANTS.contains(&k)) {
            key.push_str(sql.get(copied..start)?);
            key.push('\0');
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

    #[test]
    fn constants_become_one_nul_each_and_everything_else_stays() {
        let s =
            shape("SELECT a FROM t WHERE id = 42 AND n = 'x''y' -- 'c'\n AND f = 1.5e3").unwrap();
        assert_eq!(
            s.key,
            "SELECT a FROM t WHERE id = \0 AND n = \0 -- 'c'\n AND f = \0"
        );
        for (sql, key) in [
            (
                "SELECT E'a\\'b', B'101', X'ff', U&'d\\0061t'",
                "SELECT \0, \0, \0, \0",
            ),
            (
                "SELECT $tag$ ; $tag$, $1, \"q;1\"",
                "SELECT \0, $1, \"q;1\"",
            ),
            ("SELECT x::varchar(10)", "SELECT x::varchar(\0)"),
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
    }
}
