//! Functions that run SQL given to them as text: what they return cannot be traced to the
//! columns it is read from, so a profile with column rules refuses them unless it names them.
//! Below both the masking profiles (which validate `allow_sql_text_functions` against the
//! list) and the masker (which refuses the calls).

/// Functions known to run SQL given to them as text, or to read a relation or cursor named
/// by a value: what they return cannot be traced to the columns it is read from. A trailing
/// `*` stands for every name that begins so. The built-in ones (PostgreSQL 13 to 17) and
/// those of contrib modules (`dblink`, `tablefunc`, `xml2`).
pub const SQL_TEXT_FUNCTIONS: &[&str] = &[
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "dblink*",
    "crosstab*",
    "connectby",
    "xpath_table",
];

/// Whether `function` (`name` or `schema.name`, as a statement calls it) is one of
/// [`SQL_TEXT_FUNCTIONS`]. Compared without regard to ASCII case or schema, so a quoted or
/// qualified spelling is refused too (at worst a harmless function of the same name is).
pub fn runs_sql_text(function: &str) -> bool {
    let name = unqualified(function);
    SQL_TEXT_FUNCTIONS
        .iter()
        .any(|known| match known.strip_suffix('*') {
            Some(prefix) => name
                .get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix)),
            None => name.eq_ignore_ascii_case(known),
        })
}

/// Whether `function` is one of [`SQL_TEXT_FUNCTIONS`] whose first argument is the query it
/// runs, as text (`query_to_xml` and its schema forms, `ts_stat`): when that argument is
/// known (a fast-path call's parameter), the query can be read like a statement.
pub fn takes_query_text(function: &str) -> bool {
    [
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "ts_stat",
    ]
    .iter()
    .any(|known| unqualified(function).eq_ignore_ascii_case(known))
}

/// The name without its schema.
pub(crate) fn unqualified(function: &str) -> &str {
    function.rsplit_once('.').map_or(function, |(_, name)| name)
}
