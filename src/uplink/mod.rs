//! Beside the pipeline: confirmed verdicts to the trainer's intake (docs/uplink.md). The
//! queue is in the store (a verdict enters it in its own transaction); this task delivers its
//! head — the de-identified artefact as octd holds it, then the label revision — signed with
//! the device identity key, in order, retried with exponential backoff and jitter across
//! restarts and trainer outages of any length. A refusal that no retry can change (the
//! trainer says the upload is invalid) takes the verdict off the queue with an alarm, kept in
//! the store with its reason; nothing is dropped silently.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use octd_uplink::{sha256_hex, DeviceKey, ImageKind, LabelUpload, ModelStamp, Prediction, LABEL_SCHEMA};
use rand::Rng;
use sha2::Sha256;
use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::mqtt::{self, Topics};
use crate::scan::{now_ms, EventKind, LabelRecord, ScanRecord};
use crate::store::{Store, StoreError, UplinkState};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UplinkError {
    #[error("uplink setting: {0}")]
    Settings(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// How one delivery ended.
enum Delivery {
    Done,
    /// Try again later (network, 5xx, 429, the trainer not knowing the device yet).
    Retry(String),
    /// The trainer will never take this upload as it is.
    Refused(String),
}

pub struct Uplink {
    config: Config,
    store: Arc<Store>,
    topics: Topics,
    wake: Arc<Notify>,
    key: DeviceKey,
    site_key: Option<Vec<u8>>,
    client: reqwest::Client,
    deid_dir: PathBuf,
    base: String,
}

impl Uplink {
    pub fn new(config: &Config, store: Arc<Store>, wake: Arc<Notify>) -> Result<Uplink, UplinkError> {
        let u = &config.uplink;
        let key_path = &u.identity_key;
        let pkcs8 = std::fs::read(key_path)
            .map_err(|e| UplinkError::Settings(format!("uplink.identity_key {}: {e}", key_path.display())))?;
        let key_id = identity_key_id(key_path)?;
        let key = DeviceKey::from_pkcs8(&pkcs8, &key_id)
            .map_err(|e| UplinkError::Settings(format!("uplink.identity_key {}: {e}", key_path.display())))?;
        let site_key = match &u.site_key_file {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| UplinkError::Settings(format!("uplink.site_key_file {}: {e}", path.display())))?;
                if bytes.len() < 32 {
                    return Err(UplinkError::Settings("uplink.site_key_file must hold at least 32 bytes".into()));
                }
                Some(bytes)
            }
            None => None,
        };
        let mut builder = reqwest::Client::builder().timeout(u.timeout).connect_timeout(Duration::from_secs(15));
        if let Some(ca) = &u.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| UplinkError::Settings(format!("uplink.ca_file {}: {e}", ca.display())))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| UplinkError::Settings(format!("uplink.ca_file {}: {e}", ca.display())))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| UplinkError::Settings(format!("HTTP client: {e}")))?;
        Ok(Uplink {
            config: config.clone(),
            store,
            topics: config.topics(),
            wake,
            key,
            site_key,
            client,
            deid_dir: config.device.state_dir.join("deid"),
            base: u.url.trim_end_matches('/').to_string(),
        })
    }

    /// Deliver the queue's head, again and again, until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>, pending: Arc<Notify>) {
        let mut backlog_alarm = false;
        loop {
            let store = self.store.clone();
            let head = tokio::task::spawn_blocking(move || store.uplink_head().map(|h| (h, store.uplink_len())))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            let (head, queued) = match head {
                Ok((head, len)) => (head, len.unwrap_or(0)),
                Err(e) => {
                    tracing::error!(error = %e, "reading the uplink queue");
                    (None, 0)
                }
            };
            backlog_alarm = self.follow_backlog(queued, backlog_alarm).await;
            let Some((label, state)) = head else {
                tokio::select! {
                    _ = crate::shutdown::requested(&mut shutdown) => return,
                    _ = pending.notified() => continue,
                    _ = tokio::time::sleep(Duration::from_secs(30)) => continue,
                }
            };
            let wait = state.next_try_ms.saturating_sub(now_ms());
            if wait > 0 {
                tokio::select! {
                    _ = crate::shutdown::requested(&mut shutdown) => return,
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                }
            }
            let delivery = tokio::select! {
                _ = crate::shutdown::requested(&mut shutdown) => return,
                d = self.deliver(&label) => d,
            };
            let seq = label.seq;
            let store = self.store.clone();
            let result = match delivery {
                Delivery::Done => {
                    tracing::info!(scan_id = %label.scan_id, revision = label.revision, "verdict delivered to the trainer");
                    tokio::task::spawn_blocking(move || store.uplink_delivered(seq)).await
                }
                Delivery::Retry(why) => {
                    let attempts = state.attempts.saturating_add(1);
                    let delay = self.backoff(attempts);
                    tracing::warn!(scan_id = %label.scan_id, revision = label.revision, attempts, retry_in_ms = delay.as_millis() as u64,
                        error = %why, "verdict not delivered; retrying");
                    let next = UplinkState {
                        attempts,
                        next_try_ms: now_ms() + delay.as_millis() as u64,
                        last_error: Some(why),
                    };
                    tokio::task::spawn_blocking(move || store.uplink_retry(seq, &next)).await
                }
                Delivery::Refused(why) => {
                    tracing::error!(scan_id = %label.scan_id, revision = label.revision, reason = %why,
                        "the trainer refused the verdict; it is kept on the device");
                    let event = crate::scan::EventMessage {
                        scan_id: Some(label.scan_id),
                        revision: Some(label.revision),
                        ..self.topics.event(EventKind::Alarm, "uplink_refused", &why)
                    };
                    let message = mqtt::event_outbox(&self.topics, &event);
                    let wake = self.wake.clone();
                    tokio::task::spawn_blocking(move || {
                        let r = store.uplink_refused(seq, &why, &message);
                        wake.notify_one();
                        r
                    })
                    .await
                }
            };
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "recording the delivery"),
                Err(e) => tracing::error!(error = %e, "recording the delivery"),
            }
        }
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let u = &self.config.uplink;
        let doubled = u.retry_min.saturating_mul(1u32 << attempts.saturating_sub(1).min(16));
        let capped = doubled.min(u.retry_max);
        // ±20 % so that a clinic's devices do not retry in step after an outage.
        let jitter = rand::rng().random_range(0.8..1.2);
        capped.mul_f64(jitter)
    }

    /// Raise the backlog alarm at 90 % of `uplink.max_queue`, clear it below 80 %.
    async fn follow_backlog(&self, queued: u64, raised: bool) -> bool {
        let max = self.config.uplink.max_queue;
        let (raise, clear) = (queued * 10 >= max * 9, queued * 10 < max * 8);
        let kind = match (raised, raise, clear) {
            (false, true, _) => EventKind::Alarm,
            (true, _, true) => EventKind::AlarmCleared,
            _ => return raised,
        };
        let detail = format!("{queued} verdicts wait for the trainer (uplink.max_queue {max})");
        tracing::warn!(queued, max, raised = (kind == EventKind::Alarm), "uplink backlog");
        let message = mqtt::event_outbox(&self.topics, &self.topics.event(kind, "uplink_backlog", &detail));
        let (store, wake) = (self.store.clone(), self.wake.clone());
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = store.enqueue(&message) {
                tracing::error!(error = %e, "cannot queue the uplink backlog alarm");
            }
            wake.notify_one();
        })
        .await;
        kind == EventKind::Alarm
    }

    /// The image (if the trainer lacks it), then the label revision.
    async fn deliver(&self, label: &LabelRecord) -> Delivery {
        let store = self.store.clone();
        let scan_id = label.scan_id;
        let scan = match tokio::task::spawn_blocking(move || (store.get(scan_id), store.linkage(scan_id))).await {
            Ok((Ok(Some(scan)), linkage)) => (scan, linkage.ok().flatten()),
            Ok((Ok(None), _)) => return Delivery::Refused("the scan is no longer on the device".into()),
            Ok((Err(e), _)) => return Delivery::Retry(format!("store: {e}")),
            Err(e) => return Delivery::Retry(e.to_string()),
        };
        let (scan, linkage) = scan;
        let Some(artifact) = scan.artifact.clone() else {
            return Delivery::Refused("the scan has no de-identified artefact".into());
        };
        let path = self.deid_dir.join(&artifact);
        let image = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) => return Delivery::Refused(format!("the de-identified artefact cannot be read: {e}")),
        };
        let kind = if artifact.ends_with(".dcm") { ImageKind::Dicom } else { ImageKind::Png };
        let sha = sha256_hex(&image);
        let patient_id = linkage.as_ref().and_then(|l| l.identifiers.get("PatientID").cloned());
        let upload = upload_body(label, &scan, &sha, kind, self.patient(patient_id.as_deref(), &scan));
        let body = match serde_json::to_vec(&upload) {
            Ok(b) => b,
            Err(e) => return Delivery::Refused(format!("the label cannot be encoded: {e}")),
        };
        match self.put(&format!("/api/v1/images/{sha}"), kind.content_type(), image).await {
            Delivery::Done => {}
            other => return other,
        }
        self.put(&format!("/api/v1/labels/{}/{}", label.scan_id, label.revision), "application/json", body).await
    }

    /// The patient's pseudonym: a keyed hash of the PatientID under the site's key (every
    /// device of the clinic agrees), or the scan as its own group.
    fn patient(&self, patient_id: Option<&str>, scan: &ScanRecord) -> String {
        match (&self.site_key, patient_id.filter(|p| !p.trim().is_empty())) {
            (Some(key), Some(id)) => {
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
                    .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
                mac.update(b"octd patient pseudonym v1\0");
                mac.update(id.trim().as_bytes());
                let digest = mac.finalize().into_bytes();
                format!("p-{}", hex::encode(&digest[..12]))
            }
            _ => format!("scan-{}", scan.scan_id),
        }
    }

    async fn put(&self, path: &str, content_type: &str, body: Vec<u8>) -> Delivery {
        let nonce = format!("{:032x}", rand::rng().random::<u128>());
        let now = (now_ms() / 1000) as i64;
        let headers = self.key.sign("PUT", path, content_type, &body, now, &nonce);
        let mut request = self.client.put(format!("{}{path}", self.base)).header("content-type", content_type);
        for (name, value) in headers.pairs() {
            request = request.header(name, value);
        }
        let response = match request.body(body).send().await {
            Ok(r) => r,
            Err(e) => return Delivery::Retry(format!("{path}: {e}")),
        };
        let status = response.status();
        if status.is_success() {
            return Delivery::Done;
        }
        let text: String = response.text().await.unwrap_or_default().chars().take(300).collect();
        let why = format!("{path}: {status} {text}");
        match status.as_u16() {
            // Not enrolled yet, revoked, a clock off, a replayed nonce, rate, an outage: an
            // operator or time can fix these.
            401 | 403 | 408 | 429 => Delivery::Retry(why),
            409 if text.contains("image_missing") => Delivery::Retry(why),
            s if s >= 500 => Delivery::Retry(why),
            _ => Delivery::Refused(why),
        }
    }
}

/// The upload of one revision: only de-identified facts (no dates of the scan, no comment,
/// no names), the same bytes at every retry so the trainer's idempotency holds.
fn upload_body(
    label: &LabelRecord,
    scan: &ScanRecord,
    image_sha256: &str,
    kind: ImageKind,
    patient: String,
) -> LabelUpload {
    let model = scan.model.clone();
    LabelUpload {
        schema: LABEL_SCHEMA.into(),
        label: label.label.clone(),
        prediction: Prediction {
            label: label.predicted.clone(),
            probabilities: scan
                .probabilities
                .as_ref()
                .map(|p| p.iter().map(|(k, v)| (k.clone(), f64::from(*v))).collect())
                .unwrap_or_default(),
        },
        model: ModelStamp {
            name: model.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
            version: label.model_version.clone(),
            sha256: model.map(|m| m.sha256).unwrap_or_default(),
        },
        reviewer: label.reviewer.clone(),
        reviewed_at: label.reviewed_at.clone(),
        laterality: match scan.laterality.as_deref() {
            Some("R") => "R".into(),
            Some("L") => "L".into(),
            _ => String::new(),
        },
        patient,
        image_sha256: image_sha256.into(),
        image_kind: kind,
    }
}

/// The key id the trainer enrolled: from `device-identity.pub.json` beside the key.
fn identity_key_id(key: &std::path::Path) -> Result<String, UplinkError> {
    let public = key.with_file_name("device-identity.pub.json");
    let text = std::fs::read(&public)
        .map_err(|e| UplinkError::Settings(format!("{} (written by octd provision): {e}", public.display())))?;
    let identity: octd_uplink::DeviceIdentity =
        serde_json::from_slice(&text).map_err(|e| UplinkError::Settings(format!("{}: {e}", public.display())))?;
    Ok(identity.keyid)
}
