// Access to the CUDA backend's context from tools and tests (e.g. the bench's CUDA events
// on the backend's stream). Include only when DIFFTRON_HAVE_CUDA is defined.
#pragma once
#include "kernels/cuda/cuda_context.h"
#include "kernels/ops.h"

namespace difftron::cuda {

// The context behind a CUDA Ops object (make_cuda_ops), or null for any other backend.
CudaContext* context_of(Ops& ops);

}  // namespace difftron::cuda
