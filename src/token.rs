//! The meaning of a `mio::Token`.
//!
//! Bit layout of the `usize`: the top three bits say what kind of source
//! it is; the rest is an index. For pairs, the lowest bit of the index is
//! the side (0 client, 1 upstream) and the bits above it the slab key.
//!
//! | top bits | source                   | index                  |
//! |----------|--------------------------|------------------------|
//! | `000`    | a pair's socket          | `key << 1 \| side`     |
//! | `001`    | an upstream's listener   | listener slab key      |
//! | `010`    | a health probe           | probe slab key         |
//! | `011`    | an admin connection      | admin slab key         |
//! | `111`    | signals, control, admin  | [`Source`] constant    |

use mio::Token;

/// Which socket of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    /// The other socket of the pair.
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

/// What a token identifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Pair(usize, Side),
    Listener(usize),
    Probe(usize),
    Admin(usize),
    AdminListener,
    Signals,
    Control,
}

const KIND_SHIFT: u32 = usize::BITS - 3;
const INDEX_MASK: usize = (1 << KIND_SHIFT) - 1;
const PAIR: usize = 0;
const LISTENER: usize = 1;
const PROBE: usize = 2;
const ADMIN: usize = 3;
const SPECIAL: usize = 7;
const SIGNALS: usize = 0;
const CONTROL: usize = 1;
const ADMIN_LISTENER: usize = 2;

impl Source {
    pub fn token(self) -> Token {
        let (kind, index) = match self {
            Source::Pair(key, side) => (PAIR, key << 1 | (side == Side::Upstream) as usize),
            Source::Listener(i) => (LISTENER, i),
            Source::Probe(i) => (PROBE, i),
            Source::Admin(i) => (ADMIN, i),
            Source::AdminListener => (SPECIAL, ADMIN_LISTENER),
            Source::Signals => (SPECIAL, SIGNALS),
            Source::Control => (SPECIAL, CONTROL),
        };
        debug_assert!(index <= INDEX_MASK);
        Token(kind << KIND_SHIFT | index)
    }

    /// Decodes a token made by [`token`](Self::token); `None` for anything else.
    pub fn of(token: Token) -> Option<Source> {
        let index = token.0 & INDEX_MASK;
        match token.0 >> KIND_SHIFT {
            PAIR => {
                let side = if index & 1 == 0 {
                    Side::Client
                } else {
                    Side::Upstream
                };
                Some(Source::Pair(index >> 1, side))
            }
            LISTENER => Some(Source::Listener(index)),
            PROBE => Some(Source::Probe(index)),
            ADMIN => Some(Source::Admin(index)),
            SPECIAL => match index {
                SIGNALS => Some(Source::Signals),
                CONTROL => Some(Source::Control),
                ADMIN_LISTENER => Some(Source::AdminListener),
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_round_trips() {
        for source in [
            Source::Pair(0, Side::Client),
            Source::Pair(0, Side::Upstream),
            Source::Pair(123_456, Side::Upstream),
            Source::Listener(0),
            Source::Listener(7),
            Source::Probe(3),
            Source::Admin(9),
            Source::AdminListener,
            Source::Signals,
            Source::Control,
        ] {
            assert_eq!(Source::of(source.token()), Some(source));
        }
        assert_eq!(Source::of(Token(5 << KIND_SHIFT)), None);
        assert_eq!(Source::of(Token(SPECIAL << KIND_SHIFT | 99)), None);
    }

    #[test]
    fn kinds_do_not_overlap() {
        assert_ne!(
            Source::Pair(1, Side::Client).token(),
            Source::Listener(2).token()
        );
        assert_ne!(Source::Probe(1).token(), Source::Admin(1).token());
        assert_ne!(
            Source::Pair(0, Side::Client).token(),
            Source::Pair(0, Side::Upstream).token()
        );
    }
}
