//! The documented defaults hold: the README's configuration reference
//! (whose `[defaults]` table shows the defaults), its mTLS example (whose
//! comments say which values are the defaults), its prose, and
//! `tcplb --help` all agree with `Settings::default()` and with what the
//! config parser fills in for a key left out.

use std::process::Command;
use std::time::Duration;

use tcplb::config::{ClusterSettings, Fallback, parse_duration, parse_size};
use tcplb::tls::TlsSettings;
use tcplb::{Config, Settings};

const README: &str = include_str!("../README.md");

/// A config needs an upstream; this one names no host to resolve.
const UPSTREAM: &str =
    "\n[[upstream]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"127.0.0.1:9\"]\n";

/// The TOML code block of the README whose first line starts with `first`.
fn toml_block(first: &str) -> &'static str {
    README
        .split("```toml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.starts_with(first))
        .unwrap_or_else(|| panic!("no ```toml block starting with {first:?} in the README"))
}

/// The `key = value  # comment` lines of the table `header` in `block`.
fn table_lines<'a>(block: &'a str, header: &str) -> Vec<(&'a str, &'a str)> {
    block
        .lines()
        .skip_while(|l| !l.starts_with(header))
        .skip(1)
        .take_while(|l| !l.trim().is_empty() && !l.starts_with('['))
        .map(|l| match l.split_once('#') {
            Some((setting, comment)) => (setting.trim(), comment.trim()),
            None => (l.trim(), ""),
        })
        .collect()
}

fn parse(text: &str) -> Config {
    Config::parse(text, "test.toml").unwrap_or_else(|e| panic!("{e}\nin:\n{text}"))
}

#[test]
fn the_config_reference_shows_the_defaults() {
    let block = toml_block("[defaults]");
    assert!(
        block
            .lines()
            .next()
            .unwrap()
            .contains("values shown are the defaults"),
        "{block}"
    );
    let lines = table_lines(block, "[defaults]");
    assert!(lines.len() >= 10, "{lines:?}");
    // Keys marked optional have no default value: their default is off.
    let (optional, shown): (Vec<_>, Vec<_>) =
        lines.iter().partition(|(_, c)| c.starts_with("optional"));
    let defaults = Settings::default();
    assert_eq!(
        (
            defaults.socket_buffer,
            defaults.source_limit,
            defaults.resolver,
            defaults.keepalive
        ),
        (None, None, None, None)
    );
    let optional: Vec<&str> = optional
        .iter()
        .map(|(s, _)| s.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        optional,
        [
            "socket_buffer",
            "source_rate",
            "source_burst",
            "resolver",
            "keepalive",
            "keepalive_interval",
            "keepalive_probes",
            "accept_proxy"
        ]
    );
    assert!(defaults.accept_proxy.is_empty());
    // The values shown are the defaults: the same as Settings::default(),
    // and as what the parser fills in for an empty table or no table.
    let table: Vec<&str> = shown.iter().map(|(s, _)| *s).collect();
    let documented = parse(&format!("[defaults]\n{}\n{UPSTREAM}", table.join("\n")));
    assert_eq!(documented.settings, defaults);
    assert_eq!(parse(&format!("[defaults]\n{UPSTREAM}")).settings, defaults);
    assert_eq!(parse(UPSTREAM).settings, defaults);
}

#[test]
fn the_mtls_example_marks_its_defaults_truly() {
    let block = toml_block("[tls]");
    let full = parse(block);
    // Without the lines whose comment says they show the default, the
    // parse is the same.
    let is_default = |l: &&str| {
        let comment = l.split_once('#').map_or("", |(_, c)| c.trim());
        comment == "default" || comment.ends_with("(default)") || comment.starts_with("the default")
    };
    let dropped: Vec<&str> = block.lines().filter(is_default).collect();
    let keys: Vec<&str> = dropped
        .iter()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "handshake_timeout",
            "max_handshakes",
            "max_handshakes_per_source",
            "tls"
        ]
    );
    let rest: Vec<&str> = block.lines().filter(|l| !is_default(l)).collect();
    assert_eq!(parse(&rest.join("\n")), full);
    let tls = full.tls.as_ref().unwrap();
    assert_eq!(
        (
            tls.handshake_timeout,
            tls.max_handshakes,
            tls.max_handshakes_per_source
        ),
        (
            TlsSettings::DEFAULT_HANDSHAKE_TIMEOUT,
            TlsSettings::DEFAULT_MAX_HANDSHAKES,
            TlsSettings::DEFAULT_MAX_HANDSHAKES_PER_SOURCE
        )
    );
    // `burst`: "default = rate".
    assert!(block.contains("# bucket size; default = rate"), "{block}");
    let no_burst: Vec<&str> = block.lines().filter(|l| !l.starts_with("burst")).collect();
    let rule = &parse(&no_burst.join("\n")).clients[0];
    assert_eq!(f64::from(rule.burst), rule.rate);
    // `max_connections`: optional, so no cap without it.
    let no_cap: Vec<&str> = block
        .lines()
        .filter(|l| !l.starts_with("max_connections"))
        .collect();
    assert_eq!(parse(&no_cap.join("\n")).clients[0].max_connections, None);
}

#[test]
fn the_cluster_example_marks_its_defaults_truly() {
    let block = toml_block("[cluster]");
    let full = parse(&format!("{block}{UPSTREAM}"));
    let is_default = |l: &&str| {
        l.split_once('#')
            .is_some_and(|(_, c)| c.trim().starts_with("(default)"))
    };
    let keys: Vec<&str> = block
        .lines()
        .filter(is_default)
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["key_prefix", "timeout", "connections_expiry", "fallback"]
    );
    let rest: Vec<&str> = block.lines().filter(|l| !is_default(l)).collect();
    assert_eq!(parse(&format!("{}\n{UPSTREAM}", rest.join("\n"))), full);
    let cluster = full.cluster.unwrap();
    assert_eq!(cluster.key_prefix, ClusterSettings::DEFAULT_KEY_PREFIX);
    assert_eq!(cluster.timeout, ClusterSettings::DEFAULT_TIMEOUT);
    assert_eq!(
        cluster.connections_expiry,
        ClusterSettings::DEFAULT_CONNECTIONS_EXPIRY
    );
    assert_eq!((cluster.fallback, cluster.lease), (Fallback::Split, None));
    // The commented-out `lease` is what the default means for its example.
    assert!(block.contains("#lease = 10"), "{block}");
}

#[test]
fn the_readme_prose_gives_the_default_timeouts() {
    let d = Settings::default();
    let secs = |t: Duration| t.as_secs();
    for claim in [
        format!("connect ({} s)", secs(d.connect_timeout)),
        format!("idle ({} h without a byte", secs(d.idle_timeout) / 3600),
        format!(
            "half-closed ({} s without traffic",
            secs(d.half_close_timeout)
        ),
        format!("`drain_timeout` ({} s)", secs(d.drain_timeout)),
        format!(
            "handshake_timeout = \"{}s\"",
            secs(TlsSettings::DEFAULT_HANDSHAKE_TIMEOUT)
        ),
    ] {
        assert!(README.contains(&claim), "the README does not say {claim:?}");
    }
}

#[test]
fn help_gives_the_documented_defaults() {
    let out = Command::new(env!("CARGO_BIN_EXE_tcplb"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let reference = table_lines(toml_block("[defaults]"), "[defaults]");
    let documented = |key: &str| {
        let (setting, comment) = reference
            .iter()
            .find(|(s, _)| s.split(' ').next() == Some(key))
            .unwrap_or_else(|| panic!("{key} is not in the config reference"));
        let value = setting.split_once('=').unwrap().1.trim().trim_matches('"');
        (value.to_string(), *comment)
    };
    let mut checked = 0;
    for (flag, description) in help
        .split("\n      --")
        .skip(1)
        .filter_map(|f| f.split_once(' '))
    {
        let Some(default) = description
            .split("[default: ")
            .nth(1)
            .map(|d| d.split(']').next().unwrap())
        else {
            continue;
        };
        let key = flag.replace('-', "_");
        if key == "name" {
            continue;
        }
        let (value, comment) = documented(&key);
        let same = match key.as_str() {
            "socket_buffer" => default == "autotuned" && comment.contains("(default: autotuned)"),
            "unsent_limit" => parse_size(default) == parse_size(&value),
            k if k.ends_with("_timeout") => parse_duration(default) == parse_duration(&value),
            k if k.ends_with("_size") => parse_size(default) == parse_size(&value),
            _ => default == value,
        };
        assert!(
            same,
            "--{flag}: help says {default}, the README {value} ({comment})"
        );
        checked += 1;
    }
    assert_eq!(checked, 13, "{help}");
}
