//! What an SSH `exec` request (RFC 4254 section 6.5) asks to run. sshd hands the command line
//! to the user's login shell (`$SHELL -c '<line>'`), so what runs is whatever that shell makes
//! of it. A policy can only be decided on a line whose meaning is plain: a simple command of
//! words, with quoting and escapes as POSIX sh defines them (XCU 2.2 Quoting, 2.6 Word
//! Expansions). Anything else is flagged — allowlist, not denylist: a line is simple only if
//! every byte is understood, so a construct this reader does not know is flagged, not missed.
//!
//! Also recognised, because policies name them: legacy `scp -t`/`scp -f` (OpenSSH's `scp -O`,
//! and every scp before 9.0), `git-upload-pack`/`git-receive-pack`/`git-upload-archive` (git
//! over SSH) and `rsync --server` (rsync's remote half).

/// One exec command line, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecCommand {
    /// The first word when the line starts with a plain word (even when the rest is flagged:
    /// `rm -rf / ; x` starts with `rm`); `None` for an empty line or one that starts with
    /// syntax.
    pub first_word: Option<String>,
    /// The words after quote removal, when the whole line is a simple command.
    pub argv: Option<Vec<String>>,
    /// Why the line cannot be decided before it runs (shell syntax), or `None` when it is a
    /// simple command.
    pub shell_syntax: Option<&'static str>,
    pub kind: ExecKind,
}

/// The commands the SSH policy actions distinguish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecKind {
    /// An empty line: sshd runs the shell with nothing to do.
    Empty,
    /// Any other command (or a line with shell syntax).
    Command,
    /// Legacy scp's remote end: `-t` receives files (an upload), `-f` sends them.
    Scp {
        upload: bool,
        recursive: bool,
        paths: Vec<String>,
    },
    /// git over SSH: `git-upload-pack` (fetch, clone), `git-receive-pack` (push),
    /// `git-upload-archive`.
    Git { service: String, repository: String },
    /// `rsync --server`: `sender` when the target sends (a download).
    Rsync { sender: bool, paths: Vec<String> },
}

/// Classify an exec command line (the bytes of the request; not UTF-8 is flagged).
pub fn classify(line: &[u8]) -> ExecCommand {
    let Ok(line) = std::str::from_utf8(line) else {
        return ExecCommand {
            first_word: None,
            argv: None,
            shell_syntax: Some("the command line is not UTF-8"),
            kind: ExecKind::Command,
        };
    };
    let (words, syntax) = split(line);
    match syntax {
        Some(reason) => ExecCommand {
            first_word: words.into_iter().next(),
            argv: None,
            shell_syntax: Some(reason),
            kind: ExecKind::Command,
        },
        None => {
            let kind = kind(&words);
            ExecCommand {
                first_word: words.first().cloned(),
                argv: Some(words),
                shell_syntax: None,
                kind,
            }
        }
    }
}

/// The words of a simple command, or the words read before the first construct that is not
/// one and why. Word boundaries are blanks (space, tab).
fn split(line: &str) -> (Vec<String>, Option<&'static str>) {
    let mut words = Vec::new();
    let mut word = String::new();
    // Whether a word has started (`''` is an empty word).
    let mut started = false;
    let mut chars = line.chars();
    let syntax = |words: Vec<String>, reason| (words, Some(reason));
    while let Some(c) = chars.next() {
        if started && matches!(c, ';' | '&' | '|' | '<' | '>' | '(' | ')' | '\n' | '\r') {
            // An operator ends the word before it (XCU 2.3 Token Recognition); a word a
            // construct is part of (`rm$(x)`) is not a word anyone can name.
            words.push(std::mem::take(&mut word));
            started = false;
        }
        match c {
            ' ' | '\t' => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            '\'' => {
                started = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return syntax(words, "an unterminated single quote"),
                    }
                }
            }
            '"' => {
                started = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('$') => return syntax(words, "`$` expansion in double quotes"),
                        Some('`') => return syntax(words, "command substitution (backticks)"),
                        Some('!') => return syntax(words, "`!` (history expansion in bash)"),
                        Some('\\') => match chars.next() {
                            // Inside double quotes a backslash escapes only these.
                            Some(e @ ('$' | '`' | '"' | '\\')) => word.push(e),
                            Some('\n') => return syntax(words, "a line continuation"),
                            Some(e) => {
                                word.push('\\');
                                word.push(e);
                            }
                            None => return syntax(words, "an unterminated double quote"),
                        },
                        Some(c) if c.is_control() => return syntax(words, "a control character"),
                        Some(c) => word.push(c),
                        None => return syntax(words, "an unterminated double quote"),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => return syntax(words, "a line continuation"),
                Some(c) if c.is_control() => return syntax(words, "a control character"),
                Some(c) => {
                    started = true;
                    word.push(c);
                }
                None => return syntax(words, "a trailing backslash"),
            },
            ';' => return syntax(words, "`;` separates commands"),
            '&' => return syntax(words, "`&` or `&&` (background or a command list)"),
            '|' => return syntax(words, "`|` or `||` (a pipeline or a command list)"),
            '<' | '>' => return syntax(words, "a redirection"),
            '(' | ')' => return syntax(words, "a subshell or grouping"),
            '{' | '}' => return syntax(words, "braces (grouping or brace expansion)"),
            '$' => return syntax(words, "`$` expansion or command substitution"),
            '`' => return syntax(words, "command substitution (backticks)"),
            '*' | '?' | '[' | ']' => return syntax(words, "a glob pattern"),
            '\n' | '\r' => return syntax(words, "a newline (more than one command)"),
            '#' if !started => return syntax(words, "a comment"),
            '~' if !started => return syntax(words, "tilde expansion"),
            '!' => return syntax(words, "`!` (negation or history expansion)"),
            '=' if words.is_empty() => {
                return syntax(words, "a variable assignment before the command")
            }
            c if c.is_control() => return syntax(words, "a control character"),
            c => {
                started = true;
                word.push(c);
            }
        }
    }
    if started {
        words.push(word);
    }
    (words, None)
}

fn kind(argv: &[String]) -> ExecKind {
    let Some((program, args)) = argv.split_first() else {
        return ExecKind::Empty;
    };
    let name = program.rsplit('/').next().unwrap_or(program);
    match name {
        "scp" => scp(args).unwrap_or(ExecKind::Command),
        "git-upload-pack" | "git-receive-pack" | "git-upload-archive" => match args {
            [repository] => ExecKind::Git {
                service: name.to_owned(),
                repository: repository.clone(),
            },
            _ => ExecKind::Command,
        },
        "rsync" if args.first().map(String::as_str) == Some("--server") => ExecKind::Rsync {
            sender: args.iter().any(|a| a == "--sender"),
            paths: args
                .iter()
                .skip(1)
                .filter(|a| !a.starts_with('-') && a.as_str() != ".")
                .cloned()
                .collect(),
        },
        _ => ExecKind::Command,
    }
}

/// `scp [-v] [-r] [-p] [-d] (-t|-f) [--] path...`, as scp's remote end is started; any other
/// option means it is not the transfer protocol a policy expects.
fn scp(args: &[String]) -> Option<ExecKind> {
    let mut upload = None;
    let mut recursive = false;
    let mut paths = Vec::new();
    let mut options = true;
    for arg in args {
        if options && arg == "--" {
            options = false;
        } else if options && arg.starts_with('-') && arg.len() > 1 {
            for flag in arg.chars().skip(1) {
                match flag {
                    't' if upload.is_none() => upload = Some(true),
                    'f' if upload.is_none() => upload = Some(false),
                    'r' => recursive = true,
                    'v' | 'p' | 'd' => {}
                    _ => return None,
                }
            }
        } else {
            options = false;
            paths.push(arg.clone());
        }
    }
    Some(ExecKind::Scp {
        upload: upload?,
        recursive,
        paths,
    })
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]
mod tests {
    use super::*;

    fn argv(line: &str) -> Option<Vec<String>> {
        classify(line.as_bytes()).argv
    }

    fn words(w: &[&str]) -> Option<Vec<String>> {
        Some(w.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn simple_commands_give_argv_after_quote_removal() {
        let cases: &[(&str, &[&str])] = &[
            ("systemctl restart app", &["systemctl", "restart", "app"]),
            ("  ls\t-l  /tmp ", &["ls", "-l", "/tmp"]),
            ("echo 'a b' \"c d\" e\\ f", &["echo", "a b", "c d", "e f"]),
            (
                "echo '$HOME;|&' \"\\$x \\\\ \\a\"",
                &["echo", "$HOME;|&", "$x \\ \\a"],
            ),
            ("printf ''", &["printf", ""]),
            ("env LANG=C.UTF-8 date", &["env", "LANG=C.UTF-8", "date"]),
            ("cat a#b", &["cat", "a#b"]),
        ];
        for (line, expected) in cases {
            assert_eq!(argv(line), words(expected), "{line}");
            assert_eq!(classify(line.as_bytes()).shell_syntax, None, "{line}");
        }
    }

    #[test]
    fn shell_syntax_is_flagged_with_the_first_word_kept() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("rm -rf / ; echo", Some("rm"), "`;`"),
            ("id;rm -rf /", Some("id"), "`;`"),
            ("rm$(x)", None, "`$`"),
            ("true && rm x", Some("true"), "`&`"),
            ("a || b", Some("a"), "`|`"),
            ("cat x | sh", Some("cat"), "`|`"),
            ("echo $(id)", Some("echo"), "`$`"),
            ("echo `id`", Some("echo"), "backticks"),
            ("echo \"$(id)\"", Some("echo"), "`$`"),
            ("echo hi > /etc/passwd", Some("echo"), "redirection"),
            ("cat < /etc/shadow", Some("cat"), "redirection"),
            ("rm -rf /*", Some("rm"), "glob"),
            ("ls\nrm -rf /", Some("ls"), "newline"),
            ("(rm x)", None, "subshell"),
            ("{ rm x; }", None, "braces"),
            ("FOO=bar rm x", None, "assignment"),
            ("ls ~root", Some("ls"), "tilde"),
            ("echo 'open", Some("echo"), "single quote"),
            ("echo \"open", Some("echo"), "double quote"),
            ("echo x\\", Some("echo"), "backslash"),
            ("! true", None, "`!`"),
            ("# nothing", None, "comment"),
            ("echo \u{7}", Some("echo"), "control"),
        ];
        for (line, first, reason) in cases {
            let c = classify(line.as_bytes());
            assert_eq!(c.argv, None, "{line}");
            assert_eq!(c.first_word.as_deref(), *first, "{line}");
            let why = c.shell_syntax.unwrap_or_default();
            assert!(why.contains(reason), "{line}: {why}");
        }
        assert!(classify(b"ls \xff").shell_syntax.is_some());
    }

    #[test]
    fn an_empty_line_is_empty() {
        let c = classify(b"  ");
        assert_eq!(c.kind, ExecKind::Empty);
        assert_eq!(c.first_word, None);
        assert_eq!(c.shell_syntax, None);
    }

    #[test]
    fn file_transfer_commands_are_recognised() {
        let kind = |line: &str| classify(line.as_bytes()).kind;
        assert_eq!(
            kind("scp -t -- /srv/in"),
            ExecKind::Scp {
                upload: true,
                recursive: false,
                paths: vec!["/srv/in".into()]
            }
        );
        assert_eq!(
            kind("scp -v -r -p -f 'my dir'"),
            ExecKind::Scp {
                upload: false,
                recursive: true,
                paths: vec!["my dir".into()]
            }
        );
        // Not the transfer protocol: any other option, or neither -t nor -f.
        assert_eq!(kind("scp -o ProxyCommand=x -t /x"), ExecKind::Command);
        assert_eq!(kind("scp a b"), ExecKind::Command);
        assert_eq!(
            kind("git-upload-pack '/srv/git/app.git'"),
            ExecKind::Git {
                service: "git-upload-pack".into(),
                repository: "/srv/git/app.git".into()
            }
        );
        assert_eq!(
            kind("git-receive-pack 'app.git'"),
            ExecKind::Git {
                service: "git-receive-pack".into(),
                repository: "app.git".into()
            }
        );
        assert_eq!(
            kind("rsync --server -vlogDtpre.iLsfxCIvu . /srv/tree/"),
            ExecKind::Rsync {
                sender: false,
                paths: vec!["/srv/tree/".into()]
            }
        );
        assert_eq!(
            kind("rsync --server --sender -vlogDtpre.iLsfxCIvu . src/"),
            ExecKind::Rsync {
                sender: true,
                paths: vec!["src/".into()]
            }
        );
        assert_eq!(kind("rsync -a x y"), ExecKind::Command);
    }
}
