//! Credential-level domain types: the user id, the validated create body, sync states, redaction.
use std::collections::BTreeMap;
use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use super::provider::Provider;
use crate::crypto::SecretFields;

/// Largest accepted credential field, in bytes.
pub const MAX_FIELD_BYTES: usize = 4096;

/// A Leaf user id: a UUID in its canonical hyphenated form (any case; kept lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeafUserId(pub uuid::Uuid);

impl LeafUserId {
    pub fn parse(s: &str) -> Result<LeafUserId, String> {
        if s.len() != 36 {
            return Err("leafUserId must be a UUID (8-4-4-4-12 hex digits)".into());
        }
        uuid::Uuid::try_parse(s)
            .map(LeafUserId)
            .map_err(|_| "leafUserId must be a UUID (8-4-4-4-12 hex digits)".into())
    }
}

impl fmt::Display for LeafUserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// The credential statuses Leaf documents (a credential may also have none yet, shown as
/// `UNKNOWN`; Leaf may add others, which credsync stores as they come).
pub const LEAF_STATUSES: [&str; 4] = [
    "OK",
    "UNAUTHENTICATED",
    "MISSING_PERMISSION",
    "TEMPORARILY_UNAVAILABLE",
];

/// How a credential without a status yet is shown and counted (summary, gauges) and asked for
/// (`/v1/credentials?status=UNKNOWN`).
pub const UNKNOWN_STATUS: &str = "UNKNOWN";

/// The statuses the summary and the `credsync_credentials` gauge always show, zeros included.
pub const REPORTED_STATUSES: [&str; 5] = [
    LEAF_STATUSES[0],
    LEAF_STATUSES[1],
    LEAF_STATUSES[2],
    LEAF_STATUSES[3],
    UNKNOWN_STATUS,
];

/// credsync's own view of where a credential stands with Leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    Synced,
    PendingUpstream,
    DeletePending,
    Rejected,
}

impl SyncState {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Synced => "SYNCED",
            SyncState::PendingUpstream => "PENDING_UPSTREAM",
            SyncState::DeletePending => "DELETE_PENDING",
            SyncState::Rejected => "REJECTED",
        }
    }

    pub fn parse(s: &str) -> Option<SyncState> {
        Some(match s {
            "SYNCED" => SyncState::Synced,
            "PENDING_UPSTREAM" => SyncState::PendingUpstream,
            "DELETE_PENDING" => SyncState::DeletePending,
            "REJECTED" => SyncState::Rejected,
            _ => return None,
        })
    }
}

/// A validated create body: the provider's public fields in clear, its secret fields as secrets.
pub struct CreateBody {
    pub public: serde_json::Map<String, serde_json::Value>,
    pub secrets: SecretFields,
    /// The canonical JSON of the whole body (sorted keys), for idempotency hashing. Secret.
    pub canonical: SecretString,
}

impl fmt::Debug for CreateBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateBody")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl CreateBody {
    /// Validate a create body for `provider`. Error messages name the field, never a value.
    ///
    /// The values are read straight into buffers that are zeroized on drop (no
    /// `serde_json::Value` tree, whose strings would be freed as they are); the answers are
    /// those of parsing into a `serde_json::Value` first (a property test holds them equal).
    pub fn parse(provider: &Provider, bytes: &[u8]) -> Result<CreateBody, String> {
        let RawBody(members) = serde_json::from_slice(bytes).map_err(|e| {
            // serde_json's syntax errors carry a position, not the input.
            format!("the body is not valid JSON ({})", classify_json_error(&e))
        })?;
        let Some(members) = members else {
            return Err("the body must be a JSON object".into());
        };
        if let Some(unknown) = members.keys().find(|k| provider.create_field(k).is_none()) {
            return Err(format!("unknown field `{}`", truncate_name(unknown)));
        }
        let mut public = serde_json::Map::new();
        let mut secrets = SecretFields::default();
        for field in provider.create_fields {
            let value = match members.get(field.name) {
                None | Some(Member::Null) => {
                    return Err(format!("field `{}` is required", field.name));
                }
                Some(Member::Text(s)) => s,
                Some(Member::Other) => {
                    return Err(format!("field `{}` must be a string", field.name));
                }
            };
            if value.trim().is_empty() {
                return Err(format!("field `{}` must not be empty", field.name));
            }
            if value.len() > MAX_FIELD_BYTES {
                return Err(format!(
                    "field `{}` is longer than {MAX_FIELD_BYTES} bytes",
                    field.name
                ));
            }
            if field.secret {
                secrets.insert(field.name, SecretString::from(value.as_str()));
            } else {
                public.insert(
                    field.name.to_owned(),
                    serde_json::Value::String(value.to_string()),
                );
            }
        }
        // Every member is a known field holding a string by now.
        let canonical = json_object(members.iter().filter_map(|(k, v)| match v {
            Member::Text(s) => Some((k.as_str(), s.as_str())),
            Member::Null | Member::Other => None,
        }));
        let canonical = SecretString::from(std::str::from_utf8(&canonical).unwrap_or_default());
        Ok(CreateBody {
            public,
            secrets,
            canonical,
        })
    }

    /// Every secret value of this body, to mask them in upstream error text.
    pub fn secret_values(&self) -> impl Iterator<Item = &str> {
        self.secrets.0.values().map(|s| s.expose_secret())
    }
}

/// A JSON document as a create body sees it: an object's members by name (the last of equal
/// names wins, as in `serde_json::Map`), or `None` for any other JSON value.
struct RawBody(Option<BTreeMap<String, Member>>);

/// One member's value: its text (zeroized on drop), `null`, or any other JSON value.
enum Member {
    Text(Zeroizing<String>),
    Null,
    Other,
}

impl<'de> serde::Deserialize<'de> for RawBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Body;
        impl<'de> serde::de::Visitor<'de> for Body {
            type Value = RawBody;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawBody, A::Error> {
                let mut members = BTreeMap::new();
                while let Some(name) = map.next_key::<String>()? {
                    members.insert(name, map.next_value::<Member>()?);
                }
                Ok(RawBody(Some(members)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawBody, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(RawBody(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<RawBody, E> {
                Ok(RawBody(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<RawBody, E> {
                Ok(RawBody(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<RawBody, E> {
                Ok(RawBody(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<RawBody, E> {
                Ok(RawBody(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<RawBody, E> {
                Ok(RawBody(None))
            }
            fn visit_unit<E>(self) -> Result<RawBody, E> {
                Ok(RawBody(None))
            }
        }
        d.deserialize_any(Body)
    }
}

impl<'de> serde::Deserialize<'de> for Member {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Value;
        impl<'de> serde::de::Visitor<'de> for Value {
            type Value = Member;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_str<E>(self, v: &str) -> Result<Member, E> {
                // An exact-size copy: nothing is left behind by a reallocation.
                Ok(Member::Text(Zeroizing::new(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Member, E> {
                Ok(Member::Text(Zeroizing::new(v)))
            }
            fn visit_unit<E>(self) -> Result<Member, E> {
                Ok(Member::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Member, E> {
                Ok(Member::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Member, E> {
                Ok(Member::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Member, E> {
                Ok(Member::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Member, E> {
                Ok(Member::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Member, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Member::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Member, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Member::Other)
            }
        }
        d.deserialize_any(Value)
    }
}

/// The JSON object of `members` (in their order), written compact as serde_json writes it into
/// a buffer of exactly its size, zeroized on drop: growing a buffer would leave copies of
/// secret values in the memory it frees.
pub fn json_object<'a>(
    members: impl Iterator<Item = (&'a str, &'a str)> + Clone,
) -> Zeroizing<Vec<u8>> {
    // Each member brings its key, value, colon and the byte before it (`{` or `,`); then `}`.
    // An empty object is `{}`.
    let members_len: usize = members
        .clone()
        .map(|(k, v)| 1 + json_str_len(k) + 1 + json_str_len(v))
        .sum();
    let size = members_len.max(1) + 1;
    let mut out = Zeroizing::new(Vec::with_capacity(size));
    out.push(b'{');
    for (i, (k, v)) in members.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_str(&mut out, k);
        out.push(b':');
        write_json_str(&mut out, v);
    }
    out.push(b'}');
    debug_assert_eq!(out.len(), size);
    out
}

/// The length of `s` as a JSON string, quotes included, escaped as serde_json escapes it.
pub fn json_str_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\x08' | b'\x0c' | b'\n' | b'\r' | b'\t' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn classify_json_error(e: &serde_json::Error) -> String {
    format!("line {}, column {}", e.line(), e.column())
}

fn truncate_name(name: &str) -> String {
    let mut out: String = name.chars().take(64).collect();
    if out.len() < name.len() {
        out.push('…');
    }
    out
}

/// Redact a secret for display: `****` and the last 4 characters when it has at least 12
/// characters, plain `****` otherwise.
pub fn redact(secret: &str) -> String {
    let n = secret.chars().count();
    if n >= 12 {
        let tail: String = secret.chars().skip(n - 4).collect();
        format!("****{tail}")
    } else {
        "****".to_owned()
    }
}

/// Secrets shorter than this (in characters) are masked only where they stand as a word of
/// their own: masked everywhere, a one-letter secret would turn every word that contains the
/// letter into `****` ("Inv****lid ****efresh token").
const MASK_WORDS_BELOW: usize = 8;

/// Replace the given secret values in `text` with `****`: every occurrence of a secret of
/// `MASK_WORDS_BELOW` characters or more, and every occurrence of a shorter one that is not part
/// of a longer run of letters and digits.
pub fn mask_secrets<'a>(text: &str, secrets: impl IntoIterator<Item = &'a str>) -> String {
    let mut values: Vec<&str> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
    // Longest first, so a secret containing another is masked whole.
    values.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_owned();
    for v in values {
        if !out.contains(v) {
            continue;
        }
        if v.chars().count() >= MASK_WORDS_BELOW {
            out = out.replace(v, "****");
        } else {
            out = mask_words(&out, v);
        }
    }
    out
}

/// `text` with each occurrence of `word` that no letter or digit touches replaced by `****`.
fn mask_words(text: &str, word: &str) -> String {
    let touches = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(word) {
        let before = rest[..at].chars().next_back();
        let after = rest[at + word.len()..].chars().next();
        // The text before this occurrence, as written: a letter before it in `out` counts too.
        let before = before.or_else(|| out.chars().next_back());
        out.push_str(&rest[..at]);
        if touches(before) || touches(after) {
            out.push_str(word);
        } else {
            out.push_str("****");
        }
        rest = &rest[at + word.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::provider::CLIMATE_FIELD_VIEW;

    fn parse(body: &str) -> Result<CreateBody, String> {
        CreateBody::parse(&CLIMATE_FIELD_VIEW, body.as_bytes())
    }

    #[test]
    fn a_complete_body_splits_public_and_secret_fields() {
        let b =
            parse(r#"{"clientId":"cid","clientSecret":"cs","apiKey":"ak","refreshToken":"rt"}"#)
                .unwrap();
        assert_eq!(b.public.get("clientId").unwrap(), "cid");
        assert_eq!(b.secrets.get("apiKey").unwrap().expose_secret(), "ak");
        assert!(!format!("{b:?}").contains("ak"));
    }

    #[test]
    fn errors_name_the_field_and_never_the_value() {
        let cases = [
            (
                r#"{"clientId":"cid","clientSecret":"cs","apiKey":"ak"}"#,
                "refreshToken",
            ),
            (
                r#"{"clientId":"cid","clientSecret":"","apiKey":"ak","refreshToken":"rt"}"#,
                "clientSecret",
            ),
            (
                r#"{"clientId":"cid","clientSecret":"cs","apiKey":12345678,"refreshToken":"rt"}"#,
                "apiKey",
            ),
            (
                r#"{"clientId":"cid","clientSecret":"cs","apiKey":"ak","refreshToken":"rt","extra":"zzsecretzz"}"#,
                "extra",
            ),
        ];
        for (body, field) in cases {
            let err = parse(body).unwrap_err();
            assert!(err.contains(field), "{err}");
            assert!(
                !err.contains("zzsecretzz") && !err.contains("12345678"),
                "{err}"
            );
        }
        let long = "x".repeat(MAX_FIELD_BYTES + 1);
        let err = parse(&format!(
            r#"{{"clientId":"c","clientSecret":"{long}","apiKey":"a","refreshToken":"r"}}"#
        ))
        .unwrap_err();
        assert!(err.contains("clientSecret") && err.contains("4096"));
        assert!(
            parse("{\"clientId\": \"verysecret")
                .unwrap_err()
                .contains("not valid JSON")
        );
        assert!(parse("[]").is_err());
    }

    #[test]
    fn redaction_keeps_the_last_four_characters_of_long_secrets_only() {
        assert_eq!(redact("abcdefghijkl"), "****ijkl");
        assert_eq!(redact("abcdefghijk"), "****");
        assert_eq!(redact(""), "****");
        assert_eq!(redact("ééééééééééééçàèù"), "****çàèù");
    }

    #[test]
    fn user_ids_must_be_hyphenated_uuids() {
        assert!(LeafUserId::parse("6f1c3a52-8d5e-4c7b-9d0e-2a1b3c4d5e6f").is_ok());
        assert!(LeafUserId::parse("6F1C3A52-8D5E-4C7B-9D0E-2A1B3C4D5E6F").is_ok());
        assert!(LeafUserId::parse("6f1c3a528d5e4c7b9d0e2a1b3c4d5e6f").is_err());
        assert!(LeafUserId::parse("not-a-uuid").is_err());
    }

    #[test]
    fn masking_replaces_every_secret_occurrence() {
        let out = mask_secrets("token abc and abcdef", ["abc", "abcdef"]);
        assert_eq!(out, "token **** and ****");
        let out = mask_secrets("bad token xx-secret-1, xx-secret-1x", ["xx-secret-1"]);
        assert_eq!(
            out, "bad token ****, ****x",
            "a long secret, wherever it is"
        );
    }

    #[test]
    fn a_short_secret_is_masked_where_it_stands_alone_only() {
        assert_eq!(
            mask_secrets("Invalid refresh token", ["s", "a", "r"]),
            "Invalid refresh token"
        );
        assert_eq!(
            mask_secrets("key=s; s,(s) s ss s", ["s"]),
            "key=****; ****,(****) **** ss ****"
        );
        assert_eq!(
            mask_secrets("pw1 and pw12 and é pw1é", ["pw1"]),
            "**** and pw12 and é pw1é"
        );
        assert_eq!(mask_secrets("ss", ["s"]), "ss");
    }
}

/// Property tests: the create-body parser on hostile bytes.
#[cfg(test)]
mod props {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;
    use crate::domain::provider::CLIMATE_FIELD_VIEW;

    const FIELDS: [&str; 4] = ["clientId", "clientSecret", "apiKey", "refreshToken"];

    /// A value that cannot appear in an error message by accident.
    fn secret_value() -> impl Strategy<Value = String> {
        "zq[A-Za-z0-9+/=_~!@# -]{6,40}"
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            secret_value().prop_map(Value::from),
            Just(Value::from("")),
            Just(Value::from("   ")),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
                prop::collection::btree_map("[a-zA-Z]{0,8}", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Every string inside a JSON value.
    fn strings(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
            Value::Object(m) => m.values().for_each(|x| strings(x, out)),
            _ => {}
        }
    }

    /// A body made of the provider's fields (each maybe missing) and maybe an extra field.
    fn near_valid_body() -> impl Strategy<Value = Value> {
        (
            prop::collection::vec(prop::option::of(arb_json()), 4),
            prop::option::of(("[a-zA-Z]{1,70}", arb_json())),
        )
            .prop_map(|(values, extra)| {
                let mut m = serde_json::Map::new();
                for (name, v) in FIELDS.iter().zip(values) {
                    if let Some(v) = v {
                        m.insert((*name).to_owned(), v);
                    }
                }
                if let Some((k, v)) = extra {
                    m.insert(k, v);
                }
                Value::Object(m)
            })
    }

    fn valid_value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[ -~]{0,30}[!-~][ -~]{0,30}",
            ".{0,20}[a-z].{0,20}",
            "x{4096}",
        ]
    }

    /// A parse's answer, comparable: the public fields, the secrets by name, the canonical JSON.
    type Parsed = Result<(Value, Vec<(String, String)>, String), String>;

    /// The parse this module had before reading values into zeroized buffers: through a
    /// `serde_json::Value`. The reference the zeroizing parse must answer like.
    fn parse_via_value(bytes: &[u8]) -> Parsed {
        let provider = &CLIMATE_FIELD_VIEW;
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| format!("the body is not valid JSON ({})", classify_json_error(&e)))?;
        let Value::Object(map) = value else {
            return Err("the body must be a JSON object".into());
        };
        if let Some(unknown) = map.keys().find(|k| provider.create_field(k).is_none()) {
            return Err(format!("unknown field `{}`", truncate_name(unknown)));
        }
        let mut public = serde_json::Map::new();
        let mut secrets = Vec::new();
        for field in provider.create_fields {
            let value = match map.get(field.name) {
                None | Some(Value::Null) => {
                    return Err(format!("field `{}` is required", field.name));
                }
                Some(Value::String(s)) => s,
                Some(_) => return Err(format!("field `{}` must be a string", field.name)),
            };
            if value.trim().is_empty() {
                return Err(format!("field `{}` must not be empty", field.name));
            }
            if value.len() > MAX_FIELD_BYTES {
                return Err(format!(
                    "field `{}` is longer than {MAX_FIELD_BYTES} bytes",
                    field.name
                ));
            }
            if field.secret {
                secrets.push((field.name.to_owned(), value.clone()));
            } else {
                public.insert(field.name.to_owned(), Value::String(value.clone()));
            }
        }
        secrets.sort();
        Ok((
            Value::Object(public),
            secrets,
            Value::Object(map).to_string(),
        ))
    }

    fn parsed(bytes: &[u8]) -> Parsed {
        CreateBody::parse(&CLIMATE_FIELD_VIEW, bytes).map(|b| {
            let secrets = b
                .secrets
                .0
                .iter()
                .map(|(k, v)| (k.clone(), v.expose_secret().to_owned()))
                .collect();
            (
                Value::Object(b.public),
                secrets,
                b.canonical.expose_secret().to_owned(),
            )
        })
    }

    /// Strings as JSON may hold them: quotes, backslashes, control characters, non-ASCII.
    fn tricky_string() -> impl Strategy<Value = String> {
        prop_oneof![
            valid_value(),
            "[\\\"\\\\\\u{0}-\\u{1f}\\u{7f}a-z/é€😀 ]{0,24}",
            any::<String>(),
        ]
    }

    /// A body's text: members in any order, maybe repeated, maybe `null`, maybe other types,
    /// written compact or spaced, maybe broken.
    fn body_text() -> impl Strategy<Value = Vec<u8>> {
        let member = (
            prop_oneof![
                9 => prop::sample::select(FIELDS.to_vec()).prop_map(str::to_owned),
                1 => "[a-zA-Z]{0,70}",
            ],
            prop_oneof![
                4 => tricky_string().prop_map(Value::from),
                1 => arb_json(),
            ],
        );
        (
            prop::collection::vec(member, 0..9),
            any::<bool>(),
            prop::option::weighted(0.2, 0usize..200),
        )
            .prop_map(|(members, spaced, cut)| {
                let sep = if spaced { ", " } else { "," };
                let body = members
                    .iter()
                    .map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), v))
                    .collect::<Vec<_>>()
                    .join(sep);
                let mut bytes = format!("{{{body}}}").into_bytes();
                if let Some(cut) = cut {
                    bytes.truncate(cut);
                }
                bytes
            })
    }

    proptest! {
        #[test]
        fn the_zeroizing_parse_answers_as_parsing_into_a_value_did(bytes in body_text()) {
            prop_assert_eq!(parsed(&bytes), parse_via_value(&bytes));
        }

        #[test]
        fn the_zeroizing_parse_answers_as_parsing_into_a_value_did_on_valid_bodies(
            values in prop::collection::vec(tricky_string(), 4),
        ) {
            let body = Value::Object(
                FIELDS.iter().zip(values).map(|(k, v)| ((*k).to_owned(), Value::from(v))).collect(),
            );
            let bytes = body.to_string().into_bytes();
            prop_assert_eq!(parsed(&bytes), parse_via_value(&bytes));
        }

        #[test]
        fn a_json_object_is_written_as_serde_json_writes_it_into_a_buffer_of_its_size(
            members in prop::collection::btree_map(tricky_string(), tricky_string(), 0..5),
        ) {
            let out = json_object(members.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let expected = serde_json::to_vec(&members).unwrap();
            prop_assert_eq!(out.as_slice(), expected.as_slice());
            prop_assert_eq!(out.len(), out.capacity());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = CreateBody::parse(&CLIMATE_FIELD_VIEW, &bytes);
        }

        #[test]
        fn arbitrary_json_never_panics(v in arb_json()) {
            let _ = CreateBody::parse(&CLIMATE_FIELD_VIEW, v.to_string().as_bytes());
        }

        #[test]
        fn errors_never_echo_a_value(body in near_valid_body(), cut in any::<prop::sample::Index>()) {
            let text = body.to_string();
            let mut values = Vec::new();
            strings(&body, &mut values);
            // The whole body, and a truncated (invalid) copy of it.
            let truncated = &text.as_bytes()[..cut.index(text.len() + 1)];
            for input in [text.as_bytes(), truncated] {
                match CreateBody::parse(&CLIMATE_FIELD_VIEW, input) {
                    Ok(_) => {}
                    Err(e) => {
                        for v in values.iter().filter(|v| v.starts_with("zq")) {
                            prop_assert!(!e.contains(v.as_str()), "{e:?} echoes {v:?}");
                        }
                        prop_assert!(e.len() < 200, "{e}");
                    }
                }
            }
        }

        #[test]
        fn valid_bodies_round_trip(
            values in prop::collection::vec(valid_value(), 4),
        ) {
            let body = json!({
                "clientId": values[0], "clientSecret": values[1],
                "apiKey": values[2], "refreshToken": values[3],
            });
            let b = CreateBody::parse(&CLIMATE_FIELD_VIEW, body.to_string().as_bytes())
                .map_err(TestCaseError::fail)?;
            prop_assert_eq!(b.public.get("clientId"), Some(&body["clientId"]));
            prop_assert_eq!(b.public.len(), 1);
            for name in ["clientSecret", "apiKey", "refreshToken"] {
                prop_assert_eq!(
                    b.secrets.get(name).map(|s| s.expose_secret()),
                    body[name].as_str()
                );
            }
            let canonical: Value = serde_json::from_str(b.canonical.expose_secret())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&canonical, &body);
            // Debug shows no secret value.
            let dbg = format!("{b:?}");
            for name in ["clientSecret", "apiKey", "refreshToken"] {
                let v = body[name].as_str().unwrap_or_default();
                prop_assert!(v.len() < 8 || !dbg.contains(v) || body["clientId"].as_str().is_some_and(|c| c.contains(v)));
            }
        }

        #[test]
        fn blank_or_oversized_fields_are_refused(
            which in 0usize..4,
            bad in prop_oneof![
                "[ \t\n\r]{0,6}",
                "y{4097,4200}",
            ],
        ) {
            let mut body = json!({"clientId": "c", "clientSecret": "s", "apiKey": "a", "refreshToken": "r"});
            body[FIELDS[which]] = Value::from(bad);
            let e = CreateBody::parse(&CLIMATE_FIELD_VIEW, body.to_string().as_bytes())
                .err()
                .unwrap_or_default();
            prop_assert!(e.contains(FIELDS[which]), "{e}");
        }
    }
}
