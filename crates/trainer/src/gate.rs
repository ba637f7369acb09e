//! The evaluation gate: a candidate replaces the model in use only if it is not worse on the
//! fixed, patient-disjoint holdout. Both models classify the same holdout images with octd's
//! own inference code (what a device would answer), and the paired outcome decides:
//!
//! - `b` = images the current model gets right and the candidate wrong,
//!   `c` = images the candidate gets right and the current model wrong (the discordant pairs);
//! - the candidate is accepted iff `c - b >= -floor(gate.tolerance * n)`: with the default
//!   tolerance 0, iff it gets at least as many holdout images right as the current model;
//! - McNemar's exact test (two-sided binomial on the discordant pairs) is reported with it, so
//!   an operator sees whether a difference is more than chance; it does not decide, because
//!   "not worse" must hold on the images themselves, not only "not significantly worse".
//!
//! A holdout smaller than `gate.min_holdout` cannot tell models apart: nothing is published.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::policy::{wilson, Accuracy};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateConfig {
    /// The model in use while the channel lists none: the model devices ship with.
    pub baseline: PathBuf,
    /// Fewer holdout images than this: the candidate is rejected (no trustworthy comparison).
    pub min_holdout: u64,
    /// Share of the holdout the candidate may get wrong beyond the current model (0: not
    /// worse, image for image).
    pub tolerance: f64,
    /// Holdout images packed into the bundle as its self-test (a device reproduces their
    /// outputs before it uses the model); generated B-scans when the holdout has no PNG.
    pub selftest_cases: usize,
    /// Publish without any comparison when neither the channel nor `baseline` holds a model
    /// (bootstrapping a new product line). Off: such a job fails instead.
    pub allow_without_baseline: bool,
    /// Largest difference of a class probability the device's self-test allows.
    pub selftest_tolerance: f32,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            baseline: "models/default".into(),
            min_holdout: 30,
            tolerance: 0.0,
            selftest_cases: 8,
            selftest_tolerance: 1e-3,
            allow_without_baseline: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GateError {
    /// The model in use cannot be scored: the service's problem, not the candidate's.
    #[error("{0}")]
    Model(String),
    /// The candidate cannot be loaded or does not answer: it is rejected.
    #[error("{0}")]
    Candidate(String),
    #[error("the evaluation was cancelled")]
    Cancelled,
}

/// One holdout image as a file, and its confirmed label.
#[derive(Debug, Clone)]
pub struct HoldoutImage {
    pub path: PathBuf,
    pub label: String,
}

/// A model on the holdout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Score {
    pub name: String,
    pub version: String,
    pub accuracy: Accuracy,
    /// Images it could not classify (counted as wrong).
    pub errors: u64,
    /// Per class: (right, of).
    pub per_class: std::collections::BTreeMap<String, (u64, u64)>,
}

/// What the gate decided, and why: kept with the job, shown by `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Evaluation {
    pub rule: String,
    pub holdout_images: u64,
    pub candidate: Score,
    /// None: no model in use to compare with, or one whose classes differ (see `reason`).
    pub current: Option<Score>,
    /// Right by the current model only.
    pub current_only_right: u64,
    /// Right by the candidate only.
    pub candidate_only_right: u64,
    /// McNemar's exact two-sided p-value on the discordant pairs (None without a comparison).
    pub mcnemar_p: Option<f64>,
    pub accepted: bool,
    pub reason: String,
}

pub const RULE: &str = "accept iff candidate_only_right - current_only_right >= -floor(tolerance * holdout_images) \
                        on the same holdout images (McNemar's exact p reported, not used)";

/// The decision from the paired outcomes: `pairs[i] = (current right, candidate right)`.
pub fn decide(config: &GateConfig, pairs: &[(bool, bool)], has_current: bool) -> (bool, String, u64, u64, f64) {
    let n = pairs.len() as u64;
    let b = pairs.iter().filter(|(cur, cand)| *cur && !*cand).count() as u64;
    let c = pairs.iter().filter(|(cur, cand)| !*cur && *cand).count() as u64;
    let p = mcnemar_exact(b, c);
    if n < config.min_holdout {
        let why = format!(
            "the holdout holds {n} images, fewer than gate.min_holdout ({}): no trustworthy comparison",
            config.min_holdout
        );
        return (false, why, b, c, p);
    }
    if !has_current {
        return (true, "no model in use to compare with".into(), b, c, p);
    }
    let allowed = (config.tolerance * n as f64).floor() as i64;
    let margin = c as i64 - b as i64;
    if margin >= -allowed {
        (true, format!("not worse: {c} images right only by the candidate, {b} only by the current model"), b, c, p)
    } else {
        (
            false,
            format!(
                "worse: {b} holdout images right only by the current model, {c} only by the candidate (allowed: {allowed})"
            ),
            b,
            c,
            p,
        )
    }
}

/// McNemar's exact test: two-sided binomial(b + c, 1/2) at min(b, c), in log space so large
/// holdouts do not underflow.
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    let ln_half_n = n as f64 * 0.5f64.ln();
    let mut ln_choose = 0.0f64; // ln C(n, 0)
    let mut terms = Vec::with_capacity(k as usize + 1);
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        terms.push(ln_choose + ln_half_n);
    }
    let max = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let tail = max.exp() * terms.iter().map(|t| (t - max).exp()).sum::<f64>();
    (2.0 * tail).min(1.0)
}

/// Classify every holdout image with one model (octd's inference, as on a device). Returns
/// per image whether it was right, and the score.
pub fn score(model_dir: &Path, holdout: &[HoldoutImage], cancel: &AtomicBool) -> Result<(Vec<bool>, Score), GateError> {
    let config = octd::config::Config::default();
    let classifier = octd::infer::Classifier::load(model_dir, &config.model, &config.triage)
        .map_err(|e| GateError::Model(format!("{}: {e}", model_dir.display())))?;
    let stamp = classifier.stamp().clone();
    let mut right = Vec::with_capacity(holdout.len());
    let mut errors = 0u64;
    let mut per_class = std::collections::BTreeMap::<String, (u64, u64)>::new();
    for image in holdout {
        if cancel.load(Ordering::Relaxed) {
            return Err(GateError::Cancelled);
        }
        let ok = match classifier.classify_artifact(&image.path) {
            Ok(c) => c.label == image.label,
            Err(e) => {
                tracing::warn!(image = %image.path.display(), error = %e, model = %stamp.version, "holdout image not classified");
                errors += 1;
                false
            }
        };
        let entry = per_class.entry(image.label.clone()).or_default();
        entry.0 += u64::from(ok);
        entry.1 += 1;
        right.push(ok);
    }
    let correct = right.iter().filter(|r| **r).count() as u64;
    let score = Score {
        name: stamp.name.clone(),
        version: stamp.version.clone(),
        accuracy: wilson(correct, right.len() as u64),
        errors,
        per_class,
    };
    Ok((right, score))
}

/// The classes a model answers with, from its manifest.
pub fn classes(model_dir: &Path) -> Result<Vec<String>, GateError> {
    octd::infer::Manifest::load(model_dir)
        .map(|m| m.classes)
        .map_err(|e| GateError::Model(format!("{}: {e}", model_dir.display())))
}

/// Score both models on the holdout and decide. `current` is None when there is no model
/// in use to compare with.
pub fn evaluate(
    config: &GateConfig,
    candidate: &Path,
    current: Option<&Path>,
    holdout: &[HoldoutImage],
    cancel: &AtomicBool,
) -> Result<Evaluation, GateError> {
    let as_candidate = |e: GateError| match e {
        GateError::Model(why) => GateError::Candidate(why),
        other => other,
    };
    let candidate_classes = classes(candidate).map_err(as_candidate)?;
    let (candidate_right, candidate_score) = score(candidate, holdout, cancel).map_err(as_candidate)?;
    let (current_right, current_score) = match current {
        Some(dir) => {
            let current_classes = classes(dir)?;
            if current_classes != candidate_classes {
                let reason = format!(
                    "the candidate's classes {candidate_classes:?} differ from the model in use {current_classes:?}: \
                     devices and labels speak the latter"
                );
                return Ok(Evaluation {
                    rule: RULE.into(),
                    holdout_images: holdout.len() as u64,
                    candidate: candidate_score,
                    current: None,
                    current_only_right: 0,
                    candidate_only_right: 0,
                    mcnemar_p: None,
                    accepted: false,
                    reason,
                });
            }
            let (right, score) = score(dir, holdout, cancel)?;
            (right, Some(score))
        }
        None => (vec![false; holdout.len()], None),
    };
    let pairs: Vec<(bool, bool)> = current_right.into_iter().zip(candidate_right).collect();
    let compared = current_score.is_some();
    let (accepted, reason, b, c, p) = decide(config, &pairs, compared);
    Ok(Evaluation {
        rule: RULE.into(),
        holdout_images: holdout.len() as u64,
        candidate: candidate_score,
        current: current_score,
        current_only_right: b,
        candidate_only_right: c,
        mcnemar_p: compared.then_some(p),
        accepted,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(both: usize, cur_only: usize, cand_only: usize, neither: usize) -> Vec<(bool, bool)> {
        let mut v = vec![(true, true); both];
        v.extend(vec![(true, false); cur_only]);
        v.extend(vec![(false, true); cand_only]);
        v.extend(vec![(false, false); neither]);
        v
    }

    #[test]
    fn mcnemar_matches_the_binomial_tables() {
        // b=1, c=9: 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11/1024.
        assert!((mcnemar_exact(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert!((mcnemar_exact(9, 1) - 22.0 / 1024.0).abs() < 1e-12);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        // Large counts do not underflow to 0 or NaN.
        let p = mcnemar_exact(4000, 4100);
        assert!(p > 0.2 && p < 0.5, "{p}");
    }

    #[test]
    fn a_candidate_that_loses_one_image_net_is_rejected_and_a_tie_is_accepted() {
        let config = GateConfig { min_holdout: 10, ..GateConfig::default() };
        let (ok, why, b, c, _) = decide(&config, &pairs(30, 3, 2, 5), true);
        assert!(!ok, "{why}");
        assert_eq!((b, c), (3, 2));
        assert!(decide(&config, &pairs(30, 3, 3, 5), true).0);
        assert!(decide(&config, &pairs(30, 0, 1, 5), true).0);
    }

    #[test]
    fn the_tolerance_allows_a_stated_share_of_the_holdout() {
        let config = GateConfig { min_holdout: 10, tolerance: 0.05, ..GateConfig::default() };
        // n = 40: two images allowed.
        assert!(decide(&config, &pairs(30, 4, 2, 4), true).0);
        assert!(!decide(&config, &pairs(30, 5, 2, 3), true).0);
    }

    #[test]
    fn a_small_holdout_publishes_nothing() {
        let config = GateConfig::default();
        let (ok, why, ..) = decide(&config, &pairs(10, 0, 5, 0), true);
        assert!(!ok);
        assert!(why.contains("gate.min_holdout"), "{why}");
    }
}
