//! TLS under the client socket: the switch at the first byte, the handshake's outcome (metrics, SNI, the
//! client-certificate user), and the close. The phases above read and write plaintext through `Sock` and never
//! see TLS.

use std::sync::Arc;

use log::debug;
use rustls::pki_types::ServerName;

use super::close::CloseReason;
use super::conn::Conn;
use super::ctx::{Ctx, Next};
use super::sock::Sock;
use crate::auth::Authorized;
use crate::metrics::{self, Refusal, Stats, TlsOutcome};
use crate::tls::{TlsFailure, TlsSession};
use crate::upstream::Upstream;

/// The first byte of a TLS handshake record (RFC 8446 §5.1, content type 22); no SOCKS version or HTTP method
/// starts with it.
pub const HANDSHAKE_RECORD: u8 = 0x16;

/// Called in the detect phase of a clear-text socket: turns TLS on when the client starts with a handshake
/// record, refuses clear text under `--tls-only`, and otherwise lets detection go on (`None`).
pub fn detect(conn: &mut Conn, ctx: &mut Ctx, first: u8) -> Option<Next> {
    let acceptor = ctx.cfg.tls.as_ref()?;
    if first != HANDSHAKE_RECORD {
        if !ctx.cfg.tls_only {
            return None;
        }
        metrics::inc(&ctx.stats.refused[Refusal::TlsRequired as usize]);
        debug!("{}: refused: clear text under --tls-only", conn.peer);
        return Some(Next::Close(CloseReason::TlsRequired));
    }
    let session = match acceptor.session() {
        Ok(s) => s,
        Err(e) => {
            debug!("{}: TLS session: {e}", conn.peer);
            return Some(Next::Close(CloseReason::TlsError));
        }
    };
    // What was read so far is the start of the ClientHello: it goes to rustls, and the buffer starts over for
    // the plaintext inside.
    let prefix = conn.c2u.as_ref().map(|b| b.data()).unwrap_or(&[]);
    let started = conn.client.start_tls(session, prefix);
    if let Some(b) = conn.c2u.as_mut() {
        let n = b.data().len();
        b.consume(n);
    }
    Some(match started {
        Ok(()) => Next::Again,
        Err(e) => {
            debug!("{}: TLS: {e}", conn.peer);
            Next::Close(failure(conn).unwrap_or(CloseReason::TlsError))
        }
    })
}

/// After a read: when the handshake has just completed, count it and take the client certificate's identity as
/// the session's user. `Some` only when the connection must close.
pub fn on_established(conn: &mut Conn, ctx: &mut Ctx) -> Option<Next> {
    let est = conn.client.tls.as_mut()?.take_established()?;
    ctx.stats.tls_handshake(TlsOutcome::Ok, Some(est.version));
    debug!(
        "{}: TLS {} established, SNI {}, ALPN {}, client certificate {}",
        conn.peer,
        est.version.label(),
        est.sni.as_deref().unwrap_or("-"),
        if est.alpn { "http/1.1" } else { "-" },
        est.identity.as_ref().map(|i| i.name()).unwrap_or("-")
    );
    if let Some(id) = est.identity {
        conn.user = Some(Authorized::from_certificate(&id));
    }
    None
}

/// Right after the TCP connect to an `https://` or `socks5s://` upstream (the `--upstream` flag's or a group
/// member, with the client configuration that goes with it): TLS under the outbound socket, so the upstream
/// handshake that follows (and the relay) run inside it. The ClientHello goes out now; the first handshake bytes
/// written are held by rustls until the TLS handshake completes. False: it could not start.
pub fn start_upstream(
    sock: &mut Sock,
    peer: std::net::SocketAddr,
    upstream: &Upstream,
    cfg: Option<&Arc<rustls::ClientConfig>>,
) -> bool {
    if !upstream.tls {
        return true;
    }
    // A TLS server without a configuration cannot happen (the flags and the policy load make one); refusing is
    // better than speaking clear text to it.
    let Some(cfg) = cfg else {
        return false;
    };
    // The name checked against the certificate is the host as configured: a DNS name, or an IP address (an IP
    // SAN), since group members are given by address.
    let session = ServerName::try_from(upstream.host.clone())
        .map_err(|e| e.to_string())
        .and_then(|name| TlsSession::client(Arc::clone(cfg), name).map_err(|e| e.to_string()))
        .and_then(|session| sock.start_tls(session, &[]).map_err(|e| e.to_string()));
    match session {
        Ok(()) => true,
        Err(e) => {
            debug!("{peer}: upstream {}: TLS: {e}", upstream.host);
            false
        }
    }
}

/// True when a verified client certificate authenticated this connection (no password is asked for then).
pub fn cert_user(conn: &Conn) -> bool {
    conn.client
        .tls
        .as_ref()
        .is_some_and(|t| t.identity().is_some())
}

/// The close reason for a TLS failure on the client socket, if that is what happened.
pub fn failure(conn: &Conn) -> Option<CloseReason> {
    conn.client
        .tls
        .as_ref()
        .and_then(|t| t.failure())
        .map(|f| match f {
            TlsFailure::ClientCert => CloseReason::TlsClientCert,
            TlsFailure::UpstreamCert | TlsFailure::Protocol => CloseReason::TlsError,
        })
}

/// The access log's `tls=` value.
pub fn log_label(conn: &Conn) -> &'static str {
    conn.client
        .tls
        .as_ref()
        .and_then(|t| t.version())
        .map(|v| v.label())
        .unwrap_or("-")
}

/// At close: count a client handshake that never completed, and end TLS sessions with a close_notify unless a
/// reset is being passed on or TLS itself failed.
pub fn on_close(conn: &mut Conn, reason: CloseReason, stats: &Stats) {
    let reset = reason.reset().is_some();
    if let Some(t) = conn.client.tls.as_ref() {
        if t.is_handshaking() {
            let outcome = match t.failure() {
                Some(TlsFailure::ClientCert) => TlsOutcome::ClientCert,
                Some(_) => TlsOutcome::Error,
                None if reason == CloseReason::HandshakeTimeout => TlsOutcome::Timeout,
                None => TlsOutcome::Aborted,
            };
            stats.tls_handshake(outcome, t.version());
        }
        let graceful = !reset && t.failure().is_none();
        conn.client.close_tls(graceful);
    }
    if let Some(up) = conn.outbound_mut() {
        let failed = up.tls.as_ref().is_some_and(|t| t.failure().is_some());
        up.close_tls(!reset && !failed);
    }
}
