use super::*;

/// How the rows of a COPY TO STDOUT in progress are masked.
pub(super) enum CopyMask {
    /// Content detectors over each whole row (text or CSV): no column rules apply.
    Lines(Arc<Masker>),
    /// Value by value, per column.
    Fields {
        masker: Arc<Masker>,
        columns: Vec<(ColumnPlan, u32)>,
        format: CopyRowFormat,
        /// The next payload starts with a header: column names in text and CSV (passed as
        /// they are), the file header in binary.
        header_pending: bool,
    },
}

#[derive(Clone, Copy)]
pub(super) enum CopyRowFormat {
    Text { delimiter: u8 },
    Csv { delimiter: u8, quote: u8 },
    Binary,
}

pub(super) struct RowPlan {
    pub(super) columns: Vec<(ColumnPlan, i16, u32)>,
    /// Computed columns a rule selects whose type cannot carry a mask: sent as NULL.
    pub(super) nulled: Vec<bool>,
    pub(super) masks_anything: bool,
}

/// How each column of a result is masked; `qualify` names the table column a result column
/// is read from, from the catalog cache.
pub(super) fn plan_rows(
    masker: &Masker,
    fields: &[FieldDescription],
    qualify: impl Fn(u32, i16) -> Option<ColumnName>,
    view: impl Fn(u32) -> Option<Option<Arc<portcullis_sql::ResultSources>>>,
    derived: &Derived,
) -> Result<RowPlan, PgError> {
    let mut columns = Vec::with_capacity(fields.len());
    let mut nulled = Vec::with_capacity(fields.len());
    let mut masks_anything = false;
    let column_rules = masker.has_column_rules();
    // A computed value a rule selects, of a type that cannot carry the mask's text.
    let null_if_typed = |plan: &ColumnPlan, type_oid: u32| {
        matches!(plan, ColumnPlan::Whole { .. }) && !Masker::holds_text(type_oid)
    };
    for (i, f) in fields.iter().enumerate() {
        if (f.table_oid == 0 || f.column_attr == 0) && column_rules {
            // Computed by the query, or a whole row (`SELECT c FROM t c`, attribute 0):
            // masked by what it is computed from.
            let plan = match derived {
                Derived::Known(sources) => {
                    plan_from_sources(masker, &f.name, Some(sources), i, Some(fields.len()))
                }
                Derived::Unknown => plan_from_sources(masker, &f.name, None, i, None),
                Derived::NotAQuery => masker.plan_column(&f.name, None),
            };
            masks_anything |= !matches!(plan, ColumnPlan::Untouched);
            nulled.push(null_if_typed(&plan, f.type_oid));
            columns.push((plan, f.format, f.type_oid));
            continue;
        }
        let origin = if masker.needs_column_origins() && f.table_oid != 0 {
            // Resolved before this message was handled; a miss means the catalog did not
            // know the column (dropped meanwhile): refuse rather than guess.
            Some(qualify(f.table_oid, f.column_attr).ok_or_else(|| {
                PgError::Unmaskable(format!(
                    "the table of result column `{}` could not be resolved for masking; the session is closed so no unmasked value leaves",
                    f.name
                ))
            })?)
        } else {
            None
        };
        // By its label and by the column it is read from: an alias does not unmask it.
        let mut plan = masker.plan_column(&f.name, origin.as_ref().map(|o| o.origin()));
        let mut derived_plan = false;
        if !matches!(plan, ColumnPlan::Whole { .. }) && masker.needs_column_origins() {
            // A view's column comes from what its definition computes it from.
            if let Some(sources) = view(f.table_oid) {
                // Attribute numbers of a view's columns start at 1.
                let index = usize::try_from(f.column_attr - 1).unwrap_or(usize::MAX);
                plan = plan_from_sources(masker, &f.name, sources.as_deref(), index, None);
                derived_plan = true;
            }
        }
        if !matches!(plan, ColumnPlan::Whole { .. }) && column_rules {
            // A column a write of this statement stored a value in shows that value under
            // the column's own name (RETURNING, or a query reading a data-modifying WITH).
            if let Derived::Known(sources) = derived {
                let column = origin
                    .as_ref()
                    .map_or(f.name.as_str(), |o| o.column.as_str());
                let stored = sources
                    .assigned
                    .iter()
                    .filter(|a| a.column.as_deref().is_none_or(|c| c == column))
                    .flat_map(|a| a.from.iter())
                    .map(|r| (r.table.as_deref(), r.column.as_deref()));
                let by_stored = masker.plan_derived(&f.name, stored);
                if matches!(by_stored, ColumnPlan::Whole { .. }) {
                    plan = by_stored;
                    derived_plan = true;
                }
            }
        }
        masks_anything |= !matches!(plan, ColumnPlan::Untouched);
        nulled.push(derived_plan && null_if_typed(&plan, f.type_oid));
        columns.push((plan, f.format, f.type_oid));
    }
    Ok(RowPlan {
        columns,
        nulled,
        masks_anything,
    })
}

/// How a value computed from `sources` (column `index` of a result `width` wide; `None`
/// sources: computed from anything) is masked.
pub(super) fn plan_from_sources(
    masker: &Masker,
    name: &str,
    sources: Option<&portcullis_sql::ResultSources>,
    index: usize,
    width: Option<usize>,
) -> ColumnPlan {
    match sources {
        Some(s) => masker.plan_derived(
            name,
            s.of_column(index, width)
                .iter()
                .map(|r| (r.table.as_deref(), r.column.as_deref())),
        ),
        None => masker.plan_derived(name, [(None, None)]),
    }
}

/// The masking profile of a statement, if it has column rules and the statement reads
/// anything one of them could select: a column its parse tree references, else any column of
/// a table it touches (a write without RETURNING), else anything at all (a `DO` block or a
/// procedure, whose bodies the agent does not see).
pub(super) fn reads_selected_columns(r: &Running) -> Option<Arc<str>> {
    let (profile, masker) = r.verdict.masker.as_ref()?;
    if !masker.has_column_rules() {
        return None;
    }
    let plan = match (&r.info.sources, r.info.class) {
        (Some(s), _) => masker.plan_derived(
            "",
            s.all
                .iter()
                .map(|r| (r.table.as_deref(), r.column.as_deref())),
        ),
        (None, Some("do" | "call")) => masker.plan_derived("", [(None, None)]),
        (None, _) => {
            masker.plan_derived("", r.info.tables.iter().map(|t| (Some(t.as_str()), None)))
        }
    };
    matches!(plan, ColumnPlan::Whole { .. }).then(|| Arc::clone(profile))
}

/// What the client gets in place of a value outside the rows that may carry what a column
/// rule selects.
pub(super) fn withheld_value(profile: &str) -> String {
    format!(
        "[withheld by Portcullis: a statement read columns that masking profile {profile} selects]"
    )
}

/// The fields of an error or notice that carry free text, where a value can leave instead of
/// in a row (a cast's error quotes the value it could not read; RAISE puts anything in any of
/// them): message, detail, hint, context, and the internal query.
pub(super) const TEXT_FIELDS: [u8; 5] = [b'M', b'D', b'H', b'W', b'q'];

/// An error or notice with the content detectors applied to its free-text fields; `None` if
/// they found nothing.
pub(super) fn mask_error_text(masker: &Masker, fields: &ErrorFields) -> Option<ErrorFields> {
    let mut out: Option<ErrorFields> = None;
    for code in TEXT_FIELDS {
        let Some(masked) = fields.get(code).and_then(|text| masker.mask_text(text)) else {
            continue;
        };
        out.get_or_insert_with(|| fields.clone()).set(code, masked);
    }
    out
}

/// The agent's catalog query for a simple-query `COPY table TO STDOUT` whose rows it masks by
/// column or in binary, and the COPY's column list; `None` when the statement needs none.
/// The table name goes through `to_regclass`, so it resolves with the session's own
/// search_path, exactly as the COPY will.
pub(super) fn copy_columns_query(r: &Running) -> Option<(String, Vec<String>)> {
    use portcullis_sql::{CopyFormat, CopySource};
    let copy = r.info.copy.as_ref()?;
    let (_, masker) = r.verdict.masker.as_ref()?;
    let CopySource::Table {
        schema,
        table,
        columns,
    } = &copy.source
    else {
        return None;
    };
    if !masker.has_column_rules() && copy.format != CopyFormat::Binary {
        return None;
    }
    let ident = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    let name = match schema {
        Some(schema) => format!("{}.{}", ident(schema), ident(table)),
        None => ident(table),
    };
    let literal = name.replace('\\', "\\\\").replace('\'', "''");
    let sql = format!(
        "SELECT n.nspname, c.relname, a.attname, a.atttypid::pg_catalog.int8, a.attgenerated <> '' \
         FROM pg_catalog.pg_attribute a \
         JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE a.attrelid = pg_catalog.to_regclass(E'{literal}') AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum /* portcullis: columns of a masked COPY */"
    );
    Some((sql, columns.clone()))
}

/// A row's values after masking (`None` is NULL).
pub(super) type MaskedRow = Vec<Option<Vec<u8>>>;

/// Masks one CopyData payload of a COPY masked value by value: `Ok(None)` forwards it
/// unchanged, `Ok(Some)` replaces it, `Err` says why it cannot be sent.
pub(super) fn mask_copy_payload(
    masker: &Masker,
    columns: &[(ColumnPlan, u32)],
    format: CopyRowFormat,
    header: bool,
    body: &[u8],
) -> Result<Option<Vec<u8>>, String> {
    use portcullis_pgwire::BinaryPart;
    let mask = |values: &mut dyn Iterator<Item = Option<&[u8]>>,
                format_code: i16|
     -> Result<(MaskedRow, bool), String> {
        let mut out = Vec::with_capacity(columns.len());
        let mut changed = false;
        let mut count = 0;
        for (i, value) in values.enumerate() {
            count += 1;
            let Some((plan, type_oid)) = columns.get(i) else {
                return Err(format!(
                    "a COPY row has more than the {} columns looked up",
                    columns.len()
                ));
            };
            let masked = match value {
                None => None,
                Some(v) => masker
                    .mask_value(plan, format_code, *type_oid, v)
                    .map_err(|e| format!("COPY column {} cannot be masked ({e})", i + 1))?,
            };
            changed |= masked.is_some();
            out.push(masked.or_else(|| value.map(<[u8]>::to_vec)));
        }
        if count != columns.len() {
            return Err(format!(
                "a COPY row has {count} columns where {} were looked up",
                columns.len()
            ));
        }
        Ok((out, changed))
    };
    match format {
        CopyRowFormat::Text { .. } | CopyRowFormat::Csv { .. } if header => Ok(None),
        CopyRowFormat::Text { delimiter } => {
            let fields = portcullis_pgwire::split_text_row(body, delimiter)
                .map_err(|e| format!("a COPY row does not split: {e}"))?;
            let (values, changed) = mask(&mut fields.iter().map(|f| f.as_deref()), 0)?;
            if !changed {
                return Ok(None);
            }
            let mut out = Vec::with_capacity(body.len());
            portcullis_pgwire::join_text_row(&values, delimiter, &mut out);
            Ok(Some(out))
        }
        CopyRowFormat::Csv { delimiter, quote } => {
            let fields = portcullis_pgwire::split_csv_row(body, delimiter, quote)
                .map_err(|e| format!("a COPY row does not split: {e}"))?;
            let (values, changed) = mask(&mut fields.iter().map(|f| f.as_deref()), 0)?;
            if !changed {
                return Ok(None);
            }
            let mut out = Vec::with_capacity(body.len());
            portcullis_pgwire::join_csv_row(&values, delimiter, quote, &mut out);
            Ok(Some(out))
        }
        CopyRowFormat::Binary => {
            let parts = portcullis_pgwire::split_binary(body, header)
                .map_err(|e| format!("binary COPY data does not split: {e}"))?;
            let mut out = Vec::with_capacity(body.len());
            let mut any = false;
            for part in parts {
                match part {
                    BinaryPart::Header(h) => out.extend_from_slice(h),
                    BinaryPart::Trailer => {
                        out.extend_from_slice(&portcullis_pgwire::BINARY_TRAILER)
                    }
                    BinaryPart::Tuple(values) => {
                        let (values, changed) = mask(&mut values.into_iter(), 1)?;
                        any |= changed;
                        let refs: Vec<Option<&[u8]>> =
                            values.iter().map(|v| v.as_deref()).collect();
                        portcullis_pgwire::join_binary_tuple(&refs, &mut out)
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
            Ok(any.then_some(out))
        }
    }
}

impl<'a> Session<'a> {
    pub(super) fn on_row_description(
        &mut self,
        msg: &RawMessage,
        fields: &[FieldDescription],
        to_client: &mut BytesMut,
    ) -> Flow {
        let internal = matches!(self.expect.front(), Some(Expect::InternalDescribe));
        if internal || matches!(self.expect.front(), Some(Expect::Describe)) {
            self.expect.pop_front();
        }
        // A description reaches a running statement from a simple Query or from a Describe
        // of the portal about to execute (the agent's own when masking): both report the
        // real result formats.
        let (masker, info) = match self.current_running() {
            Some(r) => (
                r.verdict.masker.as_ref().map(|(_, m)| Arc::clone(m)),
                Arc::clone(&r.info),
            ),
            None => {
                if !internal {
                    to_client.extend_from_slice(&msg.frame);
                }
                return Flow::Continue;
            }
        };
        let plan = match masker {
            None => None,
            Some(masker) => {
                let derived = self.derived_sources(&info);
                let catalog = self.services.catalog;
                let (target_id, db) = (self.ctx.target_id, &*self.ctx.db_name);
                let qualify = |oid: u32, attnum: i16| catalog.column(target_id, db, oid, attnum);
                let view = |oid: u32| catalog.view_sources(target_id, db, oid);
                match plan_rows(&masker, fields, qualify, view, &derived) {
                    Ok(p) => Some(p),
                    Err(e) => return self.fatal(e, to_client),
                }
            }
        };
        if let Some(r) = self.current_running() {
            r.plan = plan;
        }
        if !internal {
            to_client.extend_from_slice(&msg.frame);
        }
        Flow::Continue
    }

    pub(super) fn on_data_row(&mut self, msg: RawMessage, to_client: &mut BytesMut) -> Flow {
        let Some(running) = self.current_running() else {
            to_client.extend_from_slice(&msg.frame);
            return Flow::Continue;
        };
        let Some((_, masker)) = &running.verdict.masker else {
            to_client.extend_from_slice(&msg.frame);
            return Flow::Continue;
        };
        let masker = Arc::clone(masker);
        let Some(plan) = &running.plan else {
            // Rows before a description: nothing says which values are selected. Fail closed.
            return self.fatal(
                PgError::Unmaskable("result rows arrived without a row description; the session is closed so no unmasked value leaves".into()),
                to_client,
            );
        };
        if !plan.masks_anything {
            to_client.extend_from_slice(&msg.frame);
            return Flow::Continue;
        }
        let row = match parse_backend(&msg) {
            Ok(BackendMessage::DataRow(row)) => row,
            Ok(_) | Err(_) => {
                return self.fatal(
                    PgError::Protocol("a malformed DataRow from the server".into()),
                    to_client,
                )
            }
        };
        let mut changed: Vec<Option<Vec<u8>>> = Vec::with_capacity(row.values.len());
        let mut any = false;
        for (i, value) in row.values.iter().enumerate() {
            if plan.nulled.get(i).copied().unwrap_or(false) {
                // Marked by an empty replacement, written as NULL below.
                any |= value.is_some();
                changed.push(value.as_ref().map(|_| Vec::new()));
                continue;
            }
            let masked = match (value, plan.columns.get(i)) {
                (Some(v), Some((column, format, type_oid))) => {
                    match masker.mask_value(column, *format, *type_oid, v) {
                        Ok(m) => m,
                        Err(e) => {
                            return self.fatal(
                                PgError::Unmaskable(format!(
                                    "column {} cannot be masked ({e}); the session is closed so no unmasked value leaves",
                                    i + 1
                                )),
                                to_client,
                            )
                        }
                    }
                }
                _ => None,
            };
            any |= masked.is_some();
            changed.push(masked);
        }
        if !any {
            to_client.extend_from_slice(&msg.frame);
            return Flow::Continue;
        }
        let values: Vec<Option<&[u8]>> = row
            .values
            .iter()
            .zip(&changed)
            .enumerate()
            .map(|(i, (orig, new))| match new {
                _ if plan.nulled.get(i).copied().unwrap_or(false) => None,
                Some(n) => Some(n.as_slice()),
                None => orig.as_deref(),
            })
            .collect();
        encode_data_row(&values, to_client);
        Flow::Continue
    }

    /// How the rows of the COPY TO STDOUT that starts now are masked. Content detectors alone
    /// scan text and CSV rows whole; column rules, and binary rows, go value by value with the
    /// columns the agent looked up before the COPY. What cannot be masked ends the session
    /// before a row leaves.
    pub(super) fn copy_mask(
        &mut self,
        masker: Arc<Masker>,
        response: &portcullis_pgwire::CopyResponse,
    ) -> Result<CopyMask, PgError> {
        use portcullis_sql::{CopyFormat, CopySource};
        let binary = response.format != 0;
        if !binary && !masker.has_column_rules() {
            return Ok(CopyMask::Lines(masker));
        }
        let refuse = |why: String| {
            PgError::Unmaskable(format!(
                "{why}; the session is closed so no unmasked value leaves"
            ))
        };
        let running = self.current_running();
        let copy = running.as_ref().and_then(|r| r.info.copy.clone());
        let Some(copy) = copy else {
            return Err(refuse(
                "this COPY output cannot be masked by column or in binary".into(),
            ));
        };
        if copy.source == CopySource::Query {
            return Err(refuse("the rows of COPY (query) TO STDOUT cannot be masked by column or in binary: their columns are not a table's; COPY the table, or SELECT".into()));
        }
        if !copy.unsupported.is_empty() {
            return Err(refuse(format!(
                "COPY option(s) {} cannot be kept when a masked row is written anew; leave them out",
                copy.unsupported.join(", ")
            )));
        }
        let looked_up = running.and_then(|r| r.copy_columns.take());
        let columns = match looked_up {
            Some(Ok(columns)) => columns,
            Some(Err(e)) => {
                return Err(refuse(format!(
                    "the columns of the COPY could not be looked up ({e})"
                )))
            }
            None => return Err(refuse("COPY sent with the extended protocol cannot be masked by column or in binary (the agent looks the columns up before a simple-query COPY, as psql, pg_dump and psycopg send it)".into())),
        };
        if columns.len() != response.column_formats.len() {
            return Err(refuse(format!(
                "the server sends {} columns where the catalog lists {}",
                response.column_formats.len(),
                columns.len()
            )));
        }
        let format = match copy.format {
            CopyFormat::Text => CopyRowFormat::Text {
                delimiter: copy
                    .delimiter
                    .unwrap_or(portcullis_pgwire::copy::TEXT_DEFAULT_DELIMITER),
            },
            CopyFormat::Csv => CopyRowFormat::Csv {
                delimiter: copy
                    .delimiter
                    .unwrap_or(portcullis_pgwire::copy::CSV_DEFAULT_DELIMITER),
                quote: copy
                    .quote
                    .unwrap_or(portcullis_pgwire::copy::CSV_DEFAULT_QUOTE),
            },
            CopyFormat::Binary => CopyRowFormat::Binary,
        };
        if binary != matches!(format, CopyRowFormat::Binary) {
            return Err(refuse(
                "the server's COPY format is not the one the statement asked for".into(),
            ));
        }
        let columns = columns
            .iter()
            .map(|c| {
                let origin = portcullis_policy::ColumnOrigin {
                    qualified: &c.qualified,
                    column: &c.name,
                };
                (masker.plan_column(&c.name, Some(origin)), c.type_oid)
            })
            .collect();
        Ok(CopyMask::Fields {
            masker,
            columns,
            format,
            header_pending: binary || copy.header,
        })
    }

    /// One CopyData of COPY TO output while a mask applies.
    pub(super) fn on_copy_out_data(&mut self, msg: RawMessage, to_client: &mut BytesMut) -> Flow {
        let masked = match &mut self.copy_out {
            None => Ok(None),
            Some(CopyMask::Lines(masker)) => match std::str::from_utf8(msg.body()) {
                Ok(line) => Ok(masker.mask_text(line).map(String::into_bytes)),
                Err(_) => Err("COPY output that is not UTF-8 cannot be masked".to_string()),
            },
            Some(CopyMask::Fields {
                masker,
                columns,
                format,
                header_pending,
            }) => {
                let header = std::mem::take(header_pending);
                mask_copy_payload(masker, columns, *format, header, msg.body())
            }
        };
        match masked {
            Ok(None) => to_client.extend_from_slice(&msg.frame),
            Ok(Some(body)) => portcullis_pgwire::encode_backend(
                &BackendMessage::CopyData(Bytes::from(body)),
                to_client,
            ),
            Err(why) => {
                return self.fatal(
                    PgError::Unmaskable(format!(
                        "{why}; the session is closed so no unmasked value leaves"
                    )),
                    to_client,
                )
            }
        }
        Flow::Continue
    }

    /// What the client is shown of a server error or notice while a masking profile applies;
    /// `None`: as it is. Every error and notice is withheld whole, SQLSTATE kept, when the
    /// statement reads a column a rule of the profile selects, or one before it in the
    /// transaction did: rules select by column, not content, so nothing in the text could be
    /// told apart. No class of SQLSTATE is safe to pass: a failed cast quotes its input (22),
    /// a key its value (23, also at COMMIT for a deferred constraint, from a row an earlier
    /// statement wrote), a name looked up at run time its text (`current_setting(email)`,
    /// `nextval(email)`: 42704, 3F000), and `RAISE ... USING ERRCODE` chooses any SQLSTATE
    /// and puts a value in the message or in the schema, table, column, datatype and
    /// constraint fields. Otherwise the content detectors mask its free-text fields.
    pub(super) fn screen_error(
        &mut self,
        fields: &ErrorFields,
        notice: bool,
    ) -> Option<ErrorFields> {
        let profile = self
            .reads_selected_columns()
            .or_else(|| self.read_selected_in_transaction.clone());
        if let Some(profile) = profile {
            let sqlstate = fields.sqlstate().unwrap_or_default();
            return Some(ErrorFields::new(
                fields.severity().unwrap_or("ERROR"),
                sqlstate,
                format!(
                    "Portcullis: the server's {what} {sqlstate} is withheld: the statement reads columns that masking profile `{profile}` selects (or one before it in the transaction did), and its text may quote their values",
                    what = if notice { "notice" } else { "error" }
                ),
            ));
        }
        self.current_masker()
            .and_then(|m| mask_error_text(&m, fields))
    }

    /// [`reads_selected_columns`] of the statement running.
    pub(super) fn reads_selected_columns(&mut self) -> Option<Arc<str>> {
        reads_selected_columns(self.current_running()?)
    }

    /// A reported parameter's value as the client is shown it while a masking profile
    /// applies; `None`: as it is. `SELECT set_config('application_name', email, false) FROM
    /// customers` would report the value in a ParameterStatus, outside the result: free-text
    /// settings go through the detectors, and are withheld in a transaction that read what a
    /// column rule could select (the server reports changes just before ReadyForQuery, when
    /// that statement is complete). Other reported settings take only constrained values.
    pub(super) fn screen_parameter(&self, name: &str, value: &str) -> Option<String> {
        if !matches!(name, "application_name" | "search_path") {
            return None;
        }
        if let Some(profile) = &self.read_selected_in_transaction {
            return Some(withheld_value(profile));
        }
        self.current_masker().and_then(|m| m.mask_text(value))
    }

    /// A notification's payload as the client is shown it: through the detectors of the
    /// session's profile, and withheld while the transaction that may have sent it read what
    /// a column rule could select (`SELECT pg_notify('c', email) FROM customers` in a session
    /// that listens on `c` gets the notification at commit).
    pub(super) fn screen_notification(&self, payload: &str) -> Option<String> {
        if let Some(profile) = &self.read_selected_in_transaction {
            return Some(withheld_value(profile));
        }
        self.session_masker
            .as_ref()
            .and_then(|m| m.mask_text(payload))
    }
}
