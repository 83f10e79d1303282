//! The admin listener's request head parser on arbitrary bytes: nothing
//! may panic, and a parsed request's path is absolute and query-free.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcplb::admin::{Parse, parse_request};

fuzz_target!(|data: &[u8]| {
    if let Parse::Done(req) = parse_request(data) {
        assert!(
            req.path.starts_with('/'),
            "path {:?} is not absolute",
            req.path
        );
        assert!(!req.path.contains('?'), "path {:?} keeps a query", req.path);
    }
});
