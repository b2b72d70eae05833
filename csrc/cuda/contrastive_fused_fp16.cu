// The fused route for fp16 rows (contrastive_fused.cuh).
#include "contrastive_fused.cuh"

namespace ssl_ops::cuda {

template void fused_passes<c10::Half>(const ContrastiveSpec<c10::Half>&, const PassWeights&, ContrastiveResult<c10::Half>&,
                                c10::Device, cudaStream_t);

}  // namespace ssl_ops::cuda
