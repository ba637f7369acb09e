//! Retention: published scans and their artefacts go after `store.retention`, linkage after
//! `deid.linkage_retention`. Quarantined scans wait for a person.

use std::sync::Arc;

use tokio::sync::watch;

use super::Pipeline;
use crate::scan::now_ms;

pub async fn prune_loop(pipeline: Arc<Pipeline>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(pipeline.config.store.prune_interval);
    loop {
        tokio::select! {
            _ = crate::shutdown::requested(&mut shutdown) => return,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let cutoff = now.saturating_sub(pipeline.config.store.retention.as_millis() as u64);
        let linkage_cutoff = now.saturating_sub(pipeline.config.deid.linkage_retention.as_millis() as u64);
        let p = pipeline.clone();
        match tokio::task::spawn_blocking(move || p.store.prune(cutoff, linkage_cutoff)).await {
            Ok(Ok(artefacts)) => {
                for name in &artefacts {
                    let _ = std::fs::remove_file(pipeline.dirs.deid.join(name));
                }
                if !artefacts.is_empty() {
                    tracing::info!(count = artefacts.len(), "pruned published scans past retention");
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "pruning failed; retrying at the next turn"),
            Err(e) => tracing::error!(error = %e, "pruning task failed"),
        }
    }
}
