use super::*;

/// How deep calls inside function bodies are followed: a statement calls `f` (depth 1), whose
/// body calls `g` (2), and so on. A body deeper than this is refused, not run unread.
pub(super) const MAX_ROUTINE_DEPTH: usize = 4;

/// A function's body read longer ago than this is read again before a statement that calls
/// it is decided; one a little older still serves a decision (the read just before it may
/// have come from a lookup that started a moment earlier).
pub(super) const ROUTINE_REREAD: Duration = Duration::from_secs(60);

pub(super) const ROUTINE_MAX_AGE: Duration = Duration::from_secs(75);

/// What the functions and procedures a statement calls run, as far as the agent can read.
#[derive(Default)]
pub(super) struct Calls {
    /// Each statement their bodies run, with the function whose body holds it.
    pub(super) statements: Vec<(String, portcullis_sql::Statement)>,
    /// Some function called cannot be read before it runs (see `Session::read_calls`).
    pub(super) dynamic: bool,
}

/// Statement shape: class, command, tables, functions, dynamic SQL.
pub(super) type ShapeKey = (
    Option<&'static str>,
    Option<Arc<str>>,
    Arc<[String]>,
    Arc<[String]>,
    bool,
);

pub(super) const DECISION_CACHE_ENTRIES: usize = 256;

#[derive(Default)]
pub(super) struct DecisionCache {
    pub(super) set: std::sync::Weak<PolicySet>,
    pub(super) second: i64,
    /// By the hash of the shape; a hit is compared field by field, so a collision is a miss
    /// (and replaces the entry), never another statement's verdict. Looking up builds no key.
    pub(super) allowed: HashMap<u64, (ShapeKey, Verdict)>,
}

impl StatementInfo {
    pub(super) fn shape_hash(&self) -> u64 {
        *self.shape_hash.get_or_init(|| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (
                &self.class,
                &self.command,
                &self.tables,
                &self.functions,
                self.dynamic_sql,
            )
                .hash(&mut h);
            h.finish()
        })
    }

    /// The key of a cached verdict is made of this statement's own parts when a prepared
    /// statement runs again: those compare by address.
    pub(super) fn has_shape(&self, key: &ShapeKey) -> bool {
        fn same<T: ?Sized + PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
            Arc::ptr_eq(a, b) || a == b
        }
        self.class == key.0
            && match (&self.command, &key.1) {
                (Some(a), Some(b)) => same(a, b),
                (a, b) => a == b,
            }
            && same(&self.tables, &key.2)
            && same(&self.functions, &key.3)
            && self.dynamic_sql == key.4
    }

    pub(super) fn shape(&self) -> ShapeKey {
        (
            self.class,
            self.command.clone(),
            self.tables.clone(),
            self.functions.clone(),
            self.dynamic_sql,
        )
    }
}

/// The names (`pg_proc.proname`) a called function's name as the classifier lists it may
/// stand for: the classifier joins a qualified name's parts with `.`, and a quoted part may
/// hold a `.` itself, so every suffix is one (`a.b.c`: `a.b.c`, `b.c`, `c`), except the
/// name after exactly `pg_catalog.`: one of PostgreSQL's own, which only a superuser changes.
pub(super) fn routine_candidates(called: &str) -> Vec<&str> {
    let mut names = vec![called];
    for (at, _) in called.match_indices('.') {
        if let (Some(schema), Some(name)) = (called.get(..at), called.get(at + 1..)) {
            if schema != "pg_catalog" && !name.is_empty() {
                names.push(name);
            }
        }
    }
    names
}

/// Whether a statement may change what a function or procedure runs, or which one a name
/// finds: creating, replacing, altering or dropping one (or an extension or language, which
/// bring their own), or SQL the agent could not read.
pub(super) fn may_change_routines(command: Option<&str>, dynamic_sql: bool) -> bool {
    if dynamic_sql {
        return true;
    }
    let Some((verb, object)) = command.and_then(|c| c.split_once(' ')) else {
        return false;
    };
    matches!(verb, "CREATE" | "ALTER" | "DROP")
        && [
            "FUNCTION",
            "PROCEDURE",
            "ROUTINE",
            "EXTENSION",
            "LANGUAGE",
            "AGGREGATE",
        ]
        .iter()
        .any(|kind| object.contains(kind))
}

impl<'a> Session<'a> {
    /// The policy decision for one statement; `Err` carries the wire error, the decision
    /// word for the audit event and the deciding policies.
    ///
    /// A DO block is decided as a multi-statement string is: every statement its body runs
    /// is its own request (same shape as a top-level statement's, so `context.command ==
    /// "DROP TABLE"` sees one inside a DO), then the block itself; one denial refuses the
    /// block, and the denied inner statement gets its own `statement.denied` event. Inner
    /// statements are decided before the block's cached verdict is looked up: two blocks with
    /// the same tables may run different commands.
    ///
    /// The statements in the bodies of the functions and procedures it calls (`read_calls`)
    /// are decided the same way, after the block's; a function that cannot be read makes the
    /// statement's own request `dynamic_sql`.
    pub(super) fn decide(
        &mut self,
        set: &Arc<PolicySet>,
        info: &StatementInfo,
    ) -> Result<Verdict, (PgError, Decision, Vec<String>)> {
        let calls = self
            .read_calls(info)
            .map_err(|e| (e, Decision::Deny, Vec::new()))?;
        let mut inner_ids: Vec<String> = Vec::new();
        let mut inner_masker = None;
        let inside = info
            .inner
            .iter()
            .map(|s| (None, s))
            .chain(calls.statements.iter().map(|(f, s)| (Some(f.as_str()), s)));
        for (function, statement) in inside {
            let inner = StatementInfo::from_parsed(statement);
            match self.decide_one(set, &inner) {
                Ok(v) => {
                    inner_ids.extend(v.policy_ids.iter().cloned());
                    inner_masker = inner_masker.or(v.masker);
                }
                // The whole string waits for approval (a simple query), or is refused.
                Err((e @ PgError::ApprovalRequired { .. }, decision, ids)) => {
                    return Err((e, decision, ids));
                }
                Err((e, decision, ids)) => {
                    self.record_denied(&inner, decision, &ids, &e.to_string(), e.sqlstate());
                    let place = match function {
                        None => "the DO block".to_owned(),
                        Some(f) => format!("function `{f}`, which the statement calls"),
                    };
                    let e = match e {
                        PgError::StatementDenied { reason, policy_ids } => {
                            PgError::StatementDenied {
                                reason: format!(
                                    "{reason} (statement inside {place}: {})",
                                    truncate(inner.text.to_string(), 200)
                                ),
                                policy_ids,
                            }
                        }
                        other => other,
                    };
                    return Err((e, decision, ids));
                }
            }
        }
        let verdict = if calls.dynamic && !info.dynamic_sql {
            let opaque = StatementInfo {
                dynamic_sql: true,
                shape_hash: std::sync::OnceLock::new(),
                encoded: std::sync::OnceLock::new(),
                ..info.clone()
            };
            self.decide_one(set, &opaque)?
        } else {
            self.decide_one(set, info)?
        };
        let changes_routines = may_change_routines(info.command.as_deref(), info.dynamic_sql)
            || calls.dynamic
            || info
                .inner
                .iter()
                .chain(calls.statements.iter().map(|(_, s)| s))
                .any(|s| may_change_routines(Some(&s.command), s.dynamic_sql));
        if changes_routines {
            self.routines_changed = true;
        }
        if inner_ids.is_empty() && inner_masker.is_none() {
            return Ok(verdict);
        }
        // The block's notices and errors carry what its statements read: a profile one of
        // them was given applies to the block when the block itself has none.
        inner_ids.extend(verdict.policy_ids.iter().cloned());
        inner_ids.sort();
        inner_ids.dedup();
        Ok(Verdict {
            policy_ids: Arc::from(inner_ids),
            masker: verdict.masker.or(inner_masker),
        })
    }

    /// What the functions and procedures `info` calls by name run, from the bodies
    /// `resolve_routines` read, following the calls inside them up to [`MAX_ROUTINE_DEPTH`]
    /// deep (each name once, so recursion ends). `dynamic` when one cannot be read before it
    /// runs: a body in another language or with dynamic SQL, a name whose functions were not
    /// read (the lookup failed), or any name while a change to functions is not committed.
    /// Refused: a body deeper than the limit, or one that runs what may never run.
    pub(super) fn read_calls(&self, info: &StatementInfo) -> Result<Calls, PgError> {
        let mut calls = Calls::default();
        if info.functions.is_empty() {
            return Ok(calls);
        }
        let catalog = self.services.catalog;
        let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut queue: VecDeque<(String, usize)> =
            info.functions.iter().map(|f| (f.clone(), 1)).collect();
        while let Some((called, depth)) = queue.pop_front() {
            for name in routine_candidates(&called) {
                if !seen.insert(name.to_owned()) {
                    continue;
                }
                if self.routines_changed {
                    calls.dynamic = true;
                    continue;
                }
                let read =
                    catalog.routines(self.ctx.target_id, &self.ctx.db_name, name, ROUTINE_MAX_AGE);
                let too_deep = || {
                    PgError::Unsafe(format!(
                        "`{called}` is called through more than {MAX_ROUTINE_DEPTH} levels of functions; the agent does not follow calls deeper and refuses what it cannot read"
                    ))
                };
                let Some(routines) = read else {
                    if depth > MAX_ROUTINE_DEPTH {
                        return Err(too_deep());
                    }
                    calls.dynamic = true;
                    continue;
                };
                if routines.is_empty() {
                    continue;
                }
                if depth > MAX_ROUTINE_DEPTH {
                    return Err(too_deep());
                }
                for routine in routines.iter() {
                    let body = routine.body.as_ref().map_err(|why| {
                        PgError::Unsafe(format!(
                            "function `{}`, which the statement calls, {why}",
                            routine.name
                        ))
                    })?;
                    calls.dynamic |= body.dynamic_sql;
                    for statement in &body.statements {
                        queue.extend(statement.functions.iter().map(|f| (f.clone(), depth + 1)));
                        calls
                            .statements
                            .push((routine.name.clone(), statement.clone()));
                    }
                }
            }
        }
        Ok(calls)
    }

    /// [`Self::decide`] of one request.
    pub(super) fn decide_one(
        &mut self,
        set: &Arc<PolicySet>,
        info: &StatementInfo,
    ) -> Result<Verdict, (PgError, Decision, Vec<String>)> {
        let now = i64::try_from(self.now.unix_ms / 1000).unwrap_or(0);
        // Within one second, under one policy set, the request for a statement of the same
        // shape is the same request (principal, target, client and database are the
        // session's): its allow is reused. Denials are always decided afresh.
        let hash = info.shape_hash();
        let cache = &mut self.decisions;
        if !std::ptr::eq(cache.set.as_ptr(), Arc::as_ptr(set)) || cache.second != now {
            cache.set = Arc::downgrade(set);
            cache.second = now;
            cache.allowed.clear();
        }
        if let Some((_, v)) = cache.allowed.get(&hash).filter(|(k, _)| info.has_shape(k)) {
            return Ok(v.clone());
        }
        let request = self.query_request(info, now);
        let decision = set.decide(&request);
        let obligations = decision.obligations.clone();
        let mut approved = false;
        let allowed = match crate::policy::outcome(decision) {
            Ok(allowed) => allowed,
            Err(r) => match (r.approval, &self.approval) {
                // The query string this statement belongs to was approved, as sent.
                (Some(_), Some(Ok(request_id))) => {
                    approved = true;
                    let mut policy_ids = r.policy_ids;
                    policy_ids.push(format!("approval:{request_id}"));
                    crate::policy::Allowed {
                        policy_ids,
                        obligations,
                    }
                }
                (Some(_), Some(Err(why))) => {
                    return Err((
                        PgError::StatementDenied {
                            reason: why.clone(),
                            policy_ids: r.policy_ids.clone(),
                        },
                        r.decision,
                        r.policy_ids,
                    ))
                }
                (Some(requirement), None) => {
                    return Err((
                        PgError::ApprovalRequired {
                            reason: r.reason,
                            policy_ids: r.policy_ids.clone(),
                            requirement,
                        },
                        r.decision,
                        r.policy_ids,
                    ))
                }
                (None, _) => {
                    return Err((
                        PgError::StatementDenied {
                            reason: r.reason,
                            policy_ids: r.policy_ids.clone(),
                        },
                        r.decision,
                        r.policy_ids,
                    ))
                }
            },
        };
        let ids = allowed.policy_ids;
        let masker = allowed.obligations.iter().find_map(|o| match o {
            Obligation::Mask { profile } => self
                .services
                .maskers
                .masker(set, profile)
                .map(|m| (Arc::from(profile.as_str()), m)),
        });
        // What a function running SQL text reads cannot be followed to its columns,
        // so no column rule could apply to its result. A fast-path call gives its
        // query as a value, which `fast_path_sql_text` reads instead.
        let fast_path = info.command.as_deref() == Some("FUNCTION CALL");
        if let Some((profile, m)) = masker.as_ref().filter(|_| !fast_path) {
            let functions = info.functions.iter().map(String::as_str);
            if let Some(function) = m.refused_sql_text_function(functions) {
                return Err((
                    PgError::StatementDenied {
                        reason: format!(
                            "`{function}` runs SQL given as text, which masking profile `{profile}` cannot follow to the columns it reads; the profile may allow it with `allow_sql_text_functions`"
                        ),
                        policy_ids: ids.clone(),
                    },
                    Decision::Deny,
                    ids,
                ));
            }
        }
        let verdict = Verdict {
            policy_ids: Arc::from(ids),
            masker,
        };
        // An approval is for one exact query string, never for its shape.
        if approved {
            return Ok(verdict);
        }
        if self.decisions.allowed.len() >= DECISION_CACHE_ENTRIES {
            self.decisions.allowed.clear();
        }
        self.decisions
            .allowed
            .insert(hash, (info.shape(), verdict.clone()));
        Ok(verdict)
    }

    pub(super) fn query_request(&self, info: &StatementInfo, now: i64) -> Request {
        let origin = &self.ctx.origin;
        let mut context = crate::policy::base_context(&origin.comm, origin.uid, now);
        context.statement_class = info.class.map(str::to_string);
        context.command = info.command.as_deref().map(str::to_string);
        context.tables = info.tables.to_vec();
        context.functions = info.functions.to_vec();
        context.dynamic_sql = info.dynamic_sql;
        context.db_user = Some(self.ctx.db_user.to_string());
        context.db_name = Some(self.ctx.db_name.to_string());
        Request {
            principal: self.ctx.principal.clone(),
            action: Action::Query,
            target: self.ctx.target.clone(),
            context,
        }
    }
}

#[cfg(test)]
mod tests {

    /// Every `pg_proc` name a called name may stand for: a quoted part may hold a `.`, so
    /// every suffix is looked up, except the name after exactly `pg_catalog.`.
    #[test]
    fn a_called_name_is_looked_up_under_every_name_it_may_stand_for() {
        use super::routine_candidates;
        let rows: &[(&str, &[&str])] = &[
            ("purge", &["purge"]),
            ("app.purge", &["app.purge", "purge"]),
            ("db.app.purge", &["db.app.purge", "app.purge", "purge"]),
            // PostgreSQL's own, or a function named "pg_catalog.now" in another schema.
            ("pg_catalog.now", &["pg_catalog.now"]),
            // A schema named "x.pg_catalog" is not pg_catalog.
            (
                "x.pg_catalog.now",
                &["x.pg_catalog.now", "pg_catalog.now", "now"],
            ),
            ("oid:1234", &["oid:1234"]),
        ];
        for &(called, want) in rows {
            assert_eq!(routine_candidates(called), want, "{called}");
        }
    }

    /// The statements after which a call's body read over the agent's own connection may not
    /// be the one the call runs, until the transaction ends.
    #[test]
    fn statements_that_may_change_a_function_are_known() {
        use super::may_change_routines;
        let rows: &[(Option<&str>, bool, bool)] = &[
            (Some("CREATE FUNCTION"), false, true),
            (Some("CREATE PROCEDURE"), false, true),
            (Some("ALTER FUNCTION"), false, true),
            (Some("ALTER ROUTINE"), false, true),
            (Some("DROP PROCEDURE"), false, true),
            (Some("CREATE EXTENSION"), false, true),
            (Some("ALTER EXTENSION"), false, true),
            (Some("CREATE LANGUAGE"), false, true),
            (Some("CREATE AGGREGATE"), false, true),
            (Some("DO"), true, true),
            (Some("SELECT"), true, true),
            (Some("DO"), false, false),
            (Some("SELECT"), false, false),
            (Some("CREATE TABLE"), false, false),
            (Some("DROP TABLE"), false, false),
            (Some("CALL"), false, false),
            (None, false, false),
        ];
        for &(command, dynamic, want) in rows {
            assert_eq!(
                may_change_routines(command, dynamic),
                want,
                "{command:?} dynamic {dynamic}"
            );
        }
    }
}
