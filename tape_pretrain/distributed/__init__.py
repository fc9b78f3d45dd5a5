"""Distributed setup and the training engines (DeepSpeed ZeRO, FSDP2) behind one interface."""
