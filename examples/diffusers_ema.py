"""diffusers' EMA idiom with eman_fused's drop-in EMAModel: a tiny denoiser trained on noisy
2-D points, the EMA stepped after each optimizer step (one fused call), then evaluated the
diffusers way: store() the training weights, copy_to() the EMA weights, evaluate, restore().

  pip install 'eman_fused[diffusers]'
  python examples/diffusers_ema.py           # train; held-out loss of the raw and the EMA weights
  python examples/diffusers_ema.py --check   # also: diffusers' own EMAModel beside ours, equal
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eman_fused.integrations.diffusers import EMAModel  # noqa: E402


def batch(n, g):
    # Points on a circle; the model predicts the noise added to them (an epsilon objective).
    angle = torch.rand(n, generator=g) * 6.2832
    x0 = torch.stack([angle.cos(), angle.sin()], 1)
    noise = torch.randn(n, 2, generator=g)
    level = torch.rand(n, 1, generator=g)
    return torch.cat([x0 * (1 - level).sqrt() + noise * level.sqrt(), level], 1), noise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ema = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True, power=3 / 4)
    if args.check:
        from diffusers.training_utils import EMAModel as DiffusersEMA
        theirs = DiffusersEMA(model.parameters(), decay=0.999, use_ema_warmup=True, power=3 / 4)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        x, noise = batch(256, g)
        loss = nn.functional.mse_loss(model(x), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.step(model.parameters())
        if args.check:
            theirs.step(model.parameters())
    test_x, test_noise = batch(4096, torch.Generator().manual_seed(1))

    def held_out() -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(model(test_x), test_noise).item()

    raw = held_out()
    ema.store(model.parameters())   # keep the training weights
    ema.copy_to(model.parameters())  # evaluate with the EMA's
    smoothed = held_out()
    ema.restore(model.parameters())  # and continue training from the stored ones
    assert held_out() == raw
    print(f"steps {ema.optimization_step}, last decay {ema.cur_decay_value:.5f}")
    print(f"held-out loss: raw weights {raw:.5f}, EMA weights {smoothed:.5f}")
    if args.check:
        worst = max(((a.double() - b.double()).norm() / b.double().norm()).item()
                    for a, b in zip(ema.shadow_params, theirs.shadow_params))
        print(f"== diffusers: our shadows vs diffusers' EMAModel after {args.steps} steps: "
              f"largest relative difference {worst:.1e}")
        if worst > 1e-6:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
