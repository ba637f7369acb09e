//! The configuration loads and validates.

use std::path::Path;

use super::Finding;
use crate::config::{Config, ConfigError};

pub fn check(path: Option<&Path>, loaded: &Result<Config, ConfigError>) -> Finding {
    let name = path.map(|p| p.display().to_string()).unwrap_or_else(|| "built-in defaults".into());
    match loaded {
        Ok(c) => Finding::ok("config", format!("{name} is valid (site {}, device {})", c.device.site, c.device.id)),
        Err(e) => Finding::fail(
            "config",
            format!("{name}: {e}"),
            "correct the file (see config/octd.toml for every key and its default), then `octd config check`",
        ),
    }
}
