# The one compiled piece: the block copy's streaming stores (see its comment). Everything else is
# declared in pyproject.toml. Building it needs a C compiler and Python's headers (`make setup`
# installs both).
from setuptools import Extension, setup

setup(ext_modules=[Extension("kvtier.transfer._stream", ["src/kvtier/transfer/_stream.c"],
                             extra_compile_args=["-O2"])])
