"""Entry script for `accelerate launch`: runs the moecore CLI in every process.

    accelerate launch --config_file examples/accelerate/fsdp.yaml examples/accelerate/moecore_launch.py \
        distill --teacher ORIG --student STUDENT -o OUT --max-steps 1000
"""
import sys

from moecore.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
