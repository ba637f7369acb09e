//! From a trained candidate to a model on the devices: the gate against the model in use
//! (the newest the channel lists, else `gate.baseline`), then a signed bundle whose self-test
//! cases are holdout images, checked the way a device checks it, published to the channel
//! with the online keys and announced on MQTT so devices fetch it at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use octd_bundle::archive::{self, Limits};
use octd_bundle::repo::{self, Publication};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::blobs::Blobs;
use crate::channel::{key_path, ROLES};
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
    #[error("{0}")]
    Gate(#[from] gate::GateError),
    #[error("{0}")]
    Bundle(String),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// What became of a trained candidate.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// `published` or `rejected`.
    pub state: &'static str,
    pub evaluation: Evaluation,
    /// The published bundle's target, with the channel's new listing.
    pub publication: Option<Value>,
    /// Whether devices were told on MQTT (false: none configured, or the broker failed).
    pub announced: bool,
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
    let sha = archive::sha256_file(&file).map_err(|e| PublishError::Channel(e.to_string()))?;
    if sha != newest.bundle_sha256 {
        return Err(PublishError::Channel(format!("{} does not match its signed hash", file.display())));
    }
    let dest = scratch.join("current");
    let file2 = file.clone();
    let dest2 = dest.clone();
    tokio::task::spawn_blocking(move || archive::unpack(&file2, &dest2, Limits::default()))
        .await
        .map_err(|e| PublishError::Bundle(e.to_string()))?
        .map_err(|e| PublishError::Bundle(format!("{}: {e}", file.display())))?;
    Ok(Some(dest))
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
    let manifest = octd::infer::Manifest::load(candidate).map_err(|e| PublishError::Bundle(e.to_string()))?;
    let bundle = work.join(format!("{}-{}.tar.gz", manifest.name, manifest.version));
    let octd_config = octd::config::Config::default();
    let packed = octd::commands::bundle::pack(
        &octd_config,
        candidate,
        (chosen > 0).then_some(samples.as_path()),
        config.gate.selftest_tolerance,
        &bundle,
    )
    .map_err(PublishError::Bundle)?;
    let check = work.join("selftest-check");
    let _ = std::fs::remove_dir_all(&check);
    let (_, test) =
        archive::unpack(&bundle, &check, Limits::default()).map_err(|e| PublishError::Bundle(e.to_string()))?;
    let classifier = octd::infer::Classifier::load(&check, &octd_config.model, &octd_config.triage)
        .map_err(|e| PublishError::Bundle(format!("the packed bundle does not load: {e}")))?;
    octd::update::selftest::run(&classifier, &check, &test)
        .map_err(|e| PublishError::Bundle(format!("the packed bundle fails its self-test: {e}")))?;
    Ok((bundle, packed))
}

/// Sign and publish the bundle with the online keys.
pub async fn publish(config: &Config, bundle: &Path) -> Result<repo::PublishReport, PublishError> {
    let keys = &config.channel.keys;
    let expires = |d| repo::expires_in(d).map_err(|e| PublishError::Channel(e.to_string()));
    let publication = Publication {
        add: vec![bundle.to_path_buf()],
        withdraw: Vec::new(),
        keys: ROLES[1..].iter().map(|r| key_path(keys, r)).collect(),
        signing_root: None,
        targets_expires: expires(config.channel.targets_expiry)?,
        snapshot_expires: expires(crate::channel::ONLINE_EXPIRY)?,
        timestamp_expires: expires(crate::channel::ONLINE_EXPIRY)?,
    };
    repo::publish(&config.channel.dir, &publication).await.map_err(|e| PublishError::Channel(e.to_string()))
}

/// Tell devices on MQTT that a model is published (QoS 1, waited for its PUBACK). Errors
/// are the caller's to log: the publication stands, devices find it at their next check.
pub async fn announce(config: &AnnounceConfig, notice: &Value) -> Result<(), String> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
    let address = octd::mqtt::BrokerAddress::parse(&config.broker)?;
    let mut options = MqttOptions::new(config.client_id.clone(), address.host, address.port);
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

/// Gate, pack, check, publish, announce. `work` is the job's folder.
pub async fn consider(
    config: &Config,
    blobs: &Blobs,
    labels: &[(LabelRecord, String)],
    candidate: &Path,
    work: &Path,
) -> Result<Outcome, PublishError> {
    let holdout = export_holdout(blobs, labels, &work.join("holdout")).await?;
    let current = current_model(&config.channel.dir, &config.gate.baseline, work).await?;
    let (gate_config, candidate_dir, holdout_for_gate) =
        (config.gate.clone(), candidate.to_path_buf(), holdout.clone());
    let evaluation = tokio::task::spawn_blocking(move || {
        gate::evaluate(&gate_config, &candidate_dir, current.as_deref(), &holdout_for_gate)
    })
    .await
    .map_err(|e| PublishError::Bundle(format!("evaluation: {e}")))??;
    let report = work.join("evaluation.json");
    let text = serde_json::to_vec_pretty(&evaluation).unwrap_or_default();
    std::fs::write(&report, text).map_err(|e| PublishError::Io(report.clone(), e))?;
    tracing::info!(accepted = evaluation.accepted, reason = %evaluation.reason,
        candidate = evaluation.candidate.accuracy.accuracy,
        current = evaluation.current.as_ref().map(|c| c.accuracy.accuracy),
        holdout = evaluation.holdout_images, mcnemar_p = evaluation.mcnemar_p, "evaluation gate");
    if !evaluation.accepted {
        return Ok(Outcome { state: "rejected", evaluation, publication: None, announced: false });
    }
    let (config2, candidate_dir, work_dir) = (config.clone(), candidate.to_path_buf(), work.to_path_buf());
    let packed = tokio::task::spawn_blocking(move || pack_and_check(&config2, &candidate_dir, &holdout, &work_dir))
        .await
        .map_err(|e| PublishError::Bundle(format!("packing: {e}")))?;
    let (bundle, packed) = match packed {
        Ok(p) => p,
        Err(e @ PublishError::Bundle(_)) => {
            // A candidate whose bundle cannot pass a device's checks is rejected, not failed:
            // the model is at fault, not the service.
            let mut evaluation = evaluation;
            evaluation.accepted = false;
            evaluation.reason = e.to_string();
            return Ok(Outcome { state: "rejected", evaluation, publication: None, announced: false });
        }
        Err(e) => return Err(e),
    };
    let report = publish(config, &bundle).await?;
    tracing::info!(target = %packed["target"], listed = ?report.listed, "published to the channel");
    let notice = json!({"schema": "octd.model_notice/1", "name": packed["name"], "version": packed["version"],
                        "target": packed["target"]});
    let announced = if config.announce.broker.is_empty() {
        false
    } else {
        match announce(&config.announce, &notice).await {
            Ok(()) => {
                tracing::info!(topic = %config.announce.topic, "publication announced");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "the publication stands, but devices were not told on MQTT");
                false
            }
        }
    };
    Ok(Outcome {
        state: "published",
        evaluation,
        publication: Some(json!({"bundle": packed, "listed": report.listed})),
        announced,
    })
}
