//! Health, readiness, metrics, the OpenAPI document, and credsync's own Leaf token handling.
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;

use crate::helpers::*;

#[tokio::test]
async fn health_readiness_metrics_and_openapi_answer_without_a_token() {
    let app = spawn_app().await;
    let r = app.get_open("/healthz").await;
    assert_eq!(r.status(), 200);
    let r = app.get_open("/readyz").await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["database"], "ok");
    assert_eq!(v["migrations"], "applied");
    app.create(Uuid::new_v4(), &body("c", "metrics00000")).await;
    let text = app.metrics().await;
    for name in [
        "credsync_http_requests_total",
        "credsync_http_request_duration_seconds",
        "credsync_leaf_requests_total",
        "credsync_leaf_request_duration_seconds",
        "credsync_credentials",
        "credsync_outbox_pending",
        "credsync_sync_lag_seconds",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    assert!(
        text.contains(r#"route="/services/usermanagement/api/users/{leafUserId}/{segment}""#),
        "routes are labelled by pattern"
    );
    let r = app.get_open("/openapi.yaml").await;
    assert_eq!(r.status(), 200);
    let doc = r.text().await.unwrap();
    assert_eq!(
        doc,
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap()
    );
}

#[tokio::test]
async fn head_is_get_without_the_body() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    app.create(user, &body("c", "headheadhead")).await;
    for (path, auth) in [
        ("/healthz".to_owned(), false),
        ("/openapi.yaml".to_owned(), false),
        ("/v1/credentials/summary".to_owned(), true),
        (
            format!("/services/usermanagement/api/users/{user}/climate-field-view-credentials"),
            true,
        ),
    ] {
        let get = app.client.get(format!("{}{path}", app.address));
        let head = app.client.head(format!("{}{path}", app.address));
        let (get, head) = if auth {
            (
                get.bearer_auth(token(ALL_SCOPES)),
                head.bearer_auth(token(ALL_SCOPES)),
            )
        } else {
            (get, head)
        };
        let get = get.send().await.unwrap();
        let head = head.send().await.unwrap();
        assert_eq!(head.status(), 200, "HEAD {path}");
        assert_eq!(
            head.headers()["content-type"],
            get.headers()["content-type"],
            "{path}"
        );
        assert_eq!(head.text().await.unwrap(), "", "HEAD {path} has no body");
        assert_eq!(get.status(), 200);
    }
    // A path without GET refuses HEAD too; one with GET lists HEAD beside it.
    let r = app
        .client
        .head(format!("{}/v1/sync", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let r = app
        .client
        .put(format!("{}/healthz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["allow"], "GET, HEAD");
}

/// The value of one sample of `/metrics`, e.g. `credsync_credentials{status="OK"}`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test]
async fn the_credentials_gauge_counts_credentials_by_status_and_leaves_out_deleted_ones() {
    let app = spawn_app().await;
    let users: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for (i, u) in users.iter().enumerate() {
        let r = app
            .create(*u, &body("c", &format!("gauge0000000{i}")))
            .await;
        assert_eq!(r.status(), 201);
    }
    // One turns UNAUTHENTICATED at Leaf and a GET brings that home; another is deleted.
    let r = app
        .sim_put(
            &format!(
                "/__sim/users/{}/climate-field-view-credentials/status",
                users[0]
            ),
            json!({"status": "UNAUTHENTICATED"}),
        )
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(app.get(users[0], "credentials:read").await.status(), 200);
    assert_eq!(
        app.delete(users[1], "credentials:delete").await.status(),
        204
    );

    // The recorder is one per test process: another test's scrape may set the gauge between
    // this one's refresh and its rendering, so a mismatch is scraped again before it counts.
    let expected = [
        ("OK", 1.0),
        ("UNAUTHENTICATED", 1.0),
        // Known statuses are shown at zero.
        ("MISSING_PERMISSION", 0.0),
        ("UNKNOWN", 0.0),
    ];
    wait_until(
        "credsync_credentials by status",
        Duration::from_secs(10),
        || async {
            let text = app.metrics().await;
            expected.iter().all(|(status, n)| {
                sample(
                    &text,
                    &format!("credsync_credentials{{status=\"{status}\"}}"),
                ) == Some(*n)
            })
        },
    )
    .await;
}

#[tokio::test]
async fn readiness_is_503_when_postgres_is_unreachable() {
    // Started without migrations (`serve --no-migrate`) while Postgres is down: it stays up.
    let app = spawn_app_with(AppOptions {
        db_url: Some("postgres://postgres@127.0.0.1:1/none".into()),
        ..without_migrations()
    })
    .await;
    let r = app.get_open("/readyz").await;
    assert_eq!(r.status(), 503);
    let r = app.get(Uuid::new_v4(), ALL_SCOPES).await;
    assert!(r.headers().get("retry-after").is_some());
    assert_problem(r, 503, "database-unavailable").await;
}

/// `/readyz` reports whether Leaf answered credsync's last request: unknown before the first,
/// `true` once Leaf answered, `false` when the last one was refused.
#[tokio::test]
async fn readiness_reports_whether_leaf_answered_the_last_request() {
    async fn reachable(app: &TestApp) -> Value {
        let r = app.get_open("/readyz").await;
        assert_eq!(r.status(), 200, "Leaf is reported, not required");
        r.json::<Value>().await.unwrap()["leaf"]["reachable"].clone()
    }
    let app = spawn_app().await;
    assert_eq!(reachable(&app).await, Value::Null);
    assert_eq!(
        app.create(Uuid::new_v4(), &body("c", "reachable000"))
            .await
            .status(),
        201
    );
    assert_eq!(reachable(&app).await, json!(true));

    let refused =
        spawn_app_with(AppOptions::default().env("LEAF_API_URL", "http://127.0.0.1:9")).await;
    let r = refused.get(Uuid::new_v4(), ALL_SCOPES).await;
    assert_problem(r, 503, "upstream-unavailable").await;
    assert_eq!(reachable(&refused).await, json!(false));
}

/// How many times credsync authenticated at the simulator.
async fn authentications(app: &TestApp) -> usize {
    app.sim_requests()
        .await
        .iter()
        .filter(|(_, p)| p == "/api/authenticate")
        .count()
}

#[tokio::test]
async fn credsync_renews_its_leaf_token_before_expiry_and_after_a_revocation() {
    let mut opts = AppOptions::default();
    opts.sim.token_ttl = Duration::from_secs(3);
    let app = spawn_app_with(opts).await;
    let user = Uuid::new_v4();
    assert_eq!(
        app.create(user, &body("c", "renewal00000")).await.status(),
        201
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(app.get(user, "credentials:read").await.status(), 200);
    let auths = authentications(&app).await;
    assert_eq!(auths, 2, "renewed ahead of expiry");
    let r = app.sim_post("/__sim/tokens/revoke", json!({})).await;
    assert_eq!(r.status(), 204);
    let r = app.get(user, "credentials:read").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-credsync-source"],
        "leaf",
        "re-authenticated and retried once"
    );
    let auths = authentications(&app).await;
    assert_eq!(auths, 3);
    // Requests refused together (the token revoked under them, here while Leaf is slow) renew
    // it once: the first to renew authenticates, the others take its token.
    app.fault(json!({"latencyMs": 300, "method": "GET"})).await;
    let revoke = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        app.sim_post("/__sim/tokens/revoke", json!({})).await
    };
    let reads = futures_util::future::join_all((0..6).map(|_| app.get(user, "credentials:read")));
    let (answers, revoked) = tokio::join!(reads, revoke);
    assert_eq!(revoked.status(), 204);
    for r in answers {
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-credsync-source"], "leaf");
    }
    let auths = authentications(&app).await;
    assert_eq!(auths, 4, "one renewal for the six refused reads");
}

#[tokio::test]
async fn leaf_refusing_credsyncs_own_credentials_is_never_the_callers_401() {
    let app = spawn_app_with(AppOptions::default().env("LEAF_PASSWORD", "wrong-password")).await;
    let user = Uuid::new_v4();
    let p = assert_problem(
        app.get(user, "credentials:read").await,
        502,
        "upstream-auth",
    )
    .await;
    assert_eq!(p["detail"], "Leaf rejected credsync's credentials");
    let r = app.create(user, &body("c", "authrej00000")).await;
    assert_eq!(r.status(), 202, "writes are queued");
    let r = app.get(user, "credentials:read").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credsync-source"], "cache");
    let v: Value = app.get_open("/readyz").await.json().await.unwrap();
    assert_eq!(v["leaf"]["authenticated"], false);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_is_cut_off() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let app = spawn_app().await;
    let addr = app.address.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the server kept a half-sent request open for 20 s"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    let text = String::from_utf8_lossy(&buf);
    assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let app = spawn_app().await;
    let mut req = app.client.get(format!("{}/healthz", app.address));
    for i in 0..200 {
        req = req.header(format!("x-filler-{i}"), "y".repeat(100));
    }
    let status = match req.send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0, // connection closed: refused too
    };
    assert!(status == 0 || status == 400 || status == 431, "{status}");
}

/// `serve --no-migrate` on a database nobody migrated yet: the service starts, `/readyz` says
/// the migrations are pending (503), and turns 200 once `credsync migrate` (here, the same
/// migrator) has run, without a restart.
#[tokio::test]
async fn no_migrate_on_an_empty_database_serves_and_is_ready_once_migrated() {
    let app = spawn_app_with(without_migrations()).await;
    let readyz = || async {
        let r = app.get_open("/readyz").await;
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let (status, ready) = readyz().await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["migrations"], "pending", "{ready}");
    credsync::store::migrate(&app.db).await.unwrap();
    wait_until("/readyz to answer 200", Duration::from_secs(20), || async {
        readyz().await.0 == 200
    })
    .await;
    assert_eq!(
        app.create(Uuid::new_v4(), &body("cid", "late-migr000"))
            .await
            .status(),
        201
    );
}
