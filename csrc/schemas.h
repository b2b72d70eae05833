#pragma once
// Every operator schema of ssl_ops, in one place. ops.cpp defines them in the
// `ssl_ops` namespace; the host-emulation module (csrc/emu) defines the same
// list in `ssl_ops_emu`, so the csrc/cuda host code compiled for the CPU is
// reached through identical signatures.
//
// ema_update_: ema[i] <- momentum * ema[i] + (1 - momentum) * online[i].
// _ema_update_chunked_: the same with an explicit elements-per-block chunk, so
// tests reach the multi-launch paths of the CUDA kernel with small tensors.
// ema_update_tensor_ / _ema_update_tensor_chunked_: the same with the momentum
// a one-element float32/float64 tensor on the parameters' device, read by the
// kernel (CUDA: on the device, Note [EMA tensor momentum] in csrc/cuda/ema.cu).
//
// contrastive_sym_loss: NT-Xent / SupCon over the rows of z, positives by equal
// labels (csrc/cpu/contrastive_sym.cpp has the math), for the anchors
// rows [anchor_begin, anchor_end) against all rows as candidates (all rows in
// one process; this process's rows when z is gathered from several, so the
// work is anchors x rows). reduction: 0 none (one loss per row of z, 0 outside
// the anchors), 1 mean over anchors with positives, 2 sum. With compute_grad
// (and a reduction) grad_z is the gradient of the loss, computed in the same
// call; otherwise it is empty. positives: how a row's positive logits are
// reduced, 0 their mean outside the log (SupCon L_out), 1 their log-sum-exp
// (solo-learn's SimCLR: -log(sum_P exp / sum_all exp)), 2 excluded (the loss
// is the log-sum-exp over the negatives alone: DCL's negative term); with 1,
// lse_positive holds each anchor's log-sum-exp over its positives (else it is
// empty).
// contrastive_sym_backward: the gradient for any grad_loss, from the saved
// lse (and lse_positive).
// contrastive_asym_loss / _backward: InfoNCE of query rows against key rows,
// the positive being positive_key[i] when given (MoCo, key = queue), else
// key[i + positive_offset] (MoCo v3, CLIP; the offset places this process's
// queries among gathered keys); csrc/cpu/contrastive_asym.cpp has the math.
// grad_mask: which of (query, key, positive_key) get gradients.
//
// contrastive_clip_loss: the symmetric in-batch InfoNCE of query rows against
// key rows (CLIP's ClipLoss, MoCo v3 symmetric; Note [Symmetric InfoNCE],
// csrc/clip_check.h), both directions from one S; scale a one-element tensor
// (the logit multiplier), reduction 1 mean or 2 sum; with compute_grad the
// gradients of query, key and scale in the same call (else empty tensors).
//
// siglip_loss: SigLIP's pairwise sigmoid loss of image rows against text rows
// (Note [SigLIP loss], csrc/siglip_check.h), the positive of image i being
// text i + positive_offset; with compute_grad, the gradients of the features,
// the scale and the bias in the same call (else empty tensors).
// cosine_rows: cos of each row pair, F.cosine_similarity's eps rule
// (csrc/cpu/cosine.cpp); cosine_rows_backward: both gradients in one pass.
// cosine_similarity_matrix: C[i, j] = cos(a_i, b_j), b = a when absent
// (csrc/cpu/cosine_matrix.cpp); its backward takes which of (a, b) need grads.
#define SSL_OPS_DEFINE_SCHEMAS(m)                                                      \
  m.def("ema_update_(Tensor(a!)[] ema, Tensor[] online, float momentum) -> ()");      \
  m.def(                                                                               \
      "_ema_update_chunked_(Tensor(a!)[] ema, Tensor[] online, float momentum, "     \
      "int chunk_size) -> ()");                                                        \
  m.def("ema_update_tensor_(Tensor(a!)[] ema, Tensor[] online, Tensor momentum) -> ()"); \
  m.def(                                                                               \
      "_ema_update_tensor_chunked_(Tensor(a!)[] ema, Tensor[] online, Tensor momentum, " \
      "int chunk_size) -> ()");                                                        \
  m.def(                                                                               \
      "contrastive_sym_loss(Tensor z, Tensor labels, int anchor_begin, int anchor_end, " \
      "float scale, float eps, "                                                      \
      "bool normalize, int reduction, bool compute_grad, int positives=0) -> "         \
      "(Tensor loss, Tensor lse, Tensor positive_count, Tensor grad_z, Tensor lse_positive)"); \
  m.def(                                                                               \
      "contrastive_sym_backward(Tensor grad_loss, Tensor z, Tensor labels, "           \
      "int anchor_begin, int anchor_end, Tensor lse, "                                \
      "Tensor positive_count, float scale, float eps, bool normalize, int reduction, " \
      "Tensor? lse_positive=None, int positives=0) -> Tensor");                        \
  m.def(                                                                               \
      "contrastive_asym_loss(Tensor query, Tensor key, Tensor? positive_key, "        \
      "int positive_offset, "                                                         \
      "float scale, float eps, bool normalize, int reduction, bool[3] grad_mask) -> " \
      "(Tensor loss, Tensor lse, Tensor grad_query, Tensor grad_key, "                \
      "Tensor grad_positive_key)");                                                    \
  m.def(                                                                               \
      "contrastive_asym_backward(Tensor grad_loss, Tensor query, Tensor key, "        \
      "Tensor? positive_key, int positive_offset, Tensor lse, float scale, float eps, " \
      "bool normalize, int reduction, bool[3] grad_mask) -> (Tensor, Tensor, Tensor)"); \
  m.def(                                                                               \
      "contrastive_clip_loss(Tensor query, Tensor key, Tensor scale, int reduction, "  \
      "bool compute_grad) -> (Tensor loss, Tensor grad_query, Tensor grad_key, "       \
      "Tensor grad_scale)");                                                           \
  m.def(                                                                               \
      "siglip_loss(Tensor image_features, Tensor text_features, Tensor logit_scale, "  \
      "Tensor? logit_bias, int positive_offset, bool compute_grad) -> (Tensor loss, "  \
      "Tensor grad_image, Tensor grad_text, Tensor grad_scale, Tensor grad_bias)");    \
  m.def("cosine_rows(Tensor x0, Tensor x1, float eps) -> Tensor");                     \
  m.def(                                                                               \
      "cosine_rows_backward(Tensor grad, Tensor x0, Tensor x1, float eps, "            \
      "bool[2] grad_mask) -> (Tensor, Tensor)");                                     \
  m.def("cosine_similarity_matrix(Tensor a, Tensor? b, float eps) -> Tensor");        \
  m.def(                                                                               \
      "cosine_similarity_matrix_backward(Tensor grad, Tensor a, Tensor? b, float eps, " \
      "bool[2] grad_mask) -> (Tensor, Tensor)");
