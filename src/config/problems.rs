//! Collecting what is wrong with a configuration source: every problem is
//! kept (the walk never stops at the first), each byte span the TOML
//! parser gives is turned into a line and column of the text, and the
//! report comes out sorted by place, problems without a place (line 0)
//! first, each place's problems in the order they were found. Warnings
//! (valid, but likely wrong) are kept apart: they come with the value when
//! there is no problem, and among the problems, marked, when there is.
//! The report also carries the one choice the walk leaves to its caller:
//! whether a `name:port` address is looked up or reported.

use std::fmt::Display;
use std::ops::Range;

use crate::error::{ConfigError, Problem, Warning};

/// The problems found so far in one source text.
pub(super) struct Problems<'t> {
    text: &'t str,
    /// The source's name, as messages start with it.
    origin: &'t str,
    found: Vec<Problem>,
    /// Valid but likely wrong: reported, but the value stands.
    warnings: Vec<Problem>,
    /// Host names in addresses are looked up (else they are problems).
    lookups: bool,
}

impl<'t> Problems<'t> {
    /// An empty report on `text`, the source named `origin` (`text` is
    /// empty for sources such as the command line, whose problems have
    /// no place).
    pub(super) fn new(text: &'t str, origin: &'t str) -> Self {
        Problems {
            text,
            origin,
            found: Vec::new(),
            warnings: Vec::new(),
            lookups: true,
        }
    }

    /// Like [`new`](Self::new), for a walk that looks no host name up.
    pub(super) fn without_lookups(text: &'t str, origin: &'t str) -> Self {
        Problems {
            lookups: false,
            ..Problems::new(text, origin)
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

    /// Line and column (1-based) of byte `span.start`.
    fn position(&self, span: Range<usize>) -> (usize, usize) {
        let offset = span.start.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, column)
    }

    /// `origin:line:column` of a span, for messages made later (TLS files).
    pub(super) fn place(&self, span: Range<usize>) -> String {
        let (line, column) = self.position(span);
        format!("{}:{line}:{column}", self.origin)
    }

    /// A problem at the byte span `span` of the text.
    pub(super) fn at(&mut self, span: Range<usize>, message: String) {
        let (line, column) = self.position(span);
        self.found.push(Problem {
            line,
            column,
            message,
        });
    }

    /// A warning at the byte span `span`: the value stands.
    pub(super) fn warn(&mut self, span: Range<usize>, message: String) {
        let (line, column) = self.position(span);
        self.warnings.push(Problem {
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

    /// The outcome of the walk: `value` and the warnings when there is a
    /// value and nothing was wrong, else every problem, sorted, with the
    /// warnings among them (marked "warning: ").
    pub(super) fn finish<T>(self, value: Option<T>) -> Result<(T, Vec<Warning>), ConfigError> {
        let origin = self.origin;
        match value {
            Some(value) if self.found.is_empty() => {
                let mut warnings = self.warnings;
                warnings.sort_by_key(|p| (p.line, p.column));
                let warnings = warnings
                    .into_iter()
                    .map(|p| Warning {
                        at: match p.line {
                            0 => origin.to_string(),
                            line => format!("{origin}:{line}:{}", p.column),
                        },
                        message: p.message,
                    })
                    .collect();
                Ok((value, warnings))
            }
            _ => {
                let mut problems = self.found;
                problems.extend(self.warnings.into_iter().map(|p| Problem {
                    message: format!("warning: {}", p.message),
                    ..p
                }));
                problems.sort_by_key(|p| (p.line, p.column));
                Err(ConfigError {
                    origin: origin.to_string(),
                    problems,
                })
            }
        }
    }
}
