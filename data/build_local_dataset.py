"""Build a challenge-format dataset from text on this machine: a tokenizer plus train/val shards.

The default corpus is the documentation that ships with Python itself (the pydoc topics and the
standard library's docstrings), so a fresh checkout can train end to end with no download.
--input takes your own text instead:
  .txt    one document per block of lines separated by blank lines (paragraph-sized documents,
          so even a single file yields a validation split; use .jsonl for whole-file documents)
  .jsonl  one document per line: the "text" field of a JSON object

Each document goes to train or val by a seeded SHA-256 of its text: the same on every run and
machine, and identical documents always land on the same side, so val never leaks into train.
A SentencePiece BPE tokenizer is trained on the train split with the settings of the challenge's
fineweb_1024_bpe.model (or --tokenizer gives one), then every document is written as BOS + ids
into fineweb_{train,val}_NNNNNN.bin shards, which train_gpt.py reads like the challenge's own.

The output folder also gets build_local_dataset.json, the list of the files that the build wrote. A
rebuild replaces only those: shards there that it does not list (the challenge's downloaded ones,
say), or a tokenizer file that an earlier build into that folder did not write, stop the build
before any work unless --force. Everything is written under temporary names and renamed into place
at the end, so a failed build leaves the earlier output as it was, tokenizer included.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import sentencepiece as spm

from shards import MAX_TOKEN_ID, atomic_open, temp_path, write_shard

BOS_ID = 1
DEFAULT_VOCAB_SIZE = 1024
THREADS = os.cpu_count() or 1
ENCODE_BATCH_DOCS = 4096
MODULE_TIMEOUT_S = 10  # per module import in the docstring collector
COLLECT_TIMEOUT_S = 600  # for the whole collector
MARKER = "build_local_dataset.json"  # in the output folder: what the build there wrote

# Read from the challenge's fineweb_1024_bpe.model (trainer_spec and normalizer_spec, via
# sentencepiece_model_pb2); everything else in its spec is SentencePiece's default.
# hard_vocab_limit=False is theirs too: the vocab size is checked after training instead.
CHALLENGE_TOKENIZER_SETTINGS = dict(
    model_type="bpe", character_coverage=0.999, split_digits=True, byte_fallback=False,
    hard_vocab_limit=False, pad_id=0, bos_id=BOS_ID, eos_id=2, unk_id=3,
    normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
)

# Modules never imported for docstrings: import side effects (antigravity opens a browser, this
# prints), GUIs, test suites, ~100 near-identical codec stubs, and the pydoc topics used already.
SKIPPED_MODULES = frozenset({
    "__main__", "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo",
    "test", "tests", "idle_test", "encodings", "pydoc_data",
})


class BuildError(Exception):
    pass


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--input", type=Path, nargs="+", metavar="FILE",
                        help=".txt or .jsonl files (default: Python's own documentation)")
    parser.add_argument("--max-docs", type=positive_int, metavar="N",
                        help="use only the first N documents, in collection order (quick builds)")
    parser.add_argument("--val-fraction", type=fraction, default=0.1, metavar="F",
                        help="share of documents for validation (default 0.1)")
    parser.add_argument("--seed", type=int, default=1337, metavar="N", help="key of the train/val split hash (default 1337)")
    parser.add_argument("--vocab-size", type=positive_int, metavar="N",
                        help=f"tokenizer vocabulary to train (default {DEFAULT_VOCAB_SIZE}; with "
                             "--tokenizer, only checked against it)")
    tokenizer = parser.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer", type=Path, metavar="MODEL",
                           help="encode with this SentencePiece model instead of training one")
    tokenizer.add_argument("--tokenizer-out", type=Path, metavar="MODEL",
                           help="where the trained model goes (default data/tokenizers/local_<vocab>_bpe.model)")
    parser.add_argument("--output-dir", type=Path, metavar="DIR",
                        help="shard folder (default data/datasets/local_sp<vocab>); the shards that an earlier "
                             "build wrote there are replaced")
    parser.add_argument("--force", action="store_true",
                        help="replace fineweb_*.bin shards in --output-dir and a tokenizer file at --tokenizer-out "
                             "even though no earlier build of this tool wrote them")
    parser.add_argument("--shard-tokens", type=positive_int, default=100_000_000, metavar="N",
                        help="tokens per shard (default 100,000,000, as the challenge's)")
    return parser


# -----------------------------------------------------------------------------
# Documents
# -----------------------------------------------------------------------------

def read_inputs(paths: list[Path]) -> list[str]:
    docs: list[str] = []
    for path in paths:
        if not path.is_file():
            raise BuildError(f"--input {path}: no such file")
        if path.suffix not in (".txt", ".jsonl"):
            raise BuildError(f"--input {path}: unsupported file type (use .txt or .jsonl)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise BuildError(f"--input {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if path.suffix == ".txt":
            docs += [block.strip() for block in re.split(r"\n\s*\n", text) if block.strip()]
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)["text"]
                if not isinstance(doc, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise BuildError(f"--input {path}:{lineno}: expected a JSON object with a \"text\" string") from None
            if doc.strip():
                docs.append(doc.strip())
    return docs


def python_docs(limit: int | None) -> list[str]:
    """The pydoc topics, one document each, then one document per standard-library module."""
    from pydoc_data.topics import topics

    docs = [topics[key].strip() for key in sorted(topics)]
    if limit is None or len(docs) < limit:
        docs += stdlib_docstrings(None if limit is None else limit - len(docs))
    return docs[:limit]


def stdlib_docstrings(limit: int | None) -> list[str]:
    # Importing hundreds of modules may print, wait on a terminal or hang, so it happens in a child
    # process (see docstrings_worker) with an overall timeout. Its cwd is this folder, so no file
    # in the user's cwd can shadow a standard-library module.
    here = Path(__file__).resolve().parent
    code = (f"import sys; sys.path.insert(0, {str(here)!r}); import build_local_dataset; "
            f"build_local_dataset.docstrings_worker({limit!r})")
    try:
        child = subprocess.run([sys.executable, "-c", code], cwd=here,
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=COLLECT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BuildError(f"collecting standard-library docstrings took over {COLLECT_TIMEOUT_S}s") from None
    if child.returncode != 0:
        detail = child.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {child.returncode}"]
        raise BuildError(f"collecting standard-library docstrings failed: {detail[0]}")
    return json.loads(child.stdout)


def docstrings_worker(limit: int | None) -> None:
    """Child process of stdlib_docstrings: imports the public standard library in sorted order,
    depth first, and writes one document per module as JSON to the parent, then exits."""
    # Whatever the imported modules print (at the fd level, C code included) goes to /dev/null,
    # as does their stdin; only the results go to the parent, on a private copy of stdout.
    results = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)

    def abandon(signum: int, frame: object) -> None:
        raise TimeoutError

    signal.signal(signal.SIGALRM, abandon)

    def documented(name: str) -> bool:
        return not any(part.startswith("_") or part in SKIPPED_MODULES for part in name.split("."))

    docs: list[str] = []
    stack = sorted((name for name in sys.stdlib_module_names if documented(name)), reverse=True)
    while stack and (limit is None or len(docs) < limit):
        name = stack.pop()
        signal.alarm(MODULE_TIMEOUT_S)  # a module that hangs on import is abandoned
        try:
            module = importlib.import_module(name)
            doc = module_document(module)
            subs = sorted(m.name for m in pkgutil.iter_modules(getattr(module, "__path__", []), name + "."))
        except BaseException:  # missing on this platform, broken, timed out or exiting: skip it
            continue
        finally:
            signal.alarm(0)
        if doc:
            docs.append(doc)
        stack += reversed([sub for sub in subs if documented(sub)])
    json.dump(docs, results)
    results.flush()
    os._exit(0)  # skip the atexit hooks and threads that imported modules may have left


def module_document(module: ModuleType) -> str:
    """The module's docstring, then each public class and function it defines (classes with their
    public methods and properties), each under a heading line with its dotted name."""
    name = module.__name__
    sections = [(name, module.__doc__)]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != name:  # re-exported: documented where it is defined
            continue
        sections.append((f"{name}.{attr}", obj.__doc__))
        if inspect.isclass(obj):
            sections += [(f"{name}.{attr}.{key}", member.__doc__) for key, member in sorted(vars(obj).items())
                         if not key.startswith("_") and (inspect.isroutine(member) or isinstance(member, property))]
    return "\n\n".join(f"{heading}\n{inspect.cleandoc(doc)}" for heading, doc in sections
                       if isinstance(doc, str) and doc.strip())


def is_val(doc: str, seed: int, val_fraction: float) -> bool:
    # A keyed SHA-256 rather than hash(), which Python randomizes per process.
    digest = hashlib.sha256(f"{seed}:{doc}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


# -----------------------------------------------------------------------------
# Tokenizer and shards
# -----------------------------------------------------------------------------

def train_tokenizer(docs: list[str], vocab_size: int) -> bytes:
    # SentencePiece takes each input line as a sentence and skips lines over its
    # max_sentence_length (4192 bytes), so it learns from lines rather than whole documents.
    lines = [line for doc in docs for line in doc.splitlines() if line.strip()]
    print(f"training tokenizer: BPE, vocab {vocab_size}, on {len(lines):,} lines "
          f"({sum(map(len, lines)) / 1e6:.1f}M chars) of the train split", flush=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                       num_threads=THREADS, minloglevel=2, **CHALLENGE_TOKENIZER_SETTINGS)
    except RuntimeError as e:
        raise BuildError(f"--vocab-size {vocab_size}: SentencePiece cannot train on this corpus: {e}") from None
    pieces = spm.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()
    if pieces != vocab_size:
        raise BuildError(f"--vocab-size {vocab_size} is too large for this corpus: its train split "
                         f"yields at most {pieces} pieces; lower it or add text")
    return model.getvalue()


def load_tokenizer(path: Path, vocab_size: int | None) -> spm.SentencePieceProcessor:
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise BuildError(f"--tokenizer {path}: cannot load it ({e})") from None
    if sp.bos_id() != BOS_ID:
        raise BuildError(f"--tokenizer {path}: its BOS id is {sp.bos_id()}, but documents in the "
                         f"challenge's shards start with id {BOS_ID}")
    if vocab_size is not None and vocab_size != sp.vocab_size():
        raise BuildError(f"--vocab-size {vocab_size} does not match --tokenizer {path} (vocab {sp.vocab_size()})")
    return sp


def encode_docs(sp: spm.SentencePieceProcessor, docs: list[str], split: str) -> Iterator[np.ndarray]:
    """BOS + token ids of each document, in order, encoded in multithreaded batches."""
    for start in range(0, len(docs), ENCODE_BATCH_DOCS):
        for ids in sp.encode(docs[start:start + ENCODE_BATCH_DOCS], num_threads=THREADS):
            yield np.array([BOS_ID, *ids], dtype=np.uint16)
        print(f"encoding {split}: {min(start + ENCODE_BATCH_DOCS, len(docs)):,}/{len(docs):,} docs", flush=True)


def write_split(docs: Iterable[np.ndarray], out_dir: Path, split: str, shard_tokens: int) -> tuple[int, list[str]]:
    """Cut the concatenated documents into shards of shard_tokens (the last one shorter); a document
    may straddle two shards, as in the challenge's export. Returns the token count and file names."""
    names: list[str] = []
    pending: list[np.ndarray] = []
    pending_size = total = 0

    def emit(tokens: np.ndarray) -> None:
        names.append(f"fineweb_{split}_{len(names):06d}.bin")
        write_shard(out_dir / names[-1], tokens)

    for doc in docs:
        pending.append(doc)
        pending_size += doc.size
        total += doc.size
        while pending_size >= shard_tokens:
            stream = np.concatenate(pending)
            emit(stream[:shard_tokens])
            pending, pending_size = [stream[shard_tokens:]], pending_size - shard_tokens
    if pending_size:
        emit(np.concatenate(pending))
    return total, names


def read_marker(out_dir: Path) -> tuple[set[str], str | None]:
    """The shard names and the tokenizer path that the last build into out_dir wrote (none when its
    marker is missing or unreadable)."""
    try:
        marker = json.loads((out_dir / MARKER).read_text(encoding="utf-8"))
        return set(marker["files"]), marker.get("tokenizer")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set(), None


def write_marker(out_dir: Path, files: Iterable[str], tokenizer: Path | None) -> None:
    record = {"files": sorted(files), "tokenizer": str(tokenizer.resolve()) if tokenizer else None}
    with atomic_open(out_dir / MARKER) as f:
        f.write((json.dumps(record, indent=1) + "\n").encode())


def check_output(out_dir: Path, tokenizer_out: Path | None, force: bool) -> set[str]:
    """The shards in out_dir that the build will replace. Shards there that out_dir's marker does not
    list, or a tokenizer_out file that it does not name, are refused unless `force`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BuildError(f"--output-dir {out_dir}: not a folder")
    ours, our_tokenizer = read_marker(out_dir)
    shards = {p.name for p in out_dir.glob("fineweb_*.bin")}
    foreign = sorted(shards - ours)
    if foreign and not force:
        raise BuildError(f"--output-dir {out_dir} holds {len(foreign)} fineweb_*.bin file(s) that this tool did "
                         f"not write ({foreign[0]}{', ...' if len(foreign) > 1 else ''}); pass --force to replace them, or choose another folder")
    if tokenizer_out and tokenizer_out.exists() and not force and our_tokenizer != str(tokenizer_out.resolve()):
        raise BuildError(f"--tokenizer-out {tokenizer_out}: the file exists and no earlier build into {out_dir} "
                         "wrote it; pass --force to overwrite it, or choose another path")
    return shards


# -----------------------------------------------------------------------------
# Main
# -----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> None:
    start = time.monotonic()
    # Everything that can be checked without the documents is, before collecting them.
    sp = load_tokenizer(args.tokenizer, args.vocab_size) if args.tokenizer else None
    vocab = sp.vocab_size() if sp else args.vocab_size or DEFAULT_VOCAB_SIZE
    if vocab > MAX_TOKEN_ID + 1:
        raise BuildError(f"{f'--tokenizer {args.tokenizer}' if sp else '--vocab-size'}: vocab {vocab} does not fit "
                         f"the shards' uint16 tokens (at most {MAX_TOKEN_ID + 1})")
    out_dir = args.output_dir or Path(f"data/datasets/local_sp{vocab}")
    tokenizer_path = args.tokenizer or args.tokenizer_out or Path(f"data/tokenizers/local_{vocab}_bpe.model")
    replaced = check_output(out_dir, None if sp else tokenizer_path, args.force)

    if args.input:
        docs = read_inputs(args.input)[:args.max_docs]
        source = f"--input {' '.join(map(str, args.input))}"
    else:
        print("collecting documents: pydoc topics and standard-library docstrings", flush=True)
        docs = python_docs(args.max_docs)
        source = "Python's documentation"
    if not docs:
        raise BuildError(f"{source}: no documents (the corpus is empty)")
    print(f"collected {len(docs):,} documents ({sum(map(len, docs)) / 1e6:.1f}M chars) "
          f"in {time.monotonic() - start:.1f}s", flush=True)

    in_val = [is_val(doc, args.seed, args.val_fraction) for doc in docs]
    train = [doc for doc, v in zip(docs, in_val) if not v]
    val = [doc for doc, v in zip(docs, in_val) if v]
    if not val or not train:
        empty, hint = ("validation", "raise --val-fraction") if not val else ("training", "lower --val-fraction")
        raise BuildError(f"the {empty} split is empty ({len(docs)} documents from {source}, "
                         f"--val-fraction {args.val_fraction}); {hint} or add documents")

    model = None
    if sp is None:
        model = train_tokenizer(train, vocab)
        sp = spm.SentencePieceProcessor(model_proto=model)

    # Shards go to a temporary folder beside out_dir and the tokenizer to a temporary name beside its
    # path; only once all exist are they renamed into place, the tokenizer last, so a failed build
    # leaves neither half a dataset nor a tokenizer that does not match its shards.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    new_tokenizer = temp_path(tokenizer_path)
    ours = tokenizer_path if model is not None else None
    try:
        written = {split: write_split(encode_docs(sp, split_docs, split), staging, split, args.shard_tokens)
                   for split, split_docs in (("train", train), ("val", val))}
        names = {name for _, split_names in written.values() for name in split_names}
        if model is not None:
            with atomic_open(new_tokenizer) as f:
                f.write(model)
        out_dir.mkdir(exist_ok=True)
        write_marker(out_dir, replaced | names, ours)  # while the two builds mix, all of it counts as ours
        for name in sorted(names):
            os.replace(staging / name, out_dir / name)
        for name in replaced - names:  # an earlier build may have had more shards
            (out_dir / name).unlink(missing_ok=True)
        if model is not None:
            os.replace(new_tokenizer, tokenizer_path)
        write_marker(out_dir, names, ours)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        new_tokenizer.unlink(missing_ok=True)

    print(f"documents: {len(docs):,} from {source} (train {len(train):,}, val {len(val):,}, seed {args.seed})")
    for split, (tokens, names) in written.items():
        print(f"{split}: {tokens:,} tokens in {len(names)} shard(s): {names[0]} .. {names[-1]}")
    print(f"shards: {out_dir.resolve()}")
    print(f"tokenizer: {tokenizer_path.resolve()} (vocab {vocab}, "
          f"{'trained on the train split' if model is not None else 'given'})")
    print(f"built in {time.monotonic() - start:.1f}s; train on it with:")
    print(f"DATA_PATH={out_dir.resolve()} TOKENIZER_PATH={tokenizer_path.resolve()} VOCAB_SIZE={vocab}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (BuildError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
