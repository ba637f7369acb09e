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
use crate::scan::{now_ms, EventKind, LabelRecord, ScanId, ScanRecord};
use crate::secret::DeviceSecret;
use crate::store::{FrozenUpload, Store, StoreError, UplinkState};

/// The trainer's error codes that no retry can change (docs/uplink.md): only these take a
/// verdict off the queue. Anything else — a proxy's page, a wrong path, an outage — is retried.
const FINAL_ERRORS: &[&str] = &[
    "malformed",
    "digest_mismatch",
    "unsupported_type",
    "undecodable",
    "identified",
    "too_large",
    "invalid",
    "revision_conflict",
];
/// A head retried this many times raises `uplink_stalled`.
const STALLED_AFTER: u32 = 10;

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
    patient_from_name: Option<regex::Regex>,
    client: reqwest::Client,
    deid_dir: PathBuf,
    base: String,
    secret: DeviceSecret,
}

impl Uplink {
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        wake: Arc<Notify>,
        secret: DeviceSecret,
    ) -> Result<Uplink, UplinkError> {
        let u = &config.uplink;
        let key = device_key(u)?;
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
        let client = http_client(u)?;
        let patient_from_name = match u.patient_from_name.is_empty() {
            true => None,
            false => Some(
                regex::Regex::new(&u.patient_from_name)
                    .map_err(|e| UplinkError::Settings(format!("uplink.patient_from_name: {e}")))?,
            ),
        };
        Ok(Uplink {
            config: config.clone(),
            store,
            topics: config.topics(),
            wake,
            key,
            site_key,
            patient_from_name,
            client,
            deid_dir: config.device.state_dir.join("deid"),
            base: u.url.trim_end_matches('/').to_string(),
            secret,
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
            // Bounded, so a clock stepped back after the retry was scheduled cannot park it.
            let longest = self.config.uplink.retry_max.mul_f64(1.2).as_millis() as u64;
            let wait = state.next_try_ms.saturating_sub(now_ms()).min(longest);
            if wait > 0 {
                tokio::select! {
                    _ = crate::shutdown::requested(&mut shutdown) => return,
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                }
            }
            let mut state = state;
            let delivery = tokio::select! {
                _ = crate::shutdown::requested(&mut shutdown) => return,
                d = self.deliver(&label, &mut state) => d,
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
                    if attempts == STALLED_AFTER {
                        self.alarm(&label, "uplink_stalled", &format!("{attempts} tries have failed; the last: {why}"))
                            .await;
                    }
                    let next = UplinkState {
                        attempts,
                        next_try_ms: now_ms() + delay.as_millis() as u64,
                        last_error: Some(why),
                        frozen: state.frozen.clone(),
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
            let recorded = match result {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "recording the delivery");
                    false
                }
                Err(e) => {
                    tracing::error!(error = %e, "recording the delivery");
                    false
                }
            };
            if !recorded {
                // A store that cannot write now: do not deliver the same head in a tight loop.
                tokio::select! {
                    _ = crate::shutdown::requested(&mut shutdown) => return,
                    _ = tokio::time::sleep(self.config.uplink.retry_min) => {}
                }
            }
        }
    }

    /// An alarm about one verdict's delivery.
    async fn alarm(&self, label: &LabelRecord, code: &str, detail: &str) {
        let event = crate::scan::EventMessage {
            scan_id: Some(label.scan_id),
            revision: Some(label.revision),
            ..self.topics.event(EventKind::Alarm, code, detail)
        };
        let message = mqtt::event_outbox(&self.topics, &event);
        let (store, wake) = (self.store.clone(), self.wake.clone());
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = store.enqueue(&message) {
                tracing::error!(error = %e, "cannot queue the uplink alarm");
            }
            wake.notify_one();
        })
        .await;
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

    /// The upload, built at the first attempt and kept (with the queue entry) so every retry
    /// sends the same bytes; and the image it was built from, for that first attempt to send
    /// (a JPEG artefact's PNG is encoded once, not again to send it).
    async fn freeze(&self, label: &LabelRecord) -> Result<(FrozenUpload, Vec<u8>), Delivery> {
        let store = self.store.clone();
        let scan_id = label.scan_id;
        let (scan, linkage) =
            match tokio::task::spawn_blocking(move || (store.get(scan_id), store.linkage(scan_id))).await {
                Ok((Ok(Some(scan)), Ok(linkage))) => (scan, linkage),
                Ok((Ok(None), _)) => return Err(Delivery::Refused("the scan is no longer on the device".into())),
                Ok((Err(e), _)) | Ok((_, Err(e))) => return Err(Delivery::Retry(format!("store: {e}"))),
                Err(e) => return Err(Delivery::Retry(e.to_string())),
            };
        let image = self.artefact(&scan).await?;
        let kind = kind_of(&scan);
        let image_sha256 = sha256_hex(&image);
        // The DICOM PatientID, else the clinic's pattern on the original file name.
        let patient_id = linkage.as_ref().and_then(|l| {
            l.identifiers.get("PatientID").filter(|p| !p.trim().is_empty()).cloned().or_else(|| {
                let pattern = self.patient_from_name.as_ref()?;
                pattern.captures(&l.original_name)?.get(1).map(|m| m.as_str().to_string())
            })
        });
        let patient = self.patient(patient_id.as_deref(), scan.scan_id);
        let upload = upload_body(label, &scan, &image_sha256, kind, patient);
        let body = serde_json::to_string(&upload)
            .map_err(|e| Delivery::Refused(format!("the label cannot be encoded: {e}")))?;
        Ok((FrozenUpload { body, image_sha256, image_kind: kind.extension().into(), image_done: false }, image))
    }

    async fn artefact(&self, scan: &ScanRecord) -> Result<Vec<u8>, Delivery> {
        let Some(artifact) = scan.artifact.clone() else {
            return Err(Delivery::Refused("the scan has no de-identified artefact".into()));
        };
        match tokio::fs::read(self.deid_dir.join(&artifact)).await {
            // The contract carries PNG and DICOM: a JPEG kept byte for byte on the device goes
            // up as the same pixels in PNG (the same bytes at every retry: one encoder, one
            // setting).
            Ok(bytes) if artifact.ends_with(".jpg") => {
                match tokio::task::spawn_blocking(move || crate::deid::png_of_jpeg(&bytes)).await {
                    Ok(Ok(png)) => Ok(png),
                    Ok(Err(e)) => Err(Delivery::Refused(format!("the de-identified artefact does not decode: {e}"))),
                    Err(e) => Err(Delivery::Retry(e.to_string())),
                }
            }
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Delivery::Refused("the de-identified artefact is no longer on the device".into()))
            }
            Err(e) => Err(Delivery::Retry(format!("reading the artefact: {e}"))),
        }
    }

    /// The image (unless the trainer has it), then the label revision, as frozen in `state`.
    async fn deliver(&self, label: &LabelRecord, state: &mut UplinkState) -> Delivery {
        let mut just_frozen = None;
        if state.frozen.is_none() {
            match self.freeze(label).await {
                Ok((frozen, image)) => {
                    state.frozen = Some(frozen);
                    just_frozen = Some(image);
                }
                Err(d) => return d,
            }
        }
        let Some(frozen) = state.frozen.clone() else { return Delivery::Retry("no upload".into()) };
        let scan_ref = self.scan_reference(label.scan_id);
        if !frozen.image_done {
            let store = self.store.clone();
            let scan_id = label.scan_id;
            let scan = match tokio::task::spawn_blocking(move || store.get(scan_id)).await {
                Ok(Ok(Some(scan))) => scan,
                Ok(Ok(None)) => return Delivery::Refused("the scan is no longer on the device".into()),
                Ok(Err(e)) => return Delivery::Retry(format!("store: {e}")),
                Err(e) => return Delivery::Retry(e.to_string()),
            };
            // Frozen in this call: the very bytes hashed. Otherwise read again, and checked.
            let image = match just_frozen {
                Some(image) => image,
                None => {
                    let image = match self.artefact(&scan).await {
                        Ok(image) => image,
                        Err(d) => return d,
                    };
                    if sha256_hex(&image) != frozen.image_sha256 {
                        // A JPEG artefact goes up as PNG, encoded at each attempt: a newer octd
                        // may encode the same pixels into other bytes. Nothing of this revision
                        // has been accepted yet, so it is built again rather than lost.
                        if scan.artifact.as_deref().is_some_and(|a| a.ends_with(".jpg")) {
                            state.frozen = None;
                            return Delivery::Retry(
                                "the artefact's PNG encoding changed; the upload is built again".into(),
                            );
                        }
                        return Delivery::Refused(
                            "the de-identified artefact changed since the verdict was queued".into(),
                        );
                    }
                    image
                }
            };
            match self
                .put(
                    &format!("/api/v1/images/{}", frozen.image_sha256),
                    kind_of(&scan).content_type(),
                    image,
                    &["stored", "present"],
                )
                .await
            {
                Delivery::Done => {
                    if let Some(f) = state.frozen.as_mut() {
                        f.image_done = true;
                    }
                }
                other => return other,
            }
        }
        let path = format!("/api/v1/labels/{scan_ref}/{}", label.revision);
        self.put(&path, "application/json", frozen.body.into_bytes(), &["stored", "unchanged"]).await
    }

    /// What the trainer calls the scan: a keyed hash of its id, since the id (UUIDv7) holds
    /// the time the scan arrived.
    fn scan_reference(&self, scan_id: ScanId) -> String {
        let mac = self.secret.mac("octd uplink scan reference v1", scan_id.to_string().as_bytes());
        format!("s-{}", hex::encode(&mac[..12]))
    }

    /// The patient's pseudonym: a keyed hash of the PatientID under the site's key (every
    /// device of the clinic agrees), or the scan as its own group.
    fn patient(&self, patient_id: Option<&str>, scan_id: ScanId) -> String {
        match (&self.site_key, patient_id.filter(|p| !p.trim().is_empty())) {
            (Some(key), Some(id)) => {
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
                    .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
                mac.update(b"octd patient pseudonym v1\0");
                mac.update(id.trim().as_bytes());
                let digest = mac.finalize().into_bytes();
                format!("p-{}", hex::encode(&digest[..12]))
            }
            _ => format!("scan-{}", self.scan_reference(scan_id)),
        }
    }

    /// One signed PUT. Delivered only when the intake says so (`expected` statuses); refused
    /// only for the intake's own final error codes; anything else is retried.
    async fn put(&self, path: &str, content_type: &str, body: Vec<u8>, expected: &[&str]) -> Delivery {
        let nonce = format!("{:032x}", rand::rng().random::<u128>());
        let now = (now_ms() / 1000) as i64;
        let headers = self.key.sign("PUT", path, content_type, &body, now, &nonce);
        let mut request = self.client.put(format!("{}{path}", self.base)).header("content-type", content_type);
        for (name, value) in headers.pairs() {
            request = request.header(name, value);
        }
        let mut response = match request.body(body).send().await {
            Ok(r) => r,
            Err(e) => return Delivery::Retry(format!("{path}: {e}")),
        };
        let status = response.status();
        // The intake answers a few bytes of JSON; whatever else answers is read no further.
        let mut bytes = Vec::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            if bytes.len() + chunk.len() > 64 << 10 {
                break;
            }
            bytes.extend_from_slice(&chunk);
        }
        let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        let field = |k: &str| answer.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        if status.is_success() {
            return match expected.contains(&field("status").as_str()) {
                true => Delivery::Done,
                false => Delivery::Retry(format!("{path}: {status} without the intake's answer (a proxy?)")),
            };
        }
        let code = field("error");
        let final_refusal = status.is_client_error() && FINAL_ERRORS.contains(&code.as_str());
        match final_refusal {
            true => Delivery::Refused(format!("the trainer answered {status} {code}")),
            false => Delivery::Retry(format!("{path}: {status} {code}")),
        }
    }
}

fn kind_of(scan: &ScanRecord) -> ImageKind {
    match scan.artifact.as_deref().is_some_and(|a| a.ends_with(".dcm")) {
        true => ImageKind::Dicom,
        false => ImageKind::Png,
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
        withdrawn: label.withdrawn,
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

/// The device identity key that signs requests, with the key id the trainer enrolled.
pub fn device_key(u: &crate::config::UplinkConfig) -> Result<DeviceKey, UplinkError> {
    let key_path = &u.identity_key;
    let pkcs8 = std::fs::read(key_path)
        .map_err(|e| UplinkError::Settings(format!("uplink.identity_key {}: {e}", key_path.display())))?;
    let key_id = identity_key_id(key_path)?;
    DeviceKey::from_pkcs8(&pkcs8, &key_id)
        .map_err(|e| UplinkError::Settings(format!("uplink.identity_key {}: {e}", key_path.display())))
}

/// The HTTP client for the trainer: a read timeout, not a total one (a large volume on a
/// slow clinic link may take its time as long as bytes move); redirects not followed (the
/// intake never sends one, a proxy or portal does); `uplink.ca_file` for a private CA.
pub fn http_client(u: &crate::config::UplinkConfig) -> Result<reqwest::Client, UplinkError> {
    let mut builder = reqwest::Client::builder()
        .read_timeout(u.timeout)
        .connect_timeout(Duration::from_secs(15))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca) = &u.ca_file {
        let pem =
            std::fs::read(ca).map_err(|e| UplinkError::Settings(format!("uplink.ca_file {}: {e}", ca.display())))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| UplinkError::Settings(format!("uplink.ca_file {}: {e}", ca.display())))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| UplinkError::Settings(format!("HTTP client: {e}")))
}

/// Prove the uplink end to end: a signed request the trainer must authenticate. Returns the
/// site and device the trainer enrolled this key as.
pub async fn prove(u: &crate::config::UplinkConfig) -> Result<(String, String), String> {
    let key = device_key(u).map_err(|e| e.to_string())?;
    let client = http_client(u).map_err(|e| e.to_string())?;
    let path = "/api/v1/device";
    let nonce = format!("{:032x}", rand::rng().random::<u128>());
    let headers = key.sign("GET", path, "", b"", (now_ms() / 1000) as i64, &nonce);
    let mut request = client.get(format!("{}{path}", u.url.trim_end_matches('/')));
    for (name, value) in headers.pairs() {
        request = request.header(name, value);
    }
    let response = request.send().await.map_err(|e| format!("{}: {e}", u.url))?;
    let status = response.status();
    let bytes = response.bytes().await.unwrap_or_default();
    let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let text = |k: &str| answer.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
    match status.is_success() {
        true => Ok((text("site"), text("device"))),
        false => Err(format!("the trainer answered {status} {}: {}", text("error"), text("message"))),
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
