"""Download the challenge's published FineWeb shards and tokenizer, with the standard library only.

These are the files that the challenge's own data/cached_challenge_fineweb.py fetches through
huggingface_hub: the Hugging Face dataset repo willdepueoai/parameter-golf holds, under datasets/,
    manifest.json                                       shard counts and tokenizer files per variant
    datasets/fineweb10B_sp1024/fineweb_val_NNNNNN.bin   the full validation split
    datasets/fineweb10B_sp1024/fineweb_train_NNNNNN.bin 100M tokens each, numbered from 0
    tokenizers/fineweb_1024_bpe.model (and .vocab)
and each lands at the same relative path under --output-dir (default ./data), which is where
train_gpt.py looks by default.

Downloads resume: bytes go to NAME.part, a rerun (or a retry after a dropped connection) continues
with an HTTP Range request, and a file gets its final name only once complete; shards must also
pass the header and size check. Files already in place are skipped (shards are re-verified).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from shards import verify_shard

DEFAULT_BASE_URL = "https://huggingface.co/datasets/willdepueoai/parameter-golf/resolve/main/datasets"
BASE_URL_ENV = "PARAMETER_GOLF_DATA_URL"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
ATTEMPTS = 3  # per file; every retry resumes from what the .part already holds
MB = 1e6


class DownloadError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--train-shards", type=int, default=80, metavar="N",
                        help="training shards to fetch, from the start of the split (default 80 = 8B "
                             "tokens, as the challenge); the validation split is always fetched in full")
    parser.add_argument("--variant", default="sp1024",
                        help="tokenizer family; the manifest must list fineweb10B_<variant> "
                             "(the public repo publishes sp1024)")
    parser.add_argument("--output-dir", type=Path, default=Path("data"), metavar="DIR",
                        help="local root mirroring the remote layout (default ./data)")
    parser.add_argument("--base-url", default=os.environ.get(BASE_URL_ENV, DEFAULT_BASE_URL), metavar="URL",
                        help=f"URL of the folder holding manifest.json (env {BASE_URL_ENV}; "
                             "default: the challenge's Hugging Face repo)")
    return parser


def plan_files(manifest: dict, variant: str, train_shards: int) -> tuple[list[str], str, int | None]:
    """Remote paths to fetch (validation shards, the first train shards, tokenizer files), the
    tokenizer model's path and its vocab size, read the way the challenge's downloader reads them."""
    name = f"fineweb10B_{variant}"
    datasets = {d.get("name"): d for d in manifest.get("datasets", [])}
    if name not in datasets:
        raise DownloadError(f"--variant {variant}: {name} is not in manifest.json "
                            f"(it lists: {', '.join(sorted(map(str, datasets))) or 'nothing'})")
    entry = datasets[name]
    stats = entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if not 0 <= train_shards <= n_train:
        raise DownloadError(f"--train-shards {train_shards}: must be 0..{n_train}, the training shards of "
                            f"{name} (per manifest.json; delete it to fetch a fresh one)")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), {})
    tokenizer_files = [str(tokenizer[key]) for key in ("model_path", "vocab_path", "path") if tokenizer.get(key)]
    if n_val < 1 or not tokenizer_files:
        raise DownloadError(f"manifest.json: {name} lacks a validation split or tokenizer files")
    files = [f"datasets/{name}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
    files += [f"datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    files += tokenizer_files
    for rel in files:  # paths from the manifest must stay inside --output-dir
        if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
            raise DownloadError(f"manifest.json: refusing unsafe path {rel!r}")
    vocab_size = tokenizer.get("vocab_size")
    return files, tokenizer_files[0], int(vocab_size) if vocab_size is not None else None


def say(message: str) -> None:
    """A progress line; on a terminal it first clears the in-place byte counter."""
    print(("\r\033[K" if sys.stdout.isatty() else "") + message, flush=True)


def fetch_part(url: str, part: Path, progress: str) -> int:
    """Append the rest of `url` to `part` (a Range request when it already holds bytes); returns
    the bytes received."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the .part is as long as the remote file or longer: start over
            part.unlink()
        raise
    with response:
        if have and response.status != 206:  # the server ignored the Range header: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        start, done, shown = have, have, 0.0
        with open(part, "ab" if have else "wb") as f:
            while chunk := response.read(CHUNK_BYTES):
                f.write(chunk)
                done += len(chunk)
                if sys.stdout.isatty() and time.monotonic() - shown > 0.5:
                    shown = time.monotonic()
                    of = f"/{total / MB:.1f}" if total else ""
                    print(f"\r\033[K{progress} {done / MB:.1f}{of} MB", end="", flush=True)
    if total is not None and done != total:
        raise DownloadError(f"connection closed after {done} of {total} bytes")
    return done - start


def download(url: str, dest: Path, progress: str) -> int:
    """Fetch `url` to `dest` through `dest`.part, retrying and resuming; returns the bytes received."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    received = 0
    if part.exists():
        say(f"{progress} resuming at {part.stat().st_size / MB:.1f} MB")
    for attempt in range(1, ATTEMPTS + 1):
        try:
            received += fetch_part(url, part, progress)
            break
        except urllib.error.HTTPError as e:
            if (e.code < 500 and e.code != 416) or attempt == ATTEMPTS:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (OSError, http.client.HTTPException, DownloadError) as e:  # dropped connection, timeout
            if attempt == ATTEMPTS:
                raise DownloadError(f"{url}: {e} (rerun to resume from {part.name})") from None
        say(f"{progress} retrying ({attempt}/{ATTEMPTS - 1})")
        time.sleep(2 ** attempt)
    if dest.suffix == ".bin":
        try:
            verify_shard(part)
        except ValueError as e:
            part.unlink()
            raise DownloadError(f"downloaded {dest.name} is corrupt, deleted it: {e}") from None
    os.replace(part, dest)
    return received


def is_complete(dest: Path) -> bool:
    """A file under its final name was renamed there complete; shards are checked again anyway."""
    if not dest.exists():
        return False
    if dest.suffix == ".bin":
        try:
            verify_shard(dest)
        except ValueError as e:
            say(f"{e}; downloading it again")
            dest.unlink()
            return False
    return True


def run(args: argparse.Namespace) -> None:
    base, root = args.base_url.rstrip("/"), args.output_dir
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        download(f"{base}/manifest.json", manifest_path, "[manifest]")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files, tokenizer_rel, vocab_size = plan_files(manifest, args.variant, args.train_shards)
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # not the manifest layout we know
        manifest_path.unlink()
        raise DownloadError(f"{manifest_path}: unreadable manifest ({e}); deleted it") from None

    start, received, skipped = time.monotonic(), 0, 0
    for i, rel in enumerate(files, 1):
        dest, progress = root / rel, f"[{i}/{len(files)}] {rel}"
        if is_complete(dest):
            skipped += 1
            say(f"{progress}: already complete")
            continue
        t0 = time.monotonic()
        got = download(f"{base}/{rel}", dest, progress)
        seconds = time.monotonic() - t0
        received += got
        say(f"{progress}: {dest.stat().st_size / MB:.1f} MB, {got / MB:.1f} MB received "
            f"in {seconds:.1f}s ({got / MB / max(seconds, 1e-3):.1f} MB/s)")

    data_path, tokenizer_path = (root / files[0]).parent.resolve(), (root / tokenizer_rel).resolve()
    vocab = f" VOCAB_SIZE={vocab_size}" if vocab_size is not None else ""
    print(f"done: {len(files)} files ({skipped} already present), {received / MB:.1f} MB received "
          f"in {time.monotonic() - start:.1f}s")
    print(f"DATA_PATH={data_path} TOKENIZER_PATH={tokenizer_path}{vocab}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except DownloadError as e:
        print(("\r\033[K" if sys.stdout.isatty() else "") + f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
