//! `store::ConnStash`: connections kept between primary-key reads, against real Postgres.
use std::time::Duration;

use credsync::store::{ConnStash, pool};
use secrecy::SecretString;

use crate::db::fresh_database_url;

async fn stash(pool_size: u32) -> (sqlx::PgPool, ConnStash) {
    let url = SecretString::from(fresh_database_url().await);
    let db = pool(&url, pool_size).unwrap();
    (db.clone(), ConnStash::new(db, pool_size))
}

async fn backend_pid(stash: &ConnStash, keep: bool) -> i32 {
    let mut read = stash.acquire().await.unwrap();
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(read.conn())
        .await
        .unwrap();
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
async fn it_keeps_at_most_a_quarter_of_the_pool() {
    let (_db, stash) = stash(8).await;
    let mut reads = Vec::new();
    for _ in 0..4 {
        reads.push(stash.acquire().await.unwrap());
    }
    for mut read in reads {
        sqlx::query("select 1").execute(read.conn()).await.unwrap();
        read.keep();
    }
    assert_eq!(stash.kept(), 2);
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
