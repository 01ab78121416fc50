"""Synthetic probes: each variant trained from scratch on a generated recall task (Zoology's MQAR,
MAD-lab's six tasks), with a learning-rate x weight-decay grid chosen per variant on held-out examples
and accuracy on answer positions only. Run as a sweep of ``kind: probe`` (``archifactory sweep``)."""
