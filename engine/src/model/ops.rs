//! Small element-wise and reduction operations of the graph (f32, in place where possible).

/// `out = w * x / sqrt(mean(x^2) + eps)`, statistics accumulated in f64 for stability.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), w.len());
    let inv = (1.0 / (sum_squares(x) / x.len() as f64 + eps as f64).sqrt()) as f32;
    for ((o, &v), &wv) in out.iter_mut().zip(x).zip(w) {
        *o = wv * (v * inv);
    }
}

/// In-place RMSNorm of every `w.len()`-wide row of `x`.
pub fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(w.len()) {
        let inv = (1.0 / (sum_squares(row) / w.len() as f64 + eps as f64).sqrt()) as f32;
        for (v, &wv) in row.iter_mut().zip(w) {
            *v = wv * (*v * inv);
        }
    }
}

/// `Σ x²` in f64, over eight independent partial sums (one f64 chain added in order waits out
/// an addition's latency per value: a prefill's norms, one row at a time, took about 3% of
/// it). The eight sums add in a fixed order, so the result is the same on every call.
#[inline]
pub fn sum_squares(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k] as f64 * c[k] as f64;
        }
    }
    for (k, &v) in rest.iter().enumerate() {
        acc[k] += v as f64 * v as f64;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `gate[i] = silu(gate[i]) * up[i]` (SwiGLU's inner product), written into `gate`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// [`swiglu`], spread over the kernels' pool when it is large (a prefill's): the same values.
pub fn swiglu_par(gate: &mut [f32], up: &[f32]) {
    const CHUNK: usize = 8192;
    let n = gate.len().min(up.len());
    if n < crate::cpu::pool::PARALLEL_VALUES {
        return swiglu(gate, up);
    }
    crate::cpu::pool::global().for_each_chunk_mut(&mut gate[..n], CHUNK, |i, g| {
        swiglu(g, &up[i * CHUNK..i * CHUNK + g.len()])
    });
}

/// In-place numerically stable softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `dst += src`.
pub fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// Plain f32 dot product: AVX2/FMA where the CPU has it (fused multiply-adds, two 8-wide
/// accumulators), else eight scalar accumulators (which vectorise to SSE).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: the CPU has the features; both slices hold `n` values.
        return unsafe { simd::dot(a.as_ptr(), b.as_ptr(), n) };
    }
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `dst += a * src` (fused where the CPU has FMA).
#[inline]
pub fn axpy(dst: &mut [f32], a: f32, src: &[f32]) {
    let n = dst.len().min(src.len());
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: the CPU has the features; both slices hold `n` values.
        return unsafe { simd::axpy(dst.as_mut_ptr(), a, src.as_ptr(), n) };
    }
    for (d, s) in dst[..n].iter_mut().zip(&src[..n]) {
        *d += a * s;
    }
}

/// Whether the AVX2/FMA forms run on this CPU (model code with its own AVX2 kernels asks).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn simd_available() -> bool {
    simd::available()
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use core::arch::x86_64::*;

    #[inline]
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// # Safety
    /// AVX2 and FMA present; `a` and `b` valid for `n` reads.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32 {
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), s0);
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.add(i + 8)),
                _mm256_loadu_ps(b.add(i + 8)),
                s1,
            );
            i += 16;
        }
        if i + 8 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), s0);
            i += 8;
        }
        let v = _mm256_add_ps(s0, s1);
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let mut s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
        while i < n {
            s = (*a.add(i)).mul_add(*b.add(i), s);
            i += 1;
        }
        s
    }

    /// # Safety
    /// AVX2 and FMA present; `d` valid for `n` writes, `s` for `n` reads, not overlapping.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(d: *mut f32, a: f32, s: *const f32, n: usize) {
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_fmadd_ps(va, _mm256_loadu_ps(s.add(i)), _mm256_loadu_ps(d.add(i)));
            _mm256_storeu_ps(d.add(i), v);
            i += 8;
        }
        while i < n {
            *d.add(i) = a.mul_add(*s.add(i), *d.add(i));
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_orders() {
        let mut x = [1.0f32, 2.0, 3.0, -1000.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[2] > x[1] && x[1] > x[0] && x[3] == 0.0);
    }

    /// Both forms against an f64 reference, at lengths around the vector widths.
    #[test]
    fn dot_and_axpy_match_f64() {
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 256, 288] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 13.0)
                .collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let scale: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| (x as f64 * y as f64).abs())
                .sum();
            let got = dot(&a, &b) as f64;
            assert!(
                (got - want).abs() <= 1e-6 * scale.max(1.0),
                "dot n={n}: {got} vs {want}"
            );
            let mut d = b.clone();
            axpy(&mut d, 0.75, &a);
            for i in 0..n {
                let want = b[i] as f64 + 0.75 * a[i] as f64;
                assert!(
                    (d[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "axpy n={n} i={i}"
                );
            }
        }
    }

    #[test]
    fn rms_norm_unit_rows() {
        let x = [3.0f32, 4.0];
        let mut o = [0f32; 2];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut o);
        let r = (12.5f32).sqrt();
        assert!((o[0] - 3.0 / r).abs() < 1e-6 && (o[1] - 8.0 / r).abs() < 1e-6);
    }
}
