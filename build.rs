//! `sqlx::migrate!` reads `migrations/` at compile time, and cargo does not know it: without
//! this, a new migration file would not reach an incremental build.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
