//! Body framing: where a message body ends, without re-encoding it (RFC 9112 §6, §7).

use super::fields::is_tchar;
use super::{BodyKind, MAX_CHUNK_LINE, MAX_HEX_DIGITS, MAX_TRAILERS};
use crate::proto::ProtoError;

/// Where the framer is inside a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The body is complete.
    Done,
    /// An error was reported; every later call reports it again.
    Failed,
    /// Close-delimited: everything belongs to the body.
    UntilClose,
    /// Content-Length bytes left.
    Length(u64),
    /// Start of a chunk-size line: a hex digit must follow.
    SizeStart,
    /// Inside the hex digits.
    Size { value: u64, digits: u8, line: usize },
    /// After the digits: BWS, then optionally ";" extensions (RFC 9112 §7.1.1).
    Ext {
        value: u64,
        line: usize,
        semicolon: bool,
    },
    /// CR of the chunk-size line seen; LF must follow.
    SizeLf { value: u64 },
    /// Chunk data bytes left.
    Data(u64),
    /// After chunk data: CR must follow.
    DataCr,
    /// After chunk data and CR: LF must follow.
    DataLf,
    /// Start of a trailer line, or the final empty line.
    TrailerStart { total: usize },
    /// Inside a trailer field name.
    TrailerName { total: usize },
    /// Inside a trailer field value.
    TrailerValue { total: usize },
    /// CR of a trailer line seen; LF must follow.
    TrailerLf { total: usize },
    /// CR of the final empty line seen; LF must follow.
    FinalLf,
}

/// Delimits a message body that is relayed verbatim, reporting how many input bytes belong to it.
#[derive(Debug, Clone)]
pub struct BodyFramer {
    state: State,
}

impl BodyFramer {
    /// Starts delimiting a body of the given kind.
    pub fn new(kind: BodyKind) -> BodyFramer {
        let state = match kind {
            BodyKind::None | BodyKind::Length(0) => State::Done,
            BodyKind::Length(n) => State::Length(n),
            BodyKind::Chunked => State::SizeStart,
            BodyKind::UntilClose => State::UntilClose,
        };
        BodyFramer { state }
    }

    /// The body has ended (never for close-delimited bodies, which end at EOF).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes the prefix of `input` that belongs to the body and returns its length; stops exactly at the end.
    pub fn advance(&mut self, input: &[u8]) -> Result<usize, ProtoError> {
        let mut pos = 0usize;
        loop {
            let rest = input.get(pos..).unwrap_or(&[]);
            match self.state {
                State::Failed => return Err(ProtoError::Malformed),
                State::Done => return Ok(pos),
                State::UntilClose => return Ok(input.len()),
                _ if rest.is_empty() => return Ok(pos),
                State::Length(n) | State::Data(n) => {
                    let take = take_up_to(n, rest.len());
                    pos = pos.saturating_add(take);
                    let left = n.saturating_sub(take as u64);
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), l) => State::Length(l),
                        (_, 0) => State::DataCr,
                        (_, l) => State::Data(l),
                    };
                }
                _ => {
                    let Some(&b) = rest.first() else {
                        return Ok(pos);
                    };
                    match self.step(b) {
                        Some(next) => self.state = next,
                        None => {
                            self.state = State::Failed;
                            return Err(ProtoError::Malformed);
                        }
                    }
                    pos = pos.saturating_add(1);
                }
            }
        }
    }

    /// One byte of chunked framing (RFC 9112 §7.1). Line ends are strictly CRLF: the bytes are relayed verbatim,
    /// and a bare LF that we accepted but the next hop did not (or vice versa) would desynchronize the two.
    fn step(&self, b: u8) -> Option<State> {
        Some(match self.state {
            State::SizeStart => State::Size {
                value: u64::from(hex_value(b)?),
                digits: 1,
                line: 1,
            },
            State::Size {
                value,
                digits,
                line,
            } => {
                let line = bump_line(line)?;
                if let Some(d) = hex_value(b) {
                    if digits >= MAX_HEX_DIGITS {
                        return None;
                    }
                    let value = value.checked_mul(16)?.checked_add(u64::from(d))?;
                    State::Size {
                        value,
                        digits: digits.checked_add(1)?,
                        line,
                    }
                } else {
                    match b {
                        b'\r' => State::SizeLf { value },
                        b' ' | b'\t' => State::Ext {
                            value,
                            line,
                            semicolon: false,
                        },
                        b';' => State::Ext {
                            value,
                            line,
                            semicolon: true,
                        },
                        _ => return None,
                    }
                }
            }
            State::Ext {
                value,
                line,
                semicolon,
            } => {
                let line = bump_line(line)?;
                match b {
                    b'\r' => State::SizeLf { value },
                    b';' => State::Ext {
                        value,
                        line,
                        semicolon: true,
                    },
                    b' ' | b'\t' => State::Ext {
                        value,
                        line,
                        semicolon,
                    },
                    // Before the first ';' only BWS is allowed; after it, visible text (the extension grammar is
                    // not interpreted, RFC 9112 §7.1.1 lets recipients ignore unknown extensions).
                    _ if semicolon && (b.is_ascii_graphic() || b >= 0x80) => State::Ext {
                        value,
                        line,
                        semicolon,
                    },
                    _ => return None,
                }
            }
            State::SizeLf { value } => match (b, value) {
                (b'\n', 0) => State::TrailerStart { total: 0 },
                (b'\n', v) => State::Data(v),
                _ => return None,
            },
            State::DataCr => match b {
                b'\r' => State::DataLf,
                _ => return None,
            },
            State::DataLf => match b {
                b'\n' => State::SizeStart,
                _ => return None,
            },
            State::TrailerStart { total } => {
                let total = bump_trailers(total)?;
                match b {
                    b'\r' => State::FinalLf,
                    // A leading SP/HTAB would be obs-fold, which RFC 9112 §5.2 lets us reject.
                    _ if is_tchar(b) => State::TrailerName { total },
                    _ => return None,
                }
            }
            State::TrailerName { total } => {
                let total = bump_trailers(total)?;
                match b {
                    b':' => State::TrailerValue { total },
                    _ if is_tchar(b) => State::TrailerName { total },
                    _ => return None,
                }
            }
            State::TrailerValue { total } => {
                let total = bump_trailers(total)?;
                match b {
                    b'\r' => State::TrailerLf { total },
                    b'\t' | b' '..=0x7e | 0x80..=0xff => State::TrailerValue { total },
                    _ => return None,
                }
            }
            State::TrailerLf { total } => {
                let total = bump_trailers(total)?;
                match b {
                    b'\n' => State::TrailerStart { total },
                    _ => return None,
                }
            }
            State::FinalLf => match b {
                b'\n' => State::Done,
                _ => return None,
            },
            State::Done | State::Failed | State::UntilClose | State::Length(_) | State::Data(_) => {
                return None
            }
        })
    }
}

fn take_up_to(n: u64, available: usize) -> usize {
    match usize::try_from(n) {
        Ok(n) => n.min(available),
        Err(_) => available,
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn bump_line(line: usize) -> Option<usize> {
    let line = line.checked_add(1)?;
    (line <= MAX_CHUNK_LINE).then_some(line)
}

fn bump_trailers(total: usize) -> Option<usize> {
    let total = total.checked_add(1)?;
    (total <= MAX_TRAILERS).then_some(total)
}
