//! COPY text and CSV rows as PostgreSQL writes them in COPY TO (one row per CopyData): split into
//! values, joined back after a value is replaced, and random rows survive join then split.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod common;

use common::Rng;
use portcullis_pgwire::copy::{is_end_of_data_marker, CSV_DEFAULT_DELIMITER, CSV_DEFAULT_QUOTE};
use portcullis_pgwire::{join_csv_row, join_text_row, split_csv_row, split_text_row, DecodeError};

/// Values of one row; `None` is NULL.
type Row = Vec<Option<Vec<u8>>>;

fn some(s: &[u8]) -> Option<Vec<u8>> {
    Some(s.to_vec())
}

#[test]
fn text_rows_split_into_de_escaped_values() {
    let cases: Vec<(&[u8], Row)> = vec![
        (b"1\talice\t\\N\n", vec![some(b"1"), some(b"alice"), None]),
        (b"1\talice", vec![some(b"1"), some(b"alice")]),
        (b"\n", vec![some(b"")]),
        (b"", vec![some(b"")]),
        (b"\t\n", vec![some(b""), some(b"")]),
        (b"a\\tb\\nc\\\\d\n", vec![some(b"a\tb\nc\\d")]),
        (b"\\b\\f\\r\\v", vec![some(b"\x08\x0c\r\x0b")]),
        (b"\\101\\60\\0x", vec![some(b"A0\0x")]),
        (b"\\7777", vec![some(b"\xff7")]),
        (b"\\x41\\x4a2\\xg", vec![some(b"AJ2xg")]),
        (b"a\\\tb\tc", vec![some(b"a\tb"), some(b"c")]),
        (b"\\\\N\t\\N\ta\\Nb", vec![some(b"\\N"), None, some(b"aNb")]),
        (b"caf\xc3\xa9\r\n", vec![some("café".as_bytes())]),
    ];
    for (line, want) in cases {
        assert_eq!(
            split_text_row(line, b'\t').unwrap(),
            want,
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn text_rows_with_another_delimiter_split_on_it() {
    assert_eq!(
        split_text_row(b"a|b\\|c|\\N\n", b'|').unwrap(),
        vec![some(b"a"), some(b"b|c"), None]
    );
    assert_eq!(
        split_text_row(b"a\tb,c", b',').unwrap(),
        vec![some(b"a\tb"), some(b"c")]
    );
}

#[test]
fn malformed_text_rows_are_errors() {
    for (line, delimiter) in [
        (&b"a\\"[..], b'\t'),
        (b"a\\\n", b'\t'),
        (b"a\nb\n", b'\t'),
        (b"a\rb", b'\t'),
        (b"a", b'\\'),
        (b"a", b'\n'),
        (b"a", b'x'),
        (b"a", b'7'),
        (b"a", b'.'),
        (b"a", 0xc3),
    ] {
        assert!(
            matches!(
                split_text_row(line, delimiter),
                Err(DecodeError::Invalid { .. })
            ),
            "{line:?} with 0x{delimiter:02x}"
        );
    }
}

#[test]
fn text_rows_are_joined_with_escapes_and_a_newline() {
    let mut out = Vec::new();
    join_text_row(
        &[
            some(b"1"),
            some(b"a\tb\nc\\d\r\x08\x0c\x0b"),
            None,
            some(b""),
            some(b"\\N"),
        ],
        b'\t',
        &mut out,
    );
    assert_eq!(out, b"1\ta\\tb\\nc\\\\d\\r\\b\\f\\v\t\\N\t\t\\\\N\n");

    let mut out = Vec::new();
    join_text_row(&[some(b"a|b"), some(b"c")], b'|', &mut out);
    assert_eq!(out, b"a\\|b|c\n");
}

#[test]
fn a_masked_text_row_keeps_the_other_values() {
    let line = b"42\talice@example.com\t\\N\tnote\\twith tab\n";
    let mut fields = split_text_row(line, b'\t').unwrap();
    fields[1] = some(b"***");
    let mut out = Vec::new();
    join_text_row(&fields, b'\t', &mut out);
    assert_eq!(out, b"42\t***\t\\N\tnote\\twith tab\n");
}

#[test]
fn csv_rows_split_into_values() {
    let cases: Vec<(&[u8], Row)> = vec![
        (b"1,alice,\n", vec![some(b"1"), some(b"alice"), None]),
        (b"1,\"\",x", vec![some(b"1"), some(b""), some(b"x")]),
        (
            b"\"a,b\",\"say \"\"hi\"\"\"\r\n",
            vec![some(b"a,b"), some(b"say \"hi\"")],
        ),
        (
            b"\"line1\nline2\",2\n",
            vec![some(b"line1\nline2"), some(b"2")],
        ),
        (b"a\"b,c\"d", vec![some(b"ab,cd")]),
        (b"", vec![None]),
        (b",", vec![None, None]),
        (b" a , b ", vec![some(b" a "), some(b" b ")]),
        (b"\\N", vec![some(b"\\N")]),
    ];
    for (line, want) in cases {
        assert_eq!(
            split_csv_row(line, CSV_DEFAULT_DELIMITER, CSV_DEFAULT_QUOTE).unwrap(),
            want,
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
    assert_eq!(
        split_csv_row(b"'a;b';'it''s'", b';', b'\'').unwrap(),
        vec![some(b"a;b"), some(b"it's")]
    );
}

#[test]
fn malformed_csv_rows_are_errors() {
    for (line, delimiter, quote) in [
        (&b"\"abc"[..], b',', b'"'),
        (b"\"a\"\"", b',', b'"'),
        (b"a\nb", b',', b'"'),
        (b"a\n\n", b',', b'"'),
        (b"a", b',', b','),
        (b"a", b'\n', b'"'),
        (b"a", b',', 0xff),
    ] {
        assert!(
            matches!(
                split_csv_row(line, delimiter, quote),
                Err(DecodeError::Invalid { .. })
            ),
            "{line:?}"
        );
    }
}

#[test]
fn csv_rows_are_joined_quoting_only_what_needs_it() {
    let mut out = Vec::new();
    join_csv_row(
        &[
            some(b"plain"),
            None,
            some(b""),
            some(b"a,b"),
            some(b"say \"hi\""),
            some(b"two\nlines"),
            some(b"\\."),
        ],
        b',',
        b'"',
        &mut out,
    );
    assert_eq!(
        out,
        b"plain,,\"\",\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",\"\\.\"\n"
    );
}

#[test]
fn the_end_of_data_marker_is_recognised() {
    assert!(is_end_of_data_marker(b"\\.\n"));
    assert!(is_end_of_data_marker(b"\\."));
    assert!(is_end_of_data_marker(b"\\.\r\n"));
    assert!(!is_end_of_data_marker(b"\\.x\n"));
    assert!(!is_end_of_data_marker(b"a\n"));
}

fn random_fields(rng: &mut Rng) -> Row {
    const BYTES: &[u8] = b"a,\t|\"'\\\n\r\x08\x0c\x0bN. \xc3\xa9";
    let mut fields: Vec<_> = (0..1 + rng.below(6))
        .map(|_| {
            rng.bool()
                .then(|| (0..rng.below(8)).map(|_| *rng.pick(BYTES)).collect())
        })
        .collect();
    // A single NULL or empty column is ambiguous with an empty line in the text format.
    if fields.len() == 1 {
        fields.push(None);
    }
    fields
}

#[test]
fn random_text_rows_survive_join_then_split() {
    let mut rng = Rng::new(0xc0b1);
    for _ in 0..5_000 {
        let fields = random_fields(&mut rng);
        let delimiter = *rng.pick(b"\t,|;");
        let mut line = Vec::new();
        join_text_row(&fields, delimiter, &mut line);
        assert_eq!(
            split_text_row(&line, delimiter).unwrap(),
            fields,
            "{line:?}"
        );
    }
}

#[test]
fn random_csv_rows_survive_join_then_split() {
    let mut rng = Rng::new(0xc5f1);
    for _ in 0..5_000 {
        let fields = random_fields(&mut rng);
        let (delimiter, quote) = *rng.pick(&[(b',', b'"'), (b'\t', b'"'), (b';', b'\'')]);
        let mut line = Vec::new();
        join_csv_row(&fields, delimiter, quote, &mut line);
        assert_eq!(
            split_csv_row(&line, delimiter, quote).unwrap(),
            fields,
            "{line:?}"
        );
    }
}

#[test]
fn random_bytes_never_panic_the_row_splitters() {
    let mut rng = Rng::new(0xc0b2);
    for _ in 0..20_000 {
        let line = rng.bytes(24);
        let _ = split_text_row(&line, *rng.pick(b"\t,\\x"));
        let _ = split_csv_row(&line, *rng.pick(b",\t\""), *rng.pick(b"\"'"));
    }
}

/// The header PostgreSQL writes: signature, flags 0, no extension.
fn binary_header() -> Vec<u8> {
    let mut h = portcullis_pgwire::BINARY_SIGNATURE.to_vec();
    h.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    h
}

#[test]
fn binary_payloads_split_into_header_tuples_and_trailer() {
    use portcullis_pgwire::{join_binary_tuple, split_binary, BinaryPart, BINARY_TRAILER};
    // First payload: header + one tuple (int4 1, text "ada", NULL).
    let mut first = binary_header();
    first.extend_from_slice(&[0, 3, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0, 3, b'a', b'd', b'a']);
    first.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    let parts = split_binary(&first, true).unwrap();
    assert_eq!(
        parts,
        vec![
            BinaryPart::Header(&binary_header()),
            BinaryPart::Tuple(vec![Some(&[0, 0, 0, 1][..]), Some(&b"ada"[..]), None]),
        ]
    );
    // A later payload: one tuple; the last: the trailer; no rows: header and trailer at once.
    assert_eq!(
        split_binary(&[0, 1, 0, 0, 0, 0], false).unwrap(),
        vec![BinaryPart::Tuple(vec![Some(&b""[..])])]
    );
    assert_eq!(
        split_binary(&BINARY_TRAILER, false).unwrap(),
        vec![BinaryPart::Trailer]
    );
    let mut empty = binary_header();
    empty.extend_from_slice(&BINARY_TRAILER);
    assert_eq!(
        split_binary(&empty, true).unwrap(),
        vec![BinaryPart::Header(&binary_header()), BinaryPart::Trailer]
    );
    // A header extension is kept with the header.
    let mut extended = portcullis_pgwire::BINARY_SIGNATURE.to_vec();
    extended.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2, 9, 9]);
    assert_eq!(
        split_binary(&extended, true).unwrap(),
        vec![BinaryPart::Header(&extended)]
    );
    // Join writes what split reads.
    let mut out = Vec::new();
    join_binary_tuple(
        &[Some(&[0, 0, 0, 1][..]), Some(&b"ada"[..]), None],
        &mut out,
    )
    .unwrap();
    assert_eq!(out, first[binary_header().len()..]);
}

#[test]
fn malformed_binary_payloads_are_errors() {
    use portcullis_pgwire::split_binary;
    let header = binary_header();
    let mut critical = header.clone();
    critical[11] = 0x01; // flags bit 24: critical and unknown
    let mut long_extension = portcullis_pgwire::BINARY_SIGNATURE.to_vec();
    long_extension.extend_from_slice(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    let mut after_trailer = header.clone();
    after_trailer.extend_from_slice(&[0xff, 0xff, 0]);
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "no signature",
            b"PGCOPX\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec(),
            true,
        ),
        ("short header", header[..15].to_vec(), true),
        ("critical flag", critical, true),
        ("extension longer than the data", long_extension, true),
        ("cut field count", vec![0], false),
        ("negative field count", vec![0xff, 0xfe], false),
        ("cut field length", vec![0, 1, 0, 0], false),
        (
            "field longer than the data",
            vec![0, 1, 0, 0, 0, 5, 1, 2],
            false,
        ),
        (
            "negative field length other than -1",
            vec![0, 1, 0xff, 0xff, 0xff, 0xfe],
            false,
        ),
        ("data after the trailer", after_trailer, true),
    ];
    for (name, bytes, header) in cases {
        assert!(
            matches!(
                split_binary(&bytes, header),
                Err(DecodeError::Invalid { .. })
            ),
            "{name}"
        );
    }
    // Every prefix of a good payload either splits or is an error, never a panic.
    let mut good = binary_header();
    good.extend_from_slice(&[0, 2, 0, 0, 0, 1, b'x', 0xff, 0xff, 0xff, 0xff]);
    for end in 0..good.len() {
        let _ = split_binary(&good[..end], true);
    }
}
