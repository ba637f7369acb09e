//! `octd-trainer serve`: the intake API, health, and the model channel as static files,
//! on one listener. Stateless apart from the database and the object store, so a fleet runs
//! several replicas behind a load balancer.

use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;
use tower_http::services::ServeDir;
use tower_http::timeout::TimeoutLayer;

use crate::blobs::Blobs;
use crate::config::Config;
use crate::intake::{self, Intake};
use crate::store::Store;

const HOLDOUT_KEY: &str = "holdout_key";
const DEFAULT_ROOT_EXPIRY: Duration = Duration::from_secs(365 * 24 * 3600);

pub async fn open(config: &Config) -> anyhow::Result<(Store, Blobs)> {
    let store = Store::open(&config.storage.database, config.storage.max_connections).await?;
    let blobs = Blobs::open(&config.storage.blobs, &config.storage.s3_endpoint)?;
    Ok((store, blobs))
}

/// The key of the patient split, created once and shared through the database.
async fn holdout_key(store: &Store) -> anyhow::Result<[u8; 32]> {
    let mut fresh = [0u8; 32];
    rand::rng().fill_bytes(&mut fresh);
    let stored = store.setting_or_insert(HOLDOUT_KEY, &hex::encode(fresh)).await?;
    let bytes = hex::decode(stored)?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("the stored holdout key is not 32 bytes"))
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    // A fresh machine gets a channel on the first start, as `octd-trainer init` would make it.
    if !config.channel.dir.join("metadata").join("root.json").exists() {
        let made = crate::channel::init(&config.channel.dir, &config.channel.keys, DEFAULT_ROOT_EXPIRY).await?;
        tracing::warn!(channel = %config.channel.dir.display(), keys = %config.channel.keys.display(),
            "created a model channel and its keys; move root.pk8 offline before production ({made})");
    }
    let (store, blobs) = open(&config).await?;
    let key = holdout_key(&store).await?;
    let abandoned = store.fail_abandoned_jobs(crate::now_ms() - config.jobs.abandon_after.as_millis() as i64).await?;
    if !abandoned.is_empty() {
        tracing::warn!(jobs = ?abandoned, "training jobs interrupted by a stop were failed");
    }
    let (stop_jobs, jobs_stop) = tokio::sync::watch::channel(false);
    let trainer = tokio::spawn(policy_loop(config.clone(), store.clone(), blobs.clone(), jobs_stop));
    let metrics = crate::operator::IntakeMetrics::default();
    let intake = Arc::new(Intake::new(store.clone(), blobs.clone(), config.intake.clone(), key, metrics.clone()));
    let operator = Arc::new(crate::operator::Operator::new(
        store.clone(),
        config.policy.clone(),
        config.server.operator_token.clone(),
        metrics,
    ));
    let app = intake::router(intake)
        .merge(crate::operator::router(operator))
        .nest_service("/channel", ServeDir::new(&config.channel.dir))
        .layer(TimeoutLayer::with_status_code(axum::http::StatusCode::REQUEST_TIMEOUT, config.intake.request_timeout));
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    tracing::info!(listen = %config.server.listen, database = %config.redacted().storage.database,
        blobs = %config.storage.blobs, "serving");
    axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(shutdown())
        .await?;
    // A running job is stopped (its process group) and recorded as stopped before the
    // store closes.
    let _ = stop_jobs.send(true);
    if tokio::time::timeout(Duration::from_secs(30), trainer).await.is_err() {
        tracing::warn!("the training job did not stop within 30 s");
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Snapshot and timestamp metadata are re-signed when they expire within this.
const CHANNEL_REFRESH_MARGIN: Duration = Duration::from_secs(7 * 24 * 3600);

/// Ask the policy every `jobs.check_interval`; train when it says so. A job runs inside
/// this loop, so one replica trains at most one model at a time (and the job slot in the
/// database keeps other replicas out).
async fn policy_loop(config: Config, store: Store, blobs: Blobs, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.jobs.check_interval) => {}
            _ = stop.changed() => return,
        }
        let channel = &config.channel;
        match crate::channel::refresh_if_due(
            &channel.dir,
            &channel.keys,
            channel.targets_expiry,
            CHANNEL_REFRESH_MARGIN,
        )
        .await
        {
            Ok(true) => tracing::info!("re-signed the channel's snapshot and timestamp before they expire"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot re-sign the channel's metadata; devices refuse it once it expires")
            }
        }
        // A job whose service died (here or on another replica) stops beating: fail it, so
        // its slot does not stay taken however quickly the service came back.
        let stale = crate::now_ms() - config.jobs.abandon_after.as_millis() as i64;
        match store.fail_abandoned_jobs(stale).await {
            Ok(failed) if !failed.is_empty() => {
                tracing::warn!(jobs = ?failed, "training jobs whose service stopped were failed")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "checking for abandoned jobs"),
        }
        let decision = async {
            let current = store.current_labels().await?;
            let last = store.last_training().await?;
            Ok::<_, crate::store::StoreError>(crate::policy::decide(&config.policy, &current, last, crate::now_ms()))
        }
        .await;
        let decision = match decision {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "policy check");
                continue;
            }
        };
        tracing::debug!(decision = ?decision, "policy checked");
        if !decision.should_train() {
            continue;
        }
        let trigger = serde_json::to_value(&decision).unwrap_or_default();
        let run = crate::jobs::run(&store, &blobs, &config, trigger, stop.clone());
        match run.await {
            Ok(job) => tracing::info!(job = %job.id, state = %job.state, "policy-triggered training ended"),
            Err(crate::jobs::JobError::Busy) => tracing::info!("a training job is already running"),
            Err(e) => tracing::error!(error = %e, "policy-triggered training"),
        }
    }
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
