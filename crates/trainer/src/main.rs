use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use octd_trainer::config::Config;
use octd_trainer::intake::is_token;
use octd_trainer::store::Device;
use octd_trainer::{channel, now_ms, server, EXIT_CONFIG};
use serde_json::json;

#[derive(Parser)]
#[command(name = "octd-trainer", version, about = "The cloud side of octd's learning loop")]
struct Cli {
    /// TOML configuration (every key has a default; see config/octd-trainer.toml).
    #[arg(long, global = true, env = "OCTD_TRAINER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the model channel and its keys, or adopt the existing channel.
    Init {
        /// How long the root (and the targets listing) stay valid.
        #[arg(long, default_value = "365days", value_parser = humantime_duration)]
        expires: std::time::Duration,
    },
    /// Serve the intake API and the channel.
    Serve,
    /// Devices allowed to upload labels.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Validate the configuration and print it (without secrets).
    ConfigCheck,
    /// Labels, live accuracy by model version, site and device, the last jobs, and what
    /// would trigger the next training.
    Status,
    /// Train now, whatever the policy says (one job at a time).
    Retrain {
        #[arg(long, required = true)]
        now: bool,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Enrol a device by the `device-identity.pub.json` that `octd provision` wrote.
    Add { identity: PathBuf },
    /// Every enrolled device, revoked ones included.
    List,
    /// Refuse a device from now on: SITE/DEVICE, or a key id.
    Revoke { device: String },
}

fn humantime_duration(s: &str) -> Result<std::time::Duration, String> {
    let d: humantime_serde::re::humantime::Duration = s.parse().map_err(|e| format!("{e}"))?;
    Ok(d.into())
}

fn main() -> ExitCode {
    // Before any thread exists: the gate and the packer load ONNX Runtime.
    octd::infer::ort_backend::keep_telemetry_off_from_start();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("octd-trainer: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("octd-trainer: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(Some(out)) => {
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("octd-trainer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<Option<serde_json::Value>> {
    match command {
        Command::ConfigCheck => Ok(Some(serde_json::to_value(config.redacted())?)),
        Command::Retrain { now: _ } => {
            let (store, blobs) = server::open(&config).await?;
            // Ctrl-C or SIGTERM stops the job (its process group) and records it as stopped.
            let (stop_tx, stop) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                let _ = stop_tx.send(true);
            });
            let job = octd_trainer::jobs::run(&store, &blobs, &config, json!({"trigger": "manual"}), stop).await;
            store.close().await;
            let job = job?;
            // A rejected candidate is the gate working, not an error of the command.
            if job.state == "failed" || job.state == "stopped" {
                anyhow::bail!("job {} {}: {}", job.id, job.state, job.outcome);
            }
            Ok(Some(serde_json::to_value(job)?))
        }
        Command::Status => {
            let (store, _) = server::open(&config).await?;
            let status = octd_trainer::status::gather(&store, &config.policy, now_ms()).await?;
            store.close().await;
            Ok(Some(status))
        }
        Command::Init { expires } => Ok(Some(channel::init(&config.channel.dir, &config.channel.keys, expires).await?)),
        Command::Serve => {
            server::serve(config).await?;
            Ok(None)
        }
        Command::Device { command } => {
            let (store, _) = server::open(&config).await?;
            let out = match command {
                DeviceCommand::Add { identity } => {
                    let text = std::fs::read(&identity).map_err(|e| anyhow::anyhow!("{}: {e}", identity.display()))?;
                    let id: octd_uplink::DeviceIdentity = serde_json::from_slice(&text)
                        .map_err(|e| anyhow::anyhow!("{}: not a device identity: {e}", identity.display()))?;
                    let public = id.ed25519_public()?;
                    let key_id = id.keyid.to_ascii_lowercase();
                    if key_id.is_empty() || key_id.len() > 128 || !key_id.bytes().all(|b| b.is_ascii_hexdigit()) {
                        anyhow::bail!("{}: keyid must be at most 128 hex characters", identity.display());
                    }
                    if !is_token(&id.site, 64) || !is_token(&id.device, 64) {
                        anyhow::bail!("{}: site and device must be 1-64 of [A-Za-z0-9._-]", identity.display());
                    }
                    if let Some(existing) = store.device_by_key(&key_id).await? {
                        anyhow::bail!("key {key_id} is already enrolled for {}/{}", existing.site, existing.device);
                    }
                    if store.active_device(&id.site, &id.device).await?.is_some() {
                        anyhow::bail!(
                            "{}/{} is enrolled with another key; revoke it first (octd-trainer device revoke {}/{})",
                            id.site,
                            id.device,
                            id.site,
                            id.device
                        );
                    }
                    let device = Device {
                        key_id,
                        site: id.site,
                        device: id.device,
                        public_key: hex::encode(public),
                        enrolled_at: now_ms(),
                        revoked_at: None,
                    };
                    store.add_device(&device).await?;
                    json!({"enrolled": device})
                }
                DeviceCommand::List => json!({"devices": store.devices().await?}),
                DeviceCommand::Revoke { device } => {
                    if !store.revoke(&device).await? {
                        anyhow::bail!("no active device {device}");
                    }
                    json!({"revoked": device})
                }
            };
            store.close().await;
            Ok(Some(out))
        }
    }
}
