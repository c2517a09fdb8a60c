//! credsync's own API (SPEC §6): the cross-user read routes, keyset pagination with
//! tamper-evident cursors, and Leaf's signed alerts webhook.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::helpers::*;

const CFV: &str = "climate-field-view";
const WEBHOOK_SECRET: &str = "webhook-secret-for-tests";

// ---------------------------------------------------------------------------------------------
// helpers

async fn get_v1(app: &TestApp, path: &str, scope: &str) -> reqwest::Response {
    app.get_path(path, scope).await
}

async fn ok_json(app: &TestApp, path: &str, scope: &str) -> Value {
    let r = get_v1(app, path, scope).await;
    assert_eq!(r.status(), 200, "GET {path}");
    r.json().await.unwrap()
}

/// Every item of a list route, page by page with `limit`, asserting the page shape.
async fn walk(app: &TestApp, path: &str, limit: u32) -> Vec<Value> {
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let url = match &cursor {
            None => format!("{path}{sep}limit={limit}"),
            Some(c) => format!("{path}{sep}limit={limit}&cursor={c}"),
        };
        let page = ok_json(app, &url, "status:read admin").await;
        let got = page["items"].as_array().unwrap();
        assert!(got.len() <= limit as usize);
        items.extend(got.iter().cloned());
        match &page["nextCursor"] {
            Value::Null => return items,
            Value::String(c) => {
                assert!(!got.is_empty(), "a page with a next cursor has items");
                cursor = Some(c.clone());
            }
            other => panic!("nextCursor {other}"),
        }
    }
    panic!("pagination never ended");
}

fn ago(secs: i64) -> OffsetDateTime {
    // Whole microseconds, as Postgres keeps them.
    let t = OffsetDateTime::now_utc() - time::Duration::seconds(secs);
    t.replace_nanosecond(t.microsecond() * 1000).unwrap()
}

fn rfc(t: OffsetDateTime) -> String {
    credsync::timefmt::format(t)
}

struct Cred {
    user: Uuid,
    state: &'static str,
    status: Option<&'static str>,
    changed_at: Option<OffsetDateTime>,
    checked_at: Option<OffsetDateTime>,
}

impl Cred {
    fn new(state: &'static str, status: Option<&'static str>) -> Cred {
        Cred {
            user: Uuid::new_v4(),
            state,
            status,
            changed_at: status.map(|_| ago(60)),
            checked_at: status.map(|_| ago(30)),
        }
    }
}

async fn insert_cred(app: &TestApp, c: &Cred) {
    let rejected = c.state == "REJECTED";
    sqlx::query(
        "insert into credential (leaf_user_id, provider, sync_state, status, checked_at, changed_at,
             rejection_status, rejection_detail)
         values ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(c.user)
    .bind(CFV)
    .bind(c.state)
    .bind(c.status)
    .bind(c.checked_at)
    .bind(c.changed_at)
    .bind(rejected.then_some(400))
    .bind(rejected.then_some("refreshToken is invalid"))
    .execute(&app.db)
    .await
    .unwrap();
}

async fn insert_event(db: &sqlx::PgPool, user: Uuid, id: &str, created: OffsetDateTime, code: i32) {
    sqlx::query(
        "insert into event (leaf_user_id, provider, id, created_date, status_code, headers, body)
         values ($1, $2, $3, $4, $5, 'h', 'b')",
    )
    .bind(user)
    .bind(CFV)
    .bind(id)
    .bind(created)
    .bind(code)
    .execute(db)
    .await
    .unwrap();
}

async fn insert_history(
    app: &TestApp,
    user: Uuid,
    from: Option<&str>,
    to: &str,
    at: OffsetDateTime,
    source: &str,
) {
    sqlx::query(
        "insert into status_history (leaf_user_id, provider, from_status, to_status, at, source)
         values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(user)
    .bind(CFV)
    .bind(from)
    .bind(to)
    .bind(at)
    .bind(source)
    .execute(&app.db)
    .await
    .unwrap();
}

async fn insert_audit(
    app: &TestApp,
    actor: &str,
    action: &str,
    user: Option<Uuid>,
    at: OffsetDateTime,
) {
    sqlx::query(
        "insert into audit (actor, action, leaf_user_id, provider, outcome, request_id, detail, at)
         values ($1, $2, $3, $4, 'success', 'req-1', null, $5)",
    )
    .bind(actor)
    .bind(action)
    .bind(user)
    .bind(user.map(|_| CFV))
    .bind(at)
    .execute(&app.db)
    .await
    .unwrap();
}

fn users_of(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| i["leafUserId"].as_str().unwrap().to_owned())
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn sign(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(credsync::crypto::hmac_sha256(
        WEBHOOK_SECRET.as_bytes(),
        body,
    ))
}

async fn spawn_with_webhook() -> TestApp {
    spawn_app_with(AppOptions::default().env("LEAF_WEBHOOK_SECRET", WEBHOOK_SECRET)).await
}

async fn post_alert(app: &TestApp, body: &[u8], signature: Option<&str>) -> reqwest::Response {
    let mut req = app
        .client
        .post(format!("{}/v1/leaf/alerts", app.address))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(s) = signature {
        req = req.header("x-leaf-signature", s);
    }
    req.send().await.unwrap()
}

async fn sim_token(app: &TestApp) -> String {
    let v: Value = app
        .client
        .post(format!("{}/api/authenticate", app.sim_url))
        .json(&json!({"username": "leaf-user", "password": "leaf-pass", "rememberMe": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["id_token"].as_str().unwrap().to_owned()
}

/// Register credsync's alerts webhook at the simulator (which then sends its signed confirmation).
async fn register_webhook(app: &TestApp) {
    let r = app
        .client
        .post(format!(
            "{}/services/alerts/api/alerts/webhooks",
            app.sim_url
        ))
        .bearer_auth(sim_token(app).await)
        .json(&json!({
            "events": ["credentialsUnauthenticated", "credentialsLimitedPermission"],
            "name": "credsync",
            "secret": WEBHOOK_SECRET,
            "url": format!("{}/v1/leaf/alerts", app.address),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "webhook registered");
}

async fn history_of(app: &TestApp, user: Uuid) -> Vec<Value> {
    ok_json(
        app,
        &format!("/v1/users/{user}/status-history"),
        "status:read",
    )
    .await["items"]
        .as_array()
        .unwrap()
        .clone()
}

async fn credential_item(app: &TestApp, user: Uuid) -> Value {
    let all = walk(app, "/v1/credentials", 1000).await;
    all.into_iter()
        .find(|i| i["leafUserId"] == user.to_string())
        .expect("listed")
}

// ---------------------------------------------------------------------------------------------
// authentication and scopes

#[tokio::test]
async fn v1_read_routes_need_a_token_and_the_status_read_scope() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    for path in [
        "/v1/credentials".to_owned(),
        "/v1/credentials/summary".to_owned(),
        format!("/v1/users/{user}/status-history"),
        "/v1/events".to_owned(),
        "/v1/audit".to_owned(),
    ] {
        let r = app
            .client
            .get(format!("{}{path}", app.address))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers()["www-authenticate"],
            r#"Bearer realm="credsync""#
        );
        assert_problem(r, 401, "missing-token").await;
        let r = get_v1(&app, &path, "credentials:read credentials:reveal").await;
        assert_problem(r, 403, "insufficient-scope").await;
        assert_eq!(get_v1(&app, &path, "admin").await.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn the_audit_trail_needs_admin_and_status_read_is_not_enough() {
    let app = spawn_app().await;
    let r = get_v1(&app, "/v1/audit", "status:read").await;
    let www = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(www.contains(r#"scope="admin""#), "{www}");
    assert_problem(r, 403, "insufficient-scope").await;
    for path in ["/v1/credentials", "/v1/credentials/summary", "/v1/events"] {
        assert_eq!(get_v1(&app, path, "status:read").await.status(), 200);
    }
}

// ---------------------------------------------------------------------------------------------
// GET /v1/credentials

#[tokio::test]
async fn credentials_list_shows_every_visible_credential_with_its_fields() {
    let app = spawn_app().await;
    let ok = Cred::new("SYNCED", Some("OK"));
    let broken = Cred::new("SYNCED", Some("UNAUTHENTICATED"));
    let pending = Cred::new("PENDING_UPSTREAM", None);
    let rejected = Cred::new("REJECTED", None);
    let deleting = Cred::new("DELETE_PENDING", Some("OK"));
    for c in [&ok, &broken, &pending, &rejected, &deleting] {
        insert_cred(&app, c).await;
    }
    let page = ok_json(&app, "/v1/credentials", "status:read").await;
    assert_eq!(page["nextCursor"], Value::Null);
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 4, "a pending delete is never listed");
    let listed = users_of(items);
    assert!(!listed.contains(&deleting.user.to_string()));
    assert_eq!(listed, sorted(listed.clone()), "ordered by leafUserId");

    let by_user: HashMap<String, &Value> = items
        .iter()
        .map(|i| (i["leafUserId"].as_str().unwrap().to_owned(), i))
        .collect();
    let o = by_user[&ok.user.to_string()];
    assert_eq!(o["provider"], CFV);
    assert_eq!(o["status"], "OK");
    assert_eq!(o["syncState"], "SYNCED");
    assert_eq!(o["rejection"], Value::Null);
    assert_eq!(o["changedAt"], rfc(ok.changed_at.unwrap()));
    assert_eq!(o["checkedAt"], rfc(ok.checked_at.unwrap()));
    assert!(o["createdAt"].as_str().unwrap().ends_with('Z'));
    assert!(o["updatedAt"].is_string());
    let keys: HashSet<&str> = o.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        HashSet::from([
            "leafUserId",
            "provider",
            "status",
            "checkedAt",
            "changedAt",
            "syncState",
            "rejection",
            "createdAt",
            "updatedAt"
        ])
    );
    let p = by_user[&pending.user.to_string()];
    assert_eq!(p["status"], Value::Null);
    assert_eq!(p["checkedAt"], Value::Null);
    assert_eq!(p["changedAt"], Value::Null);
    let r = by_user[&rejected.user.to_string()];
    assert_eq!(r["syncState"], "REJECTED");
    assert_eq!(
        r["rejection"],
        json!({"status": 400, "detail": "refreshToken is invalid"})
    );
}

#[tokio::test]
async fn credentials_list_filters_by_status_sync_state_and_changed_since() {
    let app = spawn_app().await;
    let mut old_broken = Cred::new("SYNCED", Some("UNAUTHENTICATED"));
    old_broken.changed_at = Some(ago(7200));
    let new_broken = Cred::new("SYNCED", Some("UNAUTHENTICATED"));
    let ok = Cred::new("SYNCED", Some("OK"));
    let odd = Cred::new("SYNCED", Some("SOMETHING_NEW"));
    let pending = Cred::new("PENDING_UPSTREAM", None);
    let rejected = Cred::new("REJECTED", None);
    let deleting = Cred::new("DELETE_PENDING", Some("UNAUTHENTICATED"));
    for c in [
        &old_broken,
        &new_broken,
        &ok,
        &odd,
        &pending,
        &rejected,
        &deleting,
    ] {
        insert_cred(&app, c).await;
    }
    let list = |q: &'static str| {
        let app = &app;
        async move {
            sorted(users_of(
                ok_json(app, &format!("/v1/credentials?{q}"), "status:read").await["items"]
                    .as_array()
                    .unwrap(),
            ))
        }
    };
    let ids = |cs: &[&Cred]| sorted(cs.iter().map(|c| c.user.to_string()).collect());

    assert_eq!(
        list("status=UNAUTHENTICATED").await,
        ids(&[&old_broken, &new_broken])
    );
    assert_eq!(list("status=SOMETHING_NEW").await, ids(&[&odd]));
    // A status outside the known ones is bound, never written into the SQL.
    assert!(
        list("status=OK%27%3B%20drop%20table%20credential%3B--")
            .await
            .is_empty()
    );
    assert_eq!(list("status=OK").await, ids(&[&ok]));
    assert_eq!(
        list("status=UNKNOWN").await,
        ids(&[&pending, &rejected]),
        "UNKNOWN selects credentials without a status"
    );
    assert_eq!(list("syncState=REJECTED").await, ids(&[&rejected]));
    assert_eq!(list("syncState=PENDING_UPSTREAM").await, ids(&[&pending]));
    assert_eq!(list("syncState=SYNCED").await.len(), 4);
    let since = rfc(new_broken.changed_at.unwrap());
    let q = format!(
        "/v1/credentials?status=UNAUTHENTICATED&changedSince={}",
        since.replace(':', "%3A")
    );
    let items = ok_json(&app, &q, "status:read").await;
    assert_eq!(
        users_of(items["items"].as_array().unwrap()),
        vec![new_broken.user.to_string()],
        "changedSince is inclusive"
    );
    // An offset other than Z is accepted.
    let q = "/v1/credentials?changedSince=2000-01-01T00:00:00%2B02:00&syncState=SYNCED";
    assert_eq!(
        ok_json(&app, q, "status:read").await["items"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
}

#[tokio::test]
async fn credentials_list_refuses_bad_parameters_with_a_400_naming_them() {
    let app = spawn_app().await;
    for (q, name) in [
        ("syncState=DELETE_PENDING", "syncState"),
        ("syncState=synced", "syncState"),
        ("changedSince=yesterday", "changedSince"),
        ("changedSince=2026-01-02T03:04:05", "changedSince"),
        ("status=", "status"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=x", "limit"),
        ("limit=-1", "limit"),
        ("limit=2.5", "limit"),
        ("limit=", "limit"),
        ("limit=1&limit=2", "limit"),
        ("cursor=abc", "cursor"),
    ] {
        let r = get_v1(&app, &format!("/v1/credentials?{q}"), "status:read").await;
        let p = assert_problem(r, 400, "validation").await;
        assert!(
            p["detail"].as_str().unwrap().contains(name),
            "{q}: {}",
            p["detail"]
        );
    }
    // Unknown parameters are ignored; the bounds themselves are fine.
    for q in ["foo=bar", "limit=1", "limit=1000"] {
        assert_eq!(
            get_v1(&app, &format!("/v1/credentials?{q}"), "status:read")
                .await
                .status(),
            200
        );
    }
}

#[tokio::test]
async fn paging_credentials_with_limit_2_visits_every_matching_row_exactly_once() {
    let app = spawn_app().await;
    let mut synced = Vec::new();
    for i in 0..7 {
        let c = Cred::new(
            "SYNCED",
            Some(if i % 2 == 0 { "OK" } else { "UNAUTHENTICATED" }),
        );
        insert_cred(&app, &c).await;
        synced.push(c);
    }
    insert_cred(&app, &Cred::new("DELETE_PENDING", None)).await;
    insert_cred(&app, &Cred::new("REJECTED", None)).await;

    let all = walk(&app, "/v1/credentials", 2).await;
    assert_eq!(all.len(), 8);
    let users = users_of(&all);
    assert_eq!(users, sorted(users.clone()), "pages continue in order");
    assert_eq!(
        users.iter().collect::<HashSet<_>>().len(),
        8,
        "no duplicates"
    );

    let ok = walk(&app, "/v1/credentials?status=OK", 2).await;
    let expected: Vec<String> = sorted(
        synced
            .iter()
            .filter(|c| c.status == Some("OK"))
            .map(|c| c.user.to_string())
            .collect(),
    );
    assert_eq!(users_of(&ok), expected);
    // Exactly `limit` matching rows: one page, no cursor.
    let page = ok_json(&app, "/v1/credentials?status=OK&limit=4", "status:read").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 4);
    assert_eq!(page["nextCursor"], Value::Null);
}

#[tokio::test]
async fn paging_credentials_while_rows_are_inserted_has_no_gaps_or_duplicates() {
    let app = spawn_app().await;
    let mut initial = HashSet::new();
    for _ in 0..30 {
        let c = Cred::new("SYNCED", Some("OK"));
        insert_cred(&app, &c).await;
        initial.insert(c.user.to_string());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let db = app.db.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                sqlx::query(
                    "insert into credential (leaf_user_id, provider, sync_state, status) values ($1, $2, 'SYNCED', 'OK')",
                )
                .bind(Uuid::new_v4())
                .bind(CFV)
                .execute(&db)
                .await
                .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        })
    };
    let seen = users_of(&walk(&app, "/v1/credentials", 2).await);
    stop.store(true, Ordering::Relaxed);
    let inserted = writer.await.unwrap();
    assert!(inserted > 0, "rows were inserted during the walk");
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no duplicates");
    assert!(initial.is_subset(&unique), "every initial row was seen");
}

#[tokio::test]
async fn a_forged_altered_or_foreign_cursor_is_a_400_naming_cursor() {
    let app = spawn_app().await;
    for _ in 0..3 {
        insert_cred(&app, &Cred::new("SYNCED", Some("OK"))).await;
    }
    let user = Uuid::new_v4();
    insert_event(&app.db, user, "e1", ago(10), 200).await;
    insert_event(&app.db, user, "e2", ago(20), 200).await;
    let page = ok_json(&app, "/v1/credentials?limit=1", "status:read").await;
    let cursor = page["nextCursor"].as_str().unwrap().to_owned();
    // The genuine cursor works.
    let r = get_v1(
        &app,
        &format!("/v1/credentials?limit=1&cursor={cursor}"),
        "status:read",
    )
    .await;
    assert_eq!(r.status(), 200);

    let (payload, mac) = cursor.split_once('.').unwrap();
    let mut decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    // Point the cursor at another key without re-signing it.
    let last = decoded.len() - 3;
    decoded[last] ^= 1;
    let edited = format!(
        "{}.{mac}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&decoded)
    );
    let forged_payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!(r#"{{"kid":"k1","k":["{}","{CFV}"]}}"#, Uuid::nil()));
    let events_cursor = ok_json(&app, "/v1/events?limit=1", "status:read").await["nextCursor"]
        .as_str()
        .unwrap()
        .to_owned();
    for (query, why) in [
        (format!("cursor={edited}"), "edited payload"),
        (format!("cursor={forged_payload}.{mac}"), "forged payload"),
        (format!("cursor={payload}.{}", "A".repeat(43)), "forged mac"),
        (format!("cursor={payload}"), "no mac"),
        (
            "cursor=%27%3B%20drop%20table%20credential%3B--".to_owned(),
            "injection",
        ),
        (format!("cursor={events_cursor}"), "another route's cursor"),
        (
            format!("cursor={cursor}&status=OK"),
            "the same cursor with other filters",
        ),
    ] {
        let r = get_v1(
            &app,
            &format!("/v1/credentials?limit=1&{query}"),
            "status:read",
        )
        .await;
        let p = assert_problem(r, 400, "validation").await;
        assert!(p["detail"].as_str().unwrap().starts_with("cursor"), "{why}");
    }
    assert_eq!(app.count("select count(*) from credential").await, 3);
}

#[tokio::test]
async fn a_cursor_keeps_working_after_a_key_rotation() {
    let db_url = crate::db::fresh_database_url().await;
    let app = spawn_app_with(AppOptions {
        db_url: Some(db_url.clone()),
        ..AppOptions::default()
    })
    .await;
    for _ in 0..3 {
        insert_cred(&app, &Cred::new("SYNCED", Some("OK"))).await;
    }
    let first = ok_json(&app, "/v1/credentials?limit=1", "status:read").await;
    let cursor = first["nextCursor"].as_str().unwrap().to_owned();
    app.stop().await;
    let rotated = spawn_app_with(
        AppOptions {
            db_url: Some(db_url),
            ..AppOptions::default()
        }
        .env(
            "CREDSYNC_ENCRYPTION_KEYS",
            format!("k1:{},k2:{}", key_b64(1), key_b64(2)),
        )
        .env("CREDSYNC_ACTIVE_KEY_ID", "k2"),
    )
    .await;
    let next = ok_json(
        &rotated,
        &format!("/v1/credentials?limit=1&cursor={cursor}"),
        "status:read",
    )
    .await;
    assert_eq!(next["items"].as_array().unwrap().len(), 1);
    assert_ne!(next["items"][0], first["items"][0]);
}

// ---------------------------------------------------------------------------------------------
// GET /v1/credentials/summary

#[tokio::test]
async fn the_summary_of_an_empty_store_shows_every_key_with_zero() {
    let app = spawn_app().await;
    let v = ok_json(&app, "/v1/credentials/summary", "status:read").await;
    assert_eq!(
        v,
        json!({
            "total": 0,
            "byStatus": {"OK": 0, "UNAUTHENTICATED": 0, "MISSING_PERMISSION": 0, "TEMPORARILY_UNAVAILABLE": 0, "UNKNOWN": 0},
            "bySyncState": {"SYNCED": 0, "PENDING_UPSTREAM": 0, "REJECTED": 0},
            "oldestCheckAt": null,
        })
    );
}

#[tokio::test]
async fn the_summary_counts_rejected_credentials_but_not_pending_deletes() {
    let app = spawn_app().await;
    let mut oldest = Cred::new("SYNCED", Some("OK"));
    oldest.checked_at = Some(ago(5000));
    let mut deleting = Cred::new("DELETE_PENDING", Some("OK"));
    deleting.checked_at = Some(ago(90_000));
    for c in [
        &oldest,
        &Cred::new("SYNCED", Some("OK")),
        &Cred::new("SYNCED", Some("UNAUTHENTICATED")),
        &Cred::new("SYNCED", Some("SOMETHING_NEW")),
        &Cred::new("PENDING_UPSTREAM", None),
        &Cred::new("REJECTED", None),
        &deleting,
        &Cred::new("DELETE_PENDING", None),
    ] {
        insert_cred(&app, c).await;
    }
    let v = ok_json(&app, "/v1/credentials/summary", "status:read").await;
    assert_eq!(
        v,
        json!({
            "total": 6,
            "byStatus": {
                "OK": 2, "UNAUTHENTICATED": 1, "MISSING_PERMISSION": 0,
                "TEMPORARILY_UNAVAILABLE": 0, "UNKNOWN": 2, "SOMETHING_NEW": 1
            },
            "bySyncState": {"SYNCED": 4, "PENDING_UPSTREAM": 1, "REJECTED": 1},
            "oldestCheckAt": rfc(oldest.checked_at.unwrap()),
        })
    );
}

// ---------------------------------------------------------------------------------------------
// GET /v1/users/{leafUserId}/status-history

#[tokio::test]
async fn status_history_lists_a_users_transitions_newest_first_and_pages() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    let other = Uuid::new_v4();
    let t = ago(1000);
    insert_history(&app, user, None, "OK", t, "request").await;
    insert_history(&app, user, Some("OK"), "UNAUTHENTICATED", ago(500), "sync").await;
    // Two transitions at the same instant: the later id comes first.
    let same = ago(100);
    insert_history(&app, user, Some("UNAUTHENTICATED"), "OK", same, "alert").await;
    insert_history(&app, user, Some("OK"), "MISSING_PERMISSION", same, "alert").await;
    insert_history(&app, other, None, "OK", ago(50), "sync").await;

    let items = history_of(&app, user).await;
    assert_eq!(items.len(), 4);
    assert_eq!(
        items[0],
        json!({"from": "OK", "to": "MISSING_PERMISSION", "at": rfc(same), "source": "alert"})
    );
    assert_eq!(items[1]["to"], "OK");
    assert_eq!(items[2]["source"], "sync");
    assert_eq!(
        items[3],
        json!({"from": null, "to": "OK", "at": rfc(t), "source": "request"})
    );
    let paged = walk(&app, &format!("/v1/users/{user}/status-history"), 2).await;
    assert_eq!(paged, items);
    // A cursor of one user is not accepted for another.
    let page = ok_json(
        &app,
        &format!("/v1/users/{user}/status-history?limit=1"),
        "status:read",
    )
    .await;
    let c = page["nextCursor"].as_str().unwrap();
    let r = get_v1(
        &app,
        &format!("/v1/users/{other}/status-history?cursor={c}"),
        "status:read",
    )
    .await;
    assert_problem(r, 400, "validation").await;
}

#[tokio::test]
async fn status_history_of_an_unknown_user_is_empty_and_a_bad_id_is_a_400() {
    let app = spawn_app().await;
    let v = ok_json(
        &app,
        &format!("/v1/users/{}/status-history", Uuid::new_v4()),
        "status:read",
    )
    .await;
    assert_eq!(v, json!({"items": [], "nextCursor": null}));
    let r = get_v1(&app, "/v1/users/not-a-uuid/status-history", "status:read").await;
    let p = assert_problem(r, 400, "validation").await;
    assert!(p["detail"].as_str().unwrap().contains("leafUserId"));
    let r = get_v1(
        &app,
        &format!("/v1/users/{}/status-history?limit=0", Uuid::new_v4()),
        "status:read",
    )
    .await;
    assert_problem(r, 400, "validation").await;
}

// ---------------------------------------------------------------------------------------------
// GET /v1/events

#[tokio::test]
async fn events_across_users_are_newest_first_and_filtered() {
    let app = spawn_app().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let t0 = ago(3600);
    let t1 = ago(1800);
    let t2 = ago(60);
    insert_event(&app.db, a, "a-old", t0, 200).await;
    insert_event(&app.db, a, "a-mid", t1, 401).await;
    insert_event(&app.db, b, "b-mid", t1, 500).await;
    insert_event(&app.db, b, "b-new", t2, 200).await;

    let all = ok_json(&app, "/v1/events", "status:read").await;
    let items = all["items"].as_array().unwrap();
    let ids: Vec<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        ["b-new", "b-mid", "a-mid", "a-old"],
        "createdDate, then id, descending"
    );
    assert_eq!(
        items[0],
        json!({
            "leafUserId": b.to_string(), "provider": CFV, "id": "b-new",
            "createdDate": rfc(t2), "statusCode": 200, "headers": "h", "body": "b"
        })
    );
    let ids_for = |q: String| {
        let app = &app;
        async move {
            ok_json(app, &format!("/v1/events?{q}"), "status:read").await["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let enc = |t: OffsetDateTime| rfc(t).replace(':', "%3A");
    assert_eq!(ids_for(format!("leafUserId={a}")).await, ["a-mid", "a-old"]);
    assert_eq!(ids_for("statusCode=200".into()).await, ["b-new", "a-old"]);
    assert_eq!(
        ids_for("minStatusCode=400".into()).await,
        ["b-mid", "a-mid"]
    );
    assert_eq!(
        ids_for(format!("since={}", enc(t1))).await,
        ["b-new", "b-mid", "a-mid"],
        "since is inclusive"
    );
    assert_eq!(
        ids_for(format!("until={}", enc(t1))).await,
        ["a-old"],
        "until is exclusive"
    );
    // Bounds finer than the stored microseconds: 100 ns after t1.
    let past_t1 = enc(t1).replace('Z', "1Z");
    assert_eq!(
        ids_for(format!("since={past_t1}")).await,
        ["b-new"],
        "an event before since is out"
    );
    assert_eq!(
        ids_for(format!("until={past_t1}")).await,
        ["b-mid", "a-mid", "a-old"],
        "an event before until is in"
    );
    assert_eq!(
        ids_for(format!(
            "since={}&until={}&minStatusCode=500&leafUserId={b}",
            enc(t0),
            enc(t2)
        ))
        .await,
        ["b-mid"]
    );
}

#[tokio::test]
async fn events_paging_walks_ties_across_users_exactly_once() {
    let app = spawn_app().await;
    // Event ids are only unique per credential: the same ids at the same instant for many users.
    let same = ago(100);
    let mut expected = HashSet::new();
    for _ in 0..5 {
        let u = Uuid::new_v4();
        for id in ["e1", "e2"] {
            insert_event(&app.db, u, id, same, 200).await;
            expected.insert((u.to_string(), id.to_owned()));
        }
        insert_event(&app.db, u, "older", ago(200), 500).await;
    }
    let items = walk(&app, "/v1/events?since=2000-01-01T00:00:00Z", 2).await;
    assert_eq!(items.len(), 15);
    let keys: Vec<(String, String)> = items
        .iter()
        .map(|i| {
            (
                i["leafUserId"].as_str().unwrap().to_owned(),
                i["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        keys.iter().collect::<HashSet<_>>().len(),
        15,
        "no duplicates"
    );
    let first_ten: HashSet<(String, String)> = keys[..10].iter().cloned().collect();
    assert_eq!(first_ten, expected, "the newest instant first");
    assert!(items[10..].iter().all(|i| i["id"] == "older"));
    let failures = walk(&app, "/v1/events?minStatusCode=500", 2).await;
    assert_eq!(failures.len(), 5);
}

#[tokio::test]
async fn paging_events_while_events_are_inserted_has_no_gaps_or_duplicates() {
    let app = spawn_app().await;
    let users: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let mut initial = HashSet::new();
    // Many ties on createdDate, within and across users.
    let instants: Vec<OffsetDateTime> = (0..4).map(|k| ago(k * 10)).collect();
    for u in &users {
        for i in 0..10 {
            let id = format!("e{i}");
            insert_event(&app.db, *u, &id, instants[i % 4], 200).await;
            initial.insert(format!("{u}/{id}"));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let db = app.db.clone();
        let stop = stop.clone();
        let users = users.clone();
        let instants = instants.clone();
        tokio::spawn(async move {
            let mut n: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                // New events: newer, older and exactly tied with existing ones.
                let created = match n % 3 {
                    0 => ago(-60),
                    1 => ago(10_000),
                    _ => instants[(n % 4) as usize],
                };
                let u = users[(n % 3) as usize];
                insert_event(&db, u, &format!("new-{n}"), created, 200).await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        })
    };
    let items = walk(&app, "/v1/events", 2).await;
    stop.store(true, Ordering::Relaxed);
    assert!(writer.await.unwrap() > 0);
    let seen: Vec<String> = items
        .iter()
        .map(|i| {
            format!(
                "{}/{}",
                i["leafUserId"].as_str().unwrap(),
                i["id"].as_str().unwrap()
            )
        })
        .collect();
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no duplicates");
    assert!(initial.is_subset(&unique), "every initial event was seen");
}

#[tokio::test]
async fn events_with_bad_parameters_are_a_400_naming_the_parameter() {
    let app = spawn_app().await;
    for (q, name) in [
        ("since=yesterday", "since"),
        ("until=2026-13-01T00:00:00Z", "until"),
        ("since=2026-01-02", "since"),
        ("until=2026-01-02T03:04:05", "until"),
        ("statusCode=abc", "statusCode"),
        ("statusCode=1000", "statusCode"),
        ("minStatusCode=-1", "minStatusCode"),
        ("leafUserId=nope", "leafUserId"),
        ("limit=1001", "limit"),
        ("limit=0", "limit"),
        ("cursor=x.y", "cursor"),
    ] {
        let r = get_v1(&app, &format!("/v1/events?{q}"), "status:read").await;
        let p = assert_problem(r, 400, "validation").await;
        assert!(
            p["detail"].as_str().unwrap().starts_with(name),
            "{q}: {}",
            p["detail"]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// GET /v1/audit

#[tokio::test]
async fn the_audit_trail_is_newest_first_filtered_and_paged() {
    let app = spawn_app().await;
    let (u1, u2) = (Uuid::new_v4(), Uuid::new_v4());
    insert_audit(&app, "svc-a", "credential.create", Some(u1), ago(400)).await;
    insert_audit(&app, "svc-b", "credential.reveal", Some(u1), ago(300)).await;
    insert_audit(&app, "svc-a", "credential.delete", Some(u2), ago(200)).await;
    insert_audit(&app, "cli", "key.rotate", None, ago(100)).await;

    let all = walk(&app, "/v1/audit", 2).await;
    let actions: Vec<&str> = all.iter().map(|i| i["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "key.rotate",
            "credential.delete",
            "credential.reveal",
            "credential.create"
        ]
    );
    let rotate = &all[0];
    let mut keys: Vec<&str> = rotate
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "action",
            "actor",
            "at",
            "detail",
            "id",
            "leafUserId",
            "outcome",
            "requestId"
        ],
        "the fields SPEC §6 lists, and only those"
    );
    assert_eq!(rotate["leafUserId"], Value::Null);
    assert_eq!(rotate["actor"], "cli");
    assert_eq!(rotate["outcome"], "success");
    assert_eq!(rotate["requestId"], "req-1");
    assert_eq!(rotate["detail"], Value::Null);
    assert!(rotate["id"].is_string() && rotate["at"].is_string());
    assert_eq!(all[1]["leafUserId"], u2.to_string());

    let q = |q: String| {
        let app = &app;
        async move {
            ok_json(app, &format!("/v1/audit?{q}"), "admin").await["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["action"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        q(format!("leafUserId={u1}")).await,
        ["credential.reveal", "credential.create"]
    );
    assert_eq!(
        q("actor=svc-a".into()).await,
        ["credential.delete", "credential.create"]
    );
    assert_eq!(q("action=key.rotate".into()).await, ["key.rotate"]);
    let since = rfc(ago(300) - time::Duration::seconds(1)).replace(':', "%3A");
    assert_eq!(
        q(format!("since={since}&actor=svc-b")).await,
        ["credential.reveal"]
    );
    for (bad, name) in [
        ("action=credential.steal", "action"),
        ("leafUserId=x", "leafUserId"),
        ("since=now", "since"),
        ("limit=5000", "limit"),
    ] {
        let r = get_v1(&app, &format!("/v1/audit?{bad}"), "admin").await;
        let p = assert_problem(r, 400, "validation").await;
        assert!(p["detail"].as_str().unwrap().starts_with(name), "{bad}");
    }
}

#[tokio::test]
async fn creating_a_credential_shows_up_in_every_v1_view() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    assert_eq!(
        app.create(user, &body("cid", "v1view000000"))
            .await
            .status(),
        201
    );
    let item = credential_item(&app, user).await;
    assert_eq!(item["status"], "OK");
    assert_eq!(item["syncState"], "SYNCED");
    assert!(item["changedAt"].is_string() && item["checkedAt"].is_string());
    let history = history_of(&app, user).await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["from"], Value::Null);
    assert_eq!(history[0]["to"], "OK");
    let audit = ok_json(&app, &format!("/v1/audit?leafUserId={user}"), "admin").await;
    assert_eq!(audit["items"][0]["action"], "credential.create");
    assert_eq!(audit["items"][0]["actor"], "test-caller");
    let summary = ok_json(&app, "/v1/credentials/summary", "status:read").await;
    assert_eq!(summary["total"], 1);
    assert_eq!(summary["byStatus"]["OK"], 1);
}

// ---------------------------------------------------------------------------------------------
// POST /v1/leaf/alerts

#[tokio::test]
async fn a_signed_alert_from_leaf_changes_the_status_at_once_and_a_repeat_changes_nothing() {
    let app = spawn_with_webhook().await;
    let user = Uuid::new_v4();
    assert_eq!(
        app.create(user, &body("cid", "alert0000000"))
            .await
            .status(),
        201
    );
    register_webhook(&app).await;
    let r = app
        .sim_put(
            &format!("/__sim/users/{user}/climate-field-view-credentials/status"),
            json!({"status": "UNAUTHENTICATED", "alert": true}),
        )
        .await;
    assert_eq!(r.status(), 204);
    // The delivery is synchronous: the status is already changed.
    let item = credential_item(&app, user).await;
    assert_eq!(item["status"], "UNAUTHENTICATED");
    let history = history_of(&app, user).await;
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["from"], "OK");
    assert_eq!(history[0]["to"], "UNAUTHENTICATED");
    assert_eq!(history[0]["source"], "alert");
    let listed = ok_json(
        &app,
        "/v1/credentials?status=UNAUTHENTICATED",
        "status:read",
    )
    .await;
    assert_eq!(
        users_of(listed["items"].as_array().unwrap()),
        [user.to_string()]
    );

    // Leaf delivers at least once: a repeat changes nothing more.
    let r = app
        .sim_put(
            &format!("/__sim/users/{user}/climate-field-view-credentials/status"),
            json!({"status": "UNAUTHENTICATED", "alert": true}),
        )
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(history_of(&app, user).await.len(), 2);
    assert_eq!(
        credential_item(&app, user).await["changedAt"],
        item["changedAt"]
    );

    // A limited-permission alert without a status field: the type decides.
    let leaf_id = app.leaf_state(user).await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let raw = format!(
        r#"{{"credentialId": "{leaf_id}", "provider": "ClimateFieldView", "type": "credentialsLimitedPermission"}}"#
    );
    let r = post_alert(&app, raw.as_bytes(), Some(&sign(raw.as_bytes()))).await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        credential_item(&app, user).await["status"],
        "MISSING_PERMISSION"
    );
    // No webhook delivery failed (the signed registration confirmation included).
    let failed: Value = app
        .client
        .get(format!(
            "{}/services/alerts/api/alerts/webhooks/failed-calls",
            app.sim_url
        ))
        .bearer_auth(sim_token(&app).await)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(failed["items"], json!([]), "{failed}");
}

#[tokio::test]
async fn an_alert_with_a_wrong_or_missing_signature_is_a_401_and_changes_nothing() {
    let app = spawn_with_webhook().await;
    let user = Uuid::new_v4();
    let created: Value = app
        .create(user, &body("cid", "badsig000000"))
        .await
        .json()
        .await
        .unwrap();
    let leaf_id = created["id"].as_str().unwrap().to_owned();
    register_webhook(&app).await;
    for signature in ["invalid", "none"] {
        let r: Value = app
            .sim_post(
                "/__sim/alerts",
                json!({"credentialId": leaf_id, "status": "UNAUTHENTICATED", "signature": signature}),
            )
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(r["deliveries"][0]["status"], 401, "{signature}: {r}");
    }
    let raw = format!(
        r#"{{"credentialId": "{leaf_id}", "status": "UNAUTHENTICATED", "type": "credentialsUnauthenticated"}}"#
    );
    let good = sign(raw.as_bytes());
    let tampered = raw.replace("UNAUTHENTICATED\",", "MISSING_PERMISSION\",");
    for (body, sig) in [
        (raw.clone(), Some("not base64 at all!")),
        (raw.clone(), Some("")),
        (raw.clone(), None),
        (tampered, Some(good.as_str())),
    ] {
        let r = post_alert(&app, body.as_bytes(), sig).await;
        assert_problem(r, 401, "invalid-signature").await;
    }
    // Even Leaf's confirmation with a wrong signature is refused.
    let confirmation = br#"{"message": "confirmation of webhook upon registration"}"#;
    let r = post_alert(&app, confirmation, Some(&sign(b"something else"))).await;
    assert_problem(r, 401, "invalid-signature").await;

    assert_eq!(credential_item(&app, user).await["status"], "OK");
    assert_eq!(history_of(&app, user).await.len(), 1);
}

#[tokio::test]
async fn leafs_registration_confirmation_is_a_204_unsigned_or_signed() {
    let app = spawn_with_webhook().await;
    let confirmation = br#"{"message": "confirmation of webhook upon registration"}"#;
    assert_eq!(post_alert(&app, confirmation, None).await.status(), 204);
    assert_eq!(
        post_alert(&app, confirmation, Some(&sign(confirmation)))
            .await
            .status(),
        204
    );
    // Only that exact object counts as the confirmation.
    let other = br#"{"message": "confirmation of webhook upon registration", "x": 1}"#;
    assert_problem(
        post_alert(&app, other, None).await,
        401,
        "invalid-signature",
    )
    .await;
}

#[tokio::test]
async fn an_alert_for_an_unknown_credential_is_a_204_and_counted() {
    let app = spawn_with_webhook().await;
    let user = Uuid::new_v4();
    app.create(user, &body("cid", "unknown00000")).await;
    for id in [Uuid::new_v4().to_string(), "not-a-uuid".to_owned()] {
        let raw = format!(r#"{{"credentialId": "{id}", "status": "UNAUTHENTICATED"}}"#);
        let r = post_alert(&app, raw.as_bytes(), Some(&sign(raw.as_bytes()))).await;
        assert_eq!(r.status(), 204);
    }
    assert_eq!(credential_item(&app, user).await["status"], "OK");
    assert_eq!(
        app.count("select count(*) from status_history where source = 'alert'")
            .await,
        0
    );
    let metrics = app.metrics().await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("credsync_alerts_unknown_credential_total"))
        .expect("the unknown-credential counter is exported");
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 2.0, "{line}");
}

#[tokio::test]
async fn a_signed_alert_without_a_usable_status_changes_nothing() {
    let app = spawn_with_webhook().await;
    let user = Uuid::new_v4();
    app.create(user, &body("cid", "unusable0000")).await;
    let leaf_id = app.leaf_state(user).await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for raw in [
        format!(r#"{{"credentialId": "{leaf_id}", "type": "somethingElse"}}"#),
        format!(r#"{{"credentialId": "{leaf_id}", "status": "", "type": 7}}"#),
        r#"{"type": "credentialsUnauthenticated"}"#.to_owned(),
    ] {
        let r = post_alert(&app, raw.as_bytes(), Some(&sign(raw.as_bytes()))).await;
        assert_eq!(r.status(), 204, "{raw}");
    }
    assert_eq!(credential_item(&app, user).await["status"], "OK");
    assert_eq!(history_of(&app, user).await.len(), 1);
    // A signed body that is not a JSON object is a 400.
    for raw in [&b"not json"[..], b"[1, 2]"] {
        let r = post_alert(&app, raw, Some(&sign(raw))).await;
        assert_problem(r, 400, "validation").await;
    }
}

#[tokio::test]
async fn an_oversized_alert_is_a_413() {
    let app = spawn_app_with(
        AppOptions::default()
            .env("LEAF_WEBHOOK_SECRET", WEBHOOK_SECRET)
            .env("CREDSYNC_MAX_BODY_BYTES", "1024"),
    )
    .await;
    let raw = format!(r#"{{"credentialId": "{}"}}"#, "x".repeat(2000));
    let r = post_alert(&app, raw.as_bytes(), Some(&sign(raw.as_bytes()))).await;
    assert_problem(r, 413, "payload-too-large").await;
}

#[tokio::test]
async fn without_a_webhook_secret_the_alerts_route_is_a_404() {
    let app = spawn_app().await;
    let confirmation = br#"{"message": "confirmation of webhook upon registration"}"#;
    assert_problem(post_alert(&app, confirmation, None).await, 404, "not-found").await;
    let raw = br#"{"credentialId": "x"}"#;
    assert_problem(
        post_alert(&app, raw, Some(&sign(raw))).await,
        404,
        "not-found",
    )
    .await;
    let r = app
        .client
        .get(format!("{}/v1/leaf/alerts", app.address))
        .send()
        .await
        .unwrap();
    assert_problem(r, 404, "not-found").await;
    // With the secret, other methods are a 405.
    let app = spawn_with_webhook().await;
    let r = app
        .client
        .get(format!("{}/v1/leaf/alerts", app.address))
        .send()
        .await
        .unwrap();
    assert_problem(r, 405, "method-not-allowed").await;
}

#[tokio::test]
async fn the_summary_counts_stay_exact_through_changes_and_compaction() {
    let app = spawn_app().await;
    let users: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        assert_eq!(
            app.create(*u, &body("c", "summary00000")).await.status(),
            201
        );
    }
    sqlx::query("update credential set status = 'UNAUTHENTICATED' where leaf_user_id = $1")
        .bind(users[0])
        .execute(&app.db)
        .await
        .unwrap();
    sqlx::query("update credential set status = 'SOMETHING_NEW' where leaf_user_id = $1")
        .bind(users[1])
        .execute(&app.db)
        .await
        .unwrap();
    sqlx::query("update credential set sync_state = 'DELETE_PENDING' where leaf_user_id = $1")
        .bind(users[2])
        .execute(&app.db)
        .await
        .unwrap();
    sqlx::query("delete from credential where leaf_user_id = $1")
        .bind(users[3])
        .execute(&app.db)
        .await
        .unwrap();
    let direct = |app: &TestApp| {
        let db = app.db.clone();
        async move {
            let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
                "select status, count(*) from credential where sync_state <> 'DELETE_PENDING' group by status",
            )
            .fetch_all(&db)
            .await
            .unwrap();
            rows
        }
    };
    for compact in [false, true] {
        if compact {
            sqlx::query("select credential_count_compact()")
                .execute(&app.db)
                .await
                .unwrap();
            assert!(
                app.count("select count(*) from credential_count_delta")
                    .await
                    <= 3
            );
        }
        let s: Value = app
            .get_path("/v1/credentials/summary", "status:read")
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(s["total"], 4, "{s}");
        for (status, n) in direct(&app).await {
            let key = status.unwrap_or_else(|| "UNKNOWN".into());
            assert_eq!(s["byStatus"][&key], n, "{key} in {s}");
        }
        assert_eq!(s["byStatus"]["OK"], 2);
        assert_eq!(s["byStatus"]["SOMETHING_NEW"], 1);
    }
}
