#pragma once
// Every operator schema of ssl_ops, in one place. ops.cpp defines them in the
// `ssl_ops` namespace; the host-emulation module (csrc/emu) defines the same
// list in `ssl_ops_emu`, so the csrc/cuda host code compiled for the CPU is
// reached through identical signatures.
//
// ema_update_: ema[i] <- momentum * ema[i] + (1 - momentum) * online[i].
// _ema_update_chunked_: the same with an explicit elements-per-block chunk, so
// tests reach the multi-launch paths of the CUDA kernel with small tensors.
#define SSL_OPS_DEFINE_SCHEMAS(m)                                                      \
  m.def("ema_update_(Tensor(a!)[] ema, Tensor[] online, float momentum) -> ()");      \
  m.def(                                                                               \
      "_ema_update_chunked_(Tensor(a!)[] ema, Tensor[] online, float momentum, "     \
      "int chunk_size) -> ()");
