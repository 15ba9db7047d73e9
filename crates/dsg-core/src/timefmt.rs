//! Timestamps in the original's format: ISO-8601 in America/Los_Angeles with
//! whole seconds and a `±HH:MM` offset (spec-data-model §1.3). We keep the zone
//! for byte compatibility with repositories the original wrote; nanosecond
//! mtimes live in the local stat cache, never in shared manifests.

use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeZone, Utc};
use chrono_tz::America::Los_Angeles;

/// Formats unix seconds as LA local time, e.g. `2025-06-01T10:00:00-07:00`.
pub fn format_la(secs: i64) -> String {
    let dt = Los_Angeles
        .timestamp_opt(secs, 0)
        .single()
        .unwrap_or_else(|| Los_Angeles.timestamp_opt(0, 0).unwrap());
    dt.format("%Y-%m-%dT%H:%M:%S%:z").to_string()
}

/// The mtime string of a file whose mtime is `secs` + `nanos`: truncated to the
/// second, except that the original first rounded to microseconds, so
/// `x.9999996` becomes the next second. We reproduce that so hashes match.
pub fn mtime_string(secs: i64, nanos: u32) -> String {
    let micros = (nanos as u64 + 500) / 1000;
    let secs = if micros >= 1_000_000 { secs + 1 } else { secs };
    format_la(secs)
}

pub fn now_la() -> String {
    format_la(Utc::now().timestamp())
}

/// Parses an ISO-8601 timestamp (with offset, `Z`, or naive). `None` if unparseable.
pub fn parse(s: &str) -> Option<DateTime<FixedOffset>> {
    let s = s.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(&s.replace('Z', "+00:00")) {
        return Some(dt);
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(n) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(n.and_utc().fixed_offset());
        }
    }
    None
}

/// The America/Los_Angeles UTC offset, in minutes, at a unix time.
pub fn la_offset_minutes(secs: i64) -> i16 {
    use chrono::Offset;
    let Some(dt) = chrono::DateTime::from_timestamp(secs, 0) else {
        return 0;
    };
    let off = Los_Angeles.offset_from_utc_datetime(&dt.naive_utc());
    (off.fix().local_minus_utc() / 60) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dst_offsets() {
        // 2025-06-01T17:00:00Z is 10:00 PDT; 2025-01-15T20:00:00Z is 12:00 PST.
        assert_eq!(format_la(1748797200), "2025-06-01T10:00:00-07:00");
        assert_eq!(format_la(1736971200), "2025-01-15T12:00:00-08:00");
    }

    #[test]
    fn rounding_like_the_original() {
        assert_eq!(
            mtime_string(1748797200, 999_999_600),
            "2025-06-01T10:00:01-07:00"
        );
        assert_eq!(
            mtime_string(1748797200, 500_000_000),
            "2025-06-01T10:00:00-07:00"
        );
    }

    #[test]
    fn parse_forms() {
        assert!(parse("2025-06-01T10:00:00-07:00").is_some());
        assert!(parse("2025-06-01T17:00:00Z").is_some());
        assert!(parse("2025-06-01T17:00:00").is_some());
        assert!(parse("yesterday").is_none());
    }
}
