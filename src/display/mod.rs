//! Beside the pipeline: the local HTTP API the reading-room display and clinic scripts use
//! (docs/display-api.md). Reviewers log in with the password `octd reviewer add
//! --password-stdin` set (Argon2id); a session is a bearer token (no cookie, so no cross-site
//! request can carry it), kept hashed in memory and expiring. Repeated failures lock a
//! reviewer out; logins are rate-limited as a whole. A verdict posted here goes through the
//! feedback stage exactly as one on MQTT, attributed to the session's reviewer. Served on
//! `display.listen` (loopback by default); a non-loopback address needs TLS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Semaphore};

use crate::config::Config;
use crate::feedback::reviewers::{valid_id, Reviewers};
use crate::feedback::{codes, Feedback, Incoming, Source};
use crate::scan::{rfc3339_ms, InputKind, ScanId, ScanRecord};
use crate::store::Store;

const MAX_CONNECTIONS: usize = 128;
const MAX_SESSIONS: usize = 256;
const MAX_TRACKED_FAILURES: usize = 1024;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
const MAX_BODY: usize = 16 << 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DisplayConfig {
    /// Where the API listens; empty: off. A non-loopback address needs `tls_cert` and `tls_key`.
    pub listen: String,
    /// PEM certificate chain and private key for HTTPS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// A session ends this long after its login.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Failed logins of one reviewer before the lock-out ...
    pub max_failures: u32,
    /// ... which lasts this long.
    #[serde(with = "humantime_serde")]
    pub lockout: Duration,
    /// Login attempts per second, all clients together.
    pub logins_per_second: u32,
    /// The MQTT-over-WebSockets address the reading-room page subscribes to for live results
    /// (e.g. `wss://octd.clinic.local:9001`); empty: the page polls this API instead. The
    /// broker should let displays subscribe there without credentials, read-only (its ACL).
    pub mqtt_websocket: String,
    /// A broker account for displays (read-only in the broker's ACL), handed to logged-in
    /// pages only; empty: they subscribe without credentials.
    pub mqtt_username: String,
    pub mqtt_password_file: Option<PathBuf>,
}

impl Default for DisplayConfig {
    fn default() -> Self {
        DisplayConfig {
            listen: "127.0.0.1:8480".into(),
            tls_cert: None,
            tls_key: None,
            session_ttl: Duration::from_secs(12 * 3600),
            max_failures: 5,
            lockout: Duration::from_secs(15 * 60),
            logins_per_second: 5,
            mqtt_websocket: String::new(),
            mqtt_username: String::new(),
            mqtt_password_file: None,
        }
    }
}

impl DisplayConfig {
    /// The address, or None when the API is off; an error names what is wrong.
    pub fn address(&self) -> Result<Option<SocketAddr>, String> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        let addr: SocketAddr = self.listen.parse().map_err(|_| format!("{:?} is not an address:port", self.listen))?;
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("tls_cert and tls_key go together".into());
        }
        if !addr.ip().is_loopback() && self.tls_cert.is_none() {
            return Err(format!(
                "{addr} is reachable from the network: set tls_cert and tls_key (passwords and verdicts must not cross it in clear)"
            ));
        }
        Ok(Some(addr))
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DisplayError {
    #[error("display API on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("display TLS: {0}")]
    Tls(String),
}

/// An answer's error: `{"error": code, "message": why}`.
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.code, "message": self.message}))).into_response()
    }
}

struct Session {
    reviewer: String,
    expires: Instant,
    /// The password hash it logged in with: a removed reviewer or a new password ends it.
    credential: [u8; 32],
}

#[derive(Default)]
struct Failures {
    count: u32,
    /// Attempts being verified now: counted before the (slow) verification, so concurrent
    /// guesses cannot exceed the limit.
    in_flight: u32,
    locked_until: Option<Instant>,
    last: Option<Instant>,
}

/// The client's address, for per-client limits.
#[derive(Clone, Copy)]
struct Peer(std::net::IpAddr);

struct Api {
    config: Config,
    store: Arc<Store>,
    feedback: Arc<Feedback>,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    /// By (reviewer, client): another host cannot lock a reviewer out.
    failures: Mutex<HashMap<(String, std::net::IpAddr), Failures>>,
    /// Logins of one client per second (`display.logins_per_second`) ...
    logins: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
    /// ... and of all clients together.
    all_logins: DefaultDirectRateLimiter,
    /// Image downloads at once (a volume's artefact can be large).
    images: Arc<Semaphore>,
    /// Identity reveals per reviewer: a few a minute is a clinic's need; more is a harvest.
    reveals: governor::DefaultKeyedRateLimiter<String>,
    /// Uploads per reviewer, and at once.
    upload_rate: governor::DefaultKeyedRateLimiter<String>,
    uploads: Arc<Semaphore>,
    /// The page's Content-Security-Policy: connections to this device and its broker only.
    csp: String,
    /// One volume's B-scans as 8-bit grey, kept for scrubbing: a frame is then a PNG encode,
    /// not a parse and decode of the whole artefact. Rendering is one at a time.
    frames: Arc<tokio::sync::Mutex<Option<FrameCache>>>,
}

struct FrameCache {
    artifact: String,
    width: u32,
    height: u32,
    frames: Vec<Vec<u8>>,
}

/// The page's Content-Security-Policy. Only this device's own scripts run, they connect only
/// to this device and to the configured broker's origin, and no other site may frame the page.
fn content_security_policy(display: &DisplayConfig) -> String {
    let broker = display
        .mqtt_websocket
        .split_once("://")
        .map(|(scheme, rest)| format!(" {scheme}://{}", rest.split('/').next().unwrap_or_default()))
        .unwrap_or_default();
    format!(
        "default-src 'self'; img-src 'self' blob:; connect-src 'self'{broker}; \
         frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )
}

const ALL_LOGINS_PER_SECOND: u32 = 50;
const REVEALS_PER_MINUTE: u32 = 10;
const UPLOADS_PER_SECOND: u32 = 5;
const UPLOADS_AT_ONCE: usize = 2;
const IMAGES_AT_ONCE: usize = 4;

fn credential(hash: &str) -> [u8; 32] {
    Sha256::digest(hash.as_bytes()).into()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn token_key(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl Api {
    /// The reviewer of the request's session, or why not. The reviewer must still be one
    /// this device knows, with the password the session logged in with.
    async fn reviewer(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let token = bearer(headers)
            .ok_or_else(|| unauthorized("log in first: POST /api/v1/session, then Authorization: Bearer <token>"))?;
        let key = token_key(token);
        let (reviewer, held) = {
            let mut sessions = lock(&self.sessions);
            match sessions.get(&key) {
                Some(s) if s.expires > Instant::now() => (s.reviewer.clone(), s.credential),
                Some(_) => {
                    sessions.remove(&key);
                    return Err(unauthorized("the session has expired: log in again"));
                }
                None => return Err(unauthorized("not a session of this device: log in again")),
            }
        };
        let state = self.config.device.state_dir.clone();
        let current = tokio::task::spawn_blocking(move || Reviewers::load(&state))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
            .map_err(|_| {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_error", "the reviewers cannot be read")
            })?;
        let still = current.get(&reviewer).and_then(|r| r.password_hash.as_deref()).map(credential);
        if still != Some(held) {
            lock(&self.sessions).remove(&key);
            return Err(unauthorized("the reviewer was removed or has a new password: log in again"));
        }
        Ok(reviewer)
    }

    fn open_session(&self, reviewer: &str, credential: [u8; 32]) -> (String, Duration) {
        let mut raw = [0u8; 32];
        rand::rng().fill_bytes(&mut raw);
        let token = hex::encode(raw);
        let ttl = self.config.display.session_ttl;
        let mut sessions = lock(&self.sessions);
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            // The one closest to its end makes room.
            if let Some(key) = sessions.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k) {
                sessions.remove(&key);
            }
        }
        let expires = now.checked_add(ttl).unwrap_or(now + Duration::from_secs(24 * 3600));
        sessions.insert(token_key(&token), Session { reviewer: reviewer.to_string(), expires, credential });
        (token, ttl)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    reviewer: String,
    password: String,
}

/// A PHC string no password matches, verified for unknown reviewers so that a login takes
/// as long whether the reviewer exists or not.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Ww2Hf6vPlkTmAIb6zS7hkQ1yUq2UD5b1tPz4o0I3W3s";

/// Only JSON is taken: a form or `text/plain` POST from another site's page (which a browser
/// sends without asking) is refused before it counts as a login attempt.
fn json_body(headers: &HeaderMap) -> Result<(), ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("application/json"));
    match json {
        true => Ok(()),
        false => Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_type", "send application/json")),
    }
}

async fn login(
    State(api): State<Arc<Api>>,
    axum::Extension(Peer(ip)): axum::Extension<Peer>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    json_body(&headers)?;
    if api.logins.len() > MAX_TRACKED_FAILURES {
        api.logins.retain_recent();
    }
    if api.logins.check_key(&ip).is_err() || api.all_logins.check().is_err() {
        return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many logins; wait a second"));
    }
    let login: Login = serde_json::from_slice(&body)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "malformed", "expected {\"reviewer\", \"password\"}"))?;
    if !valid_id(&login.reviewer) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "malformed", "not a reviewer id"));
    }
    let d = &api.config.display;
    let key = (login.reviewer.clone(), ip);
    {
        // Reserve this attempt before the verification.
        let mut failures = lock(&api.failures);
        let now = Instant::now();
        if failures.len() >= MAX_TRACKED_FAILURES && !failures.contains_key(&key) {
            // Forget what no longer matters; never a running lock-out.
            failures.retain(|_, f| {
                f.in_flight > 0
                    || f.locked_until.is_some_and(|u| u > now)
                    || f.last.is_some_and(|l| now.duration_since(l) < d.lockout)
            });
            if failures.len() >= MAX_TRACKED_FAILURES {
                return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many failed logins"));
            }
        }
        let f = failures.entry(key.clone()).or_default();
        if f.last.is_some_and(|l| now.duration_since(l) > d.lockout) {
            f.count = 0;
        }
        if let Some(until) = f.locked_until.filter(|u| *u > now) {
            let left = until.saturating_duration_since(now).as_secs() + 1;
            return Err(ApiError::new(
                StatusCode::LOCKED,
                "locked",
                format!("too many failed logins for this reviewer from here; try again in {left} s"),
            ));
        }
        if f.count + f.in_flight >= d.max_failures {
            return Err(ApiError::new(
                StatusCode::LOCKED,
                "locked",
                "too many failed logins for this reviewer from here",
            ));
        }
        f.in_flight += 1;
    }
    let state = api.config.device.state_dir.clone();
    let reviewer = login.reviewer.clone();
    let verified = tokio::task::spawn_blocking(move || -> Result<Option<[u8; 32]>, ()> {
        let known = Reviewers::load(&state).map_err(|_| ())?;
        match known.get(&reviewer).and_then(|r| r.password_hash.clone()) {
            Some(hash) => Ok(known.verify_password(&reviewer, &login.password).then(|| credential(&hash))),
            None => {
                // As long as a real verification, so that unknown reviewers are not told apart.
                let dummy = Reviewers {
                    reviewers: vec![crate::feedback::reviewers::Reviewer {
                        id: reviewer.clone(),
                        added_at: String::new(),
                        password_hash: Some(DUMMY_HASH.into()),
                    }],
                };
                let _ = dummy.verify_password(&reviewer, &login.password);
                Ok(None)
            }
        }
    })
    .await
    .unwrap_or(Err(()));
    let now = Instant::now();
    let mut failures = lock(&api.failures);
    let f = failures.entry(key.clone()).or_default();
    f.in_flight = f.in_flight.saturating_sub(1);
    let credential = match verified {
        Err(()) => {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_error", "the reviewers cannot be read"))
        }
        Ok(Some(credential)) => credential,
        Ok(None) => {
            f.count += 1;
            f.last = Some(now);
            if f.count >= d.max_failures {
                f.locked_until = now.checked_add(d.lockout);
                f.count = 0;
                tracing::warn!(reviewer = %login.reviewer, client = %ip, lockout_s = d.lockout.as_secs(),
                    "reviewer locked out from this client after failed logins");
            }
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown reviewer or wrong password"));
        }
    };
    failures.remove(&key);
    drop(failures);
    let (token, ttl) = api.open_session(&login.reviewer, credential);
    tracing::info!(reviewer = %login.reviewer, "reviewer logged in");
    Ok((StatusCode::CREATED, Json(json!({"token": token, "reviewer": login.reviewer, "expires_in_s": ttl.as_secs()})))
        .into_response())
}

async fn logout(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Response, ApiError> {
    api.reviewer(&headers).await?;
    if let Some(token) = bearer(&headers) {
        lock(&api.sessions).remove(&token_key(token));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// What the display shows of a scan: no identity, nothing from the original file.
#[derive(Serialize)]
struct ScanView {
    scan_id: String,
    state: String,
    received_at: String,
    input_kind: Option<String>,
    frames: Option<u32>,
    laterality: Option<String>,
    label: Option<String>,
    priority: Option<String>,
    probabilities: Option<std::collections::BTreeMap<String, f32>>,
    model: Option<crate::scan::ModelStamp>,
    confidence: Option<f32>,
    needs_review: Option<bool>,
    review_reasons: Vec<String>,
    priority_rank: Option<u8>,
    most_suspicious_frame: Option<u32>,
    unlike_training_score: Option<f32>,
    /// The B-scan a heatmap is drawn on, when the scan has one (`/heatmap`).
    heatmap_frame: Option<u32>,
    verdict: Option<Value>,
}

/// A serde enum as its wire name.
fn wire<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

fn view(record: &ScanRecord, verdict: Option<crate::scan::LabelRecord>) -> ScanView {
    ScanView {
        scan_id: record.scan_id.to_string(),
        state: wire(&record.state),
        received_at: rfc3339_ms(record.received_at_ms),
        input_kind: record.kind.as_ref().map(wire),
        frames: record.frames,
        laterality: record.laterality.clone(),
        label: record.label.clone(),
        priority: record.priority.as_ref().map(wire),
        probabilities: record.probabilities.clone(),
        model: record.model.clone(),
        confidence: record.confidence,
        needs_review: record.needs_review,
        review_reasons: record.review_reasons.clone(),
        priority_rank: record.priority.map(|p| p.rank()),
        most_suspicious_frame: record.most_suspicious_frame,
        unlike_training_score: record.unlike_training_score,
        heatmap_frame: record.heatmap.as_ref().map(|h| h.frame),
        verdict: verdict.filter(|v| !v.withdrawn).map(|v| {
            json!({"label": v.label, "revision": v.revision, "reviewer": v.reviewer, "reviewed_at": v.reviewed_at,
                   "confirmed": v.label == v.predicted})
        }),
    }
}

/// A store read off the async runtime, its failures as the API's answers.
async fn read_store<T: Send + 'static>(
    api: &Api,
    read: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = api.store.clone();
    tokio::task::spawn_blocking(move || read(&store))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_error", e.to_string()))
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn list_scans(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    api.reviewer(&headers).await?;
    let limit = q.limit.unwrap_or(100).clamp(1, 500);
    let views = read_store(&api, move |store| {
        let mut out = Vec::new();
        for record in store.recent_scans(limit)? {
            let verdict = store.latest_label(record.scan_id)?;
            out.push(view(&record, verdict));
        }
        Ok(out)
    })
    .await?;
    Ok(Json(json!({"scans": views})).into_response())
}

fn scan_id(id: &str) -> Result<ScanId, ApiError> {
    ScanId::parse(id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_scan", "not a scan id of this device"))
}

async fn one_scan(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    api.reviewer(&headers).await?;
    let id = scan_id(&id)?;
    let found = read_store(&api, move |store| {
        Ok(match store.get(id)? {
            Some(record) => Some(view(&record, store.latest_label(id)?)),
            None => None,
        })
    })
    .await?;
    match found {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_scan", "the scan is not known on this device")),
    }
}

/// The scan's record, or `404 unknown_scan`.
async fn scan_record(api: &Api, id: ScanId) -> Result<ScanRecord, ApiError> {
    read_store(api, move |store| store.get(id))
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_scan", "the scan is not known on this device"))
}

/// The scan's artefact file name, or `404 no_image`.
fn artifact_of(record: &ScanRecord) -> Result<String, ApiError> {
    record
        .artifact
        .clone()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no_image", "the scan has no de-identified image (yet)"))
}

/// One of the slots for sending or drawing images, or `503 busy`.
fn image_slot(api: &Api) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    api.images.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", format!("{IMAGES_AT_ONCE} images are being sent; retry"))
    })
}

/// The de-identified artefact as octd holds it (PNG, or DICOM for a volume).
async fn scan_image(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    api.reviewer(&headers).await?;
    let id = scan_id(&id)?;
    let record = scan_record(&api, id).await?;
    let artifact = artifact_of(&record)?;
    let path = api.config.device.state_dir.join("deid").join(&artifact);
    let slot = image_slot(&api)?;
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "no_image", "the de-identified image is no longer kept"))
        }
        Err(e) => {
            tracing::error!(error = %e, "reading a de-identified image for the display");
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_error", "the image cannot be read now"));
        }
    };
    let length = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    // Sent in chunks: a volume's artefact is never held whole; the slot is held until the end.
    let chunks = futures::stream::unfold((file, Some(slot)), |(mut file, slot)| async move {
        use tokio::io::AsyncReadExt;
        slot.as_ref()?;
        let mut buf = vec![0u8; IMAGE_CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)), (file, slot)))
            }
            Err(e) => Some((Err(e), (file, None))),
        }
    });
    let content_type = match artifact.rsplit('.').next() {
        Some("dcm") => "application/dicom",
        Some("jpg") => "image/jpeg",
        _ => "image/png",
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (header::CACHE_CONTROL, "no-store".to_string()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        axum::body::Body::from_stream(chunks),
    )
        .into_response())
}

const IMAGE_CHUNK: usize = 64 << 10;

/// What the reading-room page needs to know about this device once logged in.
async fn display_settings(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let reviewer = api.reviewer(&headers).await?;
    let topics = api.config.topics();
    let mqtt_password = match &api.config.display.mqtt_password_file {
        None => String::new(),
        Some(path) => tokio::fs::read_to_string(path).await.map(|p| p.trim().to_string()).map_err(|e| {
            tracing::error!(error = %e, "reading display.mqtt_password_file");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_error",
                "the displays' broker password cannot be read",
            )
        })?,
    };
    Ok(Json(json!({
        "reviewer": reviewer,
        "site": api.config.device.site,
        "device": api.config.device.id,
        "classes": api.feedback.classes().unwrap_or_default(),
        "mqtt_websocket": api.config.display.mqtt_websocket,
        "mqtt_username": api.config.display.mqtt_username,
        "mqtt_password": mqtt_password,
        "topics": {"results": topics.results(), "events": topics.events(), "status": topics.status(), "quality": topics.quality()},
        "heatmap": api.feedback.heatmap(),
    }))
    .into_response())
}

#[derive(Deserialize)]
struct FrameQuery {
    n: Option<u32>,
}

/// One B-scan of the de-identified artefact as a grey PNG (the browser cannot show DICOM):
/// frame `n` of a volume, the image itself otherwise.
async fn scan_frame(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FrameQuery>,
) -> Result<Response, ApiError> {
    api.reviewer(&headers).await?;
    let id = scan_id(&id)?;
    let record = scan_record(&api, id).await?;
    let artifact = artifact_of(&record)?;
    let wanted = q.n.unwrap_or(0);
    if wanted >= record.frames.unwrap_or(1) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "no_frame", "the scan has no B-scan of that number"));
    }
    let path = api.config.device.state_dir.join("deid").join(&artifact);
    if tokio::fs::metadata(&path).await.is_err() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "no_image", "the de-identified image is no longer kept"));
    }
    // One render at a time; the lock is held by the blocking task, so a request that gave up
    // does not let another start beside it.
    let mut cache = api.frames.clone().lock_owned().await;
    let rendered = tokio::task::spawn_blocking(move || {
        if cache.as_ref().is_none_or(|c| c.artifact != artifact) {
            *cache = None;
            let mut frames = Vec::new();
            let (mut width, mut height) = (0, 0);
            crate::infer::frames::for_each_batch(&path, 8, |batch| {
                for f in batch {
                    (width, height) = (f.width as u32, f.height as u32);
                    frames.push(f.pixels.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect());
                }
                Ok(())
            })?;
            *cache = Some(FrameCache { artifact, width, height, frames });
        }
        let Some(c) = cache.as_ref() else { return Err(crate::infer::InferError::Input("no frames".into())) };
        let grey = c.frames.get(wanted as usize).cloned().unwrap_or_default();
        crate::infer::frames::encode_png(c.width, c.height, grey)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    match rendered {
        Ok(png) => Ok((
            [(header::CONTENT_TYPE, "image/png".to_string()), (header::CACHE_CONTROL, "no-store".to_string())],
            png,
        )
            .into_response()),
        Err(e) => {
            tracing::error!(scan_id = %id, error = %e, "rendering a B-scan for the display");
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "render_failed", "the B-scan cannot be shown now"))
        }
    }
}

/// Where the model looked: the label's activation map over the B-scan it comes from, as a
/// transparent PNG of that B-scan's size (drawn on request from the few values stored with
/// the result, so classifying a scan costs no image encode).
async fn scan_heatmap(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    api.reviewer(&headers).await?;
    let id = scan_id(&id)?;
    let record = scan_record(&api, id).await?;
    let Some(heatmap) = record.heatmap else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_heatmap",
            "no heatmap: the model that classified the scan does not give activation maps",
        ));
    };
    let slot = image_slot(&api)?;
    let png = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        heatmap.overlay_png()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "render_failed", e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "no-store")], png).into_response())
}

/// The clinic's own identifiers of a scan, from the sealed linkage, for staff logged in on
/// this device. Each reveal is recorded (who, which scan, when; never the identity) before
/// anything is shown, and logged. Nothing here goes to MQTT or the trainer.
async fn reveal_identity(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    json_body(&headers)?;
    let reviewer = api.reviewer(&headers).await?;
    let id = scan_id(&id)?;
    if api.reveals.check_key(&reviewer).is_err() {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("at most {REVEALS_PER_MINUTE} identity reveals a minute per reviewer"),
        ));
    }
    let who = reviewer.clone();
    let linkage = read_store(&api, move |store| {
        let Some(linkage) = store.linkage(id)? else { return Ok(None) };
        store.record_reveal(id, &who, crate::scan::now_ms())?;
        Ok(Some(linkage))
    })
    .await?;
    let Some(linkage) = linkage else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_identity",
            "this device keeps no identity for the scan (unknown, or past store.linkage_retention)",
        ));
    };
    tracing::info!(scan_id = %id, reviewer = %reviewer, "identity revealed in the reading room");
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({"scan_id": id, "original_name": linkage.original_name, "identifiers": linkage.identifiers})),
    )
        .into_response())
}

/// A scan uploaded from the reading room (a scanner without a folder export): written into
/// the first watch folder under a name of octd's own, atomically, so it enters the pipeline
/// exactly as a dropped file does. The body is streamed to disk, never held whole.
async fn upload(State(api): State<Arc<Api>>, headers: HeaderMap, body: axum::body::Body) -> Result<Response, ApiError> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let reviewer = api.reviewer(&headers).await?;
    if api.upload_rate.check_key(&reviewer).is_err() {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("at most {UPLOADS_PER_SECOND} uploads a second per reviewer"),
        ));
    }
    let _slot = api.uploads.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "busy", format!("{UPLOADS_AT_ONCE} uploads are running; retry"))
    })?;
    let Some(inbox) = api.config.ingest.watch.first().cloned() else {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_inbox", "octd watches no folder"));
    };
    let limit = api.config.ingest.max_file_bytes;
    // The watch folder is the scanner's disk too: an upload must not fill it (fails closed).
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(limit);
    let room = fs4::available_space(&inbox).unwrap_or(0);
    if room < api.config.ingest.min_free_bytes.saturating_add(declared.min(limit)) {
        return Err(ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "disk_low",
            "the device's disk is almost full: the upload was not taken",
        ));
    }
    let mut raw = [0u8; 12];
    rand::rng().fill_bytes(&mut raw);
    let stem = format!("upload-{}", hex::encode(raw));
    let partial = inbox.join(format!(".{stem}.partial"));
    let failed = |e: std::io::Error| {
        tracing::error!(error = %e, "writing an upload into the watch folder");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_error", "the upload cannot be written now")
    };
    let mut file = tokio::fs::File::create(&partial).await.map_err(failed)?;
    let mut head = Vec::with_capacity(132);
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    let outcome: Result<(), ApiError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "incomplete", "the upload broke off"))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("a scan of at most {limit} bytes (ingest.max_file_bytes)"),
                ));
            }
            if head.len() < 132 {
                head.extend_from_slice(&chunk[..chunk.len().min(132 - head.len())]);
            }
            file.write_all(&chunk).await.map_err(failed)?;
        }
        file.sync_all().await.map_err(failed)?;
        Ok(())
    }
    .await;
    let kind = InputKind::sniff(&head);
    let outcome = outcome.and_then(|()| match (size, kind) {
        (0, _) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "empty", "the upload is empty")),
        (_, None) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not_an_image",
            "not a JPEG, PNG, TIFF, BMP or DICOM file",
        )),
        (_, Some(_)) => Ok(()),
    });
    if let Err(e) = outcome {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(e);
    }
    let extension = match kind {
        Some(InputKind::Dicom) => "dcm",
        Some(InputKind::Jpeg) => "jpeg",
        Some(InputKind::Png) => "png",
        Some(InputKind::Tiff) => "tiff",
        Some(InputKind::Bmp) | None => "bmp",
    };
    let name = format!("{stem}.{extension}");
    let target = inbox.join(&name);
    if let Err(e) = tokio::fs::rename(&partial, &target).await {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(failed(e));
    }
    let _ = crate::fsutil::sync_dir(&inbox);
    tracing::info!(reviewer = %reviewer, bytes = size, upload = %name, "scan uploaded in the reading room");
    Ok((StatusCode::ACCEPTED, Json(json!({"accepted": true, "upload": name, "bytes": size}))).into_response())
}

/// The page's files, built into the binary: nothing is fetched from elsewhere at run time.
mod page {
    pub const INDEX: &str = include_str!("page/index.html");
    pub const APP_JS: &str = include_str!("page/app.js");
    pub const APP_CSS: &str = include_str!("page/app.css");
    pub const MQTT_JS: &str = include_str!("page/vendor/mqtt.min.js");
}

fn asset(api: &Api, content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (header::CACHE_CONTROL, "no-cache".to_string()),
            (header::CONTENT_SECURITY_POLICY, api.csp.clone()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
            (header::REFERRER_POLICY, "no-referrer".to_string()),
            // No other site may frame it (clickjacking).
            (header::X_FRAME_OPTIONS, "DENY".to_string()),
        ],
        body,
    )
        .into_response()
}

/// A verdict from the display: the `octd.label/1` body, the reviewer being the session's.
async fn post_label(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    json_body(&headers)?;
    let reviewer = api.reviewer(&headers).await?;
    let mut verdict: serde_json::Map<String, Value> = serde_json::from_slice(&body).map_err(|_| {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed", "the body is not an octd.label/1 JSON object")
    })?;
    match verdict.get("reviewer").and_then(|v| v.as_str()) {
        Some(named) if named != reviewer => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "reviewer_mismatch",
                "a session gives verdicts in its own reviewer's name only",
            ))
        }
        _ => {
            verdict.insert("reviewer".into(), Value::String(reviewer));
        }
    }
    verdict.entry("reviewed_at").or_insert_with(|| Value::String(rfc3339_ms(crate::scan::now_ms())));
    verdict.entry("schema").or_insert_with(|| Value::String(crate::scan::LABEL_SCHEMA.into()));
    let payload = serde_json::to_vec(&verdict).unwrap_or_default();
    let feedback = api.feedback.clone();
    let answer =
        tokio::task::spawn_blocking(move || feedback.handle(Incoming { scan_id: id, payload, source: Source::Http }))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let status = match (answer.accepted, answer.code.as_str()) {
        (true, _) => StatusCode::CREATED,
        (false, codes::UNKNOWN_SCAN) => StatusCode::NOT_FOUND,
        (false, codes::TOO_LARGE) => StatusCode::PAYLOAD_TOO_LARGE,
        (false, codes::RATE_LIMITED | codes::BUSY) => StatusCode::TOO_MANY_REQUESTS,
        (false, codes::UNKNOWN_REVIEWER) => StatusCode::FORBIDDEN,
        (false, codes::STORE | codes::NO_MODEL | codes::UPLINK_FULL) => StatusCode::SERVICE_UNAVAILABLE,
        (false, _) => StatusCode::UNPROCESSABLE_ENTITY,
    };
    Ok((status, Json(answer)).into_response())
}

async fn deadline(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", "the device is busy; retry").into_response(),
    }
}

fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/api/v1/session", post(login).delete(logout))
        .route("/api/v1/scans", get(list_scans))
        .route("/api/v1/scans/:scan_id", get(one_scan))
        .route("/api/v1/scans/:scan_id/image", get(scan_image))
        .route("/api/v1/scans/:scan_id/label", post(post_label))
        .route("/api/v1/scans/:scan_id/frame", get(scan_frame))
        .route("/api/v1/scans/:scan_id/heatmap", get(scan_heatmap))
        .route("/api/v1/display", get(display_settings))
        .route("/api/v1/scans/:scan_id/identity", post(reveal_identity))
        .route("/api/v1/uploads", post(upload).layer(axum::extract::DefaultBodyLimit::disable()))
        .route("/", get(|State(api): State<Arc<Api>>| async move { asset(&api, "text/html; charset=utf-8", page::INDEX) }))
        .route("/app.js", get(|State(api): State<Arc<Api>>| async move { asset(&api, "text/javascript; charset=utf-8", page::APP_JS) }))
        .route("/app.css", get(|State(api): State<Arc<Api>>| async move { asset(&api, "text/css; charset=utf-8", page::APP_CSS) }))
        .route(
            "/vendor/mqtt.min.js",
            get(|State(api): State<Arc<Api>>| async move { asset(&api, "text/javascript; charset=utf-8", page::MQTT_JS) }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(deadline))
        .with_state(api)
}

fn tls_acceptor(d: &DisplayConfig) -> Result<Option<tokio_rustls::TlsAcceptor>, DisplayError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (Some(cert), Some(key)) = (&d.tls_cert, &d.tls_key) else { return Ok(None) };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| DisplayError::Tls(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| DisplayError::Tls(format!("{}: {e}", key.display())))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| DisplayError::Tls(e.to_string()))?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))))
}

/// Bind now (a taken port or a bad certificate is a start-up error), serve until shutdown.
pub async fn bind(
    config: &Config,
    addr: SocketAddr,
) -> Result<(tokio::net::TcpListener, Option<tokio_rustls::TlsAcceptor>), DisplayError> {
    let tls = tls_acceptor(&config.display)?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| DisplayError::Listen { addr, source })?;
    Ok((listener, tls))
}

pub async fn serve(
    config: Config,
    store: Arc<Store>,
    feedback: Arc<Feedback>,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let rate = NonZeroU32::new(config.display.logins_per_second).unwrap_or(NonZeroU32::MIN);
    let config_display = config.display.clone();
    let api = Arc::new(Api {
        config,
        store,
        feedback,
        sessions: Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
        logins: RateLimiter::keyed(Quota::per_second(rate)),
        all_logins: RateLimiter::direct(Quota::per_second(
            NonZeroU32::new(ALL_LOGINS_PER_SECOND).unwrap_or(NonZeroU32::MIN),
        )),
        images: Arc::new(Semaphore::new(IMAGES_AT_ONCE)),
        reveals: RateLimiter::keyed(
            Quota::per_minute(NonZeroU32::new(REVEALS_PER_MINUTE).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN)),
        ),
        upload_rate: RateLimiter::keyed(
            Quota::per_second(NonZeroU32::new(UPLOADS_PER_SECOND).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(50).unwrap_or(NonZeroU32::MIN)),
        ),
        uploads: Arc::new(Semaphore::new(UPLOADS_AT_ONCE)),
        csp: content_security_policy(&config_display),
        frames: Arc::new(tokio::sync::Mutex::new(None)),
    });
    let app = router(api);
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = crate::shutdown::requested(&mut shutdown) => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "display API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else { continue };
        let (app, tls) = (app.clone().layer(axum::Extension(Peer(peer.ip()))), tls.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper_util::service::TowerToHyperService::new(app);
            let builder = {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
                b
            };
            match tls {
                Some(acceptor) => {
                    let Ok(Ok(stream)) = tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
                }
                None => {
                    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
                }
            }
        });
    }
}
