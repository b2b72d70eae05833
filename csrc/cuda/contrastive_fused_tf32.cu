// The fused route for fp32 rows as TF32 (contrastive_fused.cuh).
#include "contrastive_fused.cuh"

namespace ssl_ops::cuda {

template void fused_passes<float>(const ContrastiveSpec<float>&, const PassWeights&, ContrastiveResult<float>&,
                                c10::Device, cudaStream_t);

}  // namespace ssl_ops::cuda
