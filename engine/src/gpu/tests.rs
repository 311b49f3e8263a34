//! GPU tests. They run on whatever adapter [`test_context`] finds (lavapipe in CI) and skip
//! with one line when there is none (they fail instead under `REQUIRE_GPU_TESTS=1`).
//!
//! Tolerance of every product: |gpu - ref| <= 1e-5 * sum_c |w[r,c] x[c]| + 1e-6, where `ref`
//! is the f64 dot product of the ggml-exact dequantised row (`Matrix::dequantize_row`) with x.
//! The CPU backend (`Matrix::matmul`, f32 activations) is held to the same bound. Products in
//! f16 pairs (`uses_f16`, the types of `f16_products`) round w, x and w·x to 11 significant
//! bits, three relative errors of at most 2^-11 each: their bound is 1.5e-3 * sum |w x|, plus
//! 2^-24 * sum (1 + |w| + |x|) for the absolute error of values below f16's normal range.

use super::matrix::f16_products;
use super::*;
use crate::quant::dequant::test_util::{random_row, Rng};
use crate::quant::QuantType;
use crate::tensor::{ActBuf, Matrix, FP8_BLOCK};
use crate::Bytes;

const ALL: [QuantType; 14] = [
    QuantType::F32,
    QuantType::F16,
    QuantType::BF16,
    QuantType::Q8_0,
    QuantType::Q4_0,
    QuantType::Q4_1,
    QuantType::Q5_0,
    QuantType::Q5_1,
    QuantType::Q2_K,
    QuantType::Q3_K,
    QuantType::Q4_K,
    QuantType::Q5_K,
    QuantType::Q6_K,
    QuantType::F8E4M3,
];

fn ctx() -> Option<GpuContext> {
    test_context(GpuOptions {
        f16_products: true,
        ..Default::default()
    })
}

/// A random `rows x cols` matrix of `ty` (valid scales; FP8 without NaN codes, with a grid).
fn random_matrix(ty: QuantType, rows: usize, cols: usize, seed: u64) -> Matrix {
    let mut rng = Rng(seed);
    if ty == QuantType::F8E4M3 {
        let mut data = vec![0u8; rows * cols];
        rng.fill(&mut data);
        for b in &mut data {
            if *b & 0x7f == 0x7f {
                *b ^= 1;
            }
        }
        let nb = rows.div_ceil(FP8_BLOCK) * cols.div_ceil(FP8_BLOCK);
        let scales = (0..nb).map(|_| 0.01 + rng.unit() * 0.1).collect();
        return Matrix::new_fp8(rows, cols, Bytes::from_vec(data), scales).unwrap();
    }
    let mut data = Vec::new();
    for _ in 0..rows {
        data.extend(random_row(ty, cols, &mut rng));
    }
    Matrix::new(ty, rows, cols, Bytes::from_vec(data)).unwrap()
}

fn random_x(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..n).map(|_| rng.normal()).collect()
}

/// Checks `got` (n x rows) against the f64 reference; returns the worst error relative to the
/// bound.
fn check(m: &Matrix, xs: &[f32], n: usize, got: &[f32], what: &str, f16: bool) -> f64 {
    let f16 = f16 && f16_products(m.ty);
    assert_eq!(got.len(), n * m.rows, "{what}: output length");
    let mut w = vec![0f32; m.cols];
    let mut worst = 0f64;
    for r in 0..m.rows {
        m.dequantize_row(r, &mut w).unwrap();
        for t in 0..n {
            let x = &xs[t * m.cols..(t + 1) * m.cols];
            let (mut s, mut a, mut small) = (0f64, 0f64, 0f64);
            for (wv, xv) in w.iter().zip(x) {
                let p = *wv as f64 * *xv as f64;
                s += p;
                a += p.abs();
                small += 1.0 + wv.abs() as f64 + xv.abs() as f64;
            }
            let g = got[t * m.rows + r] as f64;
            let tol = if f16 {
                1.5e-3 * a + small * 2f64.powi(-24) + 1e-6
            } else {
                1e-5 * a + 1e-6
            };
            let err = (g - s).abs();
            assert!(
                err <= tol,
                "{what}: {} {}x{} n={n} row {r} token {t}: got {g}, want {s} (err {err:e}, tol {tol:e})",
                m.ty,
                m.rows,
                m.cols,
            );
            worst = worst.max(err / tol);
        }
    }
    worst
}

/// Column counts to test for `ty`: the smallest whole block, a few blocks, odd float widths.
fn col_cases(ty: QuantType) -> Vec<usize> {
    match ty {
        QuantType::F32 | QuantType::F16 | QuantType::BF16 => vec![1, 7, 130, 301],
        QuantType::F8E4M3 => vec![1, 72, 200, 300],
        t => {
            let b = t.block_elems();
            vec![b, 3 * b, 9 * b]
        }
    }
}

fn products_match(ctx: &GpuContext, types: &[QuantType], rows_cases: &[usize], ns: &[usize]) {
    let mut cpu_scratch = ActBuf::default();
    for (ti, &ty) in types.iter().enumerate() {
        let mut worst = 0f64;
        for (ci, &cols) in col_cases(ty).iter().enumerate() {
            for &rows in rows_cases {
                let seed = (ti * 1000 + ci * 100 + rows) as u64;
                let m = random_matrix(ty, rows, cols, seed);
                let g = GpuMatrix::upload(ctx, &m).unwrap();
                for &n in ns {
                    let xs = random_x(n * cols, seed ^ n as u64);
                    let got = g.matmul_host(ctx, &xs, n).unwrap();
                    worst = worst.max(check(&m, &xs, n, &got, "gpu", ctx.uses_f16()));
                    if m.act_type() == QuantType::F32 {
                        let mut cpu = vec![0f32; n * rows];
                        m.matmul(&xs, n, &mut cpu, &mut cpu_scratch);
                        check(&m, &xs, n, &cpu, "cpu", false);
                    }
                }
            }
        }
        eprintln!(
            "{ty}: worst error {worst:.3} of the bound (subgroups: {}, f16 products: {})",
            ctx.uses_subgroups(),
            ctx.uses_f16() && f16_products(ty)
        );
    }
}

/// f16 products asked for: used where the adapter has `shader-f16` (lavapipe does).
#[test]
fn every_type_matches_the_cpu() {
    let Some(ctx) = ctx() else { return };
    assert_eq!(ctx.uses_f16(), ctx.adapter().shader_f16);
    products_match(&ctx, &ALL, &[1, 5, 67], &[1, 3, 8, 9]);
}

/// The default f32 products (also the only ones of adapters without `shader-f16`): the f32
/// bound for every type.
#[test]
fn f32_products_match_the_cpu() {
    let Some(ctx) = test_context(GpuOptions::default()) else {
        return;
    };
    assert!(!ctx.uses_f16());
    products_match(&ctx, &ALL, &[1, 5, 67], &[1, 3, 8, 9]);
}

#[test]
fn shared_memory_reduction_matches_the_cpu() {
    let Some(ctx) = test_context(GpuOptions {
        disable_subgroups: true,
        f16_products: true,
        ..Default::default()
    }) else {
        return;
    };
    assert!(!ctx.uses_subgroups());
    products_match(&ctx, &ALL, &[6], &[1, 9]);
}

#[test]
fn paged_matrices_give_identical_results() {
    let Some(whole) = ctx() else { return };
    for (ty, cols) in [
        (QuantType::Q8_0, 96),
        (QuantType::F16, 33),
        (QuantType::Q4_K, 256),
    ] {
        let m = random_matrix(ty, 301, cols, 7);
        let stride = m.row_bytes.next_multiple_of(4) as u64;
        let paged_ctx = test_context(GpuOptions {
            max_binding_override: Some(stride * 40 + 3),
            f16_products: true,
            ..Default::default()
        })
        .unwrap();
        let a = GpuMatrix::upload(&whole, &m).unwrap();
        let b = GpuMatrix::upload(&paged_ctx, &m).unwrap();
        assert_eq!(a.pages(), 1);
        assert_eq!(b.pages(), 301usize.div_ceil(40));
        for n in [1, 9] {
            let xs = random_x(n * cols, n as u64);
            let ra = a.matmul_host(&whole, &xs, n).unwrap();
            let rb = b.matmul_host(&paged_ctx, &xs, n).unwrap();
            assert_eq!(ra, rb, "{ty} n={n}: paged result differs");
            check(&m, &xs, n, &rb, "paged", paged_ctx.uses_f16());
        }
    }
}

/// A real matrix past lavapipe's 128 MiB binding limit (Q8_0, 8192 x 16384: 136 MiB).
#[test]
fn matrix_past_the_binding_limit() {
    let Some(ctx) = ctx() else { return };
    let (rows, cols) = (8192, 16384);
    let m = Matrix::new(
        QuantType::Q8_0,
        rows,
        cols,
        Bytes::from_vec(crate::bench::random_weights(
            QuantType::Q8_0,
            rows * cols,
            3,
        )),
    )
    .unwrap();
    let g = GpuMatrix::upload(&ctx, &m).unwrap();
    let expect_pages = (m.data.len() as u64).div_ceil(ctx.page_limit() / 17408 * 17408);
    assert_eq!(g.pages() as u64, expect_pages);
    let xs = random_x(cols, 1);
    let got = g.matvec_host(&ctx, &xs).unwrap();
    check(&m, &xs, 1, &got, "large", ctx.uses_f16());
}

#[test]
fn encode_matmul_with_offsets_and_reuse() {
    let Some(ctx) = ctx() else { return };
    let m = random_matrix(QuantType::Q6_K, 37, 512, 11);
    let g = GpuMatrix::upload(&ctx, &m).unwrap();
    let n = 3;
    let xs = random_x(n * 512, 5);
    let mut padded = vec![0f32; 10];
    padded.extend(&xs);
    let x = ctx.upload_f32("x", &padded).unwrap();
    let out = ctx.alloc_f32("out", 7 + n * 37).unwrap();
    for round in 0..2 {
        let mut enc = ctx.encoder("t");
        g.encode_matmul(&ctx, &mut enc, &x, 10, n, &out, 7).unwrap();
        ctx.submit_and_wait(enc).unwrap();
        let got = ctx.read_f32(&out, 7, n * 37).unwrap();
        check(
            &m,
            &xs,
            n,
            &got,
            &format!("offsets, round {round}"),
            ctx.uses_f16(),
        );
        assert_eq!(ctx.read_f32(&out, 0, 7).unwrap(), vec![0f32; 7]);
    }
    // Out of range is a typed error, not a panic.
    let mut enc = ctx.encoder("t");
    assert!(matches!(
        g.encode_matmul(&ctx, &mut enc, &x, 11, n, &out, 7),
        Err(GpuError::BadArgument(_))
    ));
}

#[test]
fn memory_budget_refuses_before_allocating() {
    let Some(ctx) = test_context(GpuOptions {
        memory_budget: Some(1 << 20),
        ..Default::default()
    }) else {
        return;
    };
    let small = ctx.alloc_f32("a", 1000).unwrap();
    assert_eq!(ctx.memory_used(), 4000);
    let m = random_matrix(QuantType::Q8_0, 1024, 1024, 1); // 1.06 MiB
    match GpuMatrix::upload(&ctx, &m) {
        Err(GpuError::OutOfMemory {
            requested,
            used,
            budget,
        }) => {
            assert_eq!(requested, 1024 * 1088);
            assert_eq!(used, 4000);
            assert_eq!(budget, 1 << 20);
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    assert_eq!(
        ctx.memory_used(),
        4000,
        "nothing allocated by the refused load"
    );
    drop(small);
    assert_eq!(ctx.memory_used(), 0);
    let fits = random_matrix(QuantType::Q8_0, 256, 1024, 1);
    let g = GpuMatrix::upload(&ctx, &fits).unwrap();
    assert_eq!(ctx.memory_used(), g.device_bytes());
}

#[test]
fn adapter_selection_rules() {
    let a = |i: usize, name: &str, ty: &str| AdapterSummary {
        index: i,
        name: name.into(),
        backend: "Vulkan".into(),
        device_type: ty.into(),
        is_software: ty == "Cpu",
        driver: String::new(),
        driver_info: String::new(),
        max_buffer_size: 0,
        max_storage_buffer_binding_size: 0,
        max_compute_workgroup_storage_size: 0,
        max_compute_invocations_per_workgroup: 0,
        max_storage_buffers_per_shader_stage: 0,
        shader_f16: false,
        subgroups: false,
        subgroup_min_size: 0,
        subgroup_max_size: 0,
    };
    let soft = vec![a(0, "llvmpipe (LLVM 19)", "Cpu")];
    assert!(matches!(
        select_adapter(&soft, &GpuSelector::Auto),
        Err(GpuError::NoAdapter(_))
    ));
    assert_eq!(
        select_adapter(&soft, &GpuSelector::Name("LLVMpipe".into())),
        Ok(0)
    );
    assert_eq!(select_adapter(&soft, &GpuSelector::Index(0)), Ok(0));
    assert!(select_adapter(&soft, &GpuSelector::Index(1)).is_err());
    let mixed = vec![
        a(0, "llvmpipe", "Cpu"),
        a(1, "virt", "VirtualGpu"),
        a(2, "igpu", "IntegratedGpu"),
        a(3, "dgpu", "DiscreteGpu"),
    ];
    assert_eq!(select_adapter(&mixed, &GpuSelector::Auto), Ok(3));
    assert_eq!(select_adapter(&mixed[..3], &GpuSelector::Auto), Ok(2));
    assert_eq!(select_adapter(&mixed[..2], &GpuSelector::Auto), Ok(1));
    assert_eq!("auto".parse(), Ok(GpuSelector::Auto));
    assert_eq!("2".parse(), Ok(GpuSelector::Index(2)));
    assert_eq!("llvm".parse(), Ok(GpuSelector::Name("llvm".into())));

    // On this machine's real adapter list: Auto never opens a software adapter.
    let list = list_adapters();
    if list.iter().all(|a| a.is_software) {
        assert!(matches!(
            GpuContext::new(GpuOptions::default()),
            Err(GpuError::NoAdapter(_))
        ));
    }
    if let Some(sw) = list.iter().find(|a| a.is_software) {
        let c = GpuContext::new(GpuOptions {
            selector: GpuSelector::Name(sw.name.clone()),
            ..Default::default()
        })
        .unwrap();
        assert!(c.adapter().is_software);
    }
}

#[test]
fn unsupported_types_are_typed_errors() {
    let Some(ctx) = ctx() else { return };
    let m = Matrix {
        ty: QuantType::Q8_K,
        rows: 1,
        cols: 256,
        row_bytes: 292,
        data: Bytes::from_vec(vec![0; 292]),
        block_scales: None,
    };
    assert_eq!(
        GpuMatrix::upload(&ctx, &m).unwrap_err(),
        GpuError::Unsupported("Q8_K")
    );
    let g = GpuMatrix::upload(&ctx, &random_matrix(QuantType::F32, 2, 4, 1)).unwrap();
    assert!(matches!(
        g.matvec_host(&ctx, &[1.0; 3]),
        Err(GpuError::BadArgument(_))
    ));
}

#[test]
fn executor_runs_jobs_and_returns_errors() {
    let Some(ctx) = ctx() else { return };
    let f16 = ctx.uses_f16();
    let ex = GpuExecutor::spawn(ctx, 2).unwrap();
    let m = random_matrix(QuantType::Q4_K, 9, 256, 2);
    let xs = random_x(256, 2);
    let (m2, xs2) = (m.clone(), xs.clone());
    let got = ex
        .run(move |ctx| GpuMatrix::upload(ctx, &m2)?.matvec_host(ctx, &xs2))
        .unwrap();
    check(&m, &xs, 1, &got, "executor", f16);
    let err = ex.run(|_| -> Result<(), GpuError> { Err(GpuError::BadArgument("no".into())) });
    assert_eq!(err, Err(GpuError::BadArgument("no".into())));
    let p = ex.run(|_| -> Result<(), GpuError> { panic!("boom") });
    assert_eq!(p, Err(GpuError::JobPanicked("boom".into())));
    // The thread survives both and keeps serving.
    assert_eq!(ex.run(|c| Ok(c.memory_used())), Ok(0));

    // A full queue: one job blocks the thread, `depth` more fill the queue.
    let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
    let blocker = ex
        .submit(move |_| {
            let _ = gate_rx.recv();
            Ok(1)
        })
        .unwrap();
    let mut queued = Vec::new();
    let full = loop {
        match ex.try_submit(|_| Ok(2)) {
            Ok(h) => queued.push(h),
            Err(e) => break e,
        }
        assert!(queued.len() <= 3, "queue is not bounded");
    };
    assert_eq!(full, GpuError::QueueFull);
    assert!(blocker.try_get().is_none());
    gate_tx.send(()).unwrap();
    assert_eq!(blocker.wait(), Ok(1));
    for h in queued {
        assert_eq!(h.wait(), Ok(2));
    }
    drop(ex); // joins the thread
}

#[test]
fn executor_reports_context_errors() {
    let r = GpuExecutor::new(
        GpuOptions {
            selector: GpuSelector::Name("no such adapter anywhere".into()),
            ..Default::default()
        },
        1,
    );
    assert!(matches!(r, Err(GpuError::NoAdapter(_))));
}
