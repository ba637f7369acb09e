//! Classification: de-identified artefact -> per-class probabilities, label, review flag and
//! triage priority. The model is loaded once and shared; callers run it off the async
//! runtime (the pipeline bounds how many run at once).

pub mod frames;
pub mod manifest;
pub mod ort_backend;
pub mod preprocess;
mod tract_backend;

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::config::{BackendKind, ModelConfig, TriageConfig};
use crate::scan::Priority;
use crate::scan::{Classification, ModelStamp};
pub use manifest::Manifest;
pub use preprocess::GreyFrame;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InferError {
    /// The model folder is unusable (missing, wrong hash, bad manifest, not loadable).
    #[error("model: {0}")]
    Model(String),
    /// The artefact cannot be turned into model input.
    #[error("input: {0}")]
    Input(String),
    #[error("inference backend: {0}")]
    Backend(String),
}

/// Most inference lanes one volume uses at once.
const MAX_LANES: usize = 4;

/// An inference engine. Input is NCHW f32; output is one row of scores per batch item.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Computes in less than fp32 (TensorRT FP16): outputs differ from fp32 in the 3rd decimal.
    fn reduced_precision(&self) -> bool {
        false
    }
    fn run(&self, input: Vec<f32>, shape: [usize; 4]) -> Result<Outputs, InferError>;
    /// As [`Backend::run`], for a single B-scan's one call (not a volume's): a backend that
    /// finds nothing else running may give it every core, which a lone scan on an idle daemon
    /// gains from and a busy one does not.
    fn run_single(&self, input: Vec<f32>, shape: [usize; 4]) -> Result<Outputs, InferError> {
        self.run(input, shape)
    }
    /// Calls that run at once without sharing threads (ONNX Runtime: its CPU sessions).
    fn parallel_calls(&self) -> usize {
        1
    }
    /// Several sessions (or threads) run on one copy of the model's weights.
    fn shares_weights(&self) -> bool {
        false
    }
    /// The model's output names in order, where the backend can tell them.
    fn output_names(&self) -> Vec<String> {
        Vec::new()
    }
    /// B-scans per call for volumes when the configuration leaves it to the backend.
    fn preferred_batch(&self) -> usize {
        8
    }
}

/// What a backend computed for one batch.
pub struct Outputs {
    /// The first output: one row of scores per batch item.
    pub scores: Vec<Vec<f32>>,
    /// The outputs after the first, in the model's order. Read only where the manifest
    /// declares them (a heatmap, an ood score).
    pub others: Vec<RawOutput>,
}

/// One output as the backend gave it: its shape and its values, row-major.
pub struct RawOutput {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl RawOutput {
    /// One value per batch item, from a `[batch]` or `[batch, 1]` output.
    fn per_item(&self, batch: usize) -> Result<Vec<f32>, InferError> {
        let fits = match self.shape.as_slice() {
            [n] => *n == batch,
            [n, 1] => *n == batch,
            _ => false,
        };
        if !fits || self.data.len() != batch {
            return Err(InferError::Model(format!(
                "the ood output has shape {:?}, not [batch] for a batch of {batch}",
                self.shape
            )));
        }
        Ok(self.data.clone())
    }
}

pub struct Maps {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub items: Vec<Vec<f32>>,
}

impl Maps {
    /// A backend's flat `[batch, c, h, w]` output, checked.
    pub fn from_flat(shape: &[usize], data: &[f32], batch: usize) -> Result<Maps, InferError> {
        let [n, channels, height, width] = shape else {
            return Err(InferError::Backend(format!("activation maps of shape {shape:?}, not [batch, c, h, w]")));
        };
        let per = channels * height * width;
        if *n != batch || per == 0 || data.len() != batch * per {
            return Err(InferError::Backend(format!("activation maps of shape {shape:?} for a batch of {batch}")));
        }
        Ok(Maps {
            channels: *channels,
            height: *height,
            width: *width,
            items: data.chunks(per).map(<[f32]>::to_vec).collect(),
        })
    }
}

/// One B-scan's probabilities and the statistics of its input (for the review rule), and
/// when the model gives them its activation maps and the size of the B-scan they cover.
struct Scored {
    probabilities: Vec<f32>,
    mean_std: (f32, f32),
    /// The model's own score of how unlike its training images the input is.
    unlikeness: Option<f32>,
    /// `[classes, h, w]` values and (h, w).
    map: Option<(Vec<f32>, usize, usize)>,
    size: (usize, usize),
}

/// Where the model looked: the activation map of the predicted class on the B-scan the
/// label comes from (for a volume, its most suspicious one), on the model's grid.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Heatmap {
    pub frame: u32,
    pub grid_width: u32,
    pub grid_height: u32,
    /// Row-major, `grid_width * grid_height` values (logit units).
    pub values: Vec<f32>,
    /// The B-scan the map is drawn on.
    pub frame_width: u32,
    pub frame_height: u32,
}

pub struct Classifier {
    manifest: Manifest,
    backend: Box<dyn Backend>,
    stamp: ModelStamp,
    min_confidence: f32,
    batch_size: usize,
    triage: TriageConfig,
    outputs: OutputPositions,
}

/// Where the outputs the manifest declares are among the model's outputs after the first.
#[derive(Debug, Clone, Copy, Default)]
struct OutputPositions {
    heatmap: Option<usize>,
    ood: Option<usize>,
}

impl OutputPositions {
    /// By name where the backend knows the names; otherwise in the order the trainer
    /// exports them (logits, heatmap, ood score).
    fn resolve(manifest: &Manifest, names: &[String]) -> Result<OutputPositions, InferError> {
        let named = !names.is_empty() && names.iter().all(|n| !n.is_empty());
        let find = |wanted: &str| -> Result<usize, InferError> {
            names.iter().skip(1).position(|n| n == wanted).ok_or_else(|| {
                InferError::Model(format!("the manifest names output {wanted}; the model's outputs are {names:?}"))
            })
        };
        if named && names.first() != Some(&manifest.output.name) {
            return Err(InferError::Model(format!(
                "the manifest's output {} is not the model's first output; the model's outputs are {names:?}",
                manifest.output.name
            )));
        }
        let heatmap = manifest.heatmap.as_ref().map(|h| if named { find(&h.output) } else { Ok(0) }).transpose()?;
        let ood = manifest
            .ood
            .as_ref()
            .map(|o| if named { find(&o.output) } else { Ok(usize::from(heatmap.is_some())) })
            .transpose()?;
        Ok(OutputPositions { heatmap, ood })
    }
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier").field("stamp", &self.stamp).finish()
    }
}

/// The cores this process may run on (1 when the system cannot say): what inference threads
/// and sessions are sized against.
pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path)?;
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

impl Heatmap {
    /// The map drawn over its B-scan: an RGBA PNG of the B-scan's size, the map upsampled
    /// (bilinear, half-pixel centres, as the model's input was resized) and scaled from its
    /// lowest to its highest value; colour from blue to red, and transparent where the model
    /// looked least, so the scan shows through.
    pub fn overlay_png(&self) -> Result<Vec<u8>, InferError> {
        let (gw, gh) = (self.grid_width as usize, self.grid_height as usize);
        let (fw, fh) = (self.frame_width as usize, self.frame_height as usize);
        if gw == 0 || gh == 0 || fw == 0 || fh == 0 || self.values.len() != gw * gh {
            return Err(InferError::Input("a heatmap of inconsistent size".into()));
        }
        // A map of 7x7 values needs no more than 1024 pixels a side: the page stretches it
        // over the B-scan (same aspect), and a huge B-scan does not cost a huge overlay.
        let scale = (1024.0 / fw.max(fh) as f32).min(1.0);
        let (fw, fh) = (((fw as f32 * scale).round() as usize).max(1), ((fh as f32 * scale).round() as usize).max(1));
        let lo = self.values.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = self.values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let span = if hi - lo > 1e-6 { hi - lo } else { 1.0 };
        let at = |x: usize, y: usize| (self.values[y * gw + x] - lo) / span;
        let mut rgba = Vec::with_capacity(fw * fh * 4);
        for y in 0..fh {
            let gy = ((y as f32 + 0.5) * gh as f32 / fh as f32 - 0.5).clamp(0.0, (gh - 1) as f32);
            let (y0, ty) = (gy.floor() as usize, gy.fract());
            let y1 = (y0 + 1).min(gh - 1);
            for x in 0..fw {
                let gx = ((x as f32 + 0.5) * gw as f32 / fw as f32 - 0.5).clamp(0.0, (gw - 1) as f32);
                let (x0, tx) = (gx.floor() as usize, gx.fract());
                let x1 = (x0 + 1).min(gw - 1);
                let top = at(x0, y0) * (1.0 - tx) + at(x1, y0) * tx;
                let bottom = at(x0, y1) * (1.0 - tx) + at(x1, y1) * tx;
                let v = (top * (1.0 - ty) + bottom * ty).clamp(0.0, 1.0);
                let [r, g, b] = colour(v);
                rgba.extend_from_slice(&[r, g, b, (v.powf(1.5) * 220.0) as u8]);
            }
        }
        let image = image::RgbaImage::from_raw(fw as u32, fh as u32, rgba)
            .ok_or_else(|| InferError::Input("a heatmap of inconsistent size".into()))?;
        let mut png = std::io::Cursor::new(Vec::new());
        image.write_to(&mut png, image::ImageFormat::Png).map_err(|e| InferError::Input(format!("PNG: {e}")))?;
        Ok(png.into_inner())
    }
}

/// Blue -> cyan -> green -> yellow -> red.
fn colour(v: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] =
        [[0.0, 0.0, 255.0], [0.0, 255.0, 255.0], [0.0, 255.0, 0.0], [255.0, 255.0, 0.0], [255.0, 0.0, 0.0]];
    let p = v.clamp(0.0, 1.0) * 4.0;
    let i = (p.floor() as usize).min(3);
    let t = p - i as f32;
    let [a, b] = [STOPS[i], STOPS[i + 1]];
    [0, 1, 2].map(|k| (a[k] + (b[k] - a[k]) * t) as u8)
}

/// What the process runs after each model load to hand the memory the load used and freed
/// back to the system; the binary registers glibc's `malloc_trim`, since this library has no
/// unsafe code. Building a session's graph leaves about 15 MiB per ONNX Runtime session
/// free but resident in the allocator's heap (docs/benchmarks.md, "Memory within 120 MiB").
static RELEASE_AFTER_LOAD: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// What the process runs to have the allocations of the calling thread start on a 64-byte
/// line (true) or as the allocator likes (false): the binary's allocator, since this library
/// has no unsafe code. ONNX Runtime's kernels run slower on weights at a lesser alignment
/// (`ort_backend::SharedWeights`).
static ALIGN_WEIGHTS: std::sync::OnceLock<fn(bool)> = std::sync::OnceLock::new();

/// Register how weights are aligned (once per process; later calls change nothing).
pub fn align_weights_with(aligning: fn(bool)) {
    let _ = ALIGN_WEIGHTS.set(aligning);
}

/// While held, the calling thread's allocations are aligned for weights.
pub(crate) struct AligningWeights(());

impl AligningWeights {
    pub(crate) fn start() -> Self {
        if let Some(aligning) = ALIGN_WEIGHTS.get() {
            aligning(true);
        }
        AligningWeights(())
    }
}

impl Drop for AligningWeights {
    fn drop(&mut self) {
        if let Some(aligning) = ALIGN_WEIGHTS.get() {
            aligning(false);
        }
    }
}

/// Register what runs after each model load (once per process; later calls change nothing).
pub fn release_after_load(release: fn()) {
    let _ = RELEASE_AFTER_LOAD.set(release);
}

impl Classifier {
    /// Load the model folder `dir`, checking model.onnx against the manifest's sha256.
    pub fn load(dir: &Path, config: &ModelConfig, triage: &TriageConfig) -> Result<Classifier, InferError> {
        let loaded = Self::load_checked(dir, config, triage);
        if let Some(release) = RELEASE_AFTER_LOAD.get() {
            release();
        }
        loaded
    }

    fn load_checked(dir: &Path, config: &ModelConfig, triage: &TriageConfig) -> Result<Classifier, InferError> {
        let manifest = Manifest::load(dir)?;
        let model_path = dir.join(&manifest.model_file);
        let sha256 = sha256_file(&model_path)
            .map_err(|e| InferError::Model(format!("cannot read {}: {e}", model_path.display())))?;
        if !sha256.eq_ignore_ascii_case(&manifest.sha256) {
            return Err(InferError::Model(format!(
                "{} has sha256 {sha256}, the manifest says {}",
                model_path.display(),
                manifest.sha256
            )));
        }
        let backend = load_backend(&model_path, &sha256, &manifest, config)?;
        let stamp = ModelStamp {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            sha256,
            backend: backend.name().to_string(),
        };
        let min_confidence = config.min_confidence.unwrap_or(manifest.review.min_confidence);
        let outputs = OutputPositions::resolve(&manifest, &backend.output_names())?;
        let batch_size = match config.batch_size {
            0 => backend.preferred_batch().max(1),
            n => n,
        };
        let classifier =
            Classifier { outputs, manifest, backend, stamp, min_confidence, batch_size, triage: triage.clone() };
        // A model that loads but cannot run (wrong input shape, wrong output width) must
        // fail here, at start-up, not on the first patient's scan.
        let probe = GreyFrame { width: 8, height: 8, pixels: vec![0.5; 64] };
        // Alone: the idle machine's session, where there is one, is tried (and warmed) too.
        classifier.classify_frames(std::slice::from_ref(&probe))?;
        classifier.classify_frames_with_heatmap(&[probe], true)?;
        Ok(classifier)
    }

    pub fn stamp(&self) -> &ModelStamp {
        &self.stamp
    }

    pub fn classes(&self) -> &[String] {
        &self.manifest.classes
    }

    /// The backend's sessions run on one copy of the model's weights.
    pub fn shares_weights(&self) -> bool {
        self.backend.shares_weights()
    }

    /// The backend computes in reduced precision (FP16); see `update::selftest`.
    pub fn reduced_precision(&self) -> bool {
        self.backend.reduced_precision()
    }

    /// The model's input as its manifest describes it.
    pub fn input_spec(&self) -> &manifest::InputSpec {
        &self.manifest.input
    }

    /// The backend alone on a ready NCHW tensor: raw scores, one row per batch item (for
    /// benchmarks and cross-backend parity checks).
    pub fn run_tensor(&self, input: Vec<f32>, shape: [usize; 4]) -> Result<Vec<Vec<f32>>, InferError> {
        self.backend.run(input, shape).map(|o| o.scores)
    }

    /// The model gives activation maps (its manifest declares them).
    pub fn has_heatmap(&self) -> bool {
        self.manifest.heatmap.is_some()
    }

    pub fn classify_artifact(&self, artifact: &Path) -> Result<Classification, InferError> {
        self.classify_artifact_with_heatmap(artifact).map(|(c, _)| c)
    }

    /// As [`Classifier::classify_artifact`], with where the model looked when it can say.
    pub fn classify_artifact_with_heatmap(
        &self,
        artifact: &Path,
    ) -> Result<(Classification, Option<Heatmap>), InferError> {
        self.classify_source_with_heatmap(frames::Source::File(artifact))
    }

    /// As [`Classifier::classify_artifact_with_heatmap`], from a written artefact or a
    /// de-identified DICOM object still in memory.
    pub fn classify_source_with_heatmap(
        &self,
        source: frames::Source<'_>,
    ) -> Result<(Classification, Option<Heatmap>), InferError> {
        let lanes = self.backend.parallel_calls().min(MAX_LANES);
        let scored = match lanes {
            0 | 1 => {
                let mut scored = Vec::new();
                frames::for_each_batch_of(source, self.batch_size, |batch| {
                    self.score_batch(batch, &mut scored, false)
                })?;
                scored
            }
            _ => self.score_in_lanes(source, lanes)?,
        };
        self.with_heatmap(scored)
    }

    /// A volume's batches on several sessions at once, each on its own core: the volume is
    /// not held to one worker's share of the machine. At most `2 * lanes + 2` batches are
    /// converted at a time; results are put back in frame order. A failure is the first
    /// failing batch's, as one lane would have met it; a panic is raised again here, as if
    /// the batches had run on this thread.
    fn score_in_lanes(&self, source: frames::Source<'_>, lanes: usize) -> Result<Vec<Scored>, InferError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Vec<GreyFrame>)>(lanes);
        let rx = std::sync::Mutex::new(rx);
        let done = std::sync::Mutex::new(Vec::<(usize, Vec<Scored>)>::new());
        let failed = std::sync::Mutex::new(None::<(usize, InferError)>);
        let panicked = std::sync::Mutex::new(None::<Box<dyn std::any::Any + Send>>);
        let stopped = || {
            failed.lock().map(|f| f.is_some()).unwrap_or(true) || panicked.lock().map(|p| p.is_some()).unwrap_or(true)
        };
        let produced = std::thread::scope(|s| {
            for _ in 0..lanes {
                s.spawn(|| loop {
                    // Every lane drains the channel to its end, even after a failure, so the
                    // producer never waits on a full channel nobody reads.
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok((index, batch)) = job else { return };
                    if stopped() {
                        continue;
                    }
                    let mut out = Vec::with_capacity(batch.len());
                    // Caught, so that a lane never dies and leaves the producer waiting.
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.score_batch(&batch, &mut out, false)
                    }));
                    match outcome {
                        Ok(Ok(())) => {
                            if let Ok(mut done) = done.lock() {
                                done.push((index, out));
                            }
                        }
                        Ok(Err(e)) => {
                            if let Ok(mut f) = failed.lock() {
                                if f.as_ref().is_none_or(|(first, _)| index < *first) {
                                    *f = Some((index, e));
                                }
                            }
                        }
                        Err(payload) => {
                            if let Ok(mut p) = panicked.lock() {
                                p.get_or_insert(payload);
                            }
                        }
                    }
                });
            }
            let mut index = 0;
            let produced = frames::for_each_batch_of(source, self.batch_size, |batch| {
                if stopped() {
                    return Err(InferError::Backend("an inference lane failed".into()));
                }
                tx.send((index, batch.to_vec())).map_err(|_| InferError::Backend("inference lanes stopped".into()))?;
                index += 1;
                Ok(())
            });
            drop(tx);
            produced.map(|()| index)
        });
        if let Some(payload) = panicked.into_inner().ok().flatten() {
            std::panic::resume_unwind(payload);
        }
        if let Some((_, e)) = failed.into_inner().ok().flatten() {
            return Err(e);
        }
        let batches = produced?;
        let mut done = done.into_inner().map_err(|_| InferError::Backend("an inference lane panicked".into()))?;
        if done.len() != batches {
            return Err(InferError::Backend("an inference lane stopped early".into()));
        }
        done.sort_by_key(|(index, _)| *index);
        Ok(done.into_iter().flat_map(|(_, scored)| scored).collect())
    }

    /// As [`Classifier::classify_frames`], with where the model looked when it can say.
    /// `alone`: no other scan is being processed, so a single B-scan may have every core
    /// ([`Backend::run_single`]).
    pub fn classify_frames_with_heatmap(
        &self,
        frames: &[GreyFrame],
        alone: bool,
    ) -> Result<(Classification, Option<Heatmap>), InferError> {
        let mut scored = Vec::with_capacity(frames.len());
        let single = alone && frames.len() == 1;
        for batch in frames.chunks(self.batch_size) {
            self.score_batch(batch, &mut scored, single)?;
        }
        self.with_heatmap(scored)
    }

    fn with_heatmap(&self, scored: Vec<Scored>) -> Result<(Classification, Option<Heatmap>), InferError> {
        let classification = self.summarise(&scored)?;
        let heatmap = (|| {
            let frame = classification.most_suspicious_frame as usize;
            let class = self.manifest.classes.iter().position(|c| *c == classification.label)?;
            let s = scored.get(frame)?;
            let (map, h, w) = s.map.as_ref()?;
            let (h, w) = (*h, *w);
            let values = map.get(class * h * w..(class + 1) * h * w)?.to_vec();
            // A broken model's NaN would make the stored result unreadable: no heatmap then.
            if values.iter().any(|v| !v.is_finite()) {
                return None;
            }
            Some(Heatmap {
                frame: frame as u32,
                grid_width: w as u32,
                grid_height: h as u32,
                values,
                frame_width: s.size.0 as u32,
                frame_height: s.size.1 as u32,
            })
        })();
        Ok((classification, heatmap))
    }

    /// Per-B-scan probabilities -> one result. For a volume: each class's probability is its
    /// maximum over B-scans, the label is that of the least normal B-scan, and
    /// `most_suspicious_frame` says which one it is.
    pub fn classify_frames(&self, frames: &[GreyFrame]) -> Result<Classification, InferError> {
        self.classify_frames_with_heatmap(frames, false).map(|(c, _)| c)
    }

    /// Run one batch; append each B-scan's probabilities and input statistics. `single`: the
    /// batch is a single B-scan's whole scan ([`Backend::run_single`]).
    fn score_batch(&self, batch: &[GreyFrame], out: &mut Vec<Scored>, single: bool) -> Result<(), InferError> {
        let spec = &self.manifest.input;
        let classes = &self.manifest.classes;
        let mut input = Vec::with_capacity(spec.channels * spec.height * spec.width * batch.len());
        for frame in batch {
            preprocess::preprocess_into(frame, spec, &mut input);
        }
        let shape = [batch.len(), spec.channels, spec.height, spec.width];
        let outputs = if single { self.backend.run_single(input, shape)? } else { self.backend.run(input, shape)? };
        let declared = |index: usize, what: &str| {
            outputs
                .others
                .get(index)
                .ok_or_else(|| InferError::Model(format!("the manifest declares {what}, the model has no such output")))
        };
        let mut maps = match self.outputs.heatmap {
            Some(index) => {
                let raw = declared(index, "activation maps")?;
                let maps = Maps::from_flat(&raw.shape, &raw.data, batch.len())?;
                if maps.channels != classes.len() {
                    return Err(InferError::Model(format!(
                        "the activation maps have {} channels, the manifest names {} classes",
                        maps.channels,
                        classes.len()
                    )));
                }
                let (h, w) = (maps.height, maps.width);
                maps.items.into_iter().map(|m| Some((m, h, w))).collect()
            }
            None => Vec::new(),
        };
        maps.resize(batch.len(), None);
        let mut unlikeness: Vec<Option<f32>> = match self.outputs.ood {
            Some(index) => declared(index, "an ood score")?.per_item(batch.len())?.into_iter().map(Some).collect(),
            None => Vec::new(),
        };
        unlikeness.resize(batch.len(), None);
        for (((row, frame), map), unlikeness) in outputs.scores.into_iter().zip(batch).zip(maps).zip(unlikeness) {
            if row.len() != classes.len() {
                return Err(InferError::Model(format!(
                    "model gives {} scores, the manifest names {} classes",
                    row.len(),
                    classes.len()
                )));
            }
            let probabilities = match self.manifest.output.kind {
                manifest::OutputKind::Logits => softmax(&row),
                manifest::OutputKind::Probabilities => row,
            };
            out.push(Scored {
                probabilities,
                mean_std: frame.mean_std(),
                unlikeness,
                map,
                size: (frame.width, frame.height),
            });
        }
        Ok(())
    }

    fn summarise(&self, scored: &[Scored]) -> Result<Classification, InferError> {
        let classes = &self.manifest.classes;
        if scored.is_empty() {
            return Err(InferError::Input("no B-scans to classify".into()));
        }
        let probabilities: Vec<&Vec<f32>> = scored.iter().map(|s| &s.probabilities).collect();
        let normal = classes.iter().position(|c| c.eq_ignore_ascii_case("NORMAL"));
        let abnormality = |p: &&Vec<f32>| match normal {
            Some(i) => 1.0 - p[i],
            None => p.iter().copied().fold(0.0, f32::max),
        };
        let suspicious = (0..probabilities.len())
            .max_by(|&a, &b| abnormality(&probabilities[a]).total_cmp(&abnormality(&probabilities[b])))
            .unwrap_or(0);
        let chosen = &probabilities[suspicious];
        let top = argmax(chosen);
        let label = classes[top].clone();
        let confidence = chosen[top];
        let per_class_max: BTreeMap<String, f32> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), probabilities.iter().map(|p| p[i]).fold(0.0, f32::max)))
            .collect();

        let mut review_reasons = Vec::new();
        // NaN confidence (a broken model) must also be flagged.
        if confidence.is_nan() || confidence < self.min_confidence {
            review_reasons.push("low_confidence".to_string());
        }
        let unlike_training_score = scored[suspicious].unlikeness;
        if self.unlike_by_score(scored, suspicious) || self.unlike_training(scored[suspicious].mean_std) {
            review_reasons.push("input_unlike_training".to_string());
        }
        let needs_review = !review_reasons.is_empty();
        let mut priority = self.triage.priorities.get(&label).copied().unwrap_or(Priority::Routine);
        if needs_review && self.triage.review_priority < priority {
            priority = self.triage.review_priority;
        }
        Ok(Classification {
            label,
            probabilities: per_class_max,
            confidence,
            needs_review,
            review_reasons,
            priority,
            priority_rank: priority.rank(),
            frames: probabilities.len() as u32,
            most_suspicious_frame: suspicious as u32,
            unlike_training_score: unlike_training_score.filter(|s| s.is_finite()),
        })
    }

    /// The model's own score says so: for the B-scan the label comes from, or for a volume
    /// as a whole (its median B-scan). Not the most unlike B-scan of a volume: the threshold
    /// flags a share of ordinary B-scans, so some B-scan of almost every long volume would
    /// pass it. A non-finite score anywhere (a broken model) is flagged.
    fn unlike_by_score(&self, scored: &[Scored], labelled: usize) -> bool {
        let Some(ood) = &self.manifest.ood else { return false };
        let mut scores: Vec<f32> = scored.iter().filter_map(|s| s.unlikeness).collect();
        if scores.iter().any(|s| !s.is_finite()) {
            return true;
        }
        let above = |s: f32| s > ood.threshold;
        if scored.get(labelled).and_then(|s| s.unlikeness).is_some_and(above) {
            return true;
        }
        if scores.len() < 2 {
            return false;
        }
        scores.sort_by(f32::total_cmp);
        // The lower median: two B-scans are judged by the more ordinary one.
        above(scores[(scores.len() - 1) / 2])
    }

    fn unlike_training(&self, (mean, std): (f32, f32)) -> bool {
        let outside = |v: f32, range: Option<[f32; 2]>| range.is_some_and(|[lo, hi]| v < lo || v > hi);
        outside(mean, self.manifest.review.input_mean_range) || outside(std, self.manifest.review.input_std_range)
    }
}

/// The configured backend, or the next one down the chain TensorRT -> CUDA -> CPU ONNX
/// Runtime -> tract when it cannot load here (no GPU, no library). Every fall is logged; the
/// backend that runs is named in the model stamp (results, status, metrics).
fn load_backend(
    model_path: &Path,
    sha256: &str,
    manifest: &Manifest,
    config: &ModelConfig,
) -> Result<Box<dyn Backend>, InferError> {
    use ort_backend::{OrtBackend, OrtSettings, Provider};
    let chain: &[Option<Provider>] = match config.backend {
        BackendKind::Tract => &[None],
        BackendKind::Onnxruntime => &[Some(Provider::Cpu), None],
        BackendKind::Cuda => &[Some(Provider::Cuda), Some(Provider::Cpu), None],
        // Without a GPU device `auto` does not try the GPU providers at every model load.
        BackendKind::Auto if ort_backend::gpu_device().is_none() => &[Some(Provider::Cpu), None],
        BackendKind::Tensorrt | BackendKind::Auto => {
            &[Some(Provider::TensorRt), Some(Provider::Cuda), Some(Provider::Cpu), None]
        }
    };
    // Sessions run at once, each with its own pool: unset, each gets its share of the
    // cores, since more threads than cores cost more in switching than they give.
    let share = (cores() / config.concurrency.max(1)).max(1);
    let settings = OrtSettings {
        library: config.onnxruntime_library.clone(),
        threads: match config.threads {
            0 => share,
            n => n,
        },
        fp16: config.fp16,
        engine_cache: config.engine_cache_dir.clone(),
        sessions: config.concurrency.max(1),
        // Unset threads: a lone B-scan on an idle daemon gets every core (a session more,
        // sharing the weights; docs/benchmarks.md, "A lone B-scan on every core").
        idle_threads: match config.threads {
            0 if share < cores() => cores(),
            _ => 0,
        },
    };
    let mut failures = Vec::new();
    for step in chain {
        let loaded: Result<Box<dyn Backend>, InferError> = match step {
            Some(provider) => {
                OrtBackend::load(model_path, sha256, *provider, &settings).map(|b| Box::new(b) as Box<dyn Backend>)
            }
            None => tract_backend::TractBackend::load(
                model_path,
                manifest.input.channels,
                manifest.input.height,
                manifest.input.width,
                config.threads,
            )
            .map(|b| Box::new(b) as Box<dyn Backend>),
        };
        match loaded {
            Ok(backend) => {
                if !failures.is_empty() {
                    // Under `auto` a missing GPU provider is expected, not a fault to warn of.
                    if config.backend == BackendKind::Auto {
                        tracing::info!(backend = backend.name(), not_available = %failures.join("; "), "inference backend chosen");
                    } else {
                        tracing::warn!(backend = backend.name(), fell_back_from = %failures.join("; "), "inference backend fallback");
                    }
                }
                return Ok(backend);
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    Err(InferError::Model(failures.join("; ")))
}

fn softmax(z: &[f32]) -> Vec<f32> {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = z.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|v| v / sum).collect()
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers NORMAL for every frame except those whose first pixel is 1 (CNV), with the
    /// frame's second pixel as its ood score, shaped `[batch]`.
    struct Scripted;

    impl Backend for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        fn run(&self, input: Vec<f32>, shape: [usize; 4]) -> Result<Outputs, InferError> {
            let per = shape[1] * shape[2] * shape[3];
            let items: Vec<&[f32]> = input.chunks(per).collect();
            let scores = items
                .iter()
                .map(|x| if x[0] > 0.5 { vec![4.0, 0.0, 0.0, 0.0] } else { vec![0.0, 0.0, 0.0, 4.0] })
                .collect();
            let ood = items.iter().map(|x| x[1]).collect();
            Ok(Outputs { scores, others: vec![RawOutput { shape: vec![shape[0]], data: ood }] })
        }
    }

    fn scripted(threshold: f32) -> Classifier {
        let manifest: Manifest = serde_json::from_value(serde_json::json!({
            "format_version": 1, "name": "t", "version": "1.0.0", "sha256": "",
            "input": {"layout": "NCHW", "channels": 1, "height": 1, "width": 2, "colour": "grey",
                      "resize": "bilinear_half_pixel", "value_range": [0.0, 1.0], "mean": [0.0], "std": [1.0]},
            "output": {"name": "logits", "kind": "logits"},
            "ood": {"output": "ood", "method": "test", "threshold": threshold},
            "classes": ["CNV", "DME", "DRUSEN", "NORMAL"],
            "review": {"min_confidence": 0.0}
        }))
        .unwrap();
        let outputs = OutputPositions::resolve(&manifest, &[]).unwrap();
        Classifier {
            manifest,
            backend: Box::new(Scripted),
            stamp: ModelStamp { name: "t".into(), version: "1.0.0".into(), sha256: String::new(), backend: "s".into() },
            min_confidence: 0.0,
            batch_size: 4,
            triage: TriageConfig::default(),
            outputs,
        }
    }

    /// A 1x2 frame: (CNV?, ood score).
    fn frame(cnv: bool, score: f32) -> GreyFrame {
        GreyFrame { width: 2, height: 1, pixels: vec![if cnv { 1.0 } else { 0.0 }, score] }
    }

    fn unlike(c: &Classification) -> bool {
        c.review_reasons.iter().any(|r| r == "input_unlike_training")
    }

    #[test]
    fn the_ood_score_flags_the_labelled_b_scan_or_the_volume_as_a_whole() {
        let c = scripted(2.0);
        // One unusual B-scan among ordinary ones: a volume is not flagged for it.
        let mut volume: Vec<GreyFrame> = (0..9).map(|_| frame(false, 1.0)).collect();
        volume.push(frame(false, 9.0));
        volume[3] = frame(true, 1.5);
        let r = c.classify_frames(&volume).unwrap();
        assert_eq!((r.label.as_str(), r.most_suspicious_frame), ("CNV", 3));
        assert_eq!(r.unlike_training_score, Some(1.5), "the score of the labelled B-scan");
        assert!(!unlike(&r), "{r:?}");
        // The labelled B-scan above the threshold.
        volume[3] = frame(true, 2.5);
        assert!(unlike(&c.classify_frames(&volume).unwrap()));
        // Most B-scans above it: the volume as a whole is unlike training.
        let mostly: Vec<GreyFrame> = (0..5).map(|i| frame(i == 0, if i == 0 { 1.0 } else { 3.0 })).collect();
        let r = c.classify_frames(&mostly).unwrap();
        assert!(unlike(&r) && r.needs_review, "{r:?}");
        // Of two B-scans, the more ordinary one speaks for the volume.
        assert!(!unlike(&c.classify_frames(&[frame(true, 1.0), frame(false, 9.0)]).unwrap()));
        // A single B-scan at the threshold is not above it.
        assert!(!unlike(&c.classify_frames(&[frame(false, 2.0)]).unwrap()));
    }

    #[test]
    fn a_non_finite_score_anywhere_is_flagged_and_not_reported() {
        let c = scripted(2.0);
        let r = c.classify_frames(&[frame(false, f32::NAN)]).unwrap();
        assert!(unlike(&r) && r.unlike_training_score.is_none(), "{r:?}");
        let r = c.classify_frames(&[frame(true, 0.5), frame(false, f32::NEG_INFINITY)]).unwrap();
        assert!(unlike(&r), "{r:?}");
        assert_eq!(r.unlike_training_score, Some(0.5));
    }

    #[test]
    fn an_ood_output_of_the_wrong_shape_is_refused() {
        let out = RawOutput { shape: vec![2, 2], data: vec![0.0; 4] };
        assert!(out.per_item(2).is_err());
        assert!(RawOutput { shape: vec![], data: vec![] }.per_item(1).is_err());
        assert_eq!(RawOutput { shape: vec![2, 1], data: vec![1.0, 2.0] }.per_item(2).unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn outputs_are_found_by_name_and_the_first_must_be_the_scores() {
        let c = scripted(1.0);
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let p = OutputPositions::resolve(&c.manifest, &names(&["logits", "extra", "ood"])).unwrap();
        assert_eq!((p.heatmap, p.ood), (None, Some(1)));
        let e = OutputPositions::resolve(&c.manifest, &names(&["ood", "logits"])).unwrap_err().to_string();
        assert!(e.contains("first output"), "{e}");
        let e = OutputPositions::resolve(&c.manifest, &names(&["logits", "cam"])).unwrap_err().to_string();
        assert!(e.contains("names output ood"), "{e}");
    }

    #[test]
    fn softmax_is_stable_and_normalised() {
        let p = softmax(&[1000.0, 1000.0, -1000.0]);
        assert!((p[0] - 0.5).abs() < 1e-6 && (p[1] - 0.5).abs() < 1e-6 && p[2] == 0.0);
    }
}
