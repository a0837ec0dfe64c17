"""Evaluation suite: the paper's Table 1 metrics on the Table 3 prompts, and the Fig. 5 trade-off (§4.2).

- :mod:`~omniportrait.evaluation.prompts`: the 30 prompts of Table 3 and the class word of each reference;
- :mod:`~omniportrait.evaluation.metrics`: CLIP-T, CLIP-I, SIM, BLIP, CLIP-IQA, FID (pluggable models);
- :mod:`~omniportrait.evaluation.sim`: identity similarity backends (dlib offline, FaceNet with your weights);
- :mod:`~omniportrait.evaluation.runner`: resumable, data-parallel generation and scoring;
- :mod:`~omniportrait.evaluation.report`: Table 1, per-category breakdown, Fig. 5 plot.

Heavy modules are imported on use; ``from omniportrait.evaluation.sim import identity_similarity`` is the
one-call SIM of an output to its reference.
"""

from omniportrait.evaluation.prompts import CATEGORIES, TABLE3, EvalPrompt, select_prompts, table3_prompts

__all__ = ["CATEGORIES", "TABLE3", "EvalPrompt", "select_prompts", "table3_prompts"]
