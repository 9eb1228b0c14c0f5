// Standalone check of the CUDA resampler kernels against the CPU core.
//
// Needs nvcc and a GPU, no TensorFlow: `make test-gpu` builds it together with
// resample_kernels.cu.cc.  For 2-D and 3-D, both boundary modes, float and
// double and several channel counts it draws random images and coordinates
// (inside, around and far outside the image, plus NaN/inf/huge values), runs
// forward, backward and coordinates-only backward on the GPU and on the CPU
// (resample_cpu.h, serial) and compares.  Then it times the benchmark
// sizes, plus any NDIM:BATCH:SIZE cases given on the command line
// (`--time-only` skips the checks, for profilers).  Exit code 0: all cases
// agree; 1: a mismatch or CUDA error; 2: bad arguments; 0 with a "NO GPU"
// message when there is no GPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "resample_core.h"
#include "resample_cpu.h"
#include "resample_functor.h"
#include "resample_grad_functor.h"

namespace {

using dirnet::CpuDevice;
using dirnet::GpuDevice;
using dirnet::ResampleShape;

#define CHECK_CUDA(expr)                                                              \
  do {                                                                                \
    cudaError_t err_ = (expr);                                                        \
    if (err_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(err_),    \
                   __FILE__, __LINE__, cudaGetErrorString(err_));                     \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) {
    CHECK_CUDA(cudaMalloc(&ptr, sizeof(T) * (n > 0 ? n : 1)));
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  void upload(const std::vector<T>& v) {
    CHECK_CUDA(cudaMemcpy(ptr, v.data(), sizeof(T) * n, cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> v(n);
    CHECK_CUDA(cudaMemcpy(v.data(), ptr, sizeof(T) * n, cudaMemcpyDeviceToHost));
    return v;
  }
};

// Max |a - b| / (1 + |b|); NaN anywhere counts as a mismatch.
template <typename T>
double max_error(const std::vector<T>& a, const std::vector<T>& b) {
  double worst = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    worst = std::max(worst, std::fabs(double(a[i]) - double(b[i])) / (1.0 + std::fabs(b[i])));
  }
  return worst;
}

template <typename T>
bool run_case(int ndim, int boundary, int64_t channels, int64_t batch, int64_t points,
              unsigned seed) {
  ResampleShape s;
  s.ndim = ndim;
  s.batch = batch;
  s.channels = channels;
  s.points = points;
  s.boundary = boundary;
  const int64_t sizes[3] = {7, 9, 5};
  for (int d = 0; d < ndim; ++d) s.size[d] = sizes[d];
  const int64_t n_image = batch * s.image_stride();
  const int64_t n_coords = batch * points * ndim;
  const int64_t n_out = batch * points * channels;

  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<T> image(n_image), coords(n_coords), grad_out(n_out);
  for (auto& v : image) v = T(normal(rng));
  for (auto& v : grad_out) v = T(normal(rng));
  const double hostile[] = {std::numeric_limits<double>::quiet_NaN(), INFINITY, -INFINITY,
                            1e30, -1e30, 3e9, -3e9, -1.0, 0.0};
  for (int64_t i = 0; i < n_coords; ++i) {
    const int64_t size = s.size[i % ndim];
    const double u = uniform(rng);
    if (u < 0.05) {
      coords[i] = T(hostile[rng() % 9]);
    } else if (u < 0.25) {
      coords[i] = T(static_cast<int64_t>(uniform(rng) * (size + 2)) - 1);  // integers
    } else {
      coords[i] = T(-2.0 + uniform(rng) * (size + 3.0));
    }
  }

  CpuDevice cpu;  // serial
  std::vector<T> out_cpu(n_out), gimg_cpu(n_image), gcrd_cpu(n_coords), gcrd_only_cpu(n_coords);
  dirnet::ResampleFunctor<CpuDevice, T>()(cpu, s, image.data(), coords.data(), out_cpu.data());
  dirnet::ResampleGradFunctor<CpuDevice, T>()(cpu, s, image.data(), coords.data(),
                                              grad_out.data(), gimg_cpu.data(), gcrd_cpu.data());
  dirnet::ResampleGradFunctor<CpuDevice, T>()(cpu, s, image.data(), coords.data(),
                                              grad_out.data(), nullptr, gcrd_only_cpu.data());

  DeviceBuffer<T> d_image(n_image), d_coords(n_coords), d_grad_out(n_out), d_out(n_out),
      d_gimg(n_image), d_gcrd(n_coords), d_gcrd_only(n_coords);
  d_image.upload(image);
  d_coords.upload(coords);
  d_grad_out.upload(grad_out);
  GpuDevice gpu;
  gpu.stream = nullptr;  // default stream
  const char* err =
      dirnet::ResampleFunctor<GpuDevice, T>()(gpu, s, d_image.ptr, d_coords.ptr, d_out.ptr);
  if (err == nullptr) {
    err = dirnet::ResampleGradFunctor<GpuDevice, T>()(gpu, s, d_image.ptr, d_coords.ptr,
                                                      d_grad_out.ptr, d_gimg.ptr, d_gcrd.ptr);
  }
  if (err == nullptr) {
    err = dirnet::ResampleGradFunctor<GpuDevice, T>()(gpu, s, d_image.ptr, d_coords.ptr,
                                                      d_grad_out.ptr, nullptr, d_gcrd_only.ptr);
  }
  if (err != nullptr) {
    std::printf("FAIL launch: %s\n", err);
    return false;
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  const double tol = sizeof(T) == 4 ? 2e-5 : 1e-12;
  const double e_out = max_error(d_out.download(), out_cpu);
  const double e_gimg = max_error(d_gimg.download(), gimg_cpu);
  const double e_gcrd = max_error(d_gcrd.download(), gcrd_cpu);
  const double e_only = max_error(d_gcrd_only.download(), gcrd_only_cpu);
  const bool ok = e_out <= tol && e_gimg <= tol && e_gcrd <= tol && e_only <= tol;
  std::printf("%s %s ndim=%d boundary=%s C=%lld B=%lld P=%lld: out %.2e  grad_image %.2e  "
              "grad_coords %.2e  coords-only %.2e\n",
              ok ? "ok  " : "FAIL", sizeof(T) == 4 ? "float " : "double", ndim,
              boundary == dirnet::kZeros ? "zeros " : "border", (long long)channels,
              (long long)batch, (long long)points, e_out, e_gimg, e_gcrd, e_only);
  return ok;
}

// Forward+backward time of the benchmark sizes (median of 20, ms).
void time_case(int ndim, int64_t batch, int64_t size) {
  ResampleShape s;
  s.ndim = ndim;
  s.batch = batch;
  s.channels = 1;
  for (int d = 0; d < ndim; ++d) s.size[d] = size;
  s.points = s.image_stride();
  const int64_t n = batch * s.points;
  std::vector<float> coords(n * ndim), host(n);
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> jitter(-2.f, 2.f);
  for (int64_t q = 0; q < n; ++q) {
    int64_t rest = q % s.points;
    for (int d = ndim - 1; d >= 0; --d) {
      coords[q * ndim + d] = float(rest % size) + jitter(rng);
      rest /= size;
    }
    host[q] = jitter(rng);
  }
  DeviceBuffer<float> image(n), crd(n * ndim), out(n), gout(n), gimg(n), gcrd(n * ndim);
  image.upload(host);
  gout.upload(host);
  crd.upload(coords);
  GpuDevice gpu;
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  // Interleaved repetitions of: forward+backward, forward alone, forward +
  // coordinates-only backward (what training a registration network needs:
  // the image is data).
  std::vector<float> both, fwd, coords_only;
  enum Backward { kNone, kCoordsOnly, kBoth };
  auto timed = [&](Backward backward) {
    CHECK_CUDA(cudaEventRecord(start));
    dirnet::ResampleFunctor<GpuDevice, float>()(gpu, s, image.ptr, crd.ptr, out.ptr);
    if (backward != kNone) {
      dirnet::ResampleGradFunctor<GpuDevice, float>()(gpu, s, image.ptr, crd.ptr, gout.ptr,
                                                      backward == kBoth ? gimg.ptr : nullptr,
                                                      gcrd.ptr);
    }
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    CHECK_CUDA(cudaGetLastError());
    float ms = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    return ms;
  };
  for (int rep = 0; rep < 25; ++rep) {
    const float t_both = timed(kBoth), t_fwd = timed(kNone), t_coords = timed(kCoordsOnly);
    if (rep >= 5) {
      both.push_back(t_both);
      fwd.push_back(t_fwd);
      coords_only.push_back(t_coords);
    }
  }
  auto median = [](std::vector<float>& v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  std::printf("time  %dD B=%lld %lld^%d C=1 float: forward+backward %.3f ms (median of %zu; "
              "forward alone %.3f ms; coords-only forward+backward %.3f ms)\n",
              ndim, (long long)batch, (long long)size, ndim, median(both), both.size(),
              median(fwd), median(coords_only));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

// "NDIM:BATCH:SIZE" -> a timing case; false if malformed or out of range.
bool parse_time_case(const char* arg, int* ndim, long long* batch, long long* size) {
  char tail = 0;
  if (std::sscanf(arg, "%d:%lld:%lld%c", ndim, batch, size, &tail) != 3) return false;
  if (*ndim < 2 || *ndim > 3 || *batch < 1 || *size < 2) return false;
  double points = double(*batch);
  for (int d = 0; d < *ndim; ++d) points *= double(*size);
  return points <= 1.5e8;  // keeps every buffer well under 4 GB
}

}  // namespace

int main(int argc, char** argv) {
  // Extra timing cases on the command line, e.g. `gpu_harness 2:32:512 3:2:128`;
  // with --time-only, only those are run (no checks: for profilers).
  struct TimeCase {
    int ndim;
    long long batch, size;
  };
  std::vector<TimeCase> extra;
  bool time_only = false;
  for (int i = 1; i < argc; ++i) {
    TimeCase c;
    if (std::string(argv[i]) == "--time-only") {
      time_only = true;
      continue;
    }
    if (!parse_time_case(argv[i], &c.ndim, &c.batch, &c.size)) {
      std::fprintf(stderr,
                   "usage: %s [--time-only] [NDIM:BATCH:SIZE ...]  (extra timing cases; NDIM 2 "
                   "or 3, BATCH >= 1, SIZE >= 2, at most 1.5e8 points); got '%s'\n",
                   argv[0], argv[i]);
      return 2;
    }
    extra.push_back(c);
  }
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    std::printf(
        "NO GPU: the CUDA harness compiled, but there is no usable GPU here (%s); "
        "nothing was run.\n",
        status != cudaSuccess ? cudaGetErrorString(status) : "0 devices");
    return 0;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("GPU: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  if (time_only) {
    for (const TimeCase& c : extra) time_case(c.ndim, c.batch, c.size);
    std::printf("TIMING ONLY: no checks were run\n");
    return 0;
  }
  bool ok = true;
  unsigned seed = 1;
  for (int ndim = 2; ndim <= 3; ++ndim) {
    for (int boundary : {int(dirnet::kZeros), int(dirnet::kBorder)}) {
      for (int64_t channels : {1, 2, 3, 5}) {
        ok &= run_case<float>(ndim, boundary, channels, 3, 500, seed++);
        ok &= run_case<double>(ndim, boundary, channels, 3, 500, seed++);
      }
    }
  }
  // Edge cases: one batch item with many points (atomics contend), empty batch.
  ok &= run_case<float>(2, dirnet::kZeros, 1, 1, 20000, seed++);
  ok &= run_case<double>(3, dirnet::kBorder, 2, 1, 20000, seed++);
  ok &= run_case<float>(2, dirnet::kZeros, 1, 0, 10, seed++);
  if (ok) {
    time_case(2, 32, 28);
    time_case(2, 8, 256);
    time_case(3, 2, 64);
    for (const TimeCase& c : extra) time_case(c.ndim, c.batch, c.size);
  }
  std::printf(ok ? "ALL GPU CHECKS PASSED\n" : "GPU CHECKS FAILED\n");
  return ok ? 0 : 1;
}
