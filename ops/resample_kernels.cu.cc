// CUDA implementations of ResampleFunctor and ResampleGradFunctor.
//
// Grid-stride kernels over the flattened B*P output points, one thread per
// point, using the per-point math of resample_core.h.  This file includes no
// TensorFlow header: the TF kernels (resample_kernels.cc) pass the stream,
// and the standalone harness (gpu_harness.cu) links it directly.
//
// Non-determinism: the image gradient is accumulated with atomicAdd (several
// output points share image pixels), so its float rounding -- not its value
// up to rounding -- depends on the thread schedule and can differ between
// runs.  The forward pass and the coordinate gradient are deterministic.
#if GOOGLE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "resample_core.h"
#include "resample_functor.h"
#include "resample_grad_functor.h"

namespace dirnet {
namespace gpu {

constexpr int kThreads = 256;

// Corners outside the image (zeros mode) carry weight 0 and point at element
// 0 of the item; skipping those exact no-op adds avoids piling atomics onto
// that one address when many samples fall outside.
struct AtomicAdd {
  template <typename T>
  __device__ __forceinline__ void operator()(T* p, T v) const {
    if (v != T(0)) atomicAdd(p, v);
  }
};

template <int NDIM, int CC, typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(ResampleShape s, int64_t total, const T* __restrict__ image,
                   const T* __restrict__ coords, T* __restrict__ out) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const Grid<NDIM, T> g = make_grid<NDIM, T>(s);
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < total;
       q += step) {
    forward_at<NDIM, CC, T>(q, s, g, image, coords, out);
  }
}

template <int NDIM, int CC, bool WITH_IMAGE, typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(ResampleShape s, int64_t total, const T* __restrict__ image,
                    const T* __restrict__ coords, const T* __restrict__ grad_out,
                    T* grad_image, T* __restrict__ grad_coords) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const AtomicAdd add;
  const Grid<NDIM, T> g = make_grid<NDIM, T>(s);
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < total;
       q += step) {
    backward_at<NDIM, CC, WITH_IMAGE, T, AtomicAdd>(q, s, g, image, coords, grad_out, grad_image,
                                                    grad_coords, add);
  }
}

inline int num_blocks(int64_t total) {
  // Enough blocks to fill any current GPU; the grid-stride loop covers the rest.
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65536)));
}

template <typename T>
struct ForwardLaunch {
  cudaStream_t stream;
  const ResampleShape& s;
  int64_t total;
  const T* image;
  const T* coords;
  T* out;
  template <int NDIM, int CC>
  void run() const {
    forward_kernel<NDIM, CC, T>
        <<<num_blocks(total), kThreads, 0, stream>>>(s, total, image, coords, out);
  }
};

template <typename T>
struct BackwardLaunch {
  cudaStream_t stream;
  const ResampleShape& s;
  int64_t total;
  const T* image;
  const T* coords;
  const T* grad_out;
  T* grad_image;
  T* grad_coords;
  template <int NDIM, int CC>
  void run() const {
    if (grad_image != nullptr) {
      backward_kernel<NDIM, CC, true, T><<<num_blocks(total), kThreads, 0, stream>>>(
          s, total, image, coords, grad_out, grad_image, grad_coords);
    } else {
      backward_kernel<NDIM, CC, false, T><<<num_blocks(total), kThreads, 0, stream>>>(
          s, total, image, coords, grad_out, grad_image, grad_coords);
    }
  }
};

inline const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace gpu

template <typename T>
const char* ResampleFunctor<GpuDevice, T>::operator()(const GpuDevice& device,
                                                      const ResampleShape& shape, const T* image,
                                                      const T* coords, T* out) const {
  if (shape.ndim != 2 && shape.ndim != 3) return "resample: ndim must be 2 or 3";
  const int64_t total = shape.batch * shape.points;
  if (total == 0 || shape.channels == 0) return nullptr;
  auto stream = static_cast<cudaStream_t>(device.stream);
  dispatch_shape(shape, gpu::ForwardLaunch<T>{stream, shape, total, image, coords, out});
  return gpu::last_error();
}

template <typename T>
const char* ResampleGradFunctor<GpuDevice, T>::operator()(const GpuDevice& device,
                                                          const ResampleShape& shape,
                                                          const T* image, const T* coords,
                                                          const T* grad_out, T* grad_image,
                                                          T* grad_coords) const {
  if (shape.ndim != 2 && shape.ndim != 3) return "resample: ndim must be 2 or 3";
  auto stream = static_cast<cudaStream_t>(device.stream);
  const int64_t total = shape.batch * shape.points;
  if (grad_image != nullptr) {
    const size_t bytes = sizeof(T) * shape.batch * shape.image_stride();
    if (bytes > 0 && cudaMemsetAsync(grad_image, 0, bytes, stream) != cudaSuccess) {
      return gpu::last_error();
    }
  }
  if (total == 0) return nullptr;
  if (shape.channels == 0) {
    if (cudaMemsetAsync(grad_coords, 0, sizeof(T) * total * shape.ndim, stream) != cudaSuccess) {
      return gpu::last_error();
    }
    return nullptr;
  }
  dispatch_shape(shape, gpu::BackwardLaunch<T>{stream, shape, total, image, coords, grad_out,
                                               grad_image, grad_coords});
  return gpu::last_error();
}

// Explicit instantiations used by resample_kernels.cc and the GPU harness.
template struct ResampleFunctor<GpuDevice, float>;
template struct ResampleFunctor<GpuDevice, double>;
template struct ResampleGradFunctor<GpuDevice, float>;
template struct ResampleGradFunctor<GpuDevice, double>;

}  // namespace dirnet

#endif  // GOOGLE_CUDA
