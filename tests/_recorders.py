"""A callback for command-line runs in subprocesses: records what each rank trained on, validated (with a
Dice computed here, independently of the library's metrics), tested and predicted, as JSON lines in
``<out_dir>/rank<r>.jsonl``."""

import json
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch


def hand_dice(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Dice of classes 1..K-1 (both empty → 1, one empty → 0)."""
    out = []
    for c in range(1, num_classes):
        p, t = pred == c, label == c
        denominator = int(p.sum()) + int(t.sum())
        out.append(1.0 if denominator == 0 else 2.0 * int((p & t).sum()) / denominator)
    return out


class Recorder(L.Callback):
    """Records per rank; ``sleep`` seconds after each training batch slow a run down for a kill test.

    Args:
        out_dir: folder of the ``rank<r>.jsonl`` files.
        sleep: pause after each training batch, in seconds.
    """

    def __init__(self, out_dir: str, sleep: float = 0.0) -> None:
        self.out_dir = Path(out_dir)
        self.sleep = sleep

    def _write(self, trainer: L.Trainer, **record) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record["rank"] = trainer.global_rank
        with open(self.out_dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._write(
            trainer, kind="train", step=trainer.global_step, epoch=trainer.current_epoch, batch_idx=batch_idx,
            names=batch["name"], image_sum=float(batch["image"].double().sum()),
            label_sum=int(batch["label"].sum()),
        )  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.sleep:
            time.sleep(self.sleep)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        duplicate = bool(batch.get("duplicate", [False])[0])
        dice = None
        if not duplicate:
            with torch.no_grad():
                pred = pl_module.predict_volume(batch["image"]).argmax(1)
            dice = hand_dice(pred[0].numpy(), batch["label"][0, 0].numpy(), pl_module.hparams.num_classes)
        self._write(
            trainer, kind="val", epoch=trainer.current_epoch, sanity=trainer.sanity_checking,
            name=batch["name"][0], duplicate=duplicate, dice=dice,
        )  # fmt: skip

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._write(trainer, kind="test", name=batch["name"][0], duplicate="duplicate" in batch)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._write(
            trainer, kind="predict", name=batch["name"][0], duplicate="duplicate" in batch, written=outputs
        )


def read_records(out_dir: Path) -> list[dict]:
    """Every rank's records."""
    records = []
    for path in sorted(Path(out_dir).glob("rank*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records
