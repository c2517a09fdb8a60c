//! The row cache (`rowcache`): forwarded reads that Leaf confirms skip the row read, and every
//! change to the row reaches the cache, from this process or from any other.
//!
//! A row changed with triggers off (`session_replication_role = replica`) is a change the cache
//! cannot hear about: a read served from the cache leaves it as it is, a read of the row puts
//! Leaf's status back. The TTL is ten minutes here, so only a notice (or a cleared cache) can
//! make a test that waits for the row to be read again pass.
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{AppOptions, TestApp, assert_problem, body, spawn_app_with, wait_until};

const SCOPE: &str = "credentials:read";

async fn app_with_ttl(ttl_ms: &str) -> TestApp {
    let app = spawn_app_with(AppOptions::default().env("CREDSYNC_ROW_CACHE_TTL_MS", ttl_ms)).await;
    if ttl_ms != "0" {
        wait_until(
            "the row cache to subscribe",
            Duration::from_secs(10),
            || async { listener_pid(&app).await.is_some() },
        )
        .await;
    }
    app
}

/// The backend of the row cache's `LISTEN`.
async fn listener_pid(app: &TestApp) -> Option<i32> {
    sqlx::query_scalar(
        "select pid from pg_stat_activity
         where datname = current_database() and query ilike 'listen%credsync_credential%'",
    )
    .fetch_optional(&app.db)
    .await
    .unwrap()
}

/// A credential Leaf holds as `OK`, read once so that the cache holds it.
async fn cached_credential(app: &TestApp) -> Uuid {
    let user = Uuid::new_v4();
    assert_eq!(
        app.create(user, &body("cid", "rowcache0000"))
            .await
            .status(),
        201
    );
    // The first read may refresh what the create stored; the second finds it confirmed.
    for _ in 0..2 {
        let r = app.get(user, SCOPE).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["status"], "OK");
    }
    user
}

/// Change the row's status behind every trigger's back (no notice is sent).
async fn silently_set_status(app: &TestApp, user: Uuid, status: &str) {
    let mut tx = app.db.begin().await.unwrap();
    sqlx::query("set local session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("update credential set status = $2 where leaf_user_id = $1")
        .bind(user)
        .bind(status)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn stored_status(app: &TestApp, user: Uuid) -> Option<String> {
    sqlx::query_scalar("select status from credential where leaf_user_id = $1")
        .bind(user)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// GET the credential, then whether the read put Leaf's status back (the row was read).
async fn read_rereads_the_row(app: &TestApp, user: Uuid) -> bool {
    let r = app.get(user, SCOPE).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credsync-source"], "leaf");
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "OK");
    stored_status(app, user).await.as_deref() == Some("OK")
}

#[tokio::test]
async fn a_read_leaf_confirms_comes_from_the_cache_until_a_change_is_announced() {
    let app = app_with_ttl("600000").await;
    let user = cached_credential(&app).await;
    silently_set_status(&app, user, "STALE").await;
    for _ in 0..3 {
        assert!(
            !read_rereads_the_row(&app, user).await,
            "served from the cache"
        );
    }
    let metrics = app.metrics().await;
    assert!(metrics.contains(r#"credsync_row_cache_total{result="hit"}"#));
    // /status (from Leaf) takes the same path.
    let r = app
        .get_path(
            &format!(
                "/services/usermanagement/api/users/{user}/climate-field-view-credentials/status"
            ),
            "status:read",
        )
        .await;
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "OK");
    assert_eq!(stored_status(&app, user).await.as_deref(), Some("STALE"));
    // Any change another process makes to the row is announced, and the next read reads it.
    sqlx::query("update credential set public_fields = public_fields || '{\"note\": 1}' where leaf_user_id = $1")
        .bind(user)
        .execute(&app.db)
        .await
        .unwrap();
    wait_until(
        "the announced change to reach the cache",
        Duration::from_secs(5),
        || read_rereads_the_row(&app, user),
    )
    .await;
}

#[tokio::test]
async fn a_revealing_read_and_a_disabled_cache_always_read_the_row() {
    let app = app_with_ttl("600000").await;
    let user = cached_credential(&app).await;
    silently_set_status(&app, user, "STALE").await;
    let r = app.get(user, "credentials:read credentials:reveal").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["clientSecret"],
        "client-secret-rowcache0000"
    );
    assert_eq!(stored_status(&app, user).await.as_deref(), Some("OK"));

    let app = app_with_ttl("0").await;
    let user = cached_credential(&app).await;
    silently_set_status(&app, user, "STALE").await;
    assert!(read_rereads_the_row(&app, user).await);
}

#[tokio::test]
async fn a_delete_made_by_another_process_is_refused_without_waiting_for_the_ttl() {
    let app = app_with_ttl("600000").await;
    let user = cached_credential(&app).await;
    // Another replica's DELETE while Leaf was down: shredded, pending at Leaf (which still has it).
    sqlx::query(
        "update credential set sync_state = 'DELETE_PENDING', key_id = null, wrapped_key = null,
         secrets = null where leaf_user_id = $1",
    )
    .bind(user)
    .execute(&app.db)
    .await
    .unwrap();
    assert!(app.leaf_state(user).await.is_some());
    wait_until(
        "the delete to reach the cache",
        Duration::from_secs(5),
        || async { app.get(user, SCOPE).await.status() == 404 },
    )
    .await;
    let p = assert_problem(app.get(user, SCOPE).await, 404, "not-found").await;
    assert!(p["detail"].as_str().unwrap().contains("delete"));
}

#[tokio::test]
async fn a_delete_in_this_process_is_refused_by_the_very_next_read() {
    let app = app_with_ttl("600000").await;
    let user = cached_credential(&app).await;
    app.fault(json!({"fixedStatus": 503, "method": "DELETE"}))
        .await;
    assert_eq!(app.delete(user, "credentials:delete").await.status(), 202);
    app.clear_faults().await;
    assert!(app.leaf_state(user).await.is_some(), "Leaf still holds it");
    let p = assert_problem(app.get(user, SCOPE).await, 404, "not-found").await;
    assert!(p["detail"].as_str().unwrap().contains("delete"));
}

#[tokio::test]
async fn a_lost_subscription_empties_the_cache() {
    let app = app_with_ttl("600000").await;
    let user = cached_credential(&app).await;
    silently_set_status(&app, user, "STALE").await;
    assert!(!read_rereads_the_row(&app, user).await);
    let old = listener_pid(&app).await.unwrap();
    let killed: bool = sqlx::query_scalar("select pg_terminate_backend($1)")
        .bind(old)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(killed);
    // Whatever was announced while it was gone is lost: nothing held before may be served.
    wait_until("the row to be read again", Duration::from_secs(10), || {
        read_rereads_the_row(&app, user)
    })
    .await;
    wait_until("a new subscription", Duration::from_secs(10), || async {
        listener_pid(&app).await.is_some_and(|pid| pid != old)
    })
    .await;
    // Subscribed again, it serves again.
    wait_until(
        "the cache to serve again",
        Duration::from_secs(10),
        || async {
            // A read that finds the row as Leaf has it fills the cache...
            read_rereads_the_row(&app, user).await;
            // ...and the next one is served from it.
            silently_set_status(&app, user, "STALE").await;
            !read_rereads_the_row(&app, user).await
        },
    )
    .await;
}
