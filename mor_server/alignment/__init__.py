"""The alignment room: warm start, router calibration, GRPO and evaluation of the VLM policy.

``pipeline`` (``run_alignment``), ``policy``, ``router``, ``rewards`` (the ``RewardBackend`` seam and
``MoRReward``), ``grpo``, ``features``, ``answers``, ``evaluate``, ``inprocess`` (a backend over local scorers) and
``runstate`` (resume). It reaches the federation only through a ``RewardBackend``. See docs/architecture.md.
"""
