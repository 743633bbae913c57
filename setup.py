"""appliance: an in-memory database appliance with real-time block-level backup.

The C helpers in cext/ are compiled by cffi in API out-of-line mode: cext/build.py
holds the only FFIBuilder, and setup.py names it in cffi_modules. The example
configs (config/) and the systemd units (systemd/) stay where the source tree
keeps them and are copied into the package as ``appliance/_data`` when it is
built, so an installed package reaches them (``appliance files``).
"""
import os
import re
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "appliance" / "_version.py").read_text(), re.M)[1]
DATA_DIRS = ("config", "systemd")


class build_py_with_data(build_py):
    """build_py, plus config/ and systemd/ copied into the built package."""

    def run(self):
        super().run()
        if self.editable_mode:
            return  # an editable install reads them from the source tree
        for d in DATA_DIRS:
            for src in sorted((HERE / d).iterdir()):
                if src.is_file():
                    dst = os.path.join(self.build_lib, "appliance", "_data", d, src.name)
                    self.mkpath(os.path.dirname(dst))
                    self.copy_file(str(src), dst)


setup(
    name="appliance",
    version=VERSION,
    description="In-memory database appliance with real-time block-level backup to peer appliances",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    packages=find_packages(include=["appliance", "appliance.*"]),
    python_requires=">=3.11",
    cffi_modules=["cext/build.py:ffibuilder"],
    cmdclass={"build_py": build_py_with_data},
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
        "prometheus_client>=0.17",   # the [metrics] endpoint (start_http_server returning its server)
    ],
    extras_require={
        # pexpect and pyte drive `appliance top` in a pseudo-terminal and read its screen
        "test": ["pytest>=8", "hypothesis>=6.100", "cryptography>=41", "build>=1.0", "pexpect>=4.8", "pyte>=0.8",
                 "pytest-xdist>=3.5"],
        "bench": ["lmdb>=1.4", "redis>=5.0"],
    },
    entry_points={"console_scripts": ["appliance=appliance.cli.__main__:main"]},
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Environment :: No Input/Output (Daemon)",
        "Intended Audience :: System Administrators",
        "Intended Audience :: Developers",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: Implementation :: CPython",
        "Topic :: Database :: Database Engines/Servers",
        "Topic :: System :: Recovery Tools",
    ],
    zip_safe=False,
)
