"""Build hook only; all metadata is in pyproject.toml.

The Hydra configs live once, in the repository's top-level ``conf/`` (where people edit them).
A wheel has no repository around it, so ``build_py`` copies ``conf/**/*.yaml`` into the built
package as ``lightning_lora/conf/``; ``lightning_lora.train.config_dir()`` uses the checkout's
``conf/`` when there is one and that copy otherwise. Editable installs read ``conf/`` directly.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class build_py_with_conf(build_py):
    def run(self) -> None:
        super().run()
        src = Path(__file__).resolve().parent / "conf"
        dst = Path(self.build_lib) / "lightning_lora" / "conf"
        for path in sorted(src.rglob("*.yaml")):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            self.copy_file(str(path), str(target))


setup(cmdclass={"build_py": build_py_with_conf})
