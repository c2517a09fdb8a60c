//! The sync worker, the outbox drain, on-demand runs and discovery (SPEC §8, §6 /v1/sync).
use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;

async fn state_of(app: &TestApp, user: Uuid) -> Option<String> {
    sqlx::query_scalar("select sync_state from credential where leaf_user_id = $1")
        .bind(user)
        .fetch_optional(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_status_flip_at_leaf_reaches_the_cache_and_the_history_after_a_sync() {
    let app = spawn_app_with(with_worker(1)).await;
    let user = Uuid::new_v4();
    assert_eq!(
        app.create(user, &body("cid", "syncflip0000"))
            .await
            .status(),
        201
    );
    app.sim_put(
        &format!("/__sim/users/{user}/climate-field-view-credentials/status"),
        json!({"status": "MISSING_PERMISSION"}),
    )
    .await;
    wait_until(
        "the worker to see the new status",
        Duration::from_secs(20),
        || async {
            sqlx::query_scalar::<_, Option<String>>(
                "select status from credential where leaf_user_id = $1",
            )
            .bind(user)
            .fetch_one(&app.db)
            .await
            .unwrap()
            .as_deref()
                == Some("MISSING_PERMISSION")
        },
    )
    .await;
    let n = app.count("select count(*) from status_history where from_status = 'OK' and to_status = 'MISSING_PERMISSION' and source = 'sync'").await;
    assert_eq!(n, 1);
    // Events were fetched too.
    assert!(app.count("select count(*) from event").await >= 1);
    // Later syncs find nothing new: only checkedAt moves.
    let checked = || async {
        sqlx::query_scalar::<_, time::OffsetDateTime>(
            "select checked_at from credential where leaf_user_id = $1",
        )
        .bind(user)
        .fetch_one(&app.db)
        .await
        .unwrap()
    };
    let before = checked().await;
    wait_until(
        "a sync to move checkedAt",
        Duration::from_secs(10),
        || async { checked().await > before },
    )
    .await;
    assert_eq!(
        app.count_for(
            "select count(*) from status_history where leaf_user_id = $1",
            user
        )
        .await,
        2
    );
}

#[tokio::test]
async fn writes_queued_while_leaf_was_down_are_delivered_when_it_returns() {
    let app = spawn_app_with(with_worker(60)).await;
    let created = Uuid::new_v4();
    let doomed = Uuid::new_v4();
    assert_eq!(
        app.create(doomed, &body("cid", "doomed000000"))
            .await
            .status(),
        201
    );
    app.fault(json!({"fixedStatus": 503})).await;
    assert_eq!(
        app.create(created, &body("queued-client", "outbox000000"))
            .await
            .status(),
        202
    );
    assert_eq!(app.delete(doomed, ALL_SCOPES).await.status(), 202);
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.clear_faults().await;
    wait_until(
        "the queued create to be delivered",
        Duration::from_secs(30),
        || async { state_of(&app, created).await.as_deref() == Some("SYNCED") },
    )
    .await;
    wait_until(
        "the queued delete to be delivered",
        Duration::from_secs(30),
        || async { state_of(&app, doomed).await.is_none() },
    )
    .await;
    let leaf = app
        .leaf_state(created)
        .await
        .expect("Leaf has the queued credential");
    assert_eq!(leaf["clientSecret"], "client-secret-outbox000000");
    assert!(app.leaf_state(doomed).await.is_none());
    assert_eq!(app.count("select count(*) from outbox").await, 0);
    // Each queued write's end is in the audit trail, as the worker's (`credsync`): the delete's
    // too.
    for (user, action, detail) in [
        (
            created,
            "credential.create",
            "queued create delivered to Leaf",
        ),
        (
            doomed,
            "credential.delete",
            "queued delete delivered to Leaf",
        ),
    ] {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from audit where leaf_user_id = $1 and actor = 'credsync' \
             and action = $2 and outcome = 'success' and detail = $3",
        )
        .bind(user)
        .bind(action)
        .bind(detail)
        .fetch_one(&app.db)
        .await
        .unwrap();
        assert_eq!(n, 1, "{action} of {user}");
    }
    // Exactly one successful create reached Leaf for the queued user.
    let ok_posts = app
        .sim_request_log()
        .await
        .iter()
        .filter(|r| {
            r["method"] == "POST"
                && r["path"].as_str().unwrap().contains(&created.to_string())
                && r["status"] == 201
        })
        .count();
    assert_eq!(ok_posts, 1);
    let r = app.get(created, "credentials:read").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["syncState"], "SYNCED");
}

/// Leaf has neither the user's credential nor does credsync keep any record of it, within 30 s.
async fn gone_on_both_sides(app: &TestApp, user: Uuid) {
    wait_until(
        "the credential to be gone at Leaf and here",
        Duration::from_secs(30),
        || async {
            app.leaf_state(user).await.is_none()
                && app
                    .count_for(
                        "select count(*) from credential where leaf_user_id = $1",
                        user,
                    )
                    .await
                    == 0
                && app
                    .count_for("select count(*) from outbox where leaf_user_id = $1", user)
                    .await
                    == 0
        },
    )
    .await;
    assert_eq!(app.get(user, "credentials:read").await.status(), 404);
}

/// After a create raced a DELETE: Leaf's copy is deleted too. When credsync gave up on Leaf's
/// answer (`latency_ms` beyond LEAF_TIMEOUT_MS, 1.5 s here), Leaf may still act on the create,
/// so that delete waits out the outbox grace (30 s and more): checked, then brought forward
/// once the simulator has acted.
async fn leafs_copy_is_deleted(app: &TestApp, user: Uuid, latency_ms: u64) {
    if latency_ms > 1500 {
        let due_in: Option<f64> = sqlx::query_scalar(
            "select extract(epoch from next_attempt_at - now())::float8 from outbox
             where leaf_user_id = $1 and op = 'delete'",
        )
        .bind(user)
        .fetch_optional(&app.db)
        .await
        .unwrap();
        assert!(due_in.is_some_and(|s| s > 20.0), "{due_in:?}");
        tokio::time::sleep(Duration::from_millis(latency_ms)).await;
        sqlx::query("update outbox set next_attempt_at = now() where leaf_user_id = $1")
            .bind(user)
            .execute(&app.db)
            .await
            .unwrap();
    }
    gone_on_both_sides(app, user).await;
}

/// A DELETE answered while Leaf is still creating the credential (request path): the delete
/// wins. The create answers 409, and the credential Leaf made afterwards is deleted too, not
/// kept (before, it came back as SYNCED here and at Leaf after the DELETE's 204).
#[tokio::test]
async fn a_delete_answered_while_leaf_creates_the_credential_deletes_leafs_copy_too() {
    let app = spawn_app_with(with_worker(60)).await;
    // Leaf answers late, or after credsync gave up on it (LEAF_TIMEOUT_MS is 1.5 s here).
    for latency in [1000, 2500] {
        create_racing_a_delete(&app, latency).await;
    }
}

async fn create_racing_a_delete(app: &TestApp, latency_ms: u64) {
    let user = Uuid::new_v4();
    app.fault(json!({"latencyMs": latency_ms, "method": "POST", "pathContains": user.to_string()}))
        .await;
    let new = body("cid", "racedelete00");
    let create = app.create(user, &new);
    let delete = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        app.delete(user, ALL_SCOPES).await
    };
    let (created, deleted) = tokio::join!(create, delete);
    assert_eq!(deleted.status(), 204);
    assert_problem(created, 409, "conflict").await;
    leafs_copy_is_deleted(app, user, latency_ms).await;
    assert_eq!(
        app.count_for(
            "select count(*) from audit where leaf_user_id = $1 and action = 'credential.create' and outcome = 'failure'",
            user
        )
        .await,
        1
    );
}

/// The same race with the worker delivering a queued create: the DELETE's 204 holds.
#[tokio::test]
async fn a_delete_answered_while_the_worker_delivers_a_queued_create_deletes_leafs_copy_too() {
    let app = spawn_app_with(with_worker(60)).await;
    for latency in [1000, 2500] {
        queued_create_racing_a_delete(&app, latency).await;
    }
}

async fn queued_create_racing_a_delete(app: &TestApp, latency_ms: u64) {
    let user = Uuid::new_v4();
    let only_user = user.to_string();
    app.fault(json!({"fixedStatus": 503, "method": "POST", "pathContains": only_user}))
        .await;
    assert_eq!(
        app.create(user, &body("cid", "racequeued00"))
            .await
            .status(),
        202
    );
    app.clear_faults().await;
    app.fault(json!({"latencyMs": latency_ms, "method": "POST", "pathContains": only_user}))
        .await;
    wait_until("the worker to take the queued create", Duration::from_secs(20), || async {
        app.count_for(
            "select count(*) from outbox where leaf_user_id = $1 and op = 'create' and attempts > 0",
            user,
        )
        .await
            == 1
    })
    .await;
    assert_eq!(app.delete(user, ALL_SCOPES).await.status(), 204);
    // The worker's create has its answer, or gave up on it, by then.
    tokio::time::sleep(Duration::from_millis(latency_ms.min(1500) + 500)).await;
    leafs_copy_is_deleted(app, user, latency_ms).await;
}

#[tokio::test]
async fn a_queued_create_that_leaf_rejects_ends_rejected_and_a_new_post_is_allowed() {
    let app = spawn_app_with(with_worker(60)).await;
    let user = Uuid::new_v4();
    app.fault(json!({"fixedStatus": 503})).await;
    let b = json!({"clientId": "c", "clientSecret": "cs-rejected00", "apiKey": "ak-rejected00", "refreshToken": "invalid-refresh-0000"});
    assert_eq!(app.create(user, &b).await.status(), 202);
    app.clear_faults().await;
    wait_until("the rejection", Duration::from_secs(30), || async {
        state_of(&app, user).await.as_deref() == Some("REJECTED")
    })
    .await;
    assert_eq!(
        app.count(
            "select count(*) from credential where secrets is null and rejection_status = 400"
        )
        .await,
        1
    );
    assert_eq!(
        app.count(
            "select count(*) from audit where action = 'credential.rejected' and actor = 'credsync'"
        )
        .await,
        1
    );
    let p = assert_problem(app.get(user, "credentials:read").await, 404, "not-found").await;
    assert!(p["detail"].as_str().unwrap().contains("rejected"));
    assert!(!app.dump_all_tables().await.contains("invalid-refresh-0000"));
    assert_eq!(
        app.create(user, &body("c2", "second000000")).await.status(),
        201
    );
}

/// The run's state once it is DONE, polled for up to 10 s (the state last seen otherwise).
async fn finished_run(app: &TestApp, run_id: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        last = app
            .get_path(&format!("/v1/sync/runs/{run_id}"), "admin")
            .await
            .json()
            .await
            .unwrap();
        if last["state"] == "DONE" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

async fn start_run(app: &TestApp, users: &[Uuid]) -> String {
    let r = app
        .client
        .post(format!("{}/v1/sync", app.address))
        .bearer_auth(token("admin"))
        .json(&json!({ "leafUserIds": users }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.json::<Value>().await.unwrap()["runId"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A credential that another replica holds while it finds it gone from Leaf: the run waits
/// for the lease, then counts the user attempted, not failed, as soon as the row is gone.
#[tokio::test]
async fn an_on_demand_run_counts_a_credential_gone_meanwhile_as_done() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    app.create(user, &body("a", "runvanish000")).await;
    sqlx::query(
        "update credential set lease_owner = 'other-replica', lease_until = now() + interval '1 minute'
         where leaf_user_id = $1",
    )
    .bind(user)
    .execute(&app.db)
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let run_id = start_run(&app, &[user]).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        app.get_path(&format!("/v1/sync/runs/{run_id}"), "admin")
            .await
            .json::<Value>()
            .await
            .unwrap()["state"],
        "RUNNING",
        "waits for the other replica's lease"
    );
    sqlx::query("delete from credential where leaf_user_id = $1")
        .bind(user)
        .execute(&app.db)
        .await
        .unwrap();
    let last = finished_run(&app, &run_id).await;
    assert_eq!(last["state"], "DONE", "{last}");
    assert_eq!(
        (last["usersDone"].as_i64(), last["usersFailed"].as_i64()),
        (Some(1), Some(0))
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "done once the row was gone, not after the claim's 10 s of retries: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_on_demand_run_syncs_the_named_users_and_refuses_untracked_ones() {
    let app = spawn_app().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    app.create(a, &body("a", "runaaaa00000")).await;
    app.create(b, &body("b", "runbbbb00000")).await;
    let post = |body: Value, scope: &str| {
        app.client
            .post(format!("{}/v1/sync", app.address))
            .bearer_auth(token(scope))
            .json(&body)
            .send()
    };
    let stranger = Uuid::new_v4();
    let p = assert_problem(
        post(json!({"leafUserIds": [a, stranger]}), "admin")
            .await
            .unwrap(),
        400,
        "validation",
    )
    .await;
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains(&stranger.to_string())
    );
    assert_eq!(post(json!({}), "status:read").await.unwrap().status(), 403);
    app.sim_put(
        &format!("/__sim/users/{a}/climate-field-view-credentials/status"),
        json!({"status": "UNAUTHENTICATED"}),
    )
    .await;
    let run_id = start_run(&app, &[a]).await;
    let last = finished_run(&app, &run_id).await;
    assert_eq!(last["state"], "DONE", "{last}");
    assert_eq!(last["usersTotal"], 1);
    assert_eq!(last["usersDone"], 1);
    assert_eq!(last["usersFailed"], 0);
    assert!(last["finishedAt"].is_string());
    let s: Option<String> =
        sqlx::query_scalar("select status from credential where leaf_user_id = $1")
            .bind(a)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(s.as_deref(), Some("UNAUTHENTICATED"));
    // All tracked users, with Leaf down: the run is DONE and counts the failures.
    app.fault(json!({"fixedStatus": 500})).await;
    let r = post(json!({}), "admin").await.unwrap();
    let run_id = r.json::<Value>().await.unwrap()["runId"]
        .as_str()
        .unwrap()
        .to_owned();
    let last = finished_run(&app, &run_id).await;
    assert_eq!(last["usersTotal"], 2);
    assert_eq!(last["usersDone"], 2);
    assert_eq!(last["usersFailed"], 2);
    assert_eq!(
        app.get_path(&format!("/v1/sync/runs/{}", Uuid::new_v4()), "admin")
            .await
            .status(),
        404
    );
    assert_eq!(
        app.count(
            "select count(*) from audit where action = 'sync.trigger' and leaf_user_id is null"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn two_workers_on_one_database_sync_each_user_once_per_interval() {
    let first = spawn_app_with(with_worker(4).env("CREDSYNC_SYNC_CONCURRENCY", "2")).await;
    let users: Vec<Uuid> = (0..12).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        assert_eq!(
            first.create(*u, &body("c", "twoworkers00")).await.status(),
            201
        );
    }
    // Slow Leaf reads (a user's sync is two reads, 300 ms): a round of 12 users then takes
    // well over an idle lane's nap (1 s), so the second replica cannot sleep through a round
    // the first one finishes alone.
    first
        .fault(json!({"latencyMs": 150, "method": "GET", "pathContains": "climate-field-view-credentials"}))
        .await;
    let second = spawn_app_with(
        AppOptions {
            db_url: Some(first.db_url.clone()),
            ..with_worker(4)
        }
        .env("LEAF_API_URL", first.sim_url.clone())
        .env("CREDSYNC_SYNC_CONCURRENCY", "2"),
    )
    .await;
    first.clear_sim_requests().await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let reqs = first.sim_requests().await;
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for (m, p) in &reqs {
        if m == "GET" && p.ends_with("climate-field-view-credentials") {
            *per_user.entry(p.clone()).or_default() += 1;
        }
    }
    // 12 s at a 4 s interval (plus the sync's own 0.3 s or more): every user two or three
    // times, never more; a user synced by both replicas would show twice as many reads.
    assert_eq!(per_user.len(), users.len(), "{per_user:?}");
    for (p, n) in &per_user {
        assert!((2..=3).contains(n), "{p} fetched {n} times");
    }
    // Both replicas did part of the work (the request id names the worker that sent it).
    let workers: std::collections::HashSet<String> = first
        .sim_request_log()
        .await
        .iter()
        .filter_map(|r| r["requestId"].as_str())
        .filter(|id| id.starts_with("sync."))
        .map(|id| id.split('.').nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
    drop(second);
}

#[tokio::test]
async fn the_worker_keeps_at_most_concurrency_upstream_calls_in_flight() {
    let app = spawn_app_with(with_worker(1).env("CREDSYNC_SYNC_CONCURRENCY", "2")).await;
    for _ in 0..8 {
        assert_eq!(
            app.create(Uuid::new_v4(), &body("c", "inflight0000"))
                .await
                .status(),
            201
        );
    }
    // Every worker call to Leaf then takes at least 300 ms, and the simulator logs it on
    // arrival: with two calls in flight at most, a call can only start once one of the two
    // before it has ended, so the i-th and (i+2)-th arrivals are at least 300 ms apart.
    app.fault(json!({"latencyMs": 300, "method": "GET", "pathContains": "climate-field-view-credentials"}))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.clear_sim_requests().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut arrivals: Vec<time::OffsetDateTime> = app
        .sim_request_log()
        .await
        .iter()
        .filter(|r| {
            r["requestId"]
                .as_str()
                .is_some_and(|id| id.starts_with("sync."))
        })
        .map(|r| {
            time::OffsetDateTime::parse(
                r["at"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
        })
        .collect();
    arrivals.sort();
    // 3 s at two slots of 300 ms: about 20 calls; far fewer means the worker stalled.
    assert!(arrivals.len() >= 12, "only {} worker calls", arrivals.len());
    for w in arrivals.windows(3) {
        let gap = w[2] - w[0];
        assert!(
            gap >= time::Duration::milliseconds(299),
            "three calls in flight at once: arrivals {} ms apart",
            gap.whole_milliseconds()
        );
    }
}

#[tokio::test]
async fn discovery_adopts_credentials_created_directly_at_leaf() {
    let app = spawn_app().await;
    let direct: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for u in &direct {
        let r = app
            .sim_post(
                "/__sim/credentials",
                json!({"leafUserId": u, "fields": {"clientId": "d"}}),
            )
            .await;
        assert_eq!(r.status(), 201);
    }
    let syncer = credsync::sync::Syncer::new(
        credsync::app::Application::build_gateway(
            &credsync::config::Settings::from_source(&credsync::config::Source::from_pairs(
                base_env(&app.db_url, &app.sim_url),
            ))
            .unwrap(),
            false,
        )
        .await
        .unwrap(),
        credsync::config::Settings::from_source(&credsync::config::Source::from_pairs(base_env(
            &app.db_url,
            &app.sim_url,
        )))
        .unwrap()
        .sync,
    );
    let (seen, adopted) = syncer
        .discover(&credsync::domain::provider::CLIMATE_FIELD_VIEW, |_, _| {})
        .await
        .unwrap();
    assert_eq!((seen, adopted), (3, 3));
    assert_eq!(
        app.count(
            "select count(*) from credential where sync_state = 'SYNCED' and secrets is not null"
        )
        .await,
        3
    );
    assert_eq!(
        app.count(
            "select count(*) from audit where action = 'credential.adopted' and actor = 'cli'"
        )
        .await,
        3
    );
    // A second pass adopts nothing new.
    let (_, again) = syncer
        .discover(&credsync::domain::provider::CLIMATE_FIELD_VIEW, |_, _| {})
        .await
        .unwrap();
    assert_eq!(again, 0);
}

#[tokio::test]
async fn events_older_than_leafs_30_days_stay_queryable() {
    let app = spawn_app_with(with_worker(1)).await;
    let user = Uuid::new_v4();
    app.create(user, &body("cid", "oldevents000")).await;
    let old = time::OffsetDateTime::now_utc() - time::Duration::days(45);
    let old = credsync::timefmt::format(old);
    app.sim_post(
        &format!("/__sim/users/{user}/climate-field-view-credentials/events"),
        json!({"events": [{"id": "ancient-1", "createdDate": old, "statusCode": 401}]}),
    )
    .await;
    wait_until(
        "the old event to be cached",
        Duration::from_secs(20),
        || async {
            app.count("select count(*) from event where id = 'ancient-1'")
                .await
                == 1
        },
    )
    .await;
    let path = format!(
        "/services/usermanagement/api/users/{user}/climate-field-view-credentials/events?source=cache&size=100"
    );
    let list: Vec<Value> = app
        .get_path(&path, "status:read")
        .await
        .json()
        .await
        .unwrap();
    assert!(list.iter().any(|e| e["id"] == "ancient-1"));
}

#[tokio::test]
async fn a_dead_replicas_leases_are_taken_over_after_they_expire() {
    let app = spawn_app_with(with_worker(3600).env("CREDSYNC_SYNC_LEASE_SECS", "2")).await;
    let user = Uuid::new_v4();
    app.create(user, &body("cid", "takeover0000")).await;
    // A replica claimed the credential and died holding the lease.
    sqlx::query("update credential set next_sync_at = now(), lease_owner = 'dead-replica', lease_until = now() + interval '2 seconds'")
        .execute(&app.db)
        .await
        .unwrap();
    app.sim_put(
        &format!("/__sim/users/{user}/climate-field-view-credentials/status"),
        json!({"status": "TEMPORARILY_UNAVAILABLE"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let status: Option<String> = sqlx::query_scalar("select status from credential")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(
        status.as_deref(),
        Some("OK"),
        "not taken while the lease holds"
    );
    wait_until(
        "the live worker to take the expired lease",
        Duration::from_secs(15),
        || async {
            sqlx::query_scalar::<_, Option<String>>("select status from credential")
                .fetch_one(&app.db)
                .await
                .unwrap()
                .as_deref()
                == Some("TEMPORARILY_UNAVAILABLE")
        },
    )
    .await;
}

/// `credsync sync --once` (the real binary): a pass over the tracked credentials with a summary,
/// `--discover` first, `--user` for some, audited with the CLI's actor (SPEC §1, §6).
#[tokio::test]
async fn sync_once_runs_a_pass_discovers_and_is_audited_as_the_cli() {
    let app = spawn_app().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    assert_eq!(
        app.create(a, &body("cid", "once-a000000")).await.status(),
        201
    );
    assert_eq!(
        app.create(b, &body("cid", "once-b000000")).await.status(),
        201
    );
    let direct = Uuid::new_v4();
    let r = app
        .sim_post(
            "/__sim/credentials",
            json!({"leafUserId": direct, "fields": {"clientId": "d"}}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let sync_once = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_credsync"))
            .env_clear()
            .envs(base_env(&app.db_url, &app.sim_url))
            .env("CREDSYNC_LOG_FORMAT", "json")
            .args(["sync", "--once"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = sync_once(&["--discover"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("discover: 3 Leaf users seen, 1 credentials adopted"),
        "{stdout}"
    );
    assert!(
        stdout.contains("sync: 3 credentials, 3 attempted, 3 synced, 0 failed"),
        "{stdout}"
    );
    let out = sync_once(&["--user", &a.to_string()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("sync: 1 credentials, 1 attempted, 1 synced, 0 failed"),
        "{stdout}"
    );
    let out = sync_once(&["--user", &Uuid::new_v4().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not tracked"));
    assert_eq!(
        app.count(
            "select count(*) from audit where action = 'sync.trigger' and actor = 'cli' and leaf_user_id is null"
        )
        .await,
        2
    );
    assert_eq!(
        app.count_for(
            "select count(*) from audit where action = 'credential.adopted' and actor = 'cli' and leaf_user_id = $1",
            direct
        )
        .await,
        1
    );
}

/// Creates queued while Leaf is down and the breaker open are delivered within seconds of
/// Leaf's recovery: no entry stays leased by a delivery that failed while the pool was busy,
/// and no lane claims entries only to give them back while the breaker refuses calls.
#[tokio::test]
async fn the_outbox_drains_soon_after_an_outage_that_opened_the_breaker() {
    let app = spawn_app_with(with_worker(300)).await;
    app.fault(json!({"fixedStatus": 503, "method": "POST"}))
        .await;
    let users: Vec<Uuid> = (0..30).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        assert_eq!(
            app.create(*u, &body("cid", "outage000000")).await.status(),
            202
        );
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let attempts_while_down = app
        .count("select coalesce(sum(attempts), 0) from outbox")
        .await;
    app.clear_faults().await;
    wait_until("the outbox to drain", Duration::from_secs(30), || async {
        app.count("select count(*) from outbox").await == 0
    })
    .await;
    assert_eq!(
        app.count("select count(*) from credential where sync_state = 'SYNCED'")
            .await,
        30
    );
    // While the breaker was open the lanes napped: about one attempt per entry around each
    // probe (15 when written), where claiming and giving back made ~90 (three per entry).
    assert!(
        attempts_while_down < 45,
        "{attempts_while_down} attempts while down"
    );
}

/// A sync that outlasts its lease (here two slow Leaf reads, 6 s, against a 2 s lease) keeps
/// the lease renewed: the other replica never fetches the same user at the same time.
#[tokio::test]
async fn a_sync_longer_than_its_lease_is_not_taken_over_midway() {
    let worker = || {
        with_worker(1)
            .env("CREDSYNC_SYNC_LEASE_SECS", "2")
            .env("CREDSYNC_SYNC_CONCURRENCY", "2")
            .env("LEAF_TIMEOUT_MS", "10000")
    };
    let first = spawn_app_with(worker()).await;
    let user = Uuid::new_v4();
    assert_eq!(
        first
            .create(user, &body("c", "longsync0000"))
            .await
            .status(),
        201
    );
    let _second = spawn_app_with(
        AppOptions {
            db_url: Some(first.db_url.clone()),
            ..worker()
        }
        .env("LEAF_API_URL", first.sim_url.clone()),
    )
    .await;
    first
        .fault(json!({"latencyMs": 3000, "method": "GET", "pathContains": "climate-field-view-credentials"}))
        .await;
    first.clear_sim_requests().await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let starts: Vec<time::OffsetDateTime> = first
        .sim_request_log()
        .await
        .iter()
        .filter(|r| {
            r["method"] == "GET"
                && r["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("climate-field-view-credentials"))
        })
        .map(|r| credsync::timefmt::parse_strict(r["at"].as_str().unwrap()).unwrap())
        .collect();
    assert!(starts.len() >= 2, "{} syncs", starts.len());
    for pair in starts.windows(2) {
        let gap = (pair[1] - pair[0]).as_seconds_f64();
        // A sync is two 3 s reads, then the next is due a second after it ends; a take-over
        // would start one about when the 2 s lease ran out.
        assert!(
            gap >= 5.9,
            "a sync started {gap:.1} s after the previous one: {starts:?}"
        );
    }
}

/// `credsync_sync_lag_seconds` counts a credential whose syncs keep failing (its backoff moves
/// `next_sync_at` on, but its last refresh grows old) as overdue.
#[tokio::test]
async fn the_sync_lag_counts_a_credential_stuck_in_backoff() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    assert_eq!(
        app.create(user, &body("c", "lagging00000")).await.status(),
        201
    );
    sqlx::query(
        "update credential set checked_at = now() - interval '1 hour',
             next_sync_at = now() + interval '1 hour', sync_failures = 6
         where leaf_user_id = $1",
    )
    .bind(user)
    .execute(&app.db)
    .await
    .unwrap();
    // The test apps keep the default interval, 300 s: an hour since the last refresh is 3300 s
    // overdue. (The recorder is shared by every test app in this process: wait for ours.)
    wait_until("the lag to show", Duration::from_secs(10), || async {
        let text = app.metrics().await;
        let lag = text
            .lines()
            .find_map(|l| l.strip_prefix("credsync_sync_lag_seconds "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        lag.is_some_and(|lag| (3290.0..3320.0).contains(&lag))
    })
    .await;
}

/// A worker started with a shorter interval than the credentials were scheduled with brings
/// them forward instead of leaving them until the old schedule.
#[tokio::test]
async fn a_shorter_interval_brings_the_schedule_forward() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    assert_eq!(
        app.create(user, &body("c", "resched00000")).await.status(),
        201
    );
    sqlx::query(
        "update credential set next_sync_at = now() + interval '1 day' where leaf_user_id = $1",
    )
    .bind(user)
    .execute(&app.db)
    .await
    .unwrap();
    app.clear_sim_requests().await;
    let _worker = spawn_app_with(
        AppOptions {
            db_url: Some(app.db_url.clone()),
            ..with_worker(2)
        }
        .env("LEAF_API_URL", app.sim_url.clone()),
    )
    .await;
    wait_until(
        "the credential to be synced",
        Duration::from_secs(15),
        || async {
            app.sim_requests()
                .await
                .iter()
                .any(|(m, p)| m == "GET" && p.contains(&user.to_string()))
        },
    )
    .await;
}
