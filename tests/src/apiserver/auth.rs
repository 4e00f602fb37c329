//! Who is asking. A bearer token is the admin's static token, a service
//! account token minted by TokenRequest and bound to a Node, or a node's
//! kubelet credential, as kube-apiserver's authenticators turn tokens (and
//! client certificates) into user info. A bound token names its node in
//! `authentication.kubernetes.io/node-name`, the claim Weft's admission
//! policy keys on.
//!
//! A kubelet authenticates as `system:node:<name>` in `system:nodes`, by a
//! client certificate in a real cluster. The lab gives it a token instead
//! (signed like the others, with a claim of its own), so a test can act as
//! a compromised node's kubelet with any client without the server
//! verifying client certificates.
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
/// The group of every kubelet, which the Node authorizer answers for.
pub const NODES: &str = "system:nodes";
/// The prefix of a kubelet's user name; the node's name follows.
const NODE_USER_PREFIX: &str = "system:node:";

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

    /// A node's kubelet, as the Node authorizer and NodeRestriction tell
    /// one: in `system:nodes` and named `system:node:<name>`. The name may
    /// be empty (a node they cannot place, which both refuse).
    pub fn node_name(&self) -> Option<&str> {
        let name = self.name.strip_prefix(NODE_USER_PREFIX)?;
        self.groups.iter().any(|g| g == NODES).then_some(name)
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

/// `system:node:NAME`, the user name of node NAME's kubelet.
pub fn node_user(node: &str) -> String {
    format!("{NODE_USER_PREFIX}{node}")
}

/// The lab's own claim that makes a token a kubelet credential. A token
/// carries either it or `kubernetes.io`, never both: which one decides what
/// the token is, so neither kind can pass for the other.
pub const KUBELET_CLAIM: &str = "meshlab.weft.dev/kubelet";

/// How long a kubelet credential is valid: a year, as kubeadm's kubelet
/// client certificates.
pub const KUBELET_SECONDS: u64 = 365 * 24 * 3600;

/// The [`KUBELET_CLAIM`] claim: whose kubelet holds the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeletClaim {
    pub node: String,
}

/// The claims of a kubelet credential. Unknown fields are refused, so a
/// payload with a `kubernetes.io` claim beside this one is no credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeletClaims {
    pub iss: String,
    /// The user name, for whoever reads the token; the user is taken from
    /// the kubelet claim.
    pub sub: String,
    pub aud: Vec<String>,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    #[serde(rename = "meshlab.weft.dev/kubelet")]
    pub kubelet: KubeletClaim,
}

impl KubeletClaims {
    /// A credential for `node`'s kubelet, valid from `now` for
    /// [`KUBELET_SECONDS`]. Not bound to the Node object: a kubelet's
    /// certificate outlives its Node too (and lets it register again).
    pub fn for_node(node: &str, now: u64) -> Self {
        Self {
            iss: ISSUER.into(),
            sub: node_user(node),
            aud: vec![ISSUER.into()],
            iat: now,
            nbf: now,
            exp: now + KUBELET_SECONDS,
            jti: uuid::Uuid::new_v4().to_string(),
            kubelet: KubeletClaim { node: node.into() },
        }
    }

    /// The user the kubelet authenticates as. No `extra`: a client
    /// certificate carries none, and Weft's policies must not take a
    /// kubelet for a node's agent.
    pub fn user(&self) -> User {
        User {
            name: node_user(&self.kubelet.node),
            uid: String::new(),
            groups: vec![NODES.into(), AUTHENTICATED.into()],
            extra: BTreeMap::new(),
        }
    }
}

/// What a token that verifies is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    ServiceAccount(Claims),
    Kubelet(KubeletClaims),
}

impl Credential {
    pub fn user(&self) -> User {
        match self {
            Credential::ServiceAccount(c) => c.user(),
            Credential::Kubelet(c) => c.user(),
        }
    }
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
    #[error("a kubelet credential, not a service account token")]
    NotServiceAccount,
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

    /// A signed token of `claims` ([`Claims`] or [`KubeletClaims`]).
    pub fn mint<C: Serialize>(&self, claims: &C) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = serde_json::to_vec(claims).expect("claims serialize");
        let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(payload));
        let tag = hmac::sign(&self.key, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The claims of a service account token if its signature verifies (in
    /// constant time) and it is valid at `now` (seconds since the epoch).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        match self.verify_credential(token, now)? {
            Credential::ServiceAccount(claims) => Ok(claims),
            Credential::Kubelet(_) => Err(TokenError::NotServiceAccount),
        }
    }

    /// What the token is if its signature verifies (in constant time) and
    /// it is valid at `now` (seconds since the epoch): a kubelet credential
    /// if it has the [`KUBELET_CLAIM`], else a service account token, read
    /// exactly as before kubelets had credentials.
    pub fn verify_credential(&self, token: &str, now: u64) -> Result<Credential, TokenError> {
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
        let claims_error = |e: serde_json::Error| TokenError::Claims(e.to_string());
        let credential = if has_kubelet_claim(&payload) {
            Credential::Kubelet(serde_json::from_slice(&payload).map_err(claims_error)?)
        } else {
            Credential::ServiceAccount(serde_json::from_slice(&payload).map_err(claims_error)?)
        };
        let (iss, aud, nbf, exp) = match &credential {
            Credential::ServiceAccount(c) => (&c.iss, &c.aud, c.nbf, c.exp),
            Credential::Kubelet(c) => (&c.iss, &c.aud, c.nbf, c.exp),
        };
        if iss != ISSUER || !aud.iter().any(|a| a == ISSUER) {
            return Err(TokenError::Audience);
        }
        if now < nbf || now >= exp {
            return Err(TokenError::Time);
        }
        Ok(credential)
    }
}

/// Whether a (signed) payload is a JSON object with the [`KUBELET_CLAIM`].
fn has_kubelet_claim(payload: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "meshlab.weft.dev/kubelet")]
        kubelet: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Probe>(payload).is_ok_and(|p| p.kubelet.is_some())
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
    #[test]
    fn a_kubelet_credential_authenticates_as_its_node() {
        let signer = Signer::new(b"secret");
        let kubelet = KubeletClaims::for_node("node-1", 1000);
        let token = signer.mint(&kubelet);
        let back = signer.verify_credential(&token, 1500).unwrap();
        assert_eq!(back, Credential::Kubelet(kubelet.clone()));
        let user = back.user();
        assert_eq!(user.name, "system:node:node-1");
        assert_eq!(user.groups, vec!["system:nodes", "system:authenticated"]);
        assert_eq!(user.node_name(), Some("node-1"));
        assert!(!user.is_master());
        // No node claim in `extra`: Weft's policies key on it for meshd.
        assert!(user.to_user_info().get("extra").is_none());
        // Valid for a year, as kubeadm's kubelet certificates.
        assert!(signer
            .verify_credential(&token, 1000 + KUBELET_SECONDS - 1)
            .is_ok());
        assert_eq!(
            signer.verify_credential(&token, 1000 + KUBELET_SECONDS),
            Err(TokenError::Time)
        );
        // Never taken for a service account token, nor one for it.
        assert_eq!(
            signer.verify(&token, 1500),
            Err(TokenError::NotServiceAccount)
        );
        let sa = signer.mint(&claims(Some("node-1")));
        let sa = signer.verify_credential(&sa, 1500).unwrap();
        assert_eq!(sa, Credential::ServiceAccount(claims(Some("node-1"))));
        assert_eq!(sa.user().node_name(), None);
        // The claim's name in the payload is the constant others match on.
        let payload = serde_json::to_value(&kubelet).unwrap();
        assert_eq!(payload[KUBELET_CLAIM]["node"], "node-1");
    }

    #[test]
    fn tampered_and_hybrid_kubelet_credentials_are_refused() {
        let signer = Signer::new(b"secret");
        let token = signer.mint(&KubeletClaims::for_node("node-1", 1000));
        assert_eq!(
            Signer::new(b"other").verify_credential(&token, 1500),
            Err(TokenError::Signature)
        );
        // The node rewritten, signature kept.
        let parts: Vec<&str> = token.split('.').collect();
        let mut payload: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        payload[KUBELET_CLAIM]["node"] = "node-2".into();
        let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&payload).unwrap());
        let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
        assert_eq!(
            signer.verify_credential(&tampered, 1500),
            Err(TokenError::Signature)
        );
        // Signed, but both a kubelet's and a service account's: neither.
        let mut hybrid = serde_json::to_value(claims(Some("node-1"))).unwrap();
        hybrid[KUBELET_CLAIM] = serde_json::json!({"node": "node-1"});
        assert!(matches!(
            signer.verify_credential(&signer.mint(&hybrid), 1500),
            Err(TokenError::Claims(_))
        ));
        // A kubelet credential for another audience.
        let mut other = KubeletClaims::for_node("node-1", 1000);
        other.aud = vec!["vault".into()];
        assert_eq!(
            signer.verify_credential(&signer.mint(&other), 1500),
            Err(TokenError::Audience)
        );
    }

    #[test]
    fn a_node_is_named_and_in_system_nodes() {
        let mut user = KubeletClaims::for_node("node-1", 0).user();
        assert_eq!(user.node_name(), Some("node-1"));
        // The name alone makes no node, as for the Node authorizer.
        user.groups = vec!["system:authenticated".into()];
        assert_eq!(user.node_name(), None);
        let user = User {
            name: "system:node:".into(),
            groups: vec![NODES.into()],
            ..User::admin()
        };
        assert_eq!(user.node_name(), Some(""));
        assert_eq!(User::admin().node_name(), None);
    }
}
