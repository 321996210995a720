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

/// A classic cron day-of-week field (0-7, Sunday 0 or 7; lists, ranges, steps) in the
/// cron crate's numbering (1-7, Sunday 1), as the explicit list of days it means (a
/// range or step cannot be carried over as it is: 5-7 would wrap, 3-7/2 would step
/// from another start). Parts with names (MON-FRI) are the crate's own syntax, kept.
fn classic_weekdays(field: &str) -> Option<String> {
    if field == "*" || field == "?" {
        return Some(field.to_owned());
    }
    let mut named = Vec::new();
    let mut days = std::collections::BTreeSet::new();
    for part in field.split(',') {
        if part.chars().any(|c| c.is_ascii_alphabetic()) {
            named.push(part.to_owned());
            continue;
        }
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => (range, Some(step.parse::<u8>().ok().filter(|s| *s > 0)?)),
            None => (part, None),
        };
        let (lo, hi): (u8, u8) = match (range, range.split_once('-')) {
            ("*", _) => (0, 6),
            (_, Some((a, b))) => (a.parse().ok()?, b.parse().ok()?),
            // "3/2": from 3 on, every second day of the week.
            (a, None) if step.is_some() => (a.parse().ok()?, 6),
            (a, None) => {
                let a = a.parse().ok()?;
                (a, a)
            }
        };
        if lo > 7 || hi > 7 || lo > hi {
            return None;
        }
        for day in (lo..=hi).step_by(usize::from(step.unwrap_or(1))) {
            days.insert(day % 7 + 1);
        }
    }
    named.extend(days.iter().map(u8::to_string));
    Some(named.join(","))
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
        // Wednesday, Friday, Sunday: from Sunday 10:00, Wednesday comes first.
        let stepped = Schedule::parse("0 9 * * 3-7/2").expect("cron");
        assert_eq!(
            stepped.next_after(sunday),
            Utc.with_ymd_and_hms(2026, 12, 2, 9, 0, 0).single()
        );
        let every_other = Schedule::parse("0 9 * * 0-7/2").expect("cron");
        assert_eq!(
            every_other.next_after(sunday),
            Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).single(),
            "0,2,4,6: Sunday, Tuesday, Thursday, Saturday; Tuesday is next"
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
