//! Byte sizes and rates as the policy file spells them: `100MiB`, `1.5 GB`, `2MiB/s`, `100Mbit/s`.

/// Binary and decimal byte units (case-sensitive, as written in the docs: `KiB` is not `kib`).
const SIZE_UNITS: &[(&str, f64)] = &[
    ("B", 1.0),
    ("KiB", 1024.0),
    ("MiB", 1024.0 * 1024.0),
    ("GiB", 1024.0 * 1024.0 * 1024.0),
    ("TiB", 1024.0 * 1024.0 * 1024.0 * 1024.0),
    ("kB", 1e3),
    ("MB", 1e6),
    ("GB", 1e9),
    ("TB", 1e12),
];

/// Bit units for rates (powers of ten, as network rates are quoted), in bytes.
const BIT_UNITS: &[(&str, f64)] = &[
    ("bit", 1.0 / 8.0),
    ("kbit", 1e3 / 8.0),
    ("Mbit", 1e6 / 8.0),
    ("Gbit", 1e9 / 8.0),
];

/// Splits `1.5 MiB` into the number and the unit; the number is digits with at most one '.'.
fn split_number(s: &str) -> Result<(f64, &str), String> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let ok = !num.is_empty()
        && num.bytes().filter(|&b| b == b'.').count() <= 1
        && !num.starts_with('.')
        && !num.ends_with('.');
    let n: f64 = if ok { num.parse().ok() } else { None }
        .ok_or_else(|| format!("expected a number with a unit (such as \"100MiB\"), got {s:?}"))?;
    Ok((n, unit.trim_start()))
}

fn scaled(n: f64, factor: f64, s: &str) -> Result<u64, String> {
    let v = (n * factor).round();
    if !(v.is_finite() && v >= 1.0 && v <= u64::MAX as f64) {
        return Err(format!("{s:?} is out of range (at least 1 byte)"));
    }
    Ok(v as u64)
}

/// A byte count: a number and one of B, KiB, MiB, GiB, TiB, kB, MB, GB, TB (`100MiB`, `1.5 GB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (n, unit) = split_number(s)?;
    match SIZE_UNITS.iter().find(|(u, _)| *u == unit) {
        Some((_, f)) => scaled(n, *f, s),
        None => Err(format!(
            "unknown size unit in {s:?} (use B, KiB, MiB, GiB, TiB, kB, MB, GB or TB)"
        )),
    }
}

/// A rate in bytes per second: a size per second (`2MiB/s`, `500kB/s`) or bits per second (`100Mbit/s`).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let (n, unit) = split_number(s)?;
    let Some(per) = unit.strip_suffix("/s") else {
        return Err(format!(
            "a rate ends in /s (such as \"2MiB/s\" or \"100Mbit/s\"), got {s:?}"
        ));
    };
    let per = per.trim_end();
    let factor = SIZE_UNITS
        .iter()
        .chain(BIT_UNITS.iter())
        .find(|(u, _)| *u == per)
        .map(|(_, f)| *f)
        .ok_or_else(|| {
            format!("unknown rate unit in {s:?} (use B/s, KiB/s, MiB/s, GiB/s, kB/s, MB/s, GB/s, kbit/s, Mbit/s or Gbit/s)")
        })?;
    scaled(n, factor, s)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100MiB").unwrap(), 100 * 1024 * 1024);
        assert_eq!(parse_size("1 KiB").unwrap(), 1024);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("7B").unwrap(), 7);
        assert_eq!(parse_size("2kB").unwrap(), 2000);
        for bad in [
            "", "MiB", "10", "10 mib", "1..5MB", ".5MB", "5.MB", "-1MB", "0B", "10XB", "1e3B",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("2MiB/s").unwrap(), 2 * 1024 * 1024);
        assert_eq!(parse_rate("512KiB/s").unwrap(), 512 * 1024);
        assert_eq!(parse_rate("100Mbit/s").unwrap(), 12_500_000);
        assert_eq!(parse_rate("8 bit/s").unwrap(), 1);
        assert_eq!(parse_rate("1 MB /s").unwrap(), 1_000_000);
        for bad in ["2MiB", "2/s", "2Mib/s", "x/s", "0B/s", "1bit/s"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
    }
}
