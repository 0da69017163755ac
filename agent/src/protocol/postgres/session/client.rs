use super::*;

/// The fields of a fast-path FunctionCall message the session uses.
pub(super) struct FunctionCall<'m> {
    pub(super) oid: u32,
    pub(super) arg_formats: &'m [i16],
    pub(super) args: &'m [Option<Bytes>],
    pub(super) result_format: i16,
}

/// What the client is told, and the decision recorded, for SQL the classifier would not
/// pass: a syntax error (or anything it cannot read) is an `error`; a statement refused
/// whatever the policy is a `deny` with SQLSTATE 42501.
pub(super) fn refusal(e: portcullis_sql::ClassifyError) -> (PgError, Decision) {
    match e {
        portcullis_sql::ClassifyError::Refused { message } => {
            (PgError::Unsafe(message), Decision::Deny)
        }
        other => (PgError::Unparsable(other.to_string()), Decision::Error),
    }
}

/// The walsender command a replication connection sends (PostgreSQL docs, "Streaming
/// Replication Protocol"), if `sql` is one.
pub(super) fn replication_command(sql: &str) -> Option<&'static str> {
    const COMMANDS: [&str; 8] = [
        "IDENTIFY_SYSTEM",
        "TIMELINE_HISTORY",
        "CREATE_REPLICATION_SLOT",
        "READ_REPLICATION_SLOT",
        "DROP_REPLICATION_SLOT",
        "ALTER_REPLICATION_SLOT",
        "START_REPLICATION",
        "BASE_BACKUP",
    ];
    let first = sql.split_whitespace().next()?.trim_end_matches(';');
    COMMANDS.into_iter().find(|c| c.eq_ignore_ascii_case(first))
}

/// A fast-path call of a function that runs SQL given as text (`names`: the function's), under
/// a profile with column rules that does not allow it: let through only when the function's
/// first argument is its query, sent as text, and that query reads nothing a column rule
/// could select (read like a statement, whose every column reference counts). Its result
/// then goes through the detectors, as a computed value's does. `Err`: the refusal and the
/// policies that had allowed the call.
pub(super) fn fast_path_sql_text(
    verdict: &Verdict,
    names: &[String],
    call: &FunctionCall<'_>,
) -> Result<(), (PgError, Vec<String>)> {
    let Some((profile, masker)) = &verdict.masker else {
        return Ok(());
    };
    let Some(function) = masker.refused_sql_text_function(names.iter().map(String::as_str)) else {
        return Ok(());
    };
    let text_format = match call.arg_formats {
        [] => true,
        [one, ..] => *one == 0,
    };
    let query = call
        .args
        .first()
        .and_then(Option::as_ref)
        .filter(|_| text_format && portcullis_policy::takes_query_text(function))
        .and_then(|q| std::str::from_utf8(q).ok());
    let readable = query
        .and_then(|q| portcullis_sql::classify(q).ok())
        .is_some_and(|statements| {
            !statements.is_empty()
                && statements.iter().all(|st| {
                    st.result_sources.as_ref().is_some_and(|s| {
                        let plan = masker.plan_derived(
                            "",
                            s.all
                                .iter()
                                .map(|r| (r.table.as_deref(), r.column.as_deref())),
                        );
                        !matches!(plan, ColumnPlan::Whole { .. })
                    })
                })
        });
    if readable {
        return Ok(());
    }
    let ids = verdict.policy_ids.to_vec();
    Err((
        PgError::StatementDenied {
            reason: format!(
                "`{function}` runs SQL given as text, and its query reads what masking profile `{profile}` selects by column (or cannot be read); the profile may allow it with `allow_sql_text_functions`"
            ),
            policy_ids: ids.clone(),
        },
        ids,
    ))
}

impl<'a> Session<'a> {
    pub(super) fn on_client_message(
        &mut self,
        msg: RawMessage,
        progress: &mut LookupProgress,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
    ) -> Flow {
        // COPY data is the bulk of a COPY FROM: forwarded without parsing.
        if matches!(msg.tag, b'd' | b'c' | b'f') {
            to_server.extend_from_slice(&msg.frame);
            return Flow::Continue;
        }
        let parsed = match parse_frontend(&msg) {
            Ok(m) => m,
            Err(e) => {
                return self.fatal(
                    PgError::Protocol(format!("from the client: {e}")),
                    to_client,
                )
            }
        };
        if self.skip_to_sync
            && !matches!(parsed, FrontendMessage::Sync | FrontendMessage::Terminate)
        {
            return Flow::Continue;
        }
        if let Some(lookup) = self.client_lookup(&parsed, progress) {
            // Handled again, parsed afresh, when the catalog has answered.
            self.out.lookup = Some(lookup);
            self.paused = Some(Paused::Client {
                msg,
                progress: std::mem::take(progress),
            });
            return Flow::Continue;
        }
        match parsed {
            FrontendMessage::Query { sql } => {
                self.on_query(&msg, &sql, to_server);
            }
            FrontendMessage::Parse { statement, sql, .. } => {
                self.on_parse(&msg, statement, sql, to_server);
            }
            FrontendMessage::Bind {
                portal,
                statement,
                param_formats,
                params,
                ..
            } => self.on_bind(&msg, portal, &statement, &param_formats, &params, to_server),
            FrontendMessage::Describe { .. } => {
                self.expect.push_back(Expect::Describe);
                to_server.extend_from_slice(&msg.frame);
            }
            FrontendMessage::Execute { portal, .. } => self.on_execute(&msg, &portal, to_server),
            FrontendMessage::Close { target, name } => {
                // SQL and the protocol share the server's names: what a SQL PREPARE or
                // DECLARE of this name computed its columns from no longer applies either.
                let cursor = matches!(target, portcullis_pgwire::DescribeTarget::Portal);
                self.forget_names(cursor, Some(&name));
                self.expect.push_back(Expect::CloseComplete);
                to_server.extend_from_slice(&msg.frame);
            }
            FrontendMessage::Sync => {
                self.skip_to_sync = false;
                self.expect_ready(Expect::Sync);
                to_server.extend_from_slice(&msg.frame);
            }
            FrontendMessage::Flush => to_server.extend_from_slice(&msg.frame),
            FrontendMessage::FunctionCall {
                function_oid,
                arg_formats,
                args,
                result_format,
            } => {
                let call = FunctionCall {
                    oid: function_oid,
                    arg_formats: &arg_formats,
                    args: &args,
                    result_format,
                };
                self.on_function_call(&msg, &call, to_server);
            }
            FrontendMessage::Terminate => {
                to_server.extend_from_slice(&msg.frame);
                return Flow::End(super::CLIENT_TERMINATED.into());
            }
            FrontendMessage::CopyData(_)
            | FrontendMessage::CopyDone
            | FrontendMessage::CopyFail { .. } => {
                to_server.extend_from_slice(&msg.frame);
            }
            FrontendMessage::PasswordLike(_) => {
                return self.fatal(
                    PgError::Protocol("a password message after authentication".into()),
                    to_client,
                )
            }
        }
        Flow::Continue
    }

    pub(super) fn on_query(&mut self, msg: &RawMessage, sql: &str, to_server: &mut BytesMut) {
        let parsed = match self.services.classifier.classify(sql) {
            Ok(p) => p,
            Err(_) if self.ctx.replication && replication_command(sql).is_some() => {
                let command = replication_command(sql).unwrap_or_default();
                let info = StatementInfo {
                    class: Some("admin"),
                    command: Some(command.into()),
                    ..unparsed(sql.trim())
                };
                let set = Arc::clone(&self.policies);
                match self.decide(&set, &info) {
                    Ok(verdict) => {
                        let mut statements = VecDeque::new();
                        statements.push_back(Running {
                            info: Arc::new(info),
                            parameters: Arc::from(Vec::new()),
                            verdict,
                            plan: None,
                            copy_columns: None,
                            started: self.now.monotonic,
                        });
                        self.expect_ready(Expect::Query(Box::new(SimpleQuery {
                            statements,
                            failed: false,
                        })));
                        to_server.extend_from_slice(&msg.frame);
                    }
                    Err((e, decision, ids)) => {
                        self.record_denied(&info, decision, &ids, &e.to_string(), e.sqlstate());
                        self.inject_denied_query(e, to_server);
                    }
                }
                return;
            }
            Err(e) => {
                let (e, decision) = refusal(e);
                self.record_denied(&unparsed(sql), decision, &[], &e.to_string(), e.sqlstate());
                self.inject_denied_query(e, to_server);
                return;
            }
        };
        let set = Arc::clone(&self.policies);
        let mut running = VecDeque::with_capacity(parsed.len());
        for statement in parsed.iter() {
            let info = StatementInfo::from_parsed(statement);
            match self.decide(&set, &info) {
                Ok(verdict) => running.push_back(Running {
                    info: Arc::new(info),
                    parameters: Arc::from(Vec::new()),
                    verdict,
                    plan: None,
                    copy_columns: None,
                    started: self.now.monotonic,
                }),
                // The whole string waits, unsent, for an approval of its exact text; it is
                // handled again with the answer (`Session::approval_answer`).
                Err((
                    PgError::ApprovalRequired {
                        reason,
                        policy_ids,
                        requirement,
                    },
                    _,
                    _,
                )) if self.approval.is_none() => {
                    self.out.approval = Some(ApprovalAsk {
                        statement: sql.to_owned(),
                        parameters: Vec::new(),
                        requirement,
                        policy_ids,
                        reason,
                    });
                    self.paused = Some(Paused::Approval { msg: msg.clone() });
                    return;
                }
                Err((e, decision, ids)) => {
                    // One denied statement refuses the whole string: PostgreSQL runs it as
                    // one implicit transaction, so nothing of it may run.
                    self.record_denied(&info, decision, &ids, &e.to_string(), e.sqlstate());
                    for other in parsed.iter().filter(|o| !std::ptr::eq(*o, statement)) {
                        self.record_denied(
                            &StatementInfo::from_parsed(other),
                            Decision::NotRun,
                            &[],
                            "another statement of the same query string was denied",
                            sqlstate::INSUFFICIENT_PRIVILEGE,
                        );
                    }
                    self.inject_denied_query(e, to_server);
                    return;
                }
            }
        }
        for r in running.iter().filter(|r| r.info.named.is_some()) {
            let info = Arc::clone(&r.info);
            self.remember_named(&info);
        }
        // A COPY of a table whose rows are masked by column (or in binary, where even content
        // detectors need each value's type) needs its columns in output order: the agent asks
        // the server first, in this session (same search_path, same transaction), and keeps
        // the answer to itself.
        for (statement, r) in running.iter().enumerate() {
            if let Some((sql, wanted)) = copy_columns_query(r) {
                encode_frontend(&FrontendMessage::Query { sql }, to_server);
                self.expect
                    .push_back(Expect::ColumnLookup(Box::new(ColumnLookup {
                        statement,
                        wanted,
                        rows: Vec::new(),
                        error: None,
                    })));
            }
        }
        self.expect_ready(Expect::Query(Box::new(SimpleQuery {
            statements: running,
            failed: false,
        })));
        to_server.extend_from_slice(&msg.frame);
    }

    pub(super) fn inject_denied_query(&mut self, e: PgError, to_server: &mut BytesMut) {
        encode_frontend(
            &FrontendMessage::Query {
                sql: DENIED_MARKER.to_string(),
            },
            to_server,
        );
        self.expect.push_back(Expect::Denied(Box::new(e)));
        self.expect_ready(Expect::Sync);
    }

    pub(super) fn on_parse(
        &mut self,
        msg: &RawMessage,
        name: String,
        sql: String,
        to_server: &mut BytesMut,
    ) {
        if !name.is_empty() && self.prepared.contains(&name) {
            // The server refuses to redefine a named statement that was not closed, and keeps
            // the one it has: the agent must not take the new text for it, or a Bind would be
            // decided and recorded for a statement other than the one that runs.
            let e = PgError::NameRefused {
                sqlstate: sqlstate::DUPLICATE_PREPARED_STATEMENT,
                message: format!(
                    "Parse of statement {name:?}, which already exists in this session, is refused (close it first)"
                ),
            };
            self.record_denied(
                &unparsed(&sql),
                Decision::Error,
                &[],
                &e.to_string(),
                e.sqlstate(),
            );
            self.send_failing_parse(&name, e, to_server);
            return;
        }
        if !self.prepared.has_room_for(&name) {
            let e = PgError::Limit(format!(
                "Parse refused: this session keeps {} prepared statements ({} bytes), the most the agent keeps for one session (close some first)",
                self.prepared.named.len(),
                self.prepared.bytes
            ));
            self.record_denied(
                &unparsed(&sql),
                Decision::Error,
                &[],
                &e.to_string(),
                e.sqlstate(),
            );
            self.send_failing_parse(&name, e, to_server);
            return;
        }
        let parsed = match self.services.classifier.classify(&sql) {
            Ok(p) => p,
            Err(e) => {
                let (e, decision) = refusal(e);
                self.record_denied(&unparsed(&sql), decision, &[], &e.to_string(), e.sqlstate());
                self.inject_denied_parse(&name, e, to_server);
                return;
            }
        };
        let set = Arc::clone(&self.policies);
        let statements: Vec<StatementInfo> =
            parsed.iter().map(StatementInfo::from_parsed).collect();
        let mut policy_ids: Vec<String> = Vec::new();
        let mut masker = None;
        for info in &statements {
            match self.decide(&set, info) {
                Ok(v) => {
                    policy_ids.extend(v.policy_ids.iter().cloned());
                    if v.masker.is_some() {
                        masker = v.masker;
                    }
                }
                // Parse runs nothing: the statement is prepared, and each Bind of it waits
                // for an approval of its text with that Bind's parameters (`on_bind`).
                Err((PgError::ApprovalRequired { .. }, _, ids)) => policy_ids.extend(ids),
                Err((e, decision, ids)) => {
                    self.record_denied(info, decision, &ids, &e.to_string(), e.sqlstate());
                    self.inject_denied_parse(&name, e, to_server);
                    return;
                }
            }
        }
        policy_ids.sort();
        policy_ids.dedup();
        for info in &statements {
            self.remember_named(info);
        }
        let whole = Arc::new(StatementInfo {
            text: sql.into(),
            ..statements.first().cloned().unwrap_or_else(|| unparsed(""))
        });
        if !self.named_sources.is_empty() {
            self.named_sources.remove(&(false, name.clone()));
        }
        self.prepared.insert(
            name,
            Arc::new(Prepared {
                whole,
                statements,
                verdict: Verdict {
                    policy_ids: Arc::from(policy_ids),
                    masker,
                },
            }),
        );
        self.expect.push_back(Expect::ParseComplete);
        to_server.extend_from_slice(&msg.frame);
    }

    pub(super) fn inject_denied_parse(&mut self, name: &str, e: PgError, to_server: &mut BytesMut) {
        self.prepared.remove(name);
        self.send_failing_parse(name, e, to_server);
    }

    /// A Parse that fails in the server's parser in place of the client's, under the client's
    /// statement name, so the server's state of that name is what a real failed Parse leaves:
    /// undefined if it was, the statement it had if it had one.
    pub(super) fn send_failing_parse(&mut self, name: &str, e: PgError, to_server: &mut BytesMut) {
        encode_frontend(
            &FrontendMessage::Parse {
                statement: name.to_string(),
                sql: DENIED_MARKER.to_string(),
                param_types: Vec::new(),
            },
            to_server,
        );
        self.expect.push_back(Expect::Denied(Box::new(e)));
        self.skip_to_sync = true;
    }

    /// A Bind of a statement that does not exist in place of the client's: the server fails
    /// it and skips to Sync, leaving the portal's name as it was; its error is replaced by
    /// `e`.
    pub(super) fn send_failing_bind(
        &mut self,
        portal: String,
        e: PgError,
        to_server: &mut BytesMut,
    ) {
        encode_frontend(
            &FrontendMessage::Bind {
                portal,
                statement: DENIED_MARKER.to_string(),
                param_formats: Vec::new(),
                params: Vec::new(),
                result_formats: Vec::new(),
            },
            to_server,
        );
        self.expect.push_back(Expect::Denied(Box::new(e)));
        self.skip_to_sync = true;
    }

    #[allow(clippy::too_many_arguments, reason = "the fields of one Bind message")]
    pub(super) fn on_bind(
        &mut self,
        msg: &RawMessage,
        portal: String,
        statement: &str,
        param_formats: &[i16],
        params: &[Option<Bytes>],
        to_server: &mut BytesMut,
    ) {
        if !portal.is_empty() && self.portals.get(&portal).is_some() {
            // The server refuses a second portal of a name and keeps the first: the agent
            // must not take the new statement for it. Bound behind a Sync not answered yet,
            // the first may be gone or not (a transaction block, where a savepoint can make
            // it usable again after the refusal): the agent cannot tell, so it refuses too.
            let message = if self.portals.certainly_live(&portal) {
                format!("Bind of portal {portal:?}, which already exists in this session, is refused (close it first)")
            } else {
                format!("Bind of portal {portal:?}, which may still exist until the server answers the Sync before it, is refused (wait for the answer, or close it first)")
            };
            let e = PgError::NameRefused {
                sqlstate: sqlstate::DUPLICATE_CURSOR,
                message,
            };
            let info = unparsed(&format!("-- Bind of portal {portal:?}"));
            self.record_denied(&info, Decision::Error, &[], &e.to_string(), e.sqlstate());
            self.send_failing_bind(portal, e, to_server);
            return;
        }
        if !self.portals.has_room_for(&portal) {
            let e = PgError::Limit(format!(
                "Bind refused: this session keeps {} portals ({} bytes), the most the agent keeps for one session (close some or end the transaction first)",
                self.portals.live.len(),
                self.portals.bytes
            ));
            let info = unparsed(&format!("-- Bind of portal {portal:?}"));
            self.record_denied(&info, Decision::Error, &[], &e.to_string(), e.sqlstate());
            self.send_failing_bind(portal, e, to_server);
            return;
        }
        let Some(prepared) = self.prepared.get(statement).cloned() else {
            // A statement this session did not Parse: one made with SQL PREPARE (the two
            // share the server's names), or none at all. Its portal would run without the
            // decision and masking of its query: refused whatever the policy, as the server
            // refuses a statement that does not exist. EXECUTE runs a PREPAREd statement,
            // checked and masked.
            let e = PgError::NameRefused {
                sqlstate: sqlstate::INVALID_SQL_STATEMENT_NAME,
                message: format!(
                    "Bind of statement {statement:?}, which this session did not create with Parse, is refused (run a PREPAREd statement with EXECUTE)"
                ),
            };
            let info = unparsed(&format!("-- Bind of statement {statement:?}"));
            self.record_denied(&info, Decision::Error, &[], &e.to_string(), e.sqlstate());
            self.send_failing_bind(portal, e, to_server);
            return;
        };
        // Policies may have changed since Parse (a reload, the hour): decide again.
        let set = Arc::clone(&self.policies);
        let mut verdict = prepared.verdict.clone();
        let mut approvals: Vec<String> = Vec::new();
        for info in &prepared.statements {
            match self.decide(&set, info) {
                Ok(v) => {
                    if v.masker.is_some() {
                        verdict.masker = v.masker;
                    }
                    approvals.extend(
                        v.policy_ids
                            .iter()
                            .filter(|id| id.starts_with("approval:"))
                            .cloned(),
                    );
                }
                // The Bind waits, unsent, for an approval of the statement's text with these
                // parameters; handled again with the answer (`Session::approval_answer`), it
                // binds exactly these bytes, or is refused with 42501 up to the Sync.
                Err((
                    PgError::ApprovalRequired {
                        reason,
                        policy_ids,
                        requirement,
                    },
                    _,
                    _,
                )) if self.approval.is_none() => {
                    self.out.approval = Some(ApprovalAsk {
                        statement: prepared.whole.text.to_string(),
                        parameters: audit_parameters(params, param_formats, None).to_vec(),
                        requirement,
                        policy_ids,
                        reason,
                    });
                    self.paused = Some(Paused::Approval { msg: msg.clone() });
                    return;
                }
                Err((e, decision, ids)) => {
                    self.record_denied(info, decision, &ids, &e.to_string(), e.sqlstate());
                    self.send_failing_bind(portal, e, to_server);
                    return;
                }
            }
        }
        if !approvals.is_empty() {
            approvals.sort();
            approvals.dedup();
            let mut ids = verdict.policy_ids.to_vec();
            ids.extend(approvals);
            verdict.policy_ids = Arc::from(ids);
        }
        let masker = verdict.masker.as_ref().map(|(_, m)| Arc::clone(m));
        let parameters = audit_parameters(params, param_formats, masker.as_deref());
        if !self.named_sources.is_empty() {
            self.named_sources.remove(&(true, portal.clone()));
        }
        let portal_record = Portal {
            prepared,
            verdict,
            parameters,
        };
        let cost = portal_record.kept_bytes();
        self.portals.bind(portal, portal_record, cost);
        self.expect.push_back(Expect::BindComplete);
        to_server.extend_from_slice(&msg.frame);
    }

    pub(super) fn on_execute(&mut self, msg: &RawMessage, portal: &str, to_server: &mut BytesMut) {
        let Some(p) = self.portals.get(portal) else {
            // A portal this session did not bind: a SQL cursor (DECLARE makes a portal of
            // that name, and Execute runs it as FETCH would), or none at all. Its rows would
            // pass without the masking its query was decided with, and the audit trail would
            // not know its statement: refused whatever the policy, as the server refuses a
            // portal that does not exist. FETCH reads a cursor, checked and masked.
            let e = PgError::NameRefused {
                sqlstate: sqlstate::INVALID_CURSOR_NAME,
                message: format!(
                    "Execute of portal {portal:?}, which this session did not create with Bind, is refused (read a cursor with FETCH)"
                ),
            };
            let info = unparsed(&format!("-- Execute of portal {portal:?}"));
            self.record_denied(&info, Decision::Error, &[], &e.to_string(), e.sqlstate());
            encode_frontend(
                &FrontendMessage::Execute {
                    portal: DENIED_MARKER.to_string(),
                    max_rows: 0,
                },
                to_server,
            );
            self.expect.push_back(Expect::Denied(Box::new(e)));
            self.skip_to_sync = true;
            return;
        };
        let running = Running {
            info: Arc::clone(&p.prepared.whole),
            parameters: Arc::clone(&p.parameters),
            verdict: p.verdict.clone(),
            plan: None,
            copy_columns: None,
            started: self.now.monotonic,
        };
        if running.verdict.masker.is_some() {
            // The agent must know the result columns before the first row: its own
            // Describe of the portal, answered to the agent only.
            encode_frontend(
                &FrontendMessage::Describe {
                    target: portcullis_pgwire::DescribeTarget::Portal,
                    name: portal.to_string(),
                },
                to_server,
            );
            self.expect.push_back(Expect::InternalDescribe);
        }
        self.expect.push_back(Expect::Execute(Box::new(running)));
        to_server.extend_from_slice(&msg.frame);
    }

    pub(super) fn on_function_call(
        &mut self,
        msg: &RawMessage,
        call: &FunctionCall<'_>,
        to_server: &mut BytesMut,
    ) {
        let oid = call.oid;
        // The fast-path function call runs a function by OID, bypassing SQL: decided as a
        // `call` statement naming the function by its names from the catalog (as SQL would
        // name it, bare and schema-qualified) and by its OID. Without its names a policy
        // that forbids the function by name could not apply: refused.
        let Some(names) =
            self.services
                .catalog
                .function_names(self.ctx.target_id, &self.ctx.db_name, oid)
        else {
            let why = self
                .function_lookup_error
                .clone()
                .unwrap_or_else(|| "not looked up".into());
            let info = unparsed(&format!("-- function call by OID {oid}"));
            let e = PgError::StatementDenied {
                reason: format!(
                    "the name of the function with OID {oid} could not be read from the catalog ({why}), so no policy can be applied to it"
                ),
                policy_ids: Vec::new(),
            };
            self.record_denied(&info, Decision::Deny, &[], &e.to_string(), e.sqlstate());
            self.inject_denied_query(e, to_server);
            return;
        };
        let functions: Vec<String> = names
            .iter()
            .cloned()
            .chain(std::iter::once(format!("oid:{oid}")))
            .collect();
        let text = match names.first() {
            Some(name) => format!("-- function call by OID {oid} ({name})"),
            None => format!("-- function call by OID {oid}"),
        };
        let info = StatementInfo {
            class: Some("call"),
            command: Some("FUNCTION CALL".into()),
            functions: functions.into(),
            ..unparsed(&text)
        };
        let set = Arc::clone(&self.policies);
        let decided = self.decide(&set, &info).and_then(|verdict| {
            fast_path_sql_text(&verdict, &names, call)
                .map(|()| verdict)
                .map_err(|(e, ids)| (e, Decision::Deny, ids))
        });
        match decided {
            Ok(verdict) => {
                let (profile, masker) = match verdict.masker {
                    Some((profile, masker)) => (Some(profile), Some(masker)),
                    None => (None, None),
                };
                // Its arguments are recorded as a Bind's parameters are.
                let arguments = audit_parameters(call.args, call.arg_formats, masker.as_deref());
                self.record_statement(
                    &info,
                    &arguments,
                    profile,
                    Decision::Allow,
                    &verdict.policy_ids,
                    None,
                    Some("FUNCTION CALL".into()),
                    None,
                    None,
                );
                // Its result is a computed value like any function's in SQL: the content
                // detectors of the verdict's profile apply to it.
                if let Some(m) = &masker {
                    self.session_masker = Some(Arc::clone(m));
                }
                self.expect_ready(Expect::FunctionCall {
                    masker,
                    format: call.result_format,
                });
                to_server.extend_from_slice(&msg.frame);
            }
            Err((e, decision, ids)) => {
                self.record_denied(&info, decision, &ids, &e.to_string(), e.sqlstate());
                self.inject_denied_query(e, to_server);
            }
        }
    }
}
