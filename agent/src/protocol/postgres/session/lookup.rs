//! What a message needs from the catalog before it is handled: the names of a function
//! called by OID, what the functions a statement calls by name run (level by level), the
//! columns of the tables a masked result is read from. The machine asks for one lookup at a
//! time (`Output::lookup`) and waits; the relay runs it and answers.

use super::*;

/// How far one client message's lookups have gone: each is asked at most once, so a lookup
/// that keeps nothing (the bodies were forgotten meanwhile) cannot loop.
#[derive(Default)]
pub(super) struct LookupProgress {
    names_asked: bool,
    /// The deepest level of called functions asked for.
    levels_asked: usize,
    /// A lookup of function bodies failed: what was not read is decided as opaque.
    routines_failed: bool,
    asking: Option<Asking>,
}

#[derive(Clone, Copy)]
enum Asking {
    Names,
    Routines,
}

/// The error that ends a session whose masked result's tables could not be looked up.
pub(super) fn unresolved_tables(why: String) -> PgError {
    PgError::Unmaskable(format!(
        "the masking profile selects columns by table, and the result's tables could not be looked up ({why}); the session is closed so no unmasked value leaves"
    ))
}

impl<'a> Session<'a> {
    /// Takes the answer to the lookup a client message waited for.
    pub(super) fn lookup_answered(
        &mut self,
        progress: &mut LookupProgress,
        answer: Result<(), String>,
    ) {
        match progress.asking.take() {
            // Kept for `on_function_call`, which refuses a call whose names are unknown.
            Some(Asking::Names) => self.function_lookup_error = answer.err(),
            Some(Asking::Routines) => {
                if let Err(e) = answer {
                    // Decided as opaque (`read_calls`): a policy on `dynamic_sql` applies.
                    tracing::warn!(error = %e, "reading the functions a statement calls");
                    progress.routines_failed = true;
                }
            }
            None => {}
        }
    }

    /// The lookup `msg` needs before it is decided, if any: the names of the function a
    /// fast-path call runs (so the policy decides it by name, as the same call in SQL), then
    /// the bodies of what its statements call by name (`Catalog::routines`), and what those
    /// call, down to one past [`MAX_ROUTINE_DEPTH`] (to tell PostgreSQL's own functions from
    /// a body too deep). A name not read is opaque when decided, never unchecked.
    pub(super) fn client_lookup(
        &mut self,
        msg: &FrontendMessage,
        progress: &mut LookupProgress,
    ) -> Option<CatalogLookup> {
        let catalog = self.services.catalog;
        let (target, db) = (self.ctx.target_id, &*self.ctx.db_name);
        if let FrontendMessage::FunctionCall { function_oid, .. } = msg {
            if !progress.names_asked && catalog.function_names(target, db, *function_oid).is_none()
            {
                progress.names_asked = true;
                progress.asking = Some(Asking::Names);
                return Some(CatalogLookup::Functions(vec![*function_oid]));
            }
        }
        if self.routines_changed || progress.routines_failed {
            return None;
        }
        let mut called: Vec<String> = Vec::new();
        match msg {
            FrontendMessage::Query { sql } | FrontendMessage::Parse { sql, .. } => {
                self.called_in(sql, &mut called);
            }
            FrontendMessage::Bind { statement, .. } => {
                if let Some(prepared) = self.prepared.get(statement) {
                    called.extend(
                        prepared
                            .statements
                            .iter()
                            .flat_map(|s| s.functions.iter().cloned()),
                    );
                }
            }
            FrontendMessage::FunctionCall { function_oid, .. } => {
                if let Some(names) = catalog.function_names(target, db, *function_oid) {
                    called.extend(names.iter().cloned());
                }
            }
            _ => {}
        }
        if called.is_empty() {
            return None;
        }
        let lookup = self.routines_to_read(&called, progress.levels_asked);
        if let Some((depth, _)) = &lookup {
            progress.levels_asked = *depth;
            progress.asking = Some(Asking::Routines);
        }
        lookup.map(|(_, names)| CatalogLookup::Routines(names))
    }

    /// The first level of calls deeper than `asked` with names not read lately, and those
    /// names.
    fn routines_to_read(&self, called: &[String], asked: usize) -> Option<(usize, Vec<String>)> {
        let catalog = self.services.catalog;
        let (target, db) = (self.ctx.target_id, &*self.ctx.db_name);
        let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut level: Vec<String> = called
            .iter()
            .flat_map(|f| routine_candidates(f))
            .filter(|name| seen.insert((*name).to_owned()))
            .map(str::to_owned)
            .collect();
        for depth in 1..=MAX_ROUTINE_DEPTH + 1 {
            if level.is_empty() {
                break;
            }
            if depth > asked {
                let missing: Vec<String> = level
                    .iter()
                    .filter(|name| catalog.routines(target, db, name, ROUTINE_REREAD).is_none())
                    .cloned()
                    .collect();
                if !missing.is_empty() {
                    return Some((depth, missing));
                }
            }
            if depth > MAX_ROUTINE_DEPTH {
                break;
            }
            let mut next = Vec::new();
            for name in &level {
                let Some(routines) = catalog.routines(target, db, name, ROUTINE_MAX_AGE) else {
                    continue;
                };
                for body in routines.iter().filter_map(|r| r.body.as_ref().ok()) {
                    for f in body.statements.iter().flat_map(|s| s.functions.iter()) {
                        next.extend(
                            routine_candidates(f)
                                .into_iter()
                                .filter(|name| seen.insert((*name).to_owned()))
                                .map(str::to_owned),
                        );
                    }
                }
            }
            level = next;
        }
        None
    }

    /// The functions the statements of `sql` call, if it may call any by name. Only a
    /// statement with a `(` can (the functions the grammar calls for `AT TIME ZONE`,
    /// `SIMILAR TO` and the like are named in `pg_catalog`): pgbench's statements need no
    /// read.
    fn called_in(&self, sql: &str, called: &mut Vec<String>) {
        if !sql.contains('(') {
            return;
        }
        // Cached: deciding the same text reads it from the cache.
        if let Ok(statements) = self.services.classifier.classify(sql) {
            called.extend(statements.iter().flat_map(|s| s.functions.iter().cloned()));
        }
    }

    /// Before rows are masked by `table_column` rules, the tables of the result columns a
    /// RowDescription describes must be in the catalog: the lookup of those that are not.
    pub(super) fn server_lookup(&self, msg: &RawMessage) -> Option<CatalogLookup> {
        if msg.tag != b'T' {
            return None;
        }
        let needed = self.expect.iter().any(|e| {
            let masker = match e {
                Expect::Execute(r) => r.verdict.masker.as_ref(),
                Expect::Query(q) => q.statements.iter().find_map(|r| r.verdict.masker.as_ref()),
                _ => None,
            };
            masker.is_some_and(|(_, m)| m.needs_column_origins())
        });
        if !needed {
            return None;
        }
        let Ok(BackendMessage::RowDescription(fields)) = parse_backend(msg) else {
            return None;
        };
        let catalog = self.services.catalog;
        let (target, db) = (self.ctx.target_id, &*self.ctx.db_name);
        let mut oids: Vec<u32> = fields
            .iter()
            .map(|f| f.table_oid)
            .filter(|&o| o != 0 && !catalog.is_fresh(target, db, o))
            .collect();
        oids.sort_unstable();
        oids.dedup();
        (!oids.is_empty()).then_some(CatalogLookup::Tables(oids))
    }
}
