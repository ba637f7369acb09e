use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use octd::config::Config;
use octd::EXIT_CONFIG;
use octd_bundle::repo::{Publication, RoleSpec, RootSpec};

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
    /// The daemon's sandboxed decoder worker (started by `octd run`, speaks on stdin/stdout).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        memory_bytes: u64,
    },
    /// The embedded MQTT broker's own process (started by `octd run`, setup on stdin).
    #[command(hide = true)]
    Broker {
        #[arg(long)]
        memory_bytes: u64,
    },
    /// Classify files once and print one JSON object per input.
    Classify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Model folder (model.onnx + manifest.json); default: model.dir, else models/default.
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
    /// The installed models and every install, refusal, commit and rollback, from the store
    /// (while the daemon is stopped: the store is its alone while it runs).
    Models,
    /// Make this machine a device: configuration (written to --config, default
    /// /etc/octd/octd.toml), trust root, device secret and identity key, folders and owners.
    /// Idempotent; a provisioned device is changed only with --force.
    Provision {
        #[command(flatten)]
        answers: octd::commands::provision::Answers,
        #[arg(long)]
        broker_password_file: Option<PathBuf>,
        /// Service user owning the state folder, watch folders and secrets (when run as root).
        #[arg(long, default_value = "octd")]
        owner: String,
        /// systemd drop-in folder for ReadWritePaths= of the watch folders.
        #[arg(long, default_value = "/etc/systemd/system/octd.service.d")]
        systemd_dropin_dir: PathBuf,
        /// Do not write the systemd drop-in (no systemd on this machine).
        #[arg(long)]
        no_systemd_dropin: bool,
        /// Ask for every value the flags do not give.
        #[arg(long, short)]
        interactive: bool,
        /// Replace the settings of a provisioned device (its secret and identity key stay).
        #[arg(long)]
        force: bool,
    },
    /// Check this device: config, clock, folders, disk, store, model, backend, broker,
    /// model channel, uplink. Exits 1 when a check fails; each failure says how to fix it.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// What the daemon is doing: model, backend, queue, outbox, last result, broker.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Quarantined scans: list, show, release back through the pipeline, purge. Originals
    /// stay sealed under the device key; nothing here prints identity.
    Quarantine {
        #[command(subcommand)]
        action: QuarantineAction,
    },
    /// Give a reviewer's verdict on a scan's result (through the running daemon, checked
    /// like a verdict on MQTT); a later verdict on the same scan is a correction.
    Label {
        scan_id: String,
        /// The confirmed class (one of the model's).
        #[arg(required_unless_present = "undo")]
        label: Option<String>,
        /// Take back the reviewer's latest verdict on the scan instead (a new revision restores
        /// the label before it, or none).
        #[arg(long, conflicts_with = "label")]
        undo: bool,
        /// The reviewer's pseudonymous id (see `octd reviewer add`).
        #[arg(long)]
        reviewer: String,
        /// How long to wait for the daemon's answer.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// The reviewers this device knows: pseudonymous ids, optionally with a password for
    /// the local API.
    Reviewer {
        #[command(subcommand)]
        action: ReviewerAction,
    },
    /// Model bundles and their signed channel (see docs/model-channel.md).
    Bundle {
        #[command(subcommand)]
        action: BundleAction,
    },
}

#[derive(Subcommand)]
enum BundleAction {
    /// Create an Ed25519 signing key (PKCS#8, mode 0600) and print its key id.
    Keygen { out: PathBuf },
    /// Write a channel's root of trust; run again with new keys to rotate it (then the
    /// previous root keys must sign too: --previous-root-key).
    Init {
        #[arg(long)]
        repo: PathBuf,
        #[arg(long = "root-key", required = true)]
        root_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 1)]
        root_threshold: u64,
        #[arg(long = "targets-key", required = true)]
        targets_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 1)]
        targets_threshold: u64,
        #[arg(long = "snapshot-key", required = true)]
        snapshot_keys: Vec<PathBuf>,
        #[arg(long = "timestamp-key", required = true)]
        timestamp_keys: Vec<PathBuf>,
        /// How long the root stays valid.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        expires: std::time::Duration,
        #[arg(long = "previous-root-key")]
        previous_root_keys: Vec<PathBuf>,
    },
    /// Pack a model folder into a bundle with a self-test computed on this machine.
    Pack {
        /// Folder with model.onnx and manifest.json.
        #[arg(long)]
        model: PathBuf,
        /// Self-test inputs (de-identified images); default: generated synthetic B-scans.
        #[arg(long)]
        samples: Option<PathBuf>,
        /// Largest allowed difference of a class probability on the device.
        #[arg(long, default_value_t = 1e-3)]
        tolerance: f32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Add bundles to (or withdraw versions from) a channel and re-sign it; with neither,
    /// refresh the timestamp.
    Publish {
        #[arg(long)]
        repo: PathBuf,
        #[arg(long)]
        add: Vec<PathBuf>,
        #[arg(long)]
        withdraw: Vec<String>,
        /// Signing keys (any roles; each signs the roles the root gives it).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        targets_expires: std::time::Duration,
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        snapshot_expires: std::time::Duration,
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        timestamp_expires: std::time::Duration,
    },
    /// Verify a channel and its newest bundle as a device would, self-test included.
    Verify {
        /// Channel location: folder, file://, http:// or https://.
        #[arg(long)]
        repository: String,
        /// The trusted root.json.
        #[arg(long)]
        root: PathBuf,
    },
}

#[derive(Subcommand)]
enum QuarantineAction {
    /// Every quarantined scan, oldest first: reason, sealed size, age.
    List,
    /// One quarantined scan: its reason and when retention purges it.
    Show { scan_id: String },
    /// Put the original back through the pipeline (e.g. after configuring the mask it lacked).
    Release {
        scan_id: String,
        /// How long to wait for the running daemon's answer.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// Remove sealed originals for good.
    Purge {
        scan_ids: Vec<String>,
        #[arg(long, conflicts_with = "scan_ids")]
        all: bool,
    },
}

#[derive(Subcommand)]
enum ReviewerAction {
    /// Add a reviewer (or set a known one's password).
    Add {
        id: String,
        /// Read a password (at least 12 characters) from stdin, for logging in to the local API.
        #[arg(long)]
        password_stdin: bool,
    },
    List,
    /// Remove a reviewer; their earlier verdicts stay.
    Remove {
        id: String,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Validate the configuration and print the effective settings as TOML.
    Check,
}

/// Under systemd (stderr connected to the journal) each event goes to journald with its
/// fields as journal fields (SCAN_ID=…, MODEL=…; `journalctl -u octd SCAN_ID=…`); in a
/// terminal, human-readable lines on stderr.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,rumqttd=warn,rumqttc=warn,tract=warn,ort=warn")
        })
    };
    if octd::telemetry::systemd::journal_attached() {
        match tracing_journald::layer() {
            Ok(journald) => {
                use tracing_journald::{Priority, PriorityMappings};
                // syslog's meaning: info is 6 and debug 7 (`journalctl -p info` hides debug).
                let priorities = PriorityMappings {
                    info: Priority::Informational,
                    debug: Priority::Debug,
                    trace: Priority::Debug,
                    ..PriorityMappings::new()
                };
                let journald = journald
                    .with_syslog_identifier("octd".into())
                    .with_field_prefix(None)
                    .with_priority_mappings(priorities);
                tracing_subscriber::registry().with(filter()).with(journald).init();
                return;
            }
            Err(e) => eprintln!("octd: journald socket unavailable ({e}); logging to stderr"),
        }
    }
    tracing_subscriber::fmt().with_env_filter(filter()).with_writer(std::io::stderr).init();
}

fn print_json_lines(values: &[serde_json::Value]) {
    for v in values {
        println!("{v}");
    }
}

/// A one-shot command's report as pretty JSON, or its error.
fn print_report(result: Result<serde_json::Value, String>) -> ExitCode {
    match result {
        Ok(value) => {
            println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("octd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// glibc's allocator, except that a thread may ask for its blocks of 4 KiB and more to start
/// on a 64-byte line: ONNX Runtime's CPU sessions share one copy of a model's weights, which
/// octd allocates (`ort_backend::SharedWeights`), and its kernels ran about 6 % slower on
/// weights at glibc's 16-byte alignment. Aligning every such block instead raised the
/// start-up peak by about 40 MiB (docs/benchmarks.md, "A lone B-scan on every core").
#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
mod weight_allocator {
    use std::alloc::{GlobalAlloc, Layout};
    use std::cell::Cell;

    pub struct WeightAligned;

    const FROM: usize = 4 << 10;
    const LINE: usize = 64;
    /// What glibc's malloc and realloc align to on 64-bit targets.
    const MALLOC_ALIGN: usize = 16;

    thread_local! {
        static ALIGNING: Cell<bool> = const { Cell::new(false) };
    }

    /// Registered with the library (`octd::infer::align_weights_with`).
    pub fn aligning(on: bool) {
        ALIGNING.with(|a| a.set(on));
    }

    /// malloc, calloc and realloc give this alignment for this size (as std's System
    /// allocator decides).
    fn by_malloc(align: usize, size: usize) -> bool {
        align <= MALLOC_ALIGN && align <= size
    }

    fn wanted(layout: Layout) -> usize {
        let aligning = ALIGNING.try_with(Cell::get).unwrap_or(false);
        match aligning && layout.size() >= FROM {
            true => layout.align().max(LINE),
            false => layout.align(),
        }
    }

    // SAFETY: every block comes from glibc with at least the size and alignment its layout
    // asks for (malloc for alignments malloc gives, posix_memalign above them) and goes back
    // with free, which takes blocks from either; realloc keeps malloc's alignment, which is
    // all a layout of that alignment asks for, and copies otherwise.
    unsafe impl GlobalAlloc for WeightAligned {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let align = wanted(layout);
            if by_malloc(align, layout.size()) {
                return unsafe { libc::malloc(layout.size()) }.cast();
            }
            let mut out = std::ptr::null_mut();
            let align = align.max(std::mem::size_of::<usize>());
            match unsafe { libc::posix_memalign(&mut out, align, layout.size()) } {
                0 => out.cast(),
                _ => std::ptr::null_mut(),
            }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let align = wanted(layout);
            if by_malloc(align, layout.size()) {
                // calloc skips zeroing the pages a large block gets fresh from the kernel.
                return unsafe { libc::calloc(layout.size(), 1) }.cast();
            }
            let block = unsafe { self.alloc(layout) };
            if !block.is_null() {
                unsafe { std::ptr::write_bytes(block, 0, layout.size()) };
            }
            block
        }

        unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
            unsafe { libc::free(ptr.cast()) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            if by_malloc(layout.align(), new_size) {
                return unsafe { libc::realloc(ptr.cast(), new_size) }.cast();
            }
            let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
                return std::ptr::null_mut();
            };
            let moved = unsafe { self.alloc(new_layout) };
            if !moved.is_null() {
                unsafe {
                    std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                    libc::free(ptr.cast());
                }
            }
            moved
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
#[global_allocator]
static ALLOCATOR: weight_allocator::WeightAligned = weight_allocator::WeightAligned;

/// How glibc's allocator serves this process (docs/benchmarks.md, "Memory within 120 MiB"):
/// - Buffers the size of a volume are mapped for themselves and unmapped when freed. glibc's
///   default raises this threshold after the first large free, after which a volume's input,
///   artefact and parsed object stayed resident together: measured, a 128-B-scan volume then
///   cost the daemon 5x its pixels instead of 1x.
/// - The heap is trimmed after each model load, which otherwise leaves about 15 MiB per ONNX
///   Runtime session freed but resident.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator parameter; it is called before any other
        // thread exists. An unknown or refused parameter returns 0 and changes nothing.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        }
        octd::infer::release_after_load(trim_heap);
        #[cfg(target_pointer_width = "64")]
        octd::infer::align_weights_with(weight_allocator::aligning);
    }
}

/// One heap for every thread, where ONNX Runtime will run the model: with a heap per thread
/// each kept its own freed memory resident, 10–15 MiB more at a burst's peak for no speed
/// gained. Not for tract, whose threads allocate on every run: one heap cut its peak from
/// about 690 to 275 MiB but made its volumes 45 % slower (docs/benchmarks.md, "Memory
/// within 120 MiB"). glibc fixes the number of heaps at the first one it adds: call before
/// anything starts a thread. Should ONNX Runtime then fail to load, the tract fallback runs
/// on the one heap (slower, smaller; the fallback is logged).
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(unused_variables))]
fn one_heap_for_onnxruntime(model: &octd::config::ModelConfig) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if model.backend != octd::config::BackendKind::Tract
        && octd::infer::ort_backend::find_library(model.onnxruntime_library.as_deref()).is_some_and(|p| p.is_file())
    {
        // SAFETY: as in tune_allocator; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Give the heap's free pages back to the system (after a model load, which frees much).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    // SAFETY: malloc_trim only returns free memory of the allocator's own heap to the system;
    // it takes the allocator's locks and touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn main() -> ExitCode {
    // First: both set process-wide state that other threads must not race with.
    tune_allocator();
    octd::infer::ort_backend::keep_telemetry_off_from_start();
    let cli = Cli::parse();
    // The decoder worker confines itself first thing: no configuration, no logging.
    if let Command::Broker { memory_bytes } = cli.command {
        init_logging();
        return ExitCode::from(octd::publish::broker::serve(memory_bytes).clamp(0, 255) as u8);
    }
    if let Command::Worker { memory_bytes } = cli.command {
        return ExitCode::from(octd::isolation::child::serve(memory_bytes).clamp(0, 255) as u8);
    }
    // One TLS provider for every client (MQTT, model channel, uplink, status).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Provision writes the configuration; it must not need one.
    if let Command::Provision {
        mut answers,
        broker_password_file,
        owner,
        systemd_dropin_dir,
        no_systemd_dropin,
        interactive,
        force,
    } = cli.command
    {
        use octd::commands::provision::{self, Options};
        if let Some(path) = broker_password_file {
            match std::fs::read_to_string(&path) {
                Ok(p) => answers.broker_password = Some(p.trim_end_matches(['\n', '\r']).to_string()),
                Err(e) => {
                    eprintln!("octd: {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
        }
        if interactive {
            let stdin = std::io::stdin();
            match provision::ask(answers, &mut stdin.lock(), &mut std::io::stderr()) {
                Ok(a) => answers = a,
                Err(e) => {
                    eprintln!("octd: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let options = Options {
            config_path: cli.config.clone().unwrap_or_else(|| PathBuf::from("/etc/octd/octd.toml")),
            owner: Some(owner),
            systemd_dropin_dir: (!no_systemd_dropin).then_some(systemd_dropin_dir),
            force,
        };
        return print_report(provision::provision(&answers, &options).map_err(|e| e.to_string()));
    }
    // Doctor reports a configuration that does not load as its first finding.
    if let Command::Doctor { json } = cli.command {
        let report = octd::doctor::run(cli.config.as_deref());
        if json {
            println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
        } else {
            print!("{}", octd::doctor::human(&report));
        }
        return if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("octd: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    one_heap_for_onnxruntime(&config.model);
    if matches!(cli.command, Command::Run | Command::Config { .. }) {
        if let Err(e) = config.check_files() {
            eprintln!("octd: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    }
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
                config.model.dir = Some(dir);
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
        Command::Doctor { .. } | Command::Provision { .. } | Command::Worker { .. } | Command::Broker { .. } => {
            ExitCode::SUCCESS
        } // handled above
        Command::Models => print_report(octd::commands::models(&config)),
        Command::Status { json } => match octd::commands::status::status(&config) {
            Ok(report) if json => print_report(Ok(report)),
            Ok(report) => {
                println!("{}", octd::commands::status::human(&report));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("octd: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Quarantine { action } => {
            use octd::commands::quarantine;
            print_report(match action {
                QuarantineAction::List => quarantine::list(&config),
                QuarantineAction::Show { scan_id } => quarantine::show(&config, &scan_id),
                QuarantineAction::Release { scan_id, wait } => quarantine::release(&config, &scan_id, wait),
                QuarantineAction::Purge { scan_ids, all } => quarantine::purge(&config, &scan_ids, all),
            })
        }
        Command::Label { scan_id, label, undo: _, reviewer, wait } => {
            print_report(octd::commands::feedback::label(&config, &scan_id, label.as_deref(), &reviewer, wait))
        }
        Command::Reviewer { action } => {
            use octd::commands::feedback;
            print_report(match action {
                ReviewerAction::Add { id, password_stdin } => feedback::reviewer_add(&config, &id, password_stdin),
                ReviewerAction::List => feedback::reviewer_list(&config),
                ReviewerAction::Remove { id } => feedback::reviewer_remove(&config, &id),
            })
        }
        Command::Bundle { action } => {
            use octd::commands::bundle;
            let result = match action {
                BundleAction::Keygen { out } => bundle::keygen(&out),
                BundleAction::Init {
                    repo,
                    root_keys,
                    root_threshold,
                    targets_keys,
                    targets_threshold,
                    snapshot_keys,
                    timestamp_keys,
                    expires,
                    previous_root_keys,
                } => bundle::expires_in(expires).and_then(|expires| {
                    let role = |keys, threshold| RoleSpec { keys, threshold };
                    let spec = RootSpec {
                        root: role(root_keys, root_threshold),
                        targets: role(targets_keys, targets_threshold),
                        snapshot: role(snapshot_keys, 1),
                        timestamp: role(timestamp_keys, 1),
                        expires,
                    };
                    bundle::init(&repo, &spec, &previous_root_keys)
                }),
                BundleAction::Pack { model, samples, tolerance, out } => {
                    bundle::pack(&config, &model, samples.as_deref(), tolerance, &out)
                }
                BundleAction::Publish {
                    repo,
                    add,
                    withdraw,
                    keys,
                    targets_expires,
                    snapshot_expires,
                    timestamp_expires,
                } => (|| {
                    let publication = Publication {
                        add,
                        withdraw,
                        keys,
                        signing_root: None,
                        targets_expires: bundle::expires_in(targets_expires)?,
                        snapshot_expires: bundle::expires_in(snapshot_expires)?,
                        timestamp_expires: bundle::expires_in(timestamp_expires)?,
                    };
                    bundle::publish(&repo, &publication)
                })(),
                BundleAction::Verify { repository, root } => bundle::verify(&config, &repository, &root),
            };
            print_report(result)
        }
        Command::Config { action: ConfigAction::Check } => match toml::to_string_pretty(&config.redacted()) {
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
