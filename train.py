#!/usr/bin/env python
"""Federated fine-tuning with heterogeneous LoRA ranks (the seed's entry point).

    python train.py --config configs/embedded.yaml
    python train.py --method "RB-LoRA" --data_path ./data --num_clients 10 \
        --num_communication_rounds 3

Same as `rblora train`; `python train.py --help` lists every option.
"""

import sys

from rblora.federation.cli import main

if __name__ == "__main__":
    sys.exit(main())
