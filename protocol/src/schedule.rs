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
            5 => format!("0 {text}"),
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
        for bad in [
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
