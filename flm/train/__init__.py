"""Training: the pure train step, evaluation, the run's settings and the training loop.

One module per concern:

- :mod:`flm.train.step` — ``make_train_step`` (``torch.func.grad_and_value`` + optimiser, one
  pure function), ``make_vmapped_train_step`` (K models at once), ``make_loss_fn``;
- :mod:`flm.train.evaluate` — ``evaluate`` (loss and perplexity on held-out tokens), ``Evaluator``;
- :mod:`flm.train.config` — ``TrainConfig``, ``make_optimizer`` (clip → AdamW on warm-up + cosine);
- :mod:`flm.train.checkpointer` — ``Checkpointer`` (interval, rotation, best model, resume);
- :mod:`flm.train.metrics` — ``MetricsLogger`` (JSONL + TensorBoard/wandb sinks), ``StepMeter`` (the
  log interval and its one host sync), ``read_metrics``, ``plot_metrics``, throughput and MFU;
- :mod:`flm.train.clock` — ``Clock`` (wall time, time budget, throughput, ETA);
- :mod:`flm.train.loop` — ``train_loop``, a short loop over those components (which the vmapped
  sweep, :mod:`flm.experiments.vmapped`, runs on too).

Source: CS336 assignment 1 handout §4–§5, §7.1.
"""

from flm.checkpoint import list_checkpoints
from flm.train.checkpointer import Checkpointer, NonFiniteLossError
from flm.train.config import TrainConfig, decay_mask, default_device, make_optimizer
from flm.train.evaluate import Evaluator, evaluate
from flm.train.loop import train_loop
from flm.train.metrics import MetricsLogger, plot_metrics, read_metrics
from flm.train.step import init_vmapped, make_loss_fn, make_train_step, make_vmapped_train_step

__all__ = [
    "make_loss_fn",
    "make_train_step",
    "make_vmapped_train_step",
    "init_vmapped",
    "evaluate",
    "Evaluator",
    "TrainConfig",
    "make_optimizer",
    "decay_mask",
    "default_device",
    "train_loop",
    "Checkpointer",
    "MetricsLogger",
    "list_checkpoints",
    "read_metrics",
    "plot_metrics",
    "NonFiniteLossError",
]
