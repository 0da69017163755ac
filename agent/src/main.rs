//! `portcullis`: the host agent (`portcullis agent`) and its command-line client.

mod agent;
mod audit;
mod ca;
mod cli;
mod config;
mod control;
mod ebpf;
mod identity;
mod policy;
mod protocol;
mod proxy;
mod sys;
mod tls;

use std::process::ExitCode;

use clap::Parser;

/// The log's writer: one line per event to stderr, holding the lock that keeps the SQL
/// classifier's parser from redirecting stderr meanwhile (`portcullis_sql::stderr_lock`), so
/// no line is lost into the parser's pipe.
struct LogWriter {
    _lock: std::sync::MutexGuard<'static, ()>,
    stderr: std::io::Stderr,
}

impl LogWriter {
    fn new() -> Self {
        Self {
            _lock: portcullis_sql::stderr_lock(),
            stderr: std::io::stderr(),
        }
    }
}

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stderr.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stderr.flush()
    }
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogWriter::new)
        // Colours for a terminal only: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}
