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

/// A column read under another name keeps the column it is read from among its sources:
/// what masking rules by name are matched against besides the label (the server reports a
/// plain reference's table column too; these are the computed and unplaceable cases).
#[test]
fn renamed_columns_keep_their_sources() {
    let c = Some("customers");
    let email = || r(c, Some("email"));
    // (statement, result column, a source it must have)
    let rows: Vec<(&str, usize, SourceRef)> = vec![
        ("SELECT email AS y FROM customers", 0, email()),
        ("SELECT email y FROM customers", 0, email()),
        (
            "SELECT x FROM (SELECT email AS x FROM customers) s",
            0,
            email(),
        ),
        // Nested subqueries, each renaming.
        (
            "SELECT z FROM (SELECT y AS z FROM (SELECT email AS y FROM customers) a) b",
            0,
            email(),
        ),
        (
            "WITH s AS (SELECT email AS e FROM customers) SELECT e FROM s",
            0,
            email(),
        ),
        // A CTE's column list renames its columns.
        (
            "WITH s(e) AS (SELECT email FROM customers) SELECT e FROM s",
            0,
            email(),
        ),
        // A CTE reading a CTE.
        (
            "WITH a AS (SELECT * FROM customers), b AS (SELECT email AS m FROM a) SELECT m AS q FROM b",
            0,
            r(c, None),
        ),
        // A table's column alias list: which column is which needs the catalog, so every
        // column of the table (its whole row).
        ("SELECT e FROM customers AS c(i, n, e)", 0, r(c, None)),
        ("SELECT c.e FROM customers c(i, n, e)", 0, r(c, None)),
        // A subquery's column alias list.
        (
            "SELECT z FROM (SELECT email FROM customers) AS s(z)",
            0,
            email(),
        ),
        // Joins with aliases on both sides.
        (
            "SELECT c.email z, o.total FROM customers c JOIN orders o ON o.cid = c.id",
            0,
            email(),
        ),
        (
            "SELECT d.email FROM orders o LEFT JOIN customers AS d ON d.id = o.cid",
            0,
            email(),
        ),
        // LATERAL: the subquery names the outer item.
        (
            "SELECT x FROM customers c, LATERAL (SELECT c.email AS x) s",
            0,
            r(None, Some("email")),
        ),
        (
            "SELECT s.x FROM customers c CROSS JOIN LATERAL (SELECT lower(c.email) AS x) s",
            0,
            r(None, Some("email")),
        ),
        // A VALUES list's alias list, joined with a renamed column.
        (
            "SELECT v.a, s.z FROM (VALUES (1)) AS v(a) JOIN (SELECT id, email AS z FROM customers) s ON s.id = v.a",
            1,
            email(),
        ),
        // A function in FROM with a column alias list, over a column.
        (
            "SELECT z FROM customers, unnest(array[email]) AS u(z)",
            0,
            email(),
        ),
        // A whole-row field, renamed.
        ("SELECT (c).email AS z FROM customers c", 0, r(c, None)),
        // Expressions that pass a value through.
        ("SELECT email COLLATE \"C\" AS z FROM customers", 0, email()),
        ("SELECT email::varchar AS z FROM customers", 0, email()),
        (
            "SELECT CASE WHEN id > 0 THEN email END AS z FROM customers",
            0,
            email(),
        ),
        ("SELECT COALESCE(email, '') AS z FROM customers", 0, email()),
        (
            "SELECT string_agg(email, ',') AS z FROM customers",
            0,
            email(),
        ),
        ("SELECT format('%s', email) AS z FROM customers", 0, email()),
        // RETURNING under another name.
        (
            "UPDATE customers SET note = note RETURNING email AS z",
            0,
            email(),
        ),
    ];
    for (sql, column, want) in rows {
        let s = sources(sql);
        assert!(has(&s, column, &want), "{sql}: {s:#?}");
    }
    // Lists that do not line up with the result (a set operation, `*`): every reference of
    // the query, which holds the renamed column.
    for sql in [
        "SELECT email AS z FROM customers UNION ALL SELECT 'x'",
        "SELECT z FROM customers c(i, n, z) UNION SELECT name FROM staff",
        "WITH s AS (SELECT email AS e FROM customers) SELECT * FROM s",
        "SELECT * FROM (SELECT email AS z FROM customers) s",
    ] {
        let s = sources(sql);
        assert!(
            s.all.contains(&email()) || s.all.contains(&r(c, None)),
            "{sql}: {s:#?}"
        );
    }
}

/// Whether a write in the statement stores in `column` (`None`: any column) something
/// computed from `want`.
fn stores(s: &ResultSources, column: Option<&str>, want: &SourceRef) -> bool {
    s.assigned
        .iter()
        .any(|a| a.column.as_deref() == column && a.from.contains(want))
}

#[test]
fn writes_name_what_they_store_in_each_column() {
    let c = Some("customers");
    let email = || r(c, Some("email"));
    // (statement, column stored in, a source it must have)
    let rows: Vec<(&str, Option<&str>, SourceRef)> = vec![
        (
            "UPDATE customers SET note = email RETURNING note",
            Some("note"),
            email(),
        ),
        (
            "UPDATE customers SET note = lower(email) || '' RETURNING id",
            Some("note"),
            email(),
        ),
        // A multiple assignment from a subquery.
        (
            "UPDATE customers SET (note, id) = (SELECT email, 7 FROM customers) RETURNING note",
            Some("note"),
            // In a subquery a bare name may be an outer query's: "some table".
            r(None, Some("email")),
        ),
        // UPDATE ... FROM a CTE that renames.
        (
            "WITH s AS (SELECT id, email AS m FROM customers) \
             UPDATE customers c SET note = s.m FROM s WHERE s.id = c.id RETURNING c.note",
            Some("note"),
            email(),
        ),
        // INSERT ... SELECT lined up with the column list.
        (
            "INSERT INTO customers (id, note) SELECT id, email FROM customers RETURNING note",
            Some("note"),
            email(),
        ),
        // Without a column list: any column.
        (
            "INSERT INTO customers SELECT id, name, note, card, email FROM customers RETURNING note",
            None,
            email(),
        ),
        (
            "INSERT INTO customers (id, note) VALUES (1, (SELECT email FROM customers LIMIT 1)) RETURNING note",
            Some("note"),
            // In a subquery a bare name may be an outer query's: "some table".
            r(None, Some("email")),
        ),
        (
            "INSERT INTO customers (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET note = customers.email RETURNING note",
            Some("note"),
            email(),
        ),
        // `excluded` is the proposed row: what the INSERT's query read.
        (
            "INSERT INTO customers (id, note) SELECT id, email FROM customers ON CONFLICT (id) DO UPDATE SET card = excluded.note RETURNING card",
            Some("card"),
            email(),
        ),
        // A data-modifying WITH read by the statement's query.
        (
            "WITH u AS (UPDATE customers SET note = email RETURNING note) SELECT note FROM u",
            Some("note"),
            email(),
        ),
        (
            "WITH u AS (INSERT INTO customers (id, note) SELECT id, email FROM customers RETURNING *) SELECT * FROM u",
            Some("note"),
            email(),
        ),
    ];
    let mut failures = Vec::new();
    for (sql, column, want) in &rows {
        let statements = classify(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let found = statements[0]
            .result_sources
            .as_deref()
            .is_some_and(|s| stores(s, *column, want));
        if !found {
            failures.push(format!(
                "{sql}: nothing stored in {column:?} from {want:?}: {:?}",
                statements[0].result_sources
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // A constant stores nothing a rule could select; RETURNING id stores nothing in id.
    let s = sources("UPDATE customers SET note = 'x' RETURNING note, id");
    assert!(
        s.assigned.iter().all(|a| a.from.is_empty()),
        "{:?}",
        s.assigned
    );
}
