//! The forwarding exchanges of one client connection, sans-IO: which bytes are a request head, which are its body
//! (and where it ends), the same for the response, and whether the client and origin connections carry another
//! request afterwards. The caller owns the sockets, the buffers, the timers and the users table; it feeds what it
//! has read and reports what it has written.
//!
//! ```text
//!  Idle(kept origin or none) --begin--> Connecting --connected(awaiting, origin)--> InFlight(origin) {..}
//!       |         \__________________________ begin (reused) _____________________________^     |
//!       ^---------------------- finish (keep-alive: origin kept or handed back) -------------------+
//!                               finish (close) / take_origin: origin handed back to be closed
//! ```
//!
//! The machine holds the origin connection as an opaque handle `O` (the worker's socket; a unit or a fake in tests)
//! that it never touches: the state that has a request in flight is the one that holds its connection, so neither
//! can be without the other. It hands the handle back when the caller is to close it. While a request waits for a
//! new connection, its state travels with the caller as an [`AwaitingOrigin`], which only [`Exchange::begin`] makes
//! and [`Exchange::connected`] takes: a connection can only be attached to a request that waits for one, once.
//!
//! Each direction has its step: [`Exchange::read_head`] and [`Exchange::request_step`] for the client's bytes,
//! [`Exchange::origin_step`] for the origin's. Bodies are never copied: a step answers "the first `n` bytes of your input are body, forward them", and the
//! caller reports with [`Exchange::sent_to_origin`] / [`Exchange::sent_to_client`] how many its socket took. Only
//! one request is in flight: once a request is sent, later client bytes are its successor (pipelining) and stay
//! where they are until the response is complete.

use super::{
    parse_request, parse_response, BasicCredentials, BodyFramer, Request, ResponseContext,
    RewriteOptions,
};
use crate::proto::{Parse, ProtoError, TargetAddr};

/// How a request's proxy credentials are to be handled (RFC 9110 §11.7): on every request of a kept-alive
/// connection, since Basic credentials are per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyAuth<'r> {
    /// No users are configured (or the client is otherwise authenticated): serve it.
    Open,
    /// Check these credentials, then serve it or answer 407.
    Verify(&'r BasicCredentials),
    /// No usable credentials: answer 407.
    Refuse,
}

/// The proxy-authentication decision for `req` when `users_required`.
pub fn proxy_auth(users_required: bool, req: &Request) -> ProxyAuth<'_> {
    match (&req.credentials, users_required) {
        (_, false) => ProxyAuth::Open,
        (Some(c), true) => ProxyAuth::Verify(c),
        (None, true) => ProxyAuth::Refuse,
    }
}

/// What the caller knows that shapes parsing: limits and the Via pseudonym.
#[derive(Debug, Clone, Copy)]
pub struct HeadOptions<'a> {
    /// Largest head accepted (`--max-header-size`).
    pub max_head: usize,
    /// Pseudonym for the Via header; `None` sends no Via.
    pub via: Option<&'a str>,
    /// The proxy is draining: responses say `Connection: close`.
    pub draining: bool,
    /// The origin side is an HTTP upstream proxy: its 407 is about our credentials, not the client's.
    pub http_upstream: bool,
}

/// What the client's bytes are between requests.
// A request holds its credentials and target inline, as the parser returns them; events are short-lived.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadEvent {
    /// No complete head yet: read more (a full buffer may grow up to `max_head`).
    NeedHead,
    /// A head of `consumed` bytes, rewritten into `out` for a forward. The caller checks credentials
    /// ([`proxy_auth`]) and either [`Exchange::begin`]s it or opens the CONNECT tunnel.
    Request {
        /// The parsed head.
        request: Request,
        /// Input bytes the head used.
        consumed: usize,
    },
    /// A head that cannot be served (400, or 431 for [`ProtoError::HeadTooLarge`]).
    Bad(ProtoError),
    /// A request is in flight: these bytes are its successor (pipelining) and wait until it is finished.
    Held,
}

/// What the client's bytes are while a request is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadEvent {
    /// The first `n` input bytes are request body: send them to the origin.
    Body(usize),
    /// More body is needed from the client.
    NeedBody,
    /// The request body's framing is invalid.
    BadBody,
    /// The request has just gone out whole.
    Complete,
    /// The request went out earlier (or was abandoned), or none is in flight: client bytes are the next request,
    /// held until this exchange is finished.
    Sent,
}

/// What the origin's bytes are, for one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginEvent {
    /// No complete response head yet: read more (a full buffer may grow up to `max_head`).
    NeedHead,
    /// A response head of `consumed` bytes, rewritten into `out` for the client. An interim (1xx) head is
    /// followed by another head.
    Head {
        /// Input bytes the head used.
        consumed: usize,
        /// Its status.
        status: u16,
        /// A 1xx other than 101.
        interim: bool,
    },
    /// The first `n` input bytes are response body: send them to the client.
    Body(usize),
    /// More body is needed from the origin.
    NeedBody,
    /// The response is complete (once the caller's queue to the client is flushed, [`Exchange::finish`]).
    Complete,
    /// The HTTP upstream proxy refused our credentials (407): not the client's to answer.
    UpstreamRefused,
    /// The response head is invalid.
    Bad(ProtoError),
    /// The response body's framing is invalid.
    BadBody,
    /// No request is in flight: there is no response to read (bytes from a kept origin connection now mean it is
    /// no longer usable).
    Idle,
}

/// What happens after a complete response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// End the client connection gracefully (and drop the origin connection).
    Close,
    /// Wait for the next request; keep the origin connection when `keep_origin`.
    Next {
        /// The origin connection can carry the next request.
        keep_origin: bool,
    },
}

/// Where a body stands once the new bytes of the input are framed.
enum Framing {
    /// The first `n` input bytes are body, still to be forwarded.
    Ready(usize),
    /// Everything framed so far was forwarded; the body goes on.
    More,
    /// Everything was forwarded and the body has ended.
    Done,
    /// The framing is invalid.
    Bad,
}

/// Frames the input bytes after the `ready` ones already known to be body (either direction: the framer says
/// where the body ends; later bytes are the next message).
fn frame(body: &mut BodyFramer, ready: &mut usize, input: &[u8]) -> Framing {
    if !body.is_done() {
        let fresh = input.get(*ready..).unwrap_or(&[]);
        if !fresh.is_empty() {
            match body.advance(fresh) {
                Ok(n) => *ready += n,
                Err(_) => return Framing::Bad,
            }
        }
    }
    match (*ready, body.is_done()) {
        (0, true) => Framing::Done,
        (0, false) => Framing::More,
        (n, _) => Framing::Ready(n),
    }
}

/// The request side of an exchange.
#[derive(Debug, Clone)]
enum Upload {
    /// Body bytes are still to be forwarded; `ready` input bytes at the front are known to be body.
    Sending { body: BodyFramer, ready: usize },
    /// The whole request (head and body) went to the origin.
    Sent,
    /// The origin stopped taking the request: deliver what it answers, then close.
    Abandoned,
}

/// The response side of an exchange.
#[derive(Debug, Clone)]
enum Download {
    /// The final response head is awaited; `started` once an interim head reached the client.
    Head { started: bool },
    /// The final head went to the client; `ready` input bytes at the front are known to be body.
    Body {
        body: BodyFramer,
        ready: usize,
        keep_client: bool,
    },
}

/// A request in flight and its response; built fresh for every request.
#[derive(Debug, Clone)]
struct Flight {
    is_head: bool,
    minor: u8,
    client_keep_alive: bool,
    upload: Upload,
    response: Download,
}

/// Where the exchanges stand; each state holds the origin connection it can have, and only that.
#[derive(Debug, Clone)]
enum Stage<O> {
    /// Between requests: the connection kept from the last exchange, if it may carry the next request.
    Idle(Option<O>),
    /// A request is accepted and waits for the connection the caller is making; its state is the caller's
    /// [`AwaitingOrigin`] until [`Exchange::connected`].
    Connecting,
    /// A request and its response in flight on their connection.
    InFlight(O, Flight),
}

/// What [`Exchange::begin`] did with the request.
#[derive(Debug)]
pub enum Begin<O> {
    /// The kept origin connection carries it: it is in flight.
    Reused,
    /// It waits for a new origin connection ([`Exchange::connected`], which takes the [`AwaitingOrigin`]); the
    /// kept one, if there was one, cannot carry it and is handed back to be closed.
    Connect(Option<O>, AwaitingOrigin),
}

/// A request waiting for its new origin connection: made by [`Exchange::begin`], taken by [`Exchange::connected`].
#[derive(Debug)]
pub struct AwaitingOrigin(Box<Flight>);

/// The forwarding exchanges of one client connection, over origin connections of the caller's type `O`.
#[derive(Debug, Clone)]
pub struct Exchange<O> {
    /// Idle (with the kept origin connection or none), waiting for a connection, or in flight on one.
    stage: Stage<O>,
    /// The origin the current origin connection goes to.
    target: Option<TargetAddr>,
    /// That connection may carry another request.
    origin_reusable: bool,
    /// A caller's decision that the client connection ends after the current response.
    close_after: bool,
}

impl<O> Default for Exchange<O> {
    fn default() -> Exchange<O> {
        Exchange::new()
    }
}

impl<O> Exchange<O> {
    /// A connection before its first request, with no origin connection.
    pub fn new() -> Exchange<O> {
        Exchange {
            stage: Stage::Idle(None),
            target: None,
            origin_reusable: false,
            close_after: false,
        }
    }

    /// True while a request is in flight (its response not yet complete), or waits for its origin connection.
    pub fn in_flight(&self) -> bool {
        !matches!(self.stage, Stage::Idle(_))
    }

    /// The origin connection: the one the request in flight uses, or the one kept between requests.
    pub fn origin(&self) -> Option<&O> {
        match &self.stage {
            Stage::Idle(o) => o.as_ref(),
            Stage::Connecting => None,
            Stage::InFlight(o, _) => Some(o),
        }
    }

    /// The origin connection, mutably.
    pub fn origin_mut(&mut self) -> Option<&mut O> {
        match &mut self.stage {
            Stage::Idle(o) => o.as_mut(),
            Stage::Connecting => None,
            Stage::InFlight(o, _) => Some(o),
        }
    }

    fn flight(&self) -> Option<&Flight> {
        match &self.stage {
            Stage::InFlight(_, x) => Some(x),
            Stage::Idle(_) | Stage::Connecting => None,
        }
    }

    fn flight_mut(&mut self) -> Option<&mut Flight> {
        match &mut self.stage {
            Stage::InFlight(_, x) => Some(x),
            Stage::Idle(_) | Stage::Connecting => None,
        }
    }

    /// Anything of the current response reached the client: after that, errors can only close.
    pub fn response_started(&self) -> bool {
        match self.flight() {
            Some(x) => match x.response {
                Download::Head { started } => started,
                Download::Body { .. } => true,
            },
            None => false,
        }
    }

    /// Parses the next request head from the client's buffered bytes `input` (rewriting it into `out`), between
    /// requests; while one is in flight the bytes are held.
    pub fn read_head(&self, input: &[u8], opts: &HeadOptions<'_>, out: &mut Vec<u8>) -> HeadEvent {
        if self.in_flight() {
            return HeadEvent::Held;
        }
        let rewrite = RewriteOptions { via: opts.via };
        match parse_request(input, opts.max_head, &rewrite, out) {
            Ok(Parse::Incomplete) => HeadEvent::NeedHead,
            Ok(Parse::Done(request, consumed)) => HeadEvent::Request { request, consumed },
            Err(e) => HeadEvent::Bad(e),
        }
    }

    /// Frames the request body in the client's buffered bytes `input` (the head was already consumed).
    pub fn request_step(&mut self, input: &[u8]) -> UploadEvent {
        let Some(x) = self.flight_mut() else {
            return UploadEvent::Sent;
        };
        let Upload::Sending { body, ready } = &mut x.upload else {
            return UploadEvent::Sent;
        };
        match frame(body, ready, input) {
            Framing::Ready(n) => UploadEvent::Body(n),
            Framing::More => UploadEvent::NeedBody,
            Framing::Bad => UploadEvent::BadBody,
            Framing::Done => {
                x.upload = Upload::Sent;
                UploadEvent::Complete
            }
        }
    }

    /// The caller wrote `n` request body bytes (from the front of the last [`UploadEvent::Body`]) to the origin.
    pub fn sent_to_origin(&mut self, n: usize) {
        if let Some(Flight {
            upload: Upload::Sending { ready, .. },
            ..
        }) = self.flight_mut()
        {
            *ready = ready.saturating_sub(n);
        }
    }

    /// Whether the kept origin connection can carry a request for `target`: there is one, it may (the last
    /// response allowed it) and it goes there, or `any_target` (an HTTP upstream proxy takes requests for any
    /// origin on one connection).
    pub fn reuses_origin(&self, target: &TargetAddr, any_target: bool) -> bool {
        matches!(self.stage, Stage::Idle(Some(_)))
            && self.origin_reusable
            && (any_target || self.target.as_ref() == Some(target))
    }

    /// Starts forwarding the forward request `req` (its rewritten head goes out first, by the caller), between
    /// requests: on the kept origin connection when [`Exchange::reuses_origin`] says it can carry it, else it
    /// waits for a new connection to its target.
    pub fn begin(&mut self, req: &Request, any_target: bool) -> Begin<O> {
        let reuse = self.reuses_origin(&req.target, any_target);
        let flight = Flight {
            is_head: req.is_head,
            minor: req.minor_version,
            client_keep_alive: req.keep_alive,
            upload: Upload::Sending {
                body: BodyFramer::new(req.body),
                ready: 0,
            },
            response: Download::Head { started: false },
        };
        match self.take_stage() {
            Some(origin) if reuse => {
                self.stage = Stage::InFlight(origin, flight);
                Begin::Reused
            }
            unwanted => {
                self.target = Some(req.target.clone());
                self.origin_reusable = false;
                self.stage = Stage::Connecting;
                Begin::Connect(unwanted, AwaitingOrigin(Box::new(flight)))
            }
        }
    }

    /// The new origin connection for the waiting request (`pending`, from [`Exchange::begin`]) is up: the request
    /// goes on it.
    pub fn connected(&mut self, pending: AwaitingOrigin, origin: O) {
        // Nothing else moves the exchange on while its request waits (the caller holds `pending` meanwhile).
        debug_assert!(matches!(self.stage, Stage::Connecting));
        self.stage = Stage::InFlight(origin, *pending.0);
        self.origin_reusable = true;
    }

    /// The origin stopped taking the request (say it answered 413 and reset): whatever it sent is still
    /// delivered, then the client connection closes.
    pub fn abandon_upload(&mut self) {
        if let Some(x) = self.flight_mut() {
            x.upload = Upload::Abandoned;
        }
    }

    /// Handles the origin's buffered bytes `input`: response heads (rewritten into `out`), then body framing.
    pub fn origin_step(
        &mut self,
        input: &[u8],
        opts: &HeadOptions<'_>,
        out: &mut Vec<u8>,
    ) -> OriginEvent {
        let close_after = self.close_after;
        let x = match &mut self.stage {
            Stage::InFlight(_, x) => x,
            // Connecting: the origin's connection is not up yet, so it cannot have said anything.
            Stage::Idle(_) | Stage::Connecting => return OriginEvent::Idle,
        };
        match &mut x.response {
            Download::Head { .. } if input.is_empty() => OriginEvent::NeedHead,
            Download::Head { .. } => {
                let rctx = ResponseContext {
                    request_is_head: x.is_head,
                    // A response that arrives before the request is complete ends the connection (the rest of
                    // that body is not read), so it must say `Connection: close`; so must one after which the
                    // caller closes.
                    client_keep_alive: x.client_keep_alive
                        && !opts.draining
                        && !close_after
                        && matches!(x.upload, Upload::Sent),
                    client_minor_version: x.minor,
                    via: opts.via,
                };
                match parse_response(input, opts.max_head, &rctx, out) {
                    Ok(Parse::Done(resp, _)) if resp.status == 407 && opts.http_upstream => {
                        OriginEvent::UpstreamRefused
                    }
                    Ok(Parse::Done(resp, consumed)) => {
                        x.response = if resp.interim {
                            Download::Head { started: true }
                        } else {
                            self.origin_reusable = resp.keep_origin;
                            Download::Body {
                                body: BodyFramer::new(resp.body),
                                ready: 0,
                                keep_client: resp.keep_client,
                            }
                        };
                        OriginEvent::Head {
                            consumed,
                            status: resp.status,
                            interim: resp.interim,
                        }
                    }
                    Ok(Parse::Incomplete) => OriginEvent::NeedHead,
                    Err(e) => OriginEvent::Bad(e),
                }
            }
            Download::Body { body, ready, .. } => match frame(body, ready, input) {
                Framing::Ready(n) => OriginEvent::Body(n),
                Framing::More => OriginEvent::NeedBody,
                Framing::Bad => OriginEvent::BadBody,
                Framing::Done => OriginEvent::Complete,
            },
        }
    }

    /// The caller wrote `n` response body bytes (from the front of the last [`OriginEvent::Body`]) to the client.
    pub fn sent_to_client(&mut self, n: usize) {
        if let Some(Flight {
            response: Download::Body { ready, .. },
            ..
        }) = self.flight_mut()
        {
            *ready = ready.saturating_sub(n);
        }
    }

    /// The response is complete: its whole body went to the client.
    pub fn response_complete(&self) -> bool {
        matches!(
            self.flight(),
            Some(Flight { response: Download::Body { body, ready: 0, .. }, .. }) if body.is_done()
        )
    }

    /// The origin closed its connection: true when that ends the response (a close-delimited body, or one cut
    /// short after everything received was forwarded: the client learns the end from our close), false when it
    /// breaks the exchange (no final head yet, or body bytes still to forward).
    pub fn origin_closed(&self) -> bool {
        matches!(
            self.flight(),
            Some(Flight { response: Download::Body { body, ready: 0, .. }, .. }) if !body.is_done()
        )
    }

    /// Ends the exchange whose response is complete: whether the client connection carries another request, and
    /// whether the origin connection does (then it is kept, idle; otherwise it is handed back to be closed).
    /// `client_eof` (the client closed its side), `draining` and `origin_leftover` (the origin sent bytes past
    /// its response) come from the caller.
    pub fn finish(
        &mut self,
        client_eof: bool,
        draining: bool,
        origin_leftover: bool,
    ) -> (After, Option<O>) {
        let (origin, x) = match std::mem::replace(&mut self.stage, Stage::Idle(None)) {
            Stage::InFlight(o, x) => (Some(o), x),
            // The request never reached an origin: nothing is known of the connection's framing.
            Stage::Connecting => return (After::Close, None),
            Stage::Idle(kept) => {
                self.stage = Stage::Idle(kept);
                return (After::Close, None);
            }
        };
        let sent = matches!(x.upload, Upload::Sent);
        let keep_client = matches!(
            x.response,
            Download::Body {
                keep_client: true,
                ..
            }
        );
        if !sent || !keep_client || draining || client_eof || self.close_after {
            // The client still sends a body that will not be read, or asked to close.
            return (After::Close, origin);
        }
        let keep_origin = self.origin_reusable && !origin_leftover;
        if !keep_origin {
            self.target = None;
            return (After::Next { keep_origin }, origin);
        }
        self.stage = Stage::Idle(origin);
        (After::Next { keep_origin }, None)
    }

    /// The caller closes the origin connection (it failed, spoke or closed between requests, or the client
    /// connection ends): the exchange in flight, if any, is abandoned with it, and the connection is handed back.
    pub fn take_origin(&mut self) -> Option<O> {
        self.target = None;
        self.origin_reusable = false;
        self.take_stage()
    }

    /// Leaves the machine idle with no origin connection, and returns the connection it had.
    fn take_stage(&mut self) -> Option<O> {
        match std::mem::replace(&mut self.stage, Stage::Idle(None)) {
            Stage::Idle(o) => o,
            Stage::InFlight(o, _) => Some(o),
            Stage::Connecting => None,
        }
    }

    /// Hook for the caller's own limits: the client connection ends after the current response (which then says
    /// `Connection: close` if its head is still to come).
    pub fn close_after_response(&mut self) {
        self.close_after = true;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests;
