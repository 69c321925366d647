"""Every name the example scripts in ``examples/`` use, from one import.

The code lives by purpose in :mod:`~hf_normsoftmax.training.arguments` (command-line options and their checks),
:mod:`~hf_normsoftmax.training.metrics` (class labels, offline accuracy), :mod:`~hf_normsoftmax.training.run_files`
(run-dir files, each written atomically) and :mod:`~hf_normsoftmax.training.trainer_run` (``TrainingArguments``,
the resumable Trainer, the end of a Trainer run). The FSDP2 helpers of the GPT-2 example sit beside it
(``examples/fsdp2_utils.py``).
"""

from __future__ import annotations

from .arguments import (
    BAD_INPUT_ERRORS,
    VARIANT_FLAG_OPTIONS,
    BadInputError,
    add_run_arguments,
    add_variant_arguments,
    check_output_dir,
    check_training_length,
    default_report_to,
    exit_on_bad_input,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_learning_rate,
    resolve_resume_checkpoint,
    variant_flags_from_args,
)
from .metrics import accuracy_from_logits, label_names_of, load_accuracy_metric
from .run_files import (
    atomic_output,
    dump_rank_state,
    finish_run_dir,
    save_results,
    write_json,
    write_run_config,
    write_text_atomically,
)
from .trainer_run import (
    cpu_distributed_launch,
    eval_split_name,
    finish_trainer_run,
    resumable_trainer_class,
    stability_callbacks,
    training_arguments_from_args,
)

__all__ = [
    "BAD_INPUT_ERRORS",
    "BadInputError",
    "VARIANT_FLAG_OPTIONS",
    "accuracy_from_logits",
    "add_run_arguments",
    "add_variant_arguments",
    "atomic_output",
    "check_output_dir",
    "check_training_length",
    "cpu_distributed_launch",
    "default_report_to",
    "dump_rank_state",
    "eval_split_name",
    "exit_on_bad_input",
    "finish_run_dir",
    "finish_trainer_run",
    "fraction",
    "label_names_of",
    "load_accuracy_metric",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "resolve_learning_rate",
    "resolve_resume_checkpoint",
    "resumable_trainer_class",
    "save_results",
    "stability_callbacks",
    "training_arguments_from_args",
    "variant_flags_from_args",
    "write_json",
    "write_run_config",
    "write_text_atomically",
]
