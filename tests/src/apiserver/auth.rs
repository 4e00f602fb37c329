//! Who is asking. A bearer token is either the admin's static token or a
//! service account token minted by TokenRequest and bound to a Node, as
//! kube-apiserver's authenticators turn tokens into user info. A bound
//! token names its node in `authentication.kubernetes.io/node-name`, the
//! claim Weft's admission policy keys on.
//!
//! The lab signs its tokens with HMAC-SHA256 (a JWT with `alg: HS256`)
//! where kube-apiserver uses an asymmetric key: only the API server itself
//! verifies them here, so the difference is not visible to clients.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;
use serde::{Deserialize, Serialize};

/// The issuer and audience of every lab token (kube-apiserver's defaults).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// `userInfo.extra` keys of a node-bound service account token.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
pub const EXTRA_NODE_UID: &str = "authentication.kubernetes.io/node-uid";
pub const EXTRA_CREDENTIAL_ID: &str = "authentication.kubernetes.io/credential-id";

const MASTERS: &str = "system:masters";
const AUTHENTICATED: &str = "system:authenticated";

/// An authenticated user, as admission and authorization see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl User {
    /// The holder of the admin token (the lab's `kubeconfig`).
    pub fn admin() -> Self {
        Self {
            name: "kubernetes-admin".into(),
            uid: String::new(),
            groups: vec![MASTERS.into(), AUTHENTICATED.into()],
            extra: BTreeMap::new(),
        }
    }

    /// `system:masters` bypasses authorization, as in kube-apiserver.
    pub fn is_master(&self) -> bool {
        self.groups.iter().any(|g| g == MASTERS)
    }

    /// `request.userInfo` of an admission request.
    pub fn to_user_info(&self) -> serde_json::Value {
        let mut info = serde_json::json!({"username": self.name, "groups": self.groups});
        if !self.uid.is_empty() {
            info["uid"] = self.uid.clone().into();
        }
        // Absent when empty, so `has(request.userInfo.extra)` is false, as
        // for a real request without extra.
        if !self.extra.is_empty() {
            info["extra"] = serde_json::json!(self.extra);
        }
        info
    }
}

/// A reference to the object a token names: its service account or node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub name: String,
    pub uid: String,
}

/// The `kubernetes.io` claim of a service account token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesClaim {
    pub namespace: String,
    pub serviceaccount: ObjectRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<ObjectRef>,
}

/// The claims of a service account token (a JWT's payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaim,
}

impl Claims {
    /// The user a valid token authenticates as: the service account, its
    /// groups, and the node it is bound to in `extra`.
    pub fn user(&self) -> User {
        let k = &self.kubernetes;
        let mut extra = BTreeMap::new();
        extra.insert(
            EXTRA_CREDENTIAL_ID.into(),
            vec![format!("JTI={}", self.jti)],
        );
        if let Some(node) = &k.node {
            extra.insert(EXTRA_NODE_NAME.into(), vec![node.name.clone()]);
            extra.insert(EXTRA_NODE_UID.into(), vec![node.uid.clone()]);
        }
        User {
            name: service_account_user(&k.namespace, &k.serviceaccount.name),
            uid: k.serviceaccount.uid.clone(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{}", k.namespace),
                AUTHENTICATED.into(),
            ],
            extra,
        }
    }
}

/// `system:serviceaccount:NS:NAME`, a service account's user name.
pub fn service_account_user(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// Why a token was refused (the client only ever sees 401).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("not a JWT of three base64url parts")]
    Malformed,
    #[error("the signature does not verify")]
    Signature,
    #[error("the claims do not parse: {0}")]
    Claims(String),
    #[error("issued for another issuer or audience")]
    Audience,
    #[error("expired or not yet valid")]
    Time,
}

/// Mints and verifies tokens with the server's signing secret.
pub struct Signer {
    key: hmac::Key,
}

impl Signer {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    pub fn mint(&self, claims: &Claims) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = serde_json::to_vec(claims).expect("claims serialize");
        let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(payload));
        let tag = hmac::sign(&self.key, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The token's claims if its signature verifies (in constant time)
    /// and it is valid at `now` (seconds since the epoch).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let (signed, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (header, payload) = signed.split_once('.').ok_or(TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.key, signed.as_bytes(), &tag).map_err(|_| TokenError::Signature)?;
        let header: serde_json::Value = URL_SAFE_NO_PAD
            .decode(header)
            .ok()
            .and_then(|h| serde_json::from_slice(&h).ok())
            .ok_or(TokenError::Malformed)?;
        if header["alg"] != "HS256" {
            return Err(TokenError::Malformed);
        }
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let claims: Claims =
            serde_json::from_slice(&payload).map_err(|e| TokenError::Claims(e.to_string()))?;
        if claims.iss != ISSUER || !claims.aud.iter().any(|a| a == ISSUER) {
            return Err(TokenError::Audience);
        }
        if now < claims.nbf || now >= claims.exp {
            return Err(TokenError::Time);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(node: Option<&str>) -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: service_account_user("weft-system", "meshd"),
            aud: vec![ISSUER.into()],
            iat: 1000,
            nbf: 1000,
            exp: 2000,
            jti: "j1".into(),
            kubernetes: KubernetesClaim {
                namespace: "weft-system".into(),
                serviceaccount: ObjectRef {
                    name: "meshd".into(),
                    uid: "sa-uid".into(),
                },
                node: node.map(|n| ObjectRef {
                    name: n.into(),
                    uid: format!("{n}-uid"),
                }),
            },
        }
    }

    #[test]
    fn a_minted_token_verifies_and_names_its_node() {
        let signer = Signer::new(b"secret");
        let token = signer.mint(&claims(Some("node-1")));
        let back = signer.verify(&token, 1500).unwrap();
        assert_eq!(back, claims(Some("node-1")));
        let user = back.user();
        assert_eq!(user.name, "system:serviceaccount:weft-system:meshd");
        assert_eq!(user.extra[EXTRA_NODE_NAME], vec!["node-1"]);
        assert!(!user.is_master());
        assert_eq!(user.to_user_info()["extra"][EXTRA_NODE_NAME][0], "node-1");
        let unbound = claims(None).user().to_user_info();
        assert!(unbound["extra"].get(EXTRA_NODE_NAME).is_none());
    }

    #[test]
    fn forged_tampered_and_expired_tokens_are_refused() {
        let signer = Signer::new(b"secret");
        let token = signer.mint(&claims(Some("node-1")));
        // Another server's key.
        assert_eq!(
            Signer::new(b"other").verify(&token, 1500),
            Err(TokenError::Signature)
        );
        // The node claim rewritten to another node, signature kept.
        let parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(Some("node-2"))).unwrap());
        let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
        assert_eq!(signer.verify(&tampered, 1500), Err(TokenError::Signature));
        assert_eq!(signer.verify(&token, 2000), Err(TokenError::Time));
        assert_eq!(signer.verify(&token, 999), Err(TokenError::Time));
        for junk in ["", "a.b", "a.b.c", "...."] {
            assert!(signer.verify(junk, 1500).is_err(), "{junk:?}");
        }
        let mut other_audience = claims(None);
        other_audience.aud = vec!["vault".into()];
        assert_eq!(
            signer.verify(&signer.mint(&other_audience), 1500),
            Err(TokenError::Audience)
        );
    }
}
