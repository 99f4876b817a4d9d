"""voxrelay: a WebRTC edge for real-time voice AI.

The code lives in the top-level folders engine/, proto/, cli/ and bench/, installed as
``voxrelay.engine``, ``voxrelay.proto``, ``voxrelay.cli`` and ``voxrelay.bench``.
"""

__version__ = "0.1.0"
