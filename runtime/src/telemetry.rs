//! Logging setup: RUST_LOG filters (default `info`); `--log-format json`
//! emits one JSON object per line for log collectors.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;

/// The value of `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid RUST_LOG filter")]
    Filter(#[from] tracing_subscriber::filter::FromEnvError),
    #[error("cannot install the global logger")]
    Install(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub fn init(format: LogFormat) -> Result<(), Error> {
    // An unset RUST_LOG means `info`; a malformed one is an error rather than
    // a silent fallback, so a typo does not hide the logs someone asked for.
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env()?;
    // Colours only for a person at a terminal, not for log collectors.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .map_err(Error::Install)
}
