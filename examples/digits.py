"""Shared pieces of the examples: scikit-learn's bundled digits (8x8, 1,797 images, no download),
augmentations written with torch ops, a small CNN with BatchNorm, a linear probe, and the
--check helper that runs eman_fused's teacher beside the eager reference teacher."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

import eman_fused


def load_digits(seed: int = 0, test_fraction: float = 0.3):
    """(x_train, y_train, x_test, y_test): [N, 1, 8, 8] float in [0, 1]; a fixed split per seed."""
    from sklearn.datasets import load_digits as sk_digits
    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(1000 + seed)
    order = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def labeled_subset(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of `per_class` examples of each class (the few labels of semi-supervision)."""
    g = torch.Generator().manual_seed(2000 + seed)
    picks = []
    for c in range(int(y.max()) + 1):
        idx = (y == c).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks)


def _affine(x: torch.Tensor, max_deg: float, max_shift: float, scale: tuple[float, float],
            g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(max_deg)
    s = torch.empty(n).uniform_(*scale, generator=g)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * max_shift
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def weak_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Small shifts (up to one pixel) and rotations (up to 8 degrees)."""
    return _affine(x, 8.0, 0.25, (0.95, 1.05), g)


def strong_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Larger affine jitter, contrast/brightness change, noise and a 3x3 cutout."""
    n = x.shape[0]
    x = _affine(x, 20.0, 0.35, (0.85, 1.15), g)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.6, 1.4, generator=g)
    bright = torch.empty(n, 1, 1, 1).uniform_(-0.2, 0.2, generator=g)
    x = (x - 0.5) * contrast + 0.5 + bright + 0.1 * torch.randn(x.shape, generator=g)
    cy, cx = torch.randint(0, 6, (n,), generator=g), torch.randint(0, 6, (n,), generator=g)
    rows = torch.arange(8).view(1, 8, 1)
    cols = torch.arange(8).view(1, 1, 8)
    hole = ((rows >= cy.view(n, 1, 1)) & (rows < cy.view(n, 1, 1) + 3)
            & (cols >= cx.view(n, 1, 1)) & (cols < cx.view(n, 1, 1) + 3))
    return x.masked_fill(hole.unsqueeze(1), 0.0).clamp(-0.5, 1.5)


class SmallCNN(nn.Module):
    """conv-BN-ReLU x3 on 8x8 inputs; `features()` gives the 64-d embedding."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def features(self, x):
        return self.encoder(x)

    def forward(self, x):
        return self.head(self.encoder(x))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    correct = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return correct


def linear_probe(encoder: nn.Module, x_train, y_train, x_test, y_test, steps: int = 300) -> float:
    """Test accuracy of a logistic regression on the frozen encoder's features."""
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        f_train, f_test = encoder(x_train), encoder(x_test)
    encoder.train(was_training)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    probe = nn.Linear(f_train.shape[1], int(y_train.max()) + 1)
    opt = torch.optim.LBFGS(probe.parameters(), lr=0.5, max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(f_train), y_train) + 1e-3 * probe.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (probe(f_test).argmax(1) == y_test).float().mean().item()


class ReferenceCheck:
    """For --check: an eager twin of an EMATeacher (same student, same settings, but
    backend='reference': the per-tensor PyTorch update) updated beside it; compare() asserts
    that every parameter and buffer agrees within the fp32 tolerance."""

    def __init__(self, teacher: eman_fused.EMATeacher, student: nn.Module, **kwargs):
        self.teacher = teacher
        self.twin = eman_fused.EMATeacher(student, backend="reference", **kwargs)
        self.compared = 0

    def update(self):
        self.twin.update()

    def compare(self):
        fused, eager = self.teacher.state_dict(), self.twin.state_dict()
        assert list(fused) == list(eager)
        tol = eman_fused.reference.TOLERANCES[torch.float32]
        for k in fused:
            torch.testing.assert_close(fused[k], eager[k], **tol, msg=lambda m: f"{k}: {m}")
        self.compared += 1


def probe_results(random_probe, student_encoder, teacher_encoder, data, final_loss) -> dict:
    """The self-supervised examples' report: linear probes of a random, the trained and the
    teacher encoder."""
    return dict(random=random_probe, student=linear_probe(student_encoder, *data),
                teacher=linear_probe(teacher_encoder, *data), final_loss=final_loss)


def ssl_main(argv, doc: str, run, steps: int, batch: int, student: str, teacher: str) -> int:
    """Command line of the self-supervised examples: train and probe, or --check a few steps."""
    import argparse
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help=f"fused vs reference {teacher} for a few steps")
    args = ap.parse_args(argv)
    if args.check:
        r = run(min(args.steps, 5), 32, args.seed, check=True)
        print(f"check: fused {teacher} == reference {teacher} after each of {r['checked_steps']} steps")
        return 0
    r = run(args.steps, args.batch, args.seed)
    print(f"linear probe test accuracy: random encoder {100 * r['random']:.1f}%, {student} "
          f"{100 * r['student']:.1f}%, EMAN {teacher} {100 * r['teacher']:.1f}% "
          f"(final loss {r['final_loss']:.3f})")
    return 0
