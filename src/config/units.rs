//! The value syntaxes a user writes in config files and requests: sizes
//! (`"6GiB"`), durations (`"30s"`), keep-alive (`"10m"`, `0`, `-1`) and
//! memory budgets (`"6GiB"` or `"80%"`).

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses sizes like `4096`, `"512KiB"`, `"4MiB"`, `"6GiB"`, `"2GB"`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("expected a size like \"4MiB\", got \"{s}\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit \"{other}\" in \"{s}\" (use B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    Ok((num * mult as f64).round() as u64)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Int(i64),
    Float(f64),
    Text(String),
}

pub(super) fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match NumberOrText::deserialize(d)? {
        NumberOrText::Int(n) if n >= 0 => Ok(n as u64),
        NumberOrText::Text(s) => parse_bytes(&s).map_err(serde::de::Error::custom),
        _ => Err(serde::de::Error::custom(
            "expected a size like \"4MiB\" or a number of bytes",
        )),
    }
}

/// Durations written as `"30s"`, `"5m"`, `"1h 30m"`.
pub(super) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("expected a duration like \"30s\": {e}")))
    }

    /// An optional duration; `"0"`/`"none"` or leaving it out means none.
    pub mod optional {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer};

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let s = String::deserialize(d)?;
            if matches!(s.trim(), "" | "0" | "none") {
                return Ok(None);
            }
            humantime::parse_duration(&s).map(Some).map_err(|e| {
                serde::de::Error::custom(format!("expected a duration like \"2m\": {e}"))
            })
        }
    }
}

/// How long a model stays loaded after its last request ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Until evicted for memory or unloaded by an admin.
    Forever,
    /// This long (zero: unload as soon as the last request ends).
    For(Duration),
}

impl KeepAlive {
    /// A number of seconds; negative means forever.
    pub fn from_seconds(secs: f64) -> Result<Self, String> {
        if !secs.is_finite() {
            return Err(format!("expected a finite number of seconds, got {secs}"));
        }
        if secs < 0.0 {
            return Ok(Self::Forever);
        }
        Duration::try_from_secs_f64(secs)
            .map(Self::For)
            .map_err(|e| format!("{secs} seconds: {e}"))
    }

    /// `"10m"`, `"30s"`, `"0"`, `"-1"` (forever) or a bare number of seconds.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(secs) = s.parse::<f64>() {
            return Self::from_seconds(secs);
        }
        if s.starts_with('-') {
            return Ok(Self::Forever);
        }
        humantime::parse_duration(s).map(Self::For).map_err(|e| {
            format!("expected a duration like \"30s\" or \"10m\", seconds, or -1 for forever: {e}")
        })
    }

    /// From a JSON-like value: a number of seconds or a duration string.
    pub fn from_value(v: &serde_json::Value) -> Result<Self, String> {
        match v {
            serde_json::Value::Number(n) => n
                .as_f64()
                .ok_or_else(|| "expected a number of seconds".to_string())
                .and_then(Self::from_seconds),
            serde_json::Value::String(s) => Self::parse(s),
            other => Err(format!(
                "expected a duration like \"10m\", a number of seconds, or -1; got {other}"
            )),
        }
    }
}

impl std::fmt::Display for KeepAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Forever => f.write_str("forever"),
            Self::For(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

impl<'de> Deserialize<'de> for KeepAlive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let parsed = match NumberOrText::deserialize(d)? {
            NumberOrText::Int(n) => Self::from_seconds(n as f64),
            NumberOrText::Float(x) => Self::from_seconds(x),
            NumberOrText::Text(s) => Self::parse(&s),
        };
        parsed.map_err(serde::de::Error::custom)
    }
}

/// A device's memory budget as written: bytes, or a share of what the
/// device reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// A fixed number of bytes.
    Bytes(u64),
    /// A fraction in (0, 1] of the device's memory.
    Fraction(f64),
}

impl Budget {
    /// The budget in bytes on a device with `total` bytes.
    pub fn resolve(self, total: u64) -> u64 {
        match self {
            Self::Bytes(b) => b,
            Self::Fraction(f) => (total as f64 * f) as u64,
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        match s.trim().strip_suffix('%') {
            Some(p) => {
                let pct: f64 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("expected a percentage like \"80%\", got \"{s}\""))?;
                Self::fraction(pct / 100.0)
            }
            None => parse_bytes(s).map(Self::Bytes),
        }
    }

    fn fraction(f: f64) -> Result<Self, String> {
        if f > 0.0 && f <= 1.0 {
            Ok(Self::Fraction(f))
        } else {
            Err(format!(
                "expected a share of the device's memory in (0, 100%], got {}%",
                f * 100.0
            ))
        }
    }
}

impl<'de> Deserialize<'de> for Budget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let parsed = match NumberOrText::deserialize(d)? {
            NumberOrText::Int(n) if n > 1 => Ok(Self::Bytes(n as u64)),
            NumberOrText::Int(n) => Self::fraction(n as f64),
            NumberOrText::Float(x) => Self::fraction(x),
            NumberOrText::Text(s) => Self::parse(&s),
        };
        parsed.map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_bytes("1.5 GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("2GB").unwrap(), 2_000_000_000);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("4 parsecs").is_err());
    }

    #[test]
    fn keep_alive_parses_every_form() {
        let secs = |s| KeepAlive::For(Duration::from_secs(s));
        assert_eq!(KeepAlive::parse("10m").unwrap(), secs(600));
        assert_eq!(KeepAlive::parse("30s").unwrap(), secs(30));
        assert_eq!(KeepAlive::parse("0").unwrap(), secs(0));
        assert_eq!(KeepAlive::parse("-1").unwrap(), KeepAlive::Forever);
        assert_eq!(KeepAlive::parse("-5m").unwrap(), KeepAlive::Forever);
        assert_eq!(KeepAlive::parse("90").unwrap(), secs(90));
        assert!(KeepAlive::parse("soon").is_err());
        let v = |j: &str| KeepAlive::from_value(&serde_json::from_str(j).unwrap());
        assert_eq!(v("0").unwrap(), secs(0));
        assert_eq!(v("-1").unwrap(), KeepAlive::Forever);
        assert_eq!(
            v("1.5").unwrap(),
            KeepAlive::For(Duration::from_millis(1500))
        );
        assert_eq!(v("\"2m\"").unwrap(), secs(120));
        assert!(v("true").is_err());
    }

    #[test]
    fn budgets_parse_bytes_and_shares() {
        #[derive(Deserialize)]
        struct B {
            b: Budget,
        }
        let b = |t: &str| toml::from_str::<B>(&format!("b = {t}")).map(|b| b.b);
        assert_eq!(b("\"6GiB\"").unwrap(), Budget::Bytes(6 << 30));
        assert_eq!(b("\"80%\"").unwrap(), Budget::Fraction(0.8));
        assert_eq!(b("0.5").unwrap(), Budget::Fraction(0.5));
        assert_eq!(b("1000000").unwrap(), Budget::Bytes(1_000_000));
        assert!(b("\"120%\"").is_err());
        assert_eq!(Budget::Fraction(0.5).resolve(1000), 500);
    }
}
