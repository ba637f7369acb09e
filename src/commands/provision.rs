//! `octd provision`: make this machine a device — configuration, trust root, device secret
//! and identity key, folders with their owners and modes, and the systemd drop-in that lets
//! the hardened unit write to the watch folders.
//!
//! Idempotent: run again with the same answers, nothing changes. A different configuration
//! on a provisioned device is refused without `--force`; even then the device secret and
//! identity key are kept (replacing them would orphan the sealed linkage and the device's
//! registration).

use std::io::{BufRead, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::Config;
use crate::secret::DeviceSecret;

/// Answers to the provisioning questions: `octd provision`'s flags, or prompts in
/// interactive mode.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Answers {
    #[arg(long)]
    pub site: Option<String>,
    #[arg(long)]
    pub device_id: Option<String>,
    /// Scanner export folder (repeat for several).
    #[arg(long)]
    pub watch: Vec<PathBuf>,
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// mqtt://host:port or mqtts://host:port; empty: the embedded broker.
    #[arg(long)]
    pub broker_url: Option<String>,
    #[arg(long)]
    pub broker_username: Option<String>,
    /// Prefer --broker-password-file or OCTD_BROKER_PASSWORD (flags show in `ps`).
    #[arg(long, env = "OCTD_BROKER_PASSWORD", hide_env_values = true)]
    pub broker_password: Option<String>,
    /// PEM CA bundle for mqtts.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Model channel: https://..., http://..., file://... or a folder.
    #[arg(long)]
    pub repository: Option<String>,
    /// The channel's root.json (copied next to the configuration).
    #[arg(long)]
    pub trusted_root: Option<PathBuf>,
    /// Where confirmed labels are uploaded.
    #[arg(long)]
    pub uplink_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Where the configuration goes (/etc/octd/octd.toml).
    pub config_path: PathBuf,
    /// Owner of the state folder, watch folders and secrets (the service user); files stay
    /// as they are when not running as root.
    pub owner: Option<String>,
    /// Where the drop-in with ReadWritePaths= goes; None: not written.
    pub systemd_dropin_dir: Option<PathBuf>,
    pub force: bool,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisionError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} is already provisioned with other settings; re-run with --force to replace them (the device secret and identity key are kept)")]
    AlreadyProvisioned(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError + '_ {
    move |source| ProvisionError::Io { path: path.to_path_buf(), source }
}

/// Ask for what the flags did not give, each with a default.
pub fn ask(mut answers: Answers, input: &mut dyn BufRead, output: &mut dyn Write) -> Result<Answers, ProvisionError> {
    let mut prompt = |question: &str, default: &str| -> Result<String, ProvisionError> {
        let _ = write!(output, "{question} [{default}]: ");
        let _ = output.flush();
        let mut line = String::new();
        input.read_line(&mut line).map_err(io(Path::new("stdin")))?;
        let line = line.trim();
        Ok(if line.is_empty() { default.to_string() } else { line.to_string() })
    };
    let defaults = Config::default();
    if answers.site.is_none() {
        answers.site = Some(prompt("Clinic site id", &defaults.device.site)?);
    }
    if answers.device_id.is_none() {
        answers.device_id = Some(prompt("Device id", &hostname().unwrap_or_else(|| defaults.device.id.clone()))?);
    }
    if answers.watch.is_empty() {
        let folders = prompt("Scanner export folder(s), comma-separated", "/srv/octd/inbox")?;
        answers.watch =
            folders.split(',').map(|f| PathBuf::from(f.trim())).filter(|f| !f.as_os_str().is_empty()).collect();
    }
    if answers.broker_url.is_none() {
        answers.broker_url = Some(prompt("MQTT broker URL (empty: embedded broker)", "")?);
    }
    if answers.broker_url.as_deref().is_some_and(|u| !u.is_empty()) && answers.broker_username.is_none() {
        let user = prompt("MQTT username (empty: none)", "")?;
        if !user.is_empty() {
            answers.broker_username = Some(user);
            answers.broker_password = Some(prompt("MQTT password", "")?);
        }
    }
    if answers.repository.is_none() {
        answers.repository = Some(prompt("Model channel (https://..., or a folder)", "/usr/share/octd/channel")?);
    }
    if answers.trusted_root.is_none() {
        let root = prompt("The channel's trusted root.json", "/usr/share/octd/channel/metadata/1.root.json")?;
        answers.trusted_root = Some(PathBuf::from(root));
    }
    if answers.uplink_url.is_none() {
        answers.uplink_url = Some(prompt("Uplink URL for confirmed labels (empty: none)", "")?);
    }
    Ok(answers)
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()).filter(|h| !h.is_empty())
}

/// The configuration these answers give, validated.
fn build_config(answers: &Answers, config_dir: &Path) -> Result<Config, ProvisionError> {
    let mut config = Config::default();
    let need = |v: &Option<String>, flag: &str| {
        v.clone().filter(|s| !s.is_empty()).ok_or_else(|| ProvisionError::Invalid(format!("{flag} is required")))
    };
    config.device.site = need(&answers.site, "--site")?;
    config.device.id = need(&answers.device_id, "--device-id")?;
    config.device.state_dir = answers.state_dir.clone().unwrap_or_else(|| PathBuf::from("/var/lib/octd"));
    config.ingest.watch =
        if answers.watch.is_empty() { vec![PathBuf::from("/srv/octd/inbox")] } else { answers.watch.clone() };
    config.mqtt.url = answers.broker_url.clone().unwrap_or_default();
    config.mqtt.username = answers.broker_username.clone().filter(|s| !s.is_empty());
    config.mqtt.password = answers.broker_password.clone().filter(|s| !s.is_empty());
    config.mqtt.ca_file = answers.ca_file.clone();
    config.update.repository = answers.repository.clone().unwrap_or_else(|| "/usr/share/octd/channel".into());
    // The root is copied next to the configuration: the device's trust must not change when
    // a package or a channel folder does.
    config.update.trusted_root = config_dir.join("root.json");
    config.uplink.url = answers.uplink_url.clone().unwrap_or_default();
    // Requests to the trainer are signed with the identity key written beside the configuration.
    config.uplink.identity_key = config_dir.join("device-identity.pk8");
    config.validate().map_err(|e| ProvisionError::Invalid(e.to_string()))?;
    Ok(config)
}

/// uid and gid of a user, from /etc/passwd (no NSS lookup: provisioning runs on the device).
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.first() == Some(&name)).then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // The owner of a file we just could create tells who we are, without libc.
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ProvisionError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))
}

/// Provision. Returns what was done, for the operator.
pub fn provision(answers: &Answers, options: &Options) -> Result<Value, ProvisionError> {
    let config_path = &options.config_path;
    let config_dir = config_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let config = build_config(answers, &config_dir)?;
    let root_source =
        answers.trusted_root.clone().ok_or_else(|| ProvisionError::Invalid("--trusted-root is required".into()))?;
    let root_bytes = std::fs::read(&root_source).map_err(io(&root_source))?;
    serde_json::from_slice::<Value>(&root_bytes)
        .ok()
        .filter(|v| v["signed"]["_type"] == "root")
        .ok_or_else(|| ProvisionError::Invalid(format!("{} is not a TUF root.json", root_source.display())))?;
    let text = format!(
        "# Written by `octd provision`; every key not listed has its documented default\n\
         # (see /usr/share/doc/octd/octd.toml). Change with `octd provision --force` or by hand.\n\n{}",
        toml::to_string_pretty(&config).map_err(|e| ProvisionError::Invalid(e.to_string()))?
    );

    let mut changed = Vec::new();
    let mut unchanged = Vec::new();
    let owner = match (&options.owner, running_as_root()) {
        (Some(name), true) => Some(user_ids(name).ok_or_else(|| {
            ProvisionError::Invalid(format!("no user {name:?} (create it: adduser --system {name})"))
        })?),
        _ => None,
    };
    let chown = |path: &Path| -> Result<(), ProvisionError> {
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io(path))?;
        }
        Ok(())
    };
    // Root-owned configuration readable by the service's group: it holds the broker password.
    let chgrp = |path: &Path| -> Result<(), ProvisionError> {
        if let Some((_, gid)) = owner {
            std::os::unix::fs::chown(path, Some(0), Some(gid)).map_err(io(path))?;
        }
        Ok(())
    };

    // 1. The configuration: identical -> nothing to do; different -> only with --force.
    match std::fs::read_to_string(config_path) {
        Ok(existing) if existing == text => unchanged.push(config_path.display().to_string()),
        Ok(_) if !options.force => return Err(ProvisionError::AlreadyProvisioned(config_path.clone())),
        Ok(_) | Err(_) => {
            std::fs::create_dir_all(&config_dir).map_err(io(&config_dir))?;
            crate::fsutil::write_atomic(config_path, text.as_bytes()).map_err(io(config_path))?;
            changed.push(config_path.display().to_string());
        }
    }
    set_mode(config_path, 0o640)?;
    chgrp(config_path)?;
    let root_target = &config.update.trusted_root;
    if std::fs::read(root_target).ok().as_deref() == Some(root_bytes.as_slice()) {
        unchanged.push(root_target.display().to_string());
    } else {
        crate::fsutil::write_atomic(root_target, &root_bytes).map_err(io(root_target))?;
        changed.push(root_target.display().to_string());
    }
    set_mode(root_target, 0o644)?;

    // 2. Folders.
    for dir in std::iter::once(&config.device.state_dir).chain(config.ingest.watch.iter()) {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            changed.push(dir.display().to_string());
        }
        chown(dir)?;
    }
    set_mode(&config.device.state_dir, 0o750)?;

    // 3. Device secret (seals the on-device linkage) and identity key pair: created once.
    let state = &config.device.state_dir;
    let secret_path = state.join(crate::secret::SECRET_FILE);
    if secret_path.exists() {
        DeviceSecret::load(state).map_err(io(&secret_path))?;
        unchanged.push(secret_path.display().to_string());
    } else {
        DeviceSecret::load_or_create(state).map_err(io(&secret_path))?;
        changed.push(secret_path.display().to_string());
    }
    chown(&secret_path)?;
    let identity = config_dir.join("device-identity.pk8");
    let identity_pub = config_dir.join("device-identity.pub.json");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ProvisionError::Invalid(format!("runtime: {e}")))?;
    let key_id = runtime.block_on(async {
        if !identity.exists() {
            octd_bundle::keys::generate(&identity).await.map_err(|e| ProvisionError::Invalid(e.to_string()))?;
            changed.push(identity.display().to_string());
        } else {
            unchanged.push(identity.display().to_string());
        }
        let public =
            octd_bundle::keys::public_key(&identity).await.map_err(|e| ProvisionError::Invalid(e.to_string()))?;
        let id = octd_bundle::keys::key_id(&identity).await.map_err(|e| ProvisionError::Invalid(e.to_string()))?;
        let public_json = serde_json::to_vec_pretty(
            &json!({"keyid": id, "key": public, "site": config.device.site, "device": config.device.id}),
        )
        .map_err(|e| ProvisionError::Invalid(e.to_string()))?;
        if std::fs::read(&identity_pub).ok() != Some(public_json.clone()) {
            crate::fsutil::write_atomic(&identity_pub, &public_json).map_err(io(&identity_pub))?;
            changed.push(identity_pub.display().to_string());
        }
        Ok::<_, ProvisionError>(id)
    })?;
    set_mode(&identity, 0o600)?;
    chown(&identity)?;
    set_mode(&identity_pub, 0o644)?;

    // 4. The hardened unit may write only where it is told: list the watch folders.
    if let Some(dropin_dir) = &options.systemd_dropin_dir {
        let dropin = dropin_dir.join("10-provisioned.conf");
        let mut text =
            String::from("# Written by `octd provision`: the watch folders the hardened unit may write.\n[Service]\n");
        for folder in &config.ingest.watch {
            text.push_str(&format!("ReadWritePaths={}\n", folder.display()));
        }
        if std::fs::read_to_string(&dropin).ok().as_deref() == Some(text.as_str()) {
            unchanged.push(dropin.display().to_string());
        } else {
            std::fs::create_dir_all(dropin_dir).map_err(io(dropin_dir))?;
            crate::fsutil::write_atomic(&dropin, text.as_bytes()).map_err(io(&dropin))?;
            set_mode(&dropin, 0o644)?;
            changed.push(dropin.display().to_string());
        }
    }

    Ok(json!({
        "config": config_path,
        "site": config.device.site,
        "device": config.device.id,
        "identity_key_id": key_id,
        "owner": options.owner.as_ref().filter(|_| owner.is_some()),
        "changed": changed,
        "unchanged": unchanged,
        "next": if changed.is_empty() { "nothing changed" } else { "systemctl daemon-reload && systemctl restart octd && octd doctor" },
    }))
}
