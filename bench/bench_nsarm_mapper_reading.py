"""How fast a small NSARM transformation network learns under upstream's reading of its outputs, against a spatially
aligned reading (a diagnostic for the embedded super-resolution model: upstream's reading stays the default, and
``MapperConfig.reading = "tokens"`` is the aligned one, which the embedded model's recipe trains with).

    python bench/bench_nsarm_mapper_reading.py [--width 64 --layers 1 --heads 2 --steps 2000]

Upstream reads each branch's ``(B, s*s, d)`` output as a ``(B, d, s, s)`` code map by a reshape: token ``t``
carries the bits of channel ``(t*d + j) // s^2`` at positions ``(t*d + j) % s^2``, so every token must gather the
content of other positions. The aligned reading (a transpose) gives token ``t`` its own cell's ``d`` bits. Task: one
branch of side 8 on an 8 x 8, 16-channel latent of Gaussian noise, target the signs of the latent itself (an identity
map); AdamW 1e-3, batch 32, the same initial weights and the same data for both readings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from packbootstrap import register_pack

register_pack()

from nextscale.models.nsarm.mapper import MapperConfig, ScaleMapper  # noqa: E402

D, GRID, SIDE, BATCH = 16, 8, 8, 32


def train(reading: str, args) -> list[tuple[int, float, float]]:
    """``(step, loss, bit accuracy of that batch)`` four times over the run."""
    torch.manual_seed(args.seed)
    net = ScaleMapper(MapperConfig(channels=D, grid=GRID, sides=(SIDE,), widths=(args.width,), layers=(args.layers,),
                                   heads=(args.heads,), stem=(32, 32), resolution="0.06M",
                                   reading={"upstream": "reshape", "aligned": "tokens"}[reading]))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(args.seed + 1)
    rows = []
    for step in range(1, args.steps + 1):
        latent = torch.randn(BATCH, D, GRID, GRID, generator=data)
        target = (latent > 0).float()
        codes = net.code_map(net(latent)[0])
        loss = F.binary_cross_entropy_with_logits(codes, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % (args.steps // 4) == 0:
            rows.append((step, loss.item(), ((codes > 0) == target.bool()).float().mean().item()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"| reading | {' | '.join(f'step {args.steps * k // 4}' for k in range(1, 5))} | s |")
    print("|---|---|---|---|---|---|")
    for reading in ("upstream", "aligned"):
        t0 = time.perf_counter()
        rows = train(reading, args)
        cells = " | ".join(f"{loss:.3f} / {acc:.3f}" for _, loss, acc in rows)
        print(f"| {reading} | {cells} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
