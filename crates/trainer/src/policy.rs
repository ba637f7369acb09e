//! The retrain policy as designed: retrain when the live accuracy of the model in use
//! falls below the floor over enough labels, or when enough new confirmed labels arrived
//! since the last training; never twice within the cooldown. Pure functions over the
//! labels that count (each scan's highest revision), so the rule is testable on its own.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::LabelRecord;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Retrain when the model in use is right less often than this...
    pub accuracy_floor: f64,
    /// ...over at least this many of its labels (fewer say too little)...
    pub min_labels_for_accuracy: u64,
    /// ...among its most recent labels (the window of live accuracy).
    pub accuracy_window: u64,
    /// Retrain when this many new confirmed labels arrived since the last training.
    pub retrain_every_labels: u64,
    /// No training starts within this long of the previous one.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// SinGAN synthesises training images while the real labelled set is smaller.
    pub singan_until_real_labels: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            accuracy_floor: 0.92,
            min_labels_for_accuracy: 100,
            accuracy_window: 500,
            retrain_every_labels: 500,
            cooldown: Duration::from_secs(24 * 3600),
            singan_until_real_labels: 250_000,
        }
    }
}

/// The device and the trainer count accuracy the same way: one implementation, octd's.
pub use octd::feedback::accuracy::{wilson, Accuracy};

/// Accuracy of the last `window` labels (by arrival) of each group.
fn windowed(labels: &[&LabelRecord], window: u64, key: impl Fn(&LabelRecord) -> String) -> BTreeMap<String, Accuracy> {
    let mut groups: BTreeMap<String, Vec<&LabelRecord>> = BTreeMap::new();
    for l in labels {
        groups.entry(key(l)).or_default().push(l);
    }
    groups
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_by_key(|l| l.received_at);
            let recent = &v[v.len().saturating_sub(window as usize)..];
            let correct = recent.iter().filter(|l| l.label == l.predicted).count() as u64;
            (k, wilson(correct, recent.len() as u64))
        })
        .collect()
}

pub fn model_key(l: &LabelRecord) -> String {
    format!("{} {}", l.model_name, l.model_version)
}

/// Live accuracy by model version, site, device and fleet-wide.
#[derive(Debug, Clone, Serialize)]
pub struct LiveAccuracy {
    pub fleet: Accuracy,
    pub by_model: BTreeMap<String, Accuracy>,
    pub by_site: BTreeMap<String, Accuracy>,
    pub by_device: BTreeMap<String, Accuracy>,
}

pub fn live_accuracy(current: &[LabelRecord], window: u64) -> LiveAccuracy {
    let all: Vec<&LabelRecord> = current.iter().collect();
    LiveAccuracy {
        fleet: windowed(&all, window, |_| String::new()).remove("").unwrap_or_else(|| wilson(0, 0)),
        by_model: windowed(&all, window, model_key),
        by_site: windowed(&all, window, |l| l.site.clone()),
        by_device: windowed(&all, window, |l| format!("{}/{}", l.site, l.device)),
    }
}

/// Why a training would start now, or what would start the next one.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "trigger", rename_all = "snake_case")]
pub enum Decision {
    /// The model in use is below the floor over enough labels.
    AccuracyBelowFloor { model: String, accuracy: Accuracy },
    /// Enough new labels arrived since the last training.
    NewLabels { since_last_training: u64 },
    /// A trigger holds but the previous training is too recent.
    CoolingDown { until_ms: i64, pending: Box<Decision> },
    /// Nothing yet: how far each trigger is.
    Wait {
        labels_until_count_trigger: u64,
        model: Option<String>,
        accuracy: Option<Accuracy>,
        labels_until_accuracy_counts: u64,
    },
}

impl Decision {
    pub fn should_train(&self) -> bool {
        matches!(self, Decision::AccuracyBelowFloor { .. } | Decision::NewLabels { .. })
    }
}

/// The model in use: the one that predicted the most recently arrived label.
pub fn model_in_use(current: &[LabelRecord]) -> Option<String> {
    current.iter().max_by_key(|l| l.received_at).map(model_key)
}

/// Decide at `now_ms`, given the labels that count, when the last training started (ms)
/// and how many labels counted then.
pub fn decide(
    policy: &PolicyConfig,
    current: &[LabelRecord],
    last_training: Option<(i64, u64)>,
    now_ms: i64,
) -> Decision {
    let (last_start, labels_then) = last_training.unwrap_or((i64::MIN, 0));
    let since = (current.len() as u64).saturating_sub(labels_then);
    let model = model_in_use(current);
    let accuracy = model.as_ref().and_then(|m| {
        let of_model: Vec<&LabelRecord> = current.iter().filter(|l| model_key(l) == *m).collect();
        windowed(&of_model, policy.accuracy_window, |_| String::new()).remove("")
    });
    let trigger = match (&model, accuracy) {
        (Some(m), Some(a)) if a.labels >= policy.min_labels_for_accuracy && a.accuracy < policy.accuracy_floor => {
            Some(Decision::AccuracyBelowFloor { model: m.clone(), accuracy: a })
        }
        _ if since >= policy.retrain_every_labels => Some(Decision::NewLabels { since_last_training: since }),
        _ => None,
    };
    match trigger {
        Some(t) => {
            let until = last_start.saturating_add(policy.cooldown.as_millis() as i64);
            if now_ms < until {
                Decision::CoolingDown { until_ms: until, pending: Box::new(t) }
            } else {
                t
            }
        }
        None => Decision::Wait {
            labels_until_count_trigger: policy.retrain_every_labels.saturating_sub(since),
            labels_until_accuracy_counts: policy
                .min_labels_for_accuracy
                .saturating_sub(accuracy.map(|a| a.labels).unwrap_or(0)),
            model,
            accuracy,
        },
    }
}

/// SinGAN is on while the real labelled set is below the threshold.
pub fn singan(policy: &PolicyConfig, real_labels: u64) -> bool {
    real_labels < policy.singan_until_real_labels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(i: i64, right: bool, model: &str) -> LabelRecord {
        LabelRecord {
            site: "s".into(),
            device: "d".into(),
            scan_id: format!("scan-{i}"),
            revision: 1,
            label: "CNV".into(),
            predicted: if right { "CNV" } else { "DME" }.into(),
            probabilities: "{}".into(),
            model_name: "m".into(),
            model_version: model.into(),
            model_sha256: String::new(),
            reviewer: "r".into(),
            reviewed_at: String::new(),
            laterality: String::new(),
            patient: "p".into(),
            image_sha256: String::new(),
            image_kind: "png".into(),
            body_sha256: String::new(),
            received_at: i,
            withdrawn: false,
        }
    }

    fn policy() -> PolicyConfig {
        PolicyConfig {
            min_labels_for_accuracy: 20,
            retrain_every_labels: 50,
            accuracy_window: 40,
            ..Default::default()
        }
    }

    #[test]
    fn wilson_matches_the_textbook_values() {
        // 8 of 10: 0.490 .. 0.943 (Wilson 1927; Newcombe 1998, table I).
        let a = wilson(8, 10);
        assert!((a.low - 0.4902).abs() < 1e-3 && (a.high - 0.9433).abs() < 1e-3, "{a:?}");
        let all = wilson(20, 20);
        assert_eq!(all.high, 1.0);
        assert!((all.low - 0.8389).abs() < 1e-3, "{all:?}");
        assert_eq!(wilson(0, 0).labels, 0);
    }

    #[test]
    fn the_count_trigger_fires_at_exactly_the_configured_number_of_new_labels() {
        let p = policy();
        let labels: Vec<_> = (0..49).map(|i| label(i, true, "1")).collect();
        assert!(matches!(decide(&p, &labels, None, 0), Decision::Wait { labels_until_count_trigger: 1, .. }));
        let labels: Vec<_> = (0..50).map(|i| label(i, true, "1")).collect();
        assert_eq!(decide(&p, &labels, None, 0), Decision::NewLabels { since_last_training: 50 });
        // Counted from the last training.
        assert!(!decide(&p, &labels, Some((0, 10)), i64::MAX / 2).should_train());
    }

    #[test]
    fn the_accuracy_trigger_needs_enough_labels_and_looks_at_the_model_in_use() {
        let p = policy();
        // 19 labels, all wrong: too few to judge.
        let few: Vec<_> = (0..19).map(|i| label(i, false, "1")).collect();
        assert!(!decide(&p, &few, None, 0).should_train());
        // 20 labels at 18/20 = 0.90 < 0.92: retrain.
        let mut twenty: Vec<_> = (0..20).map(|i| label(i, i >= 2, "1")).collect();
        assert!(matches!(decide(&p, &twenty, None, 0), Decision::AccuracyBelowFloor { .. }));
        // 19 of 20 right (0.95): no trigger.
        twenty[1].predicted = "CNV".into();
        assert!(!decide(&p, &twenty, None, 0).should_train());
        // A new model version starts its own window: the old version's errors do not count.
        let mut mixed: Vec<_> = (0..30).map(|i| label(i, false, "1")).collect();
        mixed.extend((30..45).map(|i| label(i, true, "2")));
        assert!(!decide(&p, &mixed, None, 0).should_train(), "{:?}", decide(&p, &mixed, None, 0));
    }

    #[test]
    fn the_window_forgets_old_errors() {
        let p = policy();
        // 30 wrong long ago, then 40 right: the window of 40 sees only the right ones.
        let labels: Vec<_> = (0..70).map(|i| label(i, i >= 30, "1")).collect();
        let acc = live_accuracy(&labels, p.accuracy_window);
        assert_eq!(acc.fleet.labels, 40);
        assert_eq!(acc.fleet.correct, 40);
    }

    #[test]
    fn the_cooldown_holds_a_trigger_back() {
        let p = policy();
        let labels: Vec<_> = (0..60).map(|i| label(i, true, "1")).collect();
        let started = 1_000;
        let during = decide(&p, &labels, Some((started, 0)), started + 1000);
        assert!(matches!(during, Decision::CoolingDown { .. }) && !during.should_train());
        let after = decide(&p, &labels, Some((started, 0)), started + p.cooldown.as_millis() as i64);
        assert!(after.should_train());
    }

    #[test]
    fn singan_is_switched_by_the_real_label_count() {
        let p = PolicyConfig { singan_until_real_labels: 100, ..Default::default() };
        assert!(singan(&p, 99));
        assert!(!singan(&p, 100));
    }
}
