//! Finding keys and tables in a parsed TOML document, reporting what is
//! not where the schema wants it (not a table, not an array of tables,
//! an unknown key). Shared by every part of the schema walk.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

use super::problems::Problems;
use super::values::Value;

/// The value of `key` in `table`, if it is there.
pub(super) fn find<'a, 'i>(table: &'a DeTable<'i>, key: &str) -> Option<&'a Value<'i>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == key)
        .map(|(_, v)| v)
}

/// A key the table must have, read by `read`; reported as `missing` at
/// the table's `span` when it is not there.
pub(super) fn required<T>(
    p: &mut Problems<'_>,
    (table, span): (&DeTable<'_>, &Range<usize>),
    key: &str,
    missing: impl FnOnce() -> String,
    read: impl FnOnce(&mut Problems<'_>, &Value<'_>) -> Option<T>,
) -> Option<T> {
    match find(table, key) {
        Some(v) => read(p, v),
        None => {
            p.at(span.clone(), missing());
            None
        }
    }
}

/// `v` as a table, or `not_a_table` reported at its span.
pub(super) fn as_table<'a, 'i>(
    p: &mut Problems<'_>,
    v: &'a Value<'i>,
    not_a_table: String,
) -> Option<&'a DeTable<'i>> {
    match v.get_ref() {
        DeValue::Table(t) => Some(t),
        _ => {
            p.at(v.span(), not_a_table);
            None
        }
    }
}

/// The tables of an array of tables (`[[key]]`), reporting anything else.
pub(super) fn tables<'a, 'i>(
    p: &mut Problems<'_>,
    root: &'a DeTable<'i>,
    key: &str,
) -> Vec<(&'a DeTable<'i>, Range<usize>)> {
    let Some(v) = find(root, key) else {
        return Vec::new();
    };
    let DeValue::Array(items) = v.get_ref() else {
        let message = format!("`{key}` must be an array of tables ([[{key}]])");
        p.at(v.span(), message);
        return Vec::new();
    };
    if items.is_empty() {
        p.at(v.span(), format!("`{key}` is empty"));
    }
    let mut tables = Vec::new();
    for item in items.iter() {
        match item.get_ref() {
            DeValue::Table(t) => tables.push((t, item.span())),
            _ => p.at(
                item.span(),
                format!("each {key} must be a table ([[{key}]])"),
            ),
        }
    }
    tables
}

/// Reports each key of `table` not in `allowed`; `place` says where, e.g. "in [tls]".
pub(super) fn unknown_keys(
    p: &mut Problems<'_>,
    table: &DeTable<'_>,
    allowed: &[&str],
    place: &str,
) {
    for (key, _) in table.iter() {
        if !allowed.contains(&key.get_ref().as_ref()) {
            let message = format!(
                "unknown key `{}` {place} (expected one of: {})",
                key.get_ref(),
                allowed.join(", ")
            );
            p.at(key.span(), message);
        }
    }
}
