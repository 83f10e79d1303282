//! The admin listener's request head parser (httparse behind
//! `tcplb::admin::parse_request`) on arbitrary bytes: nothing may panic; a
//! parsed request's path is absolute, ASCII and query-free; only a short
//! input can still be incomplete; and once a verdict is given, more bytes
//! do not change it (the connection parses again after every read and
//! stops at the first verdict).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcplb::admin::{MAX_REQUEST, Parse, parse_request};

fuzz_target!(|data: &[u8]| {
    let verdict = parse_request(data);
    match &verdict {
        Parse::Done(req) => {
            assert!(
                req.path.starts_with('/'),
                "path {:?} is not absolute",
                req.path
            );
            assert!(!req.path.contains('?'), "path {:?} keeps a query", req.path);
            assert!(req.path.is_ascii(), "path {:?} is not ASCII", req.path);
        }
        Parse::Incomplete => assert!(
            data.len() < MAX_REQUEST,
            "{} bytes are still incomplete",
            data.len()
        ),
        Parse::Bad(_) => {}
    }
    if verdict != Parse::Incomplete {
        let longer = [data, b"\r\n\r\nx"].concat();
        assert_eq!(parse_request(&longer), verdict, "more bytes changed it");
    }
});
