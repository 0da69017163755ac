//! `portcullis`: the host agent (`portcullis agent`) and its command-line client.

mod admission;
mod agent;
mod approvals;
mod audit;
mod ca;
mod cli;
mod config;
mod config_reference;
mod console;
mod control;
mod dns;
mod ebpf;
mod identity;
mod limits;
mod listeners;
mod logging;
mod policy;
mod protocol;
mod proxy;
mod review;
mod ssh_ca;
mod sys;
mod tls;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    logging::init();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}
