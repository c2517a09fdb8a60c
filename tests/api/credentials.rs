//! The Leaf-compatible routes (SPEC §5) against real Postgres and the simulator.
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;

#[tokio::test]
async fn create_forwards_to_leaf_and_answers_201_with_redacted_secrets() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    let resp = app.create(user, &body("cid-1", "aaaa1111bbbb")).await;
    assert_eq!(resp.status(), 201);
    assert!(resp.headers().get("x-request-id").is_some());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["clientId"], "cid-1");
    assert_eq!(v["clientSecret"], "****bbbb");
    assert_eq!(v["apiKey"], "****bbbb");
    assert_eq!(v["refreshToken"], "****bbbb");
    assert_eq!(v["status"], "OK");
    assert_eq!(v["syncState"], "SYNCED");
    assert!(v["id"].is_string() && v["createdTime"].is_string() && v["updatedAt"].is_string());
    assert!(v["accessToken"].as_str().unwrap().starts_with("****"));
    assert!(v["tokenMetadata"]["scopes"].is_array() && v["scopes"].is_array());
    // Leaf received the secrets in clear.
    let leaf = app.leaf_state(user).await.expect("Leaf holds it");
    assert_eq!(leaf["clientSecret"], "client-secret-aaaa1111bbbb");
    // The audit trail names the caller.
    let n = app.count("select count(*) from audit where action = 'credential.create' and actor = 'test-caller' and outcome = 'success'").await;
    assert_eq!(n, 1);
    // Settled: no outbox entry left, the first status recorded once, the row SYNCED.
    let count = |sql| app.count_for(sql, user);
    assert_eq!(
        count("select count(*) from outbox where leaf_user_id = $1").await,
        0
    );
    assert_eq!(
        count("select count(*) from status_history where leaf_user_id = $1 and from_status is null and to_status = 'OK' and source = 'request'").await,
        1
    );
    assert_eq!(
        count("select count(*) from credential where leaf_user_id = $1 and sync_state = 'SYNCED' and checked_at is not null and changed_at is not null and leaf_credential_id is not null").await,
        1
    );
    // ... in one statement after Leaf answered: one transaction time for all of it.
    assert_eq!(
        count("select count(*) from credential c
               join audit a on a.leaf_user_id = c.leaf_user_id and a.action = 'credential.create' and a.at = c.checked_at
               join status_history h on h.leaf_user_id = c.leaf_user_id and h.at = c.checked_at
               where c.leaf_user_id = $1").await,
        1
    );
    // The secrets Leaf added (accessToken) are stored with the ones sent: with Leaf down, the
    // local copy reveals them.
    app.fault(json!({"fixedStatus": 503, "method": "GET"}))
        .await;
    let r = app.get(user, "credentials:read credentials:reveal").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credsync-source"], "cache");
    let cached: Value = r.json().await.unwrap();
    assert_eq!(cached["accessToken"], leaf["accessToken"]);
    assert_eq!(cached["clientSecret"], "client-secret-aaaa1111bbbb");
}

#[tokio::test]
async fn a_second_create_for_the_same_user_is_a_409() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    assert_eq!(
        app.create(user, &body("c", "first-000000")).await.status(),
        201
    );
    app.clear_sim_requests().await;
    let resp = app.create(user, &body("c", "second-00000")).await;
    assert_problem(resp, 409, "conflict").await;
    assert!(app.sim_requests().await.is_empty(), "nothing forwarded");
}

#[tokio::test]
async fn concurrent_creates_settle_each_in_full_and_a_contested_user_gets_one_credential() {
    // Concurrent creates share their statements (store::batch): nothing may cross between them.
    let app = spawn_app().await;
    let users: Vec<Uuid> = (0..16).map(|_| Uuid::new_v4()).collect();
    let contested = Uuid::new_v4();
    let mut calls: Vec<(Uuid, String)> = users
        .iter()
        .enumerate()
        .map(|(i, u)| (*u, format!("{i:02}-secret-tail")))
        .collect();
    calls.extend((0..3).map(|i| (contested, format!("{i:02}-contested"))));
    let app = &app;
    let answers = futures_util::future::join_all(calls.iter().map(|(user, suffix)| async move {
        let resp = app
            .create(*user, &body(&format!("cid-{suffix}"), suffix))
            .await;
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    }))
    .await;
    for ((user, suffix), (status, v)) in calls.iter().zip(&answers).take(users.len()) {
        assert_eq!(*status, 201, "{user}: {v}");
        assert_eq!(v["clientId"], format!("cid-{suffix}"));
        assert_eq!(
            (&v["syncState"], &v["status"]),
            (&json!("SYNCED"), &json!("OK"))
        );
    }
    let contested_statuses: Vec<u16> = answers[users.len()..].iter().map(|a| a.0).collect();
    assert_eq!(
        contested_statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{answers:?}"
    );
    assert_eq!(
        contested_statuses.iter().filter(|s| **s == 409).count(),
        2,
        "{answers:?}"
    );

    // Every create settled in full, once.
    for sql in [
        "select count(*) from credential where sync_state = 'SYNCED' and status = 'OK' and leaf_credential_id is not null",
        "select count(*) from audit where action = 'credential.create' and outcome = 'success'",
        "select count(*) from status_history where from_status is null and to_status = 'OK' and source = 'request'",
    ] {
        assert_eq!(app.count(sql).await, 17, "{sql}");
    }
    assert_eq!(app.count("select count(*) from outbox").await, 0);
    assert_eq!(
        app.count("select count(*) from audit a join credential c using (leaf_user_id) where a.action = 'credential.create' and a.at = c.checked_at").await,
        17,
        "each audit entry written with its own credential's settle"
    );
    // Each stored credential holds its own caller's secrets.
    for (user, suffix) in calls.iter().take(users.len()) {
        let v: Value = app
            .get(*user, "credentials:read credentials:reveal")
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["clientSecret"], format!("client-secret-{suffix}"));
        assert_eq!(v["clientId"], format!("cid-{suffix}"));
    }
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("credsync_db_batched_items_total{statement=\"create_settle\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn get_reveals_secrets_only_with_the_reveal_scope_and_audits_it() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    app.create(user, &body("cid", "revealme1234")).await;
    let r = app.get(user, "credentials:read").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credsync-source"], "leaf");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["clientSecret"], "****1234");
    let admin = app.get(user, "admin").await.json::<Value>().await.unwrap();
    assert_eq!(
        admin["clientSecret"], "****1234",
        "admin alone does not reveal"
    );
    let r = app.get(user, "credentials:reveal").await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["clientSecret"], "client-secret-revealme1234");
    assert_eq!(v["apiKey"], "api-key-revealme1234");
    let n = app
        .count("select count(*) from audit where action = 'credential.reveal'")
        .await;
    assert_eq!(n, 1);
}

#[tokio::test]
async fn short_secrets_are_fully_redacted() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    let b = json!({"clientId": "c", "clientSecret": "short", "apiKey": "elevenchars", "refreshToken": "twelve-chars"});
    let v: Value = app.create(user, &b).await.json().await.unwrap();
    assert_eq!(v["clientSecret"], "****");
    assert_eq!(v["apiKey"], "****");
    assert_eq!(v["refreshToken"], "****hars");
}

#[tokio::test]
async fn delete_shreds_locally_and_at_leaf_then_404s() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    app.create(user, &body("cid", "deleteme0000")).await;
    let r = app.delete(user, "credentials:delete").await;
    assert_eq!(r.status(), 204);
    assert!(app.leaf_state(user).await.is_none());
    assert_eq!(app.count("select count(*) from credential").await, 0);
    assert_eq!(
        app.count(
            "select count(*) from audit where action = 'credential.delete' and outcome = 'success'"
        )
        .await,
        1
    );
    assert_problem(app.get(user, "credentials:read").await, 404, "not-found").await;
    assert_problem(
        app.delete(user, "credentials:delete").await,
        404,
        "not-found",
    )
    .await;
}

#[tokio::test]
async fn an_unchanged_forwarded_read_moves_the_cached_checked_at_and_nothing_else() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    assert_eq!(
        app.create(user, &body("cid", "touch0000000"))
            .await
            .status(),
        201
    );
    let path = format!(
        "/services/usermanagement/api/users/{user}/climate-field-view-credentials/status?source=cache"
    );
    let cached = || async {
        let v: Value = app
            .get_path(&path, "status:read")
            .await
            .json()
            .await
            .unwrap();
        let at = v["checkedAt"].as_str().unwrap().to_owned();
        time::OffsetDateTime::parse(&at, &time::format_description::well_known::Rfc3339).unwrap()
    };
    let first = cached().await;
    let updated_before = app
        .count_for(
            "select count(*) from credential where leaf_user_id = $1 and changed_at is not null",
            user,
        )
        .await;
    // Refreshes are written at most once a second per credential.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    for _ in 0..5 {
        assert_eq!(app.get(user, "credentials:read").await.status(), 200);
    }
    wait_until(
        "the cached checkedAt to move",
        std::time::Duration::from_secs(5),
        || async { cached().await > first },
    )
    .await;
    let later = cached().await;
    assert!(later - first >= time::Duration::SECOND, "{first} → {later}");
    // Still OK, no status change recorded.
    assert_eq!(
        app.count_for(
            "select count(*) from status_history where leaf_user_id = $1",
            user
        )
        .await,
        1
    );
    assert_eq!(
        app.count_for(
            "select count(*) from credential where leaf_user_id = $1 and changed_at is not null",
            user
        )
        .await,
        updated_before
    );
}

#[tokio::test]
async fn status_reads_leafs_status_and_the_cache_answers_without_leaf() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    app.create(user, &body("cid", "status000000")).await;
    let path =
        format!("/services/usermanagement/api/users/{user}/climate-field-view-credentials/status");
    let r = app
        .sim_put(
            &format!("/__sim/users/{user}/climate-field-view-credentials/status"),
            json!({"status": "UNAUTHENTICATED"}),
        )
        .await;
    assert_eq!(r.status(), 204);
    let r = app.get_path(&path, "status:read").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credsync-source"], "leaf");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "UNAUTHENTICATED");
    assert!(v["checkedAt"].is_string());
    app.clear_sim_requests().await;
    let r = app
        .get_path(&format!("{path}?source=cache"), "status:read")
        .await;
    assert_eq!(r.headers()["x-credsync-source"], "cache");
    assert_eq!(
        r.json::<Value>().await.unwrap()["status"],
        "UNAUTHENTICATED"
    );
    assert!(
        app.sim_requests().await.is_empty(),
        "source=cache does not call Leaf"
    );
    let hist = app.count("select count(*) from status_history where to_status = 'UNAUTHENTICATED' and from_status = 'OK' and source = 'request'").await;
    assert_eq!(hist, 1);
}

#[tokio::test]
async fn events_are_leaf_shaped_paged_and_cached() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    app.create(user, &body("cid", "events000000")).await;
    let r = app
        .sim_post(
            &format!("/__sim/users/{user}/climate-field-view-credentials/events"),
            json!({"generate": 30, "statusCode": 401, "start": "2026-10-01T00:00:00Z", "stepSecs": 60}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let path =
        format!("/services/usermanagement/api/users/{user}/climate-field-view-credentials/events");
    let r = app
        .get_path(&format!("{path}?page=0&size=10"), "status:read")
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credsync-source"], "leaf");
    let list: Vec<Value> = r.json().await.unwrap();
    assert_eq!(list.len(), 10);
    for e in &list {
        for k in ["id", "createdDate", "statusCode", "headers", "body"] {
            assert!(e.get(k).is_some(), "{k} in {e}");
        }
    }
    let dates: Vec<&str> = list
        .iter()
        .map(|e| e["createdDate"].as_str().unwrap())
        .collect();
    let mut sorted = dates.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(dates, sorted, "newest first");
    // The whole list is cached after reading all pages, deduplicated.
    for page in 0..4 {
        app.get_path(&format!("{path}?page={page}&size=10"), "status:read")
            .await;
    }
    app.get_path(&format!("{path}?page=0&size=10"), "status:read")
        .await;
    assert_eq!(app.count("select count(*) from event").await, 31);
    let r = app
        .get_path(
            &format!("{path}?source=cache&size=100&sort=createdDate,asc"),
            "status:read",
        )
        .await;
    assert_eq!(r.headers()["x-credsync-source"], "cache");
    let cached: Vec<Value> = r.json().await.unwrap();
    assert_eq!(cached.len(), 31);
    assert!(
        cached[0]["createdDate"].as_str().unwrap() < cached[30]["createdDate"].as_str().unwrap()
    );
    // size is clamped, bad paging is a 400.
    let r = app
        .get_path(&format!("{path}?size=500"), "status:read")
        .await;
    assert_eq!(r.json::<Vec<Value>>().await.unwrap().len(), 31);
    // Leaf's paging headers, for this route.
    let r = app
        .get_path(
            &format!("{path}?page=1&size=10&sort=createdDate,asc"),
            "status:read",
        )
        .await;
    assert_eq!(r.headers()["x-total-count"], "31");
    let link = r.headers()["link"].to_str().unwrap().to_owned();
    let url = format!("{}{path}?sort=createdDate%2Casc&", app.address);
    assert_eq!(
        link,
        format!(
            "<{url}page=2&size=10>; rel=\"next\",<{url}page=0&size=10>; rel=\"prev\",\
             <{url}page=3&size=10>; rel=\"last\",<{url}page=0&size=10>; rel=\"first\""
        )
    );
    for bad in [
        "size=0",
        "size=x",
        "page=-1",
        "sort=id,desc",
        "sort=createdDate",
    ] {
        assert_problem(
            app.get_path(&format!("{path}?{bad}"), "status:read").await,
            400,
            "validation",
        )
        .await;
    }
}

#[tokio::test]
async fn a_credential_created_directly_at_leaf_is_adopted_on_get() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    let r = app
        .sim_post(
            "/__sim/credentials",
            json!({"leafUserId": user, "fields": {"clientId": "direct", "clientSecret": "direct-secret-0000", "apiKey": "direct-key-0000", "refreshToken": "direct-rt-0000"}}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let r = app.get(user, "credentials:read").await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["clientId"], "direct");
    assert_eq!(v["clientSecret"], "****0000");
    assert_eq!(app.count("select count(*) from credential where sync_state = 'SYNCED' and leaf_credential_id is not null").await, 1);
    assert_eq!(
        app.count("select count(*) from audit where action = 'credential.adopted'")
            .await,
        1
    );
}

#[tokio::test]
async fn leaf_losing_a_credential_destroys_the_local_copy() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    app.create(user, &body("cid", "vanish000000")).await;
    // Deleted at Leaf behind credsync's back.
    let token: Value = app
        .client
        .post(format!("{}/api/authenticate", app.sim_url))
        .json(&json!({"username": "leaf-user", "password": "leaf-pass", "rememberMe": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = app
        .client
        .delete(format!(
            "{}/services/usermanagement/api/users/{user}/climate-field-view-credentials",
            app.sim_url
        ))
        .bearer_auth(token["id_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_problem(app.get(user, "credentials:read").await, 404, "not-found").await;
    assert_eq!(app.count("select count(*) from credential").await, 0);
    assert_eq!(app.count("select count(*) from audit where action = 'credential.vanished' and actor = 'test-caller'").await, 1);
}

#[tokio::test]
async fn leaf_400_is_passed_on_with_secrets_masked_and_nothing_kept() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    let b = json!({"clientId": "c", "clientSecret": "cs-000000000", "apiKey": "ak-000000000", "refreshToken": "invalid-rt-secret-value"});
    let resp = app.create(user, &b).await;
    let problem = assert_problem(resp, 400, "upstream-rejected").await;
    assert!(!problem.to_string().contains("invalid-rt-secret-value"));
    // Short secrets do not garble Leaf's words ("Inv****lid"): masked only where they stand alone.
    let b = json!({"clientId": "c", "clientSecret": "s", "apiKey": "a", "refreshToken": "invalid"});
    let problem = assert_problem(
        app.create(Uuid::new_v4(), &b).await,
        400,
        "upstream-rejected",
    )
    .await;
    assert_eq!(problem["detail"], "Invalid refresh token");
    assert_eq!(app.count("select count(*) from credential").await, 0);
    assert_eq!(app.count("select count(*) from outbox").await, 0);
    assert_eq!(
        app.count(
            "select count(*) from audit where action = 'credential.create' and outcome = 'failure'"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn leaf_5xx_on_a_read_without_a_local_copy_is_502_and_timeout_is_504() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    app.fault(json!({"fixedStatus": 500, "remaining": 1})).await;
    assert_problem(
        app.get(user, "credentials:read").await,
        502,
        "upstream-error",
    )
    .await;
    app.fault(json!({"garbage": true, "remaining": 1})).await;
    assert_problem(
        app.get(user, "credentials:read").await,
        502,
        "upstream-error",
    )
    .await;
    app.fault(json!({"hang": true, "remaining": 1})).await;
    assert_problem(
        app.get(user, "credentials:read").await,
        504,
        "upstream-timeout",
    )
    .await;
    app.fault(json!({"fixedStatus": 429, "retryAfterSecs": 7, "remaining": 1}))
        .await;
    let r = app.get(user, "credentials:read").await;
    assert_eq!(r.headers()["retry-after"], "7");
    assert_problem(r, 503, "upstream-unavailable").await;
    app.fault(json!({"fixedStatus": 405, "remaining": 1})).await;
    assert_problem(
        app.get(user, "credentials:read").await,
        502,
        "upstream-error",
    )
    .await;
}

#[tokio::test]
async fn reads_fall_back_to_the_cache_when_leaf_is_down() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    app.create(user, &body("cid", "cached000000")).await;
    app.fault(json!({"fixedStatus": 503})).await;
    let r = app.get(user, "credentials:read").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credsync-source"], "cache");
    assert_eq!(r.json::<Value>().await.unwrap()["clientSecret"], "****0000");
    let path =
        format!("/services/usermanagement/api/users/{user}/climate-field-view-credentials/status");
    let r = app.get_path(&path, "status:read").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credsync-source"], "cache");
}

#[tokio::test]
async fn writes_are_queued_with_202_when_leaf_is_down() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    app.fault(json!({"fixedStatus": 503})).await;
    let r = app.create(user, &body("cid", "queued000000")).await;
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["syncState"], "PENDING_UPSTREAM");
    assert_eq!(v["status"], Value::Null);
    assert_eq!(v["clientSecret"], "****0000");
    assert_eq!(
        app.count("select count(*) from outbox where op = 'create'")
            .await,
        1
    );
    // While pending: the local copy, no Leaf call; status null; events empty.
    app.clear_sim_requests().await;
    let r = app.get(user, "credentials:read").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credsync-source"], "cache");
    let base = format!("/services/usermanagement/api/users/{user}/climate-field-view-credentials");
    let s: Value = app
        .get_path(&format!("{base}/status"), "status:read")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(s, json!({"status": null, "checkedAt": null}));
    let e: Value = app
        .get_path(&format!("{base}/events"), "status:read")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(e, json!([]));
    assert!(app.sim_requests().await.is_empty());
    // A delete while Leaf is down is queued too, and the record disappears from reads.
    let r = app.delete(user, "credentials:delete").await;
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"syncState": "DELETE_PENDING"})
    );
    assert_eq!(app.count("select count(*) from credential where secrets is null and sync_state = 'DELETE_PENDING'").await, 1);
    let p = assert_problem(app.get(user, "credentials:read").await, 404, "not-found").await;
    assert!(p["detail"].as_str().unwrap().contains("delete"));
}

/// SPEC §5: "Cached status, status history and events for the user are deleted with it" —
/// at once, also when the delete is still pending at Leaf; and a sync that read Leaf's events
/// before the delete began cannot bring them back.
#[tokio::test]
async fn a_pending_delete_takes_the_history_and_events_with_it_at_once() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    let other = Uuid::new_v4();
    let base =
        |u: Uuid| format!("/services/usermanagement/api/users/{u}/climate-field-view-credentials");
    for u in [user, other] {
        assert_eq!(
            app.create(u, &body("cid", "pendingdel00")).await.status(),
            201
        );
        app.sim_post(
            &format!("/__sim/users/{u}/climate-field-view-credentials/events"),
            json!({"generate": 3, "statusCode": 401, "start": "2026-10-01T00:00:00Z", "stepSecs": 60}),
        )
        .await;
        app.sim_put(
            &format!("/__sim/users/{u}/climate-field-view-credentials/status"),
            json!({"status": "UNAUTHENTICATED"}),
        )
        .await;
        assert_eq!(
            app.get_path(&format!("{}/events", base(u)), "status:read")
                .await
                .status(),
            200
        );
        assert_eq!(
            app.get_path(&format!("{}/status", base(u)), "status:read")
                .await
                .status(),
            200
        );
    }
    // How many items a /v1 list has.
    let listed = |path: String| {
        let app = &app;
        async move {
            let v: Value = app
                .get_path(&path, "status:read")
                .await
                .json()
                .await
                .unwrap();
            v["items"].as_array().unwrap().len()
        }
    };
    let history = |u: Uuid| listed(format!("/v1/users/{u}/status-history"));
    let events = |u: Uuid| listed(format!("/v1/events?leafUserId={u}"));
    // The simulator logs the create itself as an event too.
    let held = events(user).await;
    assert!(held > 3, "{held}");
    assert_eq!(history(user).await, 2);
    app.fault(json!({"fixedStatus": 503, "method": "DELETE"}))
        .await;
    let r = app.delete(user, "credentials:delete").await;
    assert_eq!(r.status(), 202);
    assert_eq!((history(user).await, events(user).await), (0, 0));
    assert_eq!(
        app.count_for("select count(*) from event where leaf_user_id = $1", user)
            .await,
        0
    );
    // A sync's events arriving now are not stored for the credential being deleted.
    let late = credsync::store::events::Event {
        id: "late".into(),
        created_date: time::OffsetDateTime::now_utc(),
        status_code: 200,
        headers: String::new(),
        body: String::new(),
    };
    let stored = credsync::store::events::upsert(
        &app.db,
        user,
        "climate-field-view",
        std::slice::from_ref(&late),
    )
    .await
    .unwrap();
    assert_eq!(stored, 0);
    assert_eq!(events(user).await, 0);
    // The other user keeps everything, and takes new events.
    assert_eq!((history(other).await, events(other).await), (2, held));
    let stored = credsync::store::events::upsert(&app.db, other, "climate-field-view", &[late])
        .await
        .unwrap();
    assert_eq!(stored, 1);
}

/// SPEC §4: "a body that is not what Leaf sends" is Leaf unavailable, for a DELETE too (Leaf
/// answers 204 with no body): the delete is queued, not counted as done.
#[tokio::test]
async fn a_delete_answered_with_a_body_that_is_not_json_is_queued() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    assert_eq!(
        app.create(user, &body("cid", "garbage-del0"))
            .await
            .status(),
        201
    );
    app.fault(json!({"garbage": true, "method": "DELETE", "remaining": 1}))
        .await;
    let r = app.delete(user, "credentials:delete").await;
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"syncState": "DELETE_PENDING"})
    );
    assert!(app.leaf_state(user).await.is_some(), "Leaf still holds it");
    assert_eq!(
        app.count_for(
            "select count(*) from outbox where leaf_user_id = $1 and op = 'delete'",
            user
        )
        .await,
        1
    );
    assert_eq!(
        app.count_for(
            "select count(*) from credential where leaf_user_id = $1 and sync_state = 'DELETE_PENDING' and secrets is null",
            user
        )
        .await,
        1
    );
    // An empty 204 (and a JSON body) is a delete done.
    let other = Uuid::new_v4();
    assert_eq!(
        app.create(other, &body("cid", "garbage-del1"))
            .await
            .status(),
        201
    );
    assert_eq!(app.delete(other, "credentials:delete").await.status(), 204);
    assert!(app.leaf_state(other).await.is_none());
}

#[tokio::test]
async fn idempotency_key_replays_the_first_answer() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    let b = body("cid", "idem00000000");
    let send = |b: Value, key: &'static str| {
        app.client
            .post(app.cred_url(user))
            .bearer_auth(token(ALL_SCOPES))
            .header("Idempotency-Key", key)
            .json(&b)
            .send()
    };
    let first = send(b.clone(), "k-1").await.unwrap();
    assert_eq!(first.status(), 201);
    let first_body: Value = first.json().await.unwrap();
    let again = send(b.clone(), "k-1").await.unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first_body);
    let other = send(body("cid", "different000"), "k-1").await.unwrap();
    assert_problem(other, 422, "idempotency-key-reused").await;
    // Without the key the same body is a conflict: the replay did not create anything.
    assert_problem(app.create(user, &b).await, 409, "conflict").await;
    let creates = app
        .sim_requests()
        .await
        .iter()
        .filter(|(m, p)| m == "POST" && p.ends_with("climate-field-view-credentials"))
        .count();
    assert_eq!(creates, 1, "only the first request reached Leaf");
    assert_eq!(app.count("select count(*) from idempotency").await, 1);
    let dump = app.dump_all_tables().await;
    assert!(
        !dump.contains("idem00000000"),
        "no secret in the idempotency table"
    );
}

#[tokio::test]
async fn a_key_still_running_is_409_and_one_whose_request_died_is_claimed_again() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    let path = format!("/services/usermanagement/api/users/{user}/climate-field-view-credentials");
    // The same keyed hash of the same body that credsync computes (HMAC under a key derived from k1).
    let keyring =
        credsync::crypto::Keyring::parse(&format!("k1:{}", key_b64(1)), None, None).unwrap();
    let (_, hash) =
        keyring.keyed_hash(format!("idempotency|{}", body("cid", "running00000")).as_bytes());
    for (key, age) in [("k-running", "0 seconds"), ("k-dead", "5 minutes")] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "insert into idempotency (subject, path, key, request_hash, hash_key_id, created_at, expires_at)
             values ('test-caller', $1, $2, $3, 'k1', now() - interval '{age}', now() + interval '1 hour')"
        )))
        .bind(&path)
        .bind(key)
        .bind(&hash[..])
        .execute(&app.db)
        .await
        .unwrap();
    }
    let send = |key: &'static str| {
        app.client
            .post(app.cred_url(user))
            .bearer_auth(token(ALL_SCOPES))
            .header("Idempotency-Key", key)
            .json(&body("cid", "running00000"))
            .send()
    };
    let r = send("k-running").await.unwrap();
    assert!(r.headers().get("retry-after").is_some());
    assert_problem(r, 409, "idempotency-in-progress").await;
    assert!(app.sim_requests().await.is_empty());
    let r = send("k-dead").await.unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn the_circuit_breaker_opens_after_repeated_failures_and_a_probe_closes_it() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    app.fault(json!({"fixedStatus": 500})).await;
    for _ in 0..25 {
        assert_eq!(app.get(user, "credentials:read").await.status(), 502);
    }
    app.clear_sim_requests().await;
    let r = app.get(user, "credentials:read").await;
    assert!(r.headers().get("retry-after").is_some());
    assert_problem(r, 503, "upstream-unavailable").await;
    assert!(
        app.sim_requests().await.is_empty(),
        "an open breaker makes no call"
    );
    app.clear_faults().await;
    tokio::time::sleep(std::time::Duration::from_millis(5200)).await;
    assert_problem(app.get(user, "credentials:read").await, 404, "not-found").await;
    assert_problem(app.get(user, "credentials:read").await, 404, "not-found").await;
}

/// SPEC §5: "(also for an explicit `?source=cache`)" — on the GET as on `/status` and `/events`.
#[tokio::test]
async fn get_with_source_cache_answers_the_local_copy_without_asking_leaf() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    assert_eq!(
        app.create(user, &body("cid", "cacheonly000"))
            .await
            .status(),
        201
    );
    app.clear_sim_requests().await;
    let path = |u: Uuid, source: &str| {
        format!(
            "/services/usermanagement/api/users/{u}/climate-field-view-credentials?source={source}"
        )
    };
    let url = path(user, "cache");
    let r = app.get_path(&url, "credentials:read").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credsync-source"], "cache");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["clientId"], "cid");
    assert_eq!(v["syncState"], "SYNCED");
    assert_eq!(v["clientSecret"], "****y000");
    assert!(app.sim_requests().await.is_empty(), "Leaf was asked");
    // Nothing stored → 404 (still without asking Leaf); any other source → 400.
    let other = path(Uuid::new_v4(), "cache");
    assert_problem(
        app.get_path(&other, "credentials:read").await,
        404,
        "not-found",
    )
    .await;
    assert!(app.sim_requests().await.is_empty(), "Leaf was asked");
    let bogus = path(user, "bogus");
    assert_problem(
        app.get_path(&bogus, "credentials:read").await,
        400,
        "validation",
    )
    .await;
    // A delete pending → 404 from the cache as from Leaf.
    app.fault(json!({"fixedStatus": 503})).await;
    assert_eq!(app.delete(user, "credentials:delete").await.status(), 202);
    assert_problem(
        app.get_path(&url, "credentials:read").await,
        404,
        "not-found",
    )
    .await;
}

/// A 429 with `Retry-After` on a caller's create or delete: the queued entry waits that long
/// before the worker may try it (SPEC §5, §8: the worker honours `Retry-After`).
#[tokio::test]
async fn writes_queued_on_a_429_wait_for_its_retry_after() {
    let app = spawn_app().await;
    let wait_of = |user: Uuid| {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, f64>(
                "select extract(epoch from next_attempt_at - now())::float8 from outbox where leaf_user_id = $1",
            )
            .bind(user)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    let (created, held) = (Uuid::new_v4(), Uuid::new_v4());
    assert_eq!(
        app.create(held, &body("cid", "retryafter01"))
            .await
            .status(),
        201
    );
    app.fault(json!({"fixedStatus": 429, "retryAfterSecs": 40, "method": "POST", "remaining": 1}))
        .await;
    assert_eq!(
        app.create(created, &body("cid", "retryafter00"))
            .await
            .status(),
        202
    );
    let wait = wait_of(created).await;
    assert!((35.0..=40.0).contains(&wait), "create waits {wait} s");
    app.fault(
        json!({"fixedStatus": 429, "retryAfterSecs": 50, "method": "DELETE", "remaining": 1}),
    )
    .await;
    assert_eq!(app.delete(held, "credentials:delete").await.status(), 202);
    let wait = wait_of(held).await;
    assert!((45.0..=50.0).contains(&wait), "delete waits {wait} s");
    // Without a Retry-After the entry is the worker's at once.
    let other = Uuid::new_v4();
    app.fault(json!({"fixedStatus": 503, "method": "POST", "remaining": 1}))
        .await;
    assert_eq!(
        app.create(other, &body("cid", "retryafter02"))
            .await
            .status(),
        202
    );
    assert!(wait_of(other).await <= 0.0);
}
