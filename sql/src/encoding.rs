//! Which client encodings the classifier reads statements in safely. PostgreSQL converts a
//! statement from the client's encoding before its scanner sees it; the classifier reads the
//! bytes as UTF-8. In every encoding PostgreSQL allows for a database, each byte of a
//! multi-byte character has its high bit set, so a quote or a backslash is what it looks like
//! to both. In the client-only encodings (SJIS, SHIFT_JIS_2004, BIG5, GBK, GB18030, UHC,
//! JOHAB) the second byte of a character can be a backslash: `E'ā\'; DROP …` is one literal
//! read as UTF-8 and a literal then a DROP read as SJIS.
//!
//! Names: PostgreSQL's `pg_char_to_encoding` (src/common/encnames.c) looks a name up after
//! `clean_encoding_name`, which keeps only letters and digits, lower-cased.

/// The encodings PostgreSQL allows for a database (`PG_VALID_BE_ENCODING` in
/// src/include/mb/pg_wchar.h), by their canonical names, as the server reports
/// `client_encoding`.
pub const ASCII_SAFE_ENCODINGS: [&str; 35] = [
    "SQL_ASCII",
    "UTF8",
    "EUC_JP",
    "EUC_CN",
    "EUC_KR",
    "EUC_TW",
    "EUC_JIS_2004",
    "MULE_INTERNAL",
    "LATIN1",
    "LATIN2",
    "LATIN3",
    "LATIN4",
    "LATIN5",
    "LATIN6",
    "LATIN7",
    "LATIN8",
    "LATIN9",
    "LATIN10",
    "WIN1250",
    "WIN1251",
    "WIN1252",
    "WIN1253",
    "WIN1254",
    "WIN1255",
    "WIN1256",
    "WIN1257",
    "WIN1258",
    "WIN866",
    "WIN874",
    "KOI8R",
    "KOI8U",
    "ISO_8859_5",
    "ISO_8859_6",
    "ISO_8859_7",
    "ISO_8859_8",
];

/// PostgreSQL's names and aliases of the client-only encodings, cleaned. Used only where the
/// setting's own name is not known (`set_config(expr, 'sjis', …)`), to tell an encoding
/// apart from a value that is no encoding at all; everywhere else the allowlist decides.
const CLIENT_ONLY_ENCODINGS: [&str; 21] = [
    "sjis",
    "shiftjis",
    "mskanji",
    "win932",
    "windows932",
    "cp932",
    "shiftjis2004",
    "big5",
    "win950",
    "windows950",
    "cp950",
    "gbk",
    "win936",
    "windows936",
    "cp936",
    "gb18030",
    "uhc",
    "win949",
    "windows949",
    "cp949",
    "johab",
];

/// Whether PostgreSQL reads `name` as one of [`ASCII_SAFE_ENCODINGS`]: `'utf-8'`, `Unicode`,
/// `sql_ascii` and `latin1` all count; of PostgreSQL's other aliases (`iso88591`, `win`,
/// `alt`, …) only `unicode` is taken, and a name this does not know is not safe.
pub fn is_ascii_safe_encoding(name: &str) -> bool {
    let cleaned = clean(name);
    cleaned == "unicode"
        || ASCII_SAFE_ENCODINGS
            .iter()
            .any(|safe| clean(safe) == cleaned)
}

/// Whether PostgreSQL could read `name` as a client-only encoding.
pub(crate) fn may_name_client_only_encoding(name: &str) -> bool {
    CLIENT_ONLY_ENCODINGS.contains(&clean(name).as_str())
}

fn clean(name: &str) -> String {
    name.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_encodings_in_the_spellings_postgresql_reads() {
        for name in [
            "UTF8",
            "utf8",
            "'utf-8'",
            "Unicode",
            "SQL_ASCII",
            "sql-ascii",
            "LATIN1",
            "win1252",
            "EUC_JP",
            "iso_8859_5",
            "KOI8R",
        ] {
            assert!(is_ascii_safe_encoding(name), "{name}");
        }
        for name in [
            "SJIS",
            "sjis",
            "Shift_JIS",
            "SHIFT_JIS_2004",
            "mskanji",
            "BIG5",
            "GBK",
            "GB18030",
            "UHC",
            "JOHAB",
            "WIN932",
            "WIN950",
            "WIN936",
            "WIN949",
            "",
            "auto",
            "no such",
        ] {
            assert!(!is_ascii_safe_encoding(name), "{name}");
        }
    }

    #[test]
    fn no_client_only_name_is_also_safe() {
        for name in CLIENT_ONLY_ENCODINGS {
            assert!(may_name_client_only_encoding(name), "{name}");
            assert!(!is_ascii_safe_encoding(name), "{name}");
        }
        assert!(may_name_client_only_encoding("Shift_JIS"));
        assert!(!may_name_client_only_encoding("view, foreign-table"));
    }
}
