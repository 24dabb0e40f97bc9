// One ImageGPT decode step on the CPU in float32: a new token per row, at position `pos`, through every
// block, to next-token logits. The same arithmetic as decode_step in igpt_core/generation.py (weights
// folded the same way, see decode_weights there), built by igpt_core/native.py on first use.
//
// Why C++: in PyTorch eager a decode step is ~100 small kernels over (B, C) rows, and their dispatch cost
// more than their arithmetic (0.7 ms of fixed cost per step at the tiny preset). Here the norms, cache
// writes and attention are plain loops and the matrix products stay ATen's (MKL).
//
// Where the time goes: a step reads every weight once and, per row, the whole KV cache; both are memory
// reads (a few rows share each weight, and each cached key or value is used once). So the intra-op
// threads split the work by what they read: each matrix product by output columns (every thread reads
// its own columns of the weights, for all rows at once), attention by (row, head) pairs (every thread
// reads its own pairs' cache). Splitting by rows instead made every thread read every weight: at
// 2 layers, d=256, batch 2 that was 6.8 MB per thread per step, half of the step at R=64.
//
// Shapes: B rows, C = n_embd, H heads, D = C / H, T = cache length, L blocks.
//   keys (L, B, H, ceil(T / 64), D, 64): keys in tiles of 64 positions, each tile transposed, so a query's
//     64 scores over a tile come from one contiguous 64 * D read, D multiply-adds of 64 lanes each;
//   values (L, B, H, T, D); weights: 8 per block, matrices transposed to (in, out):
//   w_qkv (C, 3C), b_qkv, w_att (C, C), b_att, w_fc (C, n_inner), b_fc, w_out (n_inner, C), b_out.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kTile = 64;  // positions per key tile

// out = x / sqrt(mean(x^2) + eps), row by row: iGPT's norm without its weight (folded into the next matrix).
void norm_rows(const float* x, float* out, int64_t rows, int64_t C, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * C;
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < C; ++c) squares += row[c] * row[c];
    const float rstd = 1.f / std::sqrt(squares / static_cast<float>(C) + eps);
    float* dst = out + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) dst[c] = row[c] * rstd;
  }
}

// For each (row, head) pair in [pair0, pair1) (pair = row * H + head): store the new key and value at `pos`,
// then scores[j] = q . k_j / sqrt(D) for j <= pos, a tile of 64 positions at a time (the last tile's
// entries past `pos` are computed, not kept). qkv is (B, 3C), scores (B * H, pos + 1).
void store_and_score(const float* qkv, float* keys, float* values, float* scores, int64_t pair0,
                     int64_t pair1, int64_t H, int64_t D, int64_t T, int64_t pos) {
  const int64_t C = H * D, t = pos + 1, tiles = (T + kTile - 1) / kTile;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  for (int64_t pair = pair0; pair < pair1; ++pair) {
    const int64_t r = pair / H, h = pair % H;
    const float* q = qkv + r * 3 * C + h * D;
    const float* k = q + C;
    const float* v = q + 2 * C;
    float* kh = keys + pair * tiles * D * kTile;
    float* vh = values + pair * T * D;
    float* tile_of_pos = kh + (pos / kTile) * D * kTile + pos % kTile;
    for (int64_t d = 0; d < D; ++d) tile_of_pos[d * kTile] = k[d];
    for (int64_t d = 0; d < D; ++d) vh[pos * D + d] = v[d];
    float* s = scores + pair * t;
    for (int64_t j0 = 0; j0 < t; j0 += kTile) {
      const float* tile = kh + (j0 / kTile) * D * kTile;
      float acc[kTile] = {};
      for (int64_t d = 0; d < D; ++d) {
        const float qd = q[d] * scale;
        const float* kd = tile + d * kTile;
#pragma omp simd
        for (int64_t w = 0; w < kTile; ++w) acc[w] += qd * kd[w];
      }
      const int64_t n = std::min(kTile, t - j0);
      for (int64_t w = 0; w < n; ++w) s[j0 + w] = acc[w];
    }
  }
}

// out[0:W] = sum_j p[j] v_j[0:W] over t rows of stride `stride`. Four rows per iteration into four sets of
// accumulators (W / 16 vector registers each), so consecutive multiply-adds do not wait on each other.
template <int W>
void mix_columns(const float* p, const float* v, int64_t stride, int64_t t, float* out) {
  float a0[W] = {}, a1[W] = {}, a2[W] = {}, a3[W] = {};
  int64_t j = 0;
  for (; j + 4 <= t; j += 4) {
    const float *v0 = v + j * stride, *v1 = v0 + stride, *v2 = v1 + stride, *v3 = v2 + stride;
    const float p0 = p[j], p1 = p[j + 1], p2 = p[j + 2], p3 = p[j + 3];
#pragma omp simd
    for (int w = 0; w < W; ++w) {
      a0[w] += p0 * v0[w];
      a1[w] += p1 * v1[w];
      a2[w] += p2 * v2[w];
      a3[w] += p3 * v3[w];
    }
  }
  for (; j < t; ++j) {
    const float pj = p[j];
    const float* vj = v + j * stride;
#pragma omp simd
    for (int w = 0; w < W; ++w) a0[w] += pj * vj[w];
  }
#pragma omp simd
  for (int w = 0; w < W; ++w) out[w] = (a0[w] + a1[w]) + (a2[w] + a3[w]);
}

// y[row, head] = sum_j p[j] v_j over the softmax-ed scores, for the pairs in [pair0, pair1); heads side by
// side in y (B, C). Columns go in blocks of 32 (then 16); a head size that is not a multiple of 16 takes the
// plain loop.
void mix_values(const float* probs, const float* values, float* y, int64_t pair0, int64_t pair1, int64_t H,
                int64_t D, int64_t T, int64_t pos) {
  const int64_t t = pos + 1;
  for (int64_t pair = pair0; pair < pair1; ++pair) {
    const float* p = probs + pair * t;
    const float* vh = values + pair * T * D;
    float* out = y + pair * D;  // (row, head) -> row * C + head * D
    if (D % 16 == 0) {
      int64_t d = 0;
      for (; d + 32 <= D; d += 32) mix_columns<32>(p, vh + d, D, t, out + d);
      if (d < D) mix_columns<16>(p, vh + d, D, t, out + d);
      continue;
    }
    float acc[kMaxHeadDim] = {};
    for (int64_t j = 0; j < t; ++j) {
      const float pj = p[j];
      const float* vj = vh + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += pj * vj[d];
    }
    for (int64_t d = 0; d < D; ++d) out[d] = acc[d];
  }
}

// What a column-split matrix product does with its columns of in @ w (+ bias): write them, add them to the
// output (a residual), or write their silu (the MLP's hidden layer, quick-gelu's 1.702 folded in).
enum class Into { kWrite, kAdd, kSilu };

constexpr int64_t kColumnGrain = 64;  // columns per thread at least: 256 bytes of each weight row

// out (B, N) = in (B, K) @ w (K, N) + bias (N), or out += it, or silu of it, with the intra-op threads
// splitting the N columns: each reads only its columns of w, for every row at once.
void column_product(const at::Tensor& in, const at::Tensor& w, const at::Tensor* bias, at::Tensor& out,
                    Into into) {
  const int64_t N = w.size(1), B = in.size(0);
  at::parallel_for(0, N, kColumnGrain, [&](int64_t n0, int64_t n1) {
    c10::InferenceMode guard;  // thread-local: the calling thread's mode does not reach pool threads
    const int64_t n = n1 - n0;
    at::Tensor part = bias != nullptr ? at::addmm(bias->narrow(0, n0, n), in, w.narrow(1, n0, n))
                                      : at::mm(in, w.narrow(1, n0, n));  // (B, n), contiguous
    if (into == Into::kSilu) at::silu_(part);
    const float* src = part.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    for (int64_t r = 0; r < B; ++r) {
      float* row = dst + r * N + n0;
      const float* from = src + r * n;
      if (into == Into::kAdd) {
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) row[c] += from[c];
      } else {
        std::copy(from, from + n, row);
      }
    }
  });
}

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, ": expected a float32 CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

}  // namespace

at::Tensor decode_step(const at::Tensor& token, int64_t pos, const at::Tensor& wte, const at::Tensor& wpe,
                       at::Tensor& keys, at::Tensor& values, const std::vector<at::Tensor>& weights,
                       const at::Tensor& head_t, double eps_in) {
  check_float_cpu(wte, "wte");
  check_float_cpu(wpe, "wpe");
  check_float_cpu(keys, "keys");
  check_float_cpu(values, "values");
  check_float_cpu(head_t, "head_t");
  for (const auto& w : weights) check_float_cpu(w, "weights");
  TORCH_CHECK(token.dim() == 1 && token.scalar_type() == at::kLong, "token: expected int64 of shape (B,)");
  TORCH_CHECK(values.dim() == 5, "values: expected (L, B, H, T, D)");
  const int64_t L = values.size(0), B = values.size(1), H = values.size(2), T = values.size(3);
  const int64_t D = values.size(4), C = wte.size(1), tiles = (T + kTile - 1) / kTile;
  TORCH_CHECK(keys.sizes() == at::IntArrayRef({L, B, H, tiles, D, kTile}), "keys: expected (L, B, H, ",
              tiles, ", D, ", kTile, ")");
  TORCH_CHECK(token.size(0) == B && H * D == C && D <= kMaxHeadDim, "decode_step: shapes do not agree");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 8 * L, "weights: expected 8 tensors per block");
  for (int64_t l = 0; l < L; ++l) {  // the loops below index q | k | v and the block's output directly
    TORCH_CHECK(weights[8 * l].sizes() == at::IntArrayRef({C, 3 * C}), "weights: block ", l,
                ": w_qkv must be (C, 3C)");
    TORCH_CHECK(weights[8 * l + 2].sizes() == at::IntArrayRef({C, C}), "weights: block ", l,
                ": w_att must be (C, C)");
  }
  TORCH_CHECK(0 <= pos && pos < T && pos < wpe.size(0), "pos: ", pos, " is outside the cache");

  const float eps = static_cast<float>(eps_in);
  const int64_t t = pos + 1, n_inner = weights[4].size(1);
  at::Tensor x = at::embedding(wte, token).add_(wpe[pos]);  // (B, C): the residual stream
  at::Tensor normed = at::empty_like(x);
  at::Tensor mixed = at::empty_like(x);
  at::Tensor qkv = at::empty({B, 3 * C}, x.options());
  at::Tensor hidden = at::empty({B, n_inner}, x.options());
  at::Tensor scores = at::empty({B * H, t}, x.options());
  at::Tensor logits = at::empty({B, head_t.size(1)}, x.options());
  float *xp = x.data_ptr<float>(), *np = normed.data_ptr<float>(), *yp = mixed.data_ptr<float>();
  float *qkvp = qkv.data_ptr<float>(), *sp = scores.data_ptr<float>();
  float* keys_data = keys.data_ptr<float>();
  float* values_data = values.data_ptr<float>();
  const int64_t layer_keys = B * H * tiles * D * kTile, layer_values = B * H * T * D;

  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = &weights[8 * l];
    float* keys_l = keys_data + l * layer_keys;
    float* values_l = values_data + l * layer_values;
    norm_rows(xp, np, B, C, eps);  // B * C floats: not worth waking the threads for
    column_product(normed, w[0], &w[1], qkv, Into::kWrite);  // (B, 3C): q | k | v
    at::parallel_for(0, B * H, 1, [&](int64_t pair0, int64_t pair1) {
      c10::InferenceMode guard;
      store_and_score(qkvp, keys_l, values_l, sp, pair0, pair1, H, D, T, pos);
      at::Tensor pairs = scores.narrow(0, pair0, pair1 - pair0);
      at::_softmax_out(pairs, pairs, 1, false);
      mix_values(sp, values_l, yp, pair0, pair1, H, D, T, pos);
    });
    column_product(mixed, w[2], &w[3], x, Into::kAdd);  // x += y W_att + b_att
    norm_rows(xp, np, B, C, eps);
    column_product(normed, w[4], &w[5], hidden, Into::kSilu);
    column_product(hidden, w[6], &w[7], x, Into::kAdd);  // x += h W_out + b_out
  }
  norm_rows(xp, np, B, C, eps);
  column_product(normed, head_t, nullptr, logits, Into::kWrite);
  return logits;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &decode_step, "One ImageGPT decode step (float32, CPU); see decode_step.cpp");
}
