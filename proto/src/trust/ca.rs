//! The cluster CA, join tokens, identities and their files.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use subtle::ConstantTimeEq;

use super::{cert_fingerprint, hex, TrustError, COORDINATOR_NAME};
use crate::control::{self, SECRET_LEN};

/// Default lifetime of a worker certificate.
pub const WORKER_CERT_DAYS: u64 = 365;
/// Lifetime of the cluster CA.
pub const CA_CERT_DAYS: u64 = 3650;

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key.pem";
const SECRET_FILE: &str = "join.secret";
const ID_CERT_FILE: &str = "cert.pem";
const ID_KEY_FILE: &str = "key.pem";
const ID_CA_FILE: &str = "ca.pem";

pub(super) const OU_WORKER: &str = "worker";
pub(super) const OU_COORDINATOR: &str = "coordinator";
const ORGANIZATION: &str = "dsv3-cluster";

// ---------------------------------------------------------------------------------------------
// Files

fn read(path: &Path) -> Result<String, TrustError> {
    fs::read_to_string(path).map_err(|e| TrustError::io(path, e))
}

/// Writes `contents` to `path` atomically (temporary file, then rename), with `mode` on Unix.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TrustError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(|e| TrustError::io(&tmp, e))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| TrustError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| TrustError::io(path, e))
}

fn create_dir(dir: &Path) -> Result<(), TrustError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| TrustError::io(dir, e))
}

pub(super) fn parse_certs(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrustError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TrustError::Pem {
            what,
            reason: "no certificate in it".into(),
        });
    }
    Ok(certs)
}

pub(super) fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, TrustError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TrustError::Pem {
        what: "private key",
        reason: e.to_string(),
    })
}

fn random_bytes<const N: usize>() -> Result<[u8; N], TrustError> {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| TrustError::Invalid("the system random generator failed".into()))?;
    Ok(out)
}

fn serial() -> Result<SerialNumber, TrustError> {
    let mut bytes = random_bytes::<16>()?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte to strip
    Ok(SerialNumber::from_slice(&bytes))
}

// ---------------------------------------------------------------------------------------------
// Validity

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From a few minutes ago (tolerates clocks a little behind) for `days` days.
    pub fn days(days: u64) -> Self {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(300),
            not_after: now + Duration::from_secs(days * 86_400),
        }
    }

    fn apply(&self, params: &mut CertificateParams) -> Result<(), TrustError> {
        if self.not_after <= self.not_before {
            return Err(TrustError::Invalid(
                "certificate validity ends before it starts".into(),
            ));
        }
        params.not_before = self.not_before.into();
        params.not_after = self.not_after.into();
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Join token

/// What a new worker needs to join: the join secret and the SHA-256 of the CA certificate.
///
/// Printed as `dsv3-` followed by the base64url (no padding) of `secret || ca_fingerprint`.
/// `Debug` hides the secret; `Display` is the token itself (treat it as a password).
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub secret: [u8; SECRET_LEN],
    pub ca_fingerprint: [u8; 32],
}

const TOKEN_PREFIX: &str = "dsv3-";

/// A string that is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("a join token starts with \"{TOKEN_PREFIX}\"")]
    Prefix,
    #[error("the join token is not valid base64url")]
    Encoding,
    #[error("the join token holds {0} bytes, expected 64 (was it cut short?)")]
    Length(usize),
}

impl JoinToken {
    /// Compares `presented` with the secret in constant time.
    pub fn verify_secret(&self, presented: &[u8]) -> bool {
        presented.len() == SECRET_LEN && bool::from(self.secret.ct_eq(presented))
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bytes = [0u8; 64];
        bytes[..32].copy_from_slice(&self.secret);
        bytes[32..].copy_from_slice(&self.ca_fingerprint);
        write!(
            f,
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("secret", &"<hidden>")
            .field("ca_fingerprint", &hex(&self.ca_fingerprint))
            .finish()
    }
}

impl FromStr for JoinToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, TokenError> {
        let body = s
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Prefix)?;
        if body.len() > 128 {
            return Err(TokenError::Length(body.len() * 3 / 4));
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Encoding)?;
        if bytes.len() != 64 {
            return Err(TokenError::Length(bytes.len()));
        }
        let mut token = JoinToken {
            secret: [0; 32],
            ca_fingerprint: [0; 32],
        };
        token.secret.copy_from_slice(&bytes[..32]);
        token.ca_fingerprint.copy_from_slice(&bytes[32..]);
        Ok(token)
    }
}

// ---------------------------------------------------------------------------------------------
// Identity

/// A certificate chain, its private key and the CA that both sides trust.
///
/// Saved in a directory as `cert.pem`, `key.pem` (mode 0600) and `ca.pem`: a worker's state
/// directory after it joined.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    /// Leaf first; a coordinator's chain is `[leaf, CA]`.
    pub cert_chain_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("cert_chain_pem", &self.cert_chain_pem)
            .field("key_pem", &"<hidden>")
            .field("ca_pem", &self.ca_pem)
            .finish()
    }
}

impl Identity {
    /// Whether `dir` holds a saved identity.
    pub fn exists(dir: &Path) -> bool {
        [ID_CERT_FILE, ID_KEY_FILE, ID_CA_FILE]
            .iter()
            .all(|f| dir.join(f).is_file())
    }

    /// Reads an identity saved by [`Identity::save`] and checks that it parses.
    pub fn load(dir: &Path) -> Result<Identity, TrustError> {
        let id = Identity {
            cert_chain_pem: read(&dir.join(ID_CERT_FILE))?,
            key_pem: read(&dir.join(ID_KEY_FILE))?,
            ca_pem: read(&dir.join(ID_CA_FILE))?,
        };
        id.check()?;
        Ok(id)
    }

    /// Writes the identity into `dir` (created with mode 0700 if missing).
    pub fn save(&self, dir: &Path) -> Result<(), TrustError> {
        create_dir(dir)?;
        write_file(&dir.join(ID_KEY_FILE), self.key_pem.as_bytes(), 0o600)?;
        write_file(
            &dir.join(ID_CERT_FILE),
            self.cert_chain_pem.as_bytes(),
            0o644,
        )?;
        write_file(&dir.join(ID_CA_FILE), self.ca_pem.as_bytes(), 0o644)
    }

    /// SHA-256 of the CA certificate this identity trusts.
    pub fn ca_fingerprint(&self) -> Result<[u8; 32], TrustError> {
        Ok(cert_fingerprint(
            &parse_certs("CA certificate", &self.ca_pem)?[0],
        ))
    }

    /// The leaf certificate's name and role.
    pub fn peer_identity(&self) -> Result<super::PeerIdentity, TrustError> {
        let leaf = &self.cert_chain()?[0];
        super::peer_identity_of_cert(leaf)
            .ok_or_else(|| TrustError::Invalid("the certificate has no common name".into()))
    }

    pub(super) fn cert_chain(&self) -> Result<Vec<CertificateDer<'static>>, TrustError> {
        parse_certs("certificate chain", &self.cert_chain_pem)
    }

    pub(super) fn key(&self) -> Result<PrivateKeyDer<'static>, TrustError> {
        parse_key(&self.key_pem)
    }

    pub(super) fn ca_roots(&self) -> Result<rustls::RootCertStore, TrustError> {
        super::tls::roots(&self.ca_pem)
    }

    fn check(&self) -> Result<(), TrustError> {
        self.cert_chain()?;
        self.key()?;
        parse_certs("CA certificate", &self.ca_pem)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Worker key

/// A worker's freshly generated key pair and the CSR it sends with `Join`.
pub struct WorkerKey {
    key: KeyPair,
    csr_der: Vec<u8>,
}

impl fmt::Debug for WorkerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerKey").finish_non_exhaustive()
    }
}

impl WorkerKey {
    /// Generates an ECDSA P-256 key pair and a CSR naming `name`.
    pub fn generate(name: &str) -> Result<WorkerKey, TrustError> {
        control::check_worker_name(name)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let csr = params.serialize_request(&key)?;
        Ok(WorkerKey {
            csr_der: csr.der().to_vec(),
            key,
        })
    }

    /// The PKCS#10 request (DER), for [`control::JoinRequest::csr_der`].
    pub fn csr_der(&self) -> &[u8] {
        &self.csr_der
    }

    /// The worker's identity from the coordinator's join reply. Checks that the returned CA is
    /// the one the token names, that the certificate verifies against it and that it certifies
    /// this key.
    pub fn into_identity(
        self,
        reply: &control::JoinReply,
        token: &JoinToken,
    ) -> Result<Identity, TrustError> {
        let ca = parse_certs("CA certificate", &reply.ca_cert_pem)?;
        let got = cert_fingerprint(&ca[0]);
        if got != token.ca_fingerprint {
            return Err(TrustError::CaMismatch {
                expected: hex(&token.ca_fingerprint),
                got: hex(&got),
            });
        }
        let leaf = parse_certs("worker certificate", &reply.worker_cert_pem)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf[0])
            .map_err(|e| TrustError::Invalid(format!("worker certificate: {e}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != self.key.public_key_raw() {
            return Err(TrustError::Invalid(
                "the signed certificate is not for this worker's key".into(),
            ));
        }
        super::tls::verify_client_cert(&leaf[0], &reply.ca_cert_pem)?;
        Ok(Identity {
            cert_chain_pem: reply.worker_cert_pem.clone(),
            key_pem: self.key.serialize_pem(),
            ca_pem: reply.ca_cert_pem.clone(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The CA

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("join refused: the join token's secret is wrong")]
    WrongSecret,
    #[error("join refused: {0}")]
    BadCsr(String),
}

impl From<JoinError> for tonic::Status {
    fn from(e: JoinError) -> Self {
        match e {
            JoinError::WrongSecret => tonic::Status::permission_denied(e.to_string()),
            JoinError::BadCsr(_) => tonic::Status::invalid_argument(e.to_string()),
        }
    }
}

/// The cluster's certificate authority and join secret, kept in the coordinator's state
/// directory.
pub struct ClusterCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    secret: [u8; SECRET_LEN],
    dir: PathBuf,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("fingerprint", &hex(&self.fingerprint()))
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Loads the CA and join secret from `state_dir`, creating (and saving) whichever is missing.
    /// The key and the secret are written with mode 0600, the directory with 0700.
    pub fn load_or_create(state_dir: &Path) -> Result<ClusterCa, TrustError> {
        create_dir(state_dir)?;
        Self::open(state_dir, true)
    }

    /// Loads the CA and join secret that a coordinator saved in `state_dir`, creating nothing
    /// (the `cluster` CLI acting as the operator). A directory without them is
    /// [`TrustError::NoClusterState`].
    pub fn load(state_dir: &Path) -> Result<ClusterCa, TrustError> {
        Self::open(state_dir, false)
    }

    fn open(state_dir: &Path, create: bool) -> Result<ClusterCa, TrustError> {
        let cert_path = state_dir.join(CA_CERT_FILE);
        let key_path = state_dir.join(CA_KEY_FILE);
        let (cert_pem, key) = match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let key = KeyPair::from_pem(&read(&key_path)?)?;
                (read(&cert_path)?, key)
            }
            (false, false) if !create => {
                return Err(TrustError::NoClusterState(state_dir.to_path_buf()))
            }
            (false, false) => {
                let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                let mut params = CertificateParams::default();
                params.distinguished_name = DistinguishedName::new();
                params
                    .distinguished_name
                    .push(DnType::CommonName, "dsv3 cluster CA");
                params
                    .distinguished_name
                    .push(DnType::OrganizationName, ORGANIZATION);
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
                params.serial_number = Some(serial()?);
                Validity::days(CA_CERT_DAYS).apply(&mut params)?;
                let cert = params.self_signed(&key)?;
                write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
                write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
                (cert.pem(), key)
            }
            _ => {
                return Err(TrustError::Invalid(format!(
                    "{}: only one of {CA_CERT_FILE} and {CA_KEY_FILE} exists; restore the other \
                     or remove both to create a new cluster CA (every worker must join again)",
                    state_dir.display()
                )))
            }
        };
        let cert_der = parse_certs("CA certificate", &cert_pem)?.remove(0);
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;

        let secret_path = state_dir.join(SECRET_FILE);
        let secret = if secret_path.exists() {
            let text = read(&secret_path)?;
            parse_hex_secret(text.trim()).ok_or_else(|| {
                TrustError::Invalid(format!(
                    "{}: not a {SECRET_LEN}-byte hex secret",
                    secret_path.display()
                ))
            })?
        } else if !create {
            return Err(TrustError::Invalid(format!(
                "{}: {SECRET_FILE} is missing",
                state_dir.display()
            )));
        } else {
            let secret = random_bytes::<SECRET_LEN>()?;
            write_file(
                &secret_path,
                format!("{}\n", hex(&secret)).as_bytes(),
                0o600,
            )?;
            secret
        };
        Ok(ClusterCa {
            cert_pem,
            cert_der,
            issuer,
            secret,
            dir: state_dir.to_path_buf(),
        })
    }

    /// SHA-256 of the CA certificate's DER.
    pub fn fingerprint(&self) -> [u8; 32] {
        cert_fingerprint(&self.cert_der)
    }

    /// The CA certificate.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The token a worker joins with.
    pub fn join_token(&self) -> JoinToken {
        JoinToken {
            secret: self.secret,
            ca_fingerprint: self.fingerprint(),
        }
    }

    /// Replaces the join secret (tokens printed before stop working; joined workers are not
    /// affected) and saves it.
    pub fn rotate_join_secret(&mut self) -> Result<JoinToken, TrustError> {
        let secret = random_bytes::<SECRET_LEN>()?;
        write_file(
            &self.dir.join(SECRET_FILE),
            format!("{}\n", hex(&secret)).as_bytes(),
            0o600,
        )?;
        self.secret = secret;
        Ok(self.join_token())
    }

    /// Signs a worker's CSR: the certificate certifies the CSR's public key (the CSR's own
    /// signature is checked: proof of possession), names `name` (common name, role `worker`),
    /// allows client authentication only, and is valid for `validity`. Everything else the CSR
    /// asks for is ignored.
    pub fn issue_worker(
        &self,
        csr_der: &[u8],
        name: &str,
        validity: Validity,
    ) -> Result<String, TrustError> {
        control::check_worker_name(name)?;
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
            csr_der,
        ))?;
        let alg = csr.public_key.algorithm();
        if ![
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ]
        .contains(&alg)
        {
            return Err(TrustError::Invalid(
                "the CSR's key is not ECDSA P-256/P-384 or Ed25519".into(),
            ));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, OU_WORKER);
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial()?);
        validity.apply(&mut params)?;
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
    }

    /// The `Join` RPC's decision: checks the secret in constant time, then signs the CSR for
    /// [`WORKER_CERT_DAYS`].
    pub fn handle_join(
        &self,
        request: &control::JoinRequest,
    ) -> Result<control::JoinReply, JoinError> {
        if !bool::from(self.secret.ct_eq(&request.token_secret)) {
            return Err(JoinError::WrongSecret);
        }
        let worker_cert_pem = self
            .issue_worker(
                &request.csr_der,
                &request.name,
                Validity::days(WORKER_CERT_DAYS),
            )
            .map_err(|e| JoinError::BadCsr(e.to_string()))?;
        Ok(control::JoinReply {
            worker_cert_pem,
            ca_cert_pem: self.cert_pem.clone(),
        })
    }

    /// A fresh identity for the coordinator (a new key each call): a server certificate for
    /// [`COORDINATOR_NAME`] plus `extra_names` (DNS names or IP addresses), also allowed for
    /// client authentication (the `cluster` CLI), with the chain `[leaf, CA]` that
    /// fingerprint-trusting workers need. Valid for [`WORKER_CERT_DAYS`].
    pub fn coordinator_identity(&self, extra_names: &[String]) -> Result<Identity, TrustError> {
        self.coordinator_identity_with(extra_names, Validity::days(WORKER_CERT_DAYS))
    }

    /// [`ClusterCa::coordinator_identity`] with a chosen validity (tests).
    pub fn coordinator_identity_with(
        &self,
        extra_names: &[String],
        validity: Validity,
    ) -> Result<Identity, TrustError> {
        let mut names = vec![COORDINATOR_NAME.to_string()];
        names.extend(
            extra_names
                .iter()
                .filter(|n| n.as_str() != COORDINATOR_NAME)
                .cloned(),
        );
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "coordinator");
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, OU_COORDINATOR);
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial()?);
        validity.apply(&mut params)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Identity {
            cert_chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

fn parse_hex_secret(s: &str) -> Option<[u8; SECRET_LEN]> {
    if s.len() != 2 * SECRET_LEN || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; SECRET_LEN];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_malformed_tokens() {
        let token = JoinToken {
            secret: [7; 32],
            ca_fingerprint: [0xab; 32],
        };
        let text = token.to_string();
        assert!(text.starts_with("dsv3-"));
        assert_eq!(text.len(), 5 + 86);
        assert_eq!(text.parse::<JoinToken>().unwrap(), token);
        assert_eq!(format!(" {text}\n").parse::<JoinToken>().unwrap(), token);
        assert!(!format!("{token:?}").contains("0707"));

        assert_eq!("abc".parse::<JoinToken>(), Err(TokenError::Prefix));
        assert_eq!(text[5..].parse::<JoinToken>(), Err(TokenError::Prefix));
        assert_eq!("dsv3-@@@@".parse::<JoinToken>(), Err(TokenError::Encoding));
        let short = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([1u8; 60]);
        assert_eq!(
            format!("dsv3-{short}").parse::<JoinToken>(),
            Err(TokenError::Length(60))
        );
        // A token cut mid-character is not even valid base64.
        assert!(text[..text.len() - 4].parse::<JoinToken>().is_err());
        assert!(matches!(
            format!("{text}AAAA").parse::<JoinToken>(),
            Err(TokenError::Length(_))
        ));
        assert!(matches!(
            format!("dsv3-{}", "A".repeat(10_000)).parse::<JoinToken>(),
            Err(TokenError::Length(_))
        ));
    }

    #[test]
    fn secret_comparison() {
        let token = JoinToken {
            secret: [7; 32],
            ca_fingerprint: [0; 32],
        };
        assert!(token.verify_secret(&[7; 32]));
        let mut wrong = [7; 32];
        wrong[31] = 8;
        assert!(!token.verify_secret(&wrong));
        assert!(!token.verify_secret(&[7; 31]));
        assert!(!token.verify_secret(&[]));
    }

    #[test]
    fn ca_persists_with_private_files() {
        let dir = std::env::temp_dir().join(format!("dsv3-ca-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let ca = ClusterCa::load_or_create(&dir).unwrap();
        let again = ClusterCa::load_or_create(&dir).unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());
        assert_eq!(ca.join_token(), again.join_token());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [CA_KEY_FILE, SECRET_FILE] {
                let mode = fs::metadata(dir.join(f)).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
        // A CSR signed by a key other than the one it names is refused (proof of possession).
        let key = WorkerKey::generate("w1").unwrap();
        let mut bad = key.csr_der().to_vec();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(ca.issue_worker(&bad, "w1", Validity::days(1)).is_err());
        assert!(ca
            .issue_worker(key.csr_der(), "bad name", Validity::days(1))
            .is_err());

        let mut rotated = ClusterCa::load_or_create(&dir).unwrap();
        let new = rotated.rotate_join_secret().unwrap();
        assert_ne!(new, ca.join_token());
        assert_eq!(ClusterCa::load_or_create(&dir).unwrap().join_token(), new);

        // Load-only: the same CA, nothing created where there is none.
        assert_eq!(
            ClusterCa::load(&dir).unwrap().fingerprint(),
            ca.fingerprint()
        );
        let empty = dir.join("empty");
        assert!(matches!(
            ClusterCa::load(&empty),
            Err(TrustError::NoClusterState(d)) if d == empty
        ));
        assert!(!empty.exists());

        fs::remove_file(dir.join(CA_KEY_FILE)).unwrap();
        assert!(ClusterCa::load(&dir).is_err());
        assert!(ClusterCa::load_or_create(&dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
