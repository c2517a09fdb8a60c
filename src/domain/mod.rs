//! Validated domain types: Leaf user ids, providers as data, credential bodies, views, scopes.
//!
//! Owns: parsing untrusted input into types a handler cannot misuse, and the redaction rule.
//! Must never: touch the database or the network, or format a secret value into an error.
pub mod credential;
pub mod provider;
pub mod scope;

pub use credential::{CreateBody, LeafUserId, SyncState, redact};
pub use provider::{Provider, provider_by_segment};
pub use scope::{Scope, Scopes};
