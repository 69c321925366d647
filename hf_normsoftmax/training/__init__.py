"""Training-side tools: offline real data, diagnostics, plots, learning-rate rules.

Checkpoints never need this subpackage (see docs/design.md), and importing it stays cheap: names are resolved
from their submodule on first access, so ``import hf_normsoftmax.training`` pulls in neither ``datasets`` nor
scikit-learn. Submodules can always be imported directly (``from hf_normsoftmax.training.data import ...``).

Usage::

    from hf_normsoftmax.training import load_dataset_spec, require_columns

    ds = require_columns(load_dataset_spec("rotten_tomatoes"), ["text", "label"], purpose="text classification")
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

# Public name -> submodule that defines it (imported on first access).
_LAZY_EXPORTS = dict.fromkeys(
    ("FASHION_MNIST_CLASSES", "gpt2_tokenizer_dir", "load_digits_dataset", "load_fashion_mnist", "load_gpt2_tokenizer",
     "load_mnist5k", "load_rotten_tomatoes", "load_shakespeare_text", "minilm_path"),
    "builtin_data",
)
_LAZY_EXPORTS.update(dict.fromkeys(
    ("BUILTIN_DATASETS", "BuiltinDataset", "load_dataset_spec", "require_columns", "train_eval_split"), "data"
))
# Stability diagnostics, their alarms, the Trainer callback and plots (the callback imports the Trainer: lazy too).
_LAZY_EXPORTS.update(dict.fromkeys(("StabilityMonitor", "collect_stability_stats", "qk_spectral_norms"), "diagnostics"))
_LAZY_EXPORTS.update(dict.fromkeys(("CollapseDetector", "StabilityEvent"), "alarms"))
_LAZY_EXPORTS.update(dict.fromkeys(("StabilityCallback",), "callbacks"))
_LAZY_EXPORTS.update(dict.fromkeys(("plot_run_dir", "plot_stability_history", "read_stability_history"), "plots"))

__all__ = sorted(_LAZY_EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), _LAZY_EXPORTS)
