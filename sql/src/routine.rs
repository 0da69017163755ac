//! The SQL a `LANGUAGE sql` function or procedure runs, from its definition as PostgreSQL's
//! `pg_get_functiondef` prints it (the one source that has both body forms on every server
//! version): the body string (`AS $$ ... $$`, `pg_proc.prosrc`), or a SQL-standard body
//! (`BEGIN ATOMIC ... END`, `RETURN expr`), which the server keeps parsed
//! (`pg_proc.prosqlbody`) and prints back as SQL.
//!
//! The parse tree of a SQL-standard body does not say where its statements are in the text, so
//! they are cut out of it with PostgreSQL's scanner (a keyword is never taken from inside a
//! string, identifier or comment). A cut that does not parse leaves the body opaque.
//! Reference: PostgreSQL docs, "CREATE FUNCTION" (`sql_body`), "Query Language (SQL)
//! Functions".

use pg_query::protobuf::Token;
use pg_query::ParserOptions;

use crate::guard;
use crate::plpgsql::{Body, Piece};
use crate::tree::Tree;

/// The SQL of one `CREATE FUNCTION` (or `CREATE PROCEDURE`) in `LANGUAGE sql`.
pub(crate) fn sql_body(definition: &str) -> Body {
    let Ok(parsed) = guard(|| pg_query::parse(definition, ParserOptions::DEFAULT)) else {
        return Body::opaque();
    };
    let [raw] = parsed.protobuf.stmts.as_slice() else {
        return Body::opaque();
    };
    let Ok(tree) = Tree::build(&raw.stmt) else {
        return Body::opaque();
    };
    if tree.name() != Some("CreateFunctionStmt") {
        return Body::opaque();
    }
    let text = match tree.field("sql_body") {
        Tree::Absent => body_string(&tree),
        Tree::Struct {
            name: "ReturnStmt", ..
        } => standard_return(definition),
        _ => standard_block(definition),
    };
    match text {
        Some(text) => Body {
            pieces: vec![Piece {
                text,
                mode: ParserOptions::DEFAULT,
            }],
            dynamic: false,
        },
        None => Body::opaque(),
    }
}

/// `AS 'body'`: the first string of the `as` option (a second one is a C function's symbol).
fn body_string(create: &Tree) -> Option<String> {
    let option = create
        .list("options")
        .iter()
        .find(|option| option.str("defname") == "as")?;
    let [body, ..] = option.field("arg").list("items") else {
        return None;
    };
    body.sval().map(str::to_owned)
}

/// The statements between `BEGIN ATOMIC` and the last `END`, each ended by `;` as the server
/// prints them.
fn standard_block(definition: &str) -> Option<String> {
    let tokens = pg_query::scan(definition).ok()?.tokens;
    let start = tokens.windows(2).find_map(|pair| match pair {
        [begin, atomic]
            if begin.token == Token::BeginP as i32 && atomic.token == Token::Atomic as i32 =>
        {
            Some(atomic.end)
        }
        _ => None,
    })?;
    let end = tokens
        .iter()
        .rev()
        .find(|t| t.token == Token::EndP as i32)?
        .start;
    let body = definition.get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)?;
    statements(body).is_some().then(|| body.to_owned())
}

/// `RETURN expr` runs `SELECT expr`. The first `RETURN` after which the rest reads as one
/// query: an earlier one (a parameter named `return`) leaves header text that does not.
fn standard_return(definition: &str) -> Option<String> {
    let tokens = pg_query::scan(definition).ok()?.tokens;
    tokens
        .iter()
        .filter(|t| t.token == Token::Return as i32)
        .find_map(|t| {
            let rest = definition.get(usize::try_from(t.end).ok()?..)?;
            let query = format!("SELECT{rest}");
            (statements(&query) == Some(1)).then_some(query)
        })
}

/// How many statements `sql` holds, if it parses.
fn statements(sql: &str) -> Option<usize> {
    guard(|| pg_query::parse(sql, ParserOptions::DEFAULT))
        .ok()
        .map(|parsed| parsed.protobuf.stmts.len())
}
