//! The model channel the service publishes to: a TUF repository (crates/bundle) with its
//! keys. The online keys (targets, snapshot, timestamp) stay with the service; the root key
//! is generated here for a first start and belongs offline afterwards (docs/uplink.md).

use std::path::{Path, PathBuf};

use octd_bundle::repo::{self, RoleSpec, RootSpec};
use serde_json::{json, Value};

pub const ROLES: [&str; 4] = ["root", "targets", "snapshot", "timestamp"];
/// How long snapshot and timestamp metadata stay valid after each publication.
pub const ONLINE_EXPIRY: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    #[error("{0}")]
    Bundle(#[from] octd_bundle::BundleError),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

pub fn key_path(keys: &Path, role: &str) -> PathBuf {
    keys.join(format!("{role}.pk8"))
}

/// A publication signed with the online keys in `keys`: the targets valid for
/// `targets_expiry`, snapshot and timestamp for [`ONLINE_EXPIRY`] (re-signed while `serve` runs).
pub fn publication(
    keys: &Path,
    add: Vec<PathBuf>,
    targets_expiry: std::time::Duration,
) -> Result<repo::Publication, octd_bundle::BundleError> {
    Ok(repo::Publication {
        add,
        withdraw: Vec::new(),
        keys: ROLES[1..].iter().map(|r| key_path(keys, r)).collect(),
        signing_root: None,
        targets_expires: repo::expires_in(targets_expiry)?,
        snapshot_expires: repo::expires_in(ONLINE_EXPIRY)?,
        timestamp_expires: repo::expires_in(ONLINE_EXPIRY)?,
    })
}

pub fn trusted_root(channel: &Path) -> PathBuf {
    channel.join(repo::METADATA_DIR).join("1.root.json")
}

/// Create the channel and its keys, or adopt an existing channel: then the online keys
/// must already be in `keys` (the root key need not be).
pub async fn init(channel: &Path, keys: &Path, expires: std::time::Duration) -> Result<Value, ChannelError> {
    let root_json = channel.join(repo::METADATA_DIR).join("root.json");
    if root_json.exists() {
        let mut missing = Vec::new();
        for role in &ROLES[1..] {
            if !key_path(keys, role).exists() {
                missing.push(key_path(keys, role).display().to_string());
            }
        }
        if !missing.is_empty() {
            return Err(ChannelError::Invalid(format!(
                "{} exists but the online keys are missing: {}",
                channel.display(),
                missing.join(", ")
            )));
        }
        let listed = repo::listed_models(channel).await?;
        return Ok(json!({
            "channel": channel, "adopted": true, "keys": keys,
            "models": listed.iter().map(|m| format!("{} {}", m.name, m.version)).collect::<Vec<_>>(),
        }));
    }
    std::fs::create_dir_all(keys).map_err(|e| ChannelError::Io(keys.to_path_buf(), e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(keys, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| ChannelError::Io(keys.to_path_buf(), e))?;
    }
    let mut ids = serde_json::Map::new();
    for role in ROLES {
        let path = key_path(keys, role);
        let id = if path.exists() {
            octd_bundle::keys::key_id(&path).await?
        } else {
            octd_bundle::keys::generate(&path).await?
        };
        ids.insert(role.to_string(), json!(id));
    }
    let one = |role: &str| RoleSpec { keys: vec![key_path(keys, role)], threshold: 1 };
    let spec = RootSpec {
        root: one("root"),
        targets: one("targets"),
        snapshot: one("snapshot"),
        timestamp: one("timestamp"),
        expires: repo::expires_in(expires)?,
    };
    std::fs::create_dir_all(channel).map_err(|e| ChannelError::Io(channel.to_path_buf(), e))?;
    let version = repo::write_root(channel, &spec, &[]).await?;
    // An empty listing at once, so devices pointed at the channel load it before the first model.
    let publication = publication(keys, Vec::new(), expires)?;
    repo::publish(channel, &publication).await?;
    Ok(json!({
        "channel": channel, "adopted": false, "root_version": version, "keys": keys, "key_ids": ids,
        "trusted_root": trusted_root(channel),
        "next": format!("move {} offline; provision devices with {} as update.trusted_root",
            key_path(keys, "root").display(), trusted_root(channel).display()),
    }))
}

/// The channel's writers (publications, metadata refreshes; any process, any replica that
/// shares the folder) take turns: an exclusive lock on a file beside the online keys, held
/// until the returned file is dropped.
pub async fn lock(keys: &Path) -> Result<std::fs::File, ChannelError> {
    let path = keys.join("channel.lock");
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ChannelError::Io(path.clone(), e))?;
        file.lock().map_err(|e| ChannelError::Io(path.clone(), e))?;
        Ok(file)
    })
    .await
    .map_err(|e| ChannelError::Invalid(format!("channel lock: {e}")))?
}

/// Re-sign the snapshot and timestamp metadata when they expire within `margin`, so a
/// channel with no new model for weeks does not go stale for the devices. Returns whether it
/// re-signed.
pub async fn refresh_if_due(
    channel: &Path,
    keys: &Path,
    targets_expiry: std::time::Duration,
    margin: std::time::Duration,
) -> Result<bool, ChannelError> {
    let _lock = lock(keys).await?;
    let path = channel.join(repo::METADATA_DIR).join("timestamp.json");
    let text = tokio::fs::read(&path).await.map_err(|e| ChannelError::Io(path.clone(), e))?;
    let value: Value =
        serde_json::from_slice(&text).map_err(|e| ChannelError::Invalid(format!("{}: {e}", path.display())))?;
    let expires = value["signed"]["expires"]
        .as_str()
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
        .ok_or_else(|| ChannelError::Invalid(format!("{}: no expiry", path.display())))?;
    let due = jiff::Timestamp::now() + jiff::SignedDuration::try_from(margin).unwrap_or(jiff::SignedDuration::ZERO);
    if expires > due {
        return Ok(false);
    }
    let publication = publication(keys, Vec::new(), targets_expiry)?;
    repo::publish(channel, &publication).await?;
    Ok(true)
}
