//! The PROXY protocol header parser (`tcplb::proxy_header::parse`) on
//! arbitrary first bytes of a connection: nothing may panic; a header is
//! never longer than its version's cap nor than the input; `More` asks for
//! at least one byte and never past the cap; a verdict other than `More`
//! stays the same whatever follows (the pair parses again after every
//! read and stops at the first verdict), and every shorter prefix of a
//! header is still `More`; a header read back from what `encode` writes
//! for its addresses has the same addresses.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use tcplb::proxy_header::{Parse, V1_MAX, V2_MAX, Version, encode, parse};

fuzz_target!(|data: &[u8]| {
    let verdict = parse(data);
    match verdict {
        Parse::More(n) => {
            assert!(n > 0, "asked for no byte");
            assert!(data.len() + n <= V2_MAX, "asked past every cap");
        }
        Parse::Done(header, len) => {
            assert!(len <= data.len());
            let cap = match header.version {
                Version::V1 => V1_MAX,
                Version::V2 => V2_MAX,
            };
            assert!(len <= cap, "{len} bytes of {:?}", header.version);
            for cut in [0, len / 2, len - 1] {
                assert!(
                    matches!(parse(&data[..cut]), Parse::More(_)),
                    "a prefix of {cut} bytes of a header is not incomplete"
                );
            }
            if let Some((source, destination)) = header.addresses {
                let again = encode(header.version, source, destination, None);
                let Parse::Done(read, n) = parse(&again) else {
                    panic!("what encode wrote does not read back");
                };
                assert_eq!(n, again.len());
                let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
                let (s, d) = read.addresses.expect("addresses");
                assert_eq!(
                    (canonical(s), canonical(d)),
                    (canonical(source), canonical(destination))
                );
            }
        }
        Parse::Bad(_) => {}
    }
    if !matches!(verdict, Parse::More(_)) {
        let longer = [data, b"\r\n\r\n\0\r\nQUIT\nPROXY x"].concat();
        assert_eq!(parse(&longer), verdict, "more bytes changed it");
    }
});
