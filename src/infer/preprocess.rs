//! Pixels -> model input, exactly as trainer/octtrain/preprocess.py does it: greyscale in
//! [0, 1], bilinear resize with half-pixel centres and no antialias (PyTorch
//! `align_corners=False`), then (x - mean) / std. Plain f32 arithmetic in the same order as
//! numpy's, so both sides agree to float rounding (tests/golden_preprocess checks 1e-5).

use super::manifest::InputSpec;

/// One B-scan as grey levels in [0, 1], row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct GreyFrame {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<f32>,
}

impl GreyFrame {
    pub fn mean_std(&self) -> (f32, f32) {
        let n = self.pixels.len().max(1) as f64;
        let mean = self.pixels.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = self.pixels.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
        (mean as f32, var.sqrt() as f32)
    }
}

pub const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

struct Axis {
    i0: Vec<usize>,
    i1: Vec<usize>,
    lambda: Vec<f32>,
}

fn axis(in_size: usize, out_size: usize) -> Axis {
    let scale = in_size as f32 / out_size as f32;
    let mut a = Axis {
        i0: Vec::with_capacity(out_size),
        i1: Vec::with_capacity(out_size),
        lambda: Vec::with_capacity(out_size),
    };
    for o in 0..out_size {
        let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(in_size - 1);
        a.i0.push(i0);
        a.i1.push((i0 + 1).min(in_size - 1));
        a.lambda.push(src - i0 as f32);
    }
    a
}

pub fn resize_bilinear(frame: &GreyFrame, out_h: usize, out_w: usize) -> Vec<f32> {
    let ys = axis(frame.height, out_h);
    let xs = axis(frame.width, out_w);
    let px = |y: usize, x: usize| frame.pixels[y * frame.width + x];
    let mut out = Vec::with_capacity(out_h * out_w);
    for oy in 0..out_h {
        let (y0, y1, ly) = (ys.i0[oy], ys.i1[oy], ys.lambda[oy]);
        for ox in 0..out_w {
            let (x0, x1, lx) = (xs.i0[ox], xs.i1[ox], xs.lambda[ox]);
            let top = px(y0, x0) * (1.0 - lx) + px(y0, x1) * lx;
            let bottom = px(y1, x0) * (1.0 - lx) + px(y1, x1) * lx;
            out.push(top * (1.0 - ly) + bottom * ly);
        }
    }
    out
}

/// Append one CxHxW input for `frame` to `out`.
pub fn preprocess_into(frame: &GreyFrame, spec: &InputSpec, out: &mut Vec<f32>) {
    let resized = resize_bilinear(frame, spec.height, spec.width);
    for c in 0..spec.channels {
        let mean = spec.mean[c.min(spec.mean.len() - 1)];
        let std = spec.std[c.min(spec.std.len() - 1)];
        out.extend(resized.iter().map(|&v| (v - mean) / std));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_resize_keeps_pixels() {
        let frame = GreyFrame { width: 3, height: 2, pixels: vec![0.0, 0.5, 1.0, 0.25, 0.75, 0.125] };
        assert_eq!(resize_bilinear(&frame, 2, 3), frame.pixels);
    }

    #[test]
    fn downscale_by_two_averages_pairs() {
        // half-pixel centres: output pixel 0 samples between input 0 and 1
        let frame = GreyFrame { width: 4, height: 1, pixels: vec![0.0, 1.0, 0.2, 0.4] };
        let out = resize_bilinear(&frame, 1, 2);
        assert!((out[0] - 0.5).abs() < 1e-6 && (out[1] - 0.3).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn upscale_clamps_at_edges() {
        let frame = GreyFrame { width: 2, height: 1, pixels: vec![0.0, 1.0] };
        let out = resize_bilinear(&frame, 1, 4);
        // PyTorch: [0, 0.25, 0.75, 1]
        let want = [0.0, 0.25, 0.75, 1.0];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
    }
}
