//! Timestamps: lenient parsing of what Leaf sends, one canonical form for what we send.
//!
//! Leaf sends 3 or 6 fractional digits, sometimes without the `Z` (then UTC is assumed).
//! credsync always answers RFC 3339 UTC with microseconds: `2026-01-02T03:04:05.123456Z`.
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// Parse a Leaf timestamp leniently (RFC 3339, or a local date-time taken as UTC).
pub fn parse_lenient(s: &str) -> Option<OffsetDateTime> {
    let s = s.trim();
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t.to_offset(UtcOffset::UTC));
    }
    let fmt = format_description!(
        version = 2,
        "[year]-[month]-[day][first [T][ ]][hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    PrimitiveDateTime::parse(s, &fmt)
        .ok()
        .map(PrimitiveDateTime::assume_utc)
}

/// Parse a caller's timestamp strictly (RFC 3339 with an offset).
pub fn parse_strict(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .map(|t| t.to_offset(UtcOffset::UTC))
}

/// The canonical form: RFC 3339, UTC, microseconds.
pub fn format(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    let fmt =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
    t.format(&fmt)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// serde adapter for `OffsetDateTime` in the canonical form.
pub mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;

    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_lenient(&s).ok_or_else(|| serde::de::Error::custom("invalid timestamp"))
    }
}

/// serde adapter for `Option<OffsetDateTime>` in the canonical form.
pub mod rfc3339_opt {
    use serde::Serializer;
    use time::OffsetDateTime;

    pub fn serialize<S: Serializer>(t: &Option<OffsetDateTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&super::format(*t)),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_timestamps_parse_in_every_documented_form() {
        let a = parse_lenient("2026-01-02T03:04:05.123456Z").unwrap();
        let b = parse_lenient("2026-01-02T03:04:05.123456").unwrap();
        let c = parse_lenient("2026-01-02T03:04:05.123").unwrap();
        let d = parse_lenient("2026-01-02T03:04:05+00:00").unwrap();
        assert_eq!(a, b);
        assert_eq!(format(c), "2026-01-02T03:04:05.123000Z");
        assert_eq!(format(d), "2026-01-02T03:04:05.000000Z");
        assert!(parse_lenient("yesterday").is_none());
        assert!(parse_strict("2026-01-02T03:04:05").is_none());
    }
}
