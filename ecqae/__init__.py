"""ecqae: the HGCAL ECON-T conditional autoencoder from training to bit-exact firmware.

Stages, one module each: data -> model -> losses -> train -> metrics/evaluate
-> firmware -> verify -> golden/handoff. ``chip`` holds every constant the chip
depends on; ``config`` the typed configs; ``cli`` only parses and calls.
"""

__version__ = "0.1.0"

import os as _os

# TensorFlow's C++ start-up chatter hides our own progress lines.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
