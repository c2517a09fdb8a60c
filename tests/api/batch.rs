//! `store::batch::Batcher`: concurrent callers sharing statements, against real Postgres.
use std::sync::Mutex;

use credsync::store::batch::{BatchOp, Batcher};
use credsync::store::pool;
use futures_util::future::join_all;
use secrecy::SecretString;

use crate::db::fresh_database_url;

/// Inserts `(k, v)` into `kv` and answers `v * 10` as Postgres computed it; a negative `v`
/// breaks the table's check, `v = 666` panics. Records the keys of every statement it runs.
#[derive(Default)]
struct Tally {
    statements: Mutex<Vec<Vec<i32>>>,
}

impl Tally {
    fn record(&self, keys: Vec<i32>) {
        assert_ne!(keys, [666], "the panicking item");
        self.statements.lock().unwrap().push(keys);
    }
}

impl BatchOp for &'static Tally {
    const NAME: &'static str = "test_tally";
    type Item = (i32, i32);
    type Output = i32;
    type Key = i32;

    fn key(item: &(i32, i32)) -> i32 {
        item.0
    }

    async fn run_batch(
        &self,
        conn: &mut sqlx::PgConnection,
        items: &[(i32, i32)],
    ) -> Result<Vec<i32>, sqlx::Error> {
        self.record(items.iter().map(|i| i.0).collect());
        let rows: Vec<(i32, i32)> = sqlx::query_as(
            "insert into kv select * from unnest($1::int[], $2::int[]) returning k, v * 10",
        )
        .bind(items.iter().map(|i| i.0).collect::<Vec<_>>())
        .bind(items.iter().map(|i| i.1).collect::<Vec<_>>())
        .fetch_all(conn)
        .await?;
        Ok(items
            .iter()
            .map(|(k, _)| rows.iter().find(|r| r.0 == *k).unwrap().1)
            .collect())
    }

    async fn run_one(
        &self,
        conn: &mut sqlx::PgConnection,
        item: &(i32, i32),
    ) -> Result<i32, sqlx::Error> {
        self.record(vec![item.0]);
        sqlx::query_scalar("insert into kv values ($1, $2) returning v * 10")
            .bind(item.0)
            .bind(item.1)
            .fetch_one(conn)
            .await
    }
}

async fn tally() -> (sqlx::PgPool, &'static Tally, Batcher<&'static Tally>) {
    let url = SecretString::from(fresh_database_url().await);
    let db = pool(&url, 4).unwrap();
    sqlx::query("create table kv (k int primary key, v int not null check (v >= 0))")
        .execute(&db)
        .await
        .unwrap();
    let op: &'static Tally = Box::leak(Box::default());
    (db.clone(), op, Batcher::new(op, db))
}

fn sqlstate(r: &Result<i32, sqlx::Error>) -> Option<String> {
    match r {
        Err(sqlx::Error::Database(e)) => e.code().map(|c| c.into_owned()),
        _ => None,
    }
}

async fn stored(db: &sqlx::PgPool) -> Vec<(i32, i32)> {
    sqlx::query_as("select k, v from kv order by k")
        .fetch_all(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn concurrent_callers_share_statements_and_each_gets_its_own_answer() {
    let (db, op, batcher) = tally().await;
    let answers = join_all((0..40).map(|k| batcher.submit((k, k + 1)))).await;
    let answers: Vec<i32> = answers.into_iter().map(Result::unwrap).collect();
    assert_eq!(answers, (0..40).map(|k| (k + 1) * 10).collect::<Vec<_>>());
    assert_eq!(
        stored(&db).await,
        (0..40).map(|k| (k, k + 1)).collect::<Vec<_>>()
    );
    let statements = op.statements.lock().unwrap().clone();
    assert!(
        statements.len() < 40 && statements.iter().any(|s| s.len() > 1),
        "no statement was shared: {statements:?}"
    );
    let mut keys: Vec<i32> = statements.concat();
    keys.sort_unstable();
    assert_eq!(keys, (0..40).collect::<Vec<_>>(), "each item ran once");
}

#[tokio::test]
async fn a_lone_caller_runs_at_once_and_batches_stay_under_the_maximum() {
    let (_db, op, batcher) = tally().await;
    assert_eq!(batcher.submit((1, 1)).await.unwrap(), 10);
    assert_eq!(*op.statements.lock().unwrap(), [vec![1]]);
    let n = i32::try_from(Batcher::<&'static Tally>::MAX_BATCH * 2 + 5).unwrap();
    let answers = join_all((100..100 + n).map(|k| batcher.submit((k, 0)))).await;
    assert!(answers.iter().all(Result::is_ok));
    let statements = op.statements.lock().unwrap().clone();
    assert!(
        statements
            .iter()
            .all(|s| s.len() <= Batcher::<&'static Tally>::MAX_BATCH)
    );
}

#[tokio::test]
async fn equal_keys_never_share_a_statement() {
    let (db, op, batcher) = tally().await;
    let answers =
        join_all([(1, 1), (2, 2), (1, 3), (3, 3), (1, 4)].map(|i| batcher.submit(i))).await;
    // One of the three items for key 1 is stored; the others meet the primary key on their own.
    assert_eq!(answers.iter().filter(|a| a.is_ok()).count(), 3);
    assert_eq!(
        answers
            .iter()
            .filter(|a| sqlstate(a).as_deref() == Some("23505"))
            .count(),
        2,
        "{answers:?}"
    );
    assert_eq!(stored(&db).await.len(), 3);
    for statement in op.statements.lock().unwrap().iter() {
        let mut keys = statement.clone();
        keys.dedup();
        assert_eq!(keys.len(), statement.len(), "a key twice in {statement:?}");
    }
}

#[tokio::test]
async fn a_failed_batch_runs_its_items_one_by_one() {
    let (db, op, batcher) = tally().await;
    // The -1 breaks the check: the shared statement fails and writes nothing, then each item
    // runs alone and only that one fails.
    let answers = join_all([(1, 1), (2, -1), (3, 3), (4, 4)].map(|i| batcher.submit(i))).await;
    assert_eq!(answers[0].as_ref().unwrap(), &10);
    assert_eq!(
        sqlstate(&answers[1]).as_deref(),
        Some("23514"),
        "{:?}",
        answers[1]
    );
    assert_eq!(answers[2].as_ref().unwrap(), &30);
    assert_eq!(answers[3].as_ref().unwrap(), &40);
    assert_eq!(stored(&db).await, [(1, 1), (3, 3), (4, 4)]);
    let statements = op.statements.lock().unwrap().clone();
    assert_eq!(statements[0], [1, 2, 3, 4]);
    assert_eq!(statements[1..], [vec![1], vec![2], vec![3], vec![4]]);
}

#[tokio::test]
async fn a_panicking_batch_fails_its_callers_and_the_next_caller_is_served() {
    let (db, _op, batcher) = tally().await;
    let crashed = batcher.submit((666, 1)).await;
    assert!(
        matches!(crashed, Err(sqlx::Error::WorkerCrashed)),
        "{crashed:?}"
    );
    assert_eq!(batcher.submit((7, 7)).await.unwrap(), 70);
    assert_eq!(stored(&db).await, [(7, 7)]);
}

mod creates {
    use credsync::crypto::{Binding, Keyring, SecretFields};
    use credsync::store::credentials::{CreateWrites, NewCredential, Pending, Settle};
    use futures_util::future::join_all;
    use secrecy::SecretString;
    use uuid::Uuid;

    use crate::db::fresh_database_url;
    use crate::helpers::key_b64;

    const PROVIDER: &str = "climate-field-view";

    fn new_credential(keyring: &Keyring, user: Uuid) -> NewCredential {
        let mut secrets = SecretFields::default();
        secrets.insert("clientSecret", SecretString::from("secret-of-the-test"));
        let sealed = keyring
            .seal(
                Binding {
                    leaf_user_id: &user,
                    provider: PROVIDER,
                },
                &secrets,
            )
            .unwrap();
        let mut public = serde_json::Map::new();
        public.insert("clientId".into(), user.to_string().into());
        NewCredential {
            user,
            provider: PROVIDER,
            public,
            sealed,
            actor: "test".into(),
            request_id: format!("request-{user}"),
            grace: std::time::Duration::from_secs(60),
        }
    }

    fn settle(user: Uuid, pending: Pending) -> Settle {
        Settle {
            user,
            provider: PROVIDER,
            leaf_credential_id: Some(Uuid::new_v4()),
            status: Some("OK".into()),
            created_time: None,
            public: serde_json::Map::new(),
            sealed: None,
            actor: "test".into(),
            request_id: format!("request-{user}"),
            pending,
        }
    }

    async fn count(db: &sqlx::PgPool, sql: &'static str, user: Uuid) -> i64 {
        sqlx::query_scalar(sql)
            .bind(user)
            .fetch_one(db)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_shared_settle_follows_rows_that_moved_since_their_insert() {
        let url = SecretString::from(fresh_database_url().await);
        let db = credsync::store::pool(&url, 4).unwrap();
        credsync::store::migrate(&db).await.unwrap();
        let keyring = Keyring::parse(&format!("k1:{}", key_b64(1)), None, None).unwrap();
        let writes = CreateWrites::new(db.clone());
        let users: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
        let pending: Vec<Pending> = join_all(
            users
                .iter()
                .map(|u| writes.insert_pending(new_credential(&keyring, *u))),
        )
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();

        // Between the insert and the settle, the outbox entry of users[0] is rewritten (a worker
        // leasing it), and the credential row of users[1] too (a key rotation, say).
        sqlx::query("update outbox set last_error = 'moved' where leaf_user_id = $1")
            .bind(users[0])
            .execute(&db)
            .await
            .unwrap();
        sqlx::query("update credential set lease_owner = 'moved' where leaf_user_id = $1")
            .bind(users[1])
            .execute(&db)
            .await
            .unwrap();

        let settled = join_all(
            users
                .iter()
                .zip(pending)
                .map(|(u, p)| writes.settle_create(settle(*u, p))),
        )
        .await;
        for (i, (user, row)) in users.iter().zip(&settled).enumerate() {
            let row = row.as_ref().unwrap();
            if i == 1 {
                // Not settled here: the caller takes the general path, which reads the row.
                assert!(row.is_none());
                assert_eq!(
                    count(&db, "select count(*) from credential where leaf_user_id = $1 and sync_state = 'PENDING_UPSTREAM'", *user).await,
                    1
                );
                assert_eq!(
                    count(
                        &db,
                        "select count(*) from outbox where leaf_user_id = $1",
                        *user
                    )
                    .await,
                    1
                );
                continue;
            }
            let row = row.as_ref().expect("settled");
            assert_eq!(
                (row.leaf_user_id, row.sync_state.as_str()),
                (*user, "SYNCED")
            );
            assert_eq!(row.public_fields.0["clientId"], user.to_string());
            for sql in [
                "select count(*) from outbox where leaf_user_id = $1",
                "select count(*) - 1 from audit where leaf_user_id = $1 and action = 'credential.create'",
                "select count(*) - 1 from status_history where leaf_user_id = $1 and to_status = 'OK'",
            ] {
                assert_eq!(count(&db, sql, *user).await, 0, "{sql} for user {i}");
            }
        }
    }

    /// Every scan of `credential` and `outbox` in a plan (the updates and deletes aside).
    fn scans<'a>(node: &'a serde_json::Value, out: &mut Vec<(&'a str, &'a str)>) {
        if let (Some(rel), Some(kind)) =
            (node["Relation Name"].as_str(), node["Node Type"].as_str())
            && (rel == "credential" || rel == "outbox")
            && kind != "ModifyTable"
        {
            out.push((rel, kind));
        }
        for child in node["Plans"].as_array().into_iter().flatten() {
            scans(child, out);
        }
    }

    #[tokio::test]
    async fn the_shared_settle_reaches_its_rows_by_tuple_id_even_when_planned_on_empty_tables() {
        use credsync::store::credentials::{SETTLE_MANY_SETTINGS, settle_many_sql};
        // A connection plans the statement once, generically, and keeps the plan: on a fresh
        // database that happens while the tables are empty.
        let url = SecretString::from(fresh_database_url().await);
        let db = credsync::store::pool(&url, 2).unwrap();
        credsync::store::migrate(&db).await.unwrap();
        let mut conn = db.acquire().await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "begin; {SETTLE_MANY_SETTINGS}; set local plan_cache_mode = force_generic_plan; \
             prepare settle as {}",
            settle_many_sql()
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
        let plan: serde_json::Value = sqlx::query_scalar(
            "explain (format json) execute settle(array[gen_random_uuid()], array['climate-field-view'],
                 array[null::uuid], array['OK'], array[now()], array['{}'::jsonb], array['a'], array['r'],
                 array[null::text], array[null::bytea], array[null::bytea], array['(0,1)'], array['(0,1)'])",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        let mut found = Vec::new();
        scans(&plan[0]["Plan"], &mut found);
        assert!(
            found.contains(&("credential", "Tid Scan")) && found.contains(&("outbox", "Tid Scan")),
            "{found:?}"
        );
        assert!(
            found.iter().all(|(_, kind)| *kind == "Tid Scan"),
            "a scan other than by tuple id: {found:?}\n{plan:#}"
        );
    }
}
