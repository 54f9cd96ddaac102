"""Training PT-MoE adapters on a frozen base model."""
