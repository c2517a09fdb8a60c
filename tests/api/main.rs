//! The integration tests: one binary, one Postgres server per process, a fresh database per test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod batch;
mod cli;
mod credentials;
mod db;
mod harness;
mod helpers;
mod hostile;
mod input;
mod jwt_keys;
mod ops;
mod rate_limit;
mod resilience;
mod rowcache;
mod secrets;
mod sim;
mod stash;
mod sync;
mod v1;
