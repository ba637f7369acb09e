//! Operator side: create and rotate the root of trust, publish and withdraw bundles, refresh
//! the timestamp. A repository folder holds `metadata/` and `targets/` and can be served as
//! it is over HTTP(S) or copied to a USB stick.
//!
//! Metadata is written to a scratch folder and moved into place with `timestamp.json` last,
//! so a client reading the folder mid-publish sees the old repository or the new one.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

use jiff::SignedDuration;
pub use jiff::Timestamp;
use serde_json::json;
use tough::editor::signed::{PathExists, SignedRole};
use tough::editor::RepositoryEditor;
use tough::key_source::KeySource;
use tough::schema::{KeyHolder, RoleKeys, RoleType, Root, Signed, Target};
use tough::{ExpirationEnforcement, RepositoryLoader, TargetName};

use crate::archive::{self, ManifestHead};
use crate::client::ModelTarget;
use crate::{io_err, keys, repo_err, BundleError};

pub const METADATA_DIR: &str = "metadata";
pub const TARGETS_DIR: &str = "targets";
/// The key in a target's `custom` metadata that marks it as an octd model bundle.
pub const CUSTOM_KEY: &str = "octd_model";

/// The keys of one role and how many of them must sign.
#[derive(Debug, Clone)]
pub struct RoleSpec {
    pub keys: Vec<PathBuf>,
    pub threshold: u64,
}

#[derive(Debug, Clone)]
pub struct RootSpec {
    pub root: RoleSpec,
    pub targets: RoleSpec,
    pub snapshot: RoleSpec,
    pub timestamp: RoleSpec,
    pub expires: Timestamp,
}

pub fn expires_in(d: std::time::Duration) -> Result<Timestamp, BundleError> {
    let d = SignedDuration::try_from(d).map_err(|e| BundleError::Repository(format!("duration: {e}")))?;
    Timestamp::now().checked_add(d).map_err(|e| BundleError::Repository(format!("expiry: {e}")))
}

/// An unsigned root of the given version from `spec`.
pub async fn build_root(spec: &RootSpec, version: u64) -> Result<Root, BundleError> {
    let mut keys = HashMap::new();
    let mut roles = HashMap::new();
    for (role, rs) in [
        (RoleType::Root, &spec.root),
        (RoleType::Targets, &spec.targets),
        (RoleType::Snapshot, &spec.snapshot),
        (RoleType::Timestamp, &spec.timestamp),
    ] {
        if rs.keys.is_empty() || rs.threshold == 0 || rs.threshold > rs.keys.len() as u64 {
            return Err(BundleError::Keys(format!(
                "{role}: threshold {} needs at least that many keys (given {})",
                rs.threshold,
                rs.keys.len()
            )));
        }
        let mut ids = Vec::new();
        for path in &rs.keys {
            let key = keys::public_key(path).await?;
            let id = key.key_id().map_err(|e| BundleError::Keys(format!("key id: {e}")))?;
            if !ids.contains(&id) {
                ids.push(id.clone());
            }
            keys.insert(id, key);
        }
        let threshold = NonZeroU64::new(rs.threshold).ok_or_else(|| BundleError::Keys("threshold 0".into()))?;
        roles.insert(role, RoleKeys { keyids: ids, threshold, _extra: HashMap::new() });
    }
    Ok(Root {
        spec_version: "1.0.0".into(),
        consistent_snapshot: true,
        version: NonZeroU64::new(version).ok_or_else(|| BundleError::Repository("root version 0".into()))?,
        expires: spec.expires,
        keys,
        roles,
        _extra: HashMap::new(),
    })
}

fn key_sources(paths: &[PathBuf]) -> Vec<Box<dyn KeySource>> {
    paths.iter().map(|p| keys::source(p)).collect()
}

/// Write the first root (`init`) or the next one (rotation). A new root is signed by its own
/// root keys and, when it replaces one, by the previous root's keys in `previous_root_keys`,
/// so that devices holding the old root can follow the chain. Returns the new version.
pub async fn write_root(repo: &Path, spec: &RootSpec, previous_root_keys: &[PathBuf]) -> Result<u64, BundleError> {
    let metadata = repo.join(METADATA_DIR);
    std::fs::create_dir_all(&metadata).map_err(io_err(&metadata))?;
    std::fs::create_dir_all(repo.join(TARGETS_DIR)).map_err(io_err(repo))?;
    let current = read_root(&metadata.join("root.json")).ok();
    let version = current.as_ref().map_or(1, |r| r.signed.version.get() + 1);
    let root = build_root(spec, version).await?;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let mut signed = SignedRole::new(root.clone(), &KeyHolder::Root(root.clone()), &key_sources(&spec.root.keys), &rng)
        .await
        .map_err(repo_err("signing root"))?;
    if let Some(previous) = &current {
        let old = SignedRole::new(
            root.clone(),
            &KeyHolder::Root(previous.signed.clone()),
            &key_sources(previous_root_keys),
            &rng,
        )
        .await
        .map_err(repo_err("signing root with the previous root keys"))?;
        signed = signed.add_old_signatures(old.signed().signatures.clone()).map_err(repo_err("root signatures"))?;
        previous.signed.verify_role(signed.signed()).map_err(|e| {
            BundleError::Keys(format!("the previous root's keys do not sign the new root to its threshold: {e}"))
        })?;
    }
    root.verify_role(signed.signed())
        .map_err(|e| BundleError::Keys(format!("the new root's own keys do not reach its threshold: {e}")))?;
    let buffer = signed.buffer();
    write_atomic(&metadata.join(format!("{version}.root.json")), buffer)?;
    write_atomic(&metadata.join("root.json"), buffer)?;
    Ok(version)
}

fn read_root(path: &Path) -> Result<Signed<Root>, BundleError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|e| BundleError::Repository(format!("{}: {e}", path.display())))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BundleError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(io_err(path))?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| BundleError::Io { path: path.to_path_buf(), source: e.error })?;
    Ok(())
}

/// One publication: bundles to add, versions to withdraw, and the keys to sign with.
#[derive(Debug, Clone)]
pub struct Publication {
    pub add: Vec<PathBuf>,
    pub withdraw: Vec<String>,
    pub keys: Vec<PathBuf>,
    /// The root whose role definitions decide which keys sign what; normally the
    /// repository's current `metadata/root.json`.
    pub signing_root: Option<PathBuf>,
    pub targets_expires: Timestamp,
    pub snapshot_expires: Timestamp,
    pub timestamp_expires: Timestamp,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PublishReport {
    pub added: Vec<String>,
    pub withdrawn: Vec<String>,
    pub targets_version: u64,
    pub snapshot_version: u64,
    pub timestamp_version: u64,
    pub listed: Vec<String>,
}

/// The custom metadata of a bundle's target: lets a device choose without downloading.
pub fn target_custom(head: &ManifestHead) -> serde_json::Value {
    json!({"name": head.name, "version": head.version, "model_sha256": head.sha256, "classes": head.classes})
}

/// Add and withdraw bundles, bump every role's version, sign and write. With nothing to add
/// or withdraw this is a timestamp refresh.
pub async fn publish(repo: &Path, publication: &Publication) -> Result<PublishReport, BundleError> {
    let metadata = repo.join(METADATA_DIR);
    let targets_dir = repo.join(TARGETS_DIR);
    std::fs::create_dir_all(&targets_dir).map_err(io_err(&targets_dir))?;
    let signing_root = publication.signing_root.clone().unwrap_or_else(|| metadata.join("root.json"));
    let mut editor = RepositoryEditor::new(&signing_root).await.map_err(repo_err("editor"))?;
    // The current listing is read as written, not verified: after a root rotation it is
    // still signed by the old keys, and this publication re-signs it with the new ones.
    let (versions, listed_before) = match current_metadata(&metadata)? {
        Some((targets, snapshot_version, timestamp_version)) => {
            let targets_version = targets.signed.version.get();
            let listed = ModelTarget::listing(targets.signed.targets.iter());
            editor.targets(targets).map_err(repo_err("current targets"))?;
            ((targets_version, snapshot_version, timestamp_version), listed)
        }
        None => ((0, 0, 0), Vec::new()),
    };

    let mut added = Vec::new();
    for bundle in &publication.add {
        let head = archive::inspect(bundle)?;
        let name = head.target_name();
        let mut target =
            Target::from_path(bundle).await.map_err(|e| BundleError::Repository(format!("hashing the bundle: {e}")))?;
        target.custom.insert(CUSTOM_KEY.into(), target_custom(&head));
        editor.add_target(name.as_str(), target).map_err(repo_err("adding the bundle"))?;
        added.push((bundle.clone(), name));
    }
    let mut withdrawn = Vec::new();
    for version in &publication.withdraw {
        let wanted = semver::Version::parse(version)
            .map_err(|e| BundleError::Repository(format!("{version:?} is not a version: {e}")))?;
        let matching: Vec<&ModelTarget> = listed_before.iter().filter(|m| m.version == wanted).collect();
        if matching.is_empty() {
            return Err(BundleError::Repository(format!("no bundle of version {version} is listed")));
        }
        for m in matching {
            let target_name = TargetName::new(m.target.as_str()).map_err(repo_err("target name"))?;
            editor.remove_target(&target_name).map_err(repo_err("withdrawing"))?;
            withdrawn.push(m.target.clone());
        }
    }

    let next = |v: u64| NonZeroU64::new(v + 1).unwrap_or(NonZeroU64::MIN);
    editor
        .targets_version(next(versions.0))
        .map_err(repo_err("targets version"))?
        .targets_expires(publication.targets_expires)
        .map_err(repo_err("targets expiry"))?
        .snapshot_version(next(versions.1))
        .snapshot_expires(publication.snapshot_expires)
        .timestamp_version(next(versions.2))
        .timestamp_expires(publication.timestamp_expires);
    let signed = editor.sign(&key_sources(&publication.keys)).await.map_err(repo_err("signing"))?;

    // Targets first: metadata must never name a file that is not there yet.
    for (bundle, name) in &added {
        let target_name = TargetName::new(name.as_str()).map_err(repo_err("target name"))?;
        signed
            .copy_target(bundle, &targets_dir, PathExists::Skip, Some(&target_name))
            .await
            .map_err(repo_err("copying the bundle"))?;
    }
    let scratch = tempfile::tempdir_in(repo).map_err(io_err(repo))?;
    signed.write(scratch.path()).await.map_err(repo_err("writing metadata"))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(scratch.path())
        .map_err(io_err(scratch.path()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    // timestamp.json last: it is what clients read first.
    files.sort_by_key(|p| p.file_name().is_some_and(|n| n == "timestamp.json"));
    for file in files {
        let Some(name) = file.file_name() else { continue };
        if name.to_string_lossy().ends_with("root.json") {
            continue; // roots are written by `write_root` only
        }
        let bytes = std::fs::read(&file).map_err(io_err(&file))?;
        write_atomic(&metadata.join(name), &bytes)?;
    }
    // Check the result as a device would (expiry aside); a deliberately forged signing root
    // (tests of the device's refusals) leaves a repository that must not verify.
    let listed = match (&publication.signing_root, listed_models(repo).await) {
        (_, Ok(listed)) => listed.into_iter().map(|m| m.target).collect(),
        (Some(_), Err(_)) => Vec::new(),
        (None, Err(e)) => return Err(e),
    };
    Ok(PublishReport {
        added: added.into_iter().map(|(_, n)| n).collect(),
        withdrawn,
        targets_version: versions.0 + 1,
        snapshot_version: versions.1 + 1,
        timestamp_version: versions.2 + 1,
        listed,
    })
}

type CurrentMetadata = (Signed<tough::schema::Targets>, u64, u64);

/// The current targets metadata and the snapshot and timestamp versions, as written.
fn current_metadata(metadata: &Path) -> Result<Option<CurrentMetadata>, BundleError> {
    let timestamp_path = metadata.join("timestamp.json");
    if !timestamp_path.exists() {
        return Ok(None);
    }
    let read = |path: &Path| -> Result<serde_json::Value, BundleError> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        serde_json::from_slice(&bytes).map_err(|e| BundleError::Repository(format!("{}: {e}", path.display())))
    };
    let version_of = |v: &serde_json::Value, what: &str| {
        v.as_u64().ok_or_else(|| BundleError::Repository(format!("no {what} version in the current metadata")))
    };
    let timestamp = read(&timestamp_path)?;
    let timestamp_version = version_of(&timestamp["signed"]["version"], "timestamp")?;
    let snapshot_version = version_of(&timestamp["signed"]["meta"]["snapshot.json"]["version"], "snapshot")?;
    let snapshot = read(&metadata.join(format!("{snapshot_version}.snapshot.json")))?;
    let targets_version = version_of(&snapshot["signed"]["meta"]["targets.json"]["version"], "targets")?;
    let targets_path = metadata.join(format!("{targets_version}.targets.json"));
    let bytes = std::fs::read(&targets_path).map_err(io_err(&targets_path))?;
    let targets = serde_json::from_slice(&bytes)
        .map_err(|e| BundleError::Repository(format!("{}: {e}", targets_path.display())))?;
    Ok(Some((targets, snapshot_version, timestamp_version)))
}

/// Load the repository in `repo` as the operator sees it: signatures checked from its first
/// root, expiry not enforced (so an expired repository can be re-signed).
pub async fn load_local(repo: &Path) -> Result<tough::Repository, BundleError> {
    let metadata = repo.join(METADATA_DIR);
    let first_root = metadata.join("1.root.json");
    let root = std::fs::read(&first_root).map_err(io_err(&first_root))?;
    let datastore = tempfile::tempdir().map_err(io_err(repo))?;
    let as_url = |p: &Path| {
        let abs = std::path::absolute(p).map_err(io_err(p))?;
        url::Url::from_directory_path(&abs)
            .map_err(|()| BundleError::Repository(format!("{} cannot be a URL", abs.display())))
    };
    RepositoryLoader::new(&root, as_url(&metadata)?, as_url(&repo.join(TARGETS_DIR))?)
        .expiration_enforcement(ExpirationEnforcement::Unsafe)
        .datastore(datastore.path())
        .load()
        .await
        .map_err(repo_err("loading the repository"))
}

/// The model bundles a local repository lists (signatures checked), oldest version first.
pub async fn listed_models(repo: &Path) -> Result<Vec<ModelTarget>, BundleError> {
    Ok(ModelTarget::listing(load_local(repo).await?.all_targets()))
}
