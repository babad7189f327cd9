// The CPU kernels of the ds_quant::*_gemv_cpu ops (schemas and fake kernels in
// cpu_gemv.py), registered with torch's dispatcher from C++: a small decode layer's
// call costs about 5.5 us inside a compiled graph and 10 us eagerly, when its weights
// take 4-20 us to read; the same kernel through ctypes, its ops' kernels in Python, made
// compiled V3 INT8 / INT4 decode 1.1-1.4x slower (docs/benchmarks.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "cpu_gemv.c"

namespace {

// The stride between rows along dim of a tensor whose last dimension is its rows' unit-
// stride elements. A size-1 dimension's stride can be anything (compiled graphs pass
// such views); the kernel is given a row's length there.
int64_t row_stride(const at::Tensor& t, int64_t dim = 0) {
  return t.size(dim) == 1 ? t.size(-1) : t.stride(dim);
}

// x as (rows, features) float32 with unit inner stride, copied only when it is not.
at::Tensor float_rows(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat && x.stride(1) == 1 && row_stride(x) >= x.size(1)) return x;
  return x.to(at::kFloat).contiguous();
}

at::Tensor floats(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

void check_x(const at::Tensor& x, int64_t features, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == features,
              op, ": x must be a 2-D CPU tensor (rows, ", features, "), got ", x.sizes(),
              " on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
}

void check_code(int code, const char* op) {
  TORCH_CHECK(code == 0, op, ": the kernel ",
              code == -2   ? "could not allocate its activation buffer"
              : code == -3 ? "was built without AVX2 or AVX512BW"
                           : "refused its sizes or strides",
              " (code ", code, ")");
}

// y (rows, N) float32 = x (rows, K) by the INT8 weight rows w (N, K) of stride ldw.
void int8_into(const at::Tensor& x, const int8_t* w, int64_t N, int64_t ldw,
               const float* scale, float* y, int64_t ldy) {
  const int64_t K = x.size(1);
  const float* xp = x.data_ptr<float>();
  for (int64_t m0 = 0; m0 < x.size(0); m0 += MAX_ROWS) {
    const int64_t rows = std::min<int64_t>(MAX_ROWS, x.size(0) - m0);
    check_code(ds_int8_gemv(rows, N, K, xp + m0 * row_stride(x), row_stride(x), w, ldw, scale,
                            y + m0 * ldy, ldy, at::get_num_threads()),
               "ds_quant::int8_gemv_cpu");
  }
}

void int4_into(const at::Tensor& x, const uint8_t* w, int64_t N, int64_t ldw,
               const float* scale, const float* zero, int64_t lds, int64_t group, float* y,
               int64_t ldy) {
  const int64_t K = x.size(1);
  const float* xp = x.data_ptr<float>();
  for (int64_t m0 = 0; m0 < x.size(0); m0 += MAX_ROWS) {
    const int64_t rows = std::min<int64_t>(MAX_ROWS, x.size(0) - m0);
    check_code(ds_int4_gemv(rows, N, K, group, xp + m0 * row_stride(x), row_stride(x), w, ldw,
                            scale, zero, lds, y + m0 * ldy, ldy, at::get_num_threads()),
               "ds_quant::int4_gemv_cpu");
  }
}

void check_int8(const at::Tensor& q, const at::Tensor& scale, int64_t dims, const char* op) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kChar && q.dim() == dims &&
                  q.stride(-1) == 1,
              op, ": q must be a ", dims, "-D int8 CPU tensor with unit inner stride, got ",
              q.scalar_type(), " ", q.sizes(), " on ", q.device());
  TORCH_CHECK(q.size(-1) > 0, op, ": q must have at least one input column, got ", q.sizes());
  const auto rows = q.sizes().slice(0, dims - 1);
  TORCH_CHECK(scale.sizes() == rows, op, ": scale must be ", rows,
              " (one value per weight row), got ", scale.sizes());
}

// Packed INT4 (..., N, padded / 2) with scale and zero (..., N, groups).
void check_int4(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                int64_t features, int64_t group, int64_t dims, const char* op) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte &&
                  packed.dim() == dims && packed.stride(-1) == 1,
              op, ": packed must be a ", dims, "-D uint8 CPU tensor with unit inner stride, ",
              "got ", packed.scalar_type(), " ", packed.sizes(), " on ", packed.device());
  TORCH_CHECK(group > 0 && group % (2 * STEP) == 0 && group <= MAX_GROUP, op,
              ": group_size must be a multiple of ", 2 * STEP, " up to ", MAX_GROUP, ", got ",
              group);
  const int64_t groups = (features + group - 1) / group;
  TORCH_CHECK(packed.size(-1) == groups * group / 2, op, ": packed holds ",
              packed.size(-1) * 2, " inputs a row, x has ", features, " (groups of ", group,
              ")");
  auto expected = packed.sizes().vec();
  expected.back() = groups;
  TORCH_CHECK(scale.sizes().vec() == expected && zero.sizes().vec() == expected, op,
              ": scale and zero must be ", at::IntArrayRef(expected), ", got ", scale.sizes(),
              " and ", zero.sizes());
}

at::Tensor in_dtype(const at::Tensor& y, const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor int8_gemv_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  const char* op = "ds_quant::int8_gemv_cpu";
  check_int8(q, scale, 2, op);
  check_x(x, q.size(1), op);
  const auto x32 = float_rows(x), s32 = floats(scale);
  auto y = at::empty({x.size(0), q.size(0)}, x.options().dtype(at::kFloat));
  if (y.numel() > 0)
    int8_into(x32, q.data_ptr<int8_t>(), q.size(0), row_stride(q), s32.data_ptr<float>(),
              y.data_ptr<float>(), y.stride(0));
  return in_dtype(y, x);
}

at::Tensor int4_gemv_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                         const at::Tensor& zero, int64_t group) {
  const char* op = "ds_quant::int4_gemv_cpu";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D, got ", x.sizes());
  check_int4(packed, scale, zero, x.size(1), group, 2, op);
  check_x(x, x.size(1), op);
  const auto x32 = float_rows(x), s32 = floats(scale), z32 = floats(zero);
  auto y = at::empty({x.size(0), packed.size(0)}, x.options().dtype(at::kFloat));
  if (y.numel() > 0)
    int4_into(x32, packed.data_ptr<uint8_t>(), packed.size(0), row_stride(packed),
              s32.data_ptr<float>(), z32.data_ptr<float>(), s32.size(1), group,
              y.data_ptr<float>(), y.stride(0));
  return in_dtype(y, x);
}

// The chosen expert of each result row, checked against the stack's size: a bad index
// must not read outside the weights.
at::Tensor expert_indices(const at::Tensor& experts, int64_t stack, int64_t rows,
                          const char* op) {
  TORCH_CHECK(experts.dim() == 1 && !at::isFloatingType(experts.scalar_type()), op,
              ": experts must be a 1-D integer tensor, got ", experts.scalar_type(), " ",
              experts.sizes());
  TORCH_CHECK(rows == 1 || rows == experts.size(0), op, ": x must have one row or one per ",
              "expert (", experts.size(0), "), got ", rows);
  auto index = experts.to(at::kCPU, at::kLong).contiguous();
  const int64_t* e = index.data_ptr<int64_t>();
  for (int64_t r = 0; r < index.numel(); r++)
    TORCH_CHECK(e[r] >= 0 && e[r] < stack, op, ": experts[", r, "] = ", e[r],
                " is outside the stack of ", stack);
  return index;
}

at::Tensor int8_experts_gemv_cpu(const at::Tensor& x, const at::Tensor& q,
                                 const at::Tensor& scale, const at::Tensor& experts) {
  const char* op = "ds_quant::int8_experts_gemv_cpu";
  check_int8(q, scale, 3, op);
  check_x(x, q.size(2), op);
  const auto index = expert_indices(experts, q.size(0), x.size(0), op);
  const auto x32 = float_rows(x), s32 = floats(scale);
  const int64_t N = q.size(1);
  auto y = at::empty({index.size(0), N}, x.options().dtype(at::kFloat));
  const int64_t* e = index.data_ptr<int64_t>();
  for (int64_t r = 0; r < index.size(0) && N > 0; r++) {
    const auto row = x.size(0) == 1 ? x32 : x32.narrow(0, r, 1);
    int8_into(row, q.data_ptr<int8_t>() + e[r] * q.stride(0), N, row_stride(q, 1),
              s32.data_ptr<float>() + e[r] * N, y.data_ptr<float>() + r * N, N);
  }
  return in_dtype(y, x);
}

at::Tensor int4_experts_gemv_cpu(const at::Tensor& x, const at::Tensor& packed,
                                 const at::Tensor& scale, const at::Tensor& zero,
                                 const at::Tensor& experts, int64_t group) {
  const char* op = "ds_quant::int4_experts_gemv_cpu";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D, got ", x.sizes());
  check_int4(packed, scale, zero, x.size(1), group, 3, op);
  check_x(x, x.size(1), op);
  const auto index = expert_indices(experts, packed.size(0), x.size(0), op);
  const auto x32 = float_rows(x), s32 = floats(scale), z32 = floats(zero);
  const int64_t N = packed.size(1), groups = s32.size(2);
  auto y = at::empty({index.size(0), N}, x.options().dtype(at::kFloat));
  const int64_t* e = index.data_ptr<int64_t>();
  for (int64_t r = 0; r < index.size(0) && N > 0; r++) {
    const auto row = x.size(0) == 1 ? x32 : x32.narrow(0, r, 1);
    int4_into(row, packed.data_ptr<uint8_t>() + e[r] * packed.stride(0), N, row_stride(packed, 1),
              s32.data_ptr<float>() + e[r] * N * groups, z32.data_ptr<float>() + e[r] * N * groups,
              groups, group, y.data_ptr<float>() + r * N, N);
  }
  return in_dtype(y, x);
}

// y (rows, N) bfloat16 = x (rows, K) bfloat16 by the bfloat16 weight w (N, K), summed in
// float32.
// x (..., K) by w (N, K), both of dtype (bits type Bits), through kernel(rows, N, K, x,
// ldx, w, ldw, y, ldy, threads) in passes of MAX_ROWS rows -> (..., N) of that dtype.
// ``input_major``: w is the (N, K) view of a (K, N) matrix (strides (1, ldw)), and
// kernel takes that matrix, its row stride ldw.
template <typename Bits, typename Kernel>
at::Tensor float_gemv(const at::Tensor& x_in, const at::Tensor& w, at::ScalarType dtype,
                      const char* name, const char* op, Kernel kernel, bool input_major = false) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == dtype && w.dim() == 2 &&
                  w.stride(input_major ? 0 : 1) == 1 && w.size(1) > 0,
              op, ": w must be a 2-D ", name, " CPU tensor with unit inner stride",
              dtype == at::kFloat ? " (or unit stride along its outputs)" : "",
              " and at least one input column, got ", w.scalar_type(), " ", w.sizes(),
              " with strides ", w.strides(), " on ", w.device());
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == dtype && x_in.dim() >= 1 &&
                  x_in.size(-1) == w.size(1),
              op, ": x must be a ", name, " CPU tensor (..., ", w.size(1), "), got ",
              x_in.scalar_type(), " ", x_in.sizes(), " on ", x_in.device());
  // Leading dimensions are flattened here rather than by the caller: an eager decode
  // layer's (batch, 1, in) input would otherwise pay two Python-side views a call.
  const auto x = x_in.dim() == 2 ? x_in : x_in.reshape({-1, w.size(1)});
  const auto xc = x.stride(1) == 1 && row_stride(x) >= x.size(1) ? x : x.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto out_sizes = x_in.sizes().vec();
  out_sizes.back() = N;
  auto y = at::empty(out_sizes, x_in.options());
  if (y.numel() == 0) return y;
  const auto* xp = static_cast<const Bits*>(xc.data_ptr());
  const auto* wp = static_cast<const Bits*>(w.data_ptr());
  auto* yp = static_cast<Bits*>(y.data_ptr());
  for (int64_t m0 = 0; m0 < x.size(0); m0 += MAX_ROWS) {
    const int64_t rows = std::min<int64_t>(MAX_ROWS, x.size(0) - m0);
    // An input-major weight's (K, N) matrix: its row stride is w.stride(1), or N for a
    // single input (a size-1 dimension's stride can be anything).
    const int64_t ldw = !input_major ? row_stride(w) : K == 1 ? N : w.stride(1);
    check_code(kernel(rows, N, K, xp + m0 * row_stride(xc), row_stride(xc), wp, ldw,
                      yp + m0 * N, N, at::get_num_threads()),
               op);
  }
  return y;
}

at::Tensor bf16_gemv_cpu(const at::Tensor& x, const at::Tensor& w) {
  return float_gemv<uint16_t>(x, w, at::kBFloat16, "bfloat16", "ds_quant::bf16_gemv_cpu",
                              ds_bf16_gemv);
}

at::Tensor fp32_gemv_cpu(const at::Tensor& x, const at::Tensor& w) {
  // A weight laid input-major (ds_model.layout re-lays float32 layers so for torch's
  // few-row matmul) is read in that layout rather than copied back.
  const bool input_major = w.dim() == 2 && w.stride(1) != 1 && w.stride(0) == 1;
  if (input_major)
    return float_gemv<float>(x, w, at::kFloat, "float32", "ds_quant::fp32_gemv_cpu",
                             ds_fp32_gemv_t, true);
  return float_gemv<float>(x, w, at::kFloat, "float32", "ds_quant::fp32_gemv_cpu", ds_fp32_gemv);
}

// y = x / rms(x) * w over the last dimension, in one pass over each row: torch's CPU
// rms_norm runs six ops (about 11 us a call at any width, 30 inside an eager decode step
// of the built-in model, EPYC-512), each row here is one read and one write.
// Arithmetic as ds_model.norm.RMSNorm's: the mean of squares in float32, then
// (x * rsqrt(mean + eps)) * w in float32; 16-bit rows round x * rsqrt to their dtype
// before the weight's product, which rounds again.
template <typename T>
void rms_rows(const T* x, int64_t ldx, const T* w, T* y, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ldx;
    T* yr = y + r * n;
    float lanes[16] = {};  // sixteen running sums: the loop vectorizes without reordering flags
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      for (int j = 0; j < 16; ++j) {
        const float v = static_cast<float>(xr[i + j]);
        lanes[j] += v * v;
      }
    float sum = 0.f;
    for (int j = 0; j < 16; ++j) sum += lanes[j];
    for (; i < n; ++i) {
      const float v = static_cast<float>(xr[i]);
      sum += v * v;
    }
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
    if constexpr (std::is_same_v<T, float>) {
      for (i = 0; i < n; ++i) yr[i] = xr[i] * inv * w[i];
    } else {
      for (i = 0; i < n; ++i) {
        const T h = static_cast<T>(static_cast<float>(xr[i]) * inv);
        yr[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(h));
      }
    }
  }
}

at::Tensor rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& w, double eps) {
  const char* op = "ds_quant::rms_norm_cpu";
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() >= 1 &&
                  (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              op, ": x must be a float32 or bfloat16 CPU tensor (..., dim), got ",
              x_in.scalar_type(), " ", x_in.sizes(), " on ", x_in.device());
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == x_in.scalar_type() && w.dim() == 1 &&
                  w.size(0) == x_in.size(-1) && w.size(0) > 0 && w.is_contiguous(),
              op, ": weight must be a contiguous 1-D ", x_in.scalar_type(), " CPU tensor of ",
              x_in.size(-1), " elements (x's last dimension, at least 1), got ",
              w.scalar_type(), " ", w.sizes(), " on ", w.device());
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const int64_t n = w.size(0);
  const auto x = x_in.reshape({-1, n});
  const auto xc = x.stride(1) == 1 && row_stride(x) >= n ? x : x.contiguous();
  auto y = at::empty(x_in.sizes(), x_in.options());
  if (y.numel() == 0) return y;
  if (x_in.scalar_type() == at::kFloat)
    rms_rows<float>(xc.data_ptr<float>(), row_stride(xc), w.data_ptr<float>(),
                    y.data_ptr<float>(), xc.size(0), n, static_cast<float>(eps));
  else
    rms_rows<at::BFloat16>(xc.data_ptr<at::BFloat16>(), row_stride(xc),
                           w.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), xc.size(0), n,
                           static_cast<float>(eps));
  return y;
}

int64_t cpu_gemv_isa() { return ISA; }
int64_t cpu_gemv_bf16_rows() { return ds_bf16_max_rows(); }
int64_t cpu_gemv_fp32_rows() { return ds_fp32_max_rows(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(ds_quant, m) {
  // 0: built without a vector path (the ops refuse); 1: AVX2; 2: AVX512BW; 3: + VNNI.
  m.def("cpu_gemv_isa() -> int", &cpu_gemv_isa);
  // The most rows layers hand bf16_gemv_cpu (4 with AVX512-BF16, else 1).
  m.def("cpu_gemv_bf16_rows() -> int", &cpu_gemv_bf16_rows);
  // The most rows layers hand fp32_gemv_cpu (0 without a vector path).
  m.def("cpu_gemv_fp32_rows() -> int", &cpu_gemv_fp32_rows);
}

TORCH_LIBRARY_IMPL(ds_quant, CPU, m) {
  m.impl("int8_gemv_cpu", &int8_gemv_cpu);
  m.impl("int4_gemv_cpu", &int4_gemv_cpu);
  m.impl("int8_experts_gemv_cpu", &int8_experts_gemv_cpu);
  m.impl("int4_experts_gemv_cpu", &int4_experts_gemv_cpu);
  m.impl("bf16_gemv_cpu", &bf16_gemv_cpu);
  m.impl("fp32_gemv_cpu", &fp32_gemv_cpu);
  m.impl("rms_norm_cpu", &rms_norm_cpu);
}
