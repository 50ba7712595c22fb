"""PostHocEMA's snapshot pipeline (eman_fused/posthoc.py): the ordering rules of asynchronous
snapshots (CUDA profiles: pinned staging, a side stream, events) checked on the CPU with a
stand-in that defers every copy and every finish, and the synchronous CPU path."""
import pytest
import torch

from eman_fused.posthoc import PostHocEMA

from conftest import bits
from test_posthoc import _toy, _train


class _DeferredCopies:
    """Stands in for the CUDA side stream on the CPU: a copy is only queued, and runs when the
    training "stream" waits for its event (before_write) or the host does (wait_host), as on a
    GPU where it would land at some time before either. A pipeline that let an update write
    the profiles, or a snapshot refill the staging buffers, before waiting would store values of
    the wrong step here. The finishing work is deferred too, until the pipeline flushes."""

    asynchronous = True

    def __init__(self):
        self.queue = []
        self.log = []

    def host_buffer(self, like):
        return torch.empty(like.shape, dtype=like.dtype)

    def copy(self, dsts, srcs):
        event = object()
        self.queue.append((event, dsts, srcs))
        self.log.append("copy")
        return event

    def _run_until(self, event):
        while any(e is event for e, _, _ in self.queue):
            _, dsts, srcs = self.queue.pop(0)
            for d, s in zip(dsts, srcs):
                d.copy_(s)

    def before_write(self, event):
        self.log.append("wait")
        self._run_until(event)

    def wait_host(self, event):
        self._run_until(event)

    def submit(self, fn):
        log = self.log

        class Deferred:
            done = False

            def result(self):
                if not self.done:
                    self.done = True
                    log.append("finish")
                    fn()

        return Deferred()


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_async_snapshot_pipeline_stores_the_right_step(tmp_path, on_disk):
    from eman_fused.posthoc import _SnapshotPipeline

    def run(deferred):
        model = _toy()
        d = (tmp_path / f"d{int(deferred)}") if on_disk else None
        ph = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=3, snapshot_dir=d)
        shim = None
        if deferred:
            shim = _DeferredCopies()
            ph._pipeline = _SnapshotPipeline(shim)
        _train(model, 20, [ph.update])
        return ph, shim

    sync, _ = run(False)
    ph, shim = run(True)
    # every update after a snapshot waited for its copy (on the GPU: the training stream waits
    # for the side stream's event), and each snapshot's finish ran before the next snapshot
    # refilled the staging buffers
    assert shim.log == ["copy", "wait"] + ["finish", "copy", "wait"] * 5
    a, b = sync.reconstruct(0.08), ph.reconstruct(0.08)  # reconstruct flushes the last one
    assert shim.log.count("finish") == 6
    for n in a:
        assert torch.equal(bits(a[n]), bits(b[n])), n
    index_sync, index_async = sync._snapshot_index(), ph._snapshot_index()
    assert [s for s, _ in index_sync] == [s for s, _ in index_async] == [3, 6, 9, 12, 15, 18]
    for (_, x), (_, y) in zip(index_sync, index_async):
        x, y = PostHocEMA._load(x), PostHocEMA._load(y)
        assert x["step"] == y["step"]
        for px, py in zip(x["profiles"], y["profiles"]):
            for n in px:
                assert torch.equal(bits(px[n]), bits(py[n])), (x["step"], n)
    # one set of staging buffers, K model copies, reused by every snapshot
    model_bytes = sum(t.nbytes for t in ph.profile_state_dict(0).values())
    assert ph.snapshot_staging_bytes == 2 * model_bytes
    if not on_disk:  # in memory, each snapshot holds its own copy, not the staging buffers
        ptrs = {t.data_ptr() for s in ph.snapshots for p in s["profiles"] for t in p.values()}
        staging = {t.data_ptr() for p in ph._pipeline.staging for t in p}
        assert not ptrs & staging


def test_async_snapshot_without_the_wait_would_be_wrong(tmp_path):
    """The shim is a real test of the ordering: skip the wait before an update and the queued
    copy reads the next step's profiles."""
    from eman_fused.posthoc import _SnapshotPipeline
    model = _toy()
    ph = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=5)
    ph._pipeline = _SnapshotPipeline(_DeferredCopies())
    ph._pipeline.before_update = lambda: None
    _train(model, 6, [ph.update])
    at_5 = ph.state_dict()["snapshots"][0]["profiles"][0]
    now = ph.profile_state_dict(0)
    assert all(torch.equal(at_5[n], now[n]) for n in now if now[n].is_floating_point())  # step 6's


def test_cpu_snapshots_are_synchronous_and_own_their_memory():
    model = _toy()
    ph = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=2)
    _train(model, 4, [ph.update])
    assert len(ph.snapshots) == 2
    assert ph.snapshot_staging_bytes == 0  # CPU profiles kept in memory: no staging buffers
    s2, s4 = ph.snapshots
    assert ph.snapshot()["profiles"][0]  # filled on return: no flush needed
    assert s2["step"] == 2 and s4["step"] == 4
    assert not any(torch.equal(s2["profiles"][0][n], s4["profiles"][0][n])
                   for n in s2["profiles"][0] if n.endswith("weight"))
