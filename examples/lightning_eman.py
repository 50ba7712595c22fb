"""An EMAN teacher in a Lightning run: a small CNN on the bundled digits data, trained by
`Trainer.fit` with eman_fused's EMATeacherCallback (one fused teacher update per optimizer
step, gradient accumulation 2), validated with the teacher's weights swapped in, checkpointed
at each epoch's end and resumed from the middle; the resumed teacher equals the
uninterrupted one bit for bit.

  pip install 'eman_fused[lightning]'
  python examples/lightning_eman.py            # fit, resume, compare; student vs teacher accuracy
  python examples/lightning_eman.py --check    # also: the teacher == an eager reference EMAN teacher
                                               # after every optimizer step
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning.pytorch as L  # noqa: E402

from digits import ReferenceCheck, SmallCNN, accuracy, load_digits  # noqa: E402
from eman_fused.integrations.lightning import EMATeacherCallback  # noqa: E402

MOMENTUM = 0.95  # short run (120 optimizer steps): a window of ~20 steps


class DigitsModule(L.LightningModule):
    def __init__(self, data):
        super().__init__()
        torch.manual_seed(0)
        self.net = SmallCNN(width=16)
        self.data = data
        self.val_acc = []  # per validation epoch
        self._batches = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch  # with the callback's swap, self.net holds the teacher's weights here
        self._batches.append(((self.net(x).argmax(1) == y).float().sum().item(), len(y)))

    def on_validation_epoch_end(self):
        self.val_acc.append(sum(c for c, _ in self._batches) / sum(n for _, n in self._batches))
        self._batches = []

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)

    def train_dataloader(self):
        x, y = self.data[0], self.data[1]
        # A fixed order per epoch (seeded by the epoch): a resumed run sees the same batches.
        g = torch.Generator().manual_seed(self.current_epoch)
        order = torch.randperm(len(y), generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[order], y[order]), batch_size=32)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.data[2], self.data[3]), batch_size=256)


class CheckAgainstReference(L.Callback):
    """--check: an eager reference teacher beside the fused one, compared after every optimizer step."""

    def __init__(self, ema: EMATeacherCallback):
        self.ema, self.ref, self.last = ema, None, 0

    def on_train_start(self, trainer, pl_module):
        self.ref = ReferenceCheck(self.ema.teacher, pl_module.net, momentum=MOMENTUM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.last:  # after the EMA callback (it is earlier in the list)
            self.last = trainer.global_step
            self.ref.update()
            self.ref.compare()


def fit(data, root, epochs, ckpt_path=None, check=False):
    module = DigitsModule(data)
    ema = EMATeacherCallback(momentum=MOMENTUM, student="net")
    saver = L.callbacks.ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", every_n_epochs=1,
                                        save_top_k=-1, save_on_train_epoch_end=True)
    callbacks = [ema, saver] + ([CheckAgainstReference(ema)] if check else [])
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, accumulate_grad_batches=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        num_sanity_val_steps=0, reload_dataloaders_every_n_epochs=1, callbacks=callbacks)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, ema, trainer, callbacks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    data = load_digits(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        module, ema, trainer, callbacks = fit(data, root / "full", args.epochs, check=args.check)
        half = args.epochs // 2
        mid = root / "full" / "ckpt" / f"epoch={half - 1}.ckpt"
        _, resumed, _, _ = fit(data, root / "resumed", args.epochs, ckpt_path=mid)
        full_sd, resumed_sd = ema.teacher.state_dict(), resumed.teacher.state_dict()
        identical = all(torch.equal(full_sd[k], resumed_sd[k]) for k in full_sd)
    x_test, y_test = data[2], data[3]
    print(f"optimizer steps {trainer.global_step}, teacher updates {ema.teacher.num_updates} "
          f"(accumulate_grad_batches=2: one update per optimizer step)")
    print(f"test accuracy: student {accuracy(module.net, x_test, y_test):.3f}, "
          f"teacher {accuracy(ema.teacher.module, x_test, y_test):.3f}")
    print(f"validation accuracy with the teacher's weights, per epoch: "
          f"{', '.join(f'{a:.3f}' for a in module.val_acc)}")
    print(f"resumed from epoch {half} of {args.epochs}: teacher bit-identical to the uninterrupted run: {identical}")
    if args.check:
        print(f"== reference: the fused teacher equals the eager reference teacher after each of "
              f"{callbacks[-1].ref.compared} optimizer steps")
    ok = identical and ema.teacher.num_updates == trainer.global_step
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
