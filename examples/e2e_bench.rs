//! End-to-end bench: file dropped into the watched folder -> result received over MQTT
//! (the broker forwards it as it PUBACKs), for single B-scans, 64-B-scan volumes, single
//! B-scans queued behind 128-B-scan volumes, and a burst; with the peak RSS of the daemon's
//! own process in each phase. Runs the release binary with the embedded broker.
//!
//!   cargo build --release && cargo run --release --example e2e_bench [-- --bscans 100]
//!       [--backend onnxruntime|tract] (default onnxruntime, as `auto` picks where its library is) [--workers N] [--volumes N] (64-B-scan volumes, default 5) [--octd PATH-TO-ANOTHER-BUILD] [--peer]
//!
//! `--peer` then runs the same scenarios against `scripts/python_peer.py` (a plain serial
//! Python script doing the same job, with its own Mosquitto) on the same files.
//!
//! It also measures the machine's limit in the same run: the CPU time of the unavoidable
//! work of one B-scan (JPEG decode, preprocess, one single-threaded inference on the same
//! backend) in this process, times the cores; and prints the burst's ratio to it.

#[path = "../tests/common/dicom.rs"]
#[allow(dead_code)]
mod dicom;

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error>;

fn drop_in(inbox: &Path, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let tmp = inbox.join(format!(".{name}.partial"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, inbox.join(name))?;
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// CPU seconds (user + system) spent so far by these processes and every process below them.
fn cpu_seconds(roots: &[u32]) -> f64 {
    let tick = 100.0; // USER_HZ, 100 on every Linux the bench runs on
    let mut total = 0.0;
    let mut pending: Vec<u32> = roots.to_vec();
    while let Some(pid) = pending.pop() {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the command name, which may hold spaces, closed by the last ')'.
            let fields: Vec<&str> =
                stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
            let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // utime, stime, and cutime, cstime: a child reaped during the burst counts there.
            total += (ticks(11) + ticks(12) + ticks(13) + ticks(14)) / tick;
        }
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                pending.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
            }
        }
    }
    total
}

/// One stage's timings (index into queue, de-identification, inference, total), sorted.
fn sorted_stage(stages: &[[f64; 4]], i: usize) -> Vec<f64> {
    let mut v: Vec<f64> = stages.iter().map(|s| s[i]).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// One line of a scenario's stage p50s; none for an implementation that reports no stage
/// timings (the Python peer).
fn print_stage_p50s(scenario: &str, stages: &[[f64; 4]]) {
    if stages.iter().any(|s| s[3] > 0.0) {
        let p50 = |i: usize| percentile(&sorted_stage(stages, i), 0.5);
        println!(
            "    {scenario} queue p50 {:.0} ms, de-identify p50 {:.0} ms, infer p50 {:.0} ms, claimed -> classified p50 {:.0} ms",
            p50(0),
            p50(1),
            p50(2),
            p50(3)
        );
    }
}

/// A process's peak RSS phase by phase: each [`PhasePeaks::take`] reads the peak (VmHWM)
/// since the previous one and resets it (clear_refs 5). The phase after a failed reset
/// reports none rather than a peak that is not its own.
struct PhasePeaks {
    pid: u32,
    since_reset: bool,
}

impl PhasePeaks {
    fn new(pid: u32) -> Self {
        PhasePeaks { pid, since_reset: true }
    }

    fn take(&mut self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok();
        let peak = status
            .as_deref()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse().ok())
            .filter(|_| self.since_reset);
        self.since_reset = std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5").is_ok();
        peak
    }
}

fn backend_kind(backend: &str) -> octd::config::BackendKind {
    match backend {
        "onnxruntime" => octd::config::BackendKind::Onnxruntime,
        _ => octd::config::BackendKind::Tract,
    }
}

/// Seconds for one inference call over 64 preprocessed B-scans (the volume goal's yardstick).
fn batch_of_64(repo: &Path, jpeg: &[u8], backend: &str) -> Result<f64, Error> {
    let mut config = octd::config::Config::default();
    config.model.backend = backend_kind(backend);
    let classifier = octd::infer::Classifier::load(&repo.join("models/default"), &config.model, &config.triage)?;
    let frame = octd::infer::frames::from_image(&image::load_from_memory(jpeg)?);
    let spec = classifier.input_spec().clone();
    let mut input = Vec::new();
    for _ in 0..64 {
        octd::infer::preprocess::preprocess_into(&frame, &spec, &mut input);
    }
    let shape = [64, spec.channels, spec.height, spec.width];
    classifier.run_tensor(input.clone(), shape)?;
    let runs = 5;
    let t0 = Instant::now();
    for _ in 0..runs {
        classifier.run_tensor(input.clone(), shape)?;
    }
    Ok(t0.elapsed().as_secs_f64() / runs as f64)
}

/// Seconds of CPU per B-scan for the work no implementation can skip, measured here on one
/// thread while the other cores idle; the same work on every core at once (one session
/// each), as seconds of wall time per B-scan; and the cores there are.
fn machine_limit(repo: &Path, jpeg: &[u8], backend: &str) -> Result<(f64, f64, usize), Error> {
    let cores = octd::infer::cores();
    // ONNX Runtime keeps at most 16 CPU sessions: one lane per session, never waiting for one.
    let lanes = cores.min(16);
    let mut config = octd::config::Config::default();
    config.model.threads = 1;
    config.model.batch_size = 1;
    config.model.concurrency = lanes;
    config.model.backend = backend_kind(backend);
    let classifier = octd::infer::Classifier::load(&repo.join("models/default"), &config.model, &config.triage)?;
    let once = || -> Result<(), String> {
        let image = image::load_from_memory(jpeg).map_err(|e| e.to_string())?;
        classifier.classify_frames(&[octd::infer::frames::from_image(&image)]).map_err(|e| e.to_string())?;
        Ok(())
    };
    for _ in 0..20 {
        once()?;
    }
    let runs = 200;
    let t0 = Instant::now();
    for _ in 0..runs {
        once()?;
    }
    let alone = t0.elapsed().as_secs_f64() / runs as f64;
    let on_every_lane = |each: usize| {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..lanes).map(|_| s.spawn(|| (0..each).try_for_each(|_| once()))).collect();
            handles.into_iter().try_for_each(|lane| lane.join().map_err(|_| "a lane panicked".to_string())?)
        })
    };
    // Every session warm before the clock starts, as in the daemon after its first scans.
    on_every_lane(5)?;
    let t0 = Instant::now();
    on_every_lane(runs / 2)?;
    let together = t0.elapsed().as_secs_f64() / (lanes * (runs / 2)) as f64;
    Ok((alone, together, cores))
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let burst: usize = args
        .iter()
        .position(|a| a == "--bscans")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let option = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let backend = option("--backend").unwrap_or_else(|| "onnxruntime".into());
    let workers: usize = option("--workers").and_then(|w| w.parse().ok()).unwrap_or(4);
    let volumes: usize = option("--volumes").and_then(|w| w.parse().ok()).unwrap_or(5).max(1);
    let counts = Counts { burst, volumes };
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = match option("--octd") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()?
            .parent()
            .and_then(|p| p.parent())
            .map(|p| p.join("octd"))
            .ok_or("no octd binary")?,
    };
    let bscan_path = repo.join("../shared/data/oct/CNV/CNV-53018-1.jpeg");
    let bscan = std::fs::read(&bscan_path)
        .map_err(|e| format!("{}: {e} (the bench needs ../shared/data)", bscan_path.display()))?;
    let frame = dicom::grey_frame(&bscan_path, 512, 496);
    let volume_of = |frames: usize| {
        dicom::build(dicom::Spec::plain(
            dicom::OPT_SOP_CLASS,
            dicom::Pixels::Native { width: 512, height: 496, frames: vec![frame.clone(); frames] },
        ))
    };
    let (volume, volume_128) = (volume_of(64), volume_of(128));

    let dir = tempfile::tempdir()?;
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox)?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = dir.path().join("octd.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nstate_dir = \"{}\"\n[ingest]\nwatch = [\"{}\"]\n[model]\ndir = \"{}\"\nbackend = \"{backend}\"\n[pipeline]\nworkers = {workers}\nqueue_capacity = {}\n[mqtt]\nembedded_listen = \"127.0.0.1:{port}\"\n",
            dir.path().join("state").display(),
            inbox.display(),
            repo.join("models/default").display(),
            burst + 8,
        ),
    )?;
    let mut daemon = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = daemon.id();
    std::thread::sleep(Duration::from_secs(3));
    let octd = scenarios(port, &inbox, &bscan, &volume, &volume_128, counts, &[pid])?;
    let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    let _ = daemon.wait();
    println!(
        "octd ({backend}, {workers} workers): drop -> result on MQTT (embedded broker, files renamed into the folder)"
    );
    octd.print();

    // The plain-Python peer on the same files, on the same machine, right after.
    let peer = match args.iter().any(|a| a == "--peer") {
        true => Some(run_peer(&repo, dir.path(), &bscan, &volume, &volume_128, counts)?),
        false => None,
    };

    let batch = batch_of_64(&repo, &bscan, &backend)?;
    println!(
        "  64 inferences in one batch ({backend}, every core): {:.0} ms; octd's volume p50 is {:.2}x of it",
        batch * 1000.0,
        octd.volume_p50() / (batch * 1000.0)
    );
    let (per_scan, together, cores) = machine_limit(&repo, &bscan, &backend)?;
    let limit = cores as f64 / per_scan;
    println!(
        "  machine limit ({backend}): decode + preprocess + 1-thread inference {:.2} ms/scan x {cores} cores = {limit:.0} scans/s; octd's burst at {:.2}x of it",
        per_scan * 1000.0,
        octd.burst_rate() / limit
    );
    println!(
        "  the same work on every core at once (a session each, at most 16): {:.0} scans/s ({:.2}x of the limit: what sharing the machine costs); octd's burst at {:.2}x of it",
        1.0 / together,
        per_scan / together / cores as f64,
        octd.burst_rate() * together
    );
    if let Some(peer) = peer {
        println!(
            "  octd ({backend}) against the Python peer (onnxruntime): single B-scan p50 {:.0} vs {:.0} ms, volume p50 {:.0} vs {:.0} ms, burst {:.1} vs {:.1} scans/s ({:.2}x of the limit)",
            percentile(&octd.single, 0.5),
            percentile(&peer.single, 0.5),
            octd.volume_p50(),
            peer.volume_p50(),
            octd.burst_rate(),
            peer.burst_rate(),
            peer.burst_rate() / limit
        );
    }
    Ok(())
}

/// How many scans the scenarios drop: B-scans in the burst, 64-B-scan volumes one by one.
#[derive(Clone, Copy)]
struct Counts {
    burst: usize,
    volumes: usize,
}

/// What one implementation did with the same files.
struct Figures {
    single: Vec<f64>,
    volume: Vec<f64>,
    /// CPU seconds the implementation (with its broker) spent on the 64-B-scan volumes.
    volume_cpu_s: f64,
    burst: usize,
    burst_s: f64,
    /// CPU seconds the implementation (with its broker) spent during the burst.
    burst_cpu_s: f64,
    /// Each burst result's own stage timings (queue, de-identification, inference, total).
    burst_stages: Vec<[f64; 4]>,
    /// The same for each volume.
    volume_stages: Vec<[f64; 4]>,
    /// The same for each single B-scan dropped into the idle daemon.
    single_stages: Vec<[f64; 4]>,
    /// Drop -> result of single B-scans dropped while a 128-B-scan volume was in the works.
    behind: Vec<f64>,
    /// That volume's inference time as it reports it (empty where it reports none).
    volume_128_infer: Vec<f64>,
    /// Peak RSS of the implementation's process in each phase: start-up (model load and a
    /// warm-up scan), single B-scans and 64-B-scan volumes, the 128-B-scan volumes with
    /// B-scans behind them, the burst.
    peak_rss_kib: [Option<u64>; 4],
}

impl Figures {
    fn volume_p50(&self) -> f64 {
        percentile(&self.volume, 0.5)
    }

    fn burst_rate(&self) -> f64 {
        self.burst as f64 / self.burst_s
    }

    fn print(&self) {
        let (single, vol) = (&self.single, &self.volume);
        println!(
            "  single B-scan (512x496 JPEG), {} runs: p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
            single.len(),
            percentile(single, 0.5),
            percentile(single, 0.95),
            single[single.len() - 1]
        );
        print_stage_p50s("single", &self.single_stages);
        println!(
            "  64-B-scan DICOM volume, {} runs:        p50 {:.0} ms, max {:.0} ms, {:.0} ms of CPU each",
            vol.len(),
            percentile(vol, 0.5),
            vol[vol.len() - 1],
            self.volume_cpu_s * 1000.0 / vol.len() as f64
        );
        print_stage_p50s("volume", &self.volume_stages);
        if !self.behind.is_empty() {
            let idle = percentile(single, 0.5);
            let worst = self.behind[self.behind.len() - 1];
            print!(
                "  single B-scans behind a 128-B-scan volume ({} in all, 8 per volume, 100 ms apart): p50 {:.0} ms, max {:.0} ms, {:.0} ms more than idle at worst",
                self.behind.len(),
                percentile(&self.behind, 0.5),
                worst,
                worst - idle
            );
            match self.volume_128_infer.is_empty() {
                true => println!(),
                false => {
                    let infer = percentile(&self.volume_128_infer, 0.5);
                    println!(" ({:.2}x of the volume's own inference, p50 {infer:.0} ms)", (worst - idle) / infer)
                }
            }
        }
        println!(
            "  burst of {} B-scans: {:.1} s, {:.1} scans/s, {:.1} ms of CPU per scan (its processes and their broker)",
            self.burst,
            self.burst_s,
            self.burst_rate(),
            self.burst_cpu_s * 1000.0 / self.burst as f64
        );
        for (i, name) in ["queue", "de-identify", "infer", "total"].iter().enumerate() {
            let v = sorted_stage(&self.burst_stages, i);
            if !v.is_empty() && v[v.len() - 1] > 0.0 {
                println!("    burst {name}: p50 {:.0} ms, p95 {:.0} ms", percentile(&v, 0.5), percentile(&v, 0.95));
            }
        }
        let mib = |kib: Option<u64>| kib.map_or("unavailable".to_string(), |k| format!("{:.0} MiB", k as f64 / 1024.0));
        let [start, small, big, burst] = self.peak_rss_kib;
        println!(
            "  peak RSS (VmHWM) of its process: start-up {}, single B-scans and 64-B-scan volumes {}, 128-B-scan volumes {}, burst {}",
            mib(start),
            mib(small),
            mib(big),
            mib(burst)
        );
    }
}

/// Drop the same files into `inbox` as a scanner would and time each result's arrival on the
/// broker at `port`: a warm-up, 20 single B-scans, `volumes` 64-B-scan volumes, single B-scans behind three
/// 128-B-scan volumes, then a burst.
/// `processes`: whose CPU time (theirs and their children's) the burst is charged.
fn scenarios(
    port: u16,
    inbox: &Path,
    bscan: &[u8],
    volume: &[u8],
    volume_128: &[u8],
    counts: Counts,
    processes: &[u32],
) -> Result<Figures, Error> {
    let Counts { burst, volumes } = counts;
    let (tx, rx) = mpsc::channel::<(String, Instant, Vec<u8>)>();
    let mut options = rumqttc::MqttOptions::new(format!("e2e-bench-{port}"), "127.0.0.1", port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = rumqttc::Client::new(options, 1000);
    let (subscribed_tx, subscribed) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe("oct/+/+/results/#", rumqttc::QoS::AtLeastOnce);
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    let _ = subscribed_tx.send(());
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), Instant::now(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    subscribed.recv_timeout(Duration::from_secs(30))?;
    let mut seen = HashSet::new();
    let mut stages = Vec::<[f64; 4]>::new();
    // The next result not seen before: when it arrived, whether it was a volume's, and when
    // the implementation received the file (octd says; the peer does not).
    let mut next_result = |stages: &mut Vec<[f64; 4]>, phase: &str| -> Result<(Instant, bool, String), Error> {
        loop {
            let (topic, at, payload) = rx
                .recv_timeout(Duration::from_secs(120))
                .map_err(|e| format!("{phase}: no new result within 120 s after {} ({e})", seen.len()))?;
            if seen.insert(topic) {
                let (mut volume, mut received) = (false, String::new());
                if let Ok(result) = serde_json::from_slice::<serde_json::Value>(&payload) {
                    let t = &result["timings_ms"];
                    let ms = |k: &str| t[k].as_f64().unwrap_or(0.0);
                    stages.push([ms("queue_ms"), ms("deid_ms"), ms("infer_ms"), ms("total_ms")]);
                    // octd names the input's kind; the peer counts the frames.
                    volume = result["input_kind"] == "dicom" || result["frames"].as_u64().is_some_and(|n| n > 1);
                    received = match (result["received_at"].as_str(), result["input_kind"].is_null()) {
                        (Some(at), _) => at.to_string(),
                        // The peer says neither; octd always says when it received the file.
                        (None, true) => String::new(),
                        (None, false) => return Err(format!("{phase}: a result without received_at").into()),
                    };
                }
                return Ok((at, volume, received));
            }
        }
    };
    let mut peaks = PhasePeaks::new(processes[0]);
    drop_in(inbox, "warmup.jpeg", bscan)?;
    next_result(&mut stages, "warm-up")?;
    let rss_start = peaks.take();
    let mut single = Vec::new();
    for i in 0..20 {
        let t0 = Instant::now();
        drop_in(inbox, &format!("s{i}.jpeg"), bscan)?;
        single.push((next_result(&mut stages, "single B-scans")?.0 - t0).as_secs_f64() * 1000.0);
    }
    let single_stages = stages.split_off(stages.len() - single.len());
    let mut volume_ms = Vec::new();
    let volume_cpu0 = cpu_seconds(processes);
    for i in 0..volumes {
        let t0 = Instant::now();
        drop_in(inbox, &format!("v{i}.dcm"), volume)?;
        volume_ms.push((next_result(&mut stages, "64-B-scan volumes")?.0 - t0).as_secs_f64() * 1000.0);
    }
    let volume_cpu_s = cpu_seconds(processes) - volume_cpu0;
    let volume_stages = stages.split_off(stages.len() - volume_ms.len());
    stages.clear();
    let rss_single_and_64 = peaks.take();
    // Single B-scans dropped behind a 128-B-scan volume, one every 100 ms while it is
    // de-identified and classified: what a scanner's next patient waits for when a volume is
    // in the works (with several workers, a free inference session rather than the volume).
    let mut behind = Vec::new();
    let mut volume_128_infer = Vec::new();
    for run in 0..3 {
        let mut dropped = Vec::new();
        drop_in(inbox, &format!("big{run}.dcm"), volume_128)?;
        let v0 = Instant::now();
        for i in 0..8 {
            std::thread::sleep((v0 + Duration::from_millis(100 * (i + 1))).saturating_duration_since(Instant::now()));
            dropped.push(Instant::now());
            drop_in(inbox, &format!("behind{run}-{i}.jpeg"), bscan)?;
        }
        // Results arrive in any order: a B-scan's result is matched to its drop by when the
        // daemon received it (drops are 100 ms apart; RFC 3339 times of one zone sort as
        // text). The serial peer answers in the order of the drops.
        let mut answers = Vec::new();
        for _ in 0..=dropped.len() {
            let mut one = Vec::new();
            let (at, volume, received) = next_result(&mut one, "B-scans behind a 128-B-scan volume")?;
            match volume {
                true => volume_128_infer.extend(one.first().map(|s| s[2]).filter(|ms| *ms > 0.0)),
                false => answers.push((received, at)),
            }
        }
        if answers.len() != dropped.len() {
            return Err(format!("{} results for {} B-scans behind volume {run}", answers.len(), dropped.len()).into());
        }
        answers.sort_by(|a, b| a.0.cmp(&b.0));
        for ((_, at), drop) in answers.iter().zip(&dropped) {
            behind.push((*at - *drop).as_secs_f64() * 1000.0);
        }
    }
    let rss_128 = peaks.take();
    let cpu0 = cpu_seconds(processes);
    let t0 = Instant::now();
    for i in 0..burst {
        drop_in(inbox, &format!("b{i}.jpeg"), bscan)?;
    }
    for _ in 0..burst {
        next_result(&mut stages, "burst")?;
    }
    let burst_s = t0.elapsed().as_secs_f64();
    let burst_cpu_s = cpu_seconds(processes) - cpu0;
    let rss_burst = peaks.take();
    single.sort_by(f64::total_cmp);
    volume_ms.sort_by(f64::total_cmp);
    behind.sort_by(f64::total_cmp);
    volume_128_infer.sort_by(f64::total_cmp);
    Ok(Figures {
        single,
        volume: volume_ms,
        volume_cpu_s,
        burst,
        burst_s,
        burst_cpu_s,
        burst_stages: stages,
        volume_stages,
        single_stages,
        behind,
        volume_128_infer,
        peak_rss_kib: [rss_start, rss_single_and_64, rss_128, rss_burst],
    })
}

/// The same scenarios against `scripts/python_peer.py`, with a Mosquitto of its own.
fn run_peer(
    repo: &Path,
    dir: &Path,
    bscan: &[u8],
    volume: &[u8],
    volume_128: &[u8],
    counts: Counts,
) -> Result<Figures, Error> {
    use std::io::BufRead;
    let python = repo.join(".venv/bin/python");
    let mosquitto = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or("--peer needs Mosquitto (apt install mosquitto)")?;
    if !python.exists() {
        return Err("--peer needs the .venv (scripts/test.sh makes it)".into());
    }
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut broker =
        Command::new(mosquitto).args(["-p", &port.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let inbox = dir.join("peer-inbox");
    std::fs::create_dir_all(&inbox)?;
    let mut peer = Command::new(python)
        .arg(repo.join("scripts/python_peer.py"))
        .arg("--watch")
        .arg(&inbox)
        .arg("--state")
        .arg(dir.join("peer-state"))
        .args(["--broker", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = peer.id();
    let mut ready = String::new();
    if let Some(out) = peer.stdout.take() {
        std::io::BufReader::new(out).read_line(&mut ready)?;
    }
    let figures = match ready.trim() == "ready" {
        true => scenarios(port, &inbox, bscan, volume, volume_128, counts, &[pid, broker.id()]),
        false => Err("the Python peer did not start".into()),
    };
    let _ = peer.kill();
    let _ = peer.wait();
    let _ = broker.kill();
    let _ = broker.wait();
    let figures = figures?;
    println!("the Python peer (scripts/python_peer.py: serial, onnxruntime's default threads, SQLite, paho-mqtt QoS 1, Mosquitto)");
    figures.print();
    Ok(figures)
}
