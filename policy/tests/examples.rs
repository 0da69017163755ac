//! The example policy sets in `examples/` make the decisions their comments promise.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail loudly"
)]

mod common;

use std::time::Duration;

use common::*;
use portcullis_policy::{
    Action, ApprovalRequirement, Effect, MaskKind, Obligation, PolicySet, Principal, Request,
};

fn load_example(name: &str) -> PolicySet {
    let set = PolicySet::load(read_policy_dir(&example_dir(name)))
        .unwrap_or_else(|e| panic!("example {name}: {e}"));
    assert!(
        set.warnings().is_empty(),
        "example {name} loads with warnings: {:?}",
        set.warnings()
    );
    set
}

struct Row {
    name: &'static str,
    request: Request,
    effect: Effect,
    matched: &'static [&'static str],
    masks: &'static [&'static str],
}

fn allow(name: &'static str, request: Request, matched: &'static [&'static str]) -> Row {
    Row {
        name,
        request,
        effect: Effect::Allow,
        matched,
        masks: &[],
    }
}

fn deny(name: &'static str, request: Request, matched: &'static [&'static str]) -> Row {
    Row {
        name,
        request,
        effect: Effect::Deny,
        matched,
        masks: &[],
    }
}

fn check(example: &str, rows: Vec<Row>) {
    let set = load_example(example);
    let mut failures = Vec::new();
    for row in rows {
        let decision = set.decide(&row.request);
        let matched: Vec<&str> = decision.matched.iter().map(|id| id.as_str()).collect();
        let masks: Vec<&str> = decision
            .obligations
            .iter()
            .map(|Obligation::Mask { profile }| profile.as_str())
            .collect();
        if decision.effect != row.effect || matched != row.matched || masks != row.masks {
            failures.push(format!(
                "{}: got {:?} matched {matched:?} masks {masks:?}: {}",
                row.name, decision.effect, decision.reason
            ));
        }
    }
    assert!(failures.is_empty(), "{example}:\n{}", failures.join("\n"));
}

#[test]
fn analysts_read_masked_and_compliance_reads_in_clear() {
    let analyst = || user("alice", &["analysts"]);
    let officer = || user("olga", &["compliance"]);
    check(
        "analysts",
        vec![
            allow(
                "analyst connects to a database",
                request(analyst(), Action::Connect, production_db()),
                &["analysts-connect"],
            ),
            deny(
                "analyst cannot open an ssh target",
                request(analyst(), Action::Connect, ssh_host()),
                &[],
            ),
            Row {
                masks: &["pii"],
                ..allow(
                    "analyst reads, masked",
                    query(analyst(), production_db(), "read"),
                    &["analysts-read"],
                )
            },
            deny(
                "analyst cannot write",
                query(analyst(), staging_db(), "write"),
                &[],
            ),
            deny(
                "analyst cannot change schemas",
                query(analyst(), staging_db(), "ddl"),
                &[],
            ),
            Row {
                masks: &["pii"],
                ..allow(
                    "analyst opens a transaction",
                    sql(analyst(), production_db(), "transaction", "BEGIN"),
                    &["analysts-read"],
                )
            },
            Row {
                masks: &["pii"],
                ..allow(
                    "analyst sets a session setting",
                    sql(analyst(), production_db(), "utility", "SET"),
                    &["analysts-read"],
                )
            },
            deny(
                "analyst cannot switch roles",
                sql(analyst(), production_db(), "dcl", "SET ROLE"),
                &[],
            ),
            deny(
                "analyst cannot run a DO block",
                query(analyst(), production_db(), "do"),
                &[],
            ),
            deny(
                "no analyst runs SQL built at run time, whatever else is permitted",
                {
                    let mut request = query(analyst(), production_db(), "do");
                    request.context.dynamic_sql = true;
                    request
                },
                &["analysts-no-dynamic-sql"],
            ),
            deny(
                "nor does compliance",
                {
                    let mut request = query(officer(), production_db(), "do");
                    request.context.dynamic_sql = true;
                    request
                },
                &["analysts-no-dynamic-sql"],
            ),
            deny(
                "analyst cannot call a procedure",
                query(analyst(), production_db(), "call"),
                &[],
            ),
            allow(
                "compliance reads in clear",
                query(officer(), production_db(), "read"),
                &["compliance-read"],
            ),
            allow(
                "an analyst in compliance reads in clear",
                query(
                    user("ann", &["analysts", "compliance"]),
                    production_db(),
                    "read",
                ),
                &["compliance-read"],
            ),
            deny(
                "compliance cannot write",
                query(officer(), production_db(), "write"),
                &[],
            ),
            deny(
                "nobody else reads",
                query(user("eve", &["sales"]), production_db(), "read"),
                &[],
            ),
        ],
    );
}

#[test]
fn analysts_masking_profile_covers_card_numbers_and_emails() {
    let set = load_example("analysts");
    let pii = set.masking_profile("pii").expect("pii profile");
    let mask_of = |column: &str| pii.rule_for_column(column).map(|rule| rule.mask.clone());
    let partial = Some(MaskKind::Partial {
        keep_first: 0,
        keep_last: 4,
    });
    assert_eq!(mask_of("card_number"), partial);
    assert_eq!(mask_of("CC_NUM"), partial);
    assert_eq!(mask_of("pan"), partial);
    assert_eq!(mask_of("email"), Some(MaskKind::Hash));
    assert_eq!(mask_of("E_Mail_Address"), Some(MaskKind::Hash));
    assert_eq!(mask_of("name"), None);
    assert_eq!(mask_of("card_holder"), None);
}

#[test]
fn production_changes_need_approval_windows_and_never_drop() {
    let engineer = || user("eli", &["engineers"]);
    let dba = || user("dora", &["dba", "engineers"]);
    check(
        "production-changes",
        vec![
            allow(
                "engineer reads production",
                query(engineer(), production_db(), "read"),
                &["engineers-read"],
            ),
            allow(
                "engineer writes to staging",
                query(engineer(), staging_db(), "write"),
                &["engineers-write-staging"],
            ),
            Row {
                effect: Effect::RequireApproval(ApprovalRequirement::of("dba-leads", 2)),
                ..allow(
                    "engineer writes to production after two approvals",
                    query(engineer(), production_db(), "write"),
                    &["engineers-write-production"],
                )
            },
            deny(
                "engineer cannot change schemas",
                query(engineer(), staging_db(), "ddl"),
                &[],
            ),
            allow(
                "dba changes staging schemas at any time",
                at(query(dba(), staging_db(), "ddl"), 3, 3),
                &["dba-ddl-staging"],
            ),
            allow(
                "dba changes production schemas in the window",
                at(query(dba(), production_db(), "ddl"), 2, 19),
                &["dba-ddl-change-window"],
            ),
            allow(
                "the window includes Thursday 18:00",
                at(query(dba(), production_db(), "ddl"), 4, 18),
                &["dba-ddl-change-window"],
            ),
            deny(
                "the window ends at 22:00",
                at(query(dba(), production_db(), "ddl"), 2, 22),
                &[],
            ),
            deny(
                "no window on Wednesday",
                at(query(dba(), production_db(), "ddl"), 3, 19),
                &[],
            ),
            deny(
                "nobody drops a production database, not even a dba in the window",
                at(drop_database(dba(), production_db()), 2, 19),
                &["no-drop-database-production"],
            ),
            deny(
                "nobody truncates a production table, not even a dba in the window",
                at(truncate(dba(), production_db()), 4, 20),
                &["no-truncate-production"],
            ),
            deny(
                "an engineer truncates nothing: it is ddl",
                truncate(engineer(), staging_db()),
                &[],
            ),
            allow(
                "a dba may truncate staging: it is ddl",
                truncate(dba(), staging_db()),
                &["dba-ddl-staging"],
            ),
            allow(
                "other ddl in the window is not caught by the guardrails",
                at(sql(dba(), production_db(), "ddl", "DROP TABLE"), 2, 19),
                &["dba-ddl-change-window"],
            ),
            allow(
                "engineer commits a transaction on production without approval",
                sql(engineer(), production_db(), "transaction", "COMMIT"),
                &["engineers-read"],
            ),
            deny(
                "engineer cannot grant",
                sql(engineer(), staging_db(), "dcl", "GRANT"),
                &[],
            ),
            allow(
                "engineer runs a DO block on staging whose SQL the agent reads",
                query(engineer(), staging_db(), "do"),
                &["engineers-do-staging"],
            ),
            deny(
                "engineer runs no DO block on production without approval",
                query(engineer(), production_db(), "do"),
                &[],
            ),
            Row {
                effect: Effect::RequireApproval(ApprovalRequirement::of("dba-leads", 2)),
                ..allow(
                    "a DO block with SQL built at run time waits for two approvals",
                    {
                        let mut request = query(engineer(), staging_db(), "do");
                        request.context.dynamic_sql = true;
                        request
                    },
                    &["engineers-dynamic-sql"],
                )
            },
            allow(
                "engineer connects",
                request(engineer(), Action::Connect, production_db()),
                &["engineers-connect"],
            ),
        ],
    );
    let set = load_example("production-changes");
    assert_eq!(set.approval_settings().timeout, Duration::from_secs(1800));
}

#[test]
fn ssh_logins_are_decided_by_login_name_and_command() {
    let engineer = || user("erin", &["engineering"]);
    let login = |who: Principal, name: &str| {
        let mut r = request(who, Action::Connect, ssh_host());
        r.context.ssh_user = Some(name.to_owned());
        r
    };
    check(
        "ssh-logins",
        vec![
            allow(
                "an engineer logs in as app",
                login(engineer(), "app"),
                &["ssh-connect-as-app"],
            ),
            deny(
                "an engineer cannot log in as another account",
                login(engineer(), "postgres"),
                &[],
            ),
            deny(
                "root is refused even where a permit would match",
                login(engineer(), "root"),
                &["ssh-never-root"],
            ),
            deny(
                "someone outside engineering is not let in",
                login(user("mallory", &[]), "app"),
                &[],
            ),
            allow(
                "an engineer runs a command",
                exec(engineer(), ssh_host(), "systemctl status app"),
                &["ssh-engineers-work"],
            ),
            deny(
                "rm -rf / is refused",
                exec(engineer(), ssh_host(), "sudo rm -rf /"),
                &["ssh-no-rm-rf-root"],
            ),
            allow(
                "an engineer opens a shell",
                request(engineer(), Action::SshShell, ssh_host()),
                &["ssh-engineers-work"],
            ),
        ],
    );
}

#[test]
fn ssh_forwarding_reaches_one_database_and_opens_no_port() {
    let oncall = || user("olga", &["oncall"]);
    check(
        "ssh-forwarding",
        vec![
            allow(
                "on-call tunnels to the reporting database",
                forward(oncall(), ssh_host(), false, "db.internal", 5432),
                &["oncall-tunnel-to-reporting-db"],
            ),
            deny(
                "another port of the same host is not reachable",
                forward(oncall(), ssh_host(), false, "db.internal", 22),
                &[],
            ),
            deny(
                "another host on the same port is not reachable",
                forward(oncall(), ssh_host(), false, "db.internal.evil", 5432),
                &[],
            ),
            deny(
                "someone not on call cannot tunnel",
                forward(
                    user("erin", &["engineering"]),
                    ssh_host(),
                    false,
                    "db.internal",
                    5432,
                ),
                &[],
            ),
            deny(
                "nobody opens a port on the target",
                forward(oncall(), ssh_host(), true, "127.0.0.1", 8080),
                &["no-remote-forwards"],
            ),
            allow(
                "on-call forwards their agent",
                request(oncall(), Action::SshAgentForward, ssh_host()),
                &["oncall-agent-forwarding"],
            ),
            deny(
                "others do not",
                request(
                    user("erin", &["engineering"]),
                    Action::SshAgentForward,
                    ssh_host(),
                ),
                &[],
            ),
        ],
    );
}

/// An sftp operation or a legacy scp transfer on `path`.
fn file_op(principal: Principal, action: Action, operation: &str, path: &str) -> Request {
    let mut r = request(principal, action, ssh_host());
    r.context.file = Some(portcullis_policy::FileAccess {
        operation: operation.to_owned(),
        path: path.to_owned(),
        recursive: false,
    });
    r
}

#[test]
fn ssh_files_keep_secrets_unread_and_ci_uploads_only_releases() {
    let eng = || user("erin", &["engineering"]);
    let ci = || service("ci-deployer");
    check(
        "ssh-files",
        vec![
            allow(
                "an engineer starts sftp",
                request(eng(), Action::SshSftp, ssh_host()),
                &["engineers-sftp"],
            ),
            allow(
                "and reads an ordinary file",
                file_op(eng(), Action::SshSftp, "read", "/var/log/app.log"),
                &["engineers-sftp"],
            ),
            deny(
                "but not one under /etc/secret",
                file_op(eng(), Action::SshSftp, "read", "/etc/secret/db.key"),
                &["no-secret-reads"],
            ),
            deny(
                "nor lists that directory",
                file_op(eng(), Action::SshSftp, "list", "/etc/secret"),
                &["no-secret-reads"],
            ),
            allow(
                "a neighbour whose name starts the same is not under it",
                file_op(eng(), Action::SshSftp, "read", "/etc/secrets.txt"),
                &["engineers-sftp"],
            ),
            deny(
                "someone outside engineering gets no sftp",
                request(user("sam", &["sre"]), Action::SshSftp, ssh_host()),
                &[],
            ),
            allow(
                "CI uploads a release with scp -O",
                file_op(ci(), Action::SshScp, "upload", "/srv/releases/app-1.2.tar"),
                &["ci-uploads-releases"],
            ),
            deny(
                "but not elsewhere",
                file_op(ci(), Action::SshScp, "upload", "/etc/cron.d/x"),
                &[],
            ),
            deny(
                "and never downloads",
                file_op(
                    ci(),
                    Action::SshScp,
                    "download",
                    "/srv/releases/app-1.2.tar",
                ),
                &[],
            ),
            deny(
                "nor uses sftp",
                file_op(ci(), Action::SshSftp, "write", "/srv/releases/app-1.2.tar"),
                &[],
            ),
        ],
    );
}

#[test]
fn ci_service_runs_deploys_but_gets_no_shell() {
    let ci = || service("ci-deployer");
    let sre = || user("sam", &["sre"]);
    check(
        "ci-ssh",
        vec![
            allow(
                "ci connects to an ssh target",
                request(ci(), Action::Connect, ssh_host()),
                &["ci-connect"],
            ),
            allow(
                "ci runs the deploy script",
                exec(ci(), ssh_host(), "/opt/deploy/bin/release --tag v1.2"),
                &["ci-exec-deploy"],
            ),
            deny(
                "ci runs nothing else",
                exec(ci(), ssh_host(), "bash -i"),
                &[],
            ),
            deny(
                "ci gets no interactive shell",
                request(ci(), Action::SshShell, ssh_host()),
                &["no-interactive-services"],
            ),
            deny(
                "ci gets no sftp",
                request(ci(), Action::SshSftp, ssh_host()),
                &["no-interactive-services"],
            ),
            deny(
                "ci forwards no agent",
                request(ci(), Action::SshAgentForward, ssh_host()),
                &["no-interactive-services"],
            ),
            deny(
                "ci cannot reach a database",
                request(ci(), Action::Connect, production_db()),
                &[],
            ),
            deny(
                "another service cannot deploy",
                exec(service("backup"), ssh_host(), "/opt/deploy/bin/release"),
                &[],
            ),
            allow(
                "sre gets a shell",
                request(sre(), Action::SshShell, ssh_host()),
                &["sre-ssh"],
            ),
            allow(
                "sre runs any command",
                exec(sre(), ssh_host(), "journalctl -u nginx"),
                &["sre-ssh"],
            ),
            allow(
                "sre forwards a port",
                request(sre(), Action::SshForwardLocal, ssh_host()),
                &["sre-ssh"],
            ),
        ],
    );
}
