//! Timestamps: lenient parsing of what Leaf sends, one canonical form for what we send.
//!
//! Leaf sends 3 or 6 fractional digits, sometimes without the `Z` (then UTC is assumed).
//! credsync always answers RFC 3339 UTC with microseconds: `2026-01-02T03:04:05.123456Z`.
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// In UTC, and only years 0000–9999 (what RFC 3339 and Postgres round-trip); `None` otherwise.
fn utc_in_range(t: OffsetDateTime) -> Option<OffsetDateTime> {
    t.checked_to_offset(UtcOffset::UTC)
        .filter(|t| (0..=9999).contains(&t.year()))
}

/// Parse a Leaf timestamp leniently (RFC 3339, or a local date-time taken as UTC).
pub fn parse_lenient(s: &str) -> Option<OffsetDateTime> {
    let s = s.trim();
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return utc_in_range(t);
    }
    let fmt = format_description!(
        version = 2,
        "[year]-[month]-[day][first [T][ ]][hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    PrimitiveDateTime::parse(s, &fmt)
        .ok()
        .map(PrimitiveDateTime::assume_utc)
        .and_then(utc_in_range)
}

/// Parse a caller's timestamp strictly (RFC 3339 with an offset).
pub fn parse_strict(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .and_then(utc_in_range)
}

/// A caller's bound on stored timestamps (`since`, `until`, `changedSince`), moved up to the next
/// whole microsecond when it has nanoseconds past one. Postgres keeps microseconds and would cut
/// the bound down instead: `since` would then take a row from before it, and `until` drop one
/// from before it. Against microsecond values, `>= t` and `< t` mean `>= ceil(t)` and
/// `< ceil(t)`.
pub fn bound_to_micros(t: OffsetDateTime) -> OffsetDateTime {
    let past = t.nanosecond() % 1_000;
    if past == 0 {
        return t;
    }
    t.checked_add(time::Duration::nanoseconds(i64::from(1_000 - past)))
        .unwrap_or(t)
}

/// The canonical form: RFC 3339, UTC, microseconds. (A page of the `/v1` lists formats
/// hundreds of these: digits written into a fixed buffer cost a fraction of `fmt`.)
pub fn format(t: OffsetDateTime) -> String {
    with_canonical(t, str::to_owned)
}

/// Call `f` with the canonical form, borrowed from a stack buffer where the fast path applies.
pub fn with_canonical<R>(t: OffsetDateTime, f: impl FnOnce(&str) -> R) -> R {
    let fast = canonical_bytes(t);
    match fast.as_ref().map(|b| std::str::from_utf8(b)) {
        Some(Ok(s)) => f(s),
        _ => f(&format_described(t)),
    }
}

/// The canonical form in a fixed buffer, for years 0000–9999 (`None` outside them).
fn canonical_bytes(t: OffsetDateTime) -> Option<[u8; 27]> {
    let t = t.checked_to_offset(UtcOffset::UTC).unwrap_or(t);
    let (year, month, day) = t.to_calendar_date();
    let year = u32::try_from(year).ok().filter(|y| *y <= 9999)?;
    let (hour, minute, second, micro) = t.to_hms_micro();
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, u32::from(u8::from(month)));
    put(8, 2, u32::from(day));
    put(11, 2, u32::from(hour));
    put(14, 2, u32::from(minute));
    put(17, 2, u32::from(second));
    put(20, 6, micro);
    Some(b)
}

/// A timestamp that serializes in the canonical form without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Canonical(pub OffsetDateTime);

impl Canonical {
    /// Append the canonical form as a JSON string. It is all ASCII digits and `-:.TZ` (and a
    /// sign for years beyond 0000–9999), so there is nothing to escape.
    pub fn write_json(self, buf: &mut Vec<u8>) {
        buf.push(b'"');
        with_canonical(self.0, |c| buf.extend_from_slice(c.as_bytes()));
        buf.push(b'"');
    }
}

impl serde::Serialize for Canonical {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        with_canonical(self.0, |c| s.serialize_str(c))
    }
}

fn format_described(t: OffsetDateTime) -> String {
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
        serde::Serialize::serialize(&super::Canonical(*t), s)
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
        serde::Serialize::serialize(&t.map(super::Canonical), s)
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

    #[test]
    fn a_bound_finer_than_a_microsecond_moves_up_to_the_next_one() {
        let t = |s| parse_strict(s).unwrap();
        for (given, bound) in [
            (
                "2026-11-01T09:00:00.0000001Z",
                "2026-11-01T09:00:00.000001Z",
            ),
            (
                "2026-11-01T09:00:00.000000999Z",
                "2026-11-01T09:00:00.000001Z",
            ),
            ("2026-11-01T09:00:00.999999001Z", "2026-11-01T09:00:01Z"),
            ("2026-11-01T09:00:00.000002Z", "2026-11-01T09:00:00.000002Z"),
            ("2026-11-01T09:00:00Z", "2026-11-01T09:00:00Z"),
        ] {
            assert_eq!(bound_to_micros(t(given)), t(bound), "{given}");
        }
    }
}

/// Property tests: the timestamp parsers on hostile strings.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    /// RFC 3339-like strings, with and without fraction, zone and `T`.
    fn stamp() -> impl Strategy<Value = String> {
        (
            1000i32..=9998,
            1u8..=12,
            1u8..=28,
            0u8..=23,
            0u8..=59,
            0u8..=59,
            prop::option::of("[0-9]{1,9}"),
            prop_oneof![
                Just(String::new()),
                Just("Z".to_owned()),
                Just("z".to_owned()),
                (prop_oneof![Just('+'), Just('-')], 0u8..=23, 0u8..=59)
                    .prop_map(|(s, h, m)| format!("{s}{h:02}:{m:02}")),
            ],
            prop_oneof![Just('T'), Just(' '), Just('t')],
        )
            .prop_map(|(y, mo, d, h, mi, s, frac, zone, sep)| {
                let frac = frac.map(|f| format!(".{f}")).unwrap_or_default();
                format!("{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}{frac}{zone}")
            })
    }

    proptest! {
        #[test]
        fn the_fast_format_is_the_described_one(
            secs in -62_167_219_200i64..=253_402_300_799i64,
            nanos in 0u32..1_000_000_000,
            offset_mins in -1439i32..=1439,
        ) {
            let t = OffsetDateTime::from_unix_timestamp(secs).unwrap()
                + time::Duration::nanoseconds(i64::from(nanos));
            let off = UtcOffset::from_whole_seconds(offset_mins * 60).unwrap();
            if let Some(local) = t.checked_to_offset(off) {
                prop_assert_eq!(format(local), format_described(t));
                prop_assert_eq!(
                    serde_json::to_string(&Canonical(local)).unwrap(),
                    format!("\"{}\"", format_described(t))
                );
                let mut written = Vec::new();
                Canonical(local).write_json(&mut written);
                prop_assert_eq!(written, serde_json::to_vec(&Canonical(local)).unwrap());
            }
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,64}") {
            let _ = parse_lenient(&s);
            let _ = parse_strict(&s);
        }

        #[test]
        fn timestamp_shaped_noise_never_panics(s in "[0-9]{1,6}-[0-9]{1,3}-[0-9]{1,3}[T ][0-9]{1,3}:[0-9]{1,3}:[0-9]{1,3}(\\.[0-9]{0,12})?([Zz]|[+-][0-9]{2}:[0-9]{2})?") {
            let _ = parse_lenient(&s);
            let _ = parse_strict(&s);
        }

        #[test]
        fn parsed_timestamps_are_utc_and_their_canonical_form_parses_back(s in stamp()) {
            if let Some(t) = parse_lenient(&s) {
                prop_assert_eq!(t.offset(), UtcOffset::UTC);
                let canonical = format(t);
                prop_assert_eq!(canonical.len(), 27, "{}", canonical);
                let back = parse_strict(&canonical);
                // The canonical form keeps microseconds: equal to within a microsecond.
                prop_assert!(back.is_some_and(|b| (b - t).abs() < time::Duration::microseconds(1)), "{s} -> {canonical}");
                prop_assert_eq!(parse_lenient(&canonical), back);
            }
            if let Some(strict) = parse_strict(&s) {
                prop_assert_eq!(parse_lenient(&s), Some(strict));
            }
        }
    }

    /// Offsets that push the UTC instant past year 9999 (or before year -9999) must be a clean
    /// `None`: `OffsetDateTime::to_offset` panics there, and `parse_strict` takes callers' query
    /// parameters (`/v1/...?since=`) while `parse_lenient` takes Leaf's event dates.
    #[test]
    fn offsets_past_the_supported_range_do_not_panic() {
        for s in [
            "9999-12-31T23:59:59-23:59",
            "9999-12-31T23:00:00-01:00",
            "9999-12-31 23:59:59.999999-23:00",
        ] {
            let lenient = std::panic::catch_unwind(|| parse_lenient(s));
            let strict = std::panic::catch_unwind(|| parse_strict(s));
            assert!(lenient.is_ok() && strict.is_ok(), "{s} panics");
        }
    }
}
