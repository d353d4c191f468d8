//! RFC 3339 timestamps as milliseconds since the Unix epoch: a static token's
//! `expiresAt` and the companion protocol's `expiresAt`.
//!
//! Reads exactly what the `time` crate's `Rfc3339` parser reads (the tests compare the
//! two): `YYYY-MM-DD`, any one byte as separator, `hh:mm:ss`, an optional fraction of
//! any length (digits past the ninth ignored), then `Z`, `z` or `±hh:mm` (hours up to
//! 23). Dates and times must exist; second 60 is read as the last nanosecond of 59,
//! and only where a leap second can fall (23:59:60 UTC on a month's last day). Written
//! by hand because the wasm module pays some 6 KB for `time`.

use std::fmt::Write as _;

const MS_PER_DAY: u64 = 86_400_000;
/// `9999-12-31T23:59:59.999Z`, the latest instant [`format_rfc3339_ms`] writes.
const LATEST_MS: u64 = 253_402_300_799_999;

/// Parses an RFC 3339 timestamp into milliseconds since the epoch (`None` when
/// unreadable or before 1970).
pub fn parse_rfc3339_ms(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    let year = digits(bytes, 0, 4)?;
    literal(bytes, 4, b'-')?;
    let month = digits(bytes, 5, 2)?;
    literal(bytes, 7, b'-')?;
    let day = digits(bytes, 8, 2)?;
    // Byte 10 separates date and time: RFC 3339 allows any (`T`, `t`, a space).
    let hour = digits(bytes, 11, 2)?;
    literal(bytes, 13, b':')?;
    let minute = digits(bytes, 14, 2)?;
    literal(bytes, 16, b':')?;
    let mut second = digits(bytes, 17, 2)?;
    let (mut nanos, rest) = fraction(&bytes[19..])?;
    let offset_secs = offset(rest)?;

    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let leap_second = second == 60;
    if leap_second {
        second = 59;
        nanos = 999_999_999;
    }
    let local_secs =
        days_from_civil(year, month, day) * 86_400 + i64::from(hour * 3_600 + minute * 60 + second);
    let utc_secs = local_secs - offset_secs;
    if leap_second && !is_leap_second_stand_in(utc_secs) {
        return None;
    }
    let ms = (i128::from(utc_secs) * 1_000_000_000 + i128::from(nanos)) / 1_000_000;
    u64::try_from(ms).ok()
}

/// Formats milliseconds since the epoch as RFC 3339 with milliseconds, in UTC
/// (`2026-11-22T17:00:00.000Z`), the shape of JavaScript's `Date.toISOString()`.
/// Instants after year 9999 are written as its last millisecond.
pub fn format_rfc3339_ms(ms: u64) -> String {
    let ms = ms.min(LATEST_MS);
    let day_ms = ms % MS_PER_DAY;
    // At most 2,932,896 days: the conversion cannot fail.
    let days = i64::try_from(ms / MS_PER_DAY).unwrap_or(0);
    let (year, month, day) = civil_from_days(days);
    let mut text = String::with_capacity(24);
    let _ = write!(
        text,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1_000 % 60,
        day_ms % 1_000
    );
    text
}

/// The number written in ASCII digits at `bytes[at..at + count]`.
fn digits(bytes: &[u8], at: usize, count: usize) -> Option<u32> {
    bytes.get(at..at + count)?.iter().try_fold(0, |value, &b| {
        b.is_ascii_digit().then(|| value * 10 + u32::from(b - b'0'))
    })
}

fn literal(bytes: &[u8], at: usize, expected: u8) -> Option<()> {
    (bytes.get(at) == Some(&expected)).then_some(())
}

/// An optional `.` and one or more digits: the nanoseconds and what follows.
fn fraction(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let Some(after_dot) = bytes.strip_prefix(b".") else {
        return Some((0, bytes));
    };
    let count = after_dot.iter().take_while(|b| b.is_ascii_digit()).count();
    if count == 0 {
        return None;
    }
    let mut nanos = 0;
    for position in 0..9 {
        let digit = after_dot[..count].get(position).map_or(0, |b| b - b'0');
        nanos = nanos * 10 + u32::from(digit);
    }
    Some((nanos, &after_dot[count..]))
}

/// `Z`, `z` or `±hh:mm`, ending the text: the offset from UTC in seconds.
fn offset(bytes: &[u8]) -> Option<i64> {
    if bytes == b"Z" || bytes == b"z" {
        return Some(0);
    }
    if bytes.len() != 6 {
        return None;
    }
    let sign = match bytes[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let hours = digits(bytes, 1, 2)?;
    literal(bytes, 3, b':')?;
    let minutes = digits(bytes, 4, 2)?;
    (hours <= 23 && minutes <= 59).then(|| sign * i64::from(hours * 3_600 + minutes * 60))
}

fn is_leap_year(year: u32) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Whether `utc_secs` is 23:59:59 UTC on the last day of a month of years 0 to 9999:
/// where a leap second may stand.
fn is_leap_second_stand_in(utc_secs: i64) -> bool {
    let (year, month, day) = civil_from_days(utc_secs.div_euclid(86_400));
    utc_secs.rem_euclid(86_400) == 86_399
        && (0..=9999).contains(&year)
        && u32::try_from(year).is_ok_and(|year| day == days_in_month(year, month))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`), for years 0 to 9999.
fn days_from_civil(year: u32, month: u32, day: u32) -> i64 {
    let year = i64::from(year) - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The proleptic Gregorian date `days` after 1970-01-01 (`civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    // Both are small and positive by construction.
    let day = u32::try_from(day_of_year - (153 * month_from_march + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from((month_from_march + 2) % 12 + 1).unwrap_or(1);
    (year_of_era + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// What the `time` crate reads, for comparison.
    fn time_parse(text: &str) -> Option<u64> {
        let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .ok()?;
        u64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
    }

    #[test]
    fn edge_cases_read_as_expected() {
        let cases: &[(&str, Option<u64>)] = &[
            ("1970-01-01T00:00:00Z", Some(0)),
            ("2030-01-01T00:00:00.123Z", Some(1_893_456_000_123)),
            ("2030-01-01T02:00:00+02:00", Some(1_893_456_000_000)),
            ("2029-12-31T23:00:00-01:00", Some(1_893_456_000_000)),
            (
                "2030-01-01 00:00:00.1239999999999z",
                Some(1_893_456_000_123),
            ),
            ("2024-02-29T00:00:00Z", Some(1_709_164_800_000)),
            ("2000-02-29T00:00:00Z", Some(951_782_400_000)),
            ("2023-02-29T00:00:00Z", None),
            ("1900-02-29T00:00:00Z", None),
            ("2030-04-31T00:00:00Z", None),
            ("2030-13-01T00:00:00Z", None),
            ("2030-00-01T00:00:00Z", None),
            ("2030-01-00T00:00:00Z", None),
            ("2030-01-01T24:00:00Z", None),
            ("2030-01-01T00:60:00Z", None),
            ("2016-12-31T23:59:60Z", Some(1_483_228_799_999)),
            ("2017-01-01T00:59:60+01:00", Some(1_483_228_799_999)),
            ("2016-12-30T23:59:60Z", None),
            ("2030-01-01T00:00:00+24:00", None),
            ("2030-01-01T00:00:00+01:60", None),
            ("2030-01-01T00:00:00", None),
            ("2030-01-01T00:00:00.Z", None),
            ("2030-01-01T00:00:00Zx", None),
            ("2030-01-01T00:00:00+0100", None),
            ("1969-12-31T23:59:59Z", None),
            ("1969-12-31T23:59:59.9995Z", Some(0)),
            ("1970-01-01T00:30:00+01:00", None),
            ("9999-12-31T23:59:59.999Z", Some(LATEST_MS)),
            ("9999-12-31T23:00:00-02:00", Some(253_402_304_400_000)),
            ("soon", None),
            ("", None),
        ];
        for &(text, expected) in cases {
            assert_eq!(parse_rfc3339_ms(text), expected, "{text}");
            assert_eq!(time_parse(text), expected, "time on {text}");
        }
    }

    /// A small deterministic generator (xorshift), so the comparison needs no crate.
    struct Xorshift(u64);
    impl Xorshift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, bound: u64) -> u64 {
            self.next() % bound
        }
    }

    #[test]
    fn reads_what_the_time_crate_reads() {
        let mut random = Xorshift(0x9E37_79B9_7F4A_7C15);
        for _ in 0..50_000 {
            let mut text = format!(
                "{:04}-{:02}-{:02}{}{:02}:{:02}:{:02}",
                random.below(10_000),
                random.below(15),
                random.below(33),
                ["T", "t", " ", "x", "é"][random.below(5) as usize],
                random.below(26),
                random.below(62),
                random.below(62),
            );
            if random.below(2) == 0 {
                text.push('.');
                for _ in 0..random.below(13) {
                    text.push(char::from(b'0' + random.below(10) as u8));
                }
            }
            match random.below(4) {
                0 => text.push('Z'),
                1 => text.push('z'),
                2 => {
                    let sign = if random.below(2) == 0 { '+' } else { '-' };
                    let _ = write!(
                        text,
                        "{sign}{:02}:{:02}",
                        random.below(26),
                        random.below(62)
                    );
                }
                _ => {}
            }
            if random.below(10) == 0 {
                let cut = random.below(text.len() as u64 + 1) as usize;
                if !text.is_char_boundary(cut) {
                    continue;
                }
                text.truncate(cut);
            }
            assert_eq!(parse_rfc3339_ms(&text), time_parse(&text), "{text}");
        }
    }

    #[test]
    fn leap_seconds_on_every_month_end_match_the_time_crate() {
        for year in [1972, 2000, 2016, 2100, 9999] {
            for month in 1..=12 {
                for day in 27..=31 {
                    for offset in ["Z", "+01:00", "-01:30", "+23:59"] {
                        let text = format!("{year}-{month:02}-{day:02}T23:59:60{offset}");
                        assert_eq!(parse_rfc3339_ms(&text), time_parse(&text), "{text}");
                    }
                }
            }
        }
    }

    #[test]
    fn formats_as_the_time_crate_does_and_reads_back() {
        let mut random = Xorshift(0x2545_F491_4F6C_DD1D);
        let fixed = [0, 1, 951_782_400_000, 1_893_456_000_123, LATEST_MS];
        let samples = fixed
            .into_iter()
            .chain((0..20_000).map(|_| random.below(LATEST_MS + 1)));
        for ms in samples {
            let text = format_rfc3339_ms(ms);
            let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .unwrap();
            let expected = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                at.year(),
                u8::from(at.month()),
                at.day(),
                at.hour(),
                at.minute(),
                at.second(),
                at.millisecond()
            );
            assert_eq!(text, expected);
            assert_eq!(parse_rfc3339_ms(&text), Some(ms), "{text}");
        }
        assert_eq!(format_rfc3339_ms(LATEST_MS + 1), "9999-12-31T23:59:59.999Z");
        assert_eq!(format_rfc3339_ms(u64::MAX), "9999-12-31T23:59:59.999Z");
    }
}
