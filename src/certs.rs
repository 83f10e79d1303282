//! Development certificates (`tcplb certs init`, and `tcplb demo`): a CA,
//! a server certificate and client certificates whose SANs are the client
//! names, made with rcgen. Not for production: the CA key sits next to
//! the certificates it signed.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime, Time};

use crate::error::Error;

/// Validity of generated certificates, from yesterday.
const VALID_DAYS: i64 = 825;

/// What [`init`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// The CA certificate (`ca.pem`).
    pub ca: PathBuf,
    /// The server certificate (`server.pem`).
    pub server_cert: PathBuf,
    /// The server's key (`server.key`).
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
    let (not_before, not_after) = validity(OffsetDateTime::now_utc());

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
        let private = file.ends_with(".key");
        write_file(&path, text, private).map_err(|source| Error::Setup {
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

/// Writes a certificate (mode 0644 less the umask) or, `private`, a key
/// (mode 0600). A key file is created with its mode, never chmod-ed once
/// its bytes are in: an existing file (which others may be able to read)
/// is removed first, and `create_new` refuses to follow a symbolic link
/// planted in its place.
fn write_file(path: &Path, text: &str, private: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if !private {
        return std::fs::write(path, text);
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
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

/// First and last instant of validity: from yesterday's midnight (UTC,
/// for clocks that lag) for [`VALID_DAYS`].
fn validity(now: OffsetDateTime) -> (OffsetDateTime, OffsetDateTime) {
    let start = (now - Duration::days(1)).replace_time(Time::MIDNIGHT);
    (start, start + Duration::days(VALID_DAYS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_starts_yesterday_at_midnight() {
        let now = OffsetDateTime::from_unix_timestamp(1_709_200_800).unwrap(); // 2024-02-29 10:00 UTC
        let (from, until) = validity(now);
        assert_eq!(from.to_string(), "2024-02-28 0:00:00.0 +00:00:00");
        assert_eq!((until - from).whole_days(), VALID_DAYS);
    }

    #[test]
    fn file_stems_are_safe() {
        assert_eq!(file_stem("alice"), "alice");
        assert_eq!(file_stem("spiffe://example.org/ns/bob"), "bob");
        assert_eq!(file_stem("a b/../c"), "c");
        assert_eq!(file_stem("we!rd"), "we_rd");
    }
}
