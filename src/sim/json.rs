//! JSON and time helpers of the simulator: Leaf's spaced JSON style (`": "` and `", "`),
//! objects with a fixed key order, JHipster problem bodies, Leaf's timestamp formats and
//! lenient timestamp parsing. Pure functions only; no state, no I/O.

use std::io;

use actix_web::{HttpResponse, http::StatusCode};
use serde::{Serialize, Serializer, ser::SerializeMap};
use serde_json::{Value, ser::Formatter};
use time::{OffsetDateTime, PrimitiveDateTime, format_description::well_known::Rfc3339};

/// The `type` of every problem body Leaf (JHipster) answers.
pub(crate) const PROBLEM_TYPE: &str = "https://www.jhipster.tech/problem/problem-with-message";

/// A serde_json formatter writing a space after every structural `:` and `,`, as Leaf does
/// (`{"a": 1, "b": [1, 2]}`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LeafFormatter;

impl Formatter for LeafFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}

/// Serialises `value` the way Leaf does (see [`LeafFormatter`]).
pub(crate) fn to_leaf_vec<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, LeafFormatter);
    // Serialising plain data (strings, numbers, maps with string keys) into a Vec cannot fail.
    if value.serialize(&mut ser).is_err() {
        out.clear();
        out.extend_from_slice(b"null");
    }
    out
}

/// A JSON object whose keys keep their insertion order (serde_json's own map sorts them).
#[derive(Clone, Debug, Default)]
pub(crate) struct Obj(pub Vec<(String, Value)>);

impl Obj {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Obj(Vec::with_capacity(n))
    }

    pub(crate) fn put(&mut self, key: impl Into<String>, value: impl Into<Value>) -> &mut Self {
        self.0.push((key.into(), value.into()));
        self
    }
}

impl Serialize for Obj {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// A 2xx/4xx answer with a JSON body in Leaf's style.
pub(crate) fn leaf_json<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .body(to_leaf_vec(body))
}

/// An answer with a compact JSON body (admin routes).
pub(crate) fn admin_json<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> HttpResponse {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"null".to_vec());
    HttpResponse::build(status)
        .content_type("application/json")
        .body(bytes)
}

/// A JHipster problem, rendered as `application/problem+json`.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    pub status: StatusCode,
    pub detail: String,
    /// `message`; `error.http.<status>` unless set.
    pub message: Option<String>,
    pub retry_after: Option<u64>,
}

impl Problem {
    pub(crate) fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Problem {
            status,
            detail: detail.into(),
            message: None,
            retry_after: None,
        }
    }

    pub(crate) fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }

    pub(crate) fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, detail)
    }

    pub(crate) fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// Renders the problem for a request to `path`.
    pub(crate) fn render(&self, path: &str) -> HttpResponse {
        let status = self.status.as_u16();
        let title = self.status.canonical_reason().unwrap_or("Error");
        let message = self
            .message
            .clone()
            .unwrap_or_else(|| format!("error.http.{status}"));
        let mut body = Obj::with_capacity(6);
        body.put("type", PROBLEM_TYPE)
            .put("title", title)
            .put("status", status)
            .put("detail", self.detail.as_str())
            .put("path", path)
            .put("message", message);
        let mut res = HttpResponse::build(self.status);
        res.content_type("application/problem+json");
        if let Some(secs) = self.retry_after {
            res.insert_header(("Retry-After", secs.to_string()));
        }
        res.body(to_leaf_vec(&body))
    }
}

/// How a timestamp is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TsStyle {
    /// `2026-01-02T03:04:05.123456Z` (Leaf's usual form).
    Micros,
    /// `2026-01-02T03:04:05.123Z`.
    Millis,
    /// `2026-01-02T03:04:05.123456` (no zone: Leaf does this sometimes).
    MicrosNoZone,
}

/// Truncates `t` to the precision `style` writes, so that what is written is what sorts.
pub(crate) fn truncate(t: OffsetDateTime, style: TsStyle) -> OffsetDateTime {
    let nanos = t.nanosecond();
    let kept = match style {
        TsStyle::Millis => nanos - nanos % 1_000_000,
        TsStyle::Micros | TsStyle::MicrosNoZone => nanos - nanos % 1_000,
    };
    t.replace_nanosecond(kept).unwrap_or(t)
}

/// Writes `t` (converted to UTC) in `style`.
pub(crate) fn format_ts(t: OffsetDateTime, style: TsStyle) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let base = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    match style {
        TsStyle::Micros => format!("{base}.{:06}Z", t.microsecond()),
        TsStyle::Millis => format!("{base}.{:03}Z", t.millisecond()),
        TsStyle::MicrosNoZone => format!("{base}.{:06}", t.microsecond()),
    }
}

/// `now` as Leaf writes it: 6 fractional digits and `Z`.
pub(crate) fn now_micros() -> String {
    format_ts(OffsetDateTime::now_utc(), TsStyle::Micros)
}

/// Parses RFC 3339, or an RFC 3339 date-time without zone (taken as UTC).
pub(crate) fn parse_ts(s: &str) -> Option<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t);
    }
    let fmt = time::macros::format_description!(
        version = 2,
        "[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    PrimitiveDateTime::parse(s, &fmt)
        .ok()
        .map(PrimitiveDateTime::assume_utc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_formatter_spaces_colons_and_commas() {
        let v = serde_json::json!({"a": 1, "b": [1, 2], "c": {"d": "x,y:z"}});
        let s = String::from_utf8(to_leaf_vec(&v)).unwrap();
        assert_eq!(s, r#"{"a": 1, "b": [1, 2], "c": {"d": "x,y:z"}}"#);
    }

    #[test]
    fn timestamps_round_trip_in_every_style() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_767_323_045_123_456_789).unwrap();
        assert_eq!(format_ts(t, TsStyle::Micros), "2026-01-02T03:04:05.123456Z");
        assert_eq!(format_ts(t, TsStyle::Millis), "2026-01-02T03:04:05.123Z");
        assert_eq!(
            format_ts(t, TsStyle::MicrosNoZone),
            "2026-01-02T03:04:05.123456"
        );
        for style in [TsStyle::Micros, TsStyle::Millis, TsStyle::MicrosNoZone] {
            let written = format_ts(t, style);
            assert_eq!(parse_ts(&written), Some(truncate(t, style)), "{written}");
        }
        assert!(parse_ts("2026-01-02T03:04:05Z").is_some());
        assert!(parse_ts("2026-01-02T03:04:05").is_some());
        assert!(parse_ts("yesterday").is_none());
    }
}
