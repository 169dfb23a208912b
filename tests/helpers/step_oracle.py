"""The independent side of the driver tests: one step's four gradients by autograd.

``torch.autograd.grad`` on deep copies of the two models, per micro-batch, averaged
over the micro-batches, with the rules of a LLaVA data mix written out plainly:
a micro-batch with no image token has ``L_v = 0`` (no ``h``), one with every label
-100 has ``L_vl = 0`` (no ``g``). The tests then apply the float64 reference
direction (``mdgd_kernels.reference``) by hand.
"""

from __future__ import annotations

import torch
from llava_tiny import IMAGE_TOKEN_ID


def _grads(loss, params) -> torch.Tensor:
    """Flat float64 gradient of ``loss`` (zeros where ``loss`` does not use a parameter)."""
    if not loss.requires_grad:
        return torch.cat([torch.zeros(p.numel(), dtype=torch.float64) for p in params])
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).double()
            for g, p in zip(gs, params)
        ]
    )


def independent(theta, ref, names, batches, cfg):
    """Mean over micro-batches of ``g_theta, h_theta, g_phi, h_phi`` and of the three losses."""
    pt = dict(theta.named_parameters())
    pp = dict(ref.named_parameters())
    P_t, P_p = [pt[n] for n in names], [pp[n] for n in names]
    acc = [0.0, 0.0, 0.0, 0.0]
    losses = torch.zeros(3, dtype=torch.float64)
    for b in batches:
        out_t = theta(**b, output_hidden_states=True)
        out_p = ref(**b, output_hidden_states=True)
        if not (b["labels"][:, 1:] != -100).any():  # nothing supervised: L_vl = 0
            lt = lp = torch.zeros(())
        else:
            lt, lp = out_t.loss, out_p.loss
        m = b["input_ids"] == IMAGE_TOKEN_ID
        if m.any():
            zt, zp = out_t.hidden_states[-1][m].float(), out_p.hidden_states[-1][m].float()
            lv = cfg.visual_weight * (zp - zt).abs().mean()
        else:  # text-only: L_v = 0
            lv = torch.zeros(())
        grads = [_grads(lt, P_t), _grads(lv, P_t), _grads(lp, P_p), _grads(lv, P_p)]
        for i, g in enumerate(grads):
            acc[i] = acc[i] + g
        losses += torch.stack([lt, lp, lv]).detach().double()
    n = len(batches)
    return [a / n for a in acc], losses / n
