//! Collecting what is wrong with a configuration source: every problem is
//! kept (the walk never stops at the first), each byte span the TOML
//! parser gives is turned into a line and column of the text, and the
//! report comes out sorted by place, problems without a place (line 0)
//! first, each place's problems in the order they were found. The report
//! also carries the one choice the walk leaves to its caller: whether a
//! `name:port` address is looked up or reported.

use std::fmt::Display;
use std::ops::Range;

use crate::error::{ConfigError, Problem};

/// The problems found so far in one source text.
pub(super) struct Problems<'t> {
    text: &'t str,
    found: Vec<Problem>,
    /// Host names in addresses are looked up (else they are problems).
    lookups: bool,
}

impl<'t> Problems<'t> {
    /// An empty report on `text` (empty for sources with no text, such as
    /// the command line, whose problems have no place).
    pub(super) fn new(text: &'t str) -> Self {
        Problems {
            text,
            found: Vec::new(),
            lookups: true,
        }
    }

    /// Like [`new`](Self::new), for a walk that looks no host name up.
    pub(super) fn without_lookups(text: &'t str) -> Self {
        Problems {
            lookups: false,
            ..Problems::new(text)
        }
    }

    /// Whether the walk may look host names up.
    pub(super) fn lookups(&self) -> bool {
        self.lookups
    }

    /// The source text the spans point into.
    pub(super) fn text(&self) -> &'t str {
        self.text
    }

    /// A problem at the byte span `span` of the text.
    pub(super) fn at(&mut self, span: Range<usize>, message: String) {
        let offset = span.start.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        self.found.push(Problem {
            line,
            column,
            message,
        });
    }

    /// A problem of the whole source (or of a flag), with no place.
    pub(super) fn general(&mut self, message: String) {
        self.found.push(Problem {
            line: 0,
            column: 0,
            message,
        });
    }

    /// `checked` if its rule held; otherwise reports "`key` why" at
    /// `span` (`why` being the rule's words, such as "must be greater
    /// than zero") and gives `None`.
    pub(super) fn check<T, W: Display>(
        &mut self,
        span: Range<usize>,
        key: &str,
        checked: Result<T, W>,
    ) -> Option<T> {
        checked
            .map_err(|why| self.at(span, format!("`{key}` {why}")))
            .ok()
    }

    /// The outcome of the walk of the source named `origin`: `value` when
    /// there is one and nothing was wrong, else every problem, sorted.
    pub(super) fn finish<T>(self, value: Option<T>, origin: &str) -> Result<T, ConfigError> {
        let mut problems = self.found;
        problems.sort_by_key(|p| (p.line, p.column));
        match value {
            Some(value) if problems.is_empty() => Ok(value),
            _ => Err(ConfigError {
                origin: origin.to_string(),
                problems,
            }),
        }
    }
}
