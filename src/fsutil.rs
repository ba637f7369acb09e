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
    // Any failure of the direct write (a filesystem that refuses it in its own way, a short
    // write) gets one ordinary write, which reports the errors that are real (a full disk).
    let direct = bytes.len() >= DIRECT_FROM && write_direct(&tmp, bytes, mode).unwrap_or(false);
    if !direct {
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

/// Files at least this large (a volume's artefact) are written past the page cache where the
/// filesystem allows it. Through the page cache, every 4 KiB page of a new file costs the
/// kernel a page allocation: 16 MiB took 50 ms of CPU and 60 ms in all with its fsync on the
/// development VM, against 1.4 ms of CPU and 17 ms in all written directly
/// (docs/benchmarks.md). The file is read back rarely (uploads, the reading room).
const DIRECT_FROM: usize = 1 << 20;
/// What `O_DIRECT` needs aligned: memory, lengths and file offsets (4 KiB covers 512-byte
/// and 4 KiB logical blocks).
const DIRECT_ALIGN: usize = 4096;
const DIRECT_CHUNK: usize = 1 << 20;

/// Write `bytes` into `tmp` with `O_DIRECT` and fsync it. `Ok(false)`: the filesystem does not
/// take direct writes (tmpfs before Linux 6.6, some FUSE), and nothing is left to clean up
/// that a buffered write would not replace.
#[cfg(target_os = "linux")]
fn write_direct(tmp: &Path, bytes: &[u8], mode: u32) -> io::Result<bool> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let unsupported = |e: &io::Error| e.raw_os_error() == Some(libc::EINVAL);
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true).mode(mode).custom_flags(libc::O_DIRECT);
    let mut f = match options.open(tmp) {
        Ok(f) => f,
        Err(e) if unsupported(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    // An aligned window into an ordinary buffer: safe code cannot ask the allocator for
    // alignment, but it can find the aligned address inside a slightly larger buffer.
    let mut bounce = vec![0u8; DIRECT_CHUNK + DIRECT_ALIGN];
    let start = bounce.as_ptr().align_offset(DIRECT_ALIGN);
    let Some(window) = bounce.get_mut(start..start.saturating_add(DIRECT_CHUNK)) else { return Ok(false) };
    for (i, chunk) in bytes.chunks(DIRECT_CHUNK).enumerate() {
        // The last block is padded with zeros and cut back to the true length below.
        let padded = chunk.len().next_multiple_of(DIRECT_ALIGN);
        window[..chunk.len()].copy_from_slice(chunk);
        window[chunk.len()..padded].fill(0);
        match f.write(&window[..padded]) {
            Ok(n) if n == padded => {}
            // A short direct write leaves the next offset unaligned: count it a failure.
            Ok(_) => return Err(io::Error::new(io::ErrorKind::WriteZero, "a direct write was cut short")),
            Err(e) if i == 0 && unsupported(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    f.set_len(bytes.len() as u64)?;
    f.sync_all()?;
    Ok(true)
}

#[cfg(not(target_os = "linux"))]
fn write_direct(_tmp: &Path, _bytes: &[u8], _mode: u32) -> io::Result<bool> {
    Ok(false)
}

/// Move a file, atomically where both paths share a filesystem, else copy + fsync + unlink.
/// Both folders are fsynced, so after a power cut the file is in exactly one of them: a
/// claimed scan must not reappear in the export folder and be processed twice.
pub fn move_file(from: &Path, to: &Path) -> io::Result<()> {
    rename_unsynced(from, to)?;
    sync_folders_of(&[(from, to)])
}

/// The move of [`move_file`] without its folders' fsyncs: several moves then share them
/// ([`sync_folders_of`]), one fsync per folder instead of two per file.
pub fn rename_unsynced(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(18) => {
            // EXDEV: another filesystem (network share, USB stick)
            let dir = to.parent().unwrap_or(Path::new("."));
            let tmp = dir.join(format!(".{}.part", to.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
            fs::copy(from, &tmp)?;
            fs::File::open(&tmp)?.sync_all()?;
            fs::rename(&tmp, to)?;
            fs::remove_file(from)
        }
        Err(e) => Err(e),
    }
}

/// fsync the folders that moves by [`rename_unsynced`] changed, each once: every destination
/// folder (an error here is returned), then every source folder (a watch folder we may not
/// open for reading, a share, cannot be synced; the destination's sync still holds the new
/// name).
pub fn sync_folders_of(moves: &[(&Path, &Path)]) -> io::Result<()> {
    let mut destinations: Vec<&Path> = moves.iter().filter_map(|(_, to)| to.parent()).collect();
    destinations.sort();
    destinations.dedup();
    for dir in &destinations {
        sync_dir(dir)?;
    }
    let mut sources: Vec<&Path> =
        moves.iter().filter_map(|(from, _)| from.parent()).filter(|d| !destinations.contains(d)).collect();
    sources.sort();
    sources.dedup();
    for dir in sources {
        if let Err(e) = sync_dir(dir) {
            tracing::debug!(error = %e.kind(), "cannot fsync the source folder");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_files_are_written_whole_past_the_page_cache_where_the_filesystem_allows() {
        // On the disk the build is on: a temporary folder is often a tmpfs, which may not
        // take direct writes at all.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        // Lengths around the chunk and block boundaries, the last one odd.
        for len in [DIRECT_FROM, DIRECT_FROM + 1, DIRECT_CHUNK * 2 + DIRECT_ALIGN, DIRECT_CHUNK * 3 + 123] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let path = dir.path().join(format!("{len}.dcm"));
            std::fs::write(&path, b"an older, longer file that must not show through").unwrap();
            write_atomic_private(&path, &bytes).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "{len} bytes read back as written");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
            }
            // A temp file a crash left behind, longer and private: replaced, mode included.
            let tmp = dir.path().join(format!(".{len}.direct"));
            std::fs::write(&tmp, vec![7u8; len + 5000]).unwrap();
            #[cfg(unix)]
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            match write_direct(&tmp, &bytes, 0o644) {
                Ok(true) => {
                    assert_eq!(std::fs::read(&tmp).unwrap(), bytes, "{len}: direct");
                    #[cfg(unix)]
                    {
                        use std::os::unix::fs::PermissionsExt;
                        assert_eq!(std::fs::metadata(&tmp).unwrap().permissions().mode() & 0o777, 0o644);
                    }
                }
                Ok(false) => eprintln!("the filesystem under {} takes no direct writes", dir.path().display()),
                Err(e) => panic!("{len}: {e}"),
            }
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "no temp file left: {leftovers:?}");
    }
}
