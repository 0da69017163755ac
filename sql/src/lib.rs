//! What a SQL string does, in the terms Portcullis policies use: one [`Statement`] per statement,
//! each with a [`StatementClass`], a command name, and the tables and functions it touches.
//!
//! The parser is PostgreSQL's own (libpg_query through the `pg_query` crate), so the classifier
//! sees exactly the statements the server will run: no regex can be fooled by comments, dollar
//! quoting, `U&"..."` identifiers or statements hidden in CTEs. Pure: no I/O, no async.
//!
//! ```
//! use portcullis_sql::{Classifier, StatementClass};
//!
//! let classifier = Classifier::new(4096);
//! let statements = classifier
//!     .classify("WITH gone AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM gone")
//!     .unwrap();
//! assert_eq!(statements[0].class, StatementClass::Write);
//! assert_eq!(*statements[0].tables, ["orders"]);
//! ```
//!
//! # Classes
//!
//! A statement takes the class of the most dangerous statement anywhere in its tree
//! (`read` < `utility` < `transaction` < `write` < `call` < `do` < `ddl` < `dcl` < `admin`):
//!
//! - `read`: SELECT, VALUES, TABLE, SHOW, FETCH, plain EXPLAIN (it plans without running),
//!   COPY ... TO STDOUT; DECLARE CURSOR and PREPARE take the class of their query.
//! - `write`: INSERT, UPDATE, DELETE, MERGE (also inside a CTE or under COPY (...) TO), SELECT
//!   ... FOR UPDATE/SHARE (row locks), LOCK TABLE, COPY ... FROM STDIN, and EXECUTE: it runs a
//!   statement PREPAREd earlier, which the classifier does not see, so it counts as a write.
//! - `ddl`: CREATE, ALTER, DROP of objects (databases included), TRUNCATE, COMMENT, SECURITY
//!   LABEL, REFRESH MATERIALIZED VIEW, CREATE TABLE AS, SELECT INTO.
//! - `dcl`: GRANT, REVOKE, roles, ALTER DEFAULT PRIVILEGES, REASSIGN OWNED, DROP OWNED, ALTER
//!   ... OWNER TO, SET/RESET ROLE, SET/RESET SESSION AUTHORIZATION.
//! - `transaction`: BEGIN, START TRANSACTION, COMMIT, ROLLBACK, SAVEPOINT, RELEASE, PREPARE
//!   TRANSACTION, COMMIT/ROLLBACK PREPARED, SET TRANSACTION, SET CONSTRAINTS.
//! - `utility`: other SET and RESET, DISCARD, LISTEN, UNLISTEN, NOTIFY, DEALLOCATE, MOVE, CLOSE.
//! - `admin`: VACUUM, ANALYZE, CLUSTER, REINDEX, CHECKPOINT, ALTER SYSTEM, LOAD, tablespaces,
//!   publications, subscriptions, COPY to or from a server file or PROGRAM.
//! - `call`: CALL; `do`: DO. A procedure's body is opaque to the classifier. A `DO` block in
//!   PL/pgSQL is read with PostgreSQL's own PL/pgSQL compiler: the statements it runs come back
//!   in [`Statement::inner`], each classified like a top-level statement (`EXECUTE` of a
//!   constant string included), and the `DO` keeps class `do`. What cannot be read before it
//!   runs (`EXECUTE` of an expression, another language, a body the compiler rejects) sets
//!   [`Statement::dynamic_sql`]. The body of a function or procedure a statement calls is
//!   not in the statement: [`read_routine`] reads it from the definition the caller takes
//!   from the catalog (`LANGUAGE plpgsql` and `sql`), the same way.
//! - `EXPLAIN ANALYZE` runs its statement and takes its class.
//!
//! `command` names the statement like PostgreSQL's command tags (`DROP DATABASE`, `TRUNCATE`,
//! `CREATE TABLE`, `SET ROLE`) so policies can single one out.
//!
//! # What policies must know
//!
//! - Functions stay in `functions` and do not change the class: `SELECT pg_terminate_backend(..)`
//!   and `SELECT set_config('role', ..)` are reads. Policies that care forbid the functions,
//!   under both spellings (`set_config` and `pg_catalog.set_config`).
//! - Names are as written, folded like PostgreSQL folds them: `Orders` is `orders`, `"Orders"`
//!   stays `Orders`, `hr.payroll` stays qualified. The classifier cannot know the session's
//!   `search_path`, so an unqualified `payroll` may be `hr.payroll`: match both.
//! - What does not parse is an error, and so is a tree more than 100 protobuf messages deep
//!   (prost's decoder limit, which pg_query keeps: at most 15 nested scalar subqueries, 22 nested
//!   FROM subqueries or CASEs, 46 chained binary operators such as `a || b || ...`; flat lists
//!   such as `AND` chains and `IN (...)` are not limited): the caller denies both (fail closed).
//!   Replication-protocol commands are not SQL and do not parse.

mod cache;
mod classify;
mod copy;
mod encoding;
mod plpgsql;
mod routine;
mod shape;
mod sources;
mod tree;

pub use copy::{CopyFormat, CopyOut, CopySource};
pub use encoding::{is_ascii_safe_encoding, ASCII_SAFE_ENCODINGS};
pub use sources::{Assigned, NamedQuery, ResultSources, SourceRef};

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use pg_query::{FingerprintOptions, ParserOptions};

/// The longest SQL string [`Classifier::new`] classifies (1 MiB); longer ones are refused.
pub const DEFAULT_MAX_SQL_LEN: usize = 1024 * 1024;
/// How many bytes of SQL and results a [`Classifier::new`] cache holds at most (32 MiB).
pub const DEFAULT_MAX_CACHED_BYTES: usize = 32 * 1024 * 1024;

/// One statement of a SQL string, as policies see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// This statement's own source text, trimmed (without the `;` that ends it).
    pub text: Arc<str>,
    pub class: StatementClass,
    /// Upper case, like PostgreSQL's command tags: `SELECT`, `INSERT`, `DROP DATABASE`,
    /// `TRUNCATE`, `CREATE TABLE`, `CALL`, `DO`, `EXPLAIN`, `COPY`, `BEGIN`, `SET`.
    pub command: Arc<str>,
    /// Every relation named anywhere in the statement (CTEs, subqueries, the statement under
    /// EXPLAIN, COPY's table, the objects of DROP/COMMENT): `schema.table` when written so,
    /// folded like PostgreSQL folds unquoted names, sorted, without duplicates. CTE names are
    /// left out where they refer to the CTE.
    pub tables: Arc<[String]>,
    /// Every function called, including CALL's procedure: `schema.name` when written so,
    /// sorted, without duplicates.
    pub functions: Arc<[String]>,
    /// pg_query's fingerprint of this statement (constants ignored; schema names, full table
    /// names and aliases kept): the same query with other values has the same fingerprint.
    /// For grouping in audit logs, never for decisions.
    pub fingerprint: u64,
    /// For `COPY ... TO STDOUT`: what it reads and how its rows are spelled.
    pub copy_out: Option<CopyOut>,
    /// For a statement that returns rows (a query, also under DECLARE CURSOR and PREPARE, a
    /// RETURNING list): the columns and rows each result column may be computed from.
    pub result_sources: Option<Arc<ResultSources>>,
    /// DECLARE CURSOR, PREPARE, FETCH, EXECUTE: the name whose query is kept or run.
    pub named_query: Option<NamedQuery>,
    /// For `DO`: every statement its body runs, each classified like a top-level statement
    /// (the SQL statements, queries of loops, cursors and `PERFORM`, `EXECUTE` of a constant
    /// string, expressions that read a table or call a function; those of a `DO` inside it
    /// follow that `DO`), each as often as it is written. Empty for every other statement. The `DO`
    /// itself keeps class `do` and command `DO`; its `tables` and `functions` include these
    /// statements' own.
    pub inner: Arc<[Statement]>,
    /// For `DO`: whether its body runs SQL the classifier cannot read before it runs
    /// (`EXECUTE` of anything but one string constant), or is opaque (another language, a body
    /// PostgreSQL's PL/pgSQL compiler rejects). Policies decide it as `context.dynamic_sql`.
    pub dynamic_sql: bool,
}

impl Statement {
    fn approximate_size(&self) -> usize {
        const OVERHEAD: usize = std::mem::size_of::<Statement>() + 24;
        self.text.len()
            + self.command.len()
            + self.copy_out.as_ref().map_or(0, |_| 128)
            + self.result_sources.as_ref().map_or(0, |s| {
                let refs = s.all.len() + s.columns.iter().flatten().map(Vec::len).sum::<usize>();
                refs * 64
            })
            + self
                .tables
                .iter()
                .chain(self.functions.iter())
                .map(|name| name.len() + 24)
                .sum::<usize>()
            + self
                .inner
                .iter()
                .map(Statement::approximate_size)
                .sum::<usize>()
            + OVERHEAD
    }
}

/// The statement classes, as policies spell them in `context.statement_class`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatementClass {
    Read,
    Write,
    Ddl,
    Dcl,
    Transaction,
    Utility,
    Admin,
    Call,
    Do,
}

impl StatementClass {
    pub const ALL: [StatementClass; 9] = [
        StatementClass::Read,
        StatementClass::Write,
        StatementClass::Ddl,
        StatementClass::Dcl,
        StatementClass::Transaction,
        StatementClass::Utility,
        StatementClass::Admin,
        StatementClass::Call,
        StatementClass::Do,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StatementClass::Read => "read",
            StatementClass::Write => "write",
            StatementClass::Ddl => "ddl",
            StatementClass::Dcl => "dcl",
            StatementClass::Transaction => "transaction",
            StatementClass::Utility => "utility",
            StatementClass::Admin => "admin",
            StatementClass::Call => "call",
            StatementClass::Do => "do",
        }
    }

    /// The order in which a statement's parts decide its class: the highest wins.
    fn danger(self) -> u8 {
        match self {
            StatementClass::Read => 0,
            StatementClass::Utility => 1,
            StatementClass::Transaction => 2,
            StatementClass::Write => 3,
            StatementClass::Call => 4,
            StatementClass::Do => 5,
            StatementClass::Ddl => 6,
            StatementClass::Dcl => 7,
            StatementClass::Admin => 8,
        }
    }
}

impl fmt::Display for StatementClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a SQL string has no classification. The caller denies it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    /// PostgreSQL's parser rejects it. pg_query does not report where, so `position` (a byte
    /// offset) is only known for errors "at end of input".
    #[error("SQL syntax error: {message}")]
    Syntax {
        message: String,
        position: Option<usize>,
    },
    #[error("SQL of {len} bytes is longer than the {max}-byte limit")]
    TooLong { len: usize, max: usize },
    /// The text contains a NUL byte, which no PostgreSQL query can.
    #[error("SQL contains a NUL byte at byte {position}")]
    NulByte { position: usize },
    /// Nesting beyond what the parser or its decoder accepts (see the crate documentation).
    #[error("SQL nests too deeply to classify: {message}")]
    TooDeep { message: String },
    /// A statement type these rules do not know; only a newer pg_query could produce one.
    #[error("statement type `{node}` is not classified")]
    Unsupported { node: String },
    /// A statement that parses but may never run through the agent, whatever the policy:
    /// it would make the server read later statements differently from the agent.
    #[error("{message}")]
    Refused { message: String },
    /// pg_query failed in a way that is not the SQL's fault.
    #[error("SQL parser failure: {message}")]
    Parser { message: String },
}

/// Classifies SQL strings and remembers the answers, shared by every connection.
///
/// Two bounded caches: exact SQL text to its statements (a hit costs a hash lookup), and
/// shape (the text with each constant token replaced by its kind: see `shape.rs`) to the
/// statements' facts, so the same query with other constants skips the parse (a hit costs a
/// scan: one pass over plain SQL, or PostgreSQL's scanner, about 1 µs for a pgbench
/// statement, for anything else; a parse costs 6 µs, release build). The second key is the whole shape text, compared for equality: never a hash
/// or fingerprint alone, which a client could make collide (and pg_query's fingerprint ignores
/// schema names, aliases and anything nested deeper than 100 nodes).
pub struct Classifier {
    exact: cache::Cache<[Statement]>,
    /// Statements with empty `text`; the text comes from the SQL being classified.
    shapes: cache::Cache<[Statement]>,
    max_sql_len: usize,
}

impl Classifier {
    /// A classifier that caches up to `capacity` SQL strings (at least 2) and as many
    /// shapes, each cache holding at most [`DEFAULT_MAX_CACHED_BYTES`], and refuses
    /// SQL longer than [`DEFAULT_MAX_SQL_LEN`].
    pub fn new(capacity: usize) -> Self {
        Self::with_limits(capacity, DEFAULT_MAX_CACHED_BYTES, DEFAULT_MAX_SQL_LEN)
    }

    /// Like [`Classifier::new`], with the byte budget of each cache and the longest SQL
    /// accepted. An entry larger than a cache shard's share of `max_cached_bytes` (1/32 of it
    /// from a capacity of 256 on, half of it below) is classified but not cached.
    pub fn with_limits(capacity: usize, max_cached_bytes: usize, max_sql_len: usize) -> Self {
        Classifier {
            exact: cache::Cache::new(capacity.max(2), max_cached_bytes),
            shapes: cache::Cache::new(capacity.max(2), max_cached_bytes),
            max_sql_len,
        }
    }

    /// The statements of `sql`, in order; empty if it holds none (only whitespace, comments or
    /// `;`). A repeated text comes from the cache: the same `Arc`, no parsing.
    pub fn classify(&self, sql: &str) -> Result<Arc<[Statement]>, ClassifyError> {
        if let Some(statements) = self.exact.get(sql) {
            return Ok(statements);
        }
        check_input(sql, self.max_sql_len)?;
        // A string the scanner rejects does not parse either: the full path says why.
        let shape = guard(|| Ok(shape::shape(sql))).ok().flatten();
        if let Some(statements) = shape.as_ref().and_then(|shape| {
            let known = self.shapes.get(&shape.key)?;
            with_texts(&shape.texts, &known)
        }) {
            // Not put in the exact cache: its other constants would only push out texts
            // that do repeat.
            return Ok(statements.into());
        }

        let (statements, shape_cacheable) = parse_and_classify(sql)?;
        let statements: Arc<[Statement]> = statements.into();
        self.exact
            .insert(sql, statements.clone(), size_of_all(&statements));
        if let Some(shape) = shape.filter(|_| shape_cacheable) {
            // The texts of a later hit come from the scanner's split: only remember shapes
            // whose split is the parser's, statement for statement.
            let same_split = shape.texts.len() == statements.len()
                && shape
                    .texts
                    .iter()
                    .zip(statements.iter())
                    .all(|(text, statement)| **text == *statement.text);
            if same_split {
                let remembered: Arc<[Statement]> = statements
                    .iter()
                    .map(|statement| Statement {
                        text: Arc::from(""),
                        ..statement.clone()
                    })
                    .collect();
                let bytes = size_of_all(&remembered);
                self.shapes.insert(&shape.key, remembered, bytes);
            }
        }
        Ok(statements)
    }

    /// How many SQL strings the exact-text cache holds now.
    pub fn cached(&self) -> usize {
        self.exact.len()
    }

    /// How many shapes the second cache holds now.
    pub fn cached_shapes(&self) -> usize {
        self.shapes.len()
    }
}

impl fmt::Debug for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Classifier")
            .field("cached", &self.cached())
            .field("cached_shapes", &self.cached_shapes())
            .field("max_sql_len", &self.max_sql_len)
            .finish()
    }
}

/// Classifies without a cache (for one-off uses such as `portcullis policy explain`), refusing
/// SQL longer than [`DEFAULT_MAX_SQL_LEN`].
pub fn classify(sql: &str) -> Result<Vec<Statement>, ClassifyError> {
    check_input(sql, DEFAULT_MAX_SQL_LEN)?;
    Ok(parse_and_classify(sql)?.0)
}

fn check_input(sql: &str, max_sql_len: usize) -> Result<(), ClassifyError> {
    if sql.len() > max_sql_len {
        return Err(ClassifyError::TooLong {
            len: sql.len(),
            max: max_sql_len,
        });
    }
    if let Some(position) = sql.find('\0') {
        return Err(ClassifyError::NulByte { position });
    }
    Ok(())
}

/// The statements, and whether all of them may be remembered by their shape.
fn parse_and_classify(sql: &str) -> Result<(Vec<Statement>, bool), ClassifyError> {
    parse_and_classify_nested(sql, 0)
}

/// How deep `DO` blocks may nest (a `DO` run by a `DO`'s `EXECUTE` or body); deeper is refused
/// rather than read with an unbounded recursion.
const MAX_DO_NESTING: usize = 8;

/// [`parse_and_classify`] of SQL that a `DO` block `depth` levels up runs.
fn parse_and_classify_nested(
    sql: &str,
    depth: usize,
) -> Result<(Vec<Statement>, bool), ClassifyError> {
    let parsed =
        guard(|| pg_query::parse(sql, ParserOptions::DEFAULT)).map_err(|error| match error {
            // The one place pg_query's message pins down.
            ClassifyError::Syntax { message, .. } if message.ends_with("at end of input") => {
                ClassifyError::Syntax {
                    message,
                    position: Some(sql.len()),
                }
            }
            other => other,
        })?;
    let mut statements = Vec::with_capacity(parsed.protobuf.stmts.len());
    let mut shape_cacheable = true;
    for raw in &parsed.protobuf.stmts {
        let text = statement_text(sql, raw.stmt_location, raw.stmt_len)?;
        let tree = tree::Tree::build(&raw.stmt).map_err(|e| ClassifyError::TooDeep {
            message: e.to_string(),
        })?;
        let mut facts = classify::facts(&tree)?;
        let copy_out = copy::copy_out(&tree);
        let result_sources = sources::result_sources(&tree).map(Arc::new);
        let named_query = sources::named_query(&tree);
        // Only queries and DML are remembered by shape: in them every constant token is a
        // constant (`A_Const`), whose value nothing here reads and pg_query's fingerprint
        // ignores. Utility statements keep values in plain fields (`COMMENT ... IS 'x'`,
        // COPY's `HEADER true`, options), and repeat by exact text anyway (BEGIN, COMMIT).
        shape_cacheable &= facts.shape_cacheable
            && matches!(
                tree.name(),
                Some("SelectStmt" | "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt")
            );
        let (inner, dynamic_sql) = if tree.name() == Some("DoStmt") {
            do_body(text, &tree, depth, &mut facts)?
        } else {
            (Vec::new(), false)
        };
        let fingerprint = guard(|| {
            pg_query::fingerprint(
                text,
                ParserOptions::DEFAULT,
                FingerprintOptions::RANGEVAR_PG17_COMPAT | FingerprintOptions::FULL_RELNAME,
            )
        })?
        .value;
        statements.push(Statement {
            text: text.into(),
            class: facts.class,
            command: facts.command.into(),
            tables: facts.tables.into(),
            functions: facts.functions.into(),
            fingerprint,
            copy_out,
            result_sources,
            named_query,
            inner: inner.into(),
            dynamic_sql,
        });
    }
    Ok((statements, shape_cacheable))
}

/// The statements a `DO` block runs (flattened: a nested `DO`'s follow it) and whether some
/// SQL in it cannot be read; the block's tables and functions take in theirs.
fn do_body(
    text: &str,
    tree: &tree::Tree,
    depth: usize,
    facts: &mut classify::Facts,
) -> Result<(Vec<Statement>, bool), ClassifyError> {
    if depth >= MAX_DO_NESTING {
        return Err(ClassifyError::TooDeep {
            message: format!("DO blocks nest more than {MAX_DO_NESTING} deep"),
        });
    }
    let (inner, dynamic) = read_pieces(&plpgsql::read_do(text, tree), depth)?;
    let mut tables: std::collections::BTreeSet<String> = facts.tables.drain(..).collect();
    let mut functions: std::collections::BTreeSet<String> = facts.functions.drain(..).collect();
    for statement in &inner {
        tables.extend(statement.tables.iter().cloned());
        functions.extend(statement.functions.iter().cloned());
    }
    facts.tables = tables.into_iter().collect();
    facts.functions = functions.into_iter().collect();
    Ok((inner, dynamic))
}

/// The statements the pieces of a body run (flattened: a nested `DO`'s follow it), and
/// whether some SQL in it cannot be read.
fn read_pieces(
    body: &plpgsql::Body,
    depth: usize,
) -> Result<(Vec<Statement>, bool), ClassifyError> {
    let mut dynamic = body.dynamic;
    let mut inner = Vec::new();
    for piece in &body.pieces {
        let read = if piece.mode == ParserOptions::DEFAULT {
            parse_and_classify_nested(&piece.text, depth + 1).map(|(statements, _)| statements)
        } else {
            classify_expression(&piece.text, piece.mode)
        };
        let statements = match read {
            Ok(statements) => statements,
            // What may never run through the agent may not run inside a DO either; what
            // nests too deeply is refused as at the top level.
            Err(e @ (ClassifyError::Refused { .. } | ClassifyError::TooDeep { .. })) => {
                return Err(e)
            }
            // The server fails on SQL its parser rejects when (and if) it gets there; until
            // then the block is not fully known.
            Err(_) => {
                dynamic = true;
                continue;
            }
        };
        for mut statement in statements {
            let nested = std::mem::replace(&mut statement.inner, Arc::from([]));
            dynamic |= statement.dynamic_sql;
            statement.dynamic_sql = false;
            inner.push(statement);
            inner.extend(nested.iter().cloned());
        }
    }
    Ok((inner, dynamic))
}

/// What a stored function or procedure runs when it is called, as [`read_routine`] reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutineBody {
    /// Every statement its body runs, each classified like a top-level statement and
    /// flattened as a `DO` block's [`Statement::inner`] are (a `DO` inside follows it). The
    /// functions these statements call are in their own `functions`: following them is the
    /// caller's business, it has the catalog.
    pub statements: Vec<Statement>,
    /// Whether the body runs SQL that cannot be read before it runs (`EXECUTE` of anything
    /// but one string constant), or cannot be read at all: another language (C, `plpython3u`,
    /// `internal`), a definition that does not compile or parse.
    pub dynamic_sql: bool,
}

impl RoutineBody {
    fn opaque() -> Self {
        RoutineBody {
            statements: Vec::new(),
            dynamic_sql: true,
        }
    }
}

/// Reads the body of a function or procedure in `language` (`pg_language.lanname`) from its
/// whole definition as `pg_get_functiondef` prints it: `LANGUAGE plpgsql` with PostgreSQL's
/// own PL/pgSQL compiler, as a `DO` block's; `LANGUAGE sql` as SQL statements (the body
/// string, or the statements of a SQL-standard `BEGIN ATOMIC ... END` body, or the
/// expression of `RETURN ...`). Any other language is opaque.
///
/// An error only for what may never run ([`ClassifyError::Refused`]) and what nests too
/// deeply ([`ClassifyError::TooDeep`]); whatever else cannot be read sets
/// [`RoutineBody::dynamic_sql`].
pub fn read_routine(language: &str, definition: &str) -> Result<RoutineBody, ClassifyError> {
    if check_input(definition, DEFAULT_MAX_SQL_LEN).is_err() {
        return Ok(RoutineBody::opaque());
    }
    let body = match language {
        "plpgsql" => plpgsql::read_function(definition),
        "sql" => routine::sql_body(definition),
        _ => return Ok(RoutineBody::opaque()),
    };
    let (statements, dynamic_sql) = read_pieces(&body, 0)?;
    Ok(RoutineBody {
        statements,
        dynamic_sql,
    })
}

/// A PL/pgSQL expression or assignment, parsed in its own grammar (`mode`): the query the
/// server runs for it, as a `SELECT`. Left out when it reads no table and calls no function
/// (`x > 1`, `'text'`): it runs nothing a policy could name.
fn classify_expression(text: &str, mode: ParserOptions) -> Result<Vec<Statement>, ClassifyError> {
    let parsed = guard(|| pg_query::parse(text, mode))?;
    let mut statements = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let tree = tree::Tree::build(&raw.stmt).map_err(|e| ClassifyError::TooDeep {
            message: e.to_string(),
        })?;
        // `x := expr` parses as an assignment whose value is the query.
        let query = match tree.name() {
            Some("PlAssignStmt") => tree.field("val"),
            _ => &tree,
        };
        let facts = classify::facts(query)?;
        if facts.class == StatementClass::Read
            && facts.tables.is_empty()
            && facts.functions.is_empty()
        {
            continue;
        }
        let fingerprint = guard(|| {
            pg_query::fingerprint(
                text,
                mode,
                FingerprintOptions::RANGEVAR_PG17_COMPAT | FingerprintOptions::FULL_RELNAME,
            )
        })?
        .value;
        statements.push(Statement {
            text: text.trim().into(),
            class: facts.class,
            command: facts.command.into(),
            tables: facts.tables.into(),
            functions: facts.functions.into(),
            fingerprint,
            copy_out: None,
            result_sources: None,
            named_query: None,
            inner: Arc::from([]),
            dynamic_sql: false,
        });
    }
    Ok(statements)
}

/// A remembered shape's statements with the texts of the string being classified.
fn with_texts(texts: &[&str], shape: &[Statement]) -> Option<Vec<Statement>> {
    (texts.len() == shape.len()).then(|| {
        texts
            .iter()
            .zip(shape)
            .map(|(text, statement)| Statement {
                text: (*text).into(),
                ..statement.clone()
            })
            .collect()
    })
}

fn size_of_all(statements: &[Statement]) -> usize {
    statements.iter().map(Statement::approximate_size).sum()
}

/// `stmt_location` and `stmt_len` are byte offsets into the string; a length of 0 means "to the
/// end" (the last statement without a `;`).
fn statement_text(sql: &str, location: i32, len: i32) -> Result<&str, ClassifyError> {
    let range = usize::try_from(location)
        .ok()
        .zip(usize::try_from(len).ok())
        .and_then(|(start, len)| {
            let end = if len == 0 {
                sql.len()
            } else {
                start.checked_add(len)?
            };
            sql.get(start..end)
        });
    range.map(str::trim).ok_or_else(|| ClassifyError::Parser {
        message: format!("statement location {location}+{len} is outside the SQL"),
    })
}

/// Runs a pg_query call, turning its errors, and a panic in its Rust wrapper (which indexes
/// into the trees it builds), into a [`ClassifyError`].
fn guard<T>(call: impl FnOnce() -> pg_query::Result<T>) -> Result<T, ClassifyError> {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(parser_error(error)),
        Err(_) => Err(ClassifyError::Parser {
            message: "pg_query panicked".to_owned(),
        }),
    }
}

fn parser_error(error: pg_query::Error) -> ClassifyError {
    match error {
        pg_query::Error::Parse(message)
            if message.contains("stack depth limit exceeded")
                || message.starts_with("memory exhausted") =>
        {
            ClassifyError::TooDeep { message }
        }
        pg_query::Error::Parse(message) => ClassifyError::Syntax {
            message,
            position: None,
        },
        pg_query::Error::Decode(_) => ClassifyError::TooDeep {
            message: "the parse tree is more than 100 protobuf messages deep".to_owned(),
        },
        pg_query::Error::Conversion(error) => ClassifyError::NulByte {
            position: error.nul_position(),
        },
        other => ClassifyError::Parser {
            message: other.to_string(),
        },
    }
}

/// For the `classify` fuzz target: whether the one-pass shape reader, where it answers at all,
/// gives the scanner's answer for `sql`. Not part of the API.
#[doc(hidden)]
pub fn shape_reader_agrees_with_scanner(sql: &str) -> bool {
    shape::plain_shape_agrees(sql)
}
