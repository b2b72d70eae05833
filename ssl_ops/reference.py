"""Pure-PyTorch versions of every ssl_ops operation: the baseline that tests
compare against and benchmarks time."""

import torch


def ema_update_(ema, online, momentum):
    """Per-parameter EMA loop (as solo-learn's MomentumUpdater):
    ``ema = momentum * ema + (1 - momentum) * online`` for each pair of tensors."""
    with torch.no_grad():
        for e, o in zip(ema, online):
            e.mul_(momentum).add_(o.to(e.dtype), alpha=1 - momentum)


def nt_xent_loss(z0, z1, temperature=0.5, reduction="mean"):
    """Eager NT-Xent as lightly computes it: the full (2N x 2N) logits matrix and
    cross-entropy with the other view as the label."""
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z0, z1]), dim=1)
    n = z0.shape[0]
    logits = z @ z.t() / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = torch.arange(2 * n, device=z.device).roll(n)
    return F.cross_entropy(logits, targets, reduction=reduction)


def supcon_loss(z, labels, temperature=0.5, reduction="mean", normalize=True, positives="mean"):
    """Eager multi-positive contrastive loss: row i's positives are the other
    rows with its label; loss_i = logsumexp_{k != i} s_ik - mean_{p} s_ip
    (``positives="logsumexp"``: - logsumexp_{p} s_ip), 0 for rows without
    positives, which the mean leaves out."""
    import torch.nn.functional as F

    if normalize:
        z = F.normalize(z, dim=1)
    logits = z @ z.t() / temperature
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    positive_mask = (labels[:, None] == labels[None, :]) & ~self_mask
    per_row, has_positive = contrastive_row_losses(logits, self_mask, positive_mask, positives)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / has_positive.sum().clamp_min(1)


def contrastive_row_losses(logits, self_mask, positive_mask, positives="mean"):
    """Each row's loss from its logits: logsumexp over the candidates (all but
    self; "excluded": all but self and the positives) minus the positives' mean
    ("logsumexp": their logsumexp; "excluded": nothing), 0 for rows without
    positives; and which rows have positives. Shared with the eager fallback."""
    count = positive_mask.sum(1)
    has_positive = count > 0
    candidates = self_mask | positive_mask if positives == "excluded" else self_mask
    lse = torch.logsumexp(logits.masked_fill(candidates, float("-inf")), dim=1)
    if positives == "excluded":
        positive_term = torch.zeros_like(lse)
    elif positives == "logsumexp":
        # Rows without positives take a finite stand-in (their loss is 0), so
        # no -inf - -inf turns their zero gradient into NaN.
        only_positives = logits.masked_fill(~positive_mask, float("-inf"))
        positive_term = torch.logsumexp(torch.where(has_positive[:, None], only_positives, 0.0), dim=1)
    else:
        positive_term = (logits * positive_mask).sum(1) / count.clamp_min(1)
    return torch.where(has_positive, lse - positive_term, torch.zeros_like(lse)), has_positive


def dcl_loss(z0, z1, temperature=0.1, weight_fn=None):
    """Eager DCL as lightly's DCLLoss computes it: for each direction the
    (N x N) similarities within and across the views, the positive removed from
    the denominator, then the mean of both directions."""
    import torch.nn.functional as F

    z0, z1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    n = z0.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z0.device)

    def one_direction(a, b):
        s_aa, s_ab = a @ a.t() / temperature, a @ b.t() / temperature
        positive = -s_ab[eye]
        if weight_fn:
            positive = positive * weight_fn(a, b)
        negatives = torch.cat([s_aa[~eye].view(n, -1), s_ab[~eye].view(n, -1)], dim=1)
        return (positive + torch.logsumexp(negatives, dim=1)).mean()

    return 0.5 * (one_direction(z0, z1) + one_direction(z1, z0))


def siglip_loss(image_features, text_features, logit_scale, logit_bias=None, positive_offset=0):
    """Eager SigLIP loss as open_clip's SigLipLoss computes it in one process:
    the (N x M) logits, labels +1 at text i + positive_offset of image i and -1
    elsewhere, -sum(logsigmoid(labels * logits)) / N."""
    import torch.nn.functional as F

    logits = logit_scale * image_features @ text_features.t()
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = -torch.ones_like(logits)
    labels.diagonal(positive_offset).fill_(1)
    return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]


def info_nce_loss(query, key, queue=None, temperature=0.07, reduction="mean", symmetric=False, normalize=True):
    """Eager InfoNCE: MoCo's ``[q.k+, q.queue]`` logits with label 0 when a queue
    (K, D) is given, else in-batch ``q . k^T`` logits with labels arange (MoCo v3,
    CLIP); ``symmetric`` averages both directions."""
    import torch.nn.functional as F

    if normalize:
        query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
        queue = F.normalize(queue, dim=1) if queue is not None else None
    if queue is not None:
        logits = torch.cat([(query * key).sum(1, keepdim=True), query @ queue.t()], dim=1) / temperature
        targets = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
        return F.cross_entropy(logits, targets, reduction=reduction)
    targets = torch.arange(query.shape[0], device=query.device)
    loss = F.cross_entropy(query @ key.t() / temperature, targets, reduction=reduction)
    if symmetric:
        loss = (loss + F.cross_entropy(key @ query.t() / temperature, targets, reduction=reduction)) / 2
    return loss


def clip_loss(image_features, text_features, logit_scale):
    """Eager CLIP loss as open_clip's ClipLoss computes it in one process: the
    (B x B) logits ``logit_scale * image @ text.T``, cross-entropy both ways."""
    import torch.nn.functional as F

    logits = logit_scale * image_features @ text_features.t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def byol_loss(p, z, reduction="mean"):
    """BYOL's regression loss, 2 - 2 * cos(p_i, z_i) per row (the caller detaches z)."""
    import torch.nn.functional as F

    loss = 2 - 2 * F.cosine_similarity(p, z, dim=1)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def negative_cosine_similarity(x0, x1, dim=1, eps=1e-8):
    """lightly's NegativeCosineSimilarity: -F.cosine_similarity(x0, x1, dim, eps).mean()."""
    import torch.nn.functional as F

    return -F.cosine_similarity(x0, x1, dim, eps).mean()


def cosine_similarity_matrix(a, b=None, eps=1e-8):
    """Eager cosine-similarity matrix: F.normalize both sides, then one matmul."""
    import torch.nn.functional as F

    a_hat = F.normalize(a, dim=1, eps=eps)
    b_hat = a_hat if b is None else F.normalize(b, dim=1, eps=eps)
    return a_hat @ b_hat.t()
