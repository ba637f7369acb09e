//! Upkeep: published scans and their artefacts go after `store.retention`, linkage after
//! `deid.linkage_retention`, sealed quarantined originals after `store.quarantine_retention`;
//! the spool is swept of originals no longer needed; releases asked for by
//! `octd quarantine release` are performed. All in one task, so that a release never races a
//! sweep of the same original.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::quarantine::{release, ReleaseAnswer};
use super::{recovery, Pipeline};
use crate::ingest::Job;
use crate::scan::now_ms;

/// How often release requests are looked for: a person waits at the command.
const RELEASE_POLL: Duration = Duration::from_secs(1);
/// Releases performed per look, so that a flood of requests cannot starve the rest.
const RELEASES_PER_TURN: usize = 16;

pub async fn upkeep_loop(pipeline: Arc<Pipeline>, jobs: mpsc::Sender<Job>, mut shutdown: watch::Receiver<bool>) {
    let mut prune = tokio::time::interval(pipeline.config.store.prune_interval);
    let mut releases = tokio::time::interval(RELEASE_POLL);
    releases.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = crate::shutdown::requested(&mut shutdown) => return,
            _ = prune.tick() => prune_once(&pipeline).await,
            _ = releases.tick() => release_requested(&pipeline, &jobs, &mut shutdown).await,
        }
    }
}

async fn prune_once(pipeline: &Arc<Pipeline>) {
    let now = now_ms();
    let cutoff = now.saturating_sub(pipeline.config.store.retention.as_millis() as u64);
    let linkage_cutoff = now.saturating_sub(pipeline.config.deid.linkage_retention.as_millis() as u64);
    // A verdict waiting for the trainer holds its scan, for `uplink.max_hold` past retention.
    let hold_cutoff = cutoff.saturating_sub(pipeline.config.uplink.max_hold.as_millis() as u64);
    let p = pipeline.clone();
    match tokio::task::spawn_blocking(move || p.store.prune_holding(cutoff, linkage_cutoff, hold_cutoff)).await {
        Ok(Ok((artefacts, forced))) => {
            for name in &artefacts {
                let _ = std::fs::remove_file(pipeline.dirs.deid.join(name));
            }
            if !artefacts.is_empty() {
                tracing::info!(count = artefacts.len(), "pruned published scans past retention");
            }
            if forced > 0 {
                let detail = format!(
                    "{forced} scans were pruned with verdicts the trainer never received: they waited longer than \
                     uplink.max_hold past store.retention"
                );
                tracing::error!(count = forced, "scans pruned with undelivered verdicts");
                let event = pipeline.topics.event(crate::scan::EventKind::Alarm, "uplink_hold_expired", &detail);
                let p = pipeline.clone();
                let _ =
                    tokio::task::spawn_blocking(move || p.store.enqueue(&crate::mqtt::event_outbox(&p.topics, &event)))
                        .await;
                pipeline.wake.notify_one();
            }
        }
        Ok(Err(e)) => tracing::error!(error = %e, "pruning failed; retrying at the next turn"),
        Err(e) => tracing::error!(error = %e, "pruning task failed"),
    }
    let p = pipeline.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let purged = p.quarantine.prune(p.config.store.quarantine_retention);
        let swept = recovery::sweep(&p, false);
        (purged, swept)
    })
    .await;
    match outcome {
        Ok((Ok(purged), _)) if !purged.is_empty() => {
            tracing::info!(count = purged.len(), "purged sealed quarantined originals past retention")
        }
        Ok((Err(e), _)) => tracing::error!(error = %e, "purging the quarantine failed; retrying at the next turn"),
        _ => {}
    }
}

async fn release_requested(pipeline: &Arc<Pipeline>, jobs: &mpsc::Sender<Job>, shutdown: &mut watch::Receiver<bool>) {
    let p = pipeline.clone();
    let answered = tokio::task::spawn_blocking(move || {
        let mut released = Vec::new();
        for id in p.quarantine.release_requests(RELEASES_PER_TURN) {
            let answer = release(&p.store, &p.quarantine, &p.dirs.spool, id).unwrap_or_else(|e| ReleaseAnswer {
                scan_id: id,
                released: false,
                detail: format!("the store could not record the release: {e}"),
            });
            if let Err(e) = p.quarantine.answer_release(&answer) {
                tracing::error!(scan_id = %id, error = %e, "cannot answer a release request");
            }
            if answer.released {
                released.push(id);
            } else {
                tracing::warn!(scan_id = %id, detail = %answer.detail, "release refused");
            }
        }
        released
    })
    .await;
    for scan_id in answered.unwrap_or_default() {
        // Durable as `received` already: if the queue is gone (shutdown), the next start resumes it.
        tokio::select! {
            _ = crate::shutdown::requested(shutdown) => return,
            sent = jobs.send(Job { scan_id, queued_at: Instant::now() }) => if sent.is_err() { return },
        }
    }
}
