"""Evaluation metrics for attributions, batched: insertion/deletion (RISE), PIC (SIC/AIC, PAIR), robustness to
lossy compression, completeness; curve plots; and ``evaluate_store`` behind ``fastig evaluate``.

The public names are functions: ``fastig.metrics.insertion``, ``deletion``, ``pic``, ``lossy_mse``,
``completeness``, ``step_sweep``, ``stability_table``, ``baseline_sensitivity`` (with ``rank_correlation`` and
``top_k_overlap``), ``evaluate_store``. Three of them share their name with the module that
defines them (``insertion``, ``pic``, ``completeness``); the package attribute is the function, so reach the
modules' other names with ``from fastig.metrics.pic import random_mask`` (which always finds the module).
"""

from fastig.metrics.completeness import completeness, stability_table, step_sweep
from fastig.metrics.evaluate import SummaryRow, evaluate_store, format_table
from fastig.metrics.insertion import causal_metric, deletion, insertion
from fastig.metrics.lossy import lossy_mse
from fastig.metrics.pic import pic
from fastig.metrics.sensitivity import baseline_sensitivity, rank_correlation, top_k_overlap

__all__ = ["insertion", "deletion", "causal_metric", "pic", "lossy_mse", "completeness", "step_sweep",
           "stability_table", "baseline_sensitivity", "rank_correlation", "top_k_overlap", "evaluate_store",
           "SummaryRow", "format_table"]
