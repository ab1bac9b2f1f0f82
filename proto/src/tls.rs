//! TLS setup shared by the master and the agent: the ring crypto provider, the
//! master's self-signed or configured certificate, and client configs that
//! trust either a CA file or exactly one certificate by its SHA-256 pin.

use fs_err as fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

/// File name of the self-signed certificate inside `data_dir/tls/`.
pub const SELF_SIGNED_CERT_FILE: &str = "master.crt";
/// File name of the self-signed key inside `data_dir/tls/`.
pub const SELF_SIGNED_KEY_FILE: &str = "master.key";

/// Installs ring as the process-wide rustls crypto provider. Call it first
/// thing in every `main`; calling it again is harmless.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = nightshift_provider().install_default();
}

/// ring's provider with its cipher suites reordered: TLS 1.3's
/// AES-128-GCM-SHA256 first. rustls lists AES-256-GCM-SHA384 first, whose
/// handshake hashes (HKDF, transcript) run SHA-384 in software on x86-64,
/// while SHA-256 has CPU instructions there (SHA-NI): on the master in a
/// restart storm SHA-384 alone was ~6 % of its CPU. Every suite of ring's
/// safe defaults stays offered, only the order changes.
pub fn nightshift_provider() -> CryptoProvider {
    use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let mut provider = rustls::crypto::ring::default_provider();
    let preferred = TLS13_AES_128_GCM_SHA256.suite();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != preferred);
    provider
}

fn provider() -> Arc<CryptoProvider> {
    match CryptoProvider::get_default() {
        Some(provider) => Arc::clone(provider),
        None => Arc::new(nightshift_provider()),
    }
}

/// The master's server-side TLS: the rustls config plus what a worker needs to
/// trust it.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// The certificate file (PEM), usable as a worker's `ca_file`.
    pub cert_path: PathBuf,
    /// Lowercase hex SHA-256 of the DER certificate, for a worker's `pin_sha256`.
    pub pin_sha256: String,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_path", &self.cert_path)
            .field("pin_sha256", &self.pin_sha256)
            .finish_non_exhaustive()
    }
}

/// Lowercase hex SHA-256 of a DER certificate.
pub fn cert_pin_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The certificate and key of a master without configured ones: created in
/// `data_dir/tls/` on first start (key mode 0600), reused afterwards.
/// `names` are the subject alternative names (host names or IP addresses).
pub fn load_or_create_self_signed(data_dir: &Path, names: &[String]) -> anyhow::Result<ServerTls> {
    let dir = data_dir.join("tls");
    let cert_path = dir.join(SELF_SIGNED_CERT_FILE);
    let key_path = dir.join(SELF_SIGNED_KEY_FILE);
    if !(cert_path.exists() && key_path.exists()) {
        fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the TLS directory {}", dir.display()))?;
        let mut names = names.to_vec();
        for default in ["localhost", "127.0.0.1", "::1"] {
            if !names.iter().any(|n| n == default) {
                names.push(default.to_owned());
            }
        }
        let certified = rcgen::generate_simple_self_signed(names)
            .context("cannot generate a self-signed certificate")?;
        write_private(&key_path, certified.signing_key.serialize_pem().as_bytes())?;
        let tmp = dir.join(format!("{SELF_SIGNED_CERT_FILE}.tmp"));
        fs::write(&tmp, certified.cert.pem())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, &cert_path)
            .with_context(|| format!("cannot write {}", cert_path.display()))?;
    }
    load_server_tls(&cert_path, &key_path)
}

/// Writes a secret file readable by its owner only (mode 0600), atomically.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use fs_err::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Reads every certificate of a PEM file.
fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow!("cannot read certificate file {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("bad certificate file {}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "certificate file {} holds no PEM certificate",
            path.display()
        );
    }
    Ok(certs)
}

/// The server config for a configured certificate chain and key (PEM files).
pub fn load_server_tls(cert: &Path, key: &Path) -> anyhow::Result<ServerTls> {
    let certs = read_certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow!("cannot read private key file {}: {e}", key.display()))?;
    let pin_sha256 = cert_pin_sha256(certs[0].as_ref());
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .with_context(|| {
            format!(
                "certificate {} and key {} do not form a usable pair",
                cert.display(),
                key.display()
            )
        })?;
    // The master's order (see `nightshift_provider`), also with agents
    // built before it.
    config.ignore_client_order = true;
    Ok(ServerTls {
        config: Arc::new(config),
        cert_path: cert.to_path_buf(),
        pin_sha256,
    })
}

/// Normalizes a pin as users write it: hex, optionally with `:` separators
/// and an `sha256:` prefix, any case.
pub fn normalize_pin(pin: &str) -> anyhow::Result<String> {
    let trimmed = pin.trim();
    let trimmed = trimmed.strip_prefix("sha256:").unwrap_or(trimmed);
    let hex_digits: String = trimmed
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex_digits.len() != 64 || !hex_digits.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("pin_sha256 must be 64 hex digits (the SHA-256 of the certificate), got `{pin}`");
    }
    Ok(hex_digits)
}

/// A client config for talking to a master.
///
/// With `ca_file`, the server certificate is verified against that CA (or
/// self-signed certificate) as usual. With `pin_sha256`, exactly the
/// certificate with that SHA-256 is accepted (handshake signatures are still
/// verified). With both, both must pass. With neither, an error explains the
/// choices.
pub fn client_config(
    ca_file: Option<&Path>,
    pin_sha256: Option<&str>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let webpki = match ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(path)? {
                roots
                    .add(cert)
                    .with_context(|| format!("bad CA certificate in {}", path.display()))?;
            }
            Some(
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                )
                .build()
                .with_context(|| format!("cannot use CA file {}", path.display()))?,
            )
        }
        None => None,
    };
    let config = match (pin_sha256, webpki) {
        (Some(pin), webpki) => {
            let verifier = PinVerifier {
                pin: normalize_pin(pin)?,
                algorithms: provider.signature_verification_algorithms,
                also: webpki,
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
        (None, Some(webpki)) => builder.with_webpki_verifier(webpki).with_no_client_auth(),
        (None, None) => bail!(
            "no way to trust the master's certificate: set `[tls] ca_file` (the master's \
             certificate or its CA) or `pin_sha256` (printed by `master run`), or \
             `insecure = true` with a plain ws:// master"
        ),
    };
    Ok(Arc::new(config))
}

/// Accepts exactly the server certificate whose SHA-256 matches the pin.
#[derive(Debug)]
struct PinVerifier {
    pin: String,
    algorithms: WebPkiSupportedAlgorithms,
    also: Option<Arc<rustls::client::WebPkiServerVerifier>>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = cert_pin_sha256(end_entity.as_ref());
        // Both are public values; a plain comparison leaks nothing secret.
        if actual != self.pin {
            return Err(rustls::Error::General(format!(
                "the master's certificate has SHA-256 {actual}, but pin_sha256 is {}",
                self.pin
            )));
        }
        if let Some(webpki) = &self.also {
            webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Serves one TLS connection that echoes one byte, returns the port.
    async fn echo_server(tls: &ServerTls) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut stream) = acceptor.accept(tcp).await {
                        let mut byte = [0u8; 1];
                        if stream.read_exact(&mut byte).await.is_ok() {
                            let _ = stream.write_all(&byte).await;
                            let _ = stream.flush().await;
                        }
                    }
                });
            }
        });
        port
    }

    /// A TLS connection to the test server on `port`, as `localhost`.
    async fn connect(
        port: u16,
        config: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = ServerName::try_from("localhost")?;
        Ok(connector.connect(name, tcp).await?)
    }

    async fn roundtrip(port: u16, config: Arc<rustls::ClientConfig>) -> anyhow::Result<u8> {
        let mut stream = connect(port, config).await?;
        stream.write_all(&[42]).await?;
        stream.flush().await?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        Ok(byte[0])
    }

    #[tokio::test]
    async fn good_pin_connects_and_wrong_pin_is_refused() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let tls = load_or_create_self_signed(dir.path(), &[]).unwrap();
        let port = echo_server(&tls).await;

        let good = client_config(None, Some(&tls.pin_sha256)).unwrap();
        assert_eq!(roundtrip(port, good).await.unwrap(), 42);

        let wrong_pin = "00".repeat(32);
        let bad = client_config(None, Some(&wrong_pin)).unwrap();
        let err = roundtrip(port, bad).await.unwrap_err();
        assert!(format!("{err:#}").contains("pin_sha256"), "{err:#}");
    }

    /// One TLS connection (echoing a byte, so the client has read the
    /// server's tickets); answers whether it was resumed.
    async fn resumed(port: u16, config: Arc<rustls::ClientConfig>) -> bool {
        let mut stream = connect(port, config).await.unwrap();
        stream.write_all(&[7]).await.unwrap();
        stream.flush().await.unwrap();
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// The cipher suite one TLS connection to `port` negotiated.
    async fn negotiated(port: u16, config: Arc<rustls::ClientConfig>) -> rustls::CipherSuite {
        let stream = connect(port, config).await.unwrap();
        stream
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .unwrap()
            .suite()
    }

    #[tokio::test]
    async fn the_master_picks_aes_128_gcm_sha256_even_for_a_client_preferring_aes_256() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let tls = load_or_create_self_signed(dir.path(), &[]).unwrap();
        let port = echo_server(&tls).await;
        let ours = client_config(None, Some(&tls.pin_sha256)).unwrap();
        assert_eq!(
            negotiated(port, ours).await,
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        // An agent built before the reorder offers ring's default order,
        // AES-256-GCM-SHA384 first.
        let default_order = Arc::new(rustls::crypto::ring::default_provider());
        assert_eq!(
            default_order.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        let verifier = PinVerifier {
            pin: normalize_pin(&tls.pin_sha256).unwrap(),
            algorithms: default_order.signature_verification_algorithms,
            also: None,
        };
        let older = rustls::ClientConfig::builder_with_provider(default_order)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        assert_eq!(
            negotiated(port, Arc::new(older)).await,
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }

    #[tokio::test]
    async fn an_agent_resumes_its_session_across_a_master_restart() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let clock: Arc<dyn crate::clock::Clock> = Arc::new(crate::clock::SystemClock);
        let client = client_config(
            None,
            Some(
                &load_or_create_self_signed(dir.path(), &[])
                    .unwrap()
                    .pin_sha256,
            ),
        )
        .unwrap();
        let first = load_or_create_self_signed(dir.path(), &[])
            .unwrap()
            .with_session_tickets(dir.path(), clock.clone())
            .unwrap();
        let port = echo_server(&first).await;
        assert!(!resumed(port, client.clone()).await, "the first is full");
        // "Restarted": a new server config (and listener) from the same
        // data directory.
        let second = load_or_create_self_signed(dir.path(), &[])
            .unwrap()
            .with_session_tickets(dir.path(), clock)
            .unwrap();
        let port = echo_server(&second).await;
        assert!(
            resumed(port, client.clone()).await,
            "resumed after the restart"
        );

        // Without the ticket keys (another data directory, same
        // certificate) the ticket is refused and a full handshake follows.
        let other_dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(other_dir.path().join("tls")).unwrap();
        for file in [SELF_SIGNED_CERT_FILE, SELF_SIGNED_KEY_FILE] {
            fs::copy(
                dir.path().join("tls").join(file),
                other_dir.path().join("tls").join(file),
            )
            .unwrap();
        }
        let stranger = load_or_create_self_signed(other_dir.path(), &[])
            .unwrap()
            .with_session_tickets(other_dir.path(), Arc::new(crate::clock::SystemClock))
            .unwrap();
        let port = echo_server(&stranger).await;
        assert!(!resumed(port, client).await);
    }

    #[tokio::test]
    async fn ca_file_trusts_the_self_signed_certificate() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let tls = load_or_create_self_signed(dir.path(), &[]).unwrap();
        let port = echo_server(&tls).await;
        let config = client_config(Some(&tls.cert_path), None).unwrap();
        assert_eq!(roundtrip(port, config).await.unwrap(), 42);

        // Another certificate as CA does not trust this one.
        let other_dir = tempfile::tempdir().unwrap();
        let other = load_or_create_self_signed(other_dir.path(), &[]).unwrap();
        let config = client_config(Some(&other.cert_path), None).unwrap();
        assert!(roundtrip(port, config).await.is_err());
    }

    #[test]
    fn self_signed_is_created_once_then_reused_with_a_private_key() {
        use std::os::unix::fs::PermissionsExt;
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_self_signed(dir.path(), &["farm.example".into()]).unwrap();
        let second = load_or_create_self_signed(dir.path(), &[]).unwrap();
        assert_eq!(first.pin_sha256, second.pin_sha256);
        assert_eq!(first.pin_sha256.len(), 64);
        let mode = fs::metadata(dir.path().join("tls").join(SELF_SIGNED_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn neither_ca_nor_pin_is_a_clear_error() {
        install_crypto_provider();
        let err = client_config(None, None).unwrap_err().to_string();
        assert!(err.contains("ca_file") && err.contains("pin_sha256") && err.contains("insecure"));
    }

    #[test]
    fn pins_are_normalized_and_checked() {
        let pin = "AB:".repeat(31) + "AB";
        assert_eq!(normalize_pin(&pin).unwrap(), "ab".repeat(32));
        assert_eq!(
            normalize_pin(&format!("sha256:{}", "0f".repeat(32))).unwrap(),
            "0f".repeat(32)
        );
        assert!(normalize_pin("abc").is_err());
        assert!(normalize_pin(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn missing_or_empty_cert_files_are_named() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let err = client_config(Some(&missing), None).unwrap_err().to_string();
        assert!(err.contains("nope.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "").unwrap();
        let err = load_server_tls(&empty, &missing).unwrap_err().to_string();
        assert!(err.contains("empty.pem"), "{err}");
    }
}
