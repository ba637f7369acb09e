//! Typed settings with documented defaults (`config/octd-trainer.toml`): an empty file, or
//! none, runs the service on one machine with everything under `var/octd-trainer`.
//!
//! Sources, later ones win: built-in defaults, the TOML file, then environment variables
//! `OCTD_TRAINER_<SECTION>__<KEY>` (for example `OCTD_TRAINER_STORAGE__DATABASE=postgres://…`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

const SECTIONS: &[&str] = &["server", "storage", "intake", "channel", "policy", "jobs", "gate", "announce"];
pub const ENV_PREFIX: &str = "OCTD_TRAINER_";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub intake: IntakeConfig,
    pub channel: ChannelConfig,
    pub policy: crate::policy::PolicyConfig,
    pub jobs: crate::jobs::JobsConfig,
    pub gate: crate::gate::GateConfig,
    pub announce: crate::publish::AnnounceConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Intake API, status and the model channel (`/channel/…`).
    pub listen: SocketAddr,
    /// Bearer token for `GET /api/v1/status` and `/metrics`; empty: only clients on this
    /// host may read them.
    pub operator_token: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { listen: SocketAddr::from(([127, 0, 0, 1], 8700)), operator_token: String::new() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `sqlite://PATH` (one node) or `postgres://user:password@host/db` (a fleet).
    pub database: String,
    /// A folder, or `s3://bucket[/prefix]` for S3-compatible storage (credentials and
    /// region from the standard `AWS_*` variables).
    pub blobs: String,
    /// For S3-compatible servers other than AWS, e.g. `http://minio:9000`.
    pub s3_endpoint: String,
    /// Connections to the database.
    pub max_connections: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            database: "sqlite://var/octd-trainer/trainer.db".into(),
            blobs: "var/octd-trainer/blobs".into(),
            s3_endpoint: String::new(),
            max_connections: 8,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IntakeConfig {
    /// The classes a label may name (the model's classes).
    pub classes: Vec<String>,
    /// Largest image upload (a volume as DICOM can be tens of MB).
    pub max_image_bytes: u64,
    /// Largest label body.
    pub max_label_bytes: u64,
    /// A request signed further from the server's clock than this is refused.
    #[serde(with = "humantime_serde")]
    pub clock_skew: Duration,
    /// Requests per minute one device may make (sustained), and the burst above it.
    pub requests_per_minute: u32,
    pub burst: u32,
    /// Share of patients assigned to the fixed holdout at their first label.
    pub holdout_fraction: f64,
    /// Requests whose key is not yet known to be enrolled, all clients together, per second.
    pub unauthenticated_per_second: u32,
    /// Requests served at once; more wait for a slot.
    pub max_concurrent_requests: usize,
    /// A request (an upload included) must finish within this.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        IntakeConfig {
            classes: ["CNV", "DME", "DRUSEN", "NORMAL"].map(String::from).to_vec(),
            max_image_bytes: 64 << 20,
            max_label_bytes: 16 << 10,
            clock_skew: Duration::from_secs(300),
            requests_per_minute: 600,
            burst: 120,
            holdout_fraction: 0.2,
            unauthenticated_per_second: 50,
            max_concurrent_requests: 64,
            request_timeout: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelConfig {
    /// The signed model channel (TUF repository), also served at `/channel/`.
    pub dir: PathBuf,
    /// The online signing keys (targets, snapshot, timestamp). The root key belongs offline.
    pub keys: PathBuf,
    /// How long the targets metadata signed at a publication stays valid. Snapshot and
    /// timestamp metadata are re-signed before they expire (30 days) while the service runs.
    #[serde(with = "humantime_serde")]
    pub targets_expiry: Duration,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            dir: "var/octd-trainer/channel".into(),
            keys: "var/octd-trainer/keys".into(),
            targets_expiry: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

impl Config {
    /// Defaults, then `path` (which must exist when given), then the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::Missing(path.to_path_buf()));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__").filter(|key| {
            let head = key.as_str().split('.').next().unwrap_or_default();
            SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(head)) && key.as_str().len() > head.len()
        }));
        let config: Config = figment.extract().map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| Err(ConfigError::Invalid { field, reason: reason.into() });
        let db = &self.storage.database;
        if !(db.starts_with("sqlite:") || db.starts_with("postgres://") || db.starts_with("postgresql://")) {
            return invalid("storage.database", "must be sqlite://PATH or postgres://…");
        }
        if self.storage.blobs.is_empty() {
            return invalid("storage.blobs", "must name a folder or s3://bucket");
        }
        if self.storage.max_connections == 0 {
            return invalid("storage.max_connections", "must be at least 1");
        }
        if self.intake.classes.is_empty() {
            return invalid("intake.classes", "must name the model's classes");
        }
        if self.intake.unauthenticated_per_second == 0 || self.intake.max_concurrent_requests == 0 {
            return invalid("intake.unauthenticated_per_second", "limits must be at least 1");
        }
        if self.channel.keys.starts_with(&self.channel.dir) {
            return invalid("channel.keys", "must not be inside channel.dir, which is served over HTTP");
        }
        if self.intake.requests_per_minute == 0 || self.intake.burst == 0 {
            return invalid("intake.requests_per_minute", "the rate and the burst must be at least 1");
        }
        if !(0.0..1.0).contains(&self.intake.holdout_fraction) {
            return invalid("intake.holdout_fraction", "must be in [0, 1)");
        }
        if !(0.0..=1.0).contains(&self.policy.accuracy_floor) {
            return invalid("policy.accuracy_floor", "must be in [0, 1]");
        }
        if self.policy.accuracy_window == 0 || self.policy.retrain_every_labels == 0 {
            return invalid("policy.accuracy_window", "the window and the label count must be at least 1");
        }
        if self.jobs.command.is_empty() {
            return invalid("jobs.command", "must name the job to run");
        }
        if !matches!(self.jobs.architecture.as_str(), "efficientnet_lite0" | "xception" | "compact") {
            return invalid("jobs.architecture", "must be efficientnet_lite0, xception or compact");
        }
        if self.jobs.abandon_after < self.jobs.heartbeat * 3 {
            return invalid("jobs.abandon_after", "must be at least three heartbeats");
        }
        if self.jobs.check_interval.is_zero() || self.jobs.timeout.is_zero() || self.jobs.heartbeat.is_zero() {
            return invalid("jobs.check_interval", "the interval and the timeout must be positive");
        }
        if self.intake.max_image_bytes == 0 || self.intake.max_label_bytes == 0 {
            return invalid("intake.max_image_bytes", "size limits must be positive");
        }
        if !(0.0..=1.0).contains(&self.gate.tolerance) {
            return invalid("gate.tolerance", "must be in [0, 1]");
        }
        if self.gate.min_holdout == 0 {
            return invalid("gate.min_holdout", "the holdout needs at least one image");
        }
        if self.gate.selftest_cases == 0 {
            return invalid("gate.selftest_cases", "the self-test needs at least one image");
        }
        if self.gate.selftest_tolerance.is_nan() || self.gate.selftest_tolerance < 0.0 {
            return invalid("gate.selftest_tolerance", "must be a non-negative number");
        }
        if self.channel.targets_expiry < crate::channel::ONLINE_EXPIRY {
            return invalid("channel.targets_expiry", "must be at least 30 days");
        }
        if !self.announce.broker.is_empty() {
            match octd::mqtt::BrokerAddress::parse(&self.announce.broker) {
                Err(e) => return Err(ConfigError::Invalid { field: "announce.broker", reason: e }),
                Ok(a) if a.tls && self.announce.ca_file.is_none() => {
                    return invalid("announce.ca_file", "mqtts:// needs the broker's CA certificate")
                }
                Ok(_) => {}
            }
            if self.announce.topic.is_empty() || self.announce.topic.contains(['#', '+']) {
                return invalid("announce.topic", "must be a topic name without wildcards");
            }
        }
        Ok(())
    }

    /// The settings as `config check` prints them: a database password is not shown.
    pub fn redacted(&self) -> Config {
        let mut shown = self.clone();
        shown.storage.database = redact_url_password(&shown.storage.database);
        if !shown.server.operator_token.is_empty() {
            shown.server.operator_token = "***".into();
        }
        if !shown.announce.password.is_empty() {
            shown.announce.password = "***".into();
        }
        shown
    }
}

fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let Some((userinfo, host)) = rest.split_once('@') else { return url.to_string() };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_on_one_machine_and_validate() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8700");
        assert!(c.storage.database.starts_with("sqlite://var/octd-trainer/"));
    }

    #[test]
    fn the_shipped_example_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/octd-trainer.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let from_file: Config = toml::from_str(&text).unwrap();
        assert_eq!(serde_json::to_value(from_file).unwrap(), serde_json::to_value(Config::default()).unwrap());
    }

    #[test]
    fn passwords_are_not_printed() {
        let mut c = Config::default();
        c.storage.database = "postgres://octd:s3cret@db:5432/labels".into();
        assert_eq!(c.redacted().storage.database, "postgres://octd:***@db:5432/labels");
    }
}
