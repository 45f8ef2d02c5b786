//! Server-side sequencing of the SOCKS handshakes, sans-IO: which message comes next, what to answer, and when the
//! handshake is over. The per-message parsers and encoders live in [`super::socks5`] and [`super::socks4`]; here
//! they are put in order (RFC 1928 §3-§4, RFC 1929 §2, the SOCKS4/4a texts).
//!
//! A machine is driven by `step(input, out)`: `input` is everything the client sent that is not yet consumed,
//! `out` is where the reply bytes go. Each call handles at most one message and returns a [`Step`]: how many
//! input bytes it used, how many output bytes it wrote (to be sent in order, however slowly the socket drains
//! them) and an event. The caller keeps the sockets, the timers and the users table: password checks can be slow
//! (hashes) and go wherever the caller likes, and the answer comes back through
//! [`Socks5Server::auth_result`]. Policy is a pure function of configuration ([`choose_method`],
//! [`password_required`], [`socks4_allowed`]), so it can be tested without a socket. The worker
//! (`worker/handshake.rs`) drives these machines; the machines are `Copy`, a few bytes each, so the worker's
//! connection phase holds one by value.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use super::socks5::{self, Credentials, Greeting};
use super::{socks4, Failure, Parse, ProtoError};

/// Largest output of one step of either machine: a SOCKS5 reply (a method choice, an RFC 1929 status and a
/// SOCKS4 reply are shorter).
pub const MAX_STEP_OUTPUT: usize = socks5::MAX_REPLY_LEN;

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step<E> {
    /// Input bytes used; the caller drops them before the next step.
    pub consumed: usize,
    /// Bytes written to the start of `out`, to be sent to the client before anything later.
    pub written: usize,
    /// What happens next.
    pub event: E,
}

/// RFC 1928 §3 method choice: with users configured, username/password is the only acceptable method even when
/// the client also offers "no authentication"; without users, "no authentication" is. X'FF' when the client
/// offered neither.
pub fn choose_method(greeting: &Greeting, users_configured: bool) -> u8 {
    match (users_configured, greeting.no_auth, greeting.user_pass) {
        (true, _, true) => socks5::METHOD_USER_PASS,
        (false, true, _) => socks5::METHOD_NO_AUTH,
        _ => socks5::METHOD_NO_ACCEPTABLE,
    }
}

/// Whether a SOCKS5 client must authenticate with a password (users are configured), unless a verified client
/// certificate already authenticates it and it offers "no authentication" (a client with a certificate that offers
/// only username/password still gets that method; the caller then accepts its credentials for the certificate's
/// user).
pub fn password_required(users_configured: bool, certified: bool, greeting: &Greeting) -> bool {
    users_configured && !(certified && greeting.no_auth)
}

/// Whether a SOCKS4 request may be served: SOCKS4 carries no password, so with users configured it would be a way
/// around authentication, unless the operator allowed it explicitly (`--socks4-with-users`).
pub fn socks4_allowed(users_configured: bool, socks4_with_users: bool) -> bool {
    !users_configured || socks4_with_users
}

/// Where a SOCKS5 handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socks5Stage {
    /// The greeting (method offer) is awaited.
    Greeting,
    /// RFC 1929 credentials are awaited.
    Auth,
    /// Credentials were handed out; no input is read until [`Socks5Server::auth_result`].
    Verifying,
    /// The request is awaited.
    Request,
    /// Finished: a request was handed out, or the handshake failed.
    Over,
}

/// Events of the SOCKS5 server handshake.
// A request holds its name inline, like TargetAddr (no allocation); events are short-lived return values.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Socks5Event<'a> {
    /// The input holds no complete message: read more, then step again.
    NeedMore,
    /// The greeting was answered; step again (the next message may already be in the input).
    Continue,
    /// The client sent RFC 1929 credentials: check them, then call [`Socks5Server::auth_result`].
    Credentials(Credentials<'a>),
    /// The handshake is complete; the request is the caller's to serve (and to answer).
    Request(socks5::Request),
    /// Refused: `out` holds the refusal (method X'FF' or a failure reply); send it, then close.
    Reject(Failure),
    /// A message was malformed in a way that has no reply (greeting, credentials): close.
    Malformed(ProtoError),
}

/// The server side of a SOCKS5 handshake: greeting, then username/password if chosen, then the request.
// Copy: it is a few bytes, and the worker moves it in and out of its connection phase by value.
#[derive(Debug, Clone, Copy)]
pub struct Socks5Server {
    state: Socks5Stage,
    users_configured: bool,
    certified: bool,
    method: Option<u8>,
    error: Option<ProtoError>,
}

impl Socks5Server {
    /// A handshake that expects the greeting; `users_configured` decides the method ([`choose_method`]).
    pub fn new(users_configured: bool) -> Socks5Server {
        Socks5Server {
            state: Socks5Stage::Greeting,
            users_configured,
            certified: false,
            method: None,
            error: None,
        }
    }

    /// The same handshake for a client that presented a verified certificate, when `certified`: the certificate
    /// is its authentication if it offers "no authentication" ([`password_required`]).
    pub fn certified(mut self, certified: bool) -> Socks5Server {
        self.certified = certified;
        self
    }

    /// Handles the next message in `input`, writing any reply to `out` ([`MAX_STEP_OUTPUT`] bytes suffice).
    pub fn step<'a>(&mut self, input: &'a [u8], out: &mut [u8]) -> Step<Socks5Event<'a>> {
        match self.state {
            Socks5Stage::Greeting => self.greeting(input, out),
            Socks5Stage::Auth => self.auth(input),
            Socks5Stage::Request => self.request(input, out),
            Socks5Stage::Verifying | Socks5Stage::Over => done(0, 0, Socks5Event::NeedMore),
        }
    }

    /// The caller's verdict on the credentials of the last [`Socks5Event::Credentials`]: writes the RFC 1929
    /// status to `out` and returns its length. On success the request comes next (step again); on failure the
    /// connection must be closed after the status is sent (RFC 1929 §2).
    pub fn auth_result(&mut self, ok: bool, out: &mut [u8]) -> usize {
        if self.state != Socks5Stage::Verifying {
            return 0;
        }
        self.state = if ok {
            Socks5Stage::Request
        } else {
            Socks5Stage::Over
        };
        socks5::encode_auth_status(ok, out)
    }

    /// True once a request was handed out or the handshake failed: nothing more is parsed.
    pub fn is_over(&self) -> bool {
        self.state == Socks5Stage::Over
    }

    /// Which message the handshake waits for.
    pub fn stage(&self) -> Socks5Stage {
        self.state
    }

    /// The method answered to the greeting (X'FF' when none was acceptable), once the greeting was handled.
    pub fn method(&self) -> Option<u8> {
        self.method
    }

    /// The parse error that ended the handshake, if one did (for the caller's log: the event names only the
    /// failure answered).
    pub fn error(&self) -> Option<ProtoError> {
        self.error
    }

    fn greeting<'a>(&mut self, input: &'a [u8], out: &mut [u8]) -> Step<Socks5Event<'a>> {
        let (greeting, n) = match socks5::parse_greeting(input) {
            Ok(Parse::Incomplete) => return done(0, 0, Socks5Event::NeedMore),
            Ok(Parse::Done(g, n)) => (g, n),
            Err(e) => return self.malformed(e),
        };
        let required = password_required(self.users_configured, self.certified, &greeting);
        let method = choose_method(&greeting, required);
        self.method = Some(method);
        let written = socks5::encode_method(method, out);
        let event = match method {
            socks5::METHOD_NO_AUTH => {
                self.state = Socks5Stage::Request;
                Socks5Event::Continue
            }
            socks5::METHOD_USER_PASS => {
                self.state = Socks5Stage::Auth;
                Socks5Event::Continue
            }
            _ => {
                self.state = Socks5Stage::Over;
                Socks5Event::Reject(Failure::NotAllowed)
            }
        };
        done(n, written, event)
    }

    fn auth<'a>(&mut self, input: &'a [u8]) -> Step<Socks5Event<'a>> {
        match socks5::parse_user_pass(input) {
            Ok(Parse::Incomplete) => done(0, 0, Socks5Event::NeedMore),
            Ok(Parse::Done(creds, n)) => {
                self.state = Socks5Stage::Verifying;
                done(n, 0, Socks5Event::Credentials(creds))
            }
            Err(e) => self.malformed(e),
        }
    }

    fn request<'a>(&mut self, input: &'a [u8], out: &mut [u8]) -> Step<Socks5Event<'a>> {
        match socks5::parse_request(input) {
            Ok(Parse::Incomplete) => done(0, 0, Socks5Event::NeedMore),
            Ok(Parse::Done(req, n)) => {
                self.state = Socks5Stage::Over;
                done(n, 0, Socks5Event::Request(req))
            }
            // RFC 1928 §6: a bad request is answered with the matching REP (X'07' command, X'08' address type).
            Err(e) => {
                self.state = Socks5Stage::Over;
                self.error = Some(e);
                let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
                let written = socks5::encode_reply(e.failure().socks5_reply(), unspecified, out);
                done(0, written, Socks5Event::Reject(e.failure()))
            }
        }
    }

    fn malformed<'a>(&mut self, e: ProtoError) -> Step<Socks5Event<'a>> {
        self.state = Socks5Stage::Over;
        self.error = Some(e);
        done(0, 0, Socks5Event::Malformed(e))
    }
}

/// Events of the SOCKS4 server handshake.
// As for Socks5Event: the request's name is inline on purpose.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Socks4Event<'a> {
    /// The request is not complete yet: read more, then step again.
    NeedMore,
    /// The request, for the caller to serve (and to answer).
    Request(socks4::Request<'a>),
    /// A complete request that policy refuses ([`socks4_allowed`]): `out` holds the SOCKS4 reply (CD 91); send
    /// it, then close. The request is handed out so the caller can say what was asked.
    NotAllowed(socks4::Request<'a>),
    /// Malformed: `out` holds the SOCKS4 reply (CD 91); send it, then close.
    Reject(Failure),
}

/// The server side of a SOCKS4/4a handshake: one request, refused by policy or handed to the caller.
// Copy, like Socks5Server: moved in and out of the worker's connection phase by value.
#[derive(Debug, Clone, Copy)]
pub struct Socks4Server {
    allowed: bool,
    over: bool,
    error: Option<ProtoError>,
}

impl Socks4Server {
    /// A handshake that serves requests when `allowed` (see [`socks4_allowed`]) and refuses them otherwise.
    pub fn new(allowed: bool) -> Socks4Server {
        Socks4Server {
            allowed,
            over: false,
            error: None,
        }
    }

    /// Handles the request in `input`, writing a refusal to `out` if there is one ([`MAX_STEP_OUTPUT`] suffices).
    pub fn step<'a>(&mut self, input: &'a [u8], out: &mut [u8]) -> Step<Socks4Event<'a>> {
        if self.over {
            return done(0, 0, Socks4Event::NeedMore);
        }
        let unspecified = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
        match socks4::parse_request(input) {
            Ok(Parse::Incomplete) => done(0, 0, Socks4Event::NeedMore),
            Ok(Parse::Done(req, n)) if self.allowed => {
                self.over = true;
                done(n, 0, Socks4Event::Request(req))
            }
            // Parsed first, so the refusal can name the target in the caller's log.
            Ok(Parse::Done(req, n)) => {
                self.over = true;
                let reply = Failure::NotAllowed.socks4_reply();
                let written = socks4::encode_reply(reply, unspecified, out);
                done(n, written, Socks4Event::NotAllowed(req))
            }
            Err(e) => {
                self.over = true;
                self.error = Some(e);
                let written = socks4::encode_reply(e.failure().socks4_reply(), unspecified, out);
                done(0, written, Socks4Event::Reject(e.failure()))
            }
        }
    }

    /// True once the request was handed out or refused.
    pub fn is_over(&self) -> bool {
        self.over
    }

    /// The parse error that ended the handshake, if one did (for the caller's log).
    pub fn error(&self) -> Option<ProtoError> {
        self.error
    }
}

impl<E> Step<E> {
    /// (consumed, written, event), so a caller can let go of its input buffer once the event is dealt with.
    pub fn parts(self) -> (usize, usize, E) {
        (self.consumed, self.written, self.event)
    }
}

fn done<E>(consumed: usize, written: usize, event: E) -> Step<E> {
    Step {
        consumed,
        written,
        event,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests;
