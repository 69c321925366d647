"""Every name the example scripts in ``examples/`` use, from one import.

The code lives by purpose in :mod:`~hf_normsoftmax.training.arguments` (command-line options and their checks),
:mod:`~hf_normsoftmax.training.metrics` (class labels, offline accuracy), :mod:`~hf_normsoftmax.training.run_files`
(run-dir files, each written atomically) and :mod:`~hf_normsoftmax.training.trainer_run` (``TrainingArguments``,
the resumable Trainer, the end of a Trainer run). The FSDP2 helpers of the GPT-2 example sit beside it
(``examples/fsdp2_utils.py``).
"""

from __future__ import annotations

from . import arguments, metrics, run_files, trainer_run
from .arguments import *  # noqa: F403
from .metrics import *  # noqa: F403
from .run_files import *  # noqa: F403
from .trainer_run import *  # noqa: F403

__all__ = sorted({*arguments.__all__, *metrics.__all__, *run_files.__all__, *trainer_run.__all__})
