"""The models-from-code file of the DDGM pyfunc: MLflow runs it to obtain the model (no pickle).

Logged by ``ddgm.training.mlflow_model.log_ddgm_model``; MLflow copies it into the model folder.
"""

import mlflow

from ddgm.training.mlflow_model import DDGMSampler

mlflow.models.set_model(DDGMSampler())
