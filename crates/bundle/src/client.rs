//! Device side: load a channel's metadata through tough against the provisioned root, list
//! the model bundles it signs, and fetch one with its hash and length checked. Every failure
//! is a [`Refusal`] with a stable code, because a device must say exactly why it did not
//! take an update.

use std::path::Path;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tough::error::Error as TufError;
use tough::schema::Target;
use tough::{ExpirationEnforcement, Limits, RepositoryLoader, TargetName};
use url::Url;

use crate::repo::{CUSTOM_KEY, METADATA_DIR, TARGETS_DIR};

/// Where a channel lives: `https://host/path`, `http://…`, `file:///path` or a plain folder
/// path. Metadata is under `metadata/`, bundles under `targets/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    pub metadata: Url,
    pub targets: Url,
}

impl Channel {
    pub fn parse(location: &str) -> Result<Channel, String> {
        let base = if location.contains("://") {
            let mut url = Url::parse(location).map_err(|e| format!("{location:?}: {e}"))?;
            if !matches!(url.scheme(), "file" | "http" | "https") {
                return Err(format!("{location:?}: only https://, http:// and file:// are supported"));
            }
            if !url.path().ends_with('/') {
                url.set_path(&format!("{}/", url.path()));
            }
            url
        } else {
            let abs = std::path::absolute(location).map_err(|e| format!("{location:?}: {e}"))?;
            Url::from_directory_path(&abs).map_err(|()| format!("{location:?} cannot be a file URL"))?
        };
        let join = |p: &str| base.join(p).map_err(|e| format!("{location:?}: {e}"));
        Ok(Channel { metadata: join(&format!("{METADATA_DIR}/"))?, targets: join(&format!("{TARGETS_DIR}/"))? })
    }
}

/// Why a device refuses a channel or a bundle. `code()` is stable and goes into events.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error(
        "{role} metadata has expired (device clock {device_clock}); check the clock or ask for a re-signed {role}"
    )]
    MetadataExpired { role: String, device_clock: String },
    #[error("{role} metadata carries no valid signature from its keys ({detail})")]
    SignatureInvalid { role: String, detail: String },
    #[error("{role} metadata has {valid} valid signature(s), {threshold} required")]
    SignatureThreshold { role: String, valid: u64, threshold: u64 },
    #[error("metadata older than what this device already trusts was offered: {0}")]
    MetadataReplayed(String),
    #[error("metadata files do not match each other: {0}")]
    MetadataInconsistent(String),
    #[error("hash mismatch: {0}")]
    HashMismatch(String),
    #[error("larger than its signed length: {0}")]
    LengthMismatch(String),
    #[error("repository unreachable: {0}")]
    Unreachable(String),
    #[error("{0}")]
    Other(String),
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::MetadataExpired { .. } => "metadata_expired",
            Refusal::SignatureInvalid { .. } => "signature_invalid",
            Refusal::SignatureThreshold { .. } => "signature_threshold",
            Refusal::MetadataReplayed(_) => "metadata_replayed",
            Refusal::MetadataInconsistent(_) => "metadata_inconsistent",
            Refusal::HashMismatch(_) => "hash_mismatch",
            Refusal::LengthMismatch(_) => "length_mismatch",
            Refusal::Unreachable(_) => "repository_unreachable",
            Refusal::Other(_) => "verification_failed",
        }
    }

    fn from_tuf(e: TufError) -> Refusal {
        let text = e.to_string();
        let signature = |role: String, source: &tough::schema::Error| match source {
            tough::schema::Error::SignatureThreshold { threshold, valid, .. } if *valid == 0 => {
                Refusal::SignatureInvalid { role, detail: format!("0 of {threshold} required") }
            }
            tough::schema::Error::SignatureThreshold { threshold, valid, .. } => {
                Refusal::SignatureThreshold { role, valid: *valid, threshold: *threshold }
            }
            other => Refusal::SignatureInvalid { role, detail: other.to_string() },
        };
        match &e {
            TufError::ExpiredMetadata { role, .. } => {
                Refusal::MetadataExpired { role: role.to_string(), device_clock: jiff::Timestamp::now().to_string() }
            }
            TufError::VerifyMetadata { role, source, .. } => signature(role.to_string(), source),
            TufError::VerifyRoleMetadata { role, source, .. } => signature(role.clone(), source),
            TufError::VerifyTrustedMetadata { source, .. } => signature("root".into(), source),
            TufError::OlderMetadata { .. }
            | TufError::OlderSnapshotInTimestamp { .. }
            | TufError::SnapshotRoleRollback { .. } => Refusal::MetadataReplayed(text),
            TufError::HashMismatch { .. } => Refusal::HashMismatch(text),
            TufError::MaxSizeExceeded { .. } => Refusal::LengthMismatch(text),
            TufError::VersionMismatch { .. }
            | TufError::MetaMissing { .. }
            | TufError::MissingSnapshotMeta { .. }
            | TufError::SnapshotTargetsMetaMissing { .. }
            | TufError::SnapshotRoleMissing { .. }
            | TufError::TimestampMetaLength { .. }
            | TufError::ParseMetadata { .. } => Refusal::MetadataInconsistent(text),
            // tough reports a target's or a metadata file's wrong hash or size from inside the
            // transport stream.
            TufError::Transport { .. } if text.contains("Hash mismatch") => Refusal::HashMismatch(text),
            TufError::Transport { .. } if text.contains("exceeds") || text.contains("Maximum size") => {
                Refusal::LengthMismatch(text)
            }
            TufError::Transport { .. } => Refusal::Unreachable(text),
            _ => Refusal::Other(text),
        }
    }
}

/// One model bundle a verified channel lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelTarget {
    pub target: String,
    pub name: String,
    pub version: semver::Version,
    pub model_sha256: String,
    pub classes: Vec<String>,
    /// sha256 of the bundle archive, from the signed targets metadata.
    pub bundle_sha256: String,
    pub length: u64,
}

impl ModelTarget {
    /// The target's octd metadata (written by `repo::target_custom`), if it is a model bundle.
    pub fn from_target(name: &TargetName, target: &Target) -> Option<ModelTarget> {
        let custom = target.custom.get(CUSTOM_KEY)?;
        let text = |k: &str| custom.get(k).and_then(|v| v.as_str()).map(str::to_string);
        Some(ModelTarget {
            target: name.raw().to_string(),
            name: text("name")?,
            version: semver::Version::parse(&text("version")?).ok()?,
            model_sha256: text("model_sha256")?,
            classes: custom.get("classes")?.as_array()?.iter().filter_map(|c| c.as_str().map(str::to_string)).collect(),
            bundle_sha256: hex::encode(&target.hashes.sha256),
            length: target.length,
        })
    }

    /// The model bundles among `targets`, oldest version first.
    pub fn listing<'a>(targets: impl Iterator<Item = (&'a TargetName, &'a Target)>) -> Vec<ModelTarget> {
        let mut out: Vec<ModelTarget> = targets.filter_map(|(name, target)| Self::from_target(name, target)).collect();
        out.sort_by(|a, b| a.version.cmp(&b.version));
        out
    }
}

/// A channel whose metadata verified against the trusted root.
pub struct VerifiedRepository {
    repo: tough::Repository,
}

impl std::fmt::Debug for VerifiedRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedRepository").finish_non_exhaustive()
    }
}

/// Load and verify a channel. `datastore` (persistent) holds the newest metadata seen, which
/// is how replays of older metadata are caught across restarts.
pub async fn load(trusted_root: &[u8], channel: &Channel, datastore: &Path) -> Result<VerifiedRepository, Refusal> {
    tokio::fs::create_dir_all(datastore)
        .await
        .map_err(|e| Refusal::Other(format!("datastore {}: {e}", datastore.display())))?;
    let limits = Limits {
        max_root_size: 1 << 20,
        max_targets_size: 16 << 20,
        max_timestamp_size: 1 << 20,
        max_snapshot_size: 16 << 20,
        max_root_updates: 1024,
    };
    let repo = RepositoryLoader::new(&trusted_root, channel.metadata.clone(), channel.targets.clone())
        .expiration_enforcement(ExpirationEnforcement::Safe)
        .limits(limits)
        .datastore(datastore)
        .load()
        .await
        .map_err(Refusal::from_tuf)?;
    Ok(VerifiedRepository { repo })
}

impl VerifiedRepository {
    /// The model bundles listed, oldest version first. Targets without octd's custom
    /// metadata are not models and are ignored.
    pub fn models(&self) -> Vec<ModelTarget> {
        ModelTarget::listing(self.repo.all_targets())
    }

    /// Earliest expiry of the metadata this device relies on.
    pub fn expires(&self) -> jiff::Timestamp {
        [
            self.repo.root().signed.expires,
            self.repo.targets().signed.expires,
            self.repo.snapshot().signed.expires,
            self.repo.timestamp().signed.expires,
        ]
        .into_iter()
        .min()
        .unwrap_or_default()
    }

    pub fn root_version(&self) -> u64 {
        self.repo.root().signed.version.get()
    }

    /// Download `target` to `out`, hash and length checked by tough as it streams. `out` is
    /// removed unless the whole, verified target arrived.
    pub async fn fetch(&self, target: &ModelTarget, out: &Path) -> Result<(), Refusal> {
        let result = self.fetch_inner(target, out).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(out).await;
        }
        result
    }

    async fn fetch_inner(&self, target: &ModelTarget, out: &Path) -> Result<(), Refusal> {
        let name = TargetName::new(target.target.as_str()).map_err(Refusal::from_tuf)?;
        let mut stream = self
            .repo
            .read_target(&name)
            .await
            .map_err(Refusal::from_tuf)?
            .ok_or_else(|| Refusal::MetadataInconsistent(format!("{} is not listed", target.target)))?;
        let io = |e: std::io::Error| Refusal::Other(format!("{}: {e}", out.display()));
        let mut file = tokio::fs::File::create(out).await.map_err(io)?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(Refusal::from_tuf)?;
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        file.sync_all().await.map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_locations() {
        let c = Channel::parse("https://models.example/octd/stable").unwrap();
        assert_eq!(c.metadata.as_str(), "https://models.example/octd/stable/metadata/");
        assert_eq!(c.targets.as_str(), "https://models.example/octd/stable/targets/");
        assert_eq!(
            Channel::parse("/media/usb/channel/").unwrap().metadata.as_str(),
            "file:///media/usb/channel/metadata/"
        );
        assert!(Channel::parse("ftp://x/y").is_err());
    }
}
