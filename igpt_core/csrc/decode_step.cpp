// One ImageGPT decode step on the CPU in float32: a new token per row, at position `pos`, through every
// block, to next-token logits. The same arithmetic as decode_step in igpt_core/generation.py (weights
// folded the same way, see decode_weights there), built by igpt_core/native.py on first use.
//
// Why C++: in PyTorch eager a decode step is ~100 small kernels over (B, C) rows, and their dispatch cost
// more than their arithmetic (0.7 ms of fixed cost per step at the tiny preset). Here the norms, cache
// writes, attention and the matrix products (one row block of the batch against a 64-column panel of the
// weights, the sums in registers) are plain loops.
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
//   values (L, B, H, T, D); weights: 8 per block, each matrix (in, out) packed into panels of 64 output
//   columns, (ceil(out / 64), in, 64), zero-padded: w_qkv (C -> 3C), b_qkv, w_att (C -> C), b_att,
//   w_fc (C -> n_inner), b_fc, w_out (n_inner -> C), b_out; the head (C -> vocab) the same way.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

constexpr int64_t kPanel = 64;   // output columns per weight panel (NativeDecoder packs the matrices so)
constexpr int64_t kRowBlock = 4;  // rows of the batch per pass over a panel

// out (RB, 64) = x (RB rows of stride K) @ panel (K, 64): one pass over the panel, every weight read once
// for RB rows. With AVX-512 the RB x 64 sums stay in 4 * RB registers; elsewhere the compiler vectorises
// the plain loops.
template <int RB>
void panel_block(const float* x, int64_t K, const float* panel, float* out) {
#if defined(__AVX512F__)
  __m512 acc[RB][4];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = panel + k * kPanel;
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);
    const __m512 w2 = _mm512_loadu_ps(wk + 32), w3 = _mm512_loadu_ps(wk + 48);
    for (int r = 0; r < RB; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * K + k]);
      acc[r][0] = _mm512_fmadd_ps(xr, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xr, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(xr, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(xr, w3, acc[r][3]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + r * kPanel + 16 * c, acc[r][c]);
#else
  float acc[RB][kPanel] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = panel + k * kPanel;
    for (int r = 0; r < RB; ++r) {
      const float xr = x[r * K + k];
#pragma omp simd
      for (int64_t c = 0; c < kPanel; ++c) acc[r][c] += xr * wk[c];
    }
  }
  for (int r = 0; r < RB; ++r) std::copy(acc[r], acc[r] + kPanel, out + r * kPanel);
#endif
}

// out (B, N) = x (B, K) @ W + bias, or out += it (`add`: a residual), W as panels (ceil(N / 64), K, 64)
// zero-padded past N (see NativeDecoder). The intra-op threads take whole panels: each reads only its
// columns of W, once, for every row of the batch.
void panel_product(const float* x, int64_t B, int64_t K, const at::Tensor& panels, const float* bias,
                   float* out, int64_t N, bool add) {
  const float* w = panels.data_ptr<float>();
  at::parallel_for(0, panels.size(0), 1, [&](int64_t p0, int64_t p1) {
    float block[kRowBlock * kPanel];
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = w + p * K * kPanel;
      const int64_t c0 = p * kPanel, n = std::min(kPanel, N - c0);
      for (int64_t r0 = 0; r0 < B; r0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, B - r0);
        const float* xr = x + r0 * K;
        switch (rows) {
          case 4: panel_block<4>(xr, K, panel, block); break;
          case 3: panel_block<3>(xr, K, panel, block); break;
          case 2: panel_block<2>(xr, K, panel, block); break;
          default: panel_block<1>(xr, K, panel, block); break;
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* dst = out + (r0 + r) * N + c0;
          const float* src = block + r * kPanel;
          if (bias != nullptr) {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) dst[c] = (add ? dst[c] : 0.f) + src[c] + bias[c0 + c];
          } else {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) dst[c] = (add ? dst[c] : 0.f) + src[c];
          }
        }
      }
    }
  });
}

void check_panels(const at::Tensor& panels, int64_t K, int64_t N, const char* name, int64_t block) {
  TORCH_CHECK(panels.dim() == 3 && panels.size(0) == (N + kPanel - 1) / kPanel && panels.size(1) == K &&
                  panels.size(2) == kPanel,
              "weights: block ", block, ": ", name, " must be panels (", (N + kPanel - 1) / kPanel, ", ", K,
              ", ", kPanel, ")");
}

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, ": expected a float32 CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

}  // namespace

at::Tensor decode_step(const at::Tensor& token, int64_t pos, const at::Tensor& wte, const at::Tensor& wpe,
                       at::Tensor& keys, at::Tensor& values, const std::vector<at::Tensor>& weights,
                       const at::Tensor& head, int64_t vocab, double eps_in) {
  check_float_cpu(wte, "wte");
  check_float_cpu(wpe, "wpe");
  check_float_cpu(keys, "keys");
  check_float_cpu(values, "values");
  check_float_cpu(head, "head");
  for (const auto& w : weights) check_float_cpu(w, "weights");
  TORCH_CHECK(token.dim() == 1 && token.scalar_type() == at::kLong, "token: expected int64 of shape (B,)");
  TORCH_CHECK(values.dim() == 5, "values: expected (L, B, H, T, D)");
  const int64_t L = values.size(0), B = values.size(1), H = values.size(2), T = values.size(3);
  const int64_t D = values.size(4), C = wte.size(1), tiles = (T + kTile - 1) / kTile;
  TORCH_CHECK(keys.sizes() == at::IntArrayRef({L, B, H, tiles, D, kTile}), "keys: expected (L, B, H, ",
              tiles, ", D, ", kTile, ")");
  TORCH_CHECK(token.size(0) == B && H * D == C && D <= kMaxHeadDim, "decode_step: shapes do not agree");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 8 * L, "weights: expected 8 tensors per block");
  const int64_t n_inner = weights[5].size(0);
  for (int64_t l = 0; l < L; ++l) {  // the loops below index q | k | v, the hidden layer and x directly
    const at::Tensor* w = &weights[8 * l];
    check_panels(w[0], C, 3 * C, "w_qkv", l);
    check_panels(w[2], C, C, "w_att", l);
    check_panels(w[4], C, n_inner, "w_fc", l);
    check_panels(w[6], n_inner, C, "w_out", l);
    TORCH_CHECK(w[1].numel() == 3 * C && w[3].numel() == C && w[5].numel() == n_inner && w[7].numel() == C,
                "weights: block ", l, ": biases must be (3C), (C), (n_inner), (C)");
  }
  check_panels(head, C, vocab, "head", L);
  TORCH_CHECK(0 <= pos && pos < T && pos < wpe.size(0), "pos: ", pos, " is outside the cache");

  const float eps = static_cast<float>(eps_in);
  const int64_t t = pos + 1;
  at::Tensor x = at::embedding(wte, token).add_(wpe[pos]);  // (B, C): the residual stream
  at::Tensor normed = at::empty_like(x);
  at::Tensor mixed = at::empty_like(x);
  at::Tensor qkv = at::empty({B, 3 * C}, x.options());
  at::Tensor hidden = at::empty({B, n_inner}, x.options());
  at::Tensor scores = at::empty({B * H, t}, x.options());
  at::Tensor logits = at::empty({B, vocab}, x.options());
  float *xp = x.data_ptr<float>(), *np = normed.data_ptr<float>(), *yp = mixed.data_ptr<float>();
  float *qkvp = qkv.data_ptr<float>(), *hp = hidden.data_ptr<float>(), *sp = scores.data_ptr<float>();
  float* keys_data = keys.data_ptr<float>();
  float* values_data = values.data_ptr<float>();
  const int64_t layer_keys = B * H * tiles * D * kTile, layer_values = B * H * T * D;

  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = &weights[8 * l];
    float* keys_l = keys_data + l * layer_keys;
    float* values_l = values_data + l * layer_values;
    norm_rows(xp, np, B, C, eps);  // B * C floats: not worth waking the threads for
    panel_product(np, B, C, w[0], w[1].data_ptr<float>(), qkvp, 3 * C, false);  // (B, 3C): q | k | v
    at::parallel_for(0, B * H, 1, [&](int64_t pair0, int64_t pair1) {
      c10::InferenceMode guard;  // thread-local: the calling thread's mode does not reach pool threads
      store_and_score(qkvp, keys_l, values_l, sp, pair0, pair1, H, D, T, pos);
      at::Tensor pairs = scores.narrow(0, pair0, pair1 - pair0);
      at::_softmax_out(pairs, pairs, 1, false);
      mix_values(sp, values_l, yp, pair0, pair1, H, D, T, pos);
    });
    panel_product(yp, B, C, w[2], w[3].data_ptr<float>(), xp, C, true);  // x += y W_att + b_att
    norm_rows(xp, np, B, C, eps);
    panel_product(np, B, C, w[4], w[5].data_ptr<float>(), hp, n_inner, false);
    at::silu_(hidden);  // quick-gelu, its 1.702 folded into the weights
    panel_product(hp, B, n_inner, w[6], w[7].data_ptr<float>(), xp, C, true);  // x += h W_out + b_out
  }
  norm_rows(xp, np, B, C, eps);
  panel_product(np, B, C, head, nullptr, logits.data_ptr<float>(), vocab, false);
  return logits;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &decode_step, "One ImageGPT decode step (float32, CPU); see decode_step.cpp");
}
