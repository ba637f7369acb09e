//! The bundle archive: a gzip'd tar of `manifest.json`, the model file, `selftest.json` and
//! the self-test inputs under `selftest/`. Packing is deterministic (sorted entries, zero
//! times and owners), so the same inputs give the same bytes and the same TUF hash.
//! Unpacking trusts nothing: regular files only, no paths outside the bundle, bounded sizes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{io_err, BundleError};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const SELFTEST_FILE: &str = "selftest.json";
pub const SELFTEST_DIR: &str = "selftest";
pub const SELFTEST_FORMAT: u32 = 1;

/// What the bundle layer needs of a model manifest; the full format (docs/model-manifest.md)
/// is the daemon's to interpret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestHead {
    pub name: String,
    pub version: String,
    #[serde(default = "default_model_file")]
    pub model_file: String,
    pub sha256: String,
    pub classes: Vec<String>,
}

fn default_model_file() -> String {
    "model.onnx".into()
}

impl ManifestHead {
    pub fn semver(&self) -> Result<semver::Version, BundleError> {
        semver::Version::parse(&self.version)
            .map_err(|e| BundleError::Invalid(format!("manifest version {:?} is not semantic: {e}", self.version)))
    }

    /// The TUF target name of this model's bundle.
    pub fn target_name(&self) -> String {
        format!("octd-model-{}-{}.tar.gz", self.name, self.version)
    }
}

/// Inputs with this exact model's expected outputs. A device runs it on the staged model
/// before swapping it in, and again whenever it loads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelfTest {
    pub format_version: u32,
    /// Largest allowed absolute difference of any class probability.
    pub tolerance: f32,
    pub cases: Vec<SelfTestCase>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelfTestCase {
    /// Path inside the bundle, under `selftest/`: a de-identified greyscale PNG.
    pub input: String,
    pub label: String,
    pub probabilities: BTreeMap<String, f32>,
    /// The model's out-of-distribution score for the input, where it gives one; checked
    /// relative to its size (`tolerance` of it, at least `tolerance`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlike_training_score: Option<f32>,
}

/// Bounds on what an unpacked bundle may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_file_bytes: u64,
    pub max_total_bytes: u64,
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_file_bytes: 1 << 30, max_total_bytes: 2 << 30, max_entries: 256 }
    }
}

pub fn sha256_file(path: &Path) -> Result<String, BundleError> {
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    std::io::copy(&mut file, &mut hasher).map_err(io_err(path))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Check a bundle folder: manifest readable, model present with the manifest's hash,
/// self-test present with every input. Returns the manifest head and self-test.
pub fn check_dir(dir: &Path) -> Result<(ManifestHead, SelfTest), BundleError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest = std::fs::read(&manifest_path).map_err(io_err(&manifest_path))?;
    let head: ManifestHead =
        serde_json::from_slice(&manifest).map_err(|e| BundleError::Invalid(format!("{MANIFEST_FILE}: {e}")))?;
    head.semver()?;
    if !is_plain_name(&head.model_file) {
        return Err(BundleError::Invalid(format!("model_file {:?} must be a plain file name", head.model_file)));
    }
    let model_sha = sha256_file(&dir.join(&head.model_file))?;
    if !model_sha.eq_ignore_ascii_case(&head.sha256) {
        return Err(BundleError::Invalid(format!(
            "{} has sha256 {model_sha}, the manifest says {}",
            head.model_file, head.sha256
        )));
    }
    let selftest = read_selftest(dir)?;
    Ok((head, selftest))
}

/// Read and check a folder's `selftest.json`: format, tolerance, every input present under
/// `selftest/`. (The model's hash is the loader's to check, once.)
pub fn read_selftest(dir: &Path) -> Result<SelfTest, BundleError> {
    let path = dir.join(SELFTEST_FILE);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let selftest: SelfTest =
        serde_json::from_slice(&bytes).map_err(|e| BundleError::Invalid(format!("{SELFTEST_FILE}: {e}")))?;
    if selftest.format_version != SELFTEST_FORMAT {
        return Err(BundleError::Invalid(format!("self-test format {} is not supported", selftest.format_version)));
    }
    if selftest.cases.is_empty() {
        return Err(BundleError::Invalid("the self-test has no cases".into()));
    }
    if !(selftest.tolerance.is_finite() && selftest.tolerance >= 0.0 && selftest.tolerance < 0.5) {
        return Err(BundleError::Invalid("self-test tolerance must be within 0..0.5".into()));
    }
    for case in &selftest.cases {
        let ok = case.input.strip_prefix("selftest/").is_some_and(is_plain_name);
        if !ok || !dir.join(&case.input).is_file() {
            return Err(BundleError::Invalid(format!(
                "self-test input {:?} is missing or outside selftest/",
                case.input
            )));
        }
    }
    Ok(selftest)
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0'])
}

/// Pack a checked bundle folder into `out` (written to a temporary file, then renamed).
pub fn pack_dir(dir: &Path, out: &Path) -> Result<ManifestHead, BundleError> {
    let (head, selftest) = check_dir(dir)?;
    let mut files: Vec<String> = vec![MANIFEST_FILE.into(), head.model_file.clone(), SELFTEST_FILE.into()];
    files.extend(selftest.cases.iter().map(|c| c.input.clone()));
    files.sort();
    files.dedup();
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(parent).map_err(io_err(parent))?;
    {
        let gz = flate2::write::GzEncoder::new(tmp.as_file(), flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        tar.mode(tar::HeaderMode::Deterministic);
        for name in &files {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, name, bytes.as_slice()).map_err(io_err(out))?;
        }
        let gz = tar.into_inner().map_err(io_err(out))?;
        let mut file = gz.finish().map_err(io_err(out))?;
        file.flush().map_err(io_err(out))?;
        file.sync_all().map_err(io_err(out))?;
    }
    tmp.persist(out).map_err(|e| BundleError::Io { path: out.to_path_buf(), source: e.error })?;
    Ok(head)
}

/// Read only the manifest out of a bundle archive.
pub fn inspect(archive: &Path) -> Result<ManifestHead, BundleError> {
    let file = std::fs::File::open(archive).map_err(io_err(archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    for entry in tar.entries().map_err(io_err(archive))? {
        let mut entry = entry.map_err(io_err(archive))?;
        if entry.path().map_err(io_err(archive))?.as_os_str() == MANIFEST_FILE {
            let mut bytes = Vec::new();
            entry.by_ref().take(1 << 20).read_to_end(&mut bytes).map_err(io_err(archive))?;
            let head: ManifestHead =
                serde_json::from_slice(&bytes).map_err(|e| BundleError::Invalid(format!("{MANIFEST_FILE}: {e}")))?;
            head.semver()?;
            return Ok(head);
        }
    }
    Err(BundleError::Invalid(format!("{} holds no {MANIFEST_FILE}", archive.display())))
}

/// Unpack `archive` into the new folder `dest` and check it. Anything but regular files at
/// the top level or under `selftest/` is refused, as are sizes over `limits`.
pub fn unpack(archive: &Path, dest: &Path, limits: Limits) -> Result<(ManifestHead, SelfTest), BundleError> {
    std::fs::create_dir(dest).map_err(io_err(dest))?;
    std::fs::create_dir(dest.join(SELFTEST_DIR)).map_err(io_err(dest))?;
    let file = std::fs::File::open(archive).map_err(io_err(archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let (mut entries, mut total) = (0usize, 0u64);
    for entry in tar.entries().map_err(|e| BundleError::Invalid(format!("not a bundle archive: {e}")))? {
        let mut entry = entry.map_err(|e| BundleError::Invalid(format!("damaged archive: {e}")))?;
        entries += 1;
        if entries > limits.max_entries {
            return Err(BundleError::Invalid(format!("more than {} entries", limits.max_entries)));
        }
        let path: PathBuf = entry.path().map_err(|e| BundleError::Invalid(format!("entry name: {e}")))?.into_owned();
        let kind = entry.header().entry_type();
        if kind.is_dir() && path.as_os_str() == SELFTEST_DIR {
            continue;
        }
        let parts: Vec<&str> = path
            .components()
            .map(|c| match c {
                Component::Normal(s) => s.to_str().unwrap_or("\0"),
                _ => "\0",
            })
            .collect();
        let allowed = match parts.as_slice() {
            [name] => is_plain_name(name),
            [dir, name] => *dir == SELFTEST_DIR && is_plain_name(name),
            _ => false,
        };
        if !allowed || !kind.is_file() {
            return Err(BundleError::Invalid(format!("entry {:?} is not a plain file of a bundle", path.display())));
        }
        let size = entry.header().size().map_err(|e| BundleError::Invalid(format!("entry size: {e}")))?;
        total = total.saturating_add(size);
        if size > limits.max_file_bytes || total > limits.max_total_bytes {
            return Err(BundleError::Invalid("bundle larger than allowed".into()));
        }
        let target = dest.join(&path);
        let mut out =
            std::fs::OpenOptions::new().write(true).create_new(true).open(&target).map_err(io_err(&target))?;
        let copied = std::io::copy(&mut entry.by_ref().take(size), &mut out).map_err(io_err(&target))?;
        if copied != size {
            return Err(BundleError::Invalid(format!("entry {:?} is truncated", path.display())));
        }
        out.sync_all().map_err(io_err(&target))?;
    }
    check_dir(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_dir(root: &Path) -> PathBuf {
        let dir = root.join("b");
        std::fs::create_dir_all(dir.join("selftest")).unwrap();
        std::fs::write(dir.join("model.onnx"), b"not really onnx").unwrap();
        let sha = hex::encode(Sha256::digest(b"not really onnx"));
        let manifest = serde_json::json!({"name": "m", "version": "1.2.3", "sha256": sha, "classes": ["A", "B"]});
        std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
        std::fs::write(dir.join("selftest/0.png"), b"png").unwrap();
        let st = SelfTest {
            format_version: 1,
            tolerance: 1e-3,
            cases: vec![SelfTestCase {
                input: "selftest/0.png".into(),
                label: "A".into(),
                probabilities: BTreeMap::new(),
                unlike_training_score: None,
            }],
        };
        std::fs::write(dir.join("selftest.json"), serde_json::to_vec(&st).unwrap()).unwrap();
        dir
    }

    #[test]
    fn pack_is_deterministic_and_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = bundle_dir(tmp.path());
        pack_dir(&dir, &tmp.path().join("a.tar.gz")).unwrap();
        pack_dir(&dir, &tmp.path().join("b.tar.gz")).unwrap();
        let a = std::fs::read(tmp.path().join("a.tar.gz")).unwrap();
        assert_eq!(a, std::fs::read(tmp.path().join("b.tar.gz")).unwrap());
        assert_eq!(inspect(&tmp.path().join("a.tar.gz")).unwrap().target_name(), "octd-model-m-1.2.3.tar.gz");
        let (head, st) = unpack(&tmp.path().join("a.tar.gz"), &tmp.path().join("out"), Limits::default()).unwrap();
        assert_eq!(head.version, "1.2.3");
        assert_eq!(st.cases.len(), 1);
    }

    #[test]
    fn unpack_refuses_escaping_paths_links_and_oversize() {
        let tmp = tempfile::tempdir().unwrap();
        let evil = |name: &str, kind: tar::EntryType, data: &[u8]| {
            let path = tmp.path().join(format!("{}.tar.gz", name.replace(['/', '.'], "_")));
            let gz = flate2::write::GzEncoder::new(std::fs::File::create(&path).unwrap(), Default::default());
            let mut tar = tar::Builder::new(gz);
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_entry_type(kind);
            header.set_mode(0o644);
            // set_path refuses "..", so write the raw name the way a hostile archiver would.
            let raw = &mut header.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            tar.append(&header, data).unwrap();
            tar.into_inner().unwrap().finish().unwrap();
            path
        };
        for (i, (name, kind)) in [
            ("../escape", tar::EntryType::Regular),
            ("/etc/passwd", tar::EntryType::Regular),
            ("selftest/deep/x", tar::EntryType::Regular),
            ("model.onnx", tar::EntryType::Symlink),
        ]
        .into_iter()
        .enumerate()
        {
            let archive = evil(name, kind, b"x");
            let err = unpack(&archive, &tmp.path().join(format!("out{i}")), Limits::default()).unwrap_err();
            assert!(err.to_string().contains("not a plain file"), "{name}: {err}");
        }
        let archive = evil("model.onnx", tar::EntryType::Regular, &[0u8; 100]);
        let limits = Limits { max_file_bytes: 10, ..Limits::default() };
        assert!(unpack(&archive, &tmp.path().join("big"), limits).unwrap_err().to_string().contains("larger"));
        assert!(!tmp.path().parent().unwrap().join("escape").exists());
    }

    #[test]
    fn check_refuses_a_model_that_does_not_match_its_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = bundle_dir(tmp.path());
        std::fs::write(dir.join("model.onnx"), b"tampered").unwrap();
        assert!(check_dir(&dir).unwrap_err().to_string().contains("sha256"));
    }
}
