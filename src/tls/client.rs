//! The client side of TLS: tcplb's connection to a `rediss://` Redis
//! (`[cluster]`). What verifies Redis's certificate (the CAs of `tls_ca`,
//! or the system trust store without it) and the client certificate a
//! Redis with `tls-auth-clients yes` asks for (`tls_cert`, `tls_key`),
//! loaded into a rustls `ClientConfig` on the `ring` provider, with errors
//! that name the file at fault and the key that named it.
//!
//! The name verified is the URL's host: a DNS name against the
//! certificate's DNS SANs, an IP address against its IP SANs. TLS 1.2
//! and 1.3 only, as on the server side.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::ClientConfig;

use super::{Named, read_certs, read_key, reasons};
use crate::error::Error;

/// `tls_ca`, `tls_cert` and `tls_key` of a `[cluster]` whose URL is
/// `rediss://`: how tcplb checks Redis, and proves itself to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTls {
    /// CA certificates (PEM) Redis's certificate must chain to; `None`:
    /// the system trust store.
    pub ca: Option<PathBuf>,
    /// A client certificate chain (PEM, leaf first) and its private key
    /// (PEM), for a Redis that requires one.
    pub client: Option<(PathBuf, PathBuf)>,
    /// Where the config file named each file, for messages.
    pub places: RedisTlsPlaces,
}

/// Where the config file named each file of [`RedisTls`], as
/// `origin:line:column`; empty for settings not read from a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTlsPlaces {
    /// Of the `redis` URL (what a trust store problem is reported at).
    pub redis: Option<String>,
    /// Of `tls_ca`.
    pub ca: Option<String>,
    /// Of `tls_cert`.
    pub cert: Option<String>,
    /// Of `tls_key`.
    pub key: Option<String>,
}

impl RedisTls {
    /// Makes relative paths relative to `dir` (the config file's folder).
    pub fn resolve_paths(&mut self, dir: &Path) {
        let client = self.client.iter_mut().flat_map(|(c, k)| [c, k]);
        for path in self.ca.iter_mut().chain(client) {
            if path.is_relative() {
                *path = dir.join(&*path);
            }
        }
    }

    /// What verifies Redis's certificate, in words for messages.
    pub fn trusted(&self) -> &'static str {
        match self.ca {
            Some(_) => "a CA of tls_ca",
            None => "a CA of the system trust store (tls_ca is not set)",
        }
    }

    /// Reads and checks every file: the config rustls connects with.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &self.ca {
            Some(path) => {
                let file = Named {
                    path,
                    at: self.places.ca.as_deref(),
                };
                let mut roots = RootCertStore::empty();
                for ca in read_certs(file)? {
                    roots.add(ca).map_err(|e| {
                        let why = reasons::handshake_failure(&e);
                        file.problem(format!("not a usable CA certificate: {why}"))
                    })?;
                }
                roots
            }
            None => self.system_roots()?,
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::TrustStore {
                problem: format!("no usable TLS version: {e}"),
                at: self.places.redis.clone(),
            })?
            .with_root_certificates(roots);
        let Some((cert, key)) = &self.client else {
            return Ok(Arc::new(builder.with_no_client_auth()));
        };
        let cert_file = Named {
            path: cert,
            at: self.places.cert.as_deref(),
        };
        let key_file = Named {
            path: key,
            at: self.places.key.as_deref(),
        };
        let chain = read_certs(cert_file)?;
        let key = read_key(key_file)?;
        let config = builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => key_file.problem(format!(
                    "this private key does not match the certificate in {}",
                    cert_file.path.display()
                )),
                e => key_file.problem(format!(
                    "unusable certificate or key: {}",
                    reasons::handshake_failure(&e)
                )),
            })?;
        Ok(Arc::new(config))
    }

    /// The CA certificates of the system (where OpenSSL would look, or
    /// `SSL_CERT_FILE` / `SSL_CERT_DIR`); none usable is an error.
    fn system_roots(&self) -> Result<RootCertStore, Error> {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = match found.errors.first() {
                Some(e) => format!(" ({e})"),
                None => String::new(),
            };
            return Err(Error::TrustStore {
                problem: format!(
                    "no CA certificate found{why}: set `tls_ca` to the CA that issued Redis's certificate"
                ),
                at: self.places.redis.clone(),
            });
        }
        Ok(roots)
    }
}
