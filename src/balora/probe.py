"""The cheapest honest NLU baseline: a linear probe on the frozen pre-trained model's features.

The features are the input of the model's classification head (`heads.find_head`): the mean-pooled last hidden
states for `pooling: mean`, BERT's [CLS] pooler output for `pooling: cls`, a masked mean for heads that take every
token. A scikit-learn model is fit on the training rows' features: logistic regression for classification, ridge
regression for regression, each standardised and with its regularisation strength chosen by 5-fold cross-validation
on the training rows only (the validation rows are never seen before scoring). A fine-tune that does not beat this
has thrown away what the pre-trained model knew.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from balora.eval.glue_metrics import glue_metrics
from balora.nlu import capture_input, locate_head, pooled

PROBE_CS = (0.01, 0.1, 1.0, 10.0, 100.0)


@torch.no_grad()
def frozen_features(
    model: torch.nn.Module, dataset: Any, collator: Any, *, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, H), labels (N,)) of `dataset` under the frozen `model` (eval mode, no gradient)."""
    head = locate_head(model)
    device = next(model.parameters()).device
    model.eval()
    columns = [c for c in dataset.column_names if c in ("input_ids", "attention_mask", "token_type_ids", "labels")]
    loader = DataLoader(dataset.select_columns(columns), batch_size=batch_size, collate_fn=collator)
    features, labels = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        target = batch.pop("labels")
        with capture_input(head.module) as captured:
            model(**batch)
        features.append(pooled(captured[-1], batch.get("attention_mask")).float().cpu())
        labels.append(target.cpu())
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def linear_probe(model: torch.nn.Module, train: Any, evaluation: Any, collator: Any, spec: Any) -> dict[str, Any]:
    """Fit the probe on `train`'s frozen features, score it on `evaluation` with the task's metrics."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = frozen_features(model, train, collator)
    x_eval, y_eval = frozen_features(model, evaluation, collator)
    if spec.regression:
        fit = make_pipeline(StandardScaler(), RidgeCV(alphas=[1.0 / c for c in PROBE_CS], cv=5))
        fit.fit(x_train, y_train.astype(np.float64))
        predictions = fit.predict(x_eval)
        chosen = 1.0 / float(fit[-1].alpha_)
    else:
        fit = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=list(PROBE_CS), cv=5, max_iter=2000,
                                                                   scoring="accuracy"))
        with warnings.catch_warnings():  # scikit-learn 1.8 announces changes of defaults we do not rely on
            warnings.simplefilter("ignore", FutureWarning)
            fit.fit(x_train, y_train)
        predictions = fit.predict(x_eval).astype(np.int64)
        chosen = float(fit[-1].C_[0])
    metrics = glue_metrics(spec, predictions, y_eval.astype(np.float64) if spec.regression else y_eval)
    return {"metrics": {f"eval_{k}": v for k, v in metrics.items()}, "C": chosen, "features": int(x_train.shape[1]),
            "train_rows": int(x_train.shape[0])}
