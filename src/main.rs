use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use octd::config::Config;
use octd::EXIT_CONFIG;

/// octd — de-identify, classify and triage retinal OCT scans beside the scanner.
#[derive(Parser)]
#[command(name = "octd", version, about, long_about = None)]
struct Cli {
    /// TOML configuration (see config/octd.toml). Without it: built-in defaults plus
    /// OCTD_<SECTION>__<KEY> environment overrides.
    #[arg(long, short, global = true, env = "OCTD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch the export folders and publish a result for every scan (the daemon).
    Run,
    /// Classify files once and print one JSON object per input.
    Classify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Model folder (model.onnx + manifest.json); default from the configuration.
        #[arg(long)]
        model: Option<PathBuf>,
        /// One JSON object per line (the default output is a short human summary).
        #[arg(long)]
        json: bool,
    },
    /// Write a de-identified copy of each file into a folder, named by scan id.
    Deidentify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Validate the configuration and print the effective settings as TOML.
    Check,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn,rumqttc=warn,tract=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn print_json_lines(values: &[serde_json::Value]) {
    for v in values {
        println!("{v}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("octd: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    match cli.command {
        Command::Run => {
            init_logging();
            // Store commits, de-identification and inference run on blocking threads; the
            // pipeline bounds that work, so a small pool is enough and keeps memory bounded.
            let blocking_threads = config.pipeline.workers + 8;
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(blocking_threads)
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("octd: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(octd::daemon::run(config, None)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(octd::daemon::DaemonError::Config(e)) => {
                    tracing::error!("configuration error: {e}");
                    ExitCode::from(EXIT_CONFIG as u8)
                }
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Classify { files, model, json } => {
            let mut config = config;
            if let Some(dir) = model {
                config.model.dir = dir;
            }
            match octd::commands::classify(&config, &files) {
                Ok(values) if json => {
                    print_json_lines(&values);
                    ExitCode::SUCCESS
                }
                Ok(values) => {
                    for v in values {
                        let input = v["input"].as_str().unwrap_or_default();
                        match v.get("error") {
                            Some(err) => println!("{input}: error: {}", err.as_str().unwrap_or_default()),
                            None => println!(
                                "{input}: {} ({:.2}) priority={} review={}",
                                v["label"].as_str().unwrap_or_default(),
                                v["confidence"].as_f64().unwrap_or_default(),
                                v["priority"].as_str().unwrap_or_default(),
                                if v["needs_review"].as_bool().unwrap_or(false) { "yes" } else { "no" },
                            ),
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("octd: {e}");
                    ExitCode::from(EXIT_CONFIG as u8)
                }
            }
        }
        Command::Deidentify { files, out } => match octd::commands::deidentify(&config, &files, &out) {
            Ok(values) => {
                print_json_lines(&values);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("octd: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Config { action: ConfigAction::Check } => match toml::to_string_pretty(&config) {
            Ok(text) => {
                println!("{text}");
                eprintln!("octd: configuration is valid");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("octd: {e}");
                ExitCode::from(EXIT_CONFIG as u8)
            }
        },
    }
}
