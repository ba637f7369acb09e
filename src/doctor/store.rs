//! The store opens and reads back: every scan record and outbox entry decodes. While the
//! daemon runs it holds the store, and its /status (which reads the store) is the proof.

use super::{Context, Finding};
use crate::secret::DeviceSecret;
use crate::store::{Store, STORE_FILE};

pub fn check(ctx: &Context) -> Finding {
    if let Some(status) = &ctx.daemon {
        return Finding::ok(
            "store",
            format!("in use by the running daemon, which reads it: {} outbox message(s)", status["outbox"]["messages"]),
        );
    }
    let path = ctx.state_dir().join(STORE_FILE);
    if !path.exists() {
        return Finding::warn("store", format!("no store at {} yet", path.display()), "start octd once; it creates it");
    }
    let secret =
        match DeviceSecret::load(ctx.state_dir()) {
            Ok(s) => s,
            Err(e) => return Finding::fail(
                "store",
                format!("device secret in {}: {e}", ctx.state_dir().display()),
                "the store's sealed linkage needs the original device.key: restore it from backup; never replace it",
            ),
        };
    let store = match Store::open(&path, &secret) {
        Ok(s) => s,
        Err(e) => {
            return Finding::fail(
                "store",
                format!("{}: {e}", path.display()),
                "if octd is running without its endpoint, stop it first; otherwise restore the state folder from \
                 backup (the file is redb; it repairs itself after a crash on the next open)",
            )
        }
    };
    match store.counts().and_then(|c| store.outbox_after(0, usize::MAX).map(|o| (c, o.len()))) {
        Ok((counts, outbox)) => Finding::ok(
            "store",
            format!("{} opens; scans by state {:?}; {outbox} outbox message(s)", path.display(), counts.by_state),
        ),
        Err(e) => Finding::fail("store", format!("{}: {e}", path.display()), "restore the state folder from backup"),
    }
}
