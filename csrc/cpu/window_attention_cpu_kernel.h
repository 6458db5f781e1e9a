// Fused CPU kernels of window cross attention, written once and compiled per instruction set.
//
// Included by window_attention_cpu_{avx512,avx2,baseline}.cpp inside `namespace XK_ISA` after a
// `#pragma GCC target`, so the compiler vectorizes the same loops for each ISA; the dispatcher
// (window_attention_cpu.cpp) picks one at run time. Nothing here includes ATen or calls an inline
// function defined before the pragma: an inline template instantiated under two targets could
// be merged by the linker into the wider one and fault on older CPUs.
//
// Per base window, the kernels copy the window's queries and its key box (at most
// prod(search) rows) into small per-thread tiles and never build unfolded key/value tensors.
// The forward keeps only the log-sum-exp per query; the backward recomputes the scores.

// Storage conversions. bf16 travels as its raw 16 bits.
XK_ALWAYS_INLINE float to_acc(float x) { return x; }
XK_ALWAYS_INLINE double to_acc(double x) { return x; }
XK_ALWAYS_INLINE float to_acc(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float x;
  __builtin_memcpy(&x, &wide, sizeof(x));
  return x;
}
XK_ALWAYS_INLINE void store(float* dst, float x) { *dst = x; }
XK_ALWAYS_INLINE void store(double* dst, double x) { *dst = x; }
XK_ALWAYS_INLINE void store(uint16_t* dst, float x) {
  uint32_t wide;
  __builtin_memcpy(&wide, &x, sizeof(x));
  if ((wide & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
    *dst = static_cast<uint16_t>((wide >> 16) | 0x40u);
    return;
  }
  wide += 0x7fffu + ((wide >> 16) & 1u);  // round to nearest even
  *dst = static_cast<uint16_t>(wide >> 16);
}

// exp for the softmax, as a branch-free polynomial the compiler can vectorize (the scalar libm
// call would dominate the forward). Range reduction exp(x) = 2^n exp(r), |r| <= ln2 / 2, then a
// degree-6 minimax polynomial; relative error about 1e-7. Arguments are <= 0 here (scores minus
// their max or their log-sum-exp); below -87 the result flushes to 0.
XK_ALWAYS_INLINE float softmax_exp(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float rounded = clamped * 1.44269504088896341f + shifter;
  const float n = rounded - shifter;
  float r = clamped - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  int32_t bits;
  __builtin_memcpy(&bits, &rounded, sizeof(bits));
  const int32_t exponent = (bits - 0x4B400000) + 127;
  const int32_t scale_bits = exponent << 23;
  float two_n;
  __builtin_memcpy(&two_n, &scale_bits, sizeof(two_n));
  return x < -87.0f ? 0.0f : y * two_n;
}
XK_ALWAYS_INLINE double softmax_exp(double x) { return __builtin_exp(x); }
XK_ALWAYS_INLINE float log_acc(float x) { return __builtin_logf(x); }
XK_ALWAYS_INLINE double log_acc(double x) { return __builtin_log(x); }

// One base window's queries and key box, gathered into per-thread tiles.
//   q      [max_queries][head_dim]  query rows times scale
//   k      [max_keys][head_dim]     key rows (pad_key for padded keys under padding="constant")
//   kt     [head_dim][max_keys]     the same, transposed for the score loop
//   v, vt  likewise for values
//   scores [2][max_keys]            one query's scores (or probabilities) and dS
//   rows   [2][head_dim]            one query's output, or its dO and dQ
// Query `i` sits at query_pos[i]; key `j` at key_pos[j] (-1 for a padded key); their flat bias
// index is key_bias[j] - query_bias[i] (see gather_window()).
template <typename acc_t>
struct WindowTiles {
  acc_t* q;
  acc_t* k;
  acc_t* kt;
  acc_t* v;
  acc_t* vt;
  acc_t* scores;
  acc_t* rows;
  acc_t* grad_k;            // [max_keys][head_dim] backward accumulators
  acc_t* grad_v;
  int64_t* query_pos;       // [max_queries] (z, y, x) of each query, packed as z*H*W + y*W + x
  int64_t* key_pos;         // [max_keys] packed position, -1 when padded
  int64_t* query_bias;      // [max_queries] flat bias offset of the query within the window
  int64_t* key_bias;        // [max_keys] flat bias offset of the key within the box
  int64_t num_queries;
  int64_t num_keys;
  int64_t max_keys;
};

// Lays the tiles out in the scratch sized by tile_acc_elements() / tile_index_elements().
template <typename acc_t>
WindowTiles<acc_t> carve_tiles(const WindowGeometry& g, int64_t head_dim, acc_t* acc,
                               int64_t* index) {
  const int64_t nq = g.window[0] * g.window[1] * g.window[2];
  const int64_t nk = g.search[0] * g.search[1] * g.search[2];
  WindowTiles<acc_t> t;
  t.q = acc;
  t.rows = t.q + nq * head_dim;
  t.k = t.rows + 2 * head_dim;
  t.kt = t.k + nk * head_dim;
  t.v = t.kt + nk * head_dim;
  t.vt = t.v + nk * head_dim;
  t.grad_k = t.vt + nk * head_dim;
  t.grad_v = t.grad_k + nk * head_dim;
  t.scores = t.grad_v + nk * head_dim;
  t.query_pos = index;
  t.query_bias = t.query_pos + nq;
  t.key_pos = t.query_bias + nq;
  t.key_bias = t.key_pos + nk;
  t.max_keys = nk;
  t.num_queries = 0;
  t.num_keys = 0;
  return t;
}

// Gathers the queries of base window (wz, wy, wx) and its key box for batch b, head h. The
// flat bias index of (query i, key j) is key_bias[j] - query_bias[i], by bias_axis_index().
template <typename scalar_t, typename acc_t>
void gather_window(const AttentionParams<scalar_t, acc_t>& p, int64_t b, int64_t h, int64_t wz,
                   int64_t wy, int64_t wx, bool with_values_transposed, WindowTiles<acc_t>& t) {
  const WindowGeometry& g = p.geometry;
  const int64_t hd = p.head_dim;
  const int64_t eh = bias_extent(g, 1), ew = bias_extent(g, 2);
  const int64_t plane = g.volume[1] * g.volume[2];
  const int64_t oz = window_origin(g, 0, wz), oy = window_origin(g, 1, wy), ox = window_origin(g, 2, wx);

  int64_t nq = 0;
  for (int64_t az = 0; az < g.window[0] && oz + az < g.volume[0]; ++az)
    for (int64_t ay = 0; ay < g.window[1] && oy + ay < g.volume[1]; ++ay)
      for (int64_t ax = 0; ax < g.window[2] && ox + ax < g.volume[2]; ++ax) {
        const int64_t z = oz + az, y = oy + ay, x = ox + ax;
        const scalar_t* src = p.query + p.query_strides.offset(b, z, y, x, h);
        acc_t* dst = t.q + nq * hd;
        for (int64_t d = 0; d < hd; ++d) dst[d] = to_acc(src[d]) * p.scale;
        t.query_pos[nq] = z * plane + y * g.volume[2] + x;
        t.query_bias[nq] = (az * eh + ay) * ew + ax;
        ++nq;
      }
  t.num_queries = nq;

  const bool constant_padding = p.pad_key != nullptr;
  const int64_t bz = key_box_start(g, 0, wz), by = key_box_start(g, 1, wy), bx = key_box_start(g, 2, wx);
  const int64_t bias_origin = ((g.window[0] - 1) * eh + (g.window[1] - 1)) * ew + (g.window[2] - 1);
  int64_t nk = 0;
  for (int64_t tz = 0; tz < g.search[0]; ++tz) {
    const int64_t z = bz + tz;
    const bool z_in = inside_volume(g, 0, z);
    if (!z_in && !constant_padding) continue;
    for (int64_t ty = 0; ty < g.search[1]; ++ty) {
      const int64_t y = by + ty;
      const bool zy_in = z_in && inside_volume(g, 1, y);
      if (!zy_in && !constant_padding) continue;
      for (int64_t tx = 0; tx < g.search[2]; ++tx) {
        const int64_t x = bx + tx;
        const bool in = zy_in && inside_volume(g, 2, x);
        if (!in && !constant_padding) continue;
        const scalar_t* k_src;
        const scalar_t* v_src;
        if (in) {
          k_src = p.key + p.key_strides.offset(b, z, y, x, h);
          v_src = p.value + p.value_strides.offset(b, z, y, x, h);
          t.key_pos[nk] = z * plane + y * g.volume[2] + x;
        } else {
          k_src = p.pad_key + h * hd;
          v_src = p.pad_value + h * hd;
          t.key_pos[nk] = -1;
        }
        acc_t* k_row = t.k + nk * hd;
        acc_t* v_row = t.v + nk * hd;
        for (int64_t d = 0; d < hd; ++d) {
          k_row[d] = to_acc(k_src[d]);
          v_row[d] = to_acc(v_src[d]);
          t.kt[d * t.max_keys + nk] = k_row[d];
        }
        if (with_values_transposed)
          for (int64_t d = 0; d < hd; ++d) t.vt[d * t.max_keys + nk] = v_row[d];
        t.key_bias[nk] = (tz * eh + ty) * ew + tx + bias_origin;
        ++nk;
      }
    }
  }
  t.num_keys = nk;
}

// Scores of query row i against every gathered key: scale * <q, k> + bias.
template <typename scalar_t, typename acc_t>
XK_ALWAYS_INLINE void window_scores(const AttentionParams<scalar_t, acc_t>& p, const scalar_t* bias,
                                    const WindowTiles<acc_t>& t, int64_t i, acc_t* __restrict s) {
  const int64_t nk = t.num_keys, hd = p.head_dim;
  const acc_t* __restrict q = t.q + i * hd;
  for (int64_t j = 0; j < nk; ++j) s[j] = 0;
  for (int64_t d = 0; d < hd; ++d) {
    const acc_t qd = q[d];
    const acc_t* __restrict kt = t.kt + d * t.max_keys;
    for (int64_t j = 0; j < nk; ++j) s[j] += qd * kt[j];
  }
  if (bias != nullptr) {
    const scalar_t* b = bias - t.query_bias[i];
    for (int64_t j = 0; j < nk; ++j) s[j] += to_acc(b[t.key_bias[j]]);
  }
}

template <typename scalar_t, typename acc_t>
void forward_windows(const AttentionParams<scalar_t, acc_t>& p, int64_t begin, int64_t end,
                     acc_t* scratch, int64_t* index_scratch) {
  const WindowGeometry& g = p.geometry;
  const int64_t nwz = num_windows(g, 0), nwy = num_windows(g, 1), nwx = num_windows(g, 2);
  const int64_t hd = p.head_dim;
  const int64_t voxels = g.volume[0] * g.volume[1] * g.volume[2];
  const int64_t bias_per_head = bias_extent(g, 0) * bias_extent(g, 1) * bias_extent(g, 2);
  WindowTiles<acc_t> t = carve_tiles(g, hd, scratch, index_scratch);

  for (int64_t task = begin; task < end; ++task) {
    // task = ((b * heads + h) * nwz + wz) * nwy + wy) * nwx + wx
    int64_t rest = task;
    const int64_t wx = rest % nwx; rest /= nwx;
    const int64_t wy = rest % nwy; rest /= nwy;
    const int64_t wz = rest % nwz; rest /= nwz;
    const int64_t h = rest % p.heads;
    const int64_t b = rest / p.heads;
    gather_window(p, b, h, wz, wy, wx, false, t);
    const scalar_t* bias = p.rel_pos_bias ? p.rel_pos_bias + h * bias_per_head : nullptr;
    const int64_t nk = t.num_keys;

    for (int64_t i = 0; i < t.num_queries; ++i) {
      acc_t* __restrict s = t.scores;
      window_scores(p, bias, t, i, s);
      acc_t row_max = s[0];
      for (int64_t j = 1; j < nk; ++j) row_max = s[j] > row_max ? s[j] : row_max;
      acc_t row_sum = 0;
      for (int64_t j = 0; j < nk; ++j) {
        s[j] = softmax_exp(s[j] - row_max);
        row_sum += s[j];
      }
      acc_t* __restrict o = t.rows;
      for (int64_t d = 0; d < hd; ++d) o[d] = 0;
      for (int64_t j = 0; j < nk; ++j) {
        const acc_t pj = s[j];
        const acc_t* __restrict v = t.v + j * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] += pj * v[d];
      }
      const acc_t inv_sum = acc_t(1) / row_sum;
      const int64_t pos = t.query_pos[i];
      scalar_t* dst = p.out + (b * voxels + pos) * p.heads * hd + h * hd;
      for (int64_t d = 0; d < hd; ++d) store(dst + d, o[d] * inv_sum);
      p.lse[(b * p.heads + h) * voxels + pos] = row_max + log_acc(row_sum);
    }
  }
}

// Backward over the windows of one colour. Tasks are (b, h, iz, iy) with window indices
// wz = cz + iz * period_z, wy = cy + iy * period_y; each task walks wx = cx + ix * period_x.
// Windows of one colour have disjoint key boxes, so their key/value gradients never collide;
// the colours run one after another, which fixes the order of every sum (bitwise determinism).
// Bias and pad gradients go to the task's own partial slot, reduced later in a fixed order.
template <typename scalar_t, typename acc_t>
void backward_windows(const AttentionParams<scalar_t, acc_t>& p, const int64_t color[3],
                      int64_t begin, int64_t end, acc_t* scratch, int64_t* index_scratch) {
  const WindowGeometry& g = p.geometry;
  const int64_t hd = p.head_dim;
  const int64_t voxels = g.volume[0] * g.volume[1] * g.volume[2];
  const int64_t bias_per_head = bias_extent(g, 0) * bias_extent(g, 1) * bias_extent(g, 2);
  const int64_t count_z = windows_of_color(g, 0, color[0]);
  const int64_t count_y = windows_of_color(g, 1, color[1]);
  const int64_t count_x = windows_of_color(g, 2, color[2]);
  const int64_t slots_z = windows_of_color(g, 0, 0), slots_y = windows_of_color(g, 1, 0);
  const int64_t period_z = color_period(g, 0), period_y = color_period(g, 1), period_x = color_period(g, 2);
  const bool constant_padding = p.pad_key != nullptr;
  WindowTiles<acc_t> t = carve_tiles(g, hd, scratch, index_scratch);

  for (int64_t task = begin; task < end; ++task) {
    int64_t rest = task;
    const int64_t iy = rest % count_y; rest /= count_y;
    const int64_t iz = rest % count_z; rest /= count_z;
    const int64_t h = rest % p.heads;
    const int64_t b = rest / p.heads;
    const int64_t wz = color[0] + iz * period_z, wy = color[1] + iy * period_y;
    acc_t* slot = p.partials ? p.partials + (((b * p.heads + h) * slots_z + iz) * slots_y + iy) * p.partial_stride
                             : nullptr;
    acc_t* grad_bias = slot;                                   // bias_per_head entries, if bias
    acc_t* grad_pad_key = slot ? slot + (p.rel_pos_bias ? bias_per_head : 0) : nullptr;
    acc_t* grad_pad_value = grad_pad_key ? grad_pad_key + hd : nullptr;
    const scalar_t* bias = p.rel_pos_bias ? p.rel_pos_bias + h * bias_per_head : nullptr;

    for (int64_t ix = 0; ix < count_x; ++ix) {
      const int64_t wx = color[2] + ix * period_x;
      gather_window(p, b, h, wz, wy, wx, true, t);
      const int64_t nk = t.num_keys;
      for (int64_t j = 0; j < nk * hd; ++j) {
        t.grad_k[j] = 0;
        t.grad_v[j] = 0;
      }
      for (int64_t i = 0; i < t.num_queries; ++i) {
        const int64_t pos = t.query_pos[i];
        const int64_t token = (b * voxels + pos) * p.heads * hd + h * hd;
        const acc_t lse = p.lse[(b * p.heads + h) * voxels + pos];
        // dO row and delta = <dO, O>.
        acc_t* __restrict dout = t.rows;
        const int64_t z = pos / (g.volume[1] * g.volume[2]);
        const int64_t y = (pos / g.volume[2]) % g.volume[1];
        const int64_t x = pos % g.volume[2];
        const scalar_t* dout_src = p.grad_out + p.grad_out_strides.offset(b, z, y, x, h);
        acc_t delta = 0;
        for (int64_t d = 0; d < hd; ++d) {
          dout[d] = to_acc(dout_src[d]);
          delta += dout[d] * to_acc(p.out[token + d]);
        }
        // P = exp(S - lse), dP = dO V^T, dS = P (dP - delta).
        acc_t* __restrict s = t.scores;
        window_scores(p, bias, t, i, s);
        for (int64_t j = 0; j < nk; ++j) s[j] = softmax_exp(s[j] - lse);
        acc_t* __restrict dp = t.scores + t.max_keys;
        for (int64_t j = 0; j < nk; ++j) dp[j] = 0;
        for (int64_t d = 0; d < hd; ++d) {
          const acc_t g_d = dout[d];
          const acc_t* __restrict vt = t.vt + d * t.max_keys;
          for (int64_t j = 0; j < nk; ++j) dp[j] += g_d * vt[j];
        }
        for (int64_t j = 0; j < nk; ++j) dp[j] = s[j] * (dp[j] - delta);  // dp now holds dS
        // dK += dS (scale q); dV += P dO; dQ = scale * dS K.
        const acc_t* __restrict scaled_q = t.q + i * hd;
        for (int64_t j = 0; j < nk; ++j) {
          const acc_t ds = dp[j];
          const acc_t pj = s[j];
          acc_t* __restrict gk = t.grad_k + j * hd;
          acc_t* __restrict gv = t.grad_v + j * hd;
          for (int64_t d = 0; d < hd; ++d) {
            gk[d] += ds * scaled_q[d];
            gv[d] += pj * dout[d];
          }
        }
        acc_t* __restrict gq = t.rows + hd;
        for (int64_t d = 0; d < hd; ++d) gq[d] = 0;
        for (int64_t j = 0; j < nk; ++j) {
          const acc_t ds = dp[j];
          const acc_t* __restrict k = t.k + j * hd;
          for (int64_t d = 0; d < hd; ++d) gq[d] += ds * k[d];
        }
        scalar_t* gq_dst = p.grad_query + token;
        for (int64_t d = 0; d < hd; ++d) store(gq_dst + d, gq[d] * p.scale);
        if (grad_bias != nullptr) {
          acc_t* gb = grad_bias - t.query_bias[i];
          for (int64_t j = 0; j < nk; ++j) gb[t.key_bias[j]] += dp[j];
        }
      }
      // Scatter the window's key/value gradients; padded keys feed pad_key/pad_value.
      for (int64_t j = 0; j < nk; ++j) {
        const acc_t* gk = t.grad_k + j * hd;
        const acc_t* gv = t.grad_v + j * hd;
        const int64_t pos = t.key_pos[j];
        if (pos >= 0) {
          const int64_t token = (b * voxels + pos) * p.heads * hd + h * hd;
          acc_t* dk = p.grad_key + token;
          acc_t* dv = p.grad_value + token;
          for (int64_t d = 0; d < hd; ++d) {
            dk[d] += gk[d];
            dv[d] += gv[d];
          }
        } else if (constant_padding) {
          for (int64_t d = 0; d < hd; ++d) {
            grad_pad_key[d] += gk[d];
            grad_pad_value[d] += gv[d];
          }
        }
      }
    }
  }
}
