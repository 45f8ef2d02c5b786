//! HTTP/1.x forward-proxy protocol layer (RFC 9110, RFC 9112), sans-IO.
//!
//! The event loop accumulates a client's bytes and calls [`parse_request`]. A CONNECT request opens a tunnel
//! (answered with [`CONNECT_ESTABLISHED`]); any other request is forwarded to the origin as a rewritten head followed
//! by the body bytes passed through verbatim, delimited by a [`BodyFramer`]. The origin's response head goes through
//! [`parse_response`] and its body through another [`BodyFramer`]. Bodies are never re-encoded, so framing decisions
//! here must match exactly what the next hop will conclude from the headers we forward: every ambiguity that could
//! let two parsers disagree about where a message ends (request smuggling, RFC 9112 §11.2) is rejected.
//!
//! Nothing here allocates except the caller's `out` vector, touches a socket or clock, or logs.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
#![deny(missing_docs)]

use std::fmt;

use super::TargetAddr;

mod body;
mod canned;
pub mod exchange;
mod fields;
mod request;
mod response;
mod rewrite;
mod target;
#[cfg(test)]
mod tests;

pub use body::BodyFramer;
pub use canned::{canned_response, error_response};
pub use exchange::Exchange;
pub use request::parse_request;
pub use response::parse_response;

/// Most header fields accepted in one head; more is a 400 (httparse's fixed array).
pub const MAX_HEADERS: usize = 128;

/// Default cap on the size of a request or response head in bytes.
pub const DEFAULT_MAX_HEAD: usize = 64 * 1024;

/// Largest response [`canned_response`] can produce; a buffer this big always suffices.
pub const MAX_CANNED_LEN: usize = 512;

/// Reply to a successful CONNECT (RFC 9110 §9.3.6: a 2xx to CONNECT carries no Content-Length/Transfer-Encoding).
pub const CONNECT_ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// Cap on a chunk-size line including extensions (RFC 9112 §7.1.1 lets recipients limit extensions).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Cap on the whole trailer section (RFC 9112 §7.1.2).
const MAX_TRAILERS: usize = 16 * 1024;
/// 16 hex digits fill a u64 exactly, so with this cap the size cannot overflow (RFC 9112 §7.1 asks us to guard it).
const MAX_HEX_DIGITS: u8 = 16;
/// Inline storage for decoded Basic credentials ("user:pass").
const CRED_CAP: usize = 768;

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body at all.
    None,
    /// Exactly this many bytes (never 0: that is reported as `None`).
    Length(u64),
    /// The chunked transfer coding, up to and including the trailer section's final CRLF.
    Chunked,
    /// Everything until the sender closes the connection (responses only).
    UntilClose,
}

/// Decoded `Proxy-Authorization: Basic` credentials (RFC 7617), stored inline without allocation.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicCredentials {
    /// "user:pass" as decoded; bytes past `user_len + 1 + pass_len` are always zero so derived equality holds.
    buf: [u8; CRED_CAP],
    user_len: u16,
    pass_len: u16,
}

impl BasicCredentials {
    /// Builds credentials from parts (e.g. configured users); `None` if the user contains ':' or they do not fit.
    pub fn new(user: &[u8], pass: &[u8]) -> Option<BasicCredentials> {
        // RFC 7617 §2: the user-id cannot contain a colon, the password can.
        if user.contains(&b':') {
            return None;
        }
        let total = user.len().checked_add(1)?.checked_add(pass.len())?;
        let mut buf = [0u8; CRED_CAP];
        buf.get_mut(..user.len())?.copy_from_slice(user);
        *buf.get_mut(user.len())? = b':';
        buf.get_mut(user.len().checked_add(1)?..total)?
            .copy_from_slice(pass);
        Some(BasicCredentials {
            buf,
            user_len: u16::try_from(user.len()).ok()?,
            pass_len: u16::try_from(pass.len()).ok()?,
        })
    }

    /// The user-id.
    pub fn user(&self) -> &[u8] {
        self.buf.get(..usize::from(self.user_len)).unwrap_or(&[])
    }

    /// The password.
    pub fn pass(&self) -> &[u8] {
        let start = usize::from(self.user_len).saturating_add(1);
        let end = start.saturating_add(usize::from(self.pass_len));
        self.buf.get(start..end).unwrap_or(&[])
    }
}

// Hand-written so that a `{:?}` of a Request in a log line never prints a password.
impl fmt::Debug for BasicCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BasicCredentials")
            .field("user", &String::from_utf8_lossy(self.user()))
            .field("pass", &"<redacted>")
            .finish()
    }
}

/// What a client asked the proxy to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Open a tunnel (RFC 9110 §9.3.6).
    Connect,
    /// Forward a request to an origin (absolute-form target, RFC 9112 §3.2.2).
    Forward,
}

/// A parsed client request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// CONNECT or forward.
    pub kind: RequestKind,
    /// Where to connect: the CONNECT authority, or the host and port of the absolute URI (default 80).
    pub target: TargetAddr,
    /// The method is HEAD, so the response has no body.
    pub is_head: bool,
    /// The client's HTTP minor version (0 or 1).
    pub minor_version: u8,
    /// How the request body is delimited.
    pub body: BodyKind,
    /// The client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    /// Credentials from a decodable `Proxy-Authorization: Basic` header.
    pub credentials: Option<BasicCredentials>,
    /// A Proxy-Authorization header was present (even if it could not be decoded).
    pub auth_present: bool,
    /// Bytes of the head, including any leading empty lines; the body (or the next request) starts here.
    pub head_len: usize,
}

/// Knobs for rewriting forwarded request heads.
#[derive(Debug, Clone, Copy, Default)]
pub struct RewriteOptions<'a> {
    /// Pseudonym for the Via header (RFC 9110 §7.6.3); `None` sends no Via.
    pub via: Option<&'a str>,
}

/// What [`parse_response`] needs to know about the request being answered.
#[derive(Debug, Clone, Copy)]
pub struct ResponseContext<'a> {
    /// The request was HEAD, so the response has no body (RFC 9112 §6.3).
    pub request_is_head: bool,
    /// The client asked to keep its connection.
    pub client_keep_alive: bool,
    /// The client's HTTP minor version (0 or 1).
    pub client_minor_version: u8,
    /// Pseudonym for the Via header; `None` sends no Via.
    pub via: Option<&'a str>,
}

/// A parsed origin response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code (100..=599).
    pub status: u16,
    /// How the response body is delimited.
    pub body: BodyKind,
    /// A 1xx other than 101: the final response head follows.
    pub interim: bool,
    /// The client connection stays open after this response.
    pub keep_client: bool,
    /// The origin connection can be reused after this response.
    pub keep_origin: bool,
    /// Bytes of the head, including any leading empty lines.
    pub head_len: usize,
}
