"""The paper's experiment harness: models, methods, resumable sweeps, launchers and reports."""
