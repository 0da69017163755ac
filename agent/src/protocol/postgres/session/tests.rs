//! Byte-vector tests of the session machine: client and server messages encoded with
//! pgwire's encoders go in, with a policy set parsed from Cedar text and a catalog filled by
//! the test; the bytes, events and lookups that come out are checked. No sockets, no server,
//! no root: what the end-to-end suite proves about keeping client and server in step,
//! pipelining, names and budgets, and masking, at the level of the messages.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed expectation is the test failing"
)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use portcullis_pgwire::{
    decode_frame, encode_backend, encode_frontend, parse_backend, BackendMessage, CopyResponse,
    DataRow, DescribeTarget, ErrorFields, FieldDescription, FrontendMessage, RawMessage,
    TransactionStatus,
};
use portcullis_policy::PolicySet;

use super::super::catalog::{ColumnName, Routine};
use super::{
    CatalogLookup, CatalogView, Maskers, Now, Recorded, Services, Session, SessionContext,
    DENIED_MARKER,
};

const POLICIES: &str = r#"
@id("connect")
permit (principal, action == Portcullis::Action::"connect", resource);

@id("read-customers")
@mask("pii")
permit (principal, action == Portcullis::Action::"query", resource)
when {
    ["read", "transaction", "utility"].contains(context.statement_class) &&
    context.tables.contains("customers")
};

@id("read-tickets")
@mask("cards")
permit (principal, action == Portcullis::Action::"query", resource)
when {
    ["read", "transaction", "utility"].contains(context.statement_class) &&
    context.tables.contains("tickets")
};

@id("read")
permit (principal, action == Portcullis::Action::"query", resource)
when {
    ["read", "transaction", "utility"].contains(context.statement_class) &&
    !context.tables.containsAny(["customers", "tickets"])
};

@id("write")
permit (principal, action == Portcullis::Action::"query", resource)
when { context.statement_class == "write" };

@id("call")
permit (principal, action == Portcullis::Action::"query", resource)
when { context.statement_class == "call" };

@id("no-dynamic-sql")
forbid (principal, action == Portcullis::Action::"query", resource)
when { context.dynamic_sql };

@id("no-sleep")
forbid (principal, action == Portcullis::Action::"query", resource)
when { context.functions.contains("pg_sleep") };
"#;

const MASKING: &str = r#"
[profiles.pii]
[[profiles.pii.rules]]
column_regex = "^email$"
mask = "redact"
replacement = "[email]"

[[profiles.pii.rules]]
table_column = "public.customers.tax_id"
mask = "redact"
replacement = "[tax id]"

[[profiles.pii.rules]]
detector = "card_number"
mask = "redact"
replacement = "[card]"

[profiles.cards]
[[profiles.cards.rules]]
detector = "card_number"
mask = "redact"
replacement = "[card]"
"#;

const CARD: &str = "4111 1111 1111 1111";
const CUSTOMERS: u32 = 16_400;
const TEXT: u32 = 25;

fn policies() -> Arc<PolicySet> {
    let set = PolicySet::load([("p/policy.cedar", POLICIES), ("p/masking.toml", MASKING)])
        .unwrap_or_else(|e| panic!("{e}"));
    Arc::new(set)
}

/// What the catalog's lookups read, filled by the test as the side connection would.
#[derive(Default)]
struct TestCatalog {
    columns: Mutex<HashMap<(u32, i16), ColumnName>>,
    functions: Mutex<HashMap<u32, Arc<[String]>>>,
    routines: Mutex<HashMap<String, Arc<[Routine]>>>,
}

impl CatalogView for TestCatalog {
    fn column(&self, _: u32, _: &str, table_oid: u32, attnum: i16) -> Option<ColumnName> {
        self.columns
            .lock()
            .unwrap()
            .get(&(table_oid, attnum))
            .cloned()
    }
    fn view_sources(
        &self,
        _: u32,
        _: &str,
        _: u32,
    ) -> Option<Option<Arc<portcullis_sql::ResultSources>>> {
        None
    }
    fn function_names(&self, _: u32, _: &str, oid: u32) -> Option<Arc<[String]>> {
        self.functions.lock().unwrap().get(&oid).cloned()
    }
    fn routines(&self, _: u32, _: &str, name: &str, _: Duration) -> Option<Arc<[Routine]>> {
        self.routines.lock().unwrap().get(name).cloned()
    }
    fn is_fresh(&self, _: u32, _: &str, table_oid: u32) -> bool {
        self.columns
            .lock()
            .unwrap()
            .keys()
            .any(|(oid, _)| *oid == table_oid)
    }
}

impl TestCatalog {
    fn add_column(&self, table_oid: u32, attnum: i16, qualified: &str) {
        let column = qualified.rsplit('.').next().unwrap().to_string();
        self.columns.lock().unwrap().insert(
            (table_oid, attnum),
            ColumnName {
                qualified: qualified.to_string(),
                column,
            },
        );
    }
}

struct World {
    classifier: portcullis_sql::Classifier,
    catalog: TestCatalog,
    maskers: Maskers,
    policies: Arc<PolicySet>,
    start: Instant,
}

impl World {
    fn new() -> Self {
        Self {
            classifier: portcullis_sql::Classifier::new(1024),
            catalog: TestCatalog::default(),
            maskers: Maskers::new(vec![7; 32]),
            policies: policies(),
            start: Instant::now(),
        }
    }

    fn session(&self) -> Session<'_> {
        let origin = portcullis_core::Origin {
            pid: 4242,
            tid: 4242,
            uid: 1001,
            gid: 1001,
            comm: "psql".into(),
            cgroup_id: 1,
            netns_cookie: 1,
            socket_cookie: 1,
            destination: "127.0.0.1:5432".parse().unwrap(),
            target_id: 1,
        };
        let identity = portcullis_core::Identity {
            kind: portcullis_core::IdentityKind::User,
            uid: 1001,
            gid: 1001,
            user: Some("alice".into()),
            subject: Some("alice".into()),
            email: Some("alice@example.com".into()),
            name: None,
            groups: vec!["analysts".into()],
            issuer: None,
        };
        let ctx = SessionContext {
            connection_id: 7,
            protocol: "postgres".into(),
            target_id: 1,
            target_name: "db".into(),
            target: portcullis_policy::Target {
                name: "db".into(),
                protocol: "postgres".into(),
                labels: Default::default(),
            },
            principal: crate::policy::principal(&identity),
            origin: Arc::new(portcullis_core::Encoded::new(origin)),
            identity: Arc::new(portcullis_core::Encoded::new(identity)),
            client_addr: "127.0.0.1:40000".into(),
            upstream_addr: "127.0.0.1:5432".into(),
            db_user: "app".into(),
            db_name: "app".into(),
            max_len: 1 << 20,
            replication: false,
        };
        let services = Services {
            classifier: &self.classifier,
            catalog: &self.catalog,
            maskers: &self.maskers,
        };
        Session::new(services, ctx, Arc::clone(&self.policies), self.now())
    }

    fn now(&self) -> Now {
        Now {
            unix_ms: 1_750_000_000_000,
            monotonic: self.start,
        }
    }
}

/// What one input gave back, taken out of the machine.
#[derive(Default)]
struct Out {
    to_client: Vec<RawMessage>,
    to_server: Vec<RawMessage>,
    events: Vec<serde_json::Value>,
    lookup: Option<CatalogLookup>,
    end: Option<String>,
}

fn take(session: &mut Session<'_>) -> Out {
    let out = session.output();
    let events = out
        .events
        .drain(..)
        .map(|e| match e {
            Recorded::Event(ev) => serde_json::to_value(&ev).unwrap(),
            Recorded::Encoded(line) => serde_json::from_slice(line.as_bytes()).unwrap(),
        })
        .collect();
    Out {
        to_client: frames(&mut out.to_client),
        to_server: frames(&mut out.to_server),
        events,
        lookup: out.lookup.take(),
        end: out.end.take(),
    }
}

fn frames(buf: &mut BytesMut) -> Vec<RawMessage> {
    let mut all = Vec::new();
    while let Some(m) = decode_frame(buf, 1 << 20).unwrap() {
        all.push(m);
    }
    assert!(buf.is_empty(), "a partial frame in the output");
    all
}

fn client(world: &World, session: &mut Session<'_>, msgs: &[FrontendMessage]) -> Out {
    let mut buf = BytesMut::new();
    for m in msgs {
        encode_frontend(m, &mut buf);
    }
    session.on_client(&mut buf, world.now(), &world.policies);
    assert!(buf.is_empty(), "every whole message is taken");
    take(session)
}

fn server(world: &World, session: &mut Session<'_>, msgs: &[BackendMessage]) -> Out {
    let mut buf = BytesMut::new();
    for m in msgs {
        encode_backend(m, &mut buf);
    }
    session.on_server(&mut buf, world.now());
    assert!(buf.is_empty(), "every whole message is taken");
    take(session)
}

fn fe(m: &FrontendMessage) -> Bytes {
    let mut b = BytesMut::new();
    encode_frontend(m, &mut b);
    b.freeze()
}

fn be(m: &BackendMessage) -> Bytes {
    let mut b = BytesMut::new();
    encode_backend(m, &mut b);
    b.freeze()
}

fn bytes_of(frames: &[RawMessage]) -> Vec<Bytes> {
    frames.iter().map(|m| m.frame.clone()).collect()
}

fn query(sql: &str) -> FrontendMessage {
    FrontendMessage::Query { sql: sql.into() }
}

fn parse(name: &str, sql: &str) -> FrontendMessage {
    FrontendMessage::Parse {
        statement: name.into(),
        sql: sql.into(),
        param_types: Vec::new(),
    }
}

fn bind(portal: &str, statement: &str) -> FrontendMessage {
    FrontendMessage::Bind {
        portal: portal.into(),
        statement: statement.into(),
        param_formats: Vec::new(),
        params: Vec::new(),
        result_formats: Vec::new(),
    }
}

fn execute(portal: &str) -> FrontendMessage {
    FrontendMessage::Execute {
        portal: portal.into(),
        max_rows: 0,
    }
}

fn ready(status: TransactionStatus) -> BackendMessage {
    BackendMessage::ReadyForQuery { status }
}

fn complete(tag: &str) -> BackendMessage {
    BackendMessage::CommandComplete { tag: tag.into() }
}

fn server_error(sqlstate: &str, message: &str) -> BackendMessage {
    BackendMessage::ErrorResponse(ErrorFields::new("ERROR", sqlstate, message))
}

/// The server's answer to the failing message sent in place of a denied one.
fn marker_syntax_error() -> BackendMessage {
    server_error(
        "42601",
        &format!("syntax error at or near \"{DENIED_MARKER}\""),
    )
}

fn field(name: &str, table_oid: u32, column_attr: i16, format: i16) -> FieldDescription {
    FieldDescription {
        name: name.into(),
        table_oid,
        column_attr,
        type_oid: TEXT,
        type_size: -1,
        type_modifier: -1,
        format,
    }
}

fn row(values: &[&str]) -> BackendMessage {
    BackendMessage::DataRow(DataRow {
        values: values
            .iter()
            .map(|v| Some(Bytes::copy_from_slice(v.as_bytes())))
            .collect(),
    })
}

fn error_fields(m: &RawMessage) -> ErrorFields {
    match parse_backend(m).unwrap() {
        BackendMessage::ErrorResponse(f) | BackendMessage::NoticeResponse(f) => f,
        other => panic!("expected an error or notice, got {}", other.name()),
    }
}

fn kinds(events: &[serde_json::Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap_or_default().to_string(),
                e["decision"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

// ----- denial keeps the session in step ----------------------------------------------------

/// A denied Parse is replaced by one that fails in the server's parser; the Bind and Execute
/// after it are dropped as the server drops them after an error, and Sync goes through. The
/// server's syntax error becomes the agent's 42501 and its ReadyForQuery passes: client and
/// server agree the session is idle and usable.
#[test]
fn denied_parse_keeps_extended_protocol_in_step_through_sync() {
    let world = World::new();
    let mut s = world.session();
    let out = client(
        &world,
        &mut s,
        &[
            parse("", "DROP TABLE accounts"),
            bind("", ""),
            execute(""),
            FrontendMessage::Sync,
        ],
    );
    let failing = fe(&parse("", DENIED_MARKER));
    assert_eq!(
        bytes_of(&out.to_server),
        vec![failing, fe(&FrontendMessage::Sync)]
    );
    assert!(out.to_client.is_empty());
    assert_eq!(
        kinds(&out.events),
        vec![("statement.denied".into(), "deny".into())]
    );
    assert_eq!(out.events[0]["statement"], "DROP TABLE accounts");

    let out = server(
        &world,
        &mut s,
        &[marker_syntax_error(), ready(TransactionStatus::Idle)],
    );
    assert_eq!(out.to_client.len(), 2);
    let e = error_fields(&out.to_client[0]);
    assert_eq!(e.sqlstate(), Some("42501"));
    assert!(
        e.message().unwrap().contains("denied by policy"),
        "{:?}",
        e.message()
    );
    assert_eq!(
        out.to_client[1].frame,
        be(&ready(TransactionStatus::Idle)),
        "ReadyForQuery passes unchanged"
    );
    assert!(s.awaits_nothing(), "no reply left expected");

    // The session goes on: the next statement runs.
    let out = client(&world, &mut s, &[query("SELECT 1")]);
    assert_eq!(bytes_of(&out.to_server), vec![fe(&query("SELECT 1"))]);
}

/// A denied simple query is replaced by a query that fails; one denied statement refuses the
/// whole string (PostgreSQL runs it as one implicit transaction) and the others are recorded
/// as not run.
#[test]
fn denied_simple_query_refuses_the_whole_string_and_stays_in_step() {
    let world = World::new();
    let mut s = world.session();
    let out = client(&world, &mut s, &[query("SELECT 1; DROP TABLE accounts")]);
    assert_eq!(bytes_of(&out.to_server), vec![fe(&query(DENIED_MARKER))]);
    assert_eq!(
        kinds(&out.events),
        vec![
            ("statement.denied".into(), "deny".into()),
            ("statement.denied".into(), "not_run".into()),
        ]
    );
    let out = server(
        &world,
        &mut s,
        &[marker_syntax_error(), ready(TransactionStatus::Idle)],
    );
    assert_eq!(error_fields(&out.to_client[0]).sqlstate(), Some("42501"));
    assert_eq!(out.to_client[1].frame, be(&ready(TransactionStatus::Idle)));
    assert!(s.awaits_nothing());
}

/// A client that pipelines an allowed transaction behind a denied one gets the denial for the
/// first and the server's own answers for the second, in order: the queue of expected replies
/// matches each reply to its statement.
#[test]
fn pipelined_statement_after_a_denied_one_runs_after_its_sync() {
    let world = World::new();
    let mut s = world.session();
    let out = client(
        &world,
        &mut s,
        &[
            parse("", "DROP TABLE accounts"),
            bind("", ""),
            execute(""),
            FrontendMessage::Sync,
            parse("", "SELECT 1"),
            bind("", ""),
            execute(""),
            FrontendMessage::Sync,
        ],
    );
    assert_eq!(
        bytes_of(&out.to_server),
        vec![
            fe(&parse("", DENIED_MARKER)),
            fe(&FrontendMessage::Sync),
            fe(&parse("", "SELECT 1")),
            fe(&bind("", "")),
            fe(&execute("")),
            fe(&FrontendMessage::Sync),
        ]
    );
    let replies = [
        marker_syntax_error(),
        ready(TransactionStatus::Idle),
        BackendMessage::ParseComplete,
        BackendMessage::BindComplete,
        row(&["1"]),
        complete("SELECT 1"),
        ready(TransactionStatus::Idle),
    ];
    let out = server(&world, &mut s, &replies);
    assert_eq!(error_fields(&out.to_client[0]).sqlstate(), Some("42501"));
    assert_eq!(
        bytes_of(&out.to_client[1..]),
        replies[1..].iter().map(be).collect::<Vec<_>>(),
        "the allowed transaction's replies pass unchanged"
    );
    assert_eq!(
        kinds(&out.events),
        vec![("statement.executed".into(), "allow".into())]
    );
    assert_eq!(out.events[0]["rows"], 1);
    assert!(s.awaits_nothing());
}

// ----- names and budgets -------------------------------------------------------------------

/// A portal lives until its transaction ends: a second Bind of its name is refused (42P03)
/// while the server still has it, and allowed once the Sync after it has been answered idle.
/// An Execute of a portal the session did not bind is refused (34000) without reaching it.
#[test]
fn portal_names_follow_their_transaction() {
    let world = World::new();
    let mut s = world.session();
    client(&world, &mut s, &[parse("s", "SELECT 1"), bind("p", "s")]);
    server(
        &world,
        &mut s,
        &[BackendMessage::ParseComplete, BackendMessage::BindComplete],
    );

    let out = client(&world, &mut s, &[bind("p", "s"), FrontendMessage::Sync]);
    let failing_bind = fe(&FrontendMessage::Bind {
        portal: "p".into(),
        statement: DENIED_MARKER.into(),
        param_formats: Vec::new(),
        params: Vec::new(),
        result_formats: Vec::new(),
    });
    assert_eq!(
        bytes_of(&out.to_server),
        vec![failing_bind, fe(&FrontendMessage::Sync)]
    );
    let out = server(
        &world,
        &mut s,
        &[
            server_error("26000", "prepared statement does not exist"),
            ready(TransactionStatus::Idle),
        ],
    );
    assert_eq!(error_fields(&out.to_client[0]).sqlstate(), Some("42P03"));

    // The Sync ended the implicit transaction and with it the portal.
    let out = client(&world, &mut s, &[bind("p", "s")]);
    assert_eq!(bytes_of(&out.to_server), vec![fe(&bind("p", "s"))]);

    let out = client(&world, &mut s, &[execute("cursor_of_sql")]);
    assert_eq!(
        bytes_of(&out.to_server),
        vec![fe(&execute(DENIED_MARKER))],
        "an unknown portal never runs"
    );
    let out = server(
        &world,
        &mut s,
        &[
            BackendMessage::BindComplete,
            server_error("34000", "portal does not exist"),
        ],
    );
    assert_eq!(out.to_client[0].frame, be(&BackendMessage::BindComplete));
    assert_eq!(error_fields(&out.to_client[1]).sqlstate(), Some("34000"));
}

/// Past the budget of prepared statements a Parse is refused with 54000 (the session goes
/// on); closing one makes room again. A Bind of a statement the session did not Parse is
/// refused with 26000.
#[test]
fn prepared_statement_budget_refuses_parse_until_one_is_closed() {
    let world = World::new();
    let mut s = world.session();
    let mut buf = BytesMut::new();
    for i in 0..super::MAX_KEPT_NAMES {
        encode_frontend(&parse(&format!("s{i}"), "SELECT 1"), &mut buf);
    }
    s.on_client(&mut buf, world.now(), &world.policies);
    let out = take(&mut s);
    assert_eq!(out.to_server.len(), super::MAX_KEPT_NAMES);
    let mut replies = BytesMut::new();
    for _ in 0..super::MAX_KEPT_NAMES {
        encode_backend(&BackendMessage::ParseComplete, &mut replies);
    }
    s.on_server(&mut replies, world.now());
    assert_eq!(take(&mut s).to_client.len(), super::MAX_KEPT_NAMES);

    let out = client(&world, &mut s, &[parse("one_more", "SELECT 1")]);
    assert_eq!(
        bytes_of(&out.to_server),
        vec![fe(&parse("one_more", DENIED_MARKER))]
    );
    assert_eq!(
        kinds(&out.events),
        vec![("statement.denied".into(), "error".into())]
    );
    assert!(out.events[0]["reason"]
        .as_str()
        .unwrap()
        .contains("prepared statements"));
    client(&world, &mut s, &[FrontendMessage::Sync]);
    let out = server(
        &world,
        &mut s,
        &[marker_syntax_error(), ready(TransactionStatus::Idle)],
    );
    assert_eq!(error_fields(&out.to_client[0]).sqlstate(), Some("54000"));

    let close = FrontendMessage::Close {
        target: DescribeTarget::Statement,
        name: "s0".into(),
    };
    let out = client(&world, &mut s, &[close, parse("one_more", "SELECT 1")]);
    assert_eq!(out.to_server[1].frame, fe(&parse("one_more", "SELECT 1")));

    let out = client(&world, &mut s, &[bind("", "made_by_sql_prepare")]);
    assert_eq!(out.to_server.len(), 1);
    assert_ne!(out.to_server[0].frame, fe(&bind("", "made_by_sql_prepare")));
    client(&world, &mut s, &[FrontendMessage::Sync]);
    let out = server(
        &world,
        &mut s,
        &[
            BackendMessage::CloseComplete,
            BackendMessage::ParseComplete,
            server_error("26000", "prepared statement does not exist"),
            ready(TransactionStatus::Idle),
        ],
    );
    assert_eq!(error_fields(&out.to_client[2]).sqlstate(), Some("26000"));
}

// ----- masking -----------------------------------------------------------------------------

/// Rows of a masked read: a column a rule selects is replaced in text and in binary format,
/// the others pass, and a row with nothing to mask is forwarded as it came.
#[test]
fn rows_are_masked_in_text_and_binary() {
    let world = World::new();
    world
        .catalog
        .add_column(CUSTOMERS, 1, "public.customers.name");
    world
        .catalog
        .add_column(CUSTOMERS, 2, "public.customers.email");
    for format in [0, 1] {
        let mut s = world.session();
        let out = client(
            &world,
            &mut s,
            &[query("SELECT name, email FROM customers")],
        );
        assert_eq!(out.to_server.len(), 1);
        let description = BackendMessage::RowDescription(vec![
            field("name", CUSTOMERS, 1, format),
            field("email", CUSTOMERS, 2, format),
        ]);
        let out = server(
            &world,
            &mut s,
            &[
                description.clone(),
                row(&["Ann", "ann@example.com"]),
                complete("SELECT 1"),
                ready(TransactionStatus::Idle),
            ],
        );
        assert_eq!(out.to_client[0].frame, be(&description));
        assert_eq!(
            out.to_client[1].frame,
            be(&row(&["Ann", "[email]"])),
            "format {format}"
        );
        assert_eq!(out.events[0]["masking_profile"], "pii");
    }
}

/// A result column read from a table named by a `table_column` rule is found through the
/// catalog, whatever its label: the RowDescription waits for the lookup of its table (the
/// rows behind it are left unread), and once the catalog answers the rows are masked.
#[test]
fn row_description_waits_for_the_catalog_and_resumes() {
    let world = World::new();
    let mut s = world.session();
    client(
        &world,
        &mut s,
        &[query("SELECT tax_id AS ref FROM customers")],
    );
    let description = BackendMessage::RowDescription(vec![field("ref", CUSTOMERS, 3, 0)]);
    let mut buf = BytesMut::new();
    for m in [
        description.clone(),
        row(&["123-45"]),
        complete("SELECT 1"),
        ready(TransactionStatus::Idle),
    ] {
        encode_backend(&m, &mut buf);
    }
    let whole = buf.len();
    s.on_server(&mut buf, world.now());
    let out = take(&mut s);
    assert_eq!(out.lookup, Some(CatalogLookup::Tables(vec![CUSTOMERS])));
    assert!(out.to_client.is_empty(), "nothing passes before the answer");
    assert!(s.is_paused());
    let rest = buf.len();
    assert!(rest < whole && rest > 0, "the rows stay unread");
    s.on_server(&mut buf, world.now());
    assert_eq!(buf.len(), rest, "input while waiting stays queued");

    world
        .catalog
        .add_column(CUSTOMERS, 3, "public.customers.tax_id");
    s.catalog_answer(Ok(()), world.now());
    let out = take(&mut s);
    assert_eq!(bytes_of(&out.to_client), vec![be(&description)]);
    assert!(!s.is_paused());
    s.on_server(&mut buf, world.now());
    let out = take(&mut s);
    assert_eq!(out.to_client[0].frame, be(&row(&["[tax id]"])));
}

/// A failed lookup of a masked result's tables ends the session before a row leaves.
#[test]
fn failed_table_lookup_ends_the_session_closed() {
    let world = World::new();
    let mut s = world.session();
    client(&world, &mut s, &[query("SELECT tax_id FROM customers")]);
    let out = server(
        &world,
        &mut s,
        &[BackendMessage::RowDescription(vec![field(
            "tax_id", CUSTOMERS, 3, 0,
        )])],
    );
    assert!(out.lookup.is_some());
    s.catalog_answer(Err("connection refused".into()), world.now());
    let out = take(&mut s);
    assert!(out.end.unwrap().contains("could not be looked up"));
    assert_eq!(out.to_client.len(), 1, "only the error");
}

/// Server errors and notices of a masked statement go through the detectors; a statement
/// that reads a column a rule selects gets the server's error withheld whole, SQLSTATE kept.
#[test]
fn errors_and_notices_are_masked() {
    let world = World::new();
    let mut s = world.session();
    client(&world, &mut s, &[query("SELECT note FROM tickets")]);
    let notice = BackendMessage::NoticeResponse(ErrorFields::new(
        "NOTICE",
        "01000",
        format!("paid with {CARD}"),
    ));
    let error = server_error("22P02", &format!("invalid input: {CARD}"));
    let out = server(&world, &mut s, &[notice, error]);
    let n = error_fields(&out.to_client[0]);
    assert_eq!(n.message(), Some("paid with [card]"));
    let e = error_fields(&out.to_client[1]);
    assert_eq!(e.message(), Some("invalid input: [card]"));
    assert_eq!(e.sqlstate(), Some("22P02"));
    server(&world, &mut s, &[ready(TransactionStatus::Idle)]);

    client(&world, &mut s, &[query("SELECT email FROM customers")]);
    let out = server(
        &world,
        &mut s,
        &[server_error("22P02", "invalid input: \"ann@example.com\"")],
    );
    let e = error_fields(&out.to_client[0]);
    assert_eq!(e.sqlstate(), Some("22P02"));
    assert!(!e.message().unwrap().contains("ann@example.com"));
    assert!(e.message().unwrap().contains("withheld"));
}

/// Reported settings and notifications carry values outside the rows: free-text settings
/// go through the detectors while a masked statement runs, a notification's payload through
/// the session's profile, and both are withheld in a transaction that read a selected
/// column. A setting that changes how statements are read ends the session.
#[test]
fn settings_and_notifications_are_masked() {
    let world = World::new();
    let mut s = world.session();
    client(&world, &mut s, &[query("SELECT note FROM tickets")]);
    let setting = BackendMessage::ParameterStatus {
        name: "application_name".into(),
        value: CARD.into(),
    };
    let out = server(&world, &mut s, &[setting]);
    assert_eq!(
        out.to_client[0].frame,
        be(&BackendMessage::ParameterStatus {
            name: "application_name".into(),
            value: "[card]".into(),
        })
    );
    let timezone = BackendMessage::ParameterStatus {
        name: "TimeZone".into(),
        value: CARD.into(),
    };
    let out = server(
        &world,
        &mut s,
        &[
            timezone.clone(),
            complete("SELECT 0"),
            ready(TransactionStatus::Idle),
        ],
    );
    assert_eq!(out.to_client[0].frame, be(&timezone), "not a free-text one");

    let notification = |payload: &str| BackendMessage::NotificationResponse {
        process_id: 9,
        channel: "c".into(),
        payload: payload.into(),
    };
    let out = server(&world, &mut s, &[notification(&format!("card {CARD}"))]);
    assert_eq!(out.to_client[0].frame, be(&notification("card [card]")));

    client(&world, &mut s, &[query("SELECT email FROM customers")]);
    let out = server(
        &world,
        &mut s,
        &[
            complete("SELECT 0"),
            notification("ann@example.com"),
            ready(TransactionStatus::InBlock),
        ],
    );
    let BackendMessage::NotificationResponse { payload, .. } =
        parse_backend(&out.to_client[1]).unwrap()
    else {
        panic!("a notification");
    };
    assert!(payload.contains("withheld"), "{payload}");

    let out = server(
        &world,
        &mut s,
        &[BackendMessage::ParameterStatus {
            name: "standard_conforming_strings".into(),
            value: "off".into(),
        }],
    );
    assert!(out.end.unwrap().contains("standard_conforming_strings"));
}

/// A COPY of a table masked by column: the agent first asks the server, in the session, for
/// the table's columns (its answer never reaches the client), then masks each row by column.
#[test]
fn copy_out_is_masked_by_column_after_the_agents_own_lookup() {
    let world = World::new();
    let mut s = world.session();
    let copy = query("COPY customers TO STDOUT");
    let out = client(&world, &mut s, std::slice::from_ref(&copy));
    assert_eq!(out.to_server.len(), 2);
    assert!(out.to_server[0].frame != fe(&copy), "the lookup goes first");
    assert_eq!(out.to_server[1].frame, fe(&copy));

    let lookup_row = |column: &str, n: &str| row(&["public", "customers", column, n, "f"]);
    let out = server(
        &world,
        &mut s,
        &[
            BackendMessage::RowDescription(vec![field("nspname", 0, 0, 0)]),
            lookup_row("name", "25"),
            lookup_row("email", "25"),
            complete("SELECT 2"),
            ready(TransactionStatus::Idle),
            BackendMessage::CopyOutResponse(CopyResponse {
                format: 0,
                column_formats: vec![0, 0],
            }),
            BackendMessage::CopyData(Bytes::from_static(b"Ann\tann@example.com\n")),
            BackendMessage::CopyDone,
            complete("COPY 1"),
            ready(TransactionStatus::Idle),
        ],
    );
    let shown: Vec<u8> = out.to_client.iter().map(|m| m.tag).collect();
    assert_eq!(shown, b"HdcCZ", "the lookup's replies are the agent's");
    assert_eq!(
        out.to_client[1].frame,
        be(&BackendMessage::CopyData(Bytes::from_static(
            b"Ann\t[email]\n"
        )))
    );
}

/// A COPY whose profile has only detectors for its rows is masked line by line; under a
/// profile with column rules, the rows of a `COPY (query)` cannot be placed in columns and
/// the session ends before one leaves.
#[test]
fn copy_out_lines_go_through_the_detectors() {
    let world = World::new();
    let mut s = world.session();
    client(
        &world,
        &mut s,
        &[query("COPY (SELECT note FROM tickets) TO STDOUT")],
    );
    let out = server(
        &world,
        &mut s,
        &[
            BackendMessage::CopyOutResponse(CopyResponse {
                format: 0,
                column_formats: vec![0],
            }),
            BackendMessage::CopyData(Bytes::from(format!("paid {CARD}\n"))),
        ],
    );
    assert_eq!(
        out.to_client[1].frame,
        be(&BackendMessage::CopyData(Bytes::from_static(
            b"paid [card]\n"
        )))
    );

    let mut s = world.session();
    client(
        &world,
        &mut s,
        &[query("COPY (SELECT email FROM customers) TO STDOUT")],
    );
    let mut buf = BytesMut::new();
    for m in [
        BackendMessage::CopyOutResponse(CopyResponse {
            format: 0,
            column_formats: vec![0],
        }),
        BackendMessage::CopyData(Bytes::from_static(b"ann@example.com\n")),
    ] {
        encode_backend(&m, &mut buf);
    }
    s.on_server(&mut buf, world.now());
    let out = take(&mut s);
    assert!(out.end.unwrap().contains("COPY (query)"));
    assert_eq!(out.to_client.len(), 1, "only the error");
    assert_eq!(out.to_client[0].tag, b'E');
}

// ----- fast-path calls and the catalog -----------------------------------------------------

/// A fast-path call runs a function by OID: the machine waits for its names from the
/// catalog (input behind it stays queued), then decides it by name. `pg_sleep` is forbidden:
/// the call is replaced by a failing query and its error by the agent's 42501.
#[test]
fn fast_path_call_waits_for_its_names_then_is_denied_by_name() {
    let world = World::new();
    let mut s = world.session();
    let call = FrontendMessage::FunctionCall {
        function_oid: 2626,
        arg_formats: vec![0],
        args: vec![Some(Bytes::from_static(b"10"))],
        result_format: 0,
    };
    let mut buf = BytesMut::new();
    encode_frontend(&call, &mut buf);
    encode_frontend(&query("SELECT 1"), &mut buf);
    s.on_client(&mut buf, world.now(), &world.policies);
    let out = take(&mut s);
    assert_eq!(out.lookup, Some(CatalogLookup::Functions(vec![2626])));
    assert!(out.to_server.is_empty());
    assert_eq!(buf.as_ref(), fe(&query("SELECT 1")).as_ref());

    world.catalog.functions.lock().unwrap().insert(
        2626,
        Arc::from(["pg_catalog.pg_sleep".to_string(), "pg_sleep".to_string()]),
    );
    s.catalog_answer(Ok(()), world.now());
    // Then what the function runs, as for a call by name (PostgreSQL's own: nothing kept).
    let out = take(&mut s);
    assert_eq!(
        out.lookup,
        Some(CatalogLookup::Routines(vec![
            "pg_catalog.pg_sleep".into(),
            "pg_sleep".into()
        ]))
    );
    assert!(out.to_server.is_empty());
    for name in ["pg_catalog.pg_sleep", "pg_sleep"] {
        let none: Arc<[Routine]> = Arc::from([]);
        world
            .catalog
            .routines
            .lock()
            .unwrap()
            .insert(name.into(), none);
    }
    s.catalog_answer(Ok(()), world.now());
    let out = take(&mut s);
    assert_eq!(bytes_of(&out.to_server), vec![fe(&query(DENIED_MARKER))]);
    assert_eq!(
        kinds(&out.events),
        vec![("statement.denied".into(), "deny".into())]
    );
    s.on_client(&mut buf, world.now(), &world.policies);
    let out = take(&mut s);
    assert_eq!(bytes_of(&out.to_server), vec![fe(&query("SELECT 1"))]);
    let out = server(
        &world,
        &mut s,
        &[marker_syntax_error(), ready(TransactionStatus::Idle)],
    );
    assert_eq!(error_fields(&out.to_client[0]).sqlstate(), Some("42501"));
}

/// A call whose function's names could not be read is refused: no policy could apply to it.
#[test]
fn fast_path_call_with_unreadable_names_is_refused() {
    let world = World::new();
    let mut s = world.session();
    let call = FrontendMessage::FunctionCall {
        function_oid: 99,
        arg_formats: Vec::new(),
        args: Vec::new(),
        result_format: 0,
    };
    let out = client(&world, &mut s, &[call]);
    assert_eq!(out.lookup, Some(CatalogLookup::Functions(vec![99])));
    s.catalog_answer(Err("the side connection failed".into()), world.now());
    let out = take(&mut s);
    assert_eq!(bytes_of(&out.to_server), vec![fe(&query(DENIED_MARKER))]);
    assert!(out.events[0]["reason"]
        .as_str()
        .unwrap()
        .contains("the side connection failed"));
}

/// A statement calling a function by name waits for the function's body; a forbidden call
/// inside the body refuses the statement that calls it.
#[test]
fn statement_waits_for_the_bodies_it_calls_and_is_decided_with_them() {
    let world = World::new();
    let mut s = world.session();
    let out = client(&world, &mut s, &[query("SELECT nap()")]);
    assert_eq!(
        out.lookup,
        Some(CatalogLookup::Routines(vec!["nap".into()]))
    );
    assert!(out.to_server.is_empty());
    let body = portcullis_sql::read_routine(
        "sql",
        "CREATE FUNCTION public.nap() RETURNS void LANGUAGE sql AS $$SELECT pg_sleep(10)$$",
    )
    .unwrap();
    world.catalog.routines.lock().unwrap().insert(
        "nap".into(),
        Arc::from([Routine {
            name: "public.nap".into(),
            body: Ok(body),
        }]),
    );
    world
        .catalog
        .routines
        .lock()
        .unwrap()
        .insert("pg_sleep".into(), Arc::from([]));
    s.catalog_answer(Ok(()), world.now());
    let out = take(&mut s);
    assert_eq!(out.lookup, None);
    assert_eq!(bytes_of(&out.to_server), vec![fe(&query(DENIED_MARKER))]);
    assert_eq!(
        kinds(&out.events),
        vec![
            ("statement.denied".into(), "deny".into()),
            ("statement.denied".into(), "deny".into()),
        ],
        "the statement in the body, then the call"
    );
    assert_eq!(out.events[0]["statement"], "SELECT pg_sleep(10)");
    assert!(out.events[1]["reason"]
        .as_str()
        .unwrap()
        .contains("function `public.nap`"));
}

/// A failed read of a called function's body never lets the call through unread: the
/// statement is decided as one that runs SQL the agent cannot read (`dynamic_sql`).
#[test]
fn failed_body_lookup_decides_the_statement_as_opaque() {
    let world = World::new();
    let mut s = world.session();
    let out = client(&world, &mut s, &[query("SELECT nap()")]);
    assert_eq!(
        out.lookup,
        Some(CatalogLookup::Routines(vec!["nap".into()]))
    );
    s.catalog_answer(Err("the side connection failed".into()), world.now());
    let out = take(&mut s);
    assert_eq!(out.lookup, None, "no second try for the same message");
    assert_eq!(bytes_of(&out.to_server), vec![fe(&query(DENIED_MARKER))]);
    assert_eq!(out.events[0]["policy_ids"][0], "no-dynamic-sql");
}

/// Statements that finish with the session are recorded as unfinished, and an error the
/// server sends in place of a simple query's rows is the client's (unmasked statement).
#[test]
fn statements_left_running_are_recorded_when_the_session_ends() {
    let world = World::new();
    let mut s = world.session();
    client(&world, &mut s, &[query("SELECT 1")]);
    assert!(!s.awaits_nothing());
    s.end("client closed the connection", world.now());
    let out = take(&mut s);
    assert_eq!(
        kinds(&out.events),
        vec![("statement.executed".into(), "allow".into())]
    );
    assert!(out.events[0]["reason"]
        .as_str()
        .unwrap()
        .starts_with("unfinished"));
}

const APPROVAL_POLICIES: &str = r#"
@id("connect")
permit (principal, action == Portcullis::Action::"connect", resource);

@id("read")
permit (principal, action == Portcullis::Action::"query", resource)
when { context.statement_class == "read" };

@id("ddl-after-approval")
@approval("dba-leads")
permit (principal, action == Portcullis::Action::"query", resource)
when { context.statement_class == "ddl" };
"#;

/// A simple query whose policy asks for approval waits unsent (the relay asks and tells the
/// client); approved, exactly that string goes to the server and its event names the
/// request; denied, it is refused with 42501 and the session stays in step.
#[test]
fn a_query_held_for_approval_waits_unsent_then_runs_or_is_refused() {
    let world = World {
        policies: Arc::new(
            PolicySet::load([("p/policy.cedar", APPROVAL_POLICIES)])
                .unwrap_or_else(|e| panic!("{e}")),
        ),
        ..World::new()
    };
    let mut s = world.session();
    let create = "CREATE TABLE audit_log (id int)";
    let out = client(&world, &mut s, &[query(create)]);
    assert!(out.to_server.is_empty() && out.to_client.is_empty() && out.events.is_empty());
    let ask = s
        .output()
        .approval
        .take()
        .expect("an approval is asked for");
    assert_eq!(ask.statement, create);
    assert_eq!(
        ask.requirement.to_string(),
        "1 approval from group `dba-leads`"
    );
    assert_eq!(ask.policy_ids, vec!["ddl-after-approval".to_owned()]);

    s.approval_answer(Ok("r-0123456789".into()), world.now());
    let out = take(&mut s);
    assert_eq!(bytes_of(&out.to_server), vec![fe(&query(create))]);
    let out = server(
        &world,
        &mut s,
        &[complete("CREATE TABLE"), ready(TransactionStatus::Idle)],
    );
    assert_eq!(
        kinds(&out.events),
        vec![("statement.executed".into(), "allow".into())]
    );
    assert_eq!(
        out.events[0]["policy_ids"],
        serde_json::json!(["ddl-after-approval", "approval:r-0123456789"])
    );

    // An approval is for its string, not its shape: the same shape (ALTER TABLE of
    // audit_log) with another column asks again, though an approved one ran a moment ago.
    let add_a = "ALTER TABLE audit_log ADD COLUMN a int";
    client(&world, &mut s, &[query(add_a)]);
    assert_eq!(s.output().approval.take().unwrap().statement, add_a);
    s.approval_answer(Ok("r-1111111111".into()), world.now());
    let out = take(&mut s);
    assert_eq!(bytes_of(&out.to_server), vec![fe(&query(add_a))]);
    server(
        &world,
        &mut s,
        &[complete("ALTER TABLE"), ready(TransactionStatus::Idle)],
    );
    let drop = "ALTER TABLE audit_log ADD COLUMN b int";
    let out = client(&world, &mut s, &[query(drop)]);
    assert!(out.to_server.is_empty());
    assert_eq!(s.output().approval.take().unwrap().statement, drop);
    s.approval_answer(
        Err("approval request r-1 was denied by bob@example.com: not today".into()),
        world.now(),
    );
    let out = take(&mut s);
    assert_eq!(bytes_of(&out.to_server), vec![fe(&query(DENIED_MARKER))]);
    assert_eq!(
        kinds(&out.events),
        vec![("statement.denied".into(), "approval".into())]
    );
    assert!(out.events[0]["reason"]
        .as_str()
        .unwrap()
        .contains("denied by bob@example.com: not today"));
    let out = server(
        &world,
        &mut s,
        &[marker_syntax_error(), ready(TransactionStatus::Idle)],
    );
    assert_eq!(error_fields(&out.to_client[0]).sqlstate(), Some("42501"));
    assert_eq!(out.to_client[1].frame, be(&ready(TransactionStatus::Idle)));
    assert!(s.awaits_nothing());
    // Reads need no approval and run at once.
    let out = client(&world, &mut s, &[query("SELECT 1")]);
    assert_eq!(bytes_of(&out.to_server), vec![fe(&query("SELECT 1"))]);
    assert!(s.output().approval.is_none());
}

const WRITE_APPROVAL_POLICIES: &str = r#"
@id("connect")
permit (principal, action == Portcullis::Action::"connect", resource);

@id("read")
permit (principal, action == Portcullis::Action::"query", resource)
when { context.statement_class == "read" };

@id("write-after-approval")
@approval("dba-leads")
permit (principal, action == Portcullis::Action::"query", resource)
when { context.statement_class == "write" };
"#;

fn bind_with(portal: &str, statement: &str, params: &[&str]) -> FrontendMessage {
    FrontendMessage::Bind {
        portal: portal.into(),
        statement: statement.into(),
        param_formats: Vec::new(),
        params: params
            .iter()
            .map(|p| Some(Bytes::copy_from_slice(p.as_bytes())))
            .collect(),
        result_formats: Vec::new(),
    }
}

/// The extended protocol (every driver's parameterized query): Parse of a statement that
/// needs approval is prepared, since it runs nothing; each Bind waits, unsent, for an
/// approval of the text with that Bind's parameters. Approved, exactly that Bind goes to the
/// server and the execution names the request; another Bind of the same statement asks
/// again; denied, the Bind is refused with 42501 and the pipeline skips to its Sync.
#[test]
fn a_bind_of_a_statement_held_for_approval_waits_with_its_parameters() {
    let world = World {
        policies: Arc::new(
            PolicySet::load([("p/policy.cedar", WRITE_APPROVAL_POLICIES)])
                .unwrap_or_else(|e| panic!("{e}")),
        ),
        ..World::new()
    };
    let mut s = world.session();
    let sql = "UPDATE accounts SET balance = $1 WHERE id = $2";
    let out = client(&world, &mut s, &[parse("upd", sql)]);
    assert_eq!(bytes_of(&out.to_server), vec![fe(&parse("upd", sql))]);
    assert!(out.events.is_empty() && s.output().approval.is_none());

    let first = bind_with("", "upd", &["100", "7"]);
    let out = client(&world, &mut s, std::slice::from_ref(&first));
    assert!(out.to_server.is_empty(), "the Bind waits unsent");
    let ask = s
        .output()
        .approval
        .take()
        .expect("an approval is asked for");
    assert_eq!(ask.statement, sql);
    assert_eq!(ask.parameters, vec![Some("100".into()), Some("7".into())]);
    assert_eq!(ask.policy_ids, vec!["write-after-approval".to_owned()]);

    s.approval_answer(Ok("r-2222222222".into()), world.now());
    let out = take(&mut s);
    assert_eq!(bytes_of(&out.to_server), vec![fe(&first)]);
    let out = client(&world, &mut s, &[execute(""), FrontendMessage::Sync]);
    assert_eq!(
        bytes_of(&out.to_server),
        vec![fe(&execute("")), fe(&FrontendMessage::Sync)]
    );
    let out = server(
        &world,
        &mut s,
        &[
            BackendMessage::ParseComplete,
            BackendMessage::BindComplete,
            complete("UPDATE 1"),
            ready(TransactionStatus::Idle),
        ],
    );
    assert_eq!(
        kinds(&out.events),
        vec![("statement.executed".into(), "allow".into())]
    );
    assert_eq!(
        out.events[0]["policy_ids"],
        serde_json::json!(["write-after-approval", "approval:r-2222222222"])
    );
    assert_eq!(out.events[0]["parameters"], serde_json::json!(["100", "7"]));

    // The approval was for those parameters: other ones ask again, and a denial refuses
    // the Bind while the pipeline stays in step.
    let second = bind_with("", "upd", &["0", "7"]);
    let out = client(&world, &mut s, &[second]);
    assert!(out.to_server.is_empty());
    assert_eq!(
        s.output().approval.take().unwrap().parameters,
        vec![Some("0".into()), Some("7".into())]
    );
    s.approval_answer(
        Err("approval request r-3 was denied by bob@example.com: wrong amount".into()),
        world.now(),
    );
    let out = take(&mut s);
    assert_eq!(
        kinds(&out.events),
        vec![("statement.denied".into(), "approval".into())]
    );
    let out = client(&world, &mut s, &[execute(""), FrontendMessage::Sync]);
    assert_eq!(
        bytes_of(&out.to_server),
        vec![fe(&FrontendMessage::Sync)],
        "the Execute is skipped up to the Sync"
    );
    let out = server(
        &world,
        &mut s,
        &[marker_syntax_error(), ready(TransactionStatus::Idle)],
    );
    let e = error_fields(&out.to_client[0]);
    assert_eq!(e.sqlstate(), Some("42501"));
    assert!(
        e.message().unwrap().contains("wrong amount"),
        "{:?}",
        e.message()
    );
    assert!(s.awaits_nothing());
    // Reads need no approval.
    let out = client(&world, &mut s, &[query("SELECT 1")]);
    assert_eq!(bytes_of(&out.to_server), vec![fe(&query("SELECT 1"))]);
}
