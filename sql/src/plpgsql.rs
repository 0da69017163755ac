//! What a `DO` block (or a PL/pgSQL function or procedure) runs: the SQL inside its PL/pgSQL
//! body, read with PostgreSQL's own PL/pgSQL compiler (libpg_query's `pg_query_parse_plpgsql`,
//! which runs `plpgsql_compile_inline` as the server does for `DO`, and the compiler's
//! function path for a `CREATE FUNCTION`), never a scan of the body's text.
//!
//! PL/pgSQL hands every piece of SQL to the SQL parser in one of a few modes (PostgreSQL's
//! `RawParseMode`): whole statements (an `INSERT`, `PERFORM`'s query, `FOR ... IN query`,
//! `OPEN ... FOR query`, `RETURN QUERY`, `CALL`), expressions (`IF` conditions, `RAISE`
//! arguments, defaults) and assignments (`x := (SELECT ...)`). The compiled function keeps each
//! piece with its mode, so each is parsed here exactly as the server will parse it.
//!
//! `EXECUTE`, `FOR ... IN EXECUTE`, `OPEN ... FOR EXECUTE` and `RETURN QUERY EXECUTE` run a
//! string computed at run time. When that string is one constant (`'DROP TABLE t'`, `E'...'`,
//! `$q$...$q$`, as the parser reads it), it is SQL like any other; anything else (a variable,
//! `format(...)`, `'DROP ' || 'TABLE t'`) cannot be read before it runs, and the block is
//! flagged `dynamic`. So is a block in another language, or one the compiler rejects: opaque.

use pg_query::ParserOptions;
use serde_json::Value;

use crate::classify::constant_text;
use crate::guard;
use crate::tree::Tree;

/// One piece of SQL a PL/pgSQL body runs, with the grammar the server parses it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) text: String,
    pub(crate) mode: ParserOptions,
}

/// What the classifier can read of a `DO` block or a stored function's body.
#[derive(Debug, Default)]
pub(crate) struct Body {
    /// Each as often as the body holds it.
    pub(crate) pieces: Vec<Piece>,
    /// Some SQL it runs cannot be read statically (see the module documentation).
    pub(crate) dynamic: bool,
}

impl Body {
    pub(crate) fn opaque() -> Self {
        Body {
            pieces: Vec::new(),
            dynamic: true,
        }
    }
}

/// The language PostgreSQL's `ExecuteDoStmt` defaults to.
const DEFAULT_LANGUAGE: &str = "plpgsql";

/// The pieces of SQL the `DO` statement `text` (whose parse tree is `stmt`) runs.
pub(crate) fn read_do(text: &str, stmt: &Tree) -> Body {
    // The server looks the language up by its exact name: `LANGUAGE "PLPGSQL"` is not it.
    let language = stmt
        .list("args")
        .iter()
        .filter(|arg| arg.str("defname") == "language")
        .map(|arg| arg.field("arg").sval().unwrap_or_default())
        .next_back()
        .unwrap_or(DEFAULT_LANGUAGE);
    if language != DEFAULT_LANGUAGE {
        return Body::opaque();
    }
    compile(text)
}

/// The pieces of SQL a PL/pgSQL function or procedure runs, from its whole definition (the
/// `CREATE FUNCTION` text `pg_get_functiondef` gives): its parameters are declared by the
/// definition, so the body compiles as the server compiles it at its first call.
pub(crate) fn read_function(definition: &str) -> Body {
    compile(definition)
}

/// A `DO` statement or one `CREATE FUNCTION` in PL/pgSQL, compiled.
fn compile(text: &str) -> Body {
    // A body the compiler rejects fails on the server too; flagged all the same, in case the
    // two ever disagree.
    let Ok(functions) = guard(|| pg_query::parse_plpgsql(text)) else {
        return Body::opaque();
    };
    let [function] = functions.as_array().map(Vec::as_slice).unwrap_or_default() else {
        return Body::opaque();
    };
    let mut body = Body::default();
    if collect(function, "", "", &mut body).is_err() {
        return Body::opaque();
    }
    body
}

/// The JSON does not have the shape this reader expects (a newer libpg_query could change it).
struct Unexpected;

/// Walks the compiled function: every `PLpgSQL_expr` is a piece of SQL, whatever statement or
/// declaration holds it, so a statement kind this reader does not name is still read.
fn collect(value: &Value, node: &str, field: &str, body: &mut Body) -> Result<(), Unexpected> {
    match value {
        Value::Array(items) => {
            for item in items {
                collect(item, node, field, body)?;
            }
        }
        Value::Object(members) => {
            // Key order, whatever the map keeps: serde_json keeps insertion order when another
            // crate in the build turns on `preserve_order`, sorted order otherwise, and the
            // statements must come back the same either way.
            let mut members: Vec<(&String, &Value)> = members.iter().collect();
            members.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (key, member) in members {
                if key == "PLpgSQL_expr" {
                    expression(member, node, field, body)?;
                } else if key.starts_with("PLpgSQL_") {
                    collect(member, key, "", body)?;
                } else {
                    collect(member, node, key, body)?;
                }
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => {}
    }
    Ok(())
}

fn expression(expr: &Value, node: &str, field: &str, body: &mut Body) -> Result<(), Unexpected> {
    let text = expr
        .get("query")
        .and_then(Value::as_str)
        .ok_or(Unexpected)?;
    let mode = match expr.get("parseMode").and_then(Value::as_i64) {
        Some(0) => ParserOptions::DEFAULT,
        Some(2) => ParserOptions::PLPGSQL_EXPR,
        Some(3) => ParserOptions::PLPGSQL_ASSIGN1,
        Some(4) => ParserOptions::PLPGSQL_ASSIGN2,
        Some(5) => ParserOptions::PLPGSQL_ASSIGN3,
        _ => return Err(Unexpected),
    };
    let runs_its_value = matches!(
        (node, field),
        ("PLpgSQL_stmt_dynexecute", "query")
            | ("PLpgSQL_stmt_dynfors", "query")
            | ("PLpgSQL_stmt_open", "dynquery")
            | ("PLpgSQL_stmt_return_query", "dynquery")
    );
    if runs_its_value {
        match constant_string(text, mode) {
            Some(sql) => body.pieces.push(Piece {
                text: sql,
                mode: ParserOptions::DEFAULT,
            }),
            None => body.dynamic = true,
        }
    }
    // The expression itself runs too (`EXECUTE (SELECT q FROM queued)`, `format(...)`).
    body.pieces.push(Piece {
        text: text.to_owned(),
        mode,
    });
    Ok(())
}

/// The string an expression always evaluates to, when it is a single string constant, as the
/// parser reads it (escapes of `E'...'` resolved, a dollar-quoted body as written).
fn constant_string(text: &str, mode: ParserOptions) -> Option<String> {
    let parsed = guard(|| pg_query::parse(text, mode)).ok()?;
    let [raw] = parsed.protobuf.stmts.as_slice() else {
        return None;
    };
    let tree = Tree::build(&raw.stmt).ok()?;
    if tree.name() != Some("SelectStmt") {
        return None;
    }
    let [target] = tree.list("target_list") else {
        return None;
    };
    constant_text(target.field("val")).map(str::to_owned)
}
