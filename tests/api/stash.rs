//! `store::ConnStash`: connections kept between primary-key reads, against real Postgres.
use std::sync::Arc;
use std::time::Duration;

use credsync::store::{ConnStash, Stashed, pool};
use secrecy::SecretString;
use tokio::sync::oneshot;

use crate::db::fresh_database_url;

async fn stash(pool_size: u32) -> (sqlx::PgPool, ConnStash) {
    let url = SecretString::from(fresh_database_url().await);
    let db = pool(&url, pool_size).unwrap();
    (db.clone(), ConnStash::new(db, pool_size))
}

/// The Postgres backend serving this read's connection.
async fn pid_of(read: &mut Stashed<'_>) -> i32 {
    sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(read.conn())
        .await
        .unwrap()
}

async fn backend_pid(stash: &ConnStash, keep: bool) -> i32 {
    let mut read = stash.acquire().await.unwrap();
    let pid = pid_of(&mut read).await;
    if keep {
        read.keep();
    }
    pid
}

#[tokio::test]
async fn a_kept_connection_serves_the_next_read() {
    let (_db, stash) = stash(8).await;
    let first = backend_pid(&stash, true).await;
    assert_eq!(stash.kept(), 1);
    for _ in 0..5 {
        assert_eq!(backend_pid(&stash, true).await, first);
    }
    assert_eq!(stash.kept(), 1);
}

#[tokio::test]
async fn reads_take_at_most_half_the_pool_and_a_read_past_that_waits() {
    let (db, stash) = stash(8).await;
    let mut reads = Vec::new();
    for _ in 0..4 {
        reads.push(stash.acquire().await.unwrap());
    }
    // A fifth read waits: the other half of the pool stays for everything else.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stash.acquire())
            .await
            .is_err()
    );
    assert_eq!(db.size(), 4);
    let spare = db.acquire().await.unwrap();
    drop(spare);
    for mut read in reads {
        sqlx::query("select 1").execute(read.conn()).await.unwrap();
        read.keep();
    }
    assert_eq!(stash.kept(), 4);
}

/// A read that holds the connection it gets until told to let it go (and keeps it then).
fn queued_read(
    stash: &Arc<ConnStash>,
) -> (
    tokio::task::JoinHandle<()>,
    oneshot::Receiver<i32>,
    oneshot::Sender<()>,
) {
    let (got_tx, got) = oneshot::channel();
    let (release, release_rx) = oneshot::channel::<()>();
    let stash = stash.clone();
    let task = tokio::spawn(async move {
        let mut read = stash.acquire().await.unwrap();
        let _ = got_tx.send(pid_of(&mut read).await);
        let _ = release_rx.await;
        read.keep();
    });
    (task, got, release)
}

#[tokio::test]
async fn a_connection_kept_while_reads_wait_goes_to_the_longest_waiting_one() {
    let (_db, stash) = stash(4).await;
    let stash = Arc::new(stash);
    // Both slots busy.
    let mut a = stash.acquire().await.unwrap();
    let a_pid = pid_of(&mut a).await;
    let b = stash.acquire().await.unwrap();
    let (first, mut first_got, release_first) = queued_read(&stash);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (second, mut second_got, release_second) = queued_read(&stash);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(first_got.try_recv().is_err() && second_got.try_recv().is_err());

    // The connection `a` keeps goes to the first read that queued, not to the second.
    a.keep();
    let got = tokio::time::timeout(Duration::from_secs(5), &mut first_got).await;
    assert_eq!(got.unwrap().unwrap(), a_pid);
    // Nor to a read that comes later: nothing is free.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stash.acquire())
            .await
            .is_err()
    );
    assert!(second_got.try_recv().is_err());

    // `b` fails (dropped, not kept): its slot goes to the second read, which takes a connection
    // from the pool.
    drop(b);
    let got = tokio::time::timeout(Duration::from_secs(5), &mut second_got).await;
    assert!(got.unwrap().is_ok());
    for (task, release) in [(first, release_first), (second, release_second)] {
        release.send(()).unwrap();
        task.await.unwrap();
    }
    // Every slot is free again: both come back at once.
    assert_eq!(stash.kept(), 2);
    let (c, d) = (
        stash.acquire().await.unwrap(),
        stash.acquire().await.unwrap(),
    );
    drop((c, d));
}

#[tokio::test]
async fn a_queued_read_waits_no_longer_than_the_pool_would_have_let_it() {
    let (db, stash) = stash(2).await;
    let held = stash.acquire().await.unwrap();
    let started = std::time::Instant::now();
    let waited = stash.acquire().await;
    assert!(matches!(waited, Err(sqlx::Error::PoolTimedOut)));
    assert!(started.elapsed() >= db.options().get_acquire_timeout());
    // Its place in the queue is given up: the slot still goes round.
    drop(held);
    drop(stash.acquire().await.unwrap());
}

#[tokio::test]
async fn a_read_cancelled_after_a_connection_was_handed_to_it_passes_it_on() {
    let (_db, stash) = stash(2).await;
    let stash = Arc::new(stash);
    let mut a = stash.acquire().await.unwrap();
    let a_pid = pid_of(&mut a).await;
    let (queued, _got, _release) = queued_read(&stash);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Handed over, then cancelled before it ran (one thread: nothing runs in between).
    a.keep();
    queued.abort();
    assert!(queued.await.unwrap_err().is_cancelled());
    assert_eq!(stash.kept(), 1, "passed on to the stash");
    assert_eq!(backend_pid(&stash, true).await, a_pid);
}

#[tokio::test]
async fn a_read_that_did_not_complete_gives_its_connection_back_to_the_pool() {
    let (db, stash) = stash(4).await;
    // Cancelled mid-query: the connection is not kept.
    let mut read = stash.acquire().await.unwrap();
    let slow = sqlx::query("select pg_sleep(2)").execute(read.conn());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), slow)
            .await
            .is_err()
    );
    drop(read);
    assert_eq!(stash.kept(), 0);
    // A failed statement is not kept either (the caller returns before `keep`).
    let mut read = stash.acquire().await.unwrap();
    let failed = sqlx::query("select 1/0").execute(read.conn()).await;
    assert!(failed.is_err());
    drop(read);
    assert_eq!(stash.kept(), 0);
    // The pool still answers, on all of its connections.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(db.acquire().await.unwrap());
    }
    for conn in &mut held {
        let one: i32 = sqlx::query_scalar("select 1")
            .fetch_one(&mut **conn)
            .await
            .unwrap();
        assert_eq!(one, 1);
    }
}

#[tokio::test]
async fn an_idle_connection_goes_back_to_the_pool() {
    let (db, stash) = stash(4).await;
    backend_pid(&stash, true).await;
    assert_eq!(
        (db.size(), db.num_idle()),
        (1, 0),
        "kept, so not idle in the pool"
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    stash.sweep();
    assert_eq!(stash.kept(), 0);
    // Back in the pool (after the pool's own check of it), for the pool's other users.
    let mut idle = 0;
    for _ in 0..100 {
        idle = db.num_idle();
        if idle == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!((db.size(), idle), (1, 1));
}

#[tokio::test]
async fn acquire_hands_stale_connections_back_instead_of_using_them() {
    let (_db, stash) = stash(8).await;
    let (mut a, mut b) = (
        stash.acquire().await.unwrap(),
        stash.acquire().await.unwrap(),
    );
    for read in [&mut a, &mut b] {
        sqlx::query("select 1").execute(read.conn()).await.unwrap();
    }
    a.keep();
    b.keep();
    assert_eq!(stash.kept(), 2);
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Both are stale: neither is used, both go back to the pool; the read's own is kept.
    backend_pid(&stash, true).await;
    assert_eq!(stash.kept(), 1);
}

#[tokio::test]
async fn a_connection_goes_back_to_the_pool_after_max_reuse() {
    let (_db, stash) = stash(4).await;
    let first = backend_pid(&stash, true).await;
    for _ in 1..ConnStash::MAX_REUSE - 1 {
        let read = stash.acquire().await.unwrap();
        read.keep();
    }
    assert_eq!(stash.kept(), 1);
    assert_eq!(backend_pid(&stash, true).await, first);
    assert_eq!(
        stash.kept(),
        0,
        "the {}th use returns it",
        ConnStash::MAX_REUSE
    );
}
