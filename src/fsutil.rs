//! Small durable-filesystem helpers shared by the stages.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// fsync a directory so a rename or create inside it survives power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Write `bytes` to `path` atomically: temp file, fsync, rename, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, bytes, 0o644)
}

/// As [`write_atomic`], readable by the owner alone from its first byte (credentials,
/// requests of the operator's commands).
pub fn write_atomic_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, bytes, 0o600)
}

fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
        let mut f = options.open(&tmp)?;
        // A temp file left by a crash keeps its old mode: set it before a byte is written.
        #[cfg(unix)]
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Move a file, atomically where both paths share a filesystem, else copy + fsync + unlink.
/// Both folders are fsynced, so after a power cut the file is in exactly one of them: a
/// claimed scan must not reappear in the export folder and be processed twice.
pub fn move_file(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(18) => {
            // EXDEV: another filesystem (network share, USB stick)
            let dir = to.parent().unwrap_or(Path::new("."));
            let tmp = dir.join(format!(".{}.part", to.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
            fs::copy(from, &tmp)?;
            fs::File::open(&tmp)?.sync_all()?;
            fs::rename(&tmp, to)?;
            fs::remove_file(from)?;
        }
        Err(e) => return Err(e),
    }
    if let Some(dir) = to.parent() {
        sync_dir(dir)?;
    }
    if let Some(dir) = from.parent().filter(|d| Some(*d) != to.parent()) {
        // A watch folder we may not open for reading (a share) cannot be synced; the
        // destination's sync above still holds the new name.
        if let Err(e) = sync_dir(dir) {
            tracing::debug!(error = %e.kind(), "cannot fsync the source folder");
        }
    }
    Ok(())
}
