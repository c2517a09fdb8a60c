//! Hostile input over HTTP: generated bodies, signatures and query parameters must get a clean
//! 4xx problem (or the documented success), never a 5xx or a dropped connection.
use base64::Engine as _;
use proptest::prelude::*;
use proptest::strategy::ValueTree as _;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;

const WEBHOOK_SECRET: &str = "hostile-webhook-secret-77";

fn sign(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(credsync::crypto::hmac_sha256(
        WEBHOOK_SECRET.as_bytes(),
        body,
    ))
}

/// `n` values of `strategy`, from a fixed seed (reproducible).
fn samples<S: Strategy>(strategy: S, n: usize) -> Vec<S::Value> {
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

fn alert_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        Just(Value::from("credentialsUnauthenticated")),
        Just(Value::from(Uuid::new_v4().to_string())),
        Just(Value::from("confirmation of webhook upon registration")),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("type".to_owned()),
                    Just("status".to_owned()),
                    Just("credentialId".to_owned()),
                    Just("message".to_owned()),
                    "[a-z]{0,6}",
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        alert_json().prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..200),
    ]
}

#[tokio::test]
async fn generated_alert_bodies_and_signatures_get_clean_answers() {
    let app =
        spawn_app_with(AppOptions::default().env("LEAF_WEBHOOK_SECRET", WEBHOOK_SECRET)).await;
    let url = format!("{}/v1/leaf/alerts", app.address);
    let cases = samples(
        (
            body_bytes(),
            prop_oneof![
                Just(None),
                Just(Some(String::new())),
                "[A-Za-z0-9+/=]{0,60}".prop_map(Some),
            ],
        ),
        48,
    );
    for (body, bad_sig) in cases {
        // Correctly signed: 204 for anything usable or ignorable, 400 for a non-object.
        let r = app
            .client
            .post(&url)
            .header("content-type", "application/json")
            .header("X-Leaf-Signature", sign(&body))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let is_object = matches!(serde_json::from_slice::<Value>(&body), Ok(Value::Object(_)));
        if is_object {
            assert_eq!(
                status,
                204,
                "signed object {:?}",
                String::from_utf8_lossy(&body)
            );
        } else {
            assert_problem(r, 400, "validation").await;
        }
        // Unsigned or wrongly signed: 401, except the registration confirmation (204).
        let mut req = app
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(sig) = &bad_sig {
            req = req.header("X-Leaf-Signature", sig.as_str());
        }
        let r = req.send().await.unwrap();
        let confirmation = serde_json::from_slice::<Value>(&body).ok()
            == Some(json!({"message": "confirmation of webhook upon registration"}));
        if confirmation && bad_sig.is_none() {
            assert_eq!(r.status(), 204);
        } else {
            assert_problem(r, 401, "invalid-signature").await;
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn generated_query_parameters_get_clean_answers() {
    let app = spawn_app().await;
    let params = samples(
        (
            prop_oneof![
                Just("since".to_owned()),
                Just("until".to_owned()),
                Just("limit".to_owned()),
                Just("cursor".to_owned()),
                Just("leafUserId".to_owned()),
                Just("statusCode".to_owned()),
                Just("changedSince".to_owned()),
                "[a-zA-Z]{1,8}",
            ],
            prop_oneof![
                ".{0,40}",
                "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})",
                "[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,43}",
                "-?[0-9]{1,22}",
            ],
        ),
        40,
    );
    for path in ["/v1/events", "/v1/audit", "/v1/credentials"] {
        for (name, value) in &params {
            let r = app
                .client
                .get(format!("{}{path}", app.address))
                .query(&[(name.as_str(), value.as_str())])
                .bearer_auth(token(ALL_SCOPES))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{path}?{name}={value:?}: {e}"));
            let status = r.status().as_u16();
            assert!(
                status == 200 || status == 400,
                "{path}?{name}={value:?}: {status}"
            );
            if status == 400 {
                assert_problem(r, 400, "validation").await;
            }
        }
    }
    app.stop().await;
}

/// A caller's timestamp whose UTC instant falls past year 9999 must be a 400, not a panic in
/// the handler (the connection is dropped): `timefmt::parse_strict` uses `to_offset`, which
/// panics out of range.
#[tokio::test]
async fn timestamps_past_the_supported_range_are_a_400() {
    let app = spawn_app().await;
    for (path, name) in [
        ("/v1/events", "since"),
        ("/v1/audit", "since"),
        ("/v1/credentials", "changedSince"),
    ] {
        let r = app
            .client
            .get(format!("{}{path}", app.address))
            .query(&[(name, "9999-12-31T23:59:59-23:59")])
            .bearer_auth(token(ALL_SCOPES))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}?{name}: {e}"));
        assert_problem(r, 400, "validation").await;
    }
    app.stop().await;
}

#[tokio::test]
async fn generated_create_bodies_get_clean_answers_and_never_echo_secrets() {
    let app = spawn_app().await;
    let secretish = "zq[A-Za-z0-9]{10,20}";
    let bodies = samples(
        prop_oneof![
            // Near-valid objects: each field maybe missing, of the wrong type, blank or odd.
            (
                prop::collection::vec(
                    prop::option::of(prop_oneof![
                        secretish.prop_map(Value::from),
                        Just(Value::from("")),
                        any::<i64>().prop_map(Value::from),
                        Just(Value::Null),
                        Just(json!(["zqInsideAnArray00"])),
                    ]),
                    4
                ),
                prop::option::of(("[a-z]{1,10}", secretish.prop_map(Value::from))),
            )
                .prop_map(|(values, extra)| {
                    let mut m = serde_json::Map::new();
                    for (name, v) in ["clientId", "clientSecret", "apiKey", "refreshToken"]
                        .iter()
                        .zip(values)
                    {
                        if let Some(v) = v {
                            m.insert((*name).to_owned(), v);
                        }
                    }
                    if let Some((k, v)) = extra {
                        m.insert(k, v);
                    }
                    Value::Object(m).to_string().into_bytes()
                }),
            prop::collection::vec(any::<u8>(), 0..120),
        ],
        40,
    );
    for body in bodies {
        let r = app
            .client
            .post(app.cred_url(Uuid::new_v4()))
            .bearer_auth(token(ALL_SCOPES))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert!(
            status == 201 || status == 400,
            "{status} for {:?}: {text}",
            String::from_utf8_lossy(&body)
        );
        if status == 400 {
            let problem: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(problem["type"], "urn:credsync:problem:validation");
            let body_text = String::from_utf8_lossy(&body);
            for token in body_text.split('"').filter(|t| t.starts_with("zq")) {
                assert!(!text.contains(token), "{token} echoed in {text}");
            }
        }
    }
    app.stop().await;
}
