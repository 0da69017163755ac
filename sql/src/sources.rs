//! Where each result column of a query comes from, for masking values the server reports as
//! computed (RowDescription gives them no table): `lower(email)`, `row_to_json(c)`,
//! `name || ''`, a subquery's expression. Conservative by construction: a column reference
//! this walk cannot place is a reference to "some table" (`table: None`), a reference to a
//! FROM subquery, function or CTE stands for every column that item references, and a bare
//! name that could be a column or a whole row counts as both.

use crate::tree::Tree;

/// A column (or a whole row) a result value is computed from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceRef {
    /// The table as written (`schema.table` or `table`), `None` when it cannot be told.
    pub table: Option<String>,
    /// The column, `None` for a whole row (`row_to_json(c)`, `c.*`).
    pub column: Option<String>,
}

/// The sources of a query's result columns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResultSources {
    /// One entry per result column, in order; `None` when the select list cannot be lined up
    /// with the result (a `*` in it, a set operation such as UNION).
    pub columns: Option<Vec<Vec<SourceRef>>>,
    /// Every column the query references anywhere: what a result column that cannot be lined
    /// up may come from.
    pub all: Vec<SourceRef>,
    /// What the statement's writes (its own, or a data-modifying WITH's) store in a column.
    /// The server names a RETURNING column, or a column read from such a WITH, as the
    /// written table's column, so `UPDATE customers SET note = email RETURNING note` shows
    /// an email under the name `note`: such a column is masked by what was stored in it too.
    pub assigned: Vec<Assigned>,
}

/// A column a write in the statement stores a value in, and what that value may be computed
/// from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    /// The column as written in `SET`, an INSERT's column list or a MERGE action; `None`:
    /// any column of the written table (an INSERT without a column list).
    pub column: Option<String>,
    pub from: Vec<SourceRef>,
}

impl ResultSources {
    /// What result column `index` may be computed from: its own sources when the select list
    /// lines up with the result (`width`, the result's column count, when known), else every
    /// reference of the query.
    pub fn of_column(&self, index: usize, width: Option<usize>) -> &[SourceRef] {
        match &self.columns {
            Some(columns) if width.is_none_or(|w| w == columns.len()) => {
                columns.get(index).unwrap_or(&self.all)
            }
            _ => &self.all,
        }
    }
}

/// A query kept under a name in the session, or a statement that runs one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamedQuery {
    /// DECLARE CURSOR (the cursor) or PREPARE (the statement): the name is cursor's or the
    /// prepared statement's, in their own namespaces.
    DeclaresCursor(String),
    Prepares(String),
    /// FETCH from a cursor, EXECUTE of a prepared statement: its rows are that query's.
    FetchesFrom(String),
    Executes(String),
    /// DEALLOCATE of one prepared statement, or of all (`None`: DEALLOCATE ALL, DISCARD
    /// ALL). SQL and the protocol's Parse share the server's statement names, so this also
    /// removes statements the client made with Parse.
    Deallocates(Option<String>),
    /// CLOSE of one cursor, or of all (`None`: CLOSE ALL). Cursors and the protocol's
    /// portals share the server's names, so this also closes portals made with Bind.
    Closes(Option<String>),
}

/// `DiscardMode::DiscardAll` in libpg_query's protobuf.
const DISCARD_ALL: i64 = 1;

pub(crate) fn named_query(stmt: &Tree) -> Option<NamedQuery> {
    match stmt.name()? {
        "DeclareCursorStmt" => Some(NamedQuery::DeclaresCursor(
            stmt.str("portalname").to_owned(),
        )),
        "PrepareStmt" => Some(NamedQuery::Prepares(stmt.str("name").to_owned())),
        "FetchStmt" if !stmt.bool("ismove") => {
            Some(NamedQuery::FetchesFrom(stmt.str("portalname").to_owned()))
        }
        "ExecuteStmt" => Some(NamedQuery::Executes(stmt.str("name").to_owned())),
        "DeallocateStmt" => Some(NamedQuery::Deallocates(
            Some(stmt.str("name"))
                .filter(|name| !name.is_empty())
                .map(str::to_owned),
        )),
        "ClosePortalStmt" => Some(NamedQuery::Closes(
            Some(stmt.str("portalname"))
                .filter(|name| !name.is_empty())
                .map(str::to_owned),
        )),
        // DISCARD ALL also deallocates every prepared statement; DISCARD PLANS, SEQUENCES
        // and TEMP do not.
        "DiscardStmt" if stmt.int("target") == DISCARD_ALL => Some(NamedQuery::Deallocates(None)),
        _ => None,
    }
}

/// The sources of `stmt`'s result, when it is a query (also under DECLARE CURSOR, PREPARE
/// and CREATE TABLE AS, and the RETURNING list of a write).
pub(crate) fn result_sources(stmt: &Tree) -> Option<ResultSources> {
    match stmt.name()? {
        "SelectStmt" => Some(select_sources(stmt, &[], 0, true)),
        "DeclareCursorStmt" | "PrepareStmt" => result_sources(stmt.field("query")),
        "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
            let returning = stmt.field("returning_clause").list("exprs");
            if returning.is_empty() {
                return None;
            }
            // The target table, and what UPDATE ... FROM / DELETE ... USING add.
            let mut scope = Scope::of_relation(stmt.field("relation"));
            for item in stmt
                .list("from_clause")
                .iter()
                .chain(stmt.list("using_clause"))
            {
                scope.add(item, 1);
            }
            let all = scope.resolve_expr(stmt);
            let columns = returning
                .iter()
                .map(|t| {
                    if is_star(t.field("val")) {
                        None
                    } else {
                        Some(scope.resolve_expr(t.field("val")))
                    }
                })
                .collect();
            Some(ResultSources {
                columns,
                all,
                assigned: Vec::new(),
            })
        }
        _ => None,
    }
    .map(|mut sources| {
        assignments(stmt, 0, &mut sources.assigned);
        sources
    })
}

/// What every INSERT, UPDATE and MERGE in `node` (the statement, or a WITH inside it) stores
/// in which column. Conservative: an INSERT's or MERGE's columns each get everything its
/// values or query reference unless they line up one to one.
fn assignments(node: &Tree, depth: usize, out: &mut Vec<Assigned>) {
    if depth > MAX_DEPTH {
        out.push(Assigned {
            column: None,
            from: vec![anything()],
        });
        return;
    }
    match node {
        Tree::Struct { name, fields } => {
            match *name {
                "UpdateStmt" => {
                    let scope = write_scope(node, &["from_clause"]);
                    set_targets(&scope, node.list("target_list"), out);
                }
                "InsertStmt" => insert_assignments(node, out),
                "MergeStmt" => {
                    let scope = write_scope(node, &["source_relation"]);
                    for when in node.list("merge_when_clauses") {
                        let targets = when.list("target_list");
                        if when.list("values").is_empty() {
                            set_targets(&scope, targets, out);
                        } else {
                            let from = scope.resolve_expr(when.field("values"));
                            named_columns(targets, &from, out);
                        }
                    }
                }
                _ => {}
            }
            for (_, value) in fields {
                assignments(value, depth + 1, out);
            }
        }
        Tree::List(items) => {
            for item in items {
                assignments(item, depth + 1, out);
            }
        }
        _ => {}
    }
}

/// The names a write's expressions see: its target table, its own WITH list, and the items
/// of `extra` (UPDATE's FROM list, MERGE's source).
fn write_scope(stmt: &Tree, extra: &[&str]) -> Scope {
    let mut scope = Scope {
        items: Vec::new(),
        ctes: with_ctes(stmt, &[], 1, true),
        depth: 0,
        top_level: true,
    };
    scope.add(stmt.field("relation"), 1);
    for field in extra {
        match stmt.field(field) {
            Tree::List(items) => {
                for item in items {
                    scope.add(item, 1);
                }
            }
            item => scope.add(item, 1),
        }
    }
    scope
}

/// `SET column = expression, ...`: each column gets what its own expression references.
fn set_targets(scope: &Scope, targets: &[Tree], out: &mut Vec<Assigned>) {
    for target in targets {
        out.push(Assigned {
            column: Some(target.str("name").to_owned()),
            from: scope.resolve_expr(target.field("val")),
        });
    }
}

/// Each column of an INSERT's or a MERGE action's column list (`None` without one) gets
/// `from`.
fn named_columns(targets: &[Tree], from: &[SourceRef], out: &mut Vec<Assigned>) {
    if targets.is_empty() {
        out.push(Assigned {
            column: None,
            from: from.to_vec(),
        });
    }
    for target in targets {
        out.push(Assigned {
            column: Some(target.str("name").to_owned()),
            from: from.to_vec(),
        });
    }
}

/// An INSERT: its query's select list lined up with the column list when both are plain,
/// else everything the query references for every column; `ON CONFLICT DO UPDATE SET`
/// like an UPDATE's, where `excluded` is the row the INSERT proposed.
fn insert_assignments(stmt: &Tree, out: &mut Vec<Assigned>) {
    let ctes = with_ctes(stmt, &[], 1, true);
    let query = stmt.field("select_stmt");
    let cols = stmt.list("cols");
    let inserted = match query.name() {
        Some("SelectStmt") => {
            let sources = select_sources(query, &ctes, 1, true);
            match &sources.columns {
                Some(columns) if !cols.is_empty() && columns.len() == cols.len() => {
                    for (col, from) in cols.iter().zip(columns) {
                        out.push(Assigned {
                            column: Some(col.str("name").to_owned()),
                            from: from.clone(),
                        });
                    }
                }
                _ => named_columns(cols, &sources.all, out),
            }
            sources.all
        }
        // DEFAULT VALUES stores nothing the statement computes.
        None => Vec::new(),
        Some(_) => {
            named_columns(cols, &[anything()], out);
            vec![anything()]
        }
    };
    let targets = stmt.field("on_conflict_clause").list("target_list");
    if !targets.is_empty() {
        let mut scope = write_scope(stmt, &[]);
        scope
            .items
            .push(("excluded".to_owned(), Item::Opaque(inserted)));
        set_targets(&scope, targets, out);
    }
}

const MAX_DEPTH: usize = 256;

/// "Anything": what a tree too deep to walk may reference.
fn anything() -> SourceRef {
    SourceRef {
        table: None,
        column: None,
    }
}

type Ctes = [(String, Vec<SourceRef>)];

/// `top_level`: no outer query's names are visible (the statement's own query, a branch of
/// its UNION, a CTE or a non-LATERAL FROM subquery of such a query).
fn select_sources(
    select: &Tree,
    outer_ctes: &Ctes,
    depth: usize,
    top_level: bool,
) -> ResultSources {
    if depth > MAX_DEPTH {
        return ResultSources {
            columns: None,
            all: vec![anything()],
            assigned: Vec::new(),
        };
    }
    let ctes = with_ctes(select, outer_ctes, depth, top_level);
    // SetOperation: 0 undefined, 1 none; anything else is UNION/INTERSECT/EXCEPT.
    if select.int("op") > 1 {
        let mut all = select_sources(select.field("larg"), &ctes, depth + 1, top_level).all;
        all.extend(select_sources(select.field("rarg"), &ctes, depth + 1, top_level).all);
        all.sort();
        all.dedup();
        return ResultSources {
            columns: None,
            all,
            assigned: Vec::new(),
        };
    }
    let mut scope = Scope {
        items: Vec::new(),
        ctes: ctes.clone(),
        depth,
        top_level,
    };
    for item in select.list("from_clause") {
        scope.add(item, depth + 1);
    }
    let targets = select.list("target_list");
    if !select.list("values_lists").is_empty() || targets.iter().any(|t| is_star(t.field("val"))) {
        let all = scope.resolve_fields(select, false);
        return ResultSources {
            columns: None,
            all,
            assigned: Vec::new(),
        };
    }
    // Each part walked once: a subquery is analyzed once per level, not once for its column
    // and again for the whole (which would double the work at every level of nesting).
    let columns: Vec<Vec<SourceRef>> = targets
        .iter()
        .map(|t| scope.resolve_expr(t.field("val")))
        .collect();
    let mut all = scope.resolve_fields(select, true);
    all.extend(columns.iter().flatten().cloned());
    all.sort();
    all.dedup();
    ResultSources {
        columns: Some(columns),
        all,
        assigned: Vec::new(),
    }
}

/// The CTEs visible in `select`: the outer ones and its own WITH list, each standing for
/// every column its query references.
fn with_ctes(
    select: &Tree,
    outer: &Ctes,
    depth: usize,
    top_level: bool,
) -> Vec<(String, Vec<SourceRef>)> {
    let mut ctes = outer.to_vec();
    for cte in select.field("with_clause").list("ctes") {
        let refs = query_refs(cte.field("ctequery"), &ctes, depth + 1, top_level);
        ctes.push((cte.str("ctename").to_owned(), refs));
    }
    ctes
}

/// Every source a query's result may come from.
fn query_refs(query: &Tree, ctes: &Ctes, depth: usize, top_level: bool) -> Vec<SourceRef> {
    match query.name() {
        Some("SelectStmt") => select_sources(query, ctes, depth + 1, top_level).all,
        // A data-modifying CTE: its RETURNING list and everything it reads.
        _ => {
            let mut scope = Scope {
                items: Vec::new(),
                ctes: ctes.to_vec(),
                depth,
                top_level,
            };
            scope.add(query.field("relation"), depth + 1);
            scope.resolve_expr(query)
        }
    }
}

/// A `*` or `alias.*` as a whole select-list entry: it expands to several result columns.
fn is_star(val: &Tree) -> bool {
    val.name() == Some("ColumnRef")
        && val
            .list("fields")
            .last()
            .is_some_and(|f| f.name() == Some("AStar"))
}

/// What the names in a FROM clause stand for.
struct Scope {
    /// (name a query may use: alias or table name, what it is)
    items: Vec<(String, Item)>,
    ctes: Vec<(String, Vec<SourceRef>)>,
    depth: usize,
    /// The statement's own query, not a subquery: no outer names are in scope.
    top_level: bool,
}

enum Item {
    /// A table or view, as written.
    Table(String),
    /// A subquery, function or CTE: its columns may come from any of these.
    Opaque(Vec<SourceRef>),
}

impl Scope {
    fn of_relation(relation: &Tree) -> Scope {
        let mut scope = Scope {
            items: Vec::new(),
            ctes: Vec::new(),
            depth: 0,
            top_level: true,
        };
        scope.add(relation, 0);
        scope
    }

    fn add(&mut self, item: &Tree, depth: usize) {
        if depth > MAX_DEPTH {
            self.items
                .push((String::new(), Item::Opaque(vec![anything()])));
            return;
        }
        let alias = item.field("alias").str("aliasname").to_owned();
        match item.name() {
            Some("RangeVar") => {
                let relname = item.str("relname");
                let schema = item.str("schemaname");
                let cte = (schema.is_empty())
                    .then(|| self.ctes.iter().find(|(name, _)| name == relname))
                    .flatten();
                let table = if schema.is_empty() {
                    relname.to_owned()
                } else {
                    format!("{schema}.{relname}")
                };
                // `customers c(i, x)` renames columns by position, which only the catalog
                // knows: any column of it may be any column of the table.
                let renamed = !item.field("alias").list("colnames").is_empty();
                let what = match cte {
                    Some((_, refs)) => Item::Opaque(refs.clone()),
                    None if renamed => Item::Opaque(vec![SourceRef {
                        table: Some(table),
                        column: None,
                    }]),
                    None => Item::Table(table),
                };
                let name = if alias.is_empty() {
                    relname.to_owned()
                } else {
                    alias
                };
                self.items.push((name, what));
            }
            Some("JoinExpr") => {
                let before = self.items.len();
                self.add(item.field("larg"), depth + 1);
                self.add(item.field("rarg"), depth + 1);
                if !alias.is_empty() {
                    let mut refs = Vec::new();
                    for (_, joined) in self.items.get(before..).unwrap_or_default() {
                        self.whole(joined, &mut refs);
                    }
                    self.items.push((alias, Item::Opaque(refs)));
                }
            }
            Some("RangeTableSample") => {
                let before = self.items.len();
                self.add(item.field("relation"), depth + 1);
                if !alias.is_empty() {
                    if let Some(entry) = self.items.get_mut(before) {
                        entry.0 = alias;
                    }
                }
            }
            Some("RangeSubselect") => {
                // LATERAL: the subquery also sees the FROM items before it.
                let top_level = self.top_level && !item.bool("lateral");
                let refs = query_refs(item.field("subquery"), &self.ctes, depth + 1, top_level);
                self.items.push((alias, Item::Opaque(refs)));
            }
            _ => {
                // A function, XMLTABLE, JSON_TABLE: its arguments, which may name earlier
                // FROM items (LATERAL).
                let refs = self.resolve_expr(item);
                self.items.push((alias, Item::Opaque(refs)));
            }
        }
    }

    /// The sources of everything in a query's own clauses (not its FROM and WITH lists, which
    /// are the scope already; not its select list when `skip_targets`).
    fn resolve_fields(&self, query: &Tree, skip_targets: bool) -> Vec<SourceRef> {
        let mut refs = Vec::new();
        if let Tree::Struct { fields, .. } = query {
            for (field, value) in fields {
                let skip = matches!(*field, "from_clause" | "with_clause")
                    || (skip_targets && *field == "target_list");
                if !skip {
                    self.walk(value, &mut refs, self.depth + 1);
                }
            }
        }
        refs.sort();
        refs.dedup();
        refs
    }

    /// The sources of one expression, resolved against this scope.
    fn resolve_expr(&self, expr: &Tree) -> Vec<SourceRef> {
        let mut refs = Vec::new();
        self.walk(expr, &mut refs, self.depth);
        refs.sort();
        refs.dedup();
        refs
    }

    fn walk(&self, node: &Tree, out: &mut Vec<SourceRef>, depth: usize) {
        if depth > MAX_DEPTH {
            out.push(anything());
            return;
        }
        match node {
            Tree::Struct { name, fields } => {
                match *name {
                    "ColumnRef" => return self.column_ref(node, out),
                    // count() reveals how many, never a value: nothing it counts is a source.
                    "FuncCall"
                        if node
                            .list("funcname")
                            .last()
                            .and_then(Tree::sval)
                            .is_some_and(|f| f.eq_ignore_ascii_case("count")) =>
                    {
                        return
                    }
                    // A subquery in an expression: what it returns, in its own scope (which
                    // sees this one's names too, for correlated references).
                    "SelectStmt" => {
                        out.extend(select_sources(node, &self.ctes, depth + 1, false).all);
                        return;
                    }
                    // The FROM list is resolved into the scope already.
                    _ => {}
                }
                for (field, value) in fields {
                    if *field == "from_clause" || *field == "with_clause" {
                        continue;
                    }
                    self.walk(value, out, depth + 1);
                }
            }
            Tree::List(items) => {
                for item in items {
                    self.walk(item, out, depth + 1);
                }
            }
            _ => {}
        }
    }

    fn column_ref(&self, node: &Tree, out: &mut Vec<SourceRef>) {
        let parts: Vec<Option<&str>> = node.list("fields").iter().map(|f| f.sval()).collect();
        match parts.as_slice() {
            // `*` inside an expression: every item's whole row.
            [None] => {
                for (_, item) in &self.items {
                    self.whole(item, out);
                }
            }
            [Some(name)] => {
                // The whole row of an item so named, or a column of one of the items: both.
                for (item_name, item) in &self.items {
                    if item_name == name {
                        self.whole(item, out);
                    }
                }
                for (_, item) in &self.items {
                    if let Item::Opaque(refs) = item {
                        out.extend(refs.iter().cloned());
                    }
                }
                let tables: Vec<&String> = self
                    .items
                    .iter()
                    .filter_map(|(_, i)| match i {
                        Item::Table(t) => Some(t),
                        Item::Opaque(_) => None,
                    })
                    .collect();
                // Only a top-level query's bare name is surely one of its own tables'; in a
                // subquery it may be an outer query's column, so "some table".
                let table = match tables.as_slice() {
                    [only] if self.top_level => Some((*only).clone()),
                    _ => None,
                };
                out.push(SourceRef {
                    table,
                    column: Some((*name).to_owned()),
                });
            }
            [Some(qualifier), rest] => match self.items.iter().find(|(n, _)| n == qualifier) {
                Some((_, Item::Table(t))) => out.push(SourceRef {
                    table: Some(t.clone()),
                    column: rest.map(str::to_owned),
                }),
                Some((_, Item::Opaque(refs))) => out.extend(refs.iter().cloned()),
                // An outer query's item (a correlated reference): some table.
                None => out.push(SourceRef {
                    table: None,
                    column: rest.map(str::to_owned),
                }),
            },
            [Some(schema), Some(table), rest] => out.push(SourceRef {
                table: Some(format!("{schema}.{table}")),
                column: rest.map(str::to_owned),
            }),
            _ => out.push(anything()),
        }
    }

    fn whole(&self, item: &Item, out: &mut Vec<SourceRef>) {
        match item {
            Item::Table(t) => out.push(SourceRef {
                table: Some(t.clone()),
                column: None,
            }),
            Item::Opaque(refs) => out.extend(refs.iter().cloned()),
        }
    }
}
