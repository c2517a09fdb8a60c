//! Opaque, tamper-evident keyset cursors for the `/v1` list routes.
//!
//! A cursor is `base64url(payload) "." base64url(mac)`, where the payload is the JSON
//! `{"kid": KEY_ID, "k": SORT_KEY}` (the sort key of the last row of a page) and the MAC is the
//! keyring's keyed hash (HMAC-SHA256 under key `KEY_ID`) of the route, a canonical form of the
//! filters and the encoded payload. So a cursor is only accepted by the route that made it,
//! with the same filters, and any edit is detected; the key id inside lets a cursor made before
//! a key rotation still verify while its key stays configured.
//!
//! Owns: encoding and verifying cursors. Must never: hand an unverified value to the caller
//! (every failure is one [`CursorError`]), or put a secret into a cursor (only sort keys).
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crypto::{Keyring, ct_eq};

/// Cursors longer than this are refused before any decoding.
const MAX_LEN: usize = 2048;
const DOMAIN: &str = "credsync-cursor-v1";

/// A cursor that is malformed, forged, altered, made for another route or other filters,
/// or signed with a key that is no longer configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "cursor is not valid for this request (use the nextCursor of a previous page with the same filters)"
)]
pub struct CursorError;

#[derive(Serialize)]
struct PayloadOut<'a, K> {
    kid: &'a str,
    k: &'a K,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PayloadIn<K> {
    #[allow(dead_code)]
    kid: String,
    k: K,
}

/// What the MAC covers: unambiguous because it is a JSON array of strings.
fn mac_input(route: &str, filters: &str, payload_b64: &str) -> Vec<u8> {
    serde_json::to_vec(&[DOMAIN, route, filters, payload_b64]).unwrap_or_default()
}

/// The cursor for the page after the row whose sort key is `key`.
pub fn encode<K: Serialize>(keyring: &Keyring, route: &str, filters: &str, key: &K) -> String {
    let kid = keyring.active_id();
    let payload = serde_json::to_vec(&PayloadOut { kid, k: key }).unwrap_or_default();
    let payload_b64 = URL_SAFE_NO_PAD.encode(payload);
    let (_, mac) = keyring.keyed_hash(&mac_input(route, filters, &payload_b64));
    format!("{payload_b64}.{}", URL_SAFE_NO_PAD.encode(mac))
}

/// Verify a cursor made by [`encode`] for the same route and filters; returns its sort key.
pub fn decode<K: DeserializeOwned>(
    keyring: &Keyring,
    route: &str,
    filters: &str,
    raw: &str,
) -> Result<K, CursorError> {
    if raw.is_empty() || raw.len() > MAX_LEN {
        return Err(CursorError);
    }
    let (payload_b64, mac_b64) = raw.split_once('.').ok_or(CursorError)?;
    let mac = URL_SAFE_NO_PAD.decode(mac_b64).map_err(|_| CursorError)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| CursorError)?;
    // The key id is read before the MAC is checked, but only to pick the key: a forged id
    // either names no configured key or gives a MAC the forger cannot produce.
    #[derive(serde::Deserialize)]
    struct Kid {
        kid: String,
    }
    let Kid { kid } = serde_json::from_slice(&payload).map_err(|_| CursorError)?;
    let expected = keyring
        .keyed_hash_with(&kid, &mac_input(route, filters, payload_b64))
        .ok_or(CursorError)?;
    if !ct_eq(&expected, &mac) {
        return Err(CursorError);
    }
    let parsed: PayloadIn<K> = serde_json::from_slice(&payload).map_err(|_| CursorError)?;
    Ok(parsed.k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(spec: &str, active: Option<&str>) -> Keyring {
        Keyring::parse(spec, active, None).unwrap()
    }

    fn key(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    #[test]
    fn a_cursor_round_trips_for_its_route_and_filters_only() {
        let k = ring(&format!("k1:{}", key(1)), None);
        let c = encode(&k, "events", "f1", &("2026-01-01T00:00:00Z", 42_i64));
        let back: (String, i64) = decode(&k, "events", "f1", &c).unwrap();
        assert_eq!(back, ("2026-01-01T00:00:00Z".to_owned(), 42));
        assert_eq!(
            decode::<(String, i64)>(&k, "audit", "f1", &c),
            Err(CursorError)
        );
        assert_eq!(
            decode::<(String, i64)>(&k, "events", "f2", &c),
            Err(CursorError)
        );
    }

    #[test]
    fn an_edited_or_garbage_cursor_is_refused() {
        let k = ring(&format!("k1:{}", key(1)), None);
        let c = encode(&k, "r", "f", &7_i64);
        let (p, m) = c.split_once('.').unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode(br#"{"kid":"k1","k":8}"#);
        for bad in [
            format!("{forged_payload}.{m}"),
            format!("{p}.{}", URL_SAFE_NO_PAD.encode([0u8; 32])),
            format!("{p}x.{m}"),
            p.to_owned(),
            String::new(),
            "..".into(),
            "a".repeat(5000),
            "%%%.%%%".into(),
        ] {
            assert_eq!(decode::<i64>(&k, "r", "f", &bad), Err(CursorError), "{bad}");
        }
    }

    #[test]
    fn a_cursor_survives_a_key_rotation_while_its_key_is_configured() {
        let old = ring(&format!("k1:{}", key(1)), None);
        let c = encode(&old, "r", "f", &1_i64);
        let rotated = ring(&format!("k1:{},k2:{}", key(1), key(2)), Some("k2"));
        assert_eq!(decode::<i64>(&rotated, "r", "f", &c), Ok(1));
        let gone = ring(&format!("k2:{}", key(2)), None);
        assert_eq!(decode::<i64>(&gone, "r", "f", &c), Err(CursorError));
    }
}

/// Property tests: decoding is total (a clean [`CursorError`], never a panic) and tamper-evident.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    fn ring() -> Keyring {
        let key = |b: u8| base64::engine::general_purpose::STANDARD.encode([b; 32]);
        Keyring::parse(&format!("k1:{},k2:{}", key(1), key(2)), Some("k2"), None)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    type Key = (String, i64);

    proptest! {
        #[test]
        fn arbitrary_strings_are_a_clean_error(raw in ".{0,300}") {
            prop_assert_eq!(decode::<Key>(&ring(), "events", "f", &raw), Err(CursorError));
        }

        #[test]
        fn cursor_shaped_noise_is_a_clean_error(
            p in "[A-Za-z0-9_-]{0,200}",
            m in "[A-Za-z0-9_-]{0,60}",
        ) {
            let raw = format!("{p}.{m}");
            prop_assert_eq!(decode::<Key>(&ring(), "events", "f", &raw), Err(CursorError));
        }

        #[test]
        fn a_forged_payload_with_any_json_is_refused(
            payload in prop_oneof![
                ".{0,80}",
                Just(r#"{"kid":"k1","k":["x",1]}"#.to_owned()),
                Just(r#"{"kid":"k9","k":["x",1]}"#.to_owned()),
                Just(r#"{"kid":"","k":null}"#.to_owned()),
            ],
            mac in prop::collection::vec(any::<u8>(), 0..40),
        ) {
            let raw = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(payload.as_bytes()),
                URL_SAFE_NO_PAD.encode(mac)
            );
            prop_assert_eq!(decode::<Key>(&ring(), "events", "f", &raw), Err(CursorError));
        }

        #[test]
        fn valid_cursors_round_trip_and_any_edit_is_refused(
            s in ".{0,40}",
            n in any::<i64>(),
            at in any::<prop::sample::Index>(),
            c in any::<char>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let k = ring();
            let key: Key = (s, n);
            let good = encode(&k, "events", "f", &key);
            prop_assert_eq!(decode::<Key>(&k, "events", "f", &good), Ok(key.clone()));
            prop_assert_eq!(decode::<Key>(&k, "audit", "f", &good), Err(CursorError));
            prop_assert_eq!(decode::<Key>(&k, "events", "g", &good), Err(CursorError));
            // Replace one character.
            let mut chars: Vec<char> = good.chars().collect();
            let i = at.index(chars.len());
            chars[i] = c;
            let edited: String = chars.into_iter().collect();
            if edited != good {
                prop_assert_eq!(decode::<Key>(&k, "events", "f", &edited), Err(CursorError));
            }
            // Truncate.
            let truncated = &good[..cut.index(good.len())];
            prop_assert_eq!(decode::<Key>(&k, "events", "f", truncated), Err(CursorError));
            // Decode as another type: never a panic.
            let _ = decode::<(i64, String)>(&k, "events", "f", &good);
            let _ = decode::<u8>(&k, "events", "f", &good);
        }
    }
}
