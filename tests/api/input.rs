//! Bad input always gets a clear 4xx, and nothing is stored or forwarded.
use serde_json::json;
use uuid::Uuid;

use crate::helpers::*;

async fn nothing_stored_nor_forwarded(app: &TestApp) {
    assert_eq!(app.count("select count(*) from credential").await, 0);
    assert_eq!(app.count("select count(*) from outbox").await, 0);
    assert!(
        app.sim_requests().await.is_empty(),
        "nothing forwarded to Leaf"
    );
}

#[tokio::test]
async fn malformed_bodies_are_400_naming_the_field() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    let long = "x".repeat(4097);
    let cases = [
        (r#"{"clientId": "c", "clientSecret": "s", "apiKey": "a""#.to_owned(), "JSON"),
        (json!({"clientSecret": "s", "apiKey": "a", "refreshToken": "r"}).to_string(), "clientId"),
        (json!({"clientId": "c", "clientSecret": "", "apiKey": "a", "refreshToken": "r"}).to_string(), "clientSecret"),
        (json!({"clientId": "c", "clientSecret": "s", "apiKey": 5, "refreshToken": "r"}).to_string(), "apiKey"),
        (json!({"clientId": "c", "clientSecret": "s", "apiKey": "a", "refreshToken": long}).to_string(), "refreshToken"),
        (json!({"clientId": "c", "clientSecret": "s", "apiKey": "a", "refreshToken": "r", "scopes": []}).to_string(), "scopes"),
        ("[]".to_owned(), "object"),
    ];
    for (body, field) in cases {
        let r = app
            .client
            .post(app.cred_url(user))
            .bearer_auth(token(ALL_SCOPES))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let p = assert_problem(r, 400, "validation").await;
        assert!(p["detail"].as_str().unwrap().contains(field), "{p}");
    }
    nothing_stored_nor_forwarded(&app).await;
}

#[tokio::test]
async fn a_bad_leaf_user_id_is_400() {
    let app = spawn_app().await;
    for id in ["not-a-uuid", "6f1c3a528d5e4c7b9d0e2a1b3c4d5e6f", "123"] {
        let url = format!(
            "{}/services/usermanagement/api/users/{id}/climate-field-view-credentials",
            app.address
        );
        let r = app
            .client
            .post(&url)
            .bearer_auth(token(ALL_SCOPES))
            .json(&body("c", "badid0000000"))
            .send()
            .await
            .unwrap();
        let p = assert_problem(r, 400, "validation").await;
        assert!(p["detail"].as_str().unwrap().contains("leafUserId"));
        let r = app
            .client
            .get(&url)
            .bearer_auth(token(ALL_SCOPES))
            .send()
            .await
            .unwrap();
        assert_problem(r, 400, "validation").await;
    }
    nothing_stored_nor_forwarded(&app).await;
}

#[tokio::test]
async fn form_encoding_or_no_content_type_is_415() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    let r = app
        .client
        .post(app.cred_url(user))
        .bearer_auth(token(ALL_SCOPES))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"clientId": "str","clientSecret": "str","apiKey": "str","refreshToken": "str"}"#)
        .send()
        .await
        .unwrap();
    let p = assert_problem(r, 415, "unsupported-media-type").await;
    assert!(p["detail"].as_str().unwrap().contains("application/json"));
    let r = app
        .client
        .post(app.cred_url(user))
        .bearer_auth(token(ALL_SCOPES))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(r, 415, "unsupported-media-type").await;
    nothing_stored_nor_forwarded(&app).await;
}

#[tokio::test]
async fn an_oversized_body_is_413() {
    let app = spawn_app_with(AppOptions::default().env("CREDSYNC_MAX_BODY_BYTES", "1024")).await;
    let user = Uuid::new_v4();
    let big = json!({"clientId": "c", "clientSecret": "x".repeat(2000), "apiKey": "a", "refreshToken": "r"});
    let r = app.create(user, &big).await;
    assert_problem(r, 413, "payload-too-large").await;
    nothing_stored_nor_forwarded(&app).await;
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems_too() {
    let app = spawn_app().await;
    let r = app.get_path("/nope", ALL_SCOPES).await;
    assert_problem(r, 404, "not-found").await;
    let r = app
        .client
        .put(app.cred_url(Uuid::new_v4()))
        .bearer_auth(token(ALL_SCOPES))
        .send()
        .await
        .unwrap();
    assert_problem(r, 405, "method-not-allowed").await;
    let r = app
        .get_path(
            &format!(
                "/services/usermanagement/api/users/{}/john-deere-credentials",
                Uuid::new_v4()
            ),
            ALL_SCOPES,
        )
        .await;
    assert_problem(r, 404, "not-found").await;
}

#[tokio::test]
async fn a_callers_request_id_is_kept_and_sent_to_leaf_and_a_bad_one_replaced() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    let r = app
        .client
        .get(app.cred_url(user))
        .bearer_auth(token(ALL_SCOPES))
        .header("X-Request-Id", "caller-id.42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "caller-id.42");
    assert!(
        app.sim_request_log()
            .await
            .iter()
            .any(|r| r["requestId"] == "caller-id.42")
    );
    let r = app
        .client
        .get(app.cred_url(user))
        .bearer_auth(token(ALL_SCOPES))
        .header("X-Request-Id", "bad id!")
        .send()
        .await
        .unwrap();
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(rid, "bad id!");
    assert!(!rid.is_empty());
}

#[tokio::test]
async fn nul_characters_wrong_methods_and_non_object_sync_bodies_are_client_errors() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    let r = app.create(user, &json!({"clientId": "a\u{0}b", "clientSecret": "s", "apiKey": "a", "refreshToken": "r"})).await;
    let p = assert_problem(r, 400, "validation").await;
    assert!(p["detail"].as_str().unwrap().contains("clientId"));
    let r = app
        .get_path("/v1/credentials?status=a%00b", ALL_SCOPES)
        .await;
    assert_problem(r, 400, "validation").await;
    let r = app
        .client
        .post(format!("{}/healthz", app.address))
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()
            .get("allow")
            .is_some_and(|v| v.to_str().unwrap().contains("GET"))
    );
    assert_problem(r, 405, "method-not-allowed").await;
    let r = app
        .client
        .put(app.cred_url(user))
        .bearer_auth(token(ALL_SCOPES))
        .send()
        .await
        .unwrap();
    let allow = r.headers()["allow"].to_str().unwrap().to_owned();
    assert!(
        allow.contains("POST") && allow.contains("DELETE"),
        "{allow}"
    );
    let r = app
        .client
        .post(format!("{}/v1/sync", app.address))
        .bearer_auth(token("admin"))
        .json(&json!([]))
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "validation").await;
    nothing_stored_nor_forwarded(&app).await;
}
