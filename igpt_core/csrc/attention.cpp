// Causal self-attention forward and backward on the CPU in bfloat16, for training under CPU autocast.
// Built by igpt_core/native.py on first use; igpt_core/attention.py wraps it as a torch op with autograd.
//
// Why: at this project's CPU training shapes (head size 32, ~1k positions) PyTorch's CPU flash kernel
// took ~170 ms per layer for forward + backward (batch 8, 8 heads, 1,025 positions, 2 cores) and ran as
// fast in fp32 as in bf16: its time goes to the work around many small products, not to arithmetic. Here
// every product is an AVX512-BF16 dot-product loop (vdpbf16ps: 32 bf16 multiplies into 16 fp32 sums) over
// operands laid out once per head, with FlashAttention-2's arithmetic: scores in fp32, probabilities and
// dS rounded to bf16 for the products, log-sum-exp kept in fp32, no (T, T) matrix stored. ~2.5x faster.
//
// Shapes: B batch, T positions, H heads, D head size (a multiple of 16), C = H * D.
//   qkv (B, T, 3C) bf16: the fused projection's output, q | k | v, heads side by side in each;
//   out (B, T, C) bf16, heads side by side (the layout the output projection reads);
//   lse (B, H, T) fp32: log of each query's softmax denominator, in units of the scaled scores.
// Work is split over (batch, head) pairs; each pair's positions are processed in blocks of 64 (kBlock)
// queries and 64 keys, padded with zeros to a whole number of blocks. Non-finite inputs give non-finite
// outputs wherever PyTorch's attention would (never hidden), and may also reach earlier positions of the
// same block (a masked probability is 0, and 0 * NaN is NaN in the products).
//
// The three products all have one shape, C[r][v * 16 + lane] += sum_p pair(A, r, p) . pair(B, p, v, lane):
// a bf16 pair broadcast from a row of A against a vector of 16 pairs from B (see `accumulate`). What
// changes is which operand is laid out how:
//   scores    S[i][j]  = sum_d Q[i][d] K[j][d]      A = Q rows,   B = K "by d pairs" [j/16][d/2][16][2]
//   output    O[i][d]  = sum_j P[i][j] V[j][d]      A = P rows,   B = V "by j pairs" [j/2][D][2]
//   backward  dP = dO V^T (like S), dQ = dS K (like O), dV^T = dO^T P and dK^T = Q^T dS, where A is dO^T
//             or Q^T (d rows of positions) and B is P or dS interleaved over query pairs [i/2][64][2].

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define IGPT_ATTENTION_KERNEL 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 64;  // positions per query block and per key block
constexpr int64_t kMaxHeadDim = 256;

#ifdef IGPT_ATTENTION_KERNEL

using bf16 = uint16_t;

inline float to_float(bf16 x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline bf16 to_bf16(float f) {  // round to nearest even, as the vector conversion does
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<bf16>(bits >> 16);
}

inline __m512 load16(const bf16* p) {  // 16 bf16 -> 16 fp32
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline void store16(bf16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}

// e^x for x <= 0 (scores minus their row's maximum or log-sum-exp): 2^(x log2 e) as 2^n * 2^f with
// |f| <= 1/2, 2^f by its degree-6 Taylor polynomial (relative error ~1e-7, far below bf16's 4e-3).
// NaN stays NaN (max returns its second operand when either is NaN), so a diverged score is not hidden.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(_mm512_set1_ps(-100.f), x), _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718f));  // (t - n) ln 2
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// C[r][v*16 .. v*16+15] (+)= sum over p < pairs of A[r * lda + 2p .. 2p+1] . B[p * sp + v * sv ..]
// for RB rows and NV vectors of 16 fp32 sums; A's pair is broadcast, B's vector holds 16 pairs.
template <int RB, int NV>
inline void accumulate(const bf16* A, int64_t lda, const bf16* B, int64_t sp, int64_t sv, int64_t pairs,
                       float* C, int64_t ldc, bool add) {
  __m512 acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = add ? _mm512_loadu_ps(C + r * ldc + v * 16) : _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v)
      b[v] = (__m512bh)_mm512_loadu_si512(B + p * sp + v * sv);
    for (int r = 0; r < RB; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * p, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + v * 16, acc[r][v]);
}

// The product over `rows` rows of A (a multiple of 4) and `vectors` vectors of B: see `accumulate`.
inline void product(const bf16* A, int64_t lda, const bf16* B, int64_t sp, int64_t sv, int64_t pairs,
                    float* C, int64_t ldc, int64_t rows, int64_t vectors, bool add) {
  for (int64_t r = 0; r < rows; r += 4) {
    const bf16* a = A + r * lda;
    for (int64_t v = 0; v < vectors; v += 4) {
      const bf16* b = B + v * sv;
      float* c = C + r * ldc + v * 16;
      switch (std::min<int64_t>(4, vectors - v)) {
        case 4: accumulate<4, 4>(a, lda, b, sp, sv, pairs, c, ldc, add); break;
        case 3: accumulate<4, 3>(a, lda, b, sp, sv, pairs, c, ldc, add); break;
        case 2: accumulate<4, 2>(a, lda, b, sp, sv, pairs, c, ldc, add); break;
        default: accumulate<4, 1>(a, lda, b, sp, sv, pairs, c, ldc, add); break;
      }
    }
  }
}

// One head's operands are copied out of the strided inputs into the layouts the products read, each
// zero-padded to Tp = a whole number of blocks:

// rows (Tp, D): positions by row, zero past T
void copy_rows(const bf16* src, int64_t stride, int64_t T, int64_t Tp, int64_t D, bf16* dst) {
  for (int64_t i = 0; i < T; ++i) std::memcpy(dst + i * D, src + i * stride, D * sizeof(bf16));
  std::memset(dst + T * D, 0, (Tp - T) * D * sizeof(bf16));
}

// "by d pairs" [Tp/16][D/2][16][2]: for 16 positions, a d pair of each, one vector per pair
void by_d_pairs(const bf16* src, int64_t stride, int64_t T, int64_t Tp, int64_t D, bf16* dst) {
  std::memset(dst, 0, Tp * D * sizeof(bf16));
  for (int64_t j = 0; j < T; ++j) {
    const bf16* s = src + j * stride;
    bf16* base = dst + (j / 16) * 16 * D + (j % 16) * 2;
    for (int64_t p = 0; p < D / 2; ++p) {
      base[p * 32] = s[2 * p];
      base[p * 32 + 1] = s[2 * p + 1];
    }
  }
}

// "by position pairs" [Tp/2][D][2]: two neighbouring positions' values of each d side by side
void by_position_pairs(const bf16* src, int64_t stride, int64_t T, int64_t Tp, int64_t D, bf16* dst) {
  std::memset(dst, 0, Tp * D * sizeof(bf16));
  for (int64_t j = 0; j < T; ++j) {
    const bf16* s = src + j * stride;
    bf16* base = dst + (j / 2) * 2 * D + (j % 2);
    for (int64_t d = 0; d < D; ++d) base[2 * d] = s[d];
  }
}

// transposed (D, Tp): each d's values along positions
void transposed(const bf16* src, int64_t stride, int64_t T, int64_t Tp, int64_t D, bf16* dst) {
  std::memset(dst, 0, Tp * D * sizeof(bf16));
  for (int64_t i = 0; i < T; ++i) {
    const bf16* s = src + i * stride;
    for (int64_t d = 0; d < D; ++d) dst[d * Tp + i] = s[d];
  }
}

// Keys a query at position i sees in the key block starting at j0: j0 <= j <= i, none when i >= T.
inline int64_t visible(int64_t i, int64_t j0, int64_t T) {
  if (i >= T) return 0;
  return std::max<int64_t>(0, std::min<int64_t>(kBlock, i + 1 - j0));
}

inline __mmask16 first_lanes(int64_t n) {  // lanes [0, n) of 16, n in [0, 16]
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

void forward_head(const bf16* qkv, int64_t T, int64_t C, int64_t D, float scale, bf16* out, float* lse) {
  const int64_t Tp = (T + kBlock - 1) / kBlock * kBlock, row = 3 * C;
  std::vector<bf16> q(Tp * D), k(Tp * D), v(Tp * D), p(kBlock * Tp);
  std::vector<float> s(kBlock * Tp), o(kBlock * D), m(kBlock), l(kBlock);
  copy_rows(qkv, row, T, Tp, D, q.data());
  by_d_pairs(qkv + C, row, T, Tp, D, k.data());
  by_position_pairs(qkv + 2 * C, row, T, Tp, D, v.data());
  for (int64_t i0 = 0; i0 < T; i0 += kBlock) {
    const int64_t keys = i0 + kBlock;  // every key block up to and including the diagonal one
    // S = Q K^T for this query block against all those keys, in fp32
    product(q.data() + i0 * D, D, k.data(), 32, 16 * D, D / 2, s.data(), Tp, kBlock, keys / 16, false);
    for (int64_t r = 0; r < kBlock; ++r) {
      const int64_t i = i0 + r, n = i < T ? i + 1 : 0;  // keys this row sees
      float* sr = s.data() + r * Tp;
      bf16* pr = p.data() + r * Tp;
      __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < n; j += 16)
        mx = _mm512_mask_max_ps(mx, first_lanes(n - j), mx, _mm512_loadu_ps(sr + j));
      const float row_max = n ? _mm512_reduce_max_ps(mx) : 0.f;
      const __m512 shift = _mm512_set1_ps(row_max * scale), sc = _mm512_set1_ps(scale);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < keys; j += 16) {
        const __mmask16 live = first_lanes(std::max<int64_t>(0, n - j));
        const __m512 e = _mm512_maskz_mov_ps(
            live, exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), sc, shift)));
        sum = _mm512_add_ps(sum, e);
        store16(pr + j, e);
      }
      l[r] = _mm512_reduce_add_ps(sum);
      m[r] = row_max * scale;
    }
    // O = P V, then divide by the row sums
    product(p.data(), Tp, v.data(), 2 * D, 32, keys / 2, o.data(), D, kBlock, D / 16, false);
    for (int64_t r = 0; r < kBlock && i0 + r < T; ++r) {
      const int64_t i = i0 + r;
      const __m512 inv = _mm512_set1_ps(1.f / l[r]);
      for (int64_t d = 0; d < D; d += 16)
        store16(out + i * C + d, _mm512_mul_ps(_mm512_loadu_ps(o.data() + r * D + d), inv));
      lse[i] = m[r] + std::log(l[r]);
    }
  }
}

void backward_head(const bf16* qkv, const bf16* out, const bf16* dout, const float* lse, int64_t T,
                   int64_t C, int64_t D, float scale, bf16* dqkv) {
  const int64_t Tp = (T + kBlock - 1) / kBlock * kBlock, row = 3 * C;
  std::vector<bf16> q(Tp * D), qt(Tp * D), kd(Tp * D), kp(Tp * D), vd(Tp * D), dO(Tp * D), dOt(Tp * D);
  std::vector<float> delta(Tp, 0.f), lse_p(Tp, 0.f), dq(Tp * D, 0.f);
  std::vector<float> s(kBlock * kBlock), dp(kBlock * kBlock), dkt(D * kBlock), dvt(D * kBlock);
  std::vector<bf16> p_pairs(kBlock * kBlock), ds_pairs(kBlock * kBlock), ds(kBlock * kBlock);
  copy_rows(qkv, row, T, Tp, D, q.data());
  transposed(qkv, row, T, Tp, D, qt.data());
  by_d_pairs(qkv + C, row, T, Tp, D, kd.data());
  by_position_pairs(qkv + C, row, T, Tp, D, kp.data());
  by_d_pairs(qkv + 2 * C, row, T, Tp, D, vd.data());
  copy_rows(dout, C, T, Tp, D, dO.data());
  transposed(dout, C, T, Tp, D, dOt.data());
  for (int64_t i = 0; i < T; ++i) {  // delta_i = dO_i . O_i, the softmax backward's row term
    float acc = 0.f;
    for (int64_t d = 0; d < D; ++d) acc += to_float(dout[i * C + d]) * to_float(out[i * C + d]);
    delta[i] = acc;
    lse_p[i] = lse[i];
  }
  // index vector interleaving two rows of 16 bf16 (a in lanes 0-15, b in 16-31) as a0 b0 a1 b1 ...
  alignas(64) int16_t order[32];
  for (int t = 0; t < 16; ++t) {
    order[2 * t] = static_cast<int16_t>(t);
    order[2 * t + 1] = static_cast<int16_t>(16 + t);
  }
  const __m512i interleave = _mm512_load_si512(order);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < T; j0 += kBlock) {
    std::fill(dkt.begin(), dkt.end(), 0.f);
    std::fill(dvt.begin(), dvt.end(), 0.f);
    for (int64_t i0 = j0; i0 < T; i0 += kBlock) {
      // S = Q K^T and dP = dO V^T on this (query block, key block) tile
      product(q.data() + i0 * D, D, kd.data() + j0 * D, 32, 16 * D, D / 2, s.data(), kBlock, kBlock, 4, false);
      product(dO.data() + i0 * D, D, vd.data() + j0 * D, 32, 16 * D, D / 2, dp.data(), kBlock, kBlock, 4,
              false);
      // P = exp(scale S - lse), dS = P (dP - delta); rows two at a time so they interleave into pairs
      for (int64_t r = 0; r < kBlock; r += 2) {
        const int64_t i = i0 + r;
        const int64_t n0 = visible(i, j0, T), n1 = visible(i + 1, j0, T);
        const __m512 lse0 = _mm512_set1_ps(lse_p[i]), lse1 = _mm512_set1_ps(i + 1 < T ? lse_p[i + 1] : 0.f);
        const __m512 dl0 = _mm512_set1_ps(delta[i]), dl1 = _mm512_set1_ps(delta[i + 1]);
        for (int64_t j = 0; j < kBlock; j += 16) {
          const __mmask16 live0 = first_lanes(std::max<int64_t>(0, n0 - j));
          const __mmask16 live1 = first_lanes(std::max<int64_t>(0, n1 - j));
          const __m512 p0 = _mm512_maskz_mov_ps(
              live0, exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(s.data() + r * kBlock + j), sc, lse0)));
          const __m512 p1 = _mm512_maskz_mov_ps(
              live1,
              exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(s.data() + (r + 1) * kBlock + j), sc, lse1)));
          // masked again: a masked lane's p is 0, but its dp may not be finite
          const __m512 ds0 =
              _mm512_maskz_mul_ps(live0, p0, _mm512_sub_ps(_mm512_loadu_ps(dp.data() + r * kBlock + j), dl0));
          const __m512 ds1 =
              _mm512_maskz_mul_ps(live1, p1, _mm512_sub_ps(_mm512_loadu_ps(dp.data() + (r + 1) * kBlock + j), dl1));
          const __m512i pp = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
          const __m512i dd = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(ds1, ds0));
          _mm512_storeu_si512(p_pairs.data() + (r / 2) * 2 * kBlock + 2 * j, pp);
          _mm512_storeu_si512(ds_pairs.data() + (r / 2) * 2 * kBlock + 2 * j, dd);
          store16(ds.data() + r * kBlock + j, ds0);
          store16(ds.data() + (r + 1) * kBlock + j, ds1);
        }
      }
      // dV^T += dO^T P, dK^T += Q^T dS (d rows; sums over this block's query pairs)
      product(dOt.data() + i0, Tp, p_pairs.data(), 2 * kBlock, 32, kBlock / 2, dvt.data(), kBlock, D, 4, true);
      product(qt.data() + i0, Tp, ds_pairs.data(), 2 * kBlock, 32, kBlock / 2, dkt.data(), kBlock, D, 4, true);
      // dQ += dS K (sums over this block's key pairs)
      product(ds.data(), kBlock, kp.data() + j0 * D, 2 * D, 32, kBlock / 2, dq.data() + i0 * D, D, kBlock,
              D / 16, true);
    }
    for (int64_t j = j0; j < std::min(T, j0 + kBlock); ++j) {
      bf16* dk = dqkv + j * row + C;
      bf16* dv = dqkv + j * row + 2 * C;
      for (int64_t d = 0; d < D; ++d) {
        dk[d] = to_bf16(dkt[d * kBlock + (j - j0)] * scale);
        dv[d] = to_bf16(dvt[d * kBlock + (j - j0)]);
      }
    }
  }
  for (int64_t i = 0; i < T; ++i)
    for (int64_t d = 0; d < D; d += 16)
      store16(dqkv + i * row + d, _mm512_mul_ps(_mm512_loadu_ps(dq.data() + i * D + d), sc));
}

#endif  // IGPT_ATTENTION_KERNEL

void check_inputs(const torch::Tensor& qkv, int64_t heads) {
  TORCH_CHECK(qkv.device().is_cpu(), "qkv: expected a CPU tensor");
  TORCH_CHECK(qkv.scalar_type() == at::kBFloat16, "qkv: expected bfloat16, got ", qkv.scalar_type());
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous(), "qkv: expected a contiguous (B, T, 3C) tensor");
  TORCH_CHECK(heads > 0 && qkv.size(2) % (3 * heads) == 0, "qkv: last size ", qkv.size(2),
              " is not 3 * heads * head size for heads=", heads);
  const int64_t D = qkv.size(2) / (3 * heads);
  TORCH_CHECK(D % 16 == 0 && D <= kMaxHeadDim, "head size ", D, ": the kernel takes multiples of 16 up to ",
              kMaxHeadDim);
}

}  // namespace

bool available() {
#ifdef IGPT_ATTENTION_KERNEL
  return true;
#else
  return false;
#endif
}

// (out (B, T, C) bf16, lse (B, H, T) fp32) of causal attention over qkv (B, T, 3C), scores scaled by `scale`.
std::vector<torch::Tensor> forward(const torch::Tensor& qkv, int64_t heads, double scale) {
  check_inputs(qkv, heads);
  TORCH_CHECK(available(), "this CPU build has no AVX512-BF16 attention kernel");
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3, D = C / heads;
  auto out = torch::empty({B, T, C}, qkv.options());
  auto lse = torch::empty({B, heads, T}, qkv.options().dtype(at::kFloat));
#ifdef IGPT_ATTENTION_KERNEL
  const auto* src = reinterpret_cast<const bf16*>(qkv.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>());
  float* lse_p = lse.data_ptr<float>();
  at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      forward_head(src + b * T * 3 * C + h * D, T, C, D, static_cast<float>(scale), dst + b * T * C + h * D,
                   lse_p + bh * T);
    }
  });
#endif
  return {out, lse};
}

// d qkv (B, T, 3C) bf16 from the forward's inputs and outputs and the output's gradient dout (B, T, C).
torch::Tensor backward(const torch::Tensor& dout, const torch::Tensor& qkv, const torch::Tensor& out,
                       const torch::Tensor& lse, int64_t heads, double scale) {
  check_inputs(qkv, heads);
  TORCH_CHECK(available(), "this CPU build has no AVX512-BF16 attention kernel");
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3, D = C / heads;
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.sizes() == at::IntArrayRef({B, T, C}),
              "out: expected the forward's contiguous bf16 (B, T, C) output");
  TORCH_CHECK(dout.scalar_type() == at::kBFloat16 && dout.is_contiguous() && dout.sizes() == out.sizes(),
              "dout: expected a contiguous bf16 tensor shaped like out");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.sizes() == at::IntArrayRef({B, heads, T}),
              "lse: expected the forward's contiguous fp32 (B, H, T) log-sum-exp");
  auto dqkv = torch::empty_like(qkv);
#ifdef IGPT_ATTENTION_KERNEL
  const auto* src = reinterpret_cast<const bf16*>(qkv.data_ptr<at::BFloat16>());
  const auto* o = reinterpret_cast<const bf16*>(out.data_ptr<at::BFloat16>());
  const auto* g = reinterpret_cast<const bf16*>(dout.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<bf16*>(dqkv.data_ptr<at::BFloat16>());
  const float* lse_p = lse.data_ptr<float>();
  at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads, offset = b * T * C + h * D;
      backward_head(src + b * T * 3 * C + h * D, o + offset, g + offset, lse_p + bh * T, T, C, D,
                    static_cast<float>(scale), dst + b * T * 3 * C + h * D);
    }
  });
#endif
  return dqkv;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this build has the AVX512-BF16 kernel");
  m.def("forward", &forward, "causal attention forward over fused qkv (bf16)");
  m.def("backward", &backward, "causal attention backward to fused qkv (bf16)");
}
