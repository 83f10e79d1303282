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
//! | `111`    | signals, control, admin  | [`Registration`] constant    |

use mio::Token;

use crate::pair::Side;

/// What a token identifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
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

impl Registration {
    pub fn token(self) -> Token {
        let (kind, index) = match self {
            Registration::Pair(key, side) => (PAIR, key << 1 | (side == Side::Host) as usize),
            Registration::Listener(i) => (LISTENER, i),
            Registration::Probe(i) => (PROBE, i),
            Registration::Admin(i) => (ADMIN, i),
            Registration::AdminListener => (SPECIAL, ADMIN_LISTENER),
            Registration::Signals => (SPECIAL, SIGNALS),
            Registration::Control => (SPECIAL, CONTROL),
        };
        debug_assert!(index <= INDEX_MASK);
        Token(kind << KIND_SHIFT | index)
    }

    /// Decodes a token made by [`token`](Self::token); `None` for anything else.
    pub fn of(token: Token) -> Option<Registration> {
        let index = token.0 & INDEX_MASK;
        match token.0 >> KIND_SHIFT {
            PAIR => {
                let side = if index & 1 == 0 {
                    Side::Client
                } else {
                    Side::Host
                };
                Some(Registration::Pair(index >> 1, side))
            }
            LISTENER => Some(Registration::Listener(index)),
            PROBE => Some(Registration::Probe(index)),
            ADMIN => Some(Registration::Admin(index)),
            SPECIAL => match index {
                SIGNALS => Some(Registration::Signals),
                CONTROL => Some(Registration::Control),
                ADMIN_LISTENER => Some(Registration::AdminListener),
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
            Registration::Pair(0, Side::Client),
            Registration::Pair(0, Side::Host),
            Registration::Pair(123_456, Side::Host),
            Registration::Listener(0),
            Registration::Listener(7),
            Registration::Probe(3),
            Registration::Admin(9),
            Registration::AdminListener,
            Registration::Signals,
            Registration::Control,
        ] {
            assert_eq!(Registration::of(source.token()), Some(source));
        }
        assert_eq!(Registration::of(Token(5 << KIND_SHIFT)), None);
        assert_eq!(Registration::of(Token(SPECIAL << KIND_SHIFT | 99)), None);
    }

    #[test]
    fn kinds_do_not_overlap() {
        assert_ne!(
            Registration::Pair(1, Side::Client).token(),
            Registration::Listener(2).token()
        );
        assert_ne!(
            Registration::Probe(1).token(),
            Registration::Admin(1).token()
        );
        assert_ne!(
            Registration::Pair(0, Side::Client).token(),
            Registration::Pair(0, Side::Host).token()
        );
    }
}
