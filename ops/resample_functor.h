// Device-generic entry point of the forward op `Dirnet>Resample`.
//
// The functor works on raw pointers and a ResampleShape, so that the CPU
// implementation (resample_kernels.cc), the CUDA implementation
// (resample_kernels.cu.cc) and the TensorFlow-free GPU harness share it.
#ifndef DIRNET_OPS_RESAMPLE_FUNCTOR_H_
#define DIRNET_OPS_RESAMPLE_FUNCTOR_H_

#include <cstdint>
#include <functional>

#include "resample_core.h"

namespace dirnet {

// CPU execution context: `parallel_for(n, fn)` runs fn(first, last) over the
// work units [0, n) on up to `num_threads` threads (the caller included) and
// returns when all units are done.
struct CpuDevice {
  int num_threads = 1;
  std::function<void(int64_t, const std::function<void(int64_t, int64_t)>&)> parallel_for;
};

// CUDA execution context: the stream (a cudaStream_t) the kernels run on.
struct GpuDevice {
  void* stream = nullptr;
};

// out[b, p, :] = multilinear sample of image[b] at coords[b, p, :].
// Returns nullptr on success, otherwise a static error message.
template <typename Device, typename T>
struct ResampleFunctor {
  const char* operator()(const Device& device, const ResampleShape& shape, const T* image,
                         const T* coords, T* out) const;
};

// Defined and explicitly instantiated (float, double) in resample_kernels.cu.cc.
template <typename T>
struct ResampleFunctor<GpuDevice, T> {
  const char* operator()(const GpuDevice& device, const ResampleShape& shape, const T* image,
                         const T* coords, T* out) const;
};

}  // namespace dirnet

#endif  // DIRNET_OPS_RESAMPLE_FUNCTOR_H_
