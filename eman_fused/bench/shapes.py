"""Parameter and buffer shapes of reference models, embedded so no model zoo is needed, and the
tensors and modules the benchmarks and `check` build from them.

Each table is a list of (name, shape, kind) in torchvision's state_dict order, kind being
'param', 'buffer' (floating BatchNorm statistics) or 'counter' (int64 num_batches_tracked).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import nn

Shape = tuple[int, ...]
Table = list[tuple[str, Shape, str]]


def _bn(prefix: str, c: int) -> Table:
    return [(f"{prefix}.weight", (c,), "param"), (f"{prefix}.bias", (c,), "param"),
            (f"{prefix}.running_mean", (c,), "buffer"), (f"{prefix}.running_var", (c,), "buffer"),
            (f"{prefix}.num_batches_tracked", (), "counter")]


def resnet50() -> Table:
    """torchvision resnet50: 161 parameters (25,557,032 elements) + 159 BN buffers."""
    rows: Table = [("conv1.weight", (64, 3, 7, 7), "param"), *_bn("bn1", 64)]
    in_ch = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            rows += [(f"{p}.conv1.weight", (width, in_ch, 1, 1), "param"), *_bn(f"{p}.bn1", width),
                     (f"{p}.conv2.weight", (width, width, 3, 3), "param"), *_bn(f"{p}.bn2", width),
                     (f"{p}.conv3.weight", (4 * width, width, 1, 1), "param"),
                     *_bn(f"{p}.bn3", 4 * width)]
            if b == 0:
                rows += [(f"{p}.downsample.0.weight", (4 * width, in_ch, 1, 1), "param"),
                         *_bn(f"{p}.downsample.1", 4 * width)]
            in_ch = 4 * width
    return rows + [("fc.weight", (1000, 2048), "param"), ("fc.bias", (1000,), "param")]


def vit_b16() -> Table:
    """torchvision vit_b_16: 152 parameters, 86,567,656 elements, no buffers."""
    d, mlp = 768, 3072
    rows: Table = [("class_token", (1, 1, d), "param"), ("conv_proj.weight", (d, 3, 16, 16), "param"),
                   ("conv_proj.bias", (d,), "param"), ("encoder.pos_embedding", (1, 197, d), "param")]
    for i in range(12):
        p = f"encoder.layers.encoder_layer_{i}"
        rows += [(f"{p}.ln_1.weight", (d,), "param"), (f"{p}.ln_1.bias", (d,), "param"),
                 (f"{p}.self_attention.in_proj_weight", (3 * d, d), "param"),
                 (f"{p}.self_attention.in_proj_bias", (3 * d,), "param"),
                 (f"{p}.self_attention.out_proj.weight", (d, d), "param"),
                 (f"{p}.self_attention.out_proj.bias", (d,), "param"),
                 (f"{p}.ln_2.weight", (d,), "param"), (f"{p}.ln_2.bias", (d,), "param"),
                 (f"{p}.mlp.0.weight", (mlp, d), "param"), (f"{p}.mlp.0.bias", (mlp,), "param"),
                 (f"{p}.mlp.3.weight", (d, mlp), "param"), (f"{p}.mlp.3.bias", (d,), "param")]
    return rows + [("encoder.ln.weight", (d,), "param"), ("encoder.ln.bias", (d,), "param"),
                   ("heads.head.weight", (1000, d), "param"), ("heads.head.bias", (1000,), "param")]


def many_small(count: int = 5000) -> Table:
    """Many small tensors (norm scales, biases, adapters): where per-tensor launches dominate."""
    sizes = (64, 128, 256, 512, 768, 1024, 2048)
    return [(f"t{i}", (sizes[i % len(sizes)],), "param") for i in range(count)]


TABLES = {"resnet50": resnet50, "vit_b16": vit_b16, "many_small": many_small}


def table_from_module(module) -> Table:
    """(name, shape, kind) of a module's state: parameters, floating buffers, integer counters."""
    rows: Table = []
    for name, tensor in module.state_dict(keep_vars=True).items():
        kind = "param" if name in dict(module.named_parameters()) else (
            "buffer" if tensor.is_floating_point() else "counter")
        rows.append((name, tuple(tensor.shape), kind))
    return rows


def load_table(spec: str) -> tuple[str, Table]:
    """A model's table from `spec`: an embedded name (resnet50, vit_b16, many_small), a JSON
    file ([{"name", "shape", "kind"}] or {name: shape}; kind defaults to 'param'), or
    `package.module:callable` returning an nn.Module (its parameters and buffers are used)."""
    if spec in TABLES:
        return spec, TABLES[spec]()
    if spec.endswith(".json"):
        data = json.loads(Path(spec).read_text())
        if isinstance(data, dict):
            data = [{"name": k, "shape": v} for k, v in data.items()]
        return Path(spec).stem, [(d["name"], tuple(d["shape"]), d.get("kind", "param")) for d in data]
    if ":" in spec:
        module_name, attr = spec.split(":", 1)
        factory = getattr(importlib.import_module(module_name), attr)
        return attr, table_from_module(factory())
    raise ValueError(f"unknown model {spec!r}: use one of {', '.join(TABLES)}, a .json shape "
                     "file, or package.module:callable")


def make_model_tensors(table, teacher_dtype, student_dtype, device):
    teacher, student = [], []
    gen = torch.Generator().manual_seed(0)
    for _, shape, kind in table:
        if kind == "counter":
            teacher.append(torch.zeros(shape, dtype=torch.int64, device=device))
            student.append(torch.full(shape, 1000, dtype=torch.int64, device=device))
        else:
            teacher.append(torch.randn(shape, generator=gen).to(device, teacher_dtype))
            student.append(torch.randn(shape, generator=gen).to(device, student_dtype))
    return teacher, student


class ShapeModel(nn.Module):
    """A module whose parameters and buffers have a shape table's names and shapes."""

    def __init__(self, table, device, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self._names = {}
        for name, shape, kind in table:
            key = name.replace(".", "__")
            if kind == "param":
                self.register_parameter(key, nn.Parameter(torch.randn(shape, generator=g).to(device, dtype)))
            elif kind == "buffer":
                self.register_buffer(key, torch.rand(shape, generator=g).to(device, dtype))
            else:
                self.register_buffer(key, torch.zeros(shape, dtype=torch.int64, device=device))


def make(table, device, dtype=torch.float32):
    student = ShapeModel(table, device, dtype)
    g = torch.Generator().manual_seed(1)
    for p in student.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device, dtype)
    return student


# eman_norm sites of ResNet-50: (name, channels, spatial size, residual add before the ReLU).
RESNET50_SITES = [("stem bn1+relu", 64, 112, False), ("layer1 bn3+add+relu", 256, 56, True),
                  ("layer2 bn3+add+relu", 512, 28, True), ("layer3 bn3+add+relu", 1024, 14, True),
                  ("layer4 bn3+add+relu", 2048, 7, True)]
