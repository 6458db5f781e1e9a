// Window geometry of window cross attention, shared by every native backend (CPU and CUDA).
//
// These few formulas are the spec (shared/spec/window_cross_attention.md): base window origin,
// key box, padding test, relative-position bias index and the window "colouring" that lets the
// backward scatter key gradients without races. Python mirrors them in
// xmorpher_kernels/_geometry.py. Everything is 64-bit: a volume times heads times head_dim can
// exceed 2^31 elements.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define XK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define XK_HOST_DEVICE inline
#endif

namespace xmorpher_kernels {

// Sizes per axis, in (D, H, W) order.
struct WindowGeometry {
  int64_t volume[3];
  int64_t window[3];
  int64_t search[3];
};

XK_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Base windows along an axis; the last one is partial when volume % window != 0.
XK_HOST_DEVICE int64_t num_windows(const WindowGeometry& g, int axis) {
  return ceil_div(g.volume[axis], g.window[axis]);
}

// Key box margin before the base window origin: (s - w) // 2.
XK_HOST_DEVICE int64_t left_margin(const WindowGeometry& g, int axis) {
  return (g.search[axis] - g.window[axis]) / 2;
}

XK_HOST_DEVICE int64_t window_origin(const WindowGeometry& g, int axis, int64_t window_index) {
  return window_index * g.window[axis];
}

// First position of the key box [start, start + search) of a base window.
XK_HOST_DEVICE int64_t key_box_start(const WindowGeometry& g, int axis, int64_t window_index) {
  return window_origin(g, axis, window_index) - left_margin(g, axis);
}

XK_HOST_DEVICE bool inside_volume(const WindowGeometry& g, int axis, int64_t position) {
  return position >= 0 && position < g.volume[axis];
}

// Number of relative offsets j - p along an axis, the bias extent: s + w - 1.
XK_HOST_DEVICE int64_t bias_extent(const WindowGeometry& g, int axis) {
  return g.search[axis] + g.window[axis] - 1;
}

// Bias index along an axis for key `t` of the box and query `a` of the window. The offset
// j - p = t - l - a, shifted by l + w - 1, is t - a + w - 1: it never depends on the window.
XK_HOST_DEVICE int64_t bias_axis_index(const WindowGeometry& g, int axis, int64_t key_in_box,
                                       int64_t query_in_window) {
  return key_in_box - query_in_window + g.window[axis] - 1;
}

// Windows whose indices differ by a multiple of ceil(s / w) on some axis have disjoint key
// boxes, so the windows of one colour (index mod period, per axis) can scatter to keys in
// parallel without races.
XK_HOST_DEVICE int64_t color_period(const WindowGeometry& g, int axis) {
  return ceil_div(g.search[axis], g.window[axis]);
}

// Windows along an axis whose index is congruent to `color` modulo the period.
XK_HOST_DEVICE int64_t windows_of_color(const WindowGeometry& g, int axis, int64_t color) {
  const int64_t n = num_windows(g, axis);
  return color < n ? ceil_div(n - color, color_period(g, axis)) : 0;
}

}  // namespace xmorpher_kernels
