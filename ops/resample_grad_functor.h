// Device-generic entry point of the gradient op `Dirnet>ResampleGrad`.
#ifndef DIRNET_OPS_RESAMPLE_GRAD_FUNCTOR_H_
#define DIRNET_OPS_RESAMPLE_GRAD_FUNCTOR_H_

#include <cstdint>

#include "resample_core.h"
#include "resample_functor.h"

namespace dirnet {

// Given grad_out = dL/d out ([B, P, C]), writes
//   grad_coords = dL/d coords ([B, P, ndim]), every element, and
//   grad_image  = dL/d image  ([B, *spatial, C]), every element, unless
//   grad_image is nullptr (the caller does not need it).
// Returns nullptr on success, otherwise a static error message.
template <typename Device, typename T>
struct ResampleGradFunctor {
  const char* operator()(const Device& device, const ResampleShape& shape, const T* image,
                         const T* coords, const T* grad_out, T* grad_image,
                         T* grad_coords) const;
};

// Defined and explicitly instantiated (float, double) in resample_kernels.cu.cc.
template <typename T>
struct ResampleGradFunctor<GpuDevice, T> {
  const char* operator()(const GpuDevice& device, const ResampleShape& shape, const T* image,
                         const T* coords, const T* grad_out, T* grad_image,
                         T* grad_coords) const;
};

}  // namespace dirnet

#endif  // DIRNET_OPS_RESAMPLE_GRAD_FUNCTOR_H_
