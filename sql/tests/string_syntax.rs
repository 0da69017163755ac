//! Statements that would make the server read string literals differently from the parser
//! that checks them are refused whatever the policy; everything around them still parses.

#![allow(clippy::unwrap_used, reason = "tests")]

use portcullis_sql::{Classifier, ClassifyError};

fn refused(sql: &str) -> bool {
    matches!(
        Classifier::new(64).classify(sql),
        Err(ClassifyError::Refused { .. })
    )
}

#[test]
fn turning_standard_conforming_strings_off_is_refused() {
    for sql in [
        "SET standard_conforming_strings = off",
        "SET standard_conforming_strings TO 'off'",
        "set STANDARD_CONFORMING_STRINGS = false",
        "SET LOCAL standard_conforming_strings = 0",
        "SET SESSION standard_conforming_strings = no",
        "SET \"standard_conforming_strings\" = off",
        "SELECT set_config('standard_conforming_strings', 'off', false)",
        "SELECT pg_catalog.set_config('standard_conforming_strings', 'off', true)",
        "SELECT 1 WHERE set_config('Standard_Conforming_Strings', 'no', false) IS NOT NULL",
        "SELECT set_config(current_setting('x'), 'off', false)",
        "SELECT set_config(name, 'of', false) FROM pg_settings",
        "SELECT set_config(' standard_conforming_strings ', 'F', false)",
        "SELECT set_config('standard_conforming_strings', 'n', false)",
        "SET standard_conforming_strings = 'of'",
        "SELECT set_config('standard_conforming_strings', current_setting('x'), false)",
        "WITH c AS (SELECT set_config('standard_conforming_strings', 'off', false)) SELECT * FROM c",
        "SELECT 1; SET standard_conforming_strings = off",
    ] {
        assert!(refused(sql), "{sql}");
    }
}

#[test]
fn turning_it_on_resetting_it_and_other_settings_are_not() {
    for sql in [
        "SET standard_conforming_strings = on",
        "SET standard_conforming_strings TO 'on'",
        "SET standard_conforming_strings = true",
        "SET standard_conforming_strings = 1",
        "SET standard_conforming_strings = 'T'",
        "RESET standard_conforming_strings",
        "SET standard_conforming_strings TO DEFAULT",
        "RESET ALL",
        "SET search_path = public",
        "SELECT pg_catalog.set_config('search_path', '', false)",
        "SELECT set_config('standard_conforming_strings', 'on', false)",
        // pg_dump's own: the value is no boolean, so it cannot turn anything off.
        "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'",
        "SELECT 'a\\b', E'\\n'",
    ] {
        assert!(
            Classifier::new(64).classify(sql).is_ok(),
            "{sql}: {:?}",
            Classifier::new(64).classify(sql)
        );
    }
}

#[test]
fn a_refused_setting_is_not_served_from_a_cached_shape() {
    // `= on` and `= off` (and the setting a set_config names) differ only in constants.
    let c = Classifier::new(64);
    c.classify("SET standard_conforming_strings = on").unwrap();
    c.classify("SELECT set_config('search_path', 'off', false)")
        .unwrap();
    assert!(matches!(
        c.classify("SET standard_conforming_strings = off"),
        Err(ClassifyError::Refused { .. })
    ));
    assert!(matches!(
        c.classify("SELECT set_config('standard_conforming_strings', 'off', false)"),
        Err(ClassifyError::Refused { .. })
    ));
}

#[test]
fn changing_the_client_encoding_to_one_that_hides_quotes_is_refused() {
    for sql in [
        "SET client_encoding = 'SJIS'",
        "SET client_encoding TO sjis",
        "SET NAMES 'SJIS'",
        "SET LOCAL client_encoding = 'BIG5'",
        "SET SESSION client_encoding = 'gbk'",
        "set CLIENT_ENCODING = 'Shift_JIS'",
        "SET \"client_encoding\" = 'UHC'",
        "SET client_encoding = 'no such encoding'",
        "SET client_encoding = 6",
        "SELECT set_config('client_encoding', 'SJIS', false)",
        "SELECT pg_catalog.set_config('CLIENT_ENCODING', 'GBK', true)",
        "SELECT set_config(' client_encoding ', 'johab', false)",
        "SELECT set_config('client_encoding', current_setting('x'), false)",
        "SELECT set_config(current_setting('x'), 'sjis', false)",
        "SELECT set_config(name, 'WIN932', false) FROM pg_settings",
        "WITH c AS (SELECT set_config('client_encoding', 'SJIS', false)) SELECT * FROM c",
        "SELECT 1; SET client_encoding = 'SJIS'",
        "DO $$ BEGIN SET client_encoding = 'SJIS'; END $$",
        "DO $$ BEGIN PERFORM set_config('client_encoding', 'BIG5', false); END $$",
    ] {
        assert!(refused(sql), "{sql}");
    }
}

#[test]
fn safe_encodings_and_going_back_are_not() {
    for sql in [
        "SET client_encoding = 'UTF8'",
        "SET client_encoding TO 'utf-8'",
        "SET NAMES 'utf8'",
        "SET NAMES DEFAULT",
        "SET client_encoding TO DEFAULT",
        "RESET client_encoding",
        "SET client_encoding = 'LATIN1'",
        "SET client_encoding = 'SQL_ASCII'",
        "SELECT set_config('client_encoding', 'UTF8', false)",
        "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'",
    ] {
        assert!(
            Classifier::new(64).classify(sql).is_ok(),
            "{sql}: {:?}",
            Classifier::new(64).classify(sql)
        );
    }
    let c = Classifier::new(64);
    c.classify("SELECT set_config('client_encoding', 'UTF8', false)")
        .unwrap();
    assert!(matches!(
        c.classify("SELECT set_config('client_encoding', 'SJIS', false)"),
        Err(ClassifyError::Refused { .. })
    ));
}
