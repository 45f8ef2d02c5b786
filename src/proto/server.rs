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
//! [`socks4_allowed`]), so it can be tested without a socket.

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

/// Whether a SOCKS4 request may be served: SOCKS4 carries no password, so with users configured it would be a way
/// around authentication, unless the operator allowed it explicitly (`--socks4-with-users`).
pub fn socks4_allowed(users_configured: bool, socks4_with_users: bool) -> bool {
    !users_configured || socks4_with_users
}

/// Where a SOCKS5 handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    Auth,
    /// Credentials were handed out; no input is read until [`Socks5Server::auth_result`].
    Verifying,
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
#[derive(Debug, Clone)]
pub struct Socks5Server {
    state: State,
    users_configured: bool,
}

impl Socks5Server {
    /// A handshake that expects the greeting; `users_configured` decides the method ([`choose_method`]).
    pub fn new(users_configured: bool) -> Socks5Server {
        Socks5Server {
            state: State::Greeting,
            users_configured,
        }
    }

    /// Handles the next message in `input`, writing any reply to `out` ([`MAX_STEP_OUTPUT`] bytes suffice).
    pub fn step<'a>(&mut self, input: &'a [u8], out: &mut [u8]) -> Step<Socks5Event<'a>> {
        match self.state {
            State::Greeting => self.greeting(input, out),
            State::Auth => self.auth(input),
            State::Request => self.request(input, out),
            State::Verifying | State::Over => done(0, 0, Socks5Event::NeedMore),
        }
    }

    /// The caller's verdict on the credentials of the last [`Socks5Event::Credentials`]: writes the RFC 1929
    /// status to `out` and returns its length. On success the request comes next (step again); on failure the
    /// connection must be closed after the status is sent (RFC 1929 §2).
    pub fn auth_result(&mut self, ok: bool, out: &mut [u8]) -> usize {
        if self.state != State::Verifying {
            return 0;
        }
        self.state = if ok { State::Request } else { State::Over };
        socks5::encode_auth_status(ok, out)
    }

    /// True once a request was handed out or the handshake failed: nothing more is parsed.
    pub fn is_over(&self) -> bool {
        self.state == State::Over
    }

    fn greeting<'a>(&mut self, input: &'a [u8], out: &mut [u8]) -> Step<Socks5Event<'a>> {
        let (greeting, n) = match socks5::parse_greeting(input) {
            Ok(Parse::Incomplete) => return done(0, 0, Socks5Event::NeedMore),
            Ok(Parse::Done(g, n)) => (g, n),
            Err(e) => return self.malformed(e),
        };
        let method = choose_method(&greeting, self.users_configured);
        let written = socks5::encode_method(method, out);
        let event = match method {
            socks5::METHOD_NO_AUTH => {
                self.state = State::Request;
                Socks5Event::Continue
            }
            socks5::METHOD_USER_PASS => {
                self.state = State::Auth;
                Socks5Event::Continue
            }
            _ => {
                self.state = State::Over;
                Socks5Event::Reject(Failure::NotAllowed)
            }
        };
        done(n, written, event)
    }

    fn auth<'a>(&mut self, input: &'a [u8]) -> Step<Socks5Event<'a>> {
        match socks5::parse_user_pass(input) {
            Ok(Parse::Incomplete) => done(0, 0, Socks5Event::NeedMore),
            Ok(Parse::Done(creds, n)) => {
                self.state = State::Verifying;
                done(n, 0, Socks5Event::Credentials(creds))
            }
            Err(e) => self.malformed(e),
        }
    }

    fn request<'a>(&mut self, input: &'a [u8], out: &mut [u8]) -> Step<Socks5Event<'a>> {
        match socks5::parse_request(input) {
            Ok(Parse::Incomplete) => done(0, 0, Socks5Event::NeedMore),
            Ok(Parse::Done(req, n)) => {
                self.state = State::Over;
                done(n, 0, Socks5Event::Request(req))
            }
            // RFC 1928 §6: a bad request is answered with the matching REP (X'07' command, X'08' address type).
            Err(e) => {
                self.state = State::Over;
                let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
                let written = socks5::encode_reply(e.failure().socks5_reply(), unspecified, out);
                done(0, written, Socks5Event::Reject(e.failure()))
            }
        }
    }

    fn malformed<'a>(&mut self, e: ProtoError) -> Step<Socks5Event<'a>> {
        self.state = State::Over;
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
    /// Refused: `out` holds the SOCKS4 reply (CD 91); send it, then close.
    Reject(Failure),
}

/// The server side of a SOCKS4/4a handshake: one request, refused by policy or handed to the caller.
#[derive(Debug, Clone)]
pub struct Socks4Server {
    allowed: bool,
    over: bool,
}

impl Socks4Server {
    /// A handshake that serves requests when `allowed` (see [`socks4_allowed`]) and refuses them otherwise.
    pub fn new(allowed: bool) -> Socks4Server {
        Socks4Server {
            allowed,
            over: false,
        }
    }

    /// Handles the request in `input`, writing a refusal to `out` if there is one ([`MAX_STEP_OUTPUT`] suffices).
    pub fn step<'a>(&mut self, input: &'a [u8], out: &mut [u8]) -> Step<Socks4Event<'a>> {
        if self.over {
            return done(0, 0, Socks4Event::NeedMore);
        }
        let (failure, consumed) = match socks4::parse_request(input) {
            Ok(Parse::Incomplete) => return done(0, 0, Socks4Event::NeedMore),
            Ok(Parse::Done(req, n)) if self.allowed => {
                self.over = true;
                return done(n, 0, Socks4Event::Request(req));
            }
            // Parsed first, so the refusal can name the target in the caller's log.
            Ok(Parse::Done(_, n)) => (Failure::NotAllowed, n),
            Err(e) => (e.failure(), 0),
        };
        self.over = true;
        let unspecified = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
        let written = socks4::encode_reply(failure.socks4_reply(), unspecified, out);
        done(consumed, written, Socks4Event::Reject(failure))
    }

    /// True once the request was handed out or refused.
    pub fn is_over(&self) -> bool {
        self.over
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
