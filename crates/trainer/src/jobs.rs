//! Training jobs: the labels that count, of patients in the training split, exported as
//! the CSV manifest `trainer/` reads (`path,label,patient`) with their images; the job run
//! as a subprocess from a command template (the local Python job by default, or a cluster
//! scheduler: Slurm's `sbatch --wait`, `kubectl` for a Kubernetes Job, `torchrun`), with its
//! log kept, a timeout, one job at a time across replicas, and its state in the database so
//! a restart fails it cleanly instead of leaving it running forever.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::blobs::Blobs;
use crate::config::Config;
use crate::now_ms;
use crate::policy;
use crate::store::{JobRecord, Store, StoreError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// The job, one argument per element. Placeholders: `{python}`, `{manifest}` (the CSV),
    /// `{out}` (where the model must appear), `{arch}`, `{singan}` (`on`/`off`), `{name}`,
    /// `{version}`, `{job}` (its id), `{dir}` (the job's folder).
    pub command: Vec<String>,
    /// What `{python}` stands for.
    pub python: PathBuf,
    /// The job's working directory (the trainer package, for `-m octtrain`).
    pub workdir: PathBuf,
    /// Per job: manifest.csv, images/, out/, job.log.
    pub root: PathBuf,
    /// A job running longer is killed and failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `efficientnet_lite0` (ImageNet-initialised; the best by patient-grouped cross-
    /// validation, models/default/README.md), `xception` as in the original design, or
    /// `compact` for CPU-only fleets.
    pub architecture: String,
    /// The candidate model's name.
    pub model_name: String,
    /// How often `serve` asks the policy whether to train.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// How often a running job proves it is alive.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// A running job whose last beat is older than this was left by a service that died:
    /// at every policy check it is failed and its slot freed. Several beats, plus room for
    /// replicas whose clocks differ.
    #[serde(with = "humantime_serde")]
    pub abandon_after: Duration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            command: [
                "{python}",
                "-m",
                "octtrain",
                "--data",
                "{manifest}",
                "--out",
                "{out}",
                "--arch",
                "{arch}",
                "--singan",
                "{singan}",
                "--name",
                "{name}",
                "--version",
                "{version}",
            ]
            .map(String::from)
            .to_vec(),
            python: "../.venv/bin/python".into(),
            workdir: "trainer".into(),
            root: "var/octd-trainer/jobs".into(),
            timeout: Duration::from_secs(24 * 3600),
            architecture: "efficientnet_lite0".into(),
            model_name: "octd".into(),
            check_interval: Duration::from_secs(60),
            heartbeat: Duration::from_secs(10),
            abandon_after: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("another training job is running")]
    Busy,
    #[error("{0}")]
    Setup(String),
}

/// The next candidate's version: one patch above the newest the channel lists and any
/// earlier job was given (two jobs before a publication must not share a version).
pub async fn next_version(store: &Store, channel: &Path) -> Result<String, JobError> {
    let listed = if channel.join("metadata").join("root.json").exists() {
        octd_bundle::repo::listed_models(channel)
            .await
            .map_err(|e| JobError::Setup(format!("reading the channel: {e}")))?
            .into_iter()
            .map(|m| m.version)
            .collect()
    } else {
        Vec::new()
    };
    let earlier = store.job_versions().await?.into_iter().filter_map(|v| semver::Version::parse(&v).ok());
    Ok(match listed.into_iter().chain(earlier).max() {
        Some(v) => semver::Version::new(v.major, v.minor, v.patch + 1).to_string(),
        None => "1.0.0".into(),
    })
}

fn fill(template: &[String], values: &[(&str, String)]) -> Vec<String> {
    template
        .iter()
        .map(|arg| values.iter().fold(arg.clone(), |acc, (k, v)| acc.replace(&format!("{{{k}}}"), v)))
        .collect()
}

/// Run one training job now: export, train, then the gate and publishing (`publish`), and
/// record the outcome: `published`, `rejected` (with the evaluation report) or `failed`.
/// `trigger` is why (the policy's decision as JSON). Returns the finished job.
pub async fn run(
    store: &Store,
    blobs: &Blobs,
    config: &Config,
    trigger: serde_json::Value,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<JobRecord, JobError> {
    let jobs = &config.jobs;
    let labels = store.current_labels_with_split().await?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let singan = policy::singan(&config.policy, labels.len() as u64);
    let version = next_version(store, &config.channel.dir).await?;
    let now = now_ms();
    let record = JobRecord {
        id: id.clone(),
        state: "running".into(),
        trigger: trigger.to_string(),
        labels_at_start: labels.len() as i64,
        exported: 0,
        singan: i64::from(singan),
        architecture: jobs.architecture.clone(),
        version: version.clone(),
        started_at: now,
        heartbeat_at: now,
        finished_at: None,
        outcome: String::new(),
    };
    if !store.start_job(&record).await? {
        return Err(JobError::Busy);
    }
    tracing::info!(job = %id, version = %version, singan, labels = labels.len(), trigger = %record.trigger, "training job started");
    let (state, outcome) = match execute(store, blobs, jobs, &record, &labels, stop.clone()).await {
        Ok((candidate, exported)) => {
            let mut running = record.clone();
            running.exported = exported;
            match gate_and_publish(store, blobs, config, &running, &labels, &candidate, stop).await {
                Ok(outcome) => (outcome.state, json!({"candidate": candidate, "outcome": outcome}).to_string()),
                Err(why) => ("failed", json!({"candidate": candidate, "error": why}).to_string()),
            }
        }
        Err(why) => ("failed", why),
    };
    // A day of training is not lost to a brief database error at its end.
    let mut attempt = 0;
    let recorded = loop {
        match store.finish_job(&id, state, &outcome).await {
            Ok(recorded) => break recorded,
            Err(e) if attempt < 5 => {
                attempt += 1;
                tracing::warn!(job = %id, error = %e, attempt, "recording the job's end");
                tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    if !recorded {
        tracing::warn!(job = %id, "the job had already been failed as abandoned; its outcome is not recorded");
    }
    tracing::info!(job = %id, state, outcome = %outcome, "training job finished");
    let mut done = record;
    done.state = state.into();
    done.outcome = outcome;
    done.finished_at = Some(now_ms());
    Ok(done)
}

const ABANDONED: &str = "another replica failed this job as abandoned";

/// The gate, then publishing, beating meanwhile. The evaluation (two models on the whole
/// holdout) is given up when the service stops or `jobs.timeout` passes; publishing, once
/// begun, is finished, so the channel and the job's record agree.
async fn gate_and_publish(
    store: &Store,
    blobs: &Blobs,
    config: &Config,
    job: &JobRecord,
    labels: &[(crate::store::LabelRecord, String)],
    candidate: &Path,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<crate::publish::Outcome, String> {
    use crate::publish::{self, Outcome, PublishError};
    let work = std::path::absolute(config.jobs.root.join(&job.id)).map_err(|e| format!("job folder: {e}"))?;
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deadline = tokio::time::Instant::now() + config.jobs.timeout;
    let evaluate = publish::evaluate_candidate(config, blobs, labels, candidate, &job.version, &work, cancel.clone());
    tokio::pin!(evaluate);
    let evaluated = loop {
        tokio::select! {
            evaluated = &mut evaluate => break evaluated,
            _ = stop.changed() => {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                return Err("stopped: the service shut down".into());
            }
            _ = tokio::time::sleep_until(deadline) => {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                return Err(format!("the evaluation timed out (jobs.timeout, {} s)", config.jobs.timeout.as_secs()));
            }
            _ = tokio::time::sleep(config.jobs.heartbeat) => {
                if let Ok(false) = store.job_heartbeat(&job.id, job.exported).await {
                    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(ABANDONED.into());
                }
            }
        }
    };
    let outcome = match evaluated {
        Ok(evaluated) => {
            let publishing = publish::publish_candidate(config, candidate, evaluated, &work);
            tokio::pin!(publishing);
            loop {
                tokio::select! {
                    outcome = &mut publishing => break outcome,
                    _ = tokio::time::sleep(config.jobs.heartbeat) => {
                        let _ = store.job_heartbeat(&job.id, job.exported).await;
                    }
                }
            }
        }
        Err(e) => Err(e),
    };
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(PublishError::Candidate(why)) => Outcome::rejected_early(why),
        Err(e) => return Err(e.to_string()),
    };
    publish::keep_report(&work, &outcome).map_err(|e| e.to_string())?;
    Ok(outcome)
}

/// One beat before the job runs; an error when the job is no longer ours to run.
async fn beat(store: &Store, id: &str, exported: i64) -> Result<(), String> {
    match store.job_heartbeat(id, exported).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(ABANDONED.into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Stop the job's whole process group (the scheduler client and what it started): TERM,
/// then KILL if it is still there after a grace period.
async fn stop_group(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = tokio::process::Command::new("kill").args(["-TERM", &format!("-{pid}")]).status().await;
        if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_ok() {
            return;
        }
        let _ = tokio::process::Command::new("kill").args(["-KILL", &format!("-{pid}")]).status().await;
    }
    let _ = child.kill().await;
}

async fn execute(
    store: &Store,
    blobs: &Blobs,
    jobs: &JobsConfig,
    job: &JobRecord,
    labels: &[(crate::store::LabelRecord, String)],
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(PathBuf, i64), String> {
    let dir = std::path::absolute(jobs.root.join(&job.id)).map_err(|e| format!("job folder: {e}"))?;
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(|e| format!("{}: {e}", images.display()))?;
    // The training split only; the holdout never reaches a job. The trainer reads images,
    // so de-identified volumes (DICOM) wait for a reader of their own.
    let mut csv = String::from("path,label,patient\n");
    let mut exported = 0i64;
    let mut last_beat = std::time::Instant::now();
    for (label, split) in labels {
        if split != "train" || !label_is_png(label) {
            continue;
        }
        // A long export (many images from S3) still beats, or another replica would take
        // this job for abandoned.
        if last_beat.elapsed() >= jobs.heartbeat {
            beat(store, &job.id, exported).await?;
            last_beat = std::time::Instant::now();
        }
        let file = images.join(format!("{}.png", label.image_sha256));
        if !file.exists() {
            let bytes = blobs
                .get_image(&label.image_sha256, "png")
                .await
                .map_err(|e| format!("image {}: {e}", label.image_sha256))?;
            std::fs::write(&file, bytes).map_err(|e| format!("{}: {e}", file.display()))?;
        }
        // The patient column groups the job's own validation split by patient (across the
        // site's devices where the pseudonym is site-wide).
        let patient = match crate::site_wide_patient(&label.patient) {
            true => format!("{}/{}", label.site, label.patient),
            false => format!("{}/{}/{}", label.site, label.device, label.patient),
        };
        csv.push_str(&format!("images/{}.png,{},{}\n", label.image_sha256, label.label, patient));
        exported += 1;
    }
    let manifest = dir.join("manifest.csv");
    std::fs::write(&manifest, csv).map_err(|e| format!("{}: {e}", manifest.display()))?;
    beat(store, &job.id, exported).await?;
    if exported == 0 {
        return Err("no training images: no label of a training-split patient yet".into());
    }

    let out = dir.join("out");
    // Relative to the job's working directory, as documented (and as a shell in it would see it).
    let python = match jobs.python.components().count() {
        // A bare name (`python3`) is looked up on PATH.
        1 => jobs.python.clone(),
        _ => std::path::absolute(jobs.workdir.join(&jobs.python)).unwrap_or_else(|_| jobs.python.clone()),
    };
    let args = fill(
        &jobs.command,
        &[
            ("python", python.display().to_string()),
            ("manifest", manifest.display().to_string()),
            ("out", out.display().to_string()),
            ("arch", job.architecture.clone()),
            ("singan", if job.singan == 1 { "on".into() } else { "off".into() }),
            ("name", jobs.model_name.clone()),
            ("version", job.version.clone()),
            ("job", job.id.clone()),
            ("dir", dir.display().to_string()),
        ],
    );
    let (program, rest) = args.split_first().ok_or("jobs.command is empty")?;
    if !jobs.workdir.is_dir() {
        return Err(format!("jobs.workdir {} is not a folder", jobs.workdir.display()));
    }
    let log_path = dir.join("job.log");
    let log = std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let err_log = log.try_clone().map_err(|e| e.to_string())?;
    let mut child = tokio::process::Command::new(program)
        .args(rest)
        .current_dir(&jobs.workdir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log)
        .kill_on_drop(true)
        // Its own process group, so stopping it stops what it started too.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let deadline = tokio::time::Instant::now() + jobs.timeout;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.map_err(|e| e.to_string())?,
            _ = stop.changed() => {
                stop_group(&mut child).await;
                return Err("stopped: the service shut down".into());
            }
            _ = tokio::time::sleep(jobs.heartbeat) => {
                match store.job_heartbeat(&job.id, exported).await {
                    Ok(true) => {}
                    Ok(false) => {
                        stop_group(&mut child).await;
                        return Err(ABANDONED.into());
                    }
                    // A brief database outage: the job goes on; abandonment needs many beats.
                    Err(e) => tracing::warn!(job = %job.id, error = %e, "job heartbeat"),
                }
                if tokio::time::Instant::now() >= deadline {
                    stop_group(&mut child).await;
                    return Err(format!("timed out after {} s (jobs.timeout); log: {}", jobs.timeout.as_secs(), log_path.display()));
                }
            }
        }
    };
    if !status.success() {
        return Err(format!("the job exited with {status}; log: {}", log_path.display()));
    }
    for file in ["model.onnx", "manifest.json"] {
        if !out.join(file).is_file() {
            return Err(format!("the job succeeded but wrote no {file} in {}", out.display()));
        }
    }
    Ok((out, exported))
}

fn label_is_png(label: &crate::store::LabelRecord) -> bool {
    label.image_kind == "png"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_in_every_argument() {
        let t = ["{python}", "-m", "octtrain", "--data={manifest}", "{out}/x"].map(String::from).to_vec();
        let got = fill(&t, &[("python", "py".into()), ("manifest", "m.csv".into()), ("out", "o".into())]);
        assert_eq!(got, ["py", "-m", "octtrain", "--data=m.csv", "o/x"]);
    }
}
