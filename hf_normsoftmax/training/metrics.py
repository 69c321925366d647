"""Classification labels and accuracy for the Trainer examples.

* :func:`label_names_of`: the class names of a classification dataset, refused (:class:`BadInputError`) when the
  labels are not class ids ``0..K-1``.
* :func:`load_accuracy_metric`: accuracy as an ``evaluate`` metric that works offline (``evaluate.load("accuracy")``
  downloads its script from the Hub; see the function), and :func:`accuracy_from_logits`, the ``compute_metrics``
  of a ``Trainer`` built on it.
"""

from __future__ import annotations

from typing import Any

from .arguments import BadInputError

__all__ = ["accuracy_from_logits", "label_names_of", "load_accuracy_metric"]


def label_names_of(dataset: Any, label_column: str) -> list[str]:
    """Class names of a classification dataset: a ClassLabel's names, else the sorted distinct label values.

    Raises :class:`BadInputError` when the labels are not integers ``0..K-1`` (after the ClassLabel mapping) or
    there are fewer than 2 classes.
    """
    from datasets import ClassLabel

    feature = dataset.features.get(label_column)
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        values = sorted(set(dataset[label_column]))
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise BadInputError(
                f"column {label_column!r} must hold integer class ids 0..K-1 or be a datasets ClassLabel; found "
                f"values such as {values[:5]!r}. Convert it with dataset.class_encode_column({label_column!r})."
            )
        if values and (values[0] < 0 or values[-1] >= 2 * len(values) + 10):
            raise BadInputError(
                f"column {label_column!r} holds class ids {values[:3]} ... {values[-3:]} ({len(values)} distinct): "
                "expected ids 0..K-1. Convert it with dataset.class_encode_column(...)."
            )
        names = [str(i) for i in range(values[-1] + 1)] if values else []
    if len(names) < 2:
        raise BadInputError(f"column {label_column!r} has {len(names)} class(es); classification needs at least 2")
    return names


# --------------------------------------------------------------------------------------------------------------------
# accuracy as an evaluate metric
# --------------------------------------------------------------------------------------------------------------------


def _accuracy_metric_class():
    import datasets
    import evaluate
    import numpy as np

    class OfflineAccuracy(evaluate.Metric):
        """Accuracy (fraction of predictions equal to the references), as an ``evaluate.Metric``.

        Same inputs and output as the Hub's ``accuracy`` module without ``normalize``/``sample_weight``:
        ``compute(predictions=[...], references=[...]) -> {"accuracy": float}``; ``add_batch`` works too.
        """

        def _info(self):
            return evaluate.MetricInfo(
                description="Accuracy: the proportion of predictions equal to their reference label.",
                citation="",
                inputs_description="predictions: predicted class ids (int); references: true class ids (int).",
                features=datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
            )

        def _compute(self, predictions, references):
            predictions, references = np.asarray(predictions), np.asarray(references)
            if predictions.size == 0:
                raise ValueError("accuracy of an empty set of predictions is undefined")
            return {"accuracy": float((predictions == references).mean())}

    return OfflineAccuracy


def load_accuracy_metric(source: str = "local"):
    """Accuracy as an ``evaluate`` metric module.

    ``evaluate.load("accuracy")`` resolves the name on the Hugging Face Hub and downloads the metric script: with no
    network (or ``HF_HUB_OFFLINE=1`` and a cold cache) it raises ``FileNotFoundError: Couldn't find a module script
    ... accuracy.py``. Checked with evaluate 0.4.6. So:

    * ``source="local"`` (the examples' default): an ``evaluate.Metric`` subclass defined here, computed by the
      evaluate library's own machinery (``compute`` / ``add_batch``), in memory; no network.
    * ``source="hub"``: ``evaluate.load("accuracy")``; a failure says what to do.
    """
    if source == "local":
        return _accuracy_metric_class()(keep_in_memory=True)
    if source == "hub":
        import evaluate

        try:
            return evaluate.load("accuracy")
        except (FileNotFoundError, ConnectionError, OSError) as error:
            raise BadInputError(
                f"--metric-source hub: evaluate.load('accuracy') failed ({type(error).__name__}: {error}). It "
                "downloads the metric from the Hugging Face Hub; without network use --metric-source local."
            ) from None
    raise ValueError(f"Invalid value for `source`: {source!r}. Allowed: 'local' or 'hub'.")


def accuracy_from_logits(metric):
    """A ``compute_metrics`` function for ``Trainer``: argmax of the logits against the labels, via ``metric``."""
    import numpy as np

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        if isinstance(logits, tuple):
            logits = logits[0]
        predictions = np.asarray(logits).argmax(axis=-1)
        references = np.asarray(eval_prediction.label_ids)
        return metric.compute(predictions=predictions.tolist(), references=references.tolist())

    return compute_metrics
