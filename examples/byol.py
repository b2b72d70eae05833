"""BYOL on scikit-learn's digits with a timm backbone: an online network with
a predictor, a momentum target network and the symmetric BYOL loss, then a
linear probe and a fine-tune against the same backbone at its random
initialisation.

    python examples/byol.py                        # ssl_ops' fused loss and EMA
    python examples/byol.py --loss-impl reference  # pure-PyTorch loss and EMA loop
"""

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import ssl_ops  # noqa: E402


def main():
    args = common.parse_args(__doc__.splitlines()[0], {"lr": 2e-3})
    data, backbone, initial = common.setup(args)
    projector = ssl_ops.BYOLProjectionHead(backbone.num_features, 1024, 128).to(args.device)
    predictor = ssl_ops.BYOLPredictionHead(128, 1024, 128).to(args.device)
    online = nn.Sequential(backbone, projector)
    target = ssl_ops.MomentumEncoder(online, buffers="copy")  # the BN statistics follow the online network
    model = nn.Sequential(online, predictor)  # what the optimizer trains
    fused = args.loss_impl == "fused"
    loss_fn = ssl_ops.byol_loss if fused else ssl_ops.reference.byol_loss

    def step(view0, view1):
        p0, p1 = predictor(online(view0)), predictor(online(view1))
        with torch.no_grad():
            z0, z1 = target(view0), target(view1)
        return 0.5 * (loss_fn(p0, z1) + loss_fn(p1, z0))

    momentum = torch.zeros((), dtype=torch.float64, device=args.device)

    def after_step(step, total):
        # fused: the momentum as a tensor on the device, filled in place and read by the kernel
        m = ssl_ops.cosine_schedule(step, total, 0.99, 1.0, out=momentum if fused else None)
        common.momentum_update(target, online, m, fused)

    stats = common.pretrain(model, step, after_step, data[0], args)
    common.evaluate_and_report("BYOL", backbone, initial, data, stats, args)


if __name__ == "__main__":
    main()
