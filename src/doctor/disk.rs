//! Free space on the state folder's filesystem, against the intake floor.

use super::{Context, Finding};

pub fn check(ctx: &Context) -> Finding {
    let state = ctx.state_dir();
    let (Ok(free), Ok(total)) = (fs4::available_space(state), fs4::total_space(state)) else {
        return Finding::skip("disk", format!("{} does not exist yet", state.display()));
    };
    let floor = ctx.config.ingest.min_free_bytes;
    let summary = format!("{} MiB free of {} MiB (intake stops below {} MiB)", free >> 20, total >> 20, floor >> 20);
    if free < floor {
        Finding::fail("disk", summary, "free space on that filesystem: intake is stopped until then")
    } else if free < floor.saturating_mul(4) {
        Finding::warn("disk", summary, "free space soon, or shorten store.retention")
    } else {
        Finding::ok("disk", summary)
    }
}
