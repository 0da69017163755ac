//! The rules: which class and command a parse tree is, and what it touches.
//!
//! A statement is as dangerous as the most dangerous statement anywhere in its tree, so the
//! walk raises the class for every statement node it meets: a `DELETE` in a CTE makes the
//! `SELECT` around it a write, `EXPLAIN ANALYZE` lends its class to the statement it runs.
//! Only a plain `EXPLAIN` (which plans without running) keeps its statement from counting.

use std::collections::BTreeSet;

use pg_query::protobuf::{
    AlterTableType, ObjectType, RoleStmtType, TransactionStmtKind, VariableSetKind,
};

use crate::tree::{Tree, MAX_DEPTH};
use crate::{ClassifyError, StatementClass};

/// What one top-level statement is and touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Facts {
    pub(crate) class: StatementClass,
    pub(crate) command: String,
    pub(crate) tables: Vec<String>,
    pub(crate) functions: Vec<String>,
    /// Whether every statement of the same shape (only constant tokens differ, see
    /// `shape.rs`) has these same facts. Not when an option's argument may have been read:
    /// `EXPLAIN (ANALYZE 'off')` and `(ANALYZE 1)` have the shape of `(ANALYZE 'on')`.
    pub(crate) shape_cacheable: bool,
}

/// The setting under which PostgreSQL's lexer and pg_query's read string literals alike.
/// With it off, `'a\' ...'` ends somewhere else for the server than for the parser that
/// checked it: text the checker took for a literal would run as SQL.
const STRING_SYNTAX: &str = "standard_conforming_strings";

/// The setting that says which encoding the server reads statements in; see `encoding.rs`.
const CLIENT_ENCODING: &str = "client_encoding";

pub(crate) fn facts(stmt: &Tree) -> Result<Facts, ClassifyError> {
    let name = stmt.name().unwrap_or("empty statement");
    let Some((_, command)) = describe(stmt) else {
        return Err(ClassifyError::Unsupported {
            node: name.to_owned(),
        });
    };
    let mut walk = Walk {
        class: StatementClass::Read,
        tables: BTreeSet::new(),
        functions: BTreeSet::new(),
        ctes: Vec::new(),
        shape_cacheable: true,
        refused: None,
    };
    walk.visit(stmt, "", "", true, 0)?;
    if let Some(message) = walk
        .refused
        .take()
        .or_else(|| string_syntax_set(stmt))
        .or_else(|| client_encoding_set(stmt))
    {
        return Err(ClassifyError::Refused { message });
    }
    let command = match (name, walk.class) {
        // `SELECT ... INTO new_table` (also in a UNION branch): the INTO is what makes it DDL.
        ("SelectStmt", StatementClass::Ddl) => "SELECT INTO".to_owned(),
        _ => command,
    };
    Ok(Facts {
        class: walk.class,
        command,
        tables: walk.tables.into_iter().collect(),
        functions: walk.functions.into_iter().collect(),
        shape_cacheable: walk.shape_cacheable,
    })
}

struct Walk<'t> {
    class: StatementClass,
    tables: BTreeSet<String>,
    functions: BTreeSet<String>,
    /// The CTE names visible at this point of the walk, innermost scope last.
    ctes: Vec<Vec<&'t str>>,
    shape_cacheable: bool,
    /// Why the statement may not run whatever the policy says (see [`STRING_SYNTAX`]).
    refused: Option<String>,
}

impl<'t> Walk<'t> {
    /// `executes`: statements under this node run when the top-level statement runs (false
    /// below a plain EXPLAIN, which only plans). Tables and functions count either way.
    fn visit(
        &mut self,
        node: &'t Tree,
        parent: &'static str,
        field: &'static str,
        executes: bool,
        depth: usize,
    ) -> Result<(), ClassifyError> {
        if depth > MAX_DEPTH {
            return Err(ClassifyError::TooDeep {
                message: format!("the parse tree nests deeper than {MAX_DEPTH} levels"),
            });
        }
        let (name, fields) = match node {
            Tree::List(items) => {
                for item in items {
                    self.visit(item, parent, field, executes, depth + 1)?;
                }
                return Ok(());
            }
            Tree::Struct { name, fields } => (*name, fields),
            Tree::Str(_) | Tree::Int(_) | Tree::Bool(_) | Tree::Absent => return Ok(()),
        };

        match name {
            "RangeVar" => self.relation(node, parent, field),
            "FuncCall" => {
                if let Some(function) = qualified_name(node.list("funcname")) {
                    self.functions.insert(function);
                }
                if is_set_config(node) {
                    // Which setting it changes is a constant: the shape hides it.
                    self.shape_cacheable = false;
                    if let Some(message) = set_config_of_string_syntax(node)
                        .or_else(|| set_config_of_client_encoding(node))
                    {
                        self.refused.get_or_insert(message);
                    }
                }
            }
            "DefElem" if node.is_present("arg") => {
                self.shape_cacheable = false;
            }
            _ => {}
        }
        self.tables.extend(object_tables(node));
        if executes {
            if let Some((class, _)) = describe(node) {
                self.raise(class);
            } else if name.ends_with("Stmt") && !matches!(name, "ReturnStmt" | "PlAssignStmt") {
                // A statement node this version of the rules does not know: fail closed.
                self.raise(StatementClass::Admin);
            }
        }

        let executes = executes && (name != "ExplainStmt" || explain_executes(node));
        let with = node.field("with_clause");
        let has_with = !matches!(with, Tree::Absent);
        if has_with {
            // WITH a AS (...), b AS (...) main: a CTE name shadows a table of the same name in
            // the FROM clauses of the later CTEs (all of them if RECURSIVE) and of the main
            // statement, and nowhere else.
            let ctes = with.list("ctes");
            let names: Vec<&str> = ctes.iter().map(|cte| cte.str("ctename")).collect();
            let recursive = with.bool("recursive");
            for (i, cte) in ctes.iter().enumerate() {
                let visible = if recursive {
                    names.clone()
                } else {
                    names.get(..i).unwrap_or_default().to_vec()
                };
                self.ctes.push(visible);
                let result = self.visit(cte, "WithClause", "ctes", executes, depth + 1);
                self.ctes.pop();
                result?;
            }
            self.ctes.push(names);
        }
        let mut result = Ok(());
        for (child_field, child) in fields {
            if *child_field == "with_clause" {
                continue;
            }
            result = self.visit(child, name, child_field, executes, depth + 1);
            if result.is_err() {
                break;
            }
        }
        if has_with {
            self.ctes.pop();
        }
        result
    }

    fn raise(&mut self, class: StatementClass) {
        if class.danger() > self.class.danger() {
            self.class = class;
        }
    }

    fn relation(&mut self, range_var: &Tree, parent: &str, field: &str) {
        // `FOR UPDATE OF o` names FROM items (often aliases), which are recorded already.
        if parent == "LockingClause" {
            return;
        }
        let parts = [
            range_var.str("catalogname"),
            range_var.str("schemaname"),
            range_var.str("relname"),
        ];
        let name = parts
            .iter()
            .filter(|part| !part.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(".");
        if name.is_empty() {
            return;
        }
        // Only a FROM item can name a CTE; the target of INSERT, UPDATE, DELETE, MERGE (and of
        // every DDL statement) is always a real table, whatever CTE shares its name.
        let from_item = matches!(
            (parent, field),
            ("SelectStmt", "from_clause")
                | ("UpdateStmt", "from_clause")
                | ("DeleteStmt", "using_clause")
                | ("MergeStmt", "source_relation")
                | ("JoinExpr", "larg" | "rarg")
        );
        let unqualified = parts.first().is_some_and(|c| c.is_empty())
            && parts.get(1).is_some_and(|s| s.is_empty());
        if from_item
            && unqualified
            && self
                .ctes
                .iter()
                .any(|scope| scope.iter().any(|cte| *cte == name))
        {
            return;
        }
        self.tables.insert(name);
    }
}

/// `SET`/`SET LOCAL standard_conforming_strings` to anything but on. RESET and DEFAULT go
/// back to the session's start-up value, which the agent checked was on.
fn string_syntax_set(stmt: &Tree) -> Option<String> {
    if stmt.name() != Some("VariableSetStmt")
        || !stmt.str("name").eq_ignore_ascii_case(STRING_SYNTAX)
    {
        return None;
    }
    let kind = VariableSetKind::try_from(i32::try_from(stmt.int("kind")).unwrap_or(0))
        .unwrap_or(VariableSetKind::Undefined);
    let turns_on = match kind {
        VariableSetKind::VarReset
        | VariableSetKind::VarResetAll
        | VariableSetKind::VarSetDefault => true,
        VariableSetKind::VarSetValue => {
            matches!(stmt.list("args"), [value] if constant_bool(value) == Some(Some(true)))
        }
        _ => false,
    };
    (!turns_on).then(|| {
        format!("SET {STRING_SYNTAX} to anything but on is refused: the server would then read backslashes in string literals differently from the parser that checks each statement")
    })
}

/// `SET`/`SET LOCAL client_encoding` (and `SET NAMES`, which the grammar turns into it) to
/// anything but a constant naming an encoding the classifier reads safely. RESET and DEFAULT
/// go back to the session's start-up value, which the agent checked.
fn client_encoding_set(stmt: &Tree) -> Option<String> {
    if stmt.name() != Some("VariableSetStmt")
        || !stmt.str("name").eq_ignore_ascii_case(CLIENT_ENCODING)
    {
        return None;
    }
    let kind = VariableSetKind::try_from(i32::try_from(stmt.int("kind")).unwrap_or(0))
        .unwrap_or(VariableSetKind::Undefined);
    let safe = match kind {
        VariableSetKind::VarReset
        | VariableSetKind::VarResetAll
        | VariableSetKind::VarSetDefault => true,
        VariableSetKind::VarSetValue => matches!(
            stmt.list("args"),
            [value] if constant_text(value).is_some_and(crate::encoding::is_ascii_safe_encoding)
        ),
        _ => false,
    };
    (!safe).then(|| {
        format!("SET {CLIENT_ENCODING} to an encoding other than UTF8, SQL_ASCII or another that PostgreSQL allows for a database is refused: in it the server could read a statement other than as the parser that checks each statement reads it")
    })
}

/// A `set_config` call of `client_encoding` to anything but a constant naming a safe
/// encoding; or of a setting named by an expression (which could be that one) to an
/// expression or to a constant that names a client-only encoding. pg_dump's
/// `set_config(name, 'view, foreign-table', false)` names no encoding.
fn set_config_of_client_encoding(call: &Tree) -> Option<String> {
    let args = call.list("args");
    let value = args.get(1).map(constant_text);
    let refused = match args.first().map(constant_text) {
        Some(Some(name)) if name.trim().eq_ignore_ascii_case(CLIENT_ENCODING) => {
            !matches!(value, Some(Some(v)) if crate::encoding::is_ascii_safe_encoding(v))
        }
        Some(Some(_)) => false,
        _ => match value {
            Some(Some(v)) => crate::encoding::may_name_client_only_encoding(v),
            _ => true,
        },
    };
    refused.then(|| {
        format!("set_config of {CLIENT_ENCODING} to a value that could be an encoding other than UTF8, SQL_ASCII or another that PostgreSQL allows for a database is refused: in it the server could read a statement other than as the parser that checks each statement reads it")
    })
}

fn is_set_config(call: &Tree) -> bool {
    call.list("funcname")
        .last()
        .and_then(Tree::sval)
        .is_some_and(|f| f.eq_ignore_ascii_case("set_config"))
}

/// A `set_config` call of `standard_conforming_strings` (or of a setting named by an expression,
/// which could be that one) to a value that could read as off: an expression, or a constant
/// PostgreSQL's boolean parser reads as false. pg_dump's
/// `set_config(name, 'view, foreign-table', false) FROM pg_settings` is not: that value is no
/// boolean at all.
fn set_config_of_string_syntax(call: &Tree) -> Option<String> {
    let args = call.list("args");
    let may_name_it = args
        .first()
        .and_then(constant_text)
        .is_none_or(|name| name.trim().eq_ignore_ascii_case(STRING_SYNTAX));
    let may_be_off = args
        .get(1)
        .is_none_or(|value| matches!(constant_bool(value), None | Some(Some(false))));
    (may_name_it && may_be_off).then(|| {
        format!("set_config of {STRING_SYNTAX} to a value that could be off is refused: the server would then read backslashes in string literals differently from the parser that checks each statement")
    })
}

/// A value as PostgreSQL's `parse_bool` reads it: `None` when it is not a constant,
/// `Some(None)` when it is one but no boolean, else the boolean (`t`…`true`, `y`…`yes`, `on`,
/// `1`; `f`…`false`, `n`, `no`, `of`, `off`, `0`; any case, surrounding blanks ignored).
fn constant_bool(node: &Tree) -> Option<Option<bool>> {
    let value = node.field("val");
    match (node.name(), value.name()) {
        (Some("AConst"), Some("Boolean")) => return Some(Some(value.bool("boolval"))),
        (Some("AConst"), Some("Integer")) => {
            return Some(match value.int("ival") {
                0 => Some(false),
                1 => Some(true),
                _ => None,
            })
        }
        _ => {}
    }
    let v = constant_text(node)?.trim().to_ascii_lowercase();
    let abbreviates = |word: &str, shortest: usize| v.len() >= shortest && word.starts_with(&v);
    Some(
        if abbreviates("true", 1) || abbreviates("yes", 1) || abbreviates("on", 2) || v == "1" {
            Some(true)
        } else if abbreviates("false", 1)
            || abbreviates("no", 1)
            || abbreviates("off", 2)
            || v == "0"
        {
            Some(false)
        } else {
            None
        },
    )
}

/// The text of a string constant (`'x'`, or `'x'::text`).
pub(crate) fn constant_text(node: &Tree) -> Option<&str> {
    match node.name()? {
        "AConst" => node.field("val").sval(),
        "TypeCast" => constant_text(node.field("arg")),
        _ => None,
    }
}

/// `a.b.c` from a list of `String` nodes; `None` if the list holds anything else (`*`).
fn qualified_name(parts: &[Tree]) -> Option<String> {
    let names: Option<Vec<&str>> = parts.iter().map(Tree::sval).collect();
    let names = names?;
    if names.is_empty() {
        return None;
    }
    Some(names.join("."))
}

/// Whether an EXPLAIN runs its statement: it does with ANALYZE, unless the option says
/// false/off/0 in one of the spellings PostgreSQL's `defGetBoolean` accepts. Anything else,
/// including a spelling PostgreSQL would reject, counts as running it.
fn explain_executes(explain: &Tree) -> bool {
    explain.list("options").iter().any(|option| {
        option.name() == Some("DefElem")
            && option.str("defname").eq_ignore_ascii_case("analyze")
            && !is_false(option.field("arg"))
    })
}

fn is_false(arg: &Tree) -> bool {
    match arg.name() {
        Some("String") => {
            let value = arg.str("sval");
            value.eq_ignore_ascii_case("false") || value.eq_ignore_ascii_case("off")
        }
        Some("Integer") => arg.int("ival") == 0,
        Some("Boolean") => !arg.bool("boolval"),
        _ => false,
    }
}

/// Relations named in object lists rather than as `RangeVar`s: `DROP TABLE a, s.b`,
/// `COMMENT ON COLUMN t.c`, `DROP TRIGGER trg ON t`.
fn object_tables(node: &Tree) -> Vec<String> {
    let (objtype, objects): (i64, Vec<&Tree>) = match node.name() {
        Some("DropStmt") => (
            node.int("remove_type"),
            node.list("objects").iter().collect(),
        ),
        Some("CommentStmt" | "SecLabelStmt") => (node.int("objtype"), vec![node.field("object")]),
        Some("RenameStmt") if !node.is_present("relation") => {
            (node.int("rename_type"), vec![node.field("object")])
        }
        Some("AlterObjectSchemaStmt" | "AlterOwnerStmt") if !node.is_present("relation") => {
            (node.int("object_type"), vec![node.field("object")])
        }
        _ => return Vec::new(),
    };
    let keep_last = match ObjectType::try_from(i32::try_from(objtype).unwrap_or(0)) {
        Ok(
            ObjectType::ObjectTable
            | ObjectType::ObjectView
            | ObjectType::ObjectMatview
            | ObjectType::ObjectIndex
            | ObjectType::ObjectSequence
            | ObjectType::ObjectForeignTable,
        ) => true,
        // The last name is the column, rule, trigger, policy or constraint; the rest is the table.
        Ok(
            ObjectType::ObjectColumn
            | ObjectType::ObjectRule
            | ObjectType::ObjectTrigger
            | ObjectType::ObjectPolicy
            | ObjectType::ObjectTabconstraint,
        ) => false,
        _ => return Vec::new(),
    };
    objects
        .into_iter()
        .filter_map(|object| {
            let items = object.list("items");
            let items = if keep_last {
                items
            } else {
                items.get(..items.len().saturating_sub(1))?
            };
            qualified_name(items)
        })
        .collect()
}

fn object_type(node: &Tree, field: &str) -> ObjectType {
    ObjectType::try_from(i32::try_from(node.int(field)).unwrap_or(0))
        .unwrap_or(ObjectType::Undefined)
}

/// The class a kind of object puts its CREATE/ALTER/DROP in.
fn object_class(object: ObjectType) -> StatementClass {
    match object {
        ObjectType::ObjectRole => StatementClass::Dcl,
        ObjectType::ObjectTablespace
        | ObjectType::ObjectPublication
        | ObjectType::ObjectPublicationNamespace
        | ObjectType::ObjectPublicationRel
        | ObjectType::ObjectSubscription => StatementClass::Admin,
        _ => StatementClass::Ddl,
    }
}

/// How PostgreSQL's command tags name a kind of object (`ALTER <this>`, `DROP <this>`).
fn object_name(object: ObjectType) -> &'static str {
    match object {
        ObjectType::Undefined => "OBJECT",
        ObjectType::ObjectAccessMethod => "ACCESS METHOD",
        ObjectType::ObjectAggregate => "AGGREGATE",
        ObjectType::ObjectAmop | ObjectType::ObjectAmproc | ObjectType::ObjectOpfamily => {
            "OPERATOR FAMILY"
        }
        ObjectType::ObjectAttribute | ObjectType::ObjectType => "TYPE",
        ObjectType::ObjectCast => "CAST",
        ObjectType::ObjectColumn | ObjectType::ObjectTabconstraint | ObjectType::ObjectTable => {
            "TABLE"
        }
        ObjectType::ObjectCollation => "COLLATION",
        ObjectType::ObjectConversion => "CONVERSION",
        ObjectType::ObjectDatabase => "DATABASE",
        ObjectType::ObjectDefault => "DEFAULT",
        ObjectType::ObjectDefacl => "DEFAULT PRIVILEGES",
        ObjectType::ObjectDomain | ObjectType::ObjectDomconstraint => "DOMAIN",
        ObjectType::ObjectEventTrigger => "EVENT TRIGGER",
        ObjectType::ObjectExtension => "EXTENSION",
        ObjectType::ObjectFdw => "FOREIGN DATA WRAPPER",
        ObjectType::ObjectForeignServer => "SERVER",
        ObjectType::ObjectForeignTable => "FOREIGN TABLE",
        ObjectType::ObjectFunction => "FUNCTION",
        ObjectType::ObjectIndex => "INDEX",
        ObjectType::ObjectLanguage => "LANGUAGE",
        ObjectType::ObjectLargeobject => "LARGE OBJECT",
        ObjectType::ObjectMatview => "MATERIALIZED VIEW",
        ObjectType::ObjectOpclass => "OPERATOR CLASS",
        ObjectType::ObjectOperator => "OPERATOR",
        ObjectType::ObjectParameterAcl => "PARAMETER",
        ObjectType::ObjectPolicy => "POLICY",
        ObjectType::ObjectProcedure => "PROCEDURE",
        ObjectType::ObjectPublication
        | ObjectType::ObjectPublicationNamespace
        | ObjectType::ObjectPublicationRel => "PUBLICATION",
        ObjectType::ObjectRole => "ROLE",
        ObjectType::ObjectRoutine => "ROUTINE",
        ObjectType::ObjectRule => "RULE",
        ObjectType::ObjectSchema => "SCHEMA",
        ObjectType::ObjectSequence => "SEQUENCE",
        ObjectType::ObjectSubscription => "SUBSCRIPTION",
        ObjectType::ObjectStatisticExt => "STATISTICS",
        ObjectType::ObjectTablespace => "TABLESPACE",
        ObjectType::ObjectTransform => "TRANSFORM",
        ObjectType::ObjectTrigger => "TRIGGER",
        ObjectType::ObjectTsconfiguration => "TEXT SEARCH CONFIGURATION",
        ObjectType::ObjectTsdictionary => "TEXT SEARCH DICTIONARY",
        ObjectType::ObjectTsparser => "TEXT SEARCH PARSER",
        ObjectType::ObjectTstemplate => "TEXT SEARCH TEMPLATE",
        ObjectType::ObjectUserMapping => "USER MAPPING",
        ObjectType::ObjectView => "VIEW",
    }
}

/// The class and command of a statement node on its own, before what it contains is taken into
/// account; `None` for a node that is not a statement.
fn describe(node: &Tree) -> Option<(StatementClass, String)> {
    use StatementClass::*;
    let fixed = |class: StatementClass, command: &str| Some((class, command.to_owned()));
    let on_object = |class: StatementClass, verb: &str, field: &str| {
        let object = object_type(node, field);
        let class = if class.danger() > object_class(object).danger() {
            class
        } else {
            object_class(object)
        };
        Some((class, format!("{verb} {}", object_name(object))))
    };
    match node.name()? {
        // Reads.
        "SelectStmt" => {
            if node.is_present("into_clause") {
                fixed(Ddl, "SELECT INTO")
            } else if !node.list("locking_clause").is_empty() {
                // FOR UPDATE / FOR SHARE take row locks: writers wait on them.
                fixed(Write, "SELECT")
            } else {
                fixed(Read, "SELECT")
            }
        }
        "VariableShowStmt" => fixed(Read, "SHOW"),
        "ExplainStmt" => fixed(Read, "EXPLAIN"),
        "FetchStmt" if node.bool("ismove") => fixed(Utility, "MOVE"),
        // The rows were chosen, and the query classified, by DECLARE.
        "FetchStmt" => fixed(Read, "FETCH"),
        // The query inside decides the class.
        "DeclareCursorStmt" => fixed(Read, "DECLARE CURSOR"),
        "PrepareStmt" => fixed(Read, "PREPARE"),

        // Writes.
        "InsertStmt" => fixed(Write, "INSERT"),
        "UpdateStmt" => fixed(Write, "UPDATE"),
        "DeleteStmt" => fixed(Write, "DELETE"),
        "MergeStmt" => fixed(Write, "MERGE"),
        "LockStmt" => fixed(Write, "LOCK TABLE"),
        "CopyStmt" => {
            if node.bool("is_program") || !node.str("filename").is_empty() {
                // Runs a shell command, or reads/writes a file, as the server's OS user.
                fixed(Admin, "COPY")
            } else if node.bool("is_from") {
                fixed(Write, "COPY")
            } else {
                fixed(Read, "COPY")
            }
        }
        // EXECUTE runs a statement PREPAREd earlier in the session, which this statement does
        // not show: it may be any DML, so it counts as a write (fail closed).
        "ExecuteStmt" => fixed(Write, "EXECUTE"),

        // Opaque code.
        "CallStmt" => fixed(Call, "CALL"),
        "DoStmt" => fixed(Do, "DO"),

        // Transaction control.
        "TransactionStmt" => {
            let kind = TransactionStmtKind::try_from(i32::try_from(node.int("kind")).unwrap_or(0))
                .unwrap_or(TransactionStmtKind::Undefined);
            let command = match kind {
                TransactionStmtKind::TransStmtBegin | TransactionStmtKind::Undefined => "BEGIN",
                TransactionStmtKind::TransStmtStart => "START TRANSACTION",
                TransactionStmtKind::TransStmtCommit => "COMMIT",
                TransactionStmtKind::TransStmtRollback => "ROLLBACK",
                TransactionStmtKind::TransStmtSavepoint => "SAVEPOINT",
                TransactionStmtKind::TransStmtRelease => "RELEASE",
                TransactionStmtKind::TransStmtRollbackTo => "ROLLBACK TO SAVEPOINT",
                TransactionStmtKind::TransStmtPrepare => "PREPARE TRANSACTION",
                TransactionStmtKind::TransStmtCommitPrepared => "COMMIT PREPARED",
                TransactionStmtKind::TransStmtRollbackPrepared => "ROLLBACK PREPARED",
            };
            fixed(Transaction, command)
        }
        "ConstraintsSetStmt" => fixed(Transaction, "SET CONSTRAINTS"),
        "VariableSetStmt" => Some(variable_set(node)),

        // Session utilities.
        "DiscardStmt" => fixed(Utility, "DISCARD"),
        "ListenStmt" => fixed(Utility, "LISTEN"),
        "UnlistenStmt" => fixed(Utility, "UNLISTEN"),
        "NotifyStmt" => fixed(Utility, "NOTIFY"),
        "DeallocateStmt" => fixed(Utility, "DEALLOCATE"),
        "ClosePortalStmt" => fixed(Utility, "CLOSE"),

        // Privileges and roles.
        "GrantStmt" | "GrantRoleStmt" if node.bool("is_grant") => fixed(Dcl, "GRANT"),
        "GrantStmt" | "GrantRoleStmt" => fixed(Dcl, "REVOKE"),
        "CreateRoleStmt" => {
            let kind = RoleStmtType::try_from(i32::try_from(node.int("stmt_type")).unwrap_or(0));
            let command = match kind {
                Ok(RoleStmtType::RolestmtUser) => "CREATE USER",
                Ok(RoleStmtType::RolestmtGroup) => "CREATE GROUP",
                _ => "CREATE ROLE",
            };
            fixed(Dcl, command)
        }
        "AlterRoleStmt" | "AlterRoleSetStmt" => fixed(Dcl, "ALTER ROLE"),
        "DropRoleStmt" => fixed(Dcl, "DROP ROLE"),
        "AlterDefaultPrivilegesStmt" => fixed(Dcl, "ALTER DEFAULT PRIVILEGES"),
        "ReassignOwnedStmt" => fixed(Dcl, "REASSIGN OWNED"),
        "DropOwnedStmt" => fixed(Dcl, "DROP OWNED"),
        // Handing an object to another role changes who holds its privileges.
        "AlterOwnerStmt" => on_object(Dcl, "ALTER", "object_type"),

        // Server administration.
        "VacuumStmt" if node.bool("is_vacuumcmd") => fixed(Admin, "VACUUM"),
        "VacuumStmt" => fixed(Admin, "ANALYZE"),
        "ClusterStmt" => fixed(Admin, "CLUSTER"),
        "ReindexStmt" => fixed(Admin, "REINDEX"),
        "CheckPointStmt" => fixed(Admin, "CHECKPOINT"),
        "AlterSystemStmt" => fixed(Admin, "ALTER SYSTEM"),
        // Loads a shared library into the server process.
        "LoadStmt" => fixed(Admin, "LOAD"),
        "CreateTableSpaceStmt" => fixed(Admin, "CREATE TABLESPACE"),
        "DropTableSpaceStmt" => fixed(Admin, "DROP TABLESPACE"),
        "AlterTableSpaceOptionsStmt" => fixed(Admin, "ALTER TABLESPACE"),
        "AlterTableMoveAllStmt" => on_object(Admin, "ALTER", "objtype"),
        "CreatePublicationStmt" => fixed(Admin, "CREATE PUBLICATION"),
        "AlterPublicationStmt" => fixed(Admin, "ALTER PUBLICATION"),
        "CreateSubscriptionStmt" => fixed(Admin, "CREATE SUBSCRIPTION"),
        "AlterSubscriptionStmt" => fixed(Admin, "ALTER SUBSCRIPTION"),
        "DropSubscriptionStmt" => fixed(Admin, "DROP SUBSCRIPTION"),

        // Schema changes.
        "DropStmt" => on_object(Ddl, "DROP", "remove_type"),
        "RenameStmt" => on_object(Ddl, "ALTER", "rename_type"),
        "AlterObjectSchemaStmt" | "AlterObjectDependsStmt" => {
            on_object(Ddl, "ALTER", "object_type")
        }
        "AlterTableStmt" => {
            let changes_owner = node
                .list("cmds")
                .iter()
                .any(|cmd| cmd.int("subtype") == i64::from(AlterTableType::AtChangeOwner as i32));
            on_object(if changes_owner { Dcl } else { Ddl }, "ALTER", "objtype")
        }
        "CreateStmt" => fixed(Ddl, "CREATE TABLE"),
        "CreateForeignTableStmt" => fixed(Ddl, "CREATE FOREIGN TABLE"),
        "CreateTableAsStmt" if object_type(node, "objtype") == ObjectType::ObjectMatview => {
            fixed(Ddl, "CREATE MATERIALIZED VIEW")
        }
        "CreateTableAsStmt" => fixed(Ddl, "CREATE TABLE AS"),
        "ViewStmt" => fixed(Ddl, "CREATE VIEW"),
        "IndexStmt" => fixed(Ddl, "CREATE INDEX"),
        "TruncateStmt" => fixed(Ddl, "TRUNCATE"),
        "CommentStmt" => fixed(Ddl, "COMMENT"),
        "SecLabelStmt" => fixed(Ddl, "SECURITY LABEL"),
        "RefreshMatViewStmt" => fixed(Ddl, "REFRESH MATERIALIZED VIEW"),
        "CreatedbStmt" => fixed(Ddl, "CREATE DATABASE"),
        "AlterDatabaseStmt" | "AlterDatabaseSetStmt" | "AlterDatabaseRefreshCollStmt" => {
            fixed(Ddl, "ALTER DATABASE")
        }
        "DropdbStmt" => fixed(Ddl, "DROP DATABASE"),
        "CreateSchemaStmt" => fixed(Ddl, "CREATE SCHEMA"),
        "CreateSeqStmt" => fixed(Ddl, "CREATE SEQUENCE"),
        "AlterSeqStmt" => fixed(Ddl, "ALTER SEQUENCE"),
        "CreateFunctionStmt" if node.bool("is_procedure") => fixed(Ddl, "CREATE PROCEDURE"),
        "CreateFunctionStmt" => fixed(Ddl, "CREATE FUNCTION"),
        "AlterFunctionStmt" => on_object(Ddl, "ALTER", "objtype"),
        "DefineStmt" => on_object(Ddl, "CREATE", "kind"),
        "CreateDomainStmt" => fixed(Ddl, "CREATE DOMAIN"),
        "AlterDomainStmt" => fixed(Ddl, "ALTER DOMAIN"),
        "CreateEnumStmt" | "CreateRangeStmt" | "CompositeTypeStmt" => fixed(Ddl, "CREATE TYPE"),
        "AlterEnumStmt" | "AlterTypeStmt" => fixed(Ddl, "ALTER TYPE"),
        "CreateExtensionStmt" => fixed(Ddl, "CREATE EXTENSION"),
        "AlterExtensionStmt" | "AlterExtensionContentsStmt" => fixed(Ddl, "ALTER EXTENSION"),
        "CreateTrigStmt" => fixed(Ddl, "CREATE TRIGGER"),
        "CreateEventTrigStmt" => fixed(Ddl, "CREATE EVENT TRIGGER"),
        "AlterEventTrigStmt" => fixed(Ddl, "ALTER EVENT TRIGGER"),
        "RuleStmt" => fixed(Ddl, "CREATE RULE"),
        "CreatePolicyStmt" => fixed(Ddl, "CREATE POLICY"),
        "AlterPolicyStmt" => fixed(Ddl, "ALTER POLICY"),
        "CreateStatsStmt" => fixed(Ddl, "CREATE STATISTICS"),
        "AlterStatsStmt" => fixed(Ddl, "ALTER STATISTICS"),
        "CreateCastStmt" => fixed(Ddl, "CREATE CAST"),
        "CreateConversionStmt" => fixed(Ddl, "CREATE CONVERSION"),
        "CreateTransformStmt" => fixed(Ddl, "CREATE TRANSFORM"),
        "CreateOpClassStmt" => fixed(Ddl, "CREATE OPERATOR CLASS"),
        "CreateOpFamilyStmt" => fixed(Ddl, "CREATE OPERATOR FAMILY"),
        "AlterOpFamilyStmt" => fixed(Ddl, "ALTER OPERATOR FAMILY"),
        "AlterOperatorStmt" => fixed(Ddl, "ALTER OPERATOR"),
        "CreateAmStmt" => fixed(Ddl, "CREATE ACCESS METHOD"),
        "CreatePlangStmt" => fixed(Ddl, "CREATE LANGUAGE"),
        "AlterCollationStmt" => fixed(Ddl, "ALTER COLLATION"),
        "AlterTsdictionaryStmt" => fixed(Ddl, "ALTER TEXT SEARCH DICTIONARY"),
        "AlterTsconfigurationStmt" => fixed(Ddl, "ALTER TEXT SEARCH CONFIGURATION"),
        "CreateFdwStmt" => fixed(Ddl, "CREATE FOREIGN DATA WRAPPER"),
        "AlterFdwStmt" => fixed(Ddl, "ALTER FOREIGN DATA WRAPPER"),
        "CreateForeignServerStmt" => fixed(Ddl, "CREATE SERVER"),
        "AlterForeignServerStmt" => fixed(Ddl, "ALTER SERVER"),
        "CreateUserMappingStmt" => fixed(Ddl, "CREATE USER MAPPING"),
        "AlterUserMappingStmt" => fixed(Ddl, "ALTER USER MAPPING"),
        "DropUserMappingStmt" => fixed(Ddl, "DROP USER MAPPING"),
        "ImportForeignSchemaStmt" => fixed(Ddl, "IMPORT FOREIGN SCHEMA"),
        _ => None,
    }
}

/// SET and RESET: most change a session setting; a few change who the session is or how its
/// transaction behaves. GUC names are case-insensitive (`SET "ROLE" = x` is `SET ROLE x`).
fn variable_set(node: &Tree) -> (StatementClass, String) {
    let kind = VariableSetKind::try_from(i32::try_from(node.int("kind")).unwrap_or(0))
        .unwrap_or(VariableSetKind::Undefined);
    let resets = matches!(
        kind,
        VariableSetKind::VarReset | VariableSetKind::VarResetAll
    );
    let verb = if resets { "RESET" } else { "SET" };
    let name = node.str("name");
    if name.eq_ignore_ascii_case("role") {
        return (StatementClass::Dcl, format!("{verb} ROLE"));
    }
    if name.eq_ignore_ascii_case("session_authorization") {
        return (StatementClass::Dcl, format!("{verb} SESSION AUTHORIZATION"));
    }
    if kind == VariableSetKind::VarSetMulti {
        if name.eq_ignore_ascii_case("session characteristics") {
            return (
                StatementClass::Transaction,
                "SET SESSION CHARACTERISTICS".to_owned(),
            );
        }
        if name.to_ascii_lowercase().starts_with("transaction") {
            return (StatementClass::Transaction, "SET TRANSACTION".to_owned());
        }
    }
    (StatementClass::Utility, verb.to_owned())
}
