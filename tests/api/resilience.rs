//! "Prove it holds": key rotation with the real binary, a Postgres outage under a running app,
//! and a Leaf outage with traffic across a SIGKILL and a SIGTERM of `credsync serve`.
use std::collections::{HashMap, HashSet};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credsync::app::RunOptions;
use credsync::pgtemp::TempPostgres;
use credsync::sim::{SimOptions, SimServer};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;

const KEY_A: &str = "k-alpha";
const KEY_B: &str = "k-bravo";

fn key_a() -> String {
    format!("{KEY_A}:{}", key_b64(0xA1))
}

fn key_b() -> String {
    format!("{KEY_B}:{}", key_b64(0xB2))
}

/// The real binary, with nothing from our environment but `PATH` and the given settings.
fn credsync_bin(env: &[(String, String)]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_credsync"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CREDSYNC_LOG_FORMAT", "json")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Run a short-lived command of the binary to its end (at most 30 s).
async fn run_bin(args: &[&str], env: &[(String, String)]) -> Output {
    tokio::time::timeout(
        Duration::from_secs(30),
        credsync_bin(env).args(args).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("credsync {args:?} did not finish within 30 s"))
    .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The simulator's admin routes, through a client that never reuses a connection the simulator
/// may be closing (actix drops idle keep-alive connections after 5 s; a request racing that close
/// fails with `IncompleteMessage`).
struct Leaf {
    url: String,
    client: reqwest::Client,
}

impl Leaf {
    fn new(url: &str) -> Leaf {
        Leaf {
            url: url.to_owned(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .pool_idle_timeout(Duration::from_secs(1))
                .build()
                .unwrap(),
        }
    }

    async fn fault(&self, fault: Value) {
        let r = self
            .client
            .put(format!("{}/__sim/faults", self.url))
            .json(&fault)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204, "setting a simulator fault");
    }

    async fn clear_faults(&self) {
        let r = self
            .client
            .delete(format!("{}/__sim/faults", self.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }

    /// What Leaf holds for the user, secrets included.
    async fn state(&self, user: Uuid) -> Option<Value> {
        let r = self
            .client
            .get(format!(
                "{}/__sim/state/users/{user}/climate-field-view-credentials",
                self.url
            ))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            404 => None,
            200 => Some(r.json().await.unwrap()),
            other => panic!("simulator state answered {other}"),
        }
    }

    async fn requests(&self) -> Vec<Value> {
        let v: Value = self
            .client
            .get(format!("{}/__sim/requests", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["requests"].as_array().unwrap().clone()
    }
}

fn rotate_env(db_url: &str) -> Vec<(String, String)> {
    vec![
        ("DATABASE_URL".into(), db_url.into()),
        (
            "CREDSYNC_ENCRYPTION_KEYS".into(),
            format!("{},{}", key_a(), key_b()),
        ),
        ("CREDSYNC_ACTIVE_KEY_ID".into(), KEY_B.into()),
    ]
}

/// `credsync keys rotate` to the end; asserts exit 0 and returns (progress lines, final line).
async fn rotate(db_url: &str, batch: &str) -> (Vec<String>, String) {
    let out = run_bin(&["keys", "rotate", "--batch", batch], &rotate_env(db_url)).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "rotate failed ({}): {stdout} {stderr}",
        out.status
    );
    for secret in [key_b64(0xA1), key_b64(0xB2)] {
        assert!(!stdout.contains(&secret) && !stderr.contains(&secret));
    }
    let progress: Vec<String> = stderr
        .lines()
        .filter(|l| l.starts_with("rotate: "))
        .map(str::to_owned)
        .collect();
    (progress, stdout.trim().to_owned())
}

fn body_for(user: Uuid) -> Value {
    body(&format!("cid-{user}"), &user.simple().to_string())
}

/// GET revealed; asserts it matches what was sent for the user; returns the source header.
async fn assert_revealed(app: &TestApp, user: Uuid) -> String {
    assert_revealed_at(&app.client, &app.address, user).await
}

async fn assert_revealed_at(client: &reqwest::Client, address: &str, user: Uuid) -> String {
    let r = client
        .get(cred_url(address, user))
        .bearer_auth(token("credentials:read credentials:reveal"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "reading {user} back");
    let source = r
        .headers()
        .get("x-credsync-source")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let v: Value = r.json().await.unwrap();
    let sent = body_for(user);
    for f in ["clientId", "clientSecret", "apiKey", "refreshToken"] {
        assert_eq!(v[f], sent[f], "{f} of {user}: {v}");
    }
    source
}

async fn create_at(client: &reqwest::Client, address: &str, user: Uuid) -> u16 {
    client
        .post(cred_url(address, user))
        .bearer_auth(token(ALL_SCOPES))
        .json(&body_for(user))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn keys_in_use(app: &TestApp) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "select key_id, count(*) from credential where key_id is not null group by key_id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

// ---------------------------------------------------------------------------------------------
// Key rotation

#[tokio::test]
async fn rotation_rewraps_everything_resumably_and_the_old_key_can_be_retired() {
    let started = Instant::now();
    let db_url = crate::db::fresh_database_url().await;
    let old = spawn_app_with(keyed(&db_url, key_a())).await;
    let users: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        assert_eq!(old.create(*u, &body_for(*u)).await.status(), 201);
    }
    // One create Leaf has not taken yet: its secret waits, sealed, in the outbox.
    Leaf::new(&old.sim_url)
        .fault(json!({"fixedStatus": 503}))
        .await;
    let pending = Uuid::new_v4();
    assert_eq!(old.create(pending, &body_for(pending)).await.status(), 202);
    // `old` stays up, idle, only for its simulator ("Leaf", which holds the credentials).
    let leaf_url = old.sim_url.clone();
    let leaf = Leaf::new(&leaf_url);
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&db_url)
        .await
        .unwrap();
    let count = |sql: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        count("select count(*) from credential where key_id = 'k-alpha'").await,
        11
    );

    // A rotation killed half-way: the batch it committed stays done, the rest is untouched.
    let mut order: Vec<Uuid> = users.iter().copied().chain([pending]).collect();
    order.sort();
    let mut blocker = db.begin().await.unwrap();
    sqlx::query("select 1 from credential where leaf_user_id = $1 for update")
        .bind(order[5]) // in the second batch of 4
        .execute(&mut *blocker)
        .await
        .unwrap();
    let mut crashed = credsync_bin(&rotate_env(&db_url))
        .args(["keys", "rotate", "--batch", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "the first batch to be committed",
        Duration::from_secs(15),
        || async { count("select count(*) from credential where key_id = 'k-bravo'").await == 4 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        crashed.try_wait().unwrap().is_none(),
        "waits for the locked row"
    );
    crashed.start_kill().unwrap();
    crashed.wait().await.unwrap();
    blocker.commit().await.unwrap();
    assert_eq!(
        count("select count(*) from credential where key_id = 'k-bravo'").await,
        4
    );

    // Run again: it finishes the job.
    let (progress, last) = rotate(&db_url, "4").await;
    assert_eq!(
        progress.len(),
        3,
        "one progress line per batch: {progress:?}"
    );
    assert!(
        progress[0].contains("0 re-wrapped, 4 already") && progress[2].contains("7 re-wrapped"),
        "{progress:?}"
    );
    assert_eq!(
        last,
        "active key k-bravo: 7 re-wrapped, 4 already active, 0 unreadable"
    );
    assert_eq!(
        count("select count(*) from credential where key_id = 'k-bravo'").await,
        11
    );
    assert_eq!(
        count("select count(*) from audit where action = 'key.rotate' and actor = 'cli' and outcome = 'success' and leaf_user_id is null")
            .await,
        1
    );
    // Resumable and idempotent: a second run has nothing left to do.
    let (_, again) = rotate(&db_url, "4").await;
    assert_eq!(
        again,
        "active key k-bravo: 0 re-wrapped, 11 already active, 0 unreadable"
    );
    assert_eq!(
        count("select count(*) from audit where action = 'key.rotate' and actor = 'cli'").await,
        2
    );

    // Only the new key configured: every credential reads back, from the local copy.
    let only_b = spawn_app_with(
        AppOptions {
            db_url: Some(db_url.clone()),
            run: RunOptions {
                http: true,
                sync: true,
                migrate: true,
            },
            ..AppOptions::default()
        }
        .env("CREDSYNC_ENCRYPTION_KEYS", key_b())
        .env("CREDSYNC_SYNC_INTERVAL_SECS", "3600")
        .env("LEAF_API_URL", leaf_url.clone()),
    )
    .await;
    leaf.fault(json!({"fixedStatus": 503})).await;
    for u in users.iter().chain([&pending]) {
        assert_eq!(assert_revealed(&only_b, *u).await, "cache");
    }
    // The queued create, re-wrapped while it waited, still reaches Leaf intact.
    leaf.clear_faults().await;
    wait_until(
        "the queued create to be delivered",
        Duration::from_secs(20),
        || async {
            sqlx::query_scalar::<_, String>(
                "select sync_state from credential where leaf_user_id = $1",
            )
            .bind(pending)
            .fetch_one(&only_b.db)
            .await
            .unwrap()
                == "SYNCED"
        },
    )
    .await;
    let at_leaf = leaf.state(pending).await.expect("delivered");
    assert_eq!(at_leaf["clientSecret"], body_for(pending)["clientSecret"]);
    only_b.stop().await;

    // Both keys configured, the old one retired: the same.
    let retired = spawn_app_with(
        keyed(&db_url, format!("{},{}", key_a(), key_b()))
            .env("CREDSYNC_ACTIVE_KEY_ID", KEY_B)
            .env("CREDSYNC_MIN_DECRYPTION_KEY_ID", KEY_B)
            .env("LEAF_API_URL", leaf_url),
    )
    .await;
    leaf.fault(json!({"fixedStatus": 503})).await;
    for u in &users {
        assert_eq!(assert_revealed(&retired, *u).await, "cache");
    }
    assert_eq!(
        keys_in_use(&retired).await,
        HashMap::from([(KEY_B.into(), 11)])
    );
    retired.stop().await;
    old.stop().await;
    eprintln!("rotation test: {:?}", started.elapsed());
}

/// `credsync serve` against a database, expecting a refusal at start-up (exit 2).
async fn serve_refuses(db_url: &str, keys: String) -> String {
    let mut env = base_env(db_url, "http://127.0.0.1:9");
    env.retain(|(k, _)| k != "CREDSYNC_ENCRYPTION_KEYS" && k != "CREDSYNC_LISTEN");
    env.push(("CREDSYNC_ENCRYPTION_KEYS".into(), keys));
    env.push((
        "CREDSYNC_LISTEN".into(),
        format!("127.0.0.1:{}", free_port()),
    ));
    let out = run_bin(&["serve"], &env).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("CREDSYNC_ENCRYPTION_KEYS"), "{stderr}");
    for b in [0xA1, 0xB2, 0x5A, 0x77] {
        let secret = key_b64(b);
        assert!(
            !stderr.contains(&secret) && !text(&out.stdout).contains(&secret),
            "key material printed: {stderr}"
        );
    }
    stderr
}

#[tokio::test]
async fn serve_refuses_to_start_when_stored_data_needs_a_key_it_does_not_have() {
    let db_url = crate::db::fresh_database_url().await;
    let app = spawn_app_with(keyed(&db_url, key_a())).await;
    let user = Uuid::new_v4();
    assert_eq!(app.create(user, &body_for(user)).await.status(), 201);
    app.stop().await;

    // Only an unrelated key: the missing id is named.
    let err = serve_refuses(&db_url, format!("k-zulu:{}", key_b64(0x5A))).await;
    assert!(err.contains(KEY_A), "{err}");
    // The same id with other key material.
    let err = serve_refuses(&db_url, format!("{KEY_A}:{}", key_b64(0x77))).await;
    assert!(err.contains(KEY_A) && err.contains("do not match"), "{err}");
    // `keys rotate` refuses it too, before touching a row.
    let mut env = base_env(&db_url, "http://127.0.0.1:9");
    env.retain(|(k, _)| k != "CREDSYNC_ENCRYPTION_KEYS");
    env.push((
        "CREDSYNC_ENCRYPTION_KEYS".into(),
        format!("{KEY_A}:{}", key_b64(0x77)),
    ));
    let out = run_bin(&["keys", "rotate"], &env).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("CREDSYNC_ENCRYPTION_KEYS") && stderr.contains("do not match"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(&key_b64(0x77)),
        "key material printed: {stderr}"
    );
    // Nothing was changed by the refusals: the right key still starts and reads.
    let again = spawn_app_with(keyed(&db_url, key_a())).await;
    Leaf::new(&again.sim_url)
        .fault(json!({"fixedStatus": 503}))
        .await;
    assert_revealed(&again, user).await;
}

#[tokio::test]
async fn a_rotation_batch_that_deadlocks_with_a_writer_is_rolled_back_and_retried() {
    let db_url = crate::db::fresh_database_url().await;
    let app = spawn_app_with(keyed(&db_url, key_a())).await;
    let mut users: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        assert_eq!(app.create(*u, &body_for(*u)).await.status(), 201);
    }
    users.sort();
    async fn lock(tx: &mut sqlx::PgConnection, user: Uuid) -> Result<(), sqlx::Error> {
        sqlx::query("select 1 from credential where leaf_user_id = $1 for update")
            .bind(user)
            .execute(tx)
            .await
            .map(|_| ())
    }
    // A writer holds the last row in key order. Its own deadlock check waits 10 s, so the
    // rotation's backend (waiting first, checking after 1 s) is the one Postgres rolls back.
    let mut writer = app.db.begin().await.unwrap();
    sqlx::query("set local deadlock_timeout = '10s'")
        .execute(&mut *writer)
        .await
        .unwrap();
    lock(&mut writer, users[3]).await.unwrap();
    let keyring = credsync::config::keyring(&credsync::config::Source::from_pairs([
        (
            "CREDSYNC_ENCRYPTION_KEYS",
            format!("{},{}", key_a(), key_b()),
        ),
        ("CREDSYNC_ACTIVE_KEY_ID", KEY_B.to_owned()),
    ]))
    .unwrap();
    let pool = credsync::store::pool(&secrecy::SecretString::from(db_url.clone()), 2).unwrap();
    let rotation =
        tokio::spawn(async move { credsync::rotate::rotate(&pool, &keyring, 10, |_| {}).await });
    // The rotation's one batch holds the first three rows and waits for the writer's.
    wait_until(
        "the rotation to wait for the writer",
        Duration::from_secs(10),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "select count(*) from pg_stat_activity
             where datname = current_database() and wait_event_type = 'Lock'",
            )
            .fetch_one(&app.db)
            .await
            .unwrap();
            waiting > 0
        },
    )
    .await;
    // The writer now asks for the first row: a deadlock. The rotation's batch is rolled back,
    // which gives the writer its row.
    lock(&mut writer, users[0]).await.unwrap();
    writer.commit().await.unwrap();
    let totals = rotation.await.unwrap().unwrap();
    assert_eq!(totals.rewrapped, 4);
    assert_eq!(totals.unreadable, 0);
    assert_eq!(
        keys_in_use(&app).await,
        HashMap::from([(KEY_B.into(), 4)]),
        "everything is under the new key"
    );
}

#[tokio::test]
async fn rotating_while_serve_runs_loses_nothing_and_leaves_nothing_behind() {
    let started = Instant::now();
    let db_url = crate::db::fresh_database_url().await;
    let old = spawn_app_with(keyed(&db_url, key_a())).await;
    let before: Vec<Uuid> = (0..30).map(|_| Uuid::new_v4()).collect();
    for u in &before {
        assert_eq!(old.create(*u, &body_for(*u)).await.status(), 201);
    }
    // The replica that keeps serving has both keys and already seals new data under the new one
    // (the documented order: roll out the new active key, then rotate). It shares Leaf.
    let serving = spawn_app_with(
        AppOptions {
            db_url: Some(db_url.clone()),
            run: RunOptions {
                http: true,
                sync: true,
                migrate: true,
            },
            ..AppOptions::default()
        }
        .env(
            "CREDSYNC_ENCRYPTION_KEYS",
            format!("{},{}", key_a(), key_b()),
        )
        .env("CREDSYNC_ACTIVE_KEY_ID", KEY_B)
        .env("CREDSYNC_SYNC_INTERVAL_SECS", "1")
        .env("LEAF_API_URL", old.sim_url.clone()),
    )
    .await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let created = Arc::new(Mutex::new(Vec::new()));
    let mut traffic = Vec::new();
    for worker in 0..3 {
        let (client, address, stop, created, before) = (
            serving.client.clone(),
            serving.address.clone(),
            stop.clone(),
            created.clone(),
            before.clone(),
        );
        traffic.push(tokio::spawn(async move {
            let mut i = worker;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let u = Uuid::new_v4();
                assert_eq!(create_at(&client, &address, u).await, 201);
                created.lock().unwrap().push(u);
                // Reads refresh the rows the rotation re-wraps.
                assert_revealed_at(&client, &address, before[i % before.len()]).await;
                i += 3;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A write of the serving side holds one old row while the rotation passes it.
    let mut tx = serving.db.begin().await.unwrap();
    sqlx::query("select 1 from credential where leaf_user_id = $1 for update")
        .bind(before[0])
        .execute(&mut *tx)
        .await
        .unwrap();
    let holder = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tx.commit().await.unwrap();
    });
    let (progress, last) = rotate(&db_url, "5").await;
    holder.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in traffic {
        t.await.unwrap();
    }
    assert!(!progress.is_empty());
    assert!(
        last.starts_with("active key k-bravo: 30 re-wrapped,") && last.ends_with(" 0 unreadable"),
        "{last}"
    );
    let created = created.lock().unwrap().clone();
    assert!(created.len() >= 3, "traffic ran: {}", created.len());
    let total = i64::try_from(before.len() + created.len()).unwrap();
    assert_eq!(
        keys_in_use(&serving).await,
        HashMap::from([(KEY_B.into(), total)]),
        "everything is under the new key"
    );

    // The old key retired: every credential, old and new, reads back from the local copy.
    let retired =
        spawn_app_with(keyed(&db_url, key_b()).env("LEAF_API_URL", old.sim_url.clone())).await;
    Leaf::new(&old.sim_url)
        .fault(json!({"fixedStatus": 503}))
        .await;
    for u in before.iter().chain(&created) {
        assert_eq!(assert_revealed(&retired, *u).await, "cache");
    }
    eprintln!(
        "concurrent rotation test: {:?} ({} created during the rotation)",
        started.elapsed(),
        created.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Postgres outage

async fn status_of(app: &TestApp, path: &str) -> u16 {
    app.get_open(path).await.status().as_u16()
}

async fn assert_db_unavailable(resp: reqwest::Response) {
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_problem(resp, 503, "database-unavailable").await;
    let retry_after = retry_after.expect("Retry-After");
    assert!(retry_after.parse::<u64>().unwrap() >= 1, "{retry_after}");
}

/// Options for an app on `db_url` with these `CREDSYNC_ENCRYPTION_KEYS`.
fn keyed(db_url: &str, keys: String) -> AppOptions {
    AppOptions {
        db_url: Some(db_url.to_owned()),
        ..AppOptions::default()
    }
    .env("CREDSYNC_ENCRYPTION_KEYS", keys)
}

/// The app with its sync worker (every second) on the given database.
async fn spawn_with_worker(db_url: &str) -> TestApp {
    spawn_app_with(
        AppOptions {
            db_url: Some(db_url.to_owned()),
            run: RunOptions {
                http: true,
                sync: true,
                migrate: true,
            },
            ..AppOptions::default()
        }
        .env("CREDSYNC_SYNC_INTERVAL_SECS", "1"),
    )
    .await
}

#[tokio::test]
async fn a_postgres_outage_answers_503_and_the_same_process_recovers_by_itself() {
    let started = Instant::now();
    let mut pg = TempPostgres::start().await.unwrap();
    let app = spawn_with_worker(pg.url()).await;
    let user = Uuid::new_v4();
    assert_eq!(app.create(user, &body_for(user)).await.status(), 201);
    assert_revealed(&app, user).await;

    pg.stop().await.unwrap();
    assert!(!pg.is_running());
    let dir = pg.dir().to_owned();
    assert!(dir.join("data").is_dir(), "stop keeps the data directory");
    let outage = Instant::now();
    assert_db_unavailable(app.get(user, "credentials:read credentials:reveal").await).await;
    let newcomer = Uuid::new_v4();
    assert_db_unavailable(app.create(newcomer, &body_for(newcomer)).await).await;
    assert_db_unavailable(app.delete(user, ALL_SCOPES).await).await;
    assert_db_unavailable(app.get_path("/v1/credentials", "status:read").await).await;
    assert_eq!(status_of(&app, "/healthz").await, 200);
    let r = app.get_open("/readyz").await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.json::<Value>().await.unwrap()["database"], "unavailable");
    // Nothing reached Leaf for the write that could not be stored.
    let leaf = Leaf::new(&app.sim_url);
    assert!(leaf.state(newcomer).await.is_none());
    eprintln!("outage checks took {:?}", outage.elapsed());

    pg.restart().await.unwrap();
    let back = Instant::now();
    wait_until("/readyz to answer 200", Duration::from_secs(15), || async {
        status_of(&app, "/readyz").await == 200
    })
    .await;
    eprintln!("ready again {:?} after the restart", back.elapsed());
    // Once ready, every request succeeds: no stale connection is handed out.
    for _ in 0..8 {
        assert_revealed(&app, user).await;
    }
    assert_eq!(
        app.create(newcomer, &body_for(newcomer)).await.status(),
        201
    );
    assert_revealed(&app, newcomer).await;
    assert_eq!(app.delete(user, ALL_SCOPES).await.status(), 204);
    assert_eq!(
        app.get_path("/v1/credentials", "status:read")
            .await
            .status(),
        200
    );
    // The worker is alive too: it keeps syncing the remaining credential.
    // A restart nobody saw: no request while it was down, so the pool still holds connections
    // the old server closed. They must not surface as errors.
    let idle = sqlx::query_scalar::<_, i64>(
        "select count(*) from pg_stat_activity where datname = current_database() and application_name <> 'psql'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    pg.stop().await.unwrap();
    pg.restart().await.unwrap();
    for _ in 0..8 {
        assert_revealed(&app, newcomer).await;
    }
    eprintln!("{idle} connections were open before the unseen restart");
    let seen_before = leaf.requests().await.len();
    wait_until(
        "the worker to sync again",
        Duration::from_secs(10),
        || async {
            leaf.requests().await[seen_before..].iter().any(|r| {
                r["method"] == "GET"
                    && r["path"]
                        .as_str()
                        .is_some_and(|p| p.contains(&newcomer.to_string()))
            })
        },
    )
    .await;
    app.stop().await;
    drop(pg);
    assert!(!dir.exists(), "dropping removes {}", dir.display());
    eprintln!("postgres outage test: {:?}", started.elapsed());
}

#[tokio::test]
async fn a_sync_cut_off_by_a_database_outage_does_not_park_the_credential_for_a_lease() {
    let mut pg = TempPostgres::start().await.unwrap();
    let app = spawn_with_worker(pg.url()).await;
    let user = Uuid::new_v4();
    assert_eq!(app.create(user, &body_for(user)).await.status(), 201);
    let leaf = Leaf::new(&app.sim_url);
    // The worker's next read of this user is slow at Leaf; the database goes away under it, for
    // longer than the pool waits for a connection (3 s) on each of the calls that follow.
    let path = user.to_string();
    leaf.fault(json!({"latencyMs": 300, "method": "GET", "pathContains": path}))
        .await;
    let seen = leaf.requests().await.len();
    let reads_after = |from: usize| {
        let leaf = &leaf;
        let path = path.clone();
        async move {
            leaf.requests().await[from..]
                .iter()
                .filter(|r| {
                    r["method"] == "GET" && r["path"].as_str().is_some_and(|p| p.contains(&path))
                })
                .count()
        }
    };
    wait_until(
        "the worker to start a sync",
        Duration::from_secs(10),
        || async { reads_after(seen).await > 0 },
    )
    .await;
    pg.stop().await.unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;
    pg.restart().await.unwrap();
    leaf.clear_faults().await;
    // The lease (120 s by default) was taken before the outage and its release failed; the
    // worker releases it once the database is back instead of waiting for it to expire.
    let after = leaf.requests().await.len();
    wait_until(
        "the worker to sync the user again",
        Duration::from_secs(15),
        || async { reads_after(after).await > 0 },
    )
    .await;
    app.stop().await;
}

/// `credsync serve --no-migrate` (child process) with these keys; stderr goes to `log`.
fn serve_no_migrate(
    db_url: &str,
    keys: String,
    log: &std::path::Path,
) -> (tokio::process::Child, String) {
    serve_detached(db_url, keys, log, &["serve", "--no-migrate"])
}

/// The binary with `args`, on a free port, its stderr in `log`; returns it and its address.
fn serve_detached(
    db_url: &str,
    keys: String,
    log: &std::path::Path,
    args: &[&str],
) -> (tokio::process::Child, String) {
    let port = free_port();
    let mut env = base_env(db_url, "http://127.0.0.1:9");
    env.retain(|(k, _)| k != "CREDSYNC_ENCRYPTION_KEYS" && k != "CREDSYNC_LISTEN");
    env.push(("CREDSYNC_ENCRYPTION_KEYS".into(), keys));
    env.push(("CREDSYNC_LISTEN".into(), format!("127.0.0.1:{port}")));
    let child = credsync_bin(&env)
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    (child, format!("http://127.0.0.1:{port}"))
}

async fn wait_healthy(child: &mut tokio::process::Child, address: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("credsync serve exited at start-up: {status}");
        }
        if client
            .get(format!("{address}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return;
        }
        assert!(Instant::now() < deadline, "credsync serve did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SPEC §4 and §6: a `serve` (migrations and worker included) started while Postgres is down
/// answers at once, `/healthz` 200, `/readyz` and the API 503 with `Retry-After`, and applies
/// the migrations, checks the keys and serves once Postgres is up, without a restart.
#[tokio::test]
async fn serve_started_while_postgres_is_down_answers_at_once_and_migrates_once_it_is_up() {
    let mut pg = TempPostgres::start().await.unwrap();
    pg.stop().await.unwrap();
    let log = std::env::temp_dir().join(format!("credsync-resilience-{}.log", Uuid::new_v4()));
    let (mut child, address) = serve_detached(pg.url(), key_a(), &log, &["serve"]);
    wait_healthy(&mut child, &address).await;
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{address}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["database"], "unavailable");
    let list = || {
        client
            .get(format!("{address}/v1/credentials"))
            .bearer_auth(token("status:read"))
            .send()
    };
    assert_db_unavailable(list().await.unwrap()).await;
    let user = Uuid::new_v4();
    assert_db_unavailable(
        client
            .post(cred_url(&address, user))
            .bearer_auth(token(ALL_SCOPES))
            .json(&body_for(user))
            .send()
            .await
            .unwrap(),
    )
    .await;

    pg.restart().await.unwrap();
    wait_until("/readyz to answer 200", Duration::from_secs(20), || async {
        client
            .get(format!("{address}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let ready: Value = client
        .get(format!("{address}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&ready["migrations"], &ready["encryptionKeys"]),
        (&json!("applied"), &json!("checked"))
    );
    assert_eq!(list().await.unwrap().status(), 200);
    assert!(child.try_wait().unwrap().is_none(), "still serving");
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(stderr.contains("migrations applied"), "{stderr}");
}

/// A worker replica (`serve --sync-only`) serves no HTTP, so it does not take
/// `CREDSYNC_LISTEN`: it starts beside an API process that holds it.
#[tokio::test]
async fn a_worker_replica_does_not_take_the_listen_address() {
    let db = crate::db::fresh_database_url().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut env = base_env(&db, "http://127.0.0.1:9");
    env.retain(|(k, _)| k != "CREDSYNC_LISTEN");
    env.push((
        "CREDSYNC_LISTEN".into(),
        taken.local_addr().unwrap().to_string(),
    ));
    let mut worker = credsync_bin(&env)
        .args(["serve", "--sync-only"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It runs (the worker's first pass has come and gone) rather than exiting with code 2.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let exited = worker.try_wait().unwrap();
    if exited.is_some() {
        let out = worker.wait_with_output().await.unwrap();
        panic!("the worker exited: {}", text(&out.stderr));
    }
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();
    drop(taken);
}

#[tokio::test]
async fn a_key_check_deferred_by_an_outage_runs_when_postgres_returns() {
    let started = Instant::now();
    let mut pg = TempPostgres::start().await.unwrap();
    let app = spawn_app_with(keyed(pg.url(), key_a())).await;
    let user = Uuid::new_v4();
    assert_eq!(app.create(user, &body_for(user)).await.status(), 201);
    app.stop().await;
    let log = std::env::temp_dir().join(format!("credsync-resilience-{}.log", Uuid::new_v4()));

    // The right key, started while Postgres is down: it comes up, and serves once Postgres does.
    pg.stop().await.unwrap();
    let (mut good, address) = serve_no_migrate(pg.url(), key_a(), &log);
    wait_healthy(&mut good, &address).await;
    pg.restart().await.unwrap();
    let client = reqwest::Client::new();
    wait_until("reads to work", Duration::from_secs(15), || async {
        client
            .get(cred_url(&address, user))
            .bearer_auth(token("credentials:read credentials:reveal"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert_revealed_at(&client, &address, user).await;
    wait_until(
        "/readyz to say the keys were checked",
        Duration::from_secs(10),
        || async {
            let Ok(r) = client.get(format!("{address}/readyz")).send().await else {
                return false;
            };
            r.status() == 200
                && r.json::<Value>()
                    .await
                    .is_ok_and(|v| v["encryptionKeys"] == "checked")
        },
    )
    .await;
    assert!(good.try_wait().unwrap().is_none(), "still serving");
    good.start_kill().unwrap();
    good.wait().await.unwrap();

    // Other key material under the same id, started while Postgres is down: refused (exit 2)
    // as soon as Postgres answers, with the same one-line message as at start-up.
    pg.stop().await.unwrap();
    let (mut bad, address) = serve_no_migrate(pg.url(), format!("{KEY_A}:{}", key_b64(0x77)), &log);
    wait_healthy(&mut bad, &address).await;
    pg.restart().await.unwrap();
    // Until the check has run, the process is not ready, although Postgres answers.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let poller = tokio::spawn({
        let (client, address, seen) = (client.clone(), address.clone(), seen.clone());
        async move {
            loop {
                if let Ok(r) = client.get(format!("{address}/readyz")).send().await {
                    let status = r.status().as_u16();
                    let body: Value = r.json().await.unwrap_or_default();
                    seen.lock()
                        .unwrap()
                        .push((status, body["encryptionKeys"].clone()));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let status = tokio::time::timeout(Duration::from_secs(20), bad.wait())
        .await
        .expect("stops once the key check runs")
        .unwrap();
    poller.abort();
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|(s, keys)| *s == 503 && keys == "pending"),
        "{seen:?}"
    );
    let stderr = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert_eq!(status.code(), Some(2), "{stderr}");
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("credsync: CREDSYNC_ENCRYPTION_KEYS:")
            && last.contains(KEY_A)
            && last.contains("do not match"),
        "{stderr}"
    );
    for b in [0xA1, 0x77] {
        assert!(!stderr.contains(&key_b64(b)), "key material printed");
    }
    drop(pg);
    eprintln!("deferred key check test: {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Leaf outage with traffic, SIGKILL and SIGTERM of the real binary

struct Served {
    child: tokio::process::Child,
    address: String,
}

async fn serve_bin(db_url: &str, sim_url: &str) -> Served {
    let port = free_port();
    let mut env = base_env(db_url, sim_url);
    env.retain(|(k, _)| k != "CREDSYNC_LISTEN");
    env.extend([
        ("CREDSYNC_LISTEN".to_owned(), format!("127.0.0.1:{port}")),
        ("CREDSYNC_SYNC_INTERVAL_SECS".to_owned(), "1".to_owned()),
        ("CREDSYNC_SYNC_LEASE_SECS".to_owned(), "5".to_owned()),
    ]);
    let mut child = credsync_bin(&env)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let address = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("credsync serve exited at start-up: {status}");
        }
        let ready = client
            .get(format!("{address}/readyz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            return Served { child, address };
        }
        assert!(
            Instant::now() < deadline,
            "credsync serve did not get ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The simulator on a free port, expecting the login `base_env` configures.
fn sim_with_login() -> SimServer {
    SimServer::start(
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        SimOptions {
            username: Some("leaf-user".into()),
            password: Some("leaf-pass".into()),
            ..Default::default()
        },
    )
    .unwrap()
}

fn cred_url(address: &str, user: Uuid) -> String {
    format!("{address}/services/usermanagement/api/users/{user}/climate-field-view-credentials")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Delete,
}

#[tokio::test]
async fn queued_writes_survive_sigkill_and_sigterm_releases_leases() {
    let started = Instant::now();
    let db_url = crate::db::fresh_database_url().await;
    let sim = sim_with_login();
    let sim_url = sim.base_url();
    let leaf = Leaf::new(&sim_url);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&db_url)
        .await
        .unwrap();
    let count = |sql: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };

    let first = serve_bin(&db_url, &sim_url).await;
    let doomed: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    for u in &doomed {
        assert_eq!(create_at(&client, &first.address, *u).await, 201);
    }
    leaf.fault(json!({"fixedStatus": 503})).await;

    // Traffic: 4 callers, creates with a delete now and then, until the process is killed.
    let acked: Arc<Mutex<Vec<(Op, Uuid)>>> = Arc::default();
    let mut ops: Vec<(Op, Uuid)> = (0..60).map(|_| (Op::Create, Uuid::new_v4())).collect();
    for (i, u) in doomed.iter().enumerate() {
        ops.insert(5 + i * 9, (Op::Delete, *u));
    }
    let queue = Arc::new(Mutex::new(ops.into_iter()));
    let mut callers = Vec::new();
    for _ in 0..4 {
        let (queue, acked, client, address) = (
            queue.clone(),
            acked.clone(),
            client.clone(),
            first.address.clone(),
        );
        callers.push(tokio::spawn(async move {
            loop {
                let Some((op, u)) = queue.lock().unwrap().next() else {
                    return;
                };
                let req = match op {
                    Op::Create => client.post(cred_url(&address, u)).json(&body_for(u)),
                    Op::Delete => client.delete(cred_url(&address, u)),
                };
                // An error: killed under our feet, so not acknowledged and nothing is promised.
                if let Ok(r) = req.bearer_auth(token(ALL_SCOPES)).send().await {
                    assert_eq!(r.status(), 202, "{op:?} {u} while Leaf is down");
                    acked.lock().unwrap().push((op, u));
                }
            }
        }));
    }
    wait_until(
        "some writes to be acknowledged",
        Duration::from_secs(20),
        || async { acked.lock().unwrap().len() >= 25 },
    )
    .await;
    let mut first = first;
    first.child.start_kill().unwrap(); // SIGKILL
    let killed = first.child.wait().await.unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&killed),
        Some(9)
    );
    for c in callers {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let creates: Vec<Uuid> = acked
        .iter()
        .filter(|(op, _)| *op == Op::Create)
        .map(|(_, u)| *u)
        .collect();
    let deletes: Vec<Uuid> = acked
        .iter()
        .filter(|(op, _)| *op == Op::Delete)
        .map(|(_, u)| *u)
        .collect();
    assert!(!deletes.is_empty() && creates.len() >= 20, "{acked:?}");
    eprintln!(
        "killed after {} acknowledged creates and {} deletes ({:?})",
        creates.len(),
        deletes.len(),
        started.elapsed()
    );

    // Start again; Leaf comes back.
    let second = serve_bin(&db_url, &sim_url).await;
    leaf.clear_faults().await;
    let state_of = |u: Uuid| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "select sync_state from credential where leaf_user_id = $1",
            )
            .bind(u)
            .fetch_optional(&db)
            .await
            .unwrap()
        }
    };
    wait_until(
        "every acknowledged write to reach Leaf",
        Duration::from_secs(30),
        || async {
            for u in &creates {
                if state_of(*u).await.as_deref() != Some("SYNCED") {
                    return false;
                }
            }
            for u in &deletes {
                if state_of(*u).await.is_some() {
                    return false;
                }
            }
            true
        },
    )
    .await;
    eprintln!("acknowledged writes delivered at {:?}", started.elapsed());
    for u in &creates {
        let at_leaf = leaf.state(*u).await.expect("at Leaf");
        assert_eq!(at_leaf["clientSecret"], body_for(*u)["clientSecret"], "{u}");
    }
    for u in &deletes {
        assert!(leaf.state(*u).await.is_none(), "{u} deleted at Leaf");
    }
    // Exactly one successful POST per user reached Leaf (none twice, acknowledged ones once).
    let mut ok_posts: HashMap<String, usize> = HashMap::new();
    for r in leaf.requests().await {
        if r["method"] == "POST" && r["status"] == 201 {
            *ok_posts
                .entry(r["path"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert!(ok_posts.values().all(|n| *n == 1), "{ok_posts:?}");
    let posted: HashSet<String> = ok_posts.into_keys().collect();
    for u in creates.iter().chain(&doomed) {
        assert!(
            posted.iter().any(|p| p.contains(&u.to_string())),
            "{u} was posted"
        );
    }
    // In-flight requests the kill interrupted may have been stored; they drain too.
    wait_until("the outbox to drain", Duration::from_secs(45), || async {
        count("select count(*) from outbox").await == 0
    })
    .await;
    eprintln!("outbox empty at {:?}", started.elapsed());

    // SIGTERM while the worker holds leases (Leaf answers slowly): a prompt, clean exit.
    leaf.fault(json!({"latencyMs": 5000, "method": "GET"}))
        .await;
    wait_until(
        "the worker to hold leases",
        Duration::from_secs(10),
        || async {
            count("select count(*) from credential where lease_owner is not null").await > 0
        },
    )
    .await;
    let mut second = second;
    let pid = second.child.id().unwrap();
    let term = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(5), second.child.wait())
        .await
        .expect("exits within 5 s of SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
    eprintln!("SIGTERM to exit: {:?}", term.elapsed());
    assert_eq!(
        count("select count(*) from credential where lease_owner is not null or lease_until is not null").await,
        0
    );
    assert_eq!(
        count("select count(*) from outbox where lease_owner is not null").await,
        0
    );
    drop(sim);
    eprintln!("leaf outage + kill test: {:?}", started.elapsed());
}

/// Log lines are written in batches (`telemetry::Batched`): one still reaches stderr promptly
/// while the process runs, and none is lost when it exits.
#[tokio::test]
async fn the_binary_writes_each_log_line_while_it_runs_and_every_line_by_its_exit() {
    use tokio::io::AsyncBufReadExt as _;

    let db_url = crate::db::fresh_database_url().await;
    let sim = sim_with_login();
    let port = free_port();
    let mut env = base_env(&db_url, &sim.base_url());
    env.retain(|(k, _)| k != "CREDSYNC_LISTEN");
    env.push(("CREDSYNC_LISTEN".into(), format!("127.0.0.1:{port}")));
    let mut child = credsync_bin(&env)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let reader = tokio::spawn({
        let lines = lines.clone();
        async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                lines.lock().unwrap().push(line);
            }
        }
    });
    let seen = |needle: &'static str| {
        let lines = lines.clone();
        move || {
            let found = lines.lock().unwrap().iter().any(|l| l.contains(needle));
            async move { found }
        }
    };
    wait_until(
        "credsync to log that it listens",
        Duration::from_secs(20),
        seen("credsync listening"),
    )
    .await;

    let address = format!("http://127.0.0.1:{port}");
    let resp = reqwest::Client::new()
        .get(format!("{address}/healthz"))
        .header("x-request-id", "log-probe-7f3a")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // A quiet service: nothing else fills the buffer, the flusher writes the line out.
    wait_until(
        "the access line on stderr",
        Duration::from_secs(5),
        seen("log-probe-7f3a"),
    )
    .await;

    let pid = child.id().unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
    reader.await.unwrap();
    let lines = lines.lock().unwrap().clone();
    // The worker's last line is logged as the process winds down, after the final batch timer.
    assert!(
        lines.iter().any(|l| l.contains("sync worker stopped")),
        "{lines:#?}"
    );
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let ts = v["timestamp"]
            .as_str()
            .unwrap_or_else(|| panic!("no timestamp: {line}"));
        let t = credsync::timefmt::parse_strict(ts).unwrap_or_else(|| panic!("{ts}"));
        assert_eq!(credsync::timefmt::format(t), ts);
    }
    let access = lines.iter().find(|l| l.contains("log-probe-7f3a")).unwrap();
    let access: Value = serde_json::from_str(access).unwrap();
    assert_eq!(access["route"], "/healthz", "{access}");
    assert_eq!(access["method"], "GET", "{access}");
    assert_eq!(access["status"], 200, "{access}");
}
