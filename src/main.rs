//! The socksgate binary: parse the command line, set up logging, run the server.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use socksgate::config::{self, Command};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match config::parse(&args) {
        Ok(Command::Run(cfg)) => cfg,
        Ok(Command::Help(text)) => {
            println!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("socksgate {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("socksgate: {e}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::new()
        .filter_level(cfg.log_level)
        .parse_default_env()
        .format_timestamp_millis()
        .init();
    if !cfg.inline_users.is_empty() {
        if let Err(e) = socksgate::sys::hide_passwords_in_cmdline() {
            log::warn!("cannot hide --user passwords from ps ({e}); prefer --users FILE");
        }
    }
    match socksgate::sys::raise_nofile_limit() {
        Ok(n) => log::debug!("open file limit: {n}"),
        Err(e) => log::warn!("cannot raise the open file limit: {e}"),
    }
    match socksgate::control::run(*cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("socksgate: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
