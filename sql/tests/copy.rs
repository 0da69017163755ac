//! `COPY ... TO STDOUT` as the masking proxy reads it: source table and columns, format and
//! the options that change how rows are spelled, from both option syntaxes.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

use portcullis_sql::{classify, CopyFormat, CopyOut, CopySource};

fn copy_out(sql: &str) -> Option<CopyOut> {
    let statements = classify(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert_eq!(statements.len(), 1, "{sql}");
    statements[0].copy_out.clone()
}

fn table(schema: Option<&str>, name: &str, columns: &[&str]) -> CopySource {
    CopySource::Table {
        schema: schema.map(str::to_owned),
        table: name.to_owned(),
        columns: columns.iter().map(|c| (*c).to_owned()).collect(),
    }
}

#[test]
fn table_columns_format_and_options_in_both_syntaxes() {
    type Row = (
        &'static str,
        CopySource,
        CopyFormat,
        Option<u8>,
        Option<u8>,
        bool,
        &'static [&'static str],
    );
    let rows: Vec<Row> = vec![
        (
            "COPY customers TO STDOUT",
            table(None, "customers", &[]),
            CopyFormat::Text,
            None,
            None,
            false,
            &[],
        ),
        (
            "copy Public.Customers (Name, \"Card\") to stdout",
            table(Some("public"), "customers", &["name", "Card"]),
            CopyFormat::Text,
            None,
            None,
            false,
            &[],
        ),
        (
            "COPY s.t TO STDOUT WITH (FORMAT csv, HEADER, DELIMITER ';', QUOTE '''')",
            table(Some("s"), "t", &[]),
            CopyFormat::Csv,
            Some(b';'),
            Some(b'\''),
            true,
            &[],
        ),
        (
            "COPY t TO STDOUT WITH CSV HEADER",
            table(None, "t", &[]),
            CopyFormat::Csv,
            None,
            None,
            true,
            &[],
        ),
        (
            "COPY t TO STDOUT (FORMAT csv, HEADER false)",
            table(None, "t", &[]),
            CopyFormat::Csv,
            None,
            None,
            false,
            &[],
        ),
        (
            "COPY t TO STDOUT (FORMAT csv, HEADER 0)",
            table(None, "t", &[]),
            CopyFormat::Csv,
            None,
            None,
            false,
            &[],
        ),
        (
            "COPY t TO STDOUT BINARY",
            table(None, "t", &[]),
            CopyFormat::Binary,
            None,
            None,
            false,
            &[],
        ),
        (
            "COPY t TO STDOUT (FORMAT binary)",
            table(None, "t", &[]),
            CopyFormat::Binary,
            None,
            None,
            false,
            &[],
        ),
        (
            "COPY t TO STDOUT DELIMITER AS '|'",
            table(None, "t", &[]),
            CopyFormat::Text,
            Some(b'|'),
            None,
            false,
            &[],
        ),
        (
            "COPY (SELECT 1) TO STDOUT",
            CopySource::Query,
            CopyFormat::Text,
            None,
            None,
            false,
            &[],
        ),
        (
            "COPY t TO STDOUT (NULL 'x', FORCE_QUOTE *, ESCAPE '\\', ENCODING 'latin1')",
            table(None, "t", &[]),
            CopyFormat::Text,
            None,
            None,
            false,
            &["null", "force_quote", "escape", "encoding"],
        ),
        (
            "COPY t TO STDOUT (FORMAT parquet)",
            table(None, "t", &[]),
            CopyFormat::Text,
            None,
            None,
            false,
            &["format"],
        ),
        (
            "COPY t TO STDOUT (DELIMITER 'ab')",
            table(None, "t", &[]),
            CopyFormat::Text,
            None,
            None,
            false,
            &["delimiter"],
        ),
        (
            "COPY t TO STDOUT (HEADER maybe)",
            table(None, "t", &[]),
            CopyFormat::Text,
            None,
            None,
            false,
            &["header"],
        ),
    ];
    for (sql, source, format, delimiter, quote, header, unsupported) in rows {
        let got = copy_out(sql).unwrap_or_else(|| panic!("{sql}: not a COPY TO STDOUT"));
        let want = CopyOut {
            source,
            format,
            delimiter,
            quote,
            header,
            unsupported: unsupported.iter().map(|u| (*u).to_owned()).collect(),
        };
        assert_eq!(got, want, "{sql}");
    }
}

#[test]
fn only_copy_to_stdout_has_one() {
    for sql in [
        "COPY t FROM STDIN",
        "COPY t TO '/tmp/x'",
        "COPY t TO PROGRAM 'cat'",
        "SELECT * FROM t",
    ] {
        assert_eq!(copy_out(sql), None, "{sql}");
    }
}

#[test]
fn options_that_normalize_alike_are_not_served_from_the_shape_cache() {
    let classifier = portcullis_sql::Classifier::new(64);
    let on = classifier
        .classify("COPY t TO STDOUT (FORMAT csv, HEADER true)")
        .unwrap();
    let off = classifier
        .classify("COPY t TO STDOUT (FORMAT csv, HEADER false)")
        .unwrap();
    assert!(on[0].copy_out.as_ref().unwrap().header);
    assert!(!off[0].copy_out.as_ref().unwrap().header);
}
