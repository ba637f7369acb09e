//! Signing keys: Ed25519, stored as PKCS#8 DER files readable only by their owner (the format
//! tough's `LocalKeySource` reads).

use std::io::Write;
use std::path::Path;

use tough::key_source::{KeySource, LocalKeySource};

use crate::{io_err, BundleError};

/// Create a new Ed25519 key at `out` (refusing to overwrite one) and return its TUF key id.
pub async fn generate(out: &Path) -> Result<String, BundleError> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|e| BundleError::Keys(format!("cannot generate a key: {e}")))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(out).map_err(io_err(out))?;
    file.write_all(pkcs8.as_ref()).map_err(io_err(out))?;
    file.sync_all().map_err(io_err(out))?;
    key_id(out).await
}

pub fn source(path: &Path) -> Box<dyn KeySource> {
    Box::new(LocalKeySource { path: path.to_path_buf() })
}

pub async fn public_key(path: &Path) -> Result<tough::schema::key::Key, BundleError> {
    let sign = source(path)
        .as_sign()
        .await
        .map_err(|e| BundleError::Keys(format!("{}: not a usable signing key: {e}", path.display())))?;
    Ok(sign.tuf_key())
}

/// The TUF key id (hex) of the key in `path`.
pub async fn key_id(path: &Path) -> Result<String, BundleError> {
    let key = public_key(path).await?;
    let id = key.key_id().map_err(|e| BundleError::Keys(format!("key id: {e}")))?;
    Ok(hex::encode(id.as_ref()))
}
