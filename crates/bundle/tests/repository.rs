//! A real TUF repository built with this crate's operator tooling, read back through the
//! device-side client: the accepted paths and every tampering case, each refused with its
//! own code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use octd_bundle::archive::{self, SelfTest, SelfTestCase};
use octd_bundle::client::{self, Channel, Refusal};
use octd_bundle::keys;
use octd_bundle::repo::{self, Publication, RoleSpec, RootSpec};
use sha2::{Digest, Sha256};

const DAY: Duration = Duration::from_secs(86_400);

struct Keys {
    root: PathBuf,
    targets: PathBuf,
    targets2: PathBuf,
    snapshot: PathBuf,
    timestamp: PathBuf,
    stranger: PathBuf,
}

async fn make_keys(dir: &Path) -> Keys {
    std::fs::create_dir_all(dir).unwrap();
    let k = |n: &str| dir.join(format!("{n}.pk8"));
    let keys = Keys {
        root: k("root"),
        targets: k("targets"),
        targets2: k("targets2"),
        snapshot: k("snapshot"),
        timestamp: k("timestamp"),
        stranger: k("stranger"),
    };
    for p in [&keys.root, &keys.targets, &keys.targets2, &keys.snapshot, &keys.timestamp, &keys.stranger] {
        keys::generate(p).await.unwrap();
    }
    keys
}

fn spec(k: &Keys, targets: Vec<PathBuf>, threshold: u64) -> RootSpec {
    let one = |p: &PathBuf| RoleSpec { keys: vec![p.clone()], threshold: 1 };
    RootSpec {
        root: one(&k.root),
        targets: RoleSpec { keys: targets, threshold },
        snapshot: one(&k.snapshot),
        timestamp: one(&k.timestamp),
        expires: repo::expires_in(365 * DAY).unwrap(),
    }
}

fn bundle(dir: &Path, version: &str) -> PathBuf {
    let src = dir.join(format!("src-{version}"));
    std::fs::create_dir_all(src.join("selftest")).unwrap();
    let model = format!("model bytes {version}");
    std::fs::write(src.join("model.onnx"), &model).unwrap();
    let manifest = serde_json::json!({"name": "t", "version": version,
        "sha256": hex::encode(Sha256::digest(model.as_bytes())), "classes": ["CNV", "DME", "DRUSEN", "NORMAL"]});
    std::fs::write(src.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(src.join("selftest/0.png"), b"png").unwrap();
    let st = SelfTest {
        format_version: 1,
        tolerance: 1e-3,
        cases: vec![SelfTestCase {
            input: "selftest/0.png".into(),
            label: "CNV".into(),
            probabilities: BTreeMap::new(),
            unlike_training_score: None,
        }],
    };
    std::fs::write(src.join("selftest.json"), serde_json::to_vec(&st).unwrap()).unwrap();
    let out = dir.join(format!("octd-model-t-{version}.tar.gz"));
    archive::pack_dir(&src, &out).unwrap();
    out
}

fn publication(keys: Vec<PathBuf>, add: Vec<PathBuf>) -> Publication {
    Publication {
        add,
        withdraw: vec![],
        keys,
        signing_root: None,
        targets_expires: repo::expires_in(90 * DAY).unwrap(),
        snapshot_expires: repo::expires_in(30 * DAY).unwrap(),
        timestamp_expires: repo::expires_in(7 * DAY).unwrap(),
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    keys: Keys,
    repo: PathBuf,
    trusted_root: Vec<u8>,
}

impl Fixture {
    async fn new(targets_threshold: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let keys = make_keys(&dir.path().join("keys")).await;
        let repo = dir.path().join("repo");
        let targets = vec![keys.targets.clone(), keys.targets2.clone()];
        repo::write_root(&repo, &spec(&keys, targets, targets_threshold), &[]).await.unwrap();
        let trusted_root = std::fs::read(repo.join("metadata/1.root.json")).unwrap();
        Fixture { dir, keys, repo, trusted_root }
    }

    fn all_keys(&self) -> Vec<PathBuf> {
        let k = &self.keys;
        vec![k.root.clone(), k.targets.clone(), k.targets2.clone(), k.snapshot.clone(), k.timestamp.clone()]
    }

    async fn publish(&self, version: &str) {
        let b = bundle(self.dir.path(), version);
        repo::publish(&self.repo, &publication(self.all_keys(), vec![b])).await.unwrap();
    }

    fn datastore(&self) -> PathBuf {
        self.dir.path().join("device-datastore")
    }

    async fn device_load(&self) -> Result<client::VerifiedRepository, Refusal> {
        let channel = Channel::parse(self.repo.to_str().unwrap()).unwrap();
        client::load(&self.trusted_root, &channel, &self.datastore()).await
    }

    async fn device_fetch_newest(&self) -> Result<PathBuf, Refusal> {
        let verified = self.device_load().await?;
        let newest = verified.models().pop().expect("a model is listed");
        let out = self.dir.path().join("fetched.tar.gz");
        verified.fetch(&newest, &out).await?;
        Ok(out)
    }

    /// Sign with `signing_root` standing in for the repository's root (as an attacker
    /// holding some of the keys would), leaving the genuine root files in place.
    async fn publish_forged(&self, signing_root: &RootSpec, keys: Vec<PathBuf>, version: &str) {
        let forged = repo::build_root(signing_root, 1).await.unwrap();
        let path = self.dir.path().join("forged-root.json");
        let signed = serde_json::json!({"signed": forged, "signatures": []});
        std::fs::write(&path, serde_json::to_vec(&signed).unwrap()).unwrap();
        let mut p = publication(keys, vec![bundle(self.dir.path(), version)]);
        p.signing_root = Some(path);
        repo::publish(&self.repo, &p).await.unwrap();
    }
}

#[tokio::test]
async fn published_bundle_verifies_and_arrives_intact() {
    let f = Fixture::new(1).await;
    f.publish("1.0.0").await;
    f.publish("1.1.0").await;
    let verified = f.device_load().await.unwrap();
    let models = verified.models();
    assert_eq!(models.iter().map(|m| m.version.to_string()).collect::<Vec<_>>(), ["1.0.0", "1.1.0"]);
    assert_eq!(models[1].classes, ["CNV", "DME", "DRUSEN", "NORMAL"]);
    let out = f.device_fetch_newest().await.unwrap();
    assert_eq!(archive::inspect(&out).unwrap().version, "1.1.0");
    assert_eq!(repo::listed_models(&f.repo).await.unwrap().len(), 2);
}

#[tokio::test]
async fn flipped_byte_in_a_published_bundle_is_a_hash_mismatch() {
    let f = Fixture::new(1).await;
    f.publish("1.0.0").await;
    // consistent snapshots: the file on the server is <sha256>.<name>
    let target = std::fs::read_dir(f.repo.join("targets")).unwrap().next().unwrap().unwrap().path();
    let mut bytes = std::fs::read(&target).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&target, bytes).unwrap();
    let refusal = f.device_fetch_newest().await.unwrap_err();
    assert_eq!(refusal.code(), "hash_mismatch", "{refusal}");
    assert!(!f.dir.path().join("fetched.tar.gz").exists(), "a refused download must not be left behind");
}

#[tokio::test]
async fn edited_targets_metadata_is_refused() {
    let f = Fixture::new(1).await;
    f.publish("1.0.0").await;
    // Raise the version in the signed custom metadata without re-signing.
    let path = f.repo.join("metadata/1.targets.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("\"1.0.0\"", "\"9.0.0\"");
    std::fs::write(&path, text).unwrap();
    let refusal = f.device_load().await.unwrap_err();
    assert!(matches!(refusal.code(), "hash_mismatch" | "signature_invalid"), "{refusal}");
}

#[tokio::test]
async fn metadata_mixed_from_two_publications_is_refused() {
    let f = Fixture::new(1).await;
    f.publish("1.0.0").await;
    f.publish("1.1.0").await;
    // Snapshot 2 names targets 2; serve targets 1 (validly signed, older) in its place.
    let metadata = f.repo.join("metadata");
    std::fs::copy(metadata.join("1.targets.json"), metadata.join("2.targets.json")).unwrap();
    let refusal = f.device_load().await.unwrap_err();
    assert!(matches!(refusal.code(), "hash_mismatch" | "metadata_inconsistent"), "{refusal}");
}

#[tokio::test]
async fn targets_signed_by_an_unknown_key_are_refused() {
    let f = Fixture::new(1).await;
    let k = &f.keys;
    let forged = spec(k, vec![k.stranger.clone()], 1);
    f.publish_forged(&forged, vec![k.stranger.clone(), k.snapshot.clone(), k.timestamp.clone()], "1.0.0").await;
    let refusal = f.device_load().await.unwrap_err();
    assert_eq!(refusal.code(), "signature_invalid", "{refusal}");
    assert!(refusal.to_string().contains("targets"), "{refusal}");
}

#[tokio::test]
async fn signatures_below_threshold_are_refused() {
    let f = Fixture::new(2).await;
    let k = &f.keys;
    // One of the two targets keys is stolen: it signs alone.
    let forged = spec(k, vec![k.targets.clone()], 1);
    f.publish_forged(&forged, vec![k.targets.clone(), k.snapshot.clone(), k.timestamp.clone()], "1.0.0").await;
    let refusal = f.device_load().await.unwrap_err();
    assert_eq!(refusal.code(), "signature_threshold", "{refusal}");
    assert!(refusal.to_string().contains("1 valid signature(s), 2 required"), "{refusal}");
}

#[tokio::test]
async fn expired_timestamp_is_refused_with_the_device_clock() {
    let f = Fixture::new(1).await;
    let mut p = publication(f.all_keys(), vec![bundle(f.dir.path(), "1.0.0")]);
    p.timestamp_expires = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    repo::publish(&f.repo, &p).await.unwrap();
    let refusal = f.device_load().await.unwrap_err();
    assert_eq!(refusal.code(), "metadata_expired", "{refusal}");
    let text = refusal.to_string();
    assert!(text.contains("timestamp") && text.contains("device clock 20"), "{text}");
}

#[tokio::test]
async fn replayed_older_metadata_is_refused() {
    let f = Fixture::new(1).await;
    f.publish("1.0.0").await;
    let old = f.dir.path().join("old-metadata");
    copy_dir(&f.repo.join("metadata"), &old);
    f.publish("1.1.0").await;
    f.device_load().await.unwrap(); // the device sees 1.1.0's metadata
                                    // A mirror (or attacker) serves the earlier, validly signed, unexpired metadata.
    std::fs::remove_dir_all(f.repo.join("metadata")).unwrap();
    copy_dir(&old, &f.repo.join("metadata"));
    let refusal = f.device_load().await.unwrap_err();
    assert_eq!(refusal.code(), "metadata_replayed", "{refusal}");
}

#[tokio::test]
async fn rotated_root_is_followed_and_old_keys_stop_working() {
    let f = Fixture::new(1).await;
    f.publish("1.0.0").await;
    f.device_load().await.unwrap();
    let k = &f.keys;
    let new_root = f.dir.path().join("keys/root-2.pk8");
    let new_targets = f.dir.path().join("keys/targets-3.pk8");
    keys::generate(&new_root).await.unwrap();
    keys::generate(&new_targets).await.unwrap();
    let mut rotated = spec(k, vec![new_targets.clone()], 1);
    rotated.root = RoleSpec { keys: vec![new_root.clone()], threshold: 1 };
    assert_eq!(repo::write_root(&f.repo, &rotated, std::slice::from_ref(&k.root)).await.unwrap(), 2);
    let b = bundle(f.dir.path(), "2.0.0");
    let keys = vec![new_targets.clone(), k.snapshot.clone(), k.timestamp.clone()];
    repo::publish(&f.repo, &publication(keys, vec![b])).await.unwrap();
    // The device still holds root v1 and follows the chain to v2.
    let verified = f.device_load().await.unwrap();
    assert_eq!(verified.root_version(), 2);
    assert_eq!(verified.models().last().unwrap().version.to_string(), "2.0.0");

    // A rotation not signed by the previous root is refused by the operator tooling.
    let mut bad = rotated.clone();
    bad.root = RoleSpec { keys: vec![k.stranger.clone()], threshold: 1 };
    assert!(repo::write_root(&f.repo, &bad, &[]).await.is_err());
}

#[tokio::test]
async fn withdrawal_right_after_a_root_rotation_is_signed_with_the_new_keys() {
    let f = Fixture::new(1).await;
    f.publish("1.0.0").await;
    f.publish("1.1.0").await;
    let k = &f.keys;
    let new_targets = f.dir.path().join("keys/targets-3.pk8");
    keys::generate(&new_targets).await.unwrap();
    let rotated = spec(k, vec![new_targets.clone()], 1);
    repo::write_root(&f.repo, &rotated, std::slice::from_ref(&k.root)).await.unwrap();
    // The current listing is still signed by the old targets key; withdrawing reads it as
    // written and re-signs it with the new one.
    let mut p = publication(vec![new_targets, k.snapshot.clone(), k.timestamp.clone()], vec![]);
    p.withdraw = vec!["1.1.0".into()];
    repo::publish(&f.repo, &p).await.unwrap();
    let versions: Vec<String> = f.device_load().await.unwrap().models().iter().map(|m| m.version.to_string()).collect();
    assert_eq!(versions, ["1.0.0"]);
}

#[tokio::test]
async fn withdrawing_a_version_removes_it_from_the_signed_listing() {
    let f = Fixture::new(1).await;
    f.publish("1.0.0").await;
    f.publish("1.1.0").await;
    let mut p = publication(f.all_keys(), vec![]);
    p.withdraw = vec!["1.1.0".into()];
    let report = repo::publish(&f.repo, &p).await.unwrap();
    assert_eq!(report.withdrawn, ["octd-model-t-1.1.0.tar.gz"]);
    let versions: Vec<String> = f.device_load().await.unwrap().models().iter().map(|m| m.version.to_string()).collect();
    assert_eq!(versions, ["1.0.0"]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
