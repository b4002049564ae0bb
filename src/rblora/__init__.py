"""rblora: federated fine-tuning of foundation models with heterogeneous LoRA ranks."""

__version__ = "0.1.0"
