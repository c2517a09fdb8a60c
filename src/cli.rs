//! The command line (SPEC §1): `serve`, `dev`, `migrate`, `keys`, `token`, `leaf-sim`, `sync`.
//!
//! Exit codes: 0 success, 2 bad usage or configuration (one line naming the setting), 1 other
//! failures. Must never: print a secret value, except what a command exists to print (a new
//! key, a minted token, `dev`'s throwaway admin token).
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use secrecy::ExposeSecret;

use crate::app::{Application, RunOptions, StartupError};
use crate::config::{self, ConfigError, Settings, Source};

/// credsync: Leaf credential gateway with encrypted storage and a Postgres status cache.
#[derive(Debug, Parser)]
#[command(name = "credsync", version, about, propagate_version = true)]
pub struct Cli {
    /// TOML file with settings (lower-case names without the CREDSYNC_ prefix); the environment wins.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API and the background sync worker.
    Serve(ServeArgs),
    /// Everything for a local try-out: throwaway Postgres, Leaf simulator, keys, an admin token.
    Dev,
    /// Apply database migrations and exit.
    Migrate,
    /// Encryption key management.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Caller tokens for development and tests.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run the Leaf simulator alone.
    LeafSim(LeafSimArgs),
    /// One sync pass, then exit with a summary.
    Sync(SyncArgs),
    /// Exit 0 when URL answers 2xx, or with --database when Postgres answers with every
    /// migration applied (container health checks; a `--sync-only` worker serves no HTTP).
    #[command(hide = true)]
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:8080/readyz")]
        url: String,
        /// Check DATABASE_URL instead of a URL.
        #[arg(long, conflicts_with = "url")]
        database: bool,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// API only: no background sync worker.
    #[arg(long, conflicts_with = "sync_only")]
    pub no_sync: bool,
    /// Sync worker only (a worker replica): no HTTP API.
    #[arg(long)]
    pub sync_only: bool,
    /// Do not apply pending migrations at start.
    #[arg(long)]
    pub no_migrate: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print a new random 256-bit key, base64.
    Generate,
    /// Re-wrap every stored data key under the active key (resumable, batched, safe while serving).
    Rotate {
        /// Credentials per batch.
        #[arg(long, default_value_t = 500)]
        batch: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint an HS256 caller JWT with CREDSYNC_JWT_HS256_SECRET.
    Mint {
        /// The caller's name (the JWT `sub`, recorded as the actor in the audit log).
        #[arg(long)]
        sub: String,
        /// Space-separated scopes, e.g. "credentials:read status:read".
        #[arg(long)]
        scope: String,
        /// Lifetime, e.g. 90s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

#[derive(Debug, Args)]
pub struct LeafSimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081", env = "LEAF_SIM_LISTEN")]
    pub listen: String,
    /// Lifetime of the tokens it issues, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub token_ttl_secs: u64,
    /// Accept only this username at /api/authenticate (any when unset).
    #[arg(long, env = "LEAF_SIM_USERNAME")]
    pub username: Option<String>,
    /// Accept only this password at /api/authenticate.
    #[arg(long, env = "LEAF_SIM_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Run one pass and exit (the only mode; the continuous worker runs inside `serve`).
    #[arg(long, required = true)]
    pub once: bool,
    /// Only these Leaf user ids.
    #[arg(long = "user", value_name = "ID")]
    pub users: Vec<String>,
    /// First page through Leaf's users and adopt every Climate FieldView credential Leaf holds.
    #[arg(long)]
    pub discover: bool,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(c) = e.downcast_ref::<ConfigError>() {
                eprintln!("credsync: {c}");
                return ExitCode::from(2);
            }
            if let Some(s) = e.downcast_ref::<StartupError>() {
                eprintln!("credsync: {s}");
                return ExitCode::from(2);
            }
            eprintln!("credsync: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let source = Source::from_env(cli.config.as_deref())?;
    match cli.command {
        Command::Keys(KeysCommand::Generate) => {
            println!("{}", crate::crypto::generate_key_b64().as_str());
            Ok(())
        }
        Command::Token(TokenCommand::Mint { sub, scope, ttl }) => {
            if !crate::auth::usable_sub(&sub) {
                return Err(ConfigError::new(
                    "--sub",
                    "must be 1 to 256 bytes of printable text (the service refuses any other)",
                )
                .into());
            }
            let jwt = config::jwt_settings(&source)?;
            let secret = jwt.hs256_secret.ok_or_else(|| {
                ConfigError::new("CREDSYNC_JWT_HS256_SECRET", "is required to mint tokens")
            })?;
            let ttl = crate::auth::parse_ttl(&ttl)
                .ok_or_else(|| ConfigError::new("--ttl", "must be like 90s, 15m, 1h or 7d"))?;
            let token = crate::auth::mint(
                &secret,
                &sub,
                &scope,
                &jwt.audience,
                jwt.issuer.as_deref(),
                ttl,
            )?;
            println!("{token}");
            Ok(())
        }
        Command::Healthcheck { database: true, .. } => {
            let url = config::database_url(&source)?;
            runtime()?.block_on(async move {
                let pool = crate::store::pool(&url, 1)?;
                let applied = tokio::time::timeout(
                    std::time::Duration::from_secs(3),
                    crate::store::migrations_applied(&pool),
                )
                .await
                .map_err(|_| anyhow::anyhow!("Postgres did not answer within 3 s"))??;
                anyhow::ensure!(applied, "Postgres answers, but migrations are pending");
                Ok(())
            })
        }
        Command::Healthcheck { url, .. } => runtime()?.block_on(async move {
            let resp = reqwest::Client::new()
                .get(&url)
                .timeout(std::time::Duration::from_secs(3))
                .send()
                .await?;
            anyhow::ensure!(
                resp.status().is_success(),
                "{url} answered {}",
                resp.status()
            );
            Ok(())
        }),
        Command::LeafSim(args) => {
            let _log = crate::telemetry::init(config::log_format(&source)?);
            let opts = crate::sim::SimOptions {
                token_ttl: std::time::Duration::from_secs(args.token_ttl_secs.max(1)),
                username: args.username,
                password: args.password,
                ..Default::default()
            };
            runtime()?.block_on(crate::sim::run_forever(&args.listen, opts))
        }
        Command::Migrate => {
            let _log = crate::telemetry::init(config::log_format(&source)?);
            let url = config::database_url(&source)?;
            runtime()?.block_on(async move {
                let pool = crate::store::pool(&url, 2)?;
                crate::store::migrate(&pool).await?;
                println!("migrations applied");
                Ok(())
            })
        }
        Command::Serve(args) => {
            let _log = crate::telemetry::init(config::log_format(&source)?);
            let settings = if args.sync_only {
                Settings::for_worker(&source)?
            } else {
                Settings::from_source(&source)?
            };
            let opts = RunOptions {
                http: !args.sync_only,
                sync: !args.no_sync,
                migrate: !args.no_migrate,
            };
            runtime()?.block_on(serve(settings, opts))
        }
        Command::Dev => {
            let _log = crate::telemetry::init(config::log_format(&source)?);
            runtime()?.block_on(crate::dev::run(source))
        }
        Command::Keys(KeysCommand::Rotate { batch }) => {
            let _log = crate::telemetry::init(config::log_format(&source)?);
            let url = config::database_url(&source)?;
            let keyring = config::keyring(&source)?;
            runtime()?.block_on(crate::rotate::run(&url, &keyring, batch.clamp(1, 10_000)))
        }
        Command::Sync(args) => {
            let _log = crate::telemetry::init(config::log_format(&source)?);
            let settings = Settings::for_worker(&source)?;
            let mut users = Vec::new();
            for u in &args.users {
                users.push(
                    crate::domain::LeafUserId::parse(u)
                        .map_err(|m| ConfigError::new("--user", m))?
                        .0,
                );
            }
            runtime()?.block_on(crate::sync::run_once_cli(settings, users, args.discover))
        }
    }
}

async fn serve(settings: Settings, opts: RunOptions) -> anyhow::Result<()> {
    let listen = settings.listen.clone();
    let app = Application::build(settings, opts).await?;
    if opts.http {
        tracing::info!(%listen, port = app.port(), "credsync listening");
    } else {
        tracing::info!("credsync sync worker running (no HTTP API)");
    }
    let result = app.run_until_stopped().await;
    match &result {
        Ok(()) => tracing::info!("credsync stopped"),
        Err(e) => tracing::error!(error = %format!("{e:#}"), "credsync stopped on an error"),
    }
    result
}

/// Quote a value for a shell line.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Whether an error is the operator's to fix.
pub fn is_config_error(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ConfigError>().is_some() || e.downcast_ref::<StartupError>().is_some()
}

/// The database URL with its password hidden (for messages).
pub fn redacted_url(url: &secrecy::SecretString) -> String {
    let s = url.expose_secret();
    match (s.find("://"), s.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &s[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:****@{}", &s[..scheme + 3], user, &s[at + 1..])
        }
        _ => s.to_owned(),
    }
}
