"""Checks of an exported file: parity with Polygraphy (``parity``), flipped merge/selection decisions
(``decisions``), fidelity against the uncompressed model (``fidelity``) and ``verify`` against a bundle."""
