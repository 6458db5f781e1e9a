// Fused CPU kernels of window cross attention, written once and compiled per instruction set.
//
// Included by window_attention_cpu_isa.h inside `namespace XK_ISA` under a target pragma, so the
// compiler vectorizes the same code for each ISA; window_attention_cpu.cpp picks one at run time.
// Nothing here includes ATen or calls an inline function defined before the pragma that it needs
// vectorized: an inline template instantiated under two targets could be merged by the linker
// into the wider one and fault on older CPUs.
//
// Layout of the computation. A base window's queries are processed in groups of kLanes (8, the
// paper's 2x2x2 window) held in the lanes of one vector: scores, probabilities and the running
// output are stored "transposed", one vector of query lanes per key or per channel. Keys and
// values stay row-major, as they lie in memory, and each multiply broadcasts one of their
// scalars against the query lanes, so no key tile is ever transposed. The key box of a window
// is gathered into a small per-thread tile (at most prod(search) rows); no unfolded key/value
// tensor is ever built. The forward keeps only the log-sum-exp per query; the backward
// recomputes the scores.

constexpr int64_t kLanes = kQueryLanes;

template <typename acc_t>
struct LaneVector;
template <>
struct LaneVector<float> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
};
template <>
struct LaneVector<double> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double))));
};

template <typename acc_t>
using lanes_t = typename LaneVector<acc_t>::type;

template <typename acc_t>
XK_ALWAYS_INLINE lanes_t<acc_t> load_lanes(const acc_t* src) {
  lanes_t<acc_t> v;
  __builtin_memcpy(&v, src, sizeof(v));
  return v;
}
template <typename acc_t>
XK_ALWAYS_INLINE void store_lanes(acc_t* dst, lanes_t<acc_t> v) {
  __builtin_memcpy(dst, &v, sizeof(v));
}
template <typename acc_t>
XK_ALWAYS_INLINE lanes_t<acc_t> splat(acc_t x) {
  return lanes_t<acc_t>{} + x;
}

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

// exp of a vector of scores, branch-free so it stays vectorized (a libm call per score would
// dominate the forward). exp(x) = 2^n exp(r) with |r| <= ln2 / 2 and a degree-6 minimax
// polynomial for exp(r): relative error about 1e-7. Arguments are <= 0 here (scores minus their
// max or their log-sum-exp); below -87 the result flushes to 0.
XK_ALWAYS_INLINE lanes_t<float> exp_lanes(lanes_t<float> x) {
  typedef int32_t int_lanes __attribute__((vector_size(kLanes * sizeof(int32_t))));
  const lanes_t<float> floor_arg = splat(-87.0f);
  const lanes_t<float> clamped = x < floor_arg ? floor_arg : x;
  const lanes_t<float> shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to integer
  const lanes_t<float> rounded = clamped * 1.44269504088896341f + shifter;
  const lanes_t<float> n = rounded - shifter;
  lanes_t<float> r = clamped - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  lanes_t<float> p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const lanes_t<float> y = p * r * r + r + 1.0f;
  const int_lanes exponent = ((int_lanes)rounded - 0x4B400000 + 127) << 23;
  const lanes_t<float> result = y * (lanes_t<float>)exponent;
  return x < floor_arg ? splat(0.0f) : result;
}
// fp64 is the gradcheck path: exact libm exp, lane by lane.
XK_ALWAYS_INLINE lanes_t<double> exp_lanes(lanes_t<double> x) {
  lanes_t<double> y;
  for (int64_t l = 0; l < kLanes; ++l) y[l] = __builtin_exp(x[l]);
  return y;
}
XK_ALWAYS_INLINE float log_acc(float x) { return __builtin_logf(x); }
XK_ALWAYS_INLINE double log_acc(double x) { return __builtin_log(x); }

// Per-thread tiles for one base window (sizes: tile_acc_elements() / tile_index_elements()).
template <typename acc_t>
struct WindowTiles {
  acc_t* qt;         // [head_dim][kLanes]  scale * queries of the current group, transposed
  acc_t* q_rows;     // [kLanes][head_dim]  the same, row-major
  acc_t* acc_t_;     // [head_dim][kLanes]  output (forward) or dQ (backward), transposed
  acc_t* dout_t;     // [head_dim][kLanes]  dO of the group, transposed
  acc_t* dout_rows;  // [kLanes][head_dim]  dO, row-major
  acc_t* k;          // [max_keys][head_dim] converted key rows, when storage != acc_t
  acc_t* v;          // [max_keys][head_dim] converted value rows, likewise
  const acc_t** key_rows;    // [max_keys] each gathered key row (pad_key for padded keys)
  const acc_t** value_rows;  // [max_keys] each gathered value row (pad_value for padded keys)
  acc_t* scores;     // [max_keys][kLanes]  scores, then probabilities
  acc_t* grad_scores;  // [max_keys][kLanes]  dP, then dS
  acc_t* grad_pad;     // [2][head_dim]       the window's gradient of pad_key, then of pad_value
  int64_t* query_pos;   // [max_queries] position z*H*W + y*W + x of each query of the window
  int64_t* query_bias;  // [max_queries] flat bias offset of the query within the window
  int64_t* key_pos;     // [max_keys] position of each gathered key, -1 when padded
  int64_t* key_bias;    // [max_keys] flat bias offset of the key within the box
  int64_t num_queries;
  int64_t num_keys;
};

template <typename acc_t>
WindowTiles<acc_t> carve_tiles(const WindowGeometry& g, int64_t head_dim, acc_t* acc, int64_t* index,
                               const acc_t** row_pointers) {
  const int64_t nq = g.window[0] * g.window[1] * g.window[2];
  const int64_t nk = g.search[0] * g.search[1] * g.search[2];
  const int64_t group = kLanes * head_dim, box = nk * head_dim;
  WindowTiles<acc_t> t;
  t.qt = acc;
  t.q_rows = t.qt + group;
  t.acc_t_ = t.q_rows + group;
  t.dout_t = t.acc_t_ + group;
  t.dout_rows = t.dout_t + group;
  t.k = t.dout_rows + group;
  t.v = t.k + box;
  t.scores = t.v + box;
  t.grad_scores = t.scores + nk * kLanes;
  t.grad_pad = t.grad_scores + nk * kLanes;
  t.query_pos = index;
  t.query_bias = t.query_pos + nq;
  t.key_pos = t.query_bias + nq;
  t.key_bias = t.key_pos + nk;
  t.key_rows = row_pointers;
  t.value_rows = row_pointers + nk;
  t.num_queries = 0;
  t.num_keys = 0;
  return t;
}

// A token row in the accumulation type: the row itself when it is stored in that type, else
// converted into `buffer`.
template <typename acc_t>
XK_ALWAYS_INLINE const acc_t* as_acc_rows(const acc_t* src, acc_t*, int64_t) {
  return src;
}
XK_ALWAYS_INLINE const float* as_acc_rows(const uint16_t* src, float* buffer, int64_t hd) {
  for (int64_t d = 0; d < hd; ++d) buffer[d] = to_acc(src[d]);
  return buffer;
}

// Gathers the query positions of base window (wz, wy, wx) and its key box (rows of key and
// value, for batch b and head h). The flat bias index of (query i, key j) is
// key_bias[j] - query_bias[i], by bias_axis_index().
template <typename scalar_t, typename acc_t>
void gather_window(const AttentionParams<scalar_t, acc_t>& p, int64_t b, int64_t h, int64_t wz, int64_t wy,
                   int64_t wx, WindowTiles<acc_t>& t) {
  const WindowGeometry& g = p.geometry;
  const int64_t hd = p.head_dim;
  const int64_t plane = g.volume[1] * g.volume[2];
  const int64_t oz = window_origin(g, 0, wz), oy = window_origin(g, 1, wy), ox = window_origin(g, 2, wx);

  int64_t nq = 0;
  for (int64_t az = 0; az < g.window[0] && oz + az < g.volume[0]; ++az)
    for (int64_t ay = 0; ay < g.window[1] && oy + ay < g.volume[1]; ++ay)
      for (int64_t ax = 0; ax < g.window[2] && ox + ax < g.volume[2]; ++ax) {
        t.query_pos[nq] = (oz + az) * plane + (oy + ay) * g.volume[2] + (ox + ax);
        t.query_bias[nq] = bias_query_part(g, az, ay, ax);
        ++nq;
      }
  t.num_queries = nq;

  const bool constant_padding = p.pad_key != nullptr;
  const int64_t bz = key_box_start(g, 0, wz), by = key_box_start(g, 1, wy), bx = key_box_start(g, 2, wx);
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
        const scalar_t* k_src = in ? p.key + p.key_strides.offset(b, z, y, x, h) : p.pad_key + h * hd;
        const scalar_t* v_src = in ? p.value + p.value_strides.offset(b, z, y, x, h) : p.pad_value + h * hd;
        t.key_rows[nk] = as_acc_rows(k_src, t.k + nk * hd, hd);
        t.value_rows[nk] = as_acc_rows(v_src, t.v + nk * hd, hd);
        t.key_pos[nk] = in ? z * plane + y * g.volume[2] + x : -1;
        t.key_bias[nk] = bias_key_part(g, tz, ty, tx);
        ++nk;
      }
    }
  }
  t.num_keys = nk;
}

// Loads rows [first, first + count) of a window's tokens from `src` into lanes: `rows`
// [kLanes][hd] and `transposed` [hd][kLanes], times `factor`; lanes past `count` are zero.
template <typename scalar_t, typename acc_t>
void load_group(const scalar_t* src, const TokenStrides& strides, const AttentionParams<scalar_t, acc_t>& p,
                const WindowTiles<acc_t>& t, int64_t b, int64_t h, int64_t first, int64_t count, acc_t factor,
                acc_t* __restrict rows, acc_t* __restrict transposed) {
  const int64_t hd = p.head_dim;
  const WindowGeometry& g = p.geometry;
  for (int64_t l = 0; l < kLanes; ++l) {
    acc_t* row = rows + l * hd;
    if (l < count) {
      const VoxelCoords v = voxel_coords(g, t.query_pos[first + l]);
      const scalar_t* s = src + strides.offset(b, v.z, v.y, v.x, h);
      for (int64_t d = 0; d < hd; ++d) row[d] = to_acc(s[d]) * factor;
    } else {
      for (int64_t d = 0; d < hd; ++d) row[d] = 0;
    }
    for (int64_t d = 0; d < hd; ++d) transposed[d * kLanes + l] = row[d];
  }
}

// Independent accumulators per micro-kernel step: enough chains of FMAs to cover their latency.
constexpr int64_t kUnroll = 8;

// out[j] = sum_d lanes[d] * rows[j][d] for every key j: a dot product of each row with every
// query lane (scores = Q K^T, dP = dO V^T), kUnroll rows at a time.
template <typename acc_t>
XK_ALWAYS_INLINE void lanes_dot_rows(const acc_t* __restrict lanes, const acc_t* const* rows, int64_t num_rows,
                                     int64_t hd, acc_t* __restrict out) {
  using vec = lanes_t<acc_t>;
  int64_t j = 0;
  for (; j + kUnroll <= num_rows; j += kUnroll) {
    const acc_t* r[kUnroll];
    vec s[kUnroll];
    for (int64_t u = 0; u < kUnroll; ++u) {
      r[u] = rows[j + u];
      s[u] = splat<acc_t>(0);
    }
    for (int64_t d = 0; d < hd; ++d) {
      const vec q = load_lanes(lanes + d * kLanes);
      for (int64_t u = 0; u < kUnroll; ++u) s[u] += q * r[u][d];
    }
    for (int64_t u = 0; u < kUnroll; ++u) store_lanes(out + (j + u) * kLanes, s[u]);
  }
  for (; j < num_rows; ++j) {
    const acc_t* r = rows[j];
    vec s = splat<acc_t>(0);
    for (int64_t d = 0; d < hd; ++d) s += load_lanes(lanes + d * kLanes) * r[d];
    store_lanes(out + j * kLanes, s);
  }
}

// out[d] = sum_j weights[j] * rows[j][d] for every channel d: the rows weighted by each query
// lane (output = P V, dQ = dS K), kUnroll channels at a time.
template <typename acc_t>
XK_ALWAYS_INLINE void rows_weighted_by_lanes(const acc_t* __restrict weights, const acc_t* const* rows,
                                             int64_t num_rows, int64_t hd, acc_t* __restrict out) {
  using vec = lanes_t<acc_t>;
  int64_t d = 0;
  for (; d + kUnroll <= hd; d += kUnroll) {
    vec a[kUnroll];
    for (int64_t u = 0; u < kUnroll; ++u) a[u] = splat<acc_t>(0);
    for (int64_t j = 0; j < num_rows; ++j) {
      const vec w = load_lanes(weights + j * kLanes);
      const acc_t* r = rows[j] + d;
      for (int64_t u = 0; u < kUnroll; ++u) a[u] += w * r[u];
    }
    for (int64_t u = 0; u < kUnroll; ++u) store_lanes(out + (d + u) * kLanes, a[u]);
  }
  for (; d < hd; ++d) {
    vec a = splat<acc_t>(0);
    for (int64_t j = 0; j < num_rows; ++j) a += load_lanes(weights + j * kLanes) * rows[j][d];
    store_lanes(out + d * kLanes, a);
  }
}

// out[d] += sum_l weights[l] * rows[l][d]: a row combined from the query lanes (dK = dS^T (scale Q),
// dV = P^T dO for one key).
template <typename acc_t>
XK_ALWAYS_INLINE void add_lane_combination(const acc_t* __restrict weights, const acc_t* __restrict rows, int64_t hd,
                                           acc_t* __restrict out) {
  static_assert(kLanes == 8, "the unrolled lane sum assumes 8 lanes");
  const acc_t w0 = weights[0], w1 = weights[1], w2 = weights[2], w3 = weights[3], w4 = weights[4], w5 = weights[5],
              w6 = weights[6], w7 = weights[7];
  const acc_t *r0 = rows, *r1 = rows + hd, *r2 = rows + 2 * hd, *r3 = rows + 3 * hd, *r4 = rows + 4 * hd,
              *r5 = rows + 5 * hd, *r6 = rows + 6 * hd, *r7 = rows + 7 * hd;
  for (int64_t d = 0; d < hd; ++d) {
    out[d] += ((w0 * r0[d] + w1 * r1[d]) + (w2 * r2[d] + w3 * r3[d])) + ((w4 * r4[d] + w5 * r5[d]) + (w6 * r6[d] + w7 * r7[d]));
  }
}

// Scores of the current query group: scale * <q, k> (+ bias) for every gathered key.
template <typename scalar_t, typename acc_t>
XK_ALWAYS_INLINE void group_scores(const AttentionParams<scalar_t, acc_t>& p, const scalar_t* bias,
                                   const WindowTiles<acc_t>& t, int64_t first, int64_t count) {
  lanes_dot_rows(t.qt, t.key_rows, t.num_keys, p.head_dim, t.scores);
  if (bias == nullptr) return;
  for (int64_t j = 0; j < t.num_keys; ++j) {
    const scalar_t* b = bias + t.key_bias[j];
    acc_t* s = t.scores + j * kLanes;
    for (int64_t l = 0; l < count; ++l) s[l] += to_acc(b[-t.query_bias[first + l]]);
  }
}

template <typename scalar_t, typename acc_t>
void forward_windows(const AttentionParams<scalar_t, acc_t>& p, int64_t begin, int64_t end, acc_t* scratch,
                     int64_t* index_scratch, const acc_t** row_scratch) {
  using vec = lanes_t<acc_t>;
  const WindowGeometry& g = p.geometry;
  const int64_t nwz = num_windows(g, 0), nwy = num_windows(g, 1), nwx = num_windows(g, 2);
  const int64_t hd = p.head_dim;
  const int64_t voxels = g.volume[0] * g.volume[1] * g.volume[2];
  const int64_t bias_per_head = bias_extent(g, 0) * bias_extent(g, 1) * bias_extent(g, 2);
  WindowTiles<acc_t> t = carve_tiles(g, hd, scratch, index_scratch, row_scratch);

  for (int64_t task = begin; task < end; ++task) {
    const TaskCoords w = split_task(task, p.heads, nwz, nwy, nwx);
    const int64_t b = w.b, h = w.h;
    gather_window(p, b, h, w.z, w.y, w.x, t);
    const scalar_t* bias = p.rel_pos_bias ? p.rel_pos_bias + h * bias_per_head : nullptr;
    const int64_t nk = t.num_keys;

    for (int64_t first = 0; first < t.num_queries; first += kLanes) {
      const int64_t count = t.num_queries - first < kLanes ? t.num_queries - first : kLanes;
      load_group(p.query, p.query_strides, p, t, b, h, first, count, p.scale, t.q_rows, t.qt);
      group_scores(p, bias, t, first, count);
      vec row_max = load_lanes(t.scores);
      for (int64_t j = 1; j < nk; ++j) {
        const vec s = load_lanes(t.scores + j * kLanes);
        row_max = s > row_max ? s : row_max;
      }
      vec row_sum = splat<acc_t>(0);
      for (int64_t j = 0; j < nk; ++j) {
        const vec e = exp_lanes(load_lanes(t.scores + j * kLanes) - row_max);
        store_lanes(t.scores + j * kLanes, e);
        row_sum += e;
      }
      rows_weighted_by_lanes(t.scores, t.value_rows, nk, hd, t.acc_t_);
      for (int64_t l = 0; l < count; ++l) {
        const int64_t pos = t.query_pos[first + l];
        const acc_t inv_sum = acc_t(1) / row_sum[l];
        scalar_t* dst = p.out + (b * voxels + pos) * p.heads * hd + h * hd;
        for (int64_t d = 0; d < hd; ++d) store(dst + d, t.acc_t_[d * kLanes + l] * inv_sum);
        p.lse[(b * p.heads + h) * voxels + pos] = row_max[l] + log_acc(row_sum[l]);
      }
    }
  }
}

// Backward over the base windows of one colour: the windows with wz = color + iz * period
// (period = ceil(sd / wd), see color_period()). Task (b, h, iz) walks every window of its
// z-plane in a fixed order; planes of one colour are far enough apart that their key boxes are
// disjoint, so tasks accumulate key/value gradients straight into dK/dV without races, and the
// colours run one after another, which fixes the order of every sum (bitwise determinism,
// whatever the thread count). Each task's key rows stay within a few planes (cache friendly).
// Bias and pad gradients go to the task's own partial slot, reduced later in a fixed order.
template <typename scalar_t, typename acc_t>
void backward_windows(const AttentionParams<scalar_t, acc_t>& p, int64_t color, int64_t begin, int64_t end,
                      acc_t* scratch, int64_t* index_scratch, const acc_t** row_scratch) {
  using vec = lanes_t<acc_t>;
  const WindowGeometry& g = p.geometry;
  const int64_t hd = p.head_dim;
  const int64_t voxels = g.volume[0] * g.volume[1] * g.volume[2];
  const int64_t bias_per_head = bias_extent(g, 0) * bias_extent(g, 1) * bias_extent(g, 2);
  const int64_t count_z = windows_of_color(g, 0, color);
  const int64_t slots_z = windows_of_color(g, 0, 0);
  const int64_t nwy = num_windows(g, 1), nwx = num_windows(g, 2);
  const bool constant_padding = p.pad_key != nullptr;
  WindowTiles<acc_t> t = carve_tiles(g, hd, scratch, index_scratch, row_scratch);

  for (int64_t task = begin; task < end; ++task) {
    const TaskCoords plane = split_task(task, p.heads, count_z, 1, 1);
    const int64_t iz = plane.z, h = plane.h, b = plane.b;
    const int64_t wz = color + iz * color_period(g, 0);
    double* slot = p.partials ? p.partials + ((b * p.heads + h) * slots_z + iz) * p.partial_stride : nullptr;
    double* grad_bias = p.rel_pos_bias ? slot : nullptr;
    double* grad_pad = constant_padding ? slot + (p.rel_pos_bias ? bias_per_head : 0) : nullptr;
    const scalar_t* bias = p.rel_pos_bias ? p.rel_pos_bias + h * bias_per_head : nullptr;

    for (int64_t window = 0; window < nwy * nwx; ++window) {
      gather_window(p, b, h, wz, window / nwx, window % nwx, t);
      const int64_t nk = t.num_keys;
      for (int64_t d = 0; d < 2 * hd; ++d) t.grad_pad[d] = 0;
      for (int64_t first = 0; first < t.num_queries; first += kLanes) {
        const int64_t count = t.num_queries - first < kLanes ? t.num_queries - first : kLanes;
        load_group(p.query, p.query_strides, p, t, b, h, first, count, p.scale, t.q_rows, t.qt);
        load_group(p.grad_out, p.grad_out_strides, p, t, b, h, first, count, acc_t(1), t.dout_rows, t.dout_t);
        // delta = <dO, O> and the log-sum-exp of each query lane.
        vec delta = splat<acc_t>(0), lse = splat<acc_t>(0);
        for (int64_t l = 0; l < count; ++l) {
          const int64_t pos = t.query_pos[first + l];
          const scalar_t* o = p.out + (b * voxels + pos) * p.heads * hd + h * hd;
          acc_t sum = 0;
          for (int64_t d = 0; d < hd; ++d) sum += t.dout_rows[l * hd + d] * to_acc(o[d]);
          delta[l] = sum;
          lse[l] = p.lse[(b * p.heads + h) * voxels + pos];
        }
        // P = exp(S - lse); dP = dO V^T; dS = P (dP - delta).
        group_scores(p, bias, t, first, count);
        for (int64_t j = 0; j < nk; ++j)
          store_lanes(t.scores + j * kLanes, exp_lanes(load_lanes(t.scores + j * kLanes) - lse));
        lanes_dot_rows(t.dout_t, t.value_rows, nk, hd, t.grad_scores);
        for (int64_t j = 0; j < nk; ++j) {
          const vec prob = load_lanes(t.scores + j * kLanes);
          store_lanes(t.grad_scores + j * kLanes, prob * (load_lanes(t.grad_scores + j * kLanes) - delta));
        }
        // dQ = scale * dS K.
        rows_weighted_by_lanes(t.grad_scores, t.key_rows, nk, hd, t.acc_t_);
        for (int64_t l = 0; l < count; ++l) {
          const int64_t pos = t.query_pos[first + l];
          scalar_t* dst = p.grad_query + (b * voxels + pos) * p.heads * hd + h * hd;
          for (int64_t d = 0; d < hd; ++d) store(dst + d, t.acc_t_[d * kLanes + l] * p.scale);
        }
        // dK += dS (scale q) and dV += P dO, straight into the gradients: this task owns the
        // key box (see above). Padded keys feed pad_key/pad_value; padded lanes are zero.
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t pos = t.key_pos[j];
          const int64_t token = (b * voxels + pos) * p.heads * hd + h * hd;
          add_lane_combination(t.grad_scores + j * kLanes, t.q_rows, hd, pos >= 0 ? p.grad_key + token : t.grad_pad);
          add_lane_combination(t.scores + j * kLanes, t.dout_rows, hd,
                               pos >= 0 ? p.grad_value + token : t.grad_pad + hd);
        }
        if (grad_bias != nullptr) {
          for (int64_t j = 0; j < nk; ++j) {
            double* gb = grad_bias + t.key_bias[j];
            const acc_t* ds = t.grad_scores + j * kLanes;
            for (int64_t l = 0; l < count; ++l) gb[-t.query_bias[first + l]] += ds[l];
          }
        }
      }
      if (grad_pad != nullptr)
        for (int64_t d = 0; d < 2 * hd; ++d) grad_pad[d] += t.grad_pad[d];
    }
  }
}
