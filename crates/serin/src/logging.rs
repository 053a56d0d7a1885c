//! Logging set-up, once per process: every `serin` command goes through [`init`].

use std::io::IsTerminal;
use std::sync::Mutex;

/// Log output format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the tracing subscriber: `RUST_LOG` filters (else `default_level`), lines go to
/// `file` when given (without colour), else to standard error (coloured on a terminal).
pub fn init(format: LogFormat, default_level: &str, file: Option<std::fs::File>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match (file, format) {
        (Some(f), LogFormat::Text) => builder
            .with_ansi(false)
            .with_writer(Mutex::new(f))
            .try_init(),
        (Some(f), LogFormat::Json) => builder.json().with_writer(Mutex::new(f)).try_init(),
        (None, LogFormat::Text) => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .try_init(),
        (None, LogFormat::Json) => builder.json().with_writer(std::io::stderr).try_init(),
    };
}
