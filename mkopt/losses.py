"""Losses the recipes and the Table-1 harness share."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, y: torch.Tensor, temperature: float = 4.0, alpha: float = 0.9
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y)`` (Hinton et al. 2015).

    ``teacher_probs`` are the teacher's probabilities at temperature T (for an ensemble: the mean
    over members of each member's tempered softmax).

    Example:
        >>> s = torch.tensor([[2.0, 0.0]]); t = torch.tensor([[0.5, 0.5]]); y = torch.tensor([0])
        >>> round(float(distillation_loss(s, t, y, temperature=1.0, alpha=1.0)), 4)  # KL(t || softmax(s))
        0.4338
    """
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = F.kl_div(log_student, teacher_probs, reduction="batchmean")
    return alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(student_logits, y)
