use super::*;

/// A statement the client prepared with Parse.
pub(super) struct Prepared {
    /// The whole text with the first statement's classification, as Execute records it.
    pub(super) whole: Arc<StatementInfo>,
    pub(super) statements: Vec<StatementInfo>,
    pub(super) verdict: Verdict,
}

/// How much the agent keeps for one session's prepared statements, and for its portals: a
/// client that prepares or binds without end would otherwise grow the agent, which serves
/// everybody, where the server grows only its own backend. Past either limit Parse (or Bind)
/// is refused with 54000 until the client closes some; the session goes on. A single
/// statement is checked against the budget before it is added, so one statement as large as
/// a message always fits.
pub(super) const MAX_KEPT_NAMES: usize = 10_000;

pub(super) const MAX_KEPT_BYTES: usize = 64 * 1024 * 1024;

/// About what a kept entry costs beyond its strings (map slot, allocations, classification).
pub(super) const KEPT_OVERHEAD: usize = 256;

impl Prepared {
    pub(super) fn kept_bytes(&self) -> usize {
        let strings = |s: &StatementInfo| {
            s.text.len()
                + s.tables.iter().map(String::len).sum::<usize>()
                + s.functions.iter().map(String::len).sum::<usize>()
                + KEPT_OVERHEAD
        };
        strings(&self.whole) + self.statements.iter().map(strings).sum::<usize>()
    }
}

/// The statements the client prepared with Parse, and what they cost.
#[derive(Default)]
pub(super) struct PreparedStatements {
    pub(super) named: HashMap<String, Arc<Prepared>>,
    pub(super) bytes: usize,
}

impl PreparedStatements {
    pub(super) fn get(&self, name: &str) -> Option<&Arc<Prepared>> {
        self.named.get(name)
    }

    pub(super) fn contains(&self, name: &str) -> bool {
        self.named.contains_key(name)
    }

    /// Whether one more statement (replacing `name`'s if it has one) stays within the budget.
    pub(super) fn has_room_for(&self, name: &str) -> bool {
        self.contains(name) || (self.named.len() < MAX_KEPT_NAMES && self.bytes < MAX_KEPT_BYTES)
    }

    pub(super) fn insert(&mut self, name: String, prepared: Arc<Prepared>) {
        self.bytes += prepared.kept_bytes();
        if let Some(old) = self.named.insert(name, prepared) {
            self.bytes -= old.kept_bytes();
        }
    }

    pub(super) fn remove(&mut self, name: &str) {
        if let Some(old) = self.named.remove(name) {
            self.bytes -= old.kept_bytes();
        }
    }

    pub(super) fn clear(&mut self) {
        self.named.clear();
        self.bytes = 0;
    }
}

pub(super) struct Portal {
    pub(super) prepared: Arc<Prepared>,
    /// The verdict at Bind, which may differ from Parse's (a reload, the time).
    pub(super) verdict: Verdict,
    pub(super) parameters: Arc<[Option<String>]>,
}

impl Portal {
    pub(super) fn kept_bytes(&self) -> usize {
        // The statement is counted with the prepared statements, where it stays or not.
        self.parameters
            .iter()
            .map(|p| p.as_ref().map_or(0, String::len) + std::mem::size_of::<Option<String>>())
            .sum::<usize>()
            + KEPT_OVERHEAD
    }
}

/// The portals the client bound, for as long as the server keeps them: a named portal until
/// it is closed or its transaction ends, the unnamed one until the next Bind to it or the end
/// of its transaction. The agent learns that a transaction ended from the status in
/// ReadyForQuery, which answers a Sync or a simple query; the client may already have sent
/// Binds for the next transaction behind it, so each portal keeps how many messages answered
/// by ReadyForQuery went before its Bind. Without this, named portals the server had dropped
/// at commit stayed in the agent for the whole session, one more per transaction.
pub(super) struct Portals<P> {
    /// Each portal with how many ReadyForQuery-answered messages went before its Bind, and
    /// what it costs the agent.
    pub(super) live: HashMap<String, (u64, usize, P)>,
    /// What the live portals cost in all.
    pub(super) bytes: usize,
    /// Messages forwarded that the server answers with ReadyForQuery.
    pub(super) ready_sent: u64,
    /// ReadyForQuery replies received.
    pub(super) ready_received: u64,
}

impl<P> Portals<P> {
    pub(super) fn new() -> Self {
        Self {
            live: HashMap::new(),
            bytes: 0,
            ready_sent: 0,
            ready_received: 0,
        }
    }

    /// `cost`: about what keeping the portal costs the agent, in bytes.
    pub(super) fn bind(&mut self, name: String, portal: P, cost: usize) {
        self.bytes += cost;
        if let Some((_, old, _)) = self.live.insert(name, (self.ready_sent, cost, portal)) {
            self.bytes -= old;
        }
    }

    pub(super) fn get(&self, name: &str) -> Option<&P> {
        self.live.get(name).map(|(_, _, p)| p)
    }

    /// Whether one more portal (replacing `name`'s if it has one) stays within the budget.
    pub(super) fn has_room_for(&self, name: &str) -> bool {
        self.live.contains_key(name)
            || (self.live.len() < MAX_KEPT_NAMES && self.bytes < MAX_KEPT_BYTES)
    }

    pub(super) fn close(&mut self, name: &str) {
        if let Some((_, old, _)) = self.live.remove(name) {
            self.bytes -= old;
        }
    }

    /// Whether the server certainly still has this portal: bound since the last message that
    /// could end its transaction, or every such message answered without ending it. (Bound
    /// before a Sync still unanswered, it may be gone or not.)
    pub(super) fn certainly_live(&self, name: &str) -> bool {
        self.live.get(name).is_some_and(|(before, _, _)| {
            *before == self.ready_sent || self.ready_received == self.ready_sent
        })
    }

    pub(super) fn close_all(&mut self) {
        self.live.clear();
        self.bytes = 0;
    }

    /// A Sync, simple query or function call was forwarded.
    pub(super) fn ready_sent(&mut self) {
        self.ready_sent += 1;
    }

    /// The server answered the oldest of them with ReadyForQuery; `idle`: no transaction is
    /// open, so every portal bound before that message is gone.
    pub(super) fn ready_received(&mut self, idle: bool) {
        self.ready_received += 1;
        if idle && !self.live.is_empty() {
            let answered = self.ready_received;
            let mut freed = 0;
            self.live.retain(|_, (before, cost, _)| {
                let keep = *before >= answered;
                if !keep {
                    freed += *cost;
                }
                keep
            });
            self.bytes -= freed;
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.live.len()
    }
}

/// What a result's computed columns may come from.
pub(super) enum Derived {
    Known(Arc<portcullis_sql::ResultSources>),
    /// FETCH or EXECUTE of a query the agent did not see defined: anything.
    Unknown,
    /// Not a query (SHOW, EXPLAIN): its computed columns go by their names.
    NotAQuery,
}

/// How many cursor and prepared-statement names a session remembers the sources of.
pub(super) const MAX_NAMED_QUERIES: usize = 1024;

impl<'a> Session<'a> {
    /// What the computed columns of `info`'s result may come from: its own query, or for
    /// FETCH and EXECUTE the query kept under that name (anything, if the agent did not see
    /// it kept).
    pub(super) fn derived_sources(&self, info: &StatementInfo) -> Derived {
        use portcullis_sql::NamedQuery;
        if let Some(sources) = &info.sources {
            return Derived::Known(Arc::clone(sources));
        }
        let key = match &info.named {
            Some(NamedQuery::FetchesFrom(name)) => (true, name.clone()),
            Some(NamedQuery::Executes(name)) => (false, name.clone()),
            _ => return Derived::NotAQuery,
        };
        match self.named_sources.get(&key) {
            Some(Some(sources)) => Derived::Known(Arc::clone(sources)),
            _ => Derived::Unknown,
        }
    }

    /// Keeps the result sources of a cursor or SQL prepared statement being defined.
    pub(super) fn remember_named(&mut self, info: &StatementInfo) {
        use portcullis_sql::NamedQuery;
        // SQL and the protocol share the server's names, and a name can be freed where the
        // agent does not see it (dynamic SQL in a function): a name SQL takes is forgotten
        // as the protocol's (if the server refuses it as taken, a later Bind or Execute of
        // it is refused too, the safe side), and the other way round in Parse and Bind.
        let key = match &info.named {
            Some(NamedQuery::DeclaresCursor(name)) => {
                self.portals.close(name);
                (true, name.clone())
            }
            Some(NamedQuery::Prepares(name)) => {
                self.prepared.remove(name);
                (false, name.clone())
            }
            // Once these run, a SQL PREPARE may take the name of a statement the client made
            // with Parse, a DECLARE the name of a portal it made with Bind: the agent forgets
            // the names now (before the server, the safe side: a Bind or Execute of them in
            // between is refused).
            Some(NamedQuery::Deallocates(name)) => {
                return self.forget_names(false, name.as_deref())
            }
            Some(NamedQuery::Closes(name)) => return self.forget_names(true, name.as_deref()),
            _ => return,
        };
        if self.named_sources.len() >= MAX_NAMED_QUERIES && !self.named_sources.contains_key(&key) {
            // Forgotten names mask as "anything", which is safe.
            self.named_sources.clear();
        }
        self.named_sources.insert(key, info.sources.clone());
    }

    /// Forgets a portal (`cursor`) or prepared statement name, or all of them (`None`), and
    /// what a SQL cursor or statement of that name computed its columns from.
    pub(super) fn forget_names(&mut self, cursor: bool, name: Option<&str>) {
        match name {
            Some(name) => {
                if cursor {
                    self.portals.close(name);
                } else {
                    self.prepared.remove(name);
                }
                self.named_sources.remove(&(cursor, name.to_string()));
            }
            None => {
                if cursor {
                    self.portals.close_all();
                } else {
                    self.prepared.clear();
                }
                self.named_sources.retain(|(kind, _), _| *kind != cursor);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Portals, MAX_KEPT_BYTES, MAX_KEPT_NAMES};

    /// What the portals cost follows every way one ends, so the budget frees as they go; past
    /// the budget a new name has no room, while a name already kept may be bound again.
    #[test]
    fn portal_budget_follows_binds_closes_and_transaction_ends() {
        let mut portals = Portals::new();
        portals.bind("a".to_string(), 10, 10);
        portals.bind("b".to_string(), 20, 20);
        portals.bind("a".to_string(), 5, 5);
        assert_eq!(portals.bytes, 25, "rebinding replaces the cost");
        portals.close("b");
        assert_eq!(portals.bytes, 5);
        portals.ready_sent();
        portals.bind("c".to_string(), 7, 7);
        portals.ready_received(true);
        assert_eq!(
            portals.bytes, 7,
            "a ended with its transaction, c was bound after"
        );
        portals.close_all();
        assert_eq!((portals.bytes, portals.len()), (0, 0));

        portals.bind("big".to_string(), MAX_KEPT_BYTES, MAX_KEPT_BYTES);
        assert!(!portals.has_room_for("other"), "the bytes are spent");
        assert!(portals.has_room_for("big"), "its own name replaces it");
        portals.close("big");
        for i in 0..MAX_KEPT_NAMES {
            portals.bind(format!("p{i}"), 1, 1);
        }
        assert!(!portals.has_room_for("one more"), "the names are spent");
        portals.close("p0");
        assert!(portals.has_room_for("one more"));
    }

    /// A portal lives until its transaction ends, as in the server, also when the client
    /// pipelines the next transaction's Bind before the last one's ReadyForQuery arrived; a
    /// session binding a new named portal in each of many transactions keeps only the live one.
    #[test]
    fn portals_end_with_their_transaction_even_when_pipelined() {
        let mut portals = Portals::new();
        // Implicit transaction: Bind, Execute, Sync, and the next Bind before the answer.
        portals.bind("p1".to_string(), 1, 0);
        portals.ready_sent();
        portals.bind("p2".to_string(), 2, 0);
        portals.ready_received(true);
        assert_eq!(portals.get("p1"), None, "ended with its Sync");
        assert_eq!(
            portals.get("p2"),
            Some(&2),
            "bound after that Sync: still live"
        );
        portals.ready_sent();
        portals.ready_received(true);
        assert_eq!(portals.len(), 0);

        // Explicit transaction: BEGIN, Bind + Sync inside, then COMMIT.
        portals.ready_sent(); // BEGIN
        portals.ready_received(false);
        portals.bind("c1".to_string(), 3, 0);
        portals.ready_sent(); // Sync
        portals.ready_received(false);
        assert_eq!(portals.get("c1"), Some(&3), "the transaction is still open");
        portals.ready_sent(); // COMMIT
        portals.bind(String::new(), 4, 0); // pipelined behind the COMMIT
        portals.ready_received(true);
        assert_eq!(portals.get("c1"), None, "ended at COMMIT");
        assert_eq!(portals.get(""), Some(&4));
        portals.close("");
        assert_eq!(portals.len(), 0);

        // Whether the server still has a portal is certain only when no message that could
        // end its transaction is unanswered since its Bind.
        portals.ready_sent(); // BEGIN
        portals.ready_received(false);
        portals.bind("k".to_string(), 5, 0);
        assert!(portals.certainly_live("k"), "bound in this segment");
        portals.ready_sent(); // Sync, unanswered
        assert!(!portals.certainly_live("k"), "may have ended with the Sync");
        portals.ready_received(false);
        assert!(
            portals.certainly_live("k"),
            "the Sync left the transaction open"
        );
        assert!(!portals.certainly_live("other"));
        portals.ready_sent(); // COMMIT
        portals.ready_received(true);
        assert!(!portals.certainly_live("k"));

        for i in 0..10_000 {
            portals.bind(format!("cursor_{i}"), i, 0);
            portals.ready_sent();
            portals.ready_received(true);
        }
        assert_eq!(portals.len(), 0, "no portal outlives its transaction");
    }
}
