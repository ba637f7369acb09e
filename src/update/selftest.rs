//! A bundle's self-test: its sample inputs must give this exact model's expected outputs on
//! this device's backend, or the model does not classify a patient's scan.

use std::path::Path;

use octd_bundle::{SelfTest, SelfTestCase};

use crate::infer::{frames, Classifier};

/// The widest difference accepted from an FP16 backend (TensorRT), whose outputs differ from
/// the fp32 expectations a bundle is packed with by up to ~1e-2; labels must still agree.
pub const REDUCED_PRECISION_TOLERANCE: f32 = 2e-2;

/// Ok, or the first disagreement in words.
pub fn run(classifier: &Classifier, bundle_dir: &Path, test: &SelfTest) -> Result<(), String> {
    let tolerance =
        if classifier.reduced_precision() { test.tolerance.max(REDUCED_PRECISION_TOLERANCE) } else { test.tolerance };
    for (i, case) in test.cases.iter().enumerate() {
        let frames = frames::load(&bundle_dir.join(&case.input)).map_err(|e| format!("case {i}: {e}"))?;
        // As the pipeline's workers classify; a single B-scan also as a scan alone does (on the
        // session with every core's threads, where the backend keeps one).
        let got = classifier.classify_frames(&frames).map_err(|e| format!("case {i}: {e}"))?;
        check(i, case, &got, tolerance)?;
        if frames.len() == 1 {
            let alone = classifier
                .classify_frames_with_heatmap(&frames, true)
                .map_err(|e| format!("case {i} (alone, on every core): {e}"))?
                .0;
            check(i, case, &alone, tolerance).map_err(|e| format!("{e} (alone, on every core)"))?;
        }
    }
    Ok(())
}

/// One case's answer against what the bundle expects.
fn check(i: usize, case: &SelfTestCase, got: &crate::scan::Classification, tolerance: f32) -> Result<(), String> {
    if got.label != case.label {
        return Err(format!("case {i}: label {} where the bundle expects {}", got.label, case.label));
    }
    if got.probabilities.len() != case.probabilities.len() {
        return Err(format!("case {i}: the model's classes differ from the expected ones"));
    }
    // The score that decides `input_unlike_training` must be this model's on this backend
    // too: a backend that breaks it (NaN, FP16 overflow) would flag every scan or none.
    if let Some(expected) = case.unlike_training_score {
        let actual = got.unlike_training_score.unwrap_or(f32::NAN);
        let allowed = tolerance.max(tolerance * expected.abs());
        let diff = (actual - expected).abs();
        if diff.is_nan() || diff > allowed {
            return Err(format!(
                "case {i}: unlike-training score {actual:.6}, expected {expected:.6} (tolerance {allowed})"
            ));
        }
    }
    for (class, expected) in &case.probabilities {
        let actual = got.probabilities.get(class).copied().unwrap_or(f32::NAN);
        let diff = (actual - expected).abs();
        // NaN fails too.
        if diff.is_nan() || diff > tolerance {
            return Err(format!("case {i}: P({class}) = {actual:.6}, expected {expected:.6} (tolerance {tolerance})"));
        }
    }
    Ok(())
}
