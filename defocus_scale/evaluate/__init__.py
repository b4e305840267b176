"""``defocus-scale eval``: score a run directory / DCP checkpoint (live or EMA weights), an exported
safetensors file or a released De-focus Mamba ``.pth`` on a validation source (shards, ImageFolder, Hugging
Face Parquet) on 1..N ranks, with the model's own eval transform; top-1/top-5/loss and per-class accuracy,
printed and written as JSON. ``defocus-scale convert`` writes a released checkpoint as an exported file.

* ``run_eval(EvalRequest(model, data, ...))`` in this process group; ``launch_eval(request, "torchrun", n)``;
* ``score(model, loader, env, ...)``: the metric loop.
"""

from defocus_scale.evaluate.run import EvalRequest, launch_eval, run_eval, score

__all__ = ["EvalRequest", "launch_eval", "run_eval", "score"]
