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
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = fs::File::create(&tmp)?;
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
