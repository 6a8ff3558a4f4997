"""The training loop: a short loop over components that own their intervals.

Per step: draw a batch (:func:`flm.data.get_batch`), run the pure train step. At a log, eval or
checkpoint step (the interval record): the :class:`~flm.train.metrics.StepMeter` summarises the
steps since the last one with one host sync (and the loop finds the exact first non-finite loss),
the :class:`~flm.train.clock.Clock` closes the throughput interval, the
:class:`~flm.train.evaluate.Evaluator` measures the validation loss, the
:class:`~flm.train.checkpointer.Checkpointer` saves the best model and the periodic checkpoint,
and the :class:`~flm.train.metrics.MetricsLogger` writes the metrics line. The vmapped sweep
(:func:`flm.experiments.vmapped.vmapped_train`) runs on the same components.

Source: CS336 assignment 1 handout §5.3 (training_together), §7.1 (experiment_log).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flm import distributed, manifest, shard
from flm._compat import is_compile_error
from flm._io import remove_orphan_temps, run_lock
from flm.data import get_batch, resolve_device
from flm.model import TransformerConfig, init_params, param_template, train_step_flops
from flm.progress import format_duration, info
from flm.train.checkpointer import Checkpointer, NonFiniteLossError, ShardSpec
from flm.train.clock import Clock
from flm.train.config import TrainConfig, compile_mode_problem, make_optimizer, resolve_auto, tf32_matmuls
from flm.train.evaluate import Evaluator
from flm.train.metrics import (
    MetricsLogger,
    StepMeter,
    Throughput,
    device_peak_flops,
    metrics_record,
    plot_metrics,
)
from flm.train.step import CUDA_GRAPH_SKIPPED, make_train_step

__all__ = ["train_loop", "CompileError"]


def train_loop(
    model_config: TransformerConfig,
    cfg: TrainConfig,
    train_tokens: np.ndarray,
    valid_tokens: np.ndarray | None,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    run_config: dict[str, Any] | None = None,
    tokenizer_fingerprint: str | None = None,
    log: Callable[[str], None] | None = None,
    dist_info: distributed.DistInfo | None = None,
) -> dict[str, Any]:
    """Train a model on memory-mapped tokens, with logging, evaluation, checkpoints and resume.

    Every ``log_interval`` steps a metrics line goes to ``out_dir/metrics.jsonl`` (see
    :mod:`flm.train.metrics`) and the console. Every ``eval_interval`` steps the validation loss
    is measured and the best model saved as ``best.safetensors``. Every ``checkpoint_interval``
    steps and at the end ``ckpt_<step>.safetensors`` is written (never with NaN/inf values),
    keeping the newest ``keep_checkpoints``. With ``resume`` the newest good checkpoint is loaded
    and training continues at the same schedule position with the same sampler state, so the
    result equals an uninterrupted run. Ctrl-C saves a checkpoint and returns with status
    ``"interrupted"``, SIGTERM likewise with status ``"terminated"`` (both after finishing the
    step in progress); SIGUSR1 saves a checkpoint and continues; ``time_budget`` stops early
    (status ``"time_budget"``) leaving time for
    the final evaluation. The run directory is locked for the duration (``out_dir/.lock``).

    Args:
        model_config: the model.
        cfg: optimiser and loop settings.
        train_tokens: ``(n,)`` training ids (e.g. ``flm.data.load_tokens``).
        valid_tokens: ``(m,)`` validation ids (at least ``context_length + 1``), or ``None``.
        out_dir: the run directory.
        resume: continue from the newest good checkpoint in ``out_dir`` if there is one.
        run_config: the whole run's settings, stored in checkpoints (default: model + train).
        tokenizer_fingerprint: stored in checkpoints and checked on resume.
        log: where log lines go (default: the ``flm`` logger at INFO).
        dist_info: a :class:`flm.distributed.DistInfo` for data parallelism: ``batch_size`` is
            the global batch, drawn by one sampler seeded alike on every rank (seed + 1, a single
            process's), each rank reading only its rows ``[rank * b, (rank + 1) * b)`` of it
            (``b = batch_size // world_size``), so the batches do not depend on the world size;
            gradients are averaged with a bucketed all-reduce, and only rank 0 logs, evaluates
            and writes files. A checkpoint holds the one sampler state, so it resumes at any
            world size.

    Returns:
        A summary: ``step``, ``status`` ("done" | "interrupted" | "terminated" | "time_budget"),
        ``best_val_loss``, ``best_step``, ``final_val_loss``, ``wall_time``, ``tokens``,
        ``tokens_per_sec`` (training time only), ``mfu``.

    Raises:
        NonFiniteLossError: on a NaN/inf loss or parameters (names the step and the last good
            checkpoint).
        ValueError: bad settings (validation data too short, a batch that does not divide,
            an unavailable device, a checkpoint of another model or tokenizer on resume).
        flm._io.RunLockedError: another process is using ``out_dir``.

    Source: handout §5.3 (training_together), §7.1 (experiment_log).
    """
    dist_info = dist_info or distributed.DistInfo(device=cfg.resolved_device())
    log = log or info
    world, main = dist_info.world_size, dist_info.is_main
    if cfg.batch_size % world:
        raise ValueError(f"train_loop: batch_size={cfg.batch_size} does not divide over {world} ranks")
    local_batch = cfg.batch_size // world
    if local_batch % cfg.grad_accum_steps:
        raise ValueError(
            f"train_loop: the per-rank batch of {local_batch} does not split into {cfg.grad_accum_steps} micro-batches"
        )
    if int(train_tokens.shape[0]) < model_config.context_length + 1:
        raise ValueError(
            f"the training data has {int(train_tokens.shape[0])} tokens; need at least context_length + 1 = "
            f"{model_config.context_length + 1}"
        )
    device = resolve_device(dist_info.device if dist_info.enabled else cfg.resolved_device())
    if not cfg.is_resolved:  # "auto" dtype/compile/tf32: the fast defaults for this device
        cfg, reasons = resolve_auto(cfg, device)
        if main:
            (log or info)("auto settings: " + "; ".join(reasons))
    problem = compile_mode_problem(cfg, device.type)
    if problem:
        raise ValueError(f"train_loop: {problem}")
    evaluator = None
    if valid_tokens is not None:
        evaluator = Evaluator(valid_tokens, model_config, local_batch, cfg.eval_batches, cfg.eval_interval)
    if not main:
        log = lambda _msg: None
    out = Path(out_dir)
    with run_lock(out) if main else contextlib.nullcontext():
        if main:
            remove_orphan_temps(out)
            manifest.claim(out, log=log)  # what flm writes here is recorded; it touches nothing else
        with tf32_matmuls(bool(cfg.tf32) and device.type == "cuda"):
            return _Run(
                model_config,
                cfg,
                train_tokens,
                evaluator,
                out,
                resume=resume,
                run_config=run_config or {"model": model_config.to_dict(), "train": cfg.to_dict()},
                fingerprint=tokenizer_fingerprint,
                log=log,
                dist_info=dist_info,
                device=device,
                local_batch=local_batch,
            ).train()


def _resume(
    ckpt: Checkpointer,
    like: dict[str, Any],
    model_config: TransformerConfig,
    sampler: torch.Generator,
    log: Callable[[str], None],
) -> tuple[Any, Any, int, float] | None:
    """Load the newest good checkpoint into ``(params, opt_state, step, wall time)`` and restore
    the sampler (the same state on every rank, whatever the world size the checkpoint was saved
    at); ``None`` when there is none.

    A checkpoint of a data-parallel run from before the global sampler holds every rank's sampler
    state (metadata ``rng_states``, one per rank): it resumes from rank 0's, and the log says the
    batches from there on differ from the original run's (which drew each rank's share from its
    own sampler)."""
    loaded = ckpt.resume(like, model_config)
    if loaded is None:
        log("no checkpoint to resume from: starting at step 0")
        return None
    states = loaded.metadata.get("rng_states")
    if states:  # the per-rank samplers of older checkpoints: continue from rank 0's
        sampler.set_state(torch.frombuffer(bytearray(base64.b64decode(states[0])), dtype=torch.uint8))
        log(
            f"{ckpt.last_good.name} holds {len(states)} per-rank sampler states (saved before the batches became "
            "independent of the world size): continuing from rank 0's, so the batches from here on differ "
            "from the original run's"
        )
    elif loaded.rng_state is not None:
        sampler.set_state(loaded.rng_state)
    log(f"resumed from {ckpt.last_good.name} at step {loaded.step}")
    return loaded.params, loaded.opt_state, loaded.step, float(loaded.metadata.get("wall_time") or 0.0)


class _Run:
    """One training run: its state, and the components that own their intervals (the
    :class:`StepMeter` the log interval, the :class:`Evaluator` the evaluations, the
    :class:`Checkpointer` the checkpoints, the :class:`Clock` the time budget, throughput and ETA).

    The constructor is the state setup: parameters and optimiser state (fresh, or the newest good
    checkpoint's), the sampler, the step function and the components. :meth:`train` runs the step
    loop (:meth:`steps`), whose logged steps are :meth:`record`, and finishes.
    """

    def __init__(
        self,
        model_config: TransformerConfig,
        cfg: TrainConfig,
        train_tokens: np.ndarray,
        evaluator: Evaluator | None,
        out: Path,
        *,
        resume: bool,
        run_config: dict[str, Any],
        fingerprint: str | None,
        log: Callable[[str], None],
        dist_info: distributed.DistInfo,
        device: torch.device,
        local_batch: int,
    ) -> None:
        main = dist_info.is_main
        self.model_config, self.cfg, self.train_tokens, self.local_batch = model_config, cfg, train_tokens, local_batch
        self.log, self.dist_info, self.device = log, dist_info, device
        # Sharded (--shard), every rank holds only its shards: each forward, evaluation and save is
        # a collective that every rank runs; replicated, rank 0 alone evaluates and saves.
        self.sharded = bool(cfg.shard)
        rank, world = dist_info.rank, dist_info.world_size
        if self.sharded and evaluator is not None:
            evaluator.logits_fn = functools.partial(
                _sharded_logits, config=model_config, world_size=world, compute_dtype=cfg.compute_dtype
            )
        self.evaluator = evaluator if main or self.sharded else None
        # The loop owns its params, optimiser state and gradients, so the step updates them in place
        # (donated buffers: no allocation per step); Ctrl-C is deferred to the end of the step
        # (_interrupt_guard), so an interrupted run never saves a half-applied update.
        tx = make_optimizer(cfg, inplace=True, norm_fn=shard.sharded_global_norm if self.sharded else None)
        gen = torch.Generator().manual_seed(cfg.seed)
        if self.sharded:
            self.params = shard.init_sharded_params(model_config, gen, rank, world, device=device)
        else:
            self.params = init_params(model_config, gen, device=device)
        self.opt_state = tx.init(self.params)
        # One sampler for the global batch, seeded alike on every rank (a single process's seed);
        # this rank reads only its rows of each batch, so the batches do not depend on the world size.
        self.sampler = torch.Generator().manual_seed(cfg.seed + 1)
        self.rows = slice(dist_info.rank * local_batch, (dist_info.rank + 1) * local_batch)
        self.ckpt = Checkpointer(
            out,
            interval=cfg.checkpoint_interval,
            keep=cfg.keep_checkpoints,
            run_config=run_config,
            tokenizer_fingerprint=fingerprint,
            enabled=main or self.sharded,
            log=log,
            shard=_shard_spec(model_config, tx, rank, world) if self.sharded else None,
        )
        self.start, wall_offset = 0, 0.0
        like = {"params": self.params, "opt_state": self.opt_state}
        loaded = _resume(self.ckpt, like, model_config, self.sampler, log) if resume else None
        if loaded is not None:
            self.params, self.opt_state, self.start, wall_offset = loaded
        self.step = self.start
        self.metrics = MetricsLogger(
            out,
            tensorboard=cfg.tensorboard,
            wandb=cfg.wandb,
            run_config=run_config,
            resume_step=self.start if loaded is not None else None,
            enabled=main,
        )
        self.meter = StepMeter(cfg.log_interval)
        if self.sharded:
            self.step_fn = shard.make_sharded_train_step(
                model_config,
                tx,
                world_size=world,
                compute_dtype=cfg.compute_dtype,
                grad_accum_steps=cfg.grad_accum_steps,
                donate=True,
            )
        else:
            self.step_fn = make_train_step(
                model_config,
                tx,
                compile="blocks" if cfg.compile and cfg.compile_scope == "blocks" else cfg.compile,
                donate=True,
                compile_kwargs=None if cfg.compile_mode == "default" else {"mode": cfg.compile_mode},
                compute_dtype=cfg.compute_dtype,
                grad_accum_steps=cfg.grad_accum_steps,
                grad_reduce=distributed.all_reduce_mean if dist_info.enabled else None,
            )
        peak = cfg.peak_flops or (device_peak_flops(device, cfg.compute_dtype) if main else None)
        self.clock = Clock(
            Throughput(train_step_flops(model_config, 1) / model_config.context_length, peak),
            tokens_per_step=cfg.batch_size * model_config.context_length,
            max_iters=cfg.max_iters,
            start_step=self.start,
            offset=wall_offset,
            budget_minutes=cfg.time_budget,
        )

    def train(self) -> dict[str, Any]:
        """Run the step loop, then finish: the final evaluation and checkpoint (unless stopped by a
        signal), and the summary that :func:`train_loop` returns."""
        status, signals = "done", _Signals()
        try:
            with _interrupt_guard(signals):
                status = self.steps(signals)
        except KeyboardInterrupt:
            status = "terminated" if signals.terminated else "interrupted"
            self.log(f"{'SIGTERM' if signals.terminated else 'interrupted'} at step {self.step}: saving a checkpoint")
            try:
                self.save_periodic()  # no collective: other ranks may be gone
            except NonFiniteLossError as err:
                self.log(f"not saved: {err}")
        finally:
            self.metrics.close()
            if self.dist_info.is_main:
                plot_metrics(self.metrics.path, self.metrics.path.parent / "loss.png")
        final_val = None
        if status not in ("interrupted", "terminated"):
            if self.evaluator is not None:
                last = self.evaluator.last
                final_val = last[1] if last and last[0] == self.step else self.evaluator(self.params, self.step)["loss"]
                self.ckpt.save_best(self.step, self.params, final_val)
            if self.ckpt.last_saved_step != self.step:
                self.save_periodic()
        ckpt, throughput = self.ckpt, self.clock.throughput
        return {
            "step": self.step,
            "status": status,
            "best_val_loss": ckpt.best_loss if math.isfinite(ckpt.best_loss) else None,
            "best_step": ckpt.best_step,
            "final_val_loss": final_val,
            "wall_time": self.clock.elapsed(),
            "tokens": self.step * self.clock.tokens_per_step,
            "tokens_per_sec": throughput.rate,
            "mfu": throughput.mfu,
        }

    def steps(self, signals: _Signals) -> str:
        """The step loop: draw a batch, run the step, and :meth:`record` at a step some component
        asks for. Returns ``"done"`` or ``"time_budget"``; Ctrl-C and SIGTERM raise
        ``KeyboardInterrupt`` at a step boundary."""
        cfg = self.cfg
        # Ranks see a signal or the time budget at slightly different moments. Where acting on it is
        # a collective (a sharded save; any stop before the next step's collectives), the ranks agree
        # at every step boundary with one tiny all-gather, so all stop at the same step.
        agree = self.sharded or (self.dist_info.enabled and cfg.time_budget is not None)
        while self.step < cfg.max_iters:
            stop, over = signals.stop, self.clock.over_budget()
            if agree:
                stop, over = _any_rank(stop, over)
            if stop:  # Ctrl-C or SIGTERM, deferred to this step boundary
                signals.stop = True
                raise KeyboardInterrupt
            if signals.take_checkpoint_request() and self.ckpt.last_saved_step != self.step:
                if self.sharded:  # only this rank was signalled; a sharded save needs every rank
                    self.log(f"SIGUSR1 at step {self.step}: ignored under --shard (a sharded save needs every rank)")
                else:
                    self.log(f"SIGUSR1 at step {self.step}: saving a checkpoint and continuing")
                    with self.clock.aside():
                        self.save_periodic()  # no collective: only this rank may have been signalled
            if over:
                self.log(f"time budget of {cfg.time_budget:g} min reached at step {self.step}")
                return "time_budget"
            batch = get_batch(
                self.train_tokens,
                cfg.batch_size,
                self.model_config.context_length,
                self.device,
                self.sampler,
                rows=self.rows,
            )
            if cfg.compile and self.step == self.start:  # the first call compiles: time it aside, say so
                self.params, self.opt_state, m = _compile_first_step(self, *batch)
            else:
                self.params, self.opt_state, m = self.step_fn(self.params, self.opt_state, *batch)
            self.step += 1
            self.meter.add(m)
            at_eval = self.evaluator is not None and self.evaluator.due(self.step)
            if self.meter.due(self.step) or at_eval or self.ckpt.due(self.step) or self.step == cfg.max_iters:
                self.record(at_eval)
        return "done"

    def record(self, at_eval: bool) -> None:
        """The interval record at the current step: one host sync summarises the steps since the
        last one (stopping at the first non-finite loss, naming its step), then the evaluation and
        best model if due, the metrics and log lines, and the periodic checkpoint if due."""
        step, clock = self.step, self.clock
        rate = clock.tick(step)
        wall_time = clock.elapsed()
        summary = self.meter.summarise()
        losses = summary["losses"]
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise NonFiniteLossError(
                f"the training loss became {losses[i].item()} at step {step - len(losses) + i + 1}; stopping: "
                f"{self.ckpt.last_good_text()}"
            )
        record = metrics_record(
            step,
            wall_time=wall_time,
            tokens=step * clock.tokens_per_step,
            train_loss=float(summary["train_loss"]),
            lr=None if summary["lr"] is None else float(summary["lr"]),
            grad_norm=float(summary["grad_norm"]),
            val_loss=None,
            val_perplexity=None,
            tokens_per_sec=rate,
            mfu=clock.throughput.mfu,
        )
        if at_eval:
            with clock.aside():
                res = self.evaluator(self.params, step)
                record["val_loss"], record["val_perplexity"] = res["loss"], res["perplexity"]
                self.ckpt.save_best(step, self.params, res["loss"])
        self.metrics.write(record)
        self.log(_log_line(record, self.cfg.max_iters, clock.eta(step, record["tokens_per_sec"])))
        if self.ckpt.due(step):
            with clock.aside():
                self.save_periodic()

    def save_periodic(self) -> None:
        """Checkpoint the current step with the sampler state (rank 0 writes; every rank's sampler is
        the same, so no collective: safe when only this rank was signalled or the others are gone)."""
        meta = {"wall_time": self.clock.elapsed()}
        self.ckpt.save(self.step, self.params, self.opt_state, sampler=self.sampler, metadata=meta)


def _sharded_logits(
    params: Any, inputs: torch.Tensor, *, config: TransformerConfig, world_size: int, compute_dtype: Any
) -> torch.Tensor:
    """The evaluator's forward under ``--shard`` (every rank runs it: it gathers the weights)."""
    return shard.sharded_transformer_lm(params, inputs, config, world_size=world_size, compute_dtype=compute_dtype)


def _shard_spec(config: TransformerConfig, tx: Any, rank: int, world: int) -> ShardSpec:
    """How the checkpointer saves this rank's shards: full-size templates, a barrier, an agreement."""
    template = param_template(config)
    return ShardSpec(
        rank,
        world,
        {"params": template, "opt_state": tx.init(template)},
        barrier=distributed.barrier,
        agree=lambda flag: not _any_rank(not flag)[0],
    )


def _any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over the ranks (a collective; the flags themselves without a process group)."""
    mine = torch.tensor([bool(f) for f in flags], dtype=torch.uint8)
    rows = distributed.all_gather_bytes(mine)
    return tuple(any(bool(row[i]) for row in rows) for i in range(len(flags)))


class CompileError(RuntimeError):
    """``torch.compile`` failed on the train step (the CLI names ``--no-compile``)."""


def _compile_first_step(run: _Run, *batch: torch.Tensor) -> Any:
    """Run the first call of a compiled step, which compiles it: logged, timed, and left out of the
    throughput and the ETA (not kept in the time budget's reserve, which is for evaluations and
    checkpoints); a failure of ``torch.compile`` itself becomes one :class:`CompileError`."""
    run.log("compiling the train step…")
    t = time.perf_counter()
    try:
        out = run.step_fn(run.params, run.opt_state, *batch)
    except Exception as err:
        graphs = CUDA_GRAPH_SKIPPED in str(err)  # inductor could not capture the step (compile_mode)
        if not (is_compile_error(err) or graphs):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        remedy = "--compile-mode default" if graphs else "--no-compile"
        raise CompileError(
            f"torch.compile failed on the train step ({type(err).__name__}: {first}); run again with {remedy}"
        ) from err
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)  # once, so the time printed is the compile's, not a queue's
    seconds = time.perf_counter() - t
    run.clock.skip(seconds, run.step + 1)  # its tokens and time are left out of tokens/s and the ETA
    run.log(f"compiled the train step in {seconds:.1f} s")
    return out


class _Signals:
    """What the signal handlers asked the loop to do at the next step boundary.

    Attributes:
        stop: Ctrl-C (SIGINT) or SIGTERM arrived: checkpoint and stop.
        terminated: the stop came from SIGTERM (status ``"terminated"``, exit 143 in the CLI).
        checkpoint: SIGUSR1 arrived: checkpoint and continue.
    """

    def __init__(self) -> None:
        self.stop = False
        self.terminated = False
        self.checkpoint = False

    def take_checkpoint_request(self) -> bool:
        """Whether SIGUSR1 asked for a checkpoint since the last call (clears the request)."""
        asked, self.checkpoint = self.checkpoint, False
        return asked


@contextlib.contextmanager
def _interrupt_guard(signals: _Signals):
    """Defer Ctrl-C (SIGINT), SIGTERM and SIGUSR1 to the next step boundary: the handlers only set
    flags on ``signals``, which the loop checks between steps, so a checkpoint never holds a
    half-applied in-place update and no handler starts a collective (under torchrun every rank is
    signalled; one waiting in a collective for another would hang). A second Ctrl-C interrupts at
    once; a second SIGTERM changes nothing (the step still finishes and is saved). Only the main
    thread can install signal handlers; elsewhere the signals are untouched.

    Args:
        signals: the flags to set.

    Yields:
        Nothing; read ``signals``.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_int(signum: int, frame: object) -> None:
        if signals.stop and not signals.terminated:
            raise KeyboardInterrupt
        signals.stop = True

    def on_term(signum: int, frame: object) -> None:
        signals.stop = signals.terminated = True

    def on_usr1(signum: int, frame: object) -> None:
        signals.checkpoint = True

    wanted = [(signal.SIGINT, on_int), (signal.SIGTERM, on_term)]
    if hasattr(signal, "SIGUSR1"):  # not on Windows
        wanted.append((signal.SIGUSR1, on_usr1))
    previous = [(sig, signal.signal(sig, handler)) for sig, handler in wanted]
    try:
        yield
    finally:
        for sig, handler in previous:
            signal.signal(sig, handler)


def _log_line(record: dict[str, Any], max_iters: int, eta: float | None) -> str:
    rate = record["tokens_per_sec"]
    lr = f" | lr {record['lr']:.2e}" if record["lr"] is not None else ""
    mfu = f" | MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else ""
    val = (
        f" | val {record['val_loss']:.4f} (ppl {record['val_perplexity']:.2f})"
        if record["val_loss"] is not None
        else ""
    )
    return (
        f"step {record['step']:6d}/{max_iters} | loss {record['train_loss']:.4f}{lr} | grad norm "
        f"{record['grad_norm']:.3f} | {rate:,.0f} tok/s{mfu} | ETA {format_duration(eta) if eta is not None else '?'}{val}"
    )
