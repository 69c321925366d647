"""Files of a run dir, each replaced atomically: a reader, or a crash at any point, sees the old file or the new one.

* :func:`atomic_output` (write a whole new file, then rename it into place), :func:`write_text_atomically`,
  :func:`write_json`;
* :func:`save_results` (``{split}_results.json`` + ``all_results.json``, the layout of ``Trainer.save_metrics``),
  :func:`write_run_config` (``run_config.json``, read by the model card), :func:`finish_run_dir` (stability plots
  and the model card ``README.md``);
* :func:`dump_rank_state`: each process's weights and buffers, to check that distributed ranks agree;
* :func:`dataset_record`: the ``dataset`` entry of an example's ``run_config.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_output",
    "dataset_record",
    "dump_rank_state",
    "finish_run_dir",
    "save_results",
    "write_json",
    "write_run_config",
    "write_text_atomically",
]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` sets it: not thread-safe)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    return 0o022


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the whole new file to; when the block ends without error
    it is renamed over ``path`` (atomic within one file system), otherwise removed. A reader, or a crash at any
    point, sees the old file or the new one, never a part of it. The new file gets the usual permissions
    (0o666 minus the umask), not the 0o600 of a temporary file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path``, atomically (:func:`atomic_output`)."""
    target = Path(path)
    with atomic_output(target) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
    return target


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically (:func:`atomic_output`)."""
    target = Path(path)
    with atomic_output(target) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(_jsonable(data), handle, indent=2, sort_keys=True)
        handle.write("\n")
    return target


def save_results(output_dir: str | os.PathLike, split: str, metrics: Mapping[str, Any]) -> None:
    """``{split}_results.json`` and the merged ``all_results.json``, as ``Trainer.save_metrics`` lays them out."""
    directory = Path(output_dir)
    write_json(directory / f"{split}_results.json", dict(metrics))
    all_path = directory / "all_results.json"
    merged = json.loads(all_path.read_text(encoding="utf-8")) if all_path.is_file() else {}
    merged.update(_jsonable(dict(metrics)))
    write_json(all_path, merged)


def write_run_config(output_dir: str | os.PathLike, **fields: Any) -> Path:
    """``run_config.json``: what the run was (model, dataset, task, flags, hyperparameters), for the model card.

    Known keys of the card renderer (:mod:`hf_normsoftmax.hub.card`): ``model_name``, ``base_model``, ``dataset``
    (name or mapping), ``task``, ``license``, ``language``, ``description``, ``hyperparameters``.
    """
    return write_json(Path(output_dir) / "run_config.json", {k: v for k, v in fields.items() if v is not None})


def dataset_record(args: Any, eval_split: str, num_train: int, num_eval: int, **extra: Any) -> dict[str, Any]:
    """What an example trained and evaluated on, for ``run_config.json``: ``--dataset``, the splits and sizes."""
    return {"name": args.dataset, "split": "train", "eval_split": eval_split, "num_train": num_train,
            "num_eval": num_eval, **extra}


def finish_run_dir(output_dir: str | os.PathLike, *, model_name: str | None = None) -> dict[str, Any]:
    """Draw the stability plots (if the history exists and no plot was drawn yet) and write the model card.

    Returns ``{"plots": [paths], "card": path}``. The card is rendered by :func:`hf_normsoftmax.hub.card.write_card`
    into ``output_dir/README.md``.
    """
    directory = Path(output_dir)
    plots = sorted(directory.glob("stability*.png"))
    if not plots and (directory / "stability_history.jsonl").is_file():
        from .plots import plot_run_dir, read_stability_history

        try:
            read_stability_history(directory)
        except ValueError:
            pass  # losses only (diagnostics off: --stability-every 0): nothing to plot
        else:
            plot_run_dir(directory)
            plots = sorted(directory.glob("stability*.png"))
    from ..hub.card import write_card

    card = write_card(directory, model_name=model_name)
    return {"plots": plots, "card": card}


def dump_rank_state(directory: str | os.PathLike, state_dict: Mapping[str, Any], process_index: int,
                    info: Mapping[str, Any] | None = None) -> Path:
    """Write one process's tensors to ``directory/rank<R>.safetensors`` (and ``info`` to ``rank<R>.json``), each
    file atomically (:func:`atomic_output`)."""
    import torch
    from safetensors.torch import save_file

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor):
            if hasattr(tensor, "full_tensor"):  # DTensor
                tensor = tensor.full_tensor()
            tensors[name] = tensor.detach().to("cpu").contiguous().clone()  # clone: tied weights share storage
    path = target / f"rank{process_index}.safetensors"
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp))
    write_json(target / f"rank{process_index}.json", dict(info or {}))
    return path
