"""Training: the one train loop, its optimisers and schedules, checkpoints, and the Ray Train edge.

:mod:`.loop` (a config in, a trained backbone out), :mod:`.optim` (SGD / LARS / AdamW, warm-up + cosine),
:mod:`.checkpoint` (complete, atomic checkpoints), :mod:`.distributed` (DDP under Ray Train, elastic, resumed),
:mod:`.resources` (what workers ask for against what there is), :mod:`.run` (``train()`` and ``ssl-tune train``).
"""
