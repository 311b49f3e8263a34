//! AVX-512 (F, BW, VNNI) versions of the 16-bit kernels (Q4_K, Q5_K, Q6_K against Q16_K) and
//! of the int8 ones for Q4_K and Q6_K (against Q8_K), chosen at run time over the AVX2 ones
//! where the CPU has them (Zen 4 and 5, Intel since Ice Lake).
//!
//! Each gives bit for bit the AVX2 kernel's result, so a model's output does not depend on
//! which of the two a machine has. The integer part is exact either way; what must match is how
//! it is cut into the eight i32 lanes that are turned into floats. A 512-bit vector holds a
//! 32-value group's 16 even-indexed 16-bit weights (low half) beside its 16 odd-indexed ones
//! (high half), which is how a Q16_K group lies in memory: one 64-byte load of activations and
//! one `vpdpwssd` (products summed in pairs and added to i32 lanes) replace the AVX2 kernel's
//! two loads, two `madd` and two adds. Adding a block's two halves gives the AVX2 kernel's eight
//! lane sums exactly (integer adds, and every partial sum is bounded as the AVX2 one is); from
//! there the float part is the AVX2 kernel's own code.
//!
//! The weights are widened and scaled once per group for all tokens: a group's 32 bytes are
//! loaded into both halves (a broadcast load), and one `maddubs` against a mask of `[s, 0]`
//! pairs in the low half and `[0, s]` in the high half gives its even weights times the scale
//! in the low half and its odd ones in the high half. The masks are byte shuffles of the
//! block's scales with constant controls.

use super::*;

/// Bytes of a Q8_K activation block (`d` f32, 256 i8 values, 16 i16 block sums).
const Y_BYTES: usize = 292;

/// Whether this CPU runs the kernels here: AVX-512 F, BW and VNNI besides AVX2, FMA and F16C.
/// `ENGINE_KERNELS=avx2` turns them off (to compare the two on one machine).
pub fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        full()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && std::env::var("ENGINE_KERNELS").map_or(true, |v| v != "avx2")
    })
}

/// The 16-bit kernel for weights of type `ty`, with the number of tokens it is fastest at,
/// where there is one here (Q4_K, Q5_K, Q6_K): 4 for each, measured (one thread, 64 tokens:
/// Q4_K 2048x2048 at 178 GFLOP/s with 4 or 8; Q5_K 155-163 against 133-139 with 8; Q6_K
/// 140-167 against 118-148; the mid-size model's prefill 960-980 tok/s against 920-930).
pub fn kernel_q16(ty: QuantType) -> Option<(MultiDotFn, usize)> {
    if !available() {
        return None;
    }
    use QuantType::*;
    let f: (MultiDotFn, usize) = match ty {
        Q4_K => (q4_k_q16_multi, 4),
        Q5_K => (q5_k_q16_multi, 4),
        Q6_K => (q6_k_q16_multi, 4),
        _ => return None,
    };
    Some(f)
}

/// The safe wrapper of a kernel here, `$kern::<T>(blocks, row, tokens, acc) -> acc` (it
/// continues the accumulators it is given): a lone token takes each row in one pass; several
/// take the rows [`SLAB_ROWS`] at a time, a slab of columns at a time ([`slabs`]).
macro_rules! wrapper_slabs {
    ($name:ident, $kern:ident, $wb:expr, $ab:expr) => {
        fn $name(j: &Tile, out: &mut [f32]) {
            let (nb, rows) = check_tile(j, out, QK_K, $wb, $ab);
            let p = |k: usize| j.a[k * j.stride..].as_ptr();
            let (w, rb, o, os) = (j.w.as_ptr(), j.row_bytes, out.as_mut_ptr(), j.out_stride);
            // SAFETY: as in `wrapper_multi!`: every row holds `nb` blocks and every output
            // index is below the bound `check_tile` checked.
            unsafe {
                macro_rules! go {
                    ($n:literal) => {
                        slabs::<$n>(
                            rows,
                            nb,
                            w,
                            rb,
                            $wb,
                            $ab,
                            from_fn(p),
                            o,
                            os,
                            |n, w, a, acc| $kern::<$n>(n, w, a, acc),
                        )
                    };
                }
                match j.tokens {
                    1 => go!(1),
                    2 => go!(2),
                    3 => go!(3),
                    4 => go!(4),
                    5 => go!(5),
                    6 => go!(6),
                    7 => go!(7),
                    _ => go!(8),
                }
            }
        }
    };
}

/// Rows whose accumulators are kept while a slab of columns passes.
const SLAB_ROWS: usize = 64;

/// Columns (in blocks of `ab` activation bytes) of one slab for `t` tokens: their
/// activations, about 22 KiB, stay in L1 while the rows pass. Without slabs, four tokens of
/// 7168 columns in Q16_K (64 KiB) ran at 120 GFLOP/s where 4096 columns ran at 210.
const fn slab_blocks(t: usize, ab: usize) -> usize {
    let b = 40 * Z_BYTES / (t * ab);
    if b < 4 {
        4
    } else {
        b
    }
}

/// `out[t * os + r] = row r · token t` for `rows` rows of `nb` blocks (`wb` bytes each), `rb`
/// bytes apart. One token takes each row in one pass (a matvec streams the weights once, and
/// slabs cut those streams short); several take [`SLAB_ROWS`] rows at a time, each a slab of
/// [`slab_blocks`] columns at a time, carrying the accumulators from slab to slab: the same
/// operations per row and token as one pass, so the same bits.
///
/// # Safety
/// Every row (`nb` blocks) and every activation row must be readable, every output index
/// writable; `kern` must be a kernel this CPU runs.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn slabs<const T: usize>(
    rows: usize,
    nb: usize,
    w: *const u8,
    rb: usize,
    wb: usize,
    ab: usize,
    a: [*const u8; T],
    out: *mut f32,
    os: usize,
    kern: impl Fn(usize, *const u8, [*const u8; T], [__m256; T]) -> [__m256; T],
) {
    let zero = [_mm256_setzero_ps(); T];
    let slab = slab_blocks(T, ab);
    if T == 1 || nb <= slab {
        for r in 0..rows {
            let v = hsums(kern(nb, w.add(r * rb), a, zero));
            for (t, &x) in v.iter().enumerate() {
                *out.add(t * os + r) = x;
            }
        }
        return;
    }
    let mut acc = [zero; SLAB_ROWS];
    for r0 in (0..rows).step_by(SLAB_ROWS) {
        let g = SLAB_ROWS.min(rows - r0);
        acc[..g].fill(zero);
        for b0 in (0..nb).step_by(slab) {
            let n = slab.min(nb - b0);
            let at: [*const u8; T] = from_fn(|t| a[t].add(b0 * ab));
            for (r, acc) in acc[..g].iter_mut().enumerate() {
                *acc = kern(n, w.add((r0 + r) * rb + b0 * wb), at, *acc);
            }
        }
        for (r, acc) in acc[..g].iter().enumerate() {
            for (t, &x) in hsums(*acc).iter().enumerate() {
                *out.add(t * os + r0 + r) = x;
            }
        }
    }
}

wrapper_slabs!(q4_k_q16_multi, q4_k_q16, 144, Z_BYTES);
wrapper_slabs!(q5_k_q16_multi, q5_k_q16, 176, Z_BYTES);
wrapper_slabs!(q6_k_q16_multi, q6_k_q16, 210, Z_BYTES);
wrapper_slabs!(q4_k_q8_multi, q4_k_q8, 144, Y_BYTES);
wrapper_slabs!(q6_k_q8_multi, q6_k_q8, 210, Y_BYTES);

/// `acc + Σ pairs of a·b` in i32 lanes (`vpdpwssd`), `b` the 64 bytes at `p`, as an
/// instruction of its own: the compiler splits the intrinsic into `vpmaddwd` and `vpaddd`
/// (two operations, and more registers live), which left the 8-token kernel spilling to the
/// stack (prefill on the mid-size model: 800 tok/s with the intrinsic, 885 with this).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn dpwssd_at(acc: __m512i, a: __m512i, p: *const u8) -> __m512i {
    let mut acc = acc;
    core::arch::asm!(
        "vpdpwssd {acc}, {a}, zmmword ptr [{p}]",
        acc = inout(zmm_reg) acc,
        a = in(zmm_reg) a,
        p = in(reg) p,
        options(pure, readonly, nostack, preserves_flags)
    );
    acc
}

/// Loads 64 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn ld512(p: *const u8) -> __m512i {
    _mm512_loadu_si512(p as *const __m512i)
}

/// 32 bytes at `p` in both halves.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn ld_both(p: *const u8) -> __m512i {
    _mm512_broadcast_i64x4(ld(p))
}

/// The int8 multi-token kernel for weights of type `ty` (against Q8_K), with the number of
/// tokens it is fastest at, where there is one here (Q4_K, Q6_K): 4 (mid-size prefill with
/// Q4_K at 4: 1110-1118 tok/s; at 8: 1066-1084; the AVX2 kernels: 844-856).
pub fn kernel_multi(ty: QuantType) -> Option<(MultiDotFn, usize)> {
    if !available() {
        return None;
    }
    use QuantType::*;
    let f: (MultiDotFn, usize) = match ty {
        Q4_K => (q4_k_q8_multi, 4),
        Q6_K => (q6_k_q8_multi, 4),
        _ => return None,
    };
    Some(f)
}

/// Independent accumulator chains per token: `vpdpwssd` has a latency of several cycles, so
/// one or two tokens' sums are spread over four chains; more tokens interleave on their own.
const fn chains(t: usize) -> usize {
    if t <= 2 {
        4
    } else {
        1
    }
}

/// A token's chains added, and the two halves added: the AVX2 kernel's eight lane sums.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn fold(s: [__m512i; 4], chains: usize) -> __m256i {
    let mut v = s[0];
    for &c in &s[1..chains] {
        v = _mm512_add_epi32(v, c);
    }
    _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
}

/// Mask controls of Q4_K/Q5_K, one row per group `g`, against the 8 scales as i16 in every
/// 128-bit lane: the low half repeats bytes `2g, 2g + 1` (`[s, 0]` pairs), the high half
/// `2g + 1, 2g` (`[0, s]`).
static K4_CTRL: [[u8; 64]; 8] = {
    let mut t = [[0u8; 64]; 8];
    let mut g = 0;
    while g < 8 {
        let mut b = 0;
        while b < 64 {
            let odd_byte = (b % 2) as u8;
            t[g][b] = 2 * g as u8 + if b < 32 { odd_byte } else { 1 - odd_byte };
            b += 1;
        }
        g += 1;
    }
    t
};

/// Q4_K/Q5_K rows (`bytes` per block; `quarter(x, j)` gives quarter `j`'s two groups, each in
/// both halves) against `T` Q16_K rows.
#[inline(always)]
unsafe fn k4_q16<const T: usize>(
    nb: usize,
    w: *const u8,
    a: [*const u8; T],
    bytes: usize,
    quarter: unsafe fn(*const u8, usize) -> (__m512i, __m512i),
    mut acc: [__m256; T],
) -> [__m256; T] {
    let c = chains(T);
    for i in 0..nb {
        let x = w.add(i * bytes);
        if T == 1 {
            prefetch_ahead(x, bytes);
        }
        let (sc, mn) = k4_scales_mins_split(x.add(4));
        let scales = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(sc));
        let mut sumi = [[_mm512_setzero_si512(); 4]; T];
        for j in 0..4 {
            let (lo, hi) = quarter(x, j);
            for (g, q) in [(2 * j, lo), (2 * j + 1, hi)] {
                let mask = _mm512_shuffle_epi8(scales, ld512(K4_CTRL[g].as_ptr()));
                let wv = _mm512_maddubs_epi16(q, mask);
                for t in 0..T {
                    let s = &mut sumi[t][g % c];
                    *s = dpwssd_at(*s, wv, a[t].add(i * Z_BYTES + Z_QS + 64 * g));
                }
            }
        }
        let sumi: [__m256i; T] = from_fn(|t| fold(sumi[t], c));
        k4_block_end_q16(&mut acc, &sumi, x, mn, a, i * Z_BYTES);
    }
    acc
}

/// Quarter `j` of a Q4_K block: groups `2j` and `2j + 1` (0..15).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_k_quarter512(x: *const u8, j: usize) -> (__m512i, __m512i) {
    let m4 = _mm512_set1_epi8(0x0f);
    let bits = ld_both(x.add(16 + 32 * j));
    (
        _mm512_and_si512(bits, m4),
        _mm512_and_si512(_mm512_srli_epi16::<4>(bits), m4),
    )
}

/// Quarter `j` of a Q5_K block: groups `2j` and `2j + 1` (0..31), from the AVX2 unpacking.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q5_k_quarter512(x: *const u8, j: usize) -> (__m512i, __m512i) {
    let (lo, hi) = q5_k_quarter(x, j, _mm256_set1_epi8(0x0f));
    (_mm512_broadcast_i64x4(lo), _mm512_broadcast_i64x4(hi))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_k_q16<const T: usize>(
    nb: usize,
    w: *const u8,
    a: [*const u8; T],
    acc: [__m256; T],
) -> [__m256; T] {
    k4_q16::<T>(nb, w, a, 144, q4_k_quarter512, acc)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q5_k_q16<const T: usize>(
    nb: usize,
    w: *const u8,
    a: [*const u8; T],
    acc: [__m256; T],
) -> [__m256; T] {
    k4_q16::<T>(nb, w, a, 176, q5_k_quarter512, acc)
}

/// Controls of Q6_K's masks and offsets, one row per 32-value group `k` of a block, against
/// its 16 scale bytes in every 128-bit lane. A group's first 16 values take scale `2k`, the
/// last 16 scale `2k + 1`; in a half of 16 even- or odd-indexed values those are the first
/// and the second 128-bit lane. Masks: `[s, 0]` pairs in the low half, `[0, s]` in the high
/// half (0x80 gives a zero byte). Offsets: `[0, s]` everywhere, an i16 of `256·s`.
const fn q6_ctrl(mask: bool) -> [[u8; 64]; 8] {
    let mut t = [[0u8; 64]; 8];
    let mut k = 0;
    while k < 8 {
        let mut b = 0;
        while b < 64 {
            let scale = (2 * k + (b / 16) % 2) as u8;
            let high_byte = b % 2 == 1;
            let s_in_high = !mask || b >= 32;
            t[k][b] = if high_byte == s_in_high { scale } else { 0x80 };
            b += 1;
        }
        k += 1;
    }
    t
}

static Q6_MASK: [[u8; 64]; 8] = q6_ctrl(true);
static Q6_OFFSET: [[u8; 64]; 8] = q6_ctrl(false);

/// Half `h` of the Q6_K block at `x` (stored `q + 32`, 0..63): its four groups, each in both
/// halves (`q6_k_half` on broadcast loads).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q6_k_half512(x: *const u8, h: usize) -> [__m512i; 4] {
    let m4 = _mm512_set1_epi8(0x0f);
    let ql = x.add(64 * h);
    let qh = ld_both(x.add(128 + 32 * h));
    let ql0 = ld_both(ql);
    let ql1 = ld_both(ql.add(32));
    let bits = |m: i8| _mm512_and_si512(qh, _mm512_set1_epi8(m));
    [
        _mm512_or_si512(
            _mm512_and_si512(ql0, m4),
            _mm512_slli_epi16::<4>(bits(0x03)),
        ),
        _mm512_or_si512(
            _mm512_and_si512(ql1, m4),
            _mm512_slli_epi16::<2>(bits(0x0c)),
        ),
        _mm512_or_si512(
            _mm512_and_si512(_mm512_srli_epi16::<4>(ql0), m4),
            bits(0x30),
        ),
        _mm512_or_si512(
            _mm512_and_si512(_mm512_srli_epi16::<4>(ql1), m4),
            _mm512_srli_epi16::<2>(bits(0xc0u8 as i8)),
        ),
    ]
}

/// Q6_K rows against `T` Q16_K rows: each group's 16-bit weights are `(q + 32)·s − 32·s`, and
/// the sums are turned into floats every half block, as in the AVX2 kernel.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q6_k_q16<const T: usize>(
    nb: usize,
    w: *const u8,
    a: [*const u8; T],
    mut acc: [__m256; T],
) -> [__m256; T] {
    let c = chains(T);
    for i in 0..nb {
        let x = w.add(i * 210);
        if T == 1 {
            prefetch_ahead(x, 210);
        }
        let scales = _mm512_broadcast_i32x4(ld128(x.add(192)));
        let dx = f16x8(x.add(208));
        for h in 0..2 {
            let q = q6_k_half512(x, h);
            let mut sumi = [[_mm512_setzero_si512(); 4]; T];
            for (k, &qk) in q.iter().enumerate() {
                let g = 4 * h + k;
                let mask = _mm512_shuffle_epi8(scales, ld512(Q6_MASK[g].as_ptr()));
                let off = _mm512_shuffle_epi8(scales, ld512(Q6_OFFSET[g].as_ptr()));
                let wv =
                    _mm512_sub_epi16(_mm512_maddubs_epi16(qk, mask), _mm512_srai_epi16::<3>(off));
                for t in 0..T {
                    let s = &mut sumi[t][k % c];
                    *s = dpwssd_at(*s, wv, a[t].add(i * Z_BYTES + Z_QS + 256 * h + 64 * k));
                }
            }
            let sumi: [__m256i; T] = from_fn(|t| fold(sumi[t], c));
            scaled_sums(&mut acc, &sumi, dx, a, i * Z_BYTES);
        }
    }
    acc
}

// ---------------------------------------------------------------------------------------------
// Against Q8_K (int8 activations, ggml's scheme). A 512-bit vector holds two 32-value groups
// side by side, which is how their 64 activation bytes lie: one `maddubs` against one load,
// and one `vpdpwssd` with the two groups' scales, per token and pair of groups. The low half
// gathers what the AVX2 kernel's first `madd` of a pair gives, the high half its second, so
// adding the halves gives its eight lane sums; the float part is its code.

/// `acc + Σ pairs of a·b` in i32 lanes (`vpdpwssd`) on registers, as an instruction of its
/// own (see [`dpwssd_at`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    core::arch::asm!(
        "vpdpwssd {acc}, {a}, {b}",
        acc = inout(zmm_reg) acc,
        a = in(zmm_reg) a,
        b = in(zmm_reg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// Controls of Q4_K/Q5_K's scale pairs against the 8 scales as i16 in every 128-bit lane:
/// row `j` gives scale `2j` in every i16 of the low half and `2j + 1` in the high half.
static K4_PAIR_CTRL: [[u8; 64]; 4] = {
    let mut t = [[0u8; 64]; 4];
    let mut j = 0;
    while j < 4 {
        let mut b = 0;
        while b < 64 {
            let g = 2 * j + b / 32;
            t[j][b] = (2 * g + b % 2) as u8;
            b += 1;
        }
        j += 1;
    }
    t
};

/// Q4_K rows against `T` Q8_K rows (continues `acc`).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_k_q8<const T: usize>(
    nb: usize,
    w: *const u8,
    a: [*const u8; T],
    mut acc: [__m256; T],
) -> [__m256; T] {
    let c = chains(T);
    let m4 = _mm512_set1_epi8(0x0f);
    // Shift the high half's copy of the 32 bytes by 4: low nibbles below, high ones above.
    let shifts = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
    for i in 0..nb {
        let x = w.add(i * 144);
        if T == 1 {
            prefetch_ahead(x, 144);
        }
        let (sc, mn) = k4_scales_mins_split(x.add(4));
        let scales = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(sc));
        let mut sumi = [[_mm512_setzero_si512(); 4]; T];
        for j in 0..4 {
            let q = _mm512_and_si512(_mm512_srlv_epi64(ld_both(x.add(16 + 32 * j)), shifts), m4);
            let s = _mm512_shuffle_epi8(scales, ld512(K4_PAIR_CTRL[j].as_ptr()));
            for t in 0..T {
                let y = ld512(a[t].add(i * Y_BYTES + Y_QS + 64 * j));
                let acc = &mut sumi[t][j % c];
                *acc = dpwssd(*acc, s, _mm512_maddubs_epi16(q, y));
            }
        }
        let sumi: [__m256i; T] = from_fn(|t| fold(sumi[t], c));
        k4_block_end(&mut acc, &sumi, x, mn, a, i * Y_BYTES);
    }
    acc
}

/// Controls of Q6_K's scale pairs against its 16 scale bytes in every 128-bit lane: row `p`
/// (groups `2p` and `2p + 1` of 32 values) puts scale byte `4p + lane` in the high byte of
/// every i16 of 128-bit lane `lane` (an arithmetic shift then sign-extends it).
static Q6_PAIR_CTRL: [[u8; 64]; 4] = {
    let mut t = [[0u8; 64]; 4];
    let mut p = 0;
    while p < 4 {
        let mut b = 0;
        while b < 64 {
            t[p][b] = if b % 2 == 1 {
                (4 * p + b / 16) as u8
            } else {
                0x80
            };
            b += 1;
        }
        p += 1;
    }
    t
};

/// Half `h` of the Q6_K block at `x` (stored `q + 32`, 0..63) as two vectors of 64 values:
/// groups 0 and 1 of the half, then groups 2 and 3 (`q6_k_half`, two groups at a time).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q6_k_half_pairs(x: *const u8, h: usize) -> [__m512i; 2] {
    let m4 = _mm512_set1_epi8(0x0f);
    let ql = ld512(x.add(64 * h));
    let qh = ld_both(x.add(128 + 32 * h));
    let m = |lo: i8, hi: i8| {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_set1_epi8(lo)),
            _mm256_set1_epi8(hi),
        )
    };
    let n = |lo: i16, hi: i16| {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_set1_epi16(lo)),
            _mm256_set1_epi16(hi),
        )
    };
    [
        _mm512_or_si512(
            _mm512_and_si512(ql, m4),
            _mm512_sllv_epi16(_mm512_and_si512(qh, m(0x03, 0x0c)), n(4, 2)),
        ),
        _mm512_or_si512(
            _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4),
            _mm512_srlv_epi16(_mm512_and_si512(qh, m(0x30, 0xc0u8 as i8)), n(0, 2)),
        ),
    ]
}

/// Q6_K rows against `T` Q8_K rows (continues `acc`).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q6_k_q8<const T: usize>(
    nb: usize,
    w: *const u8,
    a: [*const u8; T],
    mut acc: [__m256; T],
) -> [__m256; T] {
    let c = chains(T);
    for i in 0..nb {
        let x = w.add(i * 210);
        if T == 1 {
            prefetch_ahead(x, 210);
        }
        let sc = ld128(x.add(192));
        let scales = _mm512_broadcast_i32x4(sc);
        // Values are stored as q + 32 (unsigned 0..63): subtract 32·Σ sc·bsum once.
        let mut sumi = [[_mm512_setzero_si512(); 4]; T];
        for t in 0..T {
            let sb = _mm256_slli_epi32(scaled_bsums(sc, a[t].add(i * Y_BYTES)), 5);
            let neg = _mm256_sub_epi32(_mm256_setzero_si256(), sb);
            sumi[t][0] = _mm512_zextsi256_si512(neg);
        }
        for h in 0..2 {
            let q = q6_k_half_pairs(x, h);
            for (k, &qk) in q.iter().enumerate() {
                let p = 2 * h + k;
                let s = _mm512_srai_epi16::<8>(_mm512_shuffle_epi8(
                    scales,
                    ld512(Q6_PAIR_CTRL[p].as_ptr()),
                ));
                for t in 0..T {
                    let y = ld512(a[t].add(i * Y_BYTES + Y_QS + 128 * h + 64 * k));
                    let acc = &mut sumi[t][p % c];
                    *acc = dpwssd(*acc, s, _mm512_maddubs_epi16(qk, y));
                }
            }
        }
        let sumi: [__m256i; T] = from_fn(|t| fold(sumi[t], c));
        scaled_sums(&mut acc, &sumi, f16x8(x.add(208)), a, i * Y_BYTES);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{random_f32, random_weights};
    use crate::quant::act;

    /// Every kernel here gives the AVX2 kernel's bits, for 1 to 8 tokens, on random blocks and
    /// on blocks at the formats' extremes (every byte 0x00 or 0xff but the scales), against
    /// 16-bit and against 8-bit activations.
    #[test]
    fn kernels_equal_the_avx2_ones_bit_for_bit() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 F/BW/VNNI");
            return;
        }
        use super::super as avx2;
        let cases: [(QuantType, QuantType, MultiDotFn, MultiDotFn); 5] = [
            (
                QuantType::Q4_K,
                QuantType::Q16_K,
                q4_k_q16_multi,
                avx2::q4_k_q16_multi,
            ),
            (
                QuantType::Q5_K,
                QuantType::Q16_K,
                q5_k_q16_multi,
                avx2::q5_k_q16_multi,
            ),
            (
                QuantType::Q6_K,
                QuantType::Q16_K,
                q6_k_q16_multi,
                avx2::q6_k_q16_multi,
            ),
            (
                QuantType::Q4_K,
                QuantType::Q8_K,
                q4_k_q8_multi,
                avx2::q4_k_multi,
            ),
            (
                QuantType::Q6_K,
                QuantType::Q8_K,
                q6_k_q8_multi,
                avx2::q6_k_multi,
            ),
        ];
        for (ty, act_ty, wide, avx2) in cases {
            assert!(
                kernel_q16(ty).is_some_and(|k| k.0 as usize == wide as usize)
                    || kernel_multi(ty).is_some_and(|k| k.0 as usize == wide as usize),
                "{ty}: the kernel handed out"
            );
            for (k, n) in [256usize, 2048, 7168].into_iter().enumerate() {
                let rows = 67;
                let wb = ty.row_bytes(n).unwrap();
                let mut w = random_weights(ty, rows * n, 40 + k as u64);
                // Rows 3 and 4: every value byte at its extreme, the block scales kept.
                for (r, fill) in [(3, 0xffu8), (4, 0x00)] {
                    for blk in w[r * wb..(r + 1) * wb].chunks_exact_mut(ty.block_bytes()) {
                        let keep: Vec<u8> = blk.to_vec();
                        blk.fill(fill);
                        match ty {
                            QuantType::Q6_K => blk[192..].copy_from_slice(&keep[192..]),
                            _ => blk[..4].copy_from_slice(&keep[..4]),
                        }
                    }
                }
                let rb = act_ty.row_bytes(n).unwrap();
                let stride = rb + 64;
                let mut a = vec![0u8; MULTI * stride];
                for t in 0..MULTI {
                    let x: Vec<f32> = random_f32(n, 90 + t as u64)
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            if t == 7 {
                                v.signum()
                            } else {
                                v * (1 + i % 3) as f32
                            }
                        })
                        .collect();
                    act::quantize_row(act_ty, &x, &mut a[t * stride..t * stride + rb]).unwrap();
                }
                for count in 1..=MULTI {
                    let tile = Tile {
                        cols: n,
                        w: &w,
                        row_bytes: wb,
                        a: &a,
                        stride,
                        tokens: count,
                        out_stride: rows,
                    };
                    let (mut got, mut want) = (vec![0f32; count * rows], vec![1f32; count * rows]);
                    wide(&tile, &mut got);
                    avx2(&tile, &mut want);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{ty} against {act_ty}, n={n}, tokens={count}"
                    );
                }
            }
        }
    }
}
