//! Writing the rewritten head: header lines, Via (RFC 9110 §7.6.3), the normalized Content-Length.

use std::fmt;
use std::fmt::Write as _;

use super::fields::is_tchar;

pub(super) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends "Via: 1.x pseudonym" (RFC 9110 §7.6.3: received-protocol is the version of the message as received).
/// A pseudonym that is not a plain token or host[:port] is ignored rather than allowed to inject header lines.
pub(super) fn put_via(out: &mut Vec<u8>, via: Option<&str>, minor: u8) {
    let Some(name) = via else { return };
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| is_tchar(b) || b == b':' || b == b'[' || b == b']');
    if ok {
        out.extend_from_slice(if minor == 0 {
            b"Via: 1.0 "
        } else {
            b"Via: 1.1 "
        });
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Writes the normalized Content-Length in place of the first received line and drops the others: a list of
/// identical values is legal (RFC 9110 §8.6) but not every next hop parses it the same way.
pub(super) fn put_content_length(out: &mut Vec<u8>, n: u64, written: &mut bool) {
    if !*written {
        *written = true;
        let _ = write!(VecWriter(out), "Content-Length: {n}\r\n");
    }
}

/// `fmt::Write` adapter for the output vector.
pub(super) struct VecWriter<'a>(pub(super) &'a mut Vec<u8>);

impl fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}
