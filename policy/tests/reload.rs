//! Reloading: a bad set never replaces a good one, and under concurrent decisions every
//! decision comes entirely from one set.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail loudly"
)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use common::*;
use portcullis_policy::{Effect, LivePolicySet, PolicySet};

/// Three permits that all hold: a decision from this set names all three.
const SET_A: &str = r#"
@id("a-1") permit (principal, action == Portcullis::Action::"query", resource);
@id("a-2") permit (principal in Portcullis::Group::"analysts", action, resource);
@id("a-3") permit (principal, action == Portcullis::Action::"query", resource) when { context.statement_class == "read" };
"#;

/// Two forbids that both hold: a decision from this set is a denial naming both.
const SET_B: &str = r#"
@id("b-permit") permit (principal, action, resource);
@id("b-forbid-1") forbid (principal, action == Portcullis::Action::"query", resource);
@id("b-forbid-2") forbid (principal in Portcullis::Group::"analysts", action, resource);
"#;

const BROKEN: &str = r#"
@id("c-1") permit (principal is Usr, action, resource);
"#;

fn files(policies: &'static str) -> [(&'static str, &'static str); 1] {
    [("policies/main.cedar", policies)]
}

#[test]
fn failed_reload_keeps_the_current_set() {
    let live = LivePolicySet::new(PolicySet::load(files(SET_A)).unwrap());
    let request = query(user("alice", &["analysts"]), staging_db(), "read");
    let before = live.current();
    let decision = live.decide(&request);
    assert_eq!(decision.effect, Effect::Allow);

    let error = live.reload(files(BROKEN)).unwrap_err();
    assert!(
        error.to_string().contains("policies/main.cedar line 2"),
        "{error}"
    );
    assert!(Arc::ptr_eq(&before, &live.current()));
    assert_eq!(live.decide(&request), decision);
}

#[test]
fn held_snapshot_keeps_deciding_with_its_set() {
    let live = LivePolicySet::new(PolicySet::load(files(SET_A)).unwrap());
    let request = query(user("alice", &["analysts"]), staging_db(), "read");
    let snapshot = live.current();
    live.reload(files(SET_B)).unwrap();
    assert_eq!(snapshot.decide(&request).effect, Effect::Allow);
    assert_eq!(live.decide(&request).effect, Effect::Deny);
}

#[test]
fn reload_under_load_gives_each_decision_one_whole_set() {
    let live = Arc::new(LivePolicySet::new(PolicySet::load(files(SET_A)).unwrap()));
    let done = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(3));

    let deciders: Vec<_> = (0..2)
        .map(|_| {
            let live = Arc::clone(&live);
            let done = Arc::clone(&done);
            let start = Arc::clone(&start);
            thread::spawn(move || {
                let request = query(user("alice", &["analysts"]), staging_db(), "read");
                let (mut from_a, mut from_b) = (0u64, 0u64);
                start.wait();
                while !done.load(Ordering::Acquire) {
                    let decision = live.decide(&request);
                    let matched: Vec<&str> =
                        decision.matched.iter().map(|id| id.as_str()).collect();
                    match (&decision.effect, matched.as_slice()) {
                        (Effect::Allow, ["a-1", "a-2", "a-3"]) => from_a += 1,
                        (Effect::Deny, ["b-forbid-1", "b-forbid-2"]) => from_b += 1,
                        _ => panic!("decision from no single set: {decision:?}"),
                    }
                }
                (from_a, from_b)
            })
        })
        .collect();

    start.wait();
    for round in 0..60 {
        let next = if round % 2 == 0 { SET_B } else { SET_A };
        live.reload(files(next)).unwrap();
        // A broken set in between must change nothing.
        live.reload(files(BROKEN)).unwrap_err();
    }
    done.store(true, Ordering::Release);

    let (mut from_a, mut from_b) = (0, 0);
    for decider in deciders {
        let (a, b) = decider.join().unwrap();
        from_a += a;
        from_b += b;
    }
    assert!(
        from_a > 0 && from_b > 0,
        "both sets should have decided: {from_a} from A, {from_b} from B"
    );
}
