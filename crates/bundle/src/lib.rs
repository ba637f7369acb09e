//! octd model bundles: the archive format, packing, signing and verification.
//!
//! A bundle is one TUF target (`octd-model-<name>-<version>.tar.gz`) holding the model, its
//! manifest and a self-test set. Trust comes from The Update Framework through `tough`:
//! operators sign a repository ([`repo`]), devices verify it ([`client`]) against a
//! provisioned root. Shared by the daemon's `octd bundle` commands, its updater and (later)
//! the cloud trainer, so packing and verification cannot drift apart.

pub mod archive;
pub mod client;
pub mod keys;
pub mod repo;

pub use archive::{ManifestHead, SelfTest, SelfTestCase};
pub use client::{Channel, ModelTarget, Refusal, VerifiedRepository};

/// Operator-side failures (packing, signing, publishing). Device-side verification failures
/// are [`Refusal`]s, which carry a stable code for events.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("invalid bundle: {0}")]
    Invalid(String),
    #[error("keys: {0}")]
    Keys(String),
    #[error("repository: {0}")]
    Repository(String),
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io { path: path.to_path_buf(), source }
}

pub(crate) fn repo_err(what: &str) -> impl FnOnce(tough::error::Error) -> BundleError + '_ {
    move |e| BundleError::Repository(format!("{what}: {e}"))
}
