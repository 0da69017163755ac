//! The queue between everything that records events and the one writer thread.
//!
//! Events nobody waits for do not wake the writer: at tens of thousands of statements a second,
//! a futex wake per event cost more CPU than the proxying itself. The writer drains the queue
//! on a short tick while events flow; the first event after a quiet spell, a full batch, an
//! event someone waits for (`record_durable`) and a flush wake it at once. A full queue makes
//! recorders wait (backpressure), never drops.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

pub struct Queue<T> {
    state: Mutex<State<T>>,
    /// The writer waits here for work.
    work: Condvar,
    /// Recorders wait here for room.
    room: Condvar,
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
            room: Condvar::new(),
            capacity,
            batch,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job, waiting while the queue is full; `urgent` wakes the writer at once.
    /// False when the writer is gone.
    pub fn push(&self, job: T, urgent: bool) -> bool {
        let mut state = self.lock();
        while state.jobs.len() >= self.capacity && !state.closed {
            state = self.room.wait(state).unwrap_or_else(|p| p.into_inner());
        }
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

    /// Whether a push would wait for room.
    pub fn is_full(&self) -> bool {
        self.lock().jobs.len() >= self.capacity
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
        self.room.notify_all();
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
        self.room.notify_all();
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

    #[test]
    fn a_full_queue_makes_the_recorder_wait_until_the_writer_drains() {
        let q = Arc::new(Queue::new(2, 2));
        assert!(q.push(1, false) && q.push(2, false));
        assert!(q.is_full());
        let q2 = Arc::clone(&q);
        let pusher = std::thread::spawn(move || q2.push(3, false));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pusher.is_finished(), "waits for room");
        let Popped::Jobs(a) = q.pop_batch(None) else {
            panic!()
        };
        assert_eq!(a, vec![1, 2]);
        assert!(pusher.join().unwrap());
        let Popped::Jobs(b) = q.pop_batch(None) else {
            panic!()
        };
        assert_eq!(b, vec![3]);
    }
}
