// The fused route for bf16 rows (contrastive_fused.cuh).
#include "contrastive_fused.cuh"

namespace ssl_ops::cuda {

template void fused_passes<c10::BFloat16>(const ContrastiveSpec<c10::BFloat16>&, const PassWeights&, ContrastiveResult<c10::BFloat16>&,
                                c10::Device, cudaStream_t);

}  // namespace ssl_ops::cuda
