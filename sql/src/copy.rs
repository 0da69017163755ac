//! What a `COPY ... TO STDOUT` sends, as far as a proxy that masks its rows must know: the
//! table and columns it reads (or that it reads a query), the format, and the options that
//! change how a row is spelled.
//!
//! PostgreSQL docs, "COPY": options come as a list (`WITH (FORMAT csv, HEADER)`) or in the
//! older syntax (`WITH CSV HEADER`, `BINARY`, `DELIMITER AS ';'`); the parser turns both into
//! the same list of `DefElem`s, which is what is read here.

use crate::tree::Tree;

/// A `COPY ... TO STDOUT` (not to a file or program: those never reach the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOut {
    pub source: CopySource,
    pub format: CopyFormat,
    /// The field delimiter when one was given (one byte; PostgreSQL refuses longer ones).
    pub delimiter: Option<u8>,
    /// CSV's quote character when one was given.
    pub quote: Option<u8>,
    /// A first line of column names (text and CSV).
    pub header: bool,
    /// Options a proxy cannot honour when it re-spells a row it changed (`NULL`, `ESCAPE`,
    /// `FORCE_QUOTE`, `ENCODING`, or a value it cannot read), by name: a masking proxy refuses
    /// rather than send a row spelled other than the client asked.
    pub unsupported: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopySource {
    /// `COPY [schema.]table [(columns)] TO STDOUT`: names as PostgreSQL folded them;
    /// `columns` empty means every column, in table order.
    Table {
        schema: Option<String>,
        table: String,
        columns: Vec<String>,
    },
    /// `COPY (query) TO STDOUT`: the columns are the query's, unknown here.
    Query,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Csv,
    Binary,
}

/// The `COPY ... TO STDOUT` a top-level `CopyStmt` is, if it is one.
pub(crate) fn copy_out(stmt: &Tree) -> Option<CopyOut> {
    if stmt.name() != Some("CopyStmt")
        || stmt.bool("is_from")
        || stmt.bool("is_program")
        || !stmt.str("filename").is_empty()
    {
        return None;
    }
    let relation = stmt.field("relation");
    let source = if relation.name() == Some("RangeVar") {
        let schema = relation.str("schemaname");
        CopySource::Table {
            schema: (!schema.is_empty()).then(|| schema.to_owned()),
            table: relation.str("relname").to_owned(),
            columns: stmt
                .list("attlist")
                .iter()
                .filter_map(|c| c.sval().map(str::to_owned))
                .collect(),
        }
    } else {
        CopySource::Query
    };
    let mut out = CopyOut {
        source,
        format: CopyFormat::Text,
        delimiter: None,
        quote: None,
        header: false,
        unsupported: Vec::new(),
    };
    for option in stmt.list("options") {
        let name = option.str("defname").to_ascii_lowercase();
        let arg = option.field("arg");
        let ok = match name.as_str() {
            "format" => match string_arg(arg).map(str::to_ascii_lowercase).as_deref() {
                Some("text") => {
                    out.format = CopyFormat::Text;
                    true
                }
                Some("csv") => {
                    out.format = CopyFormat::Csv;
                    true
                }
                Some("binary") => {
                    out.format = CopyFormat::Binary;
                    true
                }
                _ => false,
            },
            "delimiter" => one_byte(arg).map(|b| out.delimiter = Some(b)).is_some(),
            "quote" => one_byte(arg).map(|b| out.quote = Some(b)).is_some(),
            "header" => bool_arg(arg).map(|h| out.header = h).is_some(),
            // Changes nothing about how rows are spelled.
            "freeze" => true,
            _ => false,
        };
        if !ok {
            out.unsupported.push(name);
        }
    }
    Some(out)
}

fn string_arg(arg: &Tree) -> Option<&str> {
    arg.sval()
}

fn one_byte(arg: &Tree) -> Option<u8> {
    match string_arg(arg)?.as_bytes() {
        [b] => Some(*b),
        _ => None,
    }
}

/// PostgreSQL's `defGetBoolean` spellings; no argument means true. `HEADER MATCH` (only for
/// COPY FROM) is not a yes or no: unsupported.
fn bool_arg(arg: &Tree) -> Option<bool> {
    match arg {
        Tree::Absent => Some(true),
        _ => match arg.name()? {
            "Boolean" => Some(arg.bool("boolval")),
            "Integer" => match arg.int("ival") {
                0 => Some(false),
                1 => Some(true),
                _ => None,
            },
            "String" => match arg.str("sval").to_ascii_lowercase().as_str() {
                "true" | "on" | "yes" | "1" => Some(true),
                "false" | "off" | "no" | "0" => Some(false),
                _ => None,
            },
            _ => None,
        },
    }
}
