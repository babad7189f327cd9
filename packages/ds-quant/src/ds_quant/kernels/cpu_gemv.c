/* INT8, INT4, bfloat16 and float32 weight matrix products for a few rows, on x86 CPUs.
 *
 * Decode multiplies one or a few activation rows by every weight matrix, so its time is
 * the weight bytes it reads. These kernels read the stored integer weights once for all
 * rows and never make a float copy of them. The activation rows are quantized to int16
 * with one scale per row (max |x| / 32767: finer than the bfloat16 rounding of torch's
 * packed ops), so each weight chunk is widened to int16 once and multiplied with the
 * rows by integer pair dot products (AVX512-VNNI vpdpwssd, or vpmaddwd + vpaddd on
 * AVX512BW / AVX2), accumulated exactly in int32 over blocks of at most 4096 inputs, then
 * in float32.
 *
 * bfloat16 weights (ds_bf16_gemv) take the same few rows: each weight is widened to
 * float32 as it is read (a 16-bit shift) and multiplied with the float32 value of the
 * bfloat16 input by fused multiply-adds, accumulated in float32, the result rounded to
 * bfloat16 (to nearest even, as torch rounds). float32 weights (ds_fp32_gemv) take the
 * same loop without the widening and keep the float32 sums.
 *
 * Layouts are ds_quant's own (see ds_quant/primitives.py):
 *   INT8: w int8 (N, K), row stride ldw; scale float32 (N,); y = (x @ w^T) * scale.
 *   INT4: w uint8 (N, K_pad / 2), byte j holding values 2j (low nibble) and 2j + 1 (high);
 *         scale, zero float32 (N, G) with K_pad = G * group; W = (q - zero) * scale.
 *   BF16: w bfloat16 bits (N, K), row stride ldw; x and y bfloat16 bits too.
 *   FP32: w float32 (N, K), row stride ldw; or input-major (ds_fp32_gemv_t): wt (K, N).
 * x float32 (M, K) with row stride ldx, y float32 (M, N) with row stride ldy.
 * Every function returns 0, or a negative code for arguments it does not take (the
 * Python side checks them first; the codes are a second line).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8
/* Inputs per exact int32 block: an AVX2 lane sums 2 * BLOCK / 16 products of at most
 * 32767 * 128 (512 * 4194176 < 2^31), an AVX-512 lane half as many. */
#define BLOCK 4096
/* The largest INT4 group: a lane sums group / 16 products of at most 15 * 32767. */
#define MAX_GROUP 32768
#define ROWS_PER_TASK 16

#if defined(__AVX512BW__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512BW__)
#define STEP 32 /* int16 lanes per vector */
typedef __m512i vi;
typedef __m512 vf;
static inline vi vzero(void) { return _mm512_setzero_si512(); }
static inline vi load_i16(const int16_t *p) { return _mm512_loadu_si512((const void *)p); }
static inline vi widen_i8(const int8_t *p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
}
static inline vi widen_u8(const uint8_t *p) {
  return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
}
static inline vi low_nibbles(vi v) { return _mm512_and_si512(v, _mm512_set1_epi16(15)); }
static inline vi high_nibbles(vi v) { return _mm512_srli_epi16(v, 4); }
#if defined(__AVX512VNNI__)
static inline vi dot_acc(vi acc, vi a, vi b) { return _mm512_dpwssd_epi32(acc, a, b); }
#define ISA 3
#else
static inline vi dot_acc(vi acc, vi a, vi b) {
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
}
#define ISA 2
#endif
static inline vf fzero(void) { return _mm512_setzero_ps(); }
static inline vf to_float(vi v) { return _mm512_cvtepi32_ps(v); }
static inline vf fmadd_s(vf a, float s, vf acc) {
  return _mm512_fmadd_ps(a, _mm512_set1_ps(s), acc);
}
static inline vf fadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline float fsum(vf v) { return _mm512_reduce_add_ps(v); }
#define FSTEP 16 /* float32 lanes per vector */
static inline vf load_f(const float *p) { return _mm512_loadu_ps(p); }
static inline void store_f(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf fma_v(vf a, vf b, vf acc) { return _mm512_fmadd_ps(a, b, acc); }
static inline vf widen_bf16(const uint16_t *p) {
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
#elif defined(__AVX2__)
#define STEP 16
#define ISA 1
typedef __m256i vi;
typedef __m256 vf;
static inline vi vzero(void) { return _mm256_setzero_si256(); }
static inline vi load_i16(const int16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vi widen_i8(const int8_t *p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}
static inline vi widen_u8(const uint8_t *p) {
  return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
}
static inline vi low_nibbles(vi v) { return _mm256_and_si256(v, _mm256_set1_epi16(15)); }
static inline vi high_nibbles(vi v) { return _mm256_srli_epi16(v, 4); }
static inline vi dot_acc(vi acc, vi a, vi b) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
}
static inline vf fzero(void) { return _mm256_setzero_ps(); }
static inline vf to_float(vi v) { return _mm256_cvtepi32_ps(v); }
static inline vf fmadd_s(vf a, float s, vf acc) {
  return _mm256_fmadd_ps(a, _mm256_set1_ps(s), acc);
}
static inline vf fadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline float fsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#define FSTEP 8
static inline vf load_f(const float *p) { return _mm256_loadu_ps(p); }
static inline void store_f(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf fma_v(vf a, vf b, vf acc) { return _mm256_fmadd_ps(a, b, acc); }
static inline vf widen_bf16(const uint16_t *p) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
#else
#define ISA 0
#endif

/* 0: no vector path was compiled (the functions below refuse); 1: AVX2; 2: AVX512BW;
 * 3: AVX512BW + VNNI. */
int ds_gemv_isa(void) { return ISA; }

#if ISA > 0

/* Row m of x to int16 with one scale (returned), written to out[0, K) and zero-filled up
 * to padded. A row with a non-finite value gets a NaN scale, so its outputs are NaN. */
static float quantize_row(const float *x, int64_t K, int64_t padded, int16_t *out) {
  float amax = 0.0f;
  int finite = 1;
  for (int64_t k = 0; k < K; k++) {
    const float a = fabsf(x[k]);
    finite &= a <= FLT_MAX; /* false for inf and NaN */
    amax = a > amax ? a : amax;
  }
  if (!finite) {
    memset(out, 0, (size_t)padded * sizeof(int16_t));
    return NAN;
  }
  if (amax == 0.0f) {
    memset(out, 0, (size_t)padded * sizeof(int16_t));
    return 0.0f;
  }
  const float inv = 32767.0f / amax;
  for (int64_t k = 0; k < K; k++) out[k] = (int16_t)lrintf(x[k] * inv);
  for (int64_t k = K; k < padded; k++) out[k] = 0;
  return amax / 32767.0f;
}

static int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

/* Rows [n0, n1) of the INT8 product for M activation rows. Inlined into a copy per M
 * (``SPECIALIZE``), so the accumulators live in registers. */
static inline __attribute__((always_inline)) void int8_rows(
    const int M, int64_t n0, int64_t n1, int64_t K, const int16_t *xq, int64_t ldq,
    const float *xs, const int8_t *w, int64_t ldw, const float *scale, float *y, int64_t ldy) {
  const int64_t whole = K / STEP * STEP;
  for (int64_t n = n0; n < n1; n++) {
    const int8_t *row = w + n * ldw;
    vf total[MAX_ROWS];
    for (int m = 0; m < M; m++) total[m] = fzero();
    for (int64_t k0 = 0; k0 < whole; k0 += BLOCK) {
      const int64_t k1 = k0 + BLOCK < whole ? k0 + BLOCK : whole;
      vi acc[MAX_ROWS];
      for (int m = 0; m < M; m++) acc[m] = vzero();
      for (int64_t k = k0; k < k1; k += STEP) {
        const vi wv = widen_i8(row + k);
        for (int m = 0; m < M; m++) acc[m] = dot_acc(acc[m], wv, load_i16(xq + m * ldq + k));
      }
      for (int m = 0; m < M; m++) total[m] = fadd(total[m], to_float(acc[m]));
    }
    for (int m = 0; m < M; m++) {
      const int16_t *q = xq + m * ldq;
      int64_t tail = 0;
      for (int64_t k = whole; k < K; k++) tail += (int64_t)row[k] * q[k];
      y[m * ldy + n] = (fsum(total[m]) + (float)tail) * xs[m] * scale[n];
    }
  }
}

/* Rows [n0, n1) of the INT4 product: xe / xo hold each row's even / odd inputs. */
static inline __attribute__((always_inline)) void int4_rows(
    const int M, int64_t n0, int64_t n1, int64_t groups, int64_t group, const int16_t *xe,
    const int16_t *xo, int64_t ldq, const float *xs, const int64_t *xsum, const uint8_t *w,
    int64_t ldw, const float *scale, const float *zero, int64_t lds, float *y, int64_t ldy) {
  const int64_t half = group / 2; /* bytes, and int16 values of xe / xo, per group */
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t *row = w + n * ldw;
    const float *s = scale + n * lds, *z = zero + n * lds;
    vf total[MAX_ROWS];
    float offset[MAX_ROWS];
    for (int m = 0; m < M; m++) {
      total[m] = fzero();
      offset[m] = 0.0f;
    }
    for (int64_t g = 0; g < groups; g++) {
      vi acc[MAX_ROWS];
      for (int m = 0; m < M; m++) acc[m] = vzero();
      for (int64_t b = g * half; b < (g + 1) * half; b += STEP) {
        const vi wv = widen_u8(row + b);
        const vi lo = low_nibbles(wv), hi = high_nibbles(wv);
        for (int m = 0; m < M; m++) {
          acc[m] = dot_acc(acc[m], lo, load_i16(xe + m * ldq + b));
          acc[m] = dot_acc(acc[m], hi, load_i16(xo + m * ldq + b));
        }
      }
      for (int m = 0; m < M; m++) {
        total[m] = fmadd_s(to_float(acc[m]), s[g], total[m]);
        offset[m] += s[g] * z[g] * (float)xsum[m * groups + g];
      }
    }
    for (int m = 0; m < M; m++) y[m * ldy + n] = (fsum(total[m]) - offset[m]) * xs[m];
  }
}

#define SPECIALIZE(fn, M, ...)          \
  switch (M) {                          \
    case 1: fn(1, __VA_ARGS__); break;  \
    case 2: fn(2, __VA_ARGS__); break;  \
    case 3: fn(3, __VA_ARGS__); break;  \
    case 4: fn(4, __VA_ARGS__); break;  \
    case 5: fn(5, __VA_ARGS__); break;  \
    case 6: fn(6, __VA_ARGS__); break;  \
    case 7: fn(7, __VA_ARGS__); break;  \
    default: fn(8, __VA_ARGS__); break; \
  }

static int threads_for(int64_t rows, int threads) {
  const int64_t tasks = (rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
  return threads < 1 ? 1 : (tasks < threads ? (int)tasks : threads);
}

int ds_int8_gemv(int64_t M, int64_t N, int64_t K, const float *x, int64_t ldx,
                 const int8_t *w, int64_t ldw, const float *scale, float *y, int64_t ldy,
                 int threads) {
  if (M < 1 || M > MAX_ROWS || N < 0 || K < 1 || ldw < K || ldx < K || ldy < N) return -1;
  const int64_t ldq = round_up(K, STEP);
  int16_t *xq = (int16_t *)malloc((size_t)(M * ldq) * sizeof(int16_t));
  if (!xq) return -2;
  float xs[MAX_ROWS];
  for (int64_t m = 0; m < M; m++) xs[m] = quantize_row(x + m * ldx, K, ldq, xq + m * ldq);
  const int nt = threads_for(N, threads);
  if (nt == 1) { /* no OpenMP region: it costs about a microsecond per call */
    SPECIALIZE(int8_rows, M, 0, N, K, xq, ldq, xs, w, ldw, scale, y, ldy)
  } else {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n0 = 0; n0 < N; n0 += ROWS_PER_TASK) {
      const int64_t n1 = n0 + ROWS_PER_TASK < N ? n0 + ROWS_PER_TASK : N;
      SPECIALIZE(int8_rows, M, n0, n1, K, xq, ldq, xs, w, ldw, scale, y, ldy)
    }
  }
  free(xq);
  return 0;
}

int ds_int4_gemv(int64_t M, int64_t N, int64_t K, int64_t group, const float *x, int64_t ldx,
                 const uint8_t *w, int64_t ldw, const float *scale, const float *zero,
                 int64_t lds, float *y, int64_t ldy, int threads) {
  if (M < 1 || M > MAX_ROWS || N < 0 || K < 1 || group < 2 * STEP || group % (2 * STEP) ||
      group > MAX_GROUP || ldx < K || ldy < N)
    return -1;
  const int64_t groups = (K + group - 1) / group, padded = groups * group;
  if (ldw < padded / 2 || lds < groups) return -1;
  const int64_t ldq = padded / 2;
  int16_t *buf = (int16_t *)malloc((size_t)(M * padded) * sizeof(int16_t));
  int16_t *xe = (int16_t *)malloc((size_t)(2 * M * ldq) * sizeof(int16_t));
  int64_t *xsum = (int64_t *)malloc((size_t)(M * groups) * sizeof(int64_t));
  if (!buf || !xe || !xsum) {
    free(buf);
    free(xe);
    free(xsum);
    return -2;
  }
  int16_t *xo = xe + M * ldq;
  float xs[MAX_ROWS];
  for (int64_t m = 0; m < M; m++) {
    int16_t *q = buf + m * padded;
    xs[m] = quantize_row(x + m * ldx, K, padded, q);
    for (int64_t j = 0; j < ldq; j++) {
      xe[m * ldq + j] = q[2 * j];
      xo[m * ldq + j] = q[2 * j + 1];
    }
    for (int64_t g = 0; g < groups; g++) {
      int64_t sum = 0;
      for (int64_t k = g * group; k < (g + 1) * group; k++) sum += q[k];
      xsum[m * groups + g] = sum;
    }
  }
  const int nt = threads_for(N, threads);
  if (nt == 1) {
    SPECIALIZE(int4_rows, M, 0, N, groups, group, xe, xo, ldq, xs, xsum, w, ldw, scale, zero,
               lds, y, ldy)
  } else {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n0 = 0; n0 < N; n0 += ROWS_PER_TASK) {
      const int64_t n1 = n0 + ROWS_PER_TASK < N ? n0 + ROWS_PER_TASK : N;
      SPECIALIZE(int4_rows, M, n0, n1, groups, group, xe, xo, ldq, xs, xsum, w, ldw, scale,
                 zero, lds, y, ldy)
    }
  }
  free(buf);
  free(xe);
  free(xsum);
  return 0;
}

static inline float bf16_to_float(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* Round to nearest even, NaN to torch's quiet NaN, as c10::BFloat16 rounds. */
static inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

#if defined(__AVX512BF16__)
/* AVX512-BF16: vdpbf16ps multiplies 32 bfloat16 pairs a vector straight from memory
 * and adds them into 16 float32 sums, where widening and multiply-adding takes four
 * instructions: 2 rows then cost what 1 does. Against oneDNN's bfloat16 matmul (a
 * one-off timing loop over seven V3 and llama layer shapes, one thread, EPYC-512;
 * bench_matvec.py measures 1 and 4 rows): 1.3-2.9x as fast at 1-2 rows, 1.0-2.9x at
 * 4, 0.7-1.6x at 8; the widening form 1.05-2.2x at 1 row, 0.8-2.4x at 2. */
#define BF16_MAX_ROWS 4
#define BSTEP 32
static inline vf dot_bf16(vf acc, const uint16_t *w, const uint16_t *x) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)w),
                          (__m512bh)_mm512_loadu_si512((const void *)x));
}

static inline __attribute__((always_inline)) void bf16_rows_dp(
    const int M, int64_t n0, int64_t n1, int64_t K, const uint16_t *x, int64_t ldx,
    const float *xf, int64_t ldf, const uint16_t *w, int64_t ldw, uint16_t *y, int64_t ldy) {
  const int64_t whole = K / (2 * BSTEP) * (2 * BSTEP);
  for (int64_t n = n0; n < n1; n++) {
    const uint16_t *row = w + n * ldw;
    vf a0[MAX_ROWS], a1[MAX_ROWS];
    for (int m = 0; m < M; m++) a0[m] = a1[m] = fzero();
    for (int64_t k = 0; k < whole; k += 2 * BSTEP) {
      for (int m = 0; m < M; m++) {
        a0[m] = dot_bf16(a0[m], row + k, x + m * ldx + k);
        a1[m] = dot_bf16(a1[m], row + k + BSTEP, x + m * ldx + k + BSTEP);
      }
    }
    for (int m = 0; m < M; m++) {
      float sum = fsum(fadd(a0[m], a1[m]));
      for (int64_t k = whole; k < K; k++) sum += bf16_to_float(row[k]) * xf[m * ldf + k];
      y[m * ldy + n] = float_to_bf16(sum);
    }
  }
}
#endif

#ifndef BF16_MAX_ROWS
#define BF16_MAX_ROWS 1
#endif

/* The most rows a layer should hand ds_bf16_gemv (it takes up to MAX_ROWS): past this
 * oneDNN's bfloat16 matmul is as fast or faster. */
int ds_bf16_max_rows(void) { return BF16_MAX_ROWS; }

/* Rows [n0, n1) of a float product by fused multiply-adds: xf holds the M input rows in
 * float32; the weight is bfloat16 (wb, each value widened to float32 as it is read) or
 * float32 (wf); results are rounded to bfloat16 into yb, or stored as float32 into yf.
 * ``bf16`` is a constant at each call, so each form compiles to its own loop. Two
 * accumulators a row: one chain of dependent multiply-adds would wait on each. */
static inline __attribute__((always_inline)) void fma_rows(
    const int M, const int bf16, int64_t n0, int64_t n1, int64_t K, const float *xf,
    int64_t ldf, const uint16_t *wb, const float *wf, int64_t ldw, uint16_t *yb, float *yf,
    int64_t ldy) {
  const int64_t whole = K / (2 * FSTEP) * (2 * FSTEP);
  for (int64_t n = n0; n < n1; n++) {
    const uint16_t *rb = bf16 ? wb + n * ldw : NULL;
    const float *rf = bf16 ? NULL : wf + n * ldw;
    vf a0[MAX_ROWS], a1[MAX_ROWS];
    for (int m = 0; m < M; m++) a0[m] = a1[m] = fzero();
    for (int64_t k = 0; k < whole; k += 2 * FSTEP) {
      const vf w0 = bf16 ? widen_bf16(rb + k) : load_f(rf + k);
      const vf w1 = bf16 ? widen_bf16(rb + k + FSTEP) : load_f(rf + k + FSTEP);
      for (int m = 0; m < M; m++) {
        a0[m] = fma_v(w0, load_f(xf + m * ldf + k), a0[m]);
        a1[m] = fma_v(w1, load_f(xf + m * ldf + k + FSTEP), a1[m]);
      }
    }
    for (int m = 0; m < M; m++) {
      float sum = fsum(fadd(a0[m], a1[m]));
      for (int64_t k = whole; k < K; k++)
        sum += (bf16 ? bf16_to_float(rb[k]) : rf[k]) * xf[m * ldf + k];
      if (bf16)
        yb[m * ldy + n] = float_to_bf16(sum);
      else
        yf[m * ldy + n] = sum;
    }
  }
}

int ds_bf16_gemv(int64_t M, int64_t N, int64_t K, const uint16_t *x, int64_t ldx,
                 const uint16_t *w, int64_t ldw, uint16_t *y, int64_t ldy, int threads) {
  if (M < 1 || M > MAX_ROWS || N < 0 || K < 1 || ldw < K || ldx < K || ldy < N) return -1;
  float *xf = (float *)malloc((size_t)(M * K) * sizeof(float));
  if (!xf) return -2;
  for (int64_t m = 0; m < M; m++)
    for (int64_t k = 0; k < K; k++) xf[m * K + k] = bf16_to_float(x[m * ldx + k]);
  const int nt = threads_for(N, threads);
#if defined(__AVX512BF16__)
#define BF16_ROWS(M, n0, n1) SPECIALIZE(bf16_rows_dp, M, n0, n1, K, x, ldx, xf, K, w, ldw, y, ldy)
#else
#define BF16_ROWS(M, n0, n1) \
  SPECIALIZE(fma_rows, M, 1, n0, n1, K, xf, K, w, NULL, ldw, y, NULL, ldy)
#endif
  if (nt == 1) {
    BF16_ROWS(M, 0, N)
  } else {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n0 = 0; n0 < N; n0 += ROWS_PER_TASK) {
      const int64_t n1 = n0 + ROWS_PER_TASK < N ? n0 + ROWS_PER_TASK : N;
      BF16_ROWS(M, n0, n1)
    }
  }
#undef BF16_ROWS
  free(xf);
  return 0;
}

/* The most rows a float32 layer should hand ds_fp32_gemv: at 1-4 rows it read weights
 * 1.3-3.1x as fast as torch's float32 matmul (MKL) in a one-off timing loop over six V3
 * and llama layer shapes, weights from memory, one thread, EPYC-512 (bench_matvec.py
 * measures 1 and 4 rows), except 4 rows of 2048 inputs: 0.95-0.98x, even. */
#define FP32_MAX_ROWS 4
int ds_fp32_max_rows(void) { return FP32_MAX_ROWS; }

int ds_fp32_gemv(int64_t M, int64_t N, int64_t K, const float *x, int64_t ldx, const float *w,
                 int64_t ldw, float *y, int64_t ldy, int threads) {
  if (M < 1 || M > MAX_ROWS || N < 0 || K < 1 || ldw < K || ldx < K || ldy < N) return -1;
  const int nt = threads_for(N, threads);
  if (nt == 1) {
    SPECIALIZE(fma_rows, M, 0, 0, N, K, x, ldx, NULL, w, ldw, NULL, y, ldy)
  } else {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n0 = 0; n0 < N; n0 += ROWS_PER_TASK) {
      const int64_t n1 = n0 + ROWS_PER_TASK < N ? n0 + ROWS_PER_TASK : N;
      SPECIALIZE(fma_rows, M, 0, n0, n1, K, x, ldx, NULL, w, ldw, NULL, y, ldy)
    }
  }
  return 0;
}

/* Columns [n0, n1) of y (M, N) = x (M, K) by an input-major float32 weight wt (K, N) of
 * row stride ldw: each input's N weights lie together, the transposed layout torch's
 * matmul reads faster at a few rows (ds_model.layout). KB inputs' weight rows are read at
 * once, KB streams, so each output vector is loaded and stored once per KB inputs: in a
 * one-off C timing loop over V3 and llama layer shapes (EPYC-512, one row, weights from
 * memory) KB = 16 read 17-25 GB/s, 8 15-23, and 256 outputs at a time down every input
 * (the outputs kept in registers, the weight read in strided blocks) 9-13. Each output
 * sums its inputs in order, whatever rows share the call. */
#define KB 16
#define COLS_PER_TASK 256
static inline __attribute__((always_inline)) void fma_cols(
    const int M, int64_t n0, int64_t n1, int64_t K, const float *x, int64_t ldx,
    const float *wt, int64_t ldw, float *y, int64_t ldy) {
  const int64_t whole = n0 + (n1 - n0) / FSTEP * FSTEP;
  for (int m = 0; m < M; m++)
    for (int64_t n = n0; n < n1; n++) y[m * ldy + n] = 0.0f;
  int64_t k0 = 0;
  for (; k0 + KB <= K; k0 += KB) {
    const float *rows = wt + k0 * ldw;
    for (int64_t n = n0; n < whole; n += FSTEP) {
      vf w[KB];
      for (int j = 0; j < KB; j++) w[j] = load_f(rows + j * ldw + n);
      for (int m = 0; m < M; m++) {
        const float *xm = x + m * ldx + k0;
        vf acc = load_f(y + m * ldy + n);
        for (int j = 0; j < KB; j++) acc = fmadd_s(w[j], xm[j], acc);
        store_f(y + m * ldy + n, acc);
      }
    }
    for (int64_t n = whole; n < n1; n++)
      for (int m = 0; m < M; m++) {
        float sum = y[m * ldy + n];
        for (int j = 0; j < KB; j++) sum += rows[j * ldw + n] * x[m * ldx + k0 + j];
        y[m * ldy + n] = sum;
      }
  }
  for (; k0 < K; k0++)
    for (int m = 0; m < M; m++)
      for (int64_t n = n0; n < n1; n++) y[m * ldy + n] += wt[k0 * ldw + n] * x[m * ldx + k0];
}

int ds_fp32_gemv_t(int64_t M, int64_t N, int64_t K, const float *x, int64_t ldx,
                   const float *wt, int64_t ldw, float *y, int64_t ldy, int threads) {
  if (M < 1 || M > MAX_ROWS || N < 0 || K < 1 || ldw < N || ldx < K || ldy < N) return -1;
  const int64_t tasks = (N + COLS_PER_TASK - 1) / COLS_PER_TASK;
  const int nt = threads < 1 ? 1 : (tasks < threads ? (int)tasks : threads);
  if (nt <= 1) {
    SPECIALIZE(fma_cols, M, 0, N, K, x, ldx, wt, ldw, y, ldy)
  } else {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n0 = 0; n0 < N; n0 += COLS_PER_TASK) {
      const int64_t n1 = n0 + COLS_PER_TASK < N ? n0 + COLS_PER_TASK : N;
      SPECIALIZE(fma_cols, M, n0, n1, K, x, ldx, wt, ldw, y, ldy)
    }
  }
  return 0;
}

#else /* no vector path: the Python side keeps torch's ops */

int ds_bf16_gemv(int64_t M, int64_t N, int64_t K, const uint16_t *x, int64_t ldx,
                 const uint16_t *w, int64_t ldw, uint16_t *y, int64_t ldy, int threads) {
  return -3;
}

int ds_bf16_max_rows(void) { return 0; }

int ds_fp32_gemv(int64_t M, int64_t N, int64_t K, const float *x, int64_t ldx, const float *w,
                 int64_t ldw, float *y, int64_t ldy, int threads) {
  return -3;
}

int ds_fp32_max_rows(void) { return 0; }

int ds_fp32_gemv_t(int64_t M, int64_t N, int64_t K, const float *x, int64_t ldx,
                   const float *wt, int64_t ldw, float *y, int64_t ldy, int threads) {
  return -3;
}

int ds_int8_gemv(int64_t M, int64_t N, int64_t K, const float *x, int64_t ldx,
                 const int8_t *w, int64_t ldw, const float *scale, float *y, int64_t ldy,
                 int threads) {
  return -3;
}

int ds_int4_gemv(int64_t M, int64_t N, int64_t K, int64_t group, const float *x, int64_t ldx,
                 const uint8_t *w, int64_t ldw, const float *scale, const float *zero,
                 int64_t lds, float *y, int64_t ldy, int threads) {
  return -3;
}

#endif
