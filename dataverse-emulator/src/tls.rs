//! A self-signed certificate per emulator instance, and a rustls server configuration that uses the ring provider
//! explicitly (no process-wide provider needs installing).
//!
//! Each instance's certificate has its own subject (`CN=Dataverse emulator <instance id>`) and serial number (the
//! instance id), so a client that trusts one instance's certificate cannot mistake another instance for it, and
//! tools that index certificates by issuer and serial (browsers, `certutil`) do not see two different
//! certificates with one identity.

use std::sync::Arc;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SerialNumber};
use rustls::ServerConfig;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use uuid::Uuid;

/// What [`self_signed`] made.
pub(crate) struct Generated {
    /// The certificate, PEM.
    pub(crate) pem: String,
    /// `CN=..., O=...`, as in the certificate.
    pub(crate) subject: String,
    pub(crate) config: Arc<ServerConfig>,
}

/// A certificate for `names` (DNS names or IP addresses) whose subject and serial come from `instance`.
pub(crate) fn self_signed(names: Vec<String>, instance: Uuid) -> Result<Generated, String> {
    let common_name = format!("Dataverse emulator {instance}");
    let organization = "dataverse-emulator";
    let mut params = CertificateParams::new(names)
        .map_err(|e| format!("cannot use the certificate's subject names: {e}"))?;
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, common_name.as_str());
    subject.push(DnType::OrganizationName, organization);
    params.distinguished_name = subject;
    // A positive DER integer: the instance id with its top bit cleared.
    let mut serial = *instance.as_bytes();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let key_pair = KeyPair::generate().map_err(|e| format!("cannot generate a key pair: {e}"))?;
    let certificate = params
        .self_signed(&key_pair)
        .map_err(|e| format!("cannot sign the certificate: {e}"))?;
    let pem = certificate.pem();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot select TLS protocol versions: {e}"))?
            .with_no_client_auth()
            .with_single_cert(vec![certificate.der().clone()], key)
            .map_err(|e| format!("cannot use the generated certificate: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Generated {
        pem,
        subject: format!("CN={common_name}, O={organization}"),
        config: Arc::new(config),
    })
}
