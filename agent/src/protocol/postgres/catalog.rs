//! Names of table columns for masking rules: a RowDescription carries each result column's
//! table OID and attribute number, not its table's or its column's name (its label may be an
//! alias); the catalog has them.
//! Likewise the names of functions a fast-path call runs by OID, for policies that name them,
//! and what the functions a statement calls by name run (their definitions, read by
//! `portcullis_sql::read_routine`), so the statements inside are decided before the call.
//! Lookups go over a separate connection as the session's own role (so it learns nothing the
//! session could not read), kept for the next lookup as that role (`side`), and are cached per
//! target, database and table (or function) for a minute, so a renamed column is picked up
//! soon after.

mod side;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::PostgresTargetConfig;
use crate::identity::Secret;
use side::{SideConnection, SideConnections, SideKey};

const TTL: Duration = Duration::from_secs(60);
/// Enough for every table a busy session touches; beyond it the cache starts over.
const MAX_TABLES: usize = 65_536;

/// A table column as masking rules name it.
#[derive(Clone)]
pub struct ColumnName {
    /// `schema.table.column`, for `table_column` rules.
    pub qualified: String,
    /// The column's own name, for `column` and `column_regex` rules.
    pub column: String,
}

impl ColumnName {
    pub fn origin(&self) -> portcullis_policy::ColumnOrigin<'_> {
        portcullis_policy::ColumnOrigin {
            qualified: &self.qualified,
            column: &self.column,
        }
    }
}

/// One table's columns by attribute number.
pub struct TableColumns {
    columns: HashMap<i16, ColumnName>,
    /// For a view (or materialized view): what its columns are computed from, read from its
    /// definition; `Some(None)` when the definition could not be read or parsed.
    view: Option<Option<Arc<portcullis_sql::ResultSources>>>,
    fetched: Instant,
}

type Key = (u32, String, u32);

/// A function's names as policies may spell them (`name`, `schema.name`), and when read.
struct FunctionNames {
    names: Arc<[String]>,
    fetched: Instant,
}

/// One function or procedure a call by name may run (not one of PostgreSQL's own: those in
/// `pg_catalog` are not kept).
pub struct Routine {
    /// `schema.name`, for messages.
    pub name: String,
    /// What its body runs; `Err`: it runs something the agent never lets through (the
    /// classifier's refusal).
    pub body: Result<portcullis_sql::RoutineBody, String>,
}

/// Every function and procedure of one name, and when read.
struct RoutinesNamed {
    routines: Arc<[Routine]>,
    /// About what it holds: its definitions' length (what is read from them is of that order).
    bytes: usize,
    fetched: Instant,
}

/// The bodies read, bounded in bytes as well as names: a body may be as long as the classifier
/// accepts (1 MiB), and a user who can create functions chooses how many are called.
#[derive(Default)]
struct RoutineCache {
    named: HashMap<RoutineKey, RoutinesNamed>,
    bytes: usize,
}

/// Past this the cache of bodies starts over (names are bounded by [`MAX_TABLES`]).
const MAX_ROUTINE_BYTES: usize = 64 * 1024 * 1024;

type RoutineKey = (u32, String, String);

#[derive(Default)]
pub struct Catalog {
    tables: Mutex<HashMap<Key, Arc<TableColumns>>>,
    functions: Mutex<HashMap<Key, FunctionNames>>,
    routines: Mutex<RoutineCache>,
    /// Moved on by [`Catalog::forget_routines`]: a lookup that began before keeps nothing.
    routines_generation: AtomicU64,
    /// The logged-in connections lookups run on.
    side: SideConnections,
}

/// What one lookup reads: the columns of tables, the names of functions, or what the
/// functions and procedures of some names run.
#[derive(Clone, Copy)]
pub enum Lookup<'a> {
    Tables(&'a [u32]),
    Functions(&'a [u32]),
    Routines(&'a [String]),
}

impl<'a> Lookup<'a> {
    fn oids(self) -> &'a [u32] {
        match self {
            Lookup::Tables(oids) | Lookup::Functions(oids) => oids,
            Lookup::Routines(_) => &[],
        }
    }
}

impl Catalog {
    /// The table column a result column is read from, if the table is cached and fresh.
    pub fn column(
        &self,
        target_id: u32,
        db: &str,
        table_oid: u32,
        attnum: i16,
    ) -> Option<ColumnName> {
        let tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let t = tables.get(&(target_id, db.to_string(), table_oid))?;
        if t.fetched.elapsed() > TTL {
            return None;
        }
        t.columns.get(&attnum).cloned()
    }

    /// For a cached, fresh view: what its columns are computed from (`Some(None)`: unknown).
    /// `None` for a table, or when nothing fresh is cached.
    pub fn view_sources(
        &self,
        target_id: u32,
        db: &str,
        table_oid: u32,
    ) -> Option<Option<Arc<portcullis_sql::ResultSources>>> {
        let tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let t = tables.get(&(target_id, db.to_string(), table_oid))?;
        if t.fetched.elapsed() > TTL {
            return None;
        }
        t.view.clone()
    }

    /// A function's names (`name` and `schema.name`) if cached and fresh; empty when the
    /// server has no function of that OID.
    pub fn function_names(&self, target_id: u32, db: &str, oid: u32) -> Option<Arc<[String]>> {
        let functions = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        let f = functions.get(&(target_id, db.to_string(), oid))?;
        (f.fetched.elapsed() <= TTL).then(|| Arc::clone(&f.names))
    }

    /// The functions and procedures named `name` (unqualified) outside `pg_catalog`, if read
    /// less than `max_age` ago; empty when there are none (only PostgreSQL's own, or none at
    /// all).
    pub fn routines(
        &self,
        target_id: u32,
        db: &str,
        name: &str,
        max_age: Duration,
    ) -> Option<Arc<[Routine]>> {
        let routines = self.routines.lock().unwrap_or_else(|p| p.into_inner());
        let r = routines
            .named
            .get(&(target_id, db.to_string(), name.to_string()))?;
        (r.fetched.elapsed() <= max_age).then(|| Arc::clone(&r.routines))
    }

    /// Forgets every function body read: a statement may have changed one (`CREATE OR
    /// REPLACE FUNCTION`), and the next call must read it again. A lookup under way keeps
    /// nothing.
    pub fn forget_routines(&self) {
        let mut routines = self.routines.lock().unwrap_or_else(|p| p.into_inner());
        self.routines_generation.fetch_add(1, Ordering::SeqCst);
        routines.named.clear();
        routines.bytes = 0;
    }

    pub fn is_fresh(&self, target_id: u32, db: &str, table_oid: u32) -> bool {
        let tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        tables
            .get(&(target_id, db.to_string(), table_oid))
            .is_some_and(|t| t.fetched.elapsed() <= TTL)
    }

    /// Reads the columns of tables, the names of functions or the bodies of routines from the
    /// server and caches them, connecting (`connect`, awaited only when no idle connection of
    /// this address, database and role can answer) as the session's role.
    #[allow(clippy::too_many_arguments, reason = "one connection's parameters")]
    pub async fn fetch_connecting(
        &self,
        connect: impl Future<Output = std::io::Result<tokio::net::TcpStream>>,
        addr: SocketAddr,
        target_id: u32,
        target: &PostgresTargetConfig,
        tls: Option<&Arc<rustls::ClientConfig>>,
        db: &str,
        role: &str,
        password: &Secret,
        lookup: Lookup<'_>,
    ) -> Result<(), String> {
        let oids = lookup.oids();
        let generation = self.routines_generation.load(Ordering::SeqCst);
        let key = SideKey {
            target_id,
            addr,
            db: db.to_string(),
            role: role.to_string(),
        };
        let opening = OpenSide {
            addr,
            target,
            tls,
            db,
            role,
            password,
        };
        let Answer { rows, views, .. } = match self.side.take(&key) {
            Some(conn) => match run_lookup(&conn.client, lookup).await {
                Ok(answer) => {
                    self.keep_if_clean(key, conn, &answer).await;
                    answer
                }
                Err(failed) if failed.connection_lost() => {
                    // The server ended it while it was idle (a restart, pg_terminate_backend, an
                    // idle timeout): not the lookup's doing, so a new connection answers it.
                    tracing::debug!(error = %failed.message, "a kept catalog side connection was lost; opening another");
                    drop(conn);
                    let socket = connect.await.map_err(|e| e.to_string())?;
                    let conn = opening.open(socket).await?;
                    self.answer_on_new(key, conn, lookup).await?
                }
                // A connection that saw an error is never used again.
                Err(failed) => {
                    conn.close().await;
                    return Err(failed.message);
                }
            },
            None => {
                let socket = connect.await.map_err(|e| e.to_string())?;
                let conn = opening.open(socket).await?;
                self.answer_on_new(key, conn, lookup).await?
            }
        };
        match lookup {
            Lookup::Functions(oids) => return self.keep_function_names(target_id, db, oids, &rows),
            Lookup::Routines(names) => {
                return self.keep_routines(target_id, db, names, &rows, generation)
            }
            Lookup::Tables(_) => {}
        }
        let mut found: HashMap<u32, HashMap<i16, ColumnName>> =
            oids.iter().map(|o| (*o, HashMap::new())).collect();
        for row in rows {
            let oid: u32 = row.try_get(0).map_err(|e| e.to_string())?;
            let schema: String = row.try_get(1).map_err(|e| e.to_string())?;
            let table: String = row.try_get(2).map_err(|e| e.to_string())?;
            let attnum: i16 = row.try_get(3).map_err(|e| e.to_string())?;
            let column: String = row.try_get(4).map_err(|e| e.to_string())?;
            found.entry(oid).or_default().insert(
                attnum,
                ColumnName {
                    qualified: format!("{schema}.{table}.{column}"),
                    column,
                },
            );
        }
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        if tables.len() > MAX_TABLES {
            tables.clear();
        }
        let now = Instant::now();
        for (oid, columns) in found {
            let view = views.get(&oid).cloned();
            tables.insert(
                (target_id, db.to_string(), oid),
                Arc::new(TableColumns {
                    columns,
                    view,
                    fetched: now,
                }),
            );
        }
        Ok(())
    }
}

impl Catalog {
    /// Runs `lookup` on a connection just opened, and keeps the connection if that succeeded.
    async fn answer_on_new(
        &self,
        key: SideKey,
        conn: SideConnection,
        lookup: Lookup<'_>,
    ) -> Result<Answer, String> {
        match run_lookup(&conn.client, lookup).await {
            Ok(answer) => {
                self.keep_if_clean(key, conn, &answer).await;
                Ok(answer)
            }
            Err(failed) => {
                conn.close().await;
                Err(failed.message)
            }
        }
    }

    /// Gives `conn` back for the next lookup, unless it saw an error.
    async fn keep_if_clean(&self, key: SideKey, conn: SideConnection, answer: &Answer) {
        if answer.clean {
            self.side.give_back(key, conn).await;
        } else {
            conn.close().await;
        }
    }

    fn keep_function_names(
        &self,
        target_id: u32,
        db: &str,
        oids: &[u32],
        rows: &[tokio_postgres::Row],
    ) -> Result<(), String> {
        // An OID the server has no function for keeps no names: the call fails there anyway.
        let mut found: HashMap<u32, Vec<String>> = oids.iter().map(|o| (*o, Vec::new())).collect();
        for row in rows {
            let oid: u32 = row.try_get(0).map_err(|e| e.to_string())?;
            let schema: String = row.try_get(1).map_err(|e| e.to_string())?;
            let name: String = row.try_get(2).map_err(|e| e.to_string())?;
            found
                .entry(oid)
                .or_default()
                .extend([format!("{schema}.{name}"), name]);
        }
        let mut functions = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if functions.len() > MAX_TABLES {
            functions.clear();
        }
        let now = Instant::now();
        for (oid, names) in found {
            functions.insert(
                (target_id, db.to_string(), oid),
                FunctionNames {
                    names: names.into(),
                    fetched: now,
                },
            );
        }
        Ok(())
    }
}

impl Catalog {
    fn keep_routines(
        &self,
        target_id: u32,
        db: &str,
        names: &[String],
        rows: &[tokio_postgres::Row],
        generation: u64,
    ) -> Result<(), String> {
        // A name without a row keeps an empty list: a call of it runs one of PostgreSQL's own
        // functions, or fails on the server.
        let mut found: HashMap<&str, (Vec<Routine>, usize)> = names
            .iter()
            .map(|n| (n.as_str(), (Vec::new(), 0)))
            .collect();
        for row in rows {
            let name: &str = row.try_get(0).map_err(|e| e.to_string())?;
            let schema: String = row.try_get(1).map_err(|e| e.to_string())?;
            let language: String = row.try_get(2).map_err(|e| e.to_string())?;
            let definition: Option<String> = row.try_get(3).map_err(|e| e.to_string())?;
            // No definition: an aggregate or window function (whose support functions the
            // agent does not follow), or a function the server would not print. Opaque.
            let bytes = definition.as_ref().map_or(0, String::len) + 256;
            let body = match definition {
                Some(definition) => {
                    portcullis_sql::read_routine(&language, &definition).map_err(|e| e.to_string())
                }
                None => Ok(portcullis_sql::RoutineBody {
                    statements: Vec::new(),
                    dynamic_sql: true,
                }),
            };
            let Some(entry) = names.iter().find(|n| n.as_str() == name) else {
                continue;
            };
            let (list, size) = found.entry(entry.as_str()).or_default();
            list.push(Routine {
                name: format!("{schema}.{name}"),
                body,
            });
            *size += bytes;
        }
        let mut routines = self.routines.lock().unwrap_or_else(|p| p.into_inner());
        if self.routines_generation.load(Ordering::SeqCst) != generation {
            return Ok(());
        }
        let adding: usize = found.values().map(|(_, bytes)| bytes).sum();
        if routines.named.len() > MAX_TABLES
            || routines.bytes.saturating_add(adding) > MAX_ROUTINE_BYTES
        {
            routines.named.clear();
            routines.bytes = 0;
        }
        let now = Instant::now();
        for (name, (list, bytes)) in found {
            let replaced = routines.named.insert(
                (target_id, db.to_string(), name.to_string()),
                RoutinesNamed {
                    routines: list.into(),
                    bytes,
                    fetched: now,
                },
            );
            let freed = replaced.map_or(0, |r| r.bytes);
            routines.bytes = routines.bytes.saturating_add(bytes).saturating_sub(freed);
        }
        Ok(())
    }
}

/// What the views among the looked-up relations compute their columns from (`None`: unknown).
type Views = HashMap<u32, Option<Arc<portcullis_sql::ResultSources>>>;

/// What a new side connection logs in with: the session's role, over the target's TLS.
struct OpenSide<'a> {
    addr: SocketAddr,
    target: &'a PostgresTargetConfig,
    tls: Option<&'a Arc<rustls::ClientConfig>>,
    db: &'a str,
    role: &'a str,
    password: &'a Secret,
}

impl OpenSide<'_> {
    async fn open(&self, socket: tokio::net::TcpStream) -> Result<SideConnection, String> {
        let mut config = tokio_postgres::Config::new();
        config
            .user(self.role)
            .dbname(self.db)
            .password(self.password.expose())
            .application_name("portcullis-catalog")
            .connect_timeout(Duration::from_secs(10));
        match self.tls {
            Some(tls) => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                let host = self
                    .target
                    .server_name
                    .clone()
                    .unwrap_or_else(|| self.addr.ip().to_string());
                let mut make = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                let connect =
                    tokio_postgres::tls::MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(
                        &mut make, &host,
                    )
                    .map_err(|e| format!("server name `{host}`: {e}"))?;
                SideConnection::open(&config, socket, connect).await
            }
            None => {
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                SideConnection::open(&config, socket, tokio_postgres::NoTls).await
            }
        }
    }
}

/// Why a lookup failed, and whether the connection under it was lost rather than the lookup
/// refused.
struct LookupFailed {
    message: String,
    lost: bool,
}

impl LookupFailed {
    fn connection_lost(&self) -> bool {
        self.lost
    }
}

impl From<tokio_postgres::Error> for LookupFailed {
    fn from(e: tokio_postgres::Error) -> Self {
        // An ERROR is the lookup's own (it would fail on any connection); anything else (the
        // connection closed, an I/O error, a FATAL such as 57P01) ended the connection.
        let lost = e
            .as_db_error()
            .is_none_or(|db| !matches!(db.severity(), "ERROR"));
        Self {
            message: db_error(&e),
            lost,
        }
    }
}

impl From<String> for LookupFailed {
    fn from(message: String) -> Self {
        Self {
            message,
            lost: false,
        }
    }
}

/// What a lookup read, and whether its connection saw no error (only then is it kept).
struct Answer {
    rows: Vec<tokio_postgres::Row>,
    views: Views,
    clean: bool,
}

/// One lookup on `client`: the column query, then which relations the views' definitions
/// name are not plain tables. Returns the column rows and the views' sources. For functions,
/// the function-name query alone (no views).
async fn run_lookup(
    client: &tokio_postgres::Client,
    lookup: Lookup<'_>,
) -> Result<Answer, LookupFailed> {
    // System columns too (negative attnum: tableoid, ctid, xmin...), which results such as
    // pg_dump's catalog queries select by name.
    const COLUMNS: &str = "SELECT c.oid, n.nspname, c.relname, a.attnum, a.attname, \
                           c.relkind IN ('v', 'm'), \
                           CASE WHEN c.relkind IN ('v', 'm') AND a.attnum = 1 \
                                THEN pg_catalog.pg_get_viewdef(c.oid) END \
                           FROM pg_catalog.pg_class c \
                           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                           JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
                           WHERE c.oid = ANY($1) AND NOT a.attisdropped";
    let oids: &[tokio_postgres::types::Oid] = lookup.oids();
    if let Lookup::Routines(names) = lookup {
        let rows = client.query(ROUTINES, &[&names]).await?;
        return Ok(Answer {
            rows,
            views: Views::new(),
            clean: true,
        });
    }
    if let Lookup::Functions(_) = lookup {
        let rows = client.query(FUNCTIONS, &[&oids]).await?;
        return Ok(Answer {
            rows,
            views: Views::new(),
            clean: true,
        });
    }
    let rows = client.query(COLUMNS, &[&oids]).await?;
    // Each view's definition, parsed once; only its first column's row carries it.
    let mut views: Views = HashMap::new();
    for row in &rows {
        let oid: u32 = row.try_get(0).map_err(|e| e.to_string())?;
        let is_view: bool = row.try_get(5).map_err(|e| e.to_string())?;
        let definition: Option<String> = row.try_get(6).map_err(|e| e.to_string())?;
        match (is_view, definition) {
            (true, Some(d)) => {
                views.insert(oid, view_sources(Some(&d)));
            }
            (true, None) => {
                views.entry(oid).or_insert(None);
            }
            (false, _) => {}
        }
    }
    // The relations the views read, as their definitions spell them (qualified where the
    // default search_path would not find them, as `pg_get_viewdef` writes them).
    let mut named: Vec<String> = views
        .values()
        .flatten()
        .flat_map(|sources| sources.all.iter().filter_map(|r| r.table.clone()))
        .collect();
    named.sort();
    named.dedup();
    // Another session's temporary relations (`pg_temp_N.v`) cannot be looked up from
    // here: not known to be tables. Nor is anything, if the lookup fails.
    let (temporary, named): (Vec<String>, Vec<String>) =
        named.into_iter().partition(|n| n.starts_with("pg_temp"));
    let mut not_tables: HashSet<String> = temporary.into_iter().collect();
    let mut clean = true;
    if !named.is_empty() {
        match client.query(RELATIONS, &[&named]).await {
            Ok(found) => {
                for row in found {
                    let name: String = row.try_get(0).map_err(|e| e.to_string())?;
                    let plain: bool = row.try_get(1).map_err(|e| e.to_string())?;
                    if !plain {
                        not_tables.insert(name);
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %db_error(&e), "looking up the relations views read");
                not_tables.extend(named);
                clean = false;
            }
        }
    }
    let views = views
        .into_iter()
        .map(|(oid, sources)| (oid, sources.map(|s| through_views(s, &not_tables))))
        .collect();
    Ok(Answer { rows, views, clean })
}

/// The server's own message for an error it reported (tokio-postgres says only "db error").
fn db_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// The functions a fast-path call may run, by OID: schema and name.
const FUNCTIONS: &str = "SELECT p.oid, n.nspname, p.proname \
                         FROM pg_catalog.pg_proc p \
                         JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
                         WHERE p.oid = ANY($1)";

/// Every function and procedure of the names a statement calls, in every schema (which one a
/// call runs depends on its argument types and the search_path, which the agent does not
/// resolve: all of them are read), except PostgreSQL's own in `pg_catalog`, which only a
/// superuser can change. The definition is printed for the languages the agent reads, and
/// for plain functions and procedures only (`pg_get_functiondef` refuses aggregates).
const ROUTINES: &str = "SELECT p.proname::pg_catalog.text, n.nspname::pg_catalog.text, \
                        l.lanname::pg_catalog.text, \
                        CASE WHEN p.prokind IN ('f', 'p') AND l.lanname IN ('sql', 'plpgsql') \
                             THEN pg_catalog.pg_get_functiondef(p.oid) END \
                        FROM pg_catalog.pg_proc p \
                        JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
                        JOIN pg_catalog.pg_language l ON l.oid = p.prolang \
                        WHERE p.proname = ANY($1::pg_catalog.text[]::pg_catalog.name[]) \
                        AND n.nspname <> 'pg_catalog'";

/// Which names are plain tables (ordinary, partitioned, foreign): a name that is a view, or
/// that does not resolve, is not.
const RELATIONS: &str = "SELECT n, COALESCE(c.relkind IN ('r', 'p', 'f'), false) \
                         FROM pg_catalog.unnest($1::pg_catalog.text[]) AS n \
                         LEFT JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(n)";

/// A view's sources with every relation that is not a plain table (another view, a name that
/// did not resolve) made "some table": a rule on a base table matches what an inner view
/// passes on by column name, whatever the views in between are called.
fn through_views(
    sources: Arc<portcullis_sql::ResultSources>,
    not_tables: &HashSet<String>,
) -> Arc<portcullis_sql::ResultSources> {
    let hides_a_view =
        |r: &portcullis_sql::SourceRef| r.table.as_ref().is_some_and(|t| not_tables.contains(t));
    if !sources.all.iter().any(hides_a_view) {
        return sources;
    }
    let open = |refs: &Vec<portcullis_sql::SourceRef>| {
        refs.iter()
            .map(|r| portcullis_sql::SourceRef {
                table: if hides_a_view(r) {
                    None
                } else {
                    r.table.clone()
                },
                column: r.column.clone(),
            })
            .collect::<Vec<_>>()
    };
    Arc::new(portcullis_sql::ResultSources {
        columns: sources
            .columns
            .as_ref()
            .map(|columns| columns.iter().map(open).collect()),
        all: open(&sources.all),
        // A view's definition is one query, which writes nothing.
        assigned: Vec::new(),
    })
}

/// What a view's columns are computed from, from its definition (`pg_get_viewdef`); `None`
/// when there is no definition or it does not parse as one query.
fn view_sources(definition: Option<&str>) -> Option<Arc<portcullis_sql::ResultSources>> {
    let statements = portcullis_sql::classify(definition?).ok()?;
    match statements.as_slice() {
        [one] => one.result_sources.clone(),
        _ => None,
    }
}
