//! Command-line parsing and the client-side subcommands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

mod approvals;

use crate::config::{Config, DEFAULT_CONFIG_PATH, DEFAULT_CONTROL_SOCKET, DEMO_CONFIG};
use crate::control::{self, Request, Response, StatusReport};

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Identity-aware access proxy for bastion hosts, driven by eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (root): attach the kernel redirect and serve the proxy.
    Agent {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Use the embedded demo configuration instead of a file.
        #[arg(long, conflicts_with = "config")]
        demo: bool,
        /// Remove enforcement (root only): unpin the programs and stop a running agent.
        #[arg(long)]
        detach: bool,
    },
    /// Serve the web console for a fleet (root): every bastion's sessions, audit trail and
    /// health read from the central audit store, and approvals decided through the fleet's
    /// approval log. Proxies nothing; see docs/console.md.
    Console {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Show the agent, its programs, the protected targets and open connections.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// Log in with your identity provider (device flow); your tools then act as you.
    Login {
        /// Print the code and the address, then return; the agent keeps waiting.
        #[arg(long)]
        no_wait: bool,
        /// Log in with a workload token (CI) from this file, or `-` for standard input.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// Show who you are logged in as.
    Whoami {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// End your login: revoke it at the issuer and close your proxied connections.
    Logout {
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// Manage every user's logins (root).
    Logins {
        #[command(subcommand)]
        command: LoginsCommand,
        #[arg(long, global = true, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// Ask for a time-boxed grant of a target that policy protects with an approval.
    Request(approvals::RequestArgs),
    /// Approval requests: list, show, approve or deny (as your own login).
    Approvals {
        #[command(subcommand)]
        command: approvals::ApprovalsCommand,
        #[arg(long, global = true, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// Grants approvals made: list or revoke.
    Grants {
        #[command(subcommand)]
        command: approvals::GrantsCommand,
        #[arg(long, global = true, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// Validate and explain policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Recorded connection sessions (root).
    Sessions {
        #[command(subcommand)]
        command: SessionsCommand,
    },
    /// Play a terminal session recording (asciicast v2) in this terminal: a session id
    /// (read back from the audit store, root, only as its chunk hashes in the chain vouch
    /// for it) or a recording file. Space pauses and resumes, q stops.
    Replay {
        /// A session (connection) id: its first terminal's recording (the others are listed);
        /// `<session id>.<n>`: its recording n (0, 1, 2 … in the order its terminals started,
        /// as `sessions show` lists them); or the path of a recording file.
        recording: String,
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The audit store, instead of the one the config names.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Playback speed: 2 plays twice as fast.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Shorten every pause longer than this many seconds to it.
        #[arg(long, value_name = "SECONDS")]
        idle_limit: Option<f64>,
        /// Start at the Nth marker (from 1; a denied line, say): what came before is drawn at
        /// once.
        #[arg(long, value_name = "N")]
        marker: Option<usize>,
    },
    /// Verify and export the audit trail (root).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Access reviews from the audit trail and the current policies (root).
    Review {
        #[command(subcommand)]
        command: ReviewCommand,
    },
    /// Inspect configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The agent's local certificate authority (root).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// The agent's SSH certificate authorities (root: creates them on first use).
    Ssh {
        #[command(subcommand)]
        command: SshCommand,
    },
    /// Write the man pages and shell completions of this command line into a directory
    /// (the packages build them from the same clap definitions the binary parses with).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create the local CA and the SSH host and user CAs in the state directory unless they
    /// exist, and print the path of the CA certificate (the packages add it to the system
    /// trust store).
    Init {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum SshCommand {
    /// Print the `@cert-authority` line for /etc/ssh/ssh_known_hosts: with it, OpenSSH
    /// trusts the host certificates the agent presents for SSH targets.
    KnownHosts {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Print the user CA's public key, for the targets' sshd `TrustedUserCAKeys` file.
    UserCa {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the whole hash chain; says exactly where it breaks (exit 1 if it does).
    Verify {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The store directory (default: from the config).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Ed25519 public key (64 hex characters) that signed the seals.
        #[arg(long)]
        public_key: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print the public key of `audit.signing_key_file`, as `audit verify --public-key`
    /// takes it (root: the seed file is 0600).
    PublicKey {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The seed file (default: the config's `audit.signing_key_file`).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Find events: by time, user, target, type, decision or text.
    Search(Box<SearchArgs>),
    /// Create or upgrade the central store's schema, as its admin (once per fleet).
    CentralMigrate {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// An admin role's URL (postgres://admin@db/portcullis); not the agent's insert-only role.
        #[arg(long)]
        admin_url: String,
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Verify one bastion's chain from the central copy (exit 1 if it breaks).
    CentralVerify {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// A role that may read every column (the agent's role may not).
        #[arg(long)]
        url: String,
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// The bastion to verify (default: this host's `host_name`).
        #[arg(long)]
        host: Option<String>,
    },
    /// Print the events as NDJSON, oldest first.
    Export {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Start at this sequence number.
        #[arg(long, default_value_t = 1)]
        from_seq: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ReviewCommand {
    /// Per identity: targets reached, statements and SSH actions, denials, approvals,
    /// break-glass, masked reads, recordings; the auditor's questions and least-privilege
    /// findings; every figure with its event seqs. Sealed to the verified chain (exit 1 and
    /// marked UNVERIFIED when the chain does not verify).
    Report(Box<ReviewArgs>),
}

#[derive(Debug, clap::Args)]
struct ReviewArgs {
    /// First day of the period (YYYY-MM-DD, UTC).
    #[arg(long)]
    from: String,
    /// Last day of the period, included (YYYY-MM-DD, UTC).
    #[arg(long)]
    to: String,
    /// Only this target.
    #[arg(long)]
    target: Option<String>,
    /// md, csv, json or html.
    #[arg(long, default_value = "md")]
    format: String,
    /// A service or workload identity not seen for this many days before --to is stale.
    #[arg(long, default_value_t = 30)]
    stale_days: u64,
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// The audit store (default: from the config).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The policies (default: from the config).
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    /// Review the whole fleet from the central store of `[audit.central]` (its role needs
    /// portcullis_reader): every bastion's chain verified, evidence named `bastion#seq`.
    #[arg(long, conflicts_with = "dir")]
    central: bool,
}

#[derive(Debug, clap::Args)]
struct SearchArgs {
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[arg(long)]
    dir: Option<PathBuf>,
    /// From this time: 30m, 2h, 7d ago, Unix seconds, or 2026-11-23T10:00 (UTC).
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    until: Option<String>,
    /// Unix account, uid, OIDC subject or email.
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    target: Option<String>,
    /// Event type (`connection.refused`) or family (`connection`, `login`, `policy`).
    #[arg(long = "type")]
    kind: Option<String>,
    /// allow, deny, approval
    #[arg(long)]
    decision: Option<String>,
    /// Any text in the event.
    #[arg(long)]
    text: Option<String>,
    /// NDJSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum SessionsCommand {
    /// Recorded connections, newest last: one page, read from a bounded window of the store
    /// (the console's sessions page), so it answers as fast with a million events as with ten.
    List {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        target: Option<String>,
        /// postgres, tcp or ssh.
        #[arg(long)]
        protocol: Option<String>,
        /// Sessions with an event of this decision: allow, deny, approval.
        #[arg(long)]
        decision: Option<String>,
        /// Opened at or after: `2026-12-05`, `2026-12-05T10:00:00Z` or `2h` (ago).
        #[arg(long)]
        since: Option<String>,
        /// Opened at or before (same forms).
        #[arg(long)]
        until: Option<String>,
        /// Sessions opened before this record (the `--before` the previous page printed).
        #[arg(long)]
        before: Option<u64>,
        /// At most this many sessions.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// One connection's timeline: every event about it, in order.
    Show {
        id: u64,
        /// Read the trail from this record (1: the whole trail); by default from where the
        /// connection's id says its events begin.
        #[arg(long)]
        from: Option<u64>,
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy directory offline (exit code 0 when valid, 1 otherwise).
    Check {
        #[arg(default_value = "/etc/portcullis/policies")]
        dir: PathBuf,
    },
    /// Show the decision for a request, the policies that matched and why.
    Explain(Box<ExplainArgs>),
}

#[derive(Debug, clap::Args)]
struct ExplainArgs {
    /// The agent's config: the target's protocol and labels, and the policy directory.
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Use this policy directory instead of the config's.
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    /// OIDC subject of a user (or `unix:<uid>` in lab mode).
    #[arg(long, conflicts_with = "service")]
    user: Option<String>,
    /// Name of a service identity.
    #[arg(long)]
    service: Option<String>,
    #[arg(long)]
    email: Option<String>,
    /// A group of the principal; repeat for several.
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Target name from the config.
    #[arg(long)]
    target: String,
    /// connect, query, ssh_shell, ssh_exec, ssh_sftp, ssh_forward_local, ssh_forward_remote,
    /// ssh_agent_forward
    #[arg(long, default_value = "connect")]
    action: String,
    #[arg(long, default_value = "psql")]
    comm: String,
    #[arg(long, default_value_t = 1000)]
    uid: u32,
    /// Unix time of the request (default: now).
    #[arg(long)]
    time: Option<i64>,
    #[arg(long)]
    statement_class: Option<String>,
    /// The statement's command, upper case (`SELECT`, `DROP DATABASE`).
    #[arg(long)]
    command: Option<String>,
    /// A SQL string: classified as the proxy does (class, command, tables, functions), one
    /// explanation per statement; implies `--action query`.
    #[arg(long, conflicts_with_all = ["statement_class", "command", "tables"])]
    sql: Option<String>,
    #[arg(long = "table")]
    tables: Vec<String>,
    #[arg(long)]
    db_user: Option<String>,
    #[arg(long)]
    db_name: Option<String>,
    #[arg(long)]
    command_line: Option<String>,
}

#[derive(Debug, Subcommand)]
enum LoginsCommand {
    /// List all logins.
    List {
        #[arg(long)]
        json: bool,
    },
    /// End the logins of a uid or an OIDC subject.
    Revoke { selector: String },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a config file (exit code 0 when valid).
    Check {
        #[arg(default_value = DEFAULT_CONFIG_PATH)]
        path: PathBuf,
    },
    /// Print the effective configuration, defaults filled in.
    Show {
        #[arg(default_value = DEFAULT_CONFIG_PATH)]
        path: PathBuf,
    },
    /// Print the reference of every key (Markdown): docs/configuration.md is this output.
    #[command(hide = true)]
    Reference,
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Agent {
            config,
            demo,
            detach,
        } => {
            let (cfg, targets, source) = if demo {
                let (c, t) = Config::parse(Path::new("<embedded demo config>"), DEMO_CONFIG)?;
                (c, t, PathBuf::from("<embedded demo config>"))
            } else {
                let (c, t) = Config::load(&config)?;
                (c, t, config)
            };
            if detach {
                detach_enforcement(&cfg)?;
                return Ok(ExitCode::SUCCESS);
            }
            crate::agent::run(cfg, targets, &source)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Console { config } => {
            let (cfg, targets) = Config::load(&config)?;
            crate::console::fleet::run(cfg, targets)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json, socket } => {
            let report =
                match control::request(&socket, &Request::Status).map_err(anyhow::Error::msg)? {
                    Response::Status(r) => r,
                    Response::Error { message } => bail!("the agent refused: {message}"),
                    other => bail!("unexpected answer from the agent: {other:?}"),
                };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render_status(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Login {
            no_wait,
            token_file,
            socket,
        } => login(&socket, no_wait, token_file.as_deref()),
        Command::Whoami { json, socket } => match ask(&socket, &Request::Whoami)? {
            Response::Whoami { session: Some(s) } if json => {
                println!("{}", serde_json::to_string_pretty(&s)?);
                Ok(ExitCode::SUCCESS)
            }
            Response::Whoami { session: Some(s) } => {
                println!("{}", describe(&s));
                Ok(ExitCode::SUCCESS)
            }
            Response::Whoami { session: None } => {
                eprintln!("not logged in: run `portcullis login`");
                Ok(ExitCode::FAILURE)
            }
            other => unexpected(other),
        },
        Command::Logout { socket } => match ask(&socket, &Request::Logout)? {
            Response::LoggedOut {
                revoked,
                closed_connections,
            } => {
                println!(
                    "logged out{}; {closed_connections} open connection(s) closed",
                    if revoked {
                        ", refresh token revoked at the issuer"
                    } else {
                        ""
                    }
                );
                Ok(ExitCode::SUCCESS)
            }
            other => unexpected(other),
        },
        Command::Logins { command, socket } => match command {
            LoginsCommand::List { json } => match ask(&socket, &Request::LoginsList)? {
                Response::Logins { sessions } if json => {
                    println!("{}", serde_json::to_string_pretty(&sessions)?);
                    Ok(ExitCode::SUCCESS)
                }
                Response::Logins { sessions } => {
                    for s in &sessions {
                        println!("{}", describe(s));
                    }
                    if sessions.is_empty() {
                        println!("no logins");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                other => unexpected(other),
            },
            LoginsCommand::Revoke { selector } => {
                match ask(&socket, &Request::LoginsRevoke { selector })? {
                    Response::Revoked {
                        uids,
                        closed_connections,
                    } => {
                        println!("revoked the logins of uid(s) {uids:?}; {closed_connections} connection(s) closed");
                        Ok(ExitCode::SUCCESS)
                    }
                    other => unexpected(other),
                }
            }
        },
        Command::Request(args) => approvals::request(args),
        Command::Approvals { command, socket } => approvals::approvals(&socket, command),
        Command::Grants { command, socket } => approvals::grants(&socket, command),
        Command::Policy { command } => policy_command(command),
        Command::Audit { command } => audit_command(command),
        Command::Review {
            command: ReviewCommand::Report(args),
        } => review_report(*args),
        Command::Sessions { command } => sessions_command(command),
        Command::Replay {
            recording,
            config,
            dir,
            speed,
            idle_limit,
            marker,
        } => {
            let text = recording_text(&recording, &config, dir)?;
            replay(&text, &recording, speed, idle_limit, marker)
        }
        Command::Config { command } => match command {
            ConfigCommand::Check { path } => {
                let (_, targets) = Config::load(&path)?;
                println!("{}: valid, {} target(s)", path.display(), targets.len());
                Ok(ExitCode::SUCCESS)
            }
            ConfigCommand::Show { path } => {
                let (cfg, _) = Config::load(&path)?;
                print!(
                    "{}",
                    toml::to_string_pretty(&cfg).context("rendering the config")?
                );
                Ok(ExitCode::SUCCESS)
            }
            ConfigCommand::Reference => {
                print!("{}", crate::config_reference::render());
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Ca {
            command: CaCommand::Init { config },
        } => {
            let (cfg, _) = Config::load(&config)?;
            // Where the PostgreSQL handler opens it (protocol::postgres).
            let dir = cfg.state_dir.join("ca");
            crate::ca::LocalCa::open_or_create(&dir)?;
            // And the SSH host and user CAs, where protocol::ssh opens them: made at install
            // like the TLS CA, so the known_hosts line and the targets' TrustedUserCAKeys can
            // be set up before the first connection; an existing one is never replaced.
            crate::ssh_ca::SshCa::open_or_create(&cfg.state_dir.join("ssh"))?;
            println!("{}", dir.join("ca.pem").display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Ssh { command } => {
            let (SshCommand::KnownHosts { config } | SshCommand::UserCa { config }) = &command;
            let (cfg, _) = Config::load(config)?;
            // Where the SSH handler opens them (protocol::ssh).
            let ca = crate::ssh_ca::SshCa::open_or_create(&cfg.state_dir.join("ssh"))?;
            match command {
                SshCommand::KnownHosts { .. } => println!("{}", ca.known_hosts_line()?),
                SshCommand::UserCa { .. } => println!("{}", ca.user_ca_public()?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::GenerateDocs { dir } => {
            generate_docs(&dir)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `<dir>/man/*.1` (one page for the command and one for each subcommand, as
/// `portcullis-audit-verify.1`) and `<dir>/completions/` for bash, zsh and fish.
fn generate_docs(dir: &Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut cmd = Cli::command();
    cmd.build();
    write_man_pages(&cmd, "portcullis", &man)?;
    for (shell, file) in [
        (clap_complete::Shell::Bash, "portcullis"),
        (clap_complete::Shell::Zsh, "_portcullis"),
        (clap_complete::Shell::Fish, "portcullis.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, "portcullis", &mut out);
        let path = completions.join(file);
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn write_man_pages(cmd: &clap::Command, name: &str, dir: &Path) -> anyhow::Result<()> {
    // Each page is titled by its full command (`portcullis-audit-verify`), as git's are, so
    // `man portcullis-audit-verify` finds it and the SEE ALSO names resolve.
    let page = cmd.clone().name(name.to_string());
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .with_context(|| format!("rendering the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        write_man_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}

fn audit_dir(config: &Path, dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match dir {
        Some(d) => Ok(d),
        None => Ok(Config::load(config)?.0.audit_dir()),
    }
}

fn central_config(config: &Path) -> anyhow::Result<crate::config::CentralConfig> {
    Config::load(config)?
        .0
        .audit
        .central
        .with_context(|| format!("{} has no [audit.central] section", config.display()))
}

fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    Ok(rt.block_on(f))
}

fn audit_command(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::CentralMigrate {
            config,
            admin_url,
            password_file,
        } => {
            let central = central_config(&config)?;
            let version = block_on(crate::audit::central::migrate(
                &central,
                &admin_url,
                password_file.as_deref(),
            ))??;
            println!("central store schema at version {version}");
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::CentralVerify {
            config,
            url,
            password_file,
            host,
        } => {
            let central = central_config(&config)?;
            let host = host.unwrap_or_else(|| {
                central
                    .host_name
                    .clone()
                    .unwrap_or_else(|| crate::audit::hostname().to_string())
            });
            let report = block_on(crate::audit::central::verify_central(
                &central,
                &url,
                password_file.as_deref(),
                &host,
            ))??;
            if report.ok() {
                println!(
                    "{host}: central copy intact, {} records (seq {}..{})",
                    report.records,
                    report.first_seq.unwrap_or(0),
                    report.last_seq.unwrap_or(0)
                );
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(b) = &report.first_break {
                println!(
                    "{host}: the central copy is BROKEN at seq {}: {}",
                    b.seq, b.reason
                );
            }
            Ok(ExitCode::FAILURE)
        }
        AuditCommand::PublicKey { config, key_file } => {
            let path = match key_file {
                Some(path) => path,
                None => Config::load(&config)?
                    .0
                    .audit
                    .signing_key_file
                    .with_context(|| {
                        format!(
                            "{} sets no audit.signing_key_file: the seals are not signed",
                            config.display()
                        )
                    })?,
            };
            println!("{}", crate::audit::public_key_hex(&path)?);
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify {
            config,
            dir,
            public_key,
            json,
        } => {
            let dir = audit_dir(&config, dir)?;
            let key = match public_key {
                Some(hex_key) => {
                    let bytes: [u8; 32] = hex::decode(hex_key.trim())
                        .context("--public-key is not hex")?
                        .try_into()
                        .map_err(|_| {
                            anyhow::anyhow!("--public-key must be 32 bytes (64 hex characters)")
                        })?;
                    Some(
                        portcullis_audit_store::VerifyingKey::from_bytes(&bytes)
                            .context("--public-key")?,
                    )
                }
                None => None,
            };
            let report = portcullis_audit_store::verify(&dir, key.as_ref());
            // The recordings are checked against the chunk events only once the chain holding
            // those events is intact: a broken chain vouches for nothing.
            let recordings = if report.ok {
                Some(crate::audit::recording::verify_all(&dir)?)
            } else {
                None
            };
            let recordings_ok = recordings.as_ref().is_none_or(|r| r.ok());
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": report.ok,
                        "segments": report.segments,
                        "records": report.records,
                        "first_seq": report.first_seq,
                        "last_seq": report.last_seq,
                        "signatures_checked": report.signatures_checked,
                        "break": report.first_break.as_ref().map(ToString::to_string),
                        "recordings": recordings.as_ref().map(|r| serde_json::json!({
                            "ok": r.ok(),
                            "checked": r.checked,
                            "closed": r.closed,
                            "breaks": r.breaks.iter().map(ToString::to_string).collect::<Vec<_>>(),
                            "notes": r.notes,
                        })),
                    })
                );
            } else if let Some(b) = &report.first_break {
                println!("{}: the chain is BROKEN\n{b}", dir.display());
            } else {
                println!(
                    "{}: intact, {} records in {} segments (seq {}..{}){}",
                    dir.display(),
                    report.records,
                    report.segments,
                    report.first_seq.unwrap_or(0),
                    report.last_seq.unwrap_or(0),
                    if report.signatures_checked {
                        ", seals signed"
                    } else {
                        ""
                    }
                );
            }
            if let Some(r) = recordings.as_ref().filter(|_| !json) {
                if r.checked > 0 || !r.notes.is_empty() {
                    println!(
                        "recordings: {} checked against their chunk events ({} closed){}",
                        r.checked,
                        r.closed,
                        if r.ok() { ", intact" } else { ", BROKEN" }
                    );
                }
                for b in &r.breaks {
                    println!("{b}");
                }
                for note in &r.notes {
                    println!("note: {note}");
                }
            }
            Ok(if report.ok && recordings_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        AuditCommand::Search(args) => {
            let SearchArgs {
                config,
                dir,
                since,
                until,
                user,
                target,
                kind,
                decision,
                text,
                json,
            } = *args;
            let now = crate::audit::now_ms();
            let time = |t: Option<String>| {
                t.map(|t| crate::audit::query::parse_time(&t, now))
                    .transpose()
            };
            let filter = crate::audit::query::Filter {
                since_ms: time(since).map_err(anyhow::Error::msg)?,
                until_ms: time(until).map_err(anyhow::Error::msg)?,
                user,
                target,
                kind,
                decision,
                text,
                connection_id: None,
            };
            let dir = audit_dir(&config, dir)?;
            let mut found = 0usize;
            for_each_event(&dir, |event, raw| {
                if filter.matches(event, raw) {
                    found += 1;
                    if json {
                        println!("{raw}");
                    } else {
                        println!("{}", crate::audit::query::summary(event));
                    }
                }
            })?;
            if !json {
                eprintln!("{found} event(s)");
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export {
            config,
            dir,
            from_seq,
        } => {
            use std::io::Write;
            let dir = audit_dir(&config, dir)?;
            let reader = portcullis_audit_store::Reader::from_seq(&dir, from_seq)
                .with_context(|| format!("reading {}", dir.display()))?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            for record in reader {
                let record = record.with_context(|| format!("reading {}", dir.display()))?;
                writeln!(out, "{}", record.event)?;
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `portcullis review report`: the trail is root's (0600 segments, the signing key), so
/// anyone else is told so before anything is read.
fn review_report(args: ReviewArgs) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("review report reads the audit store and its signing key: run it as root");
    }
    let format: crate::review::Format = args.format.parse().map_err(anyhow::Error::msg)?;
    let period = crate::review::period(&args.from, &args.to).map_err(anyhow::Error::msg)?;
    // The config gives the targets, the policies and the key; with --dir and --policy-dir
    // alone (a copied trail) the review runs without it.
    let loaded = match Config::load(&args.config) {
        Ok(c) => Some(c),
        Err(e) if args.dir.is_some() => {
            eprintln!(
                "note: {}: {e:#}; no targets or signing key",
                args.config.display()
            );
            None
        }
        Err(e) => return Err(e.into()),
    };
    let dir = match (&args.dir, &loaded) {
        (Some(d), _) => d.clone(),
        (None, Some((cfg, _))) => cfg.audit_dir(),
        (None, None) => bail!("name the audit store with --dir"),
    };
    let policy_dir = args
        .policy_dir
        .clone()
        .or_else(|| loaded.as_ref().map(|(cfg, _)| cfg.policy.dir.clone()));
    let policies = match &policy_dir {
        Some(d) => Some(
            crate::policy::load_dir(d)
                .map_err(|e| anyhow::anyhow!("{}: invalid\n{e}", d.display()))?,
        ),
        None => None,
    };
    let targets: Vec<portcullis_policy::Target> = loaded
        .as_ref()
        .map(|(_, t)| t.iter().map(crate::policy::target).collect())
        .unwrap_or_default();
    let key = match loaded
        .as_ref()
        .and_then(|(cfg, _)| cfg.audit.signing_key_file.as_ref())
    {
        Some(path) => Some(crate::audit::read_signing_key(path)?),
        None => None,
    };
    let view = crate::review::PolicyView {
        policies: policies.as_ref(),
        targets: &targets,
    };
    let options = crate::review::Options {
        period,
        target: args.target.as_deref(),
        stale_days: args.stale_days,
        format,
    };
    let rendered = if args.central {
        let Some(central) = loaded
            .as_ref()
            .and_then(|(cfg, _)| cfg.audit.central.clone())
        else {
            bail!("--central reads the store of [audit.central]: configure it");
        };
        let mark = loaded
            .as_ref()
            .and_then(|(cfg, _)| crate::audit::central::own_mark(cfg));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let fleet = runtime.block_on(async {
            let trail = crate::audit::central_read::CentralTrail::connect(&central, mark).await?;
            anyhow::Ok(crate::review::read_fleet(&trail).await?)
        })?;
        crate::review::run_fleet(fleet, &view, &options, key.as_ref())?
    } else {
        crate::review::run(&dir, &view, &options, key.as_ref())?
    };
    print!("{}", rendered.text);
    if rendered.verified {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("the audit chain does not verify: the report is UNVERIFIED and not signed");
        Ok(ExitCode::FAILURE)
    }
}

/// Calls `f` with every event of the store, oldest first.
fn for_each_event(dir: &Path, mut f: impl FnMut(&serde_json::Value, &str)) -> anyhow::Result<()> {
    let reader = portcullis_audit_store::Reader::from_seq(dir, 1)
        .with_context(|| format!("reading {}", dir.display()))?;
    for record in reader {
        let record = record.with_context(|| format!("reading {}", dir.display()))?;
        match serde_json::from_str::<serde_json::Value>(&record.event) {
            Ok(event) => f(&event, &record.event),
            Err(e) => eprintln!("record {} is not an event: {e}", record.seq),
        }
    }
    Ok(())
}

/// `portcullis replay`: the recording is read and checked whole before anything is drawn, so
/// a damaged file is an error naming its line, not a half-played session.
/// A recording's text: a file named by path, or else the session of that id read back from
/// the audit store (verified against its chunk events; a recording that does not match
/// them is refused, never played).
fn recording_text(name: &str, config: &Path, dir: Option<PathBuf>) -> anyhow::Result<String> {
    let path = Path::new(name);
    match parse_recording_name(name) {
        Some((connection, number)) if !path.exists() => {
            let dir = audit_dir(config, dir)?;
            let session = match number {
                Some(number) => crate::audit::recording::read_back(
                    &dir,
                    portcullis_audit_store::recording::RecordingId::new(connection, number),
                )?,
                None => first_recording(&dir, connection)?,
            };
            let id = session.id;
            if !session.closed {
                eprintln!(
                    "portcullis: recording {id} is still running (or the agent stopped before it ended): playing what was recorded so far"
                );
            }
            String::from_utf8(session.bytes).with_context(|| format!("recording {id} is not UTF-8"))
        }
        _ => std::fs::read_to_string(path)
            .with_context(|| format!("reading the recording {}", path.display())),
    }
}

/// `42` (a session: `None`) or `42.1` (its recording 1), as `replay` takes them.
fn parse_recording_name(name: &str) -> Option<(u64, Option<u64>)> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match name.split_once('.') {
        None if digits(name) => Some((name.parse().ok()?, None)),
        Some((connection, number)) if digits(connection) && digits(number) => {
            Some((connection.parse().ok()?, Some(number.parse().ok()?)))
        }
        _ => None,
    }
}

/// `replay <session id>`: the session's first recording, once every one of them was listed
/// (on stderr, before the playback) when it has several, with how to play the others.
fn first_recording(
    dir: &Path,
    connection: u64,
) -> anyhow::Result<crate::audit::recording::RecordedSession> {
    use crate::audit::recording::ReadBackError;
    use portcullis_audit_store::recording::RecordingId;
    let all = crate::audit::recording::read_back_session(dir, connection)?;
    if all.len() > 1 {
        eprintln!(
            "portcullis: session {connection} recorded {} terminals; playing {connection}.0 (play another with `portcullis replay {connection}.<n>`):",
            all.len()
        );
        for (id, read) in &all {
            eprintln!("  {}", recording_summary(*id, read));
        }
    }
    match all.into_iter().next() {
        Some((_, Ok(session))) => Ok(session),
        Some((_, Err(broken))) => Err(ReadBackError::Broken(broken).into()),
        None => Err(ReadBackError::NoRecording(RecordingId::from(connection)).into()),
    }
}

fn replay(
    text: &str,
    name: &str,
    speed: f64,
    idle_limit: Option<f64>,
    marker: Option<usize>,
) -> anyhow::Result<ExitCode> {
    use portcullis_terminal::asciicast::{play, play_with, PlayOptions, Recording};
    let recording = Recording::parse(text).with_context(|| name.to_string())?;
    let idle_limit = match idle_limit {
        None => None,
        Some(seconds) => Some(
            std::time::Duration::try_from_secs_f64(seconds)
                .ok()
                .filter(|limit| !limit.is_zero())
                .context("--idle-limit needs a positive number of seconds")?,
        ),
    };
    let options = PlayOptions {
        speed,
        idle_limit,
        marker,
    };
    match Keys::open() {
        // Space pauses and resumes, q stops.
        Some(mut keys) => play_with(&recording, &options, &mut std::io::stdout().lock(), |d| {
            keys.wait(d)
        })?,
        None => play(&recording, &options, &mut std::io::stdout().lock())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The viewer's keys during `replay`: the terminal in non-canonical mode without echo, so
/// a key arrives when pressed; restored when dropped.
struct Keys {
    saved: nix::sys::termios::Termios,
    paused: bool,
    /// The terminal closed its input: no key can come, so playback only waits.
    closed: bool,
}

impl Keys {
    /// `None` when stdin is not a terminal (a pipe, a test): playback just waits.
    fn open() -> Option<Keys> {
        use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.local_flags
            .remove(LocalFlags::ICANON | LocalFlags::ECHO);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(Keys {
            saved,
            paused: false,
            closed: false,
        })
    }

    /// Waits `d` of playback time; a pause stops the clock until space is pressed again.
    /// False when the viewer pressed q.
    fn wait(&mut self, d: std::time::Duration) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        if self.closed {
            std::thread::sleep(d);
            return true;
        }
        let stdin = std::io::stdin();
        let mut left = d;
        loop {
            let started = std::time::Instant::now();
            let timeout = if self.paused {
                PollTimeout::NONE
            } else {
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
            };
            let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
            let ready = poll(&mut fds, timeout).unwrap_or(0);
            if !self.paused {
                left = left.saturating_sub(started.elapsed());
            }
            if ready > 0 {
                let mut key = [0u8; 1];
                match nix::unistd::read(stdin.as_fd(), &mut key) {
                    Ok(1) if key == [b' '] => self.paused = !self.paused,
                    Ok(1) if key == [b'q'] => return false,
                    // End of input: nothing can resume a pause, so play on.
                    Ok(0) | Err(_) => {
                        self.paused = false;
                        self.closed = true;
                        std::thread::sleep(left);
                        return true;
                    }
                    _ => {}
                }
            } else if !self.paused {
                return true;
            }
            if !self.paused && left.is_zero() {
                return true;
            }
        }
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

fn sessions_command(command: SessionsCommand) -> anyhow::Result<ExitCode> {
    use crate::audit::query::{details, format_time, session_end, summary};
    match command {
        SessionsCommand::List {
            config,
            dir,
            user,
            target,
            protocol,
            decision,
            since,
            until,
            before,
            limit,
            json,
        } => {
            let dir = audit_dir(&config, dir)?;
            let now = crate::audit::now_ms();
            let time = |s: Option<String>| {
                s.map(|s| crate::audit::query::parse_time(&s, now))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!(e))
            };
            let filter = crate::audit::query::SessionFilter {
                user,
                target,
                protocol,
                since_ms: time(since)?,
                until_ms: time(until)?,
                decision,
            };
            let read = |e| anyhow::anyhow!("reading {}: {e}", dir.display());
            let last = crate::audit::query::last_seq(&dir).map_err(read)?;
            let page =
                crate::audit::query::sessions_page(&dir, last, before, &filter, limit.max(1))
                    .map_err(read)?;
            // The page is newest first; a list reads oldest first, newest last.
            for row in page.rows.iter().rev() {
                let o = &row.opened;
                let id = o["connection_id"].as_u64().unwrap_or(0);
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"seq": row.seq, "opened": o, "closed": row.closed, "end": row.end})
                    );
                    continue;
                }
                let field = |path: &str| o.pointer(path).unwrap_or(&serde_json::Value::Null);
                let who = field("/identity/email")
                    .as_str()
                    .or(field("/identity/subject").as_str())
                    .unwrap_or("-");
                println!(
                    "{id}  {}  {} ({}) pid {} {} -> {} [{}]: {}",
                    format_time(o["time_ms"].as_u64().unwrap_or(0)),
                    field("/identity/user").as_str().unwrap_or("-"),
                    who,
                    field("/origin/pid"),
                    field("/origin/comm").as_str().unwrap_or("-"),
                    field("/origin/destination").as_str().unwrap_or("-"),
                    o["target"].as_str().unwrap_or("-"),
                    row.end,
                );
            }
            if let Some(older) = page.older {
                eprintln!(
                    "older sessions: the same command with --before {older} (records {}..={} read)",
                    page.scanned.0, page.scanned.1
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionsCommand::Show {
            id,
            from,
            config,
            dir,
            json,
        } => {
            let dir = audit_dir(&config, dir)?;
            // Not from record 1: the id says where the session's events begin, so a session
            // shows as fast among a million events as among a thousand.
            let start = match from {
                Some(f) => f,
                None => crate::audit::query::session_start_seq(&dir, id)?,
            };
            let (records, starts) = crate::audit::query::session_records(&dir, id, start)?;
            if records.is_empty() {
                bail!(
                    "no session {id} in {} from record {start} (where connection ids like it begin; --from 1 reads the whole trail)",
                    dir.display()
                );
            }
            let mut commands = Vec::new();
            let mut opened_ms = None;
            let mut closed = None;
            let mut files = Vec::new();
            for (event, raw) in &records {
                match event["event"].as_str() {
                    Some("connection.opened") => opened_ms = event["time_ms"].as_u64(),
                    Some("connection.closed") => closed = Some(event.clone()),
                    Some("ssh.sftp") => files.push(event.clone()),
                    _ => {}
                }
                if json {
                    println!("{raw}");
                } else {
                    println!("{}", summary(event));
                    for line in details(event) {
                        println!("{line}");
                    }
                    commands.extend(ssh_command(event));
                }
            }
            if !json {
                if let Some(opened) = opened_ms {
                    println!("end: {}", session_end(opened, closed.as_ref(), &starts));
                }
                if !commands.is_empty() {
                    println!("commands:");
                    for line in &commands {
                        println!("  {line}");
                    }
                }
                let files = crate::audit::query::file_operations(&files);
                if !files.is_empty() {
                    println!("file operations:");
                    for op in &files {
                        println!("  {}", op.line());
                    }
                }
                for line in recording_lines(&dir, id) {
                    println!("{line}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// An SSH session's command, as `sessions show` lists them: an exec request or a line typed
/// at a guarded shell, allowed or refused, with the command line as it was decided.
fn ssh_command(event: &serde_json::Value) -> Option<String> {
    let kind = event.get("event")?.as_str()?;
    let what = match kind {
        "ssh.exec" => "exec",
        "ssh.shell_line" => "line",
        "ssh.channel_denied" if event.get("channel")?.as_str()? == "exec" => "exec",
        _ => return None,
    };
    let time = crate::audit::query::format_time(
        event
            .get("time_ms")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
    );
    let decision = event
        .get("decision")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("-");
    let line = event
        .get("command_line")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("(not written down: typed without echo)");
    Some(format!("{time}  {what:<4} {decision:<6} {line}"))
}

/// What `sessions show` says of a session's recordings (one per terminal, in the order they
/// started): each one's id for `portcullis replay`, where it is and whether the trail vouches
/// for it (`replay` plays only what it does).
fn recording_lines(dir: &Path, connection: u64) -> Vec<String> {
    match crate::audit::recording::read_back_session(dir, connection) {
        Ok(all) if all.is_empty() => vec!["recording: none".to_string()],
        Ok(all) => all
            .iter()
            .map(|(id, read)| format!("recording {}", recording_summary(*id, read)))
            .collect(),
        Err(e) => vec![format!("recording: UNUSABLE: {e}")],
    }
}

/// `<id>: <file> (<bytes>, matches the audit trail)`, or why it is unusable.
fn recording_summary(
    id: portcullis_audit_store::recording::RecordingId,
    read: &Result<
        crate::audit::recording::RecordedSession,
        portcullis_audit_store::recording::RecordingBreak,
    >,
) -> String {
    match read {
        Ok(r) => format!(
            "{id}: {} ({} bytes{}, matches the audit trail)",
            r.path.display(),
            r.bytes.len(),
            if r.closed { "" } else { ", not closed" }
        ),
        Err(e) => format!(
            "{id}: UNUSABLE: {}",
            crate::audit::recording::ReadBackError::Broken(e.clone())
        ),
    }
}

fn policy_command(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check { dir } => match crate::policy::load_dir(&dir) {
            Ok(set) => {
                for w in set.warnings() {
                    println!("warning: {w}");
                }
                println!("{}: valid, {} policies", dir.display(), set.len());
                Ok(ExitCode::SUCCESS)
            }
            Err(problems) => {
                eprintln!("{}: invalid\n{problems}", dir.display());
                Ok(ExitCode::FAILURE)
            }
        },
        PolicyCommand::Explain(args) => {
            let ExplainArgs {
                config,
                policy_dir,
                user,
                service,
                email,
                groups,
                target,
                action,
                comm,
                uid,
                time,
                statement_class,
                command,
                sql,
                tables,
                db_user,
                db_name,
                command_line,
            } = *args;
            let (cfg, targets) = Config::load(&config)?;
            let dir = policy_dir.unwrap_or(cfg.policy.dir);
            let set = crate::policy::load_dir(&dir)
                .map_err(|e| anyhow::anyhow!("{}: invalid\n{e}", dir.display()))?;
            let t = targets
                .iter()
                .find(|t| t.name == target)
                .with_context(|| format!("no target named `{target}` in {}", config.display()))?;
            let principal = match (user, service) {
                (_, Some(name)) => portcullis_policy::Principal {
                    kind: portcullis_policy::PrincipalKind::Service,
                    id: name.clone(),
                    email: None,
                    name: Some(name),
                    groups,
                },
                (Some(subject), None) => portcullis_policy::Principal {
                    kind: portcullis_policy::PrincipalKind::User,
                    id: subject,
                    email,
                    name: None,
                    groups,
                },
                (None, None) => bail!("name the principal with --user or --service"),
            };
            let time =
                time.unwrap_or_else(|| i64::try_from(crate::audit::now_ms() / 1000).unwrap_or(0));
            let text = crate::policy::explain(
                &set,
                t,
                crate::policy::ExplainInput {
                    principal: Some(principal),
                    action,
                    comm,
                    uid,
                    time,
                    statement_class,
                    command,
                    tables,
                    db_user,
                    db_name,
                    command_line,
                    sql,
                },
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Sends a request; an agent-side refusal becomes an error with the agent's words.
fn ask(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    match control::request(socket, req).map_err(anyhow::Error::msg)? {
        Response::Error { message } => bail!("{message}"),
        other => Ok(other),
    }
}

fn unexpected(r: Response) -> anyhow::Result<ExitCode> {
    bail!("unexpected answer from the agent: {r:?}")
}

fn describe(s: &crate::identity::SessionView) -> String {
    let who = match (&s.name, &s.email) {
        (Some(n), Some(e)) => format!("{n} <{e}>"),
        (None, Some(e)) => e.clone(),
        (Some(n), None) => n.clone(),
        (None, None) => s.subject.clone(),
    };
    let user = s.user.clone().unwrap_or_else(|| format!("uid {}", s.uid));
    let groups = if s.groups.is_empty() {
        "none".to_string()
    } else {
        s.groups.join(", ")
    };
    let left = s.expires_at.saturating_sub(crate::audit::now_ms() / 1000);
    format!(
        "{who} (subject {}, {:?} login via {}) for {user} (uid {}); groups: {groups}; expires in {}m{}s{}",
        s.subject,
        s.kind,
        s.issuer,
        s.uid,
        left / 60,
        left % 60,
        if s.refresh_failing { "; refresh is failing" } else { "" }
    )
}

fn login(socket: &Path, no_wait: bool, token_file: Option<&Path>) -> anyhow::Result<ExitCode> {
    if let Some(file) = token_file {
        let token = if file == Path::new("-") {
            let mut t = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
                .context("reading the token from standard input")?;
            t
        } else {
            std::fs::read_to_string(file)
                .with_context(|| format!("reading the token from {}", file.display()))?
        };
        return match ask(
            socket,
            &Request::LoginToken {
                token: token.trim().to_string(),
            },
        )? {
            Response::LoggedIn(s) => {
                println!("logged in as {}", describe(&s));
                Ok(ExitCode::SUCCESS)
            }
            other => unexpected(other),
        };
    }
    let mut answers = control::conversation(socket, &Request::Login { wait: !no_wait })
        .map_err(anyhow::Error::msg)?;
    let mut next = || -> anyhow::Result<Response> {
        match answers.next() {
            Some(Ok(Response::Error { message })) => bail!("{message}"),
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => bail!("{e}"),
            None => bail!("the agent ended the login without an answer"),
        }
    };
    let started = match next()? {
        Response::LoginStarted(s) => s,
        other => return unexpected(other),
    };
    println!(
        "To log in, open this address in a browser:\n\n    {}\n",
        started.verification_uri
    );
    println!("and enter the code:  {}\n", started.user_code);
    if let Some(complete) = &started.verification_uri_complete {
        println!("(or open {complete} directly)");
    }
    println!("The code expires in {} minutes.", started.expires_in / 60);
    if no_wait {
        println!("Not waiting: `portcullis whoami` shows the result once you are done.");
        return Ok(ExitCode::SUCCESS);
    }
    println!("Waiting for you to finish (Ctrl-C cancels)...");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    match next()? {
        Response::LoggedIn(s) => {
            println!("Logged in as {}", describe(&s));
            Ok(ExitCode::SUCCESS)
        }
        other => unexpected(other),
    }
}

fn detach_enforcement(cfg: &Config) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("only root may detach enforcement");
    }
    // A running agent removes its pins itself, records the event and stops.
    match control::request(&cfg.control.socket, &Request::Detach) {
        Ok(Response::Detached { pin_dir }) => {
            println!(
                "enforcement detached ({} removed); the agent is stopping",
                pin_dir.display()
            );
            return Ok(());
        }
        Ok(Response::Error { message }) => bail!("the agent refused to detach: {message}"),
        Ok(other) => bail!("unexpected answer from the agent: {other:?}"),
        Err(_) => {}
    }
    let pin_dir = cfg.pin_dir();
    if crate::ebpf::detach(&pin_dir)? {
        println!("enforcement detached ({} removed)", pin_dir.display());
    } else {
        println!("nothing to detach: {} does not exist", pin_dir.display());
    }
    Ok(())
}

fn render_status(r: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let uptime = crate::audit::now_ms().saturating_sub(r.started_ms) / 1000;
    let _ = writeln!(
        out,
        "agent        pid {}, version {}, up {}s",
        r.agent_pid, r.version, uptime
    );
    for setting in &r.insecure {
        let _ = writeln!(out, "INSECURE     {setting} = true");
    }
    if let Some(cgroup) = &r.cgroup {
        let _ = writeln!(out, "cgroup       {}", cgroup.display());
    }
    if let Some(pins) = &r.pin_dir {
        let _ = writeln!(out, "pins         {}", pins.display());
    }
    if !r.programs.is_empty() {
        let names: Vec<&str> = r.programs.iter().map(|p| p.hook.as_str()).collect();
        let _ = writeln!(out, "programs     {}", names.join(", "));
    }
    if let Some(c) = &r.counters {
        let _ = writeln!(
            out,
            "kernel       redirected {}, published {}, refused: foreign netns {}, non-TCP {}, no storage {}; agent's own {}",
            c.redirected, c.published, c.denied_foreign_netns, c.denied_protocol, c.denied_no_storage, c.exempt_agent
        );
    }
    if let Some(pending) = r.pending_origins {
        let _ = writeln!(
            out,
            "pending      {pending} origin record(s) not yet accepted"
        );
    }
    if let Some(p) = &r.policy {
        let _ = writeln!(
            out,
            "policy       {} policies from {} (generation {})",
            p.policies,
            p.dir.display(),
            p.generation
        );
        if let Some(e) = &p.last_error {
            let _ = writeln!(
                out,
                "             LAST RELOAD REFUSED, the previous set is in force:\n{e}"
            );
        }
    }
    let a = &r.audit;
    if a.writable {
        let _ = writeln!(
            out,
            "audit        writing (on write failure: {})",
            a.on_write_failure
        );
    } else {
        let consequence = if a.on_write_failure == "refuse" {
            "new connections are refused and sessions end at their next statement"
        } else {
            "connections go on UNAUDITED (keep_enforcing)"
        };
        let _ = writeln!(out, "audit        CANNOT WRITE: {consequence}");
        if let Some(f) = &a.failure {
            let _ = writeln!(
                out,
                "             since {} ms, {} event(s) lost: {}",
                f.since_ms, f.lost_events, f.error
            );
        }
    }
    if r.viewer_uid == 0 {
        let _ = writeln!(out, "\ntargets ({})", r.targets.len());
        let _ = writeln!(
            out,
            "  {:<20} {:<9} {:<24} {:<6} UPSTREAM",
            "NAME", "PROTOCOL", "ADDRESS", "PORT"
        );
        for t in &r.targets {
            let _ = writeln!(
                out,
                "  {:<20} {:<9} {:<24} {:<6} {}",
                t.name,
                t.protocol,
                t.address,
                t.port,
                t.upstream.as_deref().unwrap_or("(original destination)")
            );
        }
    } else {
        let _ = writeln!(out, "\ntargets you may connect to ({})", r.targets.len());
        if let Some(why) = &r.identity_error {
            let _ = writeln!(out, "  none: {why}");
        }
        let _ = writeln!(
            out,
            "  {:<20} {:<9} {:<24} PORT",
            "NAME", "PROTOCOL", "ADDRESS"
        );
        for t in &r.targets {
            let _ = writeln!(
                out,
                "  {:<20} {:<9} {:<24} {}",
                t.name, t.protocol, t.address, t.port
            );
        }
    }
    if !r.break_glass_grants.is_empty() {
        let now = crate::audit::now_ms();
        let _ = writeln!(
            out,
            "\nBREAK-GLASS grants open ({})",
            r.break_glass_grants.len()
        );
        for g in &r.break_glass_grants {
            let _ = writeln!(
                out,
                "  {}  {} on {} ({})  until {} ({} left)  request {}: {}",
                g.id,
                g.who,
                g.target,
                g.actions.join(", "),
                crate::audit::query::format_time(g.expires_ms),
                crate::approvals::human_duration(g.expires_ms.saturating_sub(now) / 1000),
                g.request_id,
                g.reason
            );
        }
    }
    let scope = if r.viewer_uid == 0 {
        String::new()
    } else {
        format!(", showing uid {} only", r.viewer_uid)
    };
    let _ = writeln!(out, "\nconnections ({} open{scope})", r.open_connections);
    if !r.connections.is_empty() {
        let _ = writeln!(
            out,
            "  {:<6} {:<8} {:<12} {:<24} {:<16} {:<20} {:<24} {:>10} {:>10}",
            "ID", "PID", "USER", "IDENTITY", "COMM", "TARGET", "DESTINATION", "SENT", "RECEIVED"
        );
    }
    for c in &r.connections {
        let user = c.user.clone().unwrap_or_else(|| format!("uid {}", c.uid));
        let _ = writeln!(
            out,
            "  {:<6} {:<8} {:<12} {:<24} {:<16} {:<20} {:<24} {:>10} {:>10}",
            c.id,
            c.pid,
            user,
            c.subject.as_deref().unwrap_or("-"),
            c.comm,
            c.target,
            c.destination.to_string(),
            c.bytes_client_to_upstream,
            c.bytes_upstream_to_client
        );
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// `audit verify` fails on a recording that does not match its chunk events although the
    /// chain itself is intact, and `sessions show` calls it unusable.
    #[test]
    fn audit_verify_fails_on_an_edited_recording_and_sessions_show_says_so() {
        use crate::audit::recording::Recordings;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("audit");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (log, _) =
                crate::audit::AuditLog::open(&Default::default(), &dir, Vec::new()).unwrap();
            let log = std::sync::Arc::new(log);
            let mut opened =
                crate::audit::AuditEvent::new(crate::audit::EventKind::ConnectionOpened);
            opened.connection_id = Some(11);
            log.record_durable(&opened).await.unwrap();
            let rec = Recordings::new(std::sync::Arc::clone(&log))
                .start(
                    11,
                    b"{\"version\":2,\"width\":80,\"height\":24}\n".to_vec(),
                    crate::config::RecordingFailure::Close,
                )
                .await
                .unwrap();
            rec.append(b"[0.1,\"o\",\"hello\"]\n".to_vec())
                .await
                .unwrap();
            rec.finish().await.unwrap();
            log.flush();
        });
        let verify = || {
            audit_command(AuditCommand::Verify {
                config: PathBuf::from("/nonexistent"),
                dir: Some(dir.clone()),
                public_key: None,
                json: false,
            })
            .unwrap()
        };
        assert_eq!(verify(), ExitCode::SUCCESS);
        let lines = recording_lines(&dir, 11).join("\n");
        assert!(
            lines.starts_with("recording 11.0: ") && lines.ends_with("matches the audit trail)"),
            "{lines}"
        );
        let path = portcullis_audit_store::recording::recording_path(&dir, 11);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 4;
        *bytes.get_mut(at).unwrap() = b'X';
        std::fs::write(&path, bytes).unwrap();
        assert!(
            portcullis_audit_store::verify(&dir, None).ok,
            "the chain itself is intact"
        );
        assert_eq!(verify(), ExitCode::FAILURE);
        let line = recording_lines(&dir, 11).join("\n");
        assert!(
            line.contains("UNUSABLE") && line.contains("ChunkAltered"),
            "{line}"
        );
    }

    #[test]
    fn generate_docs_writes_a_page_per_command_and_every_completion() {
        let dir = tempfile::tempdir().unwrap();
        generate_docs(dir.path()).unwrap();
        let page = |name: &str| std::fs::read_to_string(dir.path().join("man").join(name));
        let top = page("portcullis.1").unwrap();
        assert!(top.contains(".TH portcullis 1"), "{top}");
        let init = page("portcullis-ca-init.1").unwrap();
        assert!(init.contains(".TH portcullis-ca-init 1"), "{init}");
        assert!(init.contains("\\-\\-config"), "{init}");
        assert!(page("portcullis-audit-verify.1").is_ok());
        // Hidden commands and clap's own `help` get no page.
        assert!(page("portcullis-generate-docs.1").is_err());
        assert!(page("portcullis-help.1").is_err());
        for (file, needle) in [
            ("portcullis", "_portcullis()"),
            ("_portcullis", "#compdef portcullis"),
            ("portcullis.fish", "complete -c portcullis"),
        ] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(file)).unwrap();
            assert!(text.contains(needle), "{file}: {text}");
            assert!(text.contains("login"), "{file} completes subcommands");
        }
    }
}
