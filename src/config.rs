//! Typed settings. Every field has a documented default (see `config/octd.toml`), so an
//! empty file — or no file at all — is a valid configuration that runs end to end.
//!
//! Sources, later ones win: built-in defaults, the TOML file, then environment variables
//! `OCTD_<SECTION>__<KEY>` (for example `OCTD_MQTT__URL=mqtt://broker:1883`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::scan::Priority;

/// Sections that environment overrides may address; anything else in the `OCTD_`
/// namespace (for example test switches) is not configuration.
const SECTIONS: &[&str] = &[
    "device",
    "ingest",
    "deid",
    "model",
    "update",
    "triage",
    "pipeline",
    "store",
    "mqtt",
    "telemetry",
    "feedback",
    "display",
    "uplink",
];

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
    pub device: DeviceConfig,
    pub ingest: IngestConfig,
    pub deid: DeidConfig,
    pub model: ModelConfig,
    pub update: UpdateConfig,
    pub triage: TriageConfig,
    pub pipeline: PipelineConfig,
    pub store: StoreConfig,
    pub mqtt: MqttConfig,
    pub telemetry: TelemetryConfig,
    pub feedback: FeedbackConfig,
    pub display: crate::display::DisplayConfig,
    pub uplink: UplinkConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceConfig {
    /// Clinic identifier, the second level of every MQTT topic.
    pub site: String,
    /// This device's identifier, the third level of every MQTT topic.
    pub id: String,
    /// Holds the store, spool, de-identified artefacts, quarantine and the device secret.
    pub state_dir: PathBuf,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self { site: "local".into(), id: "octd-dev".into(), state_dir: PathBuf::from("var/octd") }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Export folders of the scanner(s).
    pub watch: Vec<PathBuf>,
    /// A file is taken once its size and mtime are unchanged across this interval.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// Full rescan of every folder (missed events, network mounts).
    #[serde(with = "humantime_serde")]
    pub rescan_interval: Duration,
    /// Larger inputs are quarantined unread.
    pub max_file_bytes: u64,
    /// Upper bound on width x height of one frame, checked before any pixel is allocated.
    pub max_frame_pixels: u64,
    /// Upper bound on frames in one DICOM object.
    pub max_frames: u32,
    /// Upper bound on decoded pixel bytes of one input (all frames).
    pub max_decoded_bytes: u64,
    /// Intake stops (and an alarm is raised) while the state directory has less free space.
    pub min_free_bytes: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            watch: vec![PathBuf::from("inbox")],
            settle: Duration::from_secs(2),
            rescan_interval: Duration::from_secs(10),
            max_file_bytes: 1 << 30,
            max_frame_pixels: 8192 * 8192,
            max_frames: 2048,
            max_decoded_bytes: 1 << 30,
            min_free_bytes: 256 << 20,
        }
    }
}

/// A rectangle to black out, in pixels: x, y, width, height.
pub type Rect = [u32; 4];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BurnedInMask {
    /// Matches DICOM Manufacturer (0008,0070), case-insensitive.
    pub manufacturer: String,
    /// Matches ManufacturerModelName (0008,1090), case-insensitive; empty matches any model.
    #[serde(default)]
    pub model: String,
    pub rects: Vec<Rect>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeidConfig {
    /// Pixel masks for scanners that burn identity into the image. A DICOM object with
    /// BurnedInAnnotation = YES and no matching mask is quarantined.
    pub burned_in_masks: Vec<BurnedInMask>,
    /// How long the on-device linkage (scan_id -> original identifiers) is kept.
    #[serde(with = "humantime_serde")]
    pub linkage_retention: Duration,
}

impl Default for DeidConfig {
    fn default() -> Self {
        Self { burned_in_masks: Vec::new(), linkage_retention: Duration::from_secs(365 * 86_400) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BackendKind {
    /// Pure-Rust tract: no native library; what every other choice falls back to.
    Tract,
    /// ONNX Runtime on the CPU (falls back to tract).
    Onnxruntime,
    /// ONNX Runtime with the CUDA provider (falls back to CPU ONNX Runtime, then tract).
    Cuda,
    /// ONNX Runtime with TensorRT (falls back to CUDA, CPU ONNX Runtime, then tract).
    Tensorrt,
    /// The fastest that loads here, the default: the TensorRT chain, so ONNX Runtime
    /// wherever its library is present (JetPack, the .venv wheel) and tract elsewhere. The
    /// default model (depthwise convolutions) takes about 15x longer per B-scan on tract than
    /// on ONNX Runtime (docs/benchmarks.md).
    Auto,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// An unsigned model folder to pin (development only): the daemon then runs it and takes
    /// no updates. Unset (the default), the daemon runs verified bundles from `[update]`.
    pub dir: Option<PathBuf>,
    pub backend: BackendKind,
    /// Inference threads; 0 = every core (tract: one pool shared by the pipeline's workers;
    /// ONNX Runtime on the CPU: each worker's session gets its share of the cores, and a 2-D
    /// scan alone in the pipeline runs on one more session with a thread per core). Set, every
    /// session has that many and there is no such session.
    pub threads: usize,
    /// B-scans per inference call for volumes; 0 = the backend's choice (ONNX Runtime on the
    /// CPU: 1, since a batch costs the same per B-scan there and holds more memory; 8
    /// elsewhere).
    pub batch_size: usize,
    /// Overrides the manifest's review threshold when set.
    pub min_confidence: Option<f32>,
    /// libonnxruntime.so for the ONNX Runtime backends; unset: `ORT_DYLIB_PATH`, then the
    /// system locations, then the development virtualenv's onnxruntime wheel.
    pub onnxruntime_library: Option<PathBuf>,
    /// TensorRT builds FP16 engines (faster); their self-test tolerance widens to 2e-2
    /// (labels must still agree).
    pub fp16: bool,
    /// TensorRT engine cache; unset: `<state_dir>/engine-cache` (one folder per model hash).
    pub engine_cache_dir: Option<PathBuf>,
    /// How many callers classify at once (the daemon: its pipeline workers, at most one per
    /// core): ONNX Runtime on the CPU keeps a session for each, since one session runs one
    /// call at a time.
    #[serde(skip, default = "one")]
    pub concurrency: usize,
}

fn one() -> usize {
    1
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            dir: None,
            backend: BackendKind::Auto,
            threads: 0,
            batch_size: 0,
            min_confidence: None,
            onnxruntime_library: None,
            fp16: true,
            engine_cache_dir: None,
            concurrency: 1,
        }
    }
}

/// Where verified model bundles come from and how a new one earns its place.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpdateConfig {
    /// The model channel (a TUF repository): `https://…`, `http://…`, `file:///…` or a folder.
    pub repository: String,
    /// The provisioned root of trust (root.json) for that channel.
    pub trusted_root: PathBuf,
    /// How often the channel is checked; a notice on MQTT triggers a check at once.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Installed versions kept on disk for rollback (the active one included).
    pub keep_versions: usize,
    /// A new model is committed after this many scans classified without a model failure...
    pub commit_after_scans: u32,
    /// ...or after it has been active this long, whichever comes first.
    #[serde(with = "humantime_serde")]
    pub commit_after: Duration,
    /// Starts with an uncommitted model before it is declared a crash loop and rolled back.
    pub max_boot_attempts: u32,
    /// Largest bundle accepted.
    pub max_bundle_bytes: u64,
    /// A notice on MQTT triggers a check no sooner than this after the last one...
    #[serde(with = "humantime_serde")]
    pub notice_min_interval: Duration,
    /// ...and after a random delay up to this, so a fleet does not check all at once.
    #[serde(with = "humantime_serde")]
    pub notice_jitter: Duration,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        Self {
            repository: "models/channel".into(),
            trusted_root: PathBuf::from("models/channel/metadata/1.root.json"),
            interval: Duration::from_secs(3600),
            keep_versions: 3,
            commit_after_scans: 20,
            commit_after: Duration::from_secs(600),
            max_boot_attempts: 3,
            max_bundle_bytes: 1 << 30,
            notice_min_interval: Duration::from_secs(60),
            notice_jitter: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TriageConfig {
    /// Class name -> priority. Classes not listed are routine.
    pub priorities: BTreeMap<String, Priority>,
    /// Priority of a scan flagged for review, when that is more urgent than its label's.
    pub review_priority: Priority,
}

impl Default for TriageConfig {
    fn default() -> Self {
        let priorities = [
            ("CNV", Priority::Urgent),
            ("DME", Priority::Urgent),
            ("DRUSEN", Priority::FollowUp),
            ("NORMAL", Priority::Routine),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Self { priorities, review_priority: Priority::FollowUp }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Scans processed concurrently. More than the cores, so that one scan's
    /// de-identification and commits overlap another's inference (at most one per core
    /// classifies at a time).
    pub workers: usize,
    /// Claimed scans waiting for a worker; intake pauses when full.
    pub queue_capacity: usize,
    /// A scan in the daemon's hands (de-identified and committed, during inference) each
    /// time the daemon died this many times is quarantined (`poison_scan`) instead of resumed.
    pub max_attempts: u32,
    /// Address-space limit of each decoder worker process. At least one input and its
    /// decoded pixels: `ingest.max_file_bytes + ingest.max_decoded_bytes`.
    pub decoder_memory_bytes: u64,
    /// CPU time one scan may take in the decoder worker.
    #[serde(with = "humantime_serde")]
    pub decoder_cpu_time: Duration,
    /// Wall-clock time one scan may take in the decoder worker.
    #[serde(with = "humantime_serde")]
    pub decoder_timeout: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            queue_capacity: 32,
            max_attempts: 2,
            decoder_memory_bytes: 3 << 30,
            decoder_cpu_time: Duration::from_secs(60),
            decoder_timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Published scans and their de-identified artefacts are pruned after this.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    /// Sealed quarantined originals (and their reasons) are purged after this, counted from
    /// the quarantine; `octd quarantine release` before then puts one back through the pipeline.
    #[serde(with = "humantime_serde")]
    pub quarantine_retention: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(30 * 86_400),
            prune_interval: Duration::from_secs(3600),
            quarantine_retention: Duration::from_secs(30 * 86_400),
        }
    }
}

/// What `octd config check` prints in place of a secret.
pub const REDACTED: &str = "<redacted>";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port`. Empty: start the embedded broker.
    pub url: String,
    /// Where the embedded broker listens: loopback only (it has no TLS).
    pub embedded_listen: SocketAddr,
    /// Address-space limit of the embedded broker's process: a client that floods it with
    /// topics or retained messages exhausts that process (restarted), never octd's.
    pub embedded_memory_bytes: u64,
    /// Defaults to `octd-<device id>`.
    pub client_id: Option<String>,
    /// The login octd uses; with the embedded broker, also the only login it accepts (without
    /// one it accepts any local client: it listens on loopback only).
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM CA bundle for mqtts.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Unacknowledged QoS 1 publishes in flight.
    pub max_inflight: u16,
    #[serde(with = "humantime_serde")]
    pub reconnect_delay: Duration,
    pub topic_prefix: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            embedded_listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            embedded_memory_bytes: 256 * 1024 * 1024,
            client_id: None,
            username: None,
            password: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            keep_alive: Duration::from_secs(15),
            max_inflight: 16,
            reconnect_delay: Duration::from_secs(1),
            topic_prefix: "oct".into(),
        }
    }
}

/// Metrics, health and the systemd watchdog.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `/metrics` (Prometheus), `/healthz`, `/readyz`, `/status` on this address; empty turns
    /// the endpoint off (then `octd status` reads the store, only while the daemon is stopped).
    pub listen: String,
    /// A worker on one scan longer than this means a wedged pipeline: the watchdog stops
    /// pinging (systemd restarts octd) and /healthz fails. Allow for the largest volume.
    #[serde(with = "humantime_serde")]
    pub stuck_after: Duration,
    /// READY=1 waits for the broker at most this long; after it the daemon declares itself
    /// ready without one (results are buffered) and says so in STATUS.
    #[serde(with = "humantime_serde")]
    pub ready_wait: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
            stuck_after: Duration::from_secs(600),
            ready_wait: Duration::from_secs(60),
        }
    }
}

/// Reviewers' verdicts on results, and the live accuracy they give (docs/mqtt.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedbackConfig {
    /// Accept verdicts on `{prefix}/{site}/{device}/labels/{scan_id}`. Only an authenticated
    /// broker with an ACL on that topic makes them trustworthy.
    pub mqtt_labels: bool,
    /// Live accuracy: the most recent verdicts counted.
    pub window: usize,
    /// The accuracy alarm needs at least this many verdicts in the window.
    pub min_labels: u64,
    /// Alarm when live accuracy falls below this (the original design's retrain threshold).
    pub accuracy_floor: f64,
    /// Verdicts accepted per second from MQTT and the CLI together (sustained) ...
    pub labels_per_second: u32,
    /// ... and above it in a burst; more are refused (`rate_limited`).
    pub burst: u32,
    /// Largest verdict payload.
    pub max_payload_bytes: usize,
    /// Longest comment (characters). Comments stay on the device, sealed.
    pub max_comment_chars: usize,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        FeedbackConfig {
            mqtt_labels: true,
            window: 500,
            min_labels: 50,
            accuracy_floor: 0.92,
            labels_per_second: 20,
            burst: 100,
            max_payload_bytes: 8192,
            max_comment_chars: 2000,
        }
    }
}

/// Where confirmed labels go (the cloud trainer's intake). Written by `octd provision`;
/// `octd doctor` checks that it answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UplinkConfig {
    /// The trainer's base URL (`https://…`; the intake is under `/api/v1/`); empty: no uplink.
    pub url: String,
    /// Site policy: off keeps every verdict on the device (it still drives live accuracy).
    pub enabled: bool,
    /// The device identity key `octd provision` writes; requests are signed with it.
    pub identity_key: PathBuf,
    /// CA certificate(s) for a trainer behind a private CA (PEM); unset: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The clinic's pseudonym key (32 bytes or more, the same on every device of the site):
    /// the patient pseudonym is a keyed hash of the DICOM PatientID under it. Unset, or a scan
    /// without a PatientID: the scan is its own group.
    pub site_key_file: Option<PathBuf>,
    /// For scans without a DICOM PatientID (JPEG/PNG/TIFF exports): a regular expression whose
    /// first capture group takes the patient identifier from the original file name, e.g.
    /// `^[A-Z]+_([0-9]{6,10})_` for `SMITH_0012345_OD_3.jpeg`. Hashed like a PatientID.
    pub patient_from_name: String,
    /// Verdicts waiting for delivery at most; an alarm at 90 %, and at the bound new verdicts
    /// are refused (`uplink_full`) rather than dropped.
    pub max_queue: u64,
    /// A scan whose verdict waits for the trainer keeps its artefact this long past
    /// `store.retention`; then it is pruned all the same, with an `uplink_hold_expired` alarm.
    #[serde(with = "humantime_serde")]
    pub max_hold: Duration,
    /// Backoff after a failed delivery: from `retry_min`, doubling, up to `retry_max`, with jitter.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// One request (an image upload included) must finish within this.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            url: String::new(),
            enabled: true,
            identity_key: "/etc/octd/device-identity.pk8".into(),
            ca_file: None,
            site_key_file: None,
            patient_from_name: String::new(),
            max_queue: 100_000,
            max_hold: Duration::from_secs(90 * 24 * 3600),
            retry_min: Duration::from_secs(5),
            retry_max: Duration::from_secs(600),
            timeout: Duration::from_secs(120),
        }
    }
}

impl UplinkConfig {
    /// Whether verdicts are queued for the trainer.
    pub fn active(&self) -> bool {
        self.enabled && !self.url.is_empty()
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
        figment = figment.merge(
            Env::prefixed("OCTD_")
                .split("__")
                // Keys keep the variable's case, e.g. "MQTT.URL".
                .filter(|key| {
                    let head = key.as_str().split(['.', '_']).next().unwrap_or_default();
                    SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(head)) && key.as_str().len() > head.len()
                }),
        );
        let config: Config = figment.extract().map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The settings as `octd config check` prints them: secrets replaced by a placeholder.
    pub fn redacted(&self) -> Config {
        let mut shown = self.clone();
        if shown.mqtt.password.is_some() {
            shown.mqtt.password = Some(REDACTED.into());
        }
        shown
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| Err(ConfigError::Invalid { field, reason: reason.into() });
        let topic_safe = |s: &str| !s.is_empty() && !s.contains(['/', '+', '#']);
        if !topic_safe(&self.device.site) {
            return invalid("device.site", "must be non-empty and contain no '/', '+' or '#'");
        }
        if !topic_safe(&self.device.id) {
            return invalid("device.id", "must be non-empty and contain no '/', '+' or '#'");
        }
        if self.ingest.watch.is_empty() {
            return invalid("ingest.watch", "needs at least one folder");
        }
        if self.mqtt.url.is_empty() && !self.mqtt.embedded_listen.ip().is_loopback() {
            return invalid(
                "mqtt.embedded_listen",
                "the embedded broker has no TLS, so it listens on loopback only; for displays elsewhere on the \
                 clinic network set mqtt.url to a broker with TLS and authentication (e.g. Mosquitto)",
            );
        }
        if self.mqtt.url.is_empty() && self.mqtt.username.is_some() != self.mqtt.password.is_some() {
            return invalid("mqtt.password", "the embedded broker's login needs both mqtt.username and mqtt.password");
        }
        // Watch folders are watched recursively: octd's own spool and quarantine must not be
        // inside one, or it would claim its own files again.
        let state = std::path::absolute(&self.device.state_dir).unwrap_or_else(|_| self.device.state_dir.clone());
        for folder in &self.ingest.watch {
            let folder = std::path::absolute(folder).unwrap_or_else(|_| folder.clone());
            if state.starts_with(&folder) || folder.starts_with(&state) {
                return invalid("ingest.watch", "a watch folder must not contain, or be inside, device.state_dir");
            }
        }
        if self.ingest.settle.is_zero() {
            return invalid("ingest.settle", "must be greater than zero");
        }
        if self.pipeline.workers == 0 || self.pipeline.queue_capacity == 0 {
            return invalid("pipeline", "workers and queue_capacity must be at least 1");
        }
        if self.pipeline.max_attempts == 0 {
            return invalid("pipeline.max_attempts", "must be at least 1");
        }
        let needed = self.ingest.max_file_bytes.saturating_add(self.ingest.max_decoded_bytes);
        if self.pipeline.decoder_memory_bytes < needed {
            return invalid(
                "pipeline.decoder_memory_bytes",
                "must hold one input and its decoded pixels (ingest.max_file_bytes + ingest.max_decoded_bytes)",
            );
        }
        if self.pipeline.decoder_cpu_time.is_zero() || self.pipeline.decoder_timeout.is_zero() {
            return invalid("pipeline", "decoder_cpu_time and decoder_timeout must be greater than zero");
        }
        if let Some(c) = self.model.min_confidence {
            if !(0.0..=1.0).contains(&c) {
                return invalid("model.min_confidence", "must be within 0..1");
            }
        }
        if self.model.dir.is_none() {
            if self.update.repository.trim().is_empty() {
                return invalid("update.repository", "set a model channel, or pin a model with model.dir");
            }
            octd_bundle::Channel::parse(&self.update.repository)
                .map_err(|reason| ConfigError::Invalid { field: "update.repository", reason })?;
        }
        if self.update.keep_versions < 2 {
            return invalid("update.keep_versions", "must be at least 2 (the active model and one to roll back to)");
        }
        if self.update.max_boot_attempts == 0 || self.update.interval.is_zero() {
            return invalid("update", "max_boot_attempts and interval must be greater than zero");
        }
        if self.mqtt.max_inflight == 0 {
            return invalid("mqtt.max_inflight", "must be at least 1");
        }
        if !self.mqtt.url.is_empty() {
            let address = crate::mqtt::BrokerAddress::parse(&self.mqtt.url)
                .map_err(|reason| ConfigError::Invalid { field: "mqtt.url", reason })?;
            if address.tls && self.mqtt.ca_file.is_none() {
                return invalid(
                    "mqtt.ca_file",
                    "mqtts:// needs mqtt.ca_file (the CA that signed the broker's certificate)",
                );
            }
        }
        if self.mqtt.client_cert.is_some() != self.mqtt.client_key.is_some() {
            return invalid("mqtt.client_cert", "client_cert and client_key go together");
        }
        for mask in &self.deid.burned_in_masks {
            if mask.manufacturer.trim().is_empty() || mask.rects.is_empty() {
                return invalid("deid.burned_in_masks", "each mask needs a manufacturer and rects");
            }
        }
        if !self.telemetry.listen.is_empty() && self.telemetry.listen.parse::<SocketAddr>().is_err() {
            return invalid("telemetry.listen", "must be an address like 127.0.0.1:9464, or empty");
        }
        if self.telemetry.stuck_after.is_zero() {
            return invalid("telemetry.stuck_after", "must be greater than zero");
        }
        if let Err(reason) = self.display.address() {
            return Err(ConfigError::Invalid { field: "display.listen", reason });
        }
        if self.display.max_failures == 0 || self.display.logins_per_second == 0 || self.display.session_ttl.is_zero() {
            return invalid(
                "display.max_failures",
                "failures, logins per second and the session's life must be positive",
            );
        }
        if self.feedback.window == 0 {
            return invalid("feedback.window", "must be at least 1");
        }
        if self.feedback.labels_per_second == 0 || self.feedback.burst == 0 {
            return invalid("feedback.labels_per_second", "the rate and the burst must be at least 1");
        }
        if self.feedback.min_labels == 0 || self.feedback.min_labels > self.feedback.window as u64 {
            return invalid("feedback.min_labels", "must be between 1 and feedback.window");
        }
        if !(0.0..=1.0).contains(&self.feedback.accuracy_floor) {
            return invalid("feedback.accuracy_floor", "must be in [0, 1]");
        }
        if self.feedback.max_payload_bytes < 256 {
            return invalid("feedback.max_payload_bytes", "must be at least 256");
        }
        if !self.uplink.patient_from_name.is_empty() {
            match regex::Regex::new(&self.uplink.patient_from_name) {
                Ok(r) if r.captures_len() >= 2 => {}
                Ok(_) => return invalid("uplink.patient_from_name", "needs a capture group around the identifier"),
                Err(_) => return invalid("uplink.patient_from_name", "is not a regular expression"),
            }
        }
        if self.uplink.max_queue == 0
            || self.uplink.retry_min.is_zero()
            || self.uplink.retry_max < self.uplink.retry_min
        {
            return invalid("uplink.max_queue", "the queue must hold at least one verdict, and retry_min <= retry_max");
        }
        if !self.uplink.url.is_empty()
            && !self.uplink.url.starts_with("https://")
            && !self.uplink.url.starts_with("http://")
        {
            return invalid("uplink.url", "must be an http:// or https:// URL");
        }
        if !topic_safe(&self.mqtt.topic_prefix) {
            return invalid("mqtt.topic_prefix", "must be non-empty and contain no '/', '+' or '#'");
        }
        Ok(())
    }

    /// The telemetry endpoint's address, when it is on.
    pub fn telemetry_address(&self) -> Option<SocketAddr> {
        self.telemetry.listen.parse().ok()
    }

    /// The files the settings name must be usable on this machine (the daemon and `octd
    /// config check` ask; provisioning for another root does not). Today: an `mqtts://`
    /// broker's CA file must hold a certificate, or the publisher could never connect while
    /// the device looked ready.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let tls = crate::mqtt::BrokerAddress::parse(&self.mqtt.url).is_ok_and(|a| a.tls);
        if tls {
            check_trust_store(self.mqtt.ca_file.as_deref())?;
        }
        Ok(())
    }

    /// This device's topic names.
    pub fn topics(&self) -> crate::mqtt::Topics {
        crate::mqtt::Topics::new(&self.mqtt.topic_prefix, &self.device.site, &self.device.id)
    }

    pub fn client_id(&self) -> String {
        self.mqtt.client_id.clone().unwrap_or_else(|| format!("octd-{}", self.device.id))
    }
}

/// An `mqtts://` broker needs a CA file that holds at least one PEM certificate: without it
/// the publisher could never connect, and the device would only look ready.
fn check_trust_store(ca_file: Option<&Path>) -> Result<(), ConfigError> {
    let reason = match ca_file {
        None => "mqtts:// needs mqtt.ca_file (the CA that signed the broker's certificate)".to_string(),
        Some(path) => match std::fs::read_to_string(path) {
            Err(e) => format!("mqtt.ca_file {}: {e}", path.display()),
            Ok(pem) if !pem.contains("-----BEGIN CERTIFICATE-----") => {
                format!("mqtt.ca_file {} holds no PEM certificate", path.display())
            }
            Ok(_) => return Ok(()),
        },
    };
    Err(ConfigError::Invalid { field: "mqtt.ca_file", reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("octd.toml");
        std::fs::write(&path, "").unwrap();
        let cfg = Config::load(Some(&path)).unwrap();
        assert_eq!(cfg.ingest.watch, vec![PathBuf::from("inbox")]);
        assert_eq!(cfg.ingest.settle, Duration::from_secs(2));
        assert_eq!(cfg.model.dir, None, "the daemon runs verified bundles unless a model is pinned");
        assert_eq!(cfg.update.repository, "models/channel");
        assert_eq!(cfg.update.interval, Duration::from_secs(3600));
        assert!(cfg.mqtt.url.is_empty(), "no broker configured means the embedded one");
        assert_eq!(cfg.triage.priorities["CNV"], Priority::Urgent);
        assert_eq!(cfg.triage.priorities["DRUSEN"], Priority::FollowUp);
    }

    #[test]
    fn shipped_config_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/octd.toml");
        let cfg = Config::load(Some(&path)).unwrap();
        let defaults = Config::default();
        assert_eq!(cfg.ingest.settle, defaults.ingest.settle);
        assert_eq!(cfg.mqtt.embedded_listen, defaults.mqtt.embedded_listen);
    }

    #[test]
    fn packaged_system_config_parses_with_system_paths() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/octd-system.toml");
        let cfg = Config::load(Some(&path)).unwrap();
        assert_eq!(cfg.device.state_dir, PathBuf::from("/var/lib/octd"));
        assert_eq!(cfg.ingest.watch, vec![PathBuf::from("/srv/octd/inbox")]);
        assert_eq!(cfg.update.trusted_root, PathBuf::from("/etc/octd/root.json"));
        assert_eq!(cfg.telemetry_address(), Some(SocketAddr::from(([127, 0, 0, 1], 9464))));
    }

    #[test]
    fn typos_and_bad_values_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("octd.toml");
        std::fs::write(&path, "[ingest]\nsetle = \"1s\"\n").unwrap();
        assert!(matches!(Config::load(Some(&path)), Err(ConfigError::Parse(_))));
        std::fs::write(&path, "[device]\nsite = \"a/b\"\n").unwrap();
        assert!(matches!(Config::load(Some(&path)), Err(ConfigError::Invalid { field: "device.site", .. })));
        std::fs::write(&path, "[ingest]\nwatch = [\".\"]\n").unwrap();
        assert!(matches!(Config::load(Some(&path)), Err(ConfigError::Invalid { field: "ingest.watch", .. })));
        std::fs::write(&path, "[mqtt]\nurl = \"http://x\"\n").unwrap();
        assert!(matches!(Config::load(Some(&path)), Err(ConfigError::Invalid { field: "mqtt.url", .. })));
        std::fs::write(&path, "[telemetry]\nlisten = \"localhost\"\n").unwrap();
        assert!(matches!(Config::load(Some(&path)), Err(ConfigError::Invalid { field: "telemetry.listen", .. })));
        std::fs::write(&path, "[update]\nrepository = \"ftp://x/y\"\n").unwrap();
        assert!(matches!(Config::load(Some(&path)), Err(ConfigError::Invalid { field: "update.repository", .. })));
        assert!(matches!(Config::load(Some(&dir.path().join("nope.toml"))), Err(ConfigError::Missing(_))));
    }

    #[test]
    fn mqtts_without_a_usable_trust_store_is_a_configuration_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("octd.toml");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&path, "[mqtt]\nurl = \"mqtts://broker:8883\"\n").unwrap();
        assert!(matches!(Config::load(Some(&path)), Err(ConfigError::Invalid { field: "mqtt.ca_file", .. })));
        let with_ca = format!("[mqtt]\nurl = \"mqtts://broker:8883\"\nca_file = \"{}\"\n", ca.display());
        std::fs::write(&path, with_ca).unwrap();
        let config = Config::load(Some(&path)).unwrap();
        assert!(matches!(config.check_files(), Err(ConfigError::Invalid { field: "mqtt.ca_file", .. })));
        std::fs::write(&ca, "not a certificate").unwrap();
        assert!(matches!(config.check_files(), Err(ConfigError::Invalid { field: "mqtt.ca_file", .. })));
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").unwrap();
        assert!(config.check_files().is_ok());
        std::fs::write(&path, "[pipeline]\ndecoder_memory_bytes = 1048576\n").unwrap();
        assert!(matches!(
            Config::load(Some(&path)),
            Err(ConfigError::Invalid { field: "pipeline.decoder_memory_bytes", .. })
        ));
    }
}
