//! What went wrong with TLS, in words: the errors of rustls (a failed
//! handshake) and webpki (a certificate or CRL file that does not parse)
//! as sentences for the log and for start-up errors. Times are RFC 3339,
//! never UNIX seconds, and no Rust debug name (`TrailingData(..)`,
//! `SignatureAlgorithmsExtensionRequired`) reaches a reader: the cases a
//! person meets get their own sentence, and any other is spelt out from
//! its name ("trailing data (signed data)").

use rustls::{CertificateError, PeerIncompatible};
use rustls_pki_types::UnixTime;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Why a client's handshake failed, for the `handshake_failed` log line.
pub(crate) fn handshake_failure(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::PeerIncompatible(why) => match why {
            // A TLS 1.0 or 1.1 ClientHello carries no signature_algorithms,
            // and rustls checks for it before it looks at the version.
            PeerIncompatible::SignatureAlgorithmsExtensionRequired
            | PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::ServerDoesNotSupportTls12Or13 => {
                "protocol version not supported (the client offers neither TLS 1.2 nor 1.3)"
                    .to_string()
            }
            PeerIncompatible::NoCipherSuitesInCommon => "no cipher suite in common".to_string(),
            PeerIncompatible::NoKxGroupsInCommon => "no key exchange group in common".to_string(),
            PeerIncompatible::NoSignatureSchemesInCommon => {
                "no signature scheme in common".to_string()
            }
            other => format!("client incompatible: {}", spelt_out(&format!("{other:?}"))),
        },
        E::NoCertificatesPresented => "the client sent no certificate".to_string(),
        E::InvalidCertificate(why) => client_certificate(why),
        E::AlertReceived(alert) => {
            format!(
                "the client sent the alert {}",
                spelt_out(&format!("{alert:?}"))
            )
        }
        E::PeerMisbehaved(why) => {
            format!("protocol violation: {}", spelt_out(&format!("{why:?}")))
        }
        E::InvalidMessage(why) => {
            format!(
                "malformed message (not TLS?): {}",
                spelt_out(&format!("{why:?}"))
            )
        }
        E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            "a message out of order".to_string()
        }
        E::InvalidCertRevocationList(why) => format!("a CRL is unusable: {}", crl_problem(why)),
        E::DecryptError => "cannot decrypt the client's message".to_string(),
        E::PeerSentOversizedRecord => "the client sent an oversized record".to_string(),
        other => spelt_out(&other.to_string()),
    }
}

/// Why a client's certificate was refused.
fn client_certificate(e: &CertificateError) -> String {
    use CertificateError as C;
    match e {
        C::ExpiredContext { time, not_after } => format!(
            "client certificate expired at {} (it is now {})",
            rfc3339(*not_after),
            rfc3339(*time)
        ),
        C::Expired => "client certificate expired".to_string(),
        C::NotValidYetContext { time, not_before } => format!(
            "client certificate not valid before {} (it is now {})",
            rfc3339(*not_before),
            rfc3339(*time)
        ),
        C::NotValidYet => "client certificate not valid yet".to_string(),
        C::ExpiredRevocationListContext { time, next_update } => format!(
            "the CRL expired at {} (it is now {}): revocation cannot be checked",
            rfc3339(*next_update),
            rfc3339(*time)
        ),
        C::ExpiredRevocationList => "the CRL expired: revocation cannot be checked".to_string(),
        C::Revoked => "client certificate revoked".to_string(),
        C::UnknownIssuer => "client certificate not issued by client_ca".to_string(),
        C::UnknownRevocationStatus => {
            "client certificate's revocation status unknown (no CRL of its issuer)".to_string()
        }
        C::BadEncoding => "malformed client certificate".to_string(),
        C::BadSignature => "bad signature on the client certificate".to_string(),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            "client certificate not for client authentication (extended key usage)".to_string()
        }
        C::UnhandledCriticalExtension => {
            "client certificate has an unsupported critical extension".to_string()
        }
        other => format!(
            "client certificate refused: {}",
            spelt_out(&other.to_string())
        ),
    }
}

/// Why a handshake with a server (Redis, for `[cluster]`) failed, or why
/// the server ended the session: its certificate refused, or its alert.
/// `trusted` says what verifies its certificate ("a CA of tls_ca").
pub(crate) fn server_failure(e: &rustls::Error, trusted: &str) -> String {
    use rustls::AlertDescription as A;
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(why) => server_certificate(why, trusted),
        E::AlertReceived(A::CertificateRequired) => {
            "it requires a client certificate (set tls_cert and tls_key)".to_string()
        }
        E::AlertReceived(
            alert @ (A::BadCertificate
            | A::UnknownCA
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::AccessDenied),
        ) => format!(
            "it refused tcplb's client certificate (tls_cert), with the alert {}",
            spelt_out(&format!("{alert:?}"))
        ),
        E::AlertReceived(alert) => {
            format!("it sent the alert {}", spelt_out(&format!("{alert:?}")))
        }
        E::PeerIncompatible(why) => {
            format!("it is incompatible: {}", spelt_out(&format!("{why:?}")))
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            "it does not speak TLS there (a plain port? use redis:// for it)".to_string()
        }
        E::PeerMisbehaved(why) => {
            format!("protocol violation: {}", spelt_out(&format!("{why:?}")))
        }
        E::DecryptError => "cannot decrypt its message".to_string(),
        other => spelt_out(&other.to_string()),
    }
}

/// Why a server's certificate was refused.
fn server_certificate(e: &CertificateError, trusted: &str) -> String {
    use CertificateError as C;
    match e {
        C::UnknownIssuer => format!("its certificate is not issued by {trusted}"),
        C::NotValidForNameContext {
            expected,
            presented,
        } => {
            let expected = match expected {
                rustls_pki_types::ServerName::DnsName(name) => name.as_ref().to_string(),
                rustls_pki_types::ServerName::IpAddress(ip) => {
                    std::net::IpAddr::from(*ip).to_string()
                }
                other => format!("{other:?}"),
            };
            let names = if presented.is_empty() {
                "none".to_string()
            } else {
                presented.join(", ")
            };
            format!("its certificate is not for {expected} (the URL's host); its names: {names}")
        }
        C::NotValidForName => "its certificate is not for the URL's host".to_string(),
        C::ExpiredContext { time, not_after } => format!(
            "its certificate expired at {} (it is now {})",
            rfc3339(*not_after),
            rfc3339(*time)
        ),
        C::Expired => "its certificate expired".to_string(),
        C::NotValidYetContext { time, not_before } => format!(
            "its certificate is not valid before {} (it is now {})",
            rfc3339(*not_before),
            rfc3339(*time)
        ),
        C::NotValidYet => "its certificate is not valid yet".to_string(),
        C::Revoked => "its certificate is revoked".to_string(),
        C::BadEncoding => "its certificate is malformed".to_string(),
        C::BadSignature => "the signature on its certificate is bad".to_string(),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            "its certificate is not for server authentication (extended key usage)".to_string()
        }
        other => format!(
            "its certificate is refused: {}",
            spelt_out(&other.to_string())
        ),
    }
}

/// What webpki found wrong with a certificate or CRL it parsed.
pub(crate) fn webpki_error(e: &webpki::Error) -> String {
    use webpki::Error as W;
    match e {
        W::BadDer => "not valid DER".to_string(),
        W::BadDerTime => "a malformed date".to_string(),
        W::TrailingData(what) => format!("unexpected data after the {}", der_type(what)),
        W::CertExpired { not_after, .. } => format!("expired at {}", rfc3339(*not_after)),
        W::CertNotValidYet { not_before, .. } => {
            format!("not valid before {}", rfc3339(*not_before))
        }
        W::CrlExpired { next_update, .. } => format!("expired at {}", rfc3339(*next_update)),
        W::UnsupportedCertVersion => "not an X.509 version 3 certificate".to_string(),
        W::UnsupportedCrlVersion => "not a version 2 CRL".to_string(),
        W::UnsupportedDeltaCrl => "a delta CRL, which is not supported".to_string(),
        W::UnsupportedIndirectCrl => "an indirect CRL, which is not supported".to_string(),
        W::InvalidCrlNumber => "an invalid CRL number".to_string(),
        W::InvalidSerialNumber => "an invalid serial number".to_string(),
        W::MalformedExtensions | W::ExtensionValueInvalid => "malformed extensions".to_string(),
        W::UnsupportedCriticalExtension => "an unsupported critical extension".to_string(),
        W::IssuerNotCrlSigner => "its issuer may not sign CRLs (no cRLSign key usage)".to_string(),
        other => spelt_out(&format!("{other:?}")),
    }
}

/// What is wrong with a PEM file (its markers as text, not bytes).
pub(crate) fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error as P;
    match e {
        P::MissingSectionEnd { end_marker } => {
            let marker = String::from_utf8_lossy(end_marker);
            format!("a section does not end (no \"-----END {marker}-----\")")
        }
        P::IllegalSectionStart { line } => {
            let line = String::from_utf8_lossy(line);
            format!("a section starts with an illegal line \"{line}\"")
        }
        other => other.to_string(),
    }
}

/// What the client verifier could not be built from.
pub(crate) fn verifier_error(e: &rustls::server::VerifierBuilderError) -> String {
    match e {
        rustls::server::VerifierBuilderError::InvalidCrl(why) => {
            format!("malformed CRL: {}", crl_problem(why))
        }
        other => other.to_string(),
    }
}

/// What rustls found wrong with a CRL as it checked a client against it.
fn crl_problem(e: &rustls::CertRevocationListError) -> String {
    use rustls::CertRevocationListError as R;
    match e {
        R::BadSignature => "its signature does not verify with its issuer's key".to_string(),
        R::IssuerInvalidForCrl => "its issuer may not sign CRLs (no cRLSign key usage)".to_string(),
        R::ParseError => "malformed".to_string(),
        R::UnsupportedSignatureAlgorithmContext { .. }
        | R::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            "signed with an unsupported algorithm".to_string()
        }
        other => spelt_out(&format!("{other:?}")),
    }
}

/// A DER type of webpki's, as a reader calls it.
fn der_type(id: &webpki::DerTypeId) -> String {
    use webpki::DerTypeId as D;
    match id {
        D::CertRevocationList => "CRL".to_string(),
        D::Certificate => "certificate".to_string(),
        other => spelt_out(&format!("{other:?}")),
    }
}

/// A time as RFC 3339 (`2026-11-25T10:00:00Z`).
pub(crate) fn rfc3339(time: UnixTime) -> String {
    rfc3339_secs(i64::try_from(time.as_secs()).unwrap_or(i64::MAX))
}

/// Seconds since 1970 as RFC 3339.
pub(crate) fn rfc3339_secs(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{secs} s after 1970"))
}

/// A Rust name spelt out in words: `TrailingData(CertRevocationList)`
/// becomes "trailing data (cert revocation list)"; other text is kept.
fn spelt_out(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    let mut prev: Option<char> = None;
    for c in name.chars() {
        match c {
            '(' => out.push_str(" ("),
            c if c.is_ascii_uppercase() => {
                if prev.is_some_and(|p| p.is_ascii_lowercase() || p.is_ascii_digit()) {
                    out.push(' ');
                }
                out.push(c.to_ascii_lowercase());
            }
            c => out.push(c),
        }
        prev = Some(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn old_protocol_versions_say_so() {
        for why in [
            PeerIncompatible::SignatureAlgorithmsExtensionRequired,
            PeerIncompatible::Tls12NotOffered,
        ] {
            assert_eq!(
                handshake_failure(&rustls::Error::PeerIncompatible(why)),
                "protocol version not supported (the client offers neither TLS 1.2 nor 1.3)"
            );
        }
    }

    #[test]
    fn expiry_times_are_rfc3339() {
        let at = |secs| UnixTime::since_unix_epoch(Duration::from_secs(secs));
        let expired = CertificateError::ExpiredContext {
            time: at(1_764_000_000),
            not_after: at(1_609_459_200),
        };
        assert_eq!(
            handshake_failure(&rustls::Error::InvalidCertificate(expired)),
            "client certificate expired at 2021-01-01T00:00:00Z (it is now 2025-11-24T16:00:00Z)"
        );
    }

    #[test]
    fn no_debug_names_reach_the_reader() {
        let crl = webpki::Error::TrailingData(webpki::DerTypeId::CertRevocationList);
        assert_eq!(webpki_error(&crl), "unexpected data after the CRL");
        assert_eq!(
            webpki_error(&webpki::Error::MaximumPathDepthExceeded),
            "maximum path depth exceeded"
        );
        let bad = rustls::Error::InvalidCertRevocationList(
            rustls::CertRevocationListError::UnsupportedRevocationReason,
        );
        assert_eq!(
            handshake_failure(&bad),
            "a CRL is unusable: unsupported revocation reason"
        );
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate);
        assert_eq!(
            handshake_failure(&alert),
            "the client sent the alert bad certificate"
        );
        let pem = rustls_pki_types::pem::Error::MissingSectionEnd {
            end_marker: b"CERTIFICATE".to_vec(),
        };
        assert_eq!(
            pem_error(&pem),
            "a section does not end (no \"-----END CERTIFICATE-----\")"
        );
        let revoked = rustls::Error::InvalidCertificate(CertificateError::Revoked);
        assert_eq!(handshake_failure(&revoked), "client certificate revoked");
    }

    #[test]
    fn a_servers_refusals_are_worded_for_its_side() {
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert_eq!(
            server_failure(&unknown, "a CA of tls_ca"),
            "its certificate is not issued by a CA of tls_ca"
        );
        let name = rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected: rustls_pki_types::ServerName::try_from("127.0.0.2").unwrap(),
            presented: vec!["DnsName(\"localhost\")".to_string()],
        });
        let why = server_failure(&name, "x");
        assert!(
            why.starts_with("its certificate is not for 127.0.0.2 (the URL's host)"),
            "{why}"
        );
        let required = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        assert_eq!(
            server_failure(&required, "x"),
            "it requires a client certificate (set tls_cert and tls_key)"
        );
        let refused = rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA);
        assert_eq!(
            server_failure(&refused, "x"),
            "it refused tcplb's client certificate (tls_cert), with the alert unknown ca"
        );
    }
}
