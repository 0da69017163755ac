//! What a called function or procedure runs, read from its definition as the server's
//! `pg_get_functiondef` prints it (the definitions below are its output, PostgreSQL 15): one
//! row per language and body form, with the statements policies will see and whether the body
//! is flagged `dynamic_sql`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail loudly"
)]

use portcullis_sql::{read_routine, ClassifyError, StatementClass};
use StatementClass::*;

/// A body statement: class, command, tables, functions.
type Inner = (
    StatementClass,
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
);

const NONE: &[&str] = &[];

/// Language, definition, the statements inside, dynamic.
const ROWS: &[(&str, &str, &[Inner], bool)] = &[
    // The bypass this closes: `SELECT purge()` ran a DROP TABLE a policy forbids.
    (
        "plpgsql",
        "CREATE OR REPLACE FUNCTION public.purge()\n RETURNS void\n LANGUAGE plpgsql\n\
         AS $function$ BEGIN DROP TABLE scratch; END $function$\n",
        &[(Ddl, "DROP TABLE", &["scratch"], NONE)],
        false,
    ),
    // A SQL function's body string: every statement in it.
    (
        "sql",
        "CREATE OR REPLACE FUNCTION public.purge_sql()\n RETURNS void\n LANGUAGE sql\n\
         AS $function$DELETE FROM scratch; SELECT 1 FROM scratch$function$\n",
        &[
            (Write, "DELETE", &["scratch"], NONE),
            (Read, "SELECT", &["scratch"], NONE),
        ],
        false,
    ),
    // The same body in quotes, as a definition written by hand would have it.
    (
        "sql",
        "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'TRUNCATE orders'",
        &[(Ddl, "TRUNCATE", &["orders"], NONE)],
        false,
    ),
    // SQL-standard bodies, kept parsed by the server (prosrc is empty) and printed back.
    (
        "sql",
        "CREATE OR REPLACE FUNCTION public.atomic_fn(n integer)\n RETURNS integer\n LANGUAGE sql\n\
         BEGIN ATOMIC\n DELETE FROM scratch\n   WHERE (scratch.id = atomic_fn.n);\n \
         SELECT (count(*))::integer AS count\n    FROM scratch;\nEND\n",
        &[
            (Write, "DELETE", &["scratch"], NONE),
            (Read, "SELECT", &["scratch"], &["count"]),
        ],
        false,
    ),
    (
        "sql",
        "CREATE OR REPLACE FUNCTION public.ret_fn(n integer)\n RETURNS integer\n LANGUAGE sql\n\
         RETURN (n + (SELECT count(*) AS count FROM scratch))\n",
        &[(Read, "SELECT", &["scratch"], &["count"])],
        false,
    ),
    // A parameter named `return` is not where the body starts.
    (
        "sql",
        "CREATE OR REPLACE FUNCTION public.r(return integer)\n RETURNS integer\n LANGUAGE sql\n\
         RETURN (purge_all() + r.return)\n",
        &[(Read, "SELECT", NONE, &["purge_all"])],
        false,
    ),
    // A procedure with parameters the body assigns, SECURITY DEFINER, SET: EXECUTE of a
    // parameter cannot be read before it runs.
    (
        "plpgsql",
        "CREATE OR REPLACE PROCEDURE public.p(INOUT x integer, IN y text DEFAULT 'a'::text)\n \
         LANGUAGE plpgsql\n SECURITY DEFINER\n SET search_path TO 'public'\n\
         AS $procedure$ BEGIN x := x + 1; EXECUTE y; END $procedure$\n",
        &[],
        true,
    ),
    // RETURN QUERY (refused in a DO) is a function's own; its query is read.
    (
        "plpgsql",
        "CREATE OR REPLACE FUNCTION public.tab(a integer)\n RETURNS TABLE(b integer, c text)\n \
         LANGUAGE plpgsql\n\
         AS $function$ BEGIN RETURN QUERY SELECT id, 'x' FROM scratch WHERE id = a; END $function$\n",
        &[(Read, "SELECT", &["scratch"], NONE)],
        false,
    ),
    // Calls inside a body are listed with the statement that makes them, for the caller to
    // follow; EXECUTE of a constant is read.
    (
        "plpgsql",
        "CREATE OR REPLACE FUNCTION public.outer_fn()\n RETURNS void\n LANGUAGE plpgsql\n\
         AS $function$ BEGIN PERFORM purge(); EXECUTE 'CALL app.cleanup()'; END $function$\n",
        &[
            (Read, "SELECT", NONE, &["purge"]),
            (Call, "CALL", NONE, &["app.cleanup"]),
        ],
        false,
    ),
    // A DO block in a SQL function's body is read too.
    (
        "sql",
        "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $f$DO $d$ BEGIN DROP TABLE t; END $d$$f$",
        &[(Do, "DO", &["t"], NONE), (Ddl, "DROP TABLE", &["t"], NONE)],
        false,
    ),
    // Opaque: other languages, bodies that do not compile or parse.
    (
        "plpython3u",
        "CREATE OR REPLACE FUNCTION public.py()\n RETURNS void\n LANGUAGE plpython3u\n\
         AS $function$plpy.execute('DROP TABLE scratch')$function$\n",
        &[],
        true,
    ),
    (
        "c",
        "CREATE OR REPLACE FUNCTION public.dblink_exec(text, text)\n RETURNS text\n LANGUAGE c\n\
         STRICT\nAS '$libdir/dblink', $function$dblink_exec$function$\n",
        &[],
        true,
    ),
    (
        "internal",
        "CREATE OR REPLACE FUNCTION public.n()\n RETURNS timestamp with time zone\n \
         LANGUAGE internal\n STABLE STRICT\nAS $function$now$function$\n",
        &[],
        true,
    ),
    (
        "plpgsql",
        "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN DROP TABLE scratch $$",
        &[],
        true,
    ),
    (
        "sql",
        "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$ DROP TABLE scratch; GARBAGE $$",
        &[],
        true,
    ),
    ("sql", "SELECT 1", &[], true),
    // Nothing runs.
    (
        "plpgsql",
        "CREATE FUNCTION f(n int) RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN n + 1; END $$",
        &[],
        false,
    ),
    (
        "sql",
        "CREATE FUNCTION f() RETURNS void LANGUAGE sql BEGIN ATOMIC END",
        &[],
        false,
    ),
];

#[test]
fn every_statement_a_routine_body_runs_is_classified() {
    let mut failures = Vec::new();
    for &(language, definition, inner, dynamic) in ROWS {
        let body =
            read_routine(language, definition).unwrap_or_else(|e| panic!("{definition}: {e}"));
        let have: Vec<(StatementClass, &str, Vec<&str>, Vec<&str>)> = body
            .statements
            .iter()
            .map(|s| {
                (
                    s.class,
                    &*s.command,
                    s.tables.iter().map(String::as_str).collect(),
                    s.functions.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        let want: Vec<(StatementClass, &str, Vec<&str>, Vec<&str>)> = inner
            .iter()
            .map(|&(class, command, tables, functions)| {
                (class, command, tables.to_vec(), functions.to_vec())
            })
            .collect();
        if have != want || body.dynamic_sql != dynamic {
            failures.push(format!(
                "{definition}:\n    got  {have:?} dynamic {}\n    want {want:?} dynamic {dynamic}",
                body.dynamic_sql
            ));
        }
        for s in &body.statements {
            assert!(
                s.inner.is_empty() && !s.dynamic_sql,
                "{definition}: flattened"
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_body_statement_carries_its_own_text() {
    let body = read_routine(
        "sql",
        "CREATE OR REPLACE FUNCTION public.atomic_fn(n integer)\n RETURNS integer\n LANGUAGE sql\n\
         BEGIN ATOMIC\n DELETE FROM scratch\n   WHERE (scratch.id = atomic_fn.n);\nEND\n",
    )
    .unwrap();
    let texts: Vec<&str> = body.statements.iter().map(|s| &*s.text).collect();
    assert_eq!(
        texts,
        ["DELETE FROM scratch\n   WHERE (scratch.id = atomic_fn.n)"]
    );
}

#[test]
fn what_may_never_run_is_refused_inside_a_routine_too() {
    for (language, definition) in [
        (
            "plpgsql",
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN SET standard_conforming_strings = off; END $$",
        ),
        (
            "sql",
            "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $$ SELECT set_config('client_encoding', 'SJIS', false) $$",
        ),
    ] {
        assert!(
            matches!(
                read_routine(language, definition),
                Err(ClassifyError::Refused { .. })
            ),
            "{definition}: {:?}",
            read_routine(language, definition)
        );
    }
}
