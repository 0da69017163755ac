//! What a `DO` block runs, read by PostgreSQL's own PL/pgSQL compiler: one row per place SQL
//! hides in a body, with the statements the policies will see (class, command, tables) and
//! whether the block runs SQL that cannot be read before it runs (`dynamic_sql`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail loudly"
)]

use portcullis_sql::{classify, Classifier, ClassifyError, StatementClass};
use StatementClass::*;

/// An inner statement: class, command, tables.
type Inner = (StatementClass, &'static str, &'static [&'static str]);

const NONE: &[&str] = &[];

/// The SQL, the statements inside (in the order of the compiled tree's fields, which is not
/// always the text's), and whether it is flagged dynamic.
const ROWS: &[(&str, &[Inner], bool)] = &[
    // The bypass of issue 15: EXECUTE of a constant is read like the statement it runs.
    (
        "DO $$ BEGIN EXECUTE 'DROP TABLE scratch'; END $$",
        &[(Ddl, "DROP TABLE", &["scratch"])],
        false,
    ),
    // The string as the parser reads it: E'' escapes resolved, adjacent literals joined.
    (
        r"DO $$ BEGIN EXECUTE E'DROP TABLE \x73cratch'; END $$",
        &[(Ddl, "DROP TABLE", &["scratch"])],
        false,
    ),
    (
        "DO $$ BEGIN EXECUTE 'DROP TABLE '\n'scratch'; END $$",
        &[(Ddl, "DROP TABLE", &["scratch"])],
        false,
    ),
    (
        "DO $$ BEGIN EXECUTE $q$TRUNCATE orders$q$; END $$",
        &[(Ddl, "TRUNCATE", &["orders"])],
        false,
    ),
    (
        "DO $$ BEGIN EXECUTE 'DROP TABLE scratch'::text; END $$",
        &[(Ddl, "DROP TABLE", &["scratch"])],
        false,
    ),
    // Other dollar-quote tags and the quoted-string form of the body.
    (
        "DO $body$ BEGIN DELETE FROM orders; END $body$",
        &[(Write, "DELETE", &["orders"])],
        false,
    ),
    (
        "DO LANGUAGE plpgsql 'BEGIN DELETE FROM orders WHERE note = ''x''; END'",
        &[(Write, "DELETE", &["orders"])],
        false,
    ),
    (
        r"DO E'BEGIN DELETE FROM \x6frders; END'",
        &[(Write, "DELETE", &["orders"])],
        false,
    ),
    // Nested blocks, branches, loops, exception handlers.
    (
        "DO $$ BEGIN BEGIN BEGIN UPDATE orders SET total = 0; END; END; END $$",
        &[(Write, "UPDATE", &["orders"])],
        false,
    ),
    (
        "DO $$ BEGIN IF now() > '2000-01-01' THEN NULL; ELSIF false THEN DELETE FROM a; \
         ELSE TRUNCATE b; END IF; END $$",
        &[
            (Read, "SELECT", NONE),
            (Ddl, "TRUNCATE", &["b"]),
            (Write, "DELETE", &["a"]),
        ],
        false,
    ),
    (
        "DO $$ DECLARE n int := 1; BEGIN CASE n WHEN 1 THEN DROP TABLE a; ELSE DROP TABLE b; \
         END CASE; END $$",
        &[(Ddl, "DROP TABLE", &["a"]), (Ddl, "DROP TABLE", &["b"])],
        false,
    ),
    (
        "DO $$ BEGIN LOOP DELETE FROM a; EXIT; END LOOP; WHILE true LOOP DELETE FROM b; EXIT; \
         END LOOP; END $$",
        &[(Write, "DELETE", &["a"]), (Write, "DELETE", &["b"])],
        false,
    ),
    (
        "DO $$ DECLARE r record; BEGIN FOR r IN SELECT id FROM orders LOOP \
         INSERT INTO archive VALUES (r.id); END LOOP; END $$",
        &[
            (Write, "INSERT", &["archive"]),
            (Read, "SELECT", &["orders"]),
        ],
        false,
    ),
    (
        "DO $$ BEGIN INSERT INTO a VALUES (1); EXCEPTION WHEN unique_violation THEN \
         DROP TABLE a; WHEN others THEN GRANT ALL ON b TO public; END $$",
        &[
            (Write, "INSERT", &["a"]),
            (Ddl, "DROP TABLE", &["a"]),
            (Dcl, "GRANT", &["b"]),
        ],
        false,
    ),
    // PERFORM, assignments, conditions, defaults, cursors, RAISE arguments, CALL.
    (
        "DO $$ BEGIN PERFORM pg_terminate_backend(42); END $$",
        &[(Read, "SELECT", NONE)],
        false,
    ),
    (
        "DO $$ DECLARE n int; BEGIN n := (SELECT count(*) FROM hr.payroll); END $$",
        &[(Read, "SELECT", &["hr.payroll"])],
        false,
    ),
    (
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM a) THEN NULL; END IF; END $$",
        &[(Read, "SELECT", &["a"])],
        false,
    ),
    (
        "DO $$ DECLARE n int := (SELECT max(id) FROM a); BEGIN NULL; END $$",
        &[(Read, "SELECT", &["a"])],
        false,
    ),
    (
        "DO $$ DECLARE c CURSOR FOR SELECT * FROM a; d refcursor; BEGIN OPEN c; \
         OPEN d FOR SELECT * FROM b; END $$",
        &[(Read, "SELECT", &["b"]), (Read, "SELECT", &["a"])],
        false,
    ),
    (
        "DO $$ BEGIN RAISE NOTICE '%', (SELECT email FROM customers LIMIT 1); END $$",
        &[(Read, "SELECT", &["customers"])],
        false,
    ),
    (
        "DO $$ BEGIN CALL archive_orders(30); END $$",
        &[(Call, "CALL", NONE)],
        false,
    ),
    // Statements that only transaction control inside a DO allows.
    (
        "DO $$ BEGIN DELETE FROM a; COMMIT; END $$",
        &[(Write, "DELETE", &["a"])],
        false,
    ),
    // A DO run by a DO: its statements follow it, read the same way.
    (
        "DO $a$ BEGIN EXECUTE 'DO $b$ BEGIN DROP TABLE scratch; END $b$'; END $a$",
        &[(Do, "DO", &["scratch"]), (Ddl, "DROP TABLE", &["scratch"])],
        false,
    ),
    (
        "DO $a$ BEGIN DO $b$ BEGIN EXECUTE 'TRUNCATE t'; END $b$; END $a$",
        &[(Do, "DO", &["t"]), (Ddl, "TRUNCATE", &["t"])],
        false,
    ),
    // Several statements in one constant string: each one.
    (
        "DO $$ BEGIN EXECUTE 'DELETE FROM a; DROP TABLE b'; END $$",
        &[(Write, "DELETE", &["a"]), (Ddl, "DROP TABLE", &["b"])],
        false,
    ),
    // Dynamic SQL: what EXECUTE runs is known only when it runs.
    (
        "DO $$ BEGIN EXECUTE 'DROP ' || 'TABLE scratch'; END $$",
        NONE_INNER,
        true,
    ),
    (
        "DO $$ BEGIN EXECUTE format('DROP TABLE %I', 'scratch'); END $$",
        &[(Read, "SELECT", NONE)],
        true,
    ),
    (
        "DO $$ DECLARE q text := 'DROP TABLE scratch'; BEGIN EXECUTE q; END $$",
        NONE_INNER,
        true,
    ),
    (
        "DO $$ BEGIN EXECUTE (SELECT sql FROM queued LIMIT 1); END $$",
        &[(Read, "SELECT", &["queued"])],
        true,
    ),
    (
        "DO $$ DECLARE r record; q text := 'SELECT 1'; BEGIN FOR r IN EXECUTE q LOOP NULL; \
         END LOOP; END $$",
        NONE_INNER,
        true,
    ),
    (
        "DO $$ DECLARE c refcursor; q text := 'SELECT 1'; BEGIN OPEN c FOR EXECUTE q; END $$",
        NONE_INNER,
        true,
    ),
    (
        "DO $$ DECLARE r record; BEGIN FOR r IN EXECUTE 'SELECT * FROM a' LOOP NULL; \
         END LOOP; END $$",
        &[(Read, "SELECT", &["a"])],
        false,
    ),
    // Opaque: another language, a body the compiler rejects, SQL inside that does not parse.
    (
        "DO LANGUAGE plperl $$ system('rm -rf /') $$",
        NONE_INNER,
        true,
    ),
    ("DO LANGUAGE sql $$ DROP TABLE scratch $$", NONE_INNER, true),
    (
        r#"DO LANGUAGE "PLPGSQL" $$ BEGIN NULL; END $$"#,
        NONE_INNER,
        true,
    ),
    ("DO $$ BEGIN this is not plpgsql; END $$", NONE_INNER, true),
    (
        "DO $$ BEGIN EXECUTE 'DROP TABEL scratch'; END $$",
        NONE_INNER,
        true,
    ),
    // Nothing runs.
    ("DO $$ BEGIN NULL; END $$", NONE_INNER, false),
    (
        "DO $$ DECLARE n int := 1; BEGIN n := n + 1; END $$",
        NONE_INNER,
        false,
    ),
];

const NONE_INNER: &[Inner] = &[];

#[test]
fn every_statement_inside_a_do_block_is_classified() {
    let classifier = Classifier::new(64);
    let mut failures = Vec::new();
    for &(sql, inner, dynamic) in ROWS {
        let statements = classify(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let [statement] = &statements[..] else {
            panic!("{sql}: {statements:?}")
        };
        let have: Vec<(StatementClass, &str, Vec<&str>)> = statement
            .inner
            .iter()
            .map(|s| {
                (
                    s.class,
                    &*s.command,
                    s.tables.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        let want: Vec<(StatementClass, &str, Vec<&str>)> = inner
            .iter()
            .map(|&(class, command, tables)| (class, command, tables.to_vec()))
            .collect();
        if have != want || statement.dynamic_sql != dynamic {
            failures.push(format!(
                "{sql}:\n    got  {have:?} dynamic {}\n    want {want:?} dynamic {dynamic}",
                statement.dynamic_sql
            ));
        }
        // The block keeps its own class and command; it names what its statements touch.
        assert_eq!((statement.class, &*statement.command), (Do, "DO"), "{sql}");
        for s in statement.inner.iter() {
            for table in s.tables.iter() {
                assert!(statement.tables.contains(table), "{sql}: {table}");
            }
            assert!(s.inner.is_empty() && !s.dynamic_sql, "{sql}: flattened");
        }
        let cached = classifier.classify(sql).unwrap();
        assert_eq!(&cached[..], &statements[..], "{sql} through the cache");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn an_inner_statement_carries_its_own_text_and_functions() {
    let statements = classify(
        "DO $$ BEGIN PERFORM set_config('role', 'admin', false); EXECUTE 'DROP TABLE s'; END $$",
    )
    .unwrap();
    let texts: Vec<&str> = statements[0].inner.iter().map(|s| &*s.text).collect();
    assert_eq!(
        texts,
        ["SELECT set_config('role', 'admin', false)", "DROP TABLE s"]
    );
    assert_eq!(&*statements[0].inner[0].functions, ["set_config"]);
    assert_eq!(&*statements[0].functions, ["set_config"]);
}

#[test]
fn statements_outside_do_have_nothing_inside() {
    for sql in ["SELECT 1", "CALL p()", "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN DROP TABLE t; RETURN 1; END $$"] {
        let statements = classify(sql).unwrap();
        assert!(statements[0].inner.is_empty() && !statements[0].dynamic_sql, "{sql}");
    }
}

#[test]
fn what_may_never_run_is_refused_inside_a_do_block_too() {
    for sql in [
        "DO $$ BEGIN SET standard_conforming_strings = off; END $$",
        "DO $$ BEGIN EXECUTE 'SET standard_conforming_strings = off'; END $$",
        "DO $$ BEGIN PERFORM set_config('standard_conforming_strings', 'off', false); END $$",
    ] {
        assert!(
            matches!(classify(sql), Err(ClassifyError::Refused { .. })),
            "{sql}: {:?}",
            classify(sql)
        );
    }
}

#[test]
fn do_blocks_nested_without_end_are_refused() {
    let mut sql = "SELECT 1".to_owned();
    for level in 0..12 {
        sql = format!("DO $l{level}$ BEGIN EXECUTE $q{level}${sql}$q{level}$; END $l{level}$");
    }
    assert!(
        matches!(classify(&sql), Err(ClassifyError::TooDeep { .. })),
        "{:?}",
        classify(&sql)
    );
}
