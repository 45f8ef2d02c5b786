//! Reading header fields: OWS, lists, tokens, and the framing-relevant fields of a head (RFC 9110 §5, §8.6).

use super::MAX_HEADERS;
use crate::proto::ProtoError;

/// The part of `buf` a head may occupy: at most `max_head` bytes.
pub(super) fn head_window(buf: &[u8], max_head: usize) -> &[u8] {
    // Parsing at most max_head bytes also covers "complete but too long": that head is Partial in the window.
    buf.get(..max_head).unwrap_or(buf)
}

/// The length of a complete head from httparse's answer on [`head_window`]: `None` while more bytes may
/// complete it, `HeadTooLarge` once `max_head` bytes hold no complete head, `Malformed` on bad syntax.
pub(super) fn complete_head(
    parsed: httparse::Result<usize>,
    buf: &[u8],
    max_head: usize,
) -> Result<Option<usize>, ProtoError> {
    match parsed {
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) if buf.len() >= max_head => Err(ProtoError::HeadTooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(ProtoError::Malformed),
    }
}

/// `Some(true)` for the connection option "close", `Some(false)` for "keep-alive" (RFC 9112 §9.3, §C.2.2),
/// `None` for any other.
fn persistence_option(opt: &[u8]) -> Option<bool> {
    if opt.eq_ignore_ascii_case(b"close") {
        Some(true)
    } else if opt.eq_ignore_ascii_case(b"keep-alive") {
        Some(false)
    } else {
        None
    }
}

/// Fields never forwarded in either direction (RFC 9110 §7.6.1 hop-by-hop); requests drop a few more.
pub(super) fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// Trims optional whitespace (RFC 9110 §5.6.3: OWS is SP / HTAB).
pub(super) fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// The elements of a comma-separated list field (RFC 9110 §5.6.1), trimmed; empty elements are kept so callers
/// can decide whether to tolerate them.
fn list_items(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(trim_ows)
}

/// RFC 9110 §5.6.2 tchar.
pub(super) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A decimal number of at most u64 range (Content-Length = 1*DIGIT, RFC 9110 §8.6).
pub(super) fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

pub(super) fn name_is(h: &httparse::Header<'_>, name: &str) -> bool {
    h.name.eq_ignore_ascii_case(name)
}

/// Transfer-Encoding as a whole (RFC 9112 §6.1): all field lines form one list.
#[derive(Default)]
pub(super) struct TransferCoding {
    pub(super) present: bool,
    pub(super) codings: usize,
    pub(super) chunked: usize,
    pub(super) last_is_chunked: bool,
}

impl TransferCoding {
    /// Chunked applied exactly once and last: the only request framing we can delimit (RFC 9112 §6.3 item 4).
    pub(super) fn chunked_final(&self) -> bool {
        self.codings > 0 && self.chunked == 1 && self.last_is_chunked
    }
}

/// What the header section says, gathered in one pass.
pub(super) struct Fields {
    pub(super) host_count: usize,
    pub(super) cl_present: bool,
    pub(super) content_length: Result<Option<u64>, ProtoError>,
    pub(super) te: TransferCoding,
    /// "close" / "keep-alive" connection options (RFC 9112 §9.3, §C.2.2).
    pub(super) conn_close: bool,
    pub(super) conn_keep_alive: bool,
    /// The same options in the non-standard Proxy-Connection (sent by some HTTP/1.0 clients to proxies).
    pub(super) proxy_close: bool,
    pub(super) proxy_keep_alive: bool,
    /// Field i is named as a connection option and is therefore hop-by-hop (RFC 9110 §7.6.1).
    pub(super) listed: [bool; MAX_HEADERS],
    pub(super) auth_count: usize,
    pub(super) auth_value: Option<usize>,
}

pub(super) fn analyze(headers: &[httparse::Header<'_>]) -> Fields {
    let mut f = Fields {
        host_count: 0,
        cl_present: false,
        content_length: Ok(None),
        te: TransferCoding::default(),
        conn_close: false,
        conn_keep_alive: false,
        proxy_close: false,
        proxy_keep_alive: false,
        listed: [false; MAX_HEADERS],
        auth_count: 0,
        auth_value: None,
    };
    for (i, h) in headers.iter().enumerate() {
        if name_is(h, "host") {
            f.host_count = f.host_count.saturating_add(1);
        } else if name_is(h, "content-length") {
            f.cl_present = true;
            f.content_length = merge_content_length(f.content_length, h.value);
        } else if name_is(h, "transfer-encoding") {
            f.te.present = true;
            for item in list_items(h.value).filter(|i| !i.is_empty()) {
                f.te.codings = f.te.codings.saturating_add(1);
                let name = trim_ows(item.split(|&b| b == b';').next().unwrap_or(item));
                if name.eq_ignore_ascii_case(b"chunked") {
                    f.te.chunked = f.te.chunked.saturating_add(1);
                    // "chunked;x=y" has no defined parameters; treat it as not chunked so it is rejected.
                    f.te.last_is_chunked = item.eq_ignore_ascii_case(b"chunked");
                } else {
                    f.te.last_is_chunked = false;
                }
            }
        } else if name_is(h, "connection") {
            for opt in list_items(h.value) {
                if let Some(close) = persistence_option(opt) {
                    f.conn_close |= close;
                    f.conn_keep_alive |= !close;
                } else if opt.is_empty()
                    || opt.eq_ignore_ascii_case(b"content-length")
                    || opt.eq_ignore_ascii_case(b"transfer-encoding")
                {
                    // Never let "Connection: Content-Length" strip a framing field: we would delimit the body by
                    // it while the next hop could not, which is exactly a smuggling desync (RFC 9112 §11.2).
                } else {
                    for (j, other) in headers.iter().enumerate() {
                        if other.name.len() == opt.len()
                            && other.name.as_bytes().eq_ignore_ascii_case(opt)
                        {
                            if let Some(slot) = f.listed.get_mut(j) {
                                *slot = true;
                            }
                        }
                    }
                }
            }
        } else if name_is(h, "proxy-connection") {
            for close in list_items(h.value).filter_map(persistence_option) {
                f.proxy_close |= close;
                f.proxy_keep_alive |= !close;
            }
        } else if name_is(h, "proxy-authorization") {
            f.auth_count = f.auth_count.saturating_add(1);
            f.auth_value = Some(i);
        }
    }
    f
}

/// Folds one Content-Length field line into the value so far: every element of every line must be a valid number
/// and all must agree (RFC 9112 §6.3 item 5, RFC 9110 §8.6); a disagreement is a smuggling attempt.
fn merge_content_length(
    so_far: Result<Option<u64>, ProtoError>,
    value: &[u8],
) -> Result<Option<u64>, ProtoError> {
    let mut current = so_far?;
    for item in list_items(value) {
        let n = parse_decimal(item).ok_or(ProtoError::Malformed)?;
        match current {
            Some(prev) if prev != n => return Err(ProtoError::Smuggling),
            _ => current = Some(n),
        }
    }
    Ok(current)
}
