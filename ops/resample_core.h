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

// One spatial axis of one sample point: the two neighbouring grid indices
// (already inside [0, n-1]), their interpolation weights (0 for a corner
// outside the image in zeros mode) and the derivatives of those weights with
// respect to the coordinate.
template <typename T>
struct Axis {
  int64_t i0, i1;
  T w0, w1;
  T d0, d1;
};

template <typename T>
DIRNET_HD void setup_axis(T x, int64_t n, int boundary, Axis<T>& a) {
  const T last = static_cast<T>(n - 1);
  if (boundary == kBorder) {
    // Derivative of the clamp: 1 inside [0, n-1] (edges included), else 0.
    const T inside = (x >= T(0) && x <= last) ? T(1) : T(0);
    T xc = (x >= T(0)) ? x : T(0);  // NaN and x < 0 -> 0
    xc = (xc <= last) ? xc : last;   // +inf and x > n-1 -> n-1
    const T f = floor_of(xc);
    const int64_t i = static_cast<int64_t>(f);  // in [0, n-1]
    const T t = xc - f;
    a.i0 = i;
    a.i1 = (i + 1 < n) ? i + 1 : i;
    a.w0 = T(1) - t;
    a.w1 = t;
    a.d0 = -inside;
    a.d1 = inside;
  } else {
    // Only x in [-1, n) touches the image; x == -1 is kept so that the
    // right-sided derivative there (into pixel 0) is reported.
    if (x >= T(-1) && x < static_cast<T>(n)) {
      const T f = floor_of(x);
      const int64_t i = static_cast<int64_t>(f);  // in [-1, n-1]
      const T t = x - f;
      const bool v0 = i >= 0;
      const bool v1 = i + 1 < n;
      a.i0 = v0 ? i : 0;
      a.i1 = v1 ? i + 1 : 0;
      a.w0 = v0 ? T(1) - t : T(0);
      a.w1 = v1 ? t : T(0);
      a.d0 = v0 ? T(-1) : T(0);
      a.d1 = v1 ? T(1) : T(0);
    } else {
      a.i0 = 0;
      a.i1 = 0;
      a.w0 = a.w1 = a.d0 = a.d1 = T(0);
    }
  }
}

// The 2^NDIM corners of one sample point: element offsets (relative to the
// start of the batch item, channel 0), weights, and for each axis d the
// derivative of each corner weight with respect to coordinate d.
template <int NDIM, typename T>
struct Corners {
  static constexpr int kCorners = 1 << NDIM;
  int64_t off[kCorners];
  T w[kCorners];
  T dw[NDIM][kCorners];
};

// Corner k has bit (NDIM-1-d) of k selecting the high neighbour on axis d,
// so k enumerates corners in row-major order (k = 0 is all-low).
template <int NDIM, typename T>
DIRNET_HD void setup_corners(const T* DIRNET_RESTRICT x, const ResampleShape& s,
                             Corners<NDIM, T>& c) {
  Axis<T> ax[NDIM];
  int64_t stride[NDIM];
  int64_t st = s.channels;
DIRNET_UNROLL
  for (int d = NDIM - 1; d >= 0; --d) {
    stride[d] = st;
    st *= s.size[d];
  }
DIRNET_UNROLL
  for (int d = 0; d < NDIM; ++d) setup_axis<T>(x[d], s.size[d], s.boundary, ax[d]);
DIRNET_UNROLL
  for (int k = 0; k < Corners<NDIM, T>::kCorners; ++k) {
    int64_t off = 0;
    T w = T(1);
DIRNET_UNROLL
    for (int d = 0; d < NDIM; ++d) {
      const bool hi = (k >> (NDIM - 1 - d)) & 1;
      off += (hi ? ax[d].i1 : ax[d].i0) * stride[d];
      w *= hi ? ax[d].w1 : ax[d].w0;
    }
    c.off[k] = off;
    c.w[k] = w;
DIRNET_UNROLL
    for (int d = 0; d < NDIM; ++d) {
      T g = T(1);
DIRNET_UNROLL
      for (int e = 0; e < NDIM; ++e) {
        const bool hi = (k >> (NDIM - 1 - e)) & 1;
        if (e == d) {
          g *= hi ? ax[e].d1 : ax[e].d0;
        } else {
          g *= hi ? ax[e].w1 : ax[e].w0;
        }
      }
      c.dw[d][k] = g;
    }
  }
}

// Forward value of one point: out[ch] = sum_k w_k * img[off_k + ch].
// CC > 0 fixes the channel count at compile time; CC == 0 uses `channels`.
template <int NDIM, int CC, typename T>
DIRNET_HD void forward_point(const Corners<NDIM, T>& c, const T* DIRNET_RESTRICT img,
                             T* DIRNET_RESTRICT out, int64_t channels) {
  const int64_t nc = CC > 0 ? CC : channels;
  for (int64_t ch = 0; ch < nc; ++ch) {
    T acc = T(0);
DIRNET_UNROLL
    for (int k = 0; k < Corners<NDIM, T>::kCorners; ++k) acc += c.w[k] * img[c.off[k] + ch];
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
template <int NDIM, int CC, bool WITH_IMAGE, typename T, typename Add>
DIRNET_HD void backward_point(const Corners<NDIM, T>& c, const T* DIRNET_RESTRICT img,
                              const T* DIRNET_RESTRICT grad_out, T* grad_img,
                              T* DIRNET_RESTRICT grad_coord, int64_t channels, const Add& add) {
  constexpr int K = Corners<NDIM, T>::kCorners;
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
  for (int d = 0; d < NDIM; ++d) {
    T acc = T(0);
DIRNET_UNROLL
    for (int k = 0; k < K; ++k) acc += c.dw[d][k] * s[k];
    grad_coord[d] = acc;
  }
}

// Whole-point helpers over the flattened point index q in [0, B*P): they
// locate the batch item, set up the corners and run the per-point math.
template <int NDIM, int CC, typename T>
DIRNET_HD void forward_at(int64_t q, const ResampleShape& s, const T* DIRNET_RESTRICT image,
                          const T* DIRNET_RESTRICT coords, T* DIRNET_RESTRICT out) {
  const int64_t b = q / s.points;
  Corners<NDIM, T> c;
  setup_corners<NDIM, T>(coords + q * NDIM, s, c);
  forward_point<NDIM, CC, T>(c, image + b * s.image_stride(), out + q * s.channels, s.channels);
}

// grad_image is the whole [B, *spatial, C] gradient (unused unless WITH_IMAGE).
template <int NDIM, int CC, bool WITH_IMAGE, typename T, typename Add>
DIRNET_HD void backward_at(int64_t q, const ResampleShape& s, const T* DIRNET_RESTRICT image,
                           const T* DIRNET_RESTRICT coords, const T* DIRNET_RESTRICT grad_out,
                           T* grad_image, T* DIRNET_RESTRICT grad_coords, const Add& add) {
  const int64_t b = q / s.points;
  const int64_t item = b * s.image_stride();
  Corners<NDIM, T> c;
  setup_corners<NDIM, T>(coords + q * NDIM, s, c);
  backward_point<NDIM, CC, WITH_IMAGE, T, Add>(c, image + item, grad_out + q * s.channels,
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
