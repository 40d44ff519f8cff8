"""The tests' gloo process pool: :mod:`longseq.pool` (installed with the package, shared with the
benchmarks)."""
from longseq.pool import DistributedPool, DistributedTestError, DistributedTimeout, _worker, run_distributed  # noqa: F401
