//! The one place that encodes and decodes mio tokens.
//!
//! ```text
//! Token(usize::MAX)          the worker's waker (commands and resolver replies)
//! Token(usize::MAX - 1 - i)  listener i
//! Token(key << 5 | slot << 2 | role)
//!                            a socket of connection `key` in the slab; `slot` is 0 except for the extra
//!                            outbound sockets of a Happy Eyeballs connect (one per attempt in flight)
//! ```

use mio::Token;

use crate::indexed::indexed_enum;

indexed_enum! {
    /// Which socket of a connection an event is for (its index is the token's low two bits).
    pub enum Role {
        /// The accepted client socket.
        Client,
        /// The outbound socket to the target (or upstream proxy).
        Upstream,
        /// The UDP relay socket of an association.
        Udp,
        /// The listening socket of a BIND request.
        BindListener,
    }
}

/// What a token addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The worker's waker.
    Waker,
    /// Listener number `i`.
    Listener(usize),
    /// A socket owned by the connection at slab `key`.
    Conn {
        /// The connection's slab key.
        key: usize,
        /// Which of its sockets.
        role: Role,
    },
    /// Connect attempt `slot` (1..[`ATTEMPT_SLOTS`]) of the connection at slab `key`; attempt 0 has the plain
    /// [`Role::Upstream`] token, so the usual single attempt needs no re-registration when it wins.
    Attempt {
        /// The connection's slab key.
        key: usize,
        /// Which attempt.
        slot: usize,
    },
}

/// How many connect attempts one connection may have in flight at once (Happy Eyeballs).
pub const ATTEMPT_SLOTS: usize = 8;
const SLOT_SHIFT: u32 = 2;
const KEY_SHIFT: u32 = 5;
// The role fills the bits below the slot exactly, so that every value of them decodes to a role.
const _: () = assert!(Role::COUNT == 1 << SLOT_SHIFT);

/// The waker's token.
pub const WAKER: Token = Token(usize::MAX);
/// How many tokens at the top of the range are reserved for the waker and listeners.
const RESERVED: usize = 1024;

/// Token of listener `i`.
pub fn listener(i: usize) -> Token {
    debug_assert!(i < RESERVED - 1);
    Token(usize::MAX - 1 - i)
}

/// Token of socket `role` of connection `key`.
pub fn conn(key: usize, role: Role) -> Token {
    debug_assert!(key < (usize::MAX - RESERVED) >> KEY_SHIFT);
    Token(key << KEY_SHIFT | role as usize)
}

/// Token of outbound connect attempt `slot` of connection `key` (slot 0 is the plain upstream token).
pub fn attempt(key: usize, slot: usize) -> Token {
    debug_assert!(slot < ATTEMPT_SLOTS);
    Token(conn(key, Role::Upstream).0 | slot << SLOT_SHIFT)
}

/// Decodes a token.
pub fn decode(token: Token) -> Target {
    let t = token.0;
    if t == usize::MAX {
        Target::Waker
    } else if t > usize::MAX - RESERVED {
        Target::Listener(usize::MAX - 1 - t)
    } else {
        let role = Role::ALL[t & (Role::COUNT - 1)];
        let key = t >> KEY_SHIFT;
        match (t >> SLOT_SHIFT) & (ATTEMPT_SLOTS - 1) {
            0 => Target::Conn { key, role },
            slot => Target::Attempt { key, slot },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        assert_eq!(decode(WAKER), Target::Waker);
        for i in [0, 1, 7] {
            assert_eq!(decode(listener(i)), Target::Listener(i));
        }
        for key in [0, 1, 12345, ((usize::MAX - RESERVED) >> KEY_SHIFT) - 1] {
            for role in Role::ALL {
                assert_eq!(decode(conn(key, role)), Target::Conn { key, role });
            }
            assert_eq!(
                decode(attempt(key, 0)),
                Target::Conn {
                    key,
                    role: Role::Upstream
                }
            );
            for slot in 1..ATTEMPT_SLOTS {
                assert_eq!(decode(attempt(key, slot)), Target::Attempt { key, slot });
            }
        }
    }
}
