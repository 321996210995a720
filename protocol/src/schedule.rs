//! When a pipeline's sync runs start: at a fixed interval ("every 15m") or by a cron
//! expression ("*/15 * * * *", five fields, or six with seconds first), in UTC.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};

#[derive(Debug, Clone)]
pub enum Schedule {
    Every(Duration),
    Cron(Box<cron::Schedule>),
}

/// The shortest interval accepted: a sync is a full pass over the source's changes.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

impl Schedule {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(every) = text.strip_prefix("every ") {
            let interval = parse_duration(every.trim())?;
            if interval < MIN_INTERVAL {
                return Err(format!("{text:?} is shorter than one second"));
            }
            return Ok(Self::Every(interval));
        }
        let fields = text.split_whitespace().count();
        let expression = match fields {
            5 => {
                // Classic cron numbers weekdays 0-7 with Sunday as 0 (and 7); the
                // cron crate, 1-7 with Sunday as 1.
                let mut parts: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
                parts[4] = classic_weekdays(&parts[4]).ok_or_else(|| {
                    format!("{text:?}: day of week {:?} is not 0-7 or a name", parts[4])
                })?;
                format!("0 {}", parts.join(" "))
            }
            6 | 7 => text.to_owned(),
            _ => {
                return Err(format!(
                    "{text:?} is neither \"every <n><s|m|h|d>\" nor a cron expression of 5 fields"
                ))
            }
        };
        cron::Schedule::from_str(&expression)
            .map(|s| Self::Cron(Box::new(s)))
            .map_err(|e| format!("{text:?} is not a valid cron expression: {e}"))
    }

    /// The first start strictly after `last`.
    pub fn next_after(&self, last: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Every(interval) => chrono::Duration::from_std(*interval).ok().map(|d| last + d),
            Self::Cron(schedule) => schedule.after(&last).next(),
        }
    }
}

/// A classic cron day-of-week field (0-7, Sunday 0 or 7; names; lists, ranges,
/// steps) in the cron crate's numbering (1-7, Sunday 1). Step values stay as they are.
fn classic_weekdays(field: &str) -> Option<String> {
    let mut out = String::new();
    for part in field.split(',') {
        if !out.is_empty() {
            out.push(',');
        }
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (part, None),
        };
        let day = |d: &str| -> Option<String> {
            match d.parse::<u8>() {
                Ok(n) if n <= 7 => Some(((n % 7) + 1).to_string()),
                Ok(_) => None,
                Err(_) => Some(d.to_owned()),
            }
        };
        let mapped = match range.split_once('-') {
            // 5-7 ("Friday to Sunday") would wrap in the crate's numbering.
            Some((a, b)) if b == "7" && a.parse::<u8>().is_ok() => {
                format!("{}-7,1", day(a)?)
            }
            Some((a, b)) => format!("{}-{}", day(a)?, day(b)?),
            None => day(range)?,
        };
        out.push_str(&mapped);
        if let Some(s) = step {
            out.push('/');
            out.push_str(s);
        }
    }
    Some(out)
}

/// "90s", "15m", "1h30m", "2d".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let mut total = Duration::ZERO;
    let mut number = String::new();
    let bad = || format!("{text:?} is not a duration like 90s, 15m, 1h30m or 2d");
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().map_err(|_| bad())?;
        number.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        total += Duration::from_secs(n.checked_mul(unit).ok_or_else(bad)?);
    }
    if !number.is_empty() || total.is_zero() && text.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn intervals_and_cron_expressions() {
        let t0 = Utc
            .with_ymd_and_hms(2026, 11, 30, 10, 7, 0)
            .single()
            .expect("valid");
        let every = Schedule::parse("every 1h30m").expect("interval");
        assert_eq!(
            every.next_after(t0),
            Some(t0 + chrono::Duration::minutes(90))
        );
        let cron = Schedule::parse("*/15 * * * *").expect("cron");
        assert_eq!(
            cron.next_after(t0),
            Utc.with_ymd_and_hms(2026, 11, 30, 10, 15, 0).single()
        );
        // Weekdays as classic cron numbers them (2026-11-29 is a Sunday).
        let sunday = Utc
            .with_ymd_and_hms(2026, 11, 29, 10, 0, 0)
            .single()
            .expect("valid");
        let weekdays = Schedule::parse("0 9 * * 1-5").expect("cron");
        assert_eq!(
            weekdays.next_after(sunday),
            Utc.with_ymd_and_hms(2026, 11, 30, 9, 0, 0).single()
        );
        for sundays in ["0 9 * * 0", "0 9 * * 7", "0 9 * * SUN", "0 9 * * 5-7"] {
            let next = Schedule::parse(sundays).expect("cron").next_after(t0);
            let want = if sundays.ends_with("5-7") {
                Utc.with_ymd_and_hms(2026, 12, 4, 9, 0, 0).single()
            } else {
                Utc.with_ymd_and_hms(2026, 12, 6, 9, 0, 0).single()
            };
            assert_eq!(next, want, "{sundays}");
        }
        for bad in [
            "* * * * 8",
            "every",
            "every 10",
            "every 5x",
            "every 0s",
            "hourly",
            "* * *",
            "61 * * * *",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
    }
}
