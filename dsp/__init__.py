"""DSP: Dynamic Sequence Parallelism for multi-dimensional transformers."""
