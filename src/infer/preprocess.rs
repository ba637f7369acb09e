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
    /// The frame's mean and standard deviation (population), for the review's input ranges.
    /// One pass in f32 lanes the compiler vectorises, summed across short runs in f64: the two
    /// dependent f64 passes it replaced cost more than the frame's resize and conversion
    /// together (`cargo bench --bench stages -- preprocess`). A run's f32 sums carry a
    /// relative error of about 1e-6, and a run is short whatever the frame's size. The
    /// values are taken about an estimate of the mean from a sparse sample, so that a
    /// near-flat frame (a blank one, which the review's std range is there to catch) keeps its
    /// spread instead of losing it to cancellation in E[x²] − E[x]².
    pub fn mean_std(&self) -> (f32, f32) {
        const LANES: usize = 8;
        const RUN: usize = 1024;
        const SAMPLE_STRIDE: usize = 61;
        let sampled = self.pixels.iter().step_by(SAMPLE_STRIDE);
        let count = sampled.len().max(1) as f64;
        let pivot = (sampled.map(|&v| f64::from(v)).sum::<f64>() / count) as f32;
        let (mut sum, mut squares) = (0f64, 0f64);
        for run in self.pixels.chunks(RUN) {
            let (mut lane_sums, mut lane_squares) = ([0f32; LANES], [0f32; LANES]);
            let mut lanes = run.chunks_exact(LANES);
            for values in &mut lanes {
                for i in 0..LANES {
                    let v = values[i] - pivot;
                    lane_sums[i] += v;
                    lane_squares[i] += v * v;
                }
            }
            for &v in lanes.remainder() {
                let v = v - pivot;
                lane_sums[0] += v;
                lane_squares[0] += v * v;
            }
            sum += lane_sums.iter().map(|&v| f64::from(v)).sum::<f64>();
            squares += lane_squares.iter().map(|&v| f64::from(v)).sum::<f64>();
        }
        let n = self.pixels.len().max(1) as f64;
        let shifted_mean = sum / n;
        let var = (squares / n - shifted_mean * shifted_mean).max(0.0);
        ((shifted_mean + f64::from(pivot)) as f32, var.sqrt() as f32)
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

/// `frame.pixels` holds `width * height` values, as every frame built in this crate does.
pub fn resize_bilinear(frame: &GreyFrame, out_h: usize, out_w: usize) -> Vec<f32> {
    debug_assert_eq!(frame.pixels.len(), frame.width * frame.height);
    let ys = axis(frame.height, out_h);
    let xs = axis(frame.width, out_w);
    // Row slices, not an index computed per pixel: the same arithmetic in the same order.
    let row = |y: usize| &frame.pixels[y * frame.width..(y + 1) * frame.width];
    let mut out = Vec::with_capacity(out_h * out_w);
    for oy in 0..out_h {
        let (upper, lower, ly) = (row(ys.i0[oy]), row(ys.i1[oy]), ys.lambda[oy]);
        out.extend(xs.i0.iter().zip(&xs.i1).zip(&xs.lambda).map(|((&x0, &x1), &lx)| {
            let top = upper[x0] * (1.0 - lx) + upper[x1] * lx;
            let bottom = lower[x0] * (1.0 - lx) + lower[x1] * lx;
            top * (1.0 - ly) + bottom * ly
        }));
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

    /// The two-pass f64 computation the one-pass version replaced.
    fn mean_std_two_pass(frame: &GreyFrame) -> (f64, f64) {
        let n = frame.pixels.len().max(1) as f64;
        let mean = frame.pixels.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = frame.pixels.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn mean_and_std_in_one_pass_agree_with_two_passes_in_f64() {
        // A B-scan's size (511 x 497: not a multiple of the run nor of the lanes), speckle-like
        // values, a flat frame, near-flat frames close to 0 and far from it (where E[x²] −
        // E[x]² cancels), one whose first pixel is far from the rest, and a tiny one.
        let mut state = 0x2545_f491_u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state % 256) as f32 / 255.0
        };
        let speckle = GreyFrame { width: 511, height: 497, pixels: (0..511 * 497).map(|_| next().powi(3)).collect() };
        let flat = GreyFrame { width: 300, height: 7, pixels: vec![0.7; 2100] };
        let near_flat = |level: f32, step: f32| GreyFrame {
            width: 641,
            height: 480,
            pixels: (0..641 * 480).map(|i| level + (i % 3) as f32 * step).collect(),
        };
        let mut dark_corner = near_flat(0.9, 1e-4);
        dark_corner.pixels[0] = 0.0;
        let tiny = GreyFrame { width: 3, height: 1, pixels: vec![0.0, 0.5, 1.0] };
        for frame in [&speckle, &flat, &near_flat(0.1, 1e-3), &near_flat(0.9, 1e-4), &dark_corner, &tiny] {
            let (mean, std) = frame.mean_std();
            let (want_mean, want_std) = mean_std_two_pass(frame);
            assert!((f64::from(mean) - want_mean).abs() < 1e-6, "mean {mean} against {want_mean}");
            // Absolute for a real spread; relative for a near-flat frame's tiny one.
            let tolerance = (want_std * 1e-2).clamp(1e-7, 1e-5);
            assert!((f64::from(std) - want_std).abs() < tolerance, "std {std} against {want_std}");
        }
        assert_eq!(GreyFrame { width: 0, height: 0, pixels: Vec::new() }.mean_std(), (0.0, 0.0));
    }

    #[test]
    fn resize_agrees_with_the_per_pixel_formula_bit_for_bit() {
        let frame = GreyFrame {
            width: 37,
            height: 23,
            pixels: (0..37 * 23).map(|i| ((i * 7919) % 256) as f32 / 255.0).collect(),
        };
        for (h, w) in [(224, 224), (10, 13), (23, 37)] {
            let (ys, xs) = (axis(frame.height, h), axis(frame.width, w));
            let px = |y: usize, x: usize| frame.pixels[y * frame.width + x];
            let mut want = Vec::new();
            for oy in 0..h {
                for ox in 0..w {
                    let (y0, y1, ly, x0, x1, lx) =
                        (ys.i0[oy], ys.i1[oy], ys.lambda[oy], xs.i0[ox], xs.i1[ox], xs.lambda[ox]);
                    let top = px(y0, x0) * (1.0 - lx) + px(y0, x1) * lx;
                    let bottom = px(y1, x0) * (1.0 - lx) + px(y1, x1) * lx;
                    want.push(top * (1.0 - ly) + bottom * ly);
                }
            }
            assert_eq!(resize_bilinear(&frame, h, w), want);
        }
    }
}
