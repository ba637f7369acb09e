//! tract-onnx: pure Rust, no native libraries: what every other backend falls back to.

use std::path::Path;
use std::sync::Arc;

use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;

use super::{Backend, InferError, Outputs, RawOutput};

pub struct TractBackend {
    plan: Arc<TypedRunnableModel>,
}

impl TractBackend {
    pub fn load(
        model: &Path,
        channels: usize,
        height: usize,
        width: usize,
        threads: usize,
    ) -> Result<Self, InferError> {
        let err = |e: TractError| InferError::Model(format!("tract cannot load {}: {e}", model.display()));
        let mut inference = tract_onnx::onnx().model_for_path(model).map_err(err)?;
        let batch = inference.sym("batch");
        let fact = f32::fact([batch.to_dim(), channels.to_dim(), height.to_dim(), width.to_dim()]);
        inference = inference.with_input_fact(0, fact.into()).map_err(err)?;
        let typed = inference.into_optimized().map_err(err)?;
        let threads = if threads == 0 { super::cores() } else { threads };
        let options = RunOptions {
            executor: (threads > 1).then(|| Executor::multithread_with_name(threads, "octd-infer")),
            ..Default::default()
        };
        let plan = typed.into_runnable_with_options(&options).map_err(err)?;
        Ok(TractBackend { plan })
    }
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn output_names(&self) -> Vec<String> {
        let model = self.plan.model();
        match model.output_outlets() {
            Ok(outlets) => outlets.iter().map(|o| model.outlet_label(*o).unwrap_or_default().to_string()).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn run(&self, input: Vec<f32>, shape: [usize; 4]) -> Result<Outputs, InferError> {
        let err = |e: TractError| InferError::Backend(e.to_string());
        let tensor = Tensor::from_shape(&shape, &input).map_err(err)?;
        let outputs = self.plan.run(tvec![tensor.into()]).map_err(err)?;
        let first = outputs.first().ok_or_else(|| InferError::Backend("model produced no output".into()))?;
        let view = first.to_plain_array_view::<f32>().map_err(err)?;
        let rows = view.shape().first().copied().unwrap_or(0);
        if rows != shape[0] {
            return Err(InferError::Backend(format!("model returned {rows} rows for a batch of {}", shape[0])));
        }
        let scores = view.outer_iter().map(|row| row.iter().copied().collect()).collect();
        let mut others = Vec::with_capacity(outputs.len().saturating_sub(1));
        for output in outputs.iter().skip(1) {
            // An output of another type is not one octd reads: left empty, refused only where
            // the manifest declares it.
            others.push(match output.to_plain_array_view::<f32>() {
                Ok(view) => RawOutput { shape: view.shape().to_vec(), data: view.iter().copied().collect() },
                Err(_) => RawOutput { shape: Vec::new(), data: Vec::new() },
            });
        }
        Ok(Outputs { scores, others })
    }
}
