//! ONNX Runtime through the `ort` crate, loaded at run time (load-dynamic): nothing is
//! downloaded or linked at build time, and a device without the library still runs tract.
//!
//! Execution providers are tried in the order the configured backend allows:
//! TensorRT (FP16, engine cache per model version in the state folder) -> CUDA -> CPU.
//! Each one is registered with `error_on_failure`, so a provider that is missing is a clear
//! error here (and the caller falls back) rather than a silent CPU run under a GPU name.

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};
use ort::session::Session;
use ort::value::Tensor;

use super::{Backend, InferError, Outputs, RawOutput};

/// Which ONNX Runtime execution provider a session runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    TensorRt,
    Cuda,
    Cpu,
}

impl Provider {
    pub fn backend_name(self) -> &'static str {
        match self {
            Provider::TensorRt => "onnxruntime-tensorrt",
            Provider::Cuda => "onnxruntime-cuda",
            Provider::Cpu => "onnxruntime-cpu",
        }
    }
}

/// Settings the ort backend needs beyond the model file.
#[derive(Debug, Clone)]
pub struct OrtSettings {
    pub library: Option<PathBuf>,
    pub threads: usize,
    pub fp16: bool,
    /// TensorRT engines are cached here (one sub-folder per model hash).
    pub engine_cache: Option<PathBuf>,
    /// Sessions on the CPU provider: one per call that may run at once (a session runs one
    /// call at a time, so one shared session made the pipeline's workers take turns).
    pub sessions: usize,
}

/// Sessions lent to callers: a caller takes whichever is free and waits for the first one
/// given back when none is, so callers beyond the sessions wait rather than oversubscribe.
struct SessionPool {
    free: Mutex<Vec<Session>>,
    given_back: Condvar,
    size: usize,
}

/// A session on loan; given back to the pool when dropped.
struct Lent<'a> {
    pool: &'a SessionPool,
    session: Option<Session>,
}

impl SessionPool {
    fn new(sessions: Vec<Session>) -> Self {
        SessionPool { size: sessions.len(), free: Mutex::new(sessions), given_back: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Session>> {
        // A panic while the list was held cannot leave it half-changed (push/pop only).
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self) -> Lent<'_> {
        let mut free = self.lock();
        loop {
            if let Some(session) = free.pop() {
                return Lent { pool: self, session: Some(session) };
            }
            free = self.given_back.wait(free).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Lent<'_> {
    fn session(&mut self) -> Result<&mut Session, InferError> {
        self.session.as_mut().ok_or_else(|| InferError::Backend("session already given back".into()))
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.pool.lock().push(session);
            self.pool.given_back.notify_one();
        }
    }
}

pub struct OrtBackend {
    sessions: SessionPool,
    provider: Provider,
    fp16: bool,
    output_names: Vec<String>,
}

/// The variable ONNX Runtime reads as it starts to keep its telemetry off from the start.
pub const TELEMETRY_OFF_VARIABLE: &str = "ORT_DISABLE_TELEMETRY";

/// ONNX Runtime builds with telemetry compiled in (Microsoft's, 1.29 and later: the PyPI
/// wheel, the release archives) keep a device id and queue usage events for upload under
/// ~/.cache/Microsoft; one event is logged while the runtime's environment is created,
/// before the API's own switch (also set, in [`init_runtime`]) can act. Only this variable,
/// read then, stops it. A clinic's device and trainer say nothing to anyone they were not
/// configured to talk to.
///
/// Call first thing in `main`, before anything starts a thread: setting the environment
/// races with any other thread reading it (and needs `unsafe` from edition 2024 on).
pub fn keep_telemetry_off_from_start() {
    std::env::set_var(TELEMETRY_OFF_VARIABLE, "1");
}

/// The library is loaded once per process; later calls get the same answer.
static RUNTIME: OnceLock<Result<(PathBuf, Environment), String>> = OnceLock::new();

/// Where ONNX Runtime is looked for when neither `model.onnxruntime_library` nor
/// `ORT_DYLIB_PATH` names it: the system locations of JetPack / Debian packages and of a
/// manual install, then the development virtualenv's onnxruntime wheel.
pub fn library_candidates() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = [
        "/usr/lib/libonnxruntime.so",
        "/usr/local/lib/libonnxruntime.so",
        "/usr/lib/aarch64-linux-gnu/libonnxruntime.so",
        "/usr/lib/x86_64-linux-gnu/libonnxruntime.so",
        "/opt/onnxruntime/lib/libonnxruntime.so",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    if let Ok(entries) = std::fs::read_dir(".venv/lib") {
        let mut wheel_libs: Vec<PathBuf> = entries
            .flatten()
            .map(|python| python.path().join("site-packages/onnxruntime/capi"))
            .filter_map(|capi| std::fs::read_dir(capi).ok())
            .flat_map(|files| files.flatten().map(|f| f.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so")))
            .collect();
        wheel_libs.sort();
        out.extend(wheel_libs);
    }
    out
}

/// The library this process would use, without loading it.
pub fn find_library(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = configured {
        return Some(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    library_candidates().into_iter().find(|p| p.is_file())
}

/// Load ONNX Runtime (once) and return the library path in use.
pub fn init_runtime(configured: Option<&Path>) -> Result<(PathBuf, Environment), InferError> {
    RUNTIME
        .get_or_init(|| {
            let path = find_library(configured).ok_or_else(|| {
                "no ONNX Runtime library found: set model.onnxruntime_library or ORT_DYLIB_PATH \
                 (see README: ONNX Runtime backend)"
                    .to_string()
            })?;
            let builder = ort::init_from(&path).map_err(|e| format!("cannot load {}: {e}", path.display()))?;
            if std::env::var(TELEMETRY_OFF_VARIABLE).as_deref() != Ok("1") {
                // A process that did not start through a binary of this project (a bench, a
                // test): the start-up event is logged before the switch below can act.
                tracing::warn!(
                    "{TELEMETRY_OFF_VARIABLE} is not set to 1: an ONNX Runtime built with telemetry logs its start-up event"
                );
            }
            let environment = builder
                .with_name("octd")
                .with_telemetry(false)
                .build()
                .map_err(|e| format!("ONNX Runtime environment: {e}"))?;
            tracing::info!(library = %path.display(), "ONNX Runtime loaded");
            Ok((path, environment))
        })
        .clone()
        .map_err(InferError::Backend)
}

/// Whether a provider is compiled into the loaded library (false when it is not loaded).
pub fn provider_available(provider: Provider) -> bool {
    if !matches!(RUNTIME.get(), Some(Ok(_))) {
        return false;
    }
    let available = match provider {
        Provider::TensorRt => ep::TensorRT::is_available(),
        Provider::Cuda => ep::CUDA::is_available(),
        Provider::Cpu => Ok(true),
    };
    available.unwrap_or(false)
}

impl OrtBackend {
    pub fn load(
        model: &Path,
        model_sha256: &str,
        provider: Provider,
        settings: &OrtSettings,
    ) -> Result<Self, InferError> {
        let (_, environment) = init_runtime(settings.library.as_deref())?;
        let err = |e: ort::Error| InferError::Model(format!("ONNX Runtime ({}): {e}", provider.backend_name()));
        let mut builder = Session::builder(&environment).map_err(err)?;
        if provider != Provider::Cpu && !provider_available(provider) {
            return Err(InferError::Model(format!(
                "the loaded ONNX Runtime has no {} execution provider",
                provider.backend_name()
            )));
        }
        let dispatch = match provider {
            Provider::TensorRt => {
                let mut trt = ep::TensorRT::default().with_fp16(settings.fp16).with_engine_cache(true);
                if let Some(cache) = &settings.engine_cache {
                    // One folder per model: an engine is built once per model version and
                    // never reused for other weights.
                    let dir = cache.join(model_sha256.get(..16).unwrap_or(model_sha256));
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| InferError::Model(format!("engine cache {}: {e}", dir.display())))?;
                    let dir = dir.to_string_lossy().into_owned();
                    trt = trt.with_engine_cache_path(&dir).with_timing_cache(true).with_timing_cache_path(&dir);
                }
                Some(trt.build().error_on_failure())
            }
            Provider::Cuda => Some(ep::CUDA::default().build().error_on_failure()),
            Provider::Cpu => None,
        };
        if let Some(dispatch) = dispatch {
            builder = builder.with_execution_providers([dispatch]).map_err(|e| err(e.into()))?;
        }
        if settings.threads > 0 {
            builder = builder.with_intra_threads(settings.threads).map_err(|e| err(e.into()))?;
        }
        // A GPU session serves its device alone; CPU sessions are one per concurrent caller,
        // and share one copy of the weights as the CPU kernels lay them out (prepacked).
        let count = if provider == Provider::Cpu { settings.sessions.clamp(1, 16) } else { 1 };
        if count > 1 {
            builder = builder
                .with_prepacked_weights(&ort::session::builder::PrepackedWeights::new())
                .map_err(|e| err(e.into()))?;
        }
        let mut sessions = Vec::with_capacity(count);
        for _ in 0..count {
            sessions.push(builder.clone().commit_from_file(model).map_err(err)?);
        }
        let output_names = match sessions.first() {
            Some(session) => session.outputs().iter().map(|o| o.name().to_string()).collect(),
            None => Vec::new(),
        };
        Ok(OrtBackend {
            output_names,
            sessions: SessionPool::new(sessions),
            provider,
            fp16: settings.fp16 && provider == Provider::TensorRt,
        })
    }
}

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        self.provider.backend_name()
    }

    fn reduced_precision(&self) -> bool {
        self.fp16
    }

    fn parallel_calls(&self) -> usize {
        self.sessions.size
    }

    fn output_names(&self) -> Vec<String> {
        self.output_names.clone()
    }

    /// On the CPU a batch costs the same per B-scan as single calls (EfficientNet-Lite0, one
    /// thread: 11.4–12.2 ms per B-scan at batch 1 to 16) while the arena keeps the largest
    /// batch's activations for good (about 80 MiB more per session at 8), so a volume goes
    /// one B-scan per call, on every session at once (docs/benchmarks.md, "Toward the
    /// machine's limit"). A GPU gains from batches.
    fn preferred_batch(&self) -> usize {
        match self.provider {
            Provider::Cpu => 1,
            Provider::Cuda | Provider::TensorRt => 8,
        }
    }

    fn run(&self, input: Vec<f32>, shape: [usize; 4]) -> Result<Outputs, InferError> {
        let err = |e: ort::Error| InferError::Backend(e.to_string());
        let shape_i64: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let tensor = Tensor::from_array((shape_i64, input)).map_err(err)?;
        let mut lent = self.sessions.take();
        let outputs = lent.session()?.run(ort::inputs![tensor]).map_err(err)?;
        if outputs.len() == 0 {
            return Err(InferError::Backend("model produced no output".into()));
        }
        let (out_shape, data) = outputs[0].try_extract_tensor::<f32>().map_err(err)?;
        let rows = out_shape.first().copied().unwrap_or(0).max(0) as usize;
        if rows != shape[0] || rows == 0 {
            return Err(InferError::Backend(format!("model returned {rows} rows for a batch of {}", shape[0])));
        }
        let width = data.len() / rows;
        let scores = data.chunks(width).map(<[f32]>::to_vec).collect();
        let mut others = Vec::with_capacity(outputs.len().saturating_sub(1));
        for i in 1..outputs.len() {
            // An output of another type is not one octd reads: left empty, refused only where
            // the manifest declares it.
            others.push(match outputs[i].try_extract_tensor::<f32>() {
                Ok((dims, data)) => {
                    RawOutput { shape: dims.iter().map(|&d| d.max(0) as usize).collect(), data: data.to_vec() }
                }
                Err(_) => RawOutput { shape: Vec::new(), data: Vec::new() },
            });
        }
        Ok(Outputs { scores, others })
    }
}

/// The device node of an NVIDIA GPU (desktop or Jetson) when this machine has one.
pub fn gpu_device() -> Option<&'static str> {
    ["/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu"].into_iter().find(|p| Path::new(p).exists())
}
