//! The model manifest: the one contract between the trainer and the edge
//! (docs/model-manifest.md). Preprocessing is derived from it, never hard-coded.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::InferError;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    pub version: String,
    #[serde(default = "default_model_file")]
    pub model_file: String,
    /// sha256 of `model_file`, hex.
    pub sha256: String,
    pub input: InputSpec,
    pub output: OutputSpec,
    /// A second output with one activation map per class (docs/model-manifest.md); without
    /// it the model is valid and the reading room shows no heatmap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heatmap: Option<HeatmapSpec>,
    pub classes: Vec<String>,
    #[serde(default)]
    pub review: ReviewSpec,
    /// A further output with one score per input: how unlike the training images it is
    /// (docs/model-manifest.md). Above `threshold` the result asks for review.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood: Option<OodSpec>,
}

fn default_model_file() -> String {
    "model.onnx".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputSpec {
    #[serde(default = "default_input_name")]
    pub name: String,
    pub layout: String,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub colour: String,
    pub resize: String,
    pub value_range: [f32; 2],
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

fn default_input_name() -> String {
    "input".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    Logits,
    Probabilities,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputSpec {
    pub name: String,
    pub kind: OutputKind,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeatmapSpec {
    /// The output's name; it is the model's second output, shaped [batch, classes, h, w].
    pub output: String,
    /// `class_activation`: the classifier's weights over the last feature map, so that the
    /// mean of a class's map is its logit.
    pub kind: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OodSpec {
    /// The output's name; shaped `[batch]` or `[batch, 1]`, higher = less like training.
    pub output: String,
    /// How the trainer computed it (`mahalanobis`, `knn`, `energy`): informative; the score
    /// comes from the model itself, so the edge computes it exactly as the trainer did.
    pub method: String,
    /// Above this score an input is `input_unlike_training`.
    pub threshold: f32,
    /// The share of in-distribution inputs of unseen patients the trainer measured above
    /// `threshold` (the rate it was chosen for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_distribution_flag_rate: Option<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReviewSpec {
    /// Below this top-class probability a scan is flagged for review.
    pub min_confidence: f32,
    /// Range of the mean grey level (0..1) of training inputs; outside it: unlike training.
    pub input_mean_range: Option<[f32; 2]>,
    /// Range of the grey-level standard deviation of training inputs.
    pub input_std_range: Option<[f32; 2]>,
}

impl Default for ReviewSpec {
    fn default() -> Self {
        ReviewSpec { min_confidence: 0.6, input_mean_range: None, input_std_range: None }
    }
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Manifest, InferError> {
        let path = dir.join("manifest.json");
        let bytes =
            std::fs::read(&path).map_err(|e| InferError::Model(format!("cannot read {}: {e}", path.display())))?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| InferError::Model(format!("{} is not a valid manifest: {e}", path.display())))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Refuse what this edge cannot reproduce exactly.
    pub fn validate(&self) -> Result<(), InferError> {
        let bad = |m: String| Err(InferError::Model(format!("manifest: {m}")));
        if self.format_version != 1 {
            return bad(format!("format_version {} is not supported (1 is)", self.format_version));
        }
        if self.input.layout != "NCHW" {
            return bad(format!("layout {} is not supported (NCHW is)", self.input.layout));
        }
        if !matches!(self.input.channels, 1 | 3) {
            return bad(format!("{} input channels; 1 or 3 are supported", self.input.channels));
        }
        if self.input.colour != "grey" {
            return bad(format!("colour {} is not supported (grey is)", self.input.colour));
        }
        if self.input.resize != "bilinear_half_pixel" {
            return bad(format!("resize {} is not supported (bilinear_half_pixel is)", self.input.resize));
        }
        if self.input.value_range != [0.0, 1.0] {
            return bad("value_range must be [0, 1]".into());
        }
        if self.input.height == 0 || self.input.width == 0 || self.input.height > 4096 || self.input.width > 4096 {
            return bad("input height and width must be within 1..4096".into());
        }
        let n = self.input.channels;
        if !(self.input.mean.len() == 1 || self.input.mean.len() == n) || self.input.std.len() != self.input.mean.len()
        {
            return bad("mean and std need one value, or one per channel".into());
        }
        if self.input.std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return bad("std must be positive".into());
        }
        if self.classes.len() < 2 {
            return bad("at least two classes are needed".into());
        }
        if let Some(h) = &self.heatmap {
            if h.kind != "class_activation" {
                return bad(format!("heatmap kind {} is not supported (class_activation is)", h.kind));
            }
            if h.output.is_empty() || h.output == self.output.name {
                return bad("the heatmap is a second, named output".into());
            }
        }
        if let Some(o) = &self.ood {
            if o.output.is_empty()
                || o.output == self.output.name
                || self.heatmap.as_ref().is_some_and(|h| h.output == o.output)
            {
                return bad("the ood score is its own, named output".into());
            }
            if !o.threshold.is_finite() {
                return bad("ood.threshold must be a finite number".into());
            }
        }
        let mut sorted = self.classes.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != self.classes.len() {
            return bad("class names must be unique".into());
        }
        if !(0.0..=1.0).contains(&self.review.min_confidence) {
            return bad("review.min_confidence must be within 0..1".into());
        }
        Ok(())
    }
}
