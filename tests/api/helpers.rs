//! `spawn_app()`: the real application on a free port, a fresh database, its own Leaf simulator.
#![allow(dead_code)]
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use credsync::app::{Application, RunOptions};
use credsync::config::{Settings, Source};
use credsync::sim::{SimOptions, SimServer};
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef";
pub const ALL_SCOPES: &str =
    "admin credentials:read credentials:reveal credentials:write credentials:delete status:read";

/// Every log line any test app wrote, for the "no secret in the logs" checks.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.get_or_init(Default::default).lock().unwrap()).into_owned()
}

static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

struct Capture;
impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.get_or_init(Default::default)
            .lock()
            .unwrap()
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "debug,sqlx=info,hyper=info,reqwest=info,actix_server=info,h2=info,rustls=info",
            ))
            .with_writer(|| Capture)
            .try_init();
    });
}

pub fn key_b64(byte: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

pub struct TestApp {
    pub address: String,
    pub db: PgPool,
    pub db_url: String,
    pub sim: SimServer,
    pub sim_url: String,
    pub client: reqwest::Client,
    pub app: Option<Application>,
    handle: Option<actix_web::dev::ServerHandle>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub struct AppOptions {
    pub env: Vec<(String, String)>,
    pub run: RunOptions,
    pub sim: SimOptions,
    /// Use this database instead of a fresh one.
    pub db_url: Option<String>,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            env: Vec::new(),
            run: RunOptions {
                http: true,
                sync: false,
                migrate: true,
            },
            sim: SimOptions {
                username: Some("leaf-user".into()),
                password: Some("leaf-pass".into()),
                ..Default::default()
            },
            db_url: None,
        }
    }
}

impl AppOptions {
    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.to_owned(), v.into()));
        self
    }
}

/// The API with the sync worker, every credential due each `interval_secs`.
pub fn with_worker(interval_secs: u64) -> AppOptions {
    AppOptions {
        run: RunOptions {
            http: true,
            sync: true,
            migrate: true,
        },
        ..Default::default()
    }
    .env("CREDSYNC_SYNC_INTERVAL_SECS", interval_secs.to_string())
}

/// The API started as `serve --no-sync --no-migrate`.
pub fn without_migrations() -> AppOptions {
    AppOptions {
        run: RunOptions {
            http: true,
            sync: false,
            migrate: false,
        },
        ..Default::default()
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

pub fn base_env(db_url: &str, sim_url: &str) -> Vec<(String, String)> {
    vec![
        ("DATABASE_URL".into(), db_url.into()),
        ("CREDSYNC_LISTEN".into(), "127.0.0.1:0".into()),
        (
            "CREDSYNC_ENCRYPTION_KEYS".into(),
            format!("k1:{}", key_b64(1)),
        ),
        ("CREDSYNC_JWT_HS256_SECRET".into(), JWT_SECRET.into()),
        ("LEAF_API_URL".into(), sim_url.into()),
        ("LEAF_USERNAME".into(), "leaf-user".into()),
        ("LEAF_PASSWORD".into(), "leaf-pass".into()),
        ("LEAF_TIMEOUT_MS".into(), "1500".into()),
        ("LEAF_MAX_RPS".into(), "1000".into()),
        ("CREDSYNC_DB_MAX_CONNECTIONS".into(), "5".into()),
    ]
}

pub async fn spawn_app_with(opts: AppOptions) -> TestApp {
    init_logs();
    let db_url = match opts.db_url {
        Some(u) => u,
        None => crate::db::fresh_database_url().await,
    };
    let sim = SimServer::start(TcpListener::bind("127.0.0.1:0").unwrap(), opts.sim).unwrap();
    let sim_url = sim.base_url();
    let mut env = base_env(&db_url, &sim_url);
    for (k, v) in opts.env {
        env.retain(|(ek, _)| *ek != k);
        env.push((k, v));
    }
    let settings = Settings::from_source(&Source::from_pairs(env)).expect("test settings");
    let app = Application::build(settings, opts.run)
        .await
        .expect("app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_lazy(&db_url)
        .unwrap();
    let handle = app.handle();
    let task = if opts.run.http || opts.run.sync {
        Some(tokio::spawn(app.run_until_stopped()))
    } else {
        None
    };
    TestApp {
        address,
        db,
        db_url,
        sim,
        sim_url,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            // The simulator drops idle connections after 5 s: never reuse one that old.
            .pool_idle_timeout(Duration::from_secs(2))
            .build()
            .unwrap(),
        app: None,
        handle,
        task,
    }
}

pub fn token(scope: &str) -> String {
    token_for("test-caller", scope)
}

pub fn token_for(sub: &str, scope: &str) -> String {
    credsync::auth::mint(
        &SecretString::from(JWT_SECRET),
        sub,
        scope,
        "credsync",
        None,
        600,
    )
    .unwrap()
}

pub fn body(client_id: &str, secret_suffix: &str) -> Value {
    json!({
        "clientId": client_id,
        "clientSecret": format!("client-secret-{secret_suffix}"),
        "apiKey": format!("api-key-{secret_suffix}"),
        "refreshToken": format!("refresh-token-{secret_suffix}"),
    })
}

impl TestApp {
    pub fn cred_url(&self, user: Uuid) -> String {
        format!(
            "{}/services/usermanagement/api/users/{user}/climate-field-view-credentials",
            self.address
        )
    }

    pub async fn post(&self, user: Uuid, body: &Value, scope: &str) -> reqwest::Response {
        self.client
            .post(self.cred_url(user))
            .bearer_auth(token(scope))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn create(&self, user: Uuid, body: &Value) -> reqwest::Response {
        self.post(user, body, ALL_SCOPES).await
    }

    pub async fn get(&self, user: Uuid, scope: &str) -> reqwest::Response {
        self.client
            .get(self.cred_url(user))
            .bearer_auth(token(scope))
            .send()
            .await
            .unwrap()
    }

    pub async fn get_path(&self, path: &str, scope: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .bearer_auth(token(scope))
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, user: Uuid, scope: &str) -> reqwest::Response {
        self.client
            .delete(self.cred_url(user))
            .bearer_auth(token(scope))
            .send()
            .await
            .unwrap()
    }

    /// GET a route that needs no token (`/healthz`, `/readyz`, `/metrics`, `/openapi.yaml`).
    pub async fn get_open(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .unwrap()
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.get_open("/metrics").await.text().await.unwrap()
    }

    pub async fn sim_put(&self, path: &str, body: Value) -> reqwest::Response {
        self.client
            .put(format!("{}{path}", self.sim_url))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn sim_post(&self, path: &str, body: Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.sim_url))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn fault(&self, fault: Value) {
        let r = self.sim_put("/__sim/faults", fault).await;
        assert_eq!(r.status(), 204, "setting a simulator fault");
    }

    pub async fn clear_faults(&self) {
        self.client
            .delete(format!("{}/__sim/faults", self.sim_url))
            .send()
            .await
            .unwrap();
    }

    /// Every request the simulator logged (`method`, `path`, `status`, `requestId`, ...).
    pub async fn sim_request_log(&self) -> Vec<Value> {
        let mut v: Value = self
            .client
            .get(format!("{}/__sim/requests", self.sim_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match v["requests"].take() {
            Value::Array(requests) => requests,
            other => panic!("the simulator's request log is not an array: {other}"),
        }
    }

    /// Requests the simulator saw, as (method, path) pairs.
    pub async fn sim_requests(&self) -> Vec<(String, String)> {
        self.sim_request_log()
            .await
            .iter()
            .map(|r| {
                (
                    r["method"].as_str().unwrap().to_owned(),
                    r["path"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    pub async fn clear_sim_requests(&self) {
        self.client
            .delete(format!("{}/__sim/requests", self.sim_url))
            .send()
            .await
            .unwrap();
    }

    /// What the simulator ("Leaf") holds for the user, secrets included.
    pub async fn leaf_state(&self, user: Uuid) -> Option<Value> {
        let r = self
            .client
            .get(format!(
                "{}/__sim/state/users/{user}/climate-field-view-credentials",
                self.sim_url
            ))
            .send()
            .await
            .unwrap();
        if r.status() == 404 {
            None
        } else {
            Some(r.json().await.unwrap())
        }
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.db).await.unwrap()
    }

    /// `count` of a query with one parameter, `$1`: the user.
    pub async fn count_for(&self, sql: &'static str, user: Uuid) -> i64 {
        sqlx::query_scalar(sql)
            .bind(user)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// Every value of every table, as text (for secret scans).
    pub async fn dump_all_tables(&self) -> String {
        let tables: Vec<String> = sqlx::query_scalar(
            "select table_name::text from information_schema.tables where table_schema = 'public' and table_type = 'BASE TABLE'",
        )
        .fetch_all(&self.db)
        .await
        .unwrap();
        let mut out = String::new();
        for t in tables {
            let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                r#"select (t.*)::text from "{t}" t"#
            )))
            .fetch_all(&self.db)
            .await
            .unwrap();
            for (r,) in rows {
                out.push_str(&r);
                out.push('\n');
            }
        }
        out
    }

    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.stop(false).await;
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Assert a problem+json answer with the given status and code; returns the body.
pub async fn assert_problem(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert_eq!(ct, "application/problem+json");
    let rid = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned())
        .expect("X-Request-Id");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["type"],
        format!("urn:credsync:problem:{code}"),
        "{body}"
    );
    assert_eq!(body["status"], status);
    assert_eq!(body["requestId"], rid.as_str());
    assert!(body["title"].is_string() && body["detail"].is_string());
    body
}

pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}
