//! TLS material and client identity: loading the server certificate, key,
//! client CA and CRLs into a rustls `ServerConfig` (with errors that name
//! the file at fault), and reading a verified client certificate's
//! identity from its Subject Alternative Names.
//!
//! Verification is rustls' WebPKI client verifier on the `ring` provider:
//! a client certificate is required and must chain to the configured CA,
//! be within its validity dates, be usable for client authentication, and
//! not be revoked by any configured CRL. TLS 1.2 and 1.3 only.
//!
//! `reasons.rs` puts what rustls and webpki report into words;
//! `x509.rs` reads the dates and CA flag of a certificate for the checks
//! of the server certificate and the client CA; `client.rs` is the client
//! side, tcplb's connection to a `rediss://` Redis.

mod client;
mod reasons;
mod x509;

pub use client::{RedisTls, RedisTlsPlaces};
pub(crate) use reasons::{handshake_failure, server_failure};

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};

use crate::error::{Error, Warning};
use crate::logs::plural;

/// A server certificate that expires sooner than this is warned about.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// The `[tls]` table: where the material lives and how handshakes are bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The server certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
    /// The CA (PEM) client certificates must chain to.
    pub client_ca: PathBuf,
    /// Certificate revocation lists (PEM) checked for client certificates.
    pub crl: Vec<PathBuf>,
    /// A handshake not complete by then is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; new connections beyond are closed.
    pub max_handshakes: usize,
    /// Handshakes in progress at once from one source address (IPv6: /64),
    /// so one source cannot take every handshake slot.
    pub max_handshakes_per_source: usize,
    /// Where the config file named each file, for messages.
    pub places: TlsPlaces,
}

/// Where the config file named each TLS file, as `origin:line:column`, so
/// that what is wrong with a file is reported at the key that named it.
/// Empty for settings not read from a file (the demo, tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsPlaces {
    /// Of `cert`.
    pub cert: Option<String>,
    /// Of `key`.
    pub key: Option<String>,
    /// Of `client_ca`.
    pub client_ca: Option<String>,
    /// Of each name in `crl`, in order.
    pub crl: Vec<String>,
}

/// A TLS file and where the config named it.
#[derive(Debug, Clone, Copy)]
struct Named<'a> {
    path: &'a Path,
    at: Option<&'a str>,
}

impl Named<'_> {
    fn problem(self, problem: String) -> Error {
        Error::Tls {
            path: self.path.to_path_buf(),
            problem,
            at: self.at.map(str::to_string),
        }
    }

    fn warning(self, message: &str) -> Warning {
        Warning {
            at: self.at.unwrap_or_default().to_string(),
            message: format!("TLS file {}: {message}", self.path.display()),
        }
    }
}

impl TlsSettings {
    /// `handshake_timeout` when the config does not set it.
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// `max_handshakes` when the config does not set it.
    pub const DEFAULT_MAX_HANDSHAKES: usize = 1000;
    /// `max_handshakes_per_source` when the config does not set it.
    pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 100;

    /// Makes relative paths relative to `dir` (the config file's folder).
    pub fn resolve_paths(&mut self, dir: &Path) {
        for path in [&mut self.cert, &mut self.key, &mut self.client_ca]
            .into_iter()
            .chain(self.crl.iter_mut())
        {
            if path.is_relative() {
                *path = dir.join(&*path);
            }
        }
    }

    fn cert(&self) -> Named<'_> {
        Named {
            path: &self.cert,
            at: self.places.cert.as_deref(),
        }
    }

    fn key(&self) -> Named<'_> {
        Named {
            path: &self.key,
            at: self.places.key.as_deref(),
        }
    }

    fn client_ca(&self) -> Named<'_> {
        Named {
            path: &self.client_ca,
            at: self.places.client_ca.as_deref(),
        }
    }

    fn crls(&self) -> impl Iterator<Item = Named<'_>> {
        self.crl.iter().enumerate().map(|(i, path)| Named {
            path,
            at: self.places.crl.get(i).map(String::as_str),
        })
    }

    /// Reads and checks every file as of now; the config rustls serves with.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, Error> {
        self.load(SystemTime::now()).map(|(config, _)| config)
    }

    /// Reads and checks every file as of `now`: the config rustls serves
    /// with, and what is valid but likely wrong (a server certificate that
    /// expires within [`EXPIRY_WARNING`], a client CA file with a
    /// certificate that is not a CA). A server certificate out of its
    /// validity dates, or a client CA file without a CA, is an error.
    pub fn load(&self, now: SystemTime) -> Result<(Arc<ServerConfig>, Vec<Warning>), Error> {
        let now = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let mut warnings = Vec::new();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certs(self.cert())?;
        warnings.extend(check_server_cert(&chain[0], now, self.cert())?);
        let key = read_key(self.key())?;
        let cas = read_certs(self.client_ca())?;
        warnings.extend(check_client_ca(&cas, self.client_ca())?);
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots.add(ca).map_err(|e| {
                let why = reasons::handshake_failure(&e);
                self.client_ca()
                    .problem(format!("not a usable CA certificate: {why}"))
            })?;
        }
        let mut crls = Vec::new();
        for file in self.crls() {
            crls.extend(read_crls(file)?);
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .with_crls(crls)
                .build()
                .map_err(|e| {
                    let at = self.crls().next().unwrap_or(self.client_ca());
                    at.problem(reasons::verifier_error(&e))
                })?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| self.cert().problem(format!("no usable TLS version: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => self.key().problem(format!(
                    "this private key does not match the certificate in {}",
                    self.cert.display()
                )),
                e => self.key().problem(format!(
                    "unusable certificate or key: {}",
                    reasons::handshake_failure(&e)
                )),
            })?;
        // No session resumption: a resumed session skips the client
        // certificate checks (validity dates, revocation) that every
        // connection must pass.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok((Arc::new(config), warnings))
    }
}

/// The server certificate must be within its validity dates now (no
/// client would accept it otherwise); one that expires within
/// [`EXPIRY_WARNING`] is a warning.
fn check_server_cert(
    leaf: &CertificateDer<'_>,
    now: UnixTime,
    file: Named<'_>,
) -> Result<Option<Warning>, Error> {
    let Some(facts) = x509::facts(leaf) else {
        return Ok(None);
    };
    let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let (start, end, now_text) = (
        reasons::rfc3339_secs(facts.not_before),
        reasons::rfc3339_secs(facts.not_after),
        reasons::rfc3339(now),
    );
    if now_secs < facts.not_before {
        let why =
            format!("the server certificate is not valid before {start} (it is now {now_text})");
        return Err(file.problem(why));
    }
    if now_secs > facts.not_after {
        let why = format!("the server certificate expired at {end} (it is now {now_text})");
        return Err(file.problem(why));
    }
    let left = facts.not_after - now_secs;
    if left > EXPIRY_WARNING.as_secs() as i64 {
        return Ok(None);
    }
    let days = left / 86_400;
    let within = if days == 0 {
        "in less than a day".to_string()
    } else {
        format!("in {}", plural(days as usize, "day"))
    };
    Ok(Some(file.warning(&format!(
        "the server certificate expires at {end}, {within}"
    ))))
}

/// Client certificates must chain to a CA certificate of `client_ca`: a
/// file without one lets no client in (an error). A certificate in it
/// that is not a CA (say, a server or client certificate given by
/// mistake) is a warning, or, self-signed, a pinned certificate that only
/// a client presenting that very certificate can use.
fn check_client_ca(certs: &[CertificateDer<'_>], file: Named<'_>) -> Result<Vec<Warning>, Error> {
    let facts: Vec<Option<x509::Facts>> = certs.iter().map(|c| x509::facts(c)).collect();
    let usable = |f: &Option<x509::Facts>| f.is_none_or(|f| f.is_ca || f.self_signed);
    if !facts.iter().any(usable) {
        let why = if certs.len() == 1 {
            "not a CA certificate (no basicConstraints CA:TRUE): no client certificate can chain to it"
        } else {
            "no CA certificate in it (none has basicConstraints CA:TRUE): no client certificate can chain to them"
        };
        return Err(file.problem(why.to_string()));
    }
    let mut warnings = Vec::new();
    for (i, facts) in facts.iter().enumerate() {
        let Some(facts) = facts.filter(|f| !f.is_ca) else {
            continue;
        };
        let which = if certs.len() == 1 {
            "the certificate".to_string()
        } else {
            format!("certificate {} of {}", i + 1, certs.len())
        };
        let what = if facts.self_signed {
            "is self-signed but not a CA (no basicConstraints CA:TRUE): only a client presenting this very certificate can connect"
        } else {
            "is not a CA certificate (no basicConstraints CA:TRUE): no client certificate can chain to it"
        };
        warnings.push(file.warning(&format!("{which} {what}")));
    }
    Ok(warnings)
}

/// The largest certificate, key or CRL file read.
pub const MAX_FILE: u64 = 4 * 1024 * 1024;

fn read(file: Named<'_>) -> Result<Vec<u8>, Error> {
    read_file(file.path, MAX_FILE).map_err(|e| file.problem(e))
}

/// Reads a regular file of at most `max` bytes. Anything else (a FIFO, a
/// device, a directory) is refused without blocking: the file is opened
/// non-blocking and checked before it is read.
pub fn read_file(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".to_string());
    }
    if meta.len() > max {
        return Err(format!("larger than {} MiB", max >> 20));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow meanwhile: never read more than the limit.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(format!("larger than {} MiB", max >> 20));
    }
    Ok(bytes)
}

fn read_certs(file: Named<'_>) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = read(file)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file.problem(format!("malformed PEM: {}", reasons::pem_error(&e))))?;
    if certs.is_empty() {
        return Err(file.problem("no certificate (expected PEM \"BEGIN CERTIFICATE\")".into()));
    }
    for cert in &certs {
        webpki::EndEntityCert::try_from(cert).map_err(|e| {
            let why = reasons::webpki_error(&e);
            file.problem(format!("malformed certificate: {why}"))
        })?;
    }
    Ok(certs)
}

fn read_key(file: Named<'_>) -> Result<PrivateKeyDer<'static>, Error> {
    let bytes = read(file)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        file.problem(format!(
            "no private key (expected PEM \"BEGIN PRIVATE KEY\"): {}",
            reasons::pem_error(&e)
        ))
    })
}

/// CRLs in PEM, or one CRL in DER.
fn read_crls(file: Named<'_>) -> Result<Vec<CertificateRevocationListDer<'static>>, Error> {
    let bytes = read(file)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file.problem(format!("malformed PEM: {}", reasons::pem_error(&e))))?;
    if crls.is_empty() {
        let crl = CertificateRevocationListDer::from(bytes);
        return match webpki::OwnedCertRevocationList::from_der(&crl) {
            Ok(_) => Ok(vec![crl]),
            Err(e) => Err(file.problem(format!(
                "no PEM CRL (\"BEGIN X509 CRL\"), and not a DER CRL: {}",
                reasons::webpki_error(&e)
            ))),
        };
    }
    for crl in &crls {
        webpki::OwnedCertRevocationList::from_der(crl).map_err(|e| {
            let why = reasons::webpki_error(&e);
            file.problem(format!("malformed CRL: {why}"))
        })?;
    }
    Ok(crls)
}

/// The names a client certificate can be identified by: its URI SANs, then
/// its DNS-name SANs, in certificate order. The subject CN is never used.
pub fn peer_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
        return Vec::new();
    };
    cert.valid_uri_names()
        .chain(cert.valid_dns_names())
        .map(str::to_string)
        .collect()
}

/// SHA-256 of a certificate's DER, hex, for logs.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let mut hex = String::with_capacity(64);
    for byte in digest.as_ref() {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, date_time_ymd};

    use super::*;

    /// The file the checks report on, named at line 2 of `lb.toml`.
    fn file() -> Named<'static> {
        Named {
            path: Path::new("server.pem"),
            at: Some("lb.toml:2:8"),
        }
    }

    /// A self-signed certificate valid over the given days of 2030.
    fn cert(is_ca: IsCa, from: u8, to: u8) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.is_ca = is_ca;
        params.not_before = date_time_ymd(2030, 1, from);
        params.not_after = date_time_ymd(2030, 1, to);
        params.self_signed(&key).unwrap().der().clone()
    }

    /// 2030-01-`day` at noon.
    fn day(day: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(
            1_893_456_000 + (day - 1) * 86_400 + 43_200,
        ))
    }

    #[test]
    fn the_server_certificate_must_be_valid_now_and_is_warned_about_near_its_end() {
        let cert = cert(IsCa::NoCa, 10, 31);
        let early = check_server_cert(&cert, day(9), file())
            .unwrap_err()
            .to_string();
        assert_eq!(
            early,
            "lb.toml:2:8: TLS file server.pem: the server certificate is not valid before 2030-01-10T00:00:00Z (it is now 2030-01-09T12:00:00Z)"
        );
        let late = check_server_cert(&cert, day(31), file())
            .unwrap_err()
            .to_string();
        assert_eq!(
            late,
            "lb.toml:2:8: TLS file server.pem: the server certificate expired at 2030-01-31T00:00:00Z (it is now 2030-01-31T12:00:00Z)"
        );
        assert_eq!(
            check_server_cert(&cert, day(16), file()).unwrap(),
            None,
            "15.5 days left"
        );
        let soon = check_server_cert(&cert, day(21), file()).unwrap().unwrap();
        assert_eq!(
            soon.to_string(),
            "lb.toml:2:8: warning: TLS file server.pem: the server certificate expires at 2030-01-31T00:00:00Z, in 9 days"
        );
        let last = check_server_cert(&cert, day(30), file()).unwrap().unwrap();
        assert!(last.message.ends_with("in less than a day"), "{last}");
    }

    #[test]
    fn client_ca_must_hold_a_ca_certificate() {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap().der().clone();
        let leaf_key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let mut leaf_params = CertificateParams::new(vec!["server".to_string()]).unwrap();
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "server");
        let leaf = leaf_params
            .signed_by(&leaf_key, &issuer)
            .unwrap()
            .der()
            .clone();
        let pinned = cert(IsCa::NoCa, 1, 31);
        assert_eq!(
            check_client_ca(std::slice::from_ref(&ca), file()).unwrap(),
            []
        );
        let err = check_client_ca(std::slice::from_ref(&leaf), file()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "lb.toml:2:8: TLS file server.pem: not a CA certificate (no basicConstraints CA:TRUE): no client certificate can chain to it"
        );
        let mixed = check_client_ca(&[ca, leaf], file()).unwrap();
        assert_eq!(mixed.len(), 1);
        assert!(
            mixed[0]
                .message
                .contains("certificate 2 of 2 is not a CA certificate"),
            "{}",
            mixed[0]
        );
        let pinned = check_client_ca(&[pinned], file()).unwrap();
        assert!(
            pinned[0]
                .message
                .contains("the certificate is self-signed but not a CA"),
            "{}",
            pinned[0]
        );
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A server config with a fresh self-signed certificate, for tests of
    /// code that holds a TLS session.
    pub fn server_config() -> Arc<ServerConfig> {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.cert.der().clone()], key)
                .unwrap();
        Arc::new(config)
    }
}
