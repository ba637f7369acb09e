//! ONNX Runtime through the `ort` crate, loaded at run time (load-dynamic): nothing is
//! downloaded or linked at build time, and a device without the library still runs tract.
//!
//! Execution providers are tried in the order the configured backend allows:
//! TensorRT (FP16, engine cache per model version in the state folder) -> CUDA -> CPU.
//! Each one is registered with `error_on_failure`, so a provider that is missing is a clear
//! error here (and the caller falls back) rather than a silent CPU run under a GPU name.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use prost::Message;

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
    /// Threads of one more CPU session, lent only to a single B-scan's call while no other
    /// session is out (0 or 1: none). On an idle machine a lone B-scan then runs on every
    /// core instead of its worker's share (`Backend::run_single`).
    pub idle_threads: usize,
}

/// The sessions not on loan, and how many are.
struct Sessions {
    shared: Vec<Session>,
    /// The session with `OrtSettings::idle_threads`, when there is one and it is free.
    idle: Option<Session>,
    lent: usize,
}

/// Sessions lent to callers: a caller takes whichever is free and waits for the first one
/// given back when none is, so callers beyond the sessions wait rather than oversubscribe.
struct SessionPool {
    free: Mutex<Sessions>,
    given_back: Condvar,
    /// The sessions that run at once (the idle machine's session is not counted: it is lent
    /// only while none of them is out).
    size: usize,
}

/// A session on loan; given back to the pool when dropped.
struct Lent<'a> {
    pool: &'a SessionPool,
    session: Option<Session>,
    /// The idle machine's session, given back to its own place.
    idle: bool,
}

impl SessionPool {
    fn new(sessions: Vec<Session>, idle: Option<Session>) -> Self {
        SessionPool {
            size: sessions.len(),
            free: Mutex::new(Sessions { shared: sessions, idle, lent: 0 }),
            given_back: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Sessions> {
        // A panic while the list was held cannot leave it half-changed (push/pop only).
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `alone`: the call may take the idle machine's session, if nothing else is running.
    fn take(&self, alone: bool) -> Lent<'_> {
        let mut free = self.lock();
        if alone && free.lent == 0 {
            if let Some(session) = free.idle.take() {
                free.lent += 1;
                return Lent { pool: self, session: Some(session), idle: true };
            }
        }
        loop {
            if let Some(session) = free.shared.pop() {
                free.lent += 1;
                return Lent { pool: self, session: Some(session), idle: false };
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
            let mut free = self.pool.lock();
            free.lent = free.lent.saturating_sub(1);
            if self.idle {
                free.idle = Some(session);
            } else {
                free.shared.push(session);
                // Only a shared session is waited for.
                self.pool.given_back.notify_one();
            }
        }
    }
}

/// A model's weights as ONNX Runtime's optimizations lay them out for this machine's CPU,
/// held once for every session of the model. Without them each session kept its own copy of
/// the weights its graph optimizations rewrite (the NCHWc convolutions), about 12 MiB each
/// with the default model, and the prepacked-weights container shared nothing: ONNX Runtime
/// caches packed weights only for shared initializers (docs/benchmarks.md, "A lone B-scan on
/// every core").
struct SharedWeights {
    /// The optimized graph, as ONNX, which each session takes with optimizations off.
    graph: Vec<u8>,
    weights: Vec<(String, Arc<DynValue>)>,
}

impl SharedWeights {
    /// Optimize `model` once, through a session that is not kept, and read its weights back.
    fn optimize(builder: &SessionBuilder, model: &Path) -> Result<SharedWeights, String> {
        // Written by ONNX Runtime itself, which takes only a path; removed when dropped.
        let scratch = tempfile::Builder::new()
            .prefix("octd-optimized-")
            .suffix(".onnx")
            .tempfile()
            .map_err(|e| format!("a scratch file for the optimized graph: {e}"))?;
        // ONNX Runtime warns that the graph it writes is fit for this machine only: it is read
        // back here, on this machine, and never kept.
        let optimizing = builder
            .clone()
            .with_log_level(ort::logging::LogLevel::Error)
            .map_err(|e| format!("log level: {e}"))?
            .with_optimized_model_path(scratch.path())
            .map_err(|e| format!("optimized model path: {e}"))?
            .commit_from_file(model)
            .map_err(|e| format!("optimizing: {e}"))?;
        drop(optimizing);
        let graph = std::fs::read(scratch.path()).map_err(|e| format!("reading the optimized graph: {e}"))?;
        let proto = tract_onnx::pb::ModelProto::decode(graph.as_slice())
            .map_err(|e| format!("parsing the optimized graph: {e}"))?;
        let mut weights = Vec::new();
        let _aligned = super::AligningWeights::start();
        for tensor in proto.graph.map(|g| g.initializer).unwrap_or_default() {
            // Float tensors held in the graph: the weights. Anything else stays in the graph,
            // where each session reads it as before (shapes and indices, a few bytes).
            // Data outside the graph (a file, or ONNX Runtime's in-memory tag, a pointer into
            // the session just dropped) cannot be read back here: no sharing then.
            if tensor.data_location == Some(1) || !tensor.external_data.is_empty() {
                return Err(format!("weight {} is stored outside the optimized graph", tensor.name));
            }
            let float = tract_onnx::pb::tensor_proto::DataType::Float as i32;
            if tensor.data_type != float {
                continue;
            }
            if tensor.raw_data.len() % 4 != 0 {
                continue;
            }
            // Allocated on a 64-byte line while `_aligned` holds (ONNX Runtime refuses
            // weights from its own allocator); at glibc's 16 bytes its kernels ran 6 % slower.
            // Each is allocated at its final size at once: a reallocation keeps only
            // malloc's alignment.
            let values: Vec<f32> = match tensor.raw_data.is_empty() {
                true => tensor.float_data.to_vec(),
                false => {
                    tensor.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
                }
            };
            let count = tensor.dims.iter().try_fold(1i64, |n, &d| n.checked_mul(d));
            if count.and_then(|n| usize::try_from(n).ok()) != Some(values.len()) {
                continue;
            }
            let value =
                Tensor::from_array((tensor.dims, values)).map_err(|e| format!("weight {}: {e}", tensor.name))?;
            weights.push((tensor.name, Arc::new(value.into_dyn())));
        }
        if weights.is_empty() {
            // Weights of another type (FP16, quantized) stay in each session's graph.
            return Err("the optimized graph has no float weights to share".into());
        }
        Ok(SharedWeights { graph, weights })
    }

    /// A session of the optimized graph on these weights.
    fn commit(&self, builder: SessionBuilder) -> Result<Session, ort::Error> {
        // Optimized once already: optimizing again would rewrite the shared weights into
        // copies of the session's own.
        let mut builder =
            builder.with_optimization_level(GraphOptimizationLevel::Disable).map_err(ort::Error::<()>::from)?;
        for (name, value) in &self.weights {
            builder = builder.with_initializer(name, value.clone()).map_err(ort::Error::<()>::from)?;
        }
        builder.commit_from_memory(&self.graph)
    }
}

pub struct OrtBackend {
    sessions: SessionPool,
    /// Every session runs on one copy of the weights (`SharedWeights`).
    shares_weights: bool,
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
        // A GPU session serves its device alone; CPU sessions are one per concurrent caller.
        // ONNX Runtime caches prepacked weights only for shared initializers
        // (`SharedWeights`): with them, the kernels' packed layouts are shared too.
        let count = if provider == Provider::Cpu { settings.sessions.clamp(1, 16) } else { 1 };
        let idle_threads =
            if provider == Provider::Cpu && settings.idle_threads > 1 { settings.idle_threads } else { 0 };
        // Several CPU sessions (a GPU provider has one and no idle machine's session).
        let several = count > 1 || idle_threads > 0;
        if several {
            builder = builder
                .with_prepacked_weights(&ort::session::builder::PrepackedWeights::new())
                .map_err(|e| err(e.into()))?;
        }
        let shared = match several {
            true => match SharedWeights::optimize(&builder, model) {
                Ok(shared) => Some(shared),
                Err(why) => {
                    // About 12 MiB more per session with the default model.
                    tracing::warn!(%why, "each ONNX Runtime session keeps its own weights");
                    None
                }
            },
            false => None,
        };
        let unshared = std::cell::Cell::new(shared.is_none());
        let commit = |mut builder: SessionBuilder| -> Result<Session, InferError> {
            if let Some(shared) = &shared {
                match shared.commit(builder.clone()) {
                    Ok(session) => return Ok(session),
                    Err(why) => {
                        tracing::warn!(%why, "an ONNX Runtime session could not take the shared weights: it keeps its own");
                        unshared.set(true);
                    }
                }
            }
            builder.commit_from_file(model).map_err(err)
        };
        let idle = match idle_threads {
            0 => None,
            n => Some(commit(builder.clone().with_intra_threads(n).map_err(|e| err(e.into()))?)?),
        };
        if settings.threads > 0 {
            builder = builder.with_intra_threads(settings.threads).map_err(|e| err(e.into()))?;
        }
        let mut sessions = Vec::with_capacity(count);
        for _ in 0..count {
            sessions.push(commit(builder.clone())?);
        }
        drop(shared);
        let shares_weights = !unshared.get();
        let output_names = match sessions.first() {
            Some(session) => session.outputs().iter().map(|o| o.name().to_string()).collect(),
            None => Vec::new(),
        };
        Ok(OrtBackend {
            output_names,
            sessions: SessionPool::new(sessions, idle),
            shares_weights,
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

    fn shares_weights(&self) -> bool {
        self.shares_weights
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
        self.run_on(input, shape, false)
    }

    fn run_single(&self, input: Vec<f32>, shape: [usize; 4]) -> Result<Outputs, InferError> {
        self.run_on(input, shape, true)
    }
}

impl OrtBackend {
    fn run_on(&self, input: Vec<f32>, shape: [usize; 4], alone: bool) -> Result<Outputs, InferError> {
        let err = |e: ort::Error| InferError::Backend(e.to_string());
        let shape_i64: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let tensor = Tensor::from_array((shape_i64, input)).map_err(err)?;
        let mut lent = self.sessions.take(alone);
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
