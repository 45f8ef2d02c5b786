//! Accepting: until `WouldBlock`, with client rules and limits checked before anything is allocated, and a pause
//! (never a spin) when descriptors, the connection limit or the buffer pool run out.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use log::warn;
use mio::net::TcpStream;
use mio::Interest;

use super::access::{log_accept_error, log_refused};
use super::conn::{Conn, Handshake, Phase, HANDSHAKE_BUFFER};
use super::timers::TimerKind;
use super::{token, Worker};
use crate::buffer::Buffer;
use crate::metrics::{self, Refusal};
use crate::net;

/// How long to wait before retrying accept after running out of descriptors or hitting a limit held by other
/// workers (closes on this worker retry at once).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

impl Worker {
    /// Accepts everything pending on listener `i`.
    pub(super) fn accept(&mut self, i: usize) {
        if self.accept_paused || self.ctx.draining {
            return;
        }
        loop {
            if self.at_capacity() {
                self.pause_accept();
                return;
            }
            let Some(Some(listener)) = self.listeners.get(i) else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    self.exhausted = false;
                    self.admit(stream, peer)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) if net::is_resource_exhaustion(&e) => {
                    // Once per episode, not once per 50 ms retry.
                    // Idle pipes hold descriptors that accept needs more.
                    self.ctx.pipes.clear();
                    if !self.exhausted {
                        self.exhausted = true;
                        warn!(
                            "worker {}: accept: {e}; pausing accepts until descriptors free up",
                            self.id
                        );
                    }
                    self.pause_accept();
                    return;
                }
                Err(e) => {
                    log_accept_error(&e);
                    return;
                }
            }
        }
    }

    fn at_capacity(&self) -> bool {
        if let Some(max) = self.ctx.cfg.max_connections {
            if self.open.load(Ordering::Relaxed) >= max {
                return true;
            }
        }
        self.ctx.pool.exhausted()
    }

    fn pause_accept(&mut self) {
        if !self.accept_paused {
            self.accept_paused = true;
            self.ctx
                .timers
                .arm_worker(self.ctx.now + ACCEPT_RETRY, TimerKind::AcceptRetry);
        }
    }

    /// Tries accepting again on every listener (after a close or the retry timer).
    pub(super) fn resume_accept(&mut self) {
        if !self.accept_paused {
            return;
        }
        self.accept_paused = false;
        for i in 0..self.listeners.len() {
            self.accept(i);
            if self.accept_paused {
                return;
            }
        }
    }

    fn admit(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        let stats = &self.ctx.stats;
        metrics::inc(&stats.accepted);
        // With --proxy-protocol the real client address arrives in the header; the rules are checked then.
        if !self.ctx.cfg.proxy_protocol && !self.ctx.cfg.client_rules.allows(peer.ip()) {
            metrics::inc(&stats.refused[Refusal::ClientAcl as usize]);
            log_refused(peer, "client not allowed");
            return;
        }
        // TCP_NODELAY (and the keepalive and user-timeout options) come from the listener: Linux copies them to
        // every accepted socket (`net::TcpOptions::apply_listener`).
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let tok = token::conn(key, token::Role::Client);
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut stream, tok, Interest::READABLE | Interest::WRITABLE)
        {
            warn!("worker {}: register: {e}", self.id);
            return;
        }
        self.next_gen = self.next_gen.wrapping_add(1);
        let gen = self.next_gen;
        let step = if self.ctx.cfg.proxy_protocol {
            Handshake::ProxyHeader
        } else {
            Handshake::Detect
        };
        let now = self.ctx.now;
        let buf = Buffer::new(HANDSHAKE_BUFFER);
        let deadline = now + self.ctx.cfg.handshake_timeout;
        let phase = Phase::Handshake { step, deadline };
        entry.insert(Conn::new(gen, stream, peer, phase, now, buf));
        self.ctx
            .timers
            .arm(deadline, key, gen, TimerKind::Handshake);
        self.open.fetch_add(1, Ordering::Relaxed);
        metrics::inc(&self.ctx.stats.active[metrics::Proto::Unknown as usize]);
    }
}
