//! A shell or exec request whose policy asks for approval waits for it outside the russh
//! callback: waiting inside it would stop the connection's whole session loop (every other
//! channel of a ControlMaster connection), and what the callback writes to the client leaves
//! only when it returns. So the callback makes the request, tells the client on stderr,
//! answers the request with success and hands the rest to [`wait_then_start`], a task of the
//! connection. Nothing reaches the server before the verdict: not the exec or shell request,
//! and not the client's input, which [`Hold`] keeps (bounded) until the command runs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use russh::server;
use russh::ChannelId;
use tokio::sync::mpsc;

use super::terminal::TerminalPlan;
use super::writer::UpstreamWriter;
use crate::admission::{Connection, Gate};
use crate::audit::AuditEvent;

/// Client input one waiting channel may hold; more ends the channel (its request withdrawn)
/// rather than growing with what a client sends.
pub const MAX_HELD_BYTES: usize = 1 << 20;
/// Messages one waiting channel may hold (window changes count too).
const MAX_HELD_MESSAGES: usize = 4096;
/// Longest command line that may wait: the request keeps the exact text an approver reads.
pub const MAX_WAITING_COMMAND: usize = 64 * 1024;
/// How much of a command the client's notice repeats.
const NOTICE_COMMAND: usize = 200;

/// What the client sent on a waiting channel, in its order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldInput {
    Data(Bytes),
    Eof,
    WindowChange(u32, u32, u32, u32),
}

/// Where a held message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Kept until the command runs.
    Held,
    /// The command runs: pass it on as for any channel.
    Pass,
    /// The channel was refused or ended: it goes nowhere.
    Dropped,
    /// Over the bound: the channel ends now and nothing it held is kept.
    Overflow,
}

/// What the task that starts the command takes next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Held input to send, in order, before anything else.
    Batch(Vec<HeldInput>),
    /// Nothing more is held: the channel is started, input passes from now on.
    Started,
    /// The channel ended meanwhile.
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Started,
    Ended,
}

/// A waiting channel's input, shared by the `data` callback (which pushes) and the task
/// that starts the command (which takes it all before the channel counts as started, so
/// input that passes later never overtakes input held before).
#[derive(Debug)]
pub struct Hold {
    phase: Phase,
    queue: VecDeque<HeldInput>,
    bytes: usize,
}

pub type SharedHold = Arc<Mutex<Hold>>;

impl Default for Hold {
    fn default() -> Self {
        Self::new()
    }
}

impl Hold {
    pub fn new() -> Self {
        Self {
            phase: Phase::Waiting,
            queue: VecDeque::new(),
            bytes: 0,
        }
    }

    pub fn push(&mut self, input: HeldInput) -> Pushed {
        match self.phase {
            Phase::Started => Pushed::Pass,
            Phase::Ended => Pushed::Dropped,
            Phase::Waiting => {
                let n = match &input {
                    HeldInput::Data(d) => d.len(),
                    _ => 0,
                };
                if self.queue.len() >= MAX_HELD_MESSAGES
                    || self.bytes.saturating_add(n) > MAX_HELD_BYTES
                {
                    self.end();
                    return Pushed::Overflow;
                }
                self.bytes += n;
                self.queue.push_back(input);
                Pushed::Held
            }
        }
    }

    pub fn next(&mut self) -> Next {
        match self.phase {
            Phase::Ended => Next::Ended,
            Phase::Started => Next::Started,
            Phase::Waiting if self.queue.is_empty() => {
                self.phase = Phase::Started;
                Next::Started
            }
            Phase::Waiting => {
                self.bytes = 0;
                Next::Batch(self.queue.drain(..).collect())
            }
        }
    }

    /// The channel is refused or gone: what it held is dropped.
    pub fn end(&mut self) {
        self.phase = Phase::Ended;
        self.queue.clear();
        self.bytes = 0;
    }

    pub fn is_waiting(&self) -> bool {
        self.phase == Phase::Waiting
    }
}

pub fn lock(hold: &SharedHold) -> std::sync::MutexGuard<'_, Hold> {
    hold.lock().unwrap_or_else(|p| p.into_inner())
}

/// The line the client reads on stderr while its command waits. The command is the
/// client's own, but it is shown without control characters (a line cannot redraw the
/// terminal) and cut short.
pub fn waiting_notice(
    command: Option<&str>,
    request_id: &str,
    requirement: &str,
    wait: Duration,
) -> String {
    let what = match command {
        Some(command) => {
            let mut shown: String = command
                .chars()
                .take(NOTICE_COMMAND)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            if command.chars().count() > NOTICE_COMMAND {
                shown.push('…');
            }
            format!("`{shown}`")
        }
        None => "this shell".to_string(),
    };
    format!(
        "portcullis: {what} needs approval: request {request_id} asks for {requirement}; follow it with `portcullis approvals show {request_id}` (it has not been sent to the server and waits at most {} s)\r\n",
        wait.as_secs()
    )
}

/// What the waiting channel starts once approved.
pub enum Start {
    Shell,
    Exec(Vec<u8>),
}

/// Everything the task needs to finish a waiting channel either way.
pub struct Waiter {
    pub gate: Arc<Gate>,
    pub request_id: String,
    pub hold: SharedHold,
    /// A second handle on the channel's queue towards the server (the `data` callback
    /// holds the other), in order with everything queued before.
    pub upstream: UpstreamWriter,
    /// The server's answers to the channel's requests: the exec's or shell's.
    pub replies: mpsc::Receiver<bool>,
    pub reply_timeout: Duration,
    pub client: server::Handle,
    pub channel: ChannelId,
    /// The channel's reader of the server's side, stopped when the channel is refused.
    pub pump: tokio::task::AbortHandle,
    pub start: Start,
    pub terminal: TerminalPlan,
    /// The policy question that asked for the approval, asked again once it came.
    pub decide_again: portcullis_policy::Request,
    /// `ssh.exec`/`ssh.shell`, allowed, with `approval:<id>` among its policy ids.
    pub started: AuditEvent,
    /// `ssh.channel_denied` with decision `approval`; the reason is added.
    pub refused: AuditEvent,
    pub conn: Arc<Connection>,
}

/// Waits for the verdict, then starts the command exactly as an allowed one, or ends the
/// channel with the reason (exit status 1), as a refused one. The task is aborted when the
/// client closes the channel or the connection ends; the request is then withdrawn (by the
/// handler, or by [`Gate::approval_verdict`] when its wait is dropped).
pub async fn wait_then_start(w: Waiter) {
    let verdict = w
        .gate
        .approval_verdict(
            &w.request_id,
            "the SSH connection ended while the command waited for approval",
        )
        .await;
    match verdict {
        Ok(()) => start(w).await,
        Err(why) => refuse(w, &why).await,
    }
}

async fn refuse(w: Waiter, why: &str) {
    lock(&w.hold).end();
    w.pump.abort();
    let _ = w.upstream.close().await;
    let mut ev = w.refused;
    ev.reason = Some(why.to_string());
    tracing::info!(request = %w.request_id, reason = %why, "SSH channel refused after waiting for approval");
    w.gate.audit().record(ev);
    end_channel(&w.client, w.channel, why).await;
}

/// The reason on stderr, exit status 1, EOF, close: how a refused command ends.
pub async fn end_channel(client: &server::Handle, channel: ChannelId, why: &str) {
    let _ = client
        .extended_data(channel, 1, Bytes::from(format!("portcullis: {why}\r\n")))
        .await;
    let _ = client.exit_status_request(channel, 1).await;
    let _ = client.eof(channel).await;
    let _ = client.close(channel).await;
}

async fn start(mut w: Waiter) {
    // A `forbid` added while it waited still refuses it; the approval stands for what asked
    // for it, even when that changed meanwhile.
    if let Err(r) = crate::policy::outcome(w.gate.policies().decide(&w.decide_again)) {
        if r.approval.is_none() {
            let what = match w.start {
                Start::Shell => "shell",
                Start::Exec(_) => "exec",
            };
            let mut policy_ids = r.policy_ids;
            policy_ids.push(format!("approval:{}", w.request_id));
            w.refused.decision = Some(r.decision);
            w.refused.policy_ids = policy_ids.into();
            let why = format!(
                "approval request {} was approved, but the {what} is now denied by policy: {}",
                w.request_id, r.reason
            );
            return refuse(w, &why).await;
        }
    }
    let guarded = w.terminal.guarded();
    let slot = w.terminal.slot();
    if let Err(reason) = w.terminal.attach().await {
        // Approved, but a session that cannot be recorded does not start.
        w.refused.decision = Some(crate::audit::Decision::Error);
        return refuse(w, &reason).await;
    }
    let sent = match &w.start {
        Start::Shell => w.upstream.request_shell(true).await,
        Start::Exec(command) => w.upstream.exec(true, command).await,
    };
    let accepted = sent.is_ok()
        && matches!(
            tokio::time::timeout(w.reply_timeout, w.replies.recv()).await,
            Ok(Some(true))
        );
    if !accepted {
        w.refused.decision = Some(crate::audit::Decision::Error);
        return refuse(w, "approved, but the target's sshd refused to start it").await;
    }
    w.gate.audit().record(w.started.clone());
    tracing::info!(request = %w.request_id, "SSH channel started after approval");
    let terminal = slot.get().cloned();
    let mut told = false;
    loop {
        let next = lock(&w.hold).next();
        let batch = match next {
            Next::Batch(batch) => batch,
            Next::Started | Next::Ended => return,
        };
        for input in batch {
            let sent = match input {
                HeldInput::Data(data) if guarded => {
                    // A guarded shell decides lines typed at its prompt; keys typed before
                    // it existed were never seen at one.
                    if !told {
                        told = true;
                        let _ = w
                            .client
                            .extended_data(
                                w.channel,
                                1,
                                Bytes::from_static(b"portcullis: input typed while the shell waited for approval was dropped: type it at the prompt\r\n"),
                            )
                            .await;
                    }
                    drop(data);
                    Ok(())
                }
                HeldInput::Data(data) => match &terminal {
                    Some(t) => {
                        let Ok(step) = t.lock().await.input(&data).await else {
                            // A failed recording ends the channel from its pump.
                            return;
                        };
                        if !step.to_client.is_empty() {
                            let _ = w.client.data(w.channel, step.to_client).await;
                        }
                        let mut r = Ok(());
                        for bytes in step.to_upstream {
                            let n = bytes.len() as u64;
                            r = w.upstream.data_bytes(Bytes::from(bytes)).await;
                            if r.is_err() {
                                break;
                            }
                            count_input(&w.conn, n);
                        }
                        r
                    }
                    None => {
                        let n = data.len() as u64;
                        let r = w.upstream.data_bytes(data).await;
                        if r.is_ok() {
                            count_input(&w.conn, n);
                        }
                        r
                    }
                },
                HeldInput::Eof => w.upstream.eof().await,
                HeldInput::WindowChange(c, r, pw, ph) => {
                    if let Some(t) = &terminal {
                        let _ = t.lock().await.resize(c, r).await;
                    }
                    w.upstream.window_change(c, r, pw, ph).await
                }
            };
            if sent.is_err() {
                // The server's side is gone; its close reaches the client through the pump.
                lock(&w.hold).end();
                return;
            }
        }
    }
}

fn count_input(conn: &Connection, n: u64) {
    conn.bytes
        .client_to_upstream
        .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;

    fn data(s: &'static str) -> HeldInput {
        HeldInput::Data(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn input_is_held_in_order_until_taken_and_passes_once_started() {
        let mut hold = Hold::new();
        assert_eq!(hold.push(data("ab")), Pushed::Held);
        assert_eq!(
            hold.push(HeldInput::WindowChange(80, 24, 0, 0)),
            Pushed::Held
        );
        assert_eq!(hold.push(data("c")), Pushed::Held);
        assert_eq!(hold.push(HeldInput::Eof), Pushed::Held);
        assert_eq!(
            hold.next(),
            Next::Batch(vec![
                data("ab"),
                HeldInput::WindowChange(80, 24, 0, 0),
                data("c"),
                HeldInput::Eof
            ])
        );
        // Input that arrives while the batch is being sent waits for the next one: it
        // cannot pass before what was held ahead of it.
        assert_eq!(hold.push(data("d")), Pushed::Held);
        assert_eq!(hold.next(), Next::Batch(vec![data("d")]));
        assert!(hold.is_waiting());
        assert_eq!(hold.next(), Next::Started);
        assert!(!hold.is_waiting());
        assert_eq!(hold.push(data("e")), Pushed::Pass);
        assert_eq!(hold.next(), Next::Started);
    }

    #[test]
    fn more_than_the_bound_ends_the_channel_and_keeps_nothing() {
        let mut hold = Hold::new();
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        for _ in 0..MAX_HELD_BYTES / chunk.len() {
            assert_eq!(hold.push(HeldInput::Data(chunk.clone())), Pushed::Held);
        }
        assert_eq!(hold.push(data("y")), Pushed::Overflow);
        assert_eq!(hold.push(data("z")), Pushed::Dropped);
        assert_eq!(hold.next(), Next::Ended);

        let mut hold = Hold::new();
        for _ in 0..MAX_HELD_MESSAGES {
            assert_eq!(hold.push(HeldInput::Eof), Pushed::Held);
        }
        assert_eq!(
            hold.push(HeldInput::WindowChange(1, 1, 0, 0)),
            Pushed::Overflow
        );
    }

    #[test]
    fn an_ended_hold_drops_what_it_held_and_what_comes() {
        let mut hold = Hold::new();
        assert_eq!(hold.push(data("secret")), Pushed::Held);
        hold.end();
        assert_eq!(hold.push(data("more")), Pushed::Dropped);
        assert_eq!(hold.next(), Next::Ended);
        assert!(!hold.is_waiting());
    }

    #[test]
    fn the_notice_names_the_request_and_cannot_drive_the_terminal() {
        let n = waiting_notice(
            Some("rm -rf /tmp/x\x1b]0;owned\x07"),
            "r-0123456789",
            "1 approval from group `dba-leads`",
            Duration::from_secs(300),
        );
        assert_eq!(
            n,
            "portcullis: `rm -rf /tmp/x ]0;owned ` needs approval: request r-0123456789 asks for 1 approval from group `dba-leads`; follow it with `portcullis approvals show r-0123456789` (it has not been sent to the server and waits at most 300 s)\r\n"
        );
        let long = "x".repeat(1000);
        let n = waiting_notice(Some(&long), "r-1", "q", Duration::from_secs(1));
        assert!(
            n.contains(&format!("`{}…`", "x".repeat(NOTICE_COMMAND))),
            "{n}"
        );
        let shell = waiting_notice(None, "r-1", "q", Duration::from_secs(1));
        assert!(shell.starts_with("portcullis: this shell needs approval: request r-1"));
        assert!(!shell.trim_end().chars().any(char::is_control));
    }
}
