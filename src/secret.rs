//! The per-device secret: keys the pseudonymous UID hash and seals the linkage table.
//! Created once with 0600 permissions; losing it breaks pseudonym continuity and makes
//! the linkage unreadable, which is the intended failure mode for a stolen store file.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

pub const SECRET_FILE: &str = "device.key";

#[derive(Clone)]
pub struct DeviceSecret([u8; 32]);

impl std::fmt::Debug for DeviceSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceSecret(..)")
    }
}

impl DeviceSecret {
    /// The existing secret; never creates one (diagnostics must not change the device).
    pub fn load(state_dir: &Path) -> std::io::Result<DeviceSecret> {
        let bytes = fs::read(state_dir.join(SECRET_FILE))?;
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "device.key must hold 32 bytes"))?;
        Ok(DeviceSecret(key))
    }

    pub fn load_or_create(state_dir: &Path) -> std::io::Result<DeviceSecret> {
        fs::create_dir_all(state_dir)?;
        let path = state_dir.join(SECRET_FILE);
        match DeviceSecret::load(state_dir) {
            Ok(secret) => Ok(secret),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                let tmp = state_dir.join(format!("{SECRET_FILE}.tmp"));
                let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
                f.write_all(&key)?;
                f.sync_all()?;
                fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
                fs::rename(&tmp, &path)?;
                crate::fsutil::sync_dir(state_dir)?;
                Ok(DeviceSecret(key))
            }
            Err(e) => Err(e),
        }
    }

    /// The key as the decoder worker receives it over its pipe (see `isolation`).
    pub fn from_bytes(key: [u8; 32]) -> Self {
        DeviceSecret(key)
    }

    /// The raw key, for handing to the decoder worker over its pipe; never log it.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// HMAC-SHA256 under this device's key, domain-separated by `purpose`.
    pub fn mac(&self, purpose: &str, data: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(data);
        mac.finalize().into_bytes().into()
    }
}

impl DeviceSecret {
    /// A throw-away key, for one-shot commands whose pseudonyms need not match the device's.
    pub fn ephemeral() -> DeviceSecret {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        DeviceSecret(key)
    }
}
