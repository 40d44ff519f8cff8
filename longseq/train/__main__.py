"""``[torchrun --nproc_per_node N] python -m longseq.train [key=value ...]``"""
import sys

from .loop import main

if __name__ == "__main__":
    sys.exit(main())
