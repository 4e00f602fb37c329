//! The lab's credentials: a CA generated at start, a serving certificate for
//! every address the server listens on, a bearer token, and kubeconfigs.

use std::net::IpAddr;

use anyhow::Result;
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA, the server's certificate and key, and the clients' token.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Pki {
    pub ca_pem: String,
    #[serde(with = "base64_der")]
    pub cert_der: CertificateDer<'static>,
    #[serde(with = "base64_bytes")]
    key_der: Vec<u8>,
    pub token: String,
    /// Signs the service account tokens TokenRequest mints and the
    /// kubelets' credentials.
    #[serde(with = "base64_bytes")]
    pub signing_key: Vec<u8>,
}

/// DER in JSON as base64 text.
mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

mod base64_der {
    use rustls::pki_types::CertificateDer;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        der: &CertificateDer<'static>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        super::base64_bytes::serialize(der.as_ref(), s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<CertificateDer<'static>, D::Error> {
        super::base64_bytes::deserialize(d).map(CertificateDer::from)
    }
}

impl Pki {
    /// Fresh credentials for a server reachable at `addresses` (and `localhost`).
    pub fn generate(addresses: &[IpAddr]) -> Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "meshlab-ca");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let mut names = vec!["localhost".to_string(), "kubernetes".to_string()];
        names.extend(addresses.iter().map(IpAddr::to_string));
        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::new(names)?;
        server
            .distinguished_name
            .push(DnType::CommonName, "meshlab-apiserver");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let server_cert = server.signed_by(&server_key, &issuer)?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            cert_der: server_cert.der().clone(),
            key_der: server_key.serialize_der(),
            signing_key: {
                let mut key = vec![0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                    .map_err(|_| anyhow::anyhow!("no system randomness for the signing key"))?;
                key
            },
            token: format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            ),
        })
    }

    /// The server's TLS configuration, offering HTTP/2 and HTTP/1.1.
    pub fn server_config(&self) -> Result<rustls::ServerConfig> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der.clone()], key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// A kubeconfig for a client reaching the server at `server_url`.
    pub fn kubeconfig(&self, server_url: &str) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: meshlab
  cluster:
    server: {server_url}
    certificate-authority-data: {ca}
users:
- name: meshlab-admin
  user:
    token: {token}
contexts:
- name: meshlab
  context:
    cluster: meshlab
    user: meshlab-admin
current-context: meshlab
",
            token = self.token
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_survive_a_round_trip_through_json() {
        let pki = Pki::generate(&["127.0.0.1".parse().unwrap()]).unwrap();
        let again: Pki = serde_json::from_slice(&serde_json::to_vec(&pki).unwrap()).unwrap();
        assert_eq!(again.kubeconfig("https://x"), pki.kubeconfig("https://x"));
        assert_eq!(again.cert_der, pki.cert_der);
        again.server_config().unwrap();
    }

    #[test]
    fn kubeconfig_carries_ca_and_token() {
        let pki = Pki::generate(&["127.0.0.1".parse().unwrap()]).unwrap();
        let kc = pki.kubeconfig("https://127.0.0.1:6443");
        assert!(kc.contains("server: https://127.0.0.1:6443"));
        assert!(kc.contains(&pki.token));
        assert!(pki.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        pki.server_config().unwrap();
    }
}
