//! What a human reads: byte counts in binary units, counted nouns, and
//! durations. `--json` never goes through here: it keeps raw numbers.

use std::time::Duration;

const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// A byte count in binary units with one decimal (`4.2 MiB`); below
/// 1 KiB the exact count without decimals (`13 B`).
pub fn bytes(n: u64) -> String {
    if n < 1024 {
        return format!("{n} B");
    }
    let mut unit = 0;
    let mut v = n as f64 / 1024.0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    // 1023.96 KiB would print as "1024.0 KiB": that is 1.0 MiB.
    if (v * 10.0).round() >= 10240.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A rate in binary units per second (`412.3 MiB/s`).
pub fn rate(bytes_per_sec: f64) -> String {
    let b = if bytes_per_sec.is_finite() && bytes_per_sec > 0.0 {
        bytes_per_sec.min(u64::MAX as f64) as u64
    } else {
        0
    };
    format!("{}/s", bytes(b))
}

/// `1 file`, `2 files`, `0 files`: the noun's plural adds an s.
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    format!("{n} {}", plural(n, noun))
}

/// `noun` for 1, else its plural (`s` added; `y` after a consonant
/// becomes `ies`; `ch`, `sh`, `s`, `x` take `es`).
pub fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        return noun.to_string();
    }
    if let Some(stem) = noun.strip_suffix('y') {
        if !stem.ends_with(['a', 'e', 'i', 'o', 'u']) {
            return format!("{stem}ies");
        }
    }
    if noun.ends_with("ch") || noun.ends_with("sh") || noun.ends_with(['s', 'x']) {
        return format!("{noun}es");
    }
    format!("{noun}s")
}

/// A duration as people say it: `0.4 s`, `3.2 s`, `2 min 5 s`, `1 h 3 min`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 59.95 {
        return format!("{s:.1} s");
    }
    let secs = d.as_secs() + u64::from(d.subsec_millis() >= 500);
    if secs < 3600 {
        format!("{} min {} s", secs / 60, secs % 60)
    } else {
        format!("{} h {} min", secs / 3600, (secs % 3600) / 60)
    }
}

/// A time left, in whole seconds rounded up (`12 s`, `2 min 5 s`).
pub fn eta(d: Duration) -> String {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min {} s", secs / 60, secs % 60),
        _ => format!("{} h {} min", secs / 3600, (secs % 3600) / 60),
    }
}

/// ` in 3.2 s` when the work took a second or more, else nothing: a
/// suffix for a summary line.
pub fn took(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!(" in {}", duration(d))
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_below_a_kib_are_exact() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1), "1 B");
        assert_eq!(bytes(13), "13 B");
        assert_eq!(bytes(1023), "1023 B");
    }

    #[test]
    fn bytes_take_binary_units_with_one_decimal() {
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(1025), "1.0 KiB");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(4300), "4.2 KiB");
        assert_eq!(bytes(4_404_019), "4.2 MiB");
        assert_eq!(bytes(1024 * 1024), "1.0 MiB");
        assert_eq!(bytes(858 * 1024 * 1024), "858.0 MiB");
        assert_eq!(bytes(1_181_116_006), "1.1 GiB");
        assert_eq!(bytes(1 << 40), "1.0 TiB");
    }

    #[test]
    fn rounding_up_to_1024_moves_to_the_next_unit() {
        // 1023.95 KiB and more would read "1024.0 KiB".
        assert_eq!(bytes(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(bytes(1_048_525), "1.0 MiB");
        assert_eq!(bytes(1_048_524), "1023.9 KiB");
        assert_eq!(bytes((1 << 30) - 1), "1.0 GiB");
    }

    #[test]
    fn the_largest_count_is_in_eib() {
        assert_eq!(bytes(u64::MAX), "16.0 EiB");
        assert_eq!(bytes(1 << 60), "1.0 EiB");
    }

    #[test]
    fn rates() {
        assert_eq!(rate(0.0), "0 B/s");
        assert_eq!(rate(f64::NAN), "0 B/s");
        assert_eq!(rate(f64::INFINITY), "0 B/s");
        assert_eq!(rate(412.3 * 1024.0 * 1024.0), "412.3 MiB/s");
    }

    #[test]
    fn counted_nouns() {
        assert_eq!(count(0u64, "file"), "0 files");
        assert_eq!(count(1u64, "file"), "1 file");
        assert_eq!(count(2u64, "file"), "2 files");
        assert_eq!(count(1u64, "conflict"), "1 conflict");
        assert_eq!(count(2u64, "conflict"), "2 conflicts");
        assert_eq!(count(3u32, "entry"), "3 entries");
        assert_eq!(count(3u32, "day"), "3 days");
        assert_eq!(count(2u64, "match"), "2 matches");
        assert_eq!(count(2u64, "fix"), "2 fixes");
        assert_eq!(count(u64::MAX, "item"), format!("{} items", u64::MAX));
    }

    #[test]
    fn durations() {
        assert_eq!(duration(Duration::from_millis(400)), "0.4 s");
        assert_eq!(duration(Duration::from_millis(3_240)), "3.2 s");
        assert_eq!(duration(Duration::from_millis(59_940)), "59.9 s");
        assert_eq!(duration(Duration::from_millis(59_960)), "1 min 0 s");
        assert_eq!(duration(Duration::from_secs(125)), "2 min 5 s");
        assert_eq!(duration(Duration::from_secs(3_780)), "1 h 3 min");
        assert_eq!(eta(Duration::from_millis(11_200)), "12 s");
        assert_eq!(eta(Duration::from_secs(125)), "2 min 5 s");
        assert_eq!(eta(Duration::from_secs(7_260)), "2 h 1 min");
        assert_eq!(took(Duration::from_millis(999)), "");
        assert_eq!(took(Duration::from_millis(2_100)), " in 2.1 s");
    }
}
