//! Model updates, beside the pipeline: verified bundles from a TUF channel are staged,
//! self-tested and swapped in atomically; a new model must pass a health gate (scans
//! without model failure, or time, and no crash loop across restarts) before it is
//! committed, and is rolled back to the previous one when it fails or is withdrawn.
//!
//! Workers only read the [`ModelSlot`]: each scan holds the model it started with, so a swap
//! never changes the model under a scan in flight, and every result names its model.

pub mod selftest;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use octd_bundle::archive::{self, Limits};
use octd_bundle::client::{self, Channel, ModelTarget, Refusal};
use octd_bundle::SelfTest;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};

use crate::config::Config;
use crate::infer::{Classifier, InferError};
use crate::mqtt::{self, Topics};
use crate::scan::{now_ms, rfc3339_ms, EventKind, EventMessage, ModelStamp};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// No model could be loaded or installed: nothing can classify.
    #[error("no usable model: {0}")]
    NoModel(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// The model a scan is classified with.
pub struct ActiveModel {
    pub classifier: Classifier,
    /// The installed bundle's version; `None` for a pinned, unsigned model folder.
    pub bundle_version: Option<String>,
}

/// The active model, swapped atomically.
#[derive(Default)]
pub struct ModelSlot {
    current: RwLock<Option<Arc<ActiveModel>>>,
}

impl ModelSlot {
    pub fn current(&self) -> Option<Arc<ActiveModel>> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn stamp(&self) -> Option<ModelStamp> {
        self.current().map(|m| m.classifier.stamp().clone())
    }

    fn replace(&self, model: Arc<ActiveModel>) {
        match self.current.write() {
            Ok(mut guard) => *guard = Some(model),
            Err(poisoned) => *poisoned.into_inner() = Some(model),
        }
    }
}

/// What is installed, persisted in the store (`settings/model_state`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModelState {
    pub active: Option<String>,
    pub pending: Option<Pending>,
    /// Versions on disk under `<state>/models/`, verified when installed.
    pub installed: BTreeMap<String, Installed>,
    /// Bundles (by sha256) refused or rolled back: never fetched again.
    pub refused: BTreeSet<String>,
    /// A bundle being loaded and self-tested before install; if the daemon dies during that
    /// `update.max_boot_attempts` times, the bundle is refused.
    #[serde(default)]
    pub trying: Option<Trying>,
    /// Why the active model runs although it failed its health gate (nothing to roll back
    /// to); shown by `octd status` until it commits or is replaced.
    #[serde(default)]
    pub alarm: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trying {
    pub bundle_sha256: String,
    pub version: String,
    pub deaths: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Installed {
    pub target: String,
    pub bundle_sha256: String,
    pub model_sha256: String,
    pub installed_at: String,
}

/// The health gate of a newly installed model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub version: String,
    pub previous: Option<String>,
    /// Starts of the daemon after a run that died while this model was loading or
    /// classifying. A run killed while idle or de-identifying is no evidence against it.
    pub boots: u32,
    pub since_ms: u64,
    /// True while the model is being loaded or runs inference (persisted, so the next start
    /// knows what the last run was doing when it died).
    #[serde(default)]
    pub in_use: bool,
    /// Scans classified on it without a model failure (persisted: a restart keeps progress).
    #[serde(default)]
    pub good_scans: u32,
    /// It crash-looped with nothing to roll back to, and is kept: boots no longer count.
    #[serde(default)]
    pub kept_without_fallback: bool,
}

pub const STAGING_DIR: &str = ".staging";

/// Load a model folder and prove it on this device: compatible classes, self-test passed.
fn prepare_model(config: &Config, dir: &Path, selftest: &SelfTest) -> Result<Classifier, Failure> {
    let classifier = Classifier::load(dir, &config.model, &config.triage).map_err(|e| match e {
        InferError::Backend(_) => ("load_failed", e.to_string()),
        _ => ("incompatible", e.to_string()),
    })?;
    let ours: BTreeSet<&String> = config.triage.priorities.keys().collect();
    let theirs: BTreeSet<&String> = classifier.classes().iter().collect();
    if ours != theirs {
        return Err((
            "incompatible",
            format!("the model's classes {theirs:?} are not this device's triage classes {ours:?}"),
        ));
    }
    selftest::run(&classifier, dir, selftest).map_err(|e| ("selftest_failed", e))?;
    Ok(classifier)
}

/// Load and self-test an installed model folder as the daemon would (for `octd doctor`).
pub fn prove_installed(config: &Config, dir: &Path) -> Result<(ModelStamp, usize), String> {
    let selftest = archive::read_selftest(dir).map_err(|e| e.to_string())?;
    let classifier = prepare_model(config, dir, &selftest).map_err(|(code, e)| format!("{code}: {e}"))?;
    Ok((classifier.stamp().clone(), selftest.cases.len()))
}

pub struct Updater {
    config: Config,
    store: Arc<Store>,
    slot: Arc<ModelSlot>,
    topics: Topics,
    wake: Arc<Notify>,
    models_dir: PathBuf,
    tuf_dir: PathBuf,
    channel: Option<Channel>,
    state: Mutex<ModelState>,
    /// Held while a model is swapped or rolled back.
    changing: Mutex<()>,
    /// Inferences running on the pending model.
    busy: Mutex<u32>,
    last_refusal: Mutex<Option<String>>,
}

/// Held while a scan runs inference on a pending model; see [`Updater::inference_started`].
pub struct InferenceGuard<'a> {
    updater: &'a Updater,
    version: String,
    done: bool,
}

impl InferenceGuard<'_> {
    /// The scan was classified and its result committed.
    pub fn succeeded(mut self) {
        self.done = true;
        self.updater.inference_finished(&self.version, true);
    }
}

impl Drop for InferenceGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.updater.inference_finished(&self.version, false);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

type Failure = (&'static str, String);

impl Updater {
    /// Load the model to run: a pinned folder, or the active bundle (rolling back if it
    /// fails to load or has crash-looped), or, on first start, the channel's newest bundle.
    pub async fn start(
        config: &Config,
        state_dir: &Path,
        store: Arc<Store>,
        topics: Topics,
        wake: Arc<Notify>,
        slot: Arc<ModelSlot>,
    ) -> Result<Arc<Updater>, UpdateError> {
        let channel = match &config.model.dir {
            Some(_) => None,
            None => Some(Channel::parse(&config.update.repository).map_err(UpdateError::NoModel)?),
        };
        let state = store.model_state::<ModelState>()?.unwrap_or_default();
        let updater = Arc::new(Updater {
            config: config.clone(),
            store,
            slot,
            topics,
            wake,
            models_dir: state_dir.join("models"),
            tuf_dir: state_dir.join("tuf"),
            channel,
            state: Mutex::new(state),
            changing: Mutex::new(()),
            busy: Mutex::new(0),
            last_refusal: Mutex::new(None),
        });
        if let Some(dir) = &config.model.dir {
            let (dir, u) = (dir.clone(), updater.clone());
            let classifier = blocking(move || Classifier::load(&dir, &u.config.model, &u.config.triage))
                .await?
                .map_err(|e| UpdateError::NoModel(e.to_string()))?;
            tracing::warn!(version = %classifier.stamp().version, "running a pinned, unsigned model folder (model.dir); updates are off");
            updater.slot.replace(Arc::new(ActiveModel { classifier, bundle_version: None }));
            return Ok(updater);
        }
        std::fs::create_dir_all(&updater.models_dir)
            .map_err(|e| UpdateError::NoModel(format!("{}: {e}", updater.models_dir.display())))?;
        let u = updater.clone();
        blocking(move || u.load_at_start()).await??;
        if updater.slot.current().is_none() {
            tracing::info!(repository = %config.update.repository, "no model installed yet: installing from the channel");
            updater.refresh().await;
        }
        match updater.slot.stamp() {
            Some(stamp) => {
                tracing::info!(model = %stamp.name, version = %stamp.version, backend = %stamp.backend, "model loaded");
                Ok(updater)
            }
            None => Err(UpdateError::NoModel(format!(
                "nothing installed and nothing installable from {} (see the events above)",
                config.update.repository
            ))),
        }
    }

    pub fn slot(&self) -> Arc<ModelSlot> {
        self.slot.clone()
    }

    pub fn current(&self) -> Option<Arc<ActiveModel>> {
        self.slot.current()
    }

    pub fn state(&self) -> ModelState {
        lock(&self.state).clone()
    }

    fn load_at_start(&self) -> Result<(), UpdateError> {
        let _changing = lock(&self.changing);
        let mut state = lock(&self.state).clone();
        let max = self.config.update.max_boot_attempts;
        if let Some(trying) = &mut state.trying {
            // The last run died while self-testing a new bundle.
            trying.deaths += 1;
            // With no model installed, refusing the only candidate would leave the device with
            // nothing to classify with: keep trying it.
            if trying.deaths >= max && state.active.is_some() {
                let trying = trying.clone();
                state.trying = None;
                state.refused.insert(trying.bundle_sha256.clone());
                let detail = format!(
                    "the daemon died {} times while loading and self-testing {}",
                    trying.deaths, trying.version
                );
                let event = self.event(
                    EventKind::ModelRefused,
                    "crash_loop",
                    &detail,
                    Some(&trying.version),
                    state.active.as_deref(),
                );
                tracing::error!(version = %trying.version, detail, "model bundle refused");
                self.persist(&state, Some((&event, None)))?;
            } else {
                self.persist(&state, None)?;
            }
        }
        let mut failure: Option<Failure> = None;
        let mut damaged = false;
        if let Some(pending) = &mut state.pending {
            if pending.in_use && !pending.kept_without_fallback {
                pending.boots += 1;
            }
            if pending.boots >= max && !pending.kept_without_fallback {
                let detail = format!(
                    "{} was loading or classifying each time the daemon died, {} times, before its health gate",
                    pending.version, pending.boots
                );
                failure = Some(("crash_loop", detail));
            }
            // Loading it now: a death from here on is evidence against it.
            pending.in_use = true;
            self.persist(&state, None)?;
        }
        let Some(active) = state.active.clone() else { return Ok(()) };
        if failure.is_none() {
            match self.load_installed(&active) {
                Ok(classifier) => {
                    self.slot.replace(Arc::new(ActiveModel { classifier, bundle_version: Some(active) }));
                    self.set_in_use(false)?;
                    return Ok(());
                }
                Err((code, detail)) => {
                    tracing::error!(version = %active, error = %detail, "the active model does not load");
                    // A backend that fails (no library, GPU out of memory) is the device's
                    // problem; anything else means the files on disk are damaged.
                    damaged = code != "load_failed";
                    failure = Some(("load_failed", detail));
                }
            }
        }
        let (code, detail) = failure.unwrap_or(("load_failed", String::new()));
        if self.roll_back_locked(&active, code, &detail, None)? {
            return Ok(());
        }
        if code == "crash_loop" {
            // Never refuse the only model: a device that classifies with a suspect model and
            // says so serves its patients; one that stops does not.
            if let Ok(classifier) = self.load_installed(&active) {
                let mut state = self.state();
                let why = format!("{detail}; kept, as no earlier model is installed to roll back to");
                if let Some(p) = &mut state.pending {
                    p.kept_without_fallback = true;
                    p.in_use = false;
                    p.boots = 0;
                }
                state.alarm = Some(why.clone());
                let event =
                    self.event(EventKind::Alarm, "model_kept_without_fallback", &why, Some(&active), Some(&active));
                self.persist(&state, Some((&event, None)))?;
                tracing::error!(version = %active, why, "model kept without a fallback");
                self.slot.replace(Arc::new(ActiveModel { classifier, bundle_version: Some(active) }));
                return Ok(());
            }
        }
        if !damaged {
            // Its files are whole: keep it for when the device recovers (an offline device
            // could not fetch it again).
            return Ok(());
        }
        // Its files are damaged and nothing replaces it: forget the install, so that the
        // channel's copy is fetched, verified and tested again (a power cut may have cut its
        // files short).
        let mut state = self.state();
        state.installed.remove(&active);
        state.active = None;
        state.pending = None;
        self.persist(&state, None)?;
        let _ = std::fs::remove_dir_all(self.models_dir.join(&active));
        tracing::warn!(version = %active, "the installed model is unusable; it will be installed again from the channel");
        Ok(())
    }

    fn set_in_use(&self, in_use: bool) -> Result<(), UpdateError> {
        let mut state = self.state();
        match &mut state.pending {
            Some(p) if p.in_use != in_use => p.in_use = in_use,
            _ => return Ok(()),
        }
        self.persist(&state, None)
    }

    /// A scan starts inference on `model`. While the model is pending its health gate, the
    /// store knows it is in use until the returned guard is dropped or succeeds.
    pub fn inference_started(&self, model: &ActiveModel) -> Option<InferenceGuard<'_>> {
        let version = model.bundle_version.as_ref()?;
        let pending = lock(&self.state).pending.as_ref().is_some_and(|p| &p.version == version);
        if !pending {
            return None;
        }
        let _changing = lock(&self.changing);
        let first = {
            let mut busy = lock(&self.busy);
            *busy += 1;
            *busy == 1
        };
        if first {
            if let Err(e) = self.set_in_use(true) {
                tracing::error!(error = %e, "cannot record that the pending model is in use");
            }
        }
        Some(InferenceGuard { updater: self, version: version.clone(), done: false })
    }

    fn inference_finished(&self, version: &str, succeeded: bool) {
        let due = {
            let _changing = lock(&self.changing);
            let idle = {
                let mut busy = lock(&self.busy);
                *busy = busy.saturating_sub(1);
                *busy == 0
            };
            let mut state = self.state();
            let Some(p) = state.pending.as_mut().filter(|p| p.version == version) else { return };
            if succeeded {
                p.good_scans = p.good_scans.saturating_add(1);
            }
            p.in_use = !idle;
            let good = p.good_scans;
            if let Err(e) = self.persist(&state, None) {
                tracing::error!(error = %e, "cannot record the health gate's progress");
            }
            good >= self.config.update.commit_after_scans
        };
        if due {
            self.commit(
                version,
                &format!("{} scans classified without a model failure", self.config.update.commit_after_scans),
            );
        }
    }

    /// Load and self-test an installed version (the loader checks the model's hash).
    fn load_installed(&self, version: &str) -> Result<Classifier, Failure> {
        let dir = self.models_dir.join(version);
        // Missing or unreadable files are the install's damage, like a wrong hash.
        let selftest = archive::read_selftest(&dir).map_err(|e| ("incompatible", e.to_string()))?;
        self.prepare(&dir, &selftest)
    }

    fn prepare(&self, dir: &Path, selftest: &SelfTest) -> Result<Classifier, Failure> {
        prepare_model(&self.config, dir, selftest)
    }

    /// Check the channel; install what is newer, roll back what was withdrawn.
    pub async fn refresh(self: &Arc<Self>) {
        let Some(channel) = &self.channel else { return };
        let root = match std::fs::read(&self.config.update.trusted_root) {
            Ok(r) => r,
            Err(e) => {
                let detail = format!("cannot read the trusted root {}: {e}", self.config.update.trusted_root.display());
                self.report_refusal(EventKind::Alarm, "trusted_root_missing", &detail, None);
                return;
            }
        };
        let verified = match client::load(&root, channel, &self.tuf_dir).await {
            Ok(v) => v,
            Err(refusal) => {
                self.channel_refused(&refusal, None);
                return;
            }
        };
        *lock(&self.last_refusal) = None;
        let listed = verified.models();
        let state = self.state();

        if let Some(active) = &state.active {
            let ours = state.installed.get(active).map(|i| i.bundle_sha256.clone());
            let still_listed = listed.iter().any(|m| Some(&m.bundle_sha256) == ours.as_ref());
            if !still_listed {
                let allowed: BTreeSet<String> = listed.iter().map(|m| m.version.to_string()).collect();
                let me = self.clone();
                let active = active.clone();
                let detail = format!("{active} is no longer listed by the model channel");
                let _ = blocking(move || {
                    let _changing = lock(&me.changing);
                    me.roll_back_locked(&active, "withdrawn", &detail, Some(&allowed))
                })
                .await;
            }
        }
        let Some(newest) = listed.last() else { return };
        let state = self.state();
        if state.refused.contains(&newest.bundle_sha256) {
            return;
        }
        if let Some(active) = state.active.as_ref().and_then(|v| semver::Version::parse(v).ok()) {
            if newest.version <= active {
                let same = state.installed.get(&newest.version.to_string()).map(|i| &i.bundle_sha256)
                    == Some(&newest.bundle_sha256);
                if !same {
                    let detail = format!(
                        "{} {} is not newer than the installed {active}; versions only go up",
                        newest.target, newest.version
                    );
                    if let Err(e) = self.refuse_target(newest, "not_newer", &detail) {
                        tracing::error!(error = %e, "cannot record the refusal");
                    }
                }
                return;
            }
        }
        self.install(&verified, newest).await;
    }

    async fn install(self: &Arc<Self>, verified: &client::VerifiedRepository, target: &ModelTarget) {
        let staging = self.models_dir.join(STAGING_DIR);
        let _ = std::fs::remove_dir_all(&staging);
        if let Err(e) = std::fs::create_dir_all(&staging) {
            tracing::error!(error = %e, "cannot create the staging folder");
            return;
        }
        if target.length > self.config.update.max_bundle_bytes {
            let detail = format!("{} is {} bytes, more than update.max_bundle_bytes", target.target, target.length);
            if let Err(e) = self.refuse_target(target, "bundle_too_large", &detail) {
                tracing::error!(error = %e, "cannot record the refusal");
            }
            return;
        }
        tracing::info!(target = %target.target, version = %target.version, "fetching a model bundle");
        let archive_path = staging.join("bundle.tar.gz");
        if let Err(refusal) = verified.fetch(target, &archive_path).await {
            self.channel_refused(&refusal, Some(target));
            return;
        }
        let (me, target) = (self.clone(), target.clone());
        match blocking(move || me.stage_and_swap(&target, &archive_path)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "installing the model failed"),
            Err(e) => tracing::error!(error = %e, "installing the model failed"),
        }
        let _ = std::fs::remove_dir_all(&staging);
    }

    fn stage_and_swap(&self, target: &ModelTarget, archive_path: &Path) -> Result<(), UpdateError> {
        let version = target.version.to_string();
        let unpacked = archive_path.with_file_name(&version);
        let limits = Limits { max_file_bytes: self.config.update.max_bundle_bytes, ..Limits::default() };
        let (head, selftest) = match archive::unpack(archive_path, &unpacked, limits) {
            Ok(x) => x,
            Err(e) => return self.refuse_target(target, "bundle_invalid", &e.to_string()),
        };
        if head.version != version
            || head.name != target.name
            || !head.sha256.eq_ignore_ascii_case(&target.model_sha256)
        {
            let detail = format!(
                "the bundle holds {} {} (model {}), the signed metadata says {} {} (model {})",
                head.name, head.version, head.sha256, target.name, version, target.model_sha256
            );
            return self.refuse_target(target, "metadata_mismatch", &detail);
        }
        {
            // If loading or self-testing this bundle kills the daemon, the next start knows.
            let _changing = lock(&self.changing);
            let mut state = self.state();
            // Deaths while trying this same bundle before are kept: they are the evidence.
            let deaths = state
                .trying
                .as_ref()
                .filter(|t| t.bundle_sha256 == target.bundle_sha256)
                .map(|t| t.deaths)
                .unwrap_or(0);
            state.trying =
                Some(Trying { bundle_sha256: target.bundle_sha256.clone(), version: version.clone(), deaths });
            self.persist(&state, None)?;
        }
        let prepared = self.prepare(&unpacked, &selftest);
        {
            let _changing = lock(&self.changing);
            let mut state = self.state();
            state.trying = None;
            self.persist(&state, None)?;
        }
        let classifier = match prepared {
            Ok(c) => c,
            Err((code, detail)) => return self.refuse_target(target, code, &detail),
        };

        let _changing = lock(&self.changing);
        let final_dir = self.models_dir.join(&version);
        let _ = std::fs::remove_dir_all(&final_dir);
        let moved = std::fs::rename(&unpacked, &final_dir).and_then(|()| crate::fsutil::sync_dir(&self.models_dir));
        if let Err(e) = moved {
            tracing::error!(error = %e, "cannot move the verified model into place");
            return Ok(());
        }
        let mut state = self.state();
        let previous = state.active.clone();
        state.installed.insert(
            version.clone(),
            Installed {
                target: target.target.clone(),
                bundle_sha256: target.bundle_sha256.clone(),
                model_sha256: target.model_sha256.clone(),
                installed_at: rfc3339_ms(now_ms()),
            },
        );
        state.pending = Some(Pending {
            version: version.clone(),
            previous: previous.clone(),
            boots: 0,
            since_ms: now_ms(),
            in_use: false,
            good_scans: 0,
            kept_without_fallback: false,
        });
        state.trying = None;
        state.alarm = None;
        state.active = Some(version.clone());
        let model = Arc::new(ActiveModel { classifier, bundle_version: Some(version.clone()) });
        let detail = match &previous {
            Some(p) => format!("{} {version} replaces {p} after verification and self-test", head.name),
            None => format!("{} {version} installed after verification and self-test", head.name),
        };
        let removed = self.prune(&mut state);
        let event = self.event(EventKind::ModelInstalled, "installed", &detail, Some(&version), Some(&version));
        self.persist(&state, Some((&event, Some(model.classifier.stamp()))))?;
        self.slot.replace(model);
        tracing::info!(version = %version, previous = ?previous, "model installed");
        for v in &removed {
            let _ = std::fs::remove_dir_all(self.models_dir.join(v));
        }
        if !removed.is_empty() {
            tracing::info!(removed = ?removed, "old model versions removed");
        }
        Ok(())
    }

    /// A model failure (not an input fault) on `model`. Returns true when the model was
    /// rolled back, so the scan can be classified again on the restored one.
    pub fn model_failed(&self, model: &ActiveModel, error: &str) -> bool {
        let Some(version) = &model.bundle_version else { return false };
        let _changing = lock(&self.changing);
        let state = self.state();
        if state.active.as_ref() != Some(version) {
            return true; // already replaced by another worker
        }
        if state.pending.as_ref().is_none_or(|p| &p.version != version) {
            return false; // a committed model's failures are the scan's problem
        }
        let detail = format!("{version} failed after install: {error}");
        self.roll_back_locked(version, "failed_after_install", &detail, None).unwrap_or(false)
    }

    fn commit(&self, version: &str, why: &str) {
        let _changing = lock(&self.changing);
        let mut state = self.state();
        if state.pending.as_ref().is_none_or(|p| p.version != version) {
            return;
        }
        state.pending = None;
        state.alarm = None;
        let event = self.event(EventKind::ModelCommitted, "health_gate_passed", why, Some(version), Some(version));
        match self.persist(&state, Some((&event, None))) {
            Ok(()) => tracing::info!(version, why, "model committed"),
            Err(e) => tracing::error!(error = %e, "cannot record the model commit"),
        }
    }

    fn commit_if_due(&self) {
        let pending = lock(&self.state).pending.clone();
        if let Some(p) = pending {
            let age = Duration::from_millis(now_ms().saturating_sub(p.since_ms));
            if age >= self.config.update.commit_after {
                self.commit(
                    &p.version,
                    &format!("active for {} without a model failure", humantime::format_duration(age)),
                );
            }
        }
    }

    /// Replace `from` by the newest earlier installed version that loads and passes its
    /// self-test (limited to `allowed` versions when given). `from` is refused from then on.
    /// Call with `changing` held. Returns whether a model was restored.
    fn roll_back_locked(
        &self,
        from: &str,
        code: &str,
        detail: &str,
        allowed: Option<&BTreeSet<String>>,
    ) -> Result<bool, UpdateError> {
        let mut state = self.state();
        if state.active.as_deref() != Some(from) {
            return Ok(true);
        }
        // Versions only go up when installed, so the version a pending model replaced is
        // the newest older one on disk (prune keeps it).
        let from_semver = semver::Version::parse(from).ok();
        let mut older: Vec<(semver::Version, String)> = state
            .installed
            .keys()
            .filter_map(|v| Some((semver::Version::parse(v).ok()?, v.clone())))
            .filter(|(sv, _)| from_semver.as_ref().is_none_or(|f| sv < f))
            .collect();
        older.sort();
        for (_, candidate) in older.into_iter().rev() {
            if allowed.is_some_and(|a| !a.contains(&candidate)) {
                continue;
            }
            match self.load_installed(&candidate) {
                Ok(classifier) => {
                    if let Some(bad) = state.installed.remove(from) {
                        state.refused.insert(bad.bundle_sha256);
                    }
                    state.pending = None;
                    state.alarm = None;
                    state.active = Some(candidate.clone());
                    let model = Arc::new(ActiveModel { classifier, bundle_version: Some(candidate.clone()) });
                    let event = self.event(EventKind::ModelRolledBack, code, detail, Some(from), Some(&candidate));
                    self.persist(&state, Some((&event, Some(model.classifier.stamp()))))?;
                    self.slot.replace(model);
                    let _ = std::fs::remove_dir_all(self.models_dir.join(from));
                    tracing::warn!(from, to = %candidate, code, detail, "model rolled back");
                    return Ok(true);
                }
                Err((_, why)) => {
                    tracing::error!(version = %candidate, error = %why, "cannot roll back to this version")
                }
            }
        }
        let detail = format!("{detail}; no earlier installed model could replace it");
        self.report_refusal(EventKind::Alarm, "rollback_impossible", &detail, Some(from));
        Ok(false)
    }

    /// Drop installed versions beyond `keep_versions` from `state`, never the active one or
    /// the one a pending model would roll back to. Returns them, for their folders to go once
    /// the state is saved.
    fn prune(&self, state: &mut ModelState) -> Vec<String> {
        let mut versions: Vec<(semver::Version, String)> =
            state.installed.keys().filter_map(|v| Some((semver::Version::parse(v).ok()?, v.clone()))).collect();
        versions.sort();
        let protected: Vec<String> = [state.active.clone(), state.pending.as_ref().and_then(|p| p.previous.clone())]
            .into_iter()
            .flatten()
            .collect();
        let excess = versions.len().saturating_sub(self.config.update.keep_versions);
        let removable: Vec<String> =
            versions.into_iter().map(|(_, v)| v).filter(|v| !protected.contains(v)).take(excess).collect();
        for v in &removable {
            state.installed.remove(v);
        }
        removable
    }

    fn channel_refused(&self, refusal: &Refusal, target: Option<&ModelTarget>) {
        match refusal {
            Refusal::Unreachable(detail) => {
                tracing::warn!(error = %detail, "model channel unreachable; will retry");
            }
            Refusal::MetadataExpired { .. } => {
                self.report_refusal(EventKind::Alarm, refusal.code(), &refusal.to_string(), None);
            }
            _ => match target {
                Some(t) => {
                    let _ = self.refuse_target(t, refusal.code(), &refusal.to_string());
                }
                None => self.report_refusal(EventKind::ModelRefused, refusal.code(), &refusal.to_string(), None),
            },
        }
    }

    /// Refuse a bundle for good: recorded, announced, never fetched again.
    fn refuse_target(&self, target: &ModelTarget, code: &str, detail: &str) -> Result<(), UpdateError> {
        let _changing = lock(&self.changing);
        let mut state = self.state();
        state.refused.insert(target.bundle_sha256.clone());
        let version = target.version.to_string();
        let event = self.event(EventKind::ModelRefused, code, detail, Some(&version), state.active.as_deref());
        tracing::warn!(target = %target.target, code, detail, "model bundle refused");
        self.persist(&state, Some((&event, None)))
    }

    /// A refusal of the channel as a whole: announced once until the channel changes.
    fn report_refusal(&self, kind: EventKind, code: &str, detail: &str, version: Option<&str>) {
        let key = format!("{code}:{}", detail.split("device clock").next().unwrap_or_default());
        {
            let mut last = lock(&self.last_refusal);
            if last.as_deref() == Some(key.as_str()) {
                return;
            }
            *last = Some(key);
        }
        tracing::error!(code, detail, "model update refused");
        let active = self.state().active;
        let event = self.event(kind, code, detail, version, active.as_deref());
        // The event alone: the state is not this caller's to write (it may not hold
        // `changing`, and a snapshot written back would undo a concurrent change).
        let message = mqtt::event_outbox(&self.topics, &event);
        match self.store.commit_model_change(None::<&ModelState>, Some(&event), std::slice::from_ref(&message)) {
            Ok(()) => self.wake.notify_one(),
            Err(e) => tracing::error!(error = %e, "cannot record the refusal"),
        }
    }

    fn event(
        &self,
        kind: EventKind,
        code: &str,
        detail: &str,
        version: Option<&str>,
        active: Option<&str>,
    ) -> EventMessage {
        EventMessage {
            model_version: version.map(str::to_string),
            active_version: active.map(str::to_string),
            ..self.topics.event(kind, code, detail)
        }
    }

    /// Save `state`; with an event, record it and announce it on MQTT (and, when the active
    /// model changed, a new retained status) in the same transaction.
    fn persist(
        &self,
        state: &ModelState,
        event: Option<(&EventMessage, Option<&ModelStamp>)>,
    ) -> Result<(), UpdateError> {
        let mut messages = Vec::new();
        if let Some((e, new_model)) = event {
            messages.push(mqtt::event_outbox(&self.topics, e));
            if let Some(stamp) = new_model {
                messages.push(mqtt::status_message(&self.topics, Some(stamp)));
            }
        }
        self.store.commit_model_change(Some(state), event.map(|(e, _)| e), &messages)?;
        *lock(&self.state) = state.clone();
        if !messages.is_empty() {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Check the channel every `update.interval` and after notices (at most once per
    /// `update.notice_min_interval`, with jitter: see [`NoticeGate`]); commit a pending model
    /// once its time has come.
    pub async fn run(
        self: Arc<Self>,
        notices: Arc<tokio::sync::Mutex<mpsc::Receiver<()>>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        if self.channel.is_none() {
            let _ = shutdown.wait_for(|s| *s).await;
            return;
        }
        let mut notices = notices.lock().await;
        let mut refresh = tokio::time::interval(self.config.update.interval);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        refresh.reset(); // start-up already checked
        let mut health = tokio::time::interval(
            (self.config.update.commit_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(30)),
        );
        let mut gate = NoticeGate::new(self.config.update.notice_min_interval, self.config.update.notice_jitter);
        gate.checked(Instant::now());
        loop {
            let due = gate.due();
            tokio::select! {
                _ = crate::shutdown::requested(&mut shutdown) => return,
                _ = refresh.tick() => {
                    gate.checked(Instant::now());
                    self.refresh().await;
                }
                Some(()) = notices.recv() => {
                    let jitter = gate.jitter.mul_f64(rand::random::<f64>());
                    if gate.on_notice(Instant::now(), jitter) {
                        tracing::debug!("model notice received: a channel check is scheduled");
                    }
                }
                _ = sleep_until_due(due) => {
                    tracing::info!("model notice: checking the channel");
                    gate.checked(Instant::now());
                    self.refresh().await;
                }
                _ = health.tick() => {
                    let me = self.clone();
                    let _ = blocking(move || me.commit_if_due()).await;
                }
            }
        }
    }
}

async fn sleep_until_due(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// When model notices may trigger a channel check: at most one check per `min_interval`
/// however many notices arrive, each after a random delay (jitter), so that a flood of
/// notices (or one notice to a whole fleet) cannot become a flood of channel checks.
#[derive(Debug)]
pub struct NoticeGate {
    min_interval: Duration,
    pub jitter: Duration,
    last_check: Option<Instant>,
    due: Option<Instant>,
}

impl NoticeGate {
    pub fn new(min_interval: Duration, jitter: Duration) -> Self {
        NoticeGate { min_interval, jitter, last_check: None, due: None }
    }

    /// A notice arrived; `jitter` is this notice's random delay. True when it scheduled a
    /// check (false: one is already scheduled, and this notice joins it).
    pub fn on_notice(&mut self, now: Instant, jitter: Duration) -> bool {
        if self.due.is_some() {
            return false;
        }
        let earliest = self.last_check.map_or(now, |t| (t + self.min_interval).max(now));
        self.due = Some(earliest + jitter.min(self.jitter));
        true
    }

    /// When the scheduled check is due, if one is.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// A check ran (scheduled or periodic): it answers every notice before it.
    pub fn checked(&mut self, now: Instant) {
        self.last_check = Some(now);
        self.due = None;
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, UpdateError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| UpdateError::NoModel(format!("model task: {e}")))
}

#[cfg(test)]
mod notice_gate_tests {
    use super::*;

    #[test]
    fn a_flood_of_notices_schedules_one_check_per_interval_with_jitter() {
        let start = Instant::now();
        let mut gate = NoticeGate::new(Duration::from_secs(60), Duration::from_secs(30));
        gate.checked(start);
        let mut checks = 0;
        // 10 000 notices over ten minutes, one every 60 ms.
        for i in 0..10_000u64 {
            let now = start + Duration::from_millis(60 * i);
            if gate.due().is_some_and(|due| due <= now) {
                checks += 1;
                gate.checked(now);
            }
            gate.on_notice(now, Duration::from_secs(10));
            let due = gate.due().unwrap();
            assert!(due >= now, "never in the past");
        }
        // One per interval plus its jitter: every 70 s.
        assert!((8..=10).contains(&checks), "{checks} checks in ten minutes at one per minute");
        // The first notice after a quiet spell waits only its jitter; jitter is capped.
        let mut quiet = NoticeGate::new(Duration::from_secs(60), Duration::from_secs(30));
        quiet.checked(start);
        let later = start + Duration::from_secs(600);
        assert!(quiet.on_notice(later, Duration::from_secs(300)));
        assert_eq!(quiet.due(), Some(later + Duration::from_secs(30)));
        assert!(!quiet.on_notice(later, Duration::ZERO), "joins the scheduled check");
    }
}
