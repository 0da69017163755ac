//! The access review computed from events already read and the policies in force: no I/O, so
//! every section is tested over a generated trail without root. Each figure keeps the seqs of
//! the events it was counted from (its evidence); a renderer may shorten the list, the JSON
//! form never does.

use std::collections::{BTreeMap, BTreeSet};

use portcullis_core::{Identity, IdentityKind};
use portcullis_policy::{Action, Effect, PolicyEffect, PolicySet, Request, Selector, Target};
use serde::{Deserialize, Serialize};

/// The fields of an audit event the review reads; the rest of the event is ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TrailEvent {
    #[serde(skip)]
    pub seq: u64,
    pub time_ms: u64,
    pub event: String,
    pub connection_id: Option<u64>,
    pub target: Option<String>,
    pub identity: Option<Identity>,
    pub reason: Option<String>,
    pub decision: Option<String>,
    #[serde(default)]
    pub policy_ids: Vec<String>,
    pub statement: Option<String>,
    pub statement_class: Option<String>,
    #[serde(default)]
    pub tables: Vec<String>,
    pub masking_profile: Option<String>,
    pub channel: Option<String>,
    pub command_line: Option<String>,
    pub sftp_operation: Option<String>,
    pub request_id: Option<String>,
    pub grant_id: Option<String>,
    pub requester: Option<String>,
    #[serde(default)]
    pub approvers: Vec<String>,
    pub approval_state: Option<String>,
    #[serde(default)]
    pub break_glass: bool,
    pub count: Option<u64>,
}

impl TrailEvent {
    /// Parses one stored event; `seq` is the record's, which the event itself does not carry.
    pub fn parse(seq: u64, json: &str) -> Result<TrailEvent, serde_json::Error> {
        let mut event: TrailEvent = serde_json::from_str(json)?;
        event.seq = seq;
        Ok(event)
    }

    fn denied(&self) -> bool {
        matches!(self.decision.as_deref(), Some("deny" | "approval"))
    }
}

/// `[from_ms, to_ms)`: the review period, in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Period {
    pub from_ms: u64,
    pub to_ms: u64,
}

impl Period {
    fn contains(&self, time_ms: u64) -> bool {
        time_ms >= self.from_ms && time_ms < self.to_ms
    }
}

/// What the report is computed over besides the events.
pub struct Inputs<'a> {
    pub period: Period,
    /// Only events about this target (and only this target in the policy sections).
    pub target: Option<&'a str>,
    /// The policies in force now; `None` when they could not be loaded (the sections that
    /// need them say so).
    pub policies: Option<&'a PolicySet>,
    /// The configured targets, as policies see them.
    pub targets: &'a [Target],
    /// A service or workload identity last seen longer ago than this before the period's end
    /// is stale.
    pub stale_days: u64,
}

/// A count and the events it was counted from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counted {
    pub name: String,
    pub count: u64,
    pub evidence: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetUse {
    pub target: String,
    pub first_ms: u64,
    pub last_ms: u64,
    /// Connections opened (`connection.opened`).
    pub connections: u64,
    pub evidence: Vec<u64>,
}

/// One approval request as the trail tells it, from its request to its last decision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApprovalRecord {
    pub request_id: String,
    pub grant_id: Option<String>,
    pub requester: String,
    pub target: String,
    /// The last state the trail shows: pending, approved, denied, expired, withdrawn, revoked.
    pub state: String,
    /// The subjects whose approvals counted.
    pub approvers: Vec<String>,
    pub break_glass: bool,
    pub evidence: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedSession {
    pub session_id: u64,
    pub target: String,
    pub evidence: Vec<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IdentitySummary {
    /// `kind:name` (`user:alice@example.com`, `service:billing-etl`, `unix:1001`).
    pub identity: String,
    pub kind: String,
    pub targets: Vec<TargetUse>,
    pub statement_classes: Vec<Counted>,
    pub ssh_actions: Vec<Counted>,
    /// By event kind (`connection.refused`, `statement.denied`, ...).
    pub denials: Vec<Counted>,
    pub approvals_requested: Vec<ApprovalRecord>,
    /// The requests this identity approved (or denied), by request id.
    pub approvals_given: Vec<Counted>,
    pub break_glass: Vec<ApprovalRecord>,
    /// Statements whose results were masked, by masking profile.
    pub masked_reads: Vec<Counted>,
    pub recorded_sessions: Vec<RecordedSession>,
}

/// A read of a protected table that ran without a masking profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnmaskedRead {
    pub seq: u64,
    pub identity: String,
    pub target: String,
    pub tables: Vec<String>,
    /// What makes these tables protected: `profile <name> (table_column rule)` or
    /// `masked for others in the period (profile <name>)`.
    pub protected_by: Vec<String>,
    /// The policies that let the statement through.
    pub policy_ids: Vec<String>,
    pub statement: String,
}

/// An action that ran under a policy demanding an approval, with what vouched for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrivilegedAction {
    pub seq: u64,
    pub identity: String,
    pub target: String,
    pub event: String,
    pub what: String,
    /// `approval:r-…`, `grant:g-…`, or empty when nothing did.
    pub approved_by: Vec<String>,
    pub approvers: Vec<String>,
    pub break_glass: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrivilegedActions {
    /// Ran with an approval or grant (break-glass ones flagged).
    pub approved: Vec<PrivilegedAction>,
    /// Ran under a policy that demands an approval, with none in its `policy_ids`: must be
    /// empty.
    pub without_approval: Vec<PrivilegedAction>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionReplay {
    pub session_id: u64,
    pub identity: String,
    pub target: String,
    pub replayable: bool,
    /// Why not: the `recording.failed` reason, `recording not closed`, or `not recorded`.
    pub why: String,
    pub evidence: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reach {
    pub identity: String,
    pub target: String,
    /// allow, or approval (reachable once approved).
    pub decision: String,
    pub policy_ids: Vec<String>,
    /// The events the identity's attributes (groups) were taken from: its last one.
    pub evidence: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProductionReach {
    pub production_targets: Vec<String>,
    pub reach: Vec<Reach>,
    pub limitation: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaleIdentity {
    pub identity: String,
    pub last_seen_ms: u64,
    pub evidence: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SingleApprover {
    pub requester: String,
    pub approver: String,
    pub requests: Vec<String>,
    pub evidence: Vec<u64>,
}

/// A group a permit or an approval requirement names that no identity of the period carried.
/// The agent cannot list a provider's groups, so this is what it can say honestly: no member
/// was seen in the period, not that the group is empty at the provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupUnseen {
    pub group: String,
    /// `<policy> (permit)` or `<policy> (approver)`.
    pub named_by: Vec<String>,
}

/// The finding's label, as the report prints it.
pub const NO_MEMBER_SEEN: &str = "no member seen in the period";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Findings {
    /// Permit policies no event of the period names.
    pub unused_permits: Vec<String>,
    /// Targets the current policies let an identity reach that it never connected to.
    pub unused_access: Vec<Reach>,
    pub stale_services: Vec<StaleIdentity>,
    pub single_approver: Vec<SingleApprover>,
    /// Groups granted by policy (a permit or an approver rule) with no member seen in the
    /// period.
    pub groups_without_members_seen: Vec<GroupUnseen>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub period: Period,
    pub target: Option<String>,
    /// Events of the period (after the target filter).
    pub events: u64,
    pub identities: Vec<IdentitySummary>,
    pub unmasked_reads: Vec<UnmaskedRead>,
    pub privileged: PrivilegedActions,
    pub sessions: Vec<SessionReplay>,
    pub production: ProductionReach,
    pub findings: Findings,
    /// What a section could not compute (no policies loaded, ...).
    pub notes: Vec<String>,
    /// On a fleet: evidence number `n` is the record `evidence_names[n - 1]` (`bastion#seq`).
    #[serde(skip)]
    pub evidence_names: Option<std::sync::Arc<Vec<String>>>,
}

/// `kind:name`, the name an auditor knows: the email of a person, the name of a service.
pub fn identity_label(identity: &Identity) -> String {
    let name = match identity.kind {
        IdentityKind::User => identity.email.clone().or(identity.subject.clone()),
        IdentityKind::Service => identity.name.clone().or(identity.subject.clone()),
        IdentityKind::Workload => identity.subject.clone(),
        IdentityKind::Unix => identity.user.clone(),
    };
    let kind = kind_word(identity.kind);
    match name {
        Some(n) => format!("{kind}:{n}"),
        None => format!("{kind}:uid {}", identity.uid),
    }
}

fn kind_word(kind: IdentityKind) -> &'static str {
    match kind {
        IdentityKind::User => "user",
        IdentityKind::Service => "service",
        IdentityKind::Workload => "workload",
        IdentityKind::Unix => "unix",
    }
}

/// `target.labels.environment == "production"` (case-insensitive), the label the example
/// policies test.
pub fn is_production(target: &Target) -> bool {
    target
        .labels
        .get("environment")
        .is_some_and(|v| v.eq_ignore_ascii_case("production"))
}

const MS_PER_DAY: u64 = 86_400_000;

#[derive(Default)]
struct Acc {
    kind: String,
    targets: BTreeMap<String, TargetUse>,
    classes: BTreeMap<String, Counted>,
    ssh: BTreeMap<String, Counted>,
    denials: BTreeMap<String, Counted>,
    given: BTreeMap<String, Counted>,
    masked: BTreeMap<String, Counted>,
    recorded: BTreeMap<u64, RecordedSession>,
}

fn bump(map: &mut BTreeMap<String, Counted>, name: &str, by: u64, seq: u64) {
    let c = map.entry(name.to_string()).or_insert_with(|| Counted {
        name: name.to_string(),
        ..Counted::default()
    });
    c.count = c.count.saturating_add(by);
    c.evidence.push(seq);
}

struct Connection {
    identity: Option<String>,
    target: String,
}

/// The SSH action an event stands for, or `None` for any other event.
fn ssh_action(e: &TrailEvent) -> Option<String> {
    if e.denied() {
        return None;
    }
    Some(match e.event.as_str() {
        "ssh.shell" => "shell".to_string(),
        "ssh.exec" => "exec".to_string(),
        "ssh.subsystem" => format!("subsystem:{}", e.channel.as_deref().unwrap_or("?")),
        "ssh.sftp" => format!("sftp:{}", e.sftp_operation.as_deref().unwrap_or("?")),
        "ssh.forward" => "forward".to_string(),
        "ssh.agent_channel" => "agent_forward".to_string(),
        "ssh.shell_line" => "shell_line".to_string(),
        _ => return None,
    })
}

/// Events that stand for something that ran, for the privileged-action question.
fn ran(e: &TrailEvent) -> bool {
    let kinds = [
        "connection.opened",
        "statement.executed",
        "ssh.shell",
        "ssh.exec",
        "ssh.subsystem",
        "ssh.sftp",
        "ssh.forward",
        "ssh.shell_line",
    ];
    kinds.contains(&e.event.as_str()) && !e.denied()
}

fn what(e: &TrailEvent) -> String {
    if e.event == "connection.opened" {
        return format!("connection {}", e.connection_id.unwrap_or(0));
    }
    e.statement
        .clone()
        .or(e.command_line.clone())
        .or(e.sftp_operation.clone())
        .unwrap_or_else(|| e.event.clone())
}

/// What one pass over the trail gathers for the sections.
#[derive(Default)]
struct Scan<'e> {
    /// Connections are told once, at `connection.opened`; later events of the connection
    /// (recordings) may not repeat the identity or target.
    connections: BTreeMap<u64, Connection>,
    /// Every identity up to the period's end: when and in which event it was last seen.
    last_seen: BTreeMap<String, (u64, u64, &'e Identity)>,
    accs: BTreeMap<String, Acc>,
    requests: BTreeMap<String, ApprovalRecord>,
    request_of_grant: BTreeMap<String, String>,
    /// (target, table) read with a masking profile in the period, and the profiles.
    masked_tables: BTreeMap<(String, String), BTreeSet<String>>,
    used_policies: BTreeSet<String>,
    /// Per connection: recording event seqs, the failure reason, whether it was closed.
    recordings: BTreeMap<u64, (Vec<u64>, Option<String>, bool)>,
    shells: BTreeMap<u64, Vec<u64>>,
    in_period: Vec<&'e TrailEvent>,
    /// The groups identities carried in any event of the period, whatever its target:
    /// membership is not a target's.
    groups_seen: BTreeSet<String>,
}

/// Computes the report. `events` is the whole trail read (oldest first): the period and
/// target filter apply here, and a service's last sighting is looked for before the period
/// too.
pub fn compute(events: &[TrailEvent], inputs: &Inputs<'_>) -> Report {
    let mut scan = scan(events, inputs);
    let identities = identity_summaries(&mut scan);
    let mut notes = Vec::new();
    if inputs.targets.is_empty() {
        notes.push(
            "no targets known (no config read): who can reach production and unused access \
             are not computed"
                .to_string(),
        );
    }
    if inputs.policies.is_none() {
        notes.push(
            "no policies loaded: privileged actions are only those with an approval or grant; \
             unmasked reads use the masked reads of the period only; reach and unused \
             permits are not computed"
                .to_string(),
        );
    }

    let reach_all = reach(&scan, &identities, inputs);
    let production_targets: Vec<String> = inputs
        .targets
        .iter()
        .filter(|t| inputs.target.is_none_or(|name| t.name == name) && is_production(t))
        .map(|t| t.name.clone())
        .collect();
    let production = ProductionReach {
        reach: reach_all
            .iter()
            .filter(|r| production_targets.contains(&r.target))
            .cloned()
            .collect(),
        production_targets,
        limitation: "decided now by the current policies (action connect, at the period's end) \
                     for every identity seen in the period, with the groups of its last event; \
                     identities never seen in the trail are not enumerated"
            .to_string(),
    };
    Report {
        period: inputs.period,
        target: inputs.target.map(str::to_string),
        events: u64::try_from(scan.in_period.len()).unwrap_or(u64::MAX),
        unmasked_reads: unmasked_reads(&scan, inputs.policies),
        privileged: privileged_actions(&scan, inputs.policies),
        sessions: sessions(&scan),
        findings: findings(&scan, &identities, &reach_all, inputs),
        identities,
        production,
        notes,
        evidence_names: None,
    }
}

fn scan<'e>(events: &'e [TrailEvent], inputs: &Inputs<'_>) -> Scan<'e> {
    let period = inputs.period;
    let mut scan = Scan::default();
    let Scan {
        connections,
        last_seen,
        accs,
        requests,
        request_of_grant,
        masked_tables,
        used_policies,
        recordings,
        shells,
        in_period,
        groups_seen,
    } = &mut scan;
    // An approval event names its requester by email (else subject): back to the label of
    // the identity that carried that name, for a request made before the period.
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for e in events {
        if e.time_ms >= period.to_ms {
            continue;
        }
        let own_label = e.identity.as_ref().map(identity_label);
        if let (Some(identity), Some(label)) = (&e.identity, &own_label) {
            if last_seen
                .insert(label.clone(), (e.time_ms, e.seq, identity))
                .is_none()
            {
                for name in [&identity.email, &identity.subject, &identity.name]
                    .into_iter()
                    .flatten()
                {
                    names.entry(name.clone()).or_insert_with(|| label.clone());
                }
            }
        }
        if e.event == "connection.opened" {
            if let Some(id) = e.connection_id {
                connections.insert(
                    id,
                    Connection {
                        identity: own_label.clone(),
                        target: e.target.clone().unwrap_or_default(),
                    },
                );
            }
        }
        if !period.contains(e.time_ms) {
            continue;
        }
        if let Some(identity) = &e.identity {
            groups_seen.extend(identity.groups.iter().cloned());
        }
        let conn_target = e
            .connection_id
            .and_then(|id| connections.get(&id))
            .map(|c| c.target.clone());
        let target = e.target.clone().or(conn_target).unwrap_or_default();
        if inputs.target.is_some_and(|t| t != target) {
            continue;
        }
        in_period.push(e);
        used_policies.extend(e.policy_ids.iter().cloned());
        let label = own_label.or_else(|| {
            e.connection_id
                .and_then(|id| connections.get(&id))
                .and_then(|c| c.identity.clone())
        });
        if e.event.starts_with("approval.") || e.event.starts_with("grant.") {
            if let Some(rid) = &e.request_id {
                let r = requests
                    .entry(rid.clone())
                    .or_insert_with(|| ApprovalRecord {
                        request_id: rid.clone(),
                        ..ApprovalRecord::default()
                    });
                if e.event == "approval.requested" {
                    r.requester = label.clone().unwrap_or_default();
                }
                if r.requester.is_empty() {
                    r.requester = e
                        .requester
                        .as_ref()
                        .map(|n| {
                            names
                                .get(n)
                                .cloned()
                                .unwrap_or_else(|| format!("requester:{n}"))
                        })
                        .unwrap_or_default();
                }
                if r.target.is_empty() {
                    r.target = target.clone();
                }
                if let Some(state) = &e.approval_state {
                    r.state = state.clone();
                }
                if !e.approvers.is_empty() {
                    r.approvers = e.approvers.clone();
                }
                if let Some(g) = &e.grant_id {
                    r.grant_id = Some(g.clone());
                    request_of_grant.insert(g.clone(), rid.clone());
                }
                r.break_glass |= e.break_glass;
                r.evidence.push(e.seq);
            }
        }
        if e.event.starts_with("recording.") {
            if let Some(id) = e.connection_id {
                let r = recordings.entry(id).or_default();
                r.0.push(e.seq);
                match e.event.as_str() {
                    "recording.closed" => r.2 = true,
                    "recording.failed" => {
                        r.1 = Some(
                            e.reason
                                .clone()
                                .unwrap_or_else(|| "recording failed".into()),
                        )
                    }
                    _ => {}
                }
            }
        }
        if e.event == "ssh.shell" && !e.denied() {
            if let Some(id) = e.connection_id {
                shells.entry(id).or_default().push(e.seq);
            }
        }
        if e.event == "statement.executed" {
            if let Some(profile) = &e.masking_profile {
                for t in &e.tables {
                    masked_tables
                        .entry((target.clone(), t.clone()))
                        .or_default()
                        .insert(profile.clone());
                }
            }
        }
        let Some(label) = label else { continue };
        let acc = accs.entry(label).or_default();
        if let Some(identity) = &e.identity {
            acc.kind = kind_word(identity.kind).to_string();
        }
        match e.event.as_str() {
            "connection.opened" => {
                let t = acc
                    .targets
                    .entry(target.clone())
                    .or_insert_with(|| TargetUse {
                        target: target.clone(),
                        first_ms: e.time_ms,
                        last_ms: e.time_ms,
                        connections: 0,
                        evidence: Vec::new(),
                    });
                t.last_ms = e.time_ms;
                t.connections += 1;
                t.evidence.push(e.seq);
            }
            "statement.executed" => {
                let class = e.statement_class.as_deref().unwrap_or("unparsed");
                bump(&mut acc.classes, class, 1, e.seq);
                if let Some(profile) = &e.masking_profile {
                    bump(&mut acc.masked, profile, 1, e.seq);
                }
            }
            "approval.approved" | "approval.denied" => {
                if let Some(rid) = &e.request_id {
                    bump(&mut acc.given, rid, 1, e.seq);
                }
            }
            "recording.closed" => {
                if let Some(id) = e.connection_id {
                    acc.recorded
                        .entry(id)
                        .or_insert_with(|| RecordedSession {
                            session_id: id,
                            target: target.clone(),
                            evidence: Vec::new(),
                        })
                        .evidence
                        .push(e.seq);
                }
            }
            _ => {}
        }
        if let Some(action) = ssh_action(e) {
            bump(&mut acc.ssh, &action, 1, e.seq);
        }
        let refusal = matches!(
            e.event.as_str(),
            "connection.refused" | "statement.denied" | "ssh.channel_denied"
        ) || (e.denied() && e.event.starts_with("ssh."));
        if refusal {
            bump(&mut acc.denials, &e.event, e.count.unwrap_or(1), e.seq);
        }
    }

    scan
}

fn identity_summaries(scan: &mut Scan<'_>) -> Vec<IdentitySummary> {
    let requests = &scan.requests;
    let accs = std::mem::take(&mut scan.accs);
    let mut requests_by: BTreeMap<&str, Vec<ApprovalRecord>> = BTreeMap::new();
    for r in requests.values() {
        requests_by.entry(&r.requester).or_default().push(r.clone());
    }
    let mut identities: Vec<IdentitySummary> = accs
        .into_iter()
        .map(|(identity, acc)| {
            let requested = requests_by.remove(identity.as_str()).unwrap_or_default();
            IdentitySummary {
                kind: acc.kind,
                break_glass: requested
                    .iter()
                    .filter(|r| r.break_glass)
                    .cloned()
                    .collect(),
                approvals_requested: requested,
                identity,
                targets: acc.targets.into_values().collect(),
                statement_classes: acc.classes.into_values().collect(),
                ssh_actions: acc.ssh.into_values().collect(),
                denials: acc.denials.into_values().collect(),
                approvals_given: acc.given.into_values().collect(),
                masked_reads: acc.masked.into_values().collect(),
                recorded_sessions: acc.recorded.into_values().collect(),
            }
        })
        .collect();
    identities.sort_by(|a, b| a.identity.cmp(&b.identity));
    identities
}

/// Question 1. The trail names the tables a statement read, not its result columns, so a
/// table counts as protected when a masking rule names it (`table_column`) or when the
/// period shows reads of it masked; a read of it without a profile is listed (it may not
/// have selected the protected columns: the list over-approximates, never misses a
/// table-level exposure the trail can show).
fn unmasked_reads(scan: &Scan<'_>, policies: Option<&PolicySet>) -> Vec<UnmaskedRead> {
    let masked_tables = &scan.masked_tables;
    let mut rule_tables: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    if let Some(set) = policies {
        for profile in set.masking_profiles() {
            for rule in &profile.rules {
                if let Selector::TableColumn(tc) = &rule.selector {
                    for name in [tc.table.clone(), format!("{}.{}", tc.schema, tc.table)] {
                        rule_tables
                            .entry(name)
                            .or_default()
                            .insert(profile.name.clone());
                    }
                }
            }
        }
    }
    let mut unmasked_reads = Vec::new();
    for e in &scan.in_period {
        if e.event != "statement.executed"
            || e.masking_profile.is_some()
            || e.statement_class.as_deref() != Some("read")
        {
            continue;
        }
        let target = e.target.clone().unwrap_or_default();
        let mut protected_by = BTreeSet::new();
        let mut tables = Vec::new();
        for t in &e.tables {
            let mut hit = false;
            if let Some(profiles) = rule_tables.get(t) {
                for p in profiles {
                    protected_by.insert(format!("profile {p} (table_column rule)"));
                }
                hit = true;
            }
            if let Some(profiles) = masked_tables.get(&(target.clone(), t.clone())) {
                for p in profiles {
                    protected_by.insert(format!("masked for others in the period (profile {p})"));
                }
                hit = true;
            }
            if hit {
                tables.push(t.clone());
            }
        }
        if !tables.is_empty() {
            unmasked_reads.push(UnmaskedRead {
                seq: e.seq,
                identity: e.identity.as_ref().map(identity_label).unwrap_or_default(),
                target,
                tables,
                protected_by: protected_by.into_iter().collect(),
                policy_ids: e.policy_ids.clone(),
                statement: e.statement.clone().unwrap_or_default(),
            });
        }
    }

    unmasked_reads
}

/// Question 2. Privileged: named by an `approval:`/`grant:` id, or by a policy that demands
/// an approval in the current set (a permit allowed it: the set changed, or a bug let it
/// through).
fn privileged_actions(scan: &Scan<'_>, policies: Option<&PolicySet>) -> PrivilegedActions {
    let Scan {
        connections,
        requests,
        request_of_grant,
        ..
    } = scan;
    let demands_approval = |id: &str| {
        policies
            .and_then(|s| s.policy(id))
            .is_some_and(|p| p.approval.is_some())
    };
    let mut privileged = PrivilegedActions {
        approved: Vec::new(),
        without_approval: Vec::new(),
    };
    for e in &scan.in_period {
        if !ran(e) {
            continue;
        }
        let approved_by: Vec<String> = e
            .policy_ids
            .iter()
            .filter(|id| id.starts_with("approval:") || id.starts_with("grant:"))
            .cloned()
            .collect();
        if approved_by.is_empty() && !e.policy_ids.iter().any(|id| demands_approval(id)) {
            continue;
        }
        let mut approvers = BTreeSet::new();
        let mut break_glass = e.break_glass;
        for id in &approved_by {
            let rid = match id.split_once(':') {
                Some(("approval", r)) => Some(r.to_string()),
                Some(("grant", g)) => request_of_grant.get(g).cloned(),
                _ => None,
            };
            if let Some(r) = rid.and_then(|r| requests.get(&r)) {
                approvers.extend(r.approvers.iter().cloned());
                break_glass |= r.break_glass;
            }
        }
        let label = e
            .identity
            .as_ref()
            .map(identity_label)
            .or_else(|| {
                e.connection_id
                    .and_then(|id| connections.get(&id))
                    .and_then(|c| c.identity.clone())
            })
            .unwrap_or_default();
        let action = PrivilegedAction {
            seq: e.seq,
            identity: label,
            target: e.target.clone().unwrap_or_default(),
            event: e.event.clone(),
            what: what(e),
            approvers: approvers.into_iter().collect(),
            break_glass,
            approved_by: approved_by.clone(),
        };
        if approved_by.is_empty() {
            privileged.without_approval.push(action);
        } else {
            privileged.approved.push(action);
        }
    }

    privileged
}

/// Question 3: every connection with a recording event or a shell.
fn sessions(scan: &Scan<'_>) -> Vec<SessionReplay> {
    let Scan {
        connections,
        recordings,
        shells,
        ..
    } = scan;
    let mut session_ids: BTreeSet<u64> = recordings.keys().copied().collect();
    session_ids.extend(shells.keys().copied());
    session_ids
        .into_iter()
        .map(|id| {
            let conn = connections.get(&id);
            let mut evidence = shells.get(&id).cloned().unwrap_or_default();
            let (replayable, why) = match recordings.get(&id) {
                Some((seqs, failed, closed)) => {
                    evidence.extend(seqs.iter().copied());
                    match (failed, closed) {
                        (Some(reason), _) => (false, reason.clone()),
                        (None, true) => (true, String::new()),
                        (None, false) => (
                            false,
                            "recording not closed (session still open, or the agent stopped)"
                                .to_string(),
                        ),
                    }
                }
                None => (false, "not recorded: no recording event".to_string()),
            };
            evidence.sort_unstable();
            SessionReplay {
                session_id: id,
                identity: conn.and_then(|c| c.identity.clone()).unwrap_or_default(),
                target: conn.map(|c| c.target.clone()).unwrap_or_default(),
                replayable,
                why,
                evidence,
            }
        })
        .collect()
}

/// Question 4's decisions: every identity of the period × every target (of the filter),
/// for `connect`, by the current policies; denials left out.
fn reach(scan: &Scan<'_>, identities: &[IdentitySummary], inputs: &Inputs<'_>) -> Vec<Reach> {
    let period = inputs.period;
    let targets: Vec<&Target> = inputs
        .targets
        .iter()
        .filter(|t| inputs.target.is_none_or(|name| t.name == name))
        .collect();
    let reached = reached(identities);
    let mut reach_all = Vec::new();
    if let Some(set) = inputs.policies {
        for (label, (_, seq, identity)) in &scan.last_seen {
            if !reached.contains_key(label.as_str()) {
                continue;
            }
            for t in &targets {
                let request = Request {
                    principal: crate::policy::principal(identity),
                    action: Action::Connect,
                    target: (*t).clone(),
                    context: crate::policy::base_context(
                        "review",
                        identity.uid,
                        i64::try_from(period.to_ms / 1000).unwrap_or(i64::MAX),
                    ),
                };
                let decision = set.decide(&request);
                let word = match decision.effect {
                    Effect::Allow => "allow",
                    Effect::RequireApproval(_) => "approval",
                    Effect::Deny => continue,
                };
                reach_all.push(Reach {
                    identity: label.clone(),
                    target: t.name.clone(),
                    decision: word.to_string(),
                    policy_ids: decision.matched.iter().map(|p| p.to_string()).collect(),
                    evidence: vec![*seq],
                });
            }
        }
    }

    reach_all
}

fn findings(
    scan: &Scan<'_>,
    identities: &[IdentitySummary],
    reach_all: &[Reach],
    inputs: &Inputs<'_>,
) -> Findings {
    let Scan {
        last_seen,
        requests,
        used_policies,
        ..
    } = scan;
    let period = inputs.period;
    // Every identity of the period, with the targets it connected to.
    let reached = reached(identities);
    let unused_permits = inputs
        .policies
        .map(|set| {
            set.policies()
                .iter()
                .filter(|p| p.effect == PolicyEffect::Permit)
                .map(|p| p.id.to_string())
                .filter(|id| !used_policies.contains(id))
                .collect()
        })
        .unwrap_or_default();
    let unused_access = reach_all
        .iter()
        .filter(|r| {
            !reached
                .get(r.identity.as_str())
                .is_some_and(|targets| targets.contains(r.target.as_str()))
        })
        .cloned()
        .collect();
    let stale_before = period
        .to_ms
        .saturating_sub(inputs.stale_days.saturating_mul(MS_PER_DAY));
    let stale_services = last_seen
        .iter()
        .filter(|(_, (time_ms, _, identity))| {
            matches!(
                identity.kind,
                IdentityKind::Service | IdentityKind::Workload
            ) && *time_ms < stale_before
        })
        .map(|(label, (time_ms, seq, _))| StaleIdentity {
            identity: label.clone(),
            last_seen_ms: *time_ms,
            evidence: vec![*seq],
        })
        .collect();
    // Break-glass is a self-approval, listed as such; it says nothing of who reviews.
    let mut by_requester: BTreeMap<&str, Vec<&ApprovalRecord>> = BTreeMap::new();
    for r in requests.values() {
        if !r.break_glass && !r.approvers.is_empty() && !r.requester.is_empty() {
            by_requester.entry(&r.requester).or_default().push(r);
        }
    }
    let single_approver = by_requester
        .into_iter()
        .filter_map(|(requester, rs)| {
            let approvers: BTreeSet<&String> = rs.iter().flat_map(|r| &r.approvers).collect();
            let only = approvers.iter().next().filter(|_| approvers.len() == 1)?;
            (rs.len() >= 2).then(|| SingleApprover {
                requester: requester.to_string(),
                approver: (*only).clone(),
                requests: rs.iter().map(|r| r.request_id.clone()).collect(),
                evidence: rs.iter().flat_map(|r| r.evidence.iter().copied()).collect(),
            })
        })
        .collect();

    Findings {
        unused_permits,
        unused_access,
        stale_services,
        single_approver,
        groups_without_members_seen: groups_without_members_seen(
            &scan.groups_seen,
            inputs.policies,
        ),
    }
}

/// Groups a permit names (in its scope or conditions) or an approval requirement asks for,
/// that no identity of the period carried. Forbids are left out: they grant nothing.
fn groups_without_members_seen(
    seen: &BTreeSet<String>,
    policies: Option<&PolicySet>,
) -> Vec<GroupUnseen> {
    let Some(set) = policies else {
        return Vec::new();
    };
    let mut named: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in set.policies() {
        if p.effect == PolicyEffect::Permit {
            for g in p.groups_named() {
                named
                    .entry(g)
                    .or_default()
                    .push(format!("{} (permit)", p.id));
            }
        }
        for q in p.approval.iter().flat_map(|a| &a.quorums) {
            named
                .entry(q.group.clone())
                .or_default()
                .push(format!("{} (approver)", p.id));
        }
    }
    named
        .into_iter()
        .filter(|(group, _)| !seen.contains(group))
        .map(|(group, named_by)| GroupUnseen { group, named_by })
        .collect()
}

fn reached(identities: &[IdentitySummary]) -> BTreeMap<&str, BTreeSet<&str>> {
    identities
        .iter()
        .map(|i| {
            (
                i.identity.as_str(),
                i.targets.iter().map(|t| t.target.as_str()).collect(),
            )
        })
        .collect()
}
