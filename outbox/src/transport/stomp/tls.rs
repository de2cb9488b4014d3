//! TLS for a broker connection, built from [`TlsOptions`]: a private CA bundle or the public web
//! roots, an optional client certificate, and server-name verification (on by default). The
//! STOMP transport runs the handshake here; the AMQP transport takes the rustls client for
//! `amqps://`.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::transport::{TlsOptions, TransportError};

/// What a TLS connection is made with.
pub(crate) struct ClientTls {
    connector: TlsConnector,
    server_name: Option<String>,
}

impl ClientTls {
    /// Reads the CA bundle, certificate and key that `options` name.
    pub(crate) fn new(options: &TlsOptions) -> Result<Self, TransportError> {
        if !options.verify_hostname && options.ca_certs.is_none() {
            // Any certificate a public CA issued, for any name, would pass.
            return Err(TransportError::Tls(
                "OUTBOX_STOMP_TLS_VERIFY_HOSTNAME=false is refused with the public web roots: \
                 keep it true, or trust a private CA with OUTBOX_STOMP_CA_CERTS"
                    .into(),
            ));
        }
        // Explicit provider: the process may link both of rustls's providers.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        match &options.ca_certs {
            Some(path) => {
                for cert in read_certs(path)? {
                    roots.add(cert).map_err(|e| {
                        TransportError::Tls(format!("CA certificate in {}: {e}", path.display()))
                    })?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let roots = Arc::new(roots);
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let builder = if options.verify_hostname {
            builder.with_root_certificates(roots)
        } else {
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| TransportError::Tls(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyName { inner }))
        };
        let client = match (&options.cert_file, &options.key_file) {
            (Some(cert_path), Some(key_path)) => {
                let chain = read_certs(cert_path)?;
                let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
                    TransportError::Tls(format!("private key in {}: {e}", key_path.display()))
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    TransportError::Tls(format!(
                        "client certificate {} with key {}: {e}",
                        cert_path.display(),
                        key_path.display()
                    ))
                })?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(TransportError::Tls(
                    "OUTBOX_STOMP_CERT_FILE and OUTBOX_STOMP_KEY_FILE must be set together".into(),
                ));
            }
        };
        if let Some(name) = &options.server_name {
            ServerName::try_from(name.clone()).map_err(|e| {
                TransportError::Tls(format!("OUTBOX_STOMP_TLS_SERVER_NAME `{name}`: {e}"))
            })?;
        }
        Ok(Self {
            connector: TlsConnector::from(Arc::new(client)),
            server_name: options.server_name.clone(),
        })
    }

    /// The rustls client configuration (the AMQP transport runs its own handshake with it).
    #[cfg(feature = "amqp")]
    pub(crate) fn client_config(&self) -> Arc<ClientConfig> {
        self.connector.config().clone()
    }

    /// The TLS handshake over `tcp` to `host` (or the configured server name).
    pub(super) async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TransportError> {
        let name = self.server_name.as_deref().unwrap_or(host).to_owned();
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| TransportError::Tls(format!("server name `{name}`: {e}")))?;
        self.connector
            .connect(server_name, tcp)
            .await
            .map_err(|e| TransportError::Connect {
                addresses: host.to_owned(),
                reason: format!("TLS handshake with `{name}` failed: {e}"),
            })
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TransportError::Tls(format!("certificates in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TransportError::Tls(format!(
            "no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

/// Verifies the chain but accepts any server name (`OUTBOX_STOMP_TLS_VERIFY_HOSTNAME=false`).
#[derive(Debug)]
struct AnyName {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
