//! The queue between everything that records events and the one writer thread.
//!
//! Events nobody waits for do not wake the writer: at tens of thousands of statements a second,
//! a futex wake per event cost more CPU than the proxying itself. The writer drains the queue
//! on a short tick while events flow; the first event after a quiet spell, a full batch, an
//! event someone waits for (`record_durable`) and a flush wake it at once.
//!
//! A full queue never drops an event and never blocks the thread that records it: recorders
//! are mostly tasks on the proxy's event loop, and a thread parked on a lock there would
//! freeze every connection the loop serves. `push` therefore always queues (past `capacity`
//! if it must), and the backpressure is asynchronous: what produces events on the data plane
//! awaits [`Queue::room`] before producing more (a new connection before its
//! `connection.opened`, a session before it reads its client's next message), so the queue
//! grows past its capacity by at most what the tasks already under way record, and the
//! writer catches up while the event loop keeps running.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

pub struct Queue<T> {
    state: Mutex<State<T>>,
    /// The writer waits here for work.
    work: Condvar,
    /// Tasks waiting for room (`room`) are woken here when the writer takes a batch.
    room: tokio::sync::Notify,
    capacity: usize,
    batch: usize,
}

struct State<T> {
    jobs: VecDeque<T>,
    /// The writer sleeps without a tick (nothing queued, nothing to sync): the next push
    /// must wake it.
    writer_dozing: bool,
    closed: bool,
}

/// What `pop_batch` returns: jobs (maybe none after a tick), or the end.
pub enum Popped<T> {
    Jobs(Vec<T>),
    Closed(Vec<T>),
}

impl<T> Queue<T> {
    pub fn new(capacity: usize, batch: usize) -> Self {
        Self {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                writer_dozing: true,
                closed: false,
            }),
            work: Condvar::new(),
            room: tokio::sync::Notify::new(),
            capacity,
            batch,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job without waiting, also when the queue is full (see the module's note on
    /// backpressure); `urgent` wakes the writer at once. False when the writer is gone.
    pub fn push(&self, job: T, urgent: bool) -> bool {
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        state.jobs.push_back(job);
        let wake = urgent || state.writer_dozing || state.jobs.len() >= self.batch;
        if wake {
            state.writer_dozing = false;
            drop(state);
            self.work.notify_one();
        }
        true
    }

    /// Whether the queue holds `capacity` jobs or more: producers should wait for [`room`].
    ///
    /// [`room`]: Queue::room
    #[cfg(test)]
    pub fn is_full(&self) -> bool {
        self.lock().jobs.len() >= self.capacity
    }

    fn has_room(&self) -> bool {
        let state = self.lock();
        state.jobs.len() < self.capacity || state.closed
    }

    /// Waits, without blocking the thread, until the queue is below its capacity (or closed:
    /// the pushes that follow then fail and say so).
    pub async fn room(&self) {
        // The common case, a queue with room, costs one lock and registers no waiter: this
        // runs before every client read of every PostgreSQL session.
        if self.has_room() {
            return;
        }
        loop {
            let woken = self.room.notified();
            tokio::pin!(woken);
            // Registered before the check, so a batch taken between the check and the
            // await still wakes this waiter.
            woken.as_mut().enable();
            if self.has_room() {
                return;
            }
            woken.await;
        }
    }

    /// Up to one batch of jobs; waits up to `tick` for some, or without limit (until a push)
    /// when `tick` is `None`.
    pub fn pop_batch(&self, tick: Option<Duration>) -> Popped<T> {
        let mut state = self.lock();
        if state.jobs.is_empty() && !state.closed {
            match tick {
                Some(t) => {
                    state = self
                        .work
                        .wait_timeout(state, t)
                        .map(|(s, _)| s)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                None => {
                    state.writer_dozing = true;
                    // A long wait still ends now and then, for rotation and retention.
                    state = self
                        .work
                        .wait_timeout(state, Duration::from_secs(1))
                        .map(|(s, _)| s)
                        .unwrap_or_else(|p| p.into_inner().0);
                    state.writer_dozing = false;
                }
            }
        }
        let n = state.jobs.len().min(self.batch);
        let jobs: Vec<T> = state.jobs.drain(..n).collect();
        let closed = state.closed && state.jobs.is_empty();
        drop(state);
        self.room.notify_waiters();
        if closed {
            Popped::Closed(jobs)
        } else {
            Popped::Jobs(jobs)
        }
    }

    /// No more pushes; the writer drains what is queued and stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
        self.room.notify_waiters();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn jobs_come_out_in_order_in_batches_and_close_drains() {
        let q = Queue::new(10, 3);
        for i in 0..5 {
            assert!(q.push(i, false));
        }
        let Popped::Jobs(a) = q.pop_batch(Some(Duration::ZERO)) else {
            panic!()
        };
        assert_eq!(a, vec![0, 1, 2]);
        q.close();
        assert!(!q.push(9, false), "closed");
        let Popped::Closed(b) = q.pop_batch(None) else {
            panic!()
        };
        assert_eq!(b, vec![3, 4]);
    }

    /// The proxy's event loop records events from its tasks: a full queue must leave the
    /// loop running (here a current-thread runtime, one thread for all tasks), and every event
    /// must come out once the writer drains. The writer drains only after another task on
    /// that loop ran, so a recorder that parked the thread would show as `progressed` false.
    #[test]
    fn a_full_queue_does_not_block_the_event_loop_and_loses_nothing() {
        let q = Arc::new(Queue::new(2, 10));
        assert!(q.push(1, false) && q.push(2, false));
        assert!(q.is_full());
        let (progress_tx, progress_rx) = std::sync::mpsc::channel::<()>();
        let writer = {
            let q = Arc::clone(&q);
            std::thread::spawn(move || {
                let progressed = progress_rx.recv_timeout(Duration::from_secs(2)).is_ok();
                let mut out = Vec::new();
                loop {
                    match q.pop_batch(Some(Duration::from_millis(10))) {
                        Popped::Jobs(j) => out.extend(j),
                        Popped::Closed(j) => {
                            out.extend(j);
                            break;
                        }
                    }
                }
                (progressed, out)
            })
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let recorder = {
                let q = Arc::clone(&q);
                tokio::spawn(async move { assert!(q.push(3, false)) })
            };
            let producer = {
                let q = Arc::clone(&q);
                tokio::spawn(async move {
                    q.room().await;
                    assert!(q.push(4, false));
                })
            };
            let other = tokio::spawn(async move { progress_tx.send(()).unwrap() });
            recorder.await.unwrap();
            other.await.unwrap();
            producer.await.unwrap();
        });
        q.close();
        let (progressed, out) = writer.join().unwrap();
        assert!(progressed, "another task ran while the queue was full");
        assert_eq!(out, vec![1, 2, 3, 4], "every event, in order");
    }

    #[test]
    fn room_waits_until_the_writer_takes_a_batch() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let q = Queue::new(2, 2);
            assert!(q.push(1, false) && q.push(2, false));
            let waited = tokio::time::timeout(Duration::from_millis(50), q.room()).await;
            assert!(waited.is_err(), "no room while full");
            let Popped::Jobs(a) = q.pop_batch(None) else {
                panic!()
            };
            assert_eq!(a, vec![1, 2]);
            tokio::time::timeout(Duration::from_secs(1), q.room())
                .await
                .unwrap();
            assert!(q.push(3, false) && q.push(4, false));
            q.close();
            let waited = tokio::time::timeout(Duration::from_secs(1), q.room()).await;
            assert!(waited.is_ok(), "a closed queue does not hold producers");
        });
    }
}
