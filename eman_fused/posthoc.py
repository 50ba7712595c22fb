"""PostHocEMA: EDM2's post-hoc EMA (Karras et al., CVPR 2024). K power-function EMA profiles
follow the model, updated in one fused pass (torch.ops.eman_fused.posthoc_ema_update_: the
student read once, each profile read and written once); every `snapshot_every` updates each
profile is stored (CPU memory, or one torch.load-able file per snapshot in `snapshot_dir`);
after training, `reconstruct(sigma_rel)` returns the EMA of any relative width as the
least-squares combination of the snapshots (eman_fused.reference.posthoc_coefficients).

Memory: K profile copies of the model on its device (in `profile_dtype`); each snapshot holds
K copies more, on the CPU or on disk (K * model bytes per file), so a run with S snapshots
stores S * K * model bytes. With CUDA profiles a snapshot is asynchronous: one set of pinned
host staging buffers (K * model bytes, allocated at the first snapshot and reused) receives
the copy on a side stream while training goes on; a worker thread then writes the file (or
moves the copy to pageable CPU memory) off the training thread.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from . import reference
from .nn import convert_to_eman
from .ops.ema import ema_update_
from .ops.posthoc import posthoc_ema_update_
from .teacher import named_tensors, unwrap

_SNAPSHOT_FORMAT = "posthoc-{step:010d}.pt"


class _Done:
    def __init__(self, fn):
        fn()

    def result(self):
        return None


class _SyncCopies:
    """Snapshot copies for CPU profiles: made at once (the "event" is complete on return), and
    the snapshot stored at once."""

    asynchronous = False

    def host_buffer(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype)

    def copy(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]):
        for d, s in zip(dsts, srcs, strict=True):
            d.copy_(s)
        return None

    def before_write(self, event) -> None:
        pass

    def wait_host(self, event) -> None:
        pass

    def submit(self, fn):
        return _Done(fn)


class _CudaCopies:
    """Snapshot copies for CUDA profiles: device -> pinned host on a side stream. The side stream
    first waits for the training stream (the profiles' latest update); the returned event marks
    the copy's end. Before the next update writes the profiles, the training stream waits for
    that event (on the GPU: no host synchronization); before the staging buffers are read on
    the host, or filled again, the host waits for it."""

    asynchronous = True

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="posthoc-snapshot")

    def host_buffer(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)

    def copy(self, dsts, srcs):
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            for d, s in zip(dsts, srcs, strict=True):
                d.copy_(s, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.side)
        return event

    def before_write(self, event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def wait_host(self, event) -> None:
        event.synchronize()

    def submit(self, fn) -> Future:
        return self._worker.submit(fn)


class _SnapshotPipeline:
    """One snapshot in flight at most: start() copies every profile into host buffers
    (asynchronously for CUDA profiles) and hands the rest (wait for the copy, then keep it in
    memory or write the file) to `finish`, submitted to the copies' executor (a worker thread
    for CUDA, inline for the CPU). The staging buffers are filled again only after the previous
    snapshot's finish has returned, and the profiles are written again (the next update) only
    after the copy out of them has ended. own=True: fresh host buffers that the snapshot keeps
    (CPU profiles kept in memory: one copy, no staging)."""

    def __init__(self, copies):
        self.copies = copies
        self.staging: list[list[torch.Tensor]] | None = None
        self._pending = None
        self._copy_event = None

    def before_update(self) -> None:
        if self._copy_event is not None:
            self.copies.before_write(self._copy_event)
            self._copy_event = None

    def start(self, profiles: list[list[torch.Tensor]],
              finish: Callable[[list[list[torch.Tensor]]], None], own: bool = False) -> None:
        self.flush()  # the previous snapshot is done with the staging buffers
        if own:
            buffers = [[self.copies.host_buffer(t) for t in prof] for prof in profiles]
        else:
            if self.staging is None:
                self.staging = [[self.copies.host_buffer(t) for t in prof] for prof in profiles]
            buffers = self.staging
        event = self.copies.copy([d for prof in buffers for d in prof],
                                 [t for prof in profiles for t in prof])
        self._copy_event = event
        copies = self.copies

        def complete():
            copies.wait_host(event)
            finish(buffers)

        self._pending = copies.submit(complete)

    def flush(self) -> None:
        """Waits for the snapshot in flight (and raises what its finish raised)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    @property
    def staging_bytes(self) -> int:
        return 0 if self.staging is None else sum(t.nbytes for prof in self.staging for t in prof)


class PostHocEMA:
    """K EDM2 power-function EMA profiles of `model`, snapshots, and reconstruction.

    sigma_rels: the profiles' relative widths (EDM2 Eq. 3; gamma derived from each).
    snapshot_every: store every profile each N updates (None: never; reconstruct then has
        nothing to work from). snapshot_dir: a folder for the snapshot files (None: CPU memory).
        CUDA profiles are snapshotted asynchronously (pinned staging buffers, a side stream, a
        worker thread for the file or the CPU copy); flush() waits for the one in flight.
    profile_dtype: dtype of the floating profiles (default: each tensor's own dtype).
    max_residual: reconstruct() refuses a request whose best least-squares fit leaves more
        than this relative L2 error in the averaging profile (outside what the snapshots express).
    backend: 'auto', 'cpu', 'cuda', 'triton' or 'reference' (eman_fused.ops.posthoc_ema_update_).
    buffers: 'ema' (default): floating buffers (BatchNorm running statistics) are averaged
        with each profile's power function like the weights, as EMAN averages them, so a
        profile normalizes with statistics that match its weights; 'copy': they are copied
        from the model at every update (one more fused call, momentum 0, for all profiles).
        Integer buffers (num_batches_tracked) are copied either way.

    Parameters and buffers are matched by name (wrappers such as DDP and torch.compile
    removed). profile_module(k) / reconstruct_module(sigma_rel) give a copy of the model with
    those weights whose BatchNorms are EMAN layers (eman_fused.nn.EMANBatchNorm*d: they
    normalize with the averaged running statistics in train and eval mode alike), e.g. for
    evaluation or as the teacher of a student-teacher method.
    Call update() after each optimizer step; t counts updates, 1 at the first, which copies
    the model (beta_1 = 0).
    """

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10),
                 snapshot_every: int | None = None, snapshot_dir: str | os.PathLike | None = None,
                 *, profile_dtype: torch.dtype | None = None, max_residual: float = 0.05,
                 backend: str = "auto", buffers: str = "ema"):
        if buffers not in ("ema", "copy"):
            raise ValueError(f"buffers must be 'ema' or 'copy', got {buffers!r}")
        if not sigma_rels:
            raise ValueError("PostHocEMA needs at least one sigma_rel")
        if snapshot_every is not None and (not isinstance(snapshot_every, int) or snapshot_every < 1):
            raise ValueError(f"snapshot_every must be a positive int or None, got {snapshot_every!r}")
        if profile_dtype is not None and not profile_dtype.is_floating_point:
            raise ValueError(f"profile_dtype must be a floating dtype, got {profile_dtype}")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [reference.sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.snapshot_every = snapshot_every
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.max_residual = float(max_residual)
        self.backend = backend
        self.buffers = buffers
        self._model = model
        named = named_tensors(model)
        self._names = list(named)
        # buffers='copy': the floating buffers leave the averaging call for a copy call.
        self._copied = [n for n, (t, is_buffer) in named.items()
                        if buffers == "copy" and is_buffer and t.is_floating_point()]
        copied = set(self._copied)
        self._averaged = [n for n in self._names if n not in copied]
        self._state_keys = set(unwrap(model).state_dict().keys())
        self.profiles: list[dict[str, torch.Tensor]] = []
        for _ in self.gammas:
            prof = {}
            for name, (t, _is_buffer) in named.items():
                dtype = profile_dtype if (profile_dtype is not None and t.is_floating_point()) else t.dtype
                prof[name] = t.detach().to(dtype=dtype, copy=True).requires_grad_(False)
            self.profiles.append(prof)
        device = next(iter(named.values()))[0].device if named else torch.device("cpu")
        self.step = torch.zeros((), dtype=torch.int64, device=device)  # updates done, on the device
        self._num_updates = 0  # its host mirror: snapshot times without reading the device
        self.snapshots: list[dict] = []  # in-memory snapshots (snapshot_dir None)
        if self.snapshot_dir is not None:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        self._pipeline = _SnapshotPipeline(_CudaCopies(device) if device.type == "cuda" else _SyncCopies())

    # -- training ---------------------------------------------------------------------------
    def _student(self) -> dict[str, torch.Tensor]:
        named = named_tensors(self._model)
        if list(named) != self._names:
            missing = sorted(set(self._names) - set(named))
            extra = sorted(set(named) - set(self._names))
            raise RuntimeError(f"PostHocEMA: the model's parameters and buffers changed since "
                               f"construction (missing: {missing[:5]}, new: {extra[:5]})")
        return {n: t.detach() for n, (t, _) in named.items()}

    @torch.no_grad()
    def update(self) -> None:
        """One update of every profile (one fused pass), then a snapshot when due."""
        student = self._student()
        lists = [[p[n] for n in self._averaged] for p in self.profiles]
        self._pipeline.before_update()  # a snapshot's copy out of the profiles has ended
        posthoc_ema_update_(lists, [student[n] for n in self._averaged], self.step, self.gammas,
                            backend=self.backend)
        if self._copied:
            ema_update_([p[n] for p in self.profiles for n in self._copied],
                        [student[n] for _ in self.profiles for n in self._copied], 0.0, backend=self.backend)
        self._num_updates += 1
        if self.snapshot_every is not None and self._num_updates % self.snapshot_every == 0:
            self.snapshot()

    @property
    def num_updates(self) -> int:
        return self._num_updates

    def profile_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Profile k's current weights under the plain model's state_dict keys."""
        prof = self.profiles[k]
        return {n: prof[n] for n in self._names if n in self._state_keys}

    def profile_module(self, k: int, *, eman: bool = True, fuse_relu: bool = False) -> nn.Module:
        """A copy of the model holding profile k's current weights, frozen, in eval mode; with
        eman=True its BatchNorms are EMAN layers (normalizing with the profile's statistics in
        train mode too)."""
        return self._module_with(self.profile_state_dict(k), eman, fuse_relu)

    def reconstruct_module(self, sigma_rel: float, step: int | None = None, *, eman: bool = True,
                           fuse_relu: bool = False) -> nn.Module:
        """reconstruct(sigma_rel, step) loaded into a copy of the model (see profile_module)."""
        return self._module_with(self.reconstruct(sigma_rel, step), eman, fuse_relu)

    @torch.no_grad()
    def _module_with(self, state: dict[str, torch.Tensor], eman: bool, fuse_relu: bool) -> nn.Module:
        import copy
        module = copy.deepcopy(unwrap(self._model))
        module.load_state_dict(state)
        if eman:
            module = convert_to_eman(module, fuse_relu=fuse_relu, backend=self.backend)
        for p in module.parameters():
            p.requires_grad_(False)
        return module.eval()

    # -- snapshots --------------------------------------------------------------------------
    def snapshot(self) -> dict | Path:
        """Store every profile now: the snapshot's dict (kept in memory) or the path of its file in
        snapshot_dir. With CUDA profiles this returns once the copy is queued; the dict is filled
        in, or the file appears, when the copy has landed (flush() waits for that)."""
        keys = [n for n in self._names if n in self._state_keys]
        step = self._num_updates
        meta = {"step": step, "gammas": list(self.gammas), "sigma_rels": list(self.sigma_rels)}
        path = None if self.snapshot_dir is None else \
            self.snapshot_dir / _SNAPSHOT_FORMAT.format(step=step)
        snap = dict(meta, profiles=[])
        if path is None:
            self.snapshots.append(snap)

        own = path is None and not self._pipeline.copies.asynchronous

        def finish(buffers):
            profiles = [dict(zip(keys, prof)) for prof in buffers]
            if path is None:  # staging buffers are reused: the snapshot takes its own copy
                snap["profiles"] = profiles if own else \
                    [{n: torch.empty(t.shape, dtype=t.dtype).copy_(t) for n, t in p.items()}
                     for p in profiles]
                return
            tmp = path.with_suffix(".tmp")
            torch.save(dict(meta, profiles=profiles), tmp)
            os.replace(tmp, path)  # a crash mid-write leaves no truncated snapshot behind

        self._pipeline.start([[prof[n] for n in keys] for prof in self.profiles], finish, own)
        return snap if path is None else path

    def flush(self) -> None:
        """Waits until the snapshot in flight (if any) is stored."""
        self._pipeline.flush()

    @property
    def snapshot_staging_bytes(self) -> int:
        """Host bytes held for snapshot staging (K * model bytes after the first snapshot)."""
        return self._pipeline.staging_bytes

    def _snapshot_index(self) -> list[tuple[int, object]]:
        """(step, snapshot or path) in step order."""
        self.flush()
        if self.snapshot_dir is None:
            return [(s["step"], s) for s in self.snapshots]
        out = []
        for p in self.snapshot_dir.glob("posthoc-*.pt"):
            out.append((int(p.stem.split("-")[1]), p))
        return sorted(out, key=lambda x: x[0])

    @staticmethod
    def _load(item) -> dict:
        return item if isinstance(item, dict) else torch.load(item, map_location="cpu", weights_only=True)

    # -- reconstruction ---------------------------------------------------------------------
    def coefficients(self, sigma_rel: float, step: int | None = None):
        """The least-squares weights (one per snapshot profile), the residual, and what they
        apply to: (weights [n_snapshots x K], residual, snapshot list)."""
        gamma_r = reference.sigma_rel_to_gamma(sigma_rel)
        index = self._snapshot_index()
        if not index:
            raise ValueError("PostHocEMA.reconstruct: there are no snapshots (set snapshot_every)")
        last = index[-1][0]
        t_r = last if step is None else int(step)
        if t_r > last:
            raise ValueError(f"PostHocEMA.reconstruct: step {t_r} is after the last snapshot "
                             f"({last}); the snapshots know nothing later")
        index = [(s, item) for s, item in index if s <= t_r]
        if not index:
            raise ValueError(f"PostHocEMA.reconstruct: no snapshot at or before step {t_r}")
        gammas = self.gammas
        steps = [s for s, _ in index for _ in gammas]
        gs = [g for _ in index for g in gammas]
        x, residual = reference.posthoc_coefficients(steps, gs, t_r, gamma_r)
        if residual > self.max_residual:
            raise ValueError(
                f"PostHocEMA.reconstruct: sigma_rel={sigma_rel} at step {t_r} is outside what the "
                f"snapshots express: the best fit leaves a relative L2 error of {residual:.3g} in "
                f"the averaging profile (max_residual={self.max_residual}); profiles sigma_rel="
                f"{self.sigma_rels}, {len(index)} snapshots at steps {index[0][0]}..{index[-1][0]}")
        return x.reshape(len(index), len(gammas)), residual, index

    @torch.no_grad()
    def reconstruct(self, sigma_rel: float, step: int | None = None) -> dict[str, torch.Tensor]:
        """The EMA of relative width sigma_rel at `step` (default: the last snapshot), as a plain
        state_dict (the model's keys and dtypes, on the CPU) from the stored snapshots. Snapshots
        on disk are read one at a time. Integer buffers come from the latest snapshot used."""
        x, _, index = self.coefficients(sigma_rel, step)
        model_sd = unwrap(self._model).state_dict()
        acc: dict[str, torch.Tensor] = {}
        ints: dict[str, torch.Tensor] = {}
        for i, (_, item) in enumerate(index):
            snap = self._load(item)
            for k, prof in enumerate(snap["profiles"]):
                w = float(x[i, k])
                for n, t in prof.items():
                    if t.is_floating_point():
                        if n not in acc:
                            acc[n] = torch.zeros(t.shape, dtype=torch.float64)
                        acc[n].add_(t.to(torch.float64), alpha=w)
                    elif k == 0:
                        ints[n] = t.clone()
        out = {}
        for n in model_sd:
            if n in acc:
                out[n] = acc[n].to(model_sd[n].dtype)
            elif n in ints:
                out[n] = ints[n]
        return out

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self.flush()
        return {"num_updates": self._num_updates, "gammas": list(self.gammas), "buffers": self.buffers,
                "sigma_rels": list(self.sigma_rels), "snapshot_every": self.snapshot_every,
                "profiles": [{n: t.detach().clone() for n, t in p.items()} for p in self.profiles],
                "snapshots": list(self.snapshots),
                "snapshot_dir": None if self.snapshot_dir is None else str(self.snapshot_dir)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if [float(g) for g in state["gammas"]] != self.gammas:
            raise ValueError(f"PostHocEMA.load_state_dict: the state has gammas {state['gammas']}, "
                             f"this object {self.gammas} (built with other sigma_rels)")
        if state.get("buffers", "ema") != self.buffers:
            raise ValueError(f"PostHocEMA.load_state_dict: the state was made with buffers="
                             f"{state.get('buffers', 'ema')!r}, this object has buffers={self.buffers!r}")
        if len(state["profiles"]) != len(self.profiles):
            raise ValueError("PostHocEMA.load_state_dict: number of profiles differs")
        for mine, theirs in zip(self.profiles, state["profiles"]):
            if set(mine) != set(theirs):
                raise ValueError("PostHocEMA.load_state_dict: the profiles' tensor names differ "
                                 f"(missing: {sorted(set(mine) - set(theirs))[:5]}, "
                                 f"unexpected: {sorted(set(theirs) - set(mine))[:5]})")
            for n, t in theirs.items():
                if mine[n].shape != t.shape or mine[n].dtype != t.dtype:
                    raise ValueError(f"PostHocEMA.load_state_dict: {n} is {t.dtype}{tuple(t.shape)} "
                                     f"in the state, {mine[n].dtype}{tuple(mine[n].shape)} here")
        self.flush()
        self._pipeline.before_update()
        for mine, theirs in zip(self.profiles, state["profiles"]):
            for n, t in theirs.items():
                mine[n].copy_(t)
        self._num_updates = int(state["num_updates"])
        self.step.fill_(self._num_updates)
        self.snapshots = list(state.get("snapshots", []))
