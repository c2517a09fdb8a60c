//! `credsync dev`: a working gateway from a fresh clone in one command.
//!
//! Owns: choosing a throwaway Postgres (`DATABASE_URL` if set, else a cluster from the local
//! PostgreSQL binaries), starting the built-in Leaf simulator (unless `LEAF_API_URL` is set),
//! generating an encryption key and a JWT secret, printing an admin token and example `curl`
//! lines, and cleaning all of it up on Ctrl-C. Never used in production.
use std::net::TcpListener;

use std::time::Duration;

use secrecy::SecretString;
use sqlx::Connection as _;
use testcontainers_modules::postgres::Postgres;
use testcontainers_modules::testcontainers::core::WaitFor;
use testcontainers_modules::testcontainers::runners::AsyncRunner as _;
use testcontainers_modules::testcontainers::{self, ContainerAsync, ImageExt as _};

use crate::app::{Application, RunOptions};
use crate::cli::shell_quote;
use crate::config::{Settings, Source};

/// The throwaway database, removed when dropped.
#[allow(dead_code, reason = "held only for its Drop")]
enum DevDb {
    Local(crate::pgtemp::TempPostgres),
    Container(Box<ContainerAsync<Postgres>>),
}

/// A Postgres container (`CREDSYNC_DEV_PG_IMAGE`, else the locally built
/// `credsync-postgres:15-local` when present, else the official `postgres:15`).
async fn container_postgres() -> anyhow::Result<(String, ContainerAsync<Postgres>)> {
    let docker = testcontainers::core::client::docker_client_instance().await?;
    tokio::time::timeout(Duration::from_secs(5), docker.ping())
        .await
        .map_err(|_| anyhow::anyhow!("Docker did not answer"))??;
    let image = match std::env::var("CREDSYNC_DEV_PG_IMAGE")
        .ok()
        .filter(|s| !s.is_empty())
    {
        Some(i) => i,
        None if docker
            .inspect_image("credsync-postgres:15-local")
            .await
            .is_ok() =>
        {
            "credsync-postgres:15-local".into()
        }
        None => "postgres:15".into(),
    };
    let (name, tag) = image.rsplit_once(':').unwrap_or((image.as_str(), "latest"));
    let container = Postgres::default()
        .with_name(name)
        .with_tag(tag)
        .with_ready_conditions(vec![WaitFor::message_on_stderr(
            "database system is ready to accept connections",
        )])
        .with_startup_timeout(Duration::from_secs(120))
        .start()
        .await?;
    let port = container.get_host_port_ipv4(5432).await?;
    let url = format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres");
    // The first connection can race the server's restart after initdb.
    for _ in 0..60 {
        if sqlx::PgConnection::connect(&url).await.is_ok() {
            return Ok((url, container));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("the Postgres container did not accept connections")
}

pub async fn run(mut source: Source) -> anyhow::Result<()> {
    let _pg = if source.get("DATABASE_URL").is_some_and(|v| !v.is_empty()) {
        eprintln!("dev: using DATABASE_URL");
        None
    } else {
        eprintln!("dev: starting a throwaway Postgres from the local PostgreSQL binaries…");
        match crate::pgtemp::TempPostgres::start().await {
            Ok(pg) => {
                source.set("DATABASE_URL", pg.url());
                Some(DevDb::Local(pg))
            }
            Err(local) => {
                eprintln!(
                    "dev: no local PostgreSQL ({local:#}); trying a testcontainers Postgres…"
                );
                let (url, container) = container_postgres().await.map_err(|docker| {
                    anyhow::anyhow!(
                        "no Postgres for dev: local binaries: {local:#}; Docker: {docker:#}\n\
                         hint: install PostgreSQL (apt-get install postgresql), start Docker, or set DATABASE_URL"
                    )
                })?;
                source.set("DATABASE_URL", url);
                Some(DevDb::Container(Box::new(container)))
            }
        }
    };
    let sim = if source.get("LEAF_API_URL").is_some_and(|v| !v.is_empty()) {
        None
    } else {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let opts = crate::sim::SimOptions {
            username: Some("dev".into()),
            password: Some("dev-password".into()),
            ..Default::default()
        };
        let sim = crate::sim::SimServer::start(listener, opts)?;
        source.set("LEAF_API_URL", sim.base_url());
        source.set("LEAF_USERNAME", "dev");
        source.set("LEAF_PASSWORD", "dev-password");
        Some(sim)
    };
    let key = crate::crypto::generate_key_b64();
    source.set("CREDSYNC_ENCRYPTION_KEYS", format!("dev:{}", key.as_str()));
    source.set("CREDSYNC_ACTIVE_KEY_ID", "dev");
    let jwt_secret = crate::crypto::generate_key_b64();
    source.set("CREDSYNC_JWT_HS256_SECRET", jwt_secret.as_str());
    if source.get("CREDSYNC_SYNC_INTERVAL_SECS").is_none() {
        source.set("CREDSYNC_SYNC_INTERVAL_SECS", "30");
    }
    let settings = Settings::from_source(&source)?;
    let listener = match TcpListener::bind(&settings.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("dev: {} is taken ({e}); using a free port", settings.listen);
            TcpListener::bind("127.0.0.1:0")?
        }
    };
    let addr = listener.local_addr()?;
    let token = crate::auth::mint(
        &SecretString::from(jwt_secret.as_str()),
        "dev-admin",
        "admin credentials:read credentials:reveal credentials:write credentials:delete status:read",
        &settings.jwt.audience,
        settings.jwt.issuer.as_deref(),
        12 * 3600,
    )?;
    let app = Application::build_with_listener(settings, RunOptions::default(), listener).await?;
    let base = format!("http://{addr}");
    let user = uuid::Uuid::new_v4();
    let cred =
        format!("{base}/services/usermanagement/api/users/{user}/climate-field-view-credentials");
    println!("credsync dev is listening on {base}");
    if let Some(sim) = &sim {
        println!("Leaf simulator: {}", sim.base_url());
    }
    println!("\nAdmin token (12 h):\n{token}\n");
    println!("Try:");
    println!("  TOKEN={}", shell_quote(&token));
    println!(
        "  curl -s -X POST {} -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' -d '{{\"clientId\":\"my-client\",\"clientSecret\":\"my-client-secret-1234\",\"apiKey\":\"my-api-key-5678\",\"refreshToken\":\"my-refresh-token-9012\"}}'",
        shell_quote(&cred)
    );
    println!(
        "  curl -s {} -H \"Authorization: Bearer $TOKEN\"",
        shell_quote(&cred)
    );
    println!(
        "  curl -s {} -H \"Authorization: Bearer $TOKEN\"",
        shell_quote(&format!("{cred}/status"))
    );
    println!(
        "  curl -s {} -H \"Authorization: Bearer $TOKEN\"",
        shell_quote(&format!("{cred}/events"))
    );
    println!(
        "  curl -s {} -H \"Authorization: Bearer $TOKEN\"",
        shell_quote(&format!("{base}/v1/credentials/summary"))
    );
    println!(
        "  curl -s -X DELETE {} -H \"Authorization: Bearer $TOKEN\" -o /dev/null -w '%{{http_code}}\\n'",
        shell_quote(&cred)
    );
    println!("\nCtrl-C stops everything and removes the throwaway database.");
    let handle = app.handle();
    let mut running = tokio::spawn(app.run_until_stopped());
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            eprintln!("dev: stopping…");
            if let Some(h) = handle {
                h.stop(true).await;
            }
            let _ = running.await;
        }
        _ = &mut running => {}
    }
    if let Some(sim) = sim {
        sim.stop().await;
    }
    Ok(())
}
