//! Every watch folder exists, can be listed and written (octd moves each file out), and is
//! on a filesystem whose type is named (network mounts get a note: inotify misses remote
//! writes there, the periodic rescan finds them).

use super::{filesystem_of, Context, Finding};

pub fn check(ctx: &Context) -> Finding {
    let mut parts = Vec::new();
    let mut remote = Vec::new();
    for folder in &ctx.config.ingest.watch {
        let shown = folder.display();
        match std::fs::metadata(folder) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Finding::fail(
                    "watch_folders",
                    format!("{shown} is not a folder"),
                    "point ingest.watch at the export folder",
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Finding::warn(
                    "watch_folders",
                    format!("{shown} does not exist yet (octd creates it at start, where it may)"),
                    format!("create it (install -d -o octd -g octd {shown}) or mount the scanner's export share there"),
                )
            }
            Err(e) => {
                return Finding::fail(
                    "watch_folders",
                    format!("{shown}: {e}"),
                    format!("give the octd user access to {shown}"),
                )
            }
        };
        if let Err(e) = std::fs::read_dir(folder) {
            return Finding::fail(
                "watch_folders",
                format!("{shown} cannot be listed: {e}"),
                format!("give the octd user read and write access (chown octd {shown}, or a group ACL)"),
            );
        }
        let probe = folder.join(format!(".octd-doctor-{}", std::process::id()));
        match std::fs::File::create(&probe) {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
            }
            Err(e) => {
                return Finding::fail(
                    "watch_folders",
                    format!("{shown} is not writable ({e}): octd must move files out of it"),
                    format!(
                        "give the octd user write access to {shown}; under systemd also list it in ReadWritePaths= \
                         (octd provision writes that drop-in)"
                    ),
                )
            }
        }
        match filesystem_of(folder) {
            Some((_, mount, fstype)) => {
                if ["nfs", "nfs4", "cifs", "smb3", "fuse.sshfs"].contains(&fstype.as_str()) {
                    remote.push(shown.to_string());
                }
                parts.push(format!("{shown} ({fstype} at {})", mount.display()));
            }
            None => parts.push(format!("{shown} (filesystem unknown)")),
        }
    }
    if remote.is_empty() {
        Finding::ok("watch_folders", parts.join(", "))
    } else {
        Finding::warn(
            "watch_folders",
            parts.join(", "),
            format!(
                "{} on a network filesystem: new files are found by the rescan every {}, not at once",
                remote.join(", "),
                humantime::format_duration(ctx.config.ingest.rescan_interval)
            ),
        )
    }
}
