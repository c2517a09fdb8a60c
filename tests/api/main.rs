//! The integration tests: one binary, one Postgres server per process, a fresh database per test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod cli;
mod credentials;
mod db;
mod harness;
mod helpers;
mod input;
mod ops;
mod resilience;
mod secrets;
mod sim;
mod sync;
mod v1;
