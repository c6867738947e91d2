"""The applications room: the command lines and orchestrators that wire the federation and the alignment engine.

``cli`` (the ``mor`` command and its groups), ``align_cli`` (``mor align``), ``demo`` (``mor demo``, the main
job), ``audit_cli``, ``jobcontrol`` (a long run's lock and signals) and ``procs`` (child processes). See
docs/architecture.md.
"""
