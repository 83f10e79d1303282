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
//! `reasons.rs` puts what rustls and webpki report into words.

mod reasons;

pub(crate) use reasons::handshake_failure;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::error::Error;

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

    /// Reads and checks every file; the config rustls serves with.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certs(&self.cert)?;
        let key = read_key(&self.key)?;
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&self.client_ca)? {
            roots.add(ca).map_err(|e| {
                problem(&self.client_ca, format!("not a usable CA certificate: {e}"))
            })?;
        }
        let mut crls = Vec::new();
        for path in &self.crl {
            crls.extend(read_crls(path)?);
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .with_crls(crls)
                .build()
                .map_err(|e| {
                    let at = self.crl.first().unwrap_or(&self.client_ca);
                    problem(at, reasons::verifier_error(&e))
                })?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| problem(&self.cert, format!("no usable TLS version: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => problem(
                    &self.key,
                    format!(
                        "this private key does not match the certificate in {}",
                        self.cert.display()
                    ),
                ),
                e => problem(&self.key, format!("unusable certificate or key: {e}")),
            })?;
        // No session resumption: a resumed session skips the client
        // certificate checks (validity dates, revocation) that every
        // connection must pass.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

fn problem(path: &Path, problem: String) -> Error {
    Error::Tls {
        path: path.to_path_buf(),
        problem,
    }
}

/// The largest certificate, key or CRL file read.
pub const MAX_FILE: u64 = 4 * 1024 * 1024;

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    read_file(path, MAX_FILE).map_err(|e| problem(path, e))
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

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(path, format!("malformed PEM: {}", reasons::pem_error(&e))))?;
    if certs.is_empty() {
        return Err(problem(
            path,
            "no certificate (expected PEM \"BEGIN CERTIFICATE\")".into(),
        ));
    }
    for cert in &certs {
        webpki::EndEntityCert::try_from(cert).map_err(|e| {
            let why = reasons::webpki_error(&e);
            problem(path, format!("malformed certificate: {why}"))
        })?;
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        problem(
            path,
            format!("no private key (expected PEM \"BEGIN PRIVATE KEY\"): {e}"),
        )
    })
}

/// CRLs in PEM, or one CRL in DER.
fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, Error> {
    let bytes = read(path)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(path, format!("malformed PEM: {}", reasons::pem_error(&e))))?;
    if crls.is_empty() {
        let crl = CertificateRevocationListDer::from(bytes);
        return match webpki::OwnedCertRevocationList::from_der(&crl) {
            Ok(_) => Ok(vec![crl]),
            Err(e) => Err(problem(
                path,
                format!(
                    "no PEM CRL (\"BEGIN X509 CRL\"), and not a DER CRL: {}",
                    reasons::webpki_error(&e)
                ),
            )),
        };
    }
    for crl in &crls {
        webpki::OwnedCertRevocationList::from_der(crl).map_err(|e| {
            let why = reasons::webpki_error(&e);
            problem(path, format!("malformed CRL: {why}"))
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
