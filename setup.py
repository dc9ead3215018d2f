"""setuptools entry point: the cffi extensions and where an installed wheel puts the code
(pyproject.toml holds the metadata).

The source tree's top-level packages (``daemon``, ``workers``, ``shm_table``) and module
(``supervisor``) are installed inside the ``pyvirtiofsd`` package directory, not at the top
of site-packages, where python-daemon's ``daemon`` (for one) would collide with ours:
``pyvirtiofsd/__init__.py``, the console script's module, puts that directory first on
``sys.path`` (see its docstring). The extensions follow the packages (``ext_package``);
``build_ext --inplace`` and editable installs still build them in the source tree, where
``package_dir`` says the packages are.
"""

import os
from collections.abc import Iterator

from setuptools import Distribution, find_packages, setup
from setuptools.command.build_py import build_py

PRIVATE = "pyvirtiofsd"
OWN_PACKAGES = ("daemon", "workers", "shm_table")
OWN_MODULES = ("supervisor.py",)


class BuildPyPrivate(build_py):
    """build_py that also copies the top-level modules into the private directory
    (``package_dir`` can remap packages, not single modules)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install imports them from the source tree
        for name in OWN_MODULES:
            self.copy_file(name, os.path.join(self.build_lib, PRIVATE, name),
                           preserve_mode=False)


class PrivateDistribution(Distribution):
    """Names the extensions with their ``ext_package`` in the metadata too, so
    top_level.txt lists only ``pyvirtiofsd``, not the names it keeps private."""

    def iter_distribution_names(self) -> Iterator[str]:
        for name in super().iter_distribution_names():
            yield name if name.split(".")[0] == PRIVATE else f"{PRIVATE}.{name}"


setup(
    distclass=PrivateDistribution,
    packages=[PRIVATE] + [
        f"{PRIVATE}.{name}" for name in find_packages(include=[f"{p}*" for p in OWN_PACKAGES])
    ],
    package_dir={f"{PRIVATE}.{name}": name for name in OWN_PACKAGES},
    package_data={
        f"{PRIVATE}.shm_table": ["native.c", "native.h"],
        f"{PRIVATE}.daemon.native": ["*.c", "*.h"],
    },
    ext_package=PRIVATE,
    cffi_modules=[
        "shm_table/_native_build.py:ffibuilder",
        "daemon/native/build.py:ffibuilder",
    ],
    cmdclass={"build_py": BuildPyPrivate},
)
