"""The model-from-code file of every registered igpt version (see `igpt_core.tracking.pyfunc`).

MLflow copies this file into the model folder and runs it when it loads the model; nothing else imports
it. It defines the `PythonModel` and names it with `mlflow.models.set_model`, so no Python object is
pickled: the checkpoint folder (artifact `checkpoint`) is all the state the model has.
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from igpt_core.tracking.pyfunc import ARTIFACT, ImageModel, ModelInputError


class IgptModel(PythonModel):
    """Images in, classes (a classifier) or probe features (a pretrained model) out."""

    def load_context(self, context: Any) -> None:
        self.model = ImageModel.load(context.artifacts[ARTIFACT])

    # MLflow reads this hint: a DataFrame (or ndarray) hint turns its type-hint validation off (no hint
    # at all draws a warning). The model takes a DataFrame, an ndarray, a dict or a list: ImageModel checks.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        try:
            return self.model.predict(model_input, params)
        except ModelInputError as error:
            # INVALID_PARAMETER_VALUE: the scoring server answers 400 with this message
            raise MlflowException.invalid_parameter_value(str(error)) from None


mlflow.models.set_model(IgptModel())
