//! Supervision of the daemon's long-lived tasks, after vector's topology: a task that returns
//! or panics before shutdown is never dropped silently. It is logged with its error and
//! restarted with backoff; one that keeps failing makes the health verdict unhealthy, so the
//! watchdog stops and systemd restarts the whole daemon.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Failures this close together make a task "keeps failing".
const FAILURE_WINDOW: Duration = Duration::from_secs(600);
const FAILURES_UNHEALTHY: usize = 5;
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The supervisor's record of task failures, read by the health verdict.
#[derive(Debug, Default)]
pub struct TaskHealth {
    failures: Mutex<BTreeMap<String, Vec<(Instant, String)>>>,
}

impl TaskHealth {
    fn failed(&self, task: &str, why: String) -> usize {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let list = failures.entry(task.to_string()).or_default();
        list.retain(|(at, _)| at.elapsed() < FAILURE_WINDOW);
        list.push((Instant::now(), why));
        list.len()
    }

    /// A task that failed `FAILURES_UNHEALTHY` times within the window, if any.
    pub fn problem(&self) -> Option<String> {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        for (task, list) in failures.iter_mut() {
            list.retain(|(at, _)| at.elapsed() < FAILURE_WINDOW);
            if list.len() >= FAILURES_UNHEALTHY {
                let last = list.last().map(|(_, why)| why.as_str()).unwrap_or_default();
                return Some(format!("the {task} task failed {} times in 10 min (last: {last})", list.len()));
            }
        }
        None
    }
}

/// Run `make(shutdown)` as a task named `name`, again whenever it ends before shutdown (no
/// task of the daemon may end while it runs).
pub fn supervised<F, Fut, E>(
    name: &str,
    health: Arc<TaskHealth>,
    shutdown: watch::Receiver<bool>,
    make: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut(watch::Receiver<bool>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    supervised_with(name, health, shutdown, Duration::from_secs(1), make)
}

fn supervised_with<F, Fut, E>(
    name: &str,
    health: Arc<TaskHealth>,
    shutdown: watch::Receiver<bool>,
    first_backoff: Duration,
    mut make: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut(watch::Receiver<bool>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    let name = name.to_string();
    tokio::spawn(async move {
        let mut backoff = first_backoff;
        loop {
            let started = Instant::now();
            let outcome = tokio::spawn(make(shutdown.clone())).await;
            if *shutdown.borrow() {
                if let Ok(Err(e)) = &outcome {
                    tracing::warn!(task = %name, error = %e, "task ended with an error while stopping");
                }
                return;
            }
            let why = match outcome {
                Ok(Ok(())) => "it returned".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) if e.is_panic() => "it panicked".to_string(),
                Err(e) => e.to_string(),
            };
            let count = health.failed(&name, why.clone());
            if started.elapsed() > MAX_BACKOFF * 2 {
                backoff = first_backoff;
            }
            tracing::error!(task = %name, error = %why, failures = count, restart_in_s = backoff.as_secs(), "task stopped; restarting it");
            let mut stop = shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = crate::shutdown::requested(&mut stop) => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_failing_task_is_restarted_and_then_judged_unhealthy() {
        let health = Arc::new(TaskHealth::default());
        let (tx, rx) = watch::channel(false);
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        let task = supervised_with("flaky", health.clone(), rx, Duration::from_millis(1), move |_| {
            let counter = counter.clone();
            async move {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                if n == 1 {
                    panic!("second run panics");
                }
                Err::<(), String>(format!("run {n} failed"))
            }
        });
        // Backoffs of 1, 2, 4, 8 ms: well within the deadline, however loaded the machine.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while (runs.load(Ordering::SeqCst) < 5 || health.problem().is_none()) && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(runs.load(Ordering::SeqCst) >= 5, "restarted after errors and a panic");
        let problem = health.problem().expect("five failures make the task unhealthy");
        assert!(problem.contains("flaky"), "{problem}");
        tx.send(true).unwrap();
        task.await.unwrap();
    }
}
