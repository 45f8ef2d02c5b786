//! Host names as rules compare them: ASCII case folded, one trailing dot removed, and only names that are valid
//! host names at all (RFC 1123 §2.1 letters, digits and hyphens; labels of 1..=63 bytes; at most 253 bytes). A name
//! that is not valid is refused outright rather than matched loosely, so `Blocked.Test.`, `blocked.test` and
//! `BLOCKED.TEST` are one name and `blocked..test` is none.

/// Longest host name without the trailing dot (RFC 1035 §2.3.4: 255 octets on the wire).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label (RFC 1035 §2.3.4).
const MAX_LABEL_LEN: usize = 63;

/// Why a name is not a valid host name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    /// Nothing left after removing the trailing dot.
    Empty,
    /// Longer than 253 bytes.
    TooLong,
    /// Two dots in a row, a leading dot, or a second trailing dot.
    EmptyLabel,
    /// A label over 63 bytes.
    LabelTooLong,
    /// A byte that is not a letter, digit, hyphen or dot.
    BadByte,
}

impl std::fmt::Display for NameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NameError::Empty => "empty name",
            NameError::TooLong => "name longer than 253 bytes",
            NameError::EmptyLabel => "empty label (two dots in a row, or a leading dot)",
            NameError::LabelTooLong => "label longer than 63 bytes",
            NameError::BadByte => "byte outside letters, digits, '-' and '.'",
        })
    }
}

/// The normalised form of `name` (lower case, without one trailing dot), or why it is not a host name.
pub fn normalize(name: &[u8]) -> Result<String, NameError> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    for label in name.split(|&b| b == b'.') {
        if label.is_empty() {
            return Err(NameError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(NameError::LabelTooLong);
        }
        if !label
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(NameError::BadByte);
        }
    }
    // Only ASCII is left, so this cannot fail; a fallback keeps it panic-free regardless.
    Ok(String::from_utf8_lossy(name).to_ascii_lowercase())
}

/// Every suffix of a normalised name that starts at a label boundary, longest first, excluding the name itself:
/// `a.b.c` gives `b.c`, then `c`.
pub fn parent_suffixes(name: &str) -> impl Iterator<Item = &str> {
    name.match_indices('.')
        .filter_map(move |(i, _)| name.get(i + 1..))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn normalises() {
        assert_eq!(normalize(b"Blocked.TEST.").unwrap(), "blocked.test");
        assert_eq!(normalize(b"a-b.c0").unwrap(), "a-b.c0");
        assert_eq!(normalize(b"localhost").unwrap(), "localhost");
        assert_eq!(normalize(&[b'a'; 63]).unwrap().len(), 63);
    }

    #[test]
    fn refuses() {
        assert_eq!(normalize(b""), Err(NameError::Empty));
        assert_eq!(normalize(b"."), Err(NameError::Empty));
        assert_eq!(normalize(b"a..b"), Err(NameError::EmptyLabel));
        assert_eq!(normalize(b".a"), Err(NameError::EmptyLabel));
        assert_eq!(normalize(b"a.."), Err(NameError::EmptyLabel));
        assert_eq!(normalize(b"a_b.test"), Err(NameError::BadByte));
        assert_eq!(normalize(b"a b"), Err(NameError::BadByte));
        assert_eq!(normalize("bücher.test".as_bytes()), Err(NameError::BadByte));
        assert_eq!(normalize(&[b'a'; 64]), Err(NameError::LabelTooLong));
        let long = ["abcdefghi"; 26].join(".");
        assert!(long.len() > MAX_NAME_LEN);
        assert_eq!(normalize(long.as_bytes()), Err(NameError::TooLong));
        // 253 bytes plus the trailing dot is fine.
        let max = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "b".repeat(61));
        assert_eq!(max.len(), 253);
        assert!(normalize(format!("{max}.").as_bytes()).is_ok());
    }

    #[test]
    fn suffixes() {
        let s: Vec<_> = parent_suffixes("a.b.c").collect();
        assert_eq!(s, vec!["b.c", "c"]);
        assert_eq!(parent_suffixes("c").count(), 0);
    }
}
