//! Where result columns come from, for masking computed values: resolved through aliases,
//! joins, subqueries and CTEs, conservative where a name cannot be placed.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

use portcullis_sql::{classify, ResultSources, SourceRef};

fn sources(sql: &str) -> ResultSources {
    let statements = classify(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    statements[0]
        .result_sources
        .as_deref()
        .cloned()
        .unwrap_or_else(|| panic!("{sql}: no result sources"))
}

fn r(table: Option<&str>, column: Option<&str>) -> SourceRef {
    SourceRef {
        table: table.map(str::to_owned),
        column: column.map(str::to_owned),
    }
}

/// Whether some source of column `i` is `want` (the lists are sets; extra entries are the
/// conservative readings).
fn has(s: &ResultSources, i: usize, want: &SourceRef) -> bool {
    s.columns.as_ref().unwrap()[i].contains(want)
}

#[test]
fn computed_columns_name_their_sources() {
    let c = Some("customers");
    let rows: Vec<(&str, usize, SourceRef)> = vec![
        ("SELECT lower(email) FROM customers", 0, r(c, Some("email"))),
        (
            "SELECT id, name || '' FROM customers",
            1,
            r(c, Some("name")),
        ),
        ("SELECT row_to_json(x) FROM customers x", 0, r(c, None)),
        (
            "SELECT row_to_json(customers) FROM customers",
            0,
            r(c, None),
        ),
        ("SELECT to_json(x.*) FROM customers x", 0, r(c, None)),
        (
            "SELECT x.email FROM public.customers x",
            0,
            r(Some("public.customers"), Some("email")),
        ),
        (
            "SELECT public.customers.email FROM public.customers",
            0,
            r(Some("public.customers"), Some("email")),
        ),
        (
            "SELECT o.total, upper(c.name) FROM orders o JOIN customers c ON c.id = o.cid",
            1,
            r(c, Some("name")),
        ),
        // Through a subquery in FROM: its references stand for its columns.
        (
            "SELECT lower(s.x) FROM (SELECT email AS x FROM customers) s",
            0,
            r(c, Some("email")),
        ),
        (
            "SELECT j FROM (SELECT row_to_json(c) AS j FROM customers c) s",
            0,
            r(c, None),
        ),
        // Through a CTE.
        (
            "WITH e AS (SELECT email FROM customers) SELECT lower(email) FROM e",
            0,
            r(c, Some("email")),
        ),
        // A scalar subquery, correlated: its bare name is "some table's".
        (
            "SELECT (SELECT lower(email) FROM customers x WHERE x.id = o.cid) FROM orders o",
            0,
            r(None, Some("email")),
        ),
        // Columns renamed in FROM: any column may be any of the table's.
        ("SELECT lower(x) FROM customers c(i, x)", 0, r(c, None)),
        (
            "SELECT lower(c.x) FROM customers AS c (i, x)",
            0,
            r(c, None),
        ),
        // A join alias.
        (
            "SELECT row_to_json(j) FROM (customers c JOIN orders o ON o.cid = c.id) j",
            0,
            r(c, None),
        ),
        // A RETURNING list.
        (
            "DELETE FROM customers WHERE id = 1 RETURNING lower(email)",
            0,
            r(c, Some("email")),
        ),
        // Under DECLARE CURSOR and PREPARE.
        (
            "DECLARE k CURSOR FOR SELECT row_to_json(c) FROM customers c",
            0,
            r(c, None),
        ),
        (
            "PREPARE p AS SELECT lower(email) FROM customers",
            0,
            r(c, Some("email")),
        ),
    ];
    for (sql, column, want) in rows {
        let s = sources(sql);
        assert!(has(&s, column, &want), "{sql}: {s:#?}");
        assert!(
            s.all.contains(&want) || want.table.is_none(),
            "{sql}: all {s:#?}"
        );
    }
}

#[test]
fn columns_that_use_nothing_have_no_sources() {
    let s = sources("SELECT count(*), 1, now(), count(DISTINCT email) FROM customers");
    assert_eq!(s.columns, Some(vec![vec![], vec![], vec![], vec![]]));
}

#[test]
fn lists_that_do_not_line_up_fall_back_to_every_reference() {
    for sql in [
        "SELECT *, lower(email) FROM customers",
        "SELECT c.*, 1 FROM customers c",
        "SELECT email FROM customers UNION SELECT name FROM staff",
        "VALUES (1), (2)",
    ] {
        let s = sources(sql);
        assert_eq!(s.columns, None, "{sql}");
    }
    let s = sources("SELECT email FROM customers UNION SELECT name FROM staff");
    assert!(
        s.all.contains(&r(Some("customers"), Some("email"))),
        "{s:#?}"
    );
    assert!(s.all.contains(&r(Some("staff"), Some("name"))), "{s:#?}");
}

#[test]
fn statements_that_return_no_rows_have_none() {
    for sql in [
        "UPDATE customers SET name = 'x'",
        "CREATE TABLE t (a int)",
        "SET x = 1",
    ] {
        let statements = classify(sql).unwrap();
        assert_eq!(statements[0].result_sources, None, "{sql}");
    }
}

#[test]
fn named_queries_are_recognised() {
    use portcullis_sql::NamedQuery::*;
    for (sql, want) in [
        (
            "DECLARE k CURSOR FOR SELECT 1",
            Some(DeclaresCursor("k".into())),
        ),
        ("PREPARE p AS SELECT 1", Some(Prepares("p".into()))),
        ("FETCH 5 FROM k", Some(FetchesFrom("k".into()))),
        ("FETCH ALL IN \"K\"", Some(FetchesFrom("K".into()))),
        ("MOVE 5 IN k", None),
        ("EXECUTE p(1)", Some(Executes("p".into()))),
        ("DEALLOCATE p", Some(Deallocates(Some("p".into())))),
        (
            "DEALLOCATE PREPARE \"P\"",
            Some(Deallocates(Some("P".into()))),
        ),
        ("DEALLOCATE ALL", Some(Deallocates(None))),
        ("DISCARD ALL", Some(Deallocates(None))),
        ("DISCARD PLANS", None),
        ("CLOSE k", Some(Closes(Some("k".into())))),
        ("CLOSE ALL", Some(Closes(None))),
        ("DISCARD TEMP", None),
        ("SELECT 1", None),
    ] {
        assert_eq!(classify(sql).unwrap()[0].named_query, want, "{sql}");
    }
}
