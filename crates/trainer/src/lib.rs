//! octd-trainer: the cloud side of octd's learning loop. Devices upload confirmed labels
//! (docs/uplink.md) to the intake; the label store feeds the retrain policy, whose
//! candidates are gated on a fixed holdout and published as signed bundles to the channel
//! that devices already trust.

pub mod blobs;
pub mod channel;
pub mod config;
pub mod gate;
pub mod intake;
pub mod jobs;
pub mod operator;
pub mod policy;
pub mod publish;
pub mod server;
pub mod status;
pub mod store;

/// Exit code for configuration errors: systemd's RestartPreventExitStatus, as octd's.
pub const EXIT_CONFIG: i32 = 78;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Devices name a patient by a pseudonym keyed with their site's key (`p-…`, the same on
/// every device of the site), or by a group of their own (one scan): only the former spans
/// devices.
pub fn site_wide_patient(patient: &str) -> bool {
    patient.starts_with("p-")
}
