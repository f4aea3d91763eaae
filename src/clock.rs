//! UTC calendar arithmetic for partition keys and object names, without a date-time crate:
//! the pipeline only needs "which hour is this" and "what is now", on its hot path.

use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC instant at second precision, broken down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    pub year: i32,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

impl Utc {
    pub fn now() -> Utc {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Utc::from_unix(secs)
    }

    pub fn from_unix(secs: i64) -> Utc {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        Utc {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem % 3600 / 60) as u8,
            second: (rem % 60) as u8,
        }
    }

    pub fn to_unix(self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }

    /// `20240318T143007Z`: sorts as text in time order.
    pub fn compact(self) -> String {
        format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }

    /// `2024-03-18T14:30:07Z`, CloudTrail's own format.
    pub fn rfc3339(self) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }

    /// Parses an RFC 3339 time as CloudTrail writes it (`2024-03-18T14:30:07Z`), also with
    /// fractional seconds or a numeric offset, and returns it in UTC. None when malformed.
    pub fn parse_rfc3339(s: &str) -> Option<Utc> {
        let b = s.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
            return None;
        }
        if b[13] != b':' || b[16] != b':' {
            return None;
        }
        let year = digits(&b[0..4])? as i32;
        let month = digits(&b[5..7])? as u8;
        let day = digits(&b[8..10])? as u8;
        let hour = digits(&b[11..13])? as u8;
        let minute = digits(&b[14..16])? as u8;
        let second = digits(&b[17..19])? as u8;
        if !(1..=12).contains(&month)
            || day == 0
            || day > days_in_month(year, month)
            || hour > 23
            || minute > 59
            || second > 60
        {
            return None;
        }
        let mut rest = &b[19..];
        if let Some(frac) = rest.strip_prefix(b".") {
            let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
            if n == 0 {
                return None;
            }
            rest = &frac[n..];
        }
        let offset_secs = match rest {
            b"Z" | b"z" => 0,
            [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
                let h = digits(&[*h1, *h2])? as i64;
                let m = digits(&[*m1, *m2])? as i64;
                if h > 23 || m > 59 {
                    return None;
                }
                let off = h * 3600 + m * 60;
                if *sign == b'+' { off } else { -off }
            }
            _ => return None,
        };
        let t = Utc {
            year,
            month,
            day,
            hour,
            minute,
            // A leap second is folded into the last regular second of its minute.
            second: second.min(59),
        };
        Some(if offset_secs == 0 {
            t
        } else {
            Utc::from_unix(t.to_unix() - offset_secs)
        })
    }
}

fn digits(b: &[u8]) -> Option<u32> {
    b.iter().try_fold(0u32, |acc, c| {
        c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
    })
}

fn is_leap(y: i32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i32, m: u8) -> u8 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i32, m: u8, d: u8) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u8;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<String> {
        Utc::parse_rfc3339(s).map(Utc::rfc3339)
    }

    #[test]
    fn parses_cloudtrail_times_and_normalises_offsets() {
        assert_eq!(
            p("2024-03-18T14:30:07Z").as_deref(),
            Some("2024-03-18T14:30:07Z")
        );
        assert_eq!(
            p("2024-03-18T14:30:07.123Z").as_deref(),
            Some("2024-03-18T14:30:07Z")
        );
        assert_eq!(
            p("2024-03-18T01:30:07+02:00").as_deref(),
            Some("2024-03-17T23:30:07Z")
        );
        assert_eq!(
            p("2024-12-31T23:30:00-01:00").as_deref(),
            Some("2025-01-01T00:30:00Z")
        );
        assert_eq!(
            p("2024-02-29T00:00:00Z").as_deref(),
            Some("2024-02-29T00:00:00Z")
        );
    }

    #[test]
    fn rejects_malformed_times() {
        for bad in [
            "",
            "2024-03-18",
            "2024-03-18T14:30:07",
            "2024-13-18T14:30:07Z",
            "2023-02-29T14:30:07Z",
            "2024-03-18T24:30:07Z",
            "2024-03-18T14:30:07.Z",
            "2024-03-18T14:30:07+2:00",
            "20x4-03-18T14:30:07Z",
            "2024-03-18T14:30:07Zjunk",
            "٢٠٢٤-03-18T14:30:07Z",
        ] {
            assert_eq!(Utc::parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn unix_round_trip() {
        for secs in [0i64, 951_782_400, 1_710_772_207, 4_102_444_800, -86_400] {
            assert_eq!(Utc::from_unix(secs).to_unix(), secs);
        }
        assert_eq!(Utc::from_unix(1_710_772_207).compact(), "20240318T143007Z");
    }
}
