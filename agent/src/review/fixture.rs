//! The generated quarter the review is tested over: several identities, targets, masked
//! reads, approvals, a break-glass, denials, recorded and unrecorded sessions, with one event
//! on each side of the period, and the policies of a small bastion. The unit tests
//! (`tests.rs`) check each section's known answers over it; the end-to-end suite
//! (`tests/review.rs`, which includes this file by path) renders it in a real browser.
//!
//! Only serde_json is used here, so both crates can compile it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "a test fixture: a failure is the test failing"
)]

use serde_json::{json, Value};

/// 2026-10-01T00:00:00Z, the quarter's first day (`period` gives the same).
pub const QUARTER_START_MS: u64 = 1_790_812_800_000;

pub const POLICIES: &str = r#"
@id("analysts-connect")
permit (principal in Portcullis::Group::"analysts", action == Portcullis::Action::"connect", resource)
when { resource.protocol == "postgres" };

@id("analysts-read")
@mask("pii")
permit (principal in Portcullis::Group::"analysts", action == Portcullis::Action::"query", resource)
when { context.statement_class == "read" };

@id("compliance-connect")
permit (principal in Portcullis::Group::"compliance", action == Portcullis::Action::"connect", resource)
when { resource.protocol == "postgres" };

@id("compliance-read")
permit (principal in Portcullis::Group::"compliance", action == Portcullis::Action::"query", resource)
when { context.statement_class == "read" };

@id("dba-connect")
permit (principal in Portcullis::Group::"dba", action == Portcullis::Action::"connect", resource)
when { resource.protocol == "postgres" };

@id("dba-ddl")
@approval("dba-leads")
permit (principal in Portcullis::Group::"dba", action == Portcullis::Action::"query", resource)
when { context.statement_class == "ddl" };

@id("etl-connect")
permit (principal == Portcullis::ServiceIdentity::"billing-etl", action == Portcullis::Action::"connect", resource)
when { resource.protocol == "postgres" };

@id("ci-ssh")
permit (
    principal in Portcullis::Group::"ci",
    action in [Portcullis::Action::"connect", Portcullis::Action::"ssh_exec", Portcullis::Action::"ssh_shell"],
    resource
)
when { resource.protocol == "ssh" };

@id("contractors-staging")
permit (principal in Portcullis::Group::"contractors", action == Portcullis::Action::"connect", resource)
when { resource.hasTag("environment") && resource.getTag("environment") == "staging" };
"#;

pub const MASKING: &str = r#"
[profiles.pii]
[[profiles.pii.rules]]
table_column = "billing.customers.tax_id"
mask = "redact"
replacement = "[tax id]"
[[profiles.pii.rules]]
column_regex = "(?i)^e_?mail$"
mask = "hash"
"#;

pub const APPROVALS: &str = r#"
timeout_seconds = 1800
default_approvals = 1
default_approver_group = "dba-leads"
approver_groups = ["dba-leads"]
"#;

pub const DAY: u64 = 86_400_000;

pub fn user(subject: &str, uid: u32, groups: &[&str]) -> Value {
    json!({"kind": "user", "uid": uid, "gid": uid, "subject": subject,
           "email": format!("{subject}@example.com"), "groups": groups})
}

pub fn service(name: &str) -> Value {
    json!({"kind": "service", "uid": 990, "gid": 990, "name": name})
}

pub fn workload() -> Value {
    json!({"kind": "workload", "uid": 991, "gid": 991,
           "subject": "repo:acme/app:ref:refs/heads/main", "groups": ["ci"]})
}

/// The generated quarter: Q4 2026, and one event on each side of it.
pub struct Trail {
    pub events: Vec<Value>,
    pub start: u64,
}

impl Trail {
    pub fn new() -> Self {
        Trail {
            events: Vec::new(),
            start: QUARTER_START_MS,
        }
    }

    /// An event on day `day` of the quarter (0 = October 1st), `minute` into it.
    pub fn at(&mut self, day: i64, minute: u64, kind: &str, fields: Value) {
        let time = u64::try_from(i64::try_from(self.start).unwrap() + day * DAY as i64).unwrap()
            + minute * 60_000;
        let mut event = json!({"schema": 1, "time_ms": time, "host": "bastion-1", "event": kind});
        for (k, v) in fields.as_object().unwrap() {
            event[k] = v.clone();
        }
        self.events.push(event);
    }
}

pub fn quarter() -> Trail {
    let alice = user("alice", 1001, &["analysts"]);
    let bob = user("bob", 1002, &["dba-leads"]);
    let carol = user("carol", 1003, &["compliance"]);
    let dave = user("dave", 1004, &["dba"]);
    let erin = user("erin", 1005, &["oncall"]);
    let mut t = Trail::new();
    // Before the period: not counted.
    t.at(
        -20,
        0,
        "connection.opened",
        json!({"connection_id": 90, "target": "prod-db",
        "identity": alice, "decision": "allow", "policy_ids": ["analysts-connect"]}),
    );
    // Alice, an analyst: masked reads, one refused write, one refused SSH target.
    t.at(
        2,
        0,
        "connection.opened",
        json!({"connection_id": 101, "target": "prod-db",
        "identity": alice, "decision": "allow", "policy_ids": ["analysts-connect"]}),
    );
    t.at(
        2,
        1,
        "statement.executed",
        json!({"connection_id": 101, "target": "prod-db",
        "identity": alice, "decision": "allow", "policy_ids": ["analysts-read"],
        "statement": "SELECT * FROM billing.customers", "statement_class": "read",
        "tables": ["billing.customers"], "masking_profile": "pii", "rows": 3}),
    );
    t.at(
        2,
        2,
        "statement.executed",
        json!({"connection_id": 101, "target": "prod-db",
        "identity": alice, "decision": "allow", "policy_ids": ["analysts-read"],
        "statement": "SELECT * FROM sales.leads", "statement_class": "read",
        "tables": ["sales.leads"], "masking_profile": "pii", "rows": 9}),
    );
    t.at(
        2,
        3,
        "statement.denied",
        json!({"connection_id": 101, "target": "prod-db",
        "identity": alice, "decision": "deny", "statement": "DELETE FROM sales.leads",
        "statement_class": "write", "tables": ["sales.leads"], "sqlstate": "42501"}),
    );
    t.at(
        40,
        0,
        "connection.opened",
        json!({"connection_id": 102, "target": "prod-db",
        "identity": alice, "decision": "allow", "policy_ids": ["analysts-connect"]}),
    );
    t.at(
        40,
        5,
        "connection.refused",
        json!({"target": "web-1", "identity": alice,
        "decision": "deny", "reason": "no policy permits"}),
    );
    // Carol, compliance: reads the protected table unmasked, with a comma, quotes and a
    // line break in the statement (the CSV must carry them).
    t.at(
        10,
        0,
        "connection.opened",
        json!({"connection_id": 201, "target": "prod-db",
        "identity": carol, "decision": "allow", "policy_ids": ["compliance-connect"]}),
    );
    t.at(
        10,
        1,
        "statement.executed",
        json!({"connection_id": 201, "target": "prod-db",
        "identity": carol, "decision": "allow", "policy_ids": ["compliance-read"],
        "statement": "SELECT name, \"tax_id\"\nFROM billing.customers", "statement_class": "read",
        "tables": ["billing.customers"], "rows": 3}),
    );
    t.at(
        10,
        2,
        "statement.executed",
        json!({"connection_id": 201, "target": "prod-db",
        "identity": carol, "decision": "allow", "policy_ids": ["compliance-read"],
        "statement": "SELECT * FROM public.orders", "statement_class": "read",
        "tables": ["public.orders"], "rows": 30}),
    );
    // Dave, a DBA: two DDLs approved by Bob alone, and one with no approval at all.
    for (day, request) in [(20, "r-1"), (50, "r-2")] {
        t.at(
            day,
            0,
            "approval.requested",
            json!({"target": "prod-db", "identity": dave,
            "request_id": request, "requester": "dave@example.com", "asked": "statement",
            "required": "1 approval from group `dba-leads`", "approval_state": "pending",
            "policy_ids": ["dba-ddl"]}),
        );
        t.at(
            day,
            5,
            "approval.approved",
            json!({"target": "prod-db", "identity": bob,
            "request_id": request, "requester": "dave@example.com", "asked": "statement",
            "required": "1 approval from group `dba-leads`", "approval_state": "approved",
            "approvers": ["bob"], "policy_ids": ["dba-ddl"]}),
        );
    }
    t.at(
        20,
        10,
        "connection.opened",
        json!({"connection_id": 301, "target": "prod-db",
        "identity": dave, "decision": "allow", "policy_ids": ["dba-connect"]}),
    );
    t.at(
        20,
        11,
        "statement.executed",
        json!({"connection_id": 301, "target": "prod-db",
        "identity": dave, "decision": "allow", "policy_ids": ["dba-ddl", "approval:r-1"],
        "statement": "CREATE INDEX ON billing.invoices (due)", "statement_class": "ddl",
        "tables": ["billing.invoices"]}),
    );
    t.at(
        50,
        11,
        "statement.executed",
        json!({"connection_id": 301, "target": "prod-db",
        "identity": dave, "decision": "allow", "policy_ids": ["dba-ddl", "approval:r-2"],
        "statement": "DROP INDEX billing.invoices_due_idx", "statement_class": "ddl"}),
    );
    t.at(
        60,
        0,
        "statement.executed",
        json!({"connection_id": 301, "target": "prod-db",
        "identity": dave, "decision": "allow", "policy_ids": ["dba-ddl"],
        "statement": "ALTER TABLE billing.invoices ADD COLUMN note text", "statement_class": "ddl",
        "tables": ["billing.invoices"]}),
    );
    // Erin breaks the glass for a grant and connects with it.
    t.at(
        70,
        0,
        "approval.requested",
        json!({"target": "prod-db", "identity": erin,
        "request_id": "r-3", "requester": "erin@example.com", "asked": "grant",
        "required": "1 approval from group `dba-leads`", "approval_state": "pending"}),
    );
    t.at(
        70,
        1,
        "approval.break_glass",
        json!({"target": "prod-db", "identity": erin,
        "request_id": "r-3", "grant_id": "g-3", "requester": "erin@example.com",
        "asked": "grant", "required": "1 approval from group `dba-leads`",
        "approval_state": "approved", "approvers": ["erin"], "break_glass": true,
        "reason": "break-glass by erin@example.com: INC-911 primary down"}),
    );
    t.at(
        70,
        2,
        "connection.opened",
        json!({"connection_id": 401, "target": "prod-db",
        "identity": erin, "decision": "allow", "policy_ids": ["grant:g-3"]}),
    );
    // The billing ETL, last seen early in October, reads a table others read masked.
    t.at(
        4,
        0,
        "connection.opened",
        json!({"connection_id": 601, "target": "prod-db",
        "identity": service("billing-etl"), "decision": "allow", "policy_ids": ["etl-connect"]}),
    );
    t.at(
        4,
        1,
        "statement.executed",
        json!({"connection_id": 601, "target": "prod-db",
        "identity": service("billing-etl"), "decision": "allow", "policy_ids": ["etl-connect"],
        "statement": "SELECT id FROM sales.leads", "statement_class": "read",
        "tables": ["sales.leads"]}),
    );
    // CI over SSH: a recorded exec, a shell whose recording failed, a shell never recorded.
    for (id, day) in [(501u64, 80i64), (502, 81), (503, 82)] {
        t.at(
            day,
            0,
            "connection.opened",
            json!({"connection_id": id, "target": "web-1",
            "identity": workload(), "decision": "allow", "policy_ids": ["ci-ssh"]}),
        );
    }
    t.at(
        80,
        1,
        "ssh.exec",
        json!({"connection_id": 501, "target": "web-1",
        "identity": workload(), "decision": "allow", "policy_ids": ["ci-ssh"],
        "channel": "exec", "command_line": "./deploy.sh"}),
    );
    t.at(
        80,
        2,
        "recording.chunk",
        json!({"connection_id": 501, "recording_chunk": 0,
        "recording_offset": 0, "recording_bytes": 10, "recording_sha256": "00"}),
    );
    t.at(
        80,
        3,
        "recording.closed",
        json!({"connection_id": 501, "recording_chunk": 1,
        "recording_offset": 0, "recording_bytes": 10, "recording_sha256": "00"}),
    );
    t.at(
        81,
        1,
        "ssh.shell",
        json!({"connection_id": 502, "target": "web-1",
        "identity": workload(), "decision": "allow", "policy_ids": ["ci-ssh"]}),
    );
    t.at(
        81,
        2,
        "recording.failed",
        json!({"connection_id": 502,
        "reason": "disk full; recording_failure = continue"}),
    );
    t.at(
        82,
        1,
        "ssh.shell",
        json!({"connection_id": 503, "target": "web-1",
        "identity": workload(), "decision": "allow", "policy_ids": ["ci-ssh"]}),
    );
    // After the period: not counted.
    t.at(
        93,
        0,
        "connection.opened",
        json!({"connection_id": 900, "target": "staging-db",
        "identity": carol, "decision": "allow", "policy_ids": ["compliance-connect"]}),
    );
    t
}
