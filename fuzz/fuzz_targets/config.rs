//! The config parser on arbitrary text: every input either parses or
//! comes back as a list of problems; nothing may panic. It reads with
//! `parse_without_lookups`, so a `name:port` address is a problem rather
//! than a query to the resolver: a run never touches the network, and
//! its outcome does not depend on what a DNS server answers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcplb::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse_without_lookups(text, "fuzz.toml") {
        Ok(config) => {
            // A valid config has at least one upstream, each with a host.
            assert!(!config.upstreams.is_empty());
            assert!(config.upstreams.iter().all(|u| !u.hosts.is_empty()));
        }
        Err(error) => {
            // Rendering the report must not panic either.
            let _ = error.to_string();
        }
    }
});
