"""Turn finished runs into a challenge submission: statistics, significance, folder, loss curves;
write packed or stripped train_gpt.py scripts.

    python3 records/submission.py stats logs/seed1.txt logs/seed2.txt logs/seed3.txt --beat 1.9500
    python3 records/submission.py make logs/*.txt --name "Shared Block int6" --author "Ada" --github-id ada \\
        --blurb "..." --beat 1.9500
    python3 records/submission.py plot logs/*.txt -o loss_curve.png
    python3 records/submission.py strip train_gpt.py -o core.py --keep ttt ema     (or: strip train_gpt.py --list)
    python3 records/submission.py pack train_gpt.py -o packed/train_gpt.py [--keep ttt ema]

Each log is one run of train_gpt.py (logs/<RUN_ID>.txt, one per seed). The logs must embed the
same code and the same configuration apart from SEED and RUN_ID; anything else is refused. `make`
writes records/<track>/<YYYY-MM-DD>_<Name>/ with that train_gpt.py, train_seed<SEED>.log files,
submission.json, a README with the per-seed table and, when matplotlib is installed, the loss
curves; the folder and its files get the modes a plain mkdir and open would give. `--beat` takes
the previous record's val_loss in nats: the challenge asks for a mean at least 0.005 nats lower at
p < 0.01, tested here one-sided with the seeds as the sample. Nothing read from a log is executed:
the launch command's defaults come from the embedded source as text. The command names the data
and tokenizer where the challenge keeps them, ./data/datasets/<name> and ./data/tokenizers/<name>,
not at this machine's paths that the log holds, and leaves them out where that is the default.

`pack` writes a self-extracting, compressed train_gpt.py. `strip` writes a readable one with only
the core and the optional systems named by --keep (`pack --keep` strips first, then packs). Each
optional system's lines lie in blocks opened by a line `# >>> NAME` (or `# >>> NAME: text`) and
closed by `# <<< NAME`; blocks do not nest. A block not kept goes with its markers, a kept one
loses only its markers; the result must parse as Python.
"""
from __future__ import annotations

import argparse
import ast
import base64
import datetime as dt
import json
import lzma
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

SEPARATOR = "=" * 100
MARGIN_NATS = 0.005
TRACKS = ("track_10min_16mb", "track_non_record_16mb")
IGNORED_KEYS = ("seed", "run_id")  # may differ between the seeds of one submission
UNPACKED_LIMIT = 16_000_000  # bytes of readable source a packed script may hold: the artifact cap
FLOAT = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
OPENING = re.compile(r"# >>> ([a-z][a-z0-9_]*)(?:: .+)?")  # an optional system's block: its first line
CLOSING = re.compile(r"# <<< ([a-z][a-z0-9_]*)")  # and its last
DATA_DIRS = {"data_path": "./data/datasets", "tokenizer_path": "./data/tokenizers"}  # the challenge's, from a record


class SubmissionError(Exception):
    pass


@dataclass
class Run:
    path: Path
    text: str
    code: str
    config: dict[str, str]
    seed: int
    fmt: str
    score_label: str
    val_loss: float
    val_bpb: float
    pre_quant_val_loss: float
    pre_quant_val_bpb: float
    roundtrip_val_bpb: float
    bytes_total: int
    bytes_code: int
    steps: int
    train_time_ms: int
    eval_time_ms: int
    train_ok: bool
    eval_ok: bool
    artifact_ok: bool
    hardware: str


def find(pattern: str, text: str, path: Path, what: str) -> re.Match:
    matches = list(re.finditer(pattern, text, re.M))
    if not matches:
        raise SubmissionError(f"{path}: no {what} line; is this a finished train_gpt.py run?")
    return matches[-1]


def number(text: str, path: Path, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise SubmissionError(f"{path}: {what} is {text!r}, not a finite number")
    return value


def hardware_of(text: str) -> str:
    """'8xNVIDIA H100 80GB HBM3' from the world size and nvidia-smi's table, else the device type."""
    gpu = re.search(r"^\|\s+\d+\s+(NVIDIA [^|]*?)\s{2,}", text, re.M)
    world = re.search(r"^world_size:(\d+) ", text, re.M)
    device = re.search(r"^device:(\w+)", text, re.M)
    name = gpu.group(1) if gpu else device.group(1) if device else "unknown"
    return f"{world.group(1) if world else 1}x{name}"


def parse_log(path: Path) -> Run:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SubmissionError(f"{path}: not a train_gpt.py log (not UTF-8 text)") from None
    parts = text.split(f"\n{SEPARATOR}\n")
    if len(parts) < 3:
        raise SubmissionError(f"{path}: not a train_gpt.py log (no embedded code and settings)")
    code, config = parts[0], {}
    # Older train_gpt.py versions appended a rerun under the same RUN_ID to the same log.
    count = lambda pattern: len(re.findall(pattern, text[len(code):], re.M))
    if count(rf"^{SEPARATOR}$") > 2 or count(r"^Running PyTorch ") > 1 or count(r"^compliance ") > 1:
        raise SubmissionError(f"{path}: holds more than one run (a reused RUN_ID?); give each run its own log")
    for line in parts[2].splitlines():  # one name:value line per setting; warnings may follow them
        setting = re.fullmatch(r"([a-z_][a-z0-9_]*):(.*)", line)
        if not setting or line.startswith("val_bpb:enabled"):
            break
        config[setting.group(1)] = setting.group(2)
    fmt_line = find(r"^Serialized model (\S+): \d+ bytes \(code:(\d+) bytes\)$", text, path, "Serialized model")
    fmt, bytes_code = fmt_line.group(1), int(fmt_line.group(2))
    if len(code.encode("utf-8")) != bytes_code:
        raise SubmissionError(f"{path}: the embedded code is {len(code.encode('utf-8'))} bytes, the run counted {bytes_code}")
    compliance = find(r"^compliance train_time:(\d+)ms/\d+ms:(\w+) eval_time:(\d+)ms/\d+ms:(\w+) .* "
                      r"artifact:(\d+)/\d+:(\w+) val_tokens_trained_before_scoring:0 score:(\S+)_exact val_bpb:(\S+)$",
                      text, path, "compliance")
    label = compliance.group(7)
    score = find(rf"^{re.escape(label)}_exact (?:\S+ )?val_loss:(\S+) val_bpb:(\S+)$", text, path, f"{label}_exact")
    pre = find(r"^final_prequant_exact val_loss:(\S+) val_bpb:(\S+)$", text, path, "final_prequant_exact")
    roundtrip = find(rf"^final_{re.escape(fmt.replace('+', '_'))}_roundtrip_exact val_loss:\S+ val_bpb:(\S+)$",
                     text, path, "roundtrip")
    steps = find(r"^train_summary steps:(\d+) ", text, path, "train_summary")
    if not re.fullmatch(r"\d+", config.get("seed", "")):
        raise SubmissionError(f"{path}: the settings block has no seed, or one that is not a whole number")
    return Run(path=path, text=text, code=code, config=config, seed=int(config["seed"]), fmt=fmt, score_label=label,
               val_loss=number(score.group(1), path, f"{label}_exact val_loss"),
               val_bpb=number(score.group(2), path, f"{label}_exact val_bpb"),
               pre_quant_val_loss=number(pre.group(1), path, "final_prequant_exact val_loss"),
               pre_quant_val_bpb=number(pre.group(2), path, "final_prequant_exact val_bpb"),
               roundtrip_val_bpb=number(roundtrip.group(1), path, "roundtrip val_bpb"),
               bytes_total=int(compliance.group(5)), bytes_code=bytes_code, steps=int(steps.group(1)),
               train_time_ms=int(compliance.group(1)), eval_time_ms=int(compliance.group(3)),
               train_ok=compliance.group(2) == "ok", eval_ok=compliance.group(4) == "ok",
               artifact_ok=compliance.group(6) == "ok", hardware=hardware_of(text))


def load_runs(paths: list[str]) -> list[Run]:
    """Parse the logs and check that they are seeds of one submission."""
    if not paths:
        raise SubmissionError("give at least one run log")
    runs = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise SubmissionError(f"{path}: no such log")
        runs.append(parse_log(path))
    first = runs[0]
    strip = lambda config: {k: v for k, v in config.items() if k not in IGNORED_KEYS}
    for run in runs[1:]:
        if run.code != first.code:
            raise SubmissionError(f"{run.path} embeds different code than {first.path}")
        a, b = strip(first.config), strip(run.config)
        if a != b:
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            raise SubmissionError(f"{run.path} and {first.path} differ in settings: {', '.join(diff)}")
    seeds = [run.seed for run in runs]
    if len(set(seeds)) != len(seeds):
        raise SubmissionError(f"a seed appears twice: {seeds}")
    return sorted(runs, key=lambda run: run.seed)


# ---- Student-t tail, for when scipy is not installed -------------------------------------------

def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), as in Numerical Recipes' betai."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - regularized_beta(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_sf(t: float, df: float) -> float:
    try:
        from scipy.stats import t as student
    except ImportError:
        return student_t_sf(t, df)
    return float(student.sf(t, df))


def significance(losses: list[float], previous: float, margin: float = MARGIN_NATS) -> dict[str, float]:
    """One-sided one-sample t-test of H1: mean(losses) < previous - margin."""
    n = len(losses)
    if n < 2:
        raise SubmissionError("the significance test needs at least two seeds")
    mean, sd = statistics.fmean(losses), statistics.stdev(losses)
    target = previous - margin
    if sd == 0:
        t = math.inf if mean < target else -math.inf
    else:
        t = (target - mean) / (sd / math.sqrt(n))
    p = 0.0 if t == math.inf else 1.0 if t == -math.inf else t_sf(t, n - 1)
    return {"previous_val_loss": previous, "margin_nats": margin, "mean_val_loss": mean, "t": t, "df": n - 1, "p": p}


# ---- reports -------------------------------------------------------------------------------------

def summary(runs: list[Run], previous: float | None) -> dict:
    mean = lambda f: statistics.fmean(f(r) for r in runs)
    out = {
        "val_loss": round(mean(lambda r: r.val_loss), 8), "val_bpb": round(mean(lambda r: r.val_bpb), 8),
        "pre_quant_val_loss": round(mean(lambda r: r.pre_quant_val_loss), 8),
        "pre_quant_val_bpb": round(mean(lambda r: r.pre_quant_val_bpb), 8),
        "bytes_total": max(r.bytes_total for r in runs), "bytes_code": runs[0].bytes_code,
        "seeds": [r.seed for r in runs],
        "seed_results": {str(r.seed): {
            "val_loss": r.val_loss, "val_bpb": r.val_bpb, "pre_quant_val_loss": r.pre_quant_val_loss,
            "pre_quant_val_bpb": r.pre_quant_val_bpb, "roundtrip_val_bpb": r.roundtrip_val_bpb,
            "bytes_total": r.bytes_total, "steps": r.steps, "train_time_ms": r.train_time_ms,
            "eval_time_ms": r.eval_time_ms} for r in runs},
        "val_bpb_std": round(statistics.stdev(r.val_bpb for r in runs), 8) if len(runs) > 1 else None,
        "score": f"{runs[0].score_label}_exact", "export_format": runs[0].fmt, "hardware": runs[0].hardware,
    }
    if previous is not None:
        out["significance"] = significance([r.val_loss for r in runs], previous)
    return out


def table(runs: list[Run], stats: dict) -> str:
    head = ("| Seed | Steps | Pre-quant val_bpb | Roundtrip val_bpb | val_loss | val_bpb | Artifact bytes | Train s | Eval s |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [f"| {r.seed} | {r.steps} | {r.pre_quant_val_bpb:.8f} | {r.roundtrip_val_bpb:.8f} | {r.val_loss:.8f} | "
            f"{r.val_bpb:.8f} | {r.bytes_total:,} | {r.train_time_ms / 1000:.1f} | {r.eval_time_ms / 1000:.1f} |"
            for r in runs]
    rows.append(f"| **Mean** | | {stats['pre_quant_val_bpb']:.8f} | | {stats['val_loss']:.8f} | "
                f"**{stats['val_bpb']:.8f}** | {stats['bytes_total']:,} (max) | | |")
    return "\n".join([head, *rows])


def significance_text(sig: dict | None) -> str:
    if sig is None:
        return "No significance test was asked for (`--beat PREVIOUS_VAL_LOSS`)."
    verdict = "significant at p < 0.01" if sig["p"] < 0.01 else "NOT significant at p < 0.01"
    return (f"One-sided t-test that the mean val_loss {sig['mean_val_loss']:.8f} is below the previous "
            f"{sig['previous_val_loss']:.8f} by at least {sig['margin_nats']} nats: t = {sig['t']:.3f}, "
            f"df = {sig['df']}, p = {sig['p']:.3g} ({verdict}).")


def check_compliance(runs: list[Run], track: str) -> None:
    for r in runs:
        if not r.artifact_ok:
            raise SubmissionError(f"{r.path}: the artifact ({r.bytes_total} bytes) is over the 16,000,000-byte cap")
        if track == "track_10min_16mb" and not (r.train_ok and r.eval_ok):
            raise SubmissionError(f"{r.path}: training or evaluation went over 600 s; "
                                  "use --track track_non_record_16mb for an unlimited-compute run")


def env_value(value: str) -> str:
    return {"True": "1", "False": "0"}.get(value, value)


def is_self(node: ast.AST, attr: str | None = None) -> bool:
    """An attribute of a plain name: self.x in Hyperparameters, h.x in an extension's settings reader."""
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and attr in (None, node.attr)


def default_value(node: ast.expr, known: dict):
    """A default as written: a literal, a setting read before it (self.x), min/max of those, or one
    of two of them chosen by whether two of them are equal (`a if self.x == "b" else c`)."""
    if is_self(node):
        return known[node.attr]
    if isinstance(node, ast.IfExp) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1 \
            and isinstance(node.test.ops[0], (ast.Eq, ast.NotEq)):
        left, right = (default_value(n, known) for n in (node.test.left, node.test.comparators[0]))
        chosen = (left == right) == isinstance(node.test.ops[0], ast.Eq)
        return default_value(node.body if chosen else node.orelse, known)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max") \
            and len(node.args) >= 2 and not node.keywords:
        return {"min": min, "max": max}[node.func.id](*(default_value(a, known) for a in node.args))
    return ast.literal_eval(node)


def script_defaults(source: str, path: Path) -> dict[str, str]:
    """The defaults of the settings (`self.x = self._get("X", default, ...)` in Hyperparameters, `h.x =
    h._get(...)` in an extension's reader), read from the source without running it (nothing in a log
    is executed). A default of any other form (the run_id's uuid) is left out, so that setting is
    always named in the launch command."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError) as e:
        raise SubmissionError(f"{path}: the embedded code is not Python ({type(e).__name__})") from None
    known = {}  # settings are read in file order: Hyperparameters' groups, then the extensions' readers
    for node in sorted((n for n in ast.walk(tree) if isinstance(n, ast.Assign)), key=lambda n: n.lineno):
        target, call = node.targets[0], node.value
        if not (len(node.targets) == 1 and is_self(target) and isinstance(call, ast.Call)
                and is_self(call.func, "_get") and len(call.args) >= 2):
            continue
        try:
            known[target.attr] = default_value(call.args[1], known)
        except (ValueError, TypeError, KeyError, RecursionError):
            known.pop(target.attr, None)
    return {k: str(v) for k, v in known.items()}


def standard_path(key: str, value: str) -> str:
    """Where the challenge keeps a logged data or tokenizer path: a log holds this machine's absolute one."""
    return f"{DATA_DIRS[key]}/{PurePosixPath(value).name}" if key in DATA_DIRS else value


def launch_command(source: str, runs: list[Run]) -> str:
    """torchrun command with the settings that differ from the script's defaults, quoted for a shell; the
    data and tokenizer at the challenge's paths, compared with the defaults as paths ("./x/" is "x")."""
    defaults = script_defaults(source, runs[0].path)
    config = {k: standard_path(k, v) for k, v in runs[0].config.items() if k not in IGNORED_KEYS}
    spelled = lambda k, v: os.path.normpath(v) if k in DATA_DIRS and v is not None else v
    changed = [f"{k.upper()}={shlex.quote(env_value(v))}" for k, v in sorted(config.items())
               if spelled(k, defaults.get(k)) != spelled(k, v)]
    return " ".join(["SEED=<seed>", *changed, "torchrun --standalone --nproc_per_node=8 train_gpt.py"])


def readme(name: str, blurb: str, runs: list[Run], stats: dict, command: str, has_plot: bool) -> str:
    lines = [f"# {name}", "", blurb, "",
             f"**val_bpb {stats['val_bpb']:.8f}**" + (f" (std {stats['val_bpb_std']:.8f})" if stats["val_bpb_std"] else "")
             + f" over {len(runs)} seed(s); score `{stats['score']}`; artifact {stats['export_format']}, "
             f"at most {stats['bytes_total']:,} bytes with {stats['bytes_code']:,} bytes of code; {stats['hardware']}.",
             "", "## Results", "", table(runs, stats), "", significance_text(stats.get("significance")), ""]
    if has_plot:
        lines += ["![Training loss and validation bpb per seed](loss_curve.png)", ""]
    lines += ["## Reproduce", "", "From this folder, with the challenge data in ./data:", "", "```bash", command, "```", "",
              "## What changed and why", "", "(Describe the idea, the ablations behind it and what did not work.)", ""]
    return "\n".join(lines)


def plot(runs: list[Run], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SubmissionError("plotting needs matplotlib: python3 -m pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        train = re.findall(rf"^step:(\d+)/\d+ train_loss:({FLOAT}) ", r.text, re.M)
        val = re.findall(rf"^step:(\d+)/\d+ val_loss:\S+ val_bpb:({FLOAT}) ", r.text, re.M)
        ax_train.plot([int(s) for s, _ in train], [float(v) for _, v in train], label=f"seed {r.seed}")
        ax_val.plot([int(s) for s, _ in val], [float(v) for _, v in val], marker="o", label=f"seed {r.seed}")
    for ax, title in ((ax_train, "train_loss (nats)"), (ax_val, "val_bpb")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


PACKED_PREFIX = "import base64, lzma\nexec(lzma.decompress(base64.b85decode("


def pack(source: str) -> str:
    """A self-extracting train_gpt.py: the same program, lzma-compressed and base85-encoded, as
    record submissions ship it. Run as a script, `__file__` is the packed file, so the run's
    code-byte count measures the packed bytes."""
    blob = base64.b85encode(lzma.compress(source.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)).decode("ascii")
    return f'{PACKED_PREFIX}"{blob}")))\n'


def unpack(code: str) -> str | None:
    """The readable source inside a packed file, or None when `code` is not packed. Decompresses at
    most UNPACKED_LIMIT bytes: a crafted payload could expand without bound."""
    match = re.fullmatch(re.escape(PACKED_PREFIX) + r'"([^"]*)"\)\)\)\n', code)
    if not match:
        return None
    try:
        stream = lzma.LZMADecompressor()
        source = stream.decompress(base64.b85decode(match.group(1)), max_length=UNPACKED_LIMIT)
    except (ValueError, lzma.LZMAError) as e:
        raise SubmissionError(f"the packed code is not base85 lzma data ({e})") from None
    if not stream.eof and not stream.needs_input:
        raise SubmissionError(f"the packed code unpacks to more than {UNPACKED_LIMIT:,} bytes")
    if not stream.eof or stream.unused_data:
        raise SubmissionError("the packed code is not one complete lzma stream")
    try:
        return source.decode("utf-8")
    except UnicodeDecodeError:
        raise SubmissionError("the packed code does not unpack to UTF-8 text") from None


def marked_blocks(text: str, path: Path) -> list[tuple[str, int, int]]:
    """The optional systems' blocks in `text`, in order: (NAME, index of the opening marker line, index
    of the closing one), lines counted from 0 as str.splitlines counts them. A line that mentions a
    marker and is not one, a nested opening, a closing of another block or none, and a block left
    open are refused with the line number."""
    blocks, open_at = [], None  # open_at: (NAME, line index) of the block being read
    for i, line in enumerate(text.splitlines()):
        if "# >>>" not in line and "# <<<" not in line:
            continue
        where, marker = f"{path}:{i + 1}", line.strip()
        opening, closing = OPENING.fullmatch(marker), CLOSING.fullmatch(marker)
        if not (opening or closing):
            raise SubmissionError(f"{where}: {marker!r} is not a block marker: '# >>> NAME', '# >>> NAME: text' "
                                  "or '# <<< NAME', NAME of [a-z][a-z0-9_]*")
        if opening and open_at:
            raise SubmissionError(f"{where}: block {opening[1]!r} opens inside block {open_at[0]!r} "
                                  f"(opened on line {open_at[1] + 1}); blocks do not nest")
        if closing and not open_at:
            raise SubmissionError(f"{where}: '# <<< {closing[1]}' closes no open block")
        if closing and closing[1] != open_at[0]:
            raise SubmissionError(f"{where}: '# <<< {closing[1]}' closes block {open_at[0]!r} "
                                  f"(opened on line {open_at[1] + 1})")
        if opening:
            open_at = (opening[1], i)
        else:
            blocks.append((*open_at, i))
            open_at = None
    if open_at:
        raise SubmissionError(f"{path}:{open_at[1] + 1}: block {open_at[0]!r} is never closed")
    return blocks


def kept_summary(keep: list[str], blocks: list[tuple[str, int, int]]) -> str:
    removed = sorted({name for name, _, _ in blocks} - set(keep))
    return f"kept: {', '.join(dict.fromkeys(keep)) or 'core only'}; removed: {', '.join(removed) or 'nothing'}"


def strip(text: str, keep: list[str], path: Path) -> str:
    """`text` with only the core and the systems in `keep`: a block not kept goes with its marker
    lines, a kept one loses only its markers. Where a deletion leaves more than two blank lines in a
    row they are cut to two, and at the end of the file to none. The result must parse."""
    blocks = marked_blocks(text, path)
    present = sorted({name for name, _, _ in blocks})
    unknown = [name for name in dict.fromkeys(keep) if name not in present]
    if unknown:
        raise SubmissionError(f"{path}: no system named {', '.join(unknown)}; "
                              f"its systems are: {', '.join(present) or 'none'}")
    drop = set()
    for name, first, last in blocks:
        drop.update((first, last) if name in keep else range(first, last + 1))
    out, blanks, cut = [], [], False  # cut: a line was deleted since the last non-blank line kept
    for i, line in enumerate(text.splitlines(keepends=True)):
        if i in drop:
            cut = True
        elif line.strip():
            out += blanks[:2] if cut else blanks
            out.append(line)
            blanks, cut = [], False
        else:
            blanks.append(line)
    stripped = "".join(out if cut else out + blanks)
    try:
        ast.parse(stripped)
    except (SyntaxError, ValueError) as e:
        detail = f"line {e.lineno} of the stripped text: {e.msg}" if isinstance(e, SyntaxError) else str(e)
        raise SubmissionError(f"{path}: stripped ({kept_summary(keep, blocks)}) it does not parse: {detail}") from None
    return stripped


def systems(text: str, path: Path) -> str:
    """Each optional system with its number of blocks and lines (markers excluded), then the core."""
    blocks = marked_blocks(text, path)
    count = lambda n, what: f"{n:,} {what}{'s' * (n != 1)}"
    rows = []
    for name in sorted({name for name, _, _ in blocks}):
        sizes = [last - first - 1 for other, first, last in blocks if other == name]
        rows.append(f"{name}: {count(len(sizes), 'block')}, {count(sum(sizes), 'line')}")
    core = len(text.splitlines()) - sum(last - first + 1 for _, first, last in blocks)
    return "\n".join([*rows, f"core: {count(core, 'line')}"])


def write_atomic(out: Path, text: str, source: Path) -> None:
    """Write `out` whole or not at all (a temporary file in its folder, then os.replace); never over `source`."""
    if out.exists() and out.samefile(source):
        raise SubmissionError(f"--out {out} is the source itself; write elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def umask() -> int:
    """The process umask. Reading it means setting it, so it is set back at once (to 077 meanwhile:
    a file another thread makes in that instant is private, not world-writable)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def make(args: argparse.Namespace) -> Path:
    runs = load_runs(args.logs)
    check_compliance(runs, args.track)
    stats = summary(runs, args.beat)
    date = args.date or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise SubmissionError(f"--date {date!r} is not YYYY-MM-DD")
    if args.track not in TRACKS:
        raise SubmissionError(f"--track {args.track!r} is not one of {', '.join(TRACKS)}")
    if not slug(args.name):
        raise SubmissionError(f"--name {args.name!r} has no letters or digits to name the folder with")
    folder = Path(args.root) / args.track / f"{date}_{slug(args.name)}"
    if folder.exists():
        raise SubmissionError(f"{folder} already exists")
    try:
        readable = unpack(runs[0].code)
    except SubmissionError as e:
        raise SubmissionError(f"{runs[0].path}: {e}") from None
    command = launch_command(runs[0].code if readable is None else readable, runs)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / "train_gpt.py").write_text(runs[0].code, encoding="utf-8")
        if readable is not None:  # ship the source the packed file was made from beside it
            (tmp / "train_gpt_readable.py").write_text(readable, encoding="utf-8")
        for r in runs:
            shutil.copyfile(r.path, tmp / f"train_seed{r.seed}.log")
        has_plot = True
        try:
            plot(runs, tmp / "loss_curve.png")
        except SubmissionError as e:
            print(f"note: no loss_curve.png, {e}")
            has_plot = False
        meta = {"author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.blurb,
                "date": date, "track": args.track, **stats}
        (tmp / "submission.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme(args.name, args.blurb, runs, stats, command, has_plot), encoding="utf-8")
        tmp.chmod(0o777 & ~umask())  # mkdtemp's 0700; a record folder has a plain mkdir's mode
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    stats_p = sub.add_parser("stats", help="per-seed table and significance, nothing written")
    make_p = sub.add_parser("make", help="write records/<track>/<date>_<Name>/")
    plot_p = sub.add_parser("plot", help="loss curves of the logs as a PNG")
    pack_p = sub.add_parser("pack", help="write a self-extracting train_gpt.py to run record seeds with")
    strip_p = sub.add_parser("strip", help="write train_gpt.py with only the core and the systems --keep names")
    for p in (pack_p, strip_p):
        p.add_argument("source", help="the readable train_gpt.py")
    pack_p.add_argument("-o", "--out", required=True)
    pack_p.add_argument("--keep", nargs="*", metavar="NAME", help="strip SOURCE to the core and these systems first")
    target = strip_p.add_mutually_exclusive_group(required=True)
    target.add_argument("-o", "--out")
    target.add_argument("--list", action="store_true", help="each system's blocks and lines, nothing written")
    strip_p.add_argument("--keep", nargs="*", metavar="NAME", default=[], help="the systems to keep (default: none)")
    for p in (stats_p, make_p, plot_p):  # pack takes a source file, not logs
        p.add_argument("logs", nargs="+", help="train_gpt.py logs, one per seed")
    for p in (stats_p, make_p):
        p.add_argument("--beat", type=float, help="previous record's val_loss (nats) to beat by 0.005")
    make_p.add_argument("--name", required=True)
    make_p.add_argument("--author", required=True)
    make_p.add_argument("--github-id", required=True)
    make_p.add_argument("--blurb", default="")
    make_p.add_argument("--track", choices=TRACKS, default=TRACKS[0])
    make_p.add_argument("--date", help="YYYY-MM-DD, default today (UTC)")
    make_p.add_argument("--root", default=str(Path(__file__).resolve().parent), help="records folder")
    plot_p.add_argument("-o", "--out", default="loss_curve.png")
    args = parser.parse_args(argv)
    try:
        if args.command in ("pack", "strip"):
            path = Path(args.source)
            text = path.read_text(encoding="utf-8")
            if args.command == "strip" and args.list:
                print(systems(text, path))
                return
            source, out = text if args.keep is None else strip(text, args.keep, path), Path(args.out)
            kept = "" if args.keep is None else kept_summary(args.keep, marked_blocks(text, path))
            if args.command == "strip":
                write_atomic(out, source, path)
                print(f"wrote {out}: {len(source.splitlines()):,} lines, {len(source.encode()):,} bytes ({kept})")
                return
            packed = pack(source)
            write_atomic(out, packed, path)
            print(f"{out}: {len(packed.encode())} bytes (readable source: {len(source.encode())} bytes"
                  + (f"; {kept})" if kept else ")"))
            return
        if args.command == "plot":
            plot(load_runs(args.logs), Path(args.out))
            print(args.out)
            return
        if args.command == "stats":
            runs = load_runs(args.logs)
            stats = summary(runs, args.beat)
            print(table(runs, stats))
            print(significance_text(stats.get("significance")))
            return
        print(make(args))
    except (SubmissionError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
