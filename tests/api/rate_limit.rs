//! The per-caller request-rate limit (`CREDSYNC_CALLER_RPS`): keyed by the JWT `sub`.
use std::time::Duration;

use futures_util::future::join_all;
use uuid::Uuid;

use crate::helpers::*;

async fn status_as(app: &TestApp, sub: &str) -> reqwest::Response {
    app.client
        .get(app.cred_url(Uuid::new_v4()) + "/status?source=cache")
        .bearer_auth(token_for(sub, "status:read"))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_burst_from_one_caller_gets_429_while_another_caller_is_unaffected() {
    let app = spawn_app_with(AppOptions::default().env("CREDSYNC_CALLER_RPS", "2")).await;

    // 12 concurrent requests from one `sub`: the quota is 2 per second with a burst of 2, so
    // most are refused, whatever the order they arrive in.
    let burst = join_all((0..12).map(|_| status_as(&app, "noisy-svc"))).await;
    let mut passed = 0;
    let mut limited = Vec::new();
    for r in burst {
        match r.status().as_u16() {
            404 => passed += 1,
            429 => limited.push(r),
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(passed >= 1, "the first requests of the burst pass");
    assert!(
        limited.len() >= 6,
        "most of the burst is refused ({} were)",
        limited.len()
    );
    for r in limited {
        let retry_after: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .expect("Retry-After is a number of seconds");
        assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
        let body = assert_problem(r, 429, "rate-limited").await;
        assert!(!body["detail"].as_str().unwrap().is_empty());
    }

    // Another caller, right away: its own quota is untouched.
    for _ in 0..2 {
        assert_eq!(status_as(&app, "quiet-svc").await.status(), 404);
    }
    // The noisy caller is still limited: at most its burst of 2 passes…
    let again = join_all((0..6).map(|_| status_as(&app, "noisy-svc"))).await;
    assert!(again.iter().any(|r| r.status() == 429));
    // …and it passes again once its quota has refilled.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(status_as(&app, "noisy-svc").await.status(), 404);

    // A request that fails authentication is not counted against anyone (401, not 429).
    let r = app
        .client
        .get(app.cred_url(Uuid::new_v4()) + "/status?source=cache")
        .bearer_auth("not.a.jwt")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    app.stop().await;
}

#[tokio::test]
async fn without_a_limit_a_burst_passes() {
    let app = spawn_app().await;
    let burst = join_all((0..12).map(|_| status_as(&app, "noisy-svc"))).await;
    assert!(burst.iter().all(|r| r.status() == 404));
    app.stop().await;
}
