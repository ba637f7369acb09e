//! octd: an edge daemon beside a retinal OCT scanner.
//!
//! ingest -> deid -> infer -> store -> publish, one module per stage; see
//! docs/architecture.md. `daemon` wires them; `commands` holds the one-shot commands.

#![forbid(unsafe_code)]

pub mod commands;
pub mod config;
pub mod daemon;
pub mod deid;
pub mod doctor;
pub mod fsutil;
pub mod infer;
pub mod ingest;
pub mod publish;
pub mod scan;
pub mod secret;
pub mod store;
pub mod telemetry;
pub mod update;

/// Exit status for configuration errors: listed in the unit's RestartPreventExitStatus so a
/// bad configuration does not restart-loop (sysexits EX_CONFIG).
pub const EXIT_CONFIG: i32 = 78;
