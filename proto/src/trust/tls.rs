//! rustls and quinn configurations, the fingerprint verifier, peer identities.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};

use super::ca::{parse_certs, Identity, OU_COORDINATOR, OU_WORKER};
use super::{cert_fingerprint, hex, TrustError};

/// ALPN of the gRPC control plane (HTTP/2 over TLS).
pub const ALPN_GRPC: &[u8] = b"h2";
/// ALPN of the QUIC data plane.
pub const ALPN_DATA: &[u8] = b"dsv3-data/1";

/// Whether a server asks for a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// The handshake fails without a valid client certificate of the cluster CA.
    Required,
    /// A client may come without a certificate (the gRPC port, for `Join`); one it presents
    /// must still be valid, and every RPC but `Join` checks [`super::peer_worker_name`].
    Optional,
}

/// What a client trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The cluster CA certificate (PEM): every client after it joined.
    Ca(String),
    /// Only the SHA-256 of the CA certificate, from the join token: the joining worker.
    Fingerprint([u8; 32]),
}

/// The role a certificate was issued for (its subject's organisational unit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Issued through `Join`.
    Worker,
    /// The coordinator's own identity (server, and the `cluster` CLI as a client).
    Coordinator,
}

/// Who is on the other side of a verified connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// The certificate's common name (a worker's name).
    pub name: String,
    pub role: Role,
    /// SHA-256 of the peer's leaf certificate.
    pub cert_fingerprint: [u8; 32],
}

/// The name and role in a certificate issued by [`super::ClusterCa`]; `None` if it has no
/// common name or no known role. Only meaningful for a certificate TLS already verified.
pub fn peer_identity_of_cert(der: &CertificateDer<'_>) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let role = match subject.iter_organizational_unit().next()?.as_str().ok()? {
        OU_WORKER => Role::Worker,
        OU_COORDINATOR => Role::Coordinator,
        _ => return None,
    };
    Some(PeerIdentity {
        name,
        role,
        cert_fingerprint: cert_fingerprint(der),
    })
}

pub(super) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(super) fn roots(ca_pem: &str) -> Result<RootCertStore, TrustError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs("CA certificate", ca_pem)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Checks that `leaf` is a client certificate that the CA in `ca_pem` issued and that is valid now.
pub(super) fn verify_client_cert(
    leaf: &CertificateDer<'_>,
    ca_pem: &str,
) -> Result<(), TrustError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
            .build()?;
    verifier.verify_client_cert(leaf, &[], UnixTime::now())?;
    Ok(())
}

fn client_verifier(
    identity: &Identity,
    auth: ClientAuth,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TrustError> {
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(identity.ca_roots()?), provider());
    Ok(match auth {
        ClientAuth::Required => builder.build()?,
        ClientAuth::Optional => builder.allow_unauthenticated().build()?,
    })
}

/// The coordinator's TLS server configuration for gRPC (ALPN `h2`, TLS 1.2 and 1.3): it presents
/// `identity`'s chain (`[leaf, CA]`) and verifies client certificates against `identity.ca_pem`.
pub fn server_config(
    identity: &Identity,
    auth: ClientAuth,
) -> Result<rustls::ServerConfig, TrustError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(client_verifier(identity, auth)?)
        .with_single_cert(identity.cert_chain()?, identity.key()?)?;
    config.alpn_protocols = vec![ALPN_GRPC.to_vec()];
    Ok(config)
}

/// A TLS client configuration for gRPC (ALPN `h2`): presents `identity` if given and trusts the
/// server according to `trust`. The server's name is checked against
/// [`super::COORDINATOR_NAME`] by [`super::connect`].
pub fn client_config(
    identity: Option<&Identity>,
    trust: Trust,
) -> Result<rustls::ClientConfig, TrustError> {
    client(identity, trust, rustls::DEFAULT_VERSIONS, ALPN_GRPC)
}

fn client(
    identity: Option<&Identity>,
    trust: Trust,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TrustError> {
    let builder =
        rustls::ClientConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
    let builder =
        match trust {
            Trust::Ca(pem) => builder.with_root_certificates(roots(&pem)?),
            Trust::Fingerprint(fingerprint) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(FingerprintVerifier {
                    fingerprint,
                    provider: provider(),
                })),
        };
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.cert_chain()?, id.key()?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// Accepts a server only if its chain holds a certificate with the expected SHA-256 and the leaf
/// verifies against that certificate as the only root (name and validity included).
#[derive(Debug)]
struct FingerprintVerifier {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

/// The server's chain holds no certificate with the join token's CA fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the server's certificate chain does not contain the CA named by the join token (SHA-256 {expected})")]
pub struct CaFingerprintMismatch {
    pub expected: String,
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchor = std::iter::once(end_entity)
            .chain(intermediates)
            .find(|c| cert_fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                    CaFingerprintMismatch {
                        expected: hex(&self.fingerprint),
                    },
                ))))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(anchor.clone().into_owned())?;
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| c.as_ref() != anchor.as_ref())
            .cloned()
            .collect();
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, &others, server_name, ocsp_response, now)
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why a client could not reach the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server does not hold the CA the join token names (or it is not the coordinator).
    #[error("{0}")]
    UntrustedCa(CaFingerprintMismatch),
    /// The TLS handshake failed (certificate invalid, expired, of another CA, refused by the
    /// server, ...).
    #[error("TLS handshake with the coordinator failed: {0}")]
    Tls(rustls::Error),
    #[error("cannot connect to the coordinator: {0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Transport(tonic::transport::Error),
    #[error("invalid coordinator address {0:?}")]
    Address(String),
}

impl ConnectError {
    /// The coordinator's certificate did not verify: another cluster's CA (or, with a join
    /// token, not the CA it names), a wrong name, outside its validity.
    pub fn is_bad_server_certificate(&self) -> bool {
        matches!(
            self,
            ConnectError::UntrustedCa(_) | ConnectError::Tls(rustls::Error::InvalidCertificate(_))
        )
    }

    /// The most specific error in `err`'s source chain.
    pub(super) fn classify(err: tonic::transport::Error) -> ConnectError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(e) = source {
            if let Some(found) = Self::from_dyn(e) {
                return found;
            }
            source = e.source();
        }
        ConnectError::Transport(err)
    }

    fn from_dyn(e: &(dyn std::error::Error + 'static)) -> Option<ConnectError> {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(Self::from_rustls(tls.clone()));
        }
        let io = e.downcast_ref::<std::io::Error>()?;
        if let Some(inner) = io.get_ref() {
            if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                return Some(Self::from_rustls(tls.clone()));
            }
        }
        Some(ConnectError::Io(std::io::Error::new(
            io.kind(),
            io.to_string(),
        )))
    }

    fn from_rustls(e: rustls::Error) -> ConnectError {
        if let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) = &e {
            if let Some(m) = inner.downcast_ref::<CaFingerprintMismatch>() {
                return ConnectError::UntrustedCa(m.clone());
            }
        }
        ConnectError::Tls(e)
    }
}

// ---------------------------------------------------------------------------------------------
// QUIC

/// Longest silence before a QUIC connection is considered dead.
pub const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// QUIC keep-alive interval (keeps NAT bindings and detects loss fast).
pub const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// Most concurrent bidirectional streams a peer may open (a stream per batch).
pub const QUIC_MAX_STREAMS: u32 = 256;
/// Flow-control windows: one stream, and the whole connection.
pub const QUIC_STREAM_WINDOW: u32 = 16 << 20;
pub const QUIC_CONNECTION_WINDOW: u32 = 64 << 20;

/// Largest UDP payload the data plane accepts, and the ceiling of path MTU discovery (which
/// starts at QUIC's 1200 bytes and probes upwards; probes a path cannot carry are only lost).
/// An Ethernet path stays at its 1472; jumbo frames (9000) and loopback carry bigger datagrams,
/// so a 7168-wide bf16 vector (14 KiB) crosses loopback in one datagram instead of ten, each of
/// which costs a system call, a decryption and an acknowledgement.
pub const QUIC_MAX_UDP_PAYLOAD: u16 = 16384;

/// The data plane's transport limits (both sides): idle timeout, keep-alive, bounded streams and
/// flow-control windows, no unidirectional streams, no datagrams; MTU discovery up to
/// [`QUIC_MAX_UDP_PAYLOAD`].
pub fn quic_transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(QUIC_IDLE_TIMEOUT).expect("10 s fits a QUIC varint"),
    ));
    t.keep_alive_interval(Some(QUIC_KEEP_ALIVE));
    t.max_concurrent_bidi_streams(QUIC_MAX_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(QUIC_STREAM_WINDOW.into());
    t.receive_window(QUIC_CONNECTION_WINDOW.into());
    t.send_window(u64::from(QUIC_CONNECTION_WINDOW));
    t.datagram_receive_buffer_size(None);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(QUIC_MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// A QUIC endpoint bound to `addr` that accepts datagrams of up to [`QUIC_MAX_UDP_PAYLOAD`]
/// (both ends must, for MTU discovery to go past Ethernet's size): a server when `server` is
/// given, else a client only. Call it within the runtime that is to drive the endpoint.
pub fn quic_endpoint(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(std::io::Error::other(
            "a QUIC endpoint needs a Tokio runtime",
        ));
    }
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(QUIC_MAX_UDP_PAYLOAD)
        .expect("QUIC_MAX_UDP_PAYLOAD is within QUIC's bounds");
    quinn::Endpoint::new(
        config,
        server,
        std::net::UdpSocket::bind(addr)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// The coordinator's QUIC server configuration: TLS 1.3, ALPN [`ALPN_DATA`], client certificates
/// of the cluster CA required.
pub fn quic_server_config(identity: &Identity) -> Result<quinn::ServerConfig, TrustError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier(identity, ClientAuth::Required)?)
        .with_single_cert(identity.cert_chain()?, identity.key()?)?;
    tls.alpn_protocols = vec![ALPN_DATA.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TrustError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(quic_transport_config()));
    Ok(config)
}

/// A worker's QUIC client configuration: TLS 1.3, ALPN [`ALPN_DATA`], presents `identity`,
/// trusts the CA in `ca_pem`. Connect with server name [`super::COORDINATOR_NAME`].
pub fn quic_client_config(
    identity: &Identity,
    ca_pem: &str,
) -> Result<quinn::ClientConfig, TrustError> {
    let tls = client(
        Some(identity),
        Trust::Ca(ca_pem.to_string()),
        &[&rustls::version::TLS13],
        ALPN_DATA,
    )?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TrustError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(quic_transport_config()));
    Ok(config)
}

/// The verified identity of a QUIC peer (the coordinator sees the worker's name).
pub fn quic_peer_identity(connection: &quinn::Connection) -> Option<PeerIdentity> {
    let any = connection.peer_identity()?;
    let certs = any.downcast_ref::<Vec<CertificateDer<'static>>>()?;
    peer_identity_of_cert(certs.first()?)
}
