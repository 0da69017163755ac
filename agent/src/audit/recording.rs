//! Session recordings in the audit store's recording area, their chunks in the hash chain.
//!
//! A protocol starts one [`Recording`] per terminal ([`Recordings::start`] with the
//! asciicast header), numbered within its connection ([`RecordingId`]: 0, 1, 2 … in the order
//! the terminals started, several on one ControlMaster connection; every event of the
//! recording carries the number as `recording`, and an event without it means 0), hands it the bytes its terminal produces ([`Recording::append`])
//! and ends it ([`Recording::finish`]). One task per recording batches what arrives into
//! chunks (written once [`CHUNK_BYTES`] have gathered, or [`FLUSH_AFTER`] after the first
//! byte waiting), writes and fsyncs
//! each on a blocking thread (`portcullis_audit_store::recording`), then makes its
//! `recording.chunk` event (index, offset, length, SHA-256) durable; `recording.closed` ends
//! it with the length and the SHA-256 of the whole file. The protocol's event loop never
//! waits for a disk: `append` waits only for room in a bounded channel.
//!
//! Fail closed: when a chunk or its event cannot be written, the recording fails; with
//! `recording_failure = "close"` (the default) [`Recording::failed`] resolves and every later
//! `append` returns the error, and the protocol ends the session. Output sent to the client
//! in the meantime (at most [`FLUSH_AFTER`] plus one fsync) is the bound on what a session
//! may show unrecorded. With `"continue"` the session goes on unrecorded, and
//! `recording.failed` says so.
//!
//! Reading back ([`read_back`], [`verify_all`]) collects the chunk and closed events of the
//! trail and checks the files against them: a recording is only ever returned as the chain
//! vouches for it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use portcullis_audit_store::recording::{
    ChunkRef, Claims, RecordingBreak, RecordingClaims, RecordingFile, RecordingId,
    RecordingSummary, RecordingsReport,
};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::{AuditEvent, AuditLog, EventKind};
use crate::config::RecordingFailure;
use portcullis_core::event::RecordingFields;

/// A chunk is written once this much waits: about one fsync and one event per this many
/// bytes of a busy terminal (a chunk is larger by at most the append that filled it).
pub const CHUNK_BYTES: usize = 64 * 1024;
/// The longest bytes wait in memory before they are written: the most a failure can let a
/// session show unrecorded, and the most a crash can lose.
pub const FLUSH_AFTER: Duration = Duration::from_millis(200);
/// Appends queued for the writer task before `append` waits (backpressure on the session).
const CHANNEL: usize = 64;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RecordingError {
    /// The file, its chunk or its event could not be written; the session must end
    /// (`recording_failure = "close"`).
    #[error("the session recording cannot be written: {0}")]
    Write(Arc<str>),
}

#[derive(Debug, thiserror::Error)]
pub enum ReadBackError {
    #[error("reading the audit trail in {}: {source}", dir.display())]
    Trail {
        dir: PathBuf,
        source: portcullis_audit_store::StoreError,
    },
    #[error("no recording {} of session {} in the audit trail", .0.number, .0.connection)]
    NoRecording(RecordingId),
    /// The file does not match the chain: it is not returned.
    #[error("the recording does not match the audit trail: {0}")]
    Broken(RecordingBreak),
}

/// Starts recordings; one per agent, shared by every protocol that records.
pub struct Recordings {
    audit: Arc<AuditLog>,
}

impl Recordings {
    pub fn new(audit: Arc<AuditLog>) -> Self {
        Self { audit }
    }

    /// Creates recording `id` (a connection's terminal) and writes `header` as its chunk 0
    /// (the asciicast header line), durable with its event before this returns. An error
    /// means no recording: with `on_failure = Close` the terminal must not start.
    pub async fn start(
        &self,
        id: impl Into<RecordingId>,
        header: Vec<u8>,
        on_failure: RecordingFailure,
    ) -> Result<Recording, RecordingError> {
        let id = id.into();
        let dir = self.audit.dir().to_path_buf();
        let created = blocking(move || {
            let mut file = RecordingFile::create(&dir, id)?;
            let chunk = file.append(&header)?;
            Ok((file, chunk))
        })
        .await;
        self.begin(id, created, on_failure).await
    }

    async fn begin(
        &self,
        id: RecordingId,
        created: Result<(RecordingFile, ChunkRef), RecordingError>,
        on_failure: RecordingFailure,
    ) -> Result<Recording, RecordingError> {
        let audit = Arc::clone(&self.audit);
        let (file, error) = match created {
            Ok((file, chunk)) => match record_chunk(&audit, id, &chunk).await {
                Ok(()) => (Some(file), None),
                Err(e) => (Some(file), Some(e)),
            },
            Err(e) => (None, Some(e)),
        };
        if let Some(error) = error {
            record_failure(&audit, id, &error, on_failure);
            if on_failure == RecordingFailure::Close {
                return Err(error);
            }
            // Unrecorded from the start; `append` accepts and drops.
            let (_, failure) = watch::channel(Some(error));
            return Ok(Recording {
                id,
                on_failure,
                tx: None,
                failure,
                task: None,
            });
        }
        let (tx, rx) = mpsc::channel(CHANNEL);
        let (failed, failure) = watch::channel(None);
        let writer = Writer {
            audit,
            id,
            file,
            failed,
            on_failure,
        };
        let task = tokio::spawn(writer.run(rx));
        Ok(Recording {
            id,
            on_failure,
            tx: Some(tx),
            failure,
            task: Some(task),
        })
    }
}

/// One session's recording. [`Recording::finish`] ends it; dropped without it, the writer
/// still writes what it got and closes the recording, but nobody learns the outcome.
pub struct Recording {
    id: RecordingId,
    on_failure: RecordingFailure,
    tx: Option<mpsc::Sender<Vec<u8>>>,
    failure: watch::Receiver<Option<RecordingError>>,
    task: Option<tokio::task::JoinHandle<Result<RecordingSummary, RecordingError>>>,
}

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("id", &self.id)
            .field("on_failure", &self.on_failure)
            .finish_non_exhaustive()
    }
}

impl Recording {
    /// Hands `bytes` to the writer. Waits only while the writer is behind. An error means
    /// the recording failed and the session must end (`recording_failure = "close"`); under
    /// `"continue"` the bytes are dropped and this succeeds.
    pub async fn append(&self, bytes: Vec<u8>) -> Result<(), RecordingError> {
        if let Some(error) = self.failure.borrow().clone() {
            return self.outcome(error);
        }
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        if tx.send(bytes).await.is_err() {
            // The writer stopped, which it does only after recording why.
            let error =
                self.failure.borrow().clone().unwrap_or_else(|| {
                    RecordingError::Write("the recording's writer stopped".into())
                });
            return self.outcome(error);
        }
        Ok(())
    }

    fn outcome(&self, error: RecordingError) -> Result<(), RecordingError> {
        match self.on_failure {
            RecordingFailure::Close => Err(error),
            RecordingFailure::Continue => Ok(()),
        }
    }

    /// Resolves when the recording fails under `recording_failure = "close"`: a session
    /// selects on it, so it ends even while nothing more is appended. Never resolves
    /// otherwise. The future does not borrow the recording, so a task can select on it
    /// while another part of the session appends.
    pub fn failed(&self) -> impl std::future::Future<Output = RecordingError> + 'static {
        let mut failure = self.failure.clone();
        let on_failure = self.on_failure;
        async move {
            if on_failure == RecordingFailure::Close {
                if let Ok(error) = failure.wait_for(Option::is_some).await {
                    if let Some(error) = error.clone() {
                        return error;
                    }
                }
            }
            std::future::pending().await
        }
    }

    /// Writes what is pending, records `recording.closed` and waits until it is durable.
    /// Returns the recording's length and hash, or why it failed.
    pub async fn finish(mut self) -> Result<RecordingSummary, RecordingError> {
        drop(self.tx.take());
        let Some(task) = self.task.take() else {
            return Err(self
                .failure
                .borrow()
                .clone()
                .unwrap_or_else(|| RecordingError::Write("the recording never started".into())));
        };
        match task.await {
            Ok(outcome) => outcome,
            Err(e) => Err(RecordingError::Write(
                format!("the recording's writer ended abnormally: {e}").into(),
            )),
        }
    }
}

/// The task that owns one recording's file.
struct Writer {
    audit: Arc<AuditLog>,
    id: RecordingId,
    file: Option<RecordingFile>,
    failed: watch::Sender<Option<RecordingError>>,
    on_failure: RecordingFailure,
}

impl Writer {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Vec<u8>>,
    ) -> Result<RecordingSummary, RecordingError> {
        let mut pending: Vec<u8> = Vec::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut error: Option<RecordingError> = None;
        loop {
            let received = match deadline {
                Some(at) => tokio::select! {
                    r = rx.recv() => Some(r),
                    () = tokio::time::sleep_until(at) => None,
                },
                None => Some(rx.recv().await),
            };
            let ended = matches!(received, Some(None));
            if let Some(Some(bytes)) = received {
                if error.is_some() {
                    continue; // failed: what still arrives is dropped, not written
                }
                if pending.is_empty() {
                    deadline = Some(tokio::time::Instant::now() + FLUSH_AFTER);
                }
                pending.extend_from_slice(&bytes);
                if pending.len() < CHUNK_BYTES {
                    continue;
                }
            }
            if !pending.is_empty() && error.is_none() {
                let bytes = std::mem::take(&mut pending);
                if let Err(e) = self.write(bytes).await {
                    record_failure(&self.audit, self.id, &e, self.on_failure);
                    let _ = self.failed.send(Some(e.clone()));
                    error = Some(e);
                }
            }
            pending.clear();
            deadline = None;
            if ended {
                break;
            }
        }
        self.close(error).await
    }

    /// Writes one chunk (a blocking thread) and makes its event durable.
    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), RecordingError> {
        let Some(mut file) = self.file.take() else {
            return Err(RecordingError::Write("no recording file".into()));
        };
        let (file, written) = tokio::task::spawn_blocking(move || {
            let written = file.append(&bytes);
            (file, written)
        })
        .await
        .map_err(|e| RecordingError::Write(format!("the writing thread failed: {e}").into()))?;
        self.file = Some(file);
        let chunk = written.map_err(|e| RecordingError::Write(e.to_string().into()))?;
        record_chunk(&self.audit, self.id, &chunk).await
    }

    /// `recording.closed` with what the chain vouches for, durable, then the note that lets
    /// retention delete the file with the segment of that event.
    async fn close(
        self,
        error: Option<RecordingError>,
    ) -> Result<RecordingSummary, RecordingError> {
        let Some(file) = &self.file else {
            return Err(error.unwrap_or_else(|| RecordingError::Write("no recording file".into())));
        };
        let summary = file.summary();
        let mut ev = event(EventKind::RecordingClosed, self.id);
        ev.recording = Some(Box::new(RecordingFields {
            recording_chunk: summary.chunks,
            recording_offset: 0,
            recording_bytes: summary.length,
            recording_sha256: hex::encode(summary.sha256),
        }));
        if let Some(e) = &error {
            ev.reason = Some(e.to_string());
        }
        let seq = self
            .audit
            .record_durable(&ev)
            .await
            .map_err(|e| RecordingError::Write(e.to_string().into()))?;
        let dir = self.audit.dir().to_path_buf();
        let id = self.id;
        let marked = blocking(move || {
            portcullis_audit_store::recording::mark_closed(&dir, id, seq)?;
            Ok(())
        })
        .await;
        if let Err(e) = marked {
            // The recording is complete and in the chain; without the note retention only
            // keeps it longer.
            tracing::warn!(recording = %id, error = %e, "cannot note a closed recording for retention; it is kept until removed by hand");
        }
        match error {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, portcullis_audit_store::StoreError> + Send + 'static,
) -> Result<T, RecordingError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RecordingError::Write(format!("the writing thread failed: {e}").into()))?
        .map_err(|e| RecordingError::Write(e.to_string().into()))
}

fn event(kind: EventKind, id: RecordingId) -> AuditEvent {
    let mut ev = AuditEvent::new(kind);
    ev.connection_id = Some(id.connection);
    ev.recording_number = Some(id.number);
    ev
}

async fn record_chunk(
    audit: &AuditLog,
    id: RecordingId,
    chunk: &ChunkRef,
) -> Result<(), RecordingError> {
    let mut ev = event(EventKind::RecordingChunk, id);
    ev.recording = Some(Box::new(RecordingFields {
        recording_chunk: chunk.index,
        recording_offset: chunk.offset,
        recording_bytes: chunk.length,
        recording_sha256: hex::encode(chunk.sha256),
    }));
    audit
        .record_durable(&ev)
        .await
        .map(|_| ())
        .map_err(|e| RecordingError::Write(format!("recording its chunk event: {e}").into()))
}

fn record_failure(
    audit: &AuditLog,
    id: RecordingId,
    error: &RecordingError,
    on_failure: RecordingFailure,
) {
    let what = match on_failure {
        RecordingFailure::Close => "the session is ended (recording_failure = \"close\")",
        RecordingFailure::Continue => {
            "the session goes on unrecorded (recording_failure = \"continue\")"
        }
    };
    tracing::error!(recording = %id, error = %error, "{what}");
    audit.record(event(EventKind::RecordingFailed, id).reason(format!("{error}; {what}")));
}

/// What one event says about a recording, if it is a chunk or closed event. An event
/// without `recording` (written before recordings were numbered) is about recording 0.
pub fn claim_of(event: &Value) -> Option<(RecordingId, Claim)> {
    let kind = event.get("event")?.as_str()?;
    let connection = event.get("connection_id")?.as_u64()?;
    let number = match event.get("recording") {
        None => 0,
        Some(n) => n.as_u64()?,
    };
    let id = RecordingId::new(connection, number);
    let field = |k: &str| event.get(k).and_then(Value::as_u64);
    let (index, offset, length) = (
        field("recording_chunk")?,
        field("recording_offset")?,
        field("recording_bytes")?,
    );
    let sha256: [u8; 32] = hex::decode(event.get("recording_sha256")?.as_str()?)
        .ok()?
        .try_into()
        .ok()?;
    match kind {
        "recording.chunk" => Some((
            id,
            Claim::Chunk(ChunkRef {
                index,
                offset,
                length,
                sha256,
            }),
        )),
        "recording.closed" => Some((
            id,
            Claim::Closed(RecordingSummary {
                chunks: index,
                length,
                sha256,
            }),
        )),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Chunk(ChunkRef),
    Closed(RecordingSummary),
}

/// The chunk and closed events of the trail in `audit_dir`, by recording (all of them, or
/// only those of connection `only`).
pub fn claims(audit_dir: &Path, only: Option<u64>) -> Result<RecordingClaims, ReadBackError> {
    let trail = |source| ReadBackError::Trail {
        dir: audit_dir.to_path_buf(),
        source,
    };
    let mut claims = RecordingClaims::default();
    for record in portcullis_audit_store::Reader::all(audit_dir).map_err(trail)? {
        let record = record.map_err(trail)?;
        // Cheap test first: most events are not about recordings.
        if !record.event.contains("\"recording.") {
            continue;
        }
        let Ok(event) = serde_json::from_str::<Value>(&record.event) else {
            continue;
        };
        match claim_of(&event) {
            Some((id, _)) if only.is_some_and(|o| o != id.connection) => {}
            Some((id, Claim::Chunk(chunk))) => claims.chunk(id, chunk),
            Some((id, Claim::Closed(summary))) => claims.closed(id, summary),
            None => {}
        }
    }
    Ok(claims)
}

/// Every recording checked against the trail (`portcullis audit verify`).
pub fn verify_all(audit_dir: &Path) -> Result<RecordingsReport, ReadBackError> {
    let claims = claims(audit_dir, None)?;
    Ok(portcullis_audit_store::recording::verify_recordings(
        audit_dir, &claims,
    ))
}

/// Recording `id` (a bare session id: its recording 0; an asciicast v2 file for SSH),
/// checked against its chunk events: what `portcullis replay` plays. Only the bytes the
/// chain vouches for are returned; a recording that does not match it is refused.
pub fn read_back(
    audit_dir: &Path,
    id: impl Into<RecordingId>,
) -> Result<RecordedSession, ReadBackError> {
    let id = id.into();
    let claims = claims(audit_dir, Some(id.connection))?;
    let claim = claims
        .recordings
        .get(&id)
        .ok_or(ReadBackError::NoRecording(id))?;
    read_one(audit_dir, id, claim).map_err(ReadBackError::Broken)
}

/// A session's recordings in order, each read back or why it could not be.
pub type SessionRecordings = Vec<(RecordingId, Result<RecordedSession, RecordingBreak>)>;

/// Every recording of session `connection`, in order (none: an empty list), each read back
/// and checked as [`read_back`] does: what `sessions show` lists.
pub fn read_back_session(
    audit_dir: &Path,
    connection: u64,
) -> Result<SessionRecordings, ReadBackError> {
    let claims = claims(audit_dir, Some(connection))?;
    Ok(claims
        .recordings
        .iter()
        .map(|(id, claim)| (*id, read_one(audit_dir, *id, claim)))
        .collect())
}

fn read_one(
    audit_dir: &Path,
    id: RecordingId,
    claim: &Claims,
) -> Result<RecordedSession, RecordingBreak> {
    let bytes = portcullis_audit_store::recording::read_verified(audit_dir, id, claim)?;
    Ok(RecordedSession {
        id,
        path: portcullis_audit_store::recording::recording_path(audit_dir, id),
        closed: claim.closed.is_some(),
        bytes,
    })
}

/// A recording read back and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedSession {
    pub id: RecordingId,
    pub path: PathBuf,
    /// False while the session runs, or when the agent stopped before closing it.
    pub closed: bool,
    pub bytes: Vec<u8>,
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests"
)]
mod tests {
    use super::*;
    use portcullis_audit_store::recording::{recording_path, RecordingBreakKind};

    const HEADER: &[u8] = b"{\"version\":2,\"width\":80,\"height\":24,\"command\":\"bash\"}\n";

    fn audit(dir: &Path) -> Arc<AuditLog> {
        let (log, _) = AuditLog::open(&Default::default(), &dir.join("audit"), Vec::new()).unwrap();
        Arc::new(log)
    }

    fn line(n: usize) -> Vec<u8> {
        format!("[{n}.5,\"o\",\"line {n} caf\u{e9}\\r\\n\"]\n").into_bytes()
    }

    fn events(dir: &Path) -> Vec<Value> {
        portcullis_audit_store::Reader::all(dir)
            .unwrap()
            .map(|r| serde_json::from_str(&r.unwrap().event).unwrap())
            .collect()
    }

    /// What a session appends is in the file, each chunk's hash and place in the chain, the
    /// closed event covers the whole file, and reading it back gives the bytes again.
    #[tokio::test]
    async fn appended_output_reads_back_as_the_chain_recorded_it() {
        let tmp = tempfile::tempdir().unwrap();
        let audit = audit(tmp.path());
        let dir = audit.dir().to_path_buf();
        let recordings = Recordings::new(Arc::clone(&audit));
        let rec = recordings
            .start(42, HEADER.to_vec(), RecordingFailure::Close)
            .await
            .unwrap();
        let mut want = HEADER.to_vec();
        for n in 0..50 {
            rec.append(line(n)).await.unwrap();
            want.extend(line(n));
        }
        // A burst past CHUNK_BYTES is written without waiting for FLUSH_AFTER.
        let big = vec![b'x'; CHUNK_BYTES + 10];
        rec.append(big.clone()).await.unwrap();
        want.extend(&big);
        let summary = rec.finish().await.unwrap();
        assert_eq!(summary.length, want.len() as u64);
        assert_eq!(std::fs::read(recording_path(&dir, 42)).unwrap(), want);

        let evs = events(&dir);
        let chunks: Vec<&Value> = evs
            .iter()
            .filter(|e| e["event"] == "recording.chunk")
            .collect();
        assert!(chunks.len() >= 2, "the header, then the output: {chunks:?}");
        assert!(chunks.iter().all(|e| e["connection_id"] == 42));
        assert_eq!(chunks[0]["recording_chunk"], 0);
        assert_eq!(chunks[0]["recording_bytes"], HEADER.len());
        let closed = evs
            .iter()
            .find(|e| e["event"] == "recording.closed")
            .unwrap();
        assert_eq!(closed["recording_chunk"], chunks.len());
        assert_eq!(closed["recording_bytes"], want.len());
        assert!(closed.get("reason").is_none());

        let back = read_back(&dir, 42).unwrap();
        assert!(back.closed);
        assert_eq!(back.bytes, want);
        let report = verify_all(&dir).unwrap();
        assert!(
            report.ok() && report.checked == 1 && report.closed == 1,
            "{report:?}"
        );
        assert!(matches!(
            read_back(&dir, 43),
            Err(ReadBackError::NoRecording(id)) if id == RecordingId::new(43, 0)
        ));

        // An edited byte is named and the recording is no longer read back.
        let path = recording_path(&dir, 42);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER.len() + 3] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let report = verify_all(&dir).unwrap();
        assert_eq!(report.breaks.len(), 1);
        assert_eq!(report.breaks[0].kind, RecordingBreakKind::ChunkAltered);
        assert_eq!(report.breaks[0].chunk, Some(1));
        assert!(matches!(read_back(&dir, 42), Err(ReadBackError::Broken(_))));
    }

    /// Two terminals on one connection (ControlMaster): two recordings, each event naming
    /// its number, each read back and verified on its own; `read_back_session` lists both.
    #[tokio::test]
    async fn two_terminals_of_one_connection_are_two_recordings() {
        let tmp = tempfile::tempdir().unwrap();
        let audit = audit(tmp.path());
        let dir = audit.dir().to_path_buf();
        let recordings = Recordings::new(Arc::clone(&audit));
        let (first, second) = (RecordingId::new(42, 0), RecordingId::new(42, 1));
        let a = recordings
            .start(first, HEADER.to_vec(), RecordingFailure::Close)
            .await
            .unwrap();
        // Both run at once: the second starts while the first is open.
        let b = recordings
            .start(second, HEADER.to_vec(), RecordingFailure::Close)
            .await
            .unwrap();
        a.append(line(1)).await.unwrap();
        b.append(line(2)).await.unwrap();
        b.append(line(3)).await.unwrap();
        b.finish().await.unwrap();
        a.finish().await.unwrap();
        let want = |lines: &[usize]| {
            let mut w = HEADER.to_vec();
            for n in lines {
                w.extend(line(*n));
            }
            w
        };
        assert_eq!(
            std::fs::read(recording_path(&dir, second)).unwrap(),
            want(&[2, 3])
        );
        assert_eq!(read_back(&dir, 42).unwrap().bytes, want(&[1]));
        assert_eq!(read_back(&dir, first).unwrap().bytes, want(&[1]));
        let back = read_back(&dir, second).unwrap();
        assert_eq!((back.id, back.closed), (second, true));
        assert_eq!(back.bytes, want(&[2, 3]));
        assert!(matches!(
            read_back(&dir, RecordingId::new(42, 2)),
            Err(ReadBackError::NoRecording(id)) if id == RecordingId::new(42, 2)
        ));
        let all = read_back_session(&dir, 42).unwrap();
        let ids: Vec<RecordingId> = all.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [first, second]);
        assert!(all.iter().all(|(_, r)| r.is_ok()));
        assert!(read_back_session(&dir, 43).unwrap().is_empty());
        for e in events(&dir)
            .iter()
            .filter(|e| e["event"].as_str().unwrap().starts_with("recording."))
        {
            assert_eq!(e["connection_id"], 42);
            assert!(e["recording"] == 0 || e["recording"] == 1, "{e}");
        }
        let report = verify_all(&dir).unwrap();
        assert!(
            report.ok() && report.checked == 2 && report.closed == 2,
            "{report:?}"
        );

        // Each file is checked against its own events: damage to the second names it.
        let path = recording_path(&dir, second);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER.len() + 3] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let report = verify_all(&dir).unwrap();
        assert_eq!(report.breaks.len(), 1, "{report:?}");
        assert_eq!(
            (report.breaks[0].connection_id, report.breaks[0].recording),
            (42, 1)
        );
        assert!(matches!(
            read_back(&dir, second),
            Err(ReadBackError::Broken(_))
        ));
        assert_eq!(read_back(&dir, first).unwrap().bytes, want(&[1]));
    }

    /// A trail written before recordings were numbered (its events have no `recording`, its
    /// file the bare connection's name) reads back and verifies as recording 0.
    #[tokio::test]
    async fn a_trail_from_before_numbered_recordings_is_recording_0() {
        let tmp = tempfile::tempdir().unwrap();
        let audit = audit(tmp.path());
        let dir = audit.dir().to_path_buf();
        let mut file = RecordingFile::create(&dir, 77).unwrap();
        let mut whole = Vec::new();
        for bytes in [HEADER.to_vec(), line(1)] {
            let chunk = file.append(&bytes).unwrap();
            whole.extend(bytes);
            let mut ev = AuditEvent::new(EventKind::RecordingChunk);
            ev.connection_id = Some(77);
            ev.recording = Some(Box::new(RecordingFields {
                recording_chunk: chunk.index,
                recording_offset: chunk.offset,
                recording_bytes: chunk.length,
                recording_sha256: hex::encode(chunk.sha256),
            }));
            audit.record_durable(&ev).await.unwrap();
        }
        let summary = file.summary();
        let mut ev = AuditEvent::new(EventKind::RecordingClosed);
        ev.connection_id = Some(77);
        ev.recording = Some(Box::new(RecordingFields {
            recording_chunk: summary.chunks,
            recording_offset: 0,
            recording_bytes: summary.length,
            recording_sha256: hex::encode(summary.sha256),
        }));
        audit.record_durable(&ev).await.unwrap();
        let evs = events(&dir);
        assert!(evs.iter().all(|e| e.get("recording").is_none()), "{evs:?}");
        assert!(dir.join("recordings/00000000000000000077.cast").exists());

        let back = read_back(&dir, 77).unwrap();
        assert_eq!(back.id, RecordingId::new(77, 0));
        assert!(back.closed);
        assert_eq!(back.bytes, whole);
        let report = verify_all(&dir).unwrap();
        assert!(
            report.ok() && report.checked == 1 && report.closed == 1,
            "{report:?}"
        );
        assert!(report.notes.is_empty(), "{report:?}");
        // A numbered recording of the same connection after it takes 1, beside it.
        let rec = Recordings::new(Arc::clone(&audit))
            .start(
                RecordingId::new(77, 1),
                HEADER.to_vec(),
                RecordingFailure::Close,
            )
            .await
            .unwrap();
        rec.finish().await.unwrap();
        let ids: Vec<RecordingId> = read_back_session(&dir, 77)
            .unwrap()
            .into_iter()
            .map(|(id, r)| {
                r.unwrap();
                id
            })
            .collect();
        assert_eq!(ids, [RecordingId::new(77, 0), RecordingId::new(77, 1)]);
    }

    /// Output trickling in is written within FLUSH_AFTER, without a later append or finish
    /// (an idle session's last screen is on disk, not in memory).
    #[tokio::test]
    async fn a_quiet_session_is_written_within_the_flush_interval() {
        let tmp = tempfile::tempdir().unwrap();
        let audit = audit(tmp.path());
        let dir = audit.dir().to_path_buf();
        let rec = Recordings::new(Arc::clone(&audit))
            .start(7, HEADER.to_vec(), RecordingFailure::Close)
            .await
            .unwrap();
        rec.append(line(1)).await.unwrap();
        let deadline = std::time::Instant::now() + FLUSH_AFTER * 20;
        loop {
            let back = read_back(&dir, 7).unwrap();
            if back.bytes.len() > HEADER.len() {
                assert!(!back.closed);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never flushed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rec.finish().await.unwrap();
    }

    /// A recording that cannot start refuses the session under "close" and lets it run
    /// unrecorded under "continue"; both are in the trail.
    #[tokio::test]
    async fn a_recording_that_cannot_start_fails_closed_by_default() {
        let tmp = tempfile::tempdir().unwrap();
        let audit = audit(tmp.path());
        let dir = audit.dir().to_path_buf();
        // Modes do not stop root: a file where the area's directory goes does.
        std::fs::write(dir.join("recordings"), b"in the way").unwrap();
        let recordings = Recordings::new(Arc::clone(&audit));
        let err = recordings
            .start(1, HEADER.to_vec(), RecordingFailure::Close)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("create recordings directory"),
            "{err}"
        );
        let rec = recordings
            .start(2, HEADER.to_vec(), RecordingFailure::Continue)
            .await
            .unwrap();
        rec.append(line(1)).await.unwrap();
        assert!(rec.finish().await.is_err());
        audit.flush();
        let failed: Vec<Value> = events(&dir)
            .into_iter()
            .filter(|e| e["event"] == "recording.failed")
            .collect();
        assert_eq!(failed.len(), 2, "{failed:?}");
        assert!(failed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("the session is ended"));
        assert!(failed[1]["reason"]
            .as_str()
            .unwrap()
            .contains("goes on unrecorded"));
    }

    /// A disk that fails mid-session (/dev/full): under "close" the session learns it
    /// without appending again (`failed`), every later append is refused, and the closed
    /// event covers only what was written; under "continue" appends go on succeeding.
    #[tokio::test]
    async fn a_disk_failing_mid_session_ends_the_session_under_close() {
        for on_failure in [RecordingFailure::Close, RecordingFailure::Continue] {
            let tmp = tempfile::tempdir().unwrap();
            let audit = audit(tmp.path());
            let dir = audit.dir().to_path_buf();
            let recordings = Recordings::new(Arc::clone(&audit));
            let full = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap();
            let file = RecordingFile::over_open_file(full, "/dev/full".into());
            let rec = recordings
                .begin(
                    9.into(),
                    Ok((
                        file,
                        ChunkRef {
                            index: 0,
                            offset: 0,
                            length: 0,
                            sha256: [0; 32],
                        },
                    )),
                    on_failure,
                )
                .await
                .unwrap();
            rec.append(line(1)).await.unwrap();
            if on_failure == RecordingFailure::Close {
                let failed = tokio::time::timeout(FLUSH_AFTER * 20, rec.failed())
                    .await
                    .expect("the failure is announced without another append");
                assert!(failed.to_string().contains("No space left"), "{failed}");
                let err = rec.append(line(2)).await.unwrap_err();
                assert!(err.to_string().contains("No space left"), "{err}");
            } else {
                tokio::time::sleep(FLUSH_AFTER * 3).await;
                rec.append(line(2)).await.unwrap();
                assert!(
                    tokio::time::timeout(FLUSH_AFTER, rec.failed())
                        .await
                        .is_err(),
                    "continue never ends the session"
                );
            }
            assert!(rec.finish().await.is_err());
            let evs = events(&dir);
            let failed = evs
                .iter()
                .find(|e| e["event"] == "recording.failed")
                .unwrap();
            assert!(failed["reason"].as_str().unwrap().contains("No space left"));
            let closed = evs
                .iter()
                .find(|e| e["event"] == "recording.closed")
                .unwrap();
            assert_eq!(closed["recording_bytes"], 0, "nothing was acknowledged");
            assert!(closed["reason"].as_str().unwrap().contains("No space left"));
        }
    }

    /// The writer's retention deletes a closed recording once the segment of its closed
    /// event is pruned, and not while that event is unshipped.
    #[tokio::test]
    async fn retention_deletes_a_closed_recording_with_its_segment_once_shipped() {
        let tmp = tempfile::tempdir().unwrap();
        let audit = audit(tmp.path());
        let dir = audit.dir().to_path_buf();
        let rec = Recordings::new(Arc::clone(&audit))
            .start(5, HEADER.to_vec(), RecordingFailure::Close)
            .await
            .unwrap();
        rec.append(line(1)).await.unwrap();
        rec.finish().await.unwrap();
        audit.flush();
        drop(audit);
        // The writer thread lets go of the store's lock as it ends.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut store = loop {
            match portcullis_audit_store::Store::open(&dir, Default::default()) {
                Ok((store, _)) => break store,
                Err(portcullis_audit_store::StoreError::Locked { .. })
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        };
        store.seal_current().unwrap();
        store.append(br#"{"n":1}"#).unwrap();
        let progress = tmp.path().join("shipped");
        let mut pruning = super::super::Pruning {
            retention: portcullis_audit_store::Retention {
                max_age_ms: None,
                max_total_bytes: Some(1),
            },
            shipped_progress: vec![progress.clone()],
            last: None,
        };
        std::fs::write(&progress, "0\n").unwrap();
        pruning.run_if_due(&mut store, &dir);
        assert!(recording_path(&dir, 5).exists(), "not shipped: kept");
        std::fs::write(&progress, format!("{}\n", store.next_seq())).unwrap();
        pruning.last = None;
        pruning.run_if_due(&mut store, &dir);
        assert!(
            !recording_path(&dir, 5).exists(),
            "shipped and pruned: gone"
        );
    }
}
