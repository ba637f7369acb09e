//! From a trained candidate to a model on the devices: the gate against the model in use
//! (the newest the channel lists, else `gate.baseline`), then a signed bundle whose self-test
//! cases are holdout images, checked the way a device checks it, published to the channel
//! with the online keys and announced on MQTT so devices fetch it at once.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use octd_bundle::archive::{self, Limits};
use octd_bundle::repo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::blobs::Blobs;
use crate::config::Config;
use crate::gate::{self, Evaluation, HoldoutImage};
use crate::store::LabelRecord;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnnounceConfig {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`; empty: publications are not announced
    /// (devices find them at their next periodic channel check).
    pub broker: String,
    /// Where devices listen for "a new model is published" (docs/mqtt.md).
    pub topic: String,
    pub client_id: String,
    pub username: String,
    pub password: String,
    /// CA certificate(s) for `mqtts://`.
    pub ca_file: Option<PathBuf>,
    /// An announcement not acknowledged by then is given up (the publication stands).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for AnnounceConfig {
    fn default() -> Self {
        AnnounceConfig {
            broker: String::new(),
            topic: "oct/fleet/models".into(),
            client_id: "octd-trainer".into(),
            username: String::new(),
            password: String::new(),
            ca_file: None,
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    #[error("{0}")]
    Channel(String),
    /// The service could not do its part (disk, channel, the model in use): the job fails.
    #[error("{0}")]
    Service(String),
    /// The candidate is at fault (does not load, wrong version, fails its self-test): it is
    /// rejected.
    #[error("{0}")]
    Candidate(String),
    #[error("the evaluation was cancelled")]
    Cancelled,
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

impl From<gate::GateError> for PublishError {
    fn from(e: gate::GateError) -> Self {
        match e {
            gate::GateError::Candidate(why) => PublishError::Candidate(why),
            gate::GateError::Cancelled => PublishError::Cancelled,
            other => PublishError::Service(other.to_string()),
        }
    }
}

/// What became of a trained candidate; kept as the job's `evaluation.json` and outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// `published` or `rejected`.
    pub state: &'static str,
    pub reason: String,
    /// None when the candidate was rejected before it could be scored.
    pub evaluation: Option<Evaluation>,
    /// The published bundle's target, with the channel's new listing.
    pub publication: Option<Value>,
    /// Whether devices were told on MQTT.
    pub announced: bool,
    /// Why they were not (no broker configured, or the broker's error).
    pub announce_error: Option<String>,
}

impl Outcome {
    fn rejected(reason: String, evaluation: Option<Evaluation>) -> Outcome {
        Outcome { state: "rejected", reason, evaluation, publication: None, announced: false, announce_error: None }
    }

    /// Rejected before it could be scored (it does not load, or carries the wrong version).
    pub fn rejected_early(reason: String) -> Outcome {
        Outcome::rejected(reason, None)
    }
}

/// The candidate, scored against the model in use, and the holdout it was scored on.
pub struct Evaluated {
    pub evaluation: Evaluation,
    pub holdout: Vec<HoldoutImage>,
}

/// The model in use: the newest bundle the channel lists, unpacked into `scratch`; else the
/// baseline folder; else none.
pub async fn current_model(channel: &Path, baseline: &Path, scratch: &Path) -> Result<Option<PathBuf>, PublishError> {
    let listed =
        repo::listed_models(channel).await.map_err(|e| PublishError::Channel(format!("reading the channel: {e}")))?;
    let Some(newest) = listed.into_iter().max_by(|a, b| a.version.cmp(&b.version)) else {
        return Ok(baseline.join("manifest.json").is_file().then(|| baseline.to_path_buf()));
    };
    // Targets are stored under a consistent-snapshot name: `{sha256}.{target}`.
    let file = channel.join(repo::TARGETS_DIR).join(format!("{}.{}", newest.bundle_sha256, newest.target));
    let dest = scratch.join("current");
    let expected = newest.bundle_sha256.clone();
    tokio::task::spawn_blocking(move || {
        let sha = archive::sha256_file(&file).map_err(|e| PublishError::Channel(e.to_string()))?;
        if sha != expected {
            return Err(PublishError::Channel(format!("{} does not match its signed hash", file.display())));
        }
        let _ = std::fs::remove_dir_all(&dest);
        archive::unpack(&file, &dest, Limits::default())
            .map_err(|e| PublishError::Channel(format!("{}: {e}", file.display())))?;
        Ok(Some(dest))
    })
    .await
    .map_err(|e| PublishError::Service(e.to_string()))?
}
/// The holdout labels' images as files in `dir`, with their labels.
pub async fn export_holdout(
    blobs: &Blobs,
    labels: &[(LabelRecord, String)],
    dir: &Path,
) -> Result<Vec<HoldoutImage>, PublishError> {
    std::fs::create_dir_all(dir).map_err(|e| PublishError::Io(dir.to_path_buf(), e))?;
    let mut out = Vec::new();
    for (label, split) in labels {
        if split != "holdout" {
            continue;
        }
        let ext = if label.image_kind == "dcm" { "dcm" } else { "png" };
        let path = dir.join(format!("{}.{ext}", label.image_sha256));
        if !path.exists() {
            let bytes = blobs
                .get_image(&label.image_sha256, ext)
                .await
                .map_err(|e| PublishError::Channel(format!("image {}: {e}", label.image_sha256)))?;
            std::fs::write(&path, bytes).map_err(|e| PublishError::Io(path.clone(), e))?;
        }
        out.push(HoldoutImage { path, label: label.label.clone() });
    }
    // A fixed order, so that the same holdout gives the same report and self-test.
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Pack the candidate with self-test cases from the holdout (PNG images; generated ones if
/// there are none), then check the bundle as a device would: unpack it, load it, reproduce
/// every case within the tolerance.
pub fn pack_and_check(
    config: &Config,
    candidate: &Path,
    holdout: &[HoldoutImage],
    work: &Path,
) -> Result<(PathBuf, Value), PublishError> {
    let samples = work.join("selftest-samples");
    std::fs::create_dir_all(&samples).map_err(|e| PublishError::Io(samples.clone(), e))?;
    let mut chosen = 0;
    for image in holdout.iter().filter(|i| i.path.extension().is_some_and(|e| e == "png")) {
        if chosen >= config.gate.selftest_cases {
            break;
        }
        let to = samples.join(format!("{chosen:03}.png"));
        std::fs::copy(&image.path, &to).map_err(|e| PublishError::Io(to.clone(), e))?;
        chosen += 1;
    }
    let manifest = octd::infer::Manifest::load(candidate).map_err(|e| PublishError::Candidate(e.to_string()))?;
    let bundle = work.join(format!("{}-{}.tar.gz", manifest.name, manifest.version));
    let octd_config = octd::config::Config::default();
    let packed = octd::commands::bundle::pack(
        &octd_config,
        candidate,
        (chosen > 0).then_some(samples.as_path()),
        config.gate.selftest_tolerance,
        &bundle,
    )
    .map_err(PublishError::Service)?;
    let check = work.join("selftest-check");
    let _ = std::fs::remove_dir_all(&check);
    let (_, test) =
        archive::unpack(&bundle, &check, Limits::default()).map_err(|e| PublishError::Service(e.to_string()))?;
    let classifier = octd::infer::Classifier::load(&check, &octd_config.model, &octd_config.triage)
        .map_err(|e| PublishError::Candidate(format!("the packed bundle does not load: {e}")))?;
    octd::update::selftest::run(&classifier, &check, &test)
        .map_err(|e| PublishError::Candidate(format!("the packed bundle fails its self-test: {e}")))?;
    Ok((bundle, packed))
}

/// Sign and publish the bundle with the online keys, holding the channel's lock; refused
/// when the channel already lists this version or a newer one (a publication since the job
/// began).
pub async fn publish(
    config: &Config,
    bundle: &Path,
    version: &semver::Version,
) -> Result<repo::PublishReport, PublishError> {
    let keys = &config.channel.keys;
    let _lock = crate::channel::lock(keys).await.map_err(|e| PublishError::Channel(e.to_string()))?;
    let listed = repo::listed_models(&config.channel.dir)
        .await
        .map_err(|e| PublishError::Channel(format!("reading the channel: {e}")))?;
    if let Some(newest) = listed.iter().map(|m| &m.version).max().filter(|newest| *newest >= version) {
        return Err(PublishError::Candidate(format!("the channel already lists {newest}, not older than {version}")));
    }
    let publication = crate::channel::publication(keys, vec![bundle.to_path_buf()], config.channel.targets_expiry)
        .map_err(|e| PublishError::Channel(e.to_string()))?;
    repo::publish(&config.channel.dir, &publication).await.map_err(|e| PublishError::Channel(e.to_string()))
}

/// Tell devices on MQTT that a model is published (QoS 1, waited for its PUBACK). Errors
/// are the caller's to log: the publication stands, devices find it at their next check.
pub async fn announce(config: &AnnounceConfig, notice: &Value) -> Result<(), String> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
    let address = octd::mqtt::BrokerAddress::parse(&config.broker)?;
    // Two processes announcing at once must not take over each other's session.
    let client_id = format!("{}-{}", config.client_id, uuid::Uuid::new_v4().simple());
    let mut options = MqttOptions::new(client_id, address.host, address.port);
    options.set_keep_alive(Duration::from_secs(10)).set_clean_session(true);
    if !config.username.is_empty() {
        options.set_credentials(config.username.clone(), config.password.clone());
    }
    if address.tls {
        let ca_file = config.ca_file.as_ref().ok_or("mqtts:// needs announce.ca_file")?;
        let ca = std::fs::read(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        options.set_transport(Transport::Tls(TlsConfiguration::Simple { ca, alpn: None, client_auth: None }));
    }
    let (client, mut events) = AsyncClient::new(options, 4);
    let payload = serde_json::to_vec(notice).map_err(|e| e.to_string())?;
    client.publish(config.topic.clone(), QoS::AtLeastOnce, false, payload).await.map_err(|e| e.to_string())?;
    let acked = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.code != rumqttc::ConnectReturnCode::Success => {
                    return Err(format!("the broker refused the connection: {:?}", ack.code))
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    let result = match tokio::time::timeout(config.timeout, acked).await {
        Ok(r) => r,
        Err(_) => Err(format!("no acknowledgement within {} s", config.timeout.as_secs())),
    };
    let _ = client.disconnect().await;
    result
}

/// The gate: the candidate (which must carry the job's name and version) and the model in
/// use score the holdout. Cancelled through `cancel` between images.
pub async fn evaluate_candidate(
    config: &Config,
    blobs: &Blobs,
    labels: &[(LabelRecord, String)],
    candidate: &Path,
    version: &str,
    work: &Path,
    cancel: Arc<AtomicBool>,
) -> Result<Evaluated, PublishError> {
    let manifest = octd::infer::Manifest::load(candidate).map_err(|e| PublishError::Candidate(e.to_string()))?;
    if manifest.version != version || manifest.name != config.jobs.model_name {
        return Err(PublishError::Candidate(format!(
            "the job wrote {} {}; it was asked for {} {version} (jobs.model_name and the version given)",
            manifest.name, manifest.version, config.jobs.model_name
        )));
    }
    let holdout = export_holdout(blobs, labels, &work.join("holdout")).await?;
    let current = {
        let _lock =
            crate::channel::lock(&config.channel.keys).await.map_err(|e| PublishError::Channel(e.to_string()))?;
        current_model(&config.channel.dir, &config.gate.baseline, work).await?
    };
    if current.is_none() && !config.gate.allow_without_baseline {
        return Err(PublishError::Service(format!(
            "no model in use to compare with: the channel lists none and gate.baseline ({}) holds no model; \
             set gate.baseline (or gate.allow_without_baseline to bootstrap)",
            config.gate.baseline.display()
        )));
    }
    let (gate_config, candidate_dir, holdout_for_gate) =
        (config.gate.clone(), candidate.to_path_buf(), holdout.clone());
    let evaluation = tokio::task::spawn_blocking(move || {
        gate::evaluate(&gate_config, &candidate_dir, current.as_deref(), &holdout_for_gate, &cancel)
    })
    .await
    .map_err(|e| PublishError::Service(format!("evaluation: {e}")))??;
    tracing::info!(accepted = evaluation.accepted, reason = %evaluation.reason,
        candidate = evaluation.candidate.accuracy.accuracy,
        current = evaluation.current.as_ref().map(|c| c.accuracy.accuracy),
        holdout = evaluation.holdout_images, mcnemar_p = evaluation.mcnemar_p, "evaluation gate");
    Ok(Evaluated { evaluation, holdout })
}

/// After an accepted evaluation: pack, self-test as a device would, publish, announce. Not
/// cancellable: once it starts, the channel and the job's record must agree.
pub async fn publish_candidate(
    config: &Config,
    candidate: &Path,
    evaluated: Evaluated,
    work: &Path,
) -> Result<Outcome, PublishError> {
    let Evaluated { evaluation, holdout } = evaluated;
    if !evaluation.accepted {
        return Ok(Outcome::rejected(evaluation.reason.clone(), Some(evaluation)));
    }
    let (config2, candidate_dir, work_dir) = (config.clone(), candidate.to_path_buf(), work.to_path_buf());
    let packed = tokio::task::spawn_blocking(move || pack_and_check(&config2, &candidate_dir, &holdout, &work_dir))
        .await
        .map_err(|e| PublishError::Service(format!("packing: {e}")))?;
    let (bundle, packed) = match packed {
        Ok(p) => p,
        Err(PublishError::Candidate(why)) => return Ok(Outcome::rejected(why, Some(evaluation))),
        Err(e) => return Err(e),
    };
    let version = packed["version"]
        .as_str()
        .and_then(|v| semver::Version::parse(v).ok())
        .ok_or_else(|| PublishError::Candidate("the bundle's version is not semantic".into()))?;
    let report = match publish(config, &bundle, &version).await {
        Ok(report) => report,
        Err(PublishError::Candidate(why)) => return Ok(Outcome::rejected(why, Some(evaluation))),
        Err(e) => return Err(e),
    };
    tracing::info!(target = %packed["target"], listed = ?report.listed, "published to the channel");
    let notice = json!({"schema": "octd.model_notice/1", "name": packed["name"], "version": packed["version"],
                        "target": packed["target"]});
    let (announced, announce_error) = if config.announce.broker.is_empty() {
        (false, Some("announce.broker is not set: devices find the model at their next channel check".to_string()))
    } else {
        match announce(&config.announce, &notice).await {
            Ok(()) => {
                tracing::info!(topic = %config.announce.topic, "publication announced");
                (true, None)
            }
            Err(e) => {
                tracing::warn!(error = %e, "the publication stands, but devices were not told on MQTT");
                (false, Some(e))
            }
        }
    };
    Ok(Outcome {
        state: "published",
        reason: evaluation.reason.clone(),
        evaluation: Some(evaluation),
        publication: Some(json!({"bundle": packed, "listed": report.listed})),
        announced,
        announce_error,
    })
}

/// Keep the outcome beside the job's other files.
pub fn keep_report(work: &Path, outcome: &Outcome) -> Result<(), PublishError> {
    let path = work.join("evaluation.json");
    let text = serde_json::to_vec_pretty(outcome).map_err(|e| PublishError::Service(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| PublishError::Io(path.clone(), e))
}
