//! Test harness: a real Mosquitto on a free port, a real MQTT subscriber, the real `octd`
//! binary against real folders and a real redb file.
#![allow(dead_code)]

pub mod dicom;
pub mod trainer;

use std::collections::HashMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/data`, or None (with a message) when this checkout has no shared data.
pub fn shared_data() -> Option<PathBuf> {
    let dir = repo().join("../shared/data");
    if dir.join("oct").is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIP: ../shared/data/oct is absent; real-image tests need the shared OCT data");
        None
    }
}

/// The labelled shared B-scans (as many as `labels.csv` lists): (path, label).
pub fn shared_oct_images() -> Option<Vec<(PathBuf, String)>> {
    let dir = shared_data()?.join("oct");
    let mut out = Vec::new();
    for label in ["CNV", "DME", "DRUSEN", "NORMAL"] {
        let mut files: Vec<_> = std::fs::read_dir(dir.join(label)).ok()?.flatten().map(|e| e.path()).collect();
        files.sort();
        out.extend(files.into_iter().map(|p| (p, label.to_string())));
    }
    Some(out)
}

/// A plain HTTP/1.1 GET on loopback: (status code, body), or None when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Read;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

/// The shipped default model's manifest.
pub fn shipped_manifest() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(repo().join("models/default/manifest.json")).unwrap()).unwrap()
}

/// The shipped default model's (name, version), which the development channel lists as its
/// newest: what a device on embedded defaults runs.
pub fn shipped_model() -> (String, String) {
    let manifest = shipped_manifest();
    (manifest["name"].as_str().unwrap().to_string(), manifest["version"].as_str().unwrap().to_string())
}

/// `octd classify --json` with the shipped model on `backend` (and `library` for ONNX
/// Runtime; none: no ORT_DYLIB_PATH either): one result per file, in order.
pub fn classify_shipped(backend: &str, library: Option<&Path>, files: &[PathBuf]) -> Vec<serde_json::Value> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_octd"));
    cmd.arg("classify").arg("--json").arg("--model").arg(repo().join("models/default"));
    cmd.args(files).env("OCTD_MODEL__BACKEND", backend).env_remove("ORT_DYLIB_PATH");
    if let Some(lib) = library {
        cmd.env("OCTD_MODEL__ONNXRUNTIME_LIBRARY", lib);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "classify failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The backend a daemon on embedded defaults (`model.backend = "auto"`) runs here: ONNX
/// Runtime on the CPU where its library is found (no GPU on the test machines), else tract.
pub fn default_backend() -> &'static str {
    match octd::infer::ort_backend::find_library(None) {
        Some(_) => "onnxruntime-cpu",
        None => "tract",
    }
}

/// `octd reviewer add ID --password-stdin` on the daemon's configuration.
pub fn add_reviewer(config: &Path, id: &str, password: &str) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_octd"))
        .arg("--config")
        .arg(config)
        .args(["reviewer", "add", id, "--password-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, up: bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() == up {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Mosquitto is required where OCTD_REQUIRE_MOSQUITTO is set (CI); elsewhere its absence
/// skips the test with a message.
pub fn mosquitto_available() -> bool {
    let found = Command::new("mosquitto").arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
        || Path::new("/usr/sbin/mosquitto").exists();
    if !found {
        if std::env::var_os("OCTD_REQUIRE_MOSQUITTO").is_some() {
            panic!("mosquitto is required (OCTD_REQUIRE_MOSQUITTO is set) but not installed");
        }
        eprintln!("SKIP: mosquitto is not installed (apt-get install mosquitto)");
    }
    found
}

fn mosquitto_bin() -> &'static str {
    if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    }
}

/// A Mosquitto of the test's own, with persistence so that a subscriber's session and its
/// queued QoS 1 messages survive a broker restart.
pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    /// More listeners or settings (per-listener settings are on).
    extra_conf: String,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Mosquitto {
        Self::start_with(dir, "")
    }

    pub fn start_with(dir: &Path, extra_conf: &str) -> Mosquitto {
        std::fs::create_dir_all(dir).unwrap();
        let mut m =
            Mosquitto { port: free_port(), dir: dir.to_path_buf(), extra_conf: extra_conf.to_string(), child: None };
        m.restart();
        m
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let conf = self.dir.join("mosquitto.conf");
        // Started as root, Mosquitto would drop to its own user, which cannot write its
        // persistence file into this private test folder: stay the user we are.
        let user = Command::new("id")
            .arg("-un")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings true\nuser {}\npersistence true\npersistence_location {}/\nautosave_interval 1\nmax_queued_messages 100000\nlistener {} 127.0.0.1\nallow_anonymous true\n{}\n",
                user,
                self.dir.display(),
                self.port,
                self.extra_conf
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.dir.join("mosquitto.log")).unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        assert!(wait_for_port(self.port, true, Duration::from_secs(10)), "mosquitto did not start");
    }

    /// SIGTERM, so it saves sessions, then wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let _ = child.wait();
            assert!(wait_for_port(self.port, false, Duration::from_secs(10)));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: String,
    pub retain: bool,
}

/// A persistent-session QoS 1 subscriber to `oct/#`.
pub struct Subscriber {
    messages: Arc<Mutex<Vec<Message>>>,
    connected: Arc<Mutex<bool>>,
    stop: Arc<Mutex<bool>>,
}

impl Subscriber {
    pub fn connect(port: u16, filter: &str) -> Subscriber {
        Self::connect_with(port, filter, None)
    }

    /// With a broker login.
    pub fn connect_with(port: u16, filter: &str, login: Option<(&str, &str)>) -> Subscriber {
        let login = login.map(|(u, p)| (u.to_string(), p.to_string()));
        let messages = Arc::new(Mutex::new(Vec::new()));
        let connected = Arc::new(Mutex::new(false));
        let stop = Arc::new(Mutex::new(false));
        let (m, c, s) = (messages.clone(), connected.clone(), stop.clone());
        let filter = filter.to_string();
        let id = format!("test-sub-{}", port);
        std::thread::spawn(move || {
            let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
            options
                .set_clean_session(false)
                .set_keep_alive(Duration::from_secs(5))
                .set_max_packet_size(1 << 20, 1 << 20);
            if let Some((user, password)) = login {
                options.set_credentials(user, password);
            }
            let (client, mut connection) = rumqttc::Client::new(options, 100);
            for event in connection.iter() {
                if *s.lock().unwrap() {
                    break;
                }
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => *c.lock().unwrap() = true,
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => m.lock().unwrap().push(Message {
                        topic: p.topic.clone(),
                        payload: String::from_utf8_lossy(&p.payload).into_owned(),
                        retain: p.retain,
                    }),
                    Ok(_) => {}
                    Err(_) => {
                        *c.lock().unwrap() = false;
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        });
        let sub = Subscriber { messages, connected, stop };
        sub.wait_until(Duration::from_secs(10), |_| true, "subscriber connects");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !*sub.connected.lock().unwrap() {
            assert!(Instant::now() < deadline, "subscriber did not subscribe");
            std::thread::sleep(Duration::from_millis(20));
        }
        sub
    }

    pub fn messages(&self) -> Vec<Message> {
        self.messages.lock().unwrap().clone()
    }

    /// Wait until `done` holds for the messages received so far.
    pub fn wait_until(&self, timeout: Duration, done: impl Fn(&[Message]) -> bool, what: &str) -> Vec<Message> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages();
            if done(&messages) {
                return messages;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting: {what}; got {} messages", messages.len());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        *self.stop.lock().unwrap() = true;
    }
}

/// Publish one message at QoS 1 as a client of its own (a display, the cloud) and wait for
/// the broker's PUBACK.
pub fn publish(port: u16, topic: &str, payload: Vec<u8>, retain: bool) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CLIENTS: AtomicU64 = AtomicU64::new(0);
    let id = format!("publisher-{}-{}", std::process::id(), CLIENTS.fetch_add(1, Ordering::Relaxed));
    let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5)).set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = rumqttc::Client::new(options, 10);
    client.publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload).unwrap();
    for event in connection.iter() {
        match event {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("publishing on {topic}: {e}"),
        }
    }
    let _ = client.disconnect();
}

/// Results keyed by scan_id (a duplicate from at-least-once delivery counts once).
pub fn results(messages: &[Message]) -> HashMap<String, serde_json::Value> {
    messages
        .iter()
        .filter(|m| m.topic.contains("/results/"))
        .map(|m| {
            let v: serde_json::Value = serde_json::from_str(&m.payload).expect("result is JSON");
            (v["scan_id"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

pub fn events(messages: &[Message]) -> Vec<serde_json::Value> {
    messages
        .iter()
        .filter(|m| m.topic.ends_with("/events"))
        .map(|m| serde_json::from_str(&m.payload).expect("event is JSON"))
        .collect()
}

/// One octd daemon over a test folder.
pub struct Octd {
    pub root: PathBuf,
    pub inbox: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
    /// The /metrics /healthz /readyz /status endpoint's port.
    pub telemetry_port: u16,
    /// A free port for the reading room's API, which is off unless a test sets
    /// `OCTD_DISPLAY__LISTEN` (see [`Octd::enable_display`]).
    pub display_port: u16,
    /// Extra environment for the daemon (e.g. NOTIFY_SOCKET).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    /// Where the latest start's output begins in the shared log.
    log_offset: usize,
}

pub struct OctdOptions {
    pub broker_url: String,
    pub workers: usize,
    pub extra: String,
    /// A model channel (repository location, trusted root) instead of the pinned default model.
    pub channel: Option<(String, PathBuf)>,
}

impl Octd {
    pub fn new(root: &Path, opts: OctdOptions) -> Octd {
        let inbox = root.join("inbox");
        let state = root.join("state");
        std::fs::create_dir_all(&inbox).unwrap();
        let config = root.join("octd.toml");
        let mut f = std::fs::File::create(&config).unwrap();
        let model = match &opts.channel {
            None => format!("dir = \"{}\"\n", repo().join("models/default").display()),
            Some(_) => String::new(),
        };
        let update = match &opts.channel {
            None => String::new(),
            Some((repository, trusted_root)) => {
                format!("[update]\nrepository = \"{repository}\"\ntrusted_root = \"{}\"\n", trusted_root.display())
            }
        };
        let telemetry_port = free_port();
        // Off unless a test turns it on (OCTD_DISPLAY__LISTEN): a second port per daemon is a
        // second chance for a port race in every unrelated test.
        let display_port = free_port();
        write!(
            f,
            "[telemetry]\nlisten = \"127.0.0.1:{telemetry_port}\"\n\n[device]\nsite = \"test-site\"\nid = \"test-device\"\nstate_dir = \"{}\"\n\n\
             [ingest]\nwatch = [\"{}\"]\nsettle = \"300ms\"\nrescan_interval = \"1s\"\n\n\
             [model]\n{}threads = 1\n\n{}\n[display]\nlisten = \"\"\n\n[pipeline]\nworkers = {}\n\n\
             [mqtt]\nurl = \"{}\"\nreconnect_delay = \"300ms\"\n{}\n",
            state.display(),
            inbox.display(),
            model,
            update,
            opts.workers,
            opts.broker_url,
            opts.extra,
        )
        .unwrap();
        Octd {
            root: root.to_path_buf(),
            inbox,
            state,
            config,
            telemetry_port,
            display_port,
            env: Vec::new(),
            child: None,
            log_offset: 0,
        }
    }

    /// Serve the reading room's API on loopback at `display_port`.
    pub fn enable_display(&mut self) {
        self.env.push(("OCTD_DISPLAY__LISTEN".into(), format!("127.0.0.1:{}", self.display_port)));
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none());
        self.log_offset = self.log().len();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.root.join("octd.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_octd"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "debug,rumqttd=warn,tract=warn,tract_core=warn,tract_onnx=warn,tract_hir=warn")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start octd");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Wait until the latest start has reached its main loop (a signal sent before the
    /// process has even installed its handlers would kill it the default way).
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.log().get(self.log_offset..).unwrap_or_default().contains("watching") {
            assert!(Instant::now() < deadline, "octd did not come up:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.wait_ready();
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        child.wait().unwrap()
    }

    /// SIGTERM and wait at most `limit` for the exit; None (and a SIGKILL) past it.
    pub fn stop_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// True while the latest start's process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// GET a path of the telemetry endpoint: (status code, body).
    /// GET from the reading room's listener (see [`Octd::enable_display`]).
    pub fn http_get_display(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.display_port, path)
    }

    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.telemetry_port, path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("octd.log")).unwrap_or_default()
    }

    /// Wait (up to a minute) until the colourless log satisfies `done`.
    pub fn wait_log(&self, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(&self.plain_log()) {
            assert!(Instant::now() < deadline, "{what}:\n{}", self.plain_log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log without its terminal colours, for matching `field=value`.
    pub fn plain_log(&self) -> String {
        let log = self.log();
        let mut out = String::with_capacity(log.len());
        let mut chars = log.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    pub fn quarantine_reasons(&self) -> Vec<serde_json::Value> {
        let dir = self.state.join("quarantine");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".reason.json") {
                out.push(serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap());
            }
        }
        out
    }
}

impl Drop for Octd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Copy `src` into `inbox` under `name`, as a scanner would: write a hidden temp file, then
/// rename it in.
pub fn drop_file(inbox: &Path, name: &str, bytes: &[u8]) {
    let tmp = inbox.join(format!(".{name}.partial"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, inbox.join(name)).unwrap();
}

/// Strings of planted identity that must never leave de-identification.
pub const PLANTED_PHI: &[&str] = &[
    "DOE^JOHN",
    "DOE_JOHN",
    "MRN8675309",
    "19450704",
    "742 Evergreen",
    "Springfield",
    "555-0100",
    "ACC-99887766",
    "OTHERID-4242",
    "St. Elsewhere",
    "Dr^Quincy",
    "SECRET-PRIVATE",
];

/// Panics with the offending string when `haystack` holds planted identity.
pub fn assert_no_phi(haystack: &[u8], what: &str) {
    for phi in PLANTED_PHI {
        assert!(!haystack.windows(phi.len()).any(|w| w == phi.as_bytes()), "{what} contains planted identity {phi:?}");
    }
}

/// The usual set-up of a daemon test: the shared images, a Mosquitto of its own, a
/// subscriber, and an `octd` (not started) pointed at that broker.
pub struct Rig {
    pub images: Vec<(PathBuf, String)>,
    pub broker: Mosquitto,
    pub sub: Subscriber,
    pub octd: Octd,
    pub dir: tempfile::TempDir,
}

impl Rig {
    /// None (after saying why) where the shared data or Mosquitto is missing.
    pub fn new(workers: usize, topic_filter: &str) -> Option<Rig> {
        let images = shared_oct_images()?;
        if !mosquitto_available() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let broker = Mosquitto::start(&dir.path().join("broker"));
        let sub = Subscriber::connect(broker.port, topic_filter);
        let octd = Octd::new(
            &dir.path().join("octd"),
            OctdOptions { broker_url: broker.url(), workers, extra: String::new(), channel: None },
        );
        Some(Rig { images, broker, sub, octd, dir })
    }

    pub fn image(&self, i: usize) -> Vec<u8> {
        std::fs::read(&self.images[i % self.images.len()].0).unwrap()
    }
}
