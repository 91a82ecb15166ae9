"""The dataset tools in data/: shard I/O, the local dataset builder and the resumable downloader.

Run with `python3 -m pytest -q tests/test_data_tools.py` (CPU, a few seconds, no network: the
downloader talks to an HTTP server on 127.0.0.1 started here).
"""
from __future__ import annotations

import email.utils
import hashlib
import http.server
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))

import build_local_dataset as builder  # noqa: E402
import cached_challenge_fineweb as downloader  # noqa: E402
from shards import HEADER_BYTES, read_shard, verify_shard, write_shard  # noqa: E402

SHARED_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "fineweb_1024_bpe.model"
BOS = 1


# -----------------------------------------------------------------------------
# Shards
# -----------------------------------------------------------------------------

def corrupt(raw: bytearray, how: str) -> bytes:
    if how == "magic":
        raw[0:4] = np.int32(7).tobytes()
    elif how == "version":
        raw[4:8] = np.int32(2).tobytes()
    elif how == "truncated":
        raw = raw[:-2]
    elif how == "extra bytes":
        raw += b"\0\0"
    elif how == "shorter than header":
        raw = raw[:100]
    return bytes(raw)


def test_shard_round_trip_is_exact_and_atomic(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=1001).astype(np.uint16)
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, tokens)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size
    assert verify_shard(path) == tokens.size
    back = read_shard(path)
    assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "bad.bin", np.array([1, 70000]))
    assert not (tmp_path / "bad.bin").exists()


@pytest.mark.parametrize("how", ["magic", "version", "truncated", "extra bytes", "shorter than header"])
def test_corrupt_shards_are_refused_naming_the_file(tmp_path, how):
    good = tmp_path / "good.bin"
    write_shard(good, np.arange(50, dtype=np.uint16))
    bad = tmp_path / f"fineweb_val_{how.replace(' ', '_')}.bin"
    bad.write_bytes(corrupt(bytearray(good.read_bytes()), how))
    for reader in (verify_shard, read_shard):
        with pytest.raises(ValueError, match=re.escape(bad.name)):
            reader(bad)


# -----------------------------------------------------------------------------
# Local dataset builder
# -----------------------------------------------------------------------------

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "da", "ve", "fi", "gu"]


def tiny_docs(n: int, seed: int = 0) -> list[str]:
    """Pseudo-text over a small alphabet, so a vocab-300 BPE trains in milliseconds."""
    rng = random.Random(seed)

    def sentence() -> str:
        words = ("".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(rng.randint(4, 12)))
        return " ".join(words).capitalize() + "."

    # Frequent numbers: BPE would merge their digits if split_digits were off.
    return ["\n".join(sentence() for _ in range(rng.randint(2, 5))) + f" Year {rng.choice(['2024', '1999'])}."
            for _ in range(n)]


@pytest.fixture
def corpus(tmp_path) -> tuple[list[Path], list[str]]:
    """60 paragraphs in a .txt (blank-line separated, with line breaks inside) and 40 .jsonl lines."""
    docs = tiny_docs(100)
    txt, jsonl = tmp_path / "a.txt", tmp_path / "b.jsonl"
    txt.write_text("\n\n\n".join(docs[:60]) + "\n", encoding="utf-8")
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[60:])), encoding="utf-8")
    return [txt, jsonl], docs


def build(tmp_path: Path, inputs: list[Path], name: str, *extra: str) -> tuple[int, Path, Path]:
    out, tok = tmp_path / name / "shards", tmp_path / name / "tok.model"
    argv = ["--input", *map(str, inputs), "--vocab-size", "300", "--val-fraction", "0.2",
            "--shard-tokens", "1000", "--output-dir", str(out), "--tokenizer-out", str(tok), *extra]
    return builder.main(argv), out, tok


def split_stream(out: Path, split: str) -> np.ndarray:
    files = sorted(out.glob(f"fineweb_{split}_*.bin"))
    assert [f.name for f in files] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(files))]
    return np.concatenate([read_shard(f) for f in files])


def documents(stream: np.ndarray) -> list[tuple[int, ...]]:
    """The stream cut at BOS tokens: one tuple of ids per document."""
    starts = np.flatnonzero(stream == BOS).tolist() + [stream.size]
    assert starts[0] == 0
    return [tuple(stream[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]


def test_build_writes_bos_prefixed_documents_in_order(tmp_path, corpus, capsys):
    inputs, docs = corpus
    rc, out, tok = build(tmp_path, inputs, "run")
    assert rc == 0
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    assert (sp.vocab_size(), sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (300, 0, 1, 2, 3)
    train_files = sorted(out.glob("fineweb_train_*.bin"))
    assert len(train_files) >= 3 and all(verify_shard(f) == 1000 for f in train_files[:-1])
    val = [d for d in docs if builder.is_val(d, 1337, 0.2)]
    train = [d for d in docs if not builder.is_val(d, 1337, 0.2)]
    assert val and train
    for split, split_docs in (("train", train), ("val", val)):
        expected = np.array([t for d in split_docs for t in [BOS, *sp.encode(d)]], dtype=np.uint16)
        assert np.array_equal(split_stream(out, split), expected), split
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"DATA_PATH={out.resolve()} TOKENIZER_PATH={tok.resolve()} VOCAB_SIZE=300"


def test_tokenizer_follows_the_challenge_settings(tmp_path, corpus):
    rc, _, tok = build(tmp_path, corpus[0], "run")
    assert rc == 0
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]  # split_digits
    assert not sp.encode("kalo", out_type=str)[0].startswith("\u2581")  # no dummy prefix
    assert sp.encode("ka   lo\nmi") == sp.encode("ka lo mi")  # nmt_nfkc, extra whitespace removed
    assert sp.encode("\uff4b\uff41") == sp.encode("ka")  # NFKC: full-width letters


def test_split_is_deterministic_disjoint_and_seeded(tmp_path, corpus):
    inputs, _ = corpus
    runs = [build(tmp_path, inputs, name) for name in ("one", "two")]
    assert [rc for rc, _, _ in runs] == [0, 0]
    (_, a, tok_a), (_, b, tok_b) = runs
    assert tok_a.read_bytes() == tok_b.read_bytes()
    names = sorted(p.name for p in a.glob("fineweb_*.bin"))
    assert names == sorted(p.name for p in b.glob("fineweb_*.bin"))
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    train, val = documents(split_stream(a, "train")), documents(split_stream(a, "val"))
    assert val and not set(train) & set(val)
    assert len(train) + len(val) == 100
    c = tmp_path / "other-seed"
    argv = ["--input", *map(str, inputs), "--val-fraction", "0.2", "--seed", "7", "--tokenizer", str(tok_a)]
    assert builder.main([*argv, "--output-dir", str(c)]) == 0
    assert documents(split_stream(c, "val")) != val


def test_rebuild_replaces_earlier_shards(tmp_path, corpus):
    inputs, _ = corpus
    assert build(tmp_path, inputs, "run")[0] == 0
    rc, out, tok = build(tmp_path, inputs, "run", "--shard-tokens", "100000")
    assert rc == 0
    shards = ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert sorted(p.name for p in out.iterdir()) == [builder.MARKER, *shards]
    assert json.loads((out / builder.MARKER).read_text()) == {"files": shards, "tokenizer": str(tok.resolve())}


def test_shards_it_did_not_write_are_refused_unless_forced(tmp_path, corpus, monkeypatch, capsys):
    out = tmp_path / "run" / "shards"  # say, the challenge's downloaded shards
    for name in ("fineweb_train_000000.bin", "fineweb_val_000007.bin"):
        write_shard(out / name, np.arange(10, dtype=np.uint16))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    trained, train_tokenizer = [], builder.train_tokenizer
    monkeypatch.setattr(builder, "train_tokenizer", lambda *a: trained.append(a) or train_tokenizer(*a))
    rc, _, tok = build(tmp_path, corpus[0], "run")
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and f"--output-dir {out} holds 2 fineweb_*.bin" in lines[0], lines
    assert "--force" in lines[0]
    assert not trained and not tok.exists()  # refused before any work
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    rc, out, tok = build(tmp_path, corpus[0], "run", "--force")
    assert rc == 0 and not (out / "fineweb_val_000007.bin").exists()
    assert verify_shard(out / "fineweb_train_000000.bin") == 1000
    assert json.loads((out / builder.MARKER).read_text())["tokenizer"] == str(tok.resolve())


def test_tokenizer_it_did_not_write_is_refused_unless_forced(tmp_path, corpus, capsys):
    rc, _, tok = build(tmp_path, corpus[0], "first")
    assert rc == 0
    before = tok.read_bytes()
    argv = ["--input", str(corpus[0][0]), "--vocab-size", "280", "--output-dir", str(tmp_path / "second")]
    assert builder.main([*argv, "--tokenizer-out", str(tok)]) == 1  # would change the first build's tokenizer
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--tokenizer-out {tok}: the file exists" in lines[0] and "--force" in lines[0]
    assert tok.read_bytes() == before and not (tmp_path / "second").exists()
    assert builder.main([*argv, "--tokenizer-out", str(tok), "--force"]) == 0
    assert spm.SentencePieceProcessor(model_file=str(tok)).vocab_size() == 280


def test_failed_write_leaves_nothing(tmp_path, corpus, monkeypatch, capsys):
    calls = []

    def failing_write(path: Path, tokens: np.ndarray) -> None:
        if calls:
            raise OSError(f"{path}: No space left on device")
        calls.append(path)
        write_shard(path, tokens)

    monkeypatch.setattr(builder, "write_shard", failing_write)
    rc, out, tok = build(tmp_path, corpus[0], "run")
    assert rc == 1 and "No space left" in capsys.readouterr().err
    assert calls and not out.exists() and not tok.exists() and not list(tmp_path.rglob("*.tmp*"))


@pytest.mark.parametrize("stage", ["writing shards", "moving shards in"])
def test_failed_rebuild_keeps_the_previous_output(tmp_path, corpus, monkeypatch, capsys, stage):
    rc, out, tok = build(tmp_path, corpus[0], "run")
    assert rc == 0
    before = {p: p.read_bytes() for p in [tok, *out.iterdir()]}
    real_write, real_replace = builder.write_shard, os.replace

    def failing_write(path: Path, tokens: np.ndarray) -> None:
        if stage == "writing shards" and path.name == "fineweb_val_000000.bin":
            raise OSError(f"{path}: No space left on device")
        real_write(path, tokens)

    def failing_replace(src, dst) -> None:
        if stage == "moving shards in" and Path(dst).parent == out and Path(dst).name.startswith("fineweb_"):
            raise OSError(f"{dst}: Permission denied")
        real_replace(src, dst)

    monkeypatch.setattr(builder, "write_shard", failing_write)
    monkeypatch.setattr(os, "replace", failing_replace)
    # A different vocab and shard size: a new tokenizer and a different set of shards.
    rc = build(tmp_path, corpus[0], "run", "--vocab-size", "280", "--shard-tokens", "700")[0]
    assert rc == 1 and ("No space left" if stage == "writing shards" else "Permission denied") in capsys.readouterr().err
    assert {p: p.read_bytes() for p in [tok, *out.iterdir()] if p.name != builder.MARKER} == {
        p: b for p, b in before.items() if p.name != builder.MARKER}
    assert not list(tmp_path.rglob("*.tmp*"))
    monkeypatch.undo()
    assert build(tmp_path, corpus[0], "run", "--vocab-size", "280", "--shard-tokens", "700")[0] == 0  # still ours
    assert spm.SentencePieceProcessor(model_file=str(tok)).vocab_size() == 280


def test_python_docs_are_deterministic_and_quiet(capfd):
    docs = builder.python_docs(None)
    assert capfd.readouterr() == ("", "")  # importing the standard library printed nothing
    from pydoc_data.topics import topics
    assert len(docs) > len(topics) + 300
    headings = [d.split("\n", 1)[0] for d in docs[len(topics):]]
    assert "json" in headings and "collections" in headings
    assert not [h for h in headings if re.search(r"(^|\.)(idlelib|tkinter|turtledemo|this|test|tests)(\.|$)", h)]
    assert builder.python_docs(120) == docs[:120]


@pytest.fixture(scope="module")
def pydoc_build(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The CLI with its default corpus and default paths (under cwd), at vocab 512."""
    cwd = tmp_path_factory.mktemp("pydoc")
    cmd = [sys.executable, str(REPO / "data" / "build_local_dataset.py"), "--vocab-size", "512", "--max-docs", "250"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120), cwd


def test_default_build_cli(pydoc_build):
    result, cwd = pydoc_build
    assert result.returncode == 0, result.stderr
    out, tok = cwd / "data" / "datasets" / "local_sp512", cwd / "data" / "tokenizers" / "local_512_bpe.model"
    assert result.stdout.strip().splitlines()[-1] == f"DATA_PATH={out} TOKENIZER_PATH={tok} VOCAB_SIZE=512"
    assert "documents: 250 " in result.stdout
    for split in ("train", "val"):
        stream = split_stream(out, split)
        assert stream[0] == BOS and stream.max() < 512
    assert not list(cwd.rglob("*.tmp*"))


@pytest.mark.skipif(not SHARED_TOKENIZER.exists(), reason="the challenge's tokenizer is not in ../shared")
def test_normalization_matches_the_challenge_tokenizer(pydoc_build):
    _, cwd = pydoc_build
    ours = spm.SentencePieceProcessor(model_file=str(cwd / "data" / "tokenizers" / "local_512_bpe.model"))
    theirs = spm.SentencePieceProcessor(model_file=str(SHARED_TOKENIZER))
    assert [(t.pad_id(), t.bos_id(), t.eos_id(), t.unk_id()) for t in (ours, theirs)] == [(0, 1, 2, 3)] * 2
    for tok in (ours, theirs):
        assert tok.encode("in 2024", out_type=str)[-4:] == ["2", "0", "2", "4"]  # split digits
        assert tok.encode("The", out_type=str)[0][0] == "T"  # no dummy "▁" prefix
    for text in ["The  value\tis 1234 \ufb01ne.", "Ｆｕｌｌ width:  x² and ①"]:
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))  # same normalization


def bad_corpus(tmp_path: Path, case: str, corpus: tuple[list[Path], list[str]]) -> tuple[list[str], str]:
    inputs, _ = corpus
    if case == "missing input":
        return ["--input", str(tmp_path / "missing.txt")], "missing.txt"
    if case == "empty corpus":
        (tmp_path / "blank.txt").write_text("\n  \n\n")
        return ["--input", str(tmp_path / "blank.txt")], "no documents"
    if case == "bad jsonl":
        (tmp_path / "bad.jsonl").write_text('{"text": "ka lo"}\n{"txt": "mi"}\n')
        return ["--input", str(tmp_path / "bad.jsonl")], "bad.jsonl:2"
    if case == "vocab too large":
        return ["--input", *map(str, inputs), "--vocab-size", "5000"], "--vocab-size 5000"
    if case == "empty validation split":
        return ["--input", *map(str, inputs), "--val-fraction", "0.000001"], "validation split is empty"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing input", "empty corpus", "bad jsonl", "vocab too large", "empty validation split"])
def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path, corpus, capsys, case):
    argv, needle = bad_corpus(tmp_path, case, corpus)
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "out" / "shards"
    assert builder.main([*argv, "--output-dir", str(out), "--tokenizer-out", str(tmp_path / "out" / "t.model")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert sorted(tmp_path.rglob("*")) == before


# -----------------------------------------------------------------------------
# Downloader, against a local HTTP server with Range support
# -----------------------------------------------------------------------------

class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.root like Hugging Face: a strong ETag (the content's SHA-256) and `Range: bytes=N-`,
    honoured unless If-Range names another ETag; records each request's path, Range and If-Range.
    With server.redirect, a path first redirects to /cdn/<path> with X-Linked-Etag (the SHA-256, or
    server.published[path]) and X-Linked-Size, and /cdn/ answers with an MD5 ETag, as the CDN does.
    server.faults[path] lists answers for its next requests: (status, Retry-After or None), or
    ("cut", n, framing): the body stops at byte n of the file and the connection closes, the body
    framed by Content-Length ("length"), by the close ("close") or in chunks ("chunked")."""

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Range")))
        self.server.if_ranges.append(self.headers.get("If-Range"))
        faults = self.server.faults.get(self.path)
        fault = faults.pop(0) if faults else None
        if fault and fault[0] != "cut":
            self.send_response(fault[0])
            if fault[1] is not None:
                self.send_header("Retry-After", fault[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        cdn = self.path.startswith("/cdn/")
        path = self.server.root / self.path.removeprefix("/cdn").lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        if self.server.redirect and not cdn:
            self.send_response(302)
            self.send_header("Location", "/cdn" + self.path)
            self.send_header("X-Linked-Etag", self.server.published.get(self.path, etag))
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if cdn:
            etag = f'"{hashlib.md5(data).hexdigest()}"'
        ranged = self.headers["Range"] and self.headers.get("If-Range", etag) == etag
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if ranged else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        _, stop, framing = fault or ("cut", len(data), "length")
        if framing == "chunked":
            self.protocol_version = "HTTP/1.1"
        self.send_response(206 if start else 200)
        self.send_header("ETag", etag)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if framing == "length":
            self.send_header("Content-Length", str(len(data) - start))
        elif framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        body = data[start:max(start, stop)]
        if framing == "chunked":  # one chunk announced whole
            body = f"{len(data) - start:x}\r\n".encode() + body + (b"\r\n0\r\n\r\n" if stop >= len(data) else b"")
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


DATASET = "datasets/fineweb10B_sp1024"
MANIFEST = {
    "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                  "stats": {"files_train": 3, "files_val": 1}}],
    "tokenizers": [{"name": "sp_bpe_1024", "vocab_size": 1024, "model_path": "tokenizers/fineweb_1024_bpe.model",
                    "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
}


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """A fake copy of the published repo: manifest, 1 val + 3 train shards, tokenizer files."""
    monkeypatch.setenv("no_proxy", "*")  # a proxy from the environment must not see 127.0.0.1
    root = tmp_path / "remote"
    rng = np.random.default_rng(0)
    for name in ["fineweb_val_000000.bin", *(f"fineweb_train_{i:06d}.bin" for i in range(3))]:
        write_shard(root / DATASET / name, rng.integers(0, 1024, size=3000).astype(np.uint16))
    (root / "tokenizers").mkdir()
    (root / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(rng.bytes(5000))
    (root / "tokenizers" / "fineweb_1024_bpe.vocab").write_bytes(rng.bytes(300))
    (root / "manifest.json").write_text(json.dumps(MANIFEST))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.root, server.requests, server.if_ranges, server.faults = root, [], [], {}
    server.redirect, server.published, server.waits = False, {}, []
    monkeypatch.setattr(downloader, "sleep", server.waits.append)  # retries record their pauses instead
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", root, server.requests, server
    server.shutdown()
    server.server_close()


def fetch(url: str, out: Path, *extra: str) -> int:
    return downloader.main(["--base-url", url, "--output-dir", str(out), "--train-shards", "2", *extra])


WANTED = ["manifest.json", f"{DATASET}/fineweb_val_000000.bin", f"{DATASET}/fineweb_train_000000.bin",
          f"{DATASET}/fineweb_train_000001.bin", "tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"]


def test_download_then_skip_complete_files(tmp_path, remote, capsys):
    url, root, requests, _ = remote
    out = tmp_path / "data"
    assert fetch(url, out) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(WANTED + ["manifest.json.source"])
    assert (out / "manifest.json.source").read_text() == url.rstrip("/") + "\n"
    assert all((out / rel).read_bytes() == (root / rel).read_bytes() for rel in WANTED)
    assert sorted(path for path, _ in requests) == sorted("/" + rel for rel in WANTED)
    stdout = capsys.readouterr().out
    assert "[1/5] datasets/fineweb10B_sp1024/fineweb_val_000000.bin: 0.0 MB" in stdout
    assert stdout.strip().splitlines()[-1] == (f"DATA_PATH={(out / DATASET).resolve()} TOKENIZER_PATH="
                                               f"{(out / WANTED[4]).resolve()} VOCAB_SIZE=1024")
    requests.clear()
    assert fetch(url, out) == 0
    assert requests == [] and capsys.readouterr().out.count("already complete") == 5
    val = out / WANTED[1]
    val.write_bytes(val.read_bytes()[:-10])  # a damaged local shard is fetched again
    assert fetch(url, out) == 0
    assert requests == [("/" + WANTED[1], None)] and val.read_bytes() == (root / WANTED[1]).read_bytes()


@pytest.mark.parametrize("remote_file", ["unchanged", "changed"])
def test_resume_is_conditional_on_the_same_remote_file(tmp_path, remote, capsys, remote_file):
    url, root, requests, server = remote
    out, rel = tmp_path / "data", f"{DATASET}/fineweb_train_000001.bin"
    server.faults["/" + rel] = [("cut", 2500, "length")] * 9  # every attempt breaks off at byte 2500
    assert fetch(url, out) == 1
    assert "rerun to resume from fineweb_train_000001.bin.part" in capsys.readouterr().err
    part, full = out / (rel + ".part"), (root / rel).read_bytes()
    assert part.read_bytes() == full[:2500]
    if remote_file == "changed":  # same size, other tokens: a spliced file would pass the shard check
        write_shard(root / rel, np.arange(3000, dtype=np.uint16))
    requests.clear(), server.if_ranges.clear(), server.faults.clear()
    assert fetch(url, out) == 0
    assert [r for r in requests if r[0] == "/" + rel] == [("/" + rel, "bytes=2500-")]
    assert set(server.if_ranges) == {None, f'"{hashlib.sha256(full).hexdigest()}"'}  # the first response's ETag
    assert (out / rel).read_bytes() == (root / rel).read_bytes() and not list(out.rglob("*.part*"))
    if remote_file == "changed":
        assert "the remote file changed" in capsys.readouterr().out


def test_part_without_a_record_of_its_source_starts_over(tmp_path, remote):
    url, root, requests, _ = remote
    out, rel = tmp_path / "data", f"{DATASET}/fineweb_train_000001.bin"
    (out / DATASET).mkdir(parents=True)
    (out / (rel + ".part")).write_bytes(b"\0" * 2500)  # nothing says which remote file this began
    assert fetch(url, out) == 0
    assert ("/" + rel, None) in requests and (out / rel).read_bytes() == (root / rel).read_bytes()


@pytest.mark.parametrize("part", ["intact", "damaged"])
def test_complete_part_is_verified_not_fetched_again(tmp_path, remote, monkeypatch, capsys, part):
    url, root, requests, _ = remote
    out, rel = tmp_path / "data", f"{DATASET}/fineweb_train_000001.bin"
    real_replace = os.replace

    def interrupted(src, dst) -> None:  # killed between the last byte and the rename
        if Path(dst) == out / rel:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    assert fetch(url, out) == 130
    monkeypatch.undo()
    downloaded = out / (rel + ".part")
    assert downloaded.read_bytes() == (root / rel).read_bytes()
    if part == "damaged":
        raw = bytearray(downloaded.read_bytes())
        raw[5000] ^= 1  # the header and size still pass
        downloaded.write_bytes(bytes(raw))
    requests.clear()
    capsys.readouterr()
    assert fetch(url, out) == (0 if part == "intact" else 1)
    assert ("/" + rel, None) not in requests and not [r for r in requests if r[1]]
    if part == "intact":
        assert (out / rel).read_bytes() == (root / rel).read_bytes() and not list(out.rglob("*.part*"))
    else:
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "fineweb_train_000001.bin is corrupt" in lines[0] and "SHA-256" in lines[0]
        assert not (out / rel).exists() and not list(out.rglob("*.part*"))


def test_content_is_checked_against_the_sha256_on_the_redirect(tmp_path, remote, capsys):
    url, root, requests, server = remote
    server.redirect = True  # as Hugging Face: the hash is on the redirect, the CDN's ETag is an MD5
    rel = "tokenizers/fineweb_1024_bpe.model"
    server.published["/" + rel] = f'"{hashlib.sha256(b"another file").hexdigest()}"'
    out = tmp_path / "data"
    assert fetch(url, out) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "fineweb_1024_bpe.model is corrupt" in lines[0] and "SHA-256" in lines[0], lines
    assert not (out / rel).exists() and not list(out.rglob("*.part*"))
    assert ("/cdn/" + rel, None) in requests
    server.published.clear()
    assert fetch(url, out) == 0
    assert all((out / rel).read_bytes() == (root / rel).read_bytes() for rel in WANTED)


@pytest.mark.parametrize("framing", ["close", "chunked"])
def test_body_without_content_length_cut_short_is_caught(tmp_path, remote, capsys, framing):
    url, root, requests, server = remote
    out, rel = tmp_path / "data", "tokenizers/fineweb_1024_bpe.model"
    server.faults["/" + rel] = [("cut", 3000, framing)] * 9
    assert fetch(url, out) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "fineweb_1024_bpe.model" in lines[0], lines
    if framing == "close":  # a clean close ends such a body: the published SHA-256 shows it is short
        assert "is corrupt" in lines[0] and "SHA-256" in lines[0] and not list(out.rglob("*.part*"))
    else:  # the chunk stops short: an error in the transfer itself, retried, then left for a rerun
        assert "IncompleteRead" in lines[0] and "rerun to resume" in lines[0]
        assert len(server.waits) == downloader.ATTEMPTS - 1
    assert not (out / rel).exists()
    server.faults.clear()
    assert fetch(url, out) == 0 and (out / rel).read_bytes() == (root / rel).read_bytes()


def test_busy_server_is_retried_honouring_retry_after(tmp_path, remote, monkeypatch):
    url, root, requests, server = remote
    monkeypatch.setattr(downloader, "MAX_RETRY_WAIT_S", 30)
    in_20s = email.utils.formatdate(time.time() + 20, usegmt=True)
    server.faults["/manifest.json"] = [(429, "7"), (503, "100000"), (429, in_20s), (502, None)]
    assert fetch(url, tmp_path / "data") == 0
    assert [path for path, _ in requests[:5]] == ["/manifest.json"] * 5
    waits = server.waits
    assert waits[:2] == [7, 30] and 18 < waits[2] <= 20 and waits[3] == 2 ** 4  # capped; then backoff
    assert (tmp_path / "data" / "manifest.json").read_bytes() == (root / "manifest.json").read_bytes()


# Kevin Clark's repo (kevclark/parameter-golf) as the challenge's downloader reads it: the same
# layout as the public one, with sp4096 and sp8192 in its manifest.
FRONTIER = {
    "datasets": [{"name": f"fineweb10B_sp{v}", "tokenizer_name": f"sp_bpe_{v}", "stats": {"files_train": 2, "files_val": 1}}
                 for v in (4096, 8192)],
    "tokenizers": [{"name": f"sp_bpe_{v}", "kind": "sentencepiece_bpe", "vocab_size": v,
                    "model_path": f"tokenizers/fineweb_{v}_bpe.model", "vocab_path": f"tokenizers/fineweb_{v}_bpe.vocab"}
                   for v in (4096, 8192)],
}


def test_each_variant_defaults_to_where_it_is_published(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(downloader.BASE_URL_ENV, raising=False)
    hf = "https://huggingface.co/datasets/{}/resolve/main/datasets"
    expected = {"sp1024": hf.format("willdepueoai/parameter-golf"), "sp4096": hf.format("kevclark/parameter-golf"),
                "sp8192": hf.format("kevclark/parameter-golf")}
    parse = downloader.build_parser().parse_args
    assert downloader.base_url(parse([])) == expected["sp1024"]
    for variant, url in expected.items():
        assert downloader.base_url(parse(["--variant", variant])) == url
        assert downloader.base_url(parse(["--variant", variant, "--base-url", "http://mirror/x/"])) == "http://mirror/x"
        monkeypatch.setenv(downloader.BASE_URL_ENV, "http://env-mirror/y")
        assert downloader.base_url(parse(["--variant", variant])) == "http://env-mirror/y"
        monkeypatch.delenv(downloader.BASE_URL_ENV)
    # A variant with no known public source needs a base URL, and says so before any request.
    out = tmp_path / "data"
    assert downloader.main(["--variant", "sp2048", "--output-dir", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --variant sp2048: no public source of fineweb10B_sp2048")
    assert "pass --base-url" in lines[0] and not out.exists()
    assert downloader.base_url(parse(["--variant", "sp2048", "--base-url", "http://mirror/x"])) == "http://mirror/x"


def test_variants_fetch_their_shards_tokenizer_and_vocab_from_their_source(tmp_path, remote, monkeypatch, capsys):
    url, root, requests, _ = remote
    frontier = root / "kevclark"
    rng = np.random.default_rng(1)
    for v in (4096, 8192):
        for name in ["fineweb_val_000000.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin"]:
            write_shard(frontier / f"datasets/fineweb10B_sp{v}" / name, rng.integers(0, v, size=2000).astype(np.uint16))
        (frontier / "tokenizers").mkdir(exist_ok=True)
        for ext in ("model", "vocab"):
            (frontier / f"tokenizers/fineweb_{v}_bpe.{ext}").write_bytes(rng.bytes(700))
    (frontier / "manifest.json").write_text(json.dumps(FRONTIER))
    monkeypatch.delenv(downloader.BASE_URL_ENV, raising=False)
    monkeypatch.setattr(downloader, "VARIANT_URLS", {"sp1024": url.rstrip("/"), "sp4096": url + "kevclark",
                                                     "sp8192": url + "kevclark"})
    out = tmp_path / "data"

    def get(variant: str) -> tuple[list[str], str]:
        requests.clear()
        capsys.readouterr()
        assert downloader.main(["--variant", variant, "--train-shards", "1", "--output-dir", str(out)]) == 0
        return sorted(path for path, _ in requests), capsys.readouterr().out.strip().splitlines()[-1]

    def wanted(prefix: str, v: int, manifest: bool) -> list[str]:
        files = [f"datasets/fineweb10B_sp{v}/fineweb_val_000000.bin", f"datasets/fineweb10B_sp{v}/fineweb_train_000000.bin",
                 f"tokenizers/fineweb_{v}_bpe.model", f"tokenizers/fineweb_{v}_bpe.vocab"]
        return sorted(f"/{prefix}{rel}" for rel in files + ["manifest.json"] * manifest)

    def ready(v: int) -> str:
        return (f"DATA_PATH={(out / f'datasets/fineweb10B_sp{v}').resolve()} "
                f"TOKENIZER_PATH={(out / f'tokenizers/fineweb_{v}_bpe.model').resolve()} VOCAB_SIZE={v}")

    # The manifest cached by the sp1024 download does not list sp8192: it is fetched again from
    # the sp8192 source, then kept for sp4096 (same source), and fetched again for sp1024.
    assert get("sp1024") == (wanted("", 1024, True), ready(1024))
    assert get("sp8192") == (wanted("kevclark/", 8192, True), ready(8192))
    assert get("sp4096") == (wanted("kevclark/", 4096, False), ready(4096))
    assert get("sp1024") == (["/manifest.json"], ready(1024))  # its files are already in place
    for v in (4096, 8192):
        for rel in wanted("", v, False):
            assert (out / rel[1:]).read_bytes() == (frontier / rel[1:]).read_bytes()
    assert (out / "manifest.json").read_bytes() == (root / "manifest.json").read_bytes()


@pytest.mark.parametrize("setting, value", [("--base-url", "example.com/data"), ("--base-url", "ftp://example.com/x"),
                                            ("--base-url", "http://example.com:port/"),
                                            (downloader.BASE_URL_ENV, "huggingface.co/datasets/x"),
                                            (downloader.BASE_URL_ENV, "")])
def test_base_url_must_be_an_http_url(tmp_path, monkeypatch, capsys, setting, value):
    out = tmp_path / "data"
    argv = ["--output-dir", str(out)]
    if setting == "--base-url":
        argv += ["--base-url", value]
    else:
        monkeypatch.setenv(setting, value)
    assert downloader.main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {setting} {value!r}: not a valid http") and not out.exists()


def test_corrupt_remote_shard_is_deleted_and_named(tmp_path, remote, capsys):
    url, root, _, _ = remote
    rel = f"{DATASET}/fineweb_train_000001.bin"
    (root / rel).write_bytes(corrupt(bytearray((root / rel).read_bytes()), "magic"))
    out = tmp_path / "data"
    assert fetch(url, out) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "fineweb_train_000001.bin" in lines[0]
    assert not (out / rel).exists() and not list(out.rglob("*.part"))
    assert (out / f"{DATASET}/fineweb_train_000000.bin").exists()


DOWNLOAD_ERRORS = {
    "too many shards": (["--train-shards", "4"], "--train-shards 4: must be 0..3"),
    "unpublished variant": (["--variant", "sp4096"], "fineweb10B_sp4096 is not in manifest.json"),
    "missing remote file": ([], "fineweb_1024_bpe.vocab: HTTP 404"),
    "busy server": ([], "fineweb_1024_bpe.vocab: HTTP 429"),
    "output folder is a file": ([], "File exists"),
}


@pytest.mark.parametrize("case", list(DOWNLOAD_ERRORS))
def test_download_errors_are_one_clear_line(tmp_path, remote, capsys, case):
    url, root, _, server = remote
    extra, needle = DOWNLOAD_ERRORS[case]
    if case == "missing remote file":
        (root / "tokenizers" / "fineweb_1024_bpe.vocab").unlink()
    if case == "busy server":
        server.faults["/tokenizers/fineweb_1024_bpe.vocab"] = [(429, "1")] * downloader.ATTEMPTS
    if case == "output folder is a file":
        (tmp_path / "data").write_text("")
    assert fetch(url, tmp_path / "data", *extra) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
