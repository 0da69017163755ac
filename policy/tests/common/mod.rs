//! Request builders shared by the policy tests.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of the helpers"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use portcullis_policy::{Action, Context, Forward, Principal, PrincipalKind, Request, Target};

pub fn user(id: &str, groups: &[&str]) -> Principal {
    Principal {
        kind: PrincipalKind::User,
        id: id.to_owned(),
        email: Some(format!("{id}@example.com")),
        name: None,
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
    }
}

pub fn service(id: &str) -> Principal {
    Principal {
        kind: PrincipalKind::Service,
        id: id.to_owned(),
        email: None,
        name: None,
        groups: Vec::new(),
    }
}

pub fn target(name: &str, protocol: &str, labels: &[(&str, &str)]) -> Target {
    Target {
        name: name.to_owned(),
        protocol: protocol.to_owned(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    }
}

pub fn staging_db() -> Target {
    target("db-staging", "postgres", &[("environment", "staging")])
}

pub fn production_db() -> Target {
    target("db-prod", "postgres", &[("environment", "production")])
}

pub fn ssh_host() -> Target {
    target("web-1", "ssh", &[("environment", "production")])
}

/// Wednesday 10:00, from psql run by uid 1001.
pub fn context() -> Context {
    Context {
        unix_time: 1_750_000_000,
        hour: 10,
        weekday: 3,
        source_comm: "psql".to_owned(),
        source_uid: 1001,
        ..Context::default()
    }
}

pub fn request(principal: Principal, action: Action, target: Target) -> Request {
    let mut context = context();
    if action == Action::SshExec {
        context.command_line = Some("uptime".to_owned());
    }
    if matches!(action, Action::SshForwardLocal | Action::SshForwardRemote) {
        context.forward = Some(Forward {
            host: "127.0.0.1".to_owned(),
            port: 8080,
            originator: None,
        });
    }
    Request {
        principal,
        action,
        target,
        context,
    }
}

/// A query of `class` with a typical command of that class (`SELECT` for `read`).
pub fn query(principal: Principal, target: Target, class: &str) -> Request {
    let command = match class {
        "read" => "SELECT",
        "write" => "INSERT",
        "ddl" => "CREATE TABLE",
        "dcl" => "GRANT",
        "transaction" => "BEGIN",
        "utility" => "SET",
        "admin" => "VACUUM",
        "call" => "CALL",
        "do" => "DO",
        _ => "UNKNOWN",
    };
    sql(principal, target, class, command)
}

/// A query of `class` running `command` (`"DROP DATABASE"`, `"TRUNCATE"`).
pub fn sql(principal: Principal, target: Target, class: &str, command: &str) -> Request {
    let mut request = request(principal, Action::Query, target);
    request.context.statement_class = Some(class.to_owned());
    request.context.command = Some(command.to_owned());
    request.context.db_user = Some("app".to_owned());
    request.context.db_name = Some("app".to_owned());
    request
}

pub fn drop_database(principal: Principal, target: Target) -> Request {
    sql(principal, target, "ddl", "DROP DATABASE")
}

pub fn truncate(principal: Principal, target: Target) -> Request {
    sql(principal, target, "ddl", "TRUNCATE")
}

/// `ssh -L` (or, with `remote`, `ssh -R`) to or on `host:port`.
#[allow(dead_code, reason = "not every test file forwards")]
pub fn forward(
    principal: Principal,
    target: Target,
    remote: bool,
    host: &str,
    port: u32,
) -> Request {
    let action = if remote {
        Action::SshForwardRemote
    } else {
        Action::SshForwardLocal
    };
    let mut request = request(principal, action, target);
    request.context.forward = Some(Forward {
        host: host.to_owned(),
        port,
        originator: (!remote).then(|| ("127.0.0.1".to_owned(), 50000)),
    });
    request
}

pub fn exec(principal: Principal, target: Target, command: &str) -> Request {
    let mut request = request(principal, Action::SshExec, target);
    request.context.command_line = Some(command.to_owned());
    request
}

pub fn at(mut request: Request, weekday: u8, hour: u8) -> Request {
    request.context.weekday = weekday;
    request.context.hour = hour;
    request
}

pub fn example_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// The files of a policy directory, read the way the agent reads them.
pub fn read_policy_dir(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("policy directory is readable") {
        let path = entry.expect("directory entry").path();
        if portcullis_policy::is_policy_set_file(&path) {
            let text = std::fs::read_to_string(&path).expect("policy file is readable");
            files.push((path, text));
        }
    }
    files
}
