"""The embedded shape tables match the published models' parameter counts."""
import math

from eman_fused.bench import shapes


def count(table, kind):
    return sum(math.prod(shape) for _, shape, k in table if k == kind)


def test_resnet50_table():
    table = shapes.resnet50()
    assert len(table) == 320  # 161 parameters + 3 x 53 BatchNorm buffers
    assert count(table, "param") == 25_557_032
    assert sum(1 for *_, k in table if k == "counter") == 53
    assert len({name for name, *_ in table}) == len(table)


def test_vit_b16_table():
    table = shapes.vit_b16()
    assert len(table) == 152
    assert count(table, "param") == 86_567_656
