"""The model out: a trained backbone as an embedding model (:mod:`.embedding`, ONNX export) and as an MLflow
Model (:mod:`.mlflow_model`)."""
