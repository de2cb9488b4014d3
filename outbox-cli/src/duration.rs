//! Durations as the command line reads and prints them: `90s`, `15m`, `1d12h`, `3d 4h`.

use std::time::Duration;

/// Parses `90s`, `15m`, `12h`, `30d`, `2w`, or several at once (`1d12h`, `1h 30m`), with
/// humantime (which also takes `ms`, `min`, `days`, ...).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|err| {
        format!(
            "`{text}`: {err} (give a number and a unit: 90s, 15m, 12h, 30d, 2w, or several: 1d12h)"
        )
    })
}

/// `3d 4h`, `12m 5s`, `45s`: the largest unit, and the next one when it is not zero.
pub(crate) fn format_age(seconds: u64) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("w", 604_800),
        ("d", 86_400),
        ("h", 3600),
        ("m", 60),
        ("s", 1),
    ];
    let first = UNITS
        .iter()
        .position(|(_, size)| seconds >= *size)
        .unwrap_or(UNITS.len() - 1);
    let (name, size) = UNITS[first];
    let mut text = format!("{}{name}", seconds / size);
    if let Some((next, next_size)) = UNITS.get(first + 1) {
        let rest = (seconds % size) / next_size;
        if rest > 0 {
            text.push_str(&format!(" {rest}{next}"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit_and_may_be_combined() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(2_592_000)));
        assert_eq!(parse_duration("1w"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("1d12h"), Ok(Duration::from_secs(129_600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        for bad in ["", "30", "d", "3x", "-1d", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn ages_show_their_two_largest_units() {
        assert_eq!(format_age(0), "0s");
        assert_eq!(format_age(45), "45s");
        assert_eq!(format_age(725), "12m 5s");
        assert_eq!(format_age(3600), "1h");
        assert_eq!(format_age(3 * 86_400 + 4 * 3600 + 5), "3d 4h");
    }
}
