//! Writes the `identity` target's seed certificates (DER) into
//! `seeds/identity/`, made with rcgen like `tcplb certs init` makes them:
//! a CA, a client with a DNS SAN, a client with a URI SAN, and a client
//! with one SAN of every kind. Run once from `fuzz/`:
//!
//!     cargo run --example identity_seeds

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/identity");
    std::fs::create_dir_all(&dir)?;

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "tcplb fuzz seed CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca.der"), ca_cert.der())?;
    let issuer = Issuer::new(ca, ca_key);

    let clients: [(&str, Vec<SanType>); 3] = [
        ("alice", vec![SanType::DnsName("alice".try_into()?)]),
        (
            "bob",
            vec![SanType::URI("spiffe://example.org/bob".try_into()?)],
        ),
        (
            "mixed",
            vec![
                SanType::URI("spiffe://example.org/carol".try_into()?),
                SanType::DnsName("carol.example.org".try_into()?),
                SanType::DnsName("*.example.org".try_into()?),
                SanType::Rfc822Name("carol@example.org".try_into()?),
                SanType::IpAddress("192.0.2.7".parse()?),
                SanType::IpAddress("2001:db8::7".parse()?),
            ],
        ),
    ];
    for (stem, sans) in clients {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = sans;
        params.distinguished_name.push(DnType::CommonName, stem);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(dir.join(format!("{stem}.der")), cert.der())?;
    }
    println!("wrote {}", dir.display());
    Ok(())
}
