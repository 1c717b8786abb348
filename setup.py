# Placeholder: the CUDA-extension build is added by the csrc/ work (issue 4).
from setuptools import setup

setup()
