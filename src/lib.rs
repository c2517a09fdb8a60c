//! credsync: a gateway between internal services and Leaf Agriculture's credential API.
//!
//! Layout (dependencies point inward: `http` → `domain` → `store` / `leaf`):
//! - [`cli`]: command-line entry points (`serve`, `dev`, `migrate`, `keys`, `token`, `leaf-sim`, `sync`).
//! - [`config`]: typed settings from the environment / a TOML file.
//! - [`http`]: the actix-web application, routes, extractors and middleware.
//! - [`domain`]: validated types (user ids, providers, credential bodies), redaction.
//! - [`crypto`]: the envelope encryption; the only module that sees plaintext secrets.
//! - [`auth`]: caller JWT verification and scopes.
//! - [`store`]: Postgres access (credentials, outbox, audit, events, idempotency).
//! - [`rowcache`]: a serving process's SYNCED rows, kept coherent by Postgres notices.
//! - [`leaf`]: the HTTP client for Leaf's API.
//! - [`sim`]: an in-memory Leaf simulator (a test double of the external service only).
//! - [`pgtemp`]: throwaway Postgres clusters from local binaries (`credsync dev`, tests).
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod cursor;
pub mod dev;
pub mod domain;
pub mod error;
pub mod gateway;
pub mod http;
pub mod leaf;
pub mod paging;
pub mod pgtemp;
pub mod rotate;
pub mod rowcache;
pub mod sim;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod timefmt;
