//! Load errors an operator can act on: every problem names the file, line and column.

use std::fmt;
use std::path::{Path, PathBuf};

/// A place in a policy or settings file; lines and columns count from 1.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// The line and column of byte `offset` in `text`. An offset past the end (Cedar reports
    /// "unexpected end of input" there) points just after the last character.
    pub(crate) fn at_offset(file: &Path, text: &str, offset: usize) -> Self {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset = offset.saturating_sub(1);
        }
        let before = text.get(..offset).unwrap_or_default();
        let line = before.matches('\n').count().saturating_add(1);
        let line_start = before.rfind('\n').map_or(0, |i| i.saturating_add(1));
        let column = before
            .get(line_start..)
            .unwrap_or_default()
            .chars()
            .count()
            .saturating_add(1);
        Location {
            file: file.to_path_buf(),
            line,
            column,
        }
    }

    /// For problems that concern a whole file.
    pub(crate) fn file(file: &Path) -> Self {
        Location {
            file: file.to_path_buf(),
            line: 1,
            column: 1,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} line {}, column {}",
            self.file.display(),
            self.line,
            self.column
        )
    }
}

/// One thing wrong with a policy set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("{at}: {message}")]
    Syntax { at: Location, message: String },

    #[error("{at}: policy `{policy}`: {message}")]
    Schema {
        at: Location,
        policy: String,
        message: String,
    },

    #[error(
        "{at}: policy has no @id(\"...\") annotation; give every policy a stable id, which decisions and audit events name"
    )]
    MissingId { at: Location },

    #[error(
        "{at}: policy id `{id}` is not usable; use 1 to 128 letters, digits, `.`, `_`, `-`, `:` or `/`, starting with a letter or digit"
    )]
    InvalidId { at: Location, id: String },

    #[error("{at}: policy id `{id}` is already used at {first}; policy ids must be unique")]
    DuplicateId {
        at: Location,
        id: String,
        first: Location,
    },

    #[error(
        "{at}: policy `{id}` is a template (it uses ?principal or ?resource); write static policies"
    )]
    Template { at: Location, id: String },

    #[error(
        "{at}: policy `{id}`: unknown annotation `@{key}`; Portcullis knows @id, @description, @approval, @approvals and @mask"
    )]
    UnknownAnnotation {
        at: Location,
        id: String,
        key: String,
    },

    #[error("{at}: policy `{id}`: {message}")]
    Annotation {
        at: Location,
        id: String,
        message: String,
    },

    #[error("{at}: {message}")]
    Settings { at: Location, message: String },

    #[error(
        "{}: not part of a policy set; expected *.cedar, masking.toml or approvals.toml", .file.display()
    )]
    UnexpectedFile { file: PathBuf },

    #[error("{}: given twice", .file.display())]
    DuplicateFile { file: PathBuf },

    #[error("the embedded Portcullis schema does not load (a bug in this build): {message}")]
    EmbeddedSchema { message: String },
}

impl Problem {
    /// Where the problem is, when it is in a file.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Problem::Syntax { at, .. }
            | Problem::Schema { at, .. }
            | Problem::MissingId { at }
            | Problem::InvalidId { at, .. }
            | Problem::DuplicateId { at, .. }
            | Problem::Template { at, .. }
            | Problem::UnknownAnnotation { at, .. }
            | Problem::Annotation { at, .. }
            | Problem::Settings { at, .. } => Some(at),
            Problem::UnexpectedFile { .. }
            | Problem::DuplicateFile { .. }
            | Problem::EmbeddedSchema { .. } => None,
        }
    }
}

/// A policy set that was not loaded, with everything that is wrong with it (not just the first
/// problem, so one edit-reload cycle fixes them all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    problems: Vec<Problem>,
}

impl LoadError {
    pub(crate) fn new(problems: Vec<Problem>) -> Self {
        LoadError { problems }
    }

    /// Never empty.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [only] => write!(f, "policy set rejected: {only}"),
            problems => {
                write!(f, "policy set rejected, {} problems:", problems.len())?;
                for problem in problems {
                    write!(f, "\n  {problem}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for LoadError {}

/// Something suspicious that does not stop a policy set from loading, such as a policy the
/// validator proves can never apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadWarning {
    pub at: Location,
    pub message: String,
}

impl fmt::Display for LoadWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}
