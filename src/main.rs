//! The socksgate binary: parse the command line, set up logging, run the server.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use socksgate::config::{self, Command};

fn main() -> ExitCode {
    // Kept as given for a SIGUSR2 upgrade: -U passwords are hidden from this process's argument block below.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match config::parse(&args) {
        Ok(Command::Run(cfg)) => cfg,
        Ok(Command::Help(text)) => {
            println!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Check(errors)) if errors.is_empty() => {
            println!("socksgate: configuration ok");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Check(errors)) => {
            for e in errors {
                eprintln!("{e}");
            }
            return ExitCode::from(2);
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
    // Before any thread starts: this edits the environment.
    let handed = match socksgate::listen::take_from_env() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("socksgate: {e}");
            return ExitCode::from(2);
        }
    };
    let start = socksgate::control::Startup {
        handed,
        exe: argv
            .first()
            .and_then(|a| socksgate::supervisor::resolve_exe(a)),
        args: argv.into_iter().skip(1).collect(),
    };
    if !cfg.inline_users.is_empty() {
        if let Err(e) = socksgate::sys::hide_passwords_in_cmdline() {
            log::warn!("cannot hide --user passwords from ps ({e}); prefer --users FILE");
        }
    }
    match socksgate::sys::raise_nofile_limit() {
        Ok(n) => log::debug!("open file limit: {n}"),
        Err(e) => log::warn!("cannot raise the open file limit: {e}"),
    }
    match socksgate::control::run(*cfg, start) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("socksgate: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
