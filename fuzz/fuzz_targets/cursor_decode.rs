//! `cursor::decode` on arbitrary strings (even first byte) and on edited valid cursors (odd):
//! always a clean `CursorError`, except for the exact cursor that was issued.
#![no_main]
use std::sync::LazyLock;

use base64::Engine as _;
use credsync::crypto::Keyring;
use credsync::cursor::{self, CursorError};
use libfuzzer_sys::fuzz_target;

#[path = "mutate.rs"]
mod mutate;

type Key = (String, i64);

static RING: LazyLock<Keyring> = LazyLock::new(|| {
    let key = |b: u8| base64::engine::general_purpose::STANDARD.encode([b; 32]);
    Keyring::parse(&format!("k1:{},k2:{}", key(1), key(2)), Some("k2"), None).unwrap()
});

static VALID: LazyLock<Vec<String>> = LazyLock::new(|| {
    vec![
        cursor::encode(
            &RING,
            "events",
            "f",
            &("2026-01-02T03:04:05.000000Z".to_owned(), 42i64),
        ),
        cursor::encode(&RING, "events", "f", &(String::new(), i64::MIN)),
    ]
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let s = String::from_utf8_lossy(rest);
        assert_eq!(
            cursor::decode::<Key>(&RING, "events", "f", &s),
            Err(CursorError)
        );
        let _ = cursor::decode::<serde_json::Value>(&RING, "audit", "", &s);
    } else {
        let good = &VALID[usize::from(mode / 2) % VALID.len()];
        let edited = mutate::apply(good.as_bytes(), rest);
        let edited = String::from_utf8_lossy(&edited);
        let out = cursor::decode::<Key>(&RING, "events", "f", &edited);
        if edited != good.as_str() {
            assert_eq!(
                out,
                Err(CursorError),
                "accepted an edited cursor {edited:?}"
            );
        } else {
            assert!(out.is_ok());
        }
    }
});
