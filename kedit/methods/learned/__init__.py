"""Editors that are trained before they edit (MEND, SERAC) and the loop that trains them.

``trainer.py`` holds what both share: the training cases and their split, the seeded
training loop with checkpoints (safetensors + JSON), resume and early stopping, the
curve, and where trained editors are found again.  Each method module defines its
``Learner`` (what one training step and one validation compute) and its ``Method``
(what an edit is, once the editor is trained).
"""
