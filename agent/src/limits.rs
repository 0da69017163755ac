//! Per-uid limits on what one local user may hold of the agent: open connections,
//! connections still in their protocol's start-up, pending logins, and new connections per
//! second; and the summaries that keep a flood of refusals from flooding the audit trail.
//!
//! Everything here is pure bookkeeping: time comes in as an argument (milliseconds on a
//! monotonic clock the caller owns), so the tests drive it without sleeping. The proxy
//! consults it in one place, right after the origin record names the uid
//! (`Proxy::handle`); logins consult it when they start (`IdentityService::login_start`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::LimitsConfig;

/// A token bucket in thousandths of a token, so refills need no floating point:
/// `rate` tokens a second is `rate` thousandths a millisecond.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    millitokens: u64,
    capacity: u64,
    per_ms: u64,
    last_ms: u64,
}

impl TokenBucket {
    /// Full at `now_ms`: a new user may open `burst` connections at once.
    pub fn new(rate_per_sec: u32, burst: u32, now_ms: u64) -> Self {
        let capacity = u64::from(burst).saturating_mul(1000);
        Self {
            millitokens: capacity,
            capacity,
            per_ms: u64::from(rate_per_sec),
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        // A clock that goes back refills nothing rather than everything.
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        self.millitokens = self
            .millitokens
            .saturating_add(elapsed.saturating_mul(self.per_ms))
            .min(self.capacity);
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        if self.millitokens >= 1000 {
            self.millitokens -= 1000;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full at `now_ms` (its state then says nothing a fresh
    /// bucket would not).
    fn full_at(&self, now_ms: u64) -> bool {
        let mut probe = self.clone();
        probe.refill(now_ms);
        probe.millitokens >= self.capacity
    }
}

/// Which limit refused a connection; its text is the refusal's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    Open(usize),
    Startup(usize),
    Rate(u32),
    Logins(usize),
}

impl std::fmt::Display for Limited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limited::Open(n) => write!(
                f,
                "per-uid limit: {n} open connections (limits.max_open_per_uid)"
            ),
            Limited::Startup(n) => write!(
                f,
                "per-uid limit: {n} connections in start-up (limits.max_startup_per_uid)"
            ),
            Limited::Rate(n) => write!(
                f,
                "per-uid limit: {n} new connections a second (limits.new_connections_per_sec)"
            ),
            Limited::Logins(n) => write!(
                f,
                "per-uid limit: {n} pending logins (limits.max_pending_logins_per_uid)"
            ),
        }
    }
}

#[derive(Debug)]
struct UidState {
    open: usize,
    startup: usize,
    logins: usize,
    bucket: TokenBucket,
}

/// The per-uid counters. One lock for all uids: an admission is a few integer operations,
/// far cheaper than the accept that precedes it.
pub struct Limiter {
    config: LimitsConfig,
    uids: Mutex<HashMap<u32, UidState>>,
}

impl Limiter {
    pub fn new(config: LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            uids: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u32, UidState>> {
        self.uids.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state<'m>(
        &self,
        map: &'m mut HashMap<u32, UidState>,
        uid: u32,
        now_ms: u64,
    ) -> &'m mut UidState {
        map.entry(uid).or_insert_with(|| UidState {
            open: 0,
            startup: 0,
            logins: 0,
            bucket: TokenBucket::new(
                self.config.new_connections_per_sec,
                self.config.new_connections_burst,
                now_ms,
            ),
        })
    }

    /// Admits a new connection of `uid`, counted as open and in start-up until the returned
    /// guard says otherwise or is dropped. The open and start-up limits are checked before
    /// the rate, so a refused connection does not spend a token.
    pub fn admit(self: &Arc<Self>, uid: u32, now_ms: u64) -> Result<Admission, Limited> {
        let mut map = self.lock();
        let s = self.state(&mut map, uid, now_ms);
        if s.open >= self.config.max_open_per_uid {
            return Err(Limited::Open(self.config.max_open_per_uid));
        }
        if s.startup >= self.config.max_startup_per_uid {
            return Err(Limited::Startup(self.config.max_startup_per_uid));
        }
        if !s.bucket.take(now_ms) {
            return Err(Limited::Rate(self.config.new_connections_per_sec));
        }
        s.open += 1;
        s.startup += 1;
        Ok(Admission {
            limiter: Arc::clone(self),
            uid,
            in_startup: AtomicBool::new(true),
        })
    }

    /// Counts a pending login of `uid` until the returned guard is dropped.
    pub fn begin_login(self: &Arc<Self>, uid: u32, now_ms: u64) -> Result<LoginPermit, Limited> {
        let mut map = self.lock();
        let s = self.state(&mut map, uid, now_ms);
        if s.logins >= self.config.max_pending_logins_per_uid {
            return Err(Limited::Logins(self.config.max_pending_logins_per_uid));
        }
        s.logins += 1;
        Ok(LoginPermit {
            limiter: Arc::clone(self),
            uid,
        })
    }

    /// What `uid` holds now: (open, in start-up, pending logins).
    #[cfg(test)]
    pub fn held(&self, uid: u32) -> (usize, usize, usize) {
        self.lock()
            .get(&uid)
            .map_or((0, 0, 0), |s| (s.open, s.startup, s.logins))
    }

    /// Forgets uids that hold nothing and whose bucket has refilled, so the map stays as
    /// small as the set of active users. A bucket that is not full is kept: forgetting it
    /// would hand a flooding user a fresh burst.
    pub fn sweep(&self, now_ms: u64) {
        self.lock().retain(|_, s| {
            s.open > 0 || s.startup > 0 || s.logins > 0 || !s.bucket.full_at(now_ms)
        });
    }

    #[cfg(test)]
    pub fn tracked_uids(&self) -> usize {
        self.lock().len()
    }

    fn release(&self, uid: u32, open: bool, startup: bool, login: bool) {
        let mut map = self.lock();
        if let Some(s) = map.get_mut(&uid) {
            if open {
                s.open = s.open.saturating_sub(1);
            }
            if startup {
                s.startup = s.startup.saturating_sub(1);
            }
            if login {
                s.logins = s.logins.saturating_sub(1);
            }
        }
    }
}

/// One admitted connection: open until dropped, in start-up until [`Admission::end_startup`].
pub struct Admission {
    limiter: Arc<Limiter>,
    uid: u32,
    in_startup: AtomicBool,
}

impl Admission {
    /// The connection finished its start-up (authenticated, authorized, upstream open); it
    /// still counts as open. Idempotent.
    pub fn end_startup(&self) {
        if self.in_startup.swap(false, Ordering::AcqRel) {
            self.limiter.release(self.uid, false, true, false);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let startup = self.in_startup.swap(false, Ordering::AcqRel);
        self.limiter.release(self.uid, true, startup, false);
    }
}

/// One pending login, counted until dropped.
pub struct LoginPermit {
    limiter: Arc<Limiter>,
    uid: u32,
}

impl Drop for LoginPermit {
    fn drop(&mut self) {
        self.limiter.release(self.uid, false, false, true);
    }
}

/// Whose refusals a summary counts: a uid, or the connections that came with no origin
/// record (dialled straight at the proxy port), whose uid nothing trustworthy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefusalKey {
    Uid(u32),
    NoOrigin,
}

/// What to do with one refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum Note {
    /// The first of its interval: record it in full, now.
    RecordNow,
    /// Counted into the summary that closes the interval.
    Counted,
}

/// One interval's refusals beyond the first, for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary<T> {
    pub key: RefusalKey,
    /// Refusals not recorded one by one.
    pub count: u64,
    /// The reason of the last one counted.
    pub reason: String,
    /// What the caller kept of the last one counted (its origin, its address).
    pub last: T,
    pub interval_ms: u64,
}

#[derive(Debug)]
struct Window<T> {
    started_ms: u64,
    counted: u64,
    reason: String,
    last: Option<T>,
}

/// At most two events per key per interval: the first refusal in full, and one summary
/// with the count of the others. Memory is one small entry per key refused in the current
/// interval.
pub struct RefusalSummaries<T> {
    interval_ms: u64,
    windows: Mutex<HashMap<RefusalKey, Window<T>>>,
}

impl<T> RefusalSummaries<T> {
    pub fn new(interval_ms: u64) -> Self {
        Self {
            interval_ms: interval_ms.max(1),
            windows: Mutex::new(HashMap::new()),
        }
    }

    pub fn interval_ms(&self) -> u64 {
        self.interval_ms
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<RefusalKey, Window<T>>> {
        self.windows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes one refusal. A refusal after its key's interval is over starts a new one; the
    /// old interval's summary must have been taken by [`RefusalSummaries::due`] first, which
    /// the caller's timer does every interval (a refusal arriving before the timer closes
    /// the interval is counted into it, never lost).
    pub fn note(&self, key: RefusalKey, reason: &str, last: T, now_ms: u64) -> Note {
        let mut windows = self.lock();
        match windows.get_mut(&key) {
            Some(w) => {
                w.counted = w.counted.saturating_add(1);
                if w.reason != reason {
                    w.reason = reason.to_string();
                }
                w.last = Some(last);
                Note::Counted
            }
            None => {
                windows.insert(
                    key,
                    Window {
                        started_ms: now_ms,
                        counted: 0,
                        reason: reason.to_string(),
                        last: None,
                    },
                );
                Note::RecordNow
            }
        }
    }

    /// Closes the intervals that are over at `now_ms` and returns the summaries of those
    /// that counted anything, in key order.
    pub fn due(&self, now_ms: u64) -> Vec<Summary<T>> {
        let mut out = Vec::new();
        self.lock().retain(|key, w| {
            if now_ms.saturating_sub(w.started_ms) < self.interval_ms {
                return true;
            }
            if let Some(last) = w.last.take().filter(|_| w.counted > 0) {
                out.push(Summary {
                    key: *key,
                    count: w.counted,
                    reason: std::mem::take(&mut w.reason),
                    last,
                    interval_ms: now_ms.saturating_sub(w.started_ms),
                });
            }
            false
        });
        out.sort_by_key(|s| s.key);
        out
    }

    /// Every open interval's summary, at shutdown.
    pub fn drain(&self, now_ms: u64) -> Vec<Summary<T>> {
        self.due(now_ms.saturating_add(self.interval_ms))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;

    fn config() -> LimitsConfig {
        LimitsConfig {
            max_open_per_uid: 3,
            max_startup_per_uid: 2,
            max_pending_logins_per_uid: 1,
            new_connections_per_sec: 10,
            new_connections_burst: 5,
            summary_interval_secs: 10,
        }
    }

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let mut b = TokenBucket::new(10, 5, 1_000);
        assert_eq!((0..8).filter(|_| b.take(1_000)).count(), 5, "the burst");
        // 10 a second is one per 100 ms.
        assert!(!b.take(1_099));
        assert!(b.take(1_100));
        assert!(!b.take(1_100));
        // A long pause refills up to the burst, never beyond.
        assert_eq!((0..20).filter(|_| b.take(100_000)).count(), 5);
    }

    #[test]
    fn bucket_ignores_a_clock_that_goes_back() {
        let mut b = TokenBucket::new(1, 1, 10_000);
        assert!(b.take(10_000));
        assert!(!b.take(5_000), "no refill from the past");
        assert!(!b.take(10_999));
        assert!(b.take(11_000));
    }

    #[test]
    fn bucket_with_rate_zero_allows_only_the_burst() {
        let mut b = TokenBucket::new(0, 2, 0);
        assert!(b.take(0) && b.take(1));
        assert!(!b.take(u64::MAX));
    }

    #[test]
    fn open_limit_refuses_that_uid_only_and_frees_on_close() {
        let limiter = Limiter::new(LimitsConfig {
            max_startup_per_uid: 100,
            ..config()
        });
        let held: Vec<_> = (0..3).map(|_| limiter.admit(1000, 0).unwrap()).collect();
        assert_eq!(limiter.admit(1000, 0).err(), Some(Limited::Open(3)));
        let other = limiter.admit(1001, 0).unwrap();
        assert_eq!(limiter.held(1000), (3, 3, 0));
        drop(held);
        assert_eq!(limiter.held(1000), (0, 0, 0));
        assert!(limiter.admit(1000, 0).is_ok());
        drop(other);
    }

    #[test]
    fn startup_limit_counts_only_connections_still_starting() {
        let limiter = Limiter::new(config());
        let a = limiter.admit(7, 0).unwrap();
        let b = limiter.admit(7, 0).unwrap();
        assert_eq!(limiter.admit(7, 0).err(), Some(Limited::Startup(2)));
        a.end_startup();
        a.end_startup();
        assert_eq!(
            limiter.held(7),
            (2, 1, 0),
            "ending start-up twice counts once"
        );
        let c = limiter.admit(7, 0).unwrap();
        assert_eq!(limiter.admit(7, 0).err(), Some(Limited::Open(3)));
        drop((a, b, c));
        assert_eq!(limiter.held(7), (0, 0, 0));
    }

    #[test]
    fn rate_limit_refuses_past_the_burst_and_spends_no_token_on_refusals() {
        let limiter = Limiter::new(LimitsConfig {
            max_open_per_uid: 1000,
            max_startup_per_uid: 1000,
            ..config()
        });
        let mut kept = Vec::new();
        for _ in 0..5 {
            let a = limiter.admit(9, 0).unwrap();
            a.end_startup();
            kept.push(a);
        }
        assert_eq!(limiter.admit(9, 0).err(), Some(Limited::Rate(10)));
        assert!(limiter.admit(9, 100).is_ok(), "one token after 100 ms");
        assert!(
            limiter.admit(10, 100).is_ok(),
            "another uid has its own bucket"
        );
        // Refused by the open limit: the bucket keeps its token.
        let small = Limiter::new(LimitsConfig {
            max_open_per_uid: 1,
            ..config()
        });
        let first = small.admit(1, 0).unwrap();
        for _ in 0..10 {
            assert_eq!(small.admit(1, 0).err(), Some(Limited::Open(1)));
        }
        drop(first);
        assert_eq!((0..10).filter(|_| small.admit(1, 0).is_ok()).count(), 4);
    }

    #[test]
    fn pending_logins_are_limited_per_uid() {
        let limiter = Limiter::new(config());
        let p = limiter.begin_login(5, 0).unwrap();
        assert_eq!(limiter.begin_login(5, 0).err(), Some(Limited::Logins(1)));
        assert!(limiter.begin_login(6, 0).is_ok());
        drop(p);
        assert!(limiter.begin_login(5, 0).is_ok());
    }

    #[test]
    fn sweep_keeps_uids_that_hold_something_or_owe_tokens() {
        let limiter = Limiter::new(config());
        let held = limiter.admit(1, 0).unwrap();
        drop(limiter.admit(2, 0).unwrap());
        limiter.sweep(0);
        assert_eq!(limiter.tracked_uids(), 2, "uid 2's bucket is not full yet");
        limiter.sweep(100_000);
        assert_eq!(
            limiter.tracked_uids(),
            1,
            "uid 2 refilled and holds nothing"
        );
        drop(held);
        limiter.sweep(100_000);
        assert_eq!(limiter.tracked_uids(), 0);
    }

    #[test]
    fn summaries_record_the_first_refusal_and_count_the_rest_per_key() {
        let s = RefusalSummaries::<()>::new(1_000);
        assert_eq!(
            s.note(RefusalKey::NoOrigin, "no origin", (), 0),
            Note::RecordNow
        );
        for t in 1..3000 {
            assert_eq!(
                s.note(RefusalKey::NoOrigin, "no origin", (), t / 10),
                Note::Counted
            );
        }
        assert_eq!(s.note(RefusalKey::Uid(7), "open", (), 5), Note::RecordNow);
        assert!(s.due(999).is_empty(), "the interval is not over");
        let due = s.due(1_000);
        assert_eq!(
            due,
            vec![Summary {
                key: RefusalKey::NoOrigin,
                count: 2999,
                reason: "no origin".into(),
                last: (),
                interval_ms: 1_000,
            }],
            "uid 7 had only its first refusal: no summary"
        );
        // The next interval starts with a refusal recorded in full again.
        assert_eq!(
            s.note(RefusalKey::NoOrigin, "no origin", (), 1_001),
            Note::RecordNow
        );
        assert_eq!(s.note(RefusalKey::Uid(7), "rate", (), 1_002), Note::Counted);
        let drained = s.drain(1_003);
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].key, RefusalKey::Uid(7));
        assert_eq!(drained[0].count, 1);
        assert_eq!(drained[0].reason, "rate");
        assert!(s.drain(1_004).is_empty());
    }
}
