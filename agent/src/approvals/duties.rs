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
//! - nobody is exempt: root is a person like any other here, or nobody;
//! - the one exception is break-glass, and only as configured: a person whose token names
//!   the configured emergency group may approve their *own* request, with a reason, by
//!   saying so (`--break-glass`); that approval fills the whole requirement (every group of
//!   an AND, every place of a threshold), since breaking the glass is not one vote among
//!   others. Nobody breaks the glass for someone else, and without a configured group
//!   nobody breaks it at all.

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
    #[error(
        "you asked for this yourself; someone else must approve it (segregation of duties). \
         As a member of the emergency group `{0}` you may break the glass instead: \
         `portcullis approvals approve <id> --break-glass --reason \"…\"` (alerted and audited)"
    )]
    RequesterMayBreakGlass(String),
    #[error(
        "break-glass is not configured on this host (approvals.break_glass_group); ask an approver"
    )]
    NoBreakGlass,
    #[error(
        "break-glass is for members of `{group}` only, and your login's token does not name it \
         (your login's groups: {mine}); ask an approver"
    )]
    NotInBreakGlassGroup { group: String, mine: String },
    #[error("break-glass approves only your own request; approve someone else's the ordinary way")]
    BreakGlassForAnother,
    #[error("breaking the glass needs a reason (--reason \"…\"): it goes to the alert and the audit trail")]
    BreakGlassWithoutReason,
}

/// How an approval is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approving<'a> {
    /// The ordinary way; `break_glass_group` only shapes the refusal of a requester who
    /// could have broken the glass.
    Ordinary { break_glass_group: Option<&'a str> },
    /// `--break-glass`: `group` is the configured emergency group (`None`: break-glass is off).
    BreakGlass {
        group: Option<&'a str>,
        reason: &'a str,
    },
}

/// One stored approval as the tally reads it: who approved (their identity when they
/// did) and, for a break-glass approval, the emergency group it was given as.
#[derive(Debug, Clone, Copy)]
pub struct Vote<'a> {
    pub by: &'a Identity,
    pub break_glass: Option<&'a str>,
}

fn groups_of(identity: &Identity) -> String {
    if identity.groups.is_empty() {
        "none".into()
    } else {
        identity.groups.join(", ")
    }
}

/// The key one person counts under: their OIDC subject.
pub fn person(identity: &Identity) -> Option<&str> {
    identity.subject.as_deref().filter(|s| !s.is_empty())
}

/// Whether `approver` may decide a request `requester` made under `requirement`, in the
/// way `how`; the groups that count are those of `approver`'s token now.
pub fn eligible(
    requirement: &ApprovalRequirement,
    requester: &Identity,
    approver: &Identity,
    how: Approving<'_>,
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
    let own = person(requester) == Some(subject) && requester.kind == IdentityKind::User;
    match how {
        Approving::BreakGlass { group, reason } => {
            let Some(group) = group.filter(|g| !g.is_empty()) else {
                return Err(Ineligible::NoBreakGlass);
            };
            if !approver.groups.iter().any(|g| g == group) {
                return Err(Ineligible::NotInBreakGlassGroup {
                    group: group.to_owned(),
                    mine: groups_of(approver),
                });
            }
            if !own {
                return Err(Ineligible::BreakGlassForAnother);
            }
            if reason.trim().is_empty() {
                return Err(Ineligible::BreakGlassWithoutReason);
            }
            Ok(())
        }
        Approving::Ordinary { break_glass_group } => {
            if person(requester) == Some(subject) {
                return Err(
                    match break_glass_group
                        .filter(|g| !g.is_empty() && approver.groups.iter().any(|m| m == g))
                    {
                        Some(g) if own => Ineligible::RequesterMayBreakGlass(g.to_owned()),
                        _ => Ineligible::Requester,
                    },
                );
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
                    mine: groups_of(approver),
                });
            }
            Ok(())
        }
    }
}

/// How far a request is from its approvals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Every quorum is filled by different people, or the glass was broken.
    pub met: bool,
    /// For each group, how many places are filled (the best assignment of people to groups;
    /// every place, once the glass is broken).
    pub filled: BTreeMap<String, u32>,
    /// The subjects that count, once each.
    pub counted: Vec<String>,
    /// The subject who broke the glass, when a break-glass approval counts.
    pub break_glass: Option<String>,
}

/// Counts `votes` (each with the approver's identity as it was when they approved) against
/// `requirement` for a request of `requester`. The ones that do not count are skipped here
/// as well as refused when they are made, so a stored verdict cannot count by mistake. The
/// configured emergency group is checked when the glass is broken ([`eligible`]); here a
/// break-glass vote counts if the token it was given with named the group it was given as.
pub fn tally(requirement: &ApprovalRequirement, requester: &Identity, votes: &[Vote<'_>]) -> Tally {
    for v in votes {
        let Some(group) = v.break_glass else { continue };
        // The reason was checked when the glass was broken; it is not stored in the vote.
        let how = Approving::BreakGlass {
            group: Some(group),
            reason: "given",
        };
        if eligible(requirement, requester, v.by, how).is_ok() {
            let subject = person(v.by).unwrap_or_default().to_owned();
            return Tally {
                met: true,
                filled: requirement
                    .quorums
                    .iter()
                    .map(|q| (q.group.clone(), q.approvals))
                    .collect(),
                counted: vec![subject.clone()],
                break_glass: Some(subject),
            };
        }
    }
    // One entry per person: the first verdict of a subject is theirs; a second (another uid,
    // another session) adds nothing.
    let mut people: Vec<(&str, &Identity)> = Vec::new();
    let ordinary = Approving::Ordinary {
        break_glass_group: None,
    };
    for v in votes.iter().filter(|v| v.break_glass.is_none()) {
        let a = v.by;
        if eligible(requirement, requester, a, ordinary).is_err() {
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
        break_glass: None,
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
            let got = tally(&requirement, requester, &ordinary(&approvals));
            if got.met != want {
                failures.push(format!("{name}: met = {}, want {want} ({got:?})", got.met));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    fn ordinary<'a>(approvals: &[&'a Identity]) -> Vec<Vote<'a>> {
        approvals
            .iter()
            .map(|by| Vote {
                by,
                break_glass: None,
            })
            .collect()
    }

    const PLAIN: Approving<'static> = Approving::Ordinary {
        break_glass_group: None,
    };

    #[test]
    fn ineligible_approvers_are_told_why() {
        let requirement = need(&[("dba-leads", 1)]);
        let alice = user(1001, "alice", &["dba-leads"]);
        assert_eq!(
            eligible(
                &requirement,
                &alice,
                &user(2001, "alice", &["dba-leads"]),
                PLAIN
            ),
            Err(Ineligible::Requester)
        );
        assert_eq!(
            eligible(
                &requirement,
                &alice,
                &who(IdentityKind::Workload, 1006, "ci", &["dba-leads"]),
                PLAIN
            ),
            Err(Ineligible::NotAPerson("CI workload"))
        );
        let err = eligible(&requirement, &alice, &user(1002, "bob", &["dev"]), PLAIN).unwrap_err();
        assert!(err.to_string().contains("dba-leads"), "{err}");
        assert!(eligible(
            &requirement,
            &alice,
            &user(1002, "bob", &["dba-leads"]),
            PLAIN
        )
        .is_ok());
    }

    /// Break-glass, one row per rule: who asked, who approved how, whether it is allowed
    /// (`eligible`) and whether the requirement is then met (`tally` of that one vote).
    #[test]
    fn break_glass_table() {
        const GLASS: &str = "oncall-emergency";
        let alice = user(1001, "alice", &["engineering", GLASS]);
        let alice_other_uid = user(2001, "alice", &["engineering", GLASS]);
        let alice_without = user(1001, "alice", &["engineering"]);
        let bob = user(1002, "bob", &["dba-leads", GLASS]);
        let ci = who(
            IdentityKind::Workload,
            1006,
            "repo:acme/infra",
            &[GLASS, "dba-leads"],
        );
        let svc = who(IdentityKind::Service, 1007, "backup", &[GLASS]);
        let one = need(&[("dba-leads", 1)]);
        let and = need(&[("dba-leads", 2), ("security", 1)]);
        let glass = |reason| Approving::BreakGlass {
            group: Some(GLASS),
            reason,
        };
        type Row<'a> = (
            &'a str,
            &'a ApprovalRequirement,
            &'a Identity,
            &'a Identity,
            Approving<'a>,
            Result<(), Ineligible>,
        );
        let rows: Vec<Row<'_>> = vec![
            (
                "a member approves their own request with a reason: counts",
                &one,
                &alice,
                &alice,
                glass("INC-9: primary down"),
                Ok(()),
            ),
            (
                "the same person on another uid is still the requester: counts",
                &one,
                &alice,
                &alice_other_uid,
                glass("INC-9"),
                Ok(()),
            ),
            (
                "an AND of groups and a threshold are filled whole",
                &and,
                &alice,
                &alice,
                glass("INC-9"),
                Ok(()),
            ),
            (
                "without the flag the member is the requester, told they may break the glass",
                &one,
                &alice,
                &alice,
                Approving::Ordinary {
                    break_glass_group: Some(GLASS),
                },
                Err(Ineligible::RequesterMayBreakGlass(GLASS.into())),
            ),
            (
                "without a reason: refused",
                &one,
                &alice,
                &alice,
                glass("  "),
                Err(Ineligible::BreakGlassWithoutReason),
            ),
            (
                "a non-member with the flag: refused",
                &one,
                &alice_without,
                &alice_without,
                glass("INC-9"),
                Err(Ineligible::NotInBreakGlassGroup {
                    group: GLASS.into(),
                    mine: "engineering".into(),
                }),
            ),
            (
                "the group removed from the token since the request: refused",
                &one,
                &alice,
                &alice_without,
                glass("INC-9"),
                Err(Ineligible::NotInBreakGlassGroup {
                    group: GLASS.into(),
                    mine: "engineering".into(),
                }),
            ),
            (
                "a member breaks the glass for someone else: refused",
                &one,
                &alice_without,
                &bob,
                glass("INC-9"),
                Err(Ineligible::BreakGlassForAnother),
            ),
            (
                "a CI workload whose token claims the group: never",
                &one,
                &ci,
                &ci,
                glass("INC-9"),
                Err(Ineligible::NotAPerson("CI workload")),
            ),
            (
                "a service: never",
                &one,
                &svc,
                &svc,
                glass("INC-9"),
                Err(Ineligible::NotAPerson("service")),
            ),
            (
                "no group configured: nobody",
                &one,
                &alice,
                &alice,
                Approving::BreakGlass {
                    group: None,
                    reason: "INC-9",
                },
                Err(Ineligible::NoBreakGlass),
            ),
            (
                "an empty group configured: nobody",
                &one,
                &alice,
                &alice,
                Approving::BreakGlass {
                    group: Some(""),
                    reason: "INC-9",
                },
                Err(Ineligible::NoBreakGlass),
            ),
        ];
        let mut failures = Vec::new();
        for (name, requirement, requester, approver, how, want) in rows {
            let got = eligible(requirement, requester, approver, how);
            if got != want {
                failures.push(format!("{name}: eligible = {got:?}, want {want:?}"));
            }
            let group = match how {
                Approving::BreakGlass { group, .. } => group,
                Approving::Ordinary { .. } => None,
            };
            let t = tally(
                requirement,
                requester,
                &[Vote {
                    by: approver,
                    break_glass: group,
                }],
            );
            // A vote counts exactly when it was allowed (the reason is checked when given).
            let counts = want.is_ok() || want == Err(Ineligible::BreakGlassWithoutReason);
            if t.met != counts {
                failures.push(format!("{name}: met = {}, want {counts} ({t:?})", t.met));
            }
            if counts
                && t.filled.values().sum::<u32>()
                    != requirement.quorums.iter().map(|q| q.approvals).sum::<u32>()
            {
                failures.push(format!("{name}: not every place filled ({t:?})"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn a_break_glass_vote_stored_without_the_group_does_not_count_and_ordinary_votes_still_do() {
        let alice = user(1001, "alice", &["oncall-emergency"]);
        let alice_lost_it = user(1001, "alice", &[]);
        let bob = user(1002, "bob", &["dba-leads"]);
        let requirement = need(&[("dba-leads", 1)]);
        let lost = Vote {
            by: &alice_lost_it,
            break_glass: Some("oncall-emergency"),
        };
        assert!(!tally(&requirement, &alice, &[lost]).met);
        let t = tally(
            &requirement,
            &alice,
            &[
                lost,
                Vote {
                    by: &bob,
                    break_glass: None,
                },
            ],
        );
        assert!(t.met && t.break_glass.is_none(), "{t:?}");
        assert_eq!(t.counted, vec!["bob".to_owned()]);
        // The requester's own vote without the flag is no vote, member or not.
        let own = Vote {
            by: &alice,
            break_glass: None,
        };
        assert!(!tally(&requirement, &alice, &[own]).met);
        let t = tally(
            &requirement,
            &alice,
            &[Vote {
                by: &alice,
                break_glass: Some("oncall-emergency"),
            }],
        );
        assert_eq!(t.break_glass.as_deref(), Some("alice"), "{t:?}");
        assert_eq!(t.counted, vec!["alice".to_owned()]);
    }

    #[test]
    fn a_tally_names_each_person_once() {
        let alice = user(1001, "alice", &[]);
        let bob = user(1002, "bob", &["dba-leads"]);
        let bob_again = user(1003, "bob", &["dba-leads"]);
        let t = tally(
            &need(&[("dba-leads", 2)]),
            &alice,
            &ordinary(&[&bob, &bob_again]),
        );
        assert_eq!(t.counted, vec!["bob".to_owned()]);
        assert_eq!(t.filled.get("dba-leads"), Some(&1));
    }
}
