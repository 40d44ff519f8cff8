"""ZeCO: sequence parallelism for gated linear attention with the All-Scan collective."""
