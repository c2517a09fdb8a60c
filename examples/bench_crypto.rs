//! Benchmark for `scripts/bench` (not part of the tests): the cost of credsync's envelope
//! encryption per credential — `Keyring::seal` (fresh data key, two AES-256-GCM encryptions)
//! plus `Keyring::open` (two decryptions), on one core, with the fields scripts/bench posts.
//!
//! Prints one line: `{"iterations": n, "sealUs": a, "openUs": b, "sealOpenUs": c}`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use credsync::crypto::Binding;

fn main() -> anyhow::Result<()> {
    let keyring = common::keyring()?;
    let secrets = common::secrets();
    let user = uuid::Uuid::new_v4();
    let binding = Binding {
        leaf_user_id: &user,
        provider: "climate-field-view",
    };
    let budget = Duration::from_millis(
        std::env::var("BENCH_MILLIS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1500),
    );

    // Warm up, then time seal and open separately over the same number of iterations.
    for _ in 0..1000 {
        let s = keyring
            .seal(binding, &secrets)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        black_box(
            keyring
                .open(binding, &s)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
    }
    let mut sealed = Vec::new();
    let started = Instant::now();
    while started.elapsed() < budget / 2 {
        for _ in 0..256 {
            sealed.push(
                keyring
                    .seal(binding, &secrets)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            );
        }
    }
    let seal_time = started.elapsed();
    let n = sealed.len();
    let started = Instant::now();
    for s in &sealed {
        black_box(
            keyring
                .open(binding, s)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
    }
    let open_time = started.elapsed();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!(
        "{}",
        serde_json::json!({
            "iterations": n,
            "sealUs": per(seal_time),
            "openUs": per(open_time),
            "sealOpenUs": per(seal_time) + per(open_time),
        })
    );
    Ok(())
}
