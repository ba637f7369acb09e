//! octd: an edge daemon beside a retinal OCT scanner.
//!
//! ingest -> deid -> infer -> store -> publish, one module per stage; see
//! docs/architecture.md. `pipeline` decides each scan's life, `isolation` runs the decoders
//! in a sandboxed worker process, `daemon` wires and supervises; `commands` holds the
//! one-shot commands.

#![forbid(unsafe_code)]

pub mod commands;
pub mod config;
pub mod daemon;
pub mod deid;
pub mod display;
pub mod doctor;
pub mod feedback;
pub mod fsutil;
pub mod infer;
pub mod ingest;
pub mod isolation;
pub mod mqtt;
pub mod pipeline;
pub mod publish;
pub mod scan;
pub mod secret;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod update;
pub mod uplink;

/// Exit status for configuration errors: listed in the unit's RestartPreventExitStatus so a
/// bad configuration does not restart-loop (sysexits EX_CONFIG).
pub const EXIT_CONFIG: i32 = 78;
