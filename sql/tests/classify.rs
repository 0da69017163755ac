//! One row per statement shape: the SQL, and the class, command, tables and functions the
//! policies will see. Every row is also checked through a caching `Classifier`, twice, so the
//! cached answer is the fresh one.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail loudly"
)]

use std::collections::BTreeSet;
use std::sync::Arc;

use portcullis_sql::{classify, Classifier, ClassifyError, Statement, StatementClass};
use StatementClass::*;

type Row = (
    &'static str,
    StatementClass,
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
);

const NONE: &[&str] = &[];

const ROWS: &[Row] = &[
    // Reads.
    ("SELECT 1", Read, "SELECT", NONE, NONE),
    (
        "WITH c AS (SELECT * FROM orders) SELECT * FROM (SELECT * FROM c) s",
        Read,
        "SELECT",
        &["orders"],
        NONE,
    ),
    ("select * from Orders", Read, "SELECT", &["orders"], NONE),
    (r#"SELECT * FROM "MixedCase""#, Read, "SELECT", &["MixedCase"], NONE),
    (r#"SELECT * FROM ORDERS, "Orders""#, Read, "SELECT", &["Orders", "orders"], NONE),
    (
        r#"SELECT * FROM Sales."Q1" q JOIN public.customers c ON c.id = q.cid"#,
        Read,
        "SELECT",
        &["public.customers", "sales.Q1"],
        NONE,
    ),
    ("SELECT * FROM mydb.public.orders", Read, "SELECT", &["mydb.public.orders"], NONE),
    (
        "SELECT count(*) FROM orders WHERE id IN (SELECT order_id FROM refunds)",
        Read,
        "SELECT",
        &["orders", "refunds"],
        &["count"],
    ),
    // Subqueries in places pg_query's own walker does not visit.
    ("SELECT ARRAY[(SELECT salary FROM hr.payroll)]", Read, "SELECT", &["hr.payroll"], NONE),
    (
        "SELECT ROW((SELECT salary FROM hr.payroll LIMIT 1))",
        Read,
        "SELECT",
        &["hr.payroll"],
        NONE,
    ),
    (
        "SELECT xmlelement(name x, (SELECT salary FROM hr.payroll LIMIT 1))",
        Read,
        "SELECT",
        &["hr.payroll"],
        NONE,
    ),
    ("VALUES (1), (2)", Read, "SELECT", NONE, NONE),
    ("TABLE orders", Read, "SELECT", &["orders"], NONE),
    ("SHOW search_path", Read, "SHOW", NONE, NONE),
    ("EXPLAIN SELECT * FROM orders", Read, "EXPLAIN", &["orders"], NONE),
    ("EXPLAIN DELETE FROM orders", Read, "EXPLAIN", &["orders"], NONE),
    ("EXPLAIN (ANALYZE false) DELETE FROM orders", Read, "EXPLAIN", &["orders"], NONE),
    (
        "EXPLAIN (ANALYZE off, VERBOSE) UPDATE orders SET total = 1",
        Read,
        "EXPLAIN",
        &["orders"],
        NONE,
    ),
    ("EXPLAIN (ANALYZE 0) DELETE FROM orders", Read, "EXPLAIN", &["orders"], NONE),
    ("COPY orders TO STDOUT", Read, "COPY", &["orders"], NONE),
    (
        "COPY (SELECT * FROM orders) TO STDOUT WITH (FORMAT csv)",
        Read,
        "COPY",
        &["orders"],
        NONE,
    ),
    ("FETCH 10 FROM c", Read, "FETCH", NONE, NONE),
    ("DECLARE c CURSOR FOR SELECT * FROM orders", Read, "DECLARE CURSOR", &["orders"], NONE),
    (
        "PREPARE q AS SELECT * FROM orders WHERE id = $1",
        Read,
        "PREPARE",
        &["orders"],
        NONE,
    ),
    ("SELECT pg_read_file('/etc/passwd')", Read, "SELECT", NONE, &["pg_read_file"]),
    (
        "SELECT pg_catalog.set_config('role', 'admin', false)",
        Read,
        "SELECT",
        NONE,
        &["pg_catalog.set_config"],
    ),
    ("SELECT nextval('orders_id_seq')", Read, "SELECT", NONE, &["nextval"]),
    ("SELECT * FROM generate_series(1, 10)", Read, "SELECT", NONE, &["generate_series"]),
    // A CTE name is not a table where it names the CTE...
    ("WITH recent AS (SELECT * FROM orders) SELECT * FROM recent", Read, "SELECT", &["orders"], NONE),
    (
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 9) SELECT * FROM t",
        Read,
        "SELECT",
        NONE,
        NONE,
    ),
    // ...but an earlier CTE cannot see a later one: there `payroll` is the real table.
    (
        "WITH a AS (SELECT * FROM payroll), payroll AS (SELECT 1) SELECT * FROM a, payroll",
        Read,
        "SELECT",
        &["payroll"],
        NONE,
    ),
    (
        "SELECT * FROM orders o, LATERAL (SELECT * FROM items i WHERE i.order_id = o.id) x",
        Read,
        "SELECT",
        &["items", "orders"],
        NONE,
    ),
    // Writes.
    ("INSERT INTO orders (id) VALUES (1)", Write, "INSERT", &["orders"], NONE),
    ("INSERT INTO archive SELECT * FROM orders", Write, "INSERT", &["archive", "orders"], NONE),
    (
        "INSERT INTO orders VALUES (1) ON CONFLICT (id) DO UPDATE SET total = excluded.total",
        Write,
        "INSERT",
        &["orders"],
        NONE,
    ),
    (
        "UPDATE orders SET total = 0 FROM customers c WHERE c.id = orders.cid",
        Write,
        "UPDATE",
        &["customers", "orders"],
        NONE,
    ),
    (
        "DELETE FROM orders USING customers c WHERE c.id = orders.cid",
        Write,
        "DELETE",
        &["customers", "orders"],
        NONE,
    ),
    (
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v \
         WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.v)",
        Write,
        "MERGE",
        &["s", "t"],
        NONE,
    ),
    (
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
        Write,
        "SELECT",
        &["orders"],
        NONE,
    ),
    (
        "WITH d AS (DELETE FROM orders RETURNING *) INSERT INTO archive SELECT * FROM d",
        Write,
        "INSERT",
        &["archive", "orders"],
        NONE,
    ),
    (
        "WITH x AS (SELECT 1), u AS (UPDATE orders SET total = 0 RETURNING 1) SELECT * FROM x",
        Write,
        "SELECT",
        &["orders"],
        NONE,
    ),
    // The target of a DML statement is a table even when a CTE has its name.
    ("WITH orders AS (SELECT 1) DELETE FROM orders", Write, "DELETE", &["orders"], NONE),
    (
        "WITH c AS (SELECT * FROM orders) UPDATE items SET n = 0 FROM c WHERE c.id = items.id",
        Write,
        "UPDATE",
        &["items", "orders"],
        NONE,
    ),
    ("SELECT * FROM orders FOR UPDATE", Write, "SELECT", &["orders"], NONE),
    ("SELECT * FROM orders o FOR SHARE OF o SKIP LOCKED", Write, "SELECT", &["orders"], NONE),
    ("SELECT * FROM (SELECT * FROM orders FOR UPDATE) x", Write, "SELECT", &["orders"], NONE),
    ("EXPLAIN ANALYZE DELETE FROM orders", Write, "EXPLAIN", &["orders"], NONE),
    ("EXPLAIN (ANALYZE, BUFFERS) UPDATE orders SET total = 1", Write, "EXPLAIN", &["orders"], NONE),
    ("EXPLAIN (ANALYZE 'on') INSERT INTO orders VALUES (1)", Write, "EXPLAIN", &["orders"], NONE),
    ("EXPLAIN (ANALYZE 1) INSERT INTO orders VALUES (1)", Write, "EXPLAIN", &["orders"], NONE),
    // A spelling PostgreSQL rejects counts as running the statement.
    ("EXPLAIN (ANALYZE 'maybe') DELETE FROM orders", Write, "EXPLAIN", &["orders"], NONE),
    (
        "EXPLAIN ANALYZE WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
        Write,
        "EXPLAIN",
        &["orders"],
        NONE,
    ),
    ("EXPLAIN ANALYZE EXECUTE q", Write, "EXPLAIN", NONE, NONE),
    ("EXPLAIN ANALYSE DELETE FROM orders", Write, "EXPLAIN", &["orders"], NONE),
    ("EXPLAIN (ANALYSE TRUE, FORMAT JSON) DELETE FROM orders", Write, "EXPLAIN", &["orders"], NONE),
    ("SELECT * FROM orders FOR KEY SHARE", Write, "SELECT", &["orders"], NONE),
    ("COPY orders FROM STDIN", Write, "COPY", &["orders"], NONE),
    ("COPY (DELETE FROM orders RETURNING *) TO STDOUT", Write, "COPY", &["orders"], NONE),
    ("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE", Write, "LOCK TABLE", &["orders"], NONE),
    ("EXECUTE q(1)", Write, "EXECUTE", NONE, NONE),
    ("PREPARE d AS DELETE FROM orders WHERE id = $1", Write, "PREPARE", &["orders"], NONE),
    (
        "DECLARE c CURSOR FOR SELECT * FROM orders FOR UPDATE",
        Write,
        "DECLARE CURSOR",
        &["orders"],
        NONE,
    ),
    // Schema changes.
    ("CREATE TABLE t (id int PRIMARY KEY)", Ddl, "CREATE TABLE", &["t"], NONE),
    (
        "CREATE TABLE archive AS SELECT * FROM orders",
        Ddl,
        "CREATE TABLE AS",
        &["archive", "orders"],
        NONE,
    ),
    ("SELECT * INTO archive FROM orders", Ddl, "SELECT INTO", &["archive", "orders"], NONE),
    (
        "SELECT * INTO archive FROM orders UNION SELECT * FROM old_orders",
        Ddl,
        "SELECT INTO",
        &["archive", "old_orders", "orders"],
        NONE,
    ),
    (
        "CREATE MATERIALIZED VIEW mv AS SELECT * FROM orders",
        Ddl,
        "CREATE MATERIALIZED VIEW",
        &["mv", "orders"],
        NONE,
    ),
    ("CREATE VIEW v AS SELECT * FROM orders", Ddl, "CREATE VIEW", &["orders", "v"], NONE),
    ("CREATE INDEX CONCURRENTLY i ON orders (cid)", Ddl, "CREATE INDEX", &["orders"], NONE),
    ("ALTER TABLE orders ADD COLUMN note text", Ddl, "ALTER TABLE", &["orders"], NONE),
    ("ALTER TABLE orders RENAME TO orders_old", Ddl, "ALTER TABLE", &["orders"], NONE),
    ("ALTER TABLE orders SET SCHEMA archive", Ddl, "ALTER TABLE", &["orders"], NONE),
    ("DROP TABLE orders, hr.payroll", Ddl, "DROP TABLE", &["hr.payroll", "orders"], NONE),
    ("DROP VIEW IF EXISTS v", Ddl, "DROP VIEW", &["v"], NONE),
    ("DROP TRIGGER trg ON orders", Ddl, "DROP TRIGGER", &["orders"], NONE),
    ("DROP FUNCTION f(int)", Ddl, "DROP FUNCTION", NONE, NONE),
    ("DROP SCHEMA hr CASCADE", Ddl, "DROP SCHEMA", NONE, NONE),
    ("DROP DATABASE production", Ddl, "DROP DATABASE", NONE, NONE),
    ("drop database if exists x with (force)", Ddl, "DROP DATABASE", NONE, NONE),
    ("TRUNCATE orders, items RESTART IDENTITY", Ddl, "TRUNCATE", &["items", "orders"], NONE),
    ("truncate table only hr.payroll", Ddl, "TRUNCATE", &["hr.payroll"], NONE),
    ("COMMENT ON TABLE orders IS 'x'", Ddl, "COMMENT", &["orders"], NONE),
    ("COMMENT ON COLUMN hr.payroll.salary IS 'x'", Ddl, "COMMENT", &["hr.payroll"], NONE),
    (
        "REFRESH MATERIALIZED VIEW CONCURRENTLY mv",
        Ddl,
        "REFRESH MATERIALIZED VIEW",
        &["mv"],
        NONE,
    ),
    ("SECURITY LABEL FOR selinux ON TABLE orders IS 'x'", Ddl, "SECURITY LABEL", &["orders"], NONE),
    ("CREATE SCHEMA hr", Ddl, "CREATE SCHEMA", NONE, NONE),
    ("CREATE SEQUENCE s", Ddl, "CREATE SEQUENCE", &["s"], NONE),
    ("ALTER SEQUENCE s RESTART", Ddl, "ALTER SEQUENCE", &["s"], NONE),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        Ddl,
        "CREATE FUNCTION",
        NONE,
        NONE,
    ),
    (
        "CREATE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC DELETE FROM orders; END",
        Ddl,
        "CREATE PROCEDURE",
        &["orders"],
        NONE,
    ),
    ("CREATE EXTENSION pgcrypto", Ddl, "CREATE EXTENSION", NONE, NONE),
    ("CREATE DATABASE x", Ddl, "CREATE DATABASE", NONE, NONE),
    ("ALTER DATABASE x SET work_mem = '1GB'", Ddl, "ALTER DATABASE", NONE, NONE),
    ("CREATE TYPE mood AS ENUM ('sad', 'ok')", Ddl, "CREATE TYPE", NONE, NONE),
    (
        "CREATE TRIGGER t BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION f()",
        Ddl,
        "CREATE TRIGGER",
        &["orders"],
        NONE,
    ),
    ("CREATE RULE r AS ON DELETE TO orders DO INSTEAD NOTHING", Ddl, "CREATE RULE", &["orders"], NONE),
    ("CREATE POLICY p ON orders USING (true)", Ddl, "CREATE POLICY", &["orders"], NONE),
    ("EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1", Ddl, "EXPLAIN", &["x"], NONE),
    // Privileges and roles.
    ("GRANT SELECT ON orders TO analyst", Dcl, "GRANT", &["orders"], NONE),
    ("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM public", Dcl, "REVOKE", NONE, NONE),
    ("GRANT admin TO mallory", Dcl, "GRANT", NONE, NONE),
    ("CREATE ROLE mallory LOGIN SUPERUSER", Dcl, "CREATE ROLE", NONE, NONE),
    ("CREATE USER bob PASSWORD 'x'", Dcl, "CREATE USER", NONE, NONE),
    ("ALTER USER bob WITH SUPERUSER", Dcl, "ALTER ROLE", NONE, NONE),
    ("ALTER ROLE bob RENAME TO robert", Dcl, "ALTER ROLE", NONE, NONE),
    ("DROP ROLE bob", Dcl, "DROP ROLE", NONE, NONE),
    (
        "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO analyst",
        Dcl,
        "ALTER DEFAULT PRIVILEGES",
        NONE,
        NONE,
    ),
    ("REASSIGN OWNED BY bob TO alice", Dcl, "REASSIGN OWNED", NONE, NONE),
    ("DROP OWNED BY bob", Dcl, "DROP OWNED", NONE, NONE),
    ("ALTER TABLE orders OWNER TO mallory", Dcl, "ALTER TABLE", &["orders"], NONE),
    ("ALTER FUNCTION f() OWNER TO mallory", Dcl, "ALTER FUNCTION", NONE, NONE),
    ("ALTER LARGE OBJECT 1 OWNER TO mallory", Dcl, "ALTER LARGE OBJECT", NONE, NONE),
    ("SET SESSION ROLE admin", Dcl, "SET ROLE", NONE, NONE),
    // CREATE SCHEMA may carry a GRANT: the most dangerous part decides.
    (
        "CREATE SCHEMA s CREATE TABLE t (id int) GRANT SELECT ON t TO public",
        Dcl,
        "CREATE SCHEMA",
        &["t"],
        NONE,
    ),
    ("SET ROLE admin", Dcl, "SET ROLE", NONE, NONE),
    ("SET LOCAL ROLE admin", Dcl, "SET ROLE", NONE, NONE),
    (r#"SET "ROLE" TO admin"#, Dcl, "SET ROLE", NONE, NONE),
    ("RESET ROLE", Dcl, "RESET ROLE", NONE, NONE),
    ("SET SESSION AUTHORIZATION postgres", Dcl, "SET SESSION AUTHORIZATION", NONE, NONE),
    ("RESET SESSION AUTHORIZATION", Dcl, "RESET SESSION AUTHORIZATION", NONE, NONE),
    // Transaction control.
    ("BEGIN", Transaction, "BEGIN", NONE, NONE),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", Transaction, "START TRANSACTION", NONE, NONE),
    ("COMMIT", Transaction, "COMMIT", NONE, NONE),
    ("END", Transaction, "COMMIT", NONE, NONE),
    ("ROLLBACK", Transaction, "ROLLBACK", NONE, NONE),
    ("ABORT", Transaction, "ROLLBACK", NONE, NONE),
    ("SAVEPOINT s1", Transaction, "SAVEPOINT", NONE, NONE),
    ("RELEASE SAVEPOINT s1", Transaction, "RELEASE", NONE, NONE),
    ("ROLLBACK TO SAVEPOINT s1", Transaction, "ROLLBACK TO SAVEPOINT", NONE, NONE),
    ("PREPARE TRANSACTION 'tx1'", Transaction, "PREPARE TRANSACTION", NONE, NONE),
    ("COMMIT PREPARED 'tx1'", Transaction, "COMMIT PREPARED", NONE, NONE),
    ("ROLLBACK PREPARED 'tx1'", Transaction, "ROLLBACK PREPARED", NONE, NONE),
    ("SET TRANSACTION READ ONLY", Transaction, "SET TRANSACTION", NONE, NONE),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        Transaction,
        "SET SESSION CHARACTERISTICS",
        NONE,
        NONE,
    ),
    ("SET CONSTRAINTS ALL DEFERRED", Transaction, "SET CONSTRAINTS", NONE, NONE),
    // Session utilities.
    ("SET search_path TO hr, public", Utility, "SET", NONE, NONE),
    ("SET statement_timeout = 0", Utility, "SET", NONE, NONE),
    ("RESET ALL", Utility, "RESET", NONE, NONE),
    ("RESET work_mem", Utility, "RESET", NONE, NONE),
    ("DISCARD ALL", Utility, "DISCARD", NONE, NONE),
    ("LISTEN orders_changed", Utility, "LISTEN", NONE, NONE),
    ("UNLISTEN *", Utility, "UNLISTEN", NONE, NONE),
    ("NOTIFY orders_changed, 'x'", Utility, "NOTIFY", NONE, NONE),
    ("DEALLOCATE ALL", Utility, "DEALLOCATE", NONE, NONE),
    ("MOVE FORWARD 5 IN c", Utility, "MOVE", NONE, NONE),
    ("CLOSE c", Utility, "CLOSE", NONE, NONE),
    // Server administration.
    ("VACUUM FULL orders", Admin, "VACUUM", &["orders"], NONE),
    ("VACUUM (VERBOSE, ANALYZE) orders", Admin, "VACUUM", &["orders"], NONE),
    ("ANALYZE orders", Admin, "ANALYZE", &["orders"], NONE),
    ("CLUSTER orders USING orders_pkey", Admin, "CLUSTER", &["orders"], NONE),
    ("REINDEX TABLE orders", Admin, "REINDEX", &["orders"], NONE),
    ("CHECKPOINT", Admin, "CHECKPOINT", NONE, NONE),
    ("ALTER SYSTEM SET max_connections = 10", Admin, "ALTER SYSTEM", NONE, NONE),
    ("LOAD 'auto_explain'", Admin, "LOAD", NONE, NONE),
    ("CREATE TABLESPACE ts LOCATION '/data'", Admin, "CREATE TABLESPACE", NONE, NONE),
    ("ALTER TABLESPACE ts RENAME TO ts2", Admin, "ALTER TABLESPACE", NONE, NONE),
    ("DROP TABLESPACE ts", Admin, "DROP TABLESPACE", NONE, NONE),
    ("ALTER TABLE ALL IN TABLESPACE a SET TABLESPACE b", Admin, "ALTER TABLE", NONE, NONE),
    ("CREATE PUBLICATION p FOR TABLE orders", Admin, "CREATE PUBLICATION", &["orders"], NONE),
    ("DROP PUBLICATION p", Admin, "DROP PUBLICATION", NONE, NONE),
    (
        "CREATE SUBSCRIPTION s CONNECTION 'host=x' PUBLICATION p",
        Admin,
        "CREATE SUBSCRIPTION",
        NONE,
        NONE,
    ),
    ("COPY orders TO '/tmp/orders.csv'", Admin, "COPY", &["orders"], NONE),
    ("COPY orders FROM '/etc/passwd'", Admin, "COPY", &["orders"], NONE),
    ("COPY orders FROM PROGRAM 'curl https://evil'", Admin, "COPY", &["orders"], NONE),
    ("COPY (SELECT 1) TO PROGRAM 'sh'", Admin, "COPY", NONE, NONE),
    // Opaque code.
    ("CALL archive_orders(30)", Call, "CALL", NONE, &["archive_orders"]),
    ("CALL hr.raise(now())", Call, "CALL", NONE, &["hr.raise", "now"]),
    // A DO block keeps its class; the tables of the statements inside are its own too (each
    // inner statement is checked in tests/do_blocks.rs).
    ("DO $$ BEGIN DELETE FROM orders; END $$", Do, "DO", &["orders"], NONE),
    ("DO LANGUAGE plpgsql 'BEGIN NULL; END'", Do, "DO", NONE, NONE),
];

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn one(sql: &str) -> Statement {
    let mut statements = classify(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert_eq!(statements.len(), 1, "{sql}: {statements:?}");
    statements.remove(0)
}

#[test]
fn every_row_gets_its_class_command_tables_and_functions() {
    let classifier = Classifier::new(4096);
    let mut failures = Vec::new();
    for &(sql, class, command, tables, functions) in ROWS {
        let got = match classify(sql) {
            Ok(statements) if statements.len() == 1 => statements.into_iter().next().unwrap(),
            other => {
                failures.push(format!("{sql}: {other:?}"));
                continue;
            }
        };
        let want = (class, command, strings(tables), strings(functions));
        let have = (
            got.class,
            &*got.command,
            got.tables.to_vec(),
            got.functions.to_vec(),
        );
        if have != want {
            failures.push(format!("{sql}:\n    got  {have:?}\n    want {want:?}"));
        }
        assert_eq!(&*got.text, sql.trim(), "the statement's own text");
        for _ in 0..2 {
            let cached = classifier.classify(sql).unwrap();
            assert_eq!(&cached[..], &[got.clone()][..], "{sql} through the cache");
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows wrong:\n{}",
        failures.len(),
        ROWS.len(),
        failures.join("\n")
    );
}

#[test]
fn the_table_covers_every_class_and_at_least_eighty_shapes() {
    assert!(ROWS.len() >= 80, "{} rows", ROWS.len());
    let covered: BTreeSet<&str> = ROWS.iter().map(|row| row.1.as_str()).collect();
    let all: BTreeSet<&str> = StatementClass::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(covered, all);
}

#[test]
fn class_names_are_the_policy_spellings() {
    let names: Vec<&str> = StatementClass::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        names,
        [
            "read",
            "write",
            "ddl",
            "dcl",
            "transaction",
            "utility",
            "admin",
            "call",
            "do"
        ]
    );
    assert_eq!(StatementClass::Dcl.to_string(), "dcl");
}

#[test]
fn several_statements_come_back_one_by_one_with_their_own_text() {
    let statements = classify("BEGIN; DELETE FROM orders WHERE id = 1;\n  COMMIT ;").unwrap();
    let got: Vec<(&str, StatementClass, &str)> = statements
        .iter()
        .map(|s| (&*s.text, s.class, &*s.command))
        .collect();
    assert_eq!(
        got,
        [
            ("BEGIN", Transaction, "BEGIN"),
            ("DELETE FROM orders WHERE id = 1", Write, "DELETE"),
            ("COMMIT", Transaction, "COMMIT"),
        ]
    );

    let statements = classify("SELECT 1; DROP DATABASE production").unwrap();
    assert_eq!(statements.len(), 2);
    assert_eq!(statements[0].class, Read);
    assert_eq!(statements[1].class, Ddl);
    assert_eq!(&*statements[1].command, "DROP DATABASE");
    assert_eq!(&*statements[1].text, "DROP DATABASE production");
}

#[test]
fn a_statement_hidden_after_a_comment_or_string_is_still_found() {
    let statements =
        classify("SELECT 'a; DROP TABLE x' /* ; DROP TABLE y */; -- DROP TABLE z\nTRUNCATE t")
            .unwrap();
    let commands: Vec<&str> = statements.iter().map(|s| &*s.command).collect();
    assert_eq!(commands, ["SELECT", "TRUNCATE"]);
    assert_eq!(*statements[1].tables, ["t"]);
}

#[test]
fn empty_and_comment_only_sql_has_no_statements() {
    for sql in [
        "",
        "   \n\t",
        "-- only a comment",
        "/* a */ ; ; /* b */",
        ";",
    ] {
        assert_eq!(classify(sql).unwrap(), [], "{sql:?}");
        assert_eq!(
            Classifier::new(8).classify(sql).unwrap().len(),
            0,
            "{sql:?}"
        );
    }
}

#[test]
fn sql_that_does_not_parse_is_an_error_for_the_whole_string() {
    for sql in [
        "SELEC 1",
        "SELECT 1; SELEC 2",
        "SELECT (",
        "DELETE orders",
        "'",
    ] {
        match classify(sql) {
            Err(ClassifyError::Syntax { message, position }) => {
                assert!(message.contains(" at "), "{sql}: {message}");
                let at_end = message.ends_with("at end of input");
                assert_eq!(position, at_end.then_some(sql.len()), "{sql}: {message}");
            }
            other => panic!("{sql}: {other:?}"),
        }
    }
    let error = classify("SELEC 1").unwrap_err();
    assert_eq!(
        error.to_string(),
        r#"SQL syntax error: syntax error at or near "SELEC""#
    );
}

#[test]
fn replication_commands_are_not_sql() {
    for sql in ["IDENTIFY_SYSTEM", "START_REPLICATION SLOT s LOGICAL 0/0"] {
        assert!(
            matches!(classify(sql), Err(ClassifyError::Syntax { .. })),
            "{sql}"
        );
    }
}

#[test]
fn ten_thousand_nested_parentheses_are_an_error_not_a_crash() {
    let sql = format!("SELECT {}1{}", "(".repeat(10_000), ")".repeat(10_000));
    assert!(
        matches!(classify(&sql), Err(ClassifyError::TooDeep { .. })),
        "{:?}",
        classify(&sql)
    );
}

#[test]
fn deep_trees_are_refused_where_the_parser_or_its_decoder_stop() {
    // 30 chained operators decode; 200 exceed prost's 100-message limit; thousands of nested
    // subqueries exceed libpg_query's own stack-depth check.
    let chain = |n: usize| format!("SELECT {}", vec!["x"; n].join(" || "));
    assert_eq!(one(&chain(30)).class, Read);
    assert!(matches!(
        classify(&chain(200)),
        Err(ClassifyError::TooDeep { .. })
    ));
    let nested = format!("SELECT {}1{}", "(SELECT ".repeat(5_000), ")".repeat(5_000));
    assert!(matches!(
        classify(&nested),
        Err(ClassifyError::TooDeep { .. })
    ));
    let nested = format!(
        "SELECT * FROM {}orders{}",
        "(SELECT * FROM ".repeat(8),
        ") s".repeat(8)
    );
    assert_eq!(*one(&nested).tables, ["orders"]);
}

#[test]
fn long_statements_classify_up_to_the_limit_and_are_refused_beyond() {
    let columns: Vec<String> = (0..20_000).map(|i| format!("c{i}")).collect();
    let sql = format!("SELECT {} FROM hr.payroll", columns.join(", "));
    assert!(sql.len() > 100_000);
    let statement = one(&sql);
    assert_eq!(*statement.tables, ["hr.payroll"]);
    assert_eq!(statement.text.len(), sql.len());

    let classifier = Classifier::with_limits(16, 1 << 20, 1000);
    assert_eq!(
        classifier.classify(&sql).unwrap_err(),
        ClassifyError::TooLong {
            len: sql.len(),
            max: 1000
        }
    );
    assert_eq!(classifier.classify("SELECT 1").unwrap().len(), 1);
}

#[test]
fn a_nul_byte_is_refused() {
    assert_eq!(
        classify("SELECT 1;\0DROP TABLE x").unwrap_err(),
        ClassifyError::NulByte { position: 9 }
    );
}

#[test]
fn non_ascii_text_is_sliced_on_byte_offsets() {
    let statements = classify("SELECT 'é€'; SELECT * FROM \"tâble\"").unwrap();
    assert_eq!(&*statements[0].text, "SELECT 'é€'");
    assert_eq!(&*statements[1].text, "SELECT * FROM \"tâble\"");
    assert_eq!(*statements[1].tables, ["tâble"]);
}

#[test]
fn fingerprints_ignore_constants_but_not_tables() {
    let fingerprint = |sql: &str| one(sql).fingerprint;
    assert_eq!(
        fingerprint("SELECT * FROM orders WHERE id = 1"),
        fingerprint("SELECT * FROM orders WHERE id = 2")
    );
    assert_ne!(
        fingerprint("SELECT * FROM public.orders"),
        fingerprint("SELECT * FROM hr.orders")
    );
    assert_ne!(
        fingerprint("SELECT * FROM orders o"),
        fingerprint("SELECT * FROM payroll o")
    );
    assert_ne!(
        fingerprint("SELECT * FROM orders_2024"),
        fingerprint("SELECT * FROM orders_2025")
    );
}

#[test]
fn the_cache_returns_the_same_answer_without_parsing_again() {
    let classifier = Classifier::new(64);
    let first = classifier.classify("SELECT * FROM orders").unwrap();
    let second = classifier.classify("SELECT * FROM orders").unwrap();
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(classifier.cached(), 1);
    // Errors are not cached, and stay errors.
    assert!(classifier.classify("SELEC 1").is_err());
    assert!(classifier.classify("SELEC 1").is_err());
    assert_eq!(classifier.cached(), 1);
}

#[test]
fn the_cache_stays_bounded() {
    let classifier = Classifier::new(8);
    for i in 0..500 {
        classifier
            .classify(&format!("SELECT * FROM t{i} WHERE id = {i}"))
            .unwrap();
        assert!(classifier.cached() <= 8, "{}", classifier.cached());
        assert!(
            classifier.cached_shapes() <= 8,
            "{}",
            classifier.cached_shapes()
        );
    }
    // The most recent entries are still there.
    let before = classifier.cached();
    classifier
        .classify("SELECT * FROM t499 WHERE id = 499")
        .unwrap();
    assert_eq!(classifier.cached(), before);

    // A byte budget bounds the cache too: 64 KiB cannot hold 100 statements of 4 KiB.
    let classifier = Classifier::with_limits(4096, 64 * 1024, 1 << 20);
    let padding = "x".repeat(4000);
    for i in 0..100 {
        classifier
            .classify(&format!("SELECT '{padding}' FROM t{i}"))
            .unwrap();
    }
    assert!(classifier.cached() < 16, "{}", classifier.cached());
}

#[test]
fn the_same_query_with_other_constants_reuses_the_classification() {
    let classifier = Classifier::new(64);
    let first = "SELECT * FROM orders WHERE id = 1 AND note = 'a'";
    let second = "SELECT * FROM orders WHERE id = 42 AND note = 'b; DROP TABLE x'";
    classifier.classify(first).unwrap();
    assert_eq!(classifier.cached_shapes(), 1);
    let cached = classifier.classify(second).unwrap();
    assert_eq!(&cached[..], &classify(second).unwrap()[..]);
    assert_eq!(&*cached[0].text, second);
    assert_eq!(classifier.cached_shapes(), 1);

    let multi = "BEGIN; UPDATE orders SET total = 1 WHERE id = 2; COMMIT";
    classifier.classify(multi).unwrap();
    let other = "BEGIN; UPDATE orders SET total = 3 WHERE id = 4; COMMIT";
    assert_eq!(
        &classifier.classify(other).unwrap()[..],
        &classify(other).unwrap()[..]
    );
}

#[test]
fn constants_that_decide_the_class_are_never_shared_through_the_cache() {
    let classifier = Classifier::new(64);
    let off = "EXPLAIN (ANALYZE 'off') DELETE FROM orders";
    let on = "EXPLAIN (ANALYZE 'on') DELETE FROM orders";
    assert_eq!(classifier.classify(off).unwrap()[0].class, Read);
    assert_eq!(classifier.classify(on).unwrap()[0].class, Write);
    assert_eq!(classifier.classify(off).unwrap()[0].class, Read);
}

#[test]
fn a_constant_of_another_kind_is_not_served_from_the_shape_cache() {
    // The grammar tells integer, numeric and string constants apart: a type modifier must
    // be an integer, and one too large for `int4` is a numeric token. Found by the fuzzer.
    let classifier = Classifier::new(64);
    for (parses, fails) in [
        (
            "SELECT x::varchar(10) FROM t",
            "SELECT x::varchar(.5) FROM t",
        ),
        (
            "SELECT x::varchar(10) FROM t",
            "SELECT x::varchar(99999999999) FROM t",
        ),
        (
            "SELECT x::varchar(10) FROM t",
            "SELECT x::varchar('10') FROM t",
        ),
    ] {
        assert!(classifier.classify(parses).is_ok(), "{parses}");
        assert!(classify(fails).is_err(), "{fails}");
        assert!(classifier.classify(fails).is_err(), "{fails}");
    }
}

#[test]
fn every_row_classifies_the_same_after_a_sibling_with_other_constants() {
    // Each row's SQL with its constants changed must classify as it does from scratch, even
    // when the classifier has seen the original first.
    let classifier = Classifier::new(4096);
    for &(sql, ..) in ROWS {
        classifier.classify(sql).unwrap();
        let sibling = sql
            .replace("'x'", "'y'")
            .replace("(1)", "(7)")
            .replace("= 1", "= 9")
            .replace("30", "31");
        if sibling == sql {
            continue;
        }
        let Ok(fresh) = classify(&sibling) else {
            continue;
        };
        assert_eq!(
            &classifier.classify(&sibling).unwrap()[..],
            &fresh[..],
            "{sibling}"
        );
    }
}

#[test]
fn one_classifier_serves_many_threads() {
    let classifier = Arc::new(Classifier::new(128));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let classifier = Arc::clone(&classifier);
            std::thread::spawn(move || {
                for i in 0..200 {
                    let (sql, class, ..) = ROWS[(i * 7 + t) % ROWS.len()];
                    assert_eq!(classifier.classify(sql).unwrap()[0].class, class, "{sql}");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert!(classifier.cached() <= 128);
}
