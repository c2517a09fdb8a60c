//! A JSON object written field by field straight into a response body, for the items of the
//! busiest pages.
//!
//! `serde_json` escapes every string it writes, keys included, byte by byte; in a `/v1`
//! credentials page that was most of the serialization CPU, spent on text that cannot need it
//! (our own camelCase keys, UUIDs, canonical timestamps, integers). Here only free text goes
//! through `serde_json`'s escaper. Callers keep a `derive(Serialize)` twin of each item as the
//! reference, and a property test holds the two byte for byte equal.
use std::io::Write as _;

use uuid::Uuid;

use crate::timefmt::Canonical;

/// An open JSON object; [`JsonObject::close`] ends it and reports a failed field, if any.
pub struct JsonObject<'b> {
    buf: &'b mut Vec<u8>,
    fields: usize,
    failed: Option<serde_json::Error>,
}

impl<'b> JsonObject<'b> {
    pub fn open(buf: &'b mut Vec<u8>) -> JsonObject<'b> {
        buf.push(b'{');
        JsonObject {
            buf,
            fields: 0,
            failed: None,
        }
    }

    /// `"key":`. Keys are ours: ASCII letters, nothing to escape.
    fn key(&mut self, key: &'static str) -> &mut Vec<u8> {
        debug_assert!(key.bytes().all(|b| b.is_ascii_alphanumeric()), "{key}");
        if self.fields > 0 {
            self.buf.push(b',');
        }
        self.fields += 1;
        self.buf.push(b'"');
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(b"\":");
        self.buf
    }

    pub fn null(&mut self, key: &'static str) {
        self.key(key).extend_from_slice(b"null");
    }

    pub fn uuid(&mut self, key: &'static str, v: Uuid) {
        let buf = self.key(key);
        buf.push(b'"');
        buf.extend_from_slice(
            v.hyphenated()
                .encode_lower(&mut Uuid::encode_buffer())
                .as_bytes(),
        );
        buf.push(b'"');
    }

    pub fn time(&mut self, key: &'static str, v: Canonical) {
        v.write_json(self.key(key));
    }

    pub fn opt_time(&mut self, key: &'static str, v: Option<Canonical>) {
        match v {
            Some(t) => self.time(key, t),
            None => self.null(key),
        }
    }

    pub fn int(&mut self, key: &'static str, v: i64) {
        let buf = self.key(key);
        // Writing to a Vec cannot fail.
        let _ = write!(buf, "{v}");
    }

    pub fn opt_int(&mut self, key: &'static str, v: Option<impl Into<i64>>) {
        match v {
            Some(v) => self.int(key, v.into()),
            None => self.null(key),
        }
    }

    /// Free text, escaped as `serde_json` escapes it.
    pub fn text(&mut self, key: &'static str, v: &str) {
        let buf = self.key(key);
        if let Err(e) = serde_json::to_writer(&mut *buf, v) {
            self.failed.get_or_insert(e);
        }
    }

    pub fn opt_text(&mut self, key: &'static str, v: Option<&str>) {
        match v {
            Some(v) => self.text(key, v),
            None => self.null(key),
        }
    }

    /// Any JSON value (a field Leaf answered with), as `serde_json` writes it.
    pub fn value(&mut self, key: &'static str, v: &serde_json::Value) {
        let buf = self.key(key);
        if let Err(e) = serde_json::to_writer(&mut *buf, v) {
            self.failed.get_or_insert(e);
        }
    }

    /// A nested object as the value of `key`; close it before writing the next field here.
    pub fn object(&mut self, key: &'static str) -> JsonObject<'_> {
        JsonObject::open(self.key(key))
    }

    pub fn close(self) -> serde_json::Result<()> {
        self.buf.push(b'}');
        self.failed.map_or(Ok(()), Err)
    }
}

/// Property-test inputs shared by the tests of the bodies written here (`v1`, `credentials`).
#[cfg(test)]
pub(crate) mod strategies {
    use proptest::prelude::*;
    use time::OffsetDateTime;

    /// Years 0000-9999, any microsecond (what Postgres stores).
    pub fn arb_time() -> impl Strategy<Value = OffsetDateTime> {
        (-62_167_219_200i64..=253_402_300_799i64, 0i64..1_000_000).prop_map(|(s, us)| {
            OffsetDateTime::from_unix_timestamp(s).unwrap() + time::Duration::microseconds(us)
        })
    }

    /// Free text: plain words, anything, and the characters JSON escapes or browsers mind.
    pub fn arb_text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("UNAUTHENTICATED".to_owned()),
            "[A-Za-z0-9_-]{0,20}",
            any::<String>(),
            "[\\u{0}-\\u{1f}\"\\\\/<>&'\\u{7f}-\\u{a0}\\u{2028}\\u{2029}]{0,8}",
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_json_serde_writes() {
        let t = time::macros::datetime!(2026-11-29 03:04:05.000006 UTC);
        let id = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let mut buf = Vec::new();
        let mut o = JsonObject::open(&mut buf);
        o.uuid("id", id);
        o.text("text", "quote \" backslash \\ newline \n nul \0 é 🙂");
        o.opt_text("none", None);
        o.time("at", Canonical(t));
        o.opt_time("never", None);
        o.opt_int("n", Some(-401i32));
        let mut inner = o.object("inner");
        inner.int("big", i64::MIN);
        inner.close().unwrap();
        o.null("last");
        o.close().unwrap();
        let expected = serde_json::json!({
            "id": id,
            "text": "quote \" backslash \\ newline \n nul \0 é 🙂",
            "none": null,
            "at": "2026-11-29T03:04:05.000006Z",
            "never": null,
            "n": -401,
            "inner": {"big": i64::MIN},
            "last": null,
        });
        let parsed: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(parsed, expected);
        // The bytes too: fields in the order written, escapes as serde_json writes them.
        assert!(buf.starts_with(br#"{"id":"01234567-89ab-cdef-0123-456789abcdef","text":"quote \" backslash \\ newline \n nul \u0000"#));
        assert!(buf.ends_with(br#""n":-401,"inner":{"big":-9223372036854775808},"last":null}"#));
    }
}
