"""The optimizer: AdamW whose gradient clipping sees each branch on its own.

Clipping the global gradient norm couples branches that share nothing: the norm sums every student, every
teacher stream and the Transformer, so one branch's large gradient shrinks the steps of all the others, and a
teacher stream ends up trained differently from the unimodal baseline it must match (on a 10-class video +
audio corpus the teacher's video stream reached 77.8% validation against 83.1% for the same network trained
alone, docs/results-protocol.md). Clipped per branch, each branch takes the steps it would take alone; a
unimodal run has one branch, so its clipping is the global one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["BranchClippedAdamW", "branch_groups"]


def branch_groups(model: torch.nn.Module, groups: list[dict] | None = None) -> list[dict]:
    """`groups` (AdamW parameter groups, e.g. one per learning rate; default: every trainable parameter in one)
    split by branch (model.branch_of), each part named by 'branch'; a model without branches is one branch."""
    groups = groups if groups is not None else [{"params": [p for p in model.parameters() if p.requires_grad]}]
    names = {id(p): name for name, p in model.named_parameters()}
    branch_of = getattr(model, "branch_of", lambda name: "model")
    split = []
    for group in groups:
        parts: dict[str, list] = {}
        for param in group["params"]:
            parts.setdefault(branch_of(names[id(param)]), []).append(param)
        split += [{**group, "params": params, "branch": branch} for branch, params in parts.items()]
    return split


class BranchClippedAdamW(torch.optim.AdamW):
    """torch's AdamW, with each parameter group's gradient norm clipped to max_norm on its own before the step.

    `partitioned`: whether each rank holds only a slice of every group's gradients when step() runs (DeepSpeed's
    ZeRO stages 1-3 and its bf16 optimizer flatten each group and give every rank a slice), so a group's squared
    norm is summed over the ranks; with ZeRO stage 0 in fp32 every rank holds the whole averaged gradient."""

    def __init__(self, groups: list[dict], *, max_norm: float, partitioned: bool, process_group=None, **adamw):
        super().__init__(groups, **adamw)
        self.max_norm = float(max_norm)
        self.partitioned = partitioned
        self.process_group = process_group  # the ranks that hold the slices (None: the default group)
        self.last_norms: dict[str, float] = {}

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_norm > 0:
            self._clip_each_group()
        return super().step(closure)

    def _clip_each_group(self) -> None:
        """Scale each branch's gradients so that their norm is at most max_norm; groups that name the same
        'branch' (a branch split further, e.g. by learning rate) share one norm."""
        grads = [[p.grad for p in g["params"] if p.grad is not None] for g in self.param_groups]
        names = [g.get("branch", str(i)) for i, g in enumerate(self.param_groups)]
        branches = list(dict.fromkeys(names))
        device = next((gs[0].device for gs in grads if gs), torch.device("cpu"))
        per_group = torch.stack([_sum_of_squares(gs, device) for gs in grads])
        squares = torch.zeros(len(branches), device=device).index_add_(
            0, torch.tensor([branches.index(n) for n in names], device=device), per_group)
        if self.partitioned and self.process_group is not None:
            self.process_group.allreduce([squares]).wait()
        elif self.partitioned and dist.is_available() and dist.is_initialized():
            dist.all_reduce(squares)
        norms = squares.sqrt()
        scales = (self.max_norm / (norms + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ formula
        for group_grads, name in zip(grads, names):
            if group_grads:
                torch._foreach_mul_(group_grads, scales[branches.index(name)].to(group_grads[0].dtype))
        self.last_norms = dict(zip(branches, norms.tolist()))


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device, dtype=torch.float32)
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum().to(device)
