//! `octd doctor`: one check per concern, each in its own file, each failure with the fix.
//! Checks read and probe; they never change the device (no secret, store or folder is
//! created), so doctor is safe on a running appliance.

mod backend;
mod broker;
mod clock;
mod config;
mod disk;
mod model;
mod repository;
mod spool;
mod store;
mod uplink;
mod watch;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub status: Status,
    pub summary: String,
    /// How to fix it (warn and fail).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, summary: impl Into<String>) -> Finding {
        Finding { check, status: Status::Ok, summary: summary.into(), hint: None }
    }
    fn warn(check: &'static str, summary: impl Into<String>, hint: impl Into<String>) -> Finding {
        Finding { check, status: Status::Warn, summary: summary.into(), hint: Some(hint.into()) }
    }
    fn fail(check: &'static str, summary: impl Into<String>, hint: impl Into<String>) -> Finding {
        Finding { check, status: Status::Fail, summary: summary.into(), hint: Some(hint.into()) }
    }
    fn skip(check: &'static str, summary: impl Into<String>) -> Finding {
        Finding { check, status: Status::Skip, summary: summary.into(), hint: None }
    }
}

/// What the checks share.
pub struct Context {
    pub config_path: Option<PathBuf>,
    pub config: Config,
    /// The running daemon's /status, when it answers.
    pub daemon: Option<serde_json::Value>,
    runtime: tokio::runtime::Runtime,
}

impl Context {
    fn state_dir(&self) -> &Path {
        &self.config.device.state_dir
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub checks: Vec<Finding>,
}

/// Run every check. A configuration that does not load fails the first check and skips the
/// rest (they would only test defaults the device does not use).
pub fn run(config_path: Option<&Path>) -> Report {
    let loaded = Config::load(config_path);
    let mut checks = vec![config::check(config_path, &loaded)];
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    match (loaded, runtime) {
        (Ok(config), Ok(runtime)) => {
            let daemon = match crate::commands::status::endpoint_get(&config, "/status") {
                Ok((200, body)) => serde_json::from_str(&body).ok(),
                _ => None,
            };
            let ctx = Context { config_path: config_path.map(Path::to_path_buf), config, daemon, runtime };
            checks.push(clock::check(&ctx));
            checks.push(watch::check(&ctx));
            checks.push(spool::check(&ctx));
            checks.push(disk::check(&ctx));
            checks.push(store::check(&ctx));
            checks.push(model::check(&ctx));
            checks.push(backend::check(&ctx));
            checks.push(broker::check(&ctx));
            checks.push(repository::check(&ctx));
            checks.push(uplink::check(&ctx));
        }
        (Ok(_), Err(e)) => checks.push(Finding::fail("runtime", format!("cannot start a runtime: {e}"), "report this")),
        (Err(_), _) => {
            for name in [
                "clock",
                "watch_folders",
                "spool",
                "disk",
                "store",
                "model",
                "backend",
                "broker",
                "repository",
                "uplink",
            ] {
                checks.push(Finding::skip(name, "configuration invalid"));
            }
        }
    }
    Report { ok: checks.iter().all(|c| c.status != Status::Fail), checks }
}

/// Human output: one line per check, the fix under each failure.
pub fn human(report: &Report) -> String {
    let mut out = String::new();
    for f in &report.checks {
        let mark = match f.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        };
        out.push_str(&format!("[{mark}] {:<14} {}\n", f.check, f.summary));
        if let Some(hint) = &f.hint {
            out.push_str(&format!("       {:<14} fix: {hint}\n", ""));
        }
    }
    let failed = report.checks.iter().filter(|c| c.status == Status::Fail).count();
    let warned = report.checks.iter().filter(|c| c.status == Status::Warn).count();
    out.push_str(&format!("{} check(s) failed, {} warning(s)\n", failed, warned));
    out
}

/// The filesystem a path is on: (device id, mount point, type), from /proc/self/mountinfo.
pub(crate) fn filesystem_of(path: &Path) -> Option<(u64, PathBuf, String)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let path = std::fs::canonicalize(path).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(PathBuf, String)> = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source superopts
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(mount) = fields.get(4) else { continue };
        let Some(dash) = fields.iter().position(|f| *f == "-") else { continue };
        let fstype = fields.get(dash + 1).copied().unwrap_or("?");
        let mount = PathBuf::from(mount.replace("\\040", " "));
        if path.starts_with(&mount) && best.as_ref().is_none_or(|(b, _)| mount.as_os_str().len() >= b.as_os_str().len())
        {
            best = Some((mount, fstype.to_string()));
        }
    }
    let (mount, fstype) = best?;
    Some((dev, mount, fstype))
}
