//! The integration tests' database harness: one Postgres server per test process, a brand-new
//! empty database for every call of [`fresh_database_url`].
//!
//! Owns choosing and starting the server, once per process:
//! - `CREDSYNC_TEST_DATABASE_URL` if set (a server someone else runs);
//! - else a testcontainers Postgres when Docker answers and the image
//!   (`CREDSYNC_TEST_PG_IMAGE`, default `postgres:15`) is present locally or can be pulled;
//! - else a throwaway cluster from the local PostgreSQL binaries ([`credsync::pgtemp`]);
//! - else a panic saying what to install.
//!
//! `CREDSYNC_TEST_PG=testcontainers|local|url` forces one path and panics when it is not
//! available (CI forces testcontainers, so a regression to another path is caught). One line on
//! stderr says which path is used.
//!
//! Must never keep a pool or client beyond one call: every `#[tokio::test]` has its own runtime
//! and connections die with it. The server itself lives on a dedicated thread with its own
//! runtime, for the whole process. Containers are named `credsync-test-<pid>-…`, removed by a
//! watchdog process when this process exits, and stale ones from dead processes are removed at
//! start.

use std::{
    io::Write as _,
    os::unix::process::CommandExt as _,
    process::{ChildStdin, Command, Stdio},
    sync::{OnceLock, mpsc},
    time::Duration,
};

use credsync::pgtemp::TempPostgres;
use futures_util::StreamExt as _;
use sqlx::{AssertSqlSafe, Connection as _, PgConnection};
use testcontainers_modules::{
    postgres::Postgres,
    testcontainers::{
        ContainerAsync, ImageExt as _,
        bollard::{
            self, Docker,
            query_parameters::{CreateImageOptions, ListContainersOptions, RemoveContainerOptions},
        },
        core::WaitFor,
        runners::AsyncRunner as _,
    },
};

const DEFAULT_IMAGE: &str = "postgres:15";
const CONTAINER_PREFIX: &str = "credsync-test-";
const HOST_LABEL: &str = "credsync.test.host";
const READY_MESSAGE: &str = "database system is ready to accept connections";

/// The URL of a brand-new, empty database on this process's test server.
pub async fn fresh_database_url() -> String {
    let admin_url = match server() {
        Ok(url) => url,
        Err(message) => panic!("{message}"),
    };
    let name = format!("credsync_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = connect_with_retry(admin_url, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("connecting to the test Postgres server: {e}"));
    sqlx::query(AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
    let _ = conn.close().await;
    with_database(admin_url, &name)
}

/// The admin URL of the process-wide server, started on first use. A failure is kept, so that
/// every test reports the same message instead of trying again.
fn server() -> &'static Result<String, String> {
    static SERVER: OnceLock<Result<String, String>> = OnceLock::new();
    SERVER.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("credsync-test-postgres".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = tx.send(Err(format!("building a tokio runtime: {e}")));
                        return;
                    }
                };
                match runtime.block_on(start_server()) {
                    Ok((url, guard)) => {
                        let _ = tx.send(Ok(url));
                        // Keep the server (and the runtime it was started on) for the whole
                        // process; statics and this thread are never dropped, so the watchdogs
                        // clean up when the process exits.
                        let _keep = (runtime, guard);
                        loop {
                            std::thread::park();
                        }
                    }
                    Err(message) => {
                        let _ = tx.send(Err(message));
                    }
                }
            });
        if let Err(e) = spawned {
            return Err(format!("spawning the test Postgres thread: {e}"));
        }
        rx.recv()
            .unwrap_or_else(|_| Err("the test Postgres thread died while starting".to_owned()))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Auto,
    Url,
    Testcontainers,
    Local,
}

fn mode() -> Result<Mode, String> {
    match std::env::var("CREDSYNC_TEST_PG").unwrap_or_default().trim() {
        "" | "auto" => Ok(Mode::Auto),
        "url" => Ok(Mode::Url),
        "testcontainers" => Ok(Mode::Testcontainers),
        "local" => Ok(Mode::Local),
        other => Err(format!(
            "CREDSYNC_TEST_PG={other:?} is not one of `testcontainers`, `local`, `url`"
        )),
    }
}

/// Whatever keeps the server alive.
enum Guard {
    External,
    Container {
        _container: Box<ContainerAsync<Postgres>>,
        _reaper: Option<ChildStdin>,
    },
    Local {
        _server: TempPostgres,
    },
}

async fn start_server() -> Result<(String, Guard), String> {
    let mode = mode()?;
    let env_url = std::env::var("CREDSYNC_TEST_DATABASE_URL")
        .ok()
        .filter(|url| !url.trim().is_empty());
    match (mode, env_url) {
        (Mode::Url | Mode::Auto, Some(url)) => {
            say(&format!(
                "using the Postgres server of CREDSYNC_TEST_DATABASE_URL ({})",
                redact(&url)
            ));
            Ok((url, Guard::External))
        }
        (Mode::Url, None) => Err(
            "CREDSYNC_TEST_PG=url but CREDSYNC_TEST_DATABASE_URL is not set; \
             set it to a Postgres URL whose user may CREATE DATABASE"
                .to_owned(),
        ),
        (Mode::Testcontainers, _) => start_container().await.map_err(|e| {
            format!(
                "CREDSYNC_TEST_PG=testcontainers but no testcontainers Postgres: {e}. \
                 Start Docker and provide the image (`scripts/build-local-images` builds \
                 credsync-postgres:15-local; select it with CREDSYNC_TEST_PG_IMAGE)"
            )
        }),
        (Mode::Local, _) => start_local("CREDSYNC_TEST_PG=local")
            .await
            .map_err(|e| format!("CREDSYNC_TEST_PG=local but no local cluster: {e}")),
        (Mode::Auto, None) => match start_container().await {
            Ok(server) => Ok(server),
            Err(docker) => {
                let reason = format!("no testcontainers Postgres ({docker})");
                start_local(&reason).await.map_err(|local| {
                    format!(
                        "no Postgres server for the tests. Docker: {docker}. Local binaries: \
                         {local}. Install Docker (with the image {} present or pullable), or \
                         the PostgreSQL server (`apt-get install postgresql`), or set \
                         CREDSYNC_TEST_DATABASE_URL",
                        image_reference()
                    )
                })
            }
        },
    }
}

async fn start_local(why: &str) -> Result<(String, Guard), String> {
    let pg = TempPostgres::start().await.map_err(|e| format!("{e:#}"))?;
    say(&format!(
        "using a throwaway local PostgreSQL cluster (binaries {}, port {}) because {why}",
        pg.bin_dir().display(),
        pg.port()
    ));
    Ok((pg.url().to_owned(), Guard::Local { _server: pg }))
}

fn image_reference() -> String {
    std::env::var("CREDSYNC_TEST_PG_IMAGE")
        .ok()
        .filter(|image| !image.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_IMAGE.to_owned())
}

/// `name:tag` → (`name`, `tag`); the tag defaults to `latest`. A registry port is not a tag.
fn split_image(image: &str) -> (String, String) {
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name.to_owned(), tag.to_owned()),
        _ => (image.to_owned(), "latest".to_owned()),
    }
}

async fn start_container() -> Result<(String, Guard), String> {
    let image = image_reference();
    let (name, tag) = split_image(&image);
    let docker = testcontainers_modules::testcontainers::core::client::docker_client_instance()
        .await
        .map_err(|e| format!("no Docker client: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(5), docker.ping()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("Docker does not answer: {e}")),
        Err(_) => return Err("Docker did not answer within 5 s".to_owned()),
    }
    remove_stale_containers(&docker).await;
    ensure_image(&docker, &image, &name, &tag).await?;

    let container_name = format!(
        "{CONTAINER_PREFIX}{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    // Armed before the container exists, so that it cannot outlive us even if we die starting it.
    let reaper = spawn_reaper(&container_name);
    let container = Postgres::default()
        .with_name(name)
        .with_tag(tag)
        .with_container_name(&container_name)
        .with_label(HOST_LABEL, hostname())
        // An already initialised data directory prints the message once, on stderr only.
        .with_ready_conditions(vec![WaitFor::message_on_stderr(READY_MESSAGE)])
        .with_cmd([
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
        ])
        .with_startup_timeout(Duration::from_secs(120))
        .start()
        .await
        .map_err(|e| format!("starting a container from {image}: {e}"))?;
    let host = container
        .get_host()
        .await
        .map_err(|e| format!("container host: {e}"))?;
    let port = container
        .get_host_port_ipv4(5432)
        .await
        .map_err(|e| format!("container port: {e}"))?;
    let url = format!("postgres://postgres:postgres@{host}:{port}/postgres");
    connect_with_retry(&url, Duration::from_secs(30))
        .await
        .map_err(|e| format!("connecting to container {container_name}: {e}"))?;
    say(&format!(
        "using a testcontainers Postgres (image {image}, container {container_name}, port {port})"
    ));
    Ok((
        url,
        Guard::Container {
            _container: Box::new(container),
            _reaper: reaper,
        },
    ))
}

/// Checks that the image is present; pulls it only when it is absent (which fails fast when no
/// registry is reachable).
async fn ensure_image(docker: &Docker, image: &str, name: &str, tag: &str) -> Result<(), String> {
    match docker.inspect_image(image).await {
        Ok(_) => return Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => return Err(format!("inspecting image {image}: {e}")),
    }
    say(&format!(
        "image {image} is not present locally; trying to pull it"
    ));
    let options = CreateImageOptions {
        from_image: Some(name.to_owned()),
        tag: Some(tag.to_owned()),
        ..Default::default()
    };
    let pull = async {
        let mut progress = docker.create_image(Some(options), None, None);
        while let Some(step) = progress.next().await {
            step.map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(Duration::from_secs(600), pull).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "image {image} is not present locally and pulling it failed: {e}"
        )),
        Err(_) => Err(format!(
            "image {image} is not present locally and pulling it took over 10 minutes"
        )),
    }
}

/// A `sh` that removes the container once our end of its stdin closes, i.e. when this process
/// exits, however it exits. Without the `docker` CLI there is no reaper; the stale-container
/// sweep of the next run and `.ci/run` clean up instead.
fn spawn_reaper(container_name: &str) -> Option<ChildStdin> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"cat >/dev/null; exec docker rm -f -v "$1" >/dev/null 2>&1"#)
        .arg("credsync-test-reaper")
        .arg(container_name)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Not in our process group: a Ctrl-C must not kill the reaper before it has run.
        .process_group(0)
        .spawn()
        .ok()?;
    child.stdin.take()
}

/// Removes `credsync-test-<pid>-…` containers of this host whose process is gone.
async fn remove_stale_containers(docker: &Docker) {
    if !std::path::Path::new("/proc/self").exists() {
        // No way to tell a dead process from a live one here.
        return;
    }
    let options = ListContainersOptions {
        all: true,
        filters: Some(
            [
                ("name".to_owned(), vec![CONTAINER_PREFIX.to_owned()]),
                (
                    "label".to_owned(),
                    vec![format!("{HOST_LABEL}={}", hostname())],
                ),
            ]
            .into(),
        ),
        ..Default::default()
    };
    let Ok(containers) = docker.list_containers(Some(options)).await else {
        return;
    };
    for container in containers {
        for name in container.names.iter().flatten() {
            let name = name.trim_start_matches('/');
            let Some(pid) = name
                .strip_prefix(CONTAINER_PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let options = RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                };
                if docker.remove_container(name, Some(options)).await.is_ok() {
                    say(&format!("removed stale container {name}"));
                }
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

async fn connect_with_retry(url: &str, patience: Duration) -> Result<PgConnection, sqlx::Error> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match PgConnection::connect(url).await {
            Ok(conn) => return Ok(conn),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The same server URL with another database (path) and the same query string.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    format!("{base}/{database}{query}")
}

/// The URL without its user and password.
fn redact(url: &str) -> String {
    match url.rsplit_once('@') {
        Some((_, rest)) => rest.to_owned(),
        None => url.to_owned(),
    }
}

/// One line on stderr, past the test harness's output capture.
fn say(message: &str) {
    let _ = writeln!(std::io::stderr(), "credsync tests: {message}");
}

#[test]
fn with_database_replaces_only_the_path() {
    assert_eq!(
        with_database("postgres://u:p@h:5/postgres", "x"),
        "postgres://u:p@h:5/x"
    );
    assert_eq!(
        with_database("postgres://u:p@h:5?sslmode=disable", "x"),
        "postgres://u:p@h:5/x?sslmode=disable"
    );
    assert_eq!(
        with_database("postgres://h/db?a=b/c", "x"),
        "postgres://h/x?a=b/c"
    );
    assert_eq!(
        split_image("localhost:5000/pg"),
        ("localhost:5000/pg".to_owned(), "latest".to_owned())
    );
    assert_eq!(
        split_image("credsync-postgres:15-local"),
        ("credsync-postgres".to_owned(), "15-local".to_owned())
    );
}
