"""A static check of train_gpt.py as strip leaves it: what a stripped system leaves behind in the
code that stays. On the stripped core and on the core with each optional system alone it finds
unused imports, module names, arguments and locals, and words that name a system not kept.

    python3 tests/test_static.py [--script PATH] [NAME ...]   # findings on the core kept with NAMEs (none: the core)
"""
from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO, submission  # noqa: E402

SYSTEMS = sorted(set(submission.OPENING.findall((REPO / "train_gpt.py").read_text())))
# Words that name a system; the core kept without it must not use them (comments included).
WORDS = {
    "checkpoints": r"checkpoint|resumed?\b(?!\()",
    "compressors": r"zstd|zstandard|lzma|brotli",
    "deq": r"\bDEQ|fixed.point|Anderson|\bsolve\b",
    "ema": r"\bEMA\b|moving average",
    "gptq": r"GPTQ|Hessian",
    "hash_embed": r"hash n-gram|hash_embed|n-gram|bigram|trigram",
    "input_checks": r"input_checks|look-alike",
    "mod": r"Mixture-of-Depths|\brout(ed|er|ing)\b|\bMoD\b",
    "record_block": r"record_block|\bXSA\b|[Ll]eaky|ROPE_DIMS|LN_SCALE|PARALLEL_RESIDUAL|ORTHO_INIT|GPT-J",
    "record_optim": r"record_optim|MuonEq|row_normalize|decay_weights|weight decay",
    "seed_lora": r"Seed-LoRA|seed_lora|regenerat",
    "shuffled_data": r"TRAIN_SHUFFLE|ShuffledSequences|shuffled_loader",
    "size_guard": r"size_guard|size estimate",
    "ttt": r"\bTTT|test-time|ttt_|add_lora|adapters=",
    "unet": r"U-Net|skip.weight|\bpush\b|\bpop\b|>skip",
    "warmdown_steps": r"WARMDOWN_STEPS|MIN_LR_FRAC",
}
# Arguments an interface fixes, used or not: an override's signature is its base class's.
INTERFACE_ARGS = {("step", "closure")}


def stripped(keep: list[str], script: Path = REPO / "train_gpt.py") -> str:
    return submission.strip(script.read_text(encoding="utf-8"), keep, script)


def loaded_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Load, ast.Del))}


def findings(text: str, keep: list[str]) -> list[str]:
    tree, out = ast.parse(text), []
    used = loaded_names(tree) | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in tree.body:  # module names: imports, functions, classes, constants
        names = ([a.asname or a.name.split(".")[0] for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom))
                 else [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                 else [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)])
        out += [f"line {node.lineno}: module name {name} is never used" for name in names  # constants may document
                if name not in used and name not in ("annotations", "main") and not name.startswith("__") and not name.isupper()]
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Lambda))):
        body_loads = set().union(*(loaded_names(b) for b in (fn.body if isinstance(fn.body, list) else [fn.body])))
        a = fn.args
        for arg in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
            if arg is None or arg.arg in ("self", "cls") or arg.arg.startswith("_"):
                continue
            if arg.arg not in body_loads and (getattr(fn, "name", ""), arg.arg) not in INTERFACE_ARGS:
                out.append(f"line {fn.lineno}: argument {arg.arg} of {getattr(fn, 'name', 'lambda')} is never used")
        if isinstance(fn, ast.FunctionDef):
            inner = [n for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
            nonlocal_ = {name for n in ast.walk(fn) if isinstance(n, (ast.Global, ast.Nonlocal)) for name in n.names}
            for name in sorted({n.id for n in inner} - body_loads - nonlocal_):
                if not name.startswith("_"):
                    out.append(f"line {fn.lineno}: {name} in {fn.name} is assigned and never read")
    for system in SYSTEMS:
        if system in keep:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if re.search(WORDS[system], line, re.IGNORECASE if system not in ("deq", "ttt", "ema", "record_block") else 0):
                out.append(f"line {i}: names {system}, which is not kept: {line.strip()[:90]}")
    return out


def test_every_system_has_its_words():
    assert sorted(WORDS) == SYSTEMS


@pytest.mark.parametrize("keep", [[]] + [[name] for name in SYSTEMS], ids=lambda keep: "+".join(keep) or "core")
def test_the_stripped_script_leaves_nothing_of_the_systems_it_removed(keep):
    found = findings(stripped(keep), keep)
    assert not found, "\n".join(found)


# The stripped core is what a newcomer reads: it may grow only past this ceiling by a decision, and
# what an optional system needs goes in its block. Comments and docstrings stay 8-15% of its lines.
CORE_LINE_CEILING = 1_800


def comment_lines(text: str) -> int:
    """Lines of `text` that are only a comment, or part of a docstring (a string statement)."""
    lines = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(text).readline)
             if tok.type == tokenize.COMMENT and tok.line.lstrip().startswith("#")}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return len(lines)


def test_the_stripped_core_stays_within_its_line_ceiling_and_comment_share():
    core = stripped([])
    lines = len(core.splitlines())
    assert lines <= CORE_LINE_CEILING, f"the stripped core has {lines} lines, over its ceiling of {CORE_LINE_CEILING}"
    assert 0.08 <= comment_lines(core) / lines <= 0.15, f"{comment_lines(core)} of {lines} lines are comments"
    assert comment_lines('x = 1  # code\n# one\n"""two\nthree"""\ny = "not a docstring"\n') == 3


def test_the_check_finds_what_it_looks_for():
    text = ("import os\nimport re\nX = re.compile('a')\n\n\ndef f(a, b, closure=None):\n    c = 1\n    return a\n\n\n"
            "def step(closure=None):\n    return X  # resumes a checkpoint\n")
    found = findings(text, [])
    assert any("module name os" in f for f in found) and any("module name f " in f for f in found)
    assert any("argument b of f" in f for f in found) and any("argument closure of f" in f for f in found)
    assert any("c in f is assigned" in f for f in found) and any("names checkpoints" in f for f in found)
    assert not any("of step" in f or "name re" in f or "name X" in f for f in found)


if __name__ == "__main__":
    keep, script = sys.argv[1:], REPO / "train_gpt.py"
    if keep[:1] == ["--script"]:
        script, keep = Path(keep[1]), keep[2:]
    print("\n".join(findings(stripped(keep, script), keep)) or "no findings")
