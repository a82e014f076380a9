"""Build hook: generate the protobuf/gRPC modules into the wheel (editable installs run
``python -m coolfusion.protos.build`` instead, which writes them next to the .proto files)."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProtos(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout, where scripts/install.sh generated them
        spec = importlib.util.spec_from_file_location("_protos_build", Path(__file__).parent / "protos" / "build.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate(Path(self.build_lib) / "coolfusion" / "protos")


setup(cmdclass={"build_py": BuildPyWithProtos})
