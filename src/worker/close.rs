//! Why a session (or an HTTP request) ended: one enum with its access-log label, whether it is passed on as a
//! reset, who is at fault (which sets the level of the diagnostic line), and, for the reasons that are answered on
//! the wire, the failure code and the words an HTTP client is shown.

use crate::proto::Failure;

/// Who made a session end (pingora's `ErrorSource`, with the chained proxy told apart from the target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nobody: the session ended the way it should.
    Nobody,
    /// The client (downstream).
    Client,
    /// The target or origin the client asked for.
    Target,
    /// The chained `--upstream` proxy.
    Upstream,
    /// socksgate itself: resources, shutdown, an internal error.
    Us,
}

impl Fault {
    /// The level of the diagnostic line written when a session ends for a reason with this fault. Peers misbehave
    /// all the time (debug); a broken chained proxy or our own trouble is something an operator must see.
    pub fn level(self) -> log::Level {
        match self {
            Fault::Nobody => log::Level::Trace,
            Fault::Client | Fault::Target => log::Level::Debug,
            Fault::Upstream | Fault::Us => log::Level::Warn,
        }
    }

    /// A short word for logs.
    pub fn label(self) -> &'static str {
        match self {
            Fault::Nobody => "nobody",
            Fault::Client => "client",
            Fault::Target => "target",
            Fault::Upstream => "upstream proxy",
            Fault::Us => "proxy",
        }
    }
}

/// Which socket to reset (SO_LINGER 0) when the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetSide {
    /// The client socket: the outbound side was reset.
    Client,
    /// The outbound socket: the client reset.
    Outbound,
}

/// Why a session or request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides finished normally (EOF both ways, a complete HTTP exchange, an answered request).
    Done,
    /// The client closed before its handshake or request head was complete.
    ClientEof,
    /// Reading from the client failed (typically a reset).
    ClientReset,
    /// Writing to the client failed.
    ClientError,
    /// The outbound side (target, origin or chained proxy) reset the tunnel.
    UpstreamReset,
    /// The handshake (or HTTP request head) did not complete before `--handshake-timeout`.
    HandshakeTimeout,
    /// No bytes either way for `--idle-timeout`.
    IdleTimeout,
    /// A SOCKS message the parser rejected.
    Malformed,
    /// A handshake message larger than any valid one.
    OversizedMessage,
    /// A PROXY protocol header the parser rejected.
    BadProxyHeader,
    /// The client rules refused the PROXY header's address.
    ClientNotAllowed,
    /// The first byte names no enabled protocol.
    UnknownProtocol,
    /// A clear-text client under `--tls-only`.
    TlsRequired,
    /// The client's TLS was broken: garbage or truncated records, a failed handshake (an alert was sent).
    TlsError,
    /// The client presented no certificate, or one that did not verify, under `--tls-client-ca`.
    TlsClientCert,
    /// SOCKS5: no acceptable method, or RFC 1929 credentials that did not verify.
    AuthFailed,
    /// SOCKS4 with users configured (SOCKS4 carries no password).
    Socks4NeedsAuth,
    /// HTTP: `407`, no or wrong proxy credentials.
    AuthRequired,
    /// The user is at `--user-max-connections`.
    UserLimit,
    /// The user's traffic quota is used up (`quota` of the policy file): refused, or cut off while running.
    Quota,
    /// The destination rules refused every address of the target.
    DestDenied,
    /// An unparsable HTTP request head (`400`).
    BadRequest,
    /// An HTTP request head over `--max-header-size` (`431`).
    HeaderTooLarge,
    /// The request body's framing is invalid.
    BadRequestBody,
    /// The client closed in the middle of a request body.
    ClientEofInBody,
    /// The origin sent an unparsable response head.
    BadResponse,
    /// The origin's response head is too large.
    ResponseHeadTooLarge,
    /// The origin's response body framing is invalid.
    BadResponseBody,
    /// The origin closed before its response was complete.
    OriginClosed,
    /// The origin reset before its response was complete.
    OriginReset,
    /// The target's name does not resolve.
    Unresolved,
    /// Connecting failed (or the command or address type is not supported), with the failure answered.
    Failed(Failure),
    /// The chained proxy could not be reached, broke its protocol or refused our credentials.
    UpstreamProxy(Failure),
    /// The UDP association's control connection closed.
    UdpControlClosed,
    /// No datagrams for `--udp-idle-timeout`.
    UdpIdleTimeout,
    /// Closed by a drain (SIGTERM) because it was not in an established session.
    Draining,
    /// Still open at the drain deadline.
    DrainTimeout,
    /// The worker stopped.
    Shutdown,
    /// A reload removed the session's user or changed her password (`--policy`).
    Revoked,
    /// A resource or internal step failed (pool gone, registration failed).
    Internal,
}

impl CloseReason {
    /// The `end=` label of the access log.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Done => "done",
            CloseReason::ClientEof => "client_eof",
            CloseReason::ClientReset => "client_reset",
            CloseReason::ClientError => "client_error",
            CloseReason::UpstreamReset => "upstream_reset",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Malformed => "malformed",
            CloseReason::OversizedMessage => "oversized_message",
            CloseReason::BadProxyHeader => "bad_proxy_header",
            CloseReason::ClientNotAllowed => "client_not_allowed",
            CloseReason::UnknownProtocol => "unknown_protocol",
            CloseReason::TlsRequired => "tls_required",
            CloseReason::TlsError => "tls_error",
            CloseReason::TlsClientCert => "tls_client_cert",
            CloseReason::AuthFailed => "auth_failed",
            CloseReason::Socks4NeedsAuth => "socks4_needs_auth",
            CloseReason::AuthRequired => "auth_required",
            CloseReason::UserLimit => "user_limit",
            CloseReason::Quota => "quota",
            CloseReason::DestDenied => "not_allowed",
            CloseReason::BadRequest => "bad_request",
            CloseReason::HeaderTooLarge => "header_too_large",
            CloseReason::BadRequestBody => "bad_request_body",
            CloseReason::ClientEofInBody => "client_eof_in_body",
            CloseReason::BadResponse => "bad_response",
            CloseReason::ResponseHeadTooLarge => "response_head_too_large",
            CloseReason::BadResponseBody => "bad_response_body",
            CloseReason::OriginClosed => "origin_closed",
            CloseReason::OriginReset => "origin_reset",
            CloseReason::Unresolved => "name_not_resolved",
            CloseReason::Failed(f) => f.label(),
            CloseReason::UpstreamProxy(_) => "upstream_proxy_error",
            CloseReason::UdpControlClosed => "udp_control_closed",
            CloseReason::UdpIdleTimeout => "udp_idle_timeout",
            CloseReason::Draining => "draining",
            CloseReason::DrainTimeout => "drain_timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Revoked => "revoked",
            CloseReason::Internal => "internal_error",
        }
    }

    /// Who is at fault.
    pub fn fault(self) -> Fault {
        match self {
            CloseReason::Done
            | CloseReason::UdpControlClosed
            | CloseReason::IdleTimeout
            | CloseReason::UdpIdleTimeout
            | CloseReason::Draining
            | CloseReason::DrainTimeout
            | CloseReason::Shutdown
            | CloseReason::Quota
            | CloseReason::Revoked => Fault::Nobody,
            CloseReason::ClientEof
            | CloseReason::ClientReset
            | CloseReason::ClientError
            | CloseReason::HandshakeTimeout
            | CloseReason::Malformed
            | CloseReason::OversizedMessage
            | CloseReason::BadProxyHeader
            | CloseReason::ClientNotAllowed
            | CloseReason::UnknownProtocol
            | CloseReason::TlsRequired
            | CloseReason::TlsError
            | CloseReason::TlsClientCert
            | CloseReason::AuthFailed
            | CloseReason::Socks4NeedsAuth
            | CloseReason::AuthRequired
            | CloseReason::UserLimit
            | CloseReason::DestDenied
            | CloseReason::BadRequest
            | CloseReason::HeaderTooLarge
            | CloseReason::BadRequestBody
            | CloseReason::ClientEofInBody => Fault::Client,
            CloseReason::UpstreamReset
            | CloseReason::BadResponse
            | CloseReason::ResponseHeadTooLarge
            | CloseReason::BadResponseBody
            | CloseReason::OriginClosed
            | CloseReason::OriginReset
            | CloseReason::Unresolved => Fault::Target,
            CloseReason::Failed(f) => match f {
                Failure::CommandNotSupported
                | Failure::AddressNotSupported
                | Failure::NotAllowed => Fault::Client,
                Failure::General
                | Failure::NetworkUnreachable
                | Failure::HostUnreachable
                | Failure::ConnectionRefused
                | Failure::TimedOut => Fault::Target,
            },
            CloseReason::UpstreamProxy(_) => Fault::Upstream,
            CloseReason::Internal => Fault::Us,
        }
    }

    /// Which socket is reset on close: a reset is passed on as a reset, not a clean EOF, so a peer that frames its
    /// data by EOF does not mistake a cut-off stream for a complete one.
    pub fn reset(self) -> Option<ResetSide> {
        match self {
            CloseReason::UpstreamReset => Some(ResetSide::Client),
            CloseReason::ClientReset => Some(ResetSide::Outbound),
            _ => None,
        }
    }

    /// The failure answered on the wire (SOCKS reply code, and the HTTP status where no better one exists).
    pub fn failure(self) -> Failure {
        match self {
            CloseReason::Failed(f) | CloseReason::UpstreamProxy(f) => f,
            CloseReason::AuthFailed
            | CloseReason::Socks4NeedsAuth
            | CloseReason::AuthRequired
            | CloseReason::UserLimit
            | CloseReason::Quota
            | CloseReason::DestDenied
            | CloseReason::ClientNotAllowed => Failure::NotAllowed,
            CloseReason::Unresolved => Failure::HostUnreachable,
            _ => Failure::General,
        }
    }

    /// The HTTP status this reason is answered with.
    pub fn http_status(self) -> u16 {
        match self {
            CloseReason::BadRequest | CloseReason::BadRequestBody => 400,
            CloseReason::HeaderTooLarge => 431,
            CloseReason::AuthRequired => 407,
            CloseReason::HandshakeTimeout => 408,
            CloseReason::UpstreamProxy(Failure::TimedOut) => 504,
            CloseReason::UpstreamProxy(_) => 502,
            other => other.failure().http_status(),
        }
    }

    /// What an HTTP client is told in the body of an error response, in words a person understands.
    pub fn describe(self) -> &'static str {
        match self {
            CloseReason::Unresolved => "the host name does not resolve",
            CloseReason::Failed(Failure::ConnectionRefused) => "the server refused the connection",
            CloseReason::Failed(Failure::HostUnreachable) => "no route to the host",
            CloseReason::Failed(Failure::NetworkUnreachable) => "the network is unreachable",
            CloseReason::Failed(Failure::TimedOut) => "the server did not answer in time",
            CloseReason::Failed(Failure::NotAllowed) | CloseReason::DestDenied => {
                "access to that destination is not allowed through this proxy"
            }
            CloseReason::Failed(Failure::CommandNotSupported) => "not supported by this proxy",
            CloseReason::Failed(Failure::AddressNotSupported) => "unsupported address type",
            CloseReason::Failed(Failure::General) => "the connection to the server failed",
            CloseReason::UpstreamProxy(Failure::NotAllowed) => {
                "the next proxy in the chain refused this proxy's credentials"
            }
            CloseReason::UpstreamProxy(Failure::TimedOut) => {
                "the next proxy in the chain did not answer in time"
            }
            CloseReason::UpstreamProxy(_) => "the next proxy in the chain failed",
            CloseReason::UserLimit => "too many connections for this user",
            CloseReason::Quota => "this user's traffic quota is used up",
            CloseReason::AuthRequired => "proxy authentication required",
            CloseReason::BadRequest | CloseReason::BadRequestBody => "the request is malformed",
            CloseReason::HeaderTooLarge => "the request head is too large",
            CloseReason::HandshakeTimeout => "the request head did not arrive in time",
            CloseReason::BadResponse | CloseReason::BadResponseBody => {
                "the server sent an invalid response"
            }
            CloseReason::ResponseHeadTooLarge => "the server's response head is too large",
            CloseReason::OriginClosed => "the server closed the connection without a response",
            CloseReason::OriginReset => "the server reset the connection",
            _ => "the request could not be served",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_and_unresolved_read_differently() {
        let refused = CloseReason::Failed(Failure::ConnectionRefused);
        assert_eq!(refused.http_status(), 502);
        assert_eq!(CloseReason::Unresolved.http_status(), 502);
        assert_ne!(refused.describe(), CloseReason::Unresolved.describe());
        assert_eq!(CloseReason::Unresolved.failure().socks5_reply(), 0x04);
    }

    #[test]
    fn resets_pass_on_and_faults_pick_levels() {
        assert_eq!(CloseReason::UpstreamReset.reset(), Some(ResetSide::Client));
        assert_eq!(CloseReason::ClientReset.reset(), Some(ResetSide::Outbound));
        assert_eq!(CloseReason::Done.reset(), None);
        assert_eq!(CloseReason::Done.fault().level(), log::Level::Trace);
        assert_eq!(CloseReason::Internal.fault(), Fault::Us);
        assert_eq!(
            CloseReason::UpstreamProxy(Failure::General).fault(),
            Fault::Upstream
        );
        assert_eq!(CloseReason::HeaderTooLarge.http_status(), 431);
        assert_eq!(CloseReason::HandshakeTimeout.http_status(), 408);
    }
}
