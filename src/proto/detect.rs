//! First-byte protocol detection for a freshly accepted connection.
//!
//! One listener serves SOCKS5, SOCKS4/4a and HTTP proxy clients, so the first byte decides which parser gets the
//! connection: SOCKS5 starts with VER = 5 (RFC 1928 §3), SOCKS4 with VN = 4 (SOCKS4 protocol text, "CONNECT"), and
//! an HTTP request with a method token (RFC 9110 §9), which in practice is always ASCII letters (`CONNECT`, `GET`, ...).

/// The protocol a client speaks, guessed from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// RFC 1928: the first byte is VER = 0x05.
    Socks5,
    /// SOCKS4 / SOCKS4a: the first byte is VN = 0x04.
    Socks4,
    /// An HTTP/1.x request line: the first byte starts a method token.
    Http,
    /// Anything else (TLS ClientHello 0x16, SOCKS with another version, binary noise): close the connection.
    Unknown,
}

/// Classifies a connection by its first byte; one byte is enough because the three protocols never overlap there.
pub fn detect(first_byte: u8) -> Protocol {
    match first_byte {
        0x05 => Protocol::Socks5,
        0x04 => Protocol::Socks4,
        b if b.is_ascii_alphabetic() => Protocol::Http,
        _ => Protocol::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socks_versions() {
        assert_eq!(detect(0x05), Protocol::Socks5);
        assert_eq!(detect(0x04), Protocol::Socks4);
    }

    #[test]
    fn http_methods_start_with_letters() {
        for m in ["CONNECT", "GET", "POST", "HEAD", "options", "put"] {
            let first = m.as_bytes().first().copied().unwrap_or(0);
            assert_eq!(detect(first), Protocol::Http, "{m}");
        }
    }

    #[test]
    fn everything_else_is_unknown() {
        let mut counts = [0usize; 4];
        for b in 0..=255u8 {
            let p = detect(b);
            let i = match p {
                Protocol::Socks5 => 0,
                Protocol::Socks4 => 1,
                Protocol::Http => 2,
                Protocol::Unknown => 3,
            };
            if let Some(c) = counts.get_mut(i) {
                *c += 1;
            }
            if b != 4 && b != 5 && !b.is_ascii_alphabetic() {
                assert_eq!(p, Protocol::Unknown, "{b:#04x}");
            }
        }
        assert_eq!(counts, [1, 1, 52, 256 - 54]);
        // A TLS ClientHello (record type 0x16) and SOCKS with other versions are not ours.
        assert_eq!(detect(0x16), Protocol::Unknown);
        assert_eq!(detect(0x00), Protocol::Unknown);
        assert_eq!(detect(b' '), Protocol::Unknown);
        assert_eq!(detect(b'\r'), Protocol::Unknown);
    }
}
