//! The label uplink between octd devices and `octd-trainer` (the contract is
//! docs/uplink.md): the wire types of a confirmed label and the request signature that
//! authenticates a device by the identity key `octd provision` created.
//!
//! Both sides link this crate, so the canonical form that is signed cannot drift apart.

use std::collections::BTreeMap;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Schema tag of a label upload's JSON body.
pub const LABEL_SCHEMA: &str = "octd.uplink.label/1";
/// First line of the signed canonical form; a new scheme gets a new tag.
pub const SCHEME: &str = "octd-uplink-v1";

pub const HEADER_KEY_ID: &str = "x-octd-key-id";
pub const HEADER_TIMESTAMP: &str = "x-octd-timestamp";
pub const HEADER_NONCE: &str = "x-octd-nonce";
pub const HEADER_CONTENT_SHA256: &str = "x-octd-content-sha256";
pub const HEADER_SIGNATURE: &str = "x-octd-signature";

/// The kinds of de-identified image a device holds and uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    Png,
    Dicom,
}

impl ImageKind {
    pub fn content_type(self) -> &'static str {
        match self {
            ImageKind::Png => "image/png",
            ImageKind::Dicom => "application/dicom",
        }
    }

    pub fn from_content_type(value: &str) -> Option<ImageKind> {
        match value.split(';').next().unwrap_or_default().trim() {
            "image/png" => Some(ImageKind::Png),
            "application/dicom" => Some(ImageKind::Dicom),
            _ => None,
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            ImageKind::Png => "png",
            ImageKind::Dicom => "dcm",
        }
    }
}

/// The model that produced the prediction (its stamp in octd's result).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelStamp {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub sha256: String,
}

/// What the model said about the scan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prediction {
    pub label: String,
    /// Class name -> probability.
    pub probabilities: BTreeMap<String, f64>,
}

/// One confirmed (or corrected) label: `PUT /api/v1/labels/{scan_id}/{revision}`. The image
/// it refers to is uploaded first, by its SHA-256 (`PUT /api/v1/images/{sha256}`), so a
/// correction never sends the image again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelUpload {
    pub schema: String,
    /// The reviewer's verdict: one of the model's classes; empty when `withdrawn`.
    pub label: String,
    /// The reviewer took their verdict back and the scan has none from this revision on: it
    /// is not a label to train or measure with.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub withdrawn: bool,
    pub prediction: Prediction,
    pub model: ModelStamp,
    /// Pseudonymous reviewer id (never a name).
    pub reviewer: String,
    /// RFC 3339.
    pub reviewed_at: String,
    /// `R`, `L` or empty when unknown.
    #[serde(default)]
    pub laterality: String,
    /// The device's keyed pseudonym of the patient, for patient-grouped splits.
    pub patient: String,
    pub image_sha256: String,
    pub image_kind: ImageKind,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignatureError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("malformed header {0}")]
    Malformed(&'static str),
    #[error("the body does not match its declared SHA-256")]
    BodyMismatch,
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the signing key is not usable: {0}")]
    Key(String),
}

fn lower_hex_digit(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// `len` lower-case hex digits: the only spelling of hashes and signatures on the wire.
pub fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(lower_hex_digit)
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What is signed: the scheme, the method, the path with its query exactly as sent, the
/// content type (it decides how the body is read), the time, a single-use nonce and the
/// body's hash, one per line.
pub fn canonical(
    method: &str,
    path_and_query: &str,
    content_type: &str,
    timestamp: i64,
    nonce: &str,
    content_sha256: &str,
) -> String {
    format!(
        "{SCHEME}\n{}\n{path_and_query}\n{}\n{timestamp}\n{nonce}\n{content_sha256}",
        method.to_ascii_uppercase(),
        content_type.trim().to_ascii_lowercase()
    )
}

/// The signature headers of one request, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    pub key_id: String,
    pub timestamp: i64,
    pub nonce: String,
    pub content_sha256: String,
    pub signature: String,
}

impl SignedHeaders {
    pub fn pairs(&self) -> [(&'static str, String); 5] {
        [
            (HEADER_KEY_ID, self.key_id.clone()),
            (HEADER_TIMESTAMP, self.timestamp.to_string()),
            (HEADER_NONCE, self.nonce.clone()),
            (HEADER_CONTENT_SHA256, self.content_sha256.clone()),
            (HEADER_SIGNATURE, self.signature.clone()),
        ]
    }

    /// Read them from a header lookup; shapes are checked, nothing is verified yet.
    pub fn parse<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<SignedHeaders, SignatureError> {
        let need = |name: &'static str| get(name).ok_or(SignatureError::MissingHeader(name));
        let key_id = need(HEADER_KEY_ID)?;
        let timestamp =
            need(HEADER_TIMESTAMP)?.parse::<i64>().map_err(|_| SignatureError::Malformed(HEADER_TIMESTAMP))?;
        let nonce = need(HEADER_NONCE)?;
        let content = need(HEADER_CONTENT_SHA256)?;
        let signature = need(HEADER_SIGNATURE)?;
        if key_id.is_empty() || key_id.len() > 128 || !key_id.bytes().all(lower_hex_digit) {
            return Err(SignatureError::Malformed(HEADER_KEY_ID));
        }
        if !(16..=64).contains(&nonce.len()) || !nonce.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(SignatureError::Malformed(HEADER_NONCE));
        }
        if !is_lower_hex(content, 64) {
            return Err(SignatureError::Malformed(HEADER_CONTENT_SHA256));
        }
        if !is_lower_hex(signature, 128) {
            return Err(SignatureError::Malformed(HEADER_SIGNATURE));
        }
        Ok(SignedHeaders {
            key_id: key_id.to_string(),
            timestamp,
            nonce: nonce.to_string(),
            content_sha256: content.to_string(),
            signature: signature.to_string(),
        })
    }

    /// Check the signature against `public_key` (32 raw Ed25519 bytes). The body is not
    /// needed: the signature covers its declared hash, which [`Self::check_body`] compares
    /// once the body is read. Freshness and replay are the server's to judge.
    pub fn verify(
        &self,
        public_key: &[u8],
        method: &str,
        path_and_query: &str,
        content_type: &str,
    ) -> Result<(), SignatureError> {
        let message =
            canonical(method, path_and_query, content_type, self.timestamp, &self.nonce, &self.content_sha256);
        let signature = hex::decode(&self.signature).map_err(|_| SignatureError::Malformed(HEADER_SIGNATURE))?;
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(message.as_bytes(), &signature)
            .map_err(|_| SignatureError::BadSignature)
    }

    /// The body is the one whose hash was signed.
    pub fn check_body(&self, body: &[u8]) -> Result<(), SignatureError> {
        if sha256_hex(body) != self.content_sha256 {
            return Err(SignatureError::BodyMismatch);
        }
        Ok(())
    }
}

/// A device's signing key: the PKCS#8 identity key written by `octd provision`.
pub struct DeviceKey {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKey").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl DeviceKey {
    /// `key_id` is the TUF key id `octd provision` printed and wrote beside the public key.
    pub fn from_pkcs8(pkcs8: &[u8], key_id: &str) -> Result<DeviceKey, SignatureError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| SignatureError::Key(e.to_string()))?;
        Ok(DeviceKey { pair, key_id: key_id.to_ascii_lowercase() })
    }

    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Sign one request. `nonce` must never repeat (a random 128-bit hex string).
    pub fn sign(
        &self,
        method: &str,
        path_and_query: &str,
        content_type: &str,
        body: &[u8],
        timestamp: i64,
        nonce: &str,
    ) -> SignedHeaders {
        let content_sha256 = sha256_hex(body);
        let message = canonical(method, path_and_query, content_type, timestamp, nonce, &content_sha256);
        let signature = hex::encode(self.pair.sign(message.as_bytes()).as_ref());
        SignedHeaders { key_id: self.key_id.clone(), timestamp, nonce: nonce.to_string(), content_sha256, signature }
    }
}

/// The public half as `octd provision` writes it (`device-identity.pub.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceIdentity {
    pub keyid: String,
    pub key: serde_json::Value,
    pub site: String,
    pub device: String,
}

impl DeviceIdentity {
    /// The raw Ed25519 public key inside the TUF key object.
    pub fn ed25519_public(&self) -> Result<Vec<u8>, SignatureError> {
        if self.key.get("keytype").and_then(|v| v.as_str()) != Some("ed25519") {
            return Err(SignatureError::Key("not an ed25519 key".into()));
        }
        let public = self
            .key
            .pointer("/keyval/public")
            .and_then(|v| v.as_str())
            .ok_or_else(|| SignatureError::Key("keyval.public missing".into()))?;
        let bytes = hex::decode(public).map_err(|_| SignatureError::Key("keyval.public is not hex".into()))?;
        if bytes.len() != 32 {
            return Err(SignatureError::Key(format!("{} bytes, an Ed25519 key has 32", bytes.len())));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> DeviceKey {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        DeviceKey::from_pkcs8(pkcs8.as_ref(), "ab12").unwrap()
    }

    #[test]
    fn a_signed_request_verifies_and_any_change_breaks_it() {
        let k = key();
        let body = br#"{"label":"CNV"}"#;
        let json = "application/json";
        let h = k.sign("put", "/api/v1/labels/x/1", json, body, 1_700_000_000, "0123456789abcdef0123");
        h.verify(k.public_key(), "PUT", "/api/v1/labels/x/1", json).unwrap();
        h.check_body(body).unwrap();
        let bad = Err(SignatureError::BadSignature);
        assert_eq!(h.verify(k.public_key(), "PUT", "/api/v1/labels/x/2", json), bad);
        assert_eq!(h.verify(k.public_key(), "POST", "/api/v1/labels/x/1", json), bad);
        assert_eq!(h.verify(k.public_key(), "PUT", "/api/v1/labels/x/1", "image/png"), bad);
        assert_eq!(h.check_body(b"{}"), Err(SignatureError::BodyMismatch));
        let mut later = h.clone();
        later.timestamp += 1;
        assert_eq!(later.verify(k.public_key(), "PUT", "/api/v1/labels/x/1", json), bad);
        let mut other_body = h.clone();
        other_body.content_sha256 = sha256_hex(b"{}");
        assert_eq!(other_body.verify(k.public_key(), "PUT", "/api/v1/labels/x/1", json), bad);
        let other = key();
        assert_eq!(h.verify(other.public_key(), "PUT", "/api/v1/labels/x/1", json), bad);
    }

    #[test]
    fn headers_are_parsed_with_their_shapes_checked() {
        let k = key();
        let h = k.sign("PUT", "/p", "", b"", 5, "0123456789abcdef");
        let mut map: std::collections::HashMap<&str, String> = h.pairs().into_iter().collect();
        assert_eq!(SignedHeaders::parse(|n| map.get(n).map(|s| s.as_str())).unwrap(), h);
        let mut upper = map.clone();
        upper.insert(HEADER_SIGNATURE, h.signature.to_ascii_uppercase());
        assert_eq!(
            SignedHeaders::parse(|n| upper.get(n).map(|s| s.as_str())),
            Err(SignatureError::Malformed(HEADER_SIGNATURE))
        );
        map.insert(HEADER_NONCE, "abc".into());
        assert_eq!(
            SignedHeaders::parse(|n| map.get(n).map(|s| s.as_str())),
            Err(SignatureError::Malformed(HEADER_NONCE))
        );
        map.remove(HEADER_SIGNATURE);
        assert_eq!(
            SignedHeaders::parse(|n| map.get(n).map(|s| s.as_str())),
            Err(SignatureError::MissingHeader(HEADER_SIGNATURE))
        );
    }
}
