//! The walk of `[[client]]` tables: each names an identity from client
//! certificates, the TLS upstreams it may use, and its rate and
//! concurrency limits. Rules are checked against the upstreams already
//! walked (they must exist and be TLS upstreams), against `[tls]` (without
//! it no client has an identity), and against each other (one rule per
//! identity).

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::problems::Problems;
use super::rules;
use super::tables::{find, tables, unknown_keys};
use super::upstreams::ParsedUpstream;
use super::values::{Value, integer, rate, string};
use crate::policy::access::ClientRule;
use crate::policy::limits::Limit;

const CLIENT_KEYS: &[&str] = &["identity", "upstreams", "rate", "burst", "max_connections"];

/// What one `[[client]]` table yielded: its identity with its span, if
/// readable, and the whole rule if the table had no problem.
pub(super) struct ParsedClient {
    identity: Option<Spanned<String>>,
    pub(super) rule: Option<ClientRule>,
}

/// Every `[[client]]` of the document, checked against `upstreams`, the
/// presence of `[tls]` and each other.
pub(super) fn clients(
    p: &mut Problems<'_>,
    root: &DeTable<'_>,
    upstreams: &[ParsedUpstream],
    tls_present: bool,
) -> Vec<ParsedClient> {
    let parsed: Vec<ParsedClient> = tables(p, root, "client")
        .into_iter()
        .map(|(table, span)| client(p, table, span, upstreams))
        .collect();
    if !parsed.is_empty() && !tls_present {
        let span = find(root, "client").map_or(0..0, |v| v.span());
        let message =
            "[[client]] rules need a [tls] table: identities come from client certificates";
        p.at(span, message.to_string());
    }
    unique_identities(p, &parsed);
    if tls_present {
        unused_tls_upstreams(p, root, upstreams, &parsed);
    }
    parsed
}

/// A TLS upstream that no rule names refuses every client (`unauthorized`):
/// valid, and useful to lock everyone out, but likely a mistake, so a
/// warning, once at `[tls]` when there are no rules at all.
fn unused_tls_upstreams(
    p: &mut Problems<'_>,
    root: &DeTable<'_>,
    upstreams: &[ParsedUpstream],
    clients: &[ParsedClient],
) {
    let tls_upstreams = upstreams
        .iter()
        .filter(|u| u.config.as_ref().is_some_and(|c| c.tls));
    if clients.is_empty() {
        if tls_upstreams.count() > 0 {
            let span = find(root, "tls").map_or(0..0, |v| v.span());
            let message = "[tls] has no [[client]] rule: every client of a TLS upstream will be refused as `unauthorized`";
            p.warn(span, message.to_string());
        }
        return;
    }
    // A rule with a problem is already reported; what it would allow is unknown.
    let Some(rules) = clients
        .iter()
        .map(|c| c.rule.as_ref())
        .collect::<Option<Vec<_>>>()
    else {
        return;
    };
    for u in tls_upstreams {
        let Some(name) = &u.name else { continue };
        if !rules.iter().any(|r| r.upstreams.contains(name.get_ref())) {
            let message = format!(
                "upstream `{}` speaks TLS but no [[client]] rule names it: every client will be refused as `unauthorized`",
                name.get_ref()
            );
            p.warn(name.span(), message);
        }
    }
}

fn client(
    p: &mut Problems<'_>,
    table: &DeTable<'_>,
    span: Range<usize>,
    upstreams: &[ParsedUpstream],
) -> ParsedClient {
    unknown_keys(p, table, CLIENT_KEYS, "in [[client]]");
    let identity = match find(table, "identity") {
        Some(v) => identity(p, v),
        None => {
            p.at(span.clone(), "client has no `identity`".into());
            None
        }
    };
    let label = identity.as_ref().map_or_else(
        || "client".to_string(),
        |i| format!("client `{}`", i.get_ref()),
    );
    let allowed = match find(table, "upstreams") {
        Some(v) => allowed_upstreams(p, v, &label, upstreams),
        None => {
            p.at(span.clone(), format!("{label} has no `upstreams`"));
            None
        }
    };
    let rate = match find(table, "rate") {
        Some(v) => rate(p, v, "rate"),
        None => {
            let message = format!("{label} has no `rate` (new connections per second)");
            p.at(span, message);
            None
        }
    };
    let mut optional = |key: &str, bounds| {
        find(table, key).map_or(Some(None), |v| {
            integer(p, v, key, bounds).map(|n| Some(n as u32))
        })
    };
    let burst = optional("burst", rules::BURST);
    let max_connections = optional("max_connections", rules::CONNECTIONS);
    let rule = match (&identity, allowed, rate, burst, max_connections) {
        (Some(identity), Some(upstreams), Some(rate), Some(burst), Some(max_connections)) => {
            Some(ClientRule {
                identity: identity.get_ref().clone(),
                upstreams,
                rate,
                burst: burst.unwrap_or_else(|| Limit::per_second(rate).burst()),
                max_connections,
            })
        }
        _ => None,
    };
    ParsedClient { identity, rule }
}

fn identity(p: &mut Problems<'_>, v: &Value<'_>) -> Option<Spanned<String>> {
    let identity = string(p, v, "identity")?;
    p.check(v.span(), "identity", rules::identity(identity))?;
    Some(Spanned::new(v.span(), identity.to_string()))
}

/// `upstreams` of a client: names of existing TLS upstreams.
fn allowed_upstreams(
    p: &mut Problems<'_>,
    v: &Value<'_>,
    label: &str,
    upstreams: &[ParsedUpstream],
) -> Option<Vec<String>> {
    let DeValue::Array(items) = v.get_ref() else {
        let message = format!("{label}: `upstreams` must be an array of upstream names");
        p.at(v.span(), message);
        return None;
    };
    let mut names = Vec::new();
    let mut ok = true;
    for item in items.iter() {
        let Some(name) = string(p, item, "upstreams") else {
            ok = false;
            continue;
        };
        let found = upstreams
            .iter()
            .find(|u| u.name.as_ref().is_some_and(|n| n.get_ref() == name));
        match found {
            None => {
                p.at(
                    item.span(),
                    format!("{label}: no upstream is named `{name}`"),
                );
                ok = false;
            }
            Some(u) if u.config.as_ref().is_some_and(|c| !c.tls) => {
                let message = format!(
                    "{label}: upstream `{name}` is plain TCP, where clients have no identity (set `tls = true` on it)"
                );
                p.at(item.span(), message);
                ok = false;
            }
            Some(_) => names.push(name.to_string()),
        }
    }
    ok.then_some(names)
}

/// An identity given to two rules is reported at the second.
fn unique_identities(p: &mut Problems<'_>, clients: &[ParsedClient]) {
    for (i, c) in clients.iter().enumerate() {
        let Some(identity) = &c.identity else {
            continue;
        };
        let taken = clients[..i]
            .iter()
            .filter_map(|e| e.identity.as_ref())
            .any(|e| e.get_ref() == identity.get_ref());
        if taken {
            let message = format!("duplicate client identity `{}`", identity.get_ref());
            p.at(identity.span(), message);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{problems, warnings};

    const TLS: &str = "[tls]\ncert = \"s.pem\"\nkey = \"s.key\"\nclient_ca = \"ca.pem\"\n\n\
        [[upstream]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"127.0.0.1:1\"]\n\n\
        [[upstream]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"127.0.0.1:1\"]\n";

    #[test]
    fn identities_that_can_never_match_are_errors() {
        let rule = |identity: &str| {
            format!(
                "{TLS}\n[[client]]\nidentity = \"{identity}\"\nupstreams = [\"a\", \"b\"]\nrate = 1\n"
            )
        };
        for good in [
            "alice",
            "spiffe://example.org/bob",
            "urn:uuid:1234",
            "*.example.org",
            "svc_a.internal",
        ] {
            assert!(
                crate::config::Config::parse(&rule(good), "lb.toml").is_ok(),
                "{good}"
            );
        }
        for (bad, why) in [
            ("10.0.0.1", "is an IP address, which never matches"),
            ("::1", "is an IP address, which never matches"),
            (
                "CN=alice",
                "looks like a subject name (`CN=...`), which is never used",
            ),
            ("O=Org,CN=alice", "looks like a subject name"),
            ("-alice-", "is neither a DNS name nor a URI"),
        ] {
            let found = problems(&rule(bad));
            assert_eq!(found.len(), 1, "{bad}: {found:?}");
            assert!(
                found[0].starts_with("lb.toml:17:12: `identity` "),
                "{bad}: {found:?}"
            );
            assert!(found[0].contains(why), "{bad}: {found:?}");
        }
    }

    #[test]
    fn tls_upstreams_no_rule_names_are_warnings() {
        assert_eq!(
            warnings(TLS),
            [
                "lb.toml:1:1: warning: [tls] has no [[client]] rule: every client of a TLS upstream will be refused as `unauthorized`"
            ]
        );
        let only_a =
            format!("{TLS}\n[[client]]\nidentity = \"alice\"\nupstreams = [\"a\"]\nrate = 1\n");
        assert_eq!(
            warnings(&only_a),
            [
                "lb.toml:12:8: warning: upstream `b` speaks TLS but no [[client]] rule names it: every client will be refused as `unauthorized`"
            ]
        );
        let plain = TLS.replace(
            "hosts = [\"127.0.0.1:1\"]\n",
            "hosts = [\"127.0.0.1:1\"]\ntls = false\n",
        );
        assert_eq!(
            warnings(&plain),
            Vec::<String>::new(),
            "no TLS upstream, nobody refused"
        );
        // Among errors, warnings are listed too.
        let broken =
            format!("{TLS}\n[[client]]\nidentity = \"alice\"\nupstreams = [\"a\"]\nrate = 0\n");
        let found = problems(&broken);
        assert!(
            found.iter().all(|p| !p.contains("warning")),
            "a broken rule names nothing for sure: {found:?}"
        );
        let found = problems(&format!("{TLS}bogus = 1\n"));
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("lb.toml:1:1: warning: [tls] has no [[client]] rule"),
            "{found:?}"
        );
    }

    #[test]
    fn client_rules_are_checked_against_upstreams() {
        let found = problems(
            r#"[tls]
cert = "s.pem"
client_ca = "ca.pem"

[[upstream]]
name = "a"
listen = "127.0.0.1:0"
hosts = ["127.0.0.1:1"]

[[upstream]]
name = "p"
listen = "127.0.0.1:0"
hosts = ["127.0.0.1:1"]
tls = false

[[client]]
identity = "alice"
upstreams = ["a", "nope", "p"]
rate = 0

[[client]]
identity = "alice"
upstreams = ["a"]
rate = 1
"#,
        );
        let text = found.join("\n");
        assert!(text.contains("lb.toml:1:1: [tls] has no `key`"), "{text}");
        assert!(text.contains("no upstream is named `nope`"), "{text}");
        assert!(text.contains("upstream `p` is plain TCP"), "{text}");
        assert!(text.contains("`rate` must be between 1/86400"), "{text}");
        assert!(
            text.contains("22:12: duplicate client identity `alice`"),
            "{text}"
        );
        let found = problems(
            "[[upstream]]\nname=\"a\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\ntls=true\n[[client]]\nidentity=\"x\"\nupstreams=[\"a\"]\nrate=1\n",
        );
        let text = found.join("\n");
        assert!(
            text.contains("`tls = true` but there is no [tls] table"),
            "{text}"
        );
        assert!(
            text.contains("[[client]] rules need a [tls] table"),
            "{text}"
        );
    }
}
