//! The uplink (where confirmed labels go) accepts this device: a signed request the trainer
//! authenticates proves DNS, routing, TLS, enrolment, the identity key, the clock and the
//! signature at once — not only that the URL answers.

use super::{Context, Finding};

pub fn check(ctx: &Context) -> Finding {
    let u = &ctx.config.uplink;
    if u.url.is_empty() {
        return Finding::skip("uplink", "no uplink.url configured");
    }
    if !u.enabled {
        return Finding::skip("uplink", "uplink.enabled is off: verdicts stay on this device");
    }
    match ctx.runtime.block_on(crate::uplink::prove(u)) {
        Ok((site, device)) => Finding::ok("uplink", format!("{} accepts this device as {site}/{device}", u.url)),
        Err(e) if e.contains("unknown_device") => Finding::fail(
            "uplink",
            e,
            "enrol the device at the trainer: octd-trainer device add device-identity.pub.json (written by octd provision)",
        ),
        Err(e) if e.contains("revoked") => {
            Finding::fail("uplink", e, "the trainer's operator revoked this device; ask them to enrol it again")
        }
        Err(e) if e.contains("stale") => {
            Finding::fail("uplink", e, "set the device clock (NTP): signed requests carry the time")
        }
        Err(e) => Finding::fail(
            "uplink",
            e,
            "check uplink.url, DNS and the firewall, uplink.identity_key, and that an https certificate chains to the system roots or uplink.ca_file",
        ),
    }
}
