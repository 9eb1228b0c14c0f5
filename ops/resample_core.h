// Per-point math of the multilinear resampler, shared by the CPU kernel
// (resample_kernels.cc), the CUDA kernels (resample_kernels.cu.cc) and the
// standalone GPU test harness (gpu_harness.cu).  It depends on nothing but
// the C++ standard library, so it compiles with g++ and nvcc alike.
//
// Conventions (the public contract of dirnet_tf.resample):
//   * image  [B, *spatial, C] (row-major, channels last), spatial = 2 or 3 axes;
//   * coords [B, P, ndim] (output axes flattened), absolute ij pixel coordinates;
//   * kZeros : corners outside the image contribute 0 (scipy "grid-constant");
//   * kBorder: a coordinate is clamped to [0, n-1] first (scipy "nearest"),
//              and its derivative is 0 outside that interval;
//   * at integer coordinates the derivative is the one of the cell
//     [floor(x), floor(x)+1], i.e. the right-sided derivative.
//
// Hostile coordinates: every float->int conversion happens on a value already
// known to lie in [-1, n-1] (zeros) or clamped to [0, n-1] (border); NaN fails
// every comparison and so takes the "outside" path (zeros) or is sent to 0
// (border).  All memory offsets are computed from indices clamped into the
// image, in 64-bit arithmetic.
#ifndef DIRNET_OPS_RESAMPLE_CORE_H_
#define DIRNET_OPS_RESAMPLE_CORE_H_

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DIRNET_HD __host__ __device__ __forceinline__
#else
#define DIRNET_HD inline __attribute__((always_inline))
#endif

#if defined(__CUDACC__) || defined(__GNUC__)
#define DIRNET_RESTRICT __restrict__
#else
#define DIRNET_RESTRICT
#endif

#if defined(__CUDACC__) || defined(__clang__)
#define DIRNET_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define DIRNET_UNROLL _Pragma("GCC unroll 8")
#else
#define DIRNET_UNROLL
#endif

namespace dirnet {

template <typename T>
DIRNET_HD T floor_of(T x) {
#if defined(__CUDA_ARCH__)
  return floor(x);
#else
  return std::floor(x);
#endif
}

enum Boundary : int { kZeros = 0, kBorder = 1 };

// Shape of one resampling problem, independent of any framework.
struct ResampleShape {
  int ndim = 2;              // number of spatial axes (2 or 3)
  int64_t batch = 0;         // B
  int64_t size[3] = {1, 1, 1};  // spatial sizes; only the first ndim are used
  int64_t channels = 0;      // C
  int64_t points = 0;        // output points per batch item (product of out axes)
  int boundary = kZeros;

  // Elements of one batch item of the image.
  DIRNET_HD int64_t image_stride() const {
    int64_t s = channels;
    for (int d = 0; d < ndim; ++d) s *= size[d];
    return s;
  }
};

// Per-axis constants of a problem, computed once (not per point).
template <int NDIM, typename T>
struct Grid {
  int64_t size[NDIM];
  int64_t stride[NDIM];  // elements between neighbours along the axis
  T sizef[NDIM];
  T lastf[NDIM];  // size - 1
  int boundary;
};

template <int NDIM, typename T>
DIRNET_HD Grid<NDIM, T> make_grid(const ResampleShape& s) {
  Grid<NDIM, T> g;
  int64_t st = s.channels;
DIRNET_UNROLL
  for (int d = NDIM - 1; d >= 0; --d) {
    g.size[d] = s.size[d];
    g.stride[d] = st;
    g.sizef[d] = static_cast<T>(s.size[d]);
    g.lastf[d] = static_cast<T>(s.size[d] - 1);
    st *= s.size[d];
  }
  g.boundary = s.boundary;
  return g;
}

// One spatial axis of one sample point: element offsets of the two
// neighbouring grid lines (indices clamped into [0, n-1], times the stride),
// their interpolation weights (0 for a line outside the image in zeros mode)
// and the derivatives of those weights with respect to the coordinate.
// I is the offset type (int64_t in every kernel: 64-bit indexing throughout).
template <typename T, typename I = int64_t>
struct Axis {
  I o0, o1;
  T w0, w1;
  T d0, d1;
};

// Written with selects; compilers may still emit branches, which are cheap
// and well predicted for the near-identity coordinates of registration.
template <typename T, typename I = int64_t>
DIRNET_HD void setup_axis(T x, I n, T nf, T last, I stride, int boundary, Axis<T, I>& a) {
  if (boundary == kBorder) {
    // Derivative of the clamp: 1 inside [0, n-1] (edges included), else 0.
    const T inside = (x >= T(0) && x <= last) ? T(1) : T(0);
    T xc = (x >= T(0)) ? x : T(0);  // NaN and x < 0 -> 0
    xc = (xc <= last) ? xc : last;   // +inf and x > n-1 -> n-1
    const T f = floor_of(xc);
    const I i = static_cast<I>(f);  // in [0, n-1]
    const T t = xc - f;
    a.o0 = i * stride;
    a.o1 = ((i + 1 < n) ? i + 1 : i) * stride;
    a.w0 = T(1) - t;
    a.w1 = t;
    a.d0 = -inside;
    a.d1 = inside;
  } else {
    // Only x in [-1, n) touches the image (x == -1 is kept so that the
    // right-sided derivative there, into pixel 0, is reported).  Everything
    // else -- NaN, +-inf, huge -- becomes -2, whose two lines are both outside.
    const bool touches = x >= T(-1) && x < nf;
    const T xs = touches ? x : T(-2);
    const T f = floor_of(xs);
    const I i = static_cast<I>(f);  // -2 or in [-1, n-1]
    const T t = xs - f;
    const bool v0 = i >= 0;
    const bool v1 = i >= -1 && i + 1 < n;
    a.o0 = (v0 ? i : 0) * stride;
    a.o1 = (v1 ? i + 1 : 0) * stride;
    a.w0 = v0 ? T(1) - t : T(0);
    a.w1 = v1 ? t : T(0);
    a.d0 = v0 ? T(-1) : T(0);
    a.d1 = v1 ? T(1) : T(0);
  }
}

// The 2^NDIM corners of one sample point: element offsets (relative to the
// start of the batch item, channel 0) and weights, plus the per-axis data
// they were built from (the backward pass contracts with its derivatives).
// Corner k has bit (NDIM-1-d) of k selecting the high line on axis d, so k
// enumerates corners in row-major order (k = 0 is all-low).
template <int NDIM, typename T, typename I = int64_t>
struct Corners {
  static constexpr int kCorners = 1 << NDIM;
  I off[kCorners];
  T w[kCorners];
  Axis<T, I> ax[NDIM];
};

// Combines the per-axis data (already in c.ax) into corner offsets/weights.
template <int NDIM, typename T, typename I>
DIRNET_HD void combine_axes(Corners<NDIM, T, I>& c) {
DIRNET_UNROLL
  for (int k = 0; k < Corners<NDIM, T, I>::kCorners; ++k) {
    I off = 0;
    T w = T(1);
DIRNET_UNROLL
    for (int d = 0; d < NDIM; ++d) {
      const bool hi = (k >> (NDIM - 1 - d)) & 1;
      off += hi ? c.ax[d].o1 : c.ax[d].o0;
      w *= hi ? c.ax[d].w1 : c.ax[d].w0;
    }
    c.off[k] = off;
    c.w[k] = w;
  }
}

template <int NDIM, typename T>
DIRNET_HD void setup_corners(const T* DIRNET_RESTRICT x, const Grid<NDIM, T>& g,
                             Corners<NDIM, T>& c) {
DIRNET_UNROLL
  for (int d = 0; d < NDIM; ++d) {
    setup_axis<T, int64_t>(x[d], g.size[d], g.sizef[d], g.lastf[d], g.stride[d], g.boundary,
                           c.ax[d]);
  }
  combine_axes<NDIM, T, int64_t>(c);
}

// Contracts per-corner values v[k] over all axes, axis e with its weights
// (w0, w1) except axis `deriv`, which uses its weight derivatives (d0, d1):
// the derivative of sum_k w_k v_k with respect to coordinate `deriv`.
// Axes are folded last to first, pairing neighbours (2^NDIM - 1 steps).
template <int NDIM, typename T, typename I>
DIRNET_HD T contract(const T* v, const Axis<T, I>* ax, int deriv) {
  T buf[1 << NDIM];
DIRNET_UNROLL
  for (int k = 0; k < (1 << NDIM); ++k) buf[k] = v[k];
DIRNET_UNROLL
  for (int e = NDIM - 1; e >= 0; --e) {
    const T a = e == deriv ? ax[e].d0 : ax[e].w0;
    const T b = e == deriv ? ax[e].d1 : ax[e].w1;
DIRNET_UNROLL
    for (int j = 0; j < (1 << e); ++j) buf[j] = a * buf[2 * j] + b * buf[2 * j + 1];
  }
  return buf[0];
}

// Forward value of one point: out[ch] = sum_k w_k * img[off_k + ch].
// CC > 0 fixes the channel count at compile time; CC == 0 uses `channels`.
template <int NDIM, int CC, typename T, typename I>
DIRNET_HD void forward_point(const Corners<NDIM, T, I>& c, const T* DIRNET_RESTRICT img,
                             T* DIRNET_RESTRICT out, int64_t channels) {
  const int64_t nc = CC > 0 ? CC : channels;
  for (int64_t ch = 0; ch < nc; ++ch) {
    T acc = T(0);
DIRNET_UNROLL
    for (int k = 0; k < Corners<NDIM, T, I>::kCorners; ++k) acc += c.w[k] * img[c.off[k] + ch];
    out[ch] = acc;
  }
}

// Plain accumulation (CPU, or a GPU thread that owns its target).
struct PlainAdd {
  template <typename T>
  DIRNET_HD void operator()(T* p, T v) const { *p += v; }
};

// Backward of one point.  grad_coord[d] receives d out / d x_d contracted with
// grad_out; when WITH_IMAGE, `add(grad_img + off_k + ch, w_k * grad_out[ch])`
// scatters the image gradient.
template <int NDIM, int CC, bool WITH_IMAGE, typename T, typename I, typename Add>
DIRNET_HD void backward_point(const Corners<NDIM, T, I>& c, const T* DIRNET_RESTRICT img,
                              const T* DIRNET_RESTRICT grad_out, T* grad_img,
                              T* DIRNET_RESTRICT grad_coord, int64_t channels, const Add& add) {
  constexpr int K = Corners<NDIM, T, I>::kCorners;
  const int64_t nc = CC > 0 ? CC : channels;
  T s[K];
DIRNET_UNROLL
  for (int k = 0; k < K; ++k) s[k] = T(0);
  for (int64_t ch = 0; ch < nc; ++ch) {
    const T g = grad_out[ch];
DIRNET_UNROLL
    for (int k = 0; k < K; ++k) {
      s[k] += g * img[c.off[k] + ch];
      if (WITH_IMAGE) add(grad_img + c.off[k] + ch, c.w[k] * g);
    }
  }
DIRNET_UNROLL
  for (int d = 0; d < NDIM; ++d) grad_coord[d] = contract<NDIM, T, I>(s, c.ax, d);
}

// Whole-point helpers over the flattened point index q in [0, B*P): they
// locate the batch item, set up the corners and run the per-point math.
template <int NDIM, int CC, typename T>
DIRNET_HD void forward_at(int64_t q, const ResampleShape& s, const Grid<NDIM, T>& g,
                          const T* DIRNET_RESTRICT image, const T* DIRNET_RESTRICT coords,
                          T* DIRNET_RESTRICT out) {
  const int64_t b = q / s.points;
  Corners<NDIM, T> c;
  setup_corners<NDIM, T>(coords + q * NDIM, g, c);
  forward_point<NDIM, CC, T, int64_t>(c, image + b * s.image_stride(), out + q * s.channels, s.channels);
}

// grad_image is the whole [B, *spatial, C] gradient (unused unless WITH_IMAGE).
template <int NDIM, int CC, bool WITH_IMAGE, typename T, typename Add>
DIRNET_HD void backward_at(int64_t q, const ResampleShape& s, const Grid<NDIM, T>& g,
                           const T* DIRNET_RESTRICT image, const T* DIRNET_RESTRICT coords,
                           const T* DIRNET_RESTRICT grad_out, T* grad_image,
                           T* DIRNET_RESTRICT grad_coords, const Add& add) {
  const int64_t b = q / s.points;
  const int64_t item = b * s.image_stride();
  Corners<NDIM, T> c;
  setup_corners<NDIM, T>(coords + q * NDIM, g, c);
  backward_point<NDIM, CC, WITH_IMAGE, T, int64_t, Add>(c, image + item, grad_out + q * s.channels,
                                               WITH_IMAGE ? grad_image + item : nullptr,
                                               grad_coords + q * NDIM, s.channels, add);
}

// Calls f.template run<NDIM, CC>() with the spatial rank and, for the common
// channel counts 1-3, the channel count as compile-time constants (CC == 0:
// any channel count).  Host code only.
template <typename F>
void dispatch_shape(const ResampleShape& s, const F& f) {
  if (s.ndim == 2) {
    switch (s.channels) {
      case 1: return f.template run<2, 1>();
      case 2: return f.template run<2, 2>();
      case 3: return f.template run<2, 3>();
      default: return f.template run<2, 0>();
    }
  } else {
    switch (s.channels) {
      case 1: return f.template run<3, 1>();
      case 2: return f.template run<3, 2>();
      case 3: return f.template run<3, 3>();
      default: return f.template run<3, 0>();
    }
  }
}

}  // namespace dirnet

#endif  // DIRNET_OPS_RESAMPLE_CORE_H_
