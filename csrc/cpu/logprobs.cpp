// Token log-probs (+ entropy) from logits on the CPU: the `_cpu` entry points
// of rlhf_engine/logprobs.h.
//
// Forward: one pass over each row. The row is read in tiles that fit L1; a
// tile's max is taken first, the running (per-lane) sums are rescaled once per
// tile, then the tile's exponentials are accumulated, so every logit is read
// from memory once. Backward: one pass, one read and one write.
// Rows are spread over threads with at::parallel_for; lanes use ATen's
// Vectorized<float>, and fp16/bf16 rows are converted to float right after
// each load (no float32 copy of the logits is ever made).
#include "rlhf_engine/logprobs.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = fVec::size();
constexpr int64_t kTile = 32 * kLanes;  // elements per tile (2 KiB of fp32)

// ---- loads and stores of kLanes elements as float --------------------------

template <typename T>
inline fVec load_vec(const T* p) {
  fVec out;
  at::vec::load_to_float<T>(p, out);
  return out;
}
template <>
inline fVec load_vec<float>(const float* p) {
  return fVec::loadu(p);
}

template <typename T>
inline fVec load_vec_partial(const T* p, int64_t n) {
  float buf[kLanes];
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
  return fVec::loadu(buf, n);
}

template <typename T>
inline void store_vec(T* p, const fVec& v, int64_t n = kLanes) {
  float buf[kLanes];
  v.store(buf);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
}
template <>
inline void store_vec<float>(float* p, const fVec& v, int64_t n) {
  v.store(p, n);
}

template <typename Label>
inline int64_t label_at(const void* labels, int64_t row) {
  return static_cast<int64_t>(static_cast<const Label*>(labels)[row]);
}

// ---- per-row math -----------------------------------------------------------
// Base-2 units throughout: u = x * c with c = log2(e) / T, exponent 2^(u - m2).

constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLog2e = 1.44269504088896340736;

struct RowStats {
  float m2;       // shift: the row max of x * c
  float l2;       // log2(sum 2^(x * c - m2))
  float entropy;  // natural units
};

// One pass over a row. Each lane keeps its raw max, s = sum 2^d and
// t = sum 2^d * (-d) with d = fma(x, c, -m2) <= 0, so the entropy
// H = ln 2 * (l2 + t / s) is a sum of non-negative terms (lse - sum(p z)
// cancels and loses digits at large vocab). A tile's terms are summed in
// float32; the running sums across tiles are kept in double per lane, so a
// 150k-token row loses no digits to 10^4 sequential float32 additions.
template <typename T, bool kEntropy>
RowStats row_forward(const T* x, int64_t vocab, float c) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const fVec zero(0.f), vneg_inf(neg_inf), vc(c);
  fVec run_max(neg_inf), run_m2(0.f);
  double run_sum[kLanes] = {}, run_t[kLanes] = {};
  fVec tile[kTile / kLanes];
  for (int64_t start = 0; start < vocab; start += kTile) {
    const int64_t len = std::min(kTile, vocab - start);
    const int64_t nvec = (len + kLanes - 1) / kLanes;
    fVec tile_max(neg_inf);
    for (int64_t v = 0; v < nvec; ++v) {
      const int64_t off = start + v * kLanes;
      const int64_t n = std::min(kLanes, vocab - off);
      fVec xv = n == kLanes ? load_vec(x + off) : load_vec_partial(x + off, n);
      if (n < kLanes) xv = fVec::set(vneg_inf, xv, n);
      tile[v] = xv;
      tile_max = at::vec::maximum(tile_max, xv);
    }
    const fVec new_max = at::vec::maximum(run_max, tile_max);
    // Lanes still at -inf have nothing accumulated: keep their shift at 0.
    const fVec new_m2 = fVec::blendv(new_max * vc, zero, new_max == vneg_inf);
    fVec tile_sum(0.f), tile_t(0.f);
    for (int64_t v = 0; v < nvec; ++v) {
      const fVec d = at::vec::fmadd(tile[v], vc, zero - new_m2);  // -inf on padding
      const fVec e = d.exp2();
      tile_sum = tile_sum + e;
      // 0 * inf would be NaN on padded lanes and -inf logits: mask them out.
      if (kEntropy) tile_t = tile_t - fVec::blendv(e * d, zero, e == zero);
    }
    // Rescale the running sums to the new shift and add the tile's.
    float m2_old[kLanes], m2_new[kLanes], ts[kLanes], tt[kLanes];
    run_m2.store(m2_old);
    new_m2.store(m2_new);
    tile_sum.store(ts);
    tile_t.store(tt);
    for (int64_t l = 0; l < kLanes; ++l) {
      const double gap = static_cast<double>(m2_new[l]) - m2_old[l];  // >= 0 once non-empty
      if (gap != 0.0 && run_sum[l] != 0.0) {
        const double scale = std::exp2(-gap);
        if (kEntropy) run_t[l] = scale * (run_t[l] + gap * run_sum[l]);
        run_sum[l] *= scale;
      }
      run_sum[l] += ts[l];
      if (kEntropy) run_t[l] += tt[l];
    }
    run_max = new_max;
    run_m2 = new_m2;
  }
  // Combine lanes around the shift of the largest logit, M2.
  float m2[kLanes], mx[kLanes];
  run_m2.store(m2);
  run_max.store(mx);
  int64_t top = 0;
  for (int64_t l = 1; l < kLanes; ++l)
    if (mx[l] > mx[top]) top = l;
  const double big = m2[top];
  double sum = 0.0, tsum = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) {
    if (run_sum[l] == 0.0) continue;
    const double gap = big - m2[l];
    const double w = std::exp2(-gap);
    sum += w * run_sum[l];
    tsum += w * (run_t[l] + gap * run_sum[l]);
  }
  const double l2 = std::log2(sum);
  return {static_cast<float>(big), static_cast<float>(l2),
          kEntropy ? static_cast<float>(kLn2 * (l2 + tsum / sum)) : 0.f};
}

// grad = (g_logp * (onehot - p) - g_ent * p * (log p + H)) / T in one pass,
// without the one-hot (the caller adds it at the label).
template <typename T>
void row_backward(const T* x, T* g, int64_t vocab, float c, float inv_t,
                  float g_logp, float g_ent, RowStats st) {
  const fVec vc(c), vneg_m2(-st.m2), vl2(st.l2), vln2(static_cast<float>(kLn2)), vent(st.entropy);
  const fVec c_logp(-g_logp * inv_t), c_ent(-g_ent * inv_t);
  auto grad_of = [&](const fVec& xv) {
    const fVec log2_p = at::vec::fmadd(xv, vc, vneg_m2) - vl2;
    return log2_p.exp2() * at::vec::fmadd(c_ent, at::vec::fmadd(log2_p, vln2, vent), c_logp);
  };
  int64_t off = 0;
  for (; off + kLanes <= vocab; off += kLanes) store_vec(g + off, grad_of(load_vec(x + off)));
  if (off < vocab) {
    const int64_t n = vocab - off;
    store_vec(g + off, grad_of(load_vec_partial(x + off, n)), n);
  }
}

inline int64_t row_grain(int64_t vocab) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1));
}

template <typename T, typename Label>
void forward_rows(const T* logits, int64_t n_rows, int64_t vocab,
                  int64_t row_stride, const void* labels, float temperature,
                  int64_t ignore_index, float* logp, float* entropy,
                  float* stats) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float c = static_cast<float>(kLog2e / temperature);
  at::parallel_for(0, n_rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = label_at<Label>(labels, r);
      if (y == ignore_index) {
        logp[r] = 0.f;
        stats[2 * r] = stats[2 * r + 1] = 0.f;
        if (entropy) entropy[r] = 0.f;
        continue;
      }
      const T* x = logits + r * row_stride;
      const RowStats st = entropy ? row_forward<T, true>(x, vocab, c)
                                  : row_forward<T, false>(x, vocab, c);
      const bool valid = y >= 0 && y < vocab;
      stats[2 * r] = st.m2;
      stats[2 * r + 1] = st.l2;
      const float log2_p = std::fma(static_cast<float>(x[valid ? y : 0]), c, -st.m2) - st.l2;
      logp[r] = valid ? static_cast<float>(kLn2 * log2_p) : nan;
      if (entropy) entropy[r] = valid ? st.entropy : nan;
    }
  });
}

template <typename T, typename Label>
void backward_rows(const float* grad_logp, const float* grad_entropy,
                   const T* logits, int64_t n_rows, int64_t vocab,
                   int64_t row_stride, const void* labels, const float* stats,
                   const float* entropy, float temperature, int64_t ignore_index,
                   T* grad) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float c = static_cast<float>(kLog2e / temperature);
  const float inv_t = 1.f / temperature;
  at::parallel_for(0, n_rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = label_at<Label>(labels, r);
      T* g = grad + r * vocab;
      if (y == ignore_index || y < 0 || y >= vocab) {
        std::fill(g, g + vocab, static_cast<T>(y == ignore_index ? 0.f : nan));
        continue;
      }
      const T* x = logits + r * row_stride;
      const float g_logp = grad_logp[r];
      const float g_ent = grad_entropy ? grad_entropy[r] : 0.f;
      const RowStats st{stats[2 * r], stats[2 * r + 1], grad_entropy ? entropy[r] : 0.f};
      // The label's logit, read before the row is overwritten (g may alias x).
      const float log2_p_y = std::fma(static_cast<float>(x[y]), c, -st.m2) - st.l2;
      row_backward(x, g, vocab, c, inv_t, g_logp, g_ent, st);
      // The label's entry again, with the one-hot added in float32 before
      // rounding (rounding p first cancels catastrophically near p = 1).
      const float p_y = std::exp2(log2_p_y);
      const float log_p_y = static_cast<float>(kLn2) * log2_p_y;
      g[y] = static_cast<T>((g_logp * (1.f - p_y) - g_ent * p_y * (log_p_y + st.entropy)) * inv_t);
    }
  });
}

template <typename Fn>
int dispatch(int logits_dtype, int labels_int64, Fn&& fn) {
  auto with_label = [&](auto tag) {
    using T = decltype(tag);
    if (labels_int64) {
      fn(T{}, int64_t{});
    } else {
      fn(T{}, int32_t{});
    }
  };
  switch (logits_dtype) {
    case RLHF_FLOAT32: with_label(float{}); return 0;
    case RLHF_FLOAT16: with_label(c10::Half{}); return 0;
    case RLHF_BFLOAT16: with_label(c10::BFloat16{}); return 0;
    default: return 1;
  }
}

}  // namespace

extern "C" int rlhf_token_logprobs_forward_cpu(
    const void* logits, int logits_dtype, int64_t n_rows, int64_t vocab,
    int64_t row_stride, const void* labels, int labels_int64,
    float temperature, int64_t ignore_index, float* logp, float* entropy,
    float* stats) {
  if (n_rows < 0 || vocab <= 0 || row_stride < vocab || !(temperature > 0.f)) return 2;
  return dispatch(logits_dtype, labels_int64, [&](auto t, auto l) {
    using T = decltype(t);
    using Label = decltype(l);
    forward_rows<T, Label>(static_cast<const T*>(logits), n_rows, vocab,
                           row_stride, labels, temperature, ignore_index,
                           logp, entropy, stats);
  });
}

extern "C" int rlhf_token_logprobs_backward_cpu(
    const float* grad_logp, const float* grad_entropy, const void* logits,
    int logits_dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
    const void* labels, int labels_int64, const float* stats,
    const float* entropy, float temperature, int64_t ignore_index,
    void* grad_logits) {
  if (n_rows < 0 || vocab <= 0 || row_stride < vocab || !(temperature > 0.f)) return 2;
  if (grad_logits == logits && row_stride != vocab) return 2;
  return dispatch(logits_dtype, labels_int64, [&](auto t, auto l) {
    using T = decltype(t);
    using Label = decltype(l);
    backward_rows<T, Label>(grad_logp, grad_entropy, static_cast<const T*>(logits),
                            n_rows, vocab, row_stride, labels, stats, entropy,
                            temperature, ignore_index,
                            static_cast<T*>(grad_logits));
  });
}
