//! The spool (inside the state folder) is on the same filesystem as the watch folders, so
//! taking a file is one atomic rename rather than a copy of patient data.

use super::{filesystem_of, Context, Finding};

pub fn check(ctx: &Context) -> Finding {
    let state = ctx.state_dir();
    let Some((state_dev, state_mount, _)) = filesystem_of(state) else {
        return Finding::warn(
            "spool",
            format!("state folder {} does not exist yet", state.display()),
            "run `octd provision` (or start octd once: it creates the folder)",
        );
    };
    let mut other = Vec::new();
    for folder in &ctx.config.ingest.watch {
        if let Some((dev, mount, _)) = filesystem_of(folder) {
            if dev != state_dev {
                other.push(format!("{} (on {})", folder.display(), mount.display()));
            }
        }
    }
    if other.is_empty() {
        Finding::ok("spool", format!("spool and watch folders share {}", state_mount.display()))
    } else {
        Finding::warn(
            "spool",
            format!("{} not on the state folder's filesystem {}", other.join(", "), state_mount.display()),
            "files are copied then deleted instead of renamed; put device.state_dir on the export volume \
             for atomic intake",
        )
    }
}
