//! Typed settings, read from the environment (SPEC §2) and an optional TOML file.
//!
//! Owns: the names, defaults and validation of every setting. A file may set the same keys
//! in lower case without the `CREDSYNC_` prefix (`listen`, `database_url`, `leaf_api_url`,
//! …); the environment wins. Must never: print a secret value, even in an error.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use crate::crypto::Keyring;

/// A setting that is missing or malformed. Its message names the setting, never its value.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    pub setting: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(setting: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            setting: setting.into(),
            message: message.into(),
        }
    }
}

/// Where settings come from: the environment, then the file.
#[derive(Debug, Clone, Default)]
pub struct Source {
    env: HashMap<String, String>,
    file: HashMap<String, String>,
}

/// Every setting read through [`Source`] (a unit test holds this list equal to the names this
/// file reads).
pub const SETTINGS: &[&str] = &[
    "CREDSYNC_ACTIVE_KEY_ID",
    "CREDSYNC_CALLER_RPS",
    "CREDSYNC_DB_MAX_CONNECTIONS",
    "CREDSYNC_ENCRYPTION_KEYS",
    "CREDSYNC_EVENTS_RETENTION_DAYS",
    "CREDSYNC_JWT_AUDIENCE",
    "CREDSYNC_JWT_HS256_SECRET",
    "CREDSYNC_JWT_ISSUER",
    "CREDSYNC_JWT_LEEWAY_SECS",
    "CREDSYNC_JWT_PUBLIC_KEYS_FILE",
    "CREDSYNC_LISTEN",
    "CREDSYNC_LOG_FORMAT",
    "CREDSYNC_MAX_BODY_BYTES",
    "CREDSYNC_MIN_DECRYPTION_KEY_ID",
    "CREDSYNC_REPLICAS",
    "CREDSYNC_ROW_CACHE_TTL_MS",
    "CREDSYNC_SYNC_CONCURRENCY",
    "CREDSYNC_SYNC_INTERVAL_SECS",
    "CREDSYNC_SYNC_LEASE_SECS",
    "DATABASE_URL",
    "LEAF_API_URL",
    "LEAF_MAX_RPS",
    "LEAF_PASSWORD",
    "LEAF_TIMEOUT_MS",
    "LEAF_TOKEN",
    "LEAF_USERNAME",
    "LEAF_WEBHOOK_SECRET",
];

/// The keys a config file may give setting `name` (an environment variable name): in lower
/// case without the `CREDSYNC_` prefix, or in lower case whole.
fn file_keys(name: &str) -> [String; 2] {
    let lower = name.to_ascii_lowercase();
    let short = lower.strip_prefix("credsync_").unwrap_or(&lower).to_owned();
    [short, lower]
}

/// The keys of a config file that name no setting (typos...): they would be ignored without a
/// word.
fn unknown_keys(file: &HashMap<String, String>) -> Vec<&str> {
    let mut unknown: Vec<&str> = file
        .keys()
        .map(String::as_str)
        .filter(|k| {
            !SETTINGS
                .iter()
                .any(|name| file_keys(name).iter().any(|f| f == k))
        })
        .collect();
    unknown.sort_unstable();
    unknown
}

impl Source {
    /// The process environment, plus `config_file` if given. A key of the file that names no
    /// setting is reported on stderr (and otherwise ignored).
    pub fn from_env(config_file: Option<&Path>) -> Result<Source, ConfigError> {
        let env = std::env::vars().collect();
        let file = match config_file {
            None => HashMap::new(),
            Some(path) => {
                let file = read_toml(path)?;
                for key in unknown_keys(&file) {
                    eprintln!(
                        "credsync: warning: {}: `{key}` is not a setting; ignored",
                        path.display()
                    );
                }
                file
            }
        };
        Ok(Source { env, file })
    }

    /// Settings from explicit pairs (tests, `credsync dev`).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Source {
        Source {
            env: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            file: HashMap::new(),
        }
    }

    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        self.env.insert(name.to_owned(), value.into());
    }

    /// The raw value of `name` (an environment variable name), from the environment or the file.
    pub fn get(&self, name: &str) -> Option<String> {
        if let Some(v) = self.env.get(name) {
            return Some(v.clone());
        }
        let [short, lower] = file_keys(name);
        self.file
            .get(&short)
            .or_else(|| self.file.get(&lower))
            .cloned()
    }

    fn get_nonempty(&self, name: &str) -> Option<String> {
        self.get(name).filter(|v| !v.trim().is_empty())
    }

    fn parse<T: std::str::FromStr>(
        &self,
        name: &str,
        default: T,
        what: &str,
    ) -> Result<T, ConfigError> {
        match self.get_nonempty(name) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| ConfigError::new(name, format!("must be {what}"))),
        }
    }

    fn secret(&self, name: &str) -> Option<SecretString> {
        self.get_nonempty(name).map(SecretString::from)
    }
}

fn read_toml(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
    })?;
    let table: toml::Table = text.parse().map_err(|_| {
        ConfigError::new("--config", format!("{} is not valid TOML", path.display()))
    })?;
    let mut out = HashMap::new();
    for (k, v) in table {
        let s = match v {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                return Err(ConfigError::new(
                    k,
                    "must be a string or number in the config file",
                ));
            }
        };
        out.insert(k.to_ascii_lowercase(), s);
    }
    Ok(out)
}

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// How credsync authenticates to Leaf.
#[derive(Debug, Clone)]
pub enum LeafAuth {
    Password {
        username: String,
        password: SecretString,
    },
    Token(SecretString),
    None,
}

/// Settings of the Leaf client.
#[derive(Debug, Clone)]
pub struct LeafSettings {
    pub api_url: String,
    pub auth: LeafAuth,
    pub timeout: Duration,
    pub max_rps: u32,
}

/// Settings of the caller JWT checks.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub hs256_secret: Option<SecretString>,
    pub public_keys_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: String,
    pub leeway_secs: u64,
}

/// Settings of the sync worker.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub interval: Duration,
    /// How long a worker holds a claimed credential or outbox entry before another may take it.
    pub lease: Duration,
    pub concurrency: usize,
    pub events_retention_days: u32,
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: String,
    pub database_url: SecretString,
    pub db_max_connections: u32,
    pub keyring: Arc<Keyring>,
    pub jwt: JwtSettings,
    pub leaf: LeafSettings,
    pub sync: SyncSettings,
    pub webhook_secret: Option<SecretString>,
    pub max_body_bytes: usize,
    /// Requests per second allowed per caller `sub` (0 = unlimited).
    pub caller_rps: u32,
    /// How long a serving process may answer a forwarded read from its row cache
    /// (`rowcache`) before it reads the row again (zero: no cache).
    pub row_cache_ttl: Duration,
}

impl Settings {
    pub fn from_source(src: &Source) -> Result<Settings, ConfigError> {
        Self::load(src, true)
    }

    /// Settings for commands that serve no callers (`sync --once`): no JWT setting needed.
    pub fn for_worker(src: &Source) -> Result<Settings, ConfigError> {
        Self::load(src, false)
    }

    fn load(src: &Source, callers: bool) -> Result<Settings, ConfigError> {
        let database_url = database_url(src)?;
        let keyring = Arc::new(keyring(src)?);
        let jwt = jwt_settings(src)?;
        if callers && jwt.hs256_secret.is_none() && jwt.public_keys_file.is_none() {
            return Err(ConfigError::new(
                "CREDSYNC_JWT_HS256_SECRET",
                "set it or CREDSYNC_JWT_PUBLIC_KEYS_FILE: callers cannot be authenticated otherwise",
            ));
        }
        let max_conn = src.parse("CREDSYNC_DB_MAX_CONNECTIONS", 16u32, "a positive integer")?;
        if max_conn == 0 {
            return Err(ConfigError::new(
                "CREDSYNC_DB_MAX_CONNECTIONS",
                "must be a positive integer",
            ));
        }
        let max_body = src.parse("CREDSYNC_MAX_BODY_BYTES", 65536usize, "a positive integer")?;
        if max_body == 0 {
            return Err(ConfigError::new(
                "CREDSYNC_MAX_BODY_BYTES",
                "must be a positive integer",
            ));
        }
        let listen = src
            .get_nonempty("CREDSYNC_LISTEN")
            .unwrap_or_else(|| "127.0.0.1:8080".into());
        if listen.parse::<std::net::SocketAddr>().is_err() && !listen.contains(':') {
            return Err(ConfigError::new("CREDSYNC_LISTEN", "must be HOST:PORT"));
        }
        Ok(Settings {
            listen,
            database_url,
            db_max_connections: max_conn,
            keyring,
            jwt,
            leaf: leaf_settings(src)?,
            sync: sync_settings(src)?,
            webhook_secret: src.secret("LEAF_WEBHOOK_SECRET"),
            max_body_bytes: max_body,
            caller_rps: src.parse("CREDSYNC_CALLER_RPS", 0u32, "a non-negative integer")?,
            row_cache_ttl: Duration::from_millis(src.parse(
                "CREDSYNC_ROW_CACHE_TTL_MS",
                5000u64,
                "a number of milliseconds (0 turns the cache off)",
            )?),
        })
    }
}

pub fn database_url(src: &Source) -> Result<SecretString, ConfigError> {
    let url = src
        .get_nonempty("DATABASE_URL")
        .ok_or_else(|| ConfigError::new("DATABASE_URL", "is required (a postgres:// URL)"))?;
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(ConfigError::new(
            "DATABASE_URL",
            "must be a postgres:// or postgresql:// URL",
        ));
    }
    // The whole URL is checked here (port, options...), so that a malformed one is a
    // configuration error (exit 2) rather than a failure of whatever uses it first. The parser's
    // message is not shown: it may quote the URL, password included.
    if url.parse::<sqlx::postgres::PgConnectOptions>().is_err() {
        return Err(ConfigError::new(
            "DATABASE_URL",
            "is not a valid postgres URL (check the host, port and options)",
        ));
    }
    Ok(SecretString::from(url))
}

pub fn keyring(src: &Source) -> Result<Keyring, ConfigError> {
    let spec = src
        .get_nonempty("CREDSYNC_ENCRYPTION_KEYS")
        .ok_or_else(|| ConfigError::new("CREDSYNC_ENCRYPTION_KEYS", "is required (KEY_ID:BASE64_32_BYTES, comma-separated; see `credsync keys generate`)"))?;
    let active = src.get_nonempty("CREDSYNC_ACTIVE_KEY_ID");
    let min = src.get_nonempty("CREDSYNC_MIN_DECRYPTION_KEY_ID");
    Keyring::parse(&spec, active.as_deref(), min.as_deref()).map_err(|e| {
        let setting = match &e {
            crate::crypto::CryptoError::Config(m) if m.contains("active key") => {
                "CREDSYNC_ACTIVE_KEY_ID"
            }
            crate::crypto::CryptoError::Config(m) if m.contains("minimum decryption") => {
                "CREDSYNC_MIN_DECRYPTION_KEY_ID"
            }
            _ => "CREDSYNC_ENCRYPTION_KEYS",
        };
        ConfigError::new(setting, e.to_string())
    })
}

pub fn jwt_settings(src: &Source) -> Result<JwtSettings, ConfigError> {
    let public_keys_file = src
        .get_nonempty("CREDSYNC_JWT_PUBLIC_KEYS_FILE")
        .map(PathBuf::from);
    if let Some(p) = &public_keys_file
        && !p.is_file()
    {
        return Err(ConfigError::new(
            "CREDSYNC_JWT_PUBLIC_KEYS_FILE",
            format!("{} is not a readable file", p.display()),
        ));
    }
    Ok(JwtSettings {
        hs256_secret: src.secret("CREDSYNC_JWT_HS256_SECRET"),
        public_keys_file,
        issuer: src.get_nonempty("CREDSYNC_JWT_ISSUER"),
        audience: src
            .get_nonempty("CREDSYNC_JWT_AUDIENCE")
            .unwrap_or_else(|| "credsync".into()),
        leeway_secs: src.parse("CREDSYNC_JWT_LEEWAY_SECS", 30u64, "a number of seconds")?,
    })
}

pub fn leaf_settings(src: &Source) -> Result<LeafSettings, ConfigError> {
    let api_url = src
        .get_nonempty("LEAF_API_URL")
        .unwrap_or_else(|| "https://api.withleaf.io".into())
        .trim_end_matches('/')
        .to_owned();
    if !(api_url.starts_with("http://") || api_url.starts_with("https://"))
        || reqwest::Url::parse(&api_url).is_err()
    {
        return Err(ConfigError::new(
            "LEAF_API_URL",
            "must be an http:// or https:// URL",
        ));
    }
    let auth = match (
        src.get_nonempty("LEAF_USERNAME"),
        src.secret("LEAF_PASSWORD"),
        src.secret("LEAF_TOKEN"),
    ) {
        (Some(username), Some(password), _) => LeafAuth::Password { username, password },
        (Some(_), None, None) => {
            return Err(ConfigError::new(
                "LEAF_PASSWORD",
                "is required with LEAF_USERNAME",
            ));
        }
        (None, Some(_), None) => {
            return Err(ConfigError::new(
                "LEAF_USERNAME",
                "is required with LEAF_PASSWORD",
            ));
        }
        (_, _, Some(token)) => LeafAuth::Token(token),
        (None, None, None) => LeafAuth::None,
    };
    let timeout_ms = src.parse("LEAF_TIMEOUT_MS", 10_000u64, "a number of milliseconds")?;
    if timeout_ms == 0 {
        return Err(ConfigError::new("LEAF_TIMEOUT_MS", "must be positive"));
    }
    let max_rps = src.parse("LEAF_MAX_RPS", 20u32, "a positive integer")?;
    if max_rps == 0 {
        return Err(ConfigError::new(
            "LEAF_MAX_RPS",
            "must be a positive integer",
        ));
    }
    let replicas = src.parse("CREDSYNC_REPLICAS", 1u32, "a positive integer")?;
    if replicas == 0 {
        return Err(ConfigError::new(
            "CREDSYNC_REPLICAS",
            "must be a positive integer",
        ));
    }
    Ok(LeafSettings {
        api_url,
        auth,
        timeout: Duration::from_millis(timeout_ms),
        // Each process takes its share of the account-wide ceiling.
        max_rps: (max_rps / replicas).max(1),
    })
}

pub fn sync_settings(src: &Source) -> Result<SyncSettings, ConfigError> {
    let interval = src.parse("CREDSYNC_SYNC_INTERVAL_SECS", 300u64, "a number of seconds")?;
    let concurrency = src.parse("CREDSYNC_SYNC_CONCURRENCY", 16usize, "a positive integer")?;
    if interval == 0 {
        return Err(ConfigError::new(
            "CREDSYNC_SYNC_INTERVAL_SECS",
            "must be positive",
        ));
    }
    if concurrency == 0 {
        return Err(ConfigError::new(
            "CREDSYNC_SYNC_CONCURRENCY",
            "must be a positive integer",
        ));
    }
    Ok(SyncSettings {
        interval: Duration::from_secs(interval),
        lease: Duration::from_secs(
            src.parse("CREDSYNC_SYNC_LEASE_SECS", 120u64, "a number of seconds")?
                .max(1),
        ),
        concurrency,
        events_retention_days: src.parse(
            "CREDSYNC_EVENTS_RETENTION_DAYS",
            400u32,
            "a number of days",
        )?,
    })
}

pub fn log_format(src: &Source) -> Result<LogFormat, ConfigError> {
    use std::io::IsTerminal;
    match src
        .get_nonempty("CREDSYNC_LOG_FORMAT")
        .as_deref()
        .map(str::trim)
    {
        None => Ok(if std::io::stderr().is_terminal() {
            LogFormat::Pretty
        } else {
            LogFormat::Json
        }),
        Some("pretty") => Ok(LogFormat::Pretty),
        Some("json") => Ok(LogFormat::Json),
        Some(_) => Err(ConfigError::new(
            "CREDSYNC_LOG_FORMAT",
            "must be `pretty` or `json`",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn the_settings_list_is_every_name_this_file_reads() {
        // Every `"NAME"` literal of upper-case letters, digits and underscores that looks like
        // a setting: a name this file reads.
        let source = include_str!("config.rs");
        let name_char = |b: u8| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_';
        let mut read: Vec<&str> = source
            .match_indices('"')
            .filter_map(|(at, _)| {
                let rest = &source[at + 1..];
                let len = rest.bytes().take_while(|b| name_char(*b)).count();
                (rest.as_bytes().get(len) == Some(&b'"')).then(|| &rest[..len])
            })
            .filter(|lit| {
                !lit.ends_with('_')
                    && ["CREDSYNC_", "LEAF_", "DATABASE_"]
                        .iter()
                        .any(|p| lit.starts_with(p))
            })
            .collect();
        read.sort_unstable();
        read.dedup();
        let mut listed = SETTINGS.to_vec();
        listed.sort_unstable();
        assert_eq!(read, listed);
    }

    #[test]
    fn config_file_keys_that_name_no_setting_are_found() {
        let file: HashMap<String, String> = [
            "listen",
            "database_url",
            "leaf_api_url",
            "sync_interval_secs",
            "credsync_max_body_bytes",
            "max_body_byte",
            "api_url",
        ]
        .iter()
        .map(|k| ((*k).to_owned(), String::new()))
        .collect();
        // `credsync_max_body_bytes` is the whole name in lower case, which `Source::get` reads.
        assert_eq!(unknown_keys(&file), ["api_url", "max_body_byte"]);
        let source = Source {
            env: HashMap::new(),
            file,
        };
        assert!(source.get("CREDSYNC_MAX_BODY_BYTES").is_some());
        assert!(source.get("CREDSYNC_LISTEN").is_some());
    }

    fn base() -> Vec<(&'static str, String)> {
        vec![
            ("DATABASE_URL", "postgres://u:hunter2@localhost/db".into()),
            (
                "CREDSYNC_ENCRYPTION_KEYS",
                format!(
                    "k1:{}",
                    base64::engine::general_purpose::STANDARD.encode([7u8; 32])
                ),
            ),
            ("CREDSYNC_JWT_HS256_SECRET", "jwt-secret-value".into()),
        ]
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = Settings::from_source(&Source::from_pairs(base())).unwrap();
        assert_eq!(s.listen, "127.0.0.1:8080");
        assert_eq!(s.db_max_connections, 16);
        assert_eq!(s.jwt.audience, "credsync");
        assert_eq!(s.jwt.leeway_secs, 30);
        assert_eq!(s.leaf.api_url, "https://api.withleaf.io");
        assert_eq!(s.leaf.timeout, Duration::from_millis(10_000));
        assert_eq!(s.leaf.max_rps, 20);
        assert_eq!(s.sync.interval, Duration::from_secs(300));
        assert_eq!(s.sync.concurrency, 16);
        assert_eq!(s.sync.events_retention_days, 400);
        assert_eq!(s.max_body_bytes, 65536);
        assert_eq!(s.row_cache_ttl, Duration::from_secs(5));
        assert_eq!(s.keyring.active_id(), "k1");
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("jwt-secret-value"),
            "{dbg}"
        );
    }

    #[test]
    fn errors_name_the_setting_and_not_the_value() {
        for (name, value) in [
            ("CREDSYNC_DB_MAX_CONNECTIONS", "many"),
            ("LEAF_TIMEOUT_MS", "soon"),
            ("CREDSYNC_ENCRYPTION_KEYS", "k1:c2VjcmV0LWtleQ=="),
            ("DATABASE_URL", "mysql://secretpw@x"),
            ("CREDSYNC_LISTEN", "nowhere"),
        ] {
            let mut pairs = base();
            pairs.retain(|(k, _)| *k != name);
            pairs.push((name, value.into()));
            let err = Settings::from_source(&Source::from_pairs(pairs)).unwrap_err();
            assert_eq!(err.setting, name);
            assert!(!err.to_string().contains(value), "{err}");
        }
        let mut pairs = base();
        pairs.retain(|(k, _)| *k != "CREDSYNC_JWT_HS256_SECRET");
        let err = Settings::from_source(&Source::from_pairs(pairs)).unwrap_err();
        assert_eq!(err.setting, "CREDSYNC_JWT_HS256_SECRET");
    }

    #[test]
    fn the_file_sets_lower_case_keys_and_the_environment_wins() {
        let dir = std::env::temp_dir().join(format!("credsync-config-{}", uuid::Uuid::new_v4()));
        std::fs::write(
            &dir,
            "listen = \"0.0.0.0:9000\"\nleaf_timeout_ms = 250\nsync_interval_secs = 7\n",
        )
        .unwrap();
        let mut src = Source::from_env(Some(&dir)).unwrap();
        src.env.clear();
        for (k, v) in base() {
            src.set(k, v);
        }
        src.set("CREDSYNC_SYNC_INTERVAL_SECS", "9");
        let s = Settings::from_source(&src).unwrap();
        assert_eq!(s.listen, "0.0.0.0:9000");
        assert_eq!(s.leaf.timeout, Duration::from_millis(250));
        assert_eq!(s.sync.interval, Duration::from_secs(9));
        let _ = std::fs::remove_file(dir);
    }
}
