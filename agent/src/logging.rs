//! Where diagnostics go: the journal's native protocol when systemd connected our stderr to
//! the journal (every `tracing` field a journal field: `journalctl -u portcullis -o json`
//! shows `F_UID`, `F_ERROR`, … beside `MESSAGE`), plain text on stderr otherwise.
//!
//! Diagnostics only: the audit trail is the `audit` module's store, never the log.

use std::path::Path;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// journald's socket for the native protocol (sd_journal_send's, and tracing-journald's).
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSink {
    Journal,
    Stderr,
}

/// The journal only when stderr is still the stream systemd gave us: `JOURNAL_STREAM` is
/// `<device>:<inode>` of that stream (systemd.exec(5)), and a child that inherited the
/// variable but whose stderr was redirected (`portcullis status 2>file` from a unit's
/// shell, the e2e harness's log file) must keep writing where it was pointed. An
/// operator's terminal never matches, so the CLI's warnings stay on screen even on a host
/// that runs journald.
pub fn choose_sink(
    journal_stream: Option<&str>,
    stderr_id: Option<(u64, u64)>,
    journal_socket_exists: bool,
) -> LogSink {
    let connected = match (journal_stream.and_then(parse_journal_stream), stderr_id) {
        (Some(stream), Some(stderr)) => stream == stderr,
        _ => false,
    };
    if connected && journal_socket_exists {
        LogSink::Journal
    } else {
        LogSink::Stderr
    }
}

fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// Device and inode of fd 2, as systemd writes them into `JOURNAL_STREAM`.
fn stderr_id() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Installs the global subscriber; `PORTCULLIS_LOG` is an `EnvFilter` (default `info`).
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journal_stream = std::env::var("JOURNAL_STREAM").ok();
    let sink = choose_sink(
        journal_stream.as_deref(),
        stderr_id(),
        Path::new(JOURNAL_SOCKET).exists(),
    );
    let mut journal_error = None;
    let journal = match sink {
        LogSink::Journal => match tracing_journald::layer() {
            Ok(layer) => Some(layer.with_syslog_identifier("portcullis".into())),
            // journald may be restarting: its stream (our stderr) still reaches it.
            Err(e) => {
                journal_error = Some(e);
                None
            }
        },
        LogSink::Stderr => None,
    };
    let stderr = journal.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colours for a terminal only: log files and a journal stream get plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(journal)
        .with(stderr)
        .init();
    if let Some(e) = journal_error {
        tracing::warn!(error = %e, socket = JOURNAL_SOCKET, "cannot log to the journal's native socket; logging text to stderr");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn the_journal_is_chosen_only_when_stderr_is_the_stream_systemd_connected() {
        let stderr = Some((64769, 123456));
        for (journal_stream, stderr_id, socket, want, why) in [
            (
                Some("64769:123456"),
                stderr,
                true,
                LogSink::Journal,
                "a unit's stderr",
            ),
            (
                Some("64769:123456\n"),
                stderr,
                true,
                LogSink::Journal,
                "trailing whitespace",
            ),
            (
                Some("64769:123456"),
                stderr,
                false,
                LogSink::Stderr,
                "no journald socket",
            ),
            (
                None,
                stderr,
                true,
                LogSink::Stderr,
                "a terminal: no JOURNAL_STREAM",
            ),
            (
                Some("64769:999"),
                stderr,
                true,
                LogSink::Stderr,
                "inherited, stderr redirected",
            ),
            (
                Some("1:123456"),
                stderr,
                true,
                LogSink::Stderr,
                "same inode, other device",
            ),
            (
                Some("64769:123456"),
                None,
                true,
                LogSink::Stderr,
                "stderr closed",
            ),
            (Some(""), stderr, true, LogSink::Stderr, "empty"),
            (Some("64769"), stderr, true, LogSink::Stderr, "no inode"),
            (
                Some("x:123456"),
                stderr,
                true,
                LogSink::Stderr,
                "not a number",
            ),
            (
                Some("64769:123456:7"),
                stderr,
                true,
                LogSink::Stderr,
                "extra part",
            ),
        ] {
            assert_eq!(
                choose_sink(journal_stream, stderr_id, socket),
                want,
                "{why}: JOURNAL_STREAM={journal_stream:?}, stderr={stderr_id:?}, socket={socket}"
            );
        }
    }

    #[test]
    fn stderr_id_is_what_systemd_would_write_for_fd_2() {
        use std::os::unix::fs::MetadataExt;
        let (dev, ino) = stderr_id().unwrap();
        let meta = std::fs::metadata("/proc/self/fd/2").unwrap();
        assert_eq!((dev, ino), (meta.dev(), meta.ino()));
    }
}
