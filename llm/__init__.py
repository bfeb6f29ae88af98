"""What both apps share: model loading and ids, offline assets, the task registry and scoring.

``finetune`` and ``pretrain_tuner`` import from here; ``llm`` imports ``l2l`` only, never an app.
"""
