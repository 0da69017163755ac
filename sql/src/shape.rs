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

/// `None` when the scanner rejects the string (the full parse then says why).
pub(crate) fn shape(sql: &str) -> Option<Shape<'_>> {
    // `scan`, not `scan_tokens`: the latter builds a slice from a null pointer when there are
    // no tokens (undefined behaviour; a debug build aborts on it).
    let tokens = pg_query::scan(sql).ok()?.tokens;
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
