//! Segregation of duties: the one place that says whose approval counts. Pure: the
//! requirement, the requester and the verdicts in, the count out.
//!
//! - the requester never counts, whatever groups they hold;
//! - only a person counts (an OIDC login of kind `user` with a subject): services, CI
//!   workloads and Unix-only identities may ask but never approve;
//! - each person counts once, by OIDC subject (not uid, not email), however many uids,
//!   sessions or groups they have; with several groups (an AND), one person fills at most one
//!   group's place;
//! - a person's groups are those their token carried when they decided;
//! - nobody is exempt: root is a person like any other here, or nobody.

use std::collections::BTreeMap;

use portcullis_core::{Identity, IdentityKind};
use portcullis_policy::ApprovalRequirement;

/// Why a person may not approve or deny a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ineligible {
    #[error("you asked for this yourself; someone else must approve it (segregation of duties)")]
    Requester,
    #[error("a {0} identity may ask for approval but never approve; log in as a person with `portcullis login`")]
    NotAPerson(&'static str),
    #[error("your login names no subject, so it cannot be told apart from others")]
    NoSubject,
    #[error(
        "you are in none of the groups asked to approve ({groups}); your login's groups: {mine}"
    )]
    NotInGroup { groups: String, mine: String },
}

/// The key one person counts under: their OIDC subject.
pub fn person(identity: &Identity) -> Option<&str> {
    identity.subject.as_deref().filter(|s| !s.is_empty())
}

/// Whether `approver` may decide a request `requester` made under `requirement`; the groups
/// that count are those of `approver`'s token now.
pub fn eligible(
    requirement: &ApprovalRequirement,
    requester: &Identity,
    approver: &Identity,
) -> Result<(), Ineligible> {
    match approver.kind {
        IdentityKind::User => {}
        IdentityKind::Service => return Err(Ineligible::NotAPerson("service")),
        IdentityKind::Workload => return Err(Ineligible::NotAPerson("CI workload")),
        IdentityKind::Unix => return Err(Ineligible::NotAPerson("Unix-only")),
    }
    let Some(subject) = person(approver) else {
        return Err(Ineligible::NoSubject);
    };
    // A requester without a subject (a Unix-only identity) is nobody an approver can be.
    if person(requester) == Some(subject) {
        return Err(Ineligible::Requester);
    }
    let in_group = requirement
        .quorums
        .iter()
        .any(|q| approver.groups.contains(&q.group));
    if !in_group {
        let groups: Vec<&str> = requirement
            .quorums
            .iter()
            .map(|q| q.group.as_str())
            .collect();
        return Err(Ineligible::NotInGroup {
            groups: groups.join(", "),
            mine: if approver.groups.is_empty() {
                "none".into()
            } else {
                approver.groups.join(", ")
            },
        });
    }
    Ok(())
}

/// How far a request is from its approvals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Every quorum is filled by different people.
    pub met: bool,
    /// For each group, how many places are filled (the best assignment of people to groups).
    pub filled: BTreeMap<String, u32>,
    /// The subjects that count, once each.
    pub counted: Vec<String>,
}

/// Counts `approvals` (each the approver's identity as it was when they approved) against
/// `requirement` for a request of `requester`. The ones that do not count are skipped here
/// as well as refused when they are made, so a stored verdict cannot count by mistake.
pub fn tally(
    requirement: &ApprovalRequirement,
    requester: &Identity,
    approvals: &[&Identity],
) -> Tally {
    // One entry per person: the first verdict of a subject is theirs; a second (another uid,
    // another session) adds nothing.
    let mut people: Vec<(&str, &Identity)> = Vec::new();
    for a in approvals {
        if eligible(requirement, requester, a).is_err() {
            continue;
        }
        let Some(subject) = person(a) else { continue };
        if people.iter().all(|(s, _)| *s != subject) {
            people.push((subject, a));
        }
    }
    // Each group has `approvals` places; each person takes at most one place, in a group
    // their token named. The largest such assignment is a bipartite matching (augmenting
    // paths; a few dozen people and places at most).
    let places: Vec<&str> = requirement
        .quorums
        .iter()
        .flat_map(|q| std::iter::repeat_n(q.group.as_str(), q.approvals as usize))
        .collect();
    let mut holder: Vec<Option<usize>> = vec![None; places.len()];
    for p in 0..people.len() {
        let mut seen = vec![false; places.len()];
        augment(p, &people, &places, &mut holder, &mut seen);
    }
    let mut filled: BTreeMap<String, u32> = requirement
        .quorums
        .iter()
        .map(|q| (q.group.clone(), 0))
        .collect();
    let mut counted = Vec::new();
    for (place, who) in places.iter().zip(&holder) {
        if let Some(p) = who {
            *filled.entry((*place).to_owned()).or_default() += 1;
            if let Some((subject, _)) = people.get(*p) {
                counted.push((*subject).to_owned());
            }
        }
    }
    counted.sort();
    let met = holder.iter().all(Option::is_some);
    Tally {
        met,
        filled,
        counted,
    }
}

fn augment(
    p: usize,
    people: &[(&str, &Identity)],
    places: &[&str],
    holder: &mut [Option<usize>],
    seen: &mut [bool],
) -> bool {
    let Some((_, identity)) = people.get(p) else {
        return false;
    };
    for (i, group) in places.iter().enumerate() {
        let fits = identity.groups.iter().any(|g| g == group);
        if !fits || seen.get(i).copied().unwrap_or(true) {
            continue;
        }
        if let Some(s) = seen.get_mut(i) {
            *s = true;
        }
        let current = holder.get(i).copied().flatten();
        let free = match current {
            None => true,
            Some(other) => augment(other, people, places, holder, seen),
        };
        if free {
            if let Some(h) = holder.get_mut(i) {
                *h = Some(p);
            }
            return true;
        }
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use portcullis_policy::Quorum;

    fn who(kind: IdentityKind, uid: u32, subject: &str, groups: &[&str]) -> Identity {
        Identity {
            kind,
            uid,
            gid: uid,
            user: None,
            subject: (!subject.is_empty()).then(|| subject.to_owned()),
            email: Some(format!("{subject}@example.com")),
            name: None,
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            issuer: Some("https://issuer.example".into()),
        }
    }

    fn user(uid: u32, subject: &str, groups: &[&str]) -> Identity {
        who(IdentityKind::User, uid, subject, groups)
    }

    fn need(quorums: &[(&str, u32)]) -> ApprovalRequirement {
        ApprovalRequirement {
            quorums: quorums
                .iter()
                .map(|(g, n)| Quorum {
                    group: (*g).to_owned(),
                    approvals: *n,
                })
                .collect(),
        }
    }

    /// One row per rule: who asked, who approved (as their tokens were), whether it is met.
    #[test]
    fn who_counts_table() {
        let alice = user(1001, "alice", &["dba-leads", "security"]);
        let bob = user(1002, "bob", &["dba-leads"]);
        let bob_again = user(1012, "bob", &["dba-leads"]);
        let carol = user(1003, "carol", &["security"]);
        let dave = user(1004, "dave", &["dba-leads", "security"]);
        let erin = user(1005, "erin", &["dba-leads", "security"]);
        let ci = who(
            IdentityKind::Workload,
            1006,
            "repo:acme/infra",
            &["dba-leads"],
        );
        let svc = who(IdentityKind::Service, 1007, "backup", &["dba-leads"]);
        let unix = who(IdentityKind::Unix, 0, "", &["dba-leads"]);
        let bob_now_without = user(1002, "bob", &["developers"]);
        let root = user(0, "root-person", &[]);
        let alice_same_email_other_subject = Identity {
            email: alice.email.clone(),
            ..user(1008, "mallory", &["dba-leads"])
        };

        let rows: Vec<(&str, ApprovalRequirement, &Identity, Vec<&Identity>, bool)> = vec![
            (
                "one of the group",
                need(&[("dba-leads", 1)]),
                &alice,
                vec![&bob],
                true,
            ),
            (
                "the requester never counts, even in the group",
                need(&[("dba-leads", 1)]),
                &alice,
                vec![&alice],
                false,
            ),
            (
                "same person on two uids counts once",
                need(&[("dba-leads", 2)]),
                &alice,
                vec![&bob, &bob_again],
                false,
            ),
            (
                "two people fill two places",
                need(&[("dba-leads", 2)]),
                &alice,
                vec![&bob, &dave],
                true,
            ),
            (
                "a CI workload never counts",
                need(&[("dba-leads", 1)]),
                &alice,
                vec![&ci],
                false,
            ),
            (
                "a service never counts",
                need(&[("dba-leads", 1)]),
                &alice,
                vec![&svc],
                false,
            ),
            (
                "a Unix-only identity never counts",
                need(&[("dba-leads", 1)]),
                &alice,
                vec![&unix],
                false,
            ),
            (
                "groups are the token's at decision time",
                need(&[("dba-leads", 1)]),
                &alice,
                vec![&bob_now_without],
                false,
            ),
            (
                "no admin bypass: root's login without the group",
                need(&[("dba-leads", 1)]),
                &alice,
                vec![&root],
                false,
            ),
            (
                "AND of groups: one group only is not enough",
                need(&[("dba-leads", 1), ("security", 1)]),
                &alice,
                vec![&bob],
                false,
            ),
            (
                "AND of groups: one from each",
                need(&[("dba-leads", 1), ("security", 1)]),
                &alice,
                vec![&bob, &carol],
                true,
            ),
            (
                "AND of groups: one person in both fills one place",
                need(&[("dba-leads", 1), ("security", 1)]),
                &alice,
                vec![&dave],
                false,
            ),
            (
                "AND of groups: two people in both fill both",
                need(&[("dba-leads", 1), ("security", 1)]),
                &alice,
                vec![&dave, &erin],
                true,
            ),
            (
                "AND of groups: assignment finds the one that fits",
                need(&[("dba-leads", 1), ("security", 1)]),
                &alice,
                vec![&dave, &bob],
                true,
            ),
            (
                "the same email under another subject is another person",
                need(&[("dba-leads", 1)]),
                &alice,
                vec![&alice_same_email_other_subject],
                true,
            ),
            (
                "nobody approved",
                need(&[("dba-leads", 1)]),
                &alice,
                vec![],
                false,
            ),
        ];
        let mut failures = Vec::new();
        for (name, requirement, requester, approvals, want) in rows {
            let got = tally(&requirement, requester, &approvals);
            if got.met != want {
                failures.push(format!("{name}: met = {}, want {want} ({got:?})", got.met));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn ineligible_approvers_are_told_why() {
        let requirement = need(&[("dba-leads", 1)]);
        let alice = user(1001, "alice", &["dba-leads"]);
        assert_eq!(
            eligible(&requirement, &alice, &user(2001, "alice", &["dba-leads"])),
            Err(Ineligible::Requester)
        );
        assert_eq!(
            eligible(
                &requirement,
                &alice,
                &who(IdentityKind::Workload, 1006, "ci", &["dba-leads"])
            ),
            Err(Ineligible::NotAPerson("CI workload"))
        );
        let err = eligible(&requirement, &alice, &user(1002, "bob", &["dev"])).unwrap_err();
        assert!(err.to_string().contains("dba-leads"), "{err}");
        assert!(eligible(&requirement, &alice, &user(1002, "bob", &["dba-leads"])).is_ok());
    }

    #[test]
    fn a_tally_names_each_person_once() {
        let alice = user(1001, "alice", &[]);
        let bob = user(1002, "bob", &["dba-leads"]);
        let bob_again = user(1003, "bob", &["dba-leads"]);
        let t = tally(&need(&[("dba-leads", 2)]), &alice, &[&bob, &bob_again]);
        assert_eq!(t.counted, vec!["bob".to_owned()]);
        assert_eq!(t.filled.get("dba-leads"), Some(&1));
    }
}
