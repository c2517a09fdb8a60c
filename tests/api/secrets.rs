//! Secrets stay secret: every route, failures included, then a scan of every answer, the logs,
//! the metrics and every table for the secret values in clear, base64 or hex.
use std::time::Duration;

use base64::Engine as _;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::*;

fn encodings(secret: &str) -> Vec<String> {
    let b = secret.as_bytes();
    vec![
        secret.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(b),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b),
        b.iter().map(|x| format!("{x:02x}")).collect(),
    ]
}

#[tokio::test]
async fn no_secret_value_appears_in_answers_logs_metrics_or_tables() {
    let app =
        spawn_app_with(AppOptions::default().env("LEAF_WEBHOOK_SECRET", "webhook-secret-zz9qq8"))
            .await;
    let secrets = ["CS-zq7Kx9Lm2Np4", "AK-vb3Hy6Tr8Ws1", "RT-pe5Jd2Qa7Uc9"];
    let body = json!({"clientId": "visible-client", "clientSecret": secrets[0], "apiKey": secrets[1], "refreshToken": secrets[2]});
    let mut answers = String::new();
    let mut keep = |s: String| answers.push_str(&s);
    let (u1, u2, u3) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // Success paths.
    for r in [
        app.create(u1, &body).await,
        app.get(u1, "credentials:read").await,
        app.get_path(
            &format!(
                "/services/usermanagement/api/users/{u1}/climate-field-view-credentials/status"
            ),
            "status:read",
        )
        .await,
        app.get_path(
            &format!(
                "/services/usermanagement/api/users/{u1}/climate-field-view-credentials/events"
            ),
            "status:read",
        )
        .await,
        app.get_path("/v1/credentials", "admin").await,
        app.get_path("/v1/credentials/summary", "admin").await,
        app.get_path("/v1/events", "admin").await,
        app.get_path("/v1/audit", "admin").await,
        app.get_path(&format!("/v1/users/{u1}/status-history"), "admin")
            .await,
    ] {
        let head = format!("{} {:?}", r.status(), r.headers());
        keep(format!("{head} {}", r.text().await.unwrap()));
    }
    // Failures: conflict, bad bodies, Leaf rejecting (echoing the refresh token), Leaf down.
    let mut rejected = body.clone();
    rejected["refreshToken"] = json!(format!("invalid-{}", secrets[2]));
    let mut bad_type = body.clone();
    bad_type["apiKey"] = json!(12345);
    let mut unknown = body.clone();
    unknown["extra"] = json!(secrets[0]);
    for r in [
        app.create(u1, &body).await,
        app.create(u2, &rejected).await,
        app.create(u2, &bad_type).await,
        app.create(u2, &unknown).await,
        app.client
            .post(app.cred_url(u2))
            .bearer_auth(token(ALL_SCOPES))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("clientSecret={}", secrets[0]))
            .send()
            .await
            .unwrap(),
        app.client
            .post(app.cred_url(u2))
            .bearer_auth(token(ALL_SCOPES))
            .header("content-type", "application/json")
            .body(format!("{{\"clientSecret\": \"{}\"", secrets[0]))
            .send()
            .await
            .unwrap(),
        app.post(u2, &body, "status:read").await,
    ] {
        let head = format!("{} {:?}", r.status(), r.headers());
        keep(format!("{head} {}", r.text().await.unwrap()));
    }
    app.fault(json!({"fixedStatus": 503})).await;
    for r in [
        app.create(u3, &body).await,
        app.get(u1, "credentials:read").await,
        app.delete(u1, ALL_SCOPES).await,
    ] {
        let head = format!("{} {:?}", r.status(), r.headers());
        keep(format!("{head} {}", r.text().await.unwrap()));
    }
    app.clear_faults().await;
    // An alert with a bad signature.
    let r = app
        .client
        .post(format!("{}/v1/leaf/alerts", app.address))
        .header("X-Leaf-Signature", "bm90LXRoZS1yaWdodC1zaWduYXR1cmU=")
        .header("content-type", "application/json")
        .body(r#"{"credentialId": "00000000-0000-0000-0000-000000000000", "type": "credentialsUnauthenticated"}"#)
        .send()
        .await
        .unwrap();
    keep(format!("{} {}", r.status(), r.text().await.unwrap()));
    let metrics = app.metrics().await;
    let tables = app.dump_all_tables().await;
    let logs = captured_logs();
    assert!(logs.contains("request"), "logs were captured");
    assert!(
        tables.contains("visible-client"),
        "the dump holds the stored rows"
    );
    for secret in secrets
        .iter()
        .copied()
        .chain(["webhook-secret-zz9qq8", "leaf-pass", JWT_SECRET])
    {
        for enc in encodings(secret) {
            assert!(!answers.contains(&enc), "{secret} ({enc}) in an answer");
            assert!(!metrics.contains(&enc), "{secret} ({enc}) in the metrics");
            assert!(!tables.contains(&enc), "{secret} ({enc}) in a table");
            assert!(!logs.contains(&enc), "{secret} ({enc}) in the logs");
        }
    }
}

/// Put `from`'s envelope on `to`'s row (an attacker with write access to the table).
async fn move_envelope(app: &TestApp, from: Uuid, to: Uuid) {
    sqlx::query(
        "update credential b set key_id = a.key_id, wrapped_key = a.wrapped_key, secrets = a.secrets
         from credential a where a.leaf_user_id = $1 and b.leaf_user_id = $2",
    )
    .bind(from)
    .bind(to)
    .execute(&app.db)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_ciphertext_moved_onto_another_users_row_does_not_decrypt() {
    let app = spawn_app().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    app.create(alice, &body("alice", "alice0000000")).await;
    app.create(bob, &body("bob", "bob000000000")).await;
    app.fault(json!({"fixedStatus": 503})).await;
    // Bob's row gets Alice's envelope.
    move_envelope(&app, alice, bob).await;
    let r = app.get(bob, "credentials:reveal").await;
    assert_eq!(r.status(), 500);
    let text = r.text().await.unwrap();
    assert!(!text.contains("alice0000000"));
    let r = app.get(alice, "credentials:reveal").await;
    assert_eq!(r.status(), 200, "Alice's own row still opens");
}

/// Leaf's refusals are passed on (SPEC §4) with the secrets credsync holds for the user masked,
/// on reads and deletes as on a create: Leaf may quote the credential it refuses.
#[tokio::test]
async fn leafs_refusal_quoting_a_stored_secret_is_passed_on_masked() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    let suffix = "quoted000000";
    assert_eq!(app.create(user, &body("cid", suffix)).await.status(), 201);
    let secrets = [
        format!("client-secret-{suffix}"),
        format!("api-key-{suffix}"),
        format!("refresh-token-{suffix}"),
    ];
    let quote = format!(
        "refused: secret {} key {} token {}",
        secrets[0], secrets[1], secrets[2]
    );
    let base = app.cred_url(user);
    for (method, path, scope) in [
        ("GET", base.clone(), "credentials:read"),
        ("GET", format!("{base}/status"), "status:read"),
        ("GET", format!("{base}/events"), "status:read"),
        ("DELETE", base.clone(), "credentials:delete"),
    ] {
        app.fault(json!({"fixedStatus": 422, "detail": quote, "method": method, "remaining": 1}))
            .await;
        let r = app
            .client
            .request(method.parse().unwrap(), &path)
            .bearer_auth(token(scope))
            .send()
            .await
            .unwrap();
        let problem = assert_problem(r, 422, "upstream-rejected").await;
        let detail = problem["detail"].as_str().unwrap();
        assert_eq!(
            detail, "refused: secret **** key **** token ****",
            "{method} {path}"
        );
    }
    // The failed delete's audit entry carries the masked text too, and no table holds a secret,
    // nor does any log line.
    let dump = app.dump_all_tables().await;
    assert!(dump.contains("refused: secret **** key **** token ****"));
    let logs = captured_logs();
    for s in &secrets {
        assert!(!dump.contains(s.as_str()), "{s} is stored in clear");
        assert!(!logs.contains(s.as_str()), "{s} is in the logs");
    }
}

/// The sync worker meeting the same refusal: its log lines and bookkeeping carry Leaf's status,
/// not Leaf's text.
#[tokio::test]
async fn the_worker_logs_leafs_refusal_without_its_text() {
    let app = spawn_app_with(with_worker(1)).await;
    let user = Uuid::new_v4();
    let suffix = "workerquote0";
    assert_eq!(app.create(user, &body("cid", suffix)).await.status(), 201);
    let secret = format!("client-secret-{suffix}");
    app.fault(json!({"fixedStatus": 422, "detail": format!("refused {secret}"), "method": "GET"}))
        .await;
    wait_until("a refused sync", Duration::from_secs(20), || async {
        app.count_for(
            "select count(*) from credential where leaf_user_id = $1 and sync_failures > 0",
            user,
        )
        .await
            > 0
    })
    .await;
    let logs = captured_logs();
    assert!(logs.contains("Leaf answered 422"), "the refusal is logged");
    assert!(!logs.contains(&secret), "the secret is in the logs");
    assert!(!app.dump_all_tables().await.contains(&secret));
}

/// The worker meeting a row whose envelope does not open (moved from another user's row) says
/// so in its log, instead of blaming Leaf, and backs off.
#[tokio::test]
async fn the_worker_reports_a_row_that_does_not_open_as_such() {
    let app = spawn_app_with(with_worker(1)).await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    app.create(alice, &body("alice", "alice0000001")).await;
    app.create(bob, &body("bob", "bob000000001")).await;
    move_envelope(&app, alice, bob).await;
    wait_until(
        "a failed sync of Bob's row",
        Duration::from_secs(20),
        || async {
            app.count_for(
                "select count(*) from credential where leaf_user_id = $1 and sync_failures > 0",
                bob,
            )
            .await
                > 0
        },
    )
    .await;
    let logs = captured_logs();
    let line = logs
        .lines()
        .find(|l| l.contains("could not store Leaf's answer") && l.contains(&bob.to_string()))
        .expect("the failure is logged for Bob");
    assert!(line.contains("cannot open the stored credential"), "{line}");
    assert!(!logs.contains("alice0000001") && !logs.contains("bob000000001"));
}
