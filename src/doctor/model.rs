//! The model octd would run loads on the configured backend and passes its bundle's
//! self-test (a pinned folder has no self-test: it only has to load).

use super::{Context, Finding};
use crate::infer::Classifier;

pub fn check(ctx: &Context) -> Finding {
    let config = &ctx.config;
    if let Some(dir) = &config.model.dir {
        return match Classifier::load(dir, &config.model, &config.triage) {
            Ok(c) => Finding::warn(
                "model",
                format!(
                    "pinned folder {} loads: {} {} on {}",
                    dir.display(),
                    c.stamp().name,
                    c.stamp().version,
                    c.stamp().backend
                ),
                "model.dir is for development (unsigned, no self-test, no updates); unset it in the field",
            ),
            Err(e) => Finding::fail(
                "model",
                format!("{}: {e}", dir.display()),
                "fix model.dir or unset it to use the channel",
            ),
        };
    }
    let models = ctx.state_dir().join("models");
    let running = ctx.daemon.as_ref().and_then(|s| s["model"]["version"].as_str().map(str::to_owned));
    let newest = std::fs::read_dir(&models).ok().and_then(|entries| {
        entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().and_then(|n| semver::Version::parse(n).ok()))
            .max()
            .map(|v| v.to_string())
    });
    let Some(version) = running.or(newest) else {
        return Finding::warn(
            "model",
            format!("no model installed under {}", models.display()),
            "start octd: it installs the newest model from update.repository (see the repository check)",
        );
    };
    let dir = models.join(&version);
    match crate::update::prove_installed(config, &dir) {
        Ok((stamp, cases)) => Finding::ok(
            "model",
            format!(
                "{} {} loads on {} and passes its self-test ({cases} cases)",
                stamp.name, stamp.version, stamp.backend
            ),
        ),
        Err(e) => Finding::fail(
            "model",
            format!("{version}: {e}"),
            "octd rolls back to the previous version at start; if none is left, publish a good bundle to the channel",
        ),
    }
}
