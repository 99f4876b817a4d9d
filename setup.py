"""Build the one native piece: 64-bit atomic operations on shared memory.

Everything else is pure Python; see engine/_atomics.c for why this exists.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "voxrelay.engine._atomics",
            sources=["engine/_atomics.c"],
            extra_compile_args=["-O2"],
        )
    ]
)
