use super::*;

/// A ParameterStatus saying `standard_conforming_strings` is now off, or `client_encoding` is
/// now one whose characters can hide a quote (SJIS, BIG5, …): changed where the agent cannot
/// see it (a function's body), so the statements that follow would be read other than as
/// checked. The session ends.
pub(super) fn string_syntax_changed(name: &str, value: &str) -> Option<PgError> {
    let read_as = match name {
        "standard_conforming_strings" if value != "on" => "string literals with",
        "client_encoding" if !portcullis_sql::is_ascii_safe_encoding(value) => "statements in",
        _ => return None,
    };
    Some(PgError::Refused(format!(
        "the server now reads {read_as} {name} = {value}; the session is closed because its statements could run other than as checked"
    )))
}

impl<'a> Session<'a> {
    /// A fast-path function's result, masked by the content detectors of the profile its
    /// call was allowed with. Its type is not known here: in text format the detectors mask
    /// what they find; in binary format a value in which they find anything cannot be masked
    /// without corrupting it, so the session ends instead of passing it.
    pub(super) fn on_function_result(
        &mut self,
        msg: &RawMessage,
        value: Option<Bytes>,
        to_client: &mut BytesMut,
    ) -> Flow {
        let (masker, format) = match self.expect.front() {
            Some(Expect::FunctionCall {
                masker: Some(m),
                format,
            }) => (Arc::clone(m), *format),
            _ => {
                to_client.extend_from_slice(&msg.frame);
                return Flow::Continue;
            }
        };
        let Some(value) = value else {
            to_client.extend_from_slice(&msg.frame);
            return Flow::Continue;
        };
        const UNKNOWN_TYPE: u32 = 0;
        match masker.mask_value(&ColumnPlan::ContentOnly, format, UNKNOWN_TYPE, &value) {
            Ok(None) => to_client.extend_from_slice(&msg.frame),
            Ok(Some(masked)) => portcullis_pgwire::encode_backend(
                &BackendMessage::FunctionCallResponse(Some(masked.into())),
                to_client,
            ),
            Err(e) => {
                return self.fatal(
                    PgError::Unmaskable(format!(
                        "the function call's result cannot be masked ({e}); the session is closed so no unmasked value leaves"
                    )),
                    to_client,
                )
            }
        }
        Flow::Continue
    }

    pub(super) fn on_server_message(&mut self, msg: RawMessage, to_client: &mut BytesMut) -> Flow {
        if let Some(Expect::ColumnLookup(_)) = self.expect.front() {
            return self.on_lookup_message(msg, to_client);
        }
        match msg.tag {
            // Rows: the hot path. Unmasked rows are forwarded as they came.
            b'D' => return self.on_data_row(msg, to_client),
            b'd' if self.copy_out.is_some() => return self.on_copy_out_data(msg, to_client),
            b'd' | b'c' => {
                if msg.tag == b'c' {
                    self.copy_out = None;
                }
                to_client.extend_from_slice(&msg.frame);
                return Flow::Continue;
            }
            _ => {}
        }
        let parsed = match parse_backend(&msg) {
            Ok(m) => m,
            Err(e) => {
                return self.fatal(
                    PgError::Protocol(format!("from the server: {e}")),
                    to_client,
                )
            }
        };
        match parsed {
            BackendMessage::ReadyForQuery { status } => {
                self.txn = status;
                if status == TransactionStatus::Idle {
                    self.read_selected_in_transaction = None;
                }
                match self.expect.pop_front() {
                    Some(Expect::Sync | Expect::Query(_) | Expect::FunctionCall { .. }) => self
                        .portals
                        .ready_received(status == TransactionStatus::Idle),
                    other => self.unexpected("ReadyForQuery", other),
                }
                // Out of any transaction with nothing decided still to run: a change to a
                // function is committed (or gone), and everybody reads bodies afresh.
                if self.routines_changed
                    && status == TransactionStatus::Idle
                    && self.expect.is_empty()
                {
                    self.routines_changed = false;
                    self.out.forget_routines = true;
                }
                to_client.extend_from_slice(&msg.frame);
            }
            BackendMessage::ParseComplete => {
                self.pop_simple(Expect::ParseComplete, &msg, to_client)
            }
            BackendMessage::BindComplete => self.pop_simple(Expect::BindComplete, &msg, to_client),
            BackendMessage::CloseComplete => {
                self.pop_simple(Expect::CloseComplete, &msg, to_client)
            }
            BackendMessage::ParameterDescription(_) => to_client.extend_from_slice(&msg.frame),
            BackendMessage::RowDescription(fields) => {
                return self.on_row_description(&msg, &fields, to_client)
            }
            BackendMessage::NoData => match self.expect.front() {
                Some(Expect::InternalDescribe) => {
                    self.expect.pop_front();
                    if let Some(Expect::Execute(r)) = self.expect.front_mut() {
                        r.plan = Some(RowPlan {
                            columns: Vec::new(),
                            nulled: Vec::new(),
                            masks_anything: false,
                        });
                    }
                }
                _ => {
                    if matches!(self.expect.front(), Some(Expect::Describe)) {
                        self.expect.pop_front();
                    }
                    to_client.extend_from_slice(&msg.frame);
                }
            },
            BackendMessage::CommandComplete { tag } => {
                self.on_complete(Some(tag), None);
                to_client.extend_from_slice(&msg.frame);
            }
            BackendMessage::EmptyQueryResponse => {
                self.on_complete(None, None);
                to_client.extend_from_slice(&msg.frame);
            }
            BackendMessage::PortalSuspended => {
                self.on_complete(Some("(portal suspended)".into()), None);
                to_client.extend_from_slice(&msg.frame);
            }
            BackendMessage::ErrorResponse(fields) => return self.on_error(fields, to_client),
            BackendMessage::NoticeResponse(fields) => match self.screen_error(&fields, true) {
                Some(masked) => portcullis_pgwire::encode_notice_response(&masked, to_client),
                None => to_client.extend_from_slice(&msg.frame),
            },
            BackendMessage::NotificationResponse {
                process_id,
                channel,
                payload,
            } => match self.screen_notification(&payload) {
                Some(masked) => portcullis_pgwire::encode_backend(
                    &BackendMessage::NotificationResponse {
                        process_id,
                        channel,
                        payload: masked,
                    },
                    to_client,
                ),
                None => to_client.extend_from_slice(&msg.frame),
            },
            BackendMessage::CopyOutResponse(ref r) | BackendMessage::CopyBothResponse(ref r) => {
                if let Some(m) = self.current_masker() {
                    match self.copy_mask(m, r) {
                        Ok(mask) => self.copy_out = Some(mask),
                        Err(e) => return self.fatal(e, to_client),
                    }
                }
                to_client.extend_from_slice(&msg.frame);
            }
            BackendMessage::CopyInResponse(_) => to_client.extend_from_slice(&msg.frame),
            BackendMessage::FunctionCallResponse(value) => {
                return self.on_function_result(&msg, value, to_client);
            }
            BackendMessage::BackendKeyData { .. } => {
                // The server's key is never the client's business; the client has the agent's.
            }
            BackendMessage::Authentication(_) | BackendMessage::NegotiateProtocolVersion { .. } => {
                return self.fatal(
                    PgError::Protocol(
                        "the server restarted authentication inside a session".into(),
                    ),
                    to_client,
                )
            }
            BackendMessage::ParameterStatus { name, value } => {
                if let Some(e) = string_syntax_changed(&name, &value) {
                    return self.fatal(e, to_client);
                }
                match self.screen_parameter(&name, &value) {
                    Some(value) => portcullis_pgwire::encode_backend(
                        &BackendMessage::ParameterStatus { name, value },
                        to_client,
                    ),
                    None => to_client.extend_from_slice(&msg.frame),
                }
            }
            BackendMessage::DataRow(_) | BackendMessage::CopyData(_) | BackendMessage::CopyDone => {
                to_client.extend_from_slice(&msg.frame);
            }
        }
        Flow::Continue
    }

    /// A reply to the agent's own column lookup: kept, except what the server may send at
    /// any time (notifications, parameter changes), which is the client's.
    pub(super) fn on_lookup_message(&mut self, msg: RawMessage, to_client: &mut BytesMut) -> Flow {
        if msg.tag == b'S' {
            // Checked as anywhere else (standard_conforming_strings).
            let changed = match parse_backend(&msg) {
                Ok(BackendMessage::ParameterStatus { name, value }) => {
                    string_syntax_changed(&name, &value)
                }
                Ok(_) | Err(_) => Some(PgError::Protocol(
                    "from the server: a malformed ParameterStatus".into(),
                )),
            };
            if let Some(e) = changed {
                return self.fatal(e, to_client);
            }
            to_client.extend_from_slice(&msg.frame);
            return Flow::Continue;
        }
        let Some(Expect::ColumnLookup(lookup)) = self.expect.front_mut() else {
            return Flow::Continue;
        };
        match msg.tag {
            b'A' => to_client.extend_from_slice(&msg.frame),
            b'T' | b'C' | b'N' => {}
            b'D' => match parse_backend(&msg) {
                Ok(BackendMessage::DataRow(row)) => {
                    let text = |i: usize| {
                        row.values
                            .get(i)
                            .and_then(|v| v.as_deref())
                            .and_then(|v| std::str::from_utf8(v).ok())
                    };
                    match (text(0), text(1), text(2), text(3), text(4)) {
                        (
                            Some(schema),
                            Some(table),
                            Some(column),
                            Some(type_oid),
                            Some(generated),
                        ) => {
                            // Without a column list COPY leaves generated columns out.
                            if !(lookup.wanted.is_empty() && generated == "t") {
                                lookup.rows.push(CopyColumn {
                                    name: column.to_string(),
                                    qualified: format!("{schema}.{table}.{column}"),
                                    type_oid: type_oid.parse().unwrap_or(0),
                                });
                            }
                        }
                        _ => lookup.error = Some("a malformed catalog row".into()),
                    }
                }
                _ => lookup.error = Some("a malformed catalog row".into()),
            },
            b'E' => {
                let why = match parse_backend(&msg) {
                    Ok(BackendMessage::ErrorResponse(fields)) => {
                        fields.message().unwrap_or("an error").to_string()
                    }
                    _ => "an error".to_string(),
                };
                lookup.error = Some(why);
            }
            b'Z' => {
                let Some(Expect::ColumnLookup(lookup)) = self.expect.pop_front() else {
                    return Flow::Continue;
                };
                let ColumnLookup {
                    statement,
                    wanted,
                    rows,
                    error,
                } = *lookup;
                let result = match error {
                    Some(e) => Err(e),
                    None if rows.is_empty() => Err("the table was not found".to_string()),
                    None if wanted.is_empty() => Ok(rows),
                    None => {
                        let mut rows = rows;
                        wanted
                            .iter()
                            .map(|name| {
                                rows.iter()
                                    .position(|r| &r.name == name)
                                    .map(|i| rows.swap_remove(i))
                                    .ok_or_else(|| format!("column `{name}` was not found"))
                            })
                            .collect()
                    }
                };
                let query = self.expect.iter_mut().find_map(|e| match e {
                    Expect::Query(q) => Some(q),
                    _ => None,
                });
                if let Some(r) = query.and_then(|q| q.statements.get_mut(statement)) {
                    r.copy_columns = Some(result);
                }
            }
            other => {
                return self.fatal(
                    PgError::Protocol(format!(
                        "the server answered the agent's column lookup with message `{}`",
                        char::from(other)
                    )),
                    to_client,
                )
            }
        }
        Flow::Continue
    }

    pub(super) fn on_complete(&mut self, tag: Option<String>, sqlstate: Option<String>) {
        let running = match self.expect.front_mut() {
            Some(Expect::Execute(_)) => match self.expect.pop_front() {
                Some(Expect::Execute(r)) => Some(*r),
                _ => None,
            },
            Some(Expect::Query(q)) => q.statements.pop_front(),
            _ => None,
        };
        if let Some(r) = running {
            self.finish_statement(r, tag, sqlstate);
        }
    }

    pub(super) fn finish_statement(
        &mut self,
        r: Running,
        tag: Option<String>,
        sqlstate: Option<String>,
    ) {
        if let Some((_, m)) = &r.verdict.masker {
            self.session_masker = Some(Arc::clone(m));
            if let Some(profile) = reads_selected_columns(&r) {
                self.read_selected_in_transaction = Some(profile);
            }
        }
        let rows = tag
            .as_deref()
            .and_then(|t| t.rsplit(' ').next())
            .and_then(|n| n.parse().ok());
        let elapsed = self.now.monotonic.saturating_duration_since(r.started);
        let duration = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.record_inner(&r.info, &r.verdict.policy_ids, sqlstate.as_deref());
        self.record_statement(
            &r.info,
            &r.parameters,
            r.verdict.masker.as_ref().map(|(p, _)| Arc::clone(p)),
            Decision::Allow,
            &r.verdict.policy_ids,
            rows,
            tag,
            sqlstate,
            Some(duration),
        );
    }

    pub(super) fn on_error(&mut self, fields: ErrorFields, to_client: &mut BytesMut) -> Flow {
        if let Some(Expect::Denied(_)) = self.expect.front() {
            let Some(Expect::Denied(e)) = self.expect.pop_front() else {
                return Flow::Continue;
            };
            if !fields.message().is_some_and(|m| m.contains(DENIED_MARKER))
                && fields.sqlstate() != Some("26000")
            {
                tracing::warn!(
                    server = fields.message().unwrap_or(""),
                    "the server's answer to a denied statement was not the expected error"
                );
            }
            encode_error_response(&e.to_fields(), to_client);
            self.drop_until_sync();
            return Flow::Continue;
        }
        let code = fields.sqlstate().map(str::to_string);
        if fields.severity() == Some("FATAL") || fields.severity() == Some("PANIC") {
            let masked = self.screen_error(&fields, false);
            let shown = masked.as_ref().unwrap_or(&fields);
            encode_error_response(shown, to_client);
            // The audit trail gets the message as the client saw it, masked.
            return Flow::End(format!(
                "the server ended the session: {}",
                shown.message().unwrap_or("")
            ));
        }
        let masked = self.screen_error(&fields, false);
        encode_error_response(masked.as_ref().unwrap_or(&fields), to_client);
        self.copy_out = None;
        match self.expect.front_mut() {
            Some(Expect::Query(q)) => {
                q.failed = true;
                if let Some(r) = q.statements.pop_front() {
                    let rest: Vec<Running> = q.statements.drain(..).collect();
                    self.finish_statement(r, None, code);
                    for other in rest {
                        self.record_statement(
                            &other.info,
                            &Arc::from([]),
                            None,
                            Decision::NotRun,
                            &other.verdict.policy_ids,
                            None,
                            None,
                            None,
                            None,
                        );
                    }
                }
            }
            Some(Expect::FunctionCall { .. }) => {}
            _ => {
                if let Some(Expect::Execute(_)) = self.expect.front() {
                    if let Some(Expect::Execute(r)) = self.expect.pop_front() {
                        self.finish_statement(*r, None, code);
                    }
                }
                self.drop_until_sync();
            }
        }
        Flow::Continue
    }
}
