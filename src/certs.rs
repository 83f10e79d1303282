//! Development certificates (`tcplb certs init`, and `tcplb demo`): a CA,
//! a server certificate and client certificates whose SANs are the client
//! names, made with rcgen. Not for production: the CA key sits next to
//! the certificates it signed.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, date_time_ymd,
};

use crate::error::Error;

/// Validity of generated certificates, from yesterday.
const VALID_DAYS: i64 = 825;

/// What [`init`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// (client name, certificate, key)
    pub clients: Vec<(String, PathBuf, PathBuf)>,
}

/// Creates `dir` and writes `ca.pem`/`ca.key`, `server.pem`/`server.key`
/// (for `server_names`, DNS names or IP addresses) and `<client>.pem`/
/// `<client>.key` for each client, whose certificate carries the name as a
/// DNS SAN, or as a URI SAN when it contains "://".
pub fn init(dir: &Path, server_names: &[String], clients: &[String]) -> Result<Written, Error> {
    let fail = |what: &str, e: rcgen::Error| Error::Setup {
        what: "certificates",
        source: std::io::Error::other(format!("{what}: {e}")),
    };
    std::fs::create_dir_all(dir).map_err(|source| Error::Setup {
        what: "the certificate directory",
        source,
    })?;
    let ((y1, m1, d1), (y2, m2, d2)) = validity();
    let (not_before, not_after) = (date_time_ymd(y1, m1, d1), date_time_ymd(y2, m2, d2));

    let ca_key = KeyPair::generate().map_err(|e| fail("CA key", e))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| fail("CA", e))?;
    ca.distinguished_name = name("tcplb development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (ca.not_before, ca.not_after) = (not_before, not_after);
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| fail("CA", e))?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);

    let issue = |names: Vec<String>, uri: bool, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(if uri { Vec::new() } else { names.clone() })?;
        if uri {
            params.subject_alt_names = names
                .iter()
                .map(|n| Ok(rcgen::SanType::URI(n.clone().try_into()?)))
                .collect::<Result<_, rcgen::Error>>()?;
        }
        params.distinguished_name = name(&names[0]);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        (params.not_before, params.not_after) = (not_before, not_after);
        let cert = params.signed_by(&key, &issuer)?;
        Ok::<_, rcgen::Error>((cert.pem(), key.serialize_pem()))
    };

    let write = |file: &str, text: &str| -> Result<PathBuf, Error> {
        let path = dir.join(file);
        std::fs::write(&path, text).map_err(|source| Error::Setup {
            what: "a certificate file",
            source: std::io::Error::new(source.kind(), format!("{}: {source}", path.display())),
        })?;
        Ok(path)
    };
    let ca_path = write("ca.pem", &ca_cert.pem())?;
    write("ca.key", &ca_key_pem)?;
    let (cert, key) = issue(
        server_names.to_vec(),
        false,
        ExtendedKeyUsagePurpose::ServerAuth,
    )
    .map_err(|e| fail("server certificate", e))?;
    let server_cert = write("server.pem", &cert)?;
    let server_key = write("server.key", &key)?;
    let mut written = Vec::new();
    for client in clients {
        let (cert, key) = issue(
            vec![client.clone()],
            client.contains("://"),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
        .map_err(|e| fail(&format!("certificate for {client}"), e))?;
        let stem = file_stem(client);
        let cert_path = write(&format!("{stem}.pem"), &cert)?;
        let key_path = write(&format!("{stem}.key"), &key)?;
        written.push((client.clone(), cert_path, key_path));
    }
    Ok(Written {
        ca: ca_path,
        server_cert,
        server_key,
        clients: written,
    })
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A file name for a client name (a URI's last path segment, made safe).
fn file_stem(client: &str) -> String {
    let last = client.rsplit('/').find(|s| !s.is_empty()).unwrap_or(client);
    last.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// (first day, last day) of validity: from yesterday (clock skew) for [`VALID_DAYS`].
type Ymd = (i32, u8, u8);
fn validity() -> (Ymd, Ymd) {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    (
        civil_from_days(days - 1),
        civil_from_days(days - 1 + VALID_DAYS),
    )
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year as i32, month as u8, day as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_782), (2026, 11, 25));
    }

    #[test]
    fn file_stems_are_safe() {
        assert_eq!(file_stem("alice"), "alice");
        assert_eq!(file_stem("spiffe://example.org/ns/bob"), "bob");
        assert_eq!(file_stem("a b/../c"), "c");
        assert_eq!(file_stem("we!rd"), "we_rd");
    }
}
