//! credsync's own API (`/v1`, SPEC §6).
use actix_web::web;

pub fn routes(_cfg: &mut web::ServiceConfig) {}
