//! The cluster's trust layer: its certificate authority, join tokens, identities, and the TLS
//! configurations of the control plane (gRPC) and the data plane (QUIC).
//!
//! # Trust model
//!
//! - The coordinator creates a cluster CA ([`ClusterCa`], ECDSA P-256) on first start and keeps it
//!   in its state directory (`ca.pem`, `ca.key.pem` with mode 0600) together with the join secret
//!   (`join.secret`, 0600), so the CA and the join token survive restarts.
//! - The join token ([`JoinToken`], printed as `dsv3-<base64url>`) carries the 32-byte secret and
//!   the SHA-256 of the CA certificate. It is the only thing a new worker is given.
//! - Join: the worker generates its own key pair ([`WorkerKey`]) and dials the coordinator with
//!   [`client_config`]`(None, Trust::Fingerprint(token.ca_fingerprint))`. The coordinator serves
//!   `[leaf, CA]`; the worker accepts the chain only if one of its certificates hashes to the
//!   fingerprint and the leaf verifies against that certificate as the root (name
//!   [`COORDINATOR_NAME`], validity). It then calls `Join` with the secret, its name and a CSR;
//!   the coordinator compares the secret in constant time ([`ClusterCa::handle_join`]) and signs
//!   the CSR. The private key never leaves the worker. The worker stores key, certificate and CA
//!   ([`Identity::save`]) and from then on trusts the CA itself ([`Trust::Ca`]).
//! - Every other RPC and every QUIC connection is mutually authenticated with certificates of
//!   that CA: gRPC with [`ClientAuth::Optional`] (so that `Join` can be reached) plus
//!   [`peer_worker_name`]/[`peer_identity`] checks in each RPC, QUIC with client certificates
//!   required in the handshake.
//! - Refused: a wrong secret (`PermissionDenied`), a server whose CA does not match the token
//!   ([`ConnectError::UntrustedCa`]), a missing client certificate (`Unauthenticated` in the RPC,
//!   handshake failure on QUIC), a client certificate from another CA or outside its validity
//!   (handshake failure, logged and counted by [`TlsIncoming`]).
//!
//! Certificates carry a role in their subject's organisational unit: `worker` for certificates
//! issued through `Join` (common name = the worker's name) and `coordinator` for the
//! coordinator's own identity (also used by the `cluster` CLI as a client).

mod ca;
mod grpc;
mod tls;

pub use ca::{
    ClusterCa, Identity, JoinError, JoinToken, TokenError, Validity, WorkerKey, CA_CERT_DAYS,
    WORKER_CERT_DAYS,
};
pub use grpc::{
    connect, peer_addr, peer_identity, peer_worker_name, PeerInfo, TlsIncoming, TlsServerStream,
    HANDSHAKE_TIMEOUT,
};
pub use tls::{
    client_config, peer_identity_of_cert, quic_client_config, quic_endpoint, quic_peer_identity,
    quic_server_config, quic_transport_config, server_config, CaFingerprintMismatch, ClientAuth,
    ConnectError, PeerIdentity, Role, Trust, ALPN_DATA, ALPN_GRPC, QUIC_CONNECTION_WINDOW,
    QUIC_IDLE_TIMEOUT, QUIC_KEEP_ALIVE, QUIC_MAX_STREAMS, QUIC_MAX_UDP_PAYLOAD, QUIC_STREAM_WINDOW,
};

use std::path::PathBuf;

/// The DNS name every coordinator certificate carries and every client checks, whatever address
/// it dialled.
pub const COORDINATOR_NAME: &str = "coordinator.cluster.local";

/// SHA-256 of a DER certificate (what a join token's fingerprint is).
pub fn cert_fingerprint(der: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(der).into()
}

/// Lowercase hex, for log lines and file contents.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A failure of the trust layer itself (files, certificates, configurations).
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("{what}: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC configuration: {0}")]
    Quic(String),
    #[error(
        "the coordinator's CA (SHA-256 {got}) is not the one the join token names ({expected})"
    )]
    CaMismatch { expected: String, got: String },
    #[error("worker name: {0}")]
    Name(#[from] crate::control::ConvertError),
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("{0}")]
    Invalid(String),
    #[error("no cluster state in {}: start the coordinator there first, or pass the --state-dir it uses", .0.display())]
    NoClusterState(PathBuf),
}

impl TrustError {
    fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrustError::Io {
            path: path.into(),
            source,
        }
    }
}
