"""Builds the pybind11 extension `srppo_fast._packing` (plain integer arrays in and out, no torch ABI)."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "srppo_fast._packing",
        ["csrc/packing.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
