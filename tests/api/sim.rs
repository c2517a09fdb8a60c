//! Tests of the Leaf simulator (`credsync::sim`) through real HTTP: authentication and
//! tokens, credentials, events, users, faults, the request log and signed alert deliveries.

use std::{
    net::TcpListener,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use base64::Engine as _;
use credsync::sim::{SimOptions, SimServer};
use hmac::{Hmac, Mac};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::Sha256;

const CFV: &str = "climate-field-view-credentials";
const USERS: &str = "/services/usermanagement/api/users";
const WEBHOOKS: &str = "/services/alerts/api/alerts/webhooks";
const PROBLEM_TYPE: &str = "https://www.jhipster.tech/problem/problem-with-message";

// ---------------------------------------------------------------------------------------
// Helpers

struct Sim {
    server: SimServer,
    http: reqwest::Client,
    token: String,
}

fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

async fn start_with(opts: SimOptions) -> Sim {
    let server = SimServer::start(listener(), opts).unwrap();
    let http = reqwest::Client::new();
    let mut sim = Sim {
        server,
        http,
        token: String::new(),
    };
    sim.token = sim.authenticate("svc", "pw").await;
    sim
}

async fn start() -> Sim {
    start_with(SimOptions::default()).await
}

impl Sim {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base_url())
    }

    async fn authenticate(&self, username: &str, password: &str) -> String {
        let res = self
            .http
            .post(self.url("/api/authenticate"))
            .json(&json!({"username": username, "password": password, "rememberMe": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body: Value = res.json().await.unwrap();
        body["id_token"].as_str().unwrap().to_owned()
    }

    /// A Leaf request carrying the current token.
    fn leaf(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    fn admin(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(&format!("/__sim{path}")))
    }

    async fn set_faults(&self, faults: Value) {
        let res = self
            .admin(Method::PUT, "/faults")
            .json(&faults)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NO_CONTENT);
    }

    async fn create_cfv(&self, user: &str, refresh_token: &str) -> reqwest::Response {
        self.leaf(Method::POST, &format!("{USERS}/{user}/{CFV}"))
            .json(&cfv_body(refresh_token))
            .send()
            .await
            .unwrap()
    }

    async fn requests(&self) -> Value {
        self.admin(Method::GET, "/requests")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn cfv_body(refresh_token: &str) -> Value {
    json!({
        "clientId": "client-1",
        "clientSecret": "client-secret-123456",
        "apiKey": "api-key-123456",
        "refreshToken": refresh_token,
    })
}

fn new_user() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn header<'a>(res: &'a reqwest::Response, name: &str) -> &'a str {
    res.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

async fn assert_problem(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status().as_u16(), status);
    assert_eq!(header(&res, "content-type"), "application/problem+json");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["type"], PROBLEM_TYPE);
    assert_eq!(body["status"], status);
    assert!(body["title"].is_string());
    assert!(body["detail"].is_string());
    assert!(body["path"].as_str().unwrap().starts_with('/'));
    body
}

fn is_micros_z(s: &str) -> bool {
    s.len() == 27 && s.ends_with('Z') && s.as_bytes()[19] == b'.'
}

/// One POST received by the test's webhook endpoint.
#[derive(Clone, Debug)]
struct Received {
    signature: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// A tiny webhook endpoint that records what it receives and answers `status`.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start(status: u16) -> Receiver {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let sink = got.clone();
        let lst = listener();
        let url = format!("http://{}/hook", lst.local_addr().unwrap());
        let server = HttpServer::new(move || {
            let sink = sink.clone();
            App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let sink = sink.clone();
                async move {
                    let h = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
                    sink.lock().unwrap().push(Received {
                        signature: h("x-leaf-signature"),
                        content_type: h("content-type"),
                        body: body.to_vec(),
                    });
                    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap())
                        .finish()
                }
            }))
        })
        .workers(1)
        .disable_signals()
        .listen(lst)
        .unwrap()
        .run();
        tokio::spawn(server);
        Receiver { url, got }
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

fn verifies(secret: &str, r: &Received) -> bool {
    let Some(sig) = &r.signature else {
        return false;
    };
    let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(sig) else {
        return false;
    };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&r.body);
    mac.verify_slice(&sig).is_ok()
}

async fn register_webhook(
    sim: &Sim,
    url: &str,
    secret: &str,
    events: &[&str],
) -> reqwest::Response {
    sim.leaf(Method::POST, WEBHOOKS)
        .json(&json!({"events": events, "name": "credsync", "secret": secret, "url": url}))
        .send()
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Authentication

#[tokio::test]
async fn authenticate_issues_a_jwt_whose_exp_reflects_the_token_ttl() {
    let sim = start_with(SimOptions {
        token_ttl: Duration::from_secs(120),
        ..SimOptions::default()
    })
    .await;
    let claims = jwt_claims(&sim.token);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let exp = claims["exp"].as_i64().unwrap();
    assert!((119..=122).contains(&(exp - now)), "exp {exp}, now {now}");
    assert_eq!(claims["sub"], "svc");

    // rememberMe may also come as a string, as Leaf's docs send it.
    let res = sim
        .http
        .post(sim.url("/api/authenticate"))
        .json(&json!({"username": "a", "password": "b", "rememberMe": "true"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body.as_object().unwrap().len(), 1, "only id_token: {body}");
}

#[tokio::test]
async fn authenticate_refuses_wrong_credentials_with_a_problem() {
    let sim = start_with(SimOptions {
        username: Some("svc".into()),
        password: Some("pw".into()),
        ..SimOptions::default()
    })
    .await;
    let res = sim
        .http
        .post(sim.url("/api/authenticate"))
        .json(&json!({"username": "svc", "password": "wrong", "rememberMe": false}))
        .send()
        .await
        .unwrap();
    let body = assert_problem(res, 401).await;
    assert_eq!(body["path"], "/api/authenticate");
    assert_eq!(body["message"], "error.http.401");
}

#[tokio::test]
async fn leaf_routes_require_a_token_the_simulator_issued() {
    let sim = start().await;
    let path = format!("{USERS}/{}/{CFV}", new_user());
    let res = sim.http.get(sim.url(&path)).send().await.unwrap();
    assert_problem(res, 401).await;
    let res = sim
        .http
        .get(sim.url(&path))
        .bearer_auth("not.a.jwt")
        .send()
        .await
        .unwrap();
    assert_problem(res, 401).await;

    // A token of another simulator (another secret) is refused too.
    let other = start().await;
    let res = sim
        .http
        .get(sim.url(&path))
        .bearer_auth(&other.token)
        .send()
        .await
        .unwrap();
    assert_problem(res, 401).await;

    let res = sim.leaf(Method::GET, &path).send().await.unwrap();
    assert_problem(res, 404).await;
}

#[tokio::test]
async fn tokens_expire_after_the_configured_ttl() {
    let sim = start_with(SimOptions {
        token_ttl: Duration::from_secs(1),
        ..SimOptions::default()
    })
    .await;
    let res = sim.leaf(Method::GET, USERS).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // `exp` is whole seconds, rounded up: the token lives between 1 and 2 seconds.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let res = sim.leaf(Method::GET, USERS).send().await.unwrap();
    assert_problem(res, 401).await;

    // The lifetime can be changed at run time.
    let res = sim
        .admin(Method::PUT, "/config")
        .json(&json!({"tokenTtlSecs": 300}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let token = sim.authenticate("svc", "pw").await;
    let claims = jwt_claims(&token);
    let left = claims["exp"].as_i64().unwrap() - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((299..=301).contains(&left), "{left}");
}

#[tokio::test]
async fn revoking_tokens_forces_clients_to_authenticate_again() {
    let mut sim = start().await;
    let res = sim
        .admin(Method::POST, "/tokens/revoke")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let res = sim.leaf(Method::GET, USERS).send().await.unwrap();
    let body = assert_problem(res, 401).await;
    assert_eq!(body["detail"], "Revoked JWT token");

    sim.token = sim.authenticate("svc", "pw").await;
    let res = sim.leaf(Method::GET, USERS).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

// ---------------------------------------------------------------------------------------
// Credentials

#[tokio::test]
async fn credentials_are_created_read_and_deleted_like_leaf_does() {
    let sim = start().await;
    let user = new_user();
    let res = sim.create_cfv(&user, "refresh-123456").await;
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(header(&res, "content-type"), "application/json");
    let created: Value = res.json().await.unwrap();
    uuid::Uuid::parse_str(created["id"].as_str().unwrap()).unwrap();
    assert_eq!(created["status"], "OK");
    assert!(
        is_micros_z(created["createdTime"].as_str().unwrap()),
        "{created}"
    );
    assert!(created["tokenMetadata"]["scopes"].as_array().unwrap().len() > 1);
    assert_eq!(created["clientId"], "client-1");
    assert_eq!(created["clientSecret"], "client-secret-123456");
    assert_eq!(created["apiKey"], "api-key-123456");
    assert_eq!(created["refreshToken"], "refresh-123456");
    assert!(created["accessToken"].as_str().unwrap().len() >= 20);

    let path = format!("{USERS}/{user}/{CFV}");
    let res = sim.leaf(Method::GET, &path).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let fetched: Value = res.json().await.unwrap();
    assert_eq!(fetched, created);

    let res = sim
        .leaf(Method::GET, &format!("{path}/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"status": "OK"}));

    let res = sim.leaf(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert!(res.bytes().await.unwrap().is_empty());
    let res = sim.leaf(Method::GET, &path).send().await.unwrap();
    assert_problem(res, 404).await;
    let res = sim.leaf(Method::DELETE, &path).send().await.unwrap();
    assert_problem(res, 404).await;
}

#[tokio::test]
async fn a_second_credential_for_the_same_user_is_a_409() {
    let sim = start().await;
    let user = new_user();
    assert_eq!(
        sim.create_cfv(&user, "r-1").await.status(),
        StatusCode::CREATED
    );
    let res = sim.create_cfv(&user, "r-2").await;
    assert_problem(res, 409).await;
    // The first one is untouched.
    let res = sim
        .admin(Method::GET, &format!("/state/users/{user}/{CFV}"))
        .send()
        .await
        .unwrap();
    let stored: Value = res.json().await.unwrap();
    assert_eq!(stored["refreshToken"], "r-1");
}

#[tokio::test]
async fn bad_credential_requests_get_400_415_or_404_problems() {
    let sim = start().await;
    let user = new_user();
    let path = format!("{USERS}/{user}/{CFV}");
    let post = |body: Value| sim.leaf(Method::POST, &path).json(&body).send();

    let mut missing = cfv_body("r");
    missing.as_object_mut().unwrap().remove("apiKey");
    let body = assert_problem(post(missing).await.unwrap(), 400).await;
    assert!(
        body["detail"].as_str().unwrap().contains("apiKey"),
        "{body}"
    );

    let mut empty = cfv_body("r");
    empty["clientId"] = json!("");
    let body = assert_problem(post(empty).await.unwrap(), 400).await;
    assert!(
        body["detail"].as_str().unwrap().contains("clientId"),
        "{body}"
    );

    let mut number = cfv_body("r");
    number["clientSecret"] = json!(42);
    let body = assert_problem(post(number).await.unwrap(), 400).await;
    assert!(body["detail"].as_str().unwrap().contains("clientSecret"));

    let mut extra = cfv_body("r");
    extra["color"] = json!("blue");
    let body = assert_problem(post(extra).await.unwrap(), 400).await;
    assert!(body["detail"].as_str().unwrap().contains("color"));

    let body = assert_problem(post(cfv_body("invalid-token")).await.unwrap(), 400).await;
    assert_eq!(body["detail"], "Invalid refresh token");

    let res = sim
        .leaf(Method::POST, &path)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_problem(res, 400).await;

    let res = sim
        .leaf(Method::POST, &path)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("clientId=a&clientSecret=b")
        .send()
        .await
        .unwrap();
    assert_problem(res, 415).await;

    let res = sim
        .leaf(Method::POST, &format!("{USERS}/not-a-uuid/{CFV}"))
        .json(&cfv_body("r"))
        .send()
        .await
        .unwrap();
    assert_problem(res, 400).await;

    let res = sim
        .leaf(Method::POST, &format!("{USERS}/{user}/acme-credentials"))
        .json(&cfv_body("r"))
        .send()
        .await
        .unwrap();
    assert_problem(res, 404).await;

    // None of these created anything.
    let res = sim.leaf(Method::GET, &path).send().await.unwrap();
    assert_problem(res, 404).await;
}

#[tokio::test]
async fn other_providers_use_their_own_segment_and_fields() {
    let sim = start().await;
    let user = new_user();
    let path = format!("{USERS}/{user}/john-deere-credentials");
    let body = json!({
        "clientKey": "k", "clientSecret": "s", "refreshToken": "r", "clientEnvironment": "STAGE"
    });
    let res = sim
        .leaf(Method::POST, &path)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let created: Value = res.json().await.unwrap();
    assert_eq!(created["clientKey"], "k");
    assert_eq!(created["clientEnvironment"], "STAGE");

    let mut wrong_env = body.clone();
    wrong_env["clientEnvironment"] = json!("MOON");
    let res = sim
        .leaf(
            Method::POST,
            &format!("{USERS}/{}/john-deere-credentials", new_user()),
        )
        .json(&wrong_env)
        .send()
        .await
        .unwrap();
    assert_problem(res, 400).await;

    // A Climate FieldView body is not a John Deere body.
    let res = sim
        .leaf(
            Method::POST,
            &format!("{USERS}/{}/john-deere-credentials", new_user()),
        )
        .json(&cfv_body("r"))
        .send()
        .await
        .unwrap();
    assert_problem(res, 400).await;
}

// ---------------------------------------------------------------------------------------
// Events

async fn add_events(sim: &Sim, user: &str, body: Value) -> Value {
    let res = sim
        .admin(Method::POST, &format!("/users/{user}/{CFV}/events"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    res.json().await.unwrap()
}

async fn events_page(
    sim: &Sim,
    user: &str,
    query: &str,
) -> (reqwest::StatusCode, Option<String>, Option<String>, Value) {
    let res = sim
        .leaf(Method::GET, &format!("{USERS}/{user}/{CFV}/events{query}"))
        .send()
        .await
        .unwrap();
    let status = res.status();
    let total = res
        .headers()
        .get("x-total-count")
        .map(|v| v.to_str().unwrap().to_owned());
    let link = res
        .headers()
        .get("link")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, total, link, res.json().await.unwrap())
}

fn dates(events: &Value) -> Vec<time::OffsetDateTime> {
    events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = e["createdDate"].as_str().unwrap();
            let with_zone = if s.ends_with('Z') {
                s.to_owned()
            } else {
                format!("{s}Z")
            };
            time::OffsetDateTime::parse(&with_zone, &time::format_description::well_known::Rfc3339)
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn events_are_paged_newest_first_with_total_count_and_links() {
    let sim = start().await;
    let user = new_user();
    assert_eq!(
        sim.create_cfv(&user, "r").await.status(),
        StatusCode::CREATED
    );
    // The create recorded one token exchange; add 44 older events, one a minute, 45 days ago.
    let start = time::OffsetDateTime::now_utc() - time::Duration::days(45);
    let start = start
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let added = add_events(
        &sim,
        &user,
        json!({"generate": 44, "statusCode": 401, "start": start, "stepSecs": 60}),
    )
    .await;
    assert_eq!(added, json!({"added": 44}));

    let (status, total, link, first) = events_page(&sim, &user, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(total.as_deref(), Some("45"));
    let link = link.unwrap();
    assert!(link.contains("page=1&size=20>; rel=\"next\""), "{link}");
    assert!(link.contains("page=2&size=20>; rel=\"last\""), "{link}");
    assert!(link.contains("page=0&size=20>; rel=\"first\""), "{link}");
    assert!(!link.contains("rel=\"prev\""), "{link}");
    let items = first.as_array().unwrap();
    assert_eq!(items.len(), 20);
    assert_eq!(
        items[0]["statusCode"], 200,
        "the newest is the create's token exchange"
    );
    for key in ["id", "createdDate", "headers", "body"] {
        assert!(items[1][key].is_string(), "{key}: {}", items[1]);
    }
    let d = dates(&first);
    assert!(d.windows(2).all(|w| w[0] >= w[1]), "newest first");

    let (_, _, link, last) = events_page(&sim, &user, "?page=2&size=20").await;
    assert_eq!(last.as_array().unwrap().len(), 5);
    assert!(link.unwrap().contains("rel=\"prev\""));
    let (_, _, _, beyond) = events_page(&sim, &user, "?page=9").await;
    assert_eq!(beyond, json!([]));

    let (_, _, link, asc) = events_page(&sim, &user, "?sort=createdDate,asc&size=500").await;
    assert_eq!(asc.as_array().unwrap().len(), 45, "size is clamped to 100");
    assert!(
        link.unwrap()
            .contains("sort=createdDate%2Casc&page=0&size=100")
    );
    let d = dates(&asc);
    assert!(d.windows(2).all(|w| w[0] <= w[1]), "oldest first");

    // Leaf writes dates in mixed formats: mostly 6 digits with Z, some 3 digits, some no Z.
    let raw: Vec<String> = asc
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["createdDate"].as_str().unwrap().to_owned())
        .collect();
    assert!(raw.iter().any(|s| is_micros_z(s)));
    assert!(
        raw.iter().any(|s| s.len() == 24 && s.ends_with('Z')),
        "3 digits"
    );
    assert!(raw.iter().any(|s| !s.ends_with('Z')), "no zone");
    let (_, _, _, again) = events_page(&sim, &user, "?sort=createdDate,asc&size=100").await;
    assert_eq!(again, asc, "formats are stable per event");

    let (status, _, _, _) = events_page(&sim, &user, "?sort=statusCode,desc").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn events_with_equal_dates_are_ordered_by_id_in_the_sort_direction() {
    let sim = start().await;
    let user = new_user();
    sim.create_cfv(&user, "r").await;
    let at = "2020-05-05T05:05:05.000001Z";
    add_events(
        &sim,
        &user,
        json!({"events": [
            {"id": "b", "createdDate": at, "statusCode": 200},
            {"id": "c", "createdDate": at, "statusCode": 500, "headers": "h", "body": "x"},
            {"id": "a", "createdDate": at, "statusCode": 401},
        ]}),
    )
    .await;
    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, _, _, desc) = events_page(&sim, &user, "?size=3&page=1").await;
    assert_eq!(ids(&desc), ["a"], "page 1 holds the oldest");
    let (_, _, _, asc) = events_page(&sim, &user, "?sort=createdDate,asc&size=3").await;
    assert_eq!(ids(&asc), ["a", "b", "c"]);
    assert_eq!(
        asc[2]["createdDate"], at,
        "a given date is answered verbatim"
    );
    assert_eq!(asc[2]["headers"], "h");
    assert_eq!(asc[2]["body"], "x");
    let (_, _, _, desc) = events_page(&sim, &user, "?size=4").await;
    assert_eq!(ids(&desc)[1..], ["c", "b", "a"]);
}

#[tokio::test]
async fn events_of_a_missing_credential_are_404_and_deleting_drops_them() {
    let sim = start().await;
    let user = new_user();
    let (status, _, _, _) = events_page(&sim, &user, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    sim.create_cfv(&user, "r").await;
    add_events(&sim, &user, json!({"generate": 5})).await;
    let (_, total, _, _) = events_page(&sim, &user, "").await;
    assert_eq!(total.as_deref(), Some("6"));
    sim.leaf(Method::DELETE, &format!("{USERS}/{user}/{CFV}"))
        .send()
        .await
        .unwrap();
    let (status, _, _, _) = events_page(&sim, &user, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    sim.create_cfv(&user, "r").await;
    let (_, total, _, _) = events_page(&sim, &user, "").await;
    assert_eq!(total.as_deref(), Some("1"), "old events are gone");
}

// ---------------------------------------------------------------------------------------
// Users

#[tokio::test]
async fn users_are_paged_filtered_and_embed_their_credentials() {
    let sim = start().await;
    let mut ids = Vec::new();
    for i in 0..25 {
        let res = sim
            .leaf(Method::POST, USERS)
            .json(&json!({"name": format!("grower {i}"), "email": format!("g{i}@example.com"), "externalId": format!("ext-{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        let location = header(&res, "location").to_owned();
        let user: Value = res.json().await.unwrap();
        let id = user["id"].as_str().unwrap().to_owned();
        assert!(location.ends_with(&id));
        ids.push(id);
    }
    let res = sim
        .leaf(Method::GET, &format!("{USERS}?page=1&size=10"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&res, "x-total-count"), "25");
    let link = header(&res, "link").to_owned();
    assert!(link.contains("page=2&size=10>; rel=\"next\""), "{link}");
    assert!(link.contains("page=0&size=10>; rel=\"prev\""), "{link}");
    let page: Value = res.json().await.unwrap();
    assert_eq!(page.as_array().unwrap().len(), 10);
    assert_eq!(page[0]["id"], ids[10].as_str(), "creation order");
    // `sort` on a user property, ascending unless `desc`; another property is a 400.
    for (sort, first) in [
        ("name,desc", "grower 9"),
        ("name", "grower 0"),
        ("externalId,asc", "grower 0"),
        ("email,DESC", "grower 9"),
    ] {
        let res = sim
            .leaf(Method::GET, &format!("{USERS}?sort={sort}&size=3"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{sort}");
        assert_eq!(header(&res, "x-total-count"), "25");
        let page: Value = res.json().await.unwrap();
        assert_eq!(page[0]["name"], first, "{sort}");
    }
    let res = sim
        .leaf(Method::GET, &format!("{USERS}?sort=bogus,desc"))
        .send()
        .await
        .unwrap();
    assert_problem(res, 400).await;

    let res = sim
        .leaf(Method::GET, &format!("{USERS}?email=g7@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&res, "x-total-count"), "1");
    let found: Value = res.json().await.unwrap();
    assert_eq!(found[0]["externalId"], "ext-7");
    let res = sim
        .leaf(
            Method::GET,
            &format!("{USERS}?externalId=ext-3&name=grower%203"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.json::<Value>().await.unwrap()[0]["id"], ids[3].as_str());

    assert_eq!(
        sim.create_cfv(&ids[4], "r-4").await.status(),
        StatusCode::CREATED
    );
    let res = sim
        .leaf(Method::GET, &format!("{USERS}/{}", ids[4]))
        .send()
        .await
        .unwrap();
    let user: Value = res.json().await.unwrap();
    assert_eq!(user["climateFieldViewCredentials"]["refreshToken"], "r-4");
    assert_eq!(
        user["climateFieldViewCredentials"]["clientSecret"],
        "client-secret-123456"
    );
    assert!(user["johnDeereCredentials"].is_null());

    // A credential POST creates an unknown user implicitly.
    let implicit = new_user();
    sim.create_cfv(&implicit, "r").await;
    let res = sim
        .leaf(Method::GET, &format!("{USERS}/{implicit}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    let res = sim
        .leaf(Method::DELETE, &format!("{USERS}/{}", ids[4]))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let res = sim
        .leaf(Method::GET, &format!("{USERS}/{}", ids[4]))
        .send()
        .await
        .unwrap();
    assert_problem(res, 404).await;
    let res = sim.leaf(Method::GET, USERS).send().await.unwrap();
    assert_eq!(header(&res, "x-total-count"), "25");
}

#[tokio::test]
async fn credentials_created_at_leaf_directly_are_visible_for_discovery() {
    let sim = start().await;
    let user = new_user();
    let res = sim
        .admin(Method::POST, "/credentials")
        .json(&json!({"leafUserId": user, "fields": {"clientId": "adopt-me"}, "status": "MISSING_PERMISSION"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let created: Value = res.json().await.unwrap();
    assert_eq!(created["leafUserId"], user.as_str());
    assert!(
        created["clientSecret"]
            .as_str()
            .unwrap()
            .starts_with("sim-")
    );

    let res = sim.leaf(Method::GET, USERS).send().await.unwrap();
    let users: Value = res.json().await.unwrap();
    let cred = &users[0]["climateFieldViewCredentials"];
    assert_eq!(cred["clientId"], "adopt-me");
    assert_eq!(cred["status"], "MISSING_PERMISSION");
    assert_eq!(cred["id"], created["id"]);

    let res = sim
        .admin(Method::GET, &format!("/state/users/{}/{CFV}", new_user()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

// ---------------------------------------------------------------------------------------
// Faults and the request log

#[tokio::test]
async fn a_fixed_status_fault_answers_with_retry_after_and_counts_down() {
    let sim = start().await;
    sim.set_faults(json!({"fixedStatus": 429, "retryAfterSecs": 7, "remaining": 2}))
        .await;
    for _ in 0..2 {
        let res = sim.leaf(Method::GET, USERS).send().await.unwrap();
        assert_eq!(header(&res, "retry-after"), "7");
        assert_problem(res, 429).await;
    }
    let res = sim.leaf(Method::GET, USERS).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "the fault cleared itself");
    let res = sim.admin(Method::GET, "/faults").send().await.unwrap();
    assert_eq!(res.json::<Value>().await.unwrap(), Value::Null);

    let log = sim.requests().await;
    let statuses: Vec<&Value> = log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["status"])
        .collect();
    // authenticate, then the three GETs.
    assert_eq!(
        statuses,
        [&json!(200), &json!(429), &json!(429), &json!(200)]
    );
}

#[tokio::test]
async fn faults_spare_authentication_unless_asked() {
    let sim = start().await;
    sim.set_faults(json!({"fixedStatus": 503})).await;
    sim.authenticate("svc", "pw").await;
    sim.set_faults(json!({"fixedStatus": 503, "includeAuth": true}))
        .await;
    let res = sim
        .http
        .post(sim.url("/api/authenticate"))
        .json(&json!({"username": "a", "password": "b"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 503).await;
    // Admin routes are never faulted.
    let res = sim.admin(Method::DELETE, "/faults").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    sim.authenticate("svc", "pw").await;
}

#[tokio::test]
async fn a_fault_can_target_a_path_and_a_method() {
    let sim = start().await;
    let user = new_user();
    sim.create_cfv(&user, "r").await;
    sim.set_faults(json!({"fixedStatus": 503, "pathContains": "/events"}))
        .await;
    let cred = format!("{USERS}/{user}/{CFV}");
    let res = sim.leaf(Method::GET, &cred).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = sim
        .leaf(Method::GET, &format!("{cred}/events"))
        .send()
        .await
        .unwrap();
    assert_problem(res, 503).await;

    sim.set_faults(json!({"fixedStatus": 502, "method": "delete"}))
        .await;
    let res = sim.leaf(Method::GET, &cred).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = sim.leaf(Method::DELETE, &cred).send().await.unwrap();
    assert_problem(res, 502).await;
    let res = sim.leaf(Method::GET, &cred).send().await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "the faulted delete did nothing"
    );
}

#[tokio::test]
async fn latency_delays_answers_without_blocking_other_requests() {
    let sim = start().await;
    sim.set_faults(json!({"latencyMs": 300, "pathContains": "/users"}))
        .await;
    let started = Instant::now();
    let slow = sim.leaf(Method::GET, USERS).send();
    let fast = async {
        // With one worker, a sleeping handler must not hold up another request.
        let t = Instant::now();
        let res = sim.leaf(Method::GET, WEBHOOKS).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        t.elapsed()
    };
    let (slow, fast) = tokio::join!(slow, fast);
    assert_eq!(slow.unwrap().status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(fast < Duration::from_millis(250), "{fast:?}");
}

#[tokio::test]
async fn garbage_answers_are_200_json_that_does_not_parse() {
    let sim = start().await;
    sim.set_faults(json!({"garbage": true})).await;
    let res = sim.leaf(Method::GET, USERS).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "content-type"), "application/json");
    let text = res.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
}

#[tokio::test]
async fn an_error_rate_of_one_fails_every_request_with_the_error_status() {
    let sim = start().await;
    sim.set_faults(json!({"errorRate": 1.0, "errorStatus": 500}))
        .await;
    for _ in 0..3 {
        let res = sim.leaf(Method::GET, USERS).send().await.unwrap();
        assert_problem(res, 500).await;
    }
    let res = sim
        .admin(Method::PUT, "/faults")
        .json(&json!({"errorRate": 2.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let res = sim
        .admin(Method::PUT, "/faults")
        .json(&json!({"fixedStatuss": 500}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST, "typos are refused");
    for status in [99, 600, 999] {
        let res = sim
            .admin(Method::PUT, "/faults")
            .json(&json!({"fixedStatus": status}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{status}");
    }
}

#[tokio::test]
async fn a_hanging_fault_never_answers() {
    let sim = start().await;
    sim.set_faults(json!({"hang": true, "remaining": 1})).await;
    let res = sim
        .leaf(Method::GET, USERS)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(res.unwrap_err().is_timeout());
    let res = sim.leaf(Method::GET, USERS).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let log = sim.requests().await;
    assert_eq!(log["requests"][1]["status"], Value::Null, "still hanging");
    sim.server.stop().await;
}

#[tokio::test]
async fn the_request_log_records_leaf_requests_and_echoes_request_ids() {
    let sim = start().await;
    let res = sim
        .leaf(Method::GET, &format!("{USERS}?page=0&size=5"))
        .header("X-Request-Id", "req-123")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&res, "x-request-id"), "req-123");
    let log = sim.requests().await;
    assert_eq!(log["total"], 2);
    let last = &log["requests"][1];
    assert_eq!(last["method"], "GET");
    assert_eq!(last["path"], USERS);
    assert_eq!(last["query"], "page=0&size=5");
    assert_eq!(last["status"], 200);
    assert_eq!(last["requestId"], "req-123");
    assert!(last["at"].is_string());

    let res = sim.admin(Method::DELETE, "/requests").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let log = sim.requests().await;
    assert_eq!(
        log,
        json!({"total": 0, "requests": []}),
        "admin calls are not logged"
    );
}

#[tokio::test]
async fn reset_forgets_users_faults_the_log_and_revocations() {
    let sim = start().await;
    let user = new_user();
    sim.create_cfv(&user, "r").await;
    sim.admin(Method::POST, "/tokens/revoke")
        .send()
        .await
        .unwrap();
    sim.set_faults(json!({"latencyMs": 5000})).await;
    let res = sim.admin(Method::POST, "/reset").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);

    let res = sim.leaf(Method::GET, USERS).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "no fault, token valid again");
    assert_eq!(header(&res, "x-total-count"), "0");
    assert_eq!(sim.requests().await["total"], 1);
}

#[tokio::test]
async fn unknown_paths_and_methods_get_problems() {
    let sim = start().await;
    let res = sim
        .leaf(Method::GET, "/services/usermanagement/api/nothing")
        .send()
        .await
        .unwrap();
    assert_problem(res, 404).await;
    let res = sim.leaf(Method::GET, "/nowhere").send().await.unwrap();
    assert_problem(res, 404).await;
    let res = sim.leaf(Method::PUT, USERS).send().await.unwrap();
    assert_problem(res, 405).await;
    let res = sim.admin(Method::GET, "/nothing").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

// ---------------------------------------------------------------------------------------
// Webhooks and alerts

#[tokio::test]
async fn registering_a_webhook_sends_a_signed_confirmation_and_refuses_duplicates() {
    let sim = start().await;
    let receiver = Receiver::start(204);
    let res = register_webhook(
        &sim,
        &receiver.url,
        "s3cret",
        &["credentialsUnauthenticated"],
    )
    .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let location = header(&res, "location").to_owned();
    let hook: Value = res.json().await.unwrap();
    assert!(
        location.ends_with(hook["id"].as_str().unwrap()),
        "{location}"
    );

    let got = receiver.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].body,
        br#"{"message": "confirmation of webhook upon registration"}"#
    );
    assert!(verifies("s3cret", &got[0]));

    let res = register_webhook(
        &sim,
        &receiver.url,
        "other",
        &["credentialsLimitedPermission", "credentialsUnauthenticated"],
    )
    .await;
    let body = assert_problem(res, 400).await;
    assert_eq!(body["message"], "eventRegisteredTwice");

    let res = sim.leaf(Method::GET, WEBHOOKS).send().await.unwrap();
    assert_eq!(
        res.json::<Value>().await.unwrap().as_array().unwrap().len(),
        1
    );
    let res = sim.leaf(Method::GET, &location).send().await.unwrap();
    assert_eq!(
        res.json::<Value>().await.unwrap()["url"],
        receiver.url.as_str()
    );
    let res = sim.leaf(Method::DELETE, &location).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let res = sim.leaf(Method::GET, &location).send().await.unwrap();
    assert_problem(res, 404).await;
    // Once deleted, the event type can be registered again.
    let res = register_webhook(
        &sim,
        &receiver.url,
        "s3cret",
        &["credentialsUnauthenticated"],
    )
    .await;
    assert_eq!(res.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_status_flip_delivers_a_signed_alert_spaced_like_leaf() {
    let sim = start().await;
    let receiver = Receiver::start(204);
    let other = Receiver::start(204);
    register_webhook(
        &sim,
        &receiver.url,
        "hook-secret",
        &["credentialsUnauthenticated"],
    )
    .await;
    register_webhook(&sim, &other.url, "x", &["credentialsLimitedPermission"]).await;
    let user = new_user();
    let created: Value = sim.create_cfv(&user, "r").await.json().await.unwrap();

    let res = sim
        .admin(Method::PUT, &format!("/users/{user}/{CFV}/status"))
        .json(&json!({"status": "UNAUTHENTICATED", "alert": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);

    let got = receiver.received();
    assert_eq!(got.len(), 2, "confirmation, then the alert");
    let alert = &got[1];
    assert!(verifies("hook-secret", alert));
    assert!(!verifies("wrong", alert));
    assert_eq!(alert.content_type.as_deref(), Some("application/json"));
    let text = std::str::from_utf8(&alert.body).unwrap();
    assert!(
        text.contains(r#""status": "UNAUTHENTICATED", "type": "credentialsUnauthenticated""#),
        "{text}"
    );
    assert!(!text.contains("\":\"") && !text.contains("\",\""), "{text}");
    let body: Value = serde_json::from_slice(&alert.body).unwrap();
    assert_eq!(body["credentialId"], created["id"]);
    assert_eq!(body["provider"], "ClimateFieldView");
    assert!(body["credential"].is_string() && body["message"].is_string());
    assert!(is_micros_z(body["timestamp"].as_str().unwrap()));
    assert!(body.get("leafUserId").is_none());
    assert_eq!(
        other.received().len(),
        1,
        "only the confirmation: wrong event type"
    );

    let res = sim
        .leaf(Method::GET, &format!("{USERS}/{user}/{CFV}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.json::<Value>().await.unwrap()["status"],
        "UNAUTHENTICATED"
    );

    let res = sim
        .admin(Method::PUT, &format!("/users/{}/{CFV}/status", new_user()))
        .json(&json!({"status": "OK"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn forced_alerts_carry_a_valid_an_invalid_or_no_signature() {
    let sim = start().await;
    let receiver = Receiver::start(204);
    register_webhook(&sim, &receiver.url, "k", &["credentialsLimitedPermission"]).await;
    let send = |body: Value| sim.admin(Method::POST, "/alerts").json(&body).send();

    let id = new_user();
    let res = send(
        json!({"credentialId": id, "type": "credentialsLimitedPermission", "signature": "valid"}),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let answer: Value = res.json().await.unwrap();
    assert_eq!(answer["deliveries"][0]["url"], receiver.url.as_str());
    assert_eq!(answer["deliveries"][0]["status"], 204);
    send(json!({"credentialId": id, "status": "MISSING_PERMISSION", "signature": "invalid"}))
        .await
        .unwrap();
    send(json!({"credentialId": id, "type": "credentialsLimitedPermission", "signature": "none"}))
        .await
        .unwrap();
    // Another type goes to the webhooks registered for it (none here), as at Leaf.
    let other: Value = send(json!({"credentialId": id, "type": "credentialsUnauthenticated"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(other["deliveries"], json!([]), "{other}");
    send(json!({"rawBody": "{\"hello\":1}", "signature": "valid"}))
        .await
        .unwrap();

    let got = receiver.received();
    assert_eq!(got.len(), 5);
    assert!(verifies("k", &got[1]));
    let body: Value = serde_json::from_slice(&got[1].body).unwrap();
    assert_eq!(body["status"], "MISSING_PERMISSION");
    assert_eq!(body["credentialId"], id.as_str());
    assert!(got[2].signature.is_some() && !verifies("k", &got[2]));
    assert!(got[3].signature.is_none());
    assert_eq!(got[4].body, br#"{"hello":1}"#);
    assert!(verifies("k", &got[4]));
}

#[tokio::test]
async fn failed_deliveries_are_listed_as_failed_calls() {
    let sim = start().await;
    let receiver = Receiver::start(500);
    let res = register_webhook(&sim, &receiver.url, "k", &["credentialsUnauthenticated"]).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let res = sim
        .admin(Method::POST, "/alerts")
        .json(&json!({"credentialId": new_user()}))
        .send()
        .await
        .unwrap();
    let answer: Value = res.json().await.unwrap();
    assert_eq!(answer["deliveries"][0]["status"], 500);

    let res = sim
        .leaf(Method::GET, &format!("{WEBHOOKS}/failed-calls"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let failed: Value = res.json().await.unwrap();
    let items = failed["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "the confirmation and the alert: {failed}");
    assert_eq!(items[1]["statusCode"], 500);
    assert_eq!(items[1]["url"], receiver.url.as_str());
}

// ---------------------------------------------------------------------------------------
// Server life cycle

#[tokio::test]
async fn every_worker_serves_the_same_state() {
    let sim = start_with(SimOptions {
        workers: 2,
        ..SimOptions::default()
    })
    .await;
    let user = new_user();
    assert_eq!(
        sim.create_cfv(&user, "r").await.status(),
        StatusCode::CREATED
    );
    // No connection reuse, so requests land on both workers.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for _ in 0..10 {
        let res = http
            .get(sim.url(&format!("{USERS}/{user}/{CFV}")))
            .bearer_auth(&sim.token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(sim.requests().await["total"], 12);
    sim.server.stop().await;
}

#[tokio::test]
async fn run_forever_reports_an_address_it_cannot_bind() {
    let err = credsync::sim::run_forever("not an address", SimOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not an address"), "{err}");
}
