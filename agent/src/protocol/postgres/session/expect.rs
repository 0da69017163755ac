use super::*;

/// A statement the server is executing, until its completion.
pub(super) struct Running {
    pub(super) info: Arc<StatementInfo>,
    pub(super) parameters: Arc<[Option<String>]>,
    pub(super) verdict: Verdict,
    /// How each result column is masked; `None` until a RowDescription (or our own
    /// Describe) says what the columns are.
    pub(super) plan: Option<RowPlan>,
    /// For a `COPY table TO STDOUT` masked by column: the columns it sends, as the agent's own
    /// catalog query in the session found them (an error says why not).
    pub(super) copy_columns: Option<Result<Vec<CopyColumn>, String>>,
    pub(super) started: Instant,
}

/// One column a `COPY table TO STDOUT` sends.
pub(super) struct CopyColumn {
    pub(super) name: String,
    /// `schema.table.column`, as table-column masking rules name it.
    pub(super) qualified: String,
    pub(super) type_oid: u32,
}

/// The agent's own catalog query, sent on the session before a simple-query COPY whose rows
/// it must mask by column: its answer never reaches the client.
pub(super) struct ColumnLookup {
    /// Which statement of the query string that follows it is for.
    pub(super) statement: usize,
    /// The COPY's column list; empty for all columns in table order.
    pub(super) wanted: Vec<String>,
    pub(super) rows: Vec<CopyColumn>,
    pub(super) error: Option<String>,
}

pub(super) struct SimpleQuery {
    pub(super) statements: VecDeque<Running>,
    pub(super) failed: bool,
}

/// A reply the session still expects from the server.
pub(super) enum Expect {
    ParseComplete,
    BindComplete,
    CloseComplete,
    /// The client's own Describe: its answer goes to the client.
    Describe,
    /// The agent's Describe of a portal about to run with masking: answer kept, not sent.
    InternalDescribe,
    /// The agent's own catalog query before a masked COPY: every reply kept, not sent.
    ColumnLookup(Box<ColumnLookup>),
    Execute(Box<Running>),
    /// ReadyForQuery after Sync, or after a denied simple Query / FunctionCall.
    Sync,
    Query(Box<SimpleQuery>),
    /// A fast-path function call: its result is masked with the masker of the verdict that
    /// allowed it, in the result format the call asked for.
    FunctionCall {
        masker: Option<Arc<Masker>>,
        format: i16,
    },
    /// The failing message sent in place of a denied one; its error is replaced by this.
    Denied(Box<PgError>),
}

impl<'a> Session<'a> {
    /// Expects the reply to a message the server ends with ReadyForQuery.
    pub(super) fn expect_ready(&mut self, e: Expect) {
        self.portals.ready_sent();
        self.expect.push_back(e);
    }

    pub(super) fn unexpected(&self, what: &str, front: Option<Expect>) {
        let front = match front {
            None => "nothing",
            Some(Expect::ParseComplete) => "ParseComplete",
            Some(Expect::BindComplete) => "BindComplete",
            Some(Expect::CloseComplete) => "CloseComplete",
            Some(Expect::Describe | Expect::InternalDescribe) => "a Describe answer",
            Some(Expect::ColumnLookup(_)) => "the column lookup",
            Some(Expect::Execute(_)) => "Execute results",
            Some(Expect::Sync) => "ReadyForQuery",
            Some(Expect::Query(_)) => "Query results",
            Some(Expect::FunctionCall { .. }) => "a function result",
            Some(Expect::Denied(_)) => "a denial",
        };
        tracing::warn!(
            what,
            expected = front,
            "the server's reply does not match the agent's queue"
        );
    }

    pub(super) fn pop_simple(&mut self, kind: Expect, msg: &RawMessage, to_client: &mut BytesMut) {
        let matches = matches!(
            (&kind, self.expect.front()),
            (Expect::ParseComplete, Some(Expect::ParseComplete))
                | (Expect::BindComplete, Some(Expect::BindComplete))
                | (Expect::CloseComplete, Some(Expect::CloseComplete))
        );
        if matches {
            self.expect.pop_front();
        } else {
            let front = self.expect.pop_front();
            self.unexpected("a completion", front);
        }
        to_client.extend_from_slice(&msg.frame);
    }

    /// The masker of the statement whose results are arriving.
    pub(super) fn current_masker(&self) -> Option<Arc<Masker>> {
        match self.expect.front() {
            Some(Expect::Execute(r)) => r.verdict.masker.as_ref().map(|(_, m)| Arc::clone(m)),
            Some(Expect::Query(q)) => q
                .statements
                .front()
                .and_then(|r| r.verdict.masker.as_ref().map(|(_, m)| Arc::clone(m))),
            _ => self.session_masker.clone(),
        }
    }

    pub(super) fn current_running(&mut self) -> Option<&mut Running> {
        match self.expect.front_mut() {
            Some(Expect::Execute(r)) => Some(r),
            Some(Expect::Query(q)) => q.statements.front_mut(),
            _ => None,
        }
    }

    /// After an error the server skips everything up to Sync; so do the expected replies.
    pub(super) fn drop_until_sync(&mut self) {
        while let Some(front) = self.expect.front() {
            match front {
                Expect::Sync | Expect::Query(_) | Expect::FunctionCall { .. } => break,
                Expect::Execute(_) => {
                    if let Some(Expect::Execute(r)) = self.expect.pop_front() {
                        self.record_statement(
                            &r.info,
                            &r.parameters,
                            None,
                            Decision::NotRun,
                            &r.verdict.policy_ids,
                            None,
                            None,
                            None,
                            None,
                        );
                    }
                }
                _ => {
                    self.expect.pop_front();
                }
            }
        }
    }
}
