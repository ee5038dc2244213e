"""Two gloo processes: R stays identical on both ranks and equals the single-process R
computed from both ranks' batches (statistics pooled, not rank 0's alone), both when the
layer pools d x d sums (all-reduce) and when it pools the sampled rows (all-gather, fewer
rows than features)."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dbp import DecorLinear

STEPS, ROWS = 5, 32


def _batches(rank: int, step: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(ROWS, d, generator=g) @ (torch.eye(d) + 4.8 / d)  # same common mode for any d


def _layer(d: int) -> DecorLinear:
    torch.manual_seed(0)
    return DecorLinear(d, 4, sample_frac=1.0, decor_lr=0.05, kappa=0.2)


def _worker(rank: int, world: int, port: int, out: str, d: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    layer = _layer(d)
    for step in range(STEPS):
        layer(_batches(rank, step, d))
        layer.update()
    torch.save(layer.R, f"{out}/R{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("d", [6, 80])  # 64 rows over both ranks: sums (d = 6), rows (d = 80)
def test_pooled_statistics_keep_ranks_identical(tmp_path, d):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), d), nprocs=2,
                       start_method="spawn")
    r0, r1 = torch.load(tmp_path / "R0.pt"), torch.load(tmp_path / "R1.pt")
    assert torch.equal(r0, r1)

    single = _layer(d)
    for step in range(STEPS):
        single(torch.cat([_batches(0, step, d), _batches(1, step, d)]))
        single.update()
    torch.testing.assert_close(r0, single.R, rtol=1e-5, atol=1e-6)

    rank0_only = _layer(d)
    for step in range(STEPS):
        rank0_only(_batches(0, step, d))
        rank0_only.update()
    assert (r0 - rank0_only.R).abs().max() > 1e-3  # the reference's rank-0-only R differs
