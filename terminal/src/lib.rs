//! Terminal sessions as Portcullis sees them, pure: bytes and times in, bytes and findings out.
//! No sockets, no tokio, no files; the SSH protocol handler moves the bytes and owns the clock.
//!
//! - [`asciicast`]: the session recording (asciicast v2, which `asciinema play` reads), written
//!   in chunks the caller hashes and stores, and read back and played by `portcullis replay`.
//! - [`mask`]: the content detectors of PostgreSQL masking applied to a terminal output stream,
//!   across chunk boundaries and around escape sequences, failing closed.
//! - [`line`]: the guarded shell: the line a user is typing, rebuilt from keystrokes and echo,
//!   handed over at Enter for a decision. A guardrail, not a sandbox (see its limits there).
//! - [`exec`]: what an SSH `exec` request asks to run: first word, argv of a simple command,
//!   a flag for shell syntax nobody can decide before it runs, and the file-transfer commands
//!   (`scp -t/-f`, git, `rsync --server`) recognised.
//! - [`screen`]: what a terminal shows after some output, rebuilt as text, for replaying a
//!   recording in a page without a script.
//! - [`sftp`]: the SFTP packets of an `sftp` subsystem channel (OpenSSH's version 3), framed
//!   and read without trusting their lengths, and the bytes a handle moved counted and hashed.

pub mod asciicast;
mod escape;
pub mod exec;
pub mod line;
pub mod mask;
pub mod screen;
pub mod sftp;

pub use asciicast::{Header, PlayOptions, Recorder, Recording};
pub use exec::{classify, ExecCommand, ExecKind};
pub use line::{Guarded, LineGuard, TypedLine};
pub use mask::StreamMasker;
