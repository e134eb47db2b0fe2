//! TLS with rustls, for the gateway's listener and for its clients (agents, the CLI).
//!
//! A gateway serves a certificate it is given (`--tls-cert/--tls-key`, PEM) or one it
//! makes (`--tls self-signed`): a CA whose key stays in the data dir, and a server
//! certificate signed by it at every start. Clients trust the gateway by its CA's **pin**
//! (`sha256:` of the CA's SubjectPublicKeyInfo, as kubeadm's join does), by a CA file, or
//! by the public web roots. There is no way to skip verification.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// How a pin starts.
pub const PIN_PREFIX: &str = "sha256:";
/// Files `--tls self-signed` keeps under the data dir's `tls/`.
pub const CA_KEY_FILE: &str = "ca.key";
/// The CA certificate, for clients that prefer `--ca-file` to a pin.
pub const CA_CERT_FILE: &str = "ca.pem";

/// TLS failures: each says which file or setting is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: String,
    },
    /// A pin is not `sha256:` and 64 hex digits.
    #[error("`{0}` is not a pin like sha256:<64 hex digits> (`ember token create` prints the gateway's)")]
    BadPin(String),
    /// Making a certificate failed.
    #[error("cannot make a certificate")]
    Generate(#[source] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration")]
    Rustls(#[source] rustls::Error),
    /// A certificate does not parse.
    #[error("a certificate does not parse: {0}")]
    Certificate(String),
}

/// The crypto provider Ember uses everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The pin of a certificate: `sha256:` and the hex SHA-256 of its SubjectPublicKeyInfo.
pub fn pin_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let parsed =
        webpki::EndEntityCert::try_from(cert).map_err(|e| TlsError::Certificate(e.to_string()))?;
    let spki = parsed.subject_public_key_info();
    let hex: String = Sha256::digest(spki.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("{PIN_PREFIX}{hex}"))
}

/// Checks a pin's shape; returns it in lower case.
pub fn parse_pin(pin: &str) -> Result<String, TlsError> {
    let hex = pin
        .strip_prefix(PIN_PREFIX)
        .ok_or_else(|| TlsError::BadPin(pin.to_string()))?;
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(TlsError::BadPin(pin.to_string()));
    }
    Ok(format!("{PIN_PREFIX}{}", hex.to_ascii_lowercase()))
}

/// What a gateway serves: its rustls configuration and the pin clients should use.
pub struct ServerIdentity {
    /// The server configuration (HTTP/1.1 and HTTP/2 by ALPN).
    pub config: Arc<rustls::ServerConfig>,
    /// The pin of the chain's top certificate (the CA for `--tls self-signed`).
    pub pin: String,
}

impl ServerIdentity {
    /// A certificate chain and key from PEM files.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<ServerIdentity, TlsError> {
        let chain = read_certs(cert)?;
        let key = read_key(key)?;
        let pin = pin_of(chain.last().expect("read_certs returns at least one"))?;
        Ok(ServerIdentity {
            config: server_config(chain, key)?,
            pin,
        })
    }

    /// A CA kept in `dir` (made on first use) and a server certificate for `names`
    /// (host names and IP addresses) signed by it now.
    pub fn self_signed(dir: &Path, names: &[String]) -> Result<ServerIdentity, TlsError> {
        std::fs::create_dir_all(dir).map_err(|source| TlsError::File {
            path: dir.to_path_buf(),
            source,
        })?;
        let ca_key = ca_key(&dir.join(CA_KEY_FILE))?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Generate)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Ember gateway CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca.self_signed(&ca_key).map_err(TlsError::Generate)?;
        write_file(&dir.join(CA_CERT_FILE), ca.pem().as_bytes(), 0o644)?;
        let leaf_key = KeyPair::generate().map_err(TlsError::Generate)?;
        let mut leaf = CertificateParams::new(names.to_vec()).map_err(TlsError::Generate)?;
        leaf.distinguished_name
            .push(DnType::CommonName, "Ember gateway");
        let leaf = leaf
            .signed_by(&leaf_key, &ca, &ca_key)
            .map_err(TlsError::Generate)?;
        let chain = vec![leaf.der().clone(), ca.der().clone()];
        let key = PrivateKeyDer::try_from(leaf_key.serialize_der())
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        Ok(ServerIdentity {
            config: server_config(chain, key)?,
            pin: pin_of(ca.der())?,
        })
    }
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::Rustls)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The CA key at `path`, made (0600) when missing.
fn ca_key(path: &Path) -> Result<KeyPair, TlsError> {
    match std::fs::read_to_string(path) {
        Ok(pem) => KeyPair::from_pem(&pem).map_err(|_| TlsError::Pem {
            path: path.to_path_buf(),
            what: "is not a PEM private key; remove it to make a new CA (agents then need the new pin)".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate().map_err(TlsError::Generate)?;
            write_file(path, key.serialize_pem().as_bytes(), 0o600)?;
            Ok(key)
        }
        Err(source) => Err(TlsError::File {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes a file with `mode` (on Unix), replacing it atomically.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    crate::access::replace_file(path, bytes, mode).map_err(|source| TlsError::File {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "holds no PEM certificate".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(path, e))
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    match e {
        rustls::pki_types::pem::Error::Io(source) => TlsError::File {
            path: path.to_path_buf(),
            source,
        },
        other => TlsError::Pem {
            path: path.to_path_buf(),
            what: format!("is not the PEM expected ({other})"),
        },
    }
}

/// How a client trusts the gateway's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The chain must contain a certificate with this pin, and verify up to it.
    Pin(String),
    /// The chain must verify up to a CA in this PEM file.
    CaFile(PathBuf),
    /// The chain must verify up to a public web root.
    PublicRoots,
}

impl Trust {
    /// From the `--ca-pin` and `--ca-file` settings (the pin wins when both are given).
    pub fn from_settings(pin: Option<&str>, file: Option<&Path>) -> Result<Trust, TlsError> {
        Ok(match (pin, file) {
            (Some(pin), _) => Trust::Pin(parse_pin(pin)?),
            (None, Some(file)) => Trust::CaFile(file.to_path_buf()),
            (None, None) => Trust::PublicRoots,
        })
    }

    /// A rustls client configuration that trusts as this says, with `alpn` protocols.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Rustls)?;
        let mut config = match self {
            Trust::Pin(pin) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedVerifier { pin: pin.clone() }))
                .with_no_client_auth(),
            Trust::CaFile(file) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs(file)? {
                    roots.add(cert).map_err(TlsError::Rustls)?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Trust::PublicRoots => {
                let roots =
                    RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

/// Trusts a chain that holds the pinned certificate and verifies up to it (or whose
/// end-entity certificate is the pinned one).
#[derive(Debug)]
struct PinnedVerifier {
    pin: String,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if pin_of(end_entity).is_ok_and(|p| p == self.pin) {
            return Ok(ServerCertVerified::assertion());
        }
        let Some(anchor) = intermediates
            .iter()
            .find(|c| pin_of(c).is_ok_and(|p| p == self.pin))
        else {
            return Err(rustls::Error::General(format!(
                "the gateway's certificate does not match --ca-pin {}; check the pin `ember token create` printed",
                self.pin
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(anchor.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests;
