// Op definitions and shape functions of `Dirnet>Resample` and
// `Dirnet>ResampleGrad`.  The kernels are in resample_kernels.cc (CPU) and
// resample_kernels.cu.cc (CUDA).
#include <string>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace dirnet {
namespace {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

std::string Describe(InferenceContext* c, const char* what, ShapeHandle s) {
  return std::string(what) + " shape " + c->DebugString(s);
}

// Checks image/coords against each other and returns the output shape
// coords[:-1] + [C] with the batch dimension merged.
absl::Status InferResampleShapes(InferenceContext* c, const char* op, ShapeHandle image,
                                 ShapeHandle coords, ShapeHandle* out) {
  const std::string both = Describe(c, "image", image) + ", " + Describe(c, "coords", coords);
  if (c->RankKnown(image) && c->Rank(image) != 4 && c->Rank(image) != 5) {
    return absl::InvalidArgumentError(std::string(op) +
                                      ": image must be [B, H, W, C] or [B, D, H, W, C] "
                                      "(rank 4 or 5); got " + both);
  }
  if (c->RankKnown(coords) && c->Rank(coords) < 3) {
    return absl::InvalidArgumentError(std::string(op) +
                                      ": coords must be [B, *out_points, ndim] with at least "
                                      "one output axis (rank >= 3); got " + both);
  }
  if (!c->RankKnown(coords)) {
    *out = c->UnknownShape();
    return absl::OkStatus();
  }
  DimensionHandle channels = c->UnknownDim();
  DimensionHandle batch = c->Dim(coords, 0);
  if (c->RankKnown(image)) {
    const int ndim = c->Rank(image) - 2;
    for (int d = 1; d <= ndim; ++d) {
      DimensionHandle size = c->Dim(image, d);
      if (c->ValueKnown(size) && c->Value(size) == 0) {
        return absl::InvalidArgumentError(std::string(op) + ": image has an empty spatial axis; got " +
                                          both);
      }
    }
    DimensionHandle last = c->Dim(coords, -1);
    if (c->ValueKnown(last) && c->Value(last) != ndim) {
      return absl::InvalidArgumentError(
          std::string(op) + ": coords.shape[-1] must equal the number of spatial axes of image (" +
          std::to_string(ndim) + "); got " + both);
    }
    if (!c->Merge(c->Dim(image, 0), c->Dim(coords, 0), &batch).ok()) {
      return absl::InvalidArgumentError(std::string(op) +
                                        ": image and coords must have the same batch size; got " +
                                        both);
    }
    channels = c->Dim(image, -1);
  }
  ShapeHandle prefix;
  TF_RETURN_IF_ERROR(c->Subshape(coords, 0, -1, &prefix));
  TF_RETURN_IF_ERROR(c->ReplaceDim(prefix, 0, batch, &prefix));
  return c->Concatenate(prefix, c->Vector(channels), out);
}

absl::Status ResampleShapeFn(InferenceContext* c) {
  ShapeHandle out;
  TF_RETURN_IF_ERROR(InferResampleShapes(c, "Dirnet>Resample", c->input(0), c->input(1), &out));
  c->set_output(0, out);
  return absl::OkStatus();
}

absl::Status ResampleGradShapeFn(InferenceContext* c) {
  ShapeHandle out;
  TF_RETURN_IF_ERROR(
      InferResampleShapes(c, "Dirnet>ResampleGrad", c->input(0), c->input(1), &out));
  ShapeHandle merged;
  if (!c->Merge(out, c->input(2), &merged).ok()) {
    return absl::InvalidArgumentError(
        "Dirnet>ResampleGrad: grad_output must have the output shape " + c->DebugString(out) +
        " (coords.shape[:-1] + [C]); got " + Describe(c, "grad_output", c->input(2)));
  }
  bool image_grad = true;
  TF_RETURN_IF_ERROR(c->GetAttr("image_grad", &image_grad));
  c->set_output(0, image_grad ? c->input(0) : c->Vector(0));
  c->set_output(1, c->input(1));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("Dirnet>Resample")
    .Input("image: T")
    .Input("coords: T")
    .Output("output: T")
    .Attr("T: {float, double}")
    .Attr("boundary: {'zeros', 'border'} = 'zeros'")
    .SetShapeFn(ResampleShapeFn)
    .Doc(R"doc(
Multilinear resampling of `image` at absolute ij pixel coordinates `coords`.

image: [B, *spatial, C] with 2 or 3 spatial axes.
coords: [B, *out_points, ndim]; coords[..., d] indexes spatial axis d.
output: [B, *out_points, C].
boundary: "zeros" (corners outside the image count as 0) or "border"
  (coordinates clamped to [0, size - 1]).
)doc");

REGISTER_OP("Dirnet>ResampleGrad")
    .Input("image: T")
    .Input("coords: T")
    .Input("grad_output: T")
    .Output("grad_image: T")
    .Output("grad_coords: T")
    .Attr("T: {float, double}")
    .Attr("boundary: {'zeros', 'border'} = 'zeros'")
    .Attr("image_grad: bool = true")
    .SetShapeFn(ResampleGradShapeFn)
    .Doc(R"doc(
Gradients of Dirnet>Resample with respect to image and coords.

grad_image: like image; an empty [0] tensor when image_grad is false.
grad_coords: like coords.  At integer coordinates: the right-sided derivative.
)doc");

}  // namespace dirnet
