//! Values of flags that more than one program takes.

use std::time::Duration;

/// A duration flag: `300` (seconds), `300s`, `5m`, `1h30m`, `250ms`;
/// whole numbers of hours, minutes, seconds and milliseconds.
pub fn duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration like 300s, 5m or 1h30m");
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map(Duration::from_secs).map_err(|_| bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "h" => Duration::from_secs(3600),
            "m" => Duration::from_secs(60),
            "s" => Duration::from_secs(1),
            "ms" => Duration::from_millis(1),
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        let part = u32::try_from(value)
            .ok()
            .and_then(|v| unit.checked_mul(v))
            .ok_or_else(bad)?;
        total = total.checked_add(part).ok_or_else(bad)?;
    }
    if text.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

/// A [`duration`] that must be longer than zero (periods, intervals).
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    let d = duration(text)?;
    if d.is_zero() {
        return Err(format!("{text:?} must be longer than zero"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let s = Duration::from_secs;
        for (text, want) in [
            ("300", s(300)),
            ("300s", s(300)),
            ("5m", s(300)),
            ("1h30m", s(5400)),
            ("1m30s", s(90)),
            ("250ms", Duration::from_millis(250)),
            ("1s500ms", Duration::from_millis(1500)),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(duration(text), Ok(want), "{text:?}");
        }
        for bad in ["", "s", "5x", "1.5m", "m5", "5m3", "-5s", "often", "5 m"] {
            assert!(duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn positive_durations() {
        assert_eq!(positive_duration("5s"), Ok(Duration::from_secs(5)));
        for bad in ["0s", "0", "-5s"] {
            assert!(positive_duration(bad).is_err(), "{bad:?}");
        }
    }
}
