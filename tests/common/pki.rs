//! Certificates for TLS tests, made with rcgen in a fresh temporary
//! directory: a CA, a server certificate, client certificates (valid,
//! expired, from another CA, revoked) and CRLs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber, date_time_ymd,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tcplb::tls::TlsSettings;

static SEQUENCE: AtomicU64 = AtomicU64::new(1);

/// A client certificate and its key.
pub struct ClientCert {
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub serial: u64,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

pub struct Pki {
    pub dir: PathBuf,
    ca_params: CertificateParams,
    ca_key: KeyPair,
    pub ca_cert: CertificateDer<'static>,
    pub ca_path: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tcplb-pki-{}-{name}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("test CA {name}"));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).unwrap();
        let mut pki = Pki {
            dir,
            ca_params,
            ca_key,
            ca_cert: ca.der().clone(),
            ca_path,
            server_cert: PathBuf::new(),
            server_key: PathBuf::new(),
        };
        let server = pki.server_valid(None, "server");
        pki.server_cert = server.cert_path;
        pki.server_key = server.key_path;
        pki
    }

    /// A server certificate (for "localhost") valid from and until the
    /// given times, or for rcgen's default centuries; written as `file`.
    pub fn server_valid(
        &self,
        validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
        file: &str,
    ) -> ClientCert {
        self.issue(
            vec![SanType::DnsName("localhost".try_into().unwrap())],
            ExtendedKeyUsagePurpose::ServerAuth,
            validity,
            file,
        )
    }

    /// A server certificate for the IP address `ip` (an IP SAN, no DNS
    /// name), written as `file`: what a server reached by address shows.
    pub fn server_for_ip(&self, ip: std::net::IpAddr, file: &str) -> ClientCert {
        self.issue(
            vec![SanType::IpAddress(ip)],
            ExtendedKeyUsagePurpose::ServerAuth,
            None,
            file,
        )
    }

    fn issue(
        &self,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
        file: &str,
    ) -> ClientCert {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        // The CN is never used for identity: make it misleading on purpose.
        params.distinguished_name.push(DnType::CommonName, "admin");
        params.extended_key_usages = vec![usage];
        let serial = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        params.serial_number = Some(SerialNumber::from(serial));
        if let Some((not_before, not_after)) = validity {
            params.not_before = not_before;
            params.not_after = not_after;
        }
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let cert_path = self.dir.join(format!("{file}.pem"));
        let key_path = self.dir.join(format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        ClientCert {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            serial,
            cert_path,
            key_path,
        }
    }

    /// A client certificate whose SAN is `name` (a URI when it has "://").
    pub fn client(&self, name: &str) -> ClientCert {
        self.client_with(name, false)
    }

    /// A certificate for `name` from this CA whose extended key usage is
    /// server authentication only, not client authentication.
    pub fn server_only(&self, name: &str) -> ClientCert {
        let file = format!("server-only-{}", SEQUENCE.fetch_add(1, Ordering::Relaxed));
        self.issue(
            vec![SanType::DnsName(name.try_into().unwrap())],
            ExtendedKeyUsagePurpose::ServerAuth,
            None,
            &file,
        )
    }

    pub fn client_with(&self, name: &str, expired: bool) -> ClientCert {
        let san = if name.contains("://") {
            SanType::URI(name.try_into().unwrap())
        } else {
            SanType::DnsName(name.try_into().unwrap())
        };
        let file = format!("client-{}", SEQUENCE.fetch_add(1, Ordering::Relaxed));
        let validity = expired.then(|| (date_time_ymd(2020, 1, 1), date_time_ymd(2021, 1, 1)));
        self.issue(
            vec![san],
            ExtendedKeyUsagePurpose::ClientAuth,
            validity,
            &file,
        )
    }

    /// A CRL revoking these serials, written next to the CA.
    pub fn crl(&self, revoked: &[u64]) -> PathBuf {
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2024, 1, 1),
            next_update: date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&serial| RevokedCertParams {
                    serial_number: SerialNumber::from(serial),
                    revocation_time: date_time_ymd(2024, 6, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let crl = params.signed_by(&issuer).unwrap();
        let path = self.dir.join("ca.crl");
        std::fs::write(&path, crl.pem().unwrap()).unwrap();
        path
    }

    pub fn settings(&self, crl: Vec<PathBuf>, handshake_timeout: Duration) -> TlsSettings {
        TlsSettings {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_ca: self.ca_path.clone(),
            crl,
            handshake_timeout,
            max_handshakes: TlsSettings::DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: TlsSettings::DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            places: Default::default(),
        }
    }

    /// A rustls client config trusting this CA, presenting `client` if given.
    pub fn client_config(&self, client: Option<&ClientCert>) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_cert.clone()).unwrap();
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
        let config = match client {
            Some(c) => builder
                .with_client_auth_cert(
                    vec![c.cert.clone()],
                    PrivateKeyDer::Pkcs8(c.key.clone_key()),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }
}

pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// Connects to `addr` as a TLS client (server name "localhost") and
/// completes the handshake; the error if the server refused it.
pub fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> std::io::Result<TlsStream> {
    handshake(TcpStream::connect(addr)?, config)
}

/// Like [`connect`], from a chosen loopback source address (127.0.0.0/8).
pub fn connect_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect(&addr.into())?;
    handshake(socket.into(), config)
}

fn handshake(tcp: TcpStream, config: Arc<ClientConfig>) -> std::io::Result<TlsStream> {
    tcp.set_read_timeout(Some(super::IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(super::IO_TIMEOUT))?;
    let conn = ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    // TLS 1.3: the server checks the client's certificate after the client
    // thinks the handshake is done; a rejection arrives as an alert on the
    // first read. Flush and give it a chance to show up as an error here.
    stream.flush()?;
    Ok(stream)
}

/// Reads one line (without the newline) from a TLS stream, byte by byte.
pub fn read_line(s: &mut TlsStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = match s.read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => other?,
        };
        match n {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Ends the client's side: `close_notify`, then TCP FIN.
pub fn close_write(s: &mut TlsStream) {
    s.conn.send_close_notify();
    s.flush().unwrap();
    s.sock.shutdown(std::net::Shutdown::Write).unwrap();
}
