// Defines the ssl_ops operator library; kernels register themselves per backend
// from csrc/cpu and csrc/cuda.
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(ssl_ops, m) { SSL_OPS_DEFINE_SCHEMAS(m) }
