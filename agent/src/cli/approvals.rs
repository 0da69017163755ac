//! `portcullis request`, `portcullis approvals …` and `portcullis grants …`: each runs as the
//! caller's uid, and the agent acts for the caller's own login (never for a name the
//! command line gives).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};

use super::{ask, unexpected};
use crate::approvals::{human_duration, who, ApprovalRequest, Asked, Grant, RequestState};
use crate::config::DEFAULT_CONTROL_SOCKET;
use crate::control::{Request, Response};

#[derive(Debug, Args)]
pub struct RequestArgs {
    /// The target's name, as `portcullis status` lists it.
    target: String,
    /// How long the grant lasts once approved: `90m`, `2h`, `45s` (at most 24h).
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
    duration: u64,
    /// Why: shown to the approvers and kept in the audit trail.
    #[arg(long)]
    reason: String,
    /// An action to be granted (`connect`, `replicate`, `ssh_shell`, …); repeatable;
    /// `connect` when none is given.
    #[arg(long = "action", value_name = "ACTION")]
    actions: Vec<String>,
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Pending requests you made or may decide.
    List {
        /// Decided and expired ones too.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// One request: what is asked, by whom, who must approve, who did.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Approve a request as your own login (never one you made, unless you break the glass).
    Approve {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// Approve your OWN request as a member of the configured emergency group
        /// (`approvals.break_glass_group`): needs --reason, fills the whole requirement, and
        /// is alerted and audited as break-glass.
        #[arg(long)]
        break_glass: bool,
    },
    /// Deny a request; the reason is required.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum GrantsCommand {
    /// Active grants you hold or may revoke.
    List {
        /// Ended ones too.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// End a grant now; its open connections are closed.
    Revoke {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

/// `90m`, `2h`, `1d`, `45s`, or seconds.
fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => s.split_at(at),
        None => (s, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 90m or 2h"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{s}`: the unit is one of s, m, h, d")),
    };
    n.checked_mul(scale)
        .filter(|secs| *secs > 0)
        .ok_or_else(|| format!("`{s}` is not a positive duration"))
}

pub fn request(args: RequestArgs) -> anyhow::Result<ExitCode> {
    let req = Request::GrantAsk {
        target: args.target,
        actions: args.actions,
        duration_secs: args.duration,
        reason: args.reason,
    };
    match ask(&args.socket, &req)? {
        Response::ApprovalRequest(r) if args.json => {
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(ExitCode::SUCCESS)
        }
        Response::ApprovalRequest(r) => {
            println!(
                "request {} {}: {}",
                r.id,
                r.state.as_str(),
                r.asked.describe()
            );
            println!("needs {}", r.requirement());
            println!(
                "an approver runs `portcullis approvals approve {}`; follow it with `portcullis approvals show {}`",
                r.id, r.id
            );
            Ok(ExitCode::SUCCESS)
        }
        other => unexpected(other),
    }
}

pub fn approvals(socket: &Path, command: ApprovalsCommand) -> anyhow::Result<ExitCode> {
    match command {
        ApprovalsCommand::List { all, json } => {
            match ask(socket, &Request::ApprovalsList { all })? {
                Response::ApprovalRequests { requests } if json => {
                    println!("{}", serde_json::to_string_pretty(&requests)?);
                }
                Response::ApprovalRequests { requests } => {
                    if requests.is_empty() {
                        println!("no {}requests", if all { "" } else { "pending " });
                    }
                    for r in &requests {
                        println!(
                            "{}  {:<8}  {}  by {}  needs {}  ({} counted)",
                            r.id,
                            r.state.as_str(),
                            r.asked.describe(),
                            who(&r.requester),
                            r.requirement(),
                            r.counted().len()
                        );
                    }
                }
                other => return unexpected(other),
            }
            Ok(ExitCode::SUCCESS)
        }
        ApprovalsCommand::Show { id, json } => match ask(socket, &Request::ApprovalsShow { id })? {
            Response::ApprovalRequest(r) if json => {
                println!("{}", serde_json::to_string_pretty(&r)?);
                Ok(ExitCode::SUCCESS)
            }
            Response::ApprovalRequest(r) => {
                print!("{}", render(&r));
                Ok(ExitCode::SUCCESS)
            }
            other => unexpected(other),
        },
        ApprovalsCommand::Approve {
            id,
            reason,
            break_glass,
        } => {
            if break_glass && reason.trim().is_empty() {
                bail!("--break-glass needs --reason \"…\": why the glass is broken goes to the alert and the audit trail");
            }
            decide(socket, id, true, reason, break_glass)
        }
        ApprovalsCommand::Deny { id, reason } => decide(socket, id, false, reason, false),
    }
}

fn decide(
    socket: &Path,
    id: String,
    approve: bool,
    reason: String,
    break_glass: bool,
) -> anyhow::Result<ExitCode> {
    match ask(
        socket,
        &Request::ApprovalsDecide {
            id,
            approve,
            reason,
            break_glass,
        },
    )? {
        Response::ApprovalRequest(r) => {
            if break_glass {
                println!(
                    "BREAK-GLASS: request {} approved by you{}; this is alerted and audited",
                    r.id,
                    r.grant_id
                        .as_deref()
                        .map(|g| format!(": grant {g}"))
                        .unwrap_or_default()
                );
                return Ok(ExitCode::SUCCESS);
            }
            match (approve, r.state) {
                (true, RequestState::Approved) => match &r.grant_id {
                    Some(g) => println!("request {} approved: grant {g}", r.id),
                    None => println!("request {} approved", r.id),
                },
                (true, _) => println!(
                    "request {}: your approval counts; still {} (needs {}, {} counted)",
                    r.id,
                    r.state.as_str(),
                    r.requirement(),
                    r.counted().len()
                ),
                (false, _) => println!("request {} denied", r.id),
            }
            Ok(ExitCode::SUCCESS)
        }
        other => unexpected(other),
    }
}

fn render(r: &ApprovalRequest) -> String {
    let mut out = String::new();
    out.push_str(&format!("request   {}\n", r.id));
    out.push_str(&format!("state     {}\n", r.state.as_str()));
    out.push_str(&format!(
        "requester {} (uid {})\n",
        who(&r.requester),
        r.requester.uid
    ));
    match &r.asked {
        Asked::Grant {
            target,
            actions,
            duration_secs,
        } => out.push_str(&format!(
            "asks      {} on {target} for {}\n",
            actions.join(", "),
            human_duration(*duration_secs)
        )),
        Asked::Statement {
            target,
            statement,
            parameters,
            ..
        } => {
            out.push_str(&format!("asks      on {target}: {statement}\n"));
            if !parameters.is_empty() {
                out.push_str(&format!("params    {parameters:?}\n"));
            }
        }
        Asked::Command { .. } => out.push_str(&format!("asks      {}\n", r.asked.describe())),
    }
    out.push_str(&format!("reason    {}\n", r.reason));
    out.push_str(&format!("needs     {}\n", r.requirement()));
    out.push_str(&format!("policies  {}\n", r.policy_ids.join(", ")));
    for v in &r.verdicts {
        out.push_str(&format!(
            "{}  {}{}\n",
            match (v.approve, &v.break_glass) {
                (true, Some(_)) => "BREAK-GLASS",
                (true, None) => "approved",
                (false, _) => "denied  ",
            },
            who(&v.by),
            if v.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", v.reason)
            }
        ));
    }
    if let Some(g) = &r.grant_id {
        out.push_str(&format!("grant     {g}\n"));
    }
    out
}

pub fn grants(socket: &Path, command: GrantsCommand) -> anyhow::Result<ExitCode> {
    match command {
        GrantsCommand::List { all, json } => match ask(socket, &Request::GrantsList { all })? {
            Response::Grants { grants } if json => {
                println!("{}", serde_json::to_string_pretty(&grants)?);
                Ok(ExitCode::SUCCESS)
            }
            Response::Grants { grants } => {
                if grants.is_empty() {
                    println!("no {}grants", if all { "" } else { "active " });
                }
                let now = crate::audit::now_ms();
                for g in &grants {
                    println!("{}", describe_grant(g, now));
                }
                Ok(ExitCode::SUCCESS)
            }
            other => unexpected(other),
        },
        GrantsCommand::Revoke { id, reason } => {
            if reason.trim().is_empty() {
                bail!("a reason is required");
            }
            match ask(socket, &Request::GrantsRevoke { id, reason })? {
                Response::GrantRevoked {
                    grant,
                    closed_connections,
                } => {
                    println!(
                        "grant {} revoked; {closed_connections} open connection(s) closed",
                        grant.id
                    );
                    Ok(ExitCode::SUCCESS)
                }
                other => unexpected(other),
            }
        }
    }
}

fn describe_grant(g: &Grant, now: u64) -> String {
    let state = if let Some(r) = &g.revoked {
        format!("revoked by {}", r.by)
    } else if g.is_active(now) {
        format!(
            "{} left",
            human_duration(g.expires_ms.saturating_sub(now) / 1000)
        )
    } else {
        "expired".to_owned()
    };
    format!(
        "{}  {} on {}  for {}  {} by {}  ({state})",
        g.id,
        g.actions.join(", "),
        g.target,
        who(&g.requester),
        if g.break_glass {
            "BREAK-GLASS"
        } else {
            "approved"
        },
        g.approvers.join(", ")
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations_read_with_their_units() {
        assert_eq!(parse_duration("2h").unwrap(), 7200);
        assert_eq!(parse_duration("90m").unwrap(), 5400);
        assert_eq!(parse_duration("45").unwrap(), 45);
        assert!(parse_duration("0m").is_err());
        assert!(parse_duration("2w").is_err());
        assert!(parse_duration("h").is_err());
    }
}
