//! `kubectl serin`: the kubectl plugin (see `serin::plugin`). Installed on the PATH as
//! `kubectl-serin`, kubectl runs it for `kubectl serin ...`.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let args = serin::plugin::Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serin::plugin::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
