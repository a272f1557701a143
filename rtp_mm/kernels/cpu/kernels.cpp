// CPU kernels for the decode step (AVX2 + FMA + F16C), registered as torch ops in the `rtp_mm_cpu` namespace and
// compiled once per machine by rtp_mm/kernels/cpu/__init__.py. Each has a pure-torch reference with the same
// signature in rtp_mm/kernels (the oracle of tests/test_kernels/test_cpu_kernels.py), and every op checks its inputs
// (the Python wrappers route anything outside these contracts to the reference instead).
//
// Why these: a batch-1 decode step of a small model is ~1,800 aten ops, and on these 2-core machines each costs
// microseconds of dispatch (rms_norm alone ~40 us). The weight GEMVs are memory-bound but torch converts int8 or fp16
// weights to fp32 matrices before multiplying; here they are widened in registers, so DRAM streams the narrow bytes
// once. Work is split over output channels / heads with at::parallel_for (torch's own intra-op pool).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// Eight weights widened to fp32 in registers.
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline float load1(const int8_t* p) { return static_cast<float>(*p); }
inline float load1(const float* p) { return *p; }
inline float load1(const at::Half* p) { return static_cast<float>(*p); }

// dot(w[0:n], x[0:n]) in fp32 with four independent accumulators (FMA latency), 32 weights per iteration.
template <typename W>
inline float dot(const W* w, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(load8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(load8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(load8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += load1(w + i) * x[i];
  return s;
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[0:n] += p * v[0:n]
inline void axpy(float* y, float p, const float* v, int64_t n) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += p * v[i];
}

void check_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
              ": x must be a contiguous float32 [rows, in] tensor");
}

// A 4-row x 2-channel tile: 8 independent FMA chains; per 8 inputs two weight vectors are widened once and four x
// vectors loaded, each used twice (6 loads per 8 FMAs keeps the two FMA ports, not the load ports, the limit).
template <typename W>
inline void tile_4x2(const W* w0, const W* w1, const float* x, int64_t ldx, int64_t n, float* out /* [4][2] */) {
  // Named accumulators, not an array: GCC keeps an array of vectors on the stack and reloads it every iteration.
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
  const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v0 = load8(w0 + i), v1 = load8(w1 + i);
    __m256 xv = _mm256_loadu_ps(x0 + i);
    a00 = _mm256_fmadd_ps(v0, xv, a00);
    a01 = _mm256_fmadd_ps(v1, xv, a01);
    xv = _mm256_loadu_ps(x1 + i);
    a10 = _mm256_fmadd_ps(v0, xv, a10);
    a11 = _mm256_fmadd_ps(v1, xv, a11);
    xv = _mm256_loadu_ps(x2 + i);
    a20 = _mm256_fmadd_ps(v0, xv, a20);
    a21 = _mm256_fmadd_ps(v1, xv, a21);
    xv = _mm256_loadu_ps(x3 + i);
    a30 = _mm256_fmadd_ps(v0, xv, a30);
    a31 = _mm256_fmadd_ps(v1, xv, a31);
  }
  const __m256 acc[8] = {a00, a01, a10, a11, a20, a21, a30, a31};
  for (int r = 0; r < 4; ++r) {
    float s0 = hsum(acc[2 * r]), s1 = hsum(acc[2 * r + 1]);
    for (int64_t j = i; j < n; ++j) {
      s0 += load1(w0 + j) * x[r * ldx + j];
      s1 += load1(w1 + j) * x[r * ldx + j];
    }
    out[2 * r] = s0;
    out[2 * r + 1] = s1;
  }
}

// y[r, o] = (sum_i x[r, i] * w[o, i]) * scale[o] + bias[o]: a weight-only GEMM for a few rows. Each output channel's
// weight row is read from memory once and reused from registers / L1 for every row of x.
template <typename W>
at::Tensor narrow_linear(const at::Tensor& x, const at::Tensor& w, const float* scale,
                         const c10::optional<at::Tensor>& bias) {
  check_rows(x, "rtp_mm_cpu linear");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1), "rtp_mm_cpu linear: weight must be a ",
              "contiguous [out, in] tensor matching x's ", x.size(1), " input features");
  const int64_t rows = x.size(0), in = x.size(1), out = w.size(0);
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "rtp_mm_cpu linear: bias must be float32 [out]");
    bp = bias->data_ptr<float>();
  }
  auto y = at::empty({rows, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const W* wp = w.data_ptr<W>();
  float* yp = y.data_ptr<float>();
  // Pairs of output channels; rows four at a time through tile_4x2, the rest one at a time.
  at::parallel_for(0, (out + 1) / 2, 32, [&](int64_t begin, int64_t end) {
    float acc[8];
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t o = 2 * pair, o1 = std::min(o + 1, out - 1);  // an odd last channel pairs with itself
      const W *w0 = wp + o * in, *w1 = wp + o1 * in;
      const float s0 = scale ? scale[o] : 1.0f, s1 = scale ? scale[o1] : 1.0f;
      const float b0 = bp ? bp[o] : 0.0f, b1 = bp ? bp[o1] : 0.0f;
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) {
        tile_4x2(w0, w1, xp + r * in, in, in, acc);
        for (int k = 0; k < 4; ++k) {
          yp[(r + k) * out + o] = acc[2 * k] * s0 + b0;
          yp[(r + k) * out + o1] = acc[2 * k + 1] * s1 + b1;
        }
      }
      for (; r < rows; ++r) {
        yp[r * out + o] = dot(w0, xp + r * in, in) * s0 + b0;
        yp[r * out + o1] = dot(w1, xp + r * in, in) * s1 + b1;
      }
    }
  });
  return y;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kChar, "rtp_mm_cpu::int8_linear: weight must be int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == w.size(0),
              "rtp_mm_cpu::int8_linear: scale must be float32 [out]");
  return narrow_linear<int8_t>(x, w, scale.data_ptr<float>(), bias);
}

at::Tensor half_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kHalf, "rtp_mm_cpu::half_linear: weight must be float16");
  return narrow_linear<at::Half>(x, w, nullptr, bias);
}

// y = x * rsqrt(mean(x^2) + eps) * weight, per row, in fp32.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rtp_mm_cpu::rms_norm");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == n,
              "rtp_mm_cpu::rms_norm: weight must be float32 [", n, "]");
  auto y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * n;
      float* yr = yp + r * n;
      const float inv = 1.0f / std::sqrt(dot_f32(xr, xr, n) / static_cast<float>(n) + static_cast<float>(eps));
      for (int64_t i = 0; i < n; ++i) yr[i] = xr[i] * inv * wp[i];
    }
  });
  return y;
}

// NeoX rotary over the whole head, in place: x [tokens, heads, dim] (rows of dim contiguous, any token/head
// strides), cos/sin [tokens, 1, dim] as RotaryEmbedding.cos_sin gives them for this layout ([cos | cos] and
// [-sin | sin]): x'[i] = x[i] * cos[i] + x[(i + dim / 2) % dim] * sin[i].
at::Tensor rotary_neox_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.stride(2) == 1,
              "rtp_mm_cpu::rotary_neox_: x must be float32 [tokens, heads, dim] with contiguous rows");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  TORCH_CHECK(dim % 2 == 0 && cos.is_contiguous() && sin.is_contiguous() && cos.numel() == tokens * dim &&
                  sin.numel() == tokens * dim && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rtp_mm_cpu::rotary_neox_: cos/sin must be contiguous float32 [tokens, 1, ", dim, "]");
  float* xp = x.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const int64_t st = x.stride(0), sh = x.stride(1);
  at::parallel_for(0, tokens * heads, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(dim);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t t = j / heads, h = j % heads;
      float* xr = xp + t * st + h * sh;
      const float *c = cp + t * dim, *s = sp + t * dim;
      std::copy(xr, xr + dim, row.begin());
      for (int64_t i = 0; i < dim; ++i) xr[i] = row[i] * c[i] + row[(i + half) % dim] * s[i];
    }
  });
  return x;
}

// act(gate) * up for x = [gate | up] [rows, 2 * inter] with act = silu.
at::Tensor silu_mul(const at::Tensor& x) {
  check_rows(x, "rtp_mm_cpu::silu_mul");
  const int64_t rows = x.size(0), inter = x.size(1) / 2;
  auto y = at::empty({rows, inter}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows * inter, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t r = j / inter, i = j % inter;
      const float g = xp[r * 2 * inter + i];
      yp[j] = g / (1.0f + std::exp(-g)) * xp[r * 2 * inter + inter + i];
    }
  });
  return y;
}

// One query per sequence over its paged context, read in place through the block table (no gather):
// q [B, H, D], caches [blocks, block_size, KVH, D] float32, block_tables [B, max_blocks] int64, context_lens [B]
// int64 (keys [first_key, len) are visible), alibi [H] float32 or empty: score += slope * (key_pos - (len - 1)).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                            int64_t first_key, const c10::optional<at::Tensor>& alibi) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.stride(2) == 1,
              "rtp_mm_cpu::decode_attention: q must be float32 [B, H, D] with contiguous rows");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kFloat &&
                  v_cache.is_contiguous(),
              "rtp_mm_cpu::decode_attention: caches must be contiguous float32 [blocks, block_size, KVH, D]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % KVH == 0, "rtp_mm_cpu::decode_attention: ", H, " heads of dim ", D,
              " do not match the cache's ", KVH, " kv heads of dim ", k_cache.size(3));
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() && block_tables.dim() == 2 &&
                  block_tables.size(0) == B && context_lens.scalar_type() == at::kLong &&
                  context_lens.is_contiguous() && context_lens.numel() == B,
              "rtp_mm_cpu::decode_attention: block_tables [B, max_blocks] and context_lens [B] must be int64");
  const float* slopes = nullptr;
  if (alibi.has_value()) {
    TORCH_CHECK(alibi->scalar_type() == at::kFloat && alibi->is_contiguous() && alibi->numel() == H,
                "rtp_mm_cpu::decode_attention: alibi slopes must be float32 [H]");
    slopes = alibi->data_ptr<float>();
  }
  const int64_t max_blocks = block_tables.size(1), group = H / KVH;
  const int64_t *bt = block_tables.data_ptr<int64_t>(), *lens = context_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] > first_key && lens[b] <= max_blocks * block_size,
                "rtp_mm_cpu::decode_attention: context length ", lens[b], " outside (", first_key, ", ",
                max_blocks * block_size, "]");
  auto out = at::empty({B, H, D}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t token_stride = KVH * D, block_stride = block_size * token_stride;
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t j = begin; j < end; ++j) {
      const int64_t b = j / H, h = j % H, kvh = h / group, len = lens[b];
      const float* qr = qp + b * q.stride(0) + h * q.stride(1);
      const int64_t* table = bt + b * max_blocks;
      scores.assign(len - first_key, 0.0f);
      float best = -INFINITY;
      for (int64_t t = first_key; t < len; ++t) {
        const float* kr = kp + table[t / block_size] * block_stride + (t % block_size) * token_stride + kvh * D;
        float s = dot_f32(qr, kr, D) * fscale;
        if (slopes) s += slopes[h] * static_cast<float>(t - (len - 1));
        scores[t - first_key] = s;
        best = std::max(best, s);
      }
      float total = 0.0f;
      for (float& s : scores) total += (s = std::exp(s - best));
      float* orow = op + (b * H + h) * D;
      std::fill(orow, orow + D, 0.0f);
      for (int64_t t = first_key; t < len; ++t) {
        const float* vr = vp + table[t / block_size] * block_stride + (t % block_size) * token_stride + kvh * D;
        axpy(orow, scores[t - first_key] / total, vr, D);
      }
    }
  });
  return out;
}


// The weight-only linear of one projection: int8 (with a per-channel scale), float16 or float32 weights.
at::Tensor project(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& bias) {
  const c10::optional<at::Tensor> b = bias.numel() ? c10::optional<at::Tensor>(bias) : c10::nullopt;
  switch (w.scalar_type()) {
    case at::kChar:
      return int8_linear(x, w, scale, b);
    case at::kHalf:
      return half_linear(x, w, b);
    case at::kFloat:
      return narrow_linear<float>(x, w, nullptr, b);
    default:
      TORCH_CHECK(false, "rtp_mm_cpu::decode_layers: unsupported weight dtype ", w.scalar_type());
  }
}

// Every layer of a plain pre-norm decoder (RMSNorm, fused q/k/v, NeoX rotary over the whole head, gated silu MLP)
// for a step of decodes only, in one call: the Python module tree costs ~200 us per layer in dispatch on these
// machines, more than the layer's maths at batch 1. ``weights`` holds LAYER_FIELDS tensors per layer, in the order of
// llm/models/cpu_layers.py (absent scales and biases are empty tensors); each step's K/V are written at ``slot_mapping``
// before attending, as KVCache.write does. Returns the residual stream after the last layer.
constexpr int64_t LAYER_FIELDS = 14;

at::Tensor decode_layers(const at::Tensor& hidden, at::TensorList weights, at::TensorList k_caches,
                         at::TensorList v_caches, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                         const at::Tensor& context_lens, int64_t num_heads, int64_t num_kv_heads, double scale,
                         double eps, int64_t first_key) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * LAYER_FIELDS &&
                  static_cast<int64_t>(v_caches.size()) == layers,
              "rtp_mm_cpu::decode_layers: ", LAYER_FIELDS, " weights and one K and V cache per layer");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == hidden.size(0),
              "rtp_mm_cpu::decode_layers: slot_mapping must be int64 [tokens]");
  const int64_t tokens = hidden.size(0), head_dim = k_caches[0].size(3), heads = num_heads + 2 * num_kv_heads;
  const int64_t kv_row = num_kv_heads * head_dim;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  at::Tensor x = hidden.contiguous().clone();
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = weights.data() + l * LAYER_FIELDS;
    const at::Tensor &kc = k_caches[l], &vc = v_caches[l];
    TORCH_CHECK(kc.scalar_type() == at::kFloat && kc.is_contiguous() && vc.is_contiguous() &&
                    kc.size(2) == num_kv_heads && kc.size(3) == head_dim,
                "rtp_mm_cpu::decode_layers: layer ", l, "'s cache must be contiguous float32 with ", num_kv_heads,
                " kv heads of dim ", head_dim);
    at::Tensor qkv = project(rms_norm(x, w[0], eps), w[1], w[2], w[3]).view({tokens, heads, head_dim});
    rotary_neox_(qkv.narrow(1, 0, num_heads + num_kv_heads), cos, sin);
    const float* qkvp = qkv.data_ptr<float>();
    float *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
    for (int64_t t = 0; t < tokens; ++t) {
      const float* row = qkvp + t * heads * head_dim + num_heads * head_dim;
      std::copy(row, row + kv_row, kp + slots[t] * kv_row);
      std::copy(row + kv_row, row + 2 * kv_row, vp + slots[t] * kv_row);
    }
    at::Tensor attn = decode_attention(qkv.narrow(1, 0, num_heads), kc, vc, block_tables, context_lens, scale,
                                       first_key, c10::nullopt);
    x.add_(project(attn.view({tokens, num_heads * head_dim}), w[4], w[5], w[6]));
    at::Tensor gate_up = project(rms_norm(x, w[7], eps), w[8], w[9], w[10]);
    x.add_(project(silu_mul(gate_up), w[11], w[12], w[13]));
  }
  return x;
}

}  // namespace

TORCH_LIBRARY(rtp_mm_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
  m.def("half_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary_neox_(Tensor(a!) x, Tensor cos, Tensor sin) -> Tensor(a!)");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
      "float scale, int first_key, Tensor? alibi) -> Tensor");
  m.def(
      "decode_layers(Tensor hidden, Tensor[] weights, Tensor[] k_caches, Tensor[] v_caches, Tensor cos, Tensor sin, "
      "Tensor slot_mapping, Tensor block_tables, Tensor context_lens, int num_heads, int num_kv_heads, float scale, "
      "float eps, int first_key) -> Tensor");
}

TORCH_LIBRARY_IMPL(rtp_mm_cpu, CPU, m) {
  m.impl("int8_linear", int8_linear);
  m.impl("half_linear", half_linear);
  m.impl("rms_norm", rms_norm);
  m.impl("rotary_neox_", rotary_neox_);
  m.impl("silu_mul", silu_mul);
  m.impl("decode_attention", decode_attention);
  m.impl("decode_layers", decode_layers);
}
