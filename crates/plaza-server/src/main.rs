//! `plaza`: the server binary.

mod api;
mod auth;
mod bachata;
mod backend_key;
mod chat;
mod config;
mod conn;
mod engine;
mod hightemplar;
mod hub;
mod keepalive;
mod live;
mod metrics;
mod node;
mod rsocket;
mod server;
mod session;
mod snorky;
mod ws;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, Overrides};

#[derive(Parser)]
#[command(name = "plaza", version, about = "Plaza: a real-time messaging server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Print a connection token signed with auth.hmac_secret, for development and tests.
    GenToken {
        /// The user id (`sub`).
        #[arg(long)]
        user: String,
        /// Seconds until it expires.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// A channel to subscribe on connect (repeatable).
        #[arg(long = "channel")]
        channels: Vec<String>,
        /// JSON attached to the connection (shown in presence).
        #[arg(long)]
        info: Option<String>,
        /// Print a subscription token for this channel instead.
        #[arg(long)]
        subscribe: Option<String>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Validate a configuration and print the effective result (file, then env, then flags).
    CheckConfig {
        /// The TOML file to check (or --config / PLAZA_CONFIG).
        file: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
}

/// Checks that the configured broker answers (nothing to check for the local one).
fn ping_broker(config: &Config) -> Result<(), String> {
    if config.broker == engine::BrokerKind::Local {
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(engine::ping(config))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::CheckConfig { file, overrides } => {
            match Config::load(file.as_deref(), &overrides) {
                Ok(config) => {
                    print!("{}", config.to_toml_redacted());
                    match ping_broker(&config) {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(e) => {
                            eprintln!("error: {e}");
                            ExitCode::FAILURE
                        }
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::GenToken {
            user,
            ttl,
            channels,
            info,
            subscribe,
            overrides,
        } => match gen_token(
            &user,
            ttl,
            &channels,
            info.as_deref(),
            subscribe.as_deref(),
            &overrides,
        ) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { overrides } => {
            let config = match Config::load(None, &overrides) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(server::serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn gen_token(
    user: &str,
    ttl: u64,
    channels: &[String],
    info: Option<&str>,
    subscribe: Option<&str>,
    overrides: &Overrides,
) -> Result<String, String> {
    let config = Config::load(None, overrides).map_err(|e| e.to_string())?;
    let info = info
        .map(serde_json::from_str::<serde_json::Value>)
        .transpose()
        .map_err(|e| format!("--info is not JSON: {e}"))?;
    let now = auth::jwt::unix_now();
    match subscribe {
        Some(channel) => {
            auth::jwt::gen_subscribe_token(&config.auth, user, channel, ttl, info.as_ref(), now)
        }
        None => auth::jwt::gen_token(&config.auth, user, ttl, channels, info.as_ref(), now),
    }
}

/// Logs go to stderr; `RUST_LOG` filters them (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
