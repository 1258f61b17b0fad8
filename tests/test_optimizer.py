"""Gradient clipping per branch (ops/optimizer.py): each branch takes the steps it would take trained alone."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.cotrain import ModalitySpec, build_model
from ops.engine import free_port
from ops.optimizer import BranchClippedAdamW, branch_groups

SPECS = [ModalitySpec("rgb", "video", {"widths": (8, 8, 16)}),
         ModalitySpec("audio", "audio", {"in_channels": 10, "widths": (8, 16, 16)})]


def test_every_parameter_has_one_branch_and_shared_stages_go_with_the_branch_that_deploys_them():
    cotrain = build_model(SPECS, 4, mode="cotrain", students=["rgb"])
    groups = {g["branch"]: g["params"] for g in branch_groups(cotrain)}
    assert set(groups) == {"rgb", "multimodal/rgb", "multimodal/audio", "multimodal"}
    assert sum(len(p) for p in groups.values()) == len(list(cotrain.parameters()))
    ids = {name: {id(p) for p in params} for name, params in groups.items()}
    assert {id(p) for p in cotrain.shared["rgb"].parameters()} <= ids["rgb"]               # the student deploys it
    assert {id(p) for p in cotrain.shared["audio"].parameters()} <= ids["multimodal/audio"]  # no audio student
    assert {id(p) for p in cotrain.teacher.blocks.parameters()} <= ids["multimodal"]
    unimodal = build_model(SPECS[:1], 4, mode="unimodal")
    assert [g["branch"] for g in branch_groups(unimodal)] == ["rgb"]  # one branch: clipping is the global one


def _two_groups(seed=0):
    g = torch.Generator().manual_seed(seed)
    big, small = torch.nn.Parameter(torch.randn(6, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))
    big.grad, small.grad = torch.full((6,), 10.0), torch.full((3,), 0.1)
    return big, small


def test_a_large_gradient_in_one_branch_leaves_the_other_branch_unclipped():
    big, small = _two_groups()
    opt = BranchClippedAdamW([{"params": [big], "branch": "a"}, {"params": [small], "branch": "b"}],
                             max_norm=1.0, partitioned=False, lr=0.1)
    opt._clip_each_group()
    assert torch.allclose(big.grad.norm(), torch.tensor(1.0), atol=1e-5)
    assert torch.equal(small.grad, torch.full((3,), 0.1))          # global clipping would scale it by ~1/24
    assert set(opt.last_norms) == {"a", "b"}


def test_a_step_equals_stepping_each_branch_alone_with_its_own_clipping():
    big, small = _two_groups()
    opt = BranchClippedAdamW([{"params": [big]}, {"params": [small]}], max_norm=1.0, partitioned=False, lr=0.1)
    alone = []
    for p in (big, small):
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        torch.nn.utils.clip_grad_norm_([q], 1.0)
        torch.optim.AdamW([q], lr=0.1).step()
        alone.append(q)
    opt.step()
    assert torch.allclose(big, alone[0]) and torch.allclose(small, alone[1])


def _rank_clips_its_slice(rank: int, port: int, out):
    # a group of its own: a forked child inherits whatever default group an earlier test left initialised
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    group = dist.ProcessGroupGloo(store, rank, 2)
    big, small = _two_groups()
    halves = [torch.nn.Parameter(t.detach()[rank * n // 2:(rank + 1) * n // 2].clone())
              for t, n in ((big, 6), (small, 3))]
    for h, full, n in zip(halves, (big, small), (6, 3)):
        h.grad = full.grad[rank * n // 2:(rank + 1) * n // 2].clone()
    opt = BranchClippedAdamW([{"params": [halves[0]]}, {"params": [halves[1]]}], max_norm=1.0, partitioned=True,
                             process_group=group, lr=0.1)
    opt._clip_each_group()
    out[rank] = [h.grad.clone() for h in halves]


def test_partitioned_gradients_are_clipped_by_the_norm_of_the_whole_branch():
    """ZeRO gives each rank a slice of every branch: the norm must be summed over the ranks."""
    out = mp.Manager().dict()
    mp.start_processes(_rank_clips_its_slice, args=(free_port(), out), nprocs=2, start_method="fork")
    big, small = _two_groups()
    BranchClippedAdamW([{"params": [big]}, {"params": [small]}], max_norm=1.0, partitioned=False,
                       lr=0.1)._clip_each_group()
    assert torch.allclose(torch.cat([out[0][0], out[1][0]]), big.grad)
    assert torch.allclose(torch.cat([out[0][1], out[1][1]]), small.grad)


def test_groups_of_one_branch_share_its_norm():
    """A branch split into groups (say by learning rate) is still clipped as one branch."""
    big, small = _two_groups()
    opt = BranchClippedAdamW([{"params": [big], "branch": "a"}, {"params": [small], "branch": "a", "lr": 0.01}],
                             max_norm=1.0, partitioned=False, lr=0.1)
    opt._clip_each_group()
    assert torch.allclose(torch.cat([big.grad, small.grad]).norm(), torch.tensor(1.0), atol=1e-5)
    assert list(opt.last_norms) == ["a"]


def test_deepspeed_steps_with_the_branch_clipped_optimizer_when_the_config_asks_for_it():
    """clip_scope 'branch' reaches training: build_engine hands DeepSpeed a BranchClippedAdamW with one group per
    branch and DeepSpeed's own clipping off; a step clips each branch."""
    from ops.config import RunConfig, deepspeed_config
    from ops.engine import build_engine, init_distributed

    init_distributed(1)
    cfg = RunConfig(shards="s", out="o")
    cfg.optim.clip_scope = "branch"
    model = build_model(SPECS, 4, mode="cotrain", students=["rgb"])
    engine, _ = build_engine(model, deepspeed_config(cfg, total_steps=4, bf16=False))
    optimizer = engine.optimizer
    assert isinstance(optimizer, BranchClippedAdamW) and optimizer.max_norm == cfg.optim.grad_clip
    assert {g["branch"] for g in optimizer.param_groups} == {"rgb", "multimodal/rgb", "multimodal/audio", "multimodal"}
    g = torch.Generator().manual_seed(0)
    inputs = {"rgb": torch.randn(2, 3, 4, 16, 16, generator=g), "audio": torch.randn(2, 10, 16, generator=g)}
    present = {m: torch.ones(2, dtype=torch.bool) for m in inputs}
    logits = engine(inputs, present)
    engine.backward(sum(out.square().sum() for out in logits.values()) * 100)
    engine.step()
    assert set(optimizer.last_norms) == {"rgb", "multimodal/rgb", "multimodal/audio", "multimodal"}
