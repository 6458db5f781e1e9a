// Window geometry of window cross attention, shared by every native backend (CPU and CUDA).
//
// These few formulas are the contract (docs/contract.md): base window origin, key box, padding
// test, relative-position bias index, the window "colouring" that lets the backward scatter key
// gradients without races, and the split of the kernels' flat task and voxel indices. Python
// mirrors the geometry in xmorpher_kernels/_geometry.py. Everything is 64-bit: a volume times
// heads times head_dim can exceed 2^31 elements.
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

// Flat index into one head's (Ed, Eh, Ew) bias for key (tz, ty, tx) of a box and query
// (az, ay, ax) of its window, by bias_axis_index() on each axis: it splits as
// bias_key_part(key) - bias_query_part(query), so kernels tabulate the two parts apart.
XK_HOST_DEVICE int64_t bias_key_part(const WindowGeometry& g, int64_t tz, int64_t ty, int64_t tx) {
  return (bias_axis_index(g, 0, tz, 0) * bias_extent(g, 1) + bias_axis_index(g, 1, ty, 0)) * bias_extent(g, 2) +
         bias_axis_index(g, 2, tx, 0);
}
XK_HOST_DEVICE int64_t bias_query_part(const WindowGeometry& g, int64_t az, int64_t ay, int64_t ax) {
  return (az * bias_extent(g, 1) + ay) * bias_extent(g, 2) + ax;
}

// A flat task index of the order every kernel enumerates its work in,
// (((b * heads + h) * nz + z) * ny + y) * nx + x, x fastest so that neighbouring tasks share
// keys, split into its coordinates. z, y, x count whatever the kernel tiles by (base windows,
// blocks of windows, voxels); pass 1 for an axis it does not walk.
struct TaskCoords {
  int64_t b, h, z, y, x;
};

XK_HOST_DEVICE TaskCoords split_task(int64_t task, int64_t heads, int64_t nz, int64_t ny, int64_t nx) {
  TaskCoords c;
  c.x = task % nx;
  task /= nx;
  c.y = task % ny;
  task /= ny;
  c.z = task % nz;
  task /= nz;
  c.h = task % heads;
  c.b = task / heads;
  return c;
}

// (z, y, x) of a flat voxel index of the volume, x fastest.
struct VoxelCoords {
  int64_t z, y, x;
};

XK_HOST_DEVICE VoxelCoords voxel_coords(const WindowGeometry& g, int64_t voxel) {
  VoxelCoords c;
  c.x = voxel % g.volume[2];
  voxel /= g.volume[2];
  c.y = voxel % g.volume[1];
  c.z = voxel / g.volume[1];
  return c;
}

XK_HOST_DEVICE int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// Windows along an axis whose key box holds `position` (a voxel inside the volume): the range
// [first, last], empty when first > last. Box w holds it when w*win - l <= position < w*win - l + s.
XK_HOST_DEVICE int64_t first_window_containing(const WindowGeometry& g, int axis, int64_t position) {
  const int64_t first = floor_div(position + left_margin(g, axis) - g.search[axis], g.window[axis]) + 1;
  return first > 0 ? first : 0;
}
XK_HOST_DEVICE int64_t last_window_containing(const WindowGeometry& g, int axis, int64_t position) {
  const int64_t last = (position + left_margin(g, axis)) / g.window[axis];
  return last < num_windows(g, axis) - 1 ? last : num_windows(g, axis) - 1;
}

}  // namespace xmorpher_kernels
