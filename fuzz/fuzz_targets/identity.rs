//! `peer_names` and `fingerprint` on arbitrary bytes taken as a DER
//! certificate, as a client would present one: nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let cert = CertificateDer::from(data);
    let names = tcplb::tls::peer_names(&cert);
    std::hint::black_box(names);
    let fingerprint = tcplb::tls::fingerprint(&cert);
    assert_eq!(fingerprint.len(), 64);
    assert!(fingerprint.bytes().all(|b| b.is_ascii_hexdigit()));
});
