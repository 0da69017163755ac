//! One shell or command channel's terminal as the agent handles it: output masked
//! (`portcullis_terminal::StreamMasker`), the session recorded (asciicast v2 through
//! `audit::recording`), typed lines guarded (`LineGuard`). The pure parts live in the
//! terminal crate; this is the glue that gives them the clock and the recording, shared by
//! the channel's two directions (the pump task for output, the `data` callback for input).

use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_policy::{Masker, MaskingProfile};
use portcullis_terminal::asciicast::{Header, Recorder};
use portcullis_terminal::line::{denial_notice, Guarded, LineGuard, TypedLine};
use portcullis_terminal::mask::StreamMasker;

use crate::audit::recording::{Recording, RecordingError};

/// How long output may be held back by the masker (a prompt, the echo of a keystroke: a run
/// that has not ended) before it is released: short enough that typing feels immediate.
pub const QUIET_FLUSH: Duration = Duration::from_millis(50);

/// The terminal size a recording's header states when the client asked for no pty.
const DEFAULT_SIZE: (u16, u16) = (80, 24);

/// What the client's pty request said, kept for the recording's header.
#[derive(Debug, Clone)]
pub struct PtyInfo {
    pub term: String,
    pub columns: u16,
    pub rows: u16,
}

/// The content detectors of the masking profile a channel's decision named.
pub struct MaskPlan {
    masker: Arc<Masker>,
    profile: MaskingProfile,
}

impl MaskPlan {
    /// `None` when the profile has no content detector: then nothing is held or changed.
    pub fn new(profile: &MaskingProfile, key: &[u8]) -> Option<Self> {
        let masker = Arc::new(Masker::new(profile, key));
        masker.has_detectors().then(|| Self {
            masker,
            profile: profile.clone(),
        })
    }

    fn stream(&self) -> StreamMasker {
        StreamMasker::new(Arc::clone(&self.masker), &self.profile)
    }
}

/// The header of a recording: the pty's size and TERM, the start, the command of an exec.
pub fn header(pty: Option<&PtyInfo>, command: Option<&str>, unix_secs: u64) -> Header {
    let (width, height) = pty.map_or(DEFAULT_SIZE, |p| (p.columns, p.rows));
    Header {
        width,
        height,
        timestamp: Some(unix_secs),
        command: command.map(str::to_owned),
        title: None,
        term: pty.map(|p| p.term.clone()),
        shell: None,
    }
}

/// A terminal size from the wire (u32) as the recording states it, clamped.
pub fn size(value: u32) -> u16 {
    u16::try_from(value).unwrap_or(u16::MAX)
}

/// Why a channel's terminal cannot go on: the recording failed under
/// `recording_failure = "close"`. The session ends with this said on stderr.
#[derive(Debug, Clone)]
pub struct Ended(pub RecordingError);

impl Ended {
    /// The one line the client sees before the channel closes.
    pub fn notice(&self) -> Vec<u8> {
        format!("\r\nportcullis: the session is ended: {}\r\n", self.0).into_bytes()
    }
}

/// What a shell or exec channel's terminal will be, settled when its request is decided and
/// attached when it starts (at once, or once an approval came: see `approval`).
pub struct TerminalPlan {
    slot: Arc<std::sync::OnceLock<super::SharedTerminal>>,
    recording: Option<RecordingPlan>,
    record_input: bool,
    mask: Option<MaskPlan>,
    guarded: bool,
}

/// A recording to start with the terminal. Its number is taken when it starts, so
/// terminals that never started (refused, or still waiting) leave no gap in the numbers.
pub struct RecordingPlan {
    pub shared: Arc<super::Shared>,
    /// The connection's next recording number.
    pub numbers: Arc<std::sync::atomic::AtomicU64>,
    pub connection_id: u64,
    pub pty: Option<PtyInfo>,
    pub command: Option<String>,
    pub on_failure: crate::config::RecordingFailure,
}

impl TerminalPlan {
    pub fn new(
        slot: Arc<std::sync::OnceLock<super::SharedTerminal>>,
        recording: Option<RecordingPlan>,
        record_input: bool,
        mask: Option<MaskPlan>,
        guarded: bool,
    ) -> Self {
        Self {
            slot,
            recording,
            record_input,
            mask,
            guarded,
        }
    }

    pub fn guarded(&self) -> bool {
        self.guarded
    }

    /// Where the terminal goes once attached (the channel's, both directions read it).
    pub fn slot(&self) -> Arc<std::sync::OnceLock<super::SharedTerminal>> {
        Arc::clone(&self.slot)
    }

    /// Starts the recording (an error refuses the channel: a session that cannot be
    /// recorded does not start, unless `recording_failure = "continue"`) and gives the
    /// channel its terminal, unless it has nothing to do.
    pub async fn attach(&mut self) -> Result<(), String> {
        let recording = match self.recording.take() {
            Some(r) => {
                // Each terminal has its own recording, numbered within the connection in
                // the order they started (several on one ControlMaster connection).
                let number = r.numbers.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let id =
                    portcullis_audit_store::recording::RecordingId::new(r.connection_id, number);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let header = header(r.pty.as_ref(), r.command.as_deref(), now);
                let mut recorder = Recorder::new(&header);
                let recording = r
                    .shared
                    .recordings()
                    .start(id, recorder.take_chunk(), r.on_failure)
                    .await
                    .map_err(|e| e.to_string())?;
                Some((recorder, recording))
            }
            None => None,
        };
        let terminal = Terminal::new(
            recording,
            self.record_input,
            self.mask.take().as_ref(),
            self.guarded,
        );
        if terminal.is_idle() {
            return Ok(());
        }
        let _ = self.slot.set(Arc::new(tokio::sync::Mutex::new(terminal)));
        Ok(())
    }
}

/// The verdict on a guarded line, from the handler (policy and audit live there).
pub struct LineVerdict {
    pub allowed: bool,
    /// Shown to the user and written as the marker's label when the line is refused.
    pub reason: String,
}

/// What the client's input turned into, up to the next line to decide.
#[derive(Default)]
pub struct InputStep {
    /// Bytes for the target, in order.
    pub to_upstream: Vec<Vec<u8>>,
    /// Notices for the client's terminal (why a line was refused).
    pub to_client: Vec<u8>,
    /// A line whose Enter is withheld: forward `to_upstream`, let its echo come back
    /// (`Terminal::echo_seen`), decide it, then call `Terminal::decided`.
    pub line: Option<TypedLine>,
}

/// How long a guarded line's Enter waits for the echo of its keys before it is taken as
/// typed without echo (a password prompt).
pub const ECHO_WAIT: Duration = Duration::from_millis(300);

/// The guard's output as an input step: bytes to forward, up to the line to decide.
fn step(items: Vec<Guarded>) -> InputStep {
    let mut step = InputStep::default();
    for item in items {
        match item {
            Guarded::Forward(b) => step.to_upstream.push(b),
            Guarded::Line(line) => step.line = Some(line),
        }
    }
    step
}

/// One channel's terminal state.
pub struct Terminal {
    started: Instant,
    recorder: Option<(Recorder, Recording)>,
    record_input: bool,
    stdout: Option<StreamMasker>,
    stderr: Option<StreamMasker>,
    guard: Option<LineGuard>,
}

impl std::fmt::Debug for Terminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminal")
            .field("recorded", &self.recorder.is_some())
            .field("masked", &self.stdout.is_some())
            .field("guarded", &self.guard.is_some())
            .finish_non_exhaustive()
    }
}

impl Terminal {
    pub fn new(
        recording: Option<(Recorder, Recording)>,
        record_input: bool,
        mask: Option<&MaskPlan>,
        guarded: bool,
    ) -> Self {
        Self {
            started: Instant::now(),
            recorder: recording,
            record_input,
            stdout: mask.map(MaskPlan::stream),
            stderr: mask.map(MaskPlan::stream),
            guard: guarded.then(LineGuard::new),
        }
    }

    /// Nothing to do for this channel: its bytes pass unchanged.
    pub fn is_idle(&self) -> bool {
        self.recorder.is_none() && self.stdout.is_none() && self.guard.is_none()
    }

    /// Resolves when the recording fails under `recording_failure = "close"`.
    pub fn failure(&self) -> Option<impl std::future::Future<Output = RecordingError> + 'static> {
        self.recorder.as_ref().map(|(_, r)| r.failed())
    }

    fn at(&self) -> Duration {
        self.started.elapsed()
    }

    /// Output of the target (`stderr` for its extended data): masked, recorded; what the
    /// client may be shown now.
    pub async fn output(&mut self, stderr: bool, bytes: &[u8]) -> Result<Vec<u8>, Ended> {
        if let Some(guard) = &mut self.guard {
            // The guard follows the echo as the target sent it: a masked echo would not
            // match the keys typed.
            guard.output(bytes);
        }
        let masker = if stderr {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        let shown = match masker {
            Some(m) => m.push(bytes),
            None => bytes.to_vec(),
        };
        self.record_output(&shown).await?;
        Ok(shown)
    }

    /// Whether the masker holds output back (the pump flushes it after [`QUIET_FLUSH`]).
    pub fn holds(&self) -> bool {
        self.stdout.as_ref().is_some_and(StreamMasker::holds)
            || self.stderr.as_ref().is_some_and(StreamMasker::holds)
    }

    /// The target went quiet (or ended, `last`): what the maskers held, masked, for stdout
    /// and stderr.
    pub async fn release(&mut self, last: bool) -> Result<(Vec<u8>, Vec<u8>), Ended> {
        let take = |m: &mut Option<StreamMasker>| match m {
            Some(m) if last => m.finish(),
            Some(m) => m.flush(),
            None => Vec::new(),
        };
        let out = take(&mut self.stdout);
        let err = take(&mut self.stderr);
        self.record_output(&out).await?;
        self.record_output(&err).await?;
        Ok((out, err))
    }

    async fn record_output(&mut self, shown: &[u8]) -> Result<(), Ended> {
        if shown.is_empty() {
            return Ok(());
        }
        let at = self.at();
        if let Some((recorder, _)) = &mut self.recorder {
            recorder.output(at, shown);
        }
        self.append().await
    }

    async fn append(&mut self) -> Result<(), Ended> {
        let Some((recorder, recording)) = &mut self.recorder else {
            return Ok(());
        };
        if recorder.pending() == 0 {
            return Ok(());
        }
        recording.append(recorder.take_chunk()).await.map_err(Ended)
    }

    /// The client resized its terminal.
    pub async fn resize(&mut self, columns: u32, rows: u32) -> Result<(), Ended> {
        let at = self.at();
        if let Some((recorder, _)) = &mut self.recorder {
            recorder.resize(at, size(columns), size(rows));
        }
        self.append().await
    }

    /// What the client typed or piped: recorded when the target says so, and through the
    /// guard, which stops at the first Enter of a line to decide.
    pub async fn input(&mut self, bytes: &[u8]) -> Result<InputStep, Ended> {
        let at = self.at();
        if self.record_input {
            if let Some((recorder, _)) = &mut self.recorder {
                recorder.input(at, bytes);
            }
        }
        self.append().await?;
        let Some(guard) = &mut self.guard else {
            return Ok(InputStep {
                to_upstream: vec![bytes.to_vec()],
                ..InputStep::default()
            });
        };
        Ok(match guard.input(bytes) {
            Ok(items) => step(items),
            // Input piled up behind an undecided line: refuse it rather than let keys reach
            // the shell unguarded.
            Err(e) => InputStep {
                to_client: denial_notice(&e.to_string()),
                ..InputStep::default()
            },
        })
    }

    /// Whether the target echoed any key of the line waiting for its decision.
    pub fn echo_seen(&self) -> bool {
        self.guard.as_ref().is_some_and(LineGuard::echo_seen)
    }

    /// The decision on the waiting `line` (`shown`: its text as the recording's marker
    /// may show it): its Enter, or the line cleared and the user told why; a marker either
    /// way; then the input queued meanwhile, up to the next line.
    pub async fn decided(
        &mut self,
        shown: &str,
        verdict: &LineVerdict,
    ) -> Result<InputStep, Ended> {
        let at = self.at();
        if let Some((recorder, _)) = &mut self.recorder {
            let label = if verdict.allowed {
                format!("line: {shown}")
            } else {
                format!("line refused: {shown}: {}", verdict.reason)
            };
            recorder.marker(at, &label);
        }
        self.append().await?;
        let Some(guard) = &mut self.guard else {
            return Ok(InputStep::default());
        };
        let mut notice = Vec::new();
        if !verdict.allowed {
            notice = denial_notice(&verdict.reason);
        }
        let mut next = match guard.decided(verdict.allowed) {
            Ok(items) => step(items),
            Err(e) => InputStep {
                to_client: denial_notice(&e.to_string()),
                ..InputStep::default()
            },
        };
        if !verdict.allowed && !next.to_upstream.is_empty() {
            // An empty line right after the cleared one: the shell draws a fresh prompt
            // below the notice.
            next.to_upstream.insert(1, b"\r".to_vec());
        }
        notice.append(&mut next.to_client);
        next.to_client = notice;
        Ok(next)
    }

    /// The channel ended: what the maskers held, then the recording closed. Returns the
    /// last output for the client (already recorded).
    pub async fn finish(&mut self) -> (Vec<u8>, Vec<u8>, Option<Recording>) {
        let released = self.release(true).await.unwrap_or_default();
        let at = self.at();
        let recording = self.recorder.take().map(|(mut recorder, recording)| {
            let last = recorder.finish(at);
            (last, recording)
        });
        let recording = match recording {
            Some((last, recording)) => {
                if !last.is_empty() {
                    let _ = recording.append(last).await;
                }
                Some(recording)
            }
            None => None,
        };
        (released.0, released.1, recording)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;
    use portcullis_terminal::line::CLEAR_LINE;

    fn verdict(allowed: bool) -> LineVerdict {
        LineVerdict {
            allowed,
            reason: if allowed { String::new() } else { "no".into() },
        }
    }

    /// Types `line` key by key at a guarded terminal whose shell echoes each key.
    async fn typed(t: &mut Terminal, line: &[u8]) {
        for b in line {
            let step = t.input(&[*b]).await.unwrap();
            assert_eq!(step.to_upstream, vec![vec![*b]]);
            assert!(step.line.is_none());
            t.output(false, &[*b]).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_refused_line_is_cleared_and_explained_and_an_allowed_one_gets_its_enter() {
        let mut t = Terminal::new(None, false, None, true);
        t.output(false, b"$ ").await.unwrap();
        typed(&mut t, b"rm -rf x").await;
        let step = t.input(b"\r").await.unwrap();
        assert!(step.to_upstream.is_empty(), "the Enter went through");
        assert_eq!(step.line.unwrap().text, "rm -rf x");
        assert!(t.echo_seen());
        let next = t.decided("rm -rf x", &verdict(false)).await.unwrap();
        assert_eq!(next.to_upstream, vec![CLEAR_LINE.to_vec(), b"\r".to_vec()]);
        assert!(String::from_utf8_lossy(&next.to_client).contains("line refused: no"));

        t.output(false, b"\r\n$ ").await.unwrap();
        typed(&mut t, b"ls").await;
        let step = t.input(b"\r").await.unwrap();
        assert_eq!(step.line.unwrap().text, "ls");
        let next = t.decided("ls", &verdict(true)).await.unwrap();
        assert_eq!(next.to_upstream, vec![b"\r".to_vec()]);
        assert!(next.to_client.is_empty());
    }

    #[tokio::test]
    async fn a_line_typed_ahead_waits_for_its_decision_before_the_next() {
        let mut t = Terminal::new(None, false, None, true);
        t.output(false, b"$ ").await.unwrap();
        // Pasted with its Enter and the next line: no echo yet, nothing past the Enter sent.
        let step = t.input(b"rm -rf x\rls\r").await.unwrap();
        assert_eq!(step.to_upstream, vec![b"rm -rf x".to_vec()]);
        assert!(!t.echo_seen());
        t.output(false, b"rm -rf x").await.unwrap();
        assert!(t.echo_seen());
        let next = t.decided("rm -rf x", &verdict(false)).await.unwrap();
        assert_eq!(next.line.unwrap().text, "ls");
    }

    #[tokio::test]
    async fn an_unguarded_terminal_passes_input_unchanged() {
        let mut t = Terminal::new(None, false, None, false);
        assert!(t.is_idle());
        let step = t.input(b"rm -rf x\r").await.unwrap();
        assert!(step.line.is_none());
        assert_eq!(step.to_upstream, vec![b"rm -rf x\r".to_vec()]);
    }
}
