"""The former home of the content proof, kept because docs/prune.md names
``ckpt_tools.content_proof.ContentProof``: see ``ckpt_tools.prune.proof``."""

from .prune.proof import ContentProof  # noqa: F401

__all__ = ["ContentProof"]
