"""appliance: an in-memory database appliance with real-time block-level backup.

The C helpers in cext/ are compiled by cffi in API out-of-line mode: cext/build.py
holds the only FFIBuilder, and setup.py names it in cffi_modules.
"""
from setuptools import find_packages, setup

setup(
    name="appliance",
    version="0.1.0",
    description="In-memory database appliance with real-time block-level backup to peer appliances",
    packages=find_packages(include=["appliance", "appliance.*"]),
    python_requires=">=3.11",
    setup_requires=["cffi>=1.16"],
    cffi_modules=["cext/build.py:ffibuilder"],
    install_requires=[
        "cffi>=1.16",
        "posix_ipc>=1.1",
        "lz4>=4.0",
        "structlog>=24.1",
        "msgpack>=1.0",
        "pydantic>=2.6",
        "click>=8.1",
        "rich>=13.0",
        "uvloop>=0.19",   # the agent's event loop (plain asyncio where it is missing)
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "cryptography>=41"],
        "bench": ["lmdb>=1.4", "redis>=5.0"],
    },
    entry_points={"console_scripts": ["appliance=appliance.cli.__main__:main"]},
    zip_safe=False,
)
