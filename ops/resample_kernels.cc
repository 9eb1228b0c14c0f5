// TensorFlow kernels of `Dirnet>Resample` and `Dirnet>ResampleGrad`: input
// validation, output allocation and dispatch to the device functors (CPU:
// resample_cpu.h on TF's intra-op thread pool; GPU: resample_kernels.cu.cc).
#define EIGEN_USE_THREADS
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#endif

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/threadpool.h"
#include "unsupported/Eigen/CXX11/Tensor"

#include "resample_cpu.h"
#include "resample_functor.h"
#include "resample_grad_functor.h"

namespace dirnet {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

std::string Shapes(const Tensor& image, const Tensor& coords) {
  return "image shape " + image.shape().DebugString() + ", coords shape " +
         coords.shape().DebugString();
}

// Validates image/coords and fills the framework-independent problem shape.
absl::Status ParseShapes(const char* op, const Tensor& image, const Tensor& coords, int boundary,
                         ResampleShape* s) {
  const int rank = image.dims();
  if (rank != 4 && rank != 5) {
    return absl::InvalidArgumentError(std::string(op) +
                                      ": image must be [B, H, W, C] or [B, D, H, W, C] (rank 4 "
                                      "or 5); got " + Shapes(image, coords));
  }
  if (coords.dims() < 3) {
    return absl::InvalidArgumentError(std::string(op) +
                                      ": coords must be [B, *out_points, ndim] with at least one "
                                      "output axis (rank >= 3); got " + Shapes(image, coords));
  }
  const int ndim = rank - 2;
  if (coords.dim_size(coords.dims() - 1) != ndim) {
    return absl::InvalidArgumentError(
        std::string(op) + ": coords.shape[-1] must equal the number of spatial axes of image (" +
        std::to_string(ndim) + "); got " + Shapes(image, coords));
  }
  if (image.dim_size(0) != coords.dim_size(0)) {
    return absl::InvalidArgumentError(std::string(op) +
                                      ": image and coords must have the same batch size; got " +
                                      Shapes(image, coords));
  }
  s->ndim = ndim;
  s->batch = image.dim_size(0);
  for (int d = 0; d < 3; ++d) s->size[d] = 1;
  for (int d = 0; d < ndim; ++d) {
    s->size[d] = image.dim_size(1 + d);
    if (s->size[d] == 0) {
      return absl::InvalidArgumentError(std::string(op) +
                                        ": image has an empty spatial axis; got " +
                                        Shapes(image, coords));
    }
  }
  s->channels = image.dim_size(rank - 1);
  int64_t points = 1;
  for (int d = 1; d < coords.dims() - 1; ++d) points *= coords.dim_size(d);
  s->points = points;
  s->boundary = boundary;
  return absl::OkStatus();
}

int ParseBoundary(OpKernelConstruction* ctx) {
  std::string boundary;
  const absl::Status status = ctx->GetAttr("boundary", &boundary);
  if (!status.ok()) {
    ctx->CtxFailure(__FILE__, __LINE__, status);
    return kZeros;
  }
  return boundary == "border" ? kBorder : kZeros;
}

// Builds the framework-independent execution context for a TF device type.
template <typename Device>
struct DeviceContext;

// Runs fn(i, i + 1) for i in [0, n) on the calling thread and up to
// `helpers` pool threads, which claim work units from a shared counter.  The
// caller never waits for a helper that has not started: if the pool threads
// are busy (or the machine is oversubscribed) the caller simply does all the
// units itself, and late helpers find nothing left.  It only waits for units
// already claimed by a running helper.
void ClaimingParallelFor(tensorflow::thread::ThreadPool* pool, int helpers, int64_t n,
                         const std::function<void(int64_t, int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t total = 0;
    const std::function<void(int64_t, int64_t)>* fn = nullptr;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->total = n;
  state->fn = &fn;
  // Claims and runs units until none is left; returns how many it finished.
  auto work = [](State* st) {
    int64_t finished = 0;
    for (int64_t i = st->next.fetch_add(1); i < st->total; i = st->next.fetch_add(1)) {
      (*st->fn)(i, i + 1);
      ++finished;
    }
    return finished;
  };
  const int64_t spawn = std::min<int64_t>(helpers, n - 1);
  for (int64_t h = 0; h < spawn; ++h) {
    pool->Schedule([state, work]() {
      const int64_t finished = work(state.get());
      if (finished > 0 &&
          state->done.fetch_add(finished) + finished == state->total) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    });
  }
  const int64_t mine = work(state.get());
  if (state->done.fetch_add(mine) + mine == n) return;
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

template <>
struct DeviceContext<Eigen::ThreadPoolDevice> {
  static CpuDevice Make(OpKernelContext* ctx) {
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    CpuDevice d;
    d.num_threads = pool->NumThreads();
    // The kernel runs on one of the pool's threads (or the caller's), so at
    // most NumThreads() - 1 others can help.
    const int helpers = std::max(0, pool->NumThreads() - 1);
    d.parallel_for = [pool, helpers](int64_t n,
                                     const std::function<void(int64_t, int64_t)>& fn) {
      ClaimingParallelFor(pool, helpers, n, fn);
    };
    return d;
  }
};

#if GOOGLE_CUDA
template <>
struct DeviceContext<Eigen::GpuDevice> {
  static GpuDevice Make(OpKernelContext* ctx) {
    GpuDevice d;
    d.stream = static_cast<void*>(ctx->eigen_device<Eigen::GpuDevice>().stream());
    return d;
  }
};
#endif

template <typename Device, typename T>
class ResampleOp : public OpKernel {
 public:
  explicit ResampleOp(OpKernelConstruction* ctx) : OpKernel(ctx), boundary_(ParseBoundary(ctx)) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& image = ctx->input(0);
    const Tensor& coords = ctx->input(1);
    ResampleShape s;
    OP_REQUIRES_OK(ctx, ParseShapes("Dirnet>Resample", image, coords, boundary_, &s));
    TensorShape out_shape = coords.shape();
    out_shape.set_dim(out_shape.dims() - 1, s.channels);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &out));
    if (out->NumElements() == 0) return;
    const char* err = ResampleFunctor<decltype(DeviceContext<Device>::Make(ctx)), T>()(
        DeviceContext<Device>::Make(ctx), s, image.flat<T>().data(), coords.flat<T>().data(),
        out->flat<T>().data());
    OP_REQUIRES(ctx, err == nullptr, absl::InternalError(err ? err : ""));
  }

 private:
  int boundary_;
};

template <typename Device, typename T>
class ResampleGradOp : public OpKernel {
 public:
  explicit ResampleGradOp(OpKernelConstruction* ctx)
      : OpKernel(ctx), boundary_(ParseBoundary(ctx)) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("image_grad", &image_grad_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& image = ctx->input(0);
    const Tensor& coords = ctx->input(1);
    const Tensor& grad_out = ctx->input(2);
    ResampleShape s;
    OP_REQUIRES_OK(ctx, ParseShapes("Dirnet>ResampleGrad", image, coords, boundary_, &s));
    TensorShape out_shape = coords.shape();
    out_shape.set_dim(out_shape.dims() - 1, s.channels);
    OP_REQUIRES(ctx, grad_out.shape() == out_shape,
                absl::InvalidArgumentError(
                    "Dirnet>ResampleGrad: grad_output must have the output shape " +
                    out_shape.DebugString() + " (coords.shape[:-1] + [C]); got grad_output shape " +
                    grad_out.shape().DebugString() + ", " + Shapes(image, coords)));
    Tensor* grad_image = nullptr;
    Tensor* grad_coords = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, image_grad_ ? image.shape() : TensorShape({0}),
                                             &grad_image));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, coords.shape(), &grad_coords));
    if (grad_image->NumElements() == 0 && grad_coords->NumElements() == 0) return;
    const char* err = ResampleGradFunctor<decltype(DeviceContext<Device>::Make(ctx)), T>()(
        DeviceContext<Device>::Make(ctx), s, image.flat<T>().data(), coords.flat<T>().data(),
        grad_out.flat<T>().data(), image_grad_ ? grad_image->flat<T>().data() : nullptr,
        grad_coords->flat<T>().data());
    OP_REQUIRES(ctx, err == nullptr, absl::InternalError(err ? err : ""));
  }

 private:
  int boundary_;
  bool image_grad_ = true;
};

}  // namespace

#define DIRNET_REGISTER_CPU(T)                                                              \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("Dirnet>Resample").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),      \
      ResampleOp<Eigen::ThreadPoolDevice, T>);                                              \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("Dirnet>ResampleGrad").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),  \
      ResampleGradOp<Eigen::ThreadPoolDevice, T>);
DIRNET_REGISTER_CPU(float)
DIRNET_REGISTER_CPU(double)
#undef DIRNET_REGISTER_CPU

#if GOOGLE_CUDA
// Explicitly instantiated in resample_kernels.cu.cc.
extern template struct ResampleFunctor<GpuDevice, float>;
extern template struct ResampleFunctor<GpuDevice, double>;
extern template struct ResampleGradFunctor<GpuDevice, float>;
extern template struct ResampleGradFunctor<GpuDevice, double>;

#define DIRNET_REGISTER_GPU(T)                                                              \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("Dirnet>Resample").Device(::tensorflow::DEVICE_GPU).TypeConstraint<T>("T"),      \
      ResampleOp<Eigen::GpuDevice, T>);                                                     \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("Dirnet>ResampleGrad").Device(::tensorflow::DEVICE_GPU).TypeConstraint<T>("T"),  \
      ResampleGradOp<Eigen::GpuDevice, T>);
DIRNET_REGISTER_GPU(float)
DIRNET_REGISTER_GPU(double)
#undef DIRNET_REGISTER_GPU
#endif  // GOOGLE_CUDA

}  // namespace dirnet
