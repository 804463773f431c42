"""Multi-stage workflows: the whole pipeline on your data (`pipeline`) and on built-in digits (`demo`)."""
