//! `timefmt::parse_lenient` (Leaf's timestamps) and `parse_strict` (callers' query parameters)
//! on arbitrary strings: never a panic; what parses is UTC and its canonical form parses back.
#![no_main]
use credsync::timefmt;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let strict = timefmt::parse_strict(s);
    let lenient = timefmt::parse_lenient(s);
    if let Some(t) = strict {
        assert_eq!(lenient, Some(t));
    }
    if let Some(t) = lenient {
        assert_eq!(t.offset(), time::UtcOffset::UTC);
        let canonical = timefmt::format(t);
        let back = timefmt::parse_strict(&canonical).expect("the canonical form parses");
        assert!(
            (back - t).abs() < time::Duration::microseconds(1),
            "{s:?} -> {canonical}"
        );
    }
});
