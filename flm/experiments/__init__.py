"""The handout's §7 experiments as code: each trains what it needs, writes a plot, a markdown
table and ``report.md`` under ``OUT/<experiment>/``, and returns its numbers.

    flm experiment lr          # learning-rate sweep up to divergence (vmapped), loss vs lr
    flm experiment batch-size  # batch sizes 1 … 256 at a fixed token budget, lr re-tuned per size
    flm experiment ablations   # no RMSNorm (two lrs), post-norm, NoPE, SiLU vs SwiGLU (matched params)
    flm experiment tie         # tied input/output embeddings
    flm experiment generate    # a ≥ 256-token sample from the baseline, with its decoding settings
    flm experiment tokenizer   # §2.7: compression ratio, longest token, throughput, 825 GB estimate
    flm experiment all

All share one tokenizer and one pair of token files in ``OUT`` and one baseline run
(``OUT/baseline``, trained once). Models of one shape that differ only in learning rate or weight
decay train together in one vmapped step (:mod:`flm.experiments.vmapped`).

Source: CS336 assignment 1 handout §2.7, §7.2–7.3.
"""

from flm.experiments.handout import EXPERIMENTS, Context, run_experiment

__all__ = ["EXPERIMENTS", "Context", "run_experiment"]
