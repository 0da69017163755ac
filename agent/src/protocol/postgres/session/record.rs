use super::*;

/// The values of a Bind or a function call as the audit trail shows them; `formats` as the
/// protocol gives them (none: all text, one: for all, else one per value).
pub(super) fn audit_parameters(
    values: &[Option<Bytes>],
    formats: &[i16],
    masker: Option<&Masker>,
) -> Arc<[Option<String>]> {
    values
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.as_ref().map(|v| {
                let format = match formats {
                    [] => 0,
                    [one] => *one,
                    many => many.get(i).copied().unwrap_or(0),
                };
                audit_parameter(v, format, masker)
            })
        })
        .collect()
}

/// A bound parameter as the audit trail shows it: text as text (content detectors of the
/// session's profile applied), binary as hex.
pub(super) fn audit_parameter(value: &[u8], format: i16, masker: Option<&Masker>) -> String {
    const MAX: usize = 4096;
    if format == 0 {
        if let Ok(text) = std::str::from_utf8(value) {
            let text = masker
                .and_then(|m| m.mask_text(text))
                .unwrap_or_else(|| text.to_string());
            return truncate(text, MAX);
        }
    }
    if masker.is_some() {
        return "[binary value withheld: masking is active]".into();
    }
    let mut s = String::from("\\x");
    s.push_str(&hex::encode(value.get(..MAX / 2).unwrap_or(value)));
    s
}

impl<'a> Session<'a> {
    /// One `statement.executed` event for each statement of a DO block that ran, before the
    /// block's own: what the trail says ran is what policy was asked about. The server does
    /// not report which of them the block reached (a branch not taken, an exception), so each
    /// says so and carries the block's SQLSTATE.
    pub(super) fn record_inner(
        &mut self,
        block: &StatementInfo,
        policy_ids: &Arc<[String]>,
        sqlstate: Option<&str>,
    ) {
        for statement in block.inner.iter() {
            let info = StatementInfo::from_parsed(statement);
            let mut ev = self.statement_event(EventKind::StatementExecuted, &info, &Arc::from([]));
            ev.decision = Some(Decision::Allow);
            ev.policy_ids = Arc::clone(policy_ids);
            ev.reason = Some(format!(
                "inside the DO block `{}`, decided with it; ran if the block reached it",
                truncate(block.text.to_string(), 200)
            ));
            if let Some(s) = ev.statement.as_mut() {
                s.sqlstate = sqlstate.map(str::to_string);
            }
            self.out.events.push(Recorded::Event(Box::new(ev)));
        }
    }

    /// Statements the server never finished because the session ended.
    pub(super) fn abandon_running(&mut self, why: &str) {
        while let Some(e) = self.expect.pop_front() {
            let running: Vec<Running> = match e {
                Expect::Execute(r) => vec![*r],
                Expect::Query(q) => q.statements.into_iter().collect(),
                _ => Vec::new(),
            };
            for r in running {
                let mut ev =
                    self.statement_event(EventKind::StatementExecuted, &r.info, &r.parameters);
                ev.decision = Some(Decision::Allow);
                ev.policy_ids = Arc::clone(&r.verdict.policy_ids);
                ev.reason = Some(format!("unfinished: {why}"));
                self.out.events.push(Recorded::Event(Box::new(ev)));
            }
        }
    }

    pub(super) fn statement_event(
        &self,
        kind: EventKind,
        info: &StatementInfo,
        parameters: &Arc<[Option<String>]>,
    ) -> AuditEvent {
        let c = &self.ctx;
        let mut ev = AuditEvent::new(kind);
        ev.connection_id = Some(c.connection_id);
        ev.protocol = Some(Arc::clone(&c.protocol));
        ev.target = Some(Arc::clone(&c.target_name));
        ev.identity = Some(Arc::clone(&c.identity));
        ev.origin = Some(Arc::clone(&c.origin));
        ev.client = Some(Arc::clone(&c.client_addr));
        ev.upstream = Some(Arc::clone(&c.upstream_addr));
        ev.db_user = Some(Arc::clone(&c.db_user));
        ev.db_name = Some(Arc::clone(&c.db_name));
        ev.statement = Some(Box::new(StatementFields {
            statement: Arc::clone(&info.text),
            parameters: Arc::clone(parameters),
            statement_class: info.class,
            command: info.command.clone(),
            tables: Arc::clone(&info.tables),
            functions: Arc::clone(&info.functions),
            ..StatementFields::default()
        }));
        ev
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "the fields of one statement event"
    )]
    pub(super) fn record_statement(
        &mut self,
        info: &StatementInfo,
        parameters: &Arc<[Option<String>]>,
        masking_profile: Option<Arc<str>>,
        decision: Decision,
        policy_ids: &Arc<[String]>,
        rows: Option<u64>,
        tag: Option<String>,
        sqlstate: Option<String>,
        duration_us: Option<u64>,
    ) {
        let reason = (decision == Decision::NotRun)
            .then_some("not run: an earlier statement or message failed");
        let statement = || {
            info.encoded.get_or_init(|| {
                StatementEventParts::statement_fields(
                    &info.text,
                    info.class,
                    info.command.as_deref(),
                    &info.tables,
                    &info.functions,
                )
            })
        };
        let encoded = match (&self.event_parts, statement()) {
            (Ok(parts), Ok(statement)) => parts.encode(&StatementRecord {
                kind: EventKind::StatementExecuted,
                time_ms: self.now.unix_ms,
                reason,
                decision,
                policy_ids,
                statement,
                parameters,
                rows,
                command_tag: tag.as_deref(),
                sqlstate: sqlstate.as_deref(),
                duration_us,
                masking_profile: masking_profile.as_deref(),
            }),
            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        };
        match encoded {
            Ok(line) => return self.out.events.push(Recorded::Encoded(line)),
            // Not reachable for strings and numbers; if it were, the event goes the general
            // way, which logs why it cannot be written.
            Err(e) => tracing::error!(error = %e, "cannot write a statement event from its parts"),
        }
        let mut ev = self.statement_event(EventKind::StatementExecuted, info, parameters);
        ev.decision = Some(decision);
        ev.policy_ids = Arc::clone(policy_ids);
        ev.reason = reason.map(Into::into);
        if let Some(s) = ev.statement.as_mut() {
            s.rows = rows;
            s.command_tag = tag;
            s.sqlstate = sqlstate;
            s.duration_us = duration_us;
            s.masking_profile = masking_profile;
        }
        self.out.events.push(Recorded::Event(Box::new(ev)));
    }

    pub(super) fn record_denied(
        &mut self,
        info: &StatementInfo,
        decision: Decision,
        policy_ids: &[String],
        reason: &str,
        sqlstate: &str,
    ) {
        let mut ev = self.statement_event(EventKind::StatementDenied, info, &Arc::from([]));
        ev.decision = Some(decision);
        ev.policy_ids = policy_ids.into();
        ev.reason = Some(reason.to_string());
        if let Some(s) = ev.statement.as_mut() {
            s.sqlstate = Some(sqlstate.to_string());
        }
        tracing::info!(statement = %info.text, %decision, reason, "statement refused");
        self.out.events.push(Recorded::Event(Box::new(ev)));
    }
}
