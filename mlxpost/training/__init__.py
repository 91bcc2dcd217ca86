"""The training loop every method shares, and the pipeline around it: data by kind, run directories,
checkpoints and resume, distributed runs, samples and health checks."""
