//! The inference backend: what is configured, whether ONNX Runtime and its GPU providers
//! are present, and whether this machine has an NVIDIA GPU at all.

use super::{Context, Finding};
use crate::config::BackendKind;
use crate::infer::ort_backend::{find_library, gpu_device, init_runtime, provider_available, Provider};

pub fn check(ctx: &Context) -> Finding {
    let model = &ctx.config.model;
    let gpu = gpu_device();
    let gpu_note = match gpu {
        Some(node) => format!("GPU present ({node})"),
        None => "no NVIDIA GPU device".to_string(),
    };
    if model.backend == BackendKind::Tract {
        return Finding::ok("backend", format!("tract (pure Rust, CPU); {gpu_note}"));
    }
    let Some(library) = find_library(model.onnxruntime_library.as_deref()) else {
        return Finding::warn(
            "backend",
            format!(
                "{} configured but no libonnxruntime.so found: octd falls back to tract (about 15x slower on the \
                 default model); {gpu_note}",
                backend_name(model.backend)
            ),
            "install ONNX Runtime (JetPack's onnxruntime-gpu, or the onnxruntime wheel) and set model.onnxruntime_library",
        );
    };
    if let Err(e) = init_runtime(Some(&library)) {
        return Finding::fail(
            "backend",
            format!("{}: {e}", library.display()),
            "point model.onnxruntime_library at an ONNX Runtime >= 1.17 built for this machine",
        );
    }
    let has = |p| provider_available(p);
    let providers = format!(
        "TensorRT {}, CUDA {}",
        if has(Provider::TensorRt) { "yes" } else { "no" },
        if has(Provider::Cuda) { "yes" } else { "no" }
    );
    let wanted = match model.backend {
        BackendKind::Tensorrt => Some(Provider::TensorRt),
        // `auto` on a machine without a GPU is CPU ONNX Runtime by design; with a GPU it
        // should reach TensorRT.
        BackendKind::Auto if gpu.is_some() => Some(Provider::TensorRt),
        BackendKind::Cuda => Some(Provider::Cuda),
        _ => None,
    };
    let summary =
        format!("{} with ONNX Runtime {} ({providers}); {gpu_note}", backend_name(model.backend), library.display());
    match wanted {
        Some(p) if !has(p) || gpu.is_none() => Finding::warn(
            "backend",
            summary,
            "the GPU provider cannot run here, so octd falls back (TensorRT -> CUDA -> CPU -> tract); on a Jetson \
             install JetPack's onnxruntime-gpu and the systemd GPU drop-in (systemd/octd-gpu.conf)",
        ),
        _ => Finding::ok("backend", summary),
    }
}

/// The configuration's spelling (`auto`, `tensorrt`, ...).
fn backend_name(kind: BackendKind) -> String {
    serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}
