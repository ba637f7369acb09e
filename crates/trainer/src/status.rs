//! What `octd-trainer status` reports: label counts, live accuracy, and the policy's view
//! of the next training.

use serde_json::{json, Value};

use crate::policy::{self, PolicyConfig};
use crate::store::{Store, StoreError};

pub async fn gather(store: &Store, policy: &PolicyConfig, now_ms: i64) -> Result<Value, StoreError> {
    let current = store.current_labels().await?;
    let revisions = store.label_revisions().await?;
    let splits = store.split_counts().await?;
    let accuracy = policy::live_accuracy(&current, policy.accuracy_window);
    let jobs = store.jobs(10).await?;
    let decision = policy::decide(policy, &current, jobs.first().map(|j| j.training_mark()), now_ms);
    Ok(json!({
        "labels": {"scans": current.len(), "revisions": revisions, "patients_by_split": splits},
        "accuracy": accuracy,
        "next_training": decision,
        "jobs": jobs,
        "singan": policy::singan(policy, current.len() as u64),
    }))
}
