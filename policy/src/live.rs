//! The policy set the agent decides with, swapped whole on reload.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::decision::{Decision, Explanation};
use crate::engine::PolicySet;
use crate::error::LoadError;
use crate::request::Request;

/// Holds the current [`PolicySet`]. Each decision reads one snapshot, so it comes entirely from
/// the old set or entirely from the new one; a reload that fails leaves the current set in
/// place. Reads never block and never wait for a reload.
#[derive(Debug)]
pub struct LivePolicySet {
    current: ArcSwap<PolicySet>,
}

impl LivePolicySet {
    pub fn new(set: PolicySet) -> Self {
        LivePolicySet {
            current: ArcSwap::from_pointee(set),
        }
    }

    /// The set in force now; keep it for a sequence of decisions that must agree with each
    /// other (all the statements of one query message, say).
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    pub fn decide(&self, request: &Request) -> Decision {
        self.current.load().decide(request)
    }

    pub fn explain(&self, request: &Request) -> Explanation {
        self.current.load().explain(request)
    }

    /// Loads a new set from the files of a policy directory and puts it in force. On error
    /// nothing changes and the error says what to fix.
    pub fn reload<I, P, S>(&self, files: I) -> Result<Arc<PolicySet>, LoadError>
    where
        I: IntoIterator<Item = (P, S)>,
        P: Into<PathBuf>,
        S: AsRef<str>,
    {
        let set = Arc::new(PolicySet::load(files)?);
        self.current.store(Arc::clone(&set));
        Ok(set)
    }

    /// Puts an already loaded set in force and returns the one it replaced.
    pub fn replace(&self, set: PolicySet) -> Arc<PolicySet> {
        self.current.swap(Arc::new(set))
    }
}
