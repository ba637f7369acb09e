//! Live accuracy: the model's prediction against the reviewer's verdict over the most recent
//! verdicts (each scan's latest revision), with a Wilson 95 % interval, overall, per confirmed
//! class and per model version. Pure functions; the trainer computes its own the same way.

use std::collections::BTreeMap;

use crate::scan::{rfc3339_ms, LabelRecord, QUALITY_SCHEMA};
pub use crate::scan::{Accuracy, LiveAccuracy};

/// Wilson score interval at 95 % (z = 1.96): honest at small counts and near 0 or 1.
pub fn wilson(correct: u64, n: u64) -> Accuracy {
    if n == 0 {
        return Accuracy { labels: 0, correct: 0, accuracy: 0.0, low: 0.0, high: 1.0 };
    }
    let z = 1.959_963_984_540_054_f64;
    let (k, n_f) = (correct as f64, n as f64);
    let p = k / n_f;
    let denom = 1.0 + z * z / n_f;
    let centre = (p + z * z / (2.0 * n_f)) / denom;
    let half = z * ((p * (1.0 - p) / n_f) + z * z / (4.0 * n_f * n_f)).sqrt() / denom;
    // At 0 and n the bound is exactly 0 or 1; the formula only gets there up to rounding.
    let low = if correct == 0 { 0.0 } else { (centre - half).max(0.0) };
    let high = if correct == n { 1.0 } else { (centre + half).min(1.0) };
    Accuracy { labels: n, correct, accuracy: p, low, high }
}

pub struct Settings<'a> {
    pub site: &'a str,
    pub device: &'a str,
    pub window: usize,
    pub floor: f64,
    pub min_labels: u64,
}

pub fn live_accuracy(labels: &[LabelRecord], settings: &Settings, now_ms: u64) -> LiveAccuracy {
    let mut per_class: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut per_model: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut correct = 0u64;
    // A withdrawn verdict (an undone first one) leaves the scan without a verdict.
    let labels: Vec<&LabelRecord> = labels.iter().filter(|l| !l.withdrawn).collect();
    for label in &labels {
        let right = label.predicted == label.label;
        correct += u64::from(right);
        let class = per_class.entry(label.label.clone()).or_default();
        class.0 += u64::from(right);
        class.1 += 1;
        let model = per_model.entry(label.model_version.clone()).or_default();
        model.0 += u64::from(right);
        model.1 += 1;
    }
    let n = labels.len() as u64;
    let overall = wilson(correct, n);
    let as_accuracy = |m: BTreeMap<String, (u64, u64)>| m.into_iter().map(|(k, (c, n))| (k, wilson(c, n))).collect();
    LiveAccuracy {
        schema: QUALITY_SCHEMA.into(),
        site: settings.site.into(),
        device: settings.device.into(),
        at: rfc3339_ms(now_ms),
        window: settings.window,
        overall,
        per_class: as_accuracy(per_class),
        per_model_version: as_accuracy(per_model),
        corrected: n - correct,
        floor: settings.floor,
        min_labels: settings.min_labels,
        below_floor: n >= settings.min_labels && overall.accuracy < settings.floor,
    }
}

/// What the alarm must do now, given whether it is raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmChange {
    Raise,
    Clear,
    Keep,
}

pub fn alarm_change(raised: bool, report: &LiveAccuracy) -> AlarmChange {
    match (raised, report.below_floor) {
        (false, true) => AlarmChange::Raise,
        // Cleared when accuracy is back at the floor; too few verdicts to judge keeps it.
        (true, false) if report.overall.labels >= report.min_labels => AlarmChange::Clear,
        _ => AlarmChange::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::ScanId;

    fn verdict(label: &str, predicted: &str, model: &str) -> LabelRecord {
        LabelRecord {
            seq: 0,
            scan_id: ScanId::new(),
            revision: 1,
            label: label.into(),
            predicted: predicted.into(),
            model_version: model.into(),
            reviewer: "rv".into(),
            reviewed_at: String::new(),
            received_at_ms: 0,
            source: "cli".into(),
            has_comment: false,
            undo: false,
            withdrawn: false,
            replaced: None,
        }
    }

    fn settings() -> Settings<'static> {
        Settings { site: "s", device: "d", window: 500, floor: 0.92, min_labels: 10 }
    }

    #[test]
    fn wilson_matches_the_textbook_values() {
        // 45 of 50: 0.90 with the Wilson interval [0.786, 0.957].
        let a = wilson(45, 50);
        assert!((a.low - 0.7864).abs() < 1e-3 && (a.high - 0.9565).abs() < 1e-3, "{a:?}");
        assert_eq!(wilson(0, 0).labels, 0);
        assert_eq!(wilson(10, 10).high, 1.0);
        assert_eq!(wilson(0, 10).low, 0.0);
    }

    #[test]
    fn accuracy_is_split_by_confirmed_class_and_model_version() {
        let labels = vec![
            verdict("CNV", "CNV", "0.2.0"),
            verdict("CNV", "DME", "0.2.0"),
            verdict("NORMAL", "NORMAL", "0.3.0"),
            verdict("DME", "DME", "0.3.0"),
        ];
        let r = live_accuracy(&labels, &settings(), 0);
        assert_eq!((r.overall.correct, r.overall.labels), (3, 4));
        assert_eq!((r.per_class["CNV"].correct, r.per_class["CNV"].labels), (1, 2));
        assert_eq!(r.per_model_version["0.3.0"].accuracy, 1.0);
        assert_eq!(r.corrected, 1);
        assert!(!r.below_floor, "four verdicts are fewer than min_labels");
    }

    #[test]
    fn the_alarm_is_raised_below_the_floor_and_cleared_once_it_recovers() {
        let mut labels: Vec<LabelRecord> = (0..9).map(|_| verdict("CNV", "CNV", "1")).collect();
        labels.push(verdict("CNV", "DME", "1"));
        let r = live_accuracy(&labels, &settings(), 0);
        assert!(r.below_floor, "9/10 = 0.90 < 0.92");
        assert_eq!(alarm_change(false, &r), AlarmChange::Raise);
        assert_eq!(alarm_change(true, &r), AlarmChange::Keep);
        labels.extend((0..20).map(|_| verdict("CNV", "CNV", "1")));
        let r = live_accuracy(&labels, &settings(), 0);
        assert_eq!(alarm_change(true, &r), AlarmChange::Clear);
        assert_eq!(alarm_change(false, &r), AlarmChange::Keep);
    }
}
