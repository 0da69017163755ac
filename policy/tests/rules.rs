//! One row per rule shape: a small policy set, a request, and the decision it must produce.
//! Every row also checks that `explain` reaches exactly the decision `decide` does.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail loudly"
)]

mod common;

use common::*;
use portcullis_policy::{
    Action, ApprovalRequirement, Effect, Obligation, PolicySet, Principal, Quorum, Request,
    STATEMENT_CLASSES,
};

const MASKING: &str = r#"
[profiles.pii]
[[profiles.pii.rules]]
column = "email"
mask = "hash"

[profiles.pci]
[[profiles.pci.rules]]
column_regex = "(?i)card"
mask = "partial"
keep_last = 4
"#;

const APPROVALS: &str = r#"
default_approvals = 1
default_approver_group = "leads"
"#;

enum Want {
    Allow,
    Deny,
    Approval(&'static str, u32),
    /// Every group with its count (an AND of groups).
    Approvals(&'static [(&'static str, u32)]),
}

/// One approval from dba-leads and one from security, both needed.
const APPROVAL_OF_TWO_GROUPS: &str = r#"
@id("prod-ddl") @approvals("dba-leads:1, security:1")
permit (principal, action == Portcullis::Action::"query", resource)
when { context.statement_class == "write" };
"#;

/// A CI identity may restart the app unit and nothing else, and only as a simple command.
const RESTART_ONLY: &str = r#"
@id("restart-app")
permit (principal, action == Portcullis::Action::"ssh_exec", resource)
when {
    context.simple_command &&
    context has command_name && context.command_name == "systemctl" &&
    context has command_args && context.command_args == ["restart", "app"]
};
"#;

/// An SSH login name other than root (`context.ssh_user`, connect to SSH targets only).
const SSH_LOGINS: &str = r#"
@id("ssh-not-root")
permit (principal, action == Portcullis::Action::"connect", resource)
when { context has ssh_user && context.ssh_user != "root" };
"#;

struct Row {
    name: &'static str,
    policies: &'static str,
    request: Request,
    want: Want,
    matched: &'static [&'static str],
    masks: &'static [&'static str],
    reason: &'static str,
}

/// Every SFTP operation, but no reading under /etc/secret.
const SFTP_NO_SECRET_READS: &str = r#"
@id("sftp")
permit (principal, action == Portcullis::Action::"ssh_sftp", resource);
@id("no-secret-reads")
forbid (principal, action == Portcullis::Action::"ssh_sftp", resource)
when { context.sftp_operation == "read" && context.path like "/etc/secret/*" };
"#;

/// An SFTP operation (`None`: the subsystem's start) or a legacy scp transfer by sam.
fn file(action: Action, access: Option<(&str, &str)>) -> Request {
    let mut r = request(user("sam", &["sre"]), action, ssh_host());
    r.context.file = access.map(|(operation, path)| portcullis_policy::FileAccess {
        operation: operation.to_owned(),
        path: path.to_owned(),
        recursive: false,
    });
    r
}

const ANALYSTS_READ: &str = r#"
@id("analysts-read")
permit (principal in Portcullis::Group::"analysts", action == Portcullis::Action::"query", resource)
when { context.statement_class == "read" };
"#;

const READ_BUT_NO_DROP: &str = r#"
@id("everyone-query")
permit (principal, action == Portcullis::Action::"query", resource);
@id("no-drop")
@description("Nobody drops a database")
forbid (principal, action == Portcullis::Action::"query", resource)
when { context.command == "DROP DATABASE" };
"#;

const DDL_BUT_NO_TRUNCATE: &str = r#"
@id("ddl")
permit (principal, action == Portcullis::Action::"query", resource)
when { context.statement_class == "ddl" };
@id("no-truncate")
forbid (principal, action == Portcullis::Action::"query", resource)
when { context.command == "TRUNCATE" };
"#;

const SESSION_HOUSEKEEPING: &str = r#"
@id("housekeeping")
permit (principal, action == Portcullis::Action::"query", resource)
when { ["read", "transaction", "utility"].contains(context.statement_class) };
"#;

const PROD_LABEL: &str = r#"
@id("prod-only")
permit (principal, action == Portcullis::Action::"connect", resource)
when { resource.hasTag("environment") && resource.getTag("environment") == "production" };
"#;

const SSH_GROUP: &str = r#"
@id("ssh-all")
permit (principal in Portcullis::Group::"sre", action in Portcullis::Action::"ssh", resource);
"#;

const EXEC_ONLY: &str = r#"
@id("ci-exec")
permit (principal == Portcullis::ServiceIdentity::"ci", action == Portcullis::Action::"ssh_exec", resource);
"#;

const WINDOW: &str = r#"
@id("window")
permit (principal, action == Portcullis::Action::"query", resource)
when { context.weekday == 2 && context.hour >= 18 && context.hour < 22 };
"#;

const APPROVAL_TWO: &str = r#"
@id("prod-write")
@approval("dba-leads")
@approvals("2")
permit (principal, action == Portcullis::Action::"query", resource)
when { context.statement_class == "write" };
"#;

const NO_DYNAMIC_SQL: &str = r#"
@id("everyone-query")
permit (principal, action == Portcullis::Action::"query", resource);
@id("no-dynamic-sql")
forbid (principal in Portcullis::Group::"analysts", action == Portcullis::Action::"query", resource)
when { context.dynamic_sql };
"#;

const DYNAMIC_SQL_NEEDS_APPROVAL: &str = r#"
@id("everyone-query")
permit (principal, action == Portcullis::Action::"query", resource);
@id("dynamic-sql-approved")
@approval("dba-leads")
permit (principal, action == Portcullis::Action::"query", resource)
when { context.dynamic_sql };
"#;

const APPROVAL_AND_PLAIN: &str = r#"
@id("a-plain")
permit (principal in Portcullis::Group::"admins", action == Portcullis::Action::"query", resource);
@id("b-approval")
@approval
permit (principal, action == Portcullis::Action::"query", resource)
when { context.statement_class == "write" };
"#;

const TWO_APPROVALS: &str = r#"
@id("one-from-leads")
@approval("leads")
permit (principal, action == Portcullis::Action::"query", resource);
@id("three-from-security")
@approval("security")
@approvals("3")
permit (principal, action == Portcullis::Action::"query", resource)
when { context.statement_class == "write" };
"#;

const MASKS: &str = r#"
@id("read-masked-pii")
@mask("pii")
permit (principal, action == Portcullis::Action::"query", resource);
@id("read-masked-pci")
@mask("pci")
permit (principal in Portcullis::Group::"analysts", action == Portcullis::Action::"query", resource);
"#;

const OVERFLOWING_PERMIT: &str = r#"
@id("overflows")
permit (principal, action == Portcullis::Action::"query", resource)
when { context.unix_time + 9223372036854775807 > 0 };
"#;

const OVERFLOWING_FORBID: &str = r#"
@id("everyone-query")
permit (principal, action == Portcullis::Action::"query", resource);
@id("broken-forbid")
forbid (principal, action == Portcullis::Action::"query", resource)
when { context.unix_time * 9223372036854775807 > 0 };
"#;

fn rows() -> Vec<Row> {
    let analyst = || user("alice", &["analysts"]);
    let mut no_class = query(analyst(), staging_db(), "read");
    no_class.context.statement_class = None;
    let mut no_command = exec(service("ci"), ssh_host(), "x");
    no_command.context.command_line = None;
    let simple_exec = |line: &str, simple: bool| {
        let mut r = exec(service("ci"), ssh_host(), line);
        let mut words = line.split(' ').map(str::to_owned);
        r.context.command_name = words.next();
        r.context.simple_command = simple;
        if simple {
            r.context.command_args = words.collect();
        }
        r
    };
    let ssh_login = |login: &str| {
        let mut r = request(user("sam", &["sre"]), Action::Connect, ssh_host());
        r.context.ssh_user = Some(login.to_owned());
        r
    };
    let mut no_sql_command = query(analyst(), staging_db(), "read");
    no_sql_command.context.command = None;
    let mut no_db_user = query(analyst(), staging_db(), "read");
    no_db_user.context.db_user = None;
    let mut bad_hour = query(analyst(), staging_db(), "read");
    bad_hour.context.hour = 24;
    let mut from_python = query(analyst(), staging_db(), "read");
    from_python.context.source_comm = "python3".to_owned();
    let mut payroll = query(analyst(), staging_db(), "read");
    payroll.context.tables = vec!["public.orders".to_owned(), "hr.payroll".to_owned()];
    let mut read_file = query(analyst(), staging_db(), "read");
    read_file.context.functions = vec!["pg_read_file".to_owned()];
    let mut other_db = query(analyst(), staging_db(), "read");
    other_db.context.db_name = Some("billing".to_owned());
    let mut root = request(user("bob", &[]), Action::Connect, staging_db());
    root.context.source_uid = 0;
    let mut with_db = request(user("bob", &[]), Action::Connect, staging_db());
    with_db.context.db_name = Some("billing".to_owned());
    let do_block = |dynamic_sql: bool| {
        let mut request = sql(analyst(), staging_db(), "do", "DO");
        request.context.dynamic_sql = dynamic_sql;
        request
    };
    let mut anonymous = request(user("bob", &[]), Action::Connect, staging_db());
    anonymous.principal.email = None;

    vec![
        Row {
            name: "empty set denies by default",
            policies: "",
            request: query(analyst(), staging_db(), "read"),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "permit by principal id",
            policies: r#"@id("alice") permit (principal == Portcullis::User::"alice", action, resource);"#,
            request: request(analyst(), Action::Connect, staging_db()),
            want: Want::Allow,
            matched: &["alice"],
            masks: &[],
            reason: "permitted by `alice`",
        },
        Row {
            name: "permit by principal id does not cover another user",
            policies: r#"@id("alice") permit (principal == Portcullis::User::"alice", action, resource);"#,
            request: request(user("mallory", &[]), Action::Connect, staging_db()),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "permit by group allows a member",
            policies: ANALYSTS_READ,
            request: query(analyst(), staging_db(), "read"),
            want: Want::Allow,
            matched: &["analysts-read"],
            masks: &[],
            reason: "analysts-read",
        },
        Row {
            name: "permit by group denies a non-member",
            policies: ANALYSTS_READ,
            request: query(user("bob", &["engineers"]), staging_db(), "read"),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "statement class outside the permit is denied",
            policies: ANALYSTS_READ,
            request: query(analyst(), staging_db(), "write"),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "no policy permits query",
        },
        Row {
            name: "permit by principal type admits service identities only",
            policies: r#"@id("services") permit (principal is Portcullis::ServiceIdentity, action == Portcullis::Action::"connect", resource);"#,
            request: request(service("backup"), Action::Connect, staging_db()),
            want: Want::Allow,
            matched: &["services"],
            masks: &[],
            reason: "services",
        },
        Row {
            name: "permit by email domain",
            policies: r#"@id("staff") permit (principal is Portcullis::User, action == Portcullis::Action::"connect", resource)
                when { principal has email && principal.email like "*@example.com" };"#,
            request: request(user("bob", &[]), Action::Connect, staging_db()),
            want: Want::Allow,
            matched: &["staff"],
            masks: &[],
            reason: "staff",
        },
        Row {
            name: "permit by email does not hold without an email",
            policies: r#"@id("staff") permit (principal is Portcullis::User, action == Portcullis::Action::"connect", resource)
                when { principal has email && principal.email like "*@example.com" };"#,
            request: anonymous,
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "permit by target name",
            policies: r#"@id("db1") permit (principal, action, resource == Portcullis::Target::"db-staging");"#,
            request: request(user("bob", &[]), Action::Connect, staging_db()),
            want: Want::Allow,
            matched: &["db1"],
            masks: &[],
            reason: "db1",
        },
        Row {
            name: "permit by target name does not cover another target",
            policies: r#"@id("db1") permit (principal, action, resource == Portcullis::Target::"db-staging");"#,
            request: request(user("bob", &[]), Action::Connect, production_db()),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "permit by label",
            policies: PROD_LABEL,
            request: request(user("bob", &[]), Action::Connect, production_db()),
            want: Want::Allow,
            matched: &["prod-only"],
            masks: &[],
            reason: "prod-only",
        },
        Row {
            name: "permit by label does not hold for a target without the label",
            policies: PROD_LABEL,
            request: request(user("bob", &[]), Action::Connect, target("x", "tcp", &[])),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "exec allowed by command name and args of a simple command",
            policies: RESTART_ONLY,
            request: simple_exec("systemctl restart app", true),
            want: Want::Allow,
            matched: &["restart-app"],
            masks: &[],
            reason: "restart-app",
        },
        Row {
            name: "exec with shell syntax is not simple, whatever its first word",
            policies: RESTART_ONLY,
            request: simple_exec("systemctl restart app ; rm -rf /", false),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "exec of another unit is refused",
            policies: RESTART_ONLY,
            request: simple_exec("systemctl restart db", true),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "ssh login name in connect context",
            policies: SSH_LOGINS,
            request: ssh_login("deploy"),
            want: Want::Allow,
            matched: &["ssh-not-root"],
            masks: &[],
            reason: "ssh-not-root",
        },
        Row {
            name: "ssh login name refused",
            policies: SSH_LOGINS,
            request: ssh_login("root"),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "ssh login name absent for other protocols",
            policies: SSH_LOGINS,
            request: request(user("sam", &["sre"]), Action::Connect, production_db()),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "permit by protocol",
            policies: r#"@id("pg") permit (principal, action == Portcullis::Action::"connect", resource) when { resource.protocol == "postgres" };"#,
            request: request(user("bob", &[]), Action::Connect, ssh_host()),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "action group ssh covers exec",
            policies: SSH_GROUP,
            request: exec(user("sam", &["sre"]), ssh_host(), "uptime"),
            want: Want::Allow,
            matched: &["ssh-all"],
            masks: &[],
            reason: "ssh-all",
        },
        Row {
            name: "action group ssh does not cover connect",
            policies: SSH_GROUP,
            request: request(user("sam", &["sre"]), Action::Connect, ssh_host()),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "exec permit does not cover an interactive shell",
            policies: EXEC_ONLY,
            request: request(service("ci"), Action::SshShell, ssh_host()),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "no policy permits ssh_shell",
        },
        Row {
            name: "action no policy names is denied",
            policies: EXEC_ONLY,
            request: request(service("ci"), Action::SshAgentForward, ssh_host()),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "no policy permits ssh_agent_forward",
        },
        Row {
            name: "command line pattern",
            policies: r#"@id("deploy") permit (principal, action == Portcullis::Action::"ssh_exec", resource) when { context.command_line like "/opt/deploy/*" };"#,
            request: exec(service("ci"), ssh_host(), "rm -rf /"),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "forbid wins over permit",
            policies: READ_BUT_NO_DROP,
            request: drop_database(analyst(), production_db()),
            want: Want::Deny,
            matched: &["no-drop"],
            masks: &[],
            reason: "forbidden by `no-drop` (rules/policies.cedar line 4): Nobody drops a database",
        },
        Row {
            name: "forbid that does not hold leaves the permit",
            policies: READ_BUT_NO_DROP,
            request: query(analyst(), production_db(), "read"),
            want: Want::Allow,
            matched: &["everyone-query"],
            masks: &[],
            reason: "everyone-query",
        },
        Row {
            name: "forbid by command does not reach other commands of the class",
            policies: READ_BUT_NO_DROP,
            request: sql(analyst(), production_db(), "ddl", "DROP TABLE"),
            want: Want::Allow,
            matched: &["everyone-query"],
            masks: &[],
            reason: "everyone-query",
        },
        Row {
            name: "forbid by command singles out truncate",
            policies: DDL_BUT_NO_TRUNCATE,
            request: truncate(analyst(), production_db()),
            want: Want::Deny,
            matched: &["no-truncate"],
            masks: &[],
            reason: "forbidden by `no-truncate`",
        },
        Row {
            name: "other ddl passes a truncate forbid",
            policies: DDL_BUT_NO_TRUNCATE,
            request: query(analyst(), production_db(), "ddl"),
            want: Want::Allow,
            matched: &["ddl"],
            masks: &[],
            reason: "ddl",
        },
        Row {
            name: "a set of classes admits transaction control",
            policies: SESSION_HOUSEKEEPING,
            request: sql(analyst(), staging_db(), "transaction", "BEGIN"),
            want: Want::Allow,
            matched: &["housekeeping"],
            masks: &[],
            reason: "housekeeping",
        },
        Row {
            name: "a set of classes does not admit a DO block",
            policies: SESSION_HOUSEKEEPING,
            request: query(analyst(), staging_db(), "do"),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "tables touched",
            policies: r#"@id("q") permit (principal, action == Portcullis::Action::"query", resource);
                @id("no-payroll") forbid (principal, action == Portcullis::Action::"query", resource) when { context.tables.contains("hr.payroll") };"#,
            request: payroll,
            want: Want::Deny,
            matched: &["no-payroll"],
            masks: &[],
            reason: "no-payroll",
        },
        Row {
            name: "functions touched",
            policies: r#"@id("q") permit (principal, action == Portcullis::Action::"query", resource);
                @id("no-file-reads") forbid (principal, action == Portcullis::Action::"query", resource)
                when { context.functions.containsAny(["pg_read_file", "pg_read_binary_file"]) };"#,
            request: read_file,
            want: Want::Deny,
            matched: &["no-file-reads"],
            masks: &[],
            reason: "no-file-reads",
        },
        Row {
            name: "database name",
            policies: r#"@id("app-db") permit (principal, action == Portcullis::Action::"query", resource) when { context.db_name == "app" && context.db_user == "app" };"#,
            request: other_db,
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "optional database name on connect",
            policies: r#"@id("billing") permit (principal, action == Portcullis::Action::"connect", resource) when { context has db_name && context.db_name == "billing" };"#,
            request: with_db,
            want: Want::Allow,
            matched: &["billing"],
            masks: &[],
            reason: "billing",
        },
        Row {
            name: "source program",
            policies: r#"@id("psql-only") permit (principal, action == Portcullis::Action::"query", resource) when { context.source_comm == "psql" };"#,
            request: from_python,
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "source uid",
            policies: r#"@id("p") permit (principal, action, resource);
                @id("not-root") forbid (principal, action, resource) when { context.source_uid == 0 };"#,
            request: root,
            want: Want::Deny,
            matched: &["not-root"],
            masks: &[],
            reason: "not-root",
        },
        Row {
            name: "inside the time window",
            policies: WINDOW,
            request: at(query(analyst(), staging_db(), "ddl"), 2, 19),
            want: Want::Allow,
            matched: &["window"],
            masks: &[],
            reason: "window",
        },
        Row {
            name: "outside the time window",
            policies: WINDOW,
            request: at(query(analyst(), staging_db(), "ddl"), 2, 22),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "unless excludes",
            policies: r#"@id("not-contractors") permit (principal, action, resource) unless { principal in Portcullis::Group::"contractors" };"#,
            request: request(
                user("carl", &["contractors"]),
                Action::Connect,
                staging_db(),
            ),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "approval with group and count",
            policies: APPROVAL_TWO,
            request: query(analyst(), production_db(), "write"),
            want: Want::Approval("dba-leads", 2),
            matched: &["prod-write"],
            masks: &[],
            reason: "needs 2 approvals from group `dba-leads`",
        },
        Row {
            name: "bare approval takes the defaults of approvals.toml",
            policies: APPROVAL_AND_PLAIN,
            request: query(analyst(), production_db(), "write"),
            want: Want::Approval("leads", 1),
            matched: &["b-approval"],
            masks: &[],
            reason: "needs 1 approval from group `leads`",
        },
        Row {
            name: "approval is not bypassed by another permit",
            policies: APPROVAL_AND_PLAIN,
            request: query(user("root", &["admins"]), production_db(), "write"),
            want: Want::Approval("leads", 1),
            matched: &["a-plain", "b-approval"],
            masks: &[],
            reason: "required by `b-approval`",
        },
        Row {
            name: "strictest approval applies",
            policies: TWO_APPROVALS,
            request: query(analyst(), production_db(), "write"),
            want: Want::Approval("security", 3),
            matched: &["one-from-leads", "three-from-security"],
            masks: &[],
            reason: "needs 3 approvals from group `security`",
        },
        Row {
            name: "approval from each of two groups",
            policies: APPROVAL_OF_TWO_GROUPS,
            request: query(analyst(), production_db(), "write"),
            want: Want::Approvals(&[("dba-leads", 1), ("security", 1)]),
            matched: &["prod-ddl"],
            masks: &[],
            reason: "needs 1 approval from group `dba-leads` and 1 approval from group `security`",
        },
        Row {
            name: "mask obligation",
            policies: MASKS,
            request: query(user("bob", &[]), staging_db(), "read"),
            want: Want::Allow,
            matched: &["read-masked-pii"],
            masks: &["pii"],
            reason: "masked with profile `pii`",
        },
        Row {
            name: "masks of every permit that holds apply together",
            policies: MASKS,
            request: query(analyst(), staging_db(), "read"),
            want: Want::Allow,
            matched: &["read-masked-pci", "read-masked-pii"],
            masks: &["pci", "pii"],
            reason: "masked with profile `pci`",
        },
        Row {
            name: "denial carries no obligations",
            policies: r#"@id("m") @mask("pii") permit (principal, action, resource);
                @id("f") forbid (principal, action, resource);"#,
            request: query(analyst(), staging_db(), "read"),
            want: Want::Deny,
            matched: &["f"],
            masks: &[],
            reason: "forbidden by `f`",
        },
        Row {
            name: "missing statement class is denied",
            policies: r#"@id("all") permit (principal, action, resource);"#,
            request: no_class,
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "lacks context `statement_class`",
        },
        Row {
            name: "missing command line is denied",
            policies: r#"@id("all") permit (principal, action, resource);"#,
            request: no_command,
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "lacks context `command_line`",
        },
        Row {
            name: "missing SQL command is denied",
            policies: r#"@id("all") permit (principal, action, resource);"#,
            request: no_sql_command,
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "lacks context `command`",
        },
        Row {
            name: "missing database user is denied",
            policies: r#"@id("all") permit (principal, action, resource);"#,
            request: no_db_user,
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "lacks context `db_user`",
        },
        Row {
            name: "unknown statement class is denied",
            policies: r#"@id("all") permit (principal, action, resource);"#,
            request: query(analyst(), staging_db(), "select"),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "unknown statement class `select`",
        },
        Row {
            name: "a retired statement class is unknown",
            policies: r#"@id("all") permit (principal, action, resource);"#,
            request: query(analyst(), staging_db(), "drop_database"),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "unknown statement class `drop_database`",
        },
        Row {
            name: "hour out of range is denied",
            policies: r#"@id("all") permit (principal, action, resource);"#,
            request: bad_hour,
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "hour 24 is out of range",
        },
        Row {
            name: "permit that fails to evaluate denies",
            policies: OVERFLOWING_PERMIT,
            request: query(analyst(), staging_db(), "read"),
            want: Want::Deny,
            matched: &["overflows"],
            masks: &[],
            reason: "could not be evaluated",
        },
        Row {
            name: "forbid that fails to evaluate denies even when a permit holds",
            policies: OVERFLOWING_FORBID,
            request: query(analyst(), staging_db(), "read"),
            want: Want::Deny,
            matched: &["broken-forbid"],
            masks: &[],
            reason: "overflow",
        },
        Row {
            name: "principal type within a group",
            policies: r#"@id("people-in-ops") permit (principal is Portcullis::User in Portcullis::Group::"ops", action == Portcullis::Action::"connect", resource);"#,
            request: request(user("olly", &["ops"]), Action::Connect, staging_db()),
            want: Want::Allow,
            matched: &["people-in-ops"],
            masks: &[],
            reason: "people-in-ops",
        },
        Row {
            name: "principal type within a group excludes other types",
            policies: r#"@id("people-in-ops") permit (principal is Portcullis::User in Portcullis::Group::"ops", action == Portcullis::Action::"connect", resource);"#,
            request: request(
                Principal {
                    groups: vec!["ops".to_owned()],
                    ..service("ops-bot")
                },
                Action::Connect,
                staging_db(),
            ),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "denied by default",
        },
        Row {
            name: "service identity in a group",
            policies: r#"@id("batch") permit (principal in Portcullis::Group::"batch-jobs", action == Portcullis::Action::"connect", resource);"#,
            request: request(
                Principal {
                    groups: vec!["batch-jobs".to_owned()],
                    ..service("nightly-report")
                },
                Action::Connect,
                staging_db(),
            ),
            want: Want::Allow,
            matched: &["batch"],
            masks: &[],
            reason: "batch",
        },
        Row {
            name: "a group listed twice decides once",
            policies: ANALYSTS_READ,
            request: query(
                user("alice", &["analysts", "analysts"]),
                staging_db(),
                "read",
            ),
            want: Want::Allow,
            matched: &["analysts-read"],
            masks: &[],
            reason: "analysts-read",
        },
        Row {
            name: "sftp read under a tree a forbid names",
            policies: SFTP_NO_SECRET_READS,
            request: file(Action::SshSftp, Some(("read", "/etc/secret/db.key"))),
            want: Want::Deny,
            matched: &["no-secret-reads"],
            masks: &[],
            reason: "no-secret-reads",
        },
        Row {
            name: "sftp write under that tree is not a read",
            policies: SFTP_NO_SECRET_READS,
            request: file(Action::SshSftp, Some(("write", "/etc/secret/db.key"))),
            want: Want::Allow,
            matched: &["sftp"],
            masks: &[],
            reason: "sftp",
        },
        Row {
            name: "sftp subsystem start has no path for a path rule to match",
            policies: SFTP_NO_SECRET_READS,
            request: file(Action::SshSftp, None),
            want: Want::Allow,
            matched: &["sftp"],
            masks: &[],
            reason: "sftp",
        },
        Row {
            name: "legacy scp upload to a path a forbid names",
            policies: r#"@id("scp") permit (principal, action == Portcullis::Action::"ssh_scp", resource);
                @id("no-locked-uploads") forbid (principal, action == Portcullis::Action::"ssh_scp", resource)
                when { context.direction == "upload" && context.path like "/srv/locked/*" };"#,
            request: file(Action::SshScp, Some(("upload", "/srv/locked/x"))),
            want: Want::Deny,
            matched: &["no-locked-uploads"],
            masks: &[],
            reason: "no-locked-uploads",
        },
        Row {
            name: "an ssh_exec permit does not cover legacy scp",
            policies: r#"@id("exec") permit (principal, action == Portcullis::Action::"ssh_exec", resource);"#,
            request: file(Action::SshScp, Some(("download", "/srv/x"))),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "no policy permits ssh_scp",
        },
        Row {
            name: "forbid on an action group reaches its members",
            policies: r#"@id("all") permit (principal, action, resource);
                @id("no-ssh-on-prod") forbid (principal, action in Portcullis::Action::"ssh", resource)
                when { resource.hasTag("environment") && resource.getTag("environment") == "production" };"#,
            request: request(user("sam", &["sre"]), Action::SshForwardLocal, ssh_host()),
            want: Want::Deny,
            matched: &["no-ssh-on-prod"],
            masks: &[],
            reason: "no-ssh-on-prod",
        },
        Row {
            name: "local forward to the one destination a policy names",
            policies: r#"@id("tunnel") permit (principal, action == Portcullis::Action::"ssh_forward_local", resource)
                when { context.destination_host == "db.internal" && context.destination_port == 5432 };"#,
            request: forward(
                user("sam", &["sre"]),
                ssh_host(),
                false,
                "db.internal",
                5432,
            ),
            want: Want::Allow,
            matched: &["tunnel"],
            masks: &[],
            reason: "tunnel",
        },
        Row {
            name: "local forward to another port of that host",
            policies: r#"@id("tunnel") permit (principal, action == Portcullis::Action::"ssh_forward_local", resource)
                when { context.destination_host == "db.internal" && context.destination_port == 5432 };"#,
            request: forward(
                user("sam", &["sre"]),
                ssh_host(),
                false,
                "db.internal",
                5433,
            ),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "no policy permits ssh_forward_local",
        },
        Row {
            name: "a local forward permit does not cover a remote forward",
            policies: r#"@id("tunnel") permit (principal, action == Portcullis::Action::"ssh_forward_local", resource);"#,
            request: forward(user("sam", &["sre"]), ssh_host(), true, "127.0.0.1", 8080),
            want: Want::Deny,
            matched: &[],
            masks: &[],
            reason: "no policy permits ssh_forward_remote",
        },
        Row {
            name: "remote forward decided on its bind port",
            policies: r#"@id("high-ports") permit (principal, action == Portcullis::Action::"ssh_forward_remote", resource)
                when { context.bind_address == "127.0.0.1" && context.bind_port >= 1024 };"#,
            request: forward(user("sam", &["sre"]), ssh_host(), true, "127.0.0.1", 8080),
            want: Want::Allow,
            matched: &["high-ports"],
            masks: &[],
            reason: "high-ports",
        },
        Row {
            name: "forbid naming one user leaves others alone",
            policies: r#"@id("all") permit (principal, action, resource);
                @id("not-mallory") forbid (principal == Portcullis::User::"mallory", action, resource);"#,
            request: request(user("alice", &["mallory"]), Action::Connect, staging_db()),
            want: Want::Allow,
            matched: &["all"],
            masks: &[],
            reason: "permitted by `all`",
        },
        Row {
            name: "forbid on dynamic_sql denies a DO block whose SQL cannot be read",
            policies: NO_DYNAMIC_SQL,
            request: do_block(true),
            want: Want::Deny,
            matched: &["no-dynamic-sql"],
            masks: &[],
            reason: "no-dynamic-sql",
        },
        Row {
            name: "forbid on dynamic_sql leaves a DO block it can read alone",
            policies: NO_DYNAMIC_SQL,
            request: do_block(false),
            want: Want::Allow,
            matched: &["everyone-query"],
            masks: &[],
            reason: "permitted by `everyone-query`",
        },
        Row {
            name: "forbid on dynamic_sql applies only to its principals",
            policies: NO_DYNAMIC_SQL,
            request: {
                let mut request = do_block(true);
                request.principal = user("dba", &["dbas"]);
                request
            },
            want: Want::Allow,
            matched: &["everyone-query"],
            masks: &[],
            reason: "permitted by `everyone-query`",
        },
        Row {
            name: "dynamic_sql can require approval despite a broader permit",
            policies: DYNAMIC_SQL_NEEDS_APPROVAL,
            request: do_block(true),
            want: Want::Approval("dba-leads", 1),
            matched: &["dynamic-sql-approved", "everyone-query"],
            masks: &[],
            reason: "needs 1 approval from group `dba-leads`",
        },
        Row {
            name: "dynamic_sql is false for a statement without it",
            policies: DYNAMIC_SQL_NEEDS_APPROVAL,
            request: do_block(false),
            want: Want::Allow,
            matched: &["everyone-query"],
            masks: &[],
            reason: "permitted by `everyone-query`",
        },
    ]
}

fn load(policies: &str) -> PolicySet {
    PolicySet::load([
        ("rules/policies.cedar", policies),
        ("rules/masking.toml", MASKING),
        ("rules/approvals.toml", APPROVALS),
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn rule_shapes_decide_as_intended() {
    let mut failures = Vec::new();
    for row in rows() {
        let set = load(row.policies);
        let decision = set.decide(&row.request);
        let want_effect = match row.want {
            Want::Allow => Effect::Allow,
            Want::Deny => Effect::Deny,
            Want::Approval(group, approvals) => {
                Effect::RequireApproval(ApprovalRequirement::of(group, approvals))
            }
            Want::Approvals(groups) => Effect::RequireApproval(ApprovalRequirement {
                quorums: groups
                    .iter()
                    .map(|(group, approvals)| Quorum {
                        group: (*group).to_owned(),
                        approvals: *approvals,
                    })
                    .collect(),
            }),
        };
        let matched: Vec<&str> = decision.matched.iter().map(|id| id.as_str()).collect();
        let masks: Vec<&str> = decision
            .obligations
            .iter()
            .map(|Obligation::Mask { profile }| profile.as_str())
            .collect();
        if decision.effect != want_effect
            || matched != row.matched
            || masks != row.masks
            || !decision.reason.contains(row.reason)
        {
            failures.push(format!(
                "{}: got {:?} matched {matched:?} masks {masks:?} reason {:?}",
                row.name, decision.effect, decision.reason
            ));
        }
        let explanation = set.explain(&row.request);
        if explanation.decision != decision {
            failures.push(format!("{}: explain disagrees with decide", row.name));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn every_statement_class_of_the_classifier_is_evaluable() {
    let set =
        load(r#"@id("all") permit (principal, action == Portcullis::Action::"query", resource);"#);
    assert_eq!(
        STATEMENT_CLASSES,
        [
            "read",
            "write",
            "ddl",
            "dcl",
            "transaction",
            "utility",
            "admin",
            "call",
            "do"
        ]
    );
    for class in STATEMENT_CLASSES {
        let decision = set.decide(&query(user("alice", &[]), staging_db(), class));
        assert_eq!(
            decision.effect,
            Effect::Allow,
            "{class}: {}",
            decision.reason
        );
    }
    for retired in ["drop_database", "truncate", "other"] {
        let decision = set.decide(&query(user("alice", &[]), staging_db(), retired));
        assert_eq!(decision.effect, Effect::Deny, "{retired}");
    }
}

#[test]
fn could_permit_sees_scopes_not_conditions() {
    let set = load(
        r#"@id("tunnel") permit (principal in Portcullis::Group::"sre", action == Portcullis::Action::"ssh_forward_local", resource)
            when { context.destination_port == 5432 };
        @id("no") forbid (principal, action == Portcullis::Action::"ssh_forward_remote", resource);"#,
    );
    let sre = || user("sam", &["sre"]);
    // Asked before the destination is known: the condition is not evaluated.
    let mut bare = request(sre(), Action::SshForwardLocal, ssh_host());
    bare.context.forward = None;
    assert!(set.could_permit(&bare));
    assert!(!set.could_permit(&request(
        user("eve", &[]),
        Action::SshForwardLocal,
        ssh_host()
    )));
    // A forbid is not a permit.
    assert!(!set.could_permit(&request(sre(), Action::SshForwardRemote, ssh_host())));
    assert!(!set.could_permit(&request(sre(), Action::SshAgentForward, ssh_host())));
}

#[test]
fn deciding_is_repeatable() {
    let set = load(TWO_APPROVALS);
    let request = query(user("alice", &[]), production_db(), "write");
    let first = set.decide(&request);
    for _ in 0..50 {
        assert_eq!(set.decide(&request), first);
    }
}

#[test]
fn explain_accounts_for_every_policy() {
    let set = load(
        r#"
@id("analysts-read")
permit (principal in Portcullis::Group::"analysts", action == Portcullis::Action::"query", resource)
when { context.statement_class == "read" };
@id("ssh-all")
permit (principal, action in Portcullis::Action::"ssh", resource);
@id("only-prod")
permit (principal, action == Portcullis::Action::"query", resource == Portcullis::Target::"db-prod");
@id("no-drop")
forbid (principal, action == Portcullis::Action::"query", resource)
when { context.command == "DROP DATABASE" };
@id("admins")
permit (principal in Portcullis::Group::"admins", action, resource);
"#,
    );
    let explanation = set.explain(&query(user("alice", &["analysts"]), staging_db(), "write"));
    let text = explanation.to_string();
    for expected in [
        "decision: deny",
        "analysts-read (rules/policies.cedar line 2, column 1): in scope, conditions not met",
        "ssh-all (rules/policies.cedar line 5, column 1): not applicable: its action scope does not include `query`",
        "only-prod (rules/policies.cedar line 7, column 1): not applicable: its resource scope does not include Portcullis::Target::\"db-staging\"",
        "no-drop (rules/policies.cedar line 9, column 1): in scope, conditions not met",
        "admins (rules/policies.cedar line 12, column 1): not applicable: its principal scope does not include Portcullis::User::\"alice\"",
        "statement class `write`, SQL command `INSERT`",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }

    let explanation = set.explain(&drop_database(
        user("root", &["admins", "analysts"]),
        staging_db(),
    ));
    let text = explanation.to_string();
    assert!(text.contains("forbid no-drop"), "{text}");
    assert!(text.contains("satisfied; decided"), "{text}");
    assert!(
        text.contains("admins (rules/policies.cedar line 12, column 1): satisfied; did not decide"),
        "{text}"
    );
}

#[test]
fn explain_of_an_unevaluable_request_evaluates_nothing() {
    let set = load(ANALYSTS_READ);
    let mut request = query(user("alice", &["analysts"]), staging_db(), "read");
    request.context.weekday = 0;
    let explanation = set.explain(&request);
    assert_eq!(explanation.decision.effect, Effect::Deny);
    assert!(explanation.decision.reason.contains("weekday 0"));
    assert!(explanation.to_string().contains("not evaluated"));
}
