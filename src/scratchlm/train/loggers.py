"""Where metric rows go besides metrics.jsonl: TensorBoard and Weights & Biases, when asked for with
`train.log_to = ["tensorboard", "wandb"]`. Both write locally with no internet: TensorBoard always, W&B
in offline mode when no API key is set (`wandb sync` uploads later)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from scratchlm.errors import UserError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class Sinks:
    def __init__(self, names: list[str], run_dir: Path, config: dict, resumed: bool):
        self.writers = []
        for name in names:
            if name not in PACKAGES:
                raise UserError(f"train.log_to: {name!r} is not one of {', '.join(PACKAGES)}")
            if importlib.util.find_spec(PACKAGES[name]) is None:
                raise UserError(f"train.log_to names {name} but it is not installed: pip install {PACKAGES[name]}")
            self.writers.append(getattr(self, f"_open_{name}")(Path(run_dir), config, resumed))

    @staticmethod
    def _open_tensorboard(run_dir: Path, config: dict, resumed: bool):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

        def write(row: dict) -> None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, row["step"])
            writer.flush()

        return write, writer.close

    @staticmethod
    def _open_wandb(run_dir: Path, config: dict, resumed: bool):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        # One W&B run per run folder, so a resumed run continues its curves instead of starting new ones.
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "scratchlm"), name=run_dir.name, dir=str(run_dir),
                         id="scratchlm-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12],
                         resume="allow",
                         config=config, mode=mode)

        def write(row: dict) -> None:
            run.log({k: v for k, v in row.items() if isinstance(v, (int, float, str)) and k != "step"},
                    step=row["step"])

        return write, run.finish

    def write(self, row: dict) -> None:
        for write, _ in self.writers:
            write(row)

    def close(self) -> None:
        for _, close in self.writers:
            close()
