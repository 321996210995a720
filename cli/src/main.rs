//! `sluicectl`, the operator's command line for Sluice: a thin gRPC client of the
//! control plane's PipelineService. Exit status: 0 ok, 1 RPC or wait failure, 64 usage.

#![forbid(unsafe_code)]

mod apply;
mod args;
mod commands;
mod config;
mod error;
mod output;
mod spec_file;
mod wait;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, EXIT_FAILURE, EXIT_OK, EXIT_USAGE};
use crate::error::CliError;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version arrive as "errors" too; they print to stdout and
            // succeed, real parse errors print to stderr and are usage errors.
            let _ = err.print();
            return exit(if err.use_stderr() {
                EXIT_USAGE
            } else {
                EXIT_OK
            });
        }
    };
    // Completion needs no server: it is printed from the parser's own definition.
    if let args::Command::Completion { shell } = cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "sluicectl", &mut std::io::stdout());
        return exit(EXIT_OK);
    }
    match execute(cli) {
        Ok(text) => {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`sluicectl list | head`) is not worth an error message.
            // Commands that print as they go (apply) return nothing more to print.
            if !text.is_empty() {
                let _ = writeln!(stdout, "{text}").and_then(|()| stdout.flush());
            }
            exit(EXIT_OK)
        }
        Err(err) => {
            let mut stderr = std::io::stderr().lock();
            for line in err.report() {
                let _ = writeln!(stderr, "{line}");
            }
            exit(err.exit_code())
        }
    }
}

fn execute(cli: Cli) -> Result<String, CliError> {
    // One request at a time: a current-thread runtime is all a CLI needs.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    runtime.block_on(commands::run(cli))
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(EXIT_FAILURE as u8))
}
