"""Two gloo processes: R stays identical on both ranks and equals the single-process R
computed from both ranks' batches (statistics pooled, not rank 0's alone), both when the
layer pools d x d sums (all-reduce) and when it pools the sampled rows (all-gather, fewer
rows than features); the layers of a model pool in one call of each kind per update."""
import socket
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dbp import DecorLinear
from dbp.layers import update_layers

STEPS, ROWS = 5, 32


def _batches(rank: int, step: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(ROWS, d, generator=g) @ (torch.eye(d) + 4.8 / d)  # same common mode for any d


def _layers(widths: list[int]) -> list[DecorLinear]:
    torch.manual_seed(0)
    return [DecorLinear(d, 4, sample_frac=1.0, decor_lr=0.05, kappa=0.2) for d in widths]


def _train(layers: list[DecorLinear], batches) -> None:
    for step in range(STEPS):
        for m in layers:
            m(batches(step, m.in_features))
        update_layers(layers)


def _worker(rank: int, world: int, port: int, out: str, widths: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    calls = Counter()
    for name in ("all_reduce", "all_gather"):
        def counted(*args, _fn=getattr(dist, name), _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        setattr(dist, name, counted)
    layers = _layers(widths)
    _train(layers, lambda step, d: _batches(rank, step, d))
    torch.save({"R": [m.R for m in layers], "calls": dict(calls)}, f"{out}/R{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("widths", [[6], [80], [6, 80, 6, 80]])  # 64 rows over both ranks:
def test_pooled_statistics_keep_ranks_identical(tmp_path, widths):  # sums (6), rows (80)
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), widths), nprocs=2,
                       start_method="spawn")
    r0, r1 = torch.load(tmp_path / "R0.pt"), torch.load(tmp_path / "R1.pt")
    for a, b in zip(r0["R"], r1["R"]):
        assert torch.equal(a, b)
    kinds = {"all_reduce": any(d < 64 for d in widths), "all_gather": any(d > 64 for d in widths)}
    assert r0["calls"] == {k: STEPS for k, used in kinds.items() if used}  # one call of a kind per update

    single = _layers(widths)
    _train(single, lambda step, d: torch.cat([_batches(0, step, d), _batches(1, step, d)]))
    rank0_only = _layers(widths)
    _train(rank0_only, lambda step, d: _batches(0, step, d))
    for pooled, one, alone in zip(r0["R"], single, rank0_only):
        torch.testing.assert_close(pooled, one.R, rtol=1e-5, atol=1e-6)
        assert (pooled - alone.R).abs().max() > 1e-3  # the reference's rank-0-only R differs
