"""One module per DVC stage: read inputs, call the math, write outputs, log to MLflow."""
