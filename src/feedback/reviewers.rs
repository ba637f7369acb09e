//! The reviewers this device knows: pseudonymous ids (never names), each with an optional
//! password for the local API, hashed with Argon2id. Kept in `reviewers.json` in the state
//! folder (mode 0600, replaced atomically), so `octd reviewer add | list | remove` works
//! whether the daemon runs or not, and the daemon reads the current file at each verdict.

use std::path::{Path, PathBuf};

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};

use crate::scan::{now_ms, rfc3339_ms};

pub const REVIEWERS_FILE: &str = "reviewers.json";
/// A password shorter than this is refused.
pub const MIN_PASSWORD_CHARS: usize = 12;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReviewerError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0} is corrupt: {1}")]
    Corrupt(PathBuf, String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reviewer {
    pub id: String,
    pub added_at: String,
    /// PHC string (Argon2id); absent: this reviewer may label over MQTT or the CLI but not
    /// log in to the local API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reviewers {
    pub reviewers: Vec<Reviewer>,
}

/// A reviewer id is a pseudonym: letters, digits, `.`, `_`, `-`, at most 64.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Reviewers {
    pub fn path(state: &Path) -> PathBuf {
        state.join(REVIEWERS_FILE)
    }

    /// The registry, empty when the file does not exist yet.
    pub fn load(state: &Path) -> Result<Reviewers, ReviewerError> {
        let path = Self::path(state);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ReviewerError::Corrupt(path, e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Reviewers::default()),
            Err(e) => Err(ReviewerError::Io(path, e)),
        }
    }

    fn save(&self, state: &Path) -> Result<(), ReviewerError> {
        std::fs::create_dir_all(state).map_err(|e| ReviewerError::Io(state.to_path_buf(), e))?;
        let path = Self::path(state);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| ReviewerError::Corrupt(path.clone(), e.to_string()))?;
        crate::fsutil::write_atomic_private(&path, &bytes).map_err(|e| ReviewerError::Io(path.clone(), e))
    }

    pub fn get(&self, id: &str) -> Option<&Reviewer> {
        self.reviewers.iter().find(|r| r.id == id)
    }

    pub fn knows(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// Whether `password` is this reviewer's (false for an unknown one or one without).
    pub fn verify_password(&self, id: &str, password: &str) -> bool {
        let Some(hash) = self.get(id).and_then(|r| r.password_hash.as_deref()) else { return false };
        let Ok(parsed) = PasswordHash::new(hash) else { return false };
        Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok()
    }

    /// Add a reviewer, or set the password of a known one.
    pub fn add(state: &Path, id: &str, password: Option<&str>) -> Result<Reviewer, ReviewerError> {
        if !valid_id(id) {
            return Err(ReviewerError::Invalid(format!(
                "{id:?} is not a reviewer id: use a pseudonym of letters, digits, '.', '_' or '-' (at most 64), never a name"
            )));
        }
        let password_hash = match password {
            Some(p) if p.chars().count() < MIN_PASSWORD_CHARS => {
                return Err(ReviewerError::Invalid(format!(
                    "a password needs at least {MIN_PASSWORD_CHARS} characters"
                )))
            }
            Some(p) => {
                let salt = SaltString::generate(&mut OsRng);
                let hash = Argon2::default()
                    .hash_password(p.as_bytes(), &salt)
                    .map_err(|e| ReviewerError::Invalid(format!("hashing the password: {e}")))?;
                Some(hash.to_string())
            }
            None => None,
        };
        let mut all = Self::load(state)?;
        let reviewer = match all.reviewers.iter_mut().find(|r| r.id == id) {
            Some(known) => {
                if password_hash.is_some() {
                    known.password_hash = password_hash;
                }
                known.clone()
            }
            None => {
                let r = Reviewer { id: id.into(), added_at: rfc3339_ms(now_ms()), password_hash };
                all.reviewers.push(r.clone());
                r
            }
        };
        all.save(state)?;
        Ok(reviewer)
    }

    /// Remove a reviewer; their earlier verdicts stay. False when the id was unknown.
    pub fn remove(state: &Path, id: &str) -> Result<bool, ReviewerError> {
        let mut all = Self::load(state)?;
        let before = all.reviewers.len();
        all.reviewers.retain(|r| r.id != id);
        if all.reviewers.len() == before {
            return Ok(false);
        }
        all.save(state)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_stored_as_argon2id_hashes_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let r = Reviewers::add(dir.path(), "rv-7", Some("correct horse battery")).unwrap();
        let hash = r.password_hash.unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let text = std::fs::read_to_string(Reviewers::path(dir.path())).unwrap();
        assert!(!text.contains("correct horse"), "the password itself is not stored");
        let all = Reviewers::load(dir.path()).unwrap();
        assert!(all.verify_password("rv-7", "correct horse battery"));
        assert!(!all.verify_password("rv-7", "correct horse battery!"));
        assert!(!all.verify_password("rv-8", "correct horse battery"));
    }

    #[test]
    fn ids_must_be_pseudonyms_and_passwords_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Reviewers::add(dir.path(), "Dr. Jane Smith", None).is_err());
        assert!(Reviewers::add(dir.path(), "rv-1", Some("short")).is_err());
        Reviewers::add(dir.path(), "rv-1", None).unwrap();
        assert!(Reviewers::load(dir.path()).unwrap().knows("rv-1"));
        assert!(Reviewers::remove(dir.path(), "rv-1").unwrap());
        assert!(!Reviewers::remove(dir.path(), "rv-1").unwrap());
        assert!(!Reviewers::load(dir.path()).unwrap().knows("rv-1"));
    }
}
