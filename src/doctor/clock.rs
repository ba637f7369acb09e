//! The clock is sane: not before this release (a dead RTC battery boots in 1970 or 2000,
//! and TUF expiry and result times would be nonsense) and, where systemd says, synchronised.

use std::process::Command;

use super::{Context, Finding};

/// No octd release predates this (2026-01-01T00:00:00Z).
const RELEASE_FLOOR_S: u64 = 1_767_225_600;

pub fn check(_ctx: &Context) -> Finding {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let shown = crate::scan::rfc3339_ms(now * 1000);
    if now < RELEASE_FLOOR_S {
        return Finding::fail(
            "clock",
            format!("system time {shown} is before this software was built"),
            "set the time (timedatectl set-ntp true, or timedatectl set-time) and check the RTC battery",
        );
    }
    let synced = Command::new("timedatectl")
        .args(["show", "--property=NTPSynchronized", "--value"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "yes");
    match synced {
        Some(true) => Finding::ok("clock", format!("{shown}, NTP synchronised")),
        Some(false) => Finding::warn(
            "clock",
            format!("{shown}, not NTP synchronised"),
            "enable time sync (timedatectl set-ntp true) so model-channel expiry is judged correctly",
        ),
        None => Finding::ok("clock", format!("{shown} (synchronisation state unknown: no timedatectl)")),
    }
}
