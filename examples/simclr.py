"""SimCLR on scikit-learn's digits with a timm backbone: pre-training with the
NT-Xent loss, then a linear probe and a fine-tune against the same backbone at
its random initialisation.

    python examples/simclr.py                      # ssl_ops' fused loss
    python examples/simclr.py --loss-impl reference  # the pure-PyTorch loss
"""

import os
import sys

from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import ssl_ops  # noqa: E402


def main():
    args = common.parse_args(__doc__.splitlines()[0], {"temperature": 0.2})
    data, backbone, initial = common.setup(args)
    head = ssl_ops.SimCLRProjectionHead(backbone.num_features, 512, 128).to(args.device)
    model = nn.Sequential(backbone, head)
    if args.loss_impl == "fused":
        criterion = ssl_ops.NTXentLoss(temperature=args.temperature)
    else:
        criterion = lambda z0, z1: ssl_ops.reference.nt_xent_loss(z0, z1, args.temperature)  # noqa: E731

    def step(view0, view1):
        return criterion(model(view0), model(view1))

    stats = common.pretrain(model, step, lambda step, total: None, data[0], args)
    common.evaluate_and_report("SimCLR", backbone, initial, data, stats, args)


if __name__ == "__main__":
    main()
