//! Tests of the test harness itself: fresh databases, and the throwaway local cluster
//! ([`credsync::pgtemp::TempPostgres`]) that `credsync dev` and the harness's local path use.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use credsync::pgtemp::{self, TempPostgres};
use sqlx::{Connection as _, PgConnection};

use crate::db::fresh_database_url;

/// Set in a child test process that must start a local server, report it and wait to be killed.
const CHILD_ENV: &str = "CREDSYNC_HARNESS_CHILD";

#[tokio::test]
async fn two_fresh_databases_are_distinct_empty_and_connectable() {
    let first = fresh_database_url().await;
    let second = fresh_database_url().await;
    assert_ne!(first, second);

    let mut a = PgConnection::connect(&first).await.unwrap();
    let mut b = PgConnection::connect(&second).await.unwrap();
    let name_a: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&mut a)
        .await
        .unwrap();
    let name_b: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&mut b)
        .await
        .unwrap();
    assert_ne!(name_a, name_b);

    for conn in [&mut a, &mut b] {
        let tables: i64 = sqlx::query_scalar(
            "select count(*) from information_schema.tables \
             where table_schema not in ('pg_catalog', 'information_schema')",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!(tables, 0, "a fresh database has no tables");
    }

    sqlx::query("create table only_in_a (id int)")
        .execute(&mut a)
        .await
        .unwrap();
    let seen_from_b: Option<String> = sqlx::query_scalar("select to_regclass('only_in_a')::text")
        .fetch_one(&mut b)
        .await
        .unwrap();
    assert_eq!(seen_from_b, None, "databases are independent");
}

#[test]
fn the_local_path_works_when_forced() {
    if skip_without_local_binaries() {
        return;
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "harness::two_fresh_databases_are_distinct_empty_and_connectable",
            "--exact",
            "--test-threads=1",
        ])
        .env("CREDSYNC_TEST_PG", "local")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the forced local run failed: {}\n{stderr}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        stderr.contains("throwaway local PostgreSQL cluster"),
        "the forced run says which path it used: {stderr}"
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("1 passed"),
        "the forced run ran the test"
    );
}

#[tokio::test]
async fn a_local_server_stops_and_removes_its_directory_on_drop() {
    if skip_without_local_binaries() {
        return;
    }
    let pg = TempPostgres::start().await.unwrap();
    let url = pg.url().to_owned();
    let dir = pg.dir().to_owned();
    assert!(url.starts_with("postgres://postgres@127.0.0.1:"), "{url}");

    let mut conn = PgConnection::connect(&url).await.unwrap();
    let one: i32 = sqlx::query_scalar("select 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    let pid = postmaster_pid(&dir).unwrap();
    drop(conn);

    drop(pg);
    assert!(!dir.exists(), "{} is removed", dir.display());
    assert!(!is_running(pid), "the server (pid {pid}) is stopped");
    assert!(PgConnection::connect(&url).await.is_err());
}

#[test]
fn a_local_server_dies_with_the_process_that_started_it() {
    if skip_without_local_binaries() {
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "harness::helper_process_holding_a_local_server",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut dir = None;
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(reported) = line.strip_prefix("LOCAL-POSTGRES-DIR ") {
            dir = Some(PathBuf::from(reported));
            break;
        }
    }
    let Some(dir) = dir else {
        let _ = child.kill();
        panic!(
            "the helper process did not report a server: {:?}",
            child.wait()
        );
    };
    let pid = postmaster_pid(&dir).unwrap();
    assert!(is_running(pid));

    // SIGKILL: no destructor runs in the helper.
    child.kill().unwrap();
    child.wait().unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    while (is_running(pid) || dir.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!is_running(pid), "the orphaned server (pid {pid}) stopped");
    assert!(!dir.exists(), "{} was removed", dir.display());
}

/// Run by `a_local_server_dies_with_the_process_that_started_it` in a child process.
#[tokio::test]
#[ignore = "helper process for a_local_server_dies_with_the_process_that_started_it"]
async fn helper_process_holding_a_local_server() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let pg = TempPostgres::start().await.unwrap();
    let mut stdout = std::io::stdout();
    writeln!(stdout, "LOCAL-POSTGRES-DIR {}", pg.dir().display()).unwrap();
    stdout.flush().unwrap();
    tokio::time::sleep(Duration::from_secs(300)).await;
}

/// Tests of the local cluster need PostgreSQL's binaries; without them they say so loudly and
/// pass, unless the local path is forced.
fn skip_without_local_binaries() -> bool {
    match pgtemp::find_binaries() {
        Ok(_) => false,
        Err(e) if std::env::var("CREDSYNC_TEST_PG").as_deref() != Ok("local") => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: no local PostgreSQL binaries, so the local cluster is not tested: {e}"
            );
            true
        }
        Err(e) => panic!("{e}"),
    }
}

fn postmaster_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("data/postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether a process exists and is not a zombie (an orphan's zombie may wait for a reaper).
fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}
