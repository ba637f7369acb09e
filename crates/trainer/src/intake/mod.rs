//! The intake API the devices use (docs/uplink.md): images by content hash, then label
//! revisions that refer to them. Every request is signed by an enrolled device's identity
//! key; unknown keys get 401, revoked devices 403, stale or replayed requests 401, a device
//! over its rate 429. Nothing with patient identity is accepted.

pub mod content;

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, OriginalUri, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use octd_uplink::{ImageKind, LabelUpload, SignedHeaders, LABEL_SCHEMA};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::blobs::Blobs;
use crate::config::IntakeConfig;
use crate::now_ms;
use crate::operator::IntakeMetrics;
use crate::store::{Device, ImageRecord, LabelRecord, LabelWrite, Store};

/// A refusal as the device sees it: a status, a stable code and a sentence.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), retry_after_s: None }
    }

    fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %e, "{what}");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("{what} failed; try again later"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({"error": self.code, "message": self.message}))).into_response();
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.max(1).to_string()) {
                response.headers_mut().insert("retry-after", v);
            }
        }
        response
    }
}

/// A request that proved itself: its device, and its body with the hash it was checked
/// against (so nothing hashes a body twice).
struct Authenticated {
    device: Device,
    body: Bytes,
    body_sha256: String,
}

pub struct Intake {
    store: Store,
    blobs: Blobs,
    config: IntakeConfig,
    holdout_key: [u8; 32],
    limiter: DefaultKeyedRateLimiter<String>,
    /// Requests with a key that has not signed a request correctly yet, all together.
    anonymous: DefaultDirectRateLimiter,
    /// Keys that have signed a request correctly (at most one per enrolled device).
    proven: std::sync::Mutex<std::collections::HashSet<String>>,
    metrics: IntakeMetrics,
}

impl Intake {
    /// `holdout_key` keys the patient split, so nobody can steer a patient into the holdout.
    pub fn new(
        store: Store,
        blobs: Blobs,
        config: IntakeConfig,
        holdout_key: [u8; 32],
        metrics: IntakeMetrics,
    ) -> Intake {
        let per_minute = NonZeroU32::new(config.requests_per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN);
        let limiter = RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst));
        let anonymous_rate = NonZeroU32::new(config.unauthenticated_per_second).unwrap_or(NonZeroU32::MIN);
        let anonymous = RateLimiter::direct(Quota::per_second(anonymous_rate));
        Intake { store, blobs, config, holdout_key, limiter, anonymous, proven: Default::default(), metrics }
    }

    /// Everything that needs no body first — headers, device, time, signature (it covers
    /// the declared body hash), the device's rate, the nonce — then the body, bounded, against
    /// its signed hash. Nothing unauthenticated is buffered, and only verified requests
    /// count against a device's rate.
    async fn authenticate(
        &self,
        method: &Method,
        uri: &OriginalUri,
        headers: &HeaderMap,
        body: Body,
        limit: u64,
    ) -> Result<Authenticated, ApiError> {
        let unauthorized = |code, msg: String| ApiError::new(StatusCode::UNAUTHORIZED, code, msg);
        let signed = SignedHeaders::parse(|name| headers.get(name).and_then(|v| v.to_str().ok()))
            .map_err(|e| unauthorized("unsigned", format!("{e} (see docs/uplink.md)")))?;
        // Keys that never proved themselves cost a query each: they share one budget, so a
        // flood of invented key ids cannot occupy the database.
        let proven = self.proven.lock().map(|k| k.contains(&signed.key_id)).unwrap_or(false);
        if !proven && self.anonymous.check().is_err() {
            return Err(self.rate_limited("too many requests from unauthenticated clients", 1));
        }
        let device = self
            .store
            .device_by_key(&signed.key_id)
            .await
            .map_err(|e| ApiError::internal("device lookup", e))?
            .ok_or_else(|| {
                unauthorized("unknown_device", format!("no device is enrolled with key {}", signed.key_id))
            })?;
        if device.revoked_at.is_some() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "revoked",
                format!("device {}/{} has been revoked", device.site, device.device),
            ));
        }
        let now_s = now_ms() / 1000;
        let skew = self.config.clock_skew.as_secs();
        if now_s.abs_diff(signed.timestamp) > skew {
            return Err(unauthorized(
                "stale",
                format!("timestamp {} is more than {skew} s from the server's clock {now_s}", signed.timestamp),
            ));
        }
        let public = hex::decode(&device.public_key).map_err(|e| ApiError::internal("stored key", e))?;
        let path = uri.0.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        signed
            .verify(&public, method.as_str(), path, content_type)
            .map_err(|e| unauthorized("bad_signature", e.to_string()))?;
        if !proven {
            if let Ok(mut keys) = self.proven.lock() {
                keys.insert(signed.key_id.clone());
            }
        }
        if let Err(not_until) = self.limiter.check_key(&device.key_id) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(self.rate_limited(
                &format!("more than {} requests a minute from this device", self.config.requests_per_minute),
                wait.as_secs() + 1,
            ));
        }
        // Nonces are kept a minute longer than a request can be valid, for replicas whose
        // clocks differ a little.
        let forget_before_ms = (now_s - 2 * skew as i64 - 60) * 1000;
        let fresh = self
            .store
            .use_nonce(&device.key_id, &signed.nonce, forget_before_ms)
            .await
            .map_err(|e| ApiError::internal("nonce check", e))?;
        if !fresh {
            return Err(unauthorized("replayed", "this request was seen before".into()));
        }
        let body = axum::body::to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX)).await.map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body is over {limit} bytes, or was cut off"),
            )
        })?;
        signed.check_body(&body).map_err(|e| unauthorized("bad_signature", e.to_string()))?;
        Ok(Authenticated { device, body, body_sha256: signed.content_sha256 })
    }

    fn rate_limited(&self, why: &str, retry_after_s: u64) -> ApiError {
        let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", why);
        e.retry_after_s = Some(retry_after_s);
        e
    }

    fn holdout(&self, site: &str, device: &str, patient: &str) -> bool {
        let mut h = Sha256::new();
        h.update(self.holdout_key);
        // A site-keyed pseudonym (`p-…`) names the same patient on every device of the site:
        // one split for all of them, or a patient seen on two devices would straddle it.
        let device = if crate::site_wide_patient(patient) { "" } else { device };
        for part in [site, device, patient] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        let digest = h.finalize();
        let x = u64::from_be_bytes([
            digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
        ]);
        (x as f64 / u64::MAX as f64) < self.config.holdout_fraction
    }
}

pub fn router(intake: Arc<Intake>) -> Router {
    let slots = intake.config.max_concurrent_requests;
    Router::new()
        .route("/api/v1/images/:sha256", put(put_image))
        .route("/api/v1/labels/:scan_id/:revision", put(put_label))
        .route("/api/v1/device", get(whoami))
        // Uploads share a bounded number of slots; health, metrics and the channel do not wait for them.
        .layer(tower::limit::ConcurrencyLimitLayer::new(slots))
        // Bodies are bounded per route, after authentication.
        .layer(DefaultBodyLimit::disable())
        .route("/healthz", get(|| async { "ok" }))
        .with_state(intake)
}

/// Identifiers the device chose: short, printable, no separators that could mean a path.
pub fn is_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The outcome a metric counts: the status of an answer, the code of a refusal.
fn outcome(result: &Result<Response, ApiError>) -> String {
    match result {
        Ok(r) => r.status().as_u16().to_string(),
        Err(e) => e.code.to_string(),
    }
}

/// A signed request with no effect: who the service takes the device for (`octd doctor`'s
/// uplink check proves enrolment, key, clock and signature with it).
async fn whoami(
    State(intake): State<Arc<Intake>>,
    method: Method,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let result = async {
        let Authenticated { device, .. } = intake.authenticate(&method, &uri, &headers, body, 0).await?;
        Ok::<_, ApiError>(
            (StatusCode::OK, Json(json!({"site": device.site, "device": device.device, "key_id": device.key_id})))
                .into_response(),
        )
    }
    .await;
    intake.metrics.record("device", &outcome(&result));
    result
}

async fn put_image(
    State(intake): State<Arc<Intake>>,
    path: Path<String>,
    method: Method,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let result = store_image(&intake, path, method, uri, headers, body).await;
    intake.metrics.record("images", &outcome(&result));
    result
}

async fn put_label(
    State(intake): State<Arc<Intake>>,
    path: Path<(String, String)>,
    method: Method,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let result = store_label(&intake, path, method, uri, headers, body).await;
    intake.metrics.record("labels", &outcome(&result));
    result
}

async fn store_image(
    intake: &Intake,
    Path(sha256): Path<String>,
    method: Method,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !octd_uplink::is_lower_hex(&sha256, 64) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            "the path names an image by its lowercase hex SHA-256",
        ));
    }
    let kind =
        headers.get("content-type").and_then(|v| v.to_str().ok()).and_then(ImageKind::from_content_type).ok_or_else(
            || {
                ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_type",
                    "Content-Type must be image/png or application/dicom",
                )
            },
        )?;
    let Authenticated { device, body: bytes, body_sha256 } =
        intake.authenticate(&method, &uri, &headers, body, intake.config.max_image_bytes).await?;
    if body_sha256 != sha256 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "digest_mismatch",
            "the body's SHA-256 is not the one in the path",
        ));
    }
    if let Some(existing) = intake.store.image(&sha256).await.map_err(|e| ApiError::internal("image lookup", e))? {
        return Ok((StatusCode::OK, Json(json!({"status": "present", "sha256": existing.sha256}))).into_response());
    }
    let max_decoded = intake.config.max_image_bytes.saturating_mul(16);
    let checked = {
        let bytes = bytes.clone();
        match tokio::task::spawn_blocking(move || content::check(kind, &bytes, max_decoded)).await {
            Ok(checked) => checked,
            // A parser that panics on these bytes will panic on every retry: refuse them.
            Err(e) if e.is_panic() => {
                Err(content::ContentError::Undecodable("image", "the parser failed on these bytes".into()))
            }
            Err(e) => return Err(ApiError::internal("image check", e)),
        }
    };
    let facts = checked.map_err(|e| {
        tracing::info!(site = %device.site, device = %device.device, code = e.code(), "image refused");
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.code(), e.to_string())
    })?;
    let size = bytes.len() as i64;
    intake.blobs.put_image(&sha256, kind.extension(), bytes).await.map_err(|e| ApiError::internal("image write", e))?;
    let record = ImageRecord {
        sha256: sha256.clone(),
        kind: kind.extension().to_string(),
        bytes: size,
        width: i64::from(facts.width),
        height: i64::from(facts.height),
        frames: i64::from(facts.frames),
    };
    intake
        .store
        .add_image(&record, &device.site, &device.device)
        .await
        .map_err(|e| ApiError::internal("image record", e))?;
    tracing::info!(site = %device.site, device = %device.device, sha256 = %sha256, frames = facts.frames, "image stored");
    Ok((StatusCode::CREATED, Json(json!({"status": "stored", "sha256": sha256}))).into_response())
}

async fn store_label(
    intake: &Intake,
    Path((scan_id, revision)): Path<(String, String)>,
    method: Method,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let malformed = |msg: String| ApiError::new(StatusCode::BAD_REQUEST, "malformed", msg);
    if !is_token(&scan_id, 64) {
        return Err(malformed("scan_id must be 1-64 characters of [A-Za-z0-9._-]".into()));
    }
    let revision: i64 = revision
        .parse()
        .ok()
        .filter(|r| (1..=10_000).contains(r))
        .ok_or_else(|| malformed("revision must be an integer from 1 to 10000".into()))?;
    let Authenticated { device, body, body_sha256 } =
        intake.authenticate(&method, &uri, &headers, body, intake.config.max_label_bytes).await?;
    let upload: LabelUpload = serde_json::from_slice(&body).map_err(|e| malformed(format!("label body: {e}")))?;
    let invalid = |msg: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", msg);
    if upload.schema != LABEL_SCHEMA {
        return Err(invalid(format!("schema must be {LABEL_SCHEMA}")));
    }
    let classes = &intake.config.classes;
    if upload.withdrawn && !upload.label.is_empty() {
        return Err(invalid("a withdrawn verdict has an empty label".into()));
    }
    let named = [("label", &upload.label), ("prediction.label", &upload.prediction.label)];
    // A withdrawal names no class.
    for (what, class) in named.into_iter().skip(usize::from(upload.withdrawn)) {
        if !classes.contains(class) {
            return Err(invalid(format!("{what} {class:?} is not one of {classes:?}")));
        }
    }
    if upload.prediction.probabilities.keys().any(|k| !classes.contains(k))
        || upload.prediction.probabilities.values().any(|p| !(0.0..=1.0).contains(p))
    {
        return Err(invalid("probabilities must map the model's classes to values in [0, 1]".into()));
    }
    if !is_token(&upload.reviewer, 64) || !is_token(&upload.patient, 64) {
        return Err(invalid("reviewer and patient must be pseudonyms of 1-64 characters of [A-Za-z0-9._-]".into()));
    }
    if upload.reviewed_at.parse::<jiff::Timestamp>().is_err() {
        return Err(invalid("reviewed_at must be an RFC 3339 time".into()));
    }
    if !matches!(upload.laterality.as_str(), "" | "R" | "L") {
        return Err(invalid("laterality must be R, L or empty".into()));
    }
    if !is_token(&upload.model.name, 64) || !is_token(&upload.model.version, 64) {
        return Err(invalid("model name and version must be 1-64 characters of [A-Za-z0-9._-]".into()));
    }
    if !(upload.model.sha256.is_empty() || octd_uplink::is_lower_hex(&upload.model.sha256, 64)) {
        return Err(invalid("model.sha256 must be empty or 64 lowercase hex characters".into()));
    }
    let image = intake.store.image(&upload.image_sha256).await.map_err(|e| ApiError::internal("image lookup", e))?;
    match image {
        Some(image) if image.kind == upload.image_kind.extension() => {}
        Some(_) => return Err(invalid("image_kind does not match the uploaded image".into())),
        None => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "image_missing",
                "upload the image (PUT /api/v1/images/{sha256}) before its label",
            ))
        }
    }
    let record = LabelRecord {
        site: device.site.clone(),
        device: device.device.clone(),
        scan_id: scan_id.clone(),
        revision,
        label: upload.label.clone(),
        predicted: upload.prediction.label.clone(),
        probabilities: serde_json::to_string(&upload.prediction.probabilities).unwrap_or_default(),
        model_name: upload.model.name.clone(),
        model_version: upload.model.version.clone(),
        model_sha256: upload.model.sha256.clone(),
        reviewer: upload.reviewer.clone(),
        reviewed_at: upload.reviewed_at.clone(),
        laterality: upload.laterality.clone(),
        patient: upload.patient.clone(),
        image_sha256: upload.image_sha256.clone(),
        image_kind: upload.image_kind.extension().to_string(),
        body_sha256,
        received_at: now_ms(),
        withdrawn: upload.withdrawn,
    };
    let holdout = intake.holdout(&device.site, &device.device, &upload.patient);
    let written = intake.store.put_label(&record, holdout).await.map_err(|e| ApiError::internal("label write", e))?;
    let (status, outcome, split) = match written {
        LabelWrite::Stored { split } => (StatusCode::CREATED, "stored", split),
        LabelWrite::Unchanged { split } => (StatusCode::OK, "unchanged", split),
        LabelWrite::Conflict => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "revision_conflict",
                format!(
                    "revision {revision} of this scan was stored with another body; a correction is a new revision"
                ),
            ))
        }
    };
    tracing::info!(site = %device.site, device = %device.device, scan_id = %scan_id, revision, outcome, "label");
    Ok((status, Json(json!({"status": outcome, "scan_id": scan_id, "revision": revision, "split": split})))
        .into_response())
}
