//! Development certificates (`tcplb certs init`, and `tcplb demo`): a CA,
//! a server certificate and client certificates whose SANs are the client
//! names, made with rcgen. Not for production: the CA key sits next to
//! the certificates it signed.
//!
//! Invariants: every key file is created with mode 0600; an existing CA
//! is never replaced unless asked to (the certificates it signed would
//! stop being accepted), and more certificates can be issued from it;
//! nothing is written until every certificate asked for is made.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::{Duration, OffsetDateTime, Time};

use crate::error::Error;
use crate::tls::{MAX_FILE, read_file};

/// Validity of generated certificates, from yesterday.
const VALID_DAYS: i64 = 825;

/// The CA that signs the certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ca {
    /// A new CA, written as `ca.pem`/`ca.key` in the directory. An
    /// existing `ca.pem` or `ca.key` there is refused unless `replace`:
    /// the certificates it signed would stop chaining.
    New {
        /// Overwrite an existing CA (`--force`).
        replace: bool,
    },
    /// An existing CA, to issue more certificates (`--ca-cert`/`--ca-key`).
    Existing {
        /// Its certificate (PEM).
        cert: PathBuf,
        /// Its private key (PEM).
        key: PathBuf,
    },
}

/// What [`init`] is asked to make.
#[derive(Debug, Clone)]
pub struct Request {
    /// Where the files go (created if missing).
    pub dir: PathBuf,
    /// Who signs.
    pub ca: Ca,
    /// DNS names or IP addresses of the server certificate; empty for none.
    pub server_names: Vec<String>,
    /// One client certificate per name: a DNS SAN, or a URI SAN when the
    /// name contains "://".
    pub clients: Vec<String>,
}

/// A certificate and its key, as written.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (`<name>.pem`).
    pub cert: PathBuf,
    /// Its private key (`<name>.key`, mode 0600).
    pub key: PathBuf,
}

/// What [`init`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// The CA certificate: `ca.pem` as written, or the existing one given.
    pub ca: PathBuf,
    /// The new CA's key (`ca.key`); `None` for an existing CA.
    pub ca_key: Option<PathBuf>,
    /// The server certificate (`server.pem`/`server.key`), if asked for.
    pub server: Option<Issued>,
    /// (client name, its certificate), in the order asked.
    pub clients: Vec<(String, Issued)>,
}

/// Issues what `request` asks for and writes it to `request.dir`, the
/// server's as `server.pem`/`server.key` and each client's as
/// `<client>.pem`/`<client>.key`; with [`Ca::New`], the CA too. Every
/// certificate is made, and checked to chain to the CA, before any file is
/// written, so a failure (an existing CA, a key that does not belong to
/// its certificate, a malformed name) leaves the directory as it was.
pub fn init(request: &Request) -> Result<Written, Error> {
    let validity = validity(OffsetDateTime::now_utc());
    let (issuer, ca_der, new_ca) = signer(request, validity)?;
    // (file stem, certificate PEM, key PEM), each checked against the CA.
    let mut files = Vec::new();
    if !request.server_names.is_empty() {
        let usage = (
            ExtendedKeyUsagePurpose::ServerAuth,
            webpki::KeyUsage::server_auth(),
        );
        let (cert, key) = issue(&request.server_names, usage.0, &issuer, validity)
            .map_err(|e| fail("server certificate", e))?;
        chains_to(&ca_der, cert.der(), usage.1, &request.ca)?;
        files.push(("server".to_string(), cert.pem(), key));
    }
    for client in &request.clients {
        let usage = (
            ExtendedKeyUsagePurpose::ClientAuth,
            webpki::KeyUsage::client_auth(),
        );
        let (cert, key) = issue(std::slice::from_ref(client), usage.0, &issuer, validity)
            .map_err(|e| fail(&format!("certificate for {client}"), e))?;
        chains_to(&ca_der, cert.der(), usage.1, &request.ca)?;
        files.push((file_stem(client), cert.pem(), key));
    }
    write_all(request, new_ca, files)
}

/// An rcgen failure while making `what`, as a setup error.
fn fail(what: &str, e: rcgen::Error) -> Error {
    Error::Setup {
        what: "certificates",
        source: std::io::Error::other(format!("{what}: {e}")),
    }
}

/// The signer, its certificate's DER, and the new CA's files to write
/// (certificate and key PEM; `None` for an existing CA).
type Signer = (
    Issuer<'static, KeyPair>,
    CertificateDer<'static>,
    Option<(String, String)>,
);

/// The CA that signs: the existing one, or a new one (refused over an
/// existing CA unless replacing it was asked for).
fn signer(
    request: &Request,
    (not_before, not_after): (OffsetDateTime, OffsetDateTime),
) -> Result<Signer, Error> {
    match &request.ca {
        Ca::Existing { cert, key } => {
            let (issuer, der) = existing_ca(cert, key)?;
            return Ok((issuer, der, None));
        }
        Ca::New { replace: false } => refuse_existing_ca(&request.dir)?,
        Ca::New { replace: true } => {}
    }
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
    let files = (ca_cert.pem(), ca_key.serialize_pem());
    Ok((Issuer::new(ca, ca_key), ca_cert.der().clone(), Some(files)))
}

/// A certificate for `names` (DNS names, or URIs when the first has
/// "://") with one extended key usage, signed by `issuer`; and its key PEM.
fn issue(
    names: &[String],
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'static, KeyPair>,
    (not_before, not_after): (OffsetDateTime, OffsetDateTime),
) -> Result<(rcgen::Certificate, String), rcgen::Error> {
    let uri = names[0].contains("://");
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(if uri { Vec::new() } else { names.to_vec() })?;
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
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert, key.serialize_pem()))
}

/// Writes the new CA's files (if any) and every issued certificate and
/// key into the request's directory, keys readable by their owner only.
fn write_all(
    request: &Request,
    new_ca: Option<(String, String)>,
    files: Vec<(String, String, String)>,
) -> Result<Written, Error> {
    let dir = &request.dir;
    std::fs::create_dir_all(dir).map_err(|source| Error::Setup {
        what: "the certificate directory",
        source,
    })?;
    let write = |file: String, text: &str, private: bool| -> Result<PathBuf, Error> {
        let path = dir.join(file);
        write_file(&path, text, private).map_err(|source| Error::Setup {
            what: "a certificate file",
            source: std::io::Error::new(source.kind(), format!("{}: {source}", path.display())),
        })?;
        Ok(path)
    };
    let (ca, ca_key) = match (&request.ca, new_ca) {
        (_, Some((cert, key))) => (
            write("ca.pem".into(), &cert, false)?,
            Some(write("ca.key".into(), &key, true)?),
        ),
        (Ca::Existing { cert, .. }, None) => (cert.clone(), None),
        (Ca::New { .. }, None) => unreachable!("a new CA has files"),
    };
    let mut issued = files.into_iter().map(|(stem, cert, key)| {
        Ok(Issued {
            cert: write(format!("{stem}.pem"), &cert, false)?,
            key: write(format!("{stem}.key"), &key, true)?,
        })
    });
    let server = match request.server_names.is_empty() {
        true => None,
        false => Some(issued.next().expect("the server's files")?),
    };
    let clients = request
        .clients
        .iter()
        .cloned()
        .zip(issued)
        .map(|(client, files)| Ok((client, files?)))
        .collect::<Result<_, Error>>()?;
    Ok(Written {
        ca,
        ca_key,
        server,
        clients,
    })
}

/// An existing `ca.pem` or `ca.key` in `dir`, named, unless there is none.
fn refuse_existing_ca(dir: &Path) -> Result<(), Error> {
    for file in ["ca.pem", "ca.key"] {
        let path = dir.join(file);
        if path.symlink_metadata().is_ok() {
            let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
            return Err(Error::Tls {
                path,
                problem: format!(
                    "already exists: a new CA would leave the certificates it signed \
                     unaccepted; issue more from it with --ca-cert {} --ca-key {}, or \
                     replace it with --force",
                    cert.display(),
                    key.display()
                ),
                at: None,
            });
        }
    }
    Ok(())
}

/// The signer of an existing CA, and its certificate's DER.
fn existing_ca(
    cert: &Path,
    key: &Path,
) -> Result<(Issuer<'static, KeyPair>, CertificateDer<'static>), Error> {
    let bad = |path: &Path, problem: String| Error::Tls {
        path: path.to_path_buf(),
        problem,
        at: None,
    };
    let read = |path: &Path| {
        let bytes = read_file(path, MAX_FILE).map_err(|e| bad(path, e))?;
        String::from_utf8(bytes).map_err(|_| bad(path, "not PEM text".to_string()))
    };
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
        bad(
            cert,
            format!("no certificate (expected PEM \"BEGIN CERTIFICATE\"): {e}"),
        )
    })?;
    let signing_key = KeyPair::from_pem(&key_pem).map_err(|e| {
        bad(
            key,
            format!("no private key (expected PEM \"BEGIN PRIVATE KEY\"): {e}"),
        )
    })?;
    let issuer = Issuer::from_ca_cert_der(&der, signing_key)
        .map_err(|e| bad(cert, format!("not a usable CA certificate: {e}")))?;
    Ok((issuer, der))
}

/// With an existing CA, checks that `cert` chains to its certificate for
/// `usage`: signed with a key that is not the certificate's own, it would
/// be accepted nowhere.
fn chains_to(
    ca: &CertificateDer<'_>,
    cert: &CertificateDer<'_>,
    usage: webpki::KeyUsage,
    origin: &Ca,
) -> Result<(), Error> {
    let Ca::Existing { key, .. } = origin else {
        return Ok(());
    };
    let broken = |problem: String| Error::Tls {
        path: key.clone(),
        problem,
        at: None,
    };
    let anchor = webpki::anchor_from_trusted_cert(ca)
        .map_err(|e| broken(format!("its CA certificate cannot be a trust anchor: {e}")))?;
    let leaf = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| broken(format!("it issued a malformed certificate: {e}")))?;
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        UnixTime::now(),
        usage,
        None,
        None,
    )
    .map_err(|e| {
        broken(match e {
            webpki::Error::InvalidSignatureForPublicKey | webpki::Error::UnknownIssuer => {
                "certificates signed with this key do not chain to the CA certificate: \
                 it is not that CA's key"
                    .to_string()
            }
            e => format!("certificates it signs would not be accepted: {e}"),
        })
    })?;
    Ok(())
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
