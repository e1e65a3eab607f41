"""Reproductions of the papers' tables at CPU scale: ``compare`` (VeLoRA Tab. 4 / GradNormLoRP Tab. 2)
and one module per ablation behind ``velora bench <experiment>``."""
