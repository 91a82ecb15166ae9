"""Download the challenge's published FineWeb shards and tokenizer, with the standard library only.

These are the files that the challenge's own data/cached_challenge_fineweb.py fetches through
huggingface_hub. A Hugging Face dataset repo that publishes them holds, under datasets/,
    manifest.json                                        shard counts and tokenizer files per variant
    datasets/fineweb10B_<variant>/fineweb_val_NNNNNN.bin   the full validation split
    datasets/fineweb10B_<variant>/fineweb_train_NNNNNN.bin 100M tokens each, numbered from 0
    tokenizers/fineweb_<vocab>_bpe.model (and .vocab)      the paths that manifest.json names
and each lands at the same relative path under --output-dir (default ./data), which is where
train_gpt.py looks by default.

Where each --variant is published (its default base URL is https://huggingface.co/datasets/REPO/
resolve/main/datasets, the layout the challenge's downloader reads with its default
MATCHED_FINEWEB_REMOTE_ROOT_PREFIX=datasets):
    sp1024  willdepueoai/parameter-golf, the challenge's own (the quickstart of the README of
            github.com/openai/parameter-golf)
    sp4096  kevclark/parameter-golf, Kevin Clark's export for his records: openai/parameter-golf's
            records/track_10min_16mb/2026-04-01_Vocab4096_MLPMult4_WD085/README.md downloads it with
            MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf ... --variant sp4096
    sp8192  kevclark/parameter-golf, likewise: records/track_10min_16mb/
            2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2/README.md (... --variant sp8192)
No public source of other variants is known here: they need --base-url (or PARAMETER_GOLF_DATA_URL),
which also overrides these defaults. manifest.json is cached beside the shards with its base URL in
manifest.json.source, and fetched again when a run uses another base URL (so the sp1024 repo's
manifest, which lists neither sp4096 nor sp8192, never stands in for kevclark's).

Downloads resume: bytes go to NAME.part, and NAME.part.meta records the ETag (or Last-Modified)
and size of the remote file. A rerun, or a retry after a dropped connection, continues with an HTTP
Range request made conditional on that validator (If-Range), so a file that changed remotely in
between is fetched again from the start rather than spliced. A file gets its final name only once
complete: its size must match, its SHA-256 too where the server publishes one (Hugging Face does
for its large files, as X-Linked-Etag), and shards must pass the header and size check. Busy
answers (HTTP 429, 5xx) are retried after the server's Retry-After or a growing pause. Files already
in place are skipped (shards are re-verified).
"""
from __future__ import annotations

import argparse
import email.utils
import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from shards import atomic_open, verify_shard

HF_DATASETS_URL = "https://huggingface.co/datasets/{}/resolve/main/datasets"
# Each variant's default source, with where it is documented (see the docstring).
VARIANT_URLS = {
    "sp1024": HF_DATASETS_URL.format("willdepueoai/parameter-golf"),  # the challenge's README
    "sp4096": HF_DATASETS_URL.format("kevclark/parameter-golf"),  # records/.../2026-04-01_Vocab4096_MLPMult4_WD085
    "sp8192": HF_DATASETS_URL.format("kevclark/parameter-golf"),  # records/.../2026-04-05_SP8192_GPTQ-Embeddings_...
}
DEFAULT_VARIANT = "sp1024"
DEFAULT_BASE_URL = VARIANT_URLS[DEFAULT_VARIANT]
BASE_URL_ENV = "PARAMETER_GOLF_DATA_URL"
MANIFEST = "manifest.json"
MANIFEST_SOURCE = "manifest.json.source"  # beside it: the base URL it was fetched from
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
ATTEMPTS = 5  # per file; every retry resumes from what the .part already holds
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_WAIT_S = 120  # the longest pause between attempts, a server's Retry-After included
MB = 1e6
SHA256 = re.compile(r'"?([0-9a-fA-F]{64})"?')  # an ETag that is a SHA-256 of the content
sleep = time.sleep


class DownloadError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--train-shards", type=int, default=80, metavar="N",
                        help="training shards to fetch, from the start of the split (default 80 = 8B "
                             "tokens, as the challenge); the validation split is always fetched in full")
    parser.add_argument("--variant", default=DEFAULT_VARIANT,
                        help=f"tokenizer family: the manifest must list fineweb10B_<variant> (default "
                             f"{DEFAULT_VARIANT}; {', '.join(VARIANT_URLS)} have default sources, any other "
                             "needs --base-url)")
    parser.add_argument("--output-dir", type=Path, default=Path("data"), metavar="DIR",
                        help="local root mirroring the remote layout (default ./data)")
    parser.add_argument("--base-url", metavar="URL",
                        help=f"http(s) URL of the folder holding manifest.json (env {BASE_URL_ENV}; "
                             "default: the variant's Hugging Face repo, listed below)")
    return parser


def base_url(args: argparse.Namespace) -> str:
    """--base-url, else the environment's, else the variant's default source; DownloadError naming the
    setting if it is not an http(s) URL, or if the variant has no default source and neither is set."""
    name, url = "--base-url", args.base_url
    if url is None:
        name, url = BASE_URL_ENV, os.environ.get(BASE_URL_ENV)
    if url is None:
        if args.variant not in VARIANT_URLS:
            raise DownloadError(f"--variant {args.variant}: no public source of fineweb10B_{args.variant} is known "
                                f"(only of {', '.join(VARIANT_URLS)}); pass --base-url (or set {BASE_URL_ENV}) "
                                "to the URL of a folder whose manifest.json lists it")
        return VARIANT_URLS[args.variant]
    try:
        parts = urllib.parse.urlsplit(url)
        valid = (parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
                 and not re.search(r"[\x00-\x20\x7f]", url))
    except ValueError:  # a port that is not a number
        valid = False
    if not valid:
        raise DownloadError(f"{name} {url!r}: not a valid http:// or https:// URL (the default is "
                            f"{VARIANT_URLS.get(args.variant, DEFAULT_BASE_URL)})")
    return url.rstrip("/")


def plan_files(manifest: dict, variant: str, train_shards: int, base: str) -> tuple[list[str], str, int | None]:
    """Remote paths to fetch (validation shards, the first train shards, tokenizer files), the
    tokenizer model's path and its vocab size, read the way the challenge's downloader reads them
    from `base`'s manifest."""
    name = f"fineweb10B_{variant}"
    datasets = {d.get("name"): d for d in manifest.get("datasets", [])}
    if name not in datasets:
        raise DownloadError(f"--variant {variant}: {name} is not in manifest.json of {base} "
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
    vocab_size = tokenizer.get("vocab_size", entry.get("vocab_size"))
    return files, tokenizer_files[0], int(vocab_size) if vocab_size is not None else None


def say(message: str) -> None:
    """A progress line; on a terminal it first clears the in-place byte counter."""
    print(("\r\033[K" if sys.stdout.isatty() else "") + message, flush=True)


class RedirectHeaders(urllib.request.HTTPRedirectHandler):
    """Keeps the headers of the redirects followed: Hugging Face names a large file's SHA-256 and size
    (X-Linked-Etag, X-Linked-Size) on its redirect to the CDN, whose own ETag is something else."""

    def __init__(self) -> None:
        self.seen: list = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # urllib's signature
        self.seen.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def read_meta(meta: Path, url: str) -> dict:
    """What NAME.part.meta recorded about the remote file the .part holds the start of; {} when it is
    missing, unreadable or about another URL."""
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
        return record if isinstance(record, dict) and record.get("url") == url else {}
    except (OSError, ValueError):
        return {}


def describe(url: str, response: http.client.HTTPResponse, redirects: list) -> dict:
    """The remote file, from the headers of a full (200) response and the redirects before it."""
    headers = [*redirects, response.headers]
    digests = [h.get(key) for key in ("X-Linked-Etag", "ETag") for h in headers]
    digest = next((m[1].lower() for d in digests if d and (m := SHA256.fullmatch(d))), None)
    sizes = [response.headers.get("Content-Length")] + [h.get("X-Linked-Size") for h in redirects]
    etag = response.headers.get("ETag")
    return {"url": url, "etag": etag if etag and not etag.startswith("W/") else None,  # If-Range takes strong ones
            "last_modified": response.headers.get("Last-Modified"), "sha256": digest,
            "size": next((int(n) for n in sizes if n and n.isdigit()), None)}


def fetch_part(url: str, part: Path, progress: str) -> int:
    """Append the rest of `url` to `part` and return the bytes received. The .part is continued only
    with a Range request conditional on the validator in its .meta; without one, or when the remote
    file changed, it starts over."""
    meta_path = part.with_name(part.name + ".meta")
    meta = read_meta(meta_path, url)
    have = part.stat().st_size if part.exists() else 0
    validator = meta.get("etag") or meta.get("last_modified")
    if have and not validator:
        say(f"{progress}: nothing records which remote file {part.name} came from; starting over")
        have = 0
    if have and have == meta.get("size"):
        say(f"{progress}: {part.name} is complete; verifying it")
        return 0  # download() verifies it
    headers = {"Range": f"bytes={have}-", "If-Range": validator} if have else {}
    redirects = RedirectHeaders()
    try:
        response = urllib.request.build_opener(redirects).open(urllib.request.Request(url, headers=headers),
                                                               timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the .part is as long as the remote file or longer: start over
            part.unlink()
        raise
    with response:
        if have:
            span = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if response.status != 206:
                say(f"{progress}: the remote file changed since {part.name} began (or Range is ignored); starting over")
                have = 0
            elif not span or int(span[1]) != have:
                part.unlink()  # a server that answers other ranges gets one request for the whole file
                raise DownloadError(f"asked for bytes {have}- and got Content-Range "
                                    f"{response.headers.get('Content-Range')!r}")
            else:
                say(f"{progress} resuming at {have / MB:.1f} MB")
        total = (meta.get("size") or (int(span[2]) if span[2] != "*" else None)) if have else None
        start, done, shown = have, have, 0.0
        with open(part, "ab" if have else "wb") as f:  # "wb" empties it before the new .meta exists
            if not have:
                meta = describe(url, response, redirects.seen)
                total = meta["size"]
                with atomic_open(meta_path) as m:
                    m.write(json.dumps(meta).encode())
            while chunk := response.read(CHUNK_BYTES):
                f.write(chunk)
                done += len(chunk)
                if sys.stdout.isatty() and time.monotonic() - shown > 0.5:
                    shown = time.monotonic()
                    of = f"/{total / MB:.1f}" if total else ""
                    print(f"\r\033[K{progress} {done / MB:.1f}{of} MB", end="", flush=True)
            f.flush()
            os.fsync(f.fileno())
    if total is not None and done != total:
        raise DownloadError(f"connection closed after {done} of {total} bytes")
    return done - start


def retry_after(headers: object) -> float | None:
    """Seconds to wait per a Retry-After header (a number or an HTTP date), if there is one."""
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, progress: str) -> int:
    """Fetch `url` to `dest` through `dest`.part, retrying and resuming; returns the bytes received."""
    part = dest.with_name(dest.name + ".part")
    meta_path = part.with_name(part.name + ".meta")
    dest.parent.mkdir(parents=True, exist_ok=True)
    received = 0
    for attempt in range(1, ATTEMPTS + 1):
        try:
            received += fetch_part(url, part, progress)
            break
        except urllib.error.HTTPError as e:
            if (e.code not in RETRY_STATUSES and e.code != 416) or attempt == ATTEMPTS:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
            wait = retry_after(e.headers)
        except (OSError, http.client.HTTPException, DownloadError) as e:  # dropped connection, timeout
            if attempt == ATTEMPTS:
                raise DownloadError(f"{url}: {e} (rerun to resume from {part.name})") from None
            wait = None
        wait = min(2.0 ** attempt if wait is None else wait, MAX_RETRY_WAIT_S)
        say(f"{progress} retrying in {wait:.0f}s ({attempt}/{ATTEMPTS - 1})")
        sleep(wait)
    meta = read_meta(meta_path, url)
    size, digest = part.stat().st_size, meta.get("sha256")
    problem = None
    if meta.get("size") is not None and size != meta["size"]:
        problem = f"{size} bytes, but the server announced {meta['size']}"
    elif digest and sha256_of(part) != digest:
        problem = f"its SHA-256 is not the {digest} that the server published"
    elif dest.suffix == ".bin":
        try:
            verify_shard(part)
        except ValueError as e:
            problem = str(e)
    if problem:
        part.unlink()
        meta_path.unlink(missing_ok=True)
        raise DownloadError(f"downloaded {dest.name} is corrupt, deleted it: {problem}")
    os.replace(part, dest)
    meta_path.unlink(missing_ok=True)
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


def fetch_manifest(base: str, root: Path) -> Path:
    """root/manifest.json, fetched from `base` unless the copy there came from it (its base URL is in
    manifest.json.source): sources publish different variants, so a copy from another is stale."""
    path, source = root / MANIFEST, root / MANIFEST_SOURCE
    root.mkdir(parents=True, exist_ok=True)
    try:
        cached = path.exists() and source.read_text(encoding="utf-8").strip() == base
    except OSError:
        cached = False
    if not cached:
        source.unlink(missing_ok=True)  # no record while manifest.json may be either source's
        download(f"{base}/{MANIFEST}", path, "[manifest]")
        with atomic_open(source) as f:
            f.write(f"{base}\n".encode())
    return path


def run(args: argparse.Namespace) -> None:
    base, root = base_url(args), args.output_dir
    say(f"fineweb10B_{args.variant} from {base}")
    manifest_path = fetch_manifest(base, root)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files, tokenizer_rel, vocab_size = plan_files(manifest, args.variant, args.train_shards, base)
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # not the manifest layout we know
        manifest_path.unlink()
        (root / MANIFEST_SOURCE).unlink(missing_ok=True)
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
    except (DownloadError, OSError) as e:  # OSError: the output folder cannot be written, say
        print(("\r\033[K" if sys.stdout.isatty() else "") + f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
