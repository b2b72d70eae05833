"""MoCo v2 on scikit-learn's digits with a timm backbone: a momentum key
encoder, a queue of negatives and the InfoNCE loss, then a linear probe and a
fine-tune against the same backbone at its random initialisation.

    python examples/moco.py                        # ssl_ops' fused loss and EMA
    python examples/moco.py --loss-impl reference  # pure-PyTorch loss and EMA loop
"""

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import ssl_ops  # noqa: E402

QUEUE_SIZE = 1024


def main():
    args = common.parse_args(__doc__.splitlines()[0], {"temperature": 0.2})
    data, backbone, initial = common.setup(args)
    head = ssl_ops.MoCoProjectionHead(backbone.num_features, 512, 128).to(args.device)
    query_encoder = nn.Sequential(backbone, head)
    key_encoder = ssl_ops.MomentumEncoder(query_encoder, buffers="copy")  # the BN statistics follow the queries
    # The queue holds normalised keys (feature_dim_first=False: rows are keys).
    queue = ssl_ops.MemoryBank(size=(QUEUE_SIZE, 128), feature_dim_first=False).to(args.device)
    fused = args.loss_impl == "fused"
    loss_fn = ssl_ops.info_nce_loss if fused else ssl_ops.reference.info_nce_loss

    def step(view0, view1):
        query = query_encoder(view0)
        with torch.no_grad():
            key = key_encoder(view1)
        _, negatives = queue(F.normalize(key, dim=1), update=True)  # the queue before this batch
        return loss_fn(query, key, negatives, temperature=args.temperature)

    momentum = torch.zeros((), dtype=torch.float64, device=args.device)

    def after_step(step, total):
        # fused: the momentum as a tensor on the device, filled in place and read by the kernel
        m = ssl_ops.cosine_schedule(step, total, 0.99, 1.0, out=momentum if fused else None)
        common.momentum_update(key_encoder, query_encoder, m, fused)

    stats = common.pretrain(query_encoder, step, after_step, data[0], args)
    common.evaluate_and_report("MoCo v2", backbone, initial, data, stats, args)


if __name__ == "__main__":
    main()
