// CPU implementations of ResampleFunctor and ResampleGradFunctor.
//
// Framework-independent (the TensorFlow kernel supplies a CpuDevice backed by
// TF's intra-op thread pool; the GPU harness uses a serial one).  Work is split
// over all B*P output points, not only over the batch, so a single image uses
// every core.
#ifndef DIRNET_OPS_RESAMPLE_CPU_H_
#define DIRNET_OPS_RESAMPLE_CPU_H_

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "resample_core.h"
#include "resample_functor.h"
#include "resample_grad_functor.h"

namespace dirnet {
namespace cpu {

// Rough cost of one output point in cycles, used to decide how many shards
// are worth the scheduling overhead (~10 us each).
inline int64_t point_cost(const ResampleShape& s) {
  const int64_t corners = int64_t(1) << s.ndim;
  return 8 * s.ndim + 3 * corners * std::max<int64_t>(s.channels, 1);
}

inline int64_t num_shards(const CpuDevice& d, const ResampleShape& s, int64_t total,
                          int64_t max_per_thread) {
  constexpr int64_t kMinShardCost = 40000;
  const int64_t work = total * point_cost(s);
  const int64_t by_work = std::max<int64_t>(1, work / kMinShardCost);
  const int64_t cap = std::max<int64_t>(1, int64_t(d.num_threads) * max_per_thread);
  return std::min(by_work, cap);
}

// Runs fn(begin, end) over contiguous ranges of the flattened points [0, total)
// in `shards` pieces.
template <typename Fn>
void for_point_ranges(const CpuDevice& d, int64_t total, int64_t shards, const Fn& fn) {
  if (shards <= 1 || !d.parallel_for) {
    fn(int64_t(0), total, int64_t(0));
    return;
  }
  d.parallel_for(shards, [&](int64_t first, int64_t last) {
    for (int64_t sh = first; sh < last; ++sh) {
      const int64_t begin = total * sh / shards;
      const int64_t end = total * (sh + 1) / shards;
      if (begin < end) fn(begin, end, sh);
    }
  });
}

// Forward over the flattened points [begin, end), batch item by batch item.
template <int NDIM, int CC, typename T>
void forward_range(const ResampleShape& s, const T* DIRNET_RESTRICT image,
                   const T* DIRNET_RESTRICT coords, T* DIRNET_RESTRICT out, int64_t begin,
                   int64_t end) {
  const int64_t item = s.image_stride();
  const int64_t nc = s.channels;
  const Grid<NDIM, T> g = make_grid<NDIM, T>(s);
  for (int64_t q = begin; q < end;) {
    const int64_t b = q / s.points;
    const int64_t stop = std::min(end, (b + 1) * s.points);
    const T* DIRNET_RESTRICT img = image + b * item;
    for (; q < stop; ++q) {
      Corners<NDIM, T> c;
      setup_corners<NDIM, T>(coords + q * NDIM, g, c);
      forward_point<NDIM, CC, T, int64_t>(c, img, out + q * nc, nc);
    }
  }
}

// Backward over the flattened points [begin, end).  Image gradients of batch
// item b go to target(b) (nullptr: not wanted).
template <int NDIM, int CC, bool WITH_IMAGE, typename T, typename Target>
void backward_range(const ResampleShape& s, const T* DIRNET_RESTRICT image,
                    const T* DIRNET_RESTRICT coords, const T* DIRNET_RESTRICT grad_out,
                    T* DIRNET_RESTRICT grad_coords, int64_t begin, int64_t end,
                    const Target& target) {
  const int64_t item = s.image_stride();
  const int64_t nc = s.channels;
  const PlainAdd add;
  const Grid<NDIM, T> g = make_grid<NDIM, T>(s);
  for (int64_t q = begin; q < end;) {
    const int64_t b = q / s.points;
    const int64_t stop = std::min(end, (b + 1) * s.points);
    const T* DIRNET_RESTRICT img = image + b * item;
    T* gimg = WITH_IMAGE ? target(b) : nullptr;
    for (; q < stop; ++q) {
      Corners<NDIM, T> c;
      setup_corners<NDIM, T>(coords + q * NDIM, g, c);
      backward_point<NDIM, CC, WITH_IMAGE, T, int64_t, PlainAdd>(
          c, img, grad_out + q * nc, gimg, grad_coords + q * NDIM, nc, add);
    }
  }
}

template <int NDIM, int CC, typename T>
void run_forward(const CpuDevice& d, const ResampleShape& s, const T* image, const T* coords,
                 T* out) {
  const int64_t total = s.batch * s.points;
  const int64_t shards = num_shards(d, s, total, 4);
  for_point_ranges(d, total, shards, [&](int64_t begin, int64_t end, int64_t) {
    forward_range<NDIM, CC, T>(s, image, coords, out, begin, end);
  });
}

template <int NDIM, int CC, typename T>
void run_backward(const CpuDevice& d, const ResampleShape& s, const T* image, const T* coords,
                  const T* grad_out, T* grad_image, T* grad_coords) {
  const int64_t total = s.batch * s.points;
  const int64_t item = s.image_stride();
  if (grad_image == nullptr) {
    const int64_t shards = num_shards(d, s, total, 4);
    for_point_ranges(d, total, shards, [&](int64_t begin, int64_t end, int64_t) {
      backward_range<NDIM, CC, false, T>(s, image, coords, grad_out, grad_coords, begin, end,
                                         [](int64_t) { return static_cast<T*>(nullptr); });
    });
    return;
  }
  const int64_t threads = std::max(1, d.num_threads);
  const int64_t shards = num_shards(d, s, total, 1);
  const bool many_items = s.batch >= 4 * threads;
  if (shards <= 1 || many_items || (s.batch >= shards && s.batch % shards == 0)) {
    // Whole batch items per work unit: every image-gradient item has exactly
    // one writer, no scratch memory.  Each unit zeroes the items it owns right
    // before scattering into them (cache-warm, and the zeroing is parallel).
    const int64_t units =
        std::min(s.batch, many_items ? num_shards(d, s, total, 4) : std::max<int64_t>(shards, 1));
    auto work = [&](int64_t first, int64_t last) {
      const int64_t b0 = s.batch * first / units;
      const int64_t b1 = s.batch * last / units;
      for (int64_t b = b0; b < b1; ++b) {
        T* gimg = grad_image + b * item;
        std::memset(gimg, 0, sizeof(T) * item);
        backward_range<NDIM, CC, true, T>(s, image, coords, grad_out, grad_coords, b * s.points,
                                          (b + 1) * s.points, [gimg](int64_t) { return gimg; });
      }
    };
    if (units <= 1 || !d.parallel_for) {
      work(0, units);
    } else {
      d.parallel_for(units, work);
    }
    return;
  }
  // Fewer batch items than threads (e.g. one large image): split the points
  // evenly.  A batch item is owned by the shard holding its first point, which
  // zeroes it and scatters into it directly; a shard that starts in the middle
  // of an item scatters that item into private scratch, added afterwards.
  std::vector<std::unique_ptr<T[]>> scratch(shards);
  std::vector<int64_t> scratch_item(shards, -1);
  for_point_ranges(d, total, shards, [&](int64_t begin, int64_t end, int64_t sh) {
    const int64_t first_item = begin / s.points;
    const bool split = begin % s.points != 0;
    T* own_scratch = nullptr;
    if (split) {
      scratch[sh].reset(new T[item]());
      scratch_item[sh] = first_item;
      own_scratch = scratch[sh].get();
    }
    const int64_t last_item = (end - 1) / s.points;
    for (int64_t b = split ? first_item + 1 : first_item; b <= last_item; ++b) {
      std::memset(grad_image + b * item, 0, sizeof(T) * item);
    }
    backward_range<NDIM, CC, true, T>(
        s, image, coords, grad_out, grad_coords, begin, end, [&](int64_t b) {
          return (split && b == first_item) ? own_scratch : grad_image + b * item;
        });
  });
  for (int64_t sh = 0; sh < shards; ++sh) {
    if (scratch_item[sh] < 0) continue;
    T* DIRNET_RESTRICT dst = grad_image + scratch_item[sh] * item;
    const T* DIRNET_RESTRICT src = scratch[sh].get();
    const int64_t parts = std::min<int64_t>(threads, std::max<int64_t>(1, item / 16384));
    auto add = [&](int64_t first, int64_t last) {
      const int64_t i0 = item * first / parts;
      const int64_t i1 = item * last / parts;
      for (int64_t i = i0; i < i1; ++i) dst[i] += src[i];
    };
    if (parts <= 1 || !d.parallel_for) {
      add(0, parts);
    } else {
      d.parallel_for(parts, add);
    }
  }
}

template <typename T>
struct ForwardRun {
  const CpuDevice& d;
  const ResampleShape& s;
  const T* image;
  const T* coords;
  T* out;
  template <int NDIM, int CC>
  void run() const {
    run_forward<NDIM, CC, T>(d, s, image, coords, out);
  }
};

template <typename T>
struct BackwardRun {
  const CpuDevice& d;
  const ResampleShape& s;
  const T* image;
  const T* coords;
  const T* grad_out;
  T* grad_image;
  T* grad_coords;
  template <int NDIM, int CC>
  void run() const {
    run_backward<NDIM, CC, T>(d, s, image, coords, grad_out, grad_image, grad_coords);
  }
};

}  // namespace cpu

template <typename T>
struct ResampleFunctor<CpuDevice, T> {
  const char* operator()(const CpuDevice& device, const ResampleShape& shape, const T* image,
                         const T* coords, T* out) const {
    if (shape.ndim != 2 && shape.ndim != 3) return "resample: ndim must be 2 or 3";
    if (shape.batch * shape.points == 0 || shape.channels == 0) return nullptr;
    dispatch_shape(shape, cpu::ForwardRun<T>{device, shape, image, coords, out});
    return nullptr;
  }
};

template <typename T>
struct ResampleGradFunctor<CpuDevice, T> {
  const char* operator()(const CpuDevice& device, const ResampleShape& shape, const T* image,
                         const T* coords, const T* grad_out, T* grad_image,
                         T* grad_coords) const {
    if (shape.ndim != 2 && shape.ndim != 3) return "resample: ndim must be 2 or 3";
    const int64_t total = shape.batch * shape.points;
    if (total == 0 || shape.channels == 0) {
      // Nothing is sampled: every gradient is zero.
      if (grad_image != nullptr) {
        std::memset(grad_image, 0, sizeof(T) * shape.batch * shape.image_stride());
      }
      std::memset(grad_coords, 0, sizeof(T) * total * shape.ndim);
      return nullptr;
    }
    dispatch_shape(shape, cpu::BackwardRun<T>{device, shape, image, coords, grad_out, grad_image,
                                              grad_coords});
    return nullptr;
  }
};

}  // namespace dirnet

#endif  // DIRNET_OPS_RESAMPLE_CPU_H_
